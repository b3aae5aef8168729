"""Usage totals, on every backend: what an append's entries carry in ``usage``, added up
per conversation and UTC day, in the same atomic write, for good.

The shared tests run on every backend (conftest.py's ``store``); the ones at the end
are each backend's own: a sqlite or postgres database of schema version 5 (before
usage) gains it on open, and a jsonl store counts its totals from the history files
when its cache cannot vouch for them, old lines without ``usage`` included.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from chinwag.protocol import Entry, TokenUsage, UsageTotal
from chinwag.storage import Archive, NewConversation, Storage, StorageError, open_store
from chinwag.storage import _postgres as postgres_storage
from chinwag.storage import _sqlite as sqlite_storage
from chinwag.storage._timestamps import to_text
from test_postgres import query
from test_storage import (
    AGENT,
    NOT_UTF8,
    SENDER,
    T0,
    FailingAppends,
    Reopen,
    create,
    failure_of,
    message,
)

DAY = T0.date()  # 2024-05-01; T0 is noon UTC
NEXT_DAY = DAY + timedelta(days=1)
BEFORE_USAGE = 5  # the schema version of the SQL backends before usage totals


def reply(content: str, tokens: tuple[int, int] | None, when: datetime = T0) -> Entry:
    """An assistant entry, with its model call's (input, output) tokens when given."""
    usage = None if tokens is None else TokenUsage(input_tokens=tokens[0], output_tokens=tokens[1])
    return Entry(seq=0, role="assistant", content=content, created_at=when, usage=usage)


def total(
    day: date, tokens: tuple[int, int, int], agent: str = AGENT, sender: str = SENDER
) -> UsageTotal:
    """The row ``usage()`` gives: (input, output, calls) of (agent, sender) on ``day``."""
    return UsageTotal(
        agent=agent,
        sender=sender,
        day=day,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        calls=tokens[2],
    )


def archive_of(first_seq: int, last_seq: int, name: str = "first") -> Archive:
    return Archive(
        name=name,
        first_seq=first_seq,
        last_seq=last_seq,
        summary="they spoke",
        speakers=[""] * (last_seq - first_seq + 1),
        created_at=T0 + timedelta(hours=1),
    )


# --- counting -----------------------------------------------------------------------------


async def test_a_store_with_no_usage_has_no_totals(store: Storage) -> None:
    assert await store.usage() == []
    assert await store.total_tokens() == (0, 0)
    await create(store)
    await store.append(AGENT, SENDER, [message("hello"), reply("hi", None)])
    assert await store.usage() == []
    assert await store.total_tokens() == (0, 0)


async def test_each_entry_with_usage_is_one_call_on_its_utc_day(store: Storage) -> None:
    # Local times on May 1 and 2 that fall on the other day in UTC.
    late_in_new_york = datetime(2024, 5, 1, 23, 59, tzinfo=timezone(timedelta(hours=-5)))
    early_in_moscow = datetime(2024, 5, 2, 2, 30, tzinfo=timezone(timedelta(hours=3)))
    last_utc_moment = datetime(2024, 5, 1, 23, 59, 59, 999999, tzinfo=UTC)
    await create(store)
    await store.append(
        AGENT,
        SENDER,
        [
            message("hello"),
            reply("one", (10, 2), T0),
            reply("none", None, T0),  # no usage: not a call
            reply("two", (5, 1), early_in_moscow),  # 2024-05-01 23:30 UTC
            reply("three", (7, 3), last_utc_moment),
            reply("four", (100, 20), late_in_new_york),  # 2024-05-02 04:59 UTC
        ],
    )
    await store.append(AGENT, SENDER, [reply("five", (1, 1), T0 + timedelta(days=1))])
    assert await store.usage() == [total(DAY, (22, 6, 3)), total(NEXT_DAY, (101, 21, 2))]


async def test_zero_tokens_still_count_as_a_call(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [reply("empty", (0, 0))])
    assert await store.usage() == [total(DAY, (0, 0, 1))]


