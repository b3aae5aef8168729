"""What the sqlite backend promises about its mail tables, beyond the suite every backend passes.

A database from before mail (schema version 2, as the code at db9c294 made it)
gains the mail tables on open, its conversations untouched; msg_ids go on after
a reopen; the unread counts the triggers keep equal a count of the deliveries;
the reads that must stay fast whatever the inbox's length are range scans of an
index, never a scan of a table or a sort. A database of schema 3 gains part 2 on
open (search, versions, spaces) with its mail; the text index holds each
message's current content once and finds the words every backend finds.
"""

from __future__ import annotations

import fnmatch
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from chinwag.protocol import Delivery, DeliveryState, Entry, MailMessage, Participant, Ref
from chinwag.storage import (
    DeleteChange,
    EditChange,
    InboxQuery,
    ParentChange,
    PinChange,
    ReactChange,
    SqliteStorage,
    StateChange,
    StorageError,
    msg_id_of,
    open_store,
    search_words,
)
from chinwag.storage import _sqlite as sqlite_storage
from chinwag.storage._sqlite import MIGRATIONS
from chinwag.storage._sqlite_mail import _READ_ALL, _SEARCH, _inbox_sql, _space_mail_sql
from chinwag.storage._timestamps import to_text

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# The schema as the code at db9c294 (the last before sqlite mail) created it, copied
# verbatim: versions 1 and 2 of MIGRATIONS then, frozen here so that a change to them
# in storage/_sqlite.py cannot pass unnoticed.
SCHEMA_AT_DB9C294 = (
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        agent TEXT NOT NULL,
        sender TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        cwd TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0,
        UNIQUE (sender, agent)
    )
    """,
    "CREATE INDEX conversations_by_updated ON conversations (updated_at DESC, id DESC)",
    "CREATE INDEX conversations_by_agent ON conversations (agent, updated_at DESC, id DESC)",
    """
    CREATE TABLE entries (
        conversation_id INTEGER NOT NULL REFERENCES conversations (id),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        agent TEXT NOT NULL,
        tool_calls TEXT,
        tool_call_id TEXT,
        is_error INTEGER NOT NULL,
        run_id TEXT,
        created_at TEXT NOT NULL,
        archive TEXT,
        PRIMARY KEY (conversation_id, seq)
    )
    """,
    "CREATE INDEX entries_compact_markers ON entries (conversation_id, seq) WHERE kind = 'compact'",
    """
    CREATE TABLE archives (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations (id),
        name TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        summary TEXT NOT NULL,
        speakers TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (conversation_id, name)
    )
    """,
    """
    CREATE TABLE notes (
        id INTEGER PRIMARY KEY,
        agent TEXT NOT NULL,
        name TEXT NOT NULL,
        content TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (agent, name)
    )
    """,
    """
    CREATE VIRTUAL TABLE memory USING fts5 (
        text,
        agent UNINDEXED,
        tokenize = "unicode61 remove_diacritics 0 tokenchars '_'"
    )
    """,
)

# The columns of an entry's row in that schema (later versions add more).
OLD_ENTRY_COLUMNS = (
    "conversation_id, seq, kind, role, content, agent, tool_calls, tool_call_id, is_error,"
    " run_id, created_at, archive"
)

MAIL_TABLES = {
    "mail_participants",
    "mail_messages",
    "mail_scopes",
    "mail_deliveries",
    "mail_unread",
}


def read_db(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    return {str(name) for (name,) in read_db(path, "SELECT name FROM sqlite_schema")}


def message(sender: str, to: list[str], content: str, *, seconds: int = 0) -> MailMessage:
    return MailMessage(
        msg_id="",
        sender=sender,
        to=to,
        recipients=to,
        content=content,
        created_at=T0 + timedelta(seconds=seconds),
    )


def old_database(path: Path) -> None:
    """A version 2 file as db9c294 left it: a conversation of two entries, and a note."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in SCHEMA_AT_DB9C294:
            conn.execute(statement)
        conn.executemany("INSERT INTO schema_version VALUES (?, 'then')", [(1,), (2,)])
        conn.execute(
            "INSERT INTO conversations (agent, sender, title, cwd, created_at, updated_at,"
            " last_seq) VALUES ('a', 's', 'Old talk', '/work', ?, ?, 2)",
            (to_text(T0), to_text(T0)),
        )
        conn.executemany(
            "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, is_error,"
            " created_at) VALUES (1, ?, 'message', ?, ?, '', 0, ?)",
            [(1, "user", "an old quokka", to_text(T0)), (2, "assistant", "hi", to_text(T0))],
        )
        conn.execute(
            "INSERT INTO notes (agent, name, content, updated_at)"
            " VALUES ('a', 'pets', 'a wombat', ?)",
            (to_text(T0),),
        )
        conn.execute(
            "INSERT INTO memory (rowid, text, agent) VALUES (-1, 'pets a wombat', 'a')",
        )
    finally:
        conn.close()


