"""The Storage conformance suite: every backend passes it unchanged.

``store`` is parametrized over the backends in conftest.py; a test that needs
durability (``reopen``) or fault injection (``failing_appends``) skips on a
backend that has neither.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing
from chinwag.protocol import ConversationItem, Entry, ToolCallInfo
from chinwag.storage import (
    MAX_QUERY_CHARS,
    ConversationNotFound,
    NewConversation,
    Storage,
    StorageError,
    open_store,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
Reopen = Callable[[Storage], Awaitable[Storage]]  # the fixtures' shapes, see conftest.py
FailingAppends = Callable[..., AbstractAsyncContextManager[None]]
AGENT = "assistant"
SENDER = "user"

# What each refusal says, on every backend (each pytest.raises matches one).
NAIVE = "Timestamps must be timezone-aware, got the naive"
NOT_FOUND = r"No conversation is stored for \(assistant, unknown\)"
NOT_UTF8 = r"'utf-8' codec can't encode character '\\ud800'"
BAD_CURSOR = "The cursor is not one this store issued"
STORE_CLOSED = "The store is closed"


def failure_of(agent: str, sender: str) -> str:
    """What a write failed by ``failing_appends`` says: the conversation and the cause
    (jsonl names its file, and a sqlite commit the deferred foreign key)."""
    cause = "(?:injected failure|FOREIGN KEY constraint failed)"
    return rf"\({agent}, {sender}\)(?: in \S+)? failed: .*{cause}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def message(content: str, *, role: str = "user", when: datetime | None = None) -> Entry:
    return Entry(seq=0, role=role, content=content, created_at=when or T0)


def marker(archive: str, summary: str, when: datetime | None = None) -> Entry:
    return Entry(seq=0, kind="compact", content=summary, archive=archive, created_at=when or T0)


async def create(
    store: Storage, agent: str = AGENT, sender: str = SENDER, *, when: datetime = T0
) -> ConversationItem:
    return await store.create_conversation(agent, sender, cwd=None, created_at=when)


async def seqs(store: Storage, agent: str = AGENT, sender: str = SENDER, **kw: object) -> list[int]:
    return [entry.seq for entry in await store.history(agent, sender, **kw)]  # type: ignore[arg-type]


# --- conversations -------------------------------------------------------------------


async def test_get_conversation_is_none_for_an_unknown_pair(store: Storage) -> None:
    await create(store, "assistant", "someone")
    assert await store.get_conversation("assistant", "nobody") is None
    assert await store.get_conversation("helper", "someone") is None


async def test_create_conversation_is_idempotent(store: Storage) -> None:
    first = await store.create_conversation(AGENT, SENDER, cwd="/work", created_at=T0)
    await store.append(AGENT, SENDER, [message("hi", when=at(5))])
    again = await store.create_conversation(AGENT, SENDER, cwd="/elsewhere", created_at=at(60))

    assert first == ConversationItem(
        agent=AGENT, sender=SENDER, cwd="/work", created_at=T0, updated_at=T0, last_seq=0
    )
    assert again == ConversationItem(
        agent=AGENT, sender=SENDER, cwd="/work", created_at=T0, updated_at=at(5), last_seq=1
    )
    assert await store.get_conversation(AGENT, SENDER) == again
    items, _ = await store.list_conversations()
    assert [(item.agent, item.sender) for item in items] == [(AGENT, SENDER)]


async def test_conversation_times_come_back_as_the_same_instant_in_utc(store: Storage) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2024, 5, 1, 14, 0, 0, 654321, tzinfo=plus_two)
    created = await store.create_conversation(AGENT, SENDER, cwd=None, created_at=local)
    stored = await store.get_conversation(AGENT, SENDER)

    for item in (created, stored):
        assert item is not None and item.created_at is not None
        assert item.created_at == local
        assert item.created_at.utcoffset() == timedelta(0)
        assert item.created_at.hour == 12 and item.created_at.microsecond == 654321
        assert item.updated_at == local


async def test_naive_timestamps_are_refused(store: Storage) -> None:
    with pytest.raises(ValueError, match=NAIVE):
        await store.create_conversation(AGENT, SENDER, cwd=None, created_at=datetime(2024, 1, 1))
    assert await store.get_conversation(AGENT, SENDER) is None
    naive_first = Entry(seq=0, role="user", content="x", created_at=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match=NAIVE):
        await store.append(AGENT, SENDER, [naive_first], create=NewConversation())
    assert await store.get_conversation(AGENT, SENDER) is None

    await create(store)
    naive = Entry(seq=0, role="user", content="x", created_at=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match=NAIVE):
        await store.append(AGENT, SENDER, [message("ok"), naive])
    assert await store.history(AGENT, SENDER) == []


async def test_title_and_cwd_are_stored(store: Storage) -> None:
    await store.create_conversation(AGENT, SENDER, cwd="/start", created_at=T0)
    await store.set_title(AGENT, SENDER, "Trip to Lisbon ✈")
    await store.set_cwd(AGENT, SENDER, "/home/me/trip")
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None
    assert (item.title, item.cwd) == ("Trip to Lisbon ✈", "/home/me/trip")

    await store.set_cwd(AGENT, SENDER, None)
    await store.set_title(AGENT, SENDER, "")
    items, _ = await store.list_conversations()
    assert [(item.title, item.cwd) for item in items] == [("", None)]


async def test_unknown_pairs_raise_conversation_not_found(store: Storage) -> None:
    await create(store, AGENT, "known")
    assert issubclass(ConversationNotFound, StorageError)
    with pytest.raises(ConversationNotFound, match=NOT_FOUND):
        await store.append(AGENT, "unknown", [message("hi")])
    with pytest.raises(ConversationNotFound, match=NOT_FOUND):
        await store.append(AGENT, "unknown", [])
    with pytest.raises(ConversationNotFound, match=NOT_FOUND):
        await store.history(AGENT, "unknown")
    with pytest.raises(ConversationNotFound, match=NOT_FOUND):
        await store.set_title(AGENT, "unknown", "t")
    with pytest.raises(ConversationNotFound, match=NOT_FOUND):
        await store.set_cwd(AGENT, "unknown", "/tmp")
    assert await store.get_conversation(AGENT, "unknown") is None
    assert await store.load_context(AGENT, "unknown") is None
    items, _ = await store.list_conversations()
    assert [item.sender for item in items] == ["known"]


# --- append --------------------------------------------------------------------


async def test_append_assigns_consecutive_seqs_from_one(store: Storage) -> None:
    await create(store)
    first = await store.append(AGENT, SENDER, [Entry(seq=42, role="user", created_at=at(1))])
    more = await store.append(AGENT, SENDER, [message(str(n), when=at(1 + n)) for n in range(1, 4)])
    assert [entry.seq for entry in first] == [1]
    assert [entry.seq for entry in more] == [2, 3, 4]
    assert await store.history(AGENT, SENDER) == first + more

    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None
    assert item.last_seq == 4
    assert item.updated_at == at(4)  # the newest entry's created_at
    assert item.created_at == T0


async def test_appending_nothing_changes_nothing(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("one", when=at(1))])
    assert await store.append(AGENT, SENDER, []) == []
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and (item.last_seq, item.updated_at) == (1, at(1))


async def test_every_entry_field_round_trips(store: Storage) -> None:
    await create(store)
    plus_five = timezone(timedelta(hours=5, minutes=30))
    entries = [
        Entry(
            seq=0,
            role="user",
            content="line one\nline two\ttabbed, \"quoted\", 'single', \\ emoji 🦜, nul \x00 end",
            run_id="run-1",
            created_at=datetime(2024, 5, 1, 17, 30, 0, 1, tzinfo=plus_five),
        ),
        Entry(
            seq=0,
            role="assistant",
            content="",
            tool_calls=[
                ToolCallInfo(call_id="c1", name="read_file", arguments='{"path": "ä/b.txt"}'),
                ToolCallInfo(call_id="c2", name="list_dir", arguments="{}"),
            ],
            run_id="run-1",
            created_at=at(1),
        ),
        Entry(
            seq=0,
            role="tool",
            content="no such file",
            tool_call_id="c1",
            is_error=True,
            run_id="run-1",
            created_at=at(2),
        ),
        Entry(
            seq=0, role="tool", content="[]", tool_call_id="c2", run_id="run-1", created_at=at(2)
        ),
        Entry(seq=0, role="assistant", content="A guest speaks.", agent="helper", created_at=at(3)),
        Entry(
            seq=0, kind="compact", role="", content="summary", archive="archive-1", created_at=at(4)
        ),
    ]
    returned = await store.append(AGENT, SENDER, entries)
    expected = [msgspec.structs.replace(entry, seq=n) for n, entry in enumerate(entries, 1)]
    history = await store.history(AGENT, SENDER, include_archived=True)

    assert returned == expected
    assert history == expected
    for entry in history:
        assert entry.created_at is not None and entry.created_at.utcoffset() == timedelta(0)
    assert history[0].created_at == datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)


async def test_a_missing_created_at_is_stamped_with_the_time_of_the_append(
    store: Storage,
) -> None:
    await create(store)
    before = datetime.now(UTC)
    (stored,) = await store.append(AGENT, SENDER, [Entry(seq=0, role="user", content="now")])
    after = datetime.now(UTC)
    assert stored.created_at is not None and before <= stored.created_at <= after
    assert await store.history(AGENT, SENDER) == [stored]


async def test_append_takes_the_entries_over_and_keeps_no_reference(store: Storage) -> None:
    await create(store)
    call = ToolCallInfo(call_id="c1", name="n", arguments="{}")
    plus_two = timezone(timedelta(hours=2))
    given = [
        Entry(seq=42, role="assistant", tool_calls=[call], created_at=T0.astimezone(plus_two)),
        Entry(seq=0, role="user", content="no time given"),
    ]
    before = datetime.now(UTC)
    returned = await store.append(AGENT, SENDER, given)
    after = datetime.now(UTC)

    # The same objects come back, seq set and created_at stamped, in UTC, in place.
    assert len(returned) == 2 and all(r is g for r, g in zip(returned, given, strict=True))
    assert [entry.seq for entry in given] == [1, 2]
    assert given[0].created_at == T0 and given[0].created_at.utcoffset() == timedelta(0)
    assert given[1].created_at is not None and before <= given[1].created_at <= after
    assert given[1].created_at.utcoffset() == timedelta(0)
    assert await store.history(AGENT, SENDER) == given

    # Once it returned, the store holds none of them, and hands out fresh copies.
    given[0].content = "changed after the append"
    given[0].tool_calls.append(call)
    read, _ = await store.history(AGENT, SENDER)
    read.tool_calls.clear()
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None
    item.title = "changed"
    loaded = await store.load_context(AGENT, SENDER)
    assert loaded is not None
    loaded[0].title = "changed too"
    loaded[1][0].content = "changed as well"

    (again, _) = await store.history(AGENT, SENDER)
    assert again == Entry(seq=1, role="assistant", tool_calls=[call], created_at=T0)
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and item.title == ""


async def test_an_entry_that_cannot_be_encoded_leaves_nothing(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("one", when=at(1)), message("two", when=at(2))])
    # A lone surrogate is a valid Python str but not UTF-8: the third entry fails.
    bad = [message("three", when=at(3)), message("four", when=at(4)), message("\ud800")]
    with pytest.raises(StorageError, match=NOT_UTF8):
        await store.append(AGENT, SENDER, bad)

    assert await seqs(store, include_archived=True) == [1, 2]
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and (item.last_seq, item.updated_at) == (2, at(2))
    (next_,) = await store.append(AGENT, SENDER, [message("three", when=at(5))])
    assert next_.seq == 3  # the failed append consumed no seq


async def test_a_failure_mid_append_leaves_nothing(
    store: Storage, failing_appends: FailingAppends, reopen: Reopen
) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("one", when=at(1))])
    async with failing_appends("boom"):
        with pytest.raises(StorageError, match=failure_of(AGENT, SENDER)):
            await store.append(
                AGENT, SENDER, [message("two"), message("three"), message("boom"), message("x")]
            )
        assert await seqs(store) == [1]
    (next_,) = await store.append(AGENT, SENDER, [message("two", when=at(2))])
    assert next_.seq == 2

    store = await reopen(store)  # nothing of the failed append reached the disk either
    assert [entry.content for entry in await store.history(AGENT, SENDER)] == ["one", "two"]


async def test_a_failed_commit_fails_every_append_it_held(
    store: Storage, failing_appends: FailingAppends
) -> None:
    """Whatever an append reports is the truth: returned is stored, raised is not."""
    conversations = [f"c{n}" for n in range(10)]
    for sender in conversations:
        await create(store, AGENT, sender)
        await store.append(AGENT, sender, [message("first")])
    outcomes: dict[str, list[Entry] | StorageError] = {}

    async def append(sender: str) -> None:
        content = "doomed" if sender == "c3" else f"second {sender}"
        try:
            outcomes[sender] = await store.append(
                AGENT, sender, [message(content), message(f"third {sender}")]
            )
        except StorageError as exc:
            outcomes[sender] = exc

    async with failing_appends("doomed", when="commit"):
        with pytest.raises(StorageError, match=failure_of(AGENT, "c3")):  # alone
            await store.append(AGENT, "c3", [message("doomed")])
        async with trio.open_nursery() as nursery:  # and among others
            nursery.start_soon(append, conversations[0])
            await trio.testing.wait_all_tasks_blocked()  # the rest arrive while it writes
            for sender in conversations[1:]:
                nursery.start_soon(append, sender)
    assert isinstance(outcomes["c3"], StorageError)

    for sender in conversations:
        history = await store.history(AGENT, sender)
        outcome = outcomes[sender]
        if isinstance(outcome, StorageError):
            assert [entry.content for entry in history] == ["first"]
        else:
            assert history == [history[0], *outcome]
        # Failed commits consumed no seq: the next append follows the last stored one.
        (next_,) = await store.append(AGENT, sender, [message("after")])
        assert next_.seq == len(history) + 1


async def test_seqs_continue_after_reopening(store: Storage, reopen: Reopen) -> None:
    await store.create_conversation(AGENT, SENDER, cwd="/work", created_at=T0)
    await store.append(AGENT, SENDER, [message("a", when=at(1)), message("b", when=at(2))])
    await store.append(AGENT, SENDER, [marker("arch-1", "sum", when=at(3))])
    await store.set_title(AGENT, SENDER, "kept")
    before = await store.history(AGENT, SENDER, include_archived=True)

    store = await reopen(store)
    assert await store.history(AGENT, SENDER, include_archived=True) == before
    assert await seqs(store) == [3]  # the marker still hides what it archived
    item = await store.get_conversation(AGENT, SENDER)
    assert item == ConversationItem(
        agent=AGENT,
        sender=SENDER,
        title="kept",
        cwd="/work",
        created_at=T0,
        updated_at=at(3),
        last_seq=3,
    )
    stored = await store.append(AGENT, SENDER, [message("c", when=at(4)), message("d")])
    assert [entry.seq for entry in stored] == [4, 5]

    store = await reopen(store)
    assert await seqs(store, include_archived=True) == [1, 2, 3, 4, 5]


async def test_concurrent_appends_keep_every_conversation_gapless(store: Storage) -> None:
    conversations = [f"tg:{n}" for n in range(24)]
    for sender in conversations:
        await create(store, AGENT, sender)
    returned: dict[str, list[list[Entry]]] = {sender: [] for sender in conversations}
    rng = random.Random(7)

    async def writer(sender: str, name: str) -> None:
        for n in range(8):
            batch = [message(f"{name}-{n}-{k}") for k in range(rng.randint(1, 3))]
            returned[sender].append(await store.append(AGENT, sender, batch))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for sender in conversations:
            for name in ("a", "b"):  # two writers per conversation, too
                nursery.start_soon(writer, sender, name)

    for sender in conversations:
        history = await store.history(AGENT, sender)
        assert [entry.seq for entry in history] == list(range(1, len(history) + 1))
        for stored in returned[sender]:  # each append got consecutive seqs
            assert [e.seq for e in stored] == list(range(stored[0].seq, stored[-1].seq + 1))
        by_seq = {entry.seq: entry for entry in history}
        assert all(by_seq[e.seq] == e for stored in returned[sender] for e in stored)
        assert sum(len(stored) for stored in returned[sender]) == len(history)
        item = await store.get_conversation(AGENT, sender)
        assert item is not None and item.last_seq == len(history)


async def test_a_failing_append_among_concurrent_ones_fails_alone(store: Storage) -> None:
    conversations = [f"c{n}" for n in range(12)]
    for sender in conversations:
        await create(store, AGENT, sender)
        await store.append(AGENT, sender, [message("first")])
    outcomes: dict[str, object] = {}

    async def append(sender: str) -> None:
        last = "\ud800" if sender == "c5" else "third"  # c5's cannot be stored
        try:
            outcomes[sender] = await store.append(AGENT, sender, [message("second"), message(last)])
        except StorageError as exc:
            outcomes[sender] = exc

    async with trio.open_nursery() as nursery:
        for sender in conversations:
            nursery.start_soon(append, sender)

    for sender in conversations:
        contents = [entry.content for entry in await store.history(AGENT, sender)]
        if sender == "c5":
            assert isinstance(outcomes[sender], StorageError)
            assert contents == ["first"]
        else:
            assert [entry.seq for entry in outcomes[sender]] == [2, 3]  # type: ignore[attr-defined]
            assert contents == ["first", "second", "third"]


async def test_cancelled_appends_are_whole_or_absent(store: Storage) -> None:
    await create(store)
    returned: list[list[Entry]] = []

    async def writer(n: int) -> None:
        returned.append(await store.append(AGENT, SENDER, [message(f"u{n}"), message(f"a{n}")]))

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(writer, n)
        for _ in range(3):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()  # lands wherever each append is

    history = await store.history(AGENT, SENDER)
    assert [entry.seq for entry in history] == list(range(1, len(history) + 1))
    pairs = [history[i : i + 2] for i in range(0, len(history), 2)]
    assert all(len(p) == 2 and p[0].content[1:] == p[1].content[1:] for p in pairs)
    for stored in returned:
        assert history[stored[0].seq - 1 : stored[1].seq] == stored
    assert sum(len(stored) for stored in returned) == len(history), "stored, yet not returned"


# --- append(create=...) -------------------------------------------------------------


async def test_append_with_create_creates_the_conversation_in_the_same_write(
    store: Storage,
) -> None:
    stored = await store.append(
        AGENT,
        SENDER,
        [message("hi", when=at(5)), message("there", when=at(7))],
        create=NewConversation(cwd="/work"),
    )
    assert [entry.seq for entry in stored] == [1, 2]
    expected = ConversationItem(
        agent=AGENT, sender=SENDER, cwd="/work", created_at=at(5), updated_at=at(7), last_seq=2
    )
    assert await store.get_conversation(AGENT, SENDER) == expected
    assert await store.list_conversations() == ([expected], None)
    assert await store.history(AGENT, SENDER) == stored
    assert NewConversation().cwd is None


async def test_append_with_create_leaves_an_existing_conversation_as_it_is(
    store: Storage,
) -> None:
    await store.create_conversation(AGENT, SENDER, cwd="/first", created_at=T0)
    await store.set_title(AGENT, SENDER, "kept")
    await store.append(AGENT, SENDER, [message("a", when=at(1))])
    stored = await store.append(
        AGENT, SENDER, [message("b", when=at(9))], create=NewConversation(cwd="/other")
    )
    assert [entry.seq for entry in stored] == [2]
    assert await store.get_conversation(AGENT, SENDER) == ConversationItem(
        agent=AGENT,
        sender=SENDER,
        title="kept",
        cwd="/first",
        created_at=T0,
        updated_at=at(9),
        last_seq=2,
    )
    again = await store.append(AGENT, SENDER, [message("c", when=at(10))], create=NewConversation())
    assert [entry.seq for entry in again] == [3]
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and item.cwd == "/first"


async def test_appending_nothing_with_create_creates_the_conversation(store: Storage) -> None:
    before = datetime.now(UTC)
    assert await store.append(AGENT, SENDER, [], create=NewConversation(cwd="/w")) == []
    after = datetime.now(UTC)
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and (item.cwd, item.last_seq) == ("/w", 0)
    assert item.created_at is not None and before <= item.created_at <= after
    assert item.updated_at == item.created_at
    assert await store.append(AGENT, SENDER, [], create=NewConversation(cwd="/x")) == []
    assert await store.get_conversation(AGENT, SENDER) == item


async def test_a_failing_append_with_create_creates_nothing(store: Storage) -> None:
    # A lone surrogate is a valid Python str but not UTF-8: the second entry fails.
    with pytest.raises(StorageError, match=NOT_UTF8):
        await store.append(
            AGENT, SENDER, [message("fine"), message("\ud800")], create=NewConversation(cwd="/w")
        )
    assert await store.get_conversation(AGENT, SENDER) is None
    assert await store.load_context(AGENT, SENDER) is None
    assert await store.list_conversations() == ([], None)
    with pytest.raises(
        ConversationNotFound, match=r"No conversation is stored for \(assistant, user\)"
    ):
        await store.append(AGENT, SENDER, [message("no create")])

    (first,) = await store.append(
        AGENT, SENDER, [message("again", when=at(3))], create=NewConversation()
    )
    assert first.seq == 1
    item = await store.get_conversation(AGENT, SENDER)
    assert item is not None and item.created_at == at(3) and item.cwd is None


@pytest.mark.parametrize("when", ["insert", "commit"])
async def test_an_append_with_create_that_fails_mid_write_creates_nothing(
    store: Storage, failing_appends: FailingAppends, reopen: Reopen, when: str
) -> None:
    async with failing_appends("boom", when=when):
        with pytest.raises(StorageError, match=failure_of(AGENT, SENDER)):
            await store.append(
                AGENT, SENDER, [message("one"), message("boom")], create=NewConversation(cwd="/w")
            )
        assert await store.get_conversation(AGENT, SENDER) is None
    store = await reopen(store)  # nothing of it reached the disk either
    assert await store.get_conversation(AGENT, SENDER) is None
    assert await store.list_conversations() == ([], None)
    (stored,) = await store.append(
        AGENT, SENDER, [message("one", when=at(1))], create=NewConversation(cwd="/w")
    )
    assert stored.seq == 1


async def test_concurrent_appends_with_create_create_each_conversation_once(
    store: Storage,
) -> None:
    senders = [f"tg:{n}" for n in range(40)]
    returned: dict[str, list[Entry]] = {sender: [] for sender in senders}

    async def writer(sender: str, n: int) -> None:
        stored = await store.append(
            AGENT, sender, [message(f"m{n}", when=at(n))], create=NewConversation(cwd=f"/{n}")
        )
        returned[sender].extend(stored)

    async with trio.open_nursery() as nursery:
        for n in range(5):  # five appends to each new conversation, all at once
            for sender in senders:
                nursery.start_soon(writer, sender, n)

    items, _ = await store.list_conversations(limit=100)
    assert sorted(item.sender for item in items) == sorted(senders)
    for sender in senders:
        history = await store.history(AGENT, sender)
        assert [entry.seq for entry in history] == [1, 2, 3, 4, 5]
        assert sorted(returned[sender], key=lambda e: e.seq) == history
        item = await store.get_conversation(AGENT, sender)
        assert item is not None and item.last_seq == 5
        # Created by whichever append came first, with that one's cwd and time.
        assert item.created_at == history[0].created_at
        assert item.cwd == f"/{history[0].content[1:]}"


async def test_a_failing_append_with_create_among_concurrent_ones_fails_alone(
    store: Storage,
) -> None:
    senders = [f"c{n}" for n in range(12)]
    outcomes: dict[str, object] = {}

    async def append(sender: str) -> None:
        last = "\ud800" if sender == "c5" else "second"  # c5's cannot be stored
        try:
            outcomes[sender] = await store.append(
                AGENT, sender, [message("first"), message(last)], create=NewConversation()
            )
        except StorageError as exc:
            outcomes[sender] = exc

    async with trio.open_nursery() as nursery:
        for sender in senders:
            nursery.start_soon(append, sender)

    for sender in senders:
        if sender == "c5":
            assert isinstance(outcomes[sender], StorageError)
            assert await store.get_conversation(AGENT, sender) is None
        else:
            assert [entry.seq for entry in outcomes[sender]] == [1, 2]  # type: ignore[attr-defined]
            contents = [entry.content for entry in await store.history(AGENT, sender)]
            assert contents == ["first", "second"]


async def test_a_conversation_created_by_an_append_survives_reopening(
    store: Storage, reopen: Reopen
) -> None:
    stored = await store.append(
        AGENT, SENDER, [message("hi", when=at(2))], create=NewConversation(cwd="/w")
    )
    item = await store.get_conversation(AGENT, SENDER)
    store = await reopen(store)
    assert await store.get_conversation(AGENT, SENDER) == item
    assert await store.history(AGENT, SENDER) == stored
    (more,) = await store.append(AGENT, SENDER, [message("more")], create=NewConversation())
    assert more.seq == 2


# --- load_context ------------------------------------------------------------------


async def test_load_context_is_none_for_a_conversation_never_created(store: Storage) -> None:
    assert await store.load_context(AGENT, SENDER) is None
    assert await store.claim(AGENT, SENDER)  # a claim creates nothing either
    assert await store.load_context(AGENT, SENDER) is None
    await create(store, "helper", SENDER)
    await create(store, AGENT, "other")
    assert await store.load_context(AGENT, SENDER) is None


async def test_load_context_without_a_marker_is_every_entry(store: Storage) -> None:
    await store.create_conversation(AGENT, SENDER, cwd="/w", created_at=T0)
    assert await store.load_context(AGENT, SENDER) == (
        await store.get_conversation(AGENT, SENDER),
        [],
    )

    await store.set_title(AGENT, SENDER, "a title")
    await store.append(AGENT, SENDER, [message("1", when=at(1)), message("2", role="assistant")])
    await store.append(AGENT, SENDER, [message("3", when=at(3))])
    loaded = await store.load_context(AGENT, SENDER)
    assert loaded is not None
    item, entries = loaded
    assert item == await store.get_conversation(AGENT, SENDER)
    assert (item.title, item.cwd, item.last_seq, item.updated_at) == ("a title", "/w", 3, at(3))
    assert entries == await store.history(AGENT, SENDER) and [e.seq for e in entries] == [1, 2, 3]


async def test_load_context_starts_at_the_latest_compact_marker(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("1"), message("2"), message("3")])
    await store.append(AGENT, SENDER, [marker("arch-1", "first summary")])  # seq 4
    await store.append(AGENT, SENDER, [message("5"), message("6")])
    loaded = await store.load_context(AGENT, SENDER)
    assert loaded is not None
    assert [(e.seq, e.kind) for e in loaded[1]] == [(4, "compact"), (5, "message"), (6, "message")]

    await store.append(AGENT, SENDER, [marker("arch-2", "second summary", when=at(7))])  # seq 7
    loaded = await store.load_context(AGENT, SENDER)
    assert loaded is not None
    item, entries = loaded
    assert [(e.seq, e.kind, e.content) for e in entries] == [(7, "compact", "second summary")]
    assert (item.last_seq, item.updated_at) == (7, at(7))
    history = await store.history(AGENT, SENDER)
    assert entries == history[-1:]  # history keeps the earlier markers; the context does not

    await store.append(AGENT, SENDER, [message("8"), message("9")])
    loaded = await store.load_context(AGENT, SENDER)
    assert loaded is not None
    assert [e.seq for e in loaded[1]] == [7, 8, 9] and loaded[0].last_seq == 9


async def test_load_context_after_a_compaction_and_reopening(
    store: Storage, reopen: Reopen
) -> None:
    stored = await store.append(
        AGENT, SENDER, [message("a"), message("b")], create=NewConversation(cwd="/w")
    )
    await store.append(AGENT, SENDER, [marker("arch-1", "a and b", when=at(4))])
    tail = await store.append(AGENT, SENDER, [message("c", when=at(5))])
    before = await store.load_context(AGENT, SENDER)
    store = await reopen(store)
    after = await store.load_context(AGENT, SENDER)
    assert after == before
    assert after is not None and [e.seq for e in after[1]] == [3, 4]
    assert after[1][1] == tail[0] and stored[0].seq == 1


async def test_load_context_sees_every_append_acknowledged_before_it(store: Storage) -> None:
    async def writer(sender: str) -> None:
        for n in range(15):
            (stored,) = await store.append(
                AGENT, sender, [message(f"{sender}-{n}")], create=NewConversation()
            )
            loaded = await store.load_context(AGENT, sender)
            assert loaded is not None
            item, entries = loaded
            assert item.last_seq == stored.seq == n + 1
            assert entries[-1] == stored and len(entries) == n + 1

    async with trio.open_nursery() as nursery:
        for k in range(6):
            nursery.start_soon(writer, f"s{k}")


# --- history -------------------------------------------------------------------


async def test_history_after_seq_and_limit(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message(str(n)) for n in range(1, 11)])

    assert await seqs(store) == list(range(1, 11))
    assert await seqs(store, after_seq=3) == list(range(4, 11))
    assert await seqs(store, limit=4) == [1, 2, 3, 4]
    assert await seqs(store, after_seq=3, limit=2) == [4, 5]
    assert await seqs(store, after_seq=9, limit=5) == [10]
    assert await seqs(store, after_seq=10) == []
    assert await seqs(store, after_seq=1000) == []
    assert await seqs(store, limit=0) == []
    with pytest.raises(ValueError, match="limit must not be negative, got -1"):
        await store.history(AGENT, SENDER, limit=-1)


async def test_history_without_markers_shows_everything(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("a"), message("b", role="assistant")])
    assert await seqs(store) == await seqs(store, include_archived=True) == [1, 2]


async def test_compact_markers_hide_what_they_archived(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("1"), message("2"), message("3")])
    await store.append(AGENT, SENDER, [marker("arch-1", "first summary")])  # seq 4
    await store.append(AGENT, SENDER, [message("5"), message("6")])
    await store.append(AGENT, SENDER, [marker("arch-2", "second summary")])  # seq 7
    await store.append(AGENT, SENDER, [message("8"), message("9")])

    visible = await store.history(AGENT, SENDER)
    assert [entry.seq for entry in visible] == [4, 7, 8, 9]
    assert [(e.kind, e.role, e.archive, e.content) for e in visible[:2]] == [
        ("compact", "", "arch-1", "first summary"),
        ("compact", "", "arch-2", "second summary"),
    ]
    assert await seqs(store, include_archived=True) == list(range(1, 10))
    assert await seqs(store, after_seq=4) == [7, 8, 9]
    assert await seqs(store, after_seq=7) == [8, 9]
    assert await seqs(store, limit=3) == [4, 7, 8]
    assert await seqs(store, after_seq=2, limit=1) == [4]
    assert await seqs(store, after_seq=2, limit=3, include_archived=True) == [3, 4, 5]


async def test_a_marker_as_the_newest_entry_hides_everything_before_it(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("1"), message("2")])
    await store.append(AGENT, SENDER, [marker("arch-1", "all of it")])
    assert await seqs(store) == [3]
    assert await seqs(store, after_seq=3) == []


# --- list_conversations ----------------------------------------------------------


async def test_list_conversations_is_most_recently_updated_first(store: Storage) -> None:
    for n, sender in enumerate(["old", "middle", "new"]):
        await create(store, AGENT, sender, when=at(n))
    items, cursor = await store.list_conversations()
    assert [item.sender for item in items] == ["new", "middle", "old"]
    assert cursor is None

    await store.append(AGENT, "old", [message("back again", when=at(10))])
    items, _ = await store.list_conversations()
    assert [item.sender for item in items] == ["old", "new", "middle"]
    assert items[0].last_seq == 1 and items[0].updated_at == at(10)
    assert items[0].running is False


async def test_list_conversations_filters(store: Storage) -> None:
    pairs = [("assistant", "tg:1"), ("assistant", "tg:2"), ("helper", "tg:1"), ("helper", "user")]
    for n, (agent, sender) in enumerate(pairs):
        await create(store, agent, sender, when=at(n))

    async def listed(**filters: str) -> list[tuple[str, str]]:
        items, cursor = await store.list_conversations(**filters)  # type: ignore[arg-type]
        assert cursor is None
        return [(item.agent, item.sender) for item in items]

    assert await listed() == pairs[::-1]
    assert await listed(agent="assistant") == [("assistant", "tg:2"), ("assistant", "tg:1")]
    assert await listed(sender="tg:1") == [("helper", "tg:1"), ("assistant", "tg:1")]
    assert await listed(agent="helper", sender="user") == [("helper", "user")]
    assert await listed(agent="helper", sender="tg:2") == []
    assert await listed(agent="nobody") == []


@pytest.mark.parametrize("limit", [1, 3, 7, 10, 30, 31])
async def test_cursor_paging_has_no_duplicates_or_gaps(store: Storage, limit: int) -> None:
    # 30 conversations, many sharing an updated_at: ties must page correctly too.
    for n in range(30):
        await create(store, "a" if n % 3 else "b", f"s{n}", when=at(n // 4))
    everything, cursor = await store.list_conversations(limit=1000)
    assert cursor is None and len(everything) == 30

    for filters, expected in [
        ({}, everything),
        ({"agent": "a"}, [item for item in everything if item.agent == "a"]),
    ]:
        await check_paging(store, limit, expected, **filters)


async def check_paging(
    store: Storage, limit: int, expected: list[ConversationItem], **filters: Any
) -> None:
    """Paged ``limit`` at a time with ``filters``, the listing is ``expected``: full pages
    but the last, none empty, no item twice or missing."""
    pages: list[list[ConversationItem]] = []
    cursor = None
    while True:
        page, cursor = await store.list_conversations(limit=limit, cursor=cursor, **filters)
        pages.append(page)
        if cursor is None:
            break
        assert len(page) == limit
        assert len(pages) <= len(expected) + 1, "paging does not end"
    assert [item for page in pages for item in page] == expected
    assert all(page for page in pages)  # no empty last page, even when limit divides
    assert len(pages) == -(-len(expected) // limit)


async def test_list_conversations_sorts_by_updated_at_then_newest_id(store: Storage) -> None:
    for sender in ["first", "second", "third"]:
        await create(store, AGENT, sender, when=T0)
    items, _ = await store.list_conversations()
    assert [item.sender for item in items] == ["third", "second", "first"]
    page, cursor = await store.list_conversations(limit=2)
    assert [item.sender for item in page] == ["third", "second"]
    page, cursor = await store.list_conversations(limit=2, cursor=cursor)
    assert [item.sender for item in page] == ["first"] and cursor is None


@pytest.mark.parametrize(
    "cursor",
    ["", "garbage!", "Zm9vYmFy", "////", "a" * 400, "🦜", "bm90IG1zZ3BhY2s="],
)
async def test_a_bad_cursor_is_a_value_error(store: Storage, cursor: str) -> None:
    await create(store)
    with pytest.raises(ValueError, match=BAD_CURSOR):
        await store.list_conversations(cursor=cursor)


async def test_a_cursor_from_another_backend_is_a_value_error(
    store: Storage, foreign_store_url: str
) -> None:
    for n in range(3):
        await create(store, AGENT, f"s{n}", when=at(n))
    async with open_store(foreign_store_url) as foreign:
        for n in range(3):
            await create(foreign, AGENT, f"s{n}", when=at(n))
        _, cursor = await foreign.list_conversations(limit=1)
    assert cursor is not None
    with pytest.raises(ValueError, match=BAD_CURSOR):
        await store.list_conversations(cursor=cursor)


async def test_list_conversations_rejects_a_limit_below_one(store: Storage) -> None:
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        await store.list_conversations(limit=0)


# --- list_conversations(query=...) ----------------------------------------------------


async def titled(store: Storage, titles: dict[str, str], agent: str = AGENT) -> None:
    """A conversation per sender, in order (each newer than the last), with its title."""
    for n, (sender, title) in enumerate(titles.items()):
        await create(store, agent, sender, when=at(n))
        if title:
            await store.set_title(agent, sender, title)


async def found(store: Storage, query: str, **filters: str) -> list[str]:
    """The senders whose conversations ``query`` finds, newest first, on one page."""
    items, cursor = await store.list_conversations(query=query, **filters)  # type: ignore[arg-type]
    assert cursor is None
    return [item.sender for item in items]


async def test_a_query_finds_titles_and_senders_casefolded(store: Storage) -> None:
    await titled(
        store,
        {
            "ana": "Fixing the roof",
            "bob": "Planning the garden",
            "cid": "Die Straße bauen",
            "dee": "ÉLAN VITAL",
            "Ünal": "",
            "tg:42": "Roofers' invoices",
        },
    )
    assert await found(store, "roof") == ["tg:42", "ana"]
    assert await found(store, "ROOF") == ["tg:42", "ana"]
    assert await found(store, "the ") == ["bob", "ana"]
    assert await found(store, "STRASSE") == ["cid"]  # ß casefolds to ss
    assert await found(store, "straße") == ["cid"]
    assert await found(store, "élan") == ["dee"]
    assert await found(store, "üNAL") == ["Ünal"]  # the sender, untitled
    assert await found(store, "tg:") == ["tg:42"]
    assert await found(store, "an") == ["dee", "bob", "ana"]
    assert await found(store, "nowhere") == []
    assert await found(store, "") == ["tg:42", "Ünal", "dee", "cid", "bob", "ana"]


async def test_a_query_follows_each_change_of_title(store: Storage) -> None:
    await titled(store, {"ana": "Old name"})
    assert await found(store, "old") == ["ana"]
    await store.set_title(AGENT, "ana", "Nouveau NOM")
    assert await found(store, "old") == []
    assert await found(store, "nouveau nom") == ["ana"]
    await store.set_cwd(AGENT, "ana", "/elsewhere")  # another column leaves it be
    assert await found(store, "nom") == ["ana"]


async def test_a_query_appended_to_conversations_finds_them(store: Storage) -> None:
    """A conversation an append creates is searchable by its sender at once."""
    await store.append(AGENT, "Zoë", [message("hi")], create=NewConversation())
    assert await found(store, "zoë") == ["Zoë"]
    await store.append(AGENT, "Zoë", [message("again", when=at(1))])
    assert await found(store, "ZOË") == ["Zoë"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("%", ["pct", "both"]),
        ("0% d", ["pct"]),
        ("_", ["snake"]),
        ("e_c", ["snake"]),
        ("\\", ["back", "both"]),
        ("k\\s", ["back"]),
        ("\\%", ["both"]),
        ("%%", []),
        ("__", []),
    ],
)
async def test_a_query_takes_like_wildcards_and_the_escape_literally(
    store: Storage, query: str, expected: list[str]
) -> None:
    await titled(
        store,
        {
            "both": "a\\%b",
            "back": "back\\slash",
            "plain": "backslash 100 done snakeXcase",
            "snake": "snake_case",
            "pct": "100% done",
        },
    )
    assert await found(store, query) == expected


async def test_a_query_combines_with_the_filters(store: Storage) -> None:
    await titled(store, {"ana": "Roof", "bob": "Roof too", "cid": "Garden"})
    await titled(store, {"ana": "Roof", "dee": "Garden"}, agent="helper")
    assert await found(store, "roof", agent=AGENT) == ["bob", "ana"]
    assert await found(store, "roof", agent="helper") == ["ana"]
    assert await found(store, "garden", sender="dee") == ["dee"]
    assert await found(store, "roof", agent="helper", sender="bob") == []


@pytest.mark.parametrize("limit", [1, 4, 10, 11])
async def test_cursor_paging_through_a_query_has_no_duplicates_or_gaps(
    store: Storage, limit: int
) -> None:
    # 30 conversations, many sharing an updated_at; every third one matches.
    for n in range(30):
        await create(store, AGENT, f"s{n}", when=at(n // 4))
        await store.set_title(AGENT, f"s{n}", f"Quokka {n}" if n % 3 == 0 else f"Other {n}")
    everything, _ = await store.list_conversations(limit=1000)
    expected = [item for item in everything if item.title.startswith("Quokka")]
    assert len(expected) == 10
    await check_paging(store, limit, expected, query="QUOKKA")


async def test_a_query_longer_than_the_limit_is_a_value_error(store: Storage) -> None:
    await titled(store, {"ana": "x" * MAX_QUERY_CHARS})
    assert await found(store, "X" * MAX_QUERY_CHARS) == ["ana"]
    with pytest.raises(ValueError, match=f"query must be at most {MAX_QUERY_CHARS} characters"):
        await store.list_conversations(query="x" * (MAX_QUERY_CHARS + 1))


async def test_a_query_finds_the_same_after_reopening(store: Storage, reopen: Reopen) -> None:
    await titled(store, {"ana": "Straße", "Bob": "garden"})
    store = await reopen(store)
    assert await found(store, "STRASSE") == ["ana"]
    assert await found(store, "bob") == ["Bob"]


# --- claims --------------------------------------------------------------------


async def test_a_claim_is_held_until_released(store: Storage) -> None:
    assert isinstance(store.shared, bool) and type(store).shared is store.shared
    assert await store.claim(AGENT, SENDER) is True
    assert await store.claim(AGENT, SENDER) is False  # not re-entrant, even for its holder
    assert await store.claim(AGENT, "other") is True  # each conversation on its own
    assert await store.claim("helper", SENDER) is True
    await store.release(AGENT, SENDER)
    assert await store.claim(AGENT, SENDER) is True
    assert await store.claim(AGENT, "other") is False


async def test_a_claim_needs_no_conversation_and_makes_none(store: Storage) -> None:
    assert await store.claim(AGENT, SENDER)
    assert await store.get_conversation(AGENT, SENDER) is None
    assert await store.list_conversations() == ([], None)
    await create(store)
    assert await store.claim(AGENT, SENDER) is False  # creating it changed nothing


async def test_releasing_what_is_not_claimed_does_nothing(store: Storage) -> None:
    await store.release(AGENT, SENDER)
    assert await store.claim(AGENT, SENDER)
    await store.release(AGENT, "other")
    assert await store.claim(AGENT, SENDER) is False
    await store.release(AGENT, SENDER)
    await store.release(AGENT, SENDER)  # twice is once
    assert await store.claim(AGENT, SENDER)


async def test_concurrent_claims_of_one_conversation_let_one_through(store: Storage) -> None:
    taken: list[bool] = []

    async def claim(sender: str) -> None:
        taken.append(await store.claim(AGENT, sender))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(claim, SENDER)
    assert sorted(taken) == [False] * 9 + [True]


async def test_a_cancelled_claim_takes_nothing_and_a_cancelled_release_completes(
    store: Storage,
) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.claim(AGENT, SENDER)
    assert scope.cancelled_caught
    assert await store.claim(AGENT, SENDER)  # the cancelled claim left nothing held

    with trio.CancelScope() as scope:
        scope.cancel()
        await store.release(AGENT, SENDER)
    assert await store.claim(AGENT, SENDER)  # released all the same


async def test_claims_end_with_the_store(store: Storage, reopen: Reopen) -> None:
    assert await store.claim(AGENT, SENDER)
    store = await reopen(store)
    assert await store.claim(AGENT, SENDER)


async def test_a_closed_store_takes_no_claims(store: Storage) -> None:
    assert await store.claim(AGENT, SENDER)
    await store.close()
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await store.claim(AGENT, "other")
    await store.release(AGENT, SENDER)  # close released it; releasing again is harmless


# --- lifetime ------------------------------------------------------------------


async def test_a_closed_store_refuses_work(store: Storage) -> None:
    await create(store)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await store.append(AGENT, SENDER, [message("late")])
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await store.history(AGENT, SENDER)
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await store.load_context(AGENT, SENDER)
    with pytest.raises(StorageError, match=STORE_CLOSED):
        await store.append(AGENT, "new", [message("late")], create=NewConversation())


async def test_close_lets_the_appends_already_made_finish(store: Storage, reopen: Reopen) -> None:
    await create(store)
    returned: list[list[Entry]] = []

    async def writer(n: int) -> None:
        if n % 2:
            returned.append(await store.append(AGENT, SENDER, [message(f"m{n}")]))
        else:  # and some create their conversation
            batch = [message(f"m{n}")]
            returned.append(
                await store.append(AGENT, f"new{n % 3}", batch, create=NewConversation())
            )

    async with trio.open_nursery() as nursery:
        for n in range(60):
            nursery.start_soon(writer, n)
        await trio.testing.wait_all_tasks_blocked()  # each one's append is under way
        await store.close()
    assert len(returned) == 60  # closing failed none of them

    store = await reopen(store)
    for sender, count in [(SENDER, 30), ("new0", 10), ("new1", 10), ("new2", 10)]:
        assert await seqs(store, AGENT, sender) == list(range(1, count + 1))