async def test_two_conversations_are_kept_apart(store: Storage) -> None:
    await create(store, AGENT, "ann")
    await create(store, AGENT, "bob")
    await create(store, "helper", "ann")
    await store.append(AGENT, "ann", [reply("a", (1, 2))])
    await store.append(AGENT, "bob", [reply("b", (10, 20))])
    await store.append("helper", "ann", [reply("c", (100, 200))])
    await store.append(AGENT, "ann", [reply("d", (3, 4))])
    assert await store.usage() == [
        total(DAY, (4, 6, 2), AGENT, "ann"),
        total(DAY, (10, 20, 1), AGENT, "bob"),
        total(DAY, (100, 200, 1), "helper", "ann"),
    ]
    assert await store.total_tokens() == (114, 226)


async def test_total_tokens_add_up_every_total_as_ints(store: Storage) -> None:
    for n, (agent, sender) in enumerate([(AGENT, "ann"), (AGENT, "bob"), ("helper", "ann")]):
        await create(store, agent, sender)
        for days in range(3):
            when = T0 + timedelta(days=days)
            await store.append(agent, sender, [reply("x", (n + days, 10 * n + days), when)])
    rows = await store.usage()
    assert len(rows) == 9
    tokens = await store.total_tokens()
    assert tokens == (
        sum(row.input_tokens for row in rows),
        sum(row.output_tokens for row in rows),
    )
    assert tokens == (9 + 9, 90 + 9)
    assert [type(n) for n in tokens] == [int, int]  # postgres's SUM is numeric


async def test_an_append_that_creates_its_conversation_counts_its_usage(store: Storage) -> None:
    await store.append(AGENT, SENDER, [message("hi"), reply("a", (3, 4))], create=NewConversation())
    assert await store.usage() == [total(DAY, (3, 4, 1))]


async def test_concurrent_appends_each_count_once(store: Storage) -> None:
    """Many appends at once (sqlite's full mode commits them in groups, each in a savepoint)."""
    senders = [f"s{n}" for n in range(4)]
    for sender in senders:
        await create(store, AGENT, sender)

    async def append(sender: str, n: int) -> None:
        await store.append(AGENT, sender, [message(f"q{n}"), reply(f"a{n}", (n, 1))])

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(append, senders[n % 4], n)
    assert await store.usage() == [
        total(DAY, (sum(range(k, 40, 4)), 10, 10), AGENT, sender)
        for k, sender in enumerate(senders)
    ]


# --- reading them back --------------------------------------------------------------------


async def test_totals_are_ordered_by_day_then_agent_then_sender(store: Storage) -> None:
    # Code point order, on every backend: upper case before lower case.
    pairs = [("bot", "zoe"), ("bot", "Zed"), ("Bot", "amy"), ("ann", "amy")]
    for agent, sender in pairs:
        await create(store, agent, sender)
        await store.append(agent, sender, [reply("later", (1, 0), T0 + timedelta(days=1))])
        await store.append(agent, sender, [reply("earlier", (2, 0), T0)])
    expected = [("Bot", "amy"), ("ann", "amy"), ("bot", "Zed"), ("bot", "zoe")]
    rows = await store.usage()
    assert [(row.day, row.agent, row.sender) for row in rows] == [
        (day, agent, sender) for day in (DAY, NEXT_DAY) for agent, sender in expected
    ]