async def test_a_database_from_before_mail_gains_it_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_database(path)
    assert not tables(path) & MAIL_TABLES
    before = read_db(path, f"SELECT {OLD_ENTRY_COLUMNS} FROM entries ORDER BY seq")

    async with open_store(f"sqlite:///{path}") as store:
        assert tables(path) >= MAIL_TABLES
        conversation = await store.get_conversation("a", "s")
        assert conversation is not None
        assert (conversation.title, conversation.cwd, conversation.last_seq) == (
            "Old talk",
            "/work",
            2,
        )
        assert [e.content for e in await store.history("a", "s")] == ["an old quokka", "hi"]
        assert [hit.name for hit in await store.search_memory("a", "wombat")] == ["pets"]
        assert await store.mail.participants() == []
        stored, created = await store.mail.post(
            message("ann", ["bob"], "first mail"), [Delivery(name="bob")]
        )
        assert (stored.msg_id, created) == (msg_id_of(1), True)
        await store.append("a", "s", [Entry(seq=0, role="user", content="after mail")])

    after = read_db(path, f"SELECT {OLD_ENTRY_COLUMNS} FROM entries WHERE seq <= 2 ORDER BY seq")
    assert after == before
    assert read_db(path, "SELECT version FROM schema_version ORDER BY 1") == [
        (version,) for version in range(1, len(MIGRATIONS) + 1)
    ]
    async with open_store(f"sqlite:///{path}") as store:  # migrates nothing twice
        rows = await store.mail.inbox("bob", InboxQuery(), limit=10)
        assert [m.content for m, _ in rows] == ["first mail"]
        assert [e.content for e in await store.history("a", "s")][-1] == "after mail"


async def test_mail_from_schema_3_gains_search_versions_and_spaces_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v3.db"
    monkeypatch.setattr(sqlite_storage, "MIGRATIONS", MIGRATIONS[:3])
    async with open_store(f"sqlite:///{path}"):
        pass
    monkeypatch.undo()
    old = msgspec.structs.replace(message("ann", ["bob"], "an old wombat"), msg_id=msg_id_of(1))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO mail_messages (number, sender, priority, created_at, body)"
            " VALUES (1, 'ann', 1, ?, ?)",
            (to_text(old.created_at), msgspec.msgpack.encode(old)),
        )
        conn.execute(
            "INSERT INTO mail_deliveries (name, number, state, mentioned)"
            " VALUES ('bob', 1, 'pending', 0)"
        )
    conn.close()

    async with open_store(f"sqlite:///{path}") as store:
        found = await store.mail.search("bob", ["wombat"], readable_spaces=[], limit=5)
        assert [m.msg_id for m in found] == [old.msg_id]
        edited = await store.mail.change_message(
            old.msg_id, EditChange(content="a new koala", at=old.created_at)
        )
        assert edited is not None and edited.version == 2
        assert [v.content for v in await store.mail.versions(old.msg_id)] == ["an old wombat"]
        assert await store.mail.search("bob", ["wombat"], readable_spaces=[], limit=5) == []
        assert await store.mail.spaces() == [] and await store.mail.space_counts() == {}
    assert read_db(path, "SELECT max(version) FROM schema_version") == [(len(MIGRATIONS),)]


async def test_the_text_index_holds_each_messages_current_content_once(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}") as store:
        posted = [
            (await store.mail.post(message("ann", ["bob"], f"text {n}"), [Delivery(name="bob")]))[0]
            for n in range(4)
        ]
        await store.mail.change_message(posted[0].msg_id, EditChange(content="edited", at=T0))
        await store.mail.change_message(posted[0].msg_id, EditChange(content="again", at=T0))
        await store.mail.change_message(posted[1].msg_id, DeleteChange(at=T0))
        await store.mail.change_message(posted[2].msg_id, PinChange(by="bob", at=T0))
        await store.mail.change_message(posted[2].msg_id, ReactChange(by="bob", emoji="+1"))
        await store.mail.change_message(posted[1].msg_id, DeleteChange(at=T0))  # twice
    assert read_db(path, "SELECT rowid, content FROM mail_text ORDER BY rowid") == [
        (1, "again"),
        (3, "text 2"),
        (4, "text 3"),
    ]
    conn = sqlite3.connect(path)
    try:  # raises when the index and its rows disagree
        conn.execute("INSERT INTO mail_text (mail_text, rank) VALUES ('integrity-check', 1)")
    finally:
        conn.close()


