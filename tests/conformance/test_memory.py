"""Compaction archives, agent notes and memory search: every backend passes it unchanged.

``compact`` stores an archive and appends its marker as one step; ``search_memory``
finds an agent's notes and the archives of its conversations by any query word.
Ranking, snippets and tokenizers differ between backends (BM25 over FTS5 or an
in-process index, ``ts_rank`` and ``ts_headline`` on postgres), so these tests
assert only what the ``Storage`` contract promises of all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import msgspec
import pytest
import trio
from chinwag.protocol import Entry, MemoryHit
from chinwag.storage import (
    MAX_SEARCH_LIMIT,
    Archive,
    ConversationNotFound,
    Storage,
    StorageError,
)
from test_storage import (
    AGENT,
    SENDER,
    STORE_CLOSED,
    T0,
    FailingAppends,
    Reopen,
    at,
    failure_of,
)


def message(content: str, *, role: str = "user", agent: str = "") -> Entry:
    return Entry(seq=0, role=role, content=content, agent=agent, created_at=T0)


async def conversation(
    store: Storage, contents: Sequence[str], *, agent: str = AGENT, sender: str = SENDER
) -> None:
    """Create the conversation (if new) and append one user message per content."""
    await store.create_conversation(agent, sender, cwd=None, created_at=T0)
    if contents:
        await store.append(agent, sender, [message(content) for content in contents])


def archive(
    first: int,
    last: int,
    summary: str = "a summary",
    *,
    name: str | None = None,
    speakers: list[str] | None = None,
    when: datetime = T0,
) -> Archive:
    return Archive(
        name=name or f"archive-{first}-{last}",
        first_seq=first,
        last_seq=last,
        summary=summary,
        speakers=[""] * (last - first + 1) if speakers is None else speakers,
        created_at=when,
    )


async def compacted(
    store: Storage, contents: Sequence[str], summary: str, *, sender: str = SENDER
) -> Archive:
    """Append ``contents`` to a (new or existing) conversation, then archive all of it."""
    await conversation(store, contents, sender=sender)
    item = await store.get_conversation(AGENT, sender)
    assert item is not None
    visible = await store.history(AGENT, sender)
    first = visible[0].seq + 1 if visible[0].kind == "compact" else 1
    done = archive(first, item.last_seq, summary, name=f"{sender}-{first}-{item.last_seq}")
    await store.compact(AGENT, sender, done)
    return done


async def search(store: Storage, query: str, agent: str = AGENT, **kw: int) -> list[MemoryHit]:
    return await store.search_memory(agent, query, **kw)


async def names(store: Storage, query: str, agent: str = AGENT, **kw: int) -> list[str]:
    return [hit.name for hit in await search(store, query, agent, **kw)]


# --- compact and get_archive -------------------------------------------------------------


async def test_compact_stores_the_archive_and_appends_its_marker(store: Storage) -> None:
    await conversation(store, [])
    await store.append(
        AGENT,
        SENDER,
        [message("hello"), message("hi there", role="assistant", agent="helper"), message("ok")],
    )
    paris = timezone(timedelta(hours=2))
    done = Archive(
        name="archive-1-3",
        first_seq=1,
        last_seq=3,
        summary="They said hello.",
        speakers=["", "helper", ""],
        created_at=at(10).astimezone(paris),
    )

    marker = await store.compact(AGENT, SENDER, done)

    assert (marker.seq, marker.kind, marker.role, marker.content, marker.archive) == (
        4,
        "compact",
        "",
        "They said hello.",
        "archive-1-3",
    )
    assert marker.created_at == at(10) and marker.created_at.utcoffset() == timedelta(0)
    stored = await store.get_archive(AGENT, SENDER, "archive-1-3")
    assert stored == done  # every field, speakers included
    assert stored is not None and stored.created_at.utcoffset() == timedelta(0)
    assert await store.get_archive(AGENT, SENDER, "archive-9-9") is None
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and (item.last_seq, item.updated_at) == (4, at(10))


async def test_history_hides_what_was_archived_and_shows_the_marker(store: Storage) -> None:
    await conversation(store, ["one", "two"])
    await store.compact(AGENT, SENDER, archive(1, 2, "both"))
    await store.append(AGENT, SENDER, [message("three")])

    assert [(e.seq, e.kind, e.content) for e in await store.history(AGENT, SENDER)] == [
        (3, "compact", "both"),
        (4, "message", "three"),
    ]
    everything = await store.history(AGENT, SENDER, include_archived=True)
    assert [e.content for e in everything] == ["one", "two", "both", "three"]


async def test_compacting_twice_leaves_two_markers_and_two_archives(store: Storage) -> None:
    await conversation(store, ["apple one", "apple two"])
    first = await store.compact(AGENT, SENDER, archive(1, 2, "first summary"))
    with pytest.raises(
        StorageError, match="must cover at least one entry"
    ):  # nothing came after the marker yet
        await store.compact(AGENT, SENDER, archive(4, 3, "empty", name="empty", speakers=[]))
    await store.append(AGENT, SENDER, [message("banana four"), message("banana five")])
    with pytest.raises(
        StorageError, match=r"must cover seq 4 to 5, .* this one covers 1 to 5"
    ):  # the second covers only what came after the first
        await store.compact(AGENT, SENDER, archive(1, 5, "wrong", name="wrong"))
    second = await store.compact(AGENT, SENDER, archive(4, 5, "second summary"))

    assert (first.seq, second.seq) == (3, 6)
    assert [(e.seq, e.archive) for e in await store.history(AGENT, SENDER)] == [
        (3, "archive-1-2"),
        (6, "archive-4-5"),
    ]
    one = await store.get_archive(AGENT, SENDER, "archive-1-2")
    two = await store.get_archive(AGENT, SENDER, "archive-4-5")
    assert one is not None and (one.first_seq, one.last_seq, one.summary) == (
        1,
        2,
        "first summary",
    )
    assert two is not None and (two.first_seq, two.last_seq, two.summary) == (
        4,
        5,
        "second summary",
    )
    assert await store.get_archive(AGENT, SENDER, "wrong") is None
    # Each archive's search text is its own entries: the first marker is not in the second.
    assert await names(store, "apple") == ["archive-1-2"]
    assert await names(store, "banana") == ["archive-4-5"]


async def test_the_archive_may_follow_a_marker_appended_directly(store: Storage) -> None:
    await conversation(store, ["one"])
    marker = Entry(seq=0, kind="compact", content="older", archive="elsewhere", created_at=T0)
    await store.append(AGENT, SENDER, [marker, message("three")])  # seqs 2 and 3
    with pytest.raises(StorageError, match=r"must cover seq 3 to 3, .* this one covers 1 to 3"):
        await store.compact(AGENT, SENDER, archive(1, 3))
    await store.compact(AGENT, SENDER, archive(3, 3))
    assert await store.get_archive(AGENT, SENDER, "elsewhere") is None  # a marker, no archive


RANGE = "An archive must cover seq 1 to 3, the entries after the latest compact marker;"
REFUSED = {  # what each wrong archive below is refused with
    "late-start": f"{RANGE} this one covers 2 to 3",
    "early-end": f"{RANGE} this one covers 1 to 2",
    "past-the-end": f"{RANGE} this one covers 1 to 4",
    "from-zero": f"{RANGE} this one covers 0 to 3",
    "too-few-speakers": "An archive needs one speaker per archived entry",
    "too-many-speakers": "An archive needs one speaker per archived entry",
}


@pytest.mark.parametrize(
    "bad",
    [
        archive(2, 3, name="late-start"),
        archive(1, 2, name="early-end"),
        archive(1, 4, name="past-the-end"),
        archive(0, 3, name="from-zero"),
        archive(1, 3, name="too-few-speakers", speakers=["", ""]),
        archive(1, 3, name="too-many-speakers", speakers=["", "", "", ""]),
    ],
    ids=lambda a: a.name,
)
async def test_a_wrong_archive_is_refused_and_stores_nothing(store: Storage, bad: Archive) -> None:
    await conversation(store, ["one", "two", "three"])
    with pytest.raises(StorageError, match=REFUSED[bad.name]):
        await store.compact(AGENT, SENDER, msgspec.structs.replace(bad, summary="zebra"))
    await assert_unchanged(store, bad.name, last_seq=3)


async def test_a_name_the_conversation_used_is_refused(store: Storage) -> None:
    await conversation(store, ["one", "two"])
    await store.compact(AGENT, SENDER, archive(1, 2, "first", name="same"))
    await store.append(AGENT, SENDER, [message("four")])
    with pytest.raises(StorageError, match="already has an archive named 'same'"):
        await store.compact(AGENT, SENDER, archive(4, 4, "zebra", name="same"))
    stored = await store.get_archive(AGENT, SENDER, "same")
    assert stored is not None and stored.summary == "first"
    assert [e.seq for e in await store.history(AGENT, SENDER)] == [3, 4]
    assert await search(store, "zebra") == []
    # Another conversation may use the name.
    await conversation(store, ["x"], sender="other")
    await store.compact(AGENT, "other", archive(1, 1, name="same"))


async def assert_unchanged(store: Storage, name: str, *, last_seq: int) -> None:
    """Nothing of a refused or failed compaction (summary "zebra") is stored."""
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and item.last_seq == last_seq
    history = await store.history(AGENT, SENDER, include_archived=True)
    assert [e.seq for e in history] == list(range(1, last_seq + 1))
    assert all(e.kind == "message" for e in history)
    assert await store.get_archive(AGENT, SENDER, name) is None
    assert await search(store, "zebra") == []


async def test_a_compaction_among_concurrent_appends_is_whole_or_refused(store: Storage) -> None:
    await conversation(store, ["one", "two"])
    outcomes: list[Entry | StorageError] = []

    async def compact() -> None:
        try:
            outcomes.append(await store.compact(AGENT, SENDER, archive(1, 2, "zebra")))
        except StorageError as exc:  # an append came first: the range is no longer right
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(store.append, AGENT, SENDER, [message(f"m{n}")])
            if n == 4:
                nursery.start_soon(compact)

    history = await store.history(AGENT, SENDER, include_archived=True)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    (outcome,) = outcomes
    if isinstance(outcome, StorageError):
        assert len(history) == 12 and all(e.kind == "message" for e in history)
        assert await store.get_archive(AGENT, SENDER, "archive-1-2") is None
        assert await search(store, "zebra") == []
    else:
        assert len(history) == 13 and history[2] == outcome and outcome.seq == 3
        assert [e.seq for e in history if e.kind == "compact"] == [3]
        assert await names(store, "zebra") == ["archive-1-2"]


async def test_an_unknown_conversation_is_not_found(store: Storage) -> None:
    await conversation(store, ["one"])
    with pytest.raises(
        ConversationNotFound, match=r"No conversation is stored for \(assistant, nobody\)"
    ):
        await store.compact(AGENT, "nobody", archive(1, 1))
    with pytest.raises(
        ConversationNotFound, match=r"No conversation is stored for \(ghost, user\)"
    ):
        await store.compact("ghost", SENDER, archive(1, 1))
    with pytest.raises(
        ConversationNotFound, match=r"No conversation is stored for \(assistant, nobody\)"
    ):
        await store.get_archive(AGENT, "nobody", "archive-1-1")


async def test_a_naive_archive_time_is_refused(store: Storage) -> None:
    await conversation(store, ["one"])
    with pytest.raises(ValueError, match="Timestamps must be timezone-aware"):
        await store.compact(AGENT, SENDER, archive(1, 1, when=datetime(2024, 5, 1)))
    assert [e.kind for e in await store.history(AGENT, SENDER)] == ["message"]


@pytest.mark.parametrize("when", ["insert", "commit"])
async def test_a_compaction_that_fails_mid_write_leaves_neither_archive_nor_marker(
    store: Storage, failing_appends: FailingAppends, reopen: Reopen, when: str
) -> None:
    await conversation(store, ["one", "two"])
    async with failing_appends("zebra", when=when):
        with pytest.raises(StorageError, match=failure_of(AGENT, SENDER)):
            await store.compact(AGENT, SENDER, archive(1, 2, "zebra", name="doomed"))
        await assert_unchanged(store, "doomed", last_seq=2)

    # Nothing was consumed: not the seq, not the name.
    marker = await store.compact(AGENT, SENDER, archive(1, 2, "giraffe", name="doomed"))
    assert marker.seq == 3
    store = await reopen(store)
    stored = await store.get_archive(AGENT, SENDER, "doomed")
    assert stored is not None and stored.summary == "giraffe"
    assert await search(store, "zebra") == []
    assert await names(store, "giraffe") == ["doomed"]


async def test_archives_and_notes_survive_reopening(store: Storage, reopen: Reopen) -> None:
    await conversation(store, ["the cat is called Pixel"])
    done = archive(1, 1, "a cat", speakers=["helper"], when=at(5))
    await store.compact(AGENT, SENDER, done)
    await store.put_note(AGENT, "pets", "Pixel likes tuna", updated_at=at(6))

    store = await reopen(store)

    assert await store.get_archive(AGENT, SENDER, "archive-1-1") == done
    assert sorted((h.kind, h.name) for h in await search(store, "pixel")) == [
        ("archive", "archive-1-1"),
        ("note", "pets"),
    ]
    assert await names(store, "tuna") == ["pets"]
    # Written after reopening, found with what was there before.
    await store.put_note(AGENT, "more", "Pixel is nine", updated_at=at(7))
    assert sorted(await names(store, "pixel")) == ["archive-1-1", "more", "pets"]
    (marker,) = await store.history(AGENT, SENDER)
    assert (marker.seq, marker.archive) == (2, "archive-1-1")


# --- search_memory -----------------------------------------------------------------------


async def test_search_finds_an_archive_by_its_entries_and_by_its_summary(store: Storage) -> None:
    await conversation(store, ["my car is a red Volvo", "nice"])
    await store.compact(AGENT, SENDER, archive(1, 2, "They talked about cars.", when=at(3)))

    (hit,) = await search(store, "volvo")  # only in an archived entry
    assert (hit.kind, hit.name, hit.sender, hit.created_at) == (
        "archive",
        "archive-1-2",
        SENDER,
        at(3),
    )
    assert "[Volvo]" in hit.snippet
    assert await names(store, "talked") == ["archive-1-2"]  # only in the summary
    assert await search(store, "bicycle") == []


async def test_only_archived_messages_are_searched(store: Storage) -> None:
    await conversation(store, ["before"])
    await store.compact(AGENT, SENDER, archive(1, 1, "first"))
    await store.append(AGENT, SENDER, [message("walrus, not archived yet")])
    assert await search(store, "walrus") == []
    await store.compact(AGENT, SENDER, archive(3, 3, "second"))
    assert await names(store, "walrus") == ["archive-3-3"]


async def test_search_finds_a_note_by_its_content_and_by_its_name(store: Storage) -> None:
    await store.put_note(AGENT, "favourite-colour", "The user likes teal.", updated_at=at(4))

    (hit,) = await search(store, "teal")
    assert (hit.kind, hit.name, hit.sender, hit.created_at) == (
        "note",
        "favourite-colour",
        None,
        at(4),
    )
    assert "[teal]" in hit.snippet
    assert await names(store, "colour") == ["favourite-colour"]  # "favourite-colour": 2 words
    assert await names(store, "favourite") == ["favourite-colour"]


async def test_put_note_replaces_the_note(store: Storage) -> None:
    await store.put_note(AGENT, "plan", "Buy oranges on Monday.", updated_at=at(1))
    await store.put_note(AGENT, "plan", "Buy lemons on Friday.", updated_at=at(2))

    assert await search(store, "oranges monday") == []
    (hit,) = await search(store, "lemons")
    assert (hit.name, hit.created_at) == ("plan", at(2))
    assert await names(store, "plan") == ["plan"]  # one note, not two


async def test_an_agent_sees_only_its_own_memory(store: Storage) -> None:
    await conversation(store, ["secret mango"], sender="shared")
    await store.compact(AGENT, "shared", archive(1, 1, "mango talk"))
    await store.put_note(AGENT, "fruit", "mango", updated_at=T0)
    await conversation(store, ["papaya"], agent="other", sender="shared")
    await store.put_note("other", "other-fruit", "papaya", updated_at=T0)

    assert await search(store, "mango", "other") == []
    assert await search(store, "mango papaya fruit", "nobody") == []
    assert await names(store, "papaya", "other") == ["other-fruit"]
    assert sorted(await names(store, "mango")) == ["archive-1-1", "fruit"]
    assert await search(store, "papaya") == []


async def test_hits_name_the_conversation_they_come_from(store: Storage) -> None:
    for sender in ("tg:1", "tg:2", "agent:helper"):
        await compacted(store, [f"kiwi from {sender}"], f"summary for {sender}", sender=sender)

    hits = await search(store, "kiwi")
    assert sorted((hit.sender, hit.name) for hit in hits) == [
        ("agent:helper", "agent:helper-1-1"),
        ("tg:1", "tg:1-1-1"),
        ("tg:2", "tg:2-1-1"),
    ]
    assert all(hit.kind == "archive" for hit in hits)


async def test_a_search_for_one_sender_sees_only_its_archives_and_every_note(
    store: Storage,
) -> None:
    for sender in ("tg:1", "tg:2"):
        await compacted(store, [f"kiwi from {sender}"], f"summary for {sender}", sender=sender)
    await store.put_note(AGENT, "fruit", "kiwi is a fruit", updated_at=T0)

    hits = await store.search_memory(AGENT, "kiwi", sender="tg:1")
    assert sorted((hit.kind, hit.name) for hit in hits) == [
        ("archive", "tg:1-1-1"),
        ("note", "fruit"),
    ]
    stranger = await store.search_memory(AGENT, "kiwi", sender="tg:3")
    assert [hit.kind for hit in stranger] == ["note"]


async def test_documents_matching_more_query_words_rank_first(store: Storage) -> None:
    for name, content in [
        ("one-word", "I keep a small lantern by the door at night"),
        ("two-words", "I keep a small lantern and a compass by the door"),
        ("other-word", "I keep a small compass by the door at night"),
        ("none", "I keep a small candle by the door at night"),
    ]:
        await store.put_note(AGENT, name, content, updated_at=T0)

    found = await names(store, "lantern compass")
    assert found[0] == "two-words"
    assert sorted(found[1:]) == ["one-word", "other-word"]


async def test_search_returns_at_most_limit_hits(store: Storage) -> None:
    for n in range(12):
        await store.put_note(AGENT, f"note-{n}", f"pebble number {n}", updated_at=T0)
    assert len(await search(store, "pebble")) == 10  # the default
    assert len(await search(store, "pebble", limit=3)) == 3
    assert len(await search(store, "pebble", limit=MAX_SEARCH_LIMIT)) == 12


@pytest.mark.parametrize("limit", [0, -1, MAX_SEARCH_LIMIT + 1])
async def test_a_limit_out_of_range_is_a_value_error(store: Storage, limit: int) -> None:
    with pytest.raises(
        ValueError, match=rf"limit must be between 1 and {MAX_SEARCH_LIMIT}, got {limit}"
    ):
        await search(store, "anything", limit=limit)


@pytest.mark.parametrize("query", ["", "?!", "  ", "- * :"])
async def test_a_query_without_words_finds_nothing(store: Storage, query: str) -> None:
    await store.put_note(AGENT, "note", "some words ?! here", updated_at=T0)
    assert await search(store, query) == []


ANIMALS, LOGIC = ["animals"], ["logic"]
BOTH = ["animals", "logic"]


# Each query's operators are taken as plain text: only its words are looked up, any of
# them matching ("near", "or", "and", "not", "text" are words of the `logic` note).
@pytest.mark.parametrize(
    ("query", "found"),
    [
        ('"', []),
        ('"unterminated', []),
        ("*", []),
        ("hedgehog*", ANIMALS),
        ("NEAR(hedgehog ant, 2)", BOTH),
        ("NEAR(", LOGIC),
        ("hedgehog OR", BOTH),
        ("OR hedgehog", BOTH),
        ("AND NOT", LOGIC),
        ("-hedgehog", ANIMALS),
        ("text:hedgehog", BOTH),
        (":", []),
        ("'", []),
        ("hedgehog's", ANIMALS),
        ("^hedgehog", ANIMALS),
        ("(hedgehog", ANIMALS),
        ("hedgehog) (", ANIMALS),
        ("{text}: hedgehog", BOTH),
        ("hedgehog & | ! <-> ant", ANIMALS),
        ("\\hedgehog", ANIMALS),
        ("hedgehog\x00", ANIMALS),
        ("zebra-crossing", []),
    ],
)
async def test_query_syntax_is_only_ever_words(
    store: Storage, query: str, found: list[str]
) -> None:
    await store.put_note(AGENT, "animals", "a hedgehog met an ant", updated_at=T0)
    await store.put_note(AGENT, "logic", "near or and not text", updated_at=T0)
    assert sorted(await names(store, query)) == found


async def test_unicode_words_are_found(store: Storage) -> None:
    await store.put_note(AGENT, "french", "Le Café était délicieux", updated_at=T0)
    await store.put_note(AGENT, "chinese", "我们 说 中文 好", updated_at=T0)

    (hit,) = await search(store, "CAFÉ")
    assert hit.name == "french" and "[Café]" in hit.snippet
    assert await names(store, "délicieux") == ["french"]
    (hit,) = await search(store, "中文")
    assert hit.name == "chinese" and "[中文]" in hit.snippet
    await store.put_note(AGENT, "street", "Die Straße heißt Lindenweg", updated_at=T0)
    assert await names(store, "STRASSE") == [], "no backend folds ß into ss"
    (hit,) = await search(store, "Straße heißt")
    assert hit.name == "street" and "[Straße] [heißt]" in hit.snippet


async def test_a_snippet_is_one_line_around_the_match(store: Storage) -> None:
    before = " ".join(f"before{n}" for n in range(40))
    after = "\n".join(f"after{n}" for n in range(40))
    await store.put_note(AGENT, "long", f"{before} the unicorn was here {after}", updated_at=T0)
    await store.put_note(AGENT, "short", "a unicorn\nin two lines", updated_at=T0)

    hits = {hit.name: hit.snippet for hit in await search(store, "unicorn")}
    long = hits["long"]
    assert "[unicorn]" in long and "\n" not in long
    assert long.startswith("…") and long.endswith("…")  # cut on both sides
    assert 12 <= len(long.split()) <= 32
    short = hits["short"]
    assert "[unicorn]" in short and "…" not in short and "\n" not in short
    assert short == "short a [unicorn] in two lines"


async def test_a_closed_store_refuses_memory_work(store: Storage) -> None:
    await conversation(store, ["one"])
    await store.close()
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await store.compact(AGENT, SENDER, archive(1, 1))
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await store.put_note(AGENT, "n", "c", updated_at=T0)
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await search(store, "one")