async def test_totals_filter_by_agent_sender_and_since(store: Storage) -> None:
    for agent, sender in [(AGENT, "ann"), (AGENT, "bob"), ("helper", "ann")]:
        await create(store, agent, sender)
        for days in range(3):
            await store.append(
                agent, sender, [reply("x", (days + 1, 1), T0 + timedelta(days=days))]
            )
    third = DAY + timedelta(days=2)

    def keys(rows: list[UsageTotal]) -> list[tuple[str, str, date]]:
        return [(row.agent, row.sender, row.day) for row in rows]

    assert len(await store.usage()) == 9
    assert keys(await store.usage(agent="helper")) == [
        ("helper", "ann", DAY + timedelta(days=n)) for n in range(3)
    ]
    assert {row.agent for row in await store.usage(sender="ann")} == {AGENT, "helper"}
    assert keys(await store.usage(agent=AGENT, sender="bob", since=third)) == [
        (AGENT, "bob", third)
    ]
    assert keys(await store.usage(since=NEXT_DAY)) == [
        (agent, sender, day)
        for day in (NEXT_DAY, third)
        for agent, sender in [(AGENT, "ann"), (AGENT, "bob"), ("helper", "ann")]
    ]
    assert await store.usage(since=third + timedelta(days=1)) == []
    assert await store.usage(agent="nobody") == []
    assert await store.usage(agent="helper", sender="bob") == []
    (row,) = await store.usage(agent=AGENT, sender="ann", since=third)
    assert row == total(third, (3, 1, 1), AGENT, "ann")


async def test_history_and_context_give_each_entry_its_usage(store: Storage) -> None:
    await create(store)
    stored = await store.append(AGENT, SENDER, [message("hello"), reply("hi", (12, 3))])
    assert stored[1].usage == TokenUsage(input_tokens=12, output_tokens=3)
    history = await store.history(AGENT, SENDER)
    assert [entry.usage for entry in history] == [
        None,
        TokenUsage(input_tokens=12, output_tokens=3),
    ]
    assert history == stored
    loaded = await store.load_context(AGENT, SENDER)
    assert loaded is not None and loaded[1] == stored


# --- each conversation's, with its metadata ----------------------------------------------


Tokens = dict[tuple[str, str], tuple[int, int]]


async def summed_by_conversation(store: Storage) -> Tokens:
    """Each conversation's (input, output) as ``usage()``'s rows add up, over all days."""
    sums: Tokens = {}
    for row in await store.usage():
        tokens_in, tokens_out = sums.get((row.agent, row.sender), (0, 0))
        sums[row.agent, row.sender] = (tokens_in + row.input_tokens, tokens_out + row.output_tokens)
    return sums


PAIRS = [(AGENT, "ann"), (AGENT, "bob"), ("helper", "ann"), (AGENT, "quiet")]


async def conversations_with_usage(store: Storage) -> Tokens:
    """``PAIRS``' conversations, one compacted and one without model calls; their tokens."""
    for agent, sender in PAIRS:
        await create(store, agent, sender)
    for n, (agent, sender) in enumerate(PAIRS[:3], 1):
        for days in range(2):
            when = T0 + timedelta(days=days)
            await store.append(agent, sender, [message("q"), reply("a", (n + days, n), when)])
    await store.append(AGENT, "quiet", [message("no model call")])
    await store.compact(
        AGENT, "ann", archive_of(1, 4), usage=TokenUsage(input_tokens=50, output_tokens=5)
    )
    expected = {**await summed_by_conversation(store), (AGENT, "quiet"): (0, 0)}
    assert expected == {
        (AGENT, "ann"): (1 + 2 + 50, 1 + 1 + 5),
        (AGENT, "bob"): (2 + 3, 2 + 2),
        ("helper", "ann"): (3 + 4, 3 + 3),
        (AGENT, "quiet"): (0, 0),
    }
    return expected