async def test_search_finds_the_words_the_in_process_index_finds(tmp_path: Path) -> None:
    """The tokenizer is memory search's: a word is what ``search_words`` makes of the text
    (underscores inside it, diacritics kept, case folded), and no word is FTS5 syntax."""
    texts = ["snake_case names", "Café CRÈME", "NOT this NEAR that", 'say "hi" * ok']
    async with open_store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        for text in texts:
            await store.mail.post(message("ann", ["bob"], text), [Delivery(name="bob")])

        async def found(*words: str) -> list[str]:
            hits = await store.mail.search("bob", list(words), readable_spaces=[], limit=10)
            return [m.content for m in hits]

        for text in texts:
            for word in search_words(text):
                assert await found(word) == [text], word
        for absent in ("snake", "case", "cafe", "creme", "and", "or"):
            assert await found(absent) == [], absent
        assert await found("*", '"', "(", "col:x", "x*", "AND") == []
        assert await found("NOT", "NEAR") == ["NOT this NEAR that"]  # words, not operators


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_numbers_go_on_after_a_reopen(tmp_path: Path, synchronous: str) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}?synchronous={synchronous}"
    async with open_store(url) as store:
        for n in range(3):
            await store.mail.post(message("ann", ["bob"], f"m{n}"), [Delivery(name="bob")])
    async with open_store(url) as store:
        stored, _ = await store.mail.post(message("ann", ["bob"], "m3"), [Delivery(name="bob")])
        assert stored.msg_id == msg_id_of(4)
        assert [m.msg_id for m in await store.mail.sent("ann", limit=10)] == [
            msg_id_of(n) for n in (4, 3, 2, 1)
        ]


async def test_a_failed_post_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}") as store:
        with pytest.raises(StorageError, match=r"parent message m000000000009 is not stored"):
            await store.mail.post(
                message("ann", ["bob"], "a reply to nothing"),
                [Delivery(name="bob")],
                parent=ParentChange(msg_id=msg_id_of(9), start_thread=True),
                new_participants=[Participant(name="ann")],
            )
        assert await store.mail.participants() == []
        assert await store.mail.unread_totals() == {}
        stored, _ = await store.mail.post(message("ann", ["bob"], "then"), [Delivery(name="bob")])
        assert stored.msg_id == msg_id_of(1)
    for table in MAIL_TABLES - {"mail_messages", "mail_deliveries", "mail_unread"}:
        assert read_db(path, f"SELECT count(*) FROM {table}") == [(0,)], table


async def test_the_unread_counts_equal_a_count_of_the_deliveries(tmp_path: Path) -> None:
    """Every way a delivery moves (post, a reply's read_by, advance, the three mark_reads)."""
    path = tmp_path / "x.db"
    names = ["ann", "bob", "cy"]
    async with open_store(f"sqlite:///{path}") as store:
        mail = store.mail
        for n in range(30):
            sender = names[n % 3]
            to = [name for name in names if name != sender]
            initial: DeliveryState = ("pending", "delivered", "read")[n % 3]
            parent = None
            if n % 4 == 3:
                parent = ParentChange(msg_id=msg_id_of(n), start_thread=True, read_by=sender)
            msg = message(sender, to, f"m{n}", seconds=n)
            msg.priority = n % 4
            msg.thread_id = msg_id_of(n) if parent is not None else None
            await mail.post(msg, [Delivery(name=name, state=initial) for name in to], parent=parent)
        await mail.advance(
            [StateChange(msg_id_of(n), "bob", "read", T0) for n in range(1, 10)]
            + [StateChange(msg_id_of(n), "cy", "delivered", T0) for n in range(1, 10)]
        )
        await mail.mark_read("ann", T0, msg_ids=[msg_id_of(n) for n in range(10, 20)])
        await mail.mark_read("cy", T0, thread_id=msg_id_of(4))
        totals = await mail.unread_totals()
        counts = {name: await mail.unread_counts(name) for name in names}
    truth = read_db(
        path,
        "SELECT d.name, m.priority, count(*) FROM mail_deliveries AS d"
        " JOIN mail_messages AS m ON m.number = d.number WHERE d.state != 'read'"
        " GROUP BY d.name, m.priority",
    )
    expected: dict[str, dict[int, int]] = {}
    for name, priority, count in truth:
        expected.setdefault(str(name), {})[int(str(priority))] = int(str(count))
    assert expected  # something is left unread
    assert counts == {name: expected.get(name, {}) for name in names}
    assert totals == {name: sum(c.values()) for name, c in expected.items()}
    async with open_store(f"sqlite:///{path}") as store:
        await store.mail.mark_read("bob", T0)
        assert "bob" not in await store.mail.unread_totals()
        assert await store.mail.unread_counts("bob") == {}