async def check_items_carry(store: Storage, expected: Tokens) -> None:
    """Every ConversationItem ``store`` gives carries ``expected``'s tokens, as ints."""

    async def shown(**filters: str) -> Tokens:
        """Each listed conversation's tokens, one conversation a page, every page."""
        tokens: Tokens = {}
        cursor = None
        while True:
            page, cursor = await store.list_conversations(limit=1, cursor=cursor, **filters)
            tokens.update({(i.agent, i.sender): (i.tokens_in, i.tokens_out) for i in page})
            if cursor is None:
                return tokens

    page, _ = await store.list_conversations()
    assert {(i.agent, i.sender): (i.tokens_in, i.tokens_out) for i in page} == expected
    assert {type(n) for i in page for n in (i.tokens_in, i.tokens_out)} == {int}
    assert await shown() == expected
    assert await shown(agent=AGENT) == {k: v for k, v in expected.items() if k[0] == AGENT}
    assert await shown(sender="ann") == {k: v for k, v in expected.items() if k[1] == "ann"}
    for agent, sender in PAIRS:
        tokens = expected[agent, sender]
        got = await store.get_conversation(agent, sender)
        assert got is not None and (got.tokens_in, got.tokens_out) == tokens
        loaded = await store.load_context(agent, sender)
        assert loaded is not None and (loaded[0].tokens_in, loaded[0].tokens_out) == tokens
        again = await create(store, agent, sender)  # there already: returned as it is
        assert (again.tokens_in, again.tokens_out) == tokens


async def test_every_conversation_item_carries_its_totals(store: Storage) -> None:
    expected = await conversations_with_usage(store)
    await check_items_carry(store, expected)
    new = await create(store, AGENT, "new")
    assert (new.tokens_in, new.tokens_out) == (0, 0)
    await store.append(AGENT, "new", [reply("first", (7, 8))])
    await check_items_carry(store, {**expected, (AGENT, "new"): (7, 8)})


async def test_conversation_items_carry_their_totals_when_reopened(
    store: Storage, reopen: Reopen
) -> None:
    expected = await conversations_with_usage(store)
    store = await reopen(store)
    await check_items_carry(store, expected)


# --- compaction ---------------------------------------------------------------------------


async def test_compaction_lowers_no_total_and_its_summary_call_counts(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("hello"), reply("hi", (10, 2))])
    await store.append(AGENT, SENDER, [message("again"), reply("yes", (20, 4))])
    before = await store.usage()
    assert before == [total(DAY, (30, 6, 2))]

    summary_call = TokenUsage(input_tokens=50, output_tokens=5)
    marker = await store.compact(AGENT, SENDER, archive_of(1, 4), usage=summary_call)
    assert marker.usage == summary_call
    assert await store.usage() == [total(DAY, (80, 11, 3))]
    assert await store.total_tokens() == (80, 11)
    # The history keeps what was archived, with its usage, and the marker's.
    everything = await store.history(AGENT, SENDER, include_archived=True)
    assert [entry.usage for entry in everything if entry.usage] == [
        TokenUsage(input_tokens=10, output_tokens=2),
        TokenUsage(input_tokens=20, output_tokens=4),
        summary_call,
    ]
    assert (await store.history(AGENT, SENDER)) == [marker]

    # A compaction with no usage adds nothing, and lowers nothing either.
    await store.append(AGENT, SENDER, [message("more"), reply("ok", (1, 1))])
    await store.compact(AGENT, SENDER, archive_of(6, 7, "second"))
    assert await store.usage() == [total(DAY, (81, 12, 4))]


async def test_a_compaction_that_is_refused_adds_nothing(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [reply("hi", (10, 2))])
    with pytest.raises(StorageError, match="An archive must cover seq 1 to 1"):
        await store.compact(
            AGENT, SENDER, archive_of(1, 2), usage=TokenUsage(input_tokens=9, output_tokens=9)
        )
    assert await store.usage() == [total(DAY, (10, 2, 1))]


# --- what fails adds nothing --------------------------------------------------------------


async def test_an_append_that_cannot_be_encoded_adds_nothing(store: Storage) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [reply("kept", (1, 1))])
    with pytest.raises(StorageError, match=NOT_UTF8):
        await store.append(AGENT, SENDER, [reply("counted?", (100, 100)), message("\ud800")])
    assert await store.usage() == [total(DAY, (1, 1, 1))]


async def test_a_failing_append_among_concurrent_ones_adds_nothing(store: Storage) -> None:
    """Under sqlite's full mode these share a transaction: the failing one's savepoint goes."""
    senders = [f"c{n}" for n in range(8)]
    for sender in senders:
        await create(store, AGENT, sender)
    failed: list[str] = []

    async def append(sender: str) -> None:
        last = "\ud800" if sender == "c3" else "fine"
        try:
            await store.append(AGENT, sender, [reply("a", (5, 1)), message(last)])
        except StorageError:
            failed.append(sender)

    async with trio.open_nursery() as nursery:
        for sender in senders:
            nursery.start_soon(append, sender)
    assert failed == ["c3"]
    assert await store.usage() == [
        total(DAY, (5, 1, 1), AGENT, sender) for sender in senders if sender != "c3"
    ]


@pytest.mark.parametrize("when", ["insert", "commit"])
async def test_an_append_that_fails_in_the_write_adds_nothing(
    store: Storage, failing_appends: FailingAppends, reopen: Reopen, when: str
) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [reply("kept", (1, 1))])
    async with failing_appends("boom", when=when):
        with pytest.raises(StorageError, match=failure_of(AGENT, SENDER)):
            await store.append(AGENT, SENDER, [reply("counted?", (100, 100)), message("boom")])
        with pytest.raises(StorageError, match=failure_of(AGENT, "new")):
            await store.append(
                AGENT, "new", [reply("created?", (7, 7)), message("boom")], create=NewConversation()
            )
        assert await store.usage() == [total(DAY, (1, 1, 1))]
        assert await store.total_tokens() == (1, 1)
    await store.append(AGENT, SENDER, [reply("after", (2, 2))])
    assert await store.usage() == [total(DAY, (3, 3, 2))]
    store = await reopen(store)
    assert await store.usage() == [total(DAY, (3, 3, 2))]
    assert await store.total_tokens() == (3, 3)


async def test_a_failed_commit_of_a_group_adds_nothing_for_any_of_it(
    store: Storage, failing_appends: FailingAppends
) -> None:
    """What an append reports is the truth: the totals hold exactly what returned."""
    senders = [f"c{n}" for n in range(6)]
    for sender in senders:
        await create(store, AGENT, sender)
    returned: list[str] = []

    async def append(sender: str) -> None:
        content = "doomed" if sender == "c2" else "fine"
        try:
            await store.append(AGENT, sender, [reply("a", (4, 2)), message(content)])
        except StorageError:
            return
        returned.append(sender)

    async with failing_appends("doomed", when="commit"), trio.open_nursery() as nursery:
        nursery.start_soon(append, senders[0])
        await trio.testing.wait_all_tasks_blocked()  # the rest arrive while it writes
        for sender in senders[1:]:
            nursery.start_soon(append, sender)
    assert "c2" not in returned
    assert await store.usage() == [
        total(DAY, (4, 2, 1), AGENT, sender) for sender in senders if sender in returned
    ]


# --- durability ---------------------------------------------------------------------------


async def test_totals_survive_reopening(store: Storage, reopen: Reopen) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [message("hi"), reply("a", (10, 2))])
    await store.append(AGENT, SENDER, [reply("b", (1, 1), T0 + timedelta(days=1))])
    await store.compact(
        AGENT, SENDER, archive_of(1, 3), usage=TokenUsage(input_tokens=30, output_tokens=3)
    )
    expected = [total(DAY, (40, 5, 2)), total(NEXT_DAY, (1, 1, 1))]
    assert await store.usage() == expected
    history = await store.history(AGENT, SENDER, include_archived=True)

    store = await reopen(store)
    assert await store.usage() == expected
    assert await store.history(AGENT, SENDER, include_archived=True) == history
    await store.append(AGENT, SENDER, [reply("c", (5, 5))])  # and they go on from there
    store = await reopen(store)
    assert await store.usage() == [total(DAY, (45, 10, 3)), total(NEXT_DAY, (1, 1, 1))]
    assert await store.total_tokens() == (46, 11)