@pytest.mark.parametrize(
    ("query", "first"),
    [
        (InboxQuery(), "SEARCH d USING PRIMARY KEY (name=?"),
        (InboxQuery(unread_only=True), "SEARCH d USING INDEX mail_deliveries_unread (name=?"),
        (InboxQuery(mentions_only=True), "SEARCH d USING INDEX mail_deliveries_mentions (name=?"),
        (InboxQuery(thread_id=msg_id_of(1)), "SEARCH m USING INDEX mail_messages_by_thread"),
        (InboxQuery(scope=Ref(type="module", value="auth")), "SEARCH s USING PRIMARY KEY"),
        (
            InboxQuery(pinned_only=True, scope=Ref(type="module", value="auth")),
            "S* m USING INDEX mail_messages_pinned",
        ),
        (
            InboxQuery(unread_only=True, priority_min=2, channel="dev", since=T0),
            "SEARCH d USING INDEX mail_deliveries_unread (name=?",
        ),
    ],
    ids=["plain", "unread", "mentions", "thread", "scope", "pinned", "filters"],
)
@pytest.mark.parametrize("before", [None, 7])
async def test_an_inbox_page_is_a_range_scan(
    tmp_path: Path, query: InboxQuery, first: str, before: int | None
) -> None:
    """An inbox page reads the index it is meant to, with no table scan and no sort."""
    path = tmp_path / "x.db"
    store = await SqliteStorage.open(path)
    await store.close()
    sql, params = _inbox_sql("ann", query, 50, before)
    assert_range_scan(explain(path, sql, params), first)


@pytest.mark.parametrize(
    ("query", "first"),
    [
        (InboxQuery(), "SEARCH m USING INDEX mail_messages_by_space (space=?"),
        (InboxQuery(unread_only=True), "SEARCH m USING INDEX mail_messages_by_space (space=?"),
        (InboxQuery(thread_id=msg_id_of(1)), "SEARCH m USING INDEX mail_messages_by_thread"),
        (InboxQuery(pinned_only=True), "S* m USING INDEX mail_messages_pinned"),
    ],
    ids=["plain", "unread", "thread", "pinned"],
)
@pytest.mark.parametrize("before", [None, 7])
async def test_a_space_mail_page_is_a_range_scan(
    tmp_path: Path, query: InboxQuery, first: str, before: int | None
) -> None:
    path = tmp_path / "x.db"
    store = await SqliteStorage.open(path)
    await store.close()
    sql, params = _space_mail_sql("eng", "ann", query, 50, before)
    assert_range_scan(explain(path, sql, params), first)


def assert_range_scan(details: list[str], first: str) -> None:
    """``details`` begin with ``first`` (``S*`` is SEARCH or SCAN: the pinned index holds
    only pins, so reading all of it is a short read), sort nothing and scan no table."""
    assert fnmatch.fnmatchcase(details[0], first + "*"), details
    assert not [d for d in details[1:] if d.startswith("SCAN")], details
    assert not [d for d in details if "TEMP B-TREE" in d], details


async def test_search_checks_readers_in_an_index_and_seeks_no_match_in_fts5(
    tmp_path: Path,
) -> None:
    """FTS5 reads the words' matches once (a rowid constraint would make it seek each
    delivery); who may read each is one seek into mail_messages_readers."""
    path = tmp_path / "x.db"
    store = await SqliteStorage.open(path)
    await store.close()
    params = {"match": '"x"', "name": "ann", "readable": "[]", "only": None, "limit": 5}
    details = explain(path, _SEARCH, params)
    assert "SCAN t VIRTUAL TABLE INDEX 0:M1" in details, details
    assert "SEARCH r USING COVERING INDEX mail_messages_readers (number=?)" in details, details
    assert "SEARCH m USING INTEGER PRIMARY KEY (rowid=?)" in details, details


async def test_marking_everything_read_reads_only_what_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = await SqliteStorage.open(path)
    await store.close()
    assert explain(path, _READ_ALL, {"name": "ann", "at": to_text(T0)}) == [
        "SEARCH mail_deliveries USING INDEX mail_deliveries_unread (name=?)"
    ]


def explain(path: Path, sql: str, params: Mapping[str, object]) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    finally:
        conn.close()