# --- each backend's own -------------------------------------------------------------------

on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
on_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)
on_jsonl = pytest.mark.parametrize("backend", ["jsonl"], indirect=True)


@on_sqlite
async def test_a_sqlite_database_from_before_usage_gains_it_on_open(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(store_url.removeprefix("sqlite:///"))
    with monkeypatch.context() as old_code:
        old_code.setattr(sqlite_storage, "MIGRATIONS", sqlite_storage.MIGRATIONS[:BEFORE_USAGE])
        async with open_store(store_url):
            pass
    # Rows as version 5 stored them: no usage columns to fill.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO conversations (agent, sender, created_at, updated_at, last_seq)"
            " VALUES (?, ?, ?, ?, 2)",
            (AGENT, SENDER, to_text(T0), to_text(T0)),
        )
        conn.executemany(
            "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, is_error,"
            " created_at) VALUES (1, ?, 'message', ?, ?, '', 0, ?)",
            [(1, "user", "old hello", to_text(T0)), (2, "assistant", "old hi", to_text(T0))],
        )
    finally:
        conn.close()

    async with open_store(store_url) as store:
        old = await store.history(AGENT, SENDER)
        assert [(entry.content, entry.usage) for entry in old] == [
            ("old hello", None),
            ("old hi", None),
        ]
        assert await store.usage() == []
        await store.append(AGENT, SENDER, [reply("new", (8, 2))])
        assert await store.usage() == [total(DAY, (8, 2, 1))]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchall() == [
            (len(sqlite_storage.MIGRATIONS),)
        ]
        assert len(sqlite_storage.MIGRATIONS) > BEFORE_USAGE
    finally:
        conn.close()


@on_sqlite
@pytest.mark.parametrize(
    ("filters", "plan"),
    [
        (
            {"agent": AGENT, "sender": SENDER},
            [
                "SEARCH c USING COVERING INDEX sqlite_autoindex_conversations_1"
                " (sender=? AND agent=?)",
                "SEARCH u USING PRIMARY KEY (conversation_id=?)",
            ],
        ),
        (
            {"sender": SENDER, "since": DAY.isoformat()},
            [
                "SEARCH c USING COVERING INDEX sqlite_autoindex_conversations_1 (sender=?)",
                "SEARCH u USING PRIMARY KEY (conversation_id=? AND day>?)",
                "USE TEMP B-TREE FOR ORDER BY",
            ],
        ),
        (
            {"agent": AGENT},
            [
                "SEARCH c USING INDEX conversations_by_agent (agent=?)",
                "SEARCH u USING PRIMARY KEY (conversation_id=?)",
                "USE TEMP B-TREE FOR ORDER BY",
            ],
        ),
    ],
)
async def test_sqlite_reads_the_totals_of_the_conversations_named_not_every_total(
    store: Storage, store_url: str, filters: dict[str, str], plan: list[str]
) -> None:
    await create(store)
    await store.append(AGENT, SENDER, [reply("a", (1, 1))])
    params: dict[str, str | None] = {"agent": None, "sender": None, "since": None, **filters}
    conn = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")))
    try:
        query = sqlite_storage._usage_query(params)
        assert [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query, params)] == plan
    finally:
        conn.close()


@on_sqlite
@pytest.mark.parametrize("filters", [{}, {"agent": AGENT}, {"sender": SENDER}])
async def test_sqlite_lists_each_conversations_totals_by_its_key(
    store: Storage, store_url: str, filters: dict[str, str]
) -> None:
    """A page costs a few probes of usage's primary key per conversation, never a scan."""
    await create(store)
    await store.append(AGENT, SENDER, [reply("a", (1, 1))])
    conn = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")))
    try:
        plan = [
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT"
                f" {sqlite_storage._CONVERSATION_COLUMNS} FROM conversations"
                + "".join(f" WHERE {name} = :{name}" for name in filters),
                filters,
            )
        ]
    finally:
        conn.close()
    reads_of_usage = [step for step in plan if " u " in step]
    assert reads_of_usage == ["SEARCH u USING PRIMARY KEY (conversation_id=?)"] * 2, plan


@on_postgres
async def test_a_postgres_database_from_before_usage_gains_it_on_open(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_code:
        old_code.setattr(postgres_storage, "MIGRATIONS", postgres_storage.MIGRATIONS[:BEFORE_USAGE])
        async with open_store(store_url):
            pass
    query(
        store_url,
        "INSERT INTO conversations (agent, sender, created_at, updated_at, last_seq)"
        " VALUES (%s, %s, %s, %s, 1)",
        AGENT,
        SENDER,
        T0,
        T0,
    )
    query(
        store_url,
        "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, is_error,"
        " created_at) SELECT id, 1, 'message', 'assistant', 'old hi', '', false, %s"
        " FROM conversations",
        T0,
    )

    async with open_store(store_url) as store:
        (old,) = await store.history(AGENT, SENDER)
        assert (old.content, old.usage) == ("old hi", None)
        assert await store.usage() == []
        await store.append(AGENT, SENDER, [reply("new", (8, 2))])
        assert await store.usage() == [total(DAY, (8, 2, 1))]
    assert query(store_url, "SELECT max(version) FROM schema_version") == [
        (len(postgres_storage.MIGRATIONS),)
    ]


@on_jsonl
async def test_jsonl_counts_from_the_history_files_when_its_cache_cannot_vouch(
    store: Storage, store_url: str, reopen: Reopen
) -> None:
    """Every history file read whole: archived lines, lines from before usage, a new day."""
    root = Path(store_url.removeprefix("jsonl:///"))
    await create(store)
    await create(store, AGENT, "other")
    await store.append(AGENT, SENDER, [message("hi"), reply("a", (10, 2))])
    await store.compact(
        AGENT, SENDER, archive_of(1, 2), usage=TokenUsage(input_tokens=30, output_tokens=3)
    )
    await store.append(AGENT, "other", [reply("b", (1, 1), T0 + timedelta(days=1))])
    await store.append(AGENT, "other", [reply("no usage", None)])
    expected = await store.usage()
    assert expected == [total(DAY, (40, 5, 2)), total(NEXT_DAY, (1, 1, 1), AGENT, "other")]
    await store.close()

    # Lines as the store wrote them before usage: no "usage" key at all.
    history = root / "conversations" / "2.jsonl"
    data = history.read_bytes()
    assert data.count(b',"usage":null') == 1
    history.write_bytes(data.replace(b',"usage":null', b""))
    (root / "cache.msgpack").unlink()

    store = await reopen(store)
    assert await store.usage() == expected
    other = await store.history(AGENT, "other")
    assert [(entry.content, entry.usage) for entry in other] == [
        ("b", TokenUsage(input_tokens=1, output_tokens=1)),
        ("no usage", None),
    ]
    # A content that looks like a usage key is a string, escaped: it counts nothing.
    await store.append(AGENT, "other", [message('"usage":{"input_tokens":5}')])
    await store.close()
    (root / "cache.msgpack").unlink()
    store = await reopen(store)
    assert await store.usage() == expected


async def test_a_closed_store_refuses_to_give_totals(store: Storage) -> None:
    await store.close()
    with pytest.raises(StorageError, match="The store is closed"):
        await store.usage()
    with pytest.raises(StorageError, match="The store is closed"):
        await store.total_tokens()


def test_usage_totals_encode_their_day_as_a_date() -> None:
    encoded = msgspec.json.encode(total(DAY, (1, 2, 3)))
    assert b'"day":"2024-05-01"' in encoded
    assert msgspec.json.decode(encoded, type=UsageTotal) == total(DAY, (1, 2, 3))
