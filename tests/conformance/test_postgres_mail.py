"""What the postgres backend's mail promises beyond test_mail.py and test_mail_part2.py.

A database from before mail opens with mail: version 2 is the schema every
chinwag before mail created (db9c294 and earlier), made here the way that
code made it, by opening a store whose ``MIGRATIONS`` stop at version 2 (the
shipped migrations are pinned below, so they are the ones it ran) and filling
it through the store; opened again with today's code, it gains the mail
tables (migration 3), its conversations, entries, archives and notes read back
as before, and mail works. Mail as version 3 stored it gains part 2 (migration
4): every message searchable, editable, in the inbox as it was.

Search finds the words memory search finds, inside hosts, paths and addresses
too (postgres's own parser would keep those whole), and a message longer than
a tsvector holds is stored whole and found by its start.

Several daemons share one database: two stores on one schema stand for two
daemons. Posts racing with one idempotency key store one message, numbered
as if they had not raced, and every racer gets it back; posts, replies, moves
and marks from both at once neither deadlock nor miscount the unread; changes
to one message from several at once each keep the others', and of exclusive
takers of one lock one wins.

Each test runs in a fresh schema of the worker's own database (conftest.py's
``store_url``), so parallel workers never meet.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest
import trio
from chinwag.protocol import (
    Delivery,
    DeliveryState,
    Entry,
    LockHolder,
    MailMessage,
    Participant,
)
from chinwag.storage import (
    Archive,
    EditChange,
    FromSpace,
    InboxQuery,
    NewConversation,
    ParentChange,
    ReactChange,
    StateChange,
    Storage,
    _postgres,
    msg_id_of,
    open_store,
    search_words,
)
from chinwag.storage._postgres import MIGRATIONS, parse_postgres_url
from chinwag.storage._postgres_mail import MAIL_MIGRATION, MAIL_SPACES_MIGRATION, _lock_key

on_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
BEFORE_MAIL = 2  # the schema version of every chinwag before mail
USAGE = 6  # the migration that gave entries their usage, and the usage totals
SEARCH = 8  # the migration that gave conversations their casefolded title and sender
OLD_TABLES = ["archives", "conversations", "entries", "notes", "schema_version"]
MAIL_TABLES = [
    "deliveries",
    "locks",
    "message_scopes",
    "message_versions",
    "messages",
    "participants",
    "projects",
    "space_members",
    "spaces",
    "unread_counts",
]
# sha256 of json.dumps(MIGRATIONS[:n]) as shipped: up to 2 by db9c294, up to 3 (mail) by
# c98c9c1. A migration that has shipped is never edited, or databases made by it would not
# match the code.
SHIPPED = {
    BEFORE_MAIL: "a6e5a9889449c8eeb8183aba1cff53a59c55dd8934c3e38d4586bc7c9dbf2633",
    BEFORE_MAIL + 1: "c9e6eb76427a12c993e1437b65b7c96a57ecfa8512554be3c749ff8eaa4f8cd6",
}


def query(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    conninfo, schema, _ = parse_postgres_url(url)
    with psycopg.connect(conninfo, autocommit=True, options=f"-c search_path={schema}") as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
async def daemons(store_url: str) -> AsyncIterator[Callable[[], Awaitable[Storage]]]:
    """``await daemons()`` opens another store on ``store_url``, closed after the test."""
    async with AsyncExitStack() as stack:

        async def open_one() -> Storage:
            return await stack.enter_async_context(open_store(store_url))

        yield open_one


def mail(sender: str, to: list[str], content: str, when: datetime, **fields: Any) -> MailMessage:
    return MailMessage(
        msg_id="", sender=sender, to=to, recipients=to, content=content, created_at=when, **fields
    )


def tables(url: str) -> list[str]:
    _, schema, _ = parse_postgres_url(url)
    rows = query(url, "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", schema)
    return [row[0] for row in rows]


async def everything(store: Storage) -> Any:
    """What the old store holds, as builtins: conversations, histories, the archive, notes."""
    conversations, _ = await store.list_conversations(limit=100)
    histories = [
        await store.history(c.agent, c.sender, include_archived=True) for c in conversations
    ]
    return msgspec.to_builtins(
        {
            "conversations": conversations,
            "histories": histories,
            "visible": await store.history("assistant", "ana"),
            "archive": await store.get_archive("assistant", "ana", "first"),
            "hits": await store.search_memory("assistant", "quokka"),
        }
    )


def test_the_shipped_migrations_are_unchanged() -> None:
    for version, digest in SHIPPED.items():
        shipped = json.dumps([list(migration) for migration in MIGRATIONS[:version]])
        assert hashlib.sha256(shipped.encode()).hexdigest() == digest, version
    assert MIGRATIONS[BEFORE_MAIL : BEFORE_MAIL + 2] == (MAIL_MIGRATION, MAIL_SPACES_MIGRATION)


@on_postgres
async def test_mail_from_schema_3_gains_search_and_versions_on_open(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_code:
        old_code.setattr(_postgres, "MIGRATIONS", MIGRATIONS[: BEFORE_MAIL + 1])
        async with open_store(store_url):
            pass
    # Mail as part 1 stored it: more messages than the migration indexes at once.
    for content, copies in (("an old wombat", 1200), ("the last numbat", 1)):
        query(
            store_url,
            "INSERT INTO messages (sender, priority, created_at, body)"
            " SELECT 'ann', 1, %s, %s FROM generate_series(1, %s)",
            T0,
            msgspec.msgpack.encode(mail("ann", ["bob"], content, T0)),
            copies,
        )
    query(
        store_url,
        "INSERT INTO deliveries (name, number, state, mentioned, priority, created_at)"
        " SELECT 'bob', number, 'pending', false, 1, %s FROM messages",
        T0,
    )
    async with open_store(store_url) as store:
        inbox = await store.mail.inbox("bob", InboxQuery(), limit=2000)
        assert len(inbox) == 1201 and {d.state for _, d in inbox} == {"pending"}
        (last,) = await store.mail.search("bob", ["numbat"], readable_spaces=[], limit=5)
        assert (last.msg_id, last.content) == (msg_id_of(1201), "the last numbat")
        wombats = await store.mail.search("bob", ["wombat"], readable_spaces=[], limit=3)
        assert [m.msg_id for m in wombats] == [msg_id_of(n) for n in (1200, 1199, 1198)]
        assert await store.mail.space_counts() == {}
        edited = await store.mail.change_message(
            last.msg_id, EditChange(content="a new koala", at=T0)
        )
        assert edited is not None and edited.version == 2
        assert [v.content for v in await store.mail.versions(last.msg_id)] == ["the last numbat"]
        assert await store.mail.search("bob", ["numbat"], readable_spaces=[], limit=5) == []
        [(newest, _)] = await store.mail.inbox("bob", InboxQuery(), limit=1)
        assert newest.content == "a new koala"


# --- full-text search ---------------------------------------------------------------------

ODD_WORDS = [
    "Deploy to api.example.com from src/_mail.py",
    "ask ops@Example.org about mail_store",
    "v1.2.3 of the 1_000 rows, see https://example.net/a-b?c=d",
    "Straße ÉCOLE naïve",
]


@on_postgres
async def test_search_finds_the_words_memory_search_finds(store: Storage) -> None:
    async with open_store("memory:") as memory:
        for content in ODD_WORDS:
            for each in (store, memory):
                await each.mail.post(mail("alice", ["bob"], content, T0), [Delivery(name="bob")])

        async def found(each: Storage, text: str) -> list[str]:
            words = search_words(text)
            hits = await each.mail.search("bob", words, readable_spaces=[], limit=10)
            return sorted(m.content for m in hits)

        # postgres's parser would keep hosts, paths, addresses and versions whole, and
        # split words at "_" and "-".
        assert await found(store, "example") == [ODD_WORDS[0], ODD_WORDS[1], ODD_WORDS[2]]
        assert await found(store, "mail") == []
        assert await found(store, "mail_store") == [ODD_WORDS[1]]
        assert await found(store, "ecole") == []
        every_word = {word for content in ODD_WORDS for word in search_words(content)}
        parts = ["mail", "store", "1", "000", "a-b", "STRASSE", "naive", "ecole"]
        for text in [*ODD_WORDS, *sorted(every_word), *parts]:
            assert await found(store, text) == await found(memory, text), text


@on_postgres
async def test_a_message_longer_than_a_search_vector_holds_is_kept_and_found_by_its_start(
    store: Storage,
) -> None:
    # 2.4 MB of distinct words, a NUL among them: a tsvector holds at most 1 MB.
    content = "needle\x00 " + " ".join(f"w{n}" for n in range(300_000)) + " haystack"
    posted, _ = await store.mail.post(mail("alice", ["bob"], content, T0), [Delivery(name="bob")])

    async def found(word: str) -> list[str]:
        hits = await store.mail.search("bob", [word], readable_spaces=[], limit=5)
        return [m.msg_id for m in hits]

    assert await found("needle") == [posted.msg_id]
    assert await found("w20000") == [posted.msg_id]
    assert await found("haystack") == []  # past what is indexed
    stored = await store.mail.get_message(posted.msg_id)
    assert stored is not None and stored.content == content
    await store.mail.change_message(posted.msg_id, ReactChange(emoji="👍", by="bob"))
    assert await found("needle") == [posted.msg_id]  # a reaction keeps the words
    await store.mail.change_message(posted.msg_id, EditChange(content="a haystack", at=T0))
    assert await found("needle") == []
    assert await found("haystack") == [posted.msg_id]


@on_postgres
async def test_a_store_from_before_mail_gains_mail_and_keeps_its_conversations(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_code:
        old_code.setattr(_postgres, "MIGRATIONS", MIGRATIONS[:BEFORE_MAIL])
        async with open_store(store_url) as old:
            # Today's code writes and reads the entries' usage and the conversations'
            # casefolded columns: lend the old schema what it needs for that (the usage
            # migration, the search one's columns) while it fills it, then take it back.
            for statement in (*MIGRATIONS[USAGE - 1], MIGRATIONS[SEARCH - 1][0]):
                assert isinstance(statement, str)  # plain SQL, no step in Python
                query(store_url, statement)
            for sender in ("ana", "bob"):
                await old.append(
                    "assistant",
                    sender,
                    [
                        Entry(seq=0, role="user", content=f"hello from {sender}", created_at=T0),
                        Entry(seq=0, role="assistant", content="a quokka", created_at=T0),
                    ],
                    create=NewConversation(cwd="/tmp"),
                )
            await old.set_title("assistant", "ana", "Quokkas")
            archive = Archive(
                name="first",
                first_seq=1,
                last_seq=2,
                summary="they spoke of a quokka",
                speakers=["", ""],
                created_at=T0,
            )
            await old.compact("assistant", "ana", archive)
            await old.put_note("assistant", "quokka facts", "small", updated_at=T0)
            before = await everything(old)
        query(store_url, "DROP TABLE usage")
        query(store_url, "ALTER TABLE entries DROP COLUMN input_tokens, DROP COLUMN output_tokens")
        query(
            store_url,
            "ALTER TABLE conversations DROP COLUMN title_folded, DROP COLUMN sender_folded",
        )
    assert tables(store_url) == OLD_TABLES
    assert query(store_url, "SELECT max(version) FROM schema_version") == [(BEFORE_MAIL,)]

    async with open_store(store_url) as store:
        assert await everything(store) == before
        assert query(store_url, "SELECT max(version) FROM schema_version") == [(len(MIGRATIONS),)]
        assert set(OLD_TABLES + MAIL_TABLES) <= set(tables(store_url))  # and later ones'

        # Mail works in the migrated schema, beside the conversations.
        await store.mail.put_participant(Participant(name="ana", kind="person"))
        first, created = await store.mail.post(
            MailMessage(
                msg_id="",
                sender="ana",
                to=["bob"],
                recipients=["bob"],
                content="hi",
                created_at=T0,
            ),
            [Delivery(name="bob")],
            new_participants=[Participant(name="bob")],
        )
        assert (first.msg_id, created) == ("m000000000001", True)
        reply, _ = await store.mail.post(
            MailMessage(
                msg_id="",
                sender="bob",
                to=["ana"],
                recipients=["ana"],
                content="hello",
                created_at=T0 + timedelta(seconds=1),
                thread_id=first.msg_id,
                reply_to=first.msg_id,
            ),
            [Delivery(name="ana")],
            parent=ParentChange(msg_id=first.msg_id, start_thread=True, read_by="bob"),
        )
        assert [p.name for p in await store.mail.participants()] == ["ana", "bob"]
        assert [m.msg_id for m in await store.mail.thread(first.msg_id)] == [
            first.msg_id,
            reply.msg_id,
        ]
        [(message, delivery)] = await store.mail.inbox("bob", InboxQuery(), limit=50)
        assert (message.msg_id, delivery.state) == (first.msg_id, "read")
        assert await store.mail.unread_totals() == {"ana": 1}
        assert await everything(store) == before

    async with open_store(store_url) as again:  # already migrated: opens as it is
        assert await again.mail.newest_received("ana") == reply.msg_id
    assert query(store_url, "SELECT version FROM schema_version ORDER BY 1") == [
        (version,) for version in range(1, len(MIGRATIONS) + 1)
    ]


# --- two daemons on one database ----------------------------------------------------------


@on_postgres
async def test_daemons_racing_with_one_key_store_one_message_and_take_one_number(
    daemons: Callable[[], Awaitable[Storage]],
) -> None:
    stores = [await daemons() for _ in range(3)]

    async def attempt(
        store: Storage, n: int, key: str, outcomes: list[tuple[MailMessage, bool]]
    ) -> None:
        given = mail("alice", ["bob"], f"attempt {n}", T0, idempotency_key=key)
        outcomes.append(await store.mail.post(given, [Delivery(name="bob")]))

    for round_ in range(1, 21):
        outcomes: list[tuple[MailMessage, bool]] = []
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(attempt, stores[n % 3], n, f"key-{round_}", outcomes)
        assert sorted(created for _, created in outcomes) == [False] * 5 + [True]
        assert len({msgspec.json.encode(message) for message, _ in outcomes}) == 1
        assert outcomes[0][0].msg_id == msg_id_of(round_)  # the losers took no number
    received = await stores[1].mail.received("bob", after=None, limit=100)
    assert [message.msg_id for message, _ in received] == [msg_id_of(n) for n in range(1, 21)]
    assert await stores[2].mail.unread_counts("bob") == {1: 20}


@on_postgres
async def test_of_daemons_moving_one_delivery_from_pending_at_once_one_moves_it(
    daemons: Callable[[], Awaitable[Storage]],
) -> None:
    """Daemons hosting one agent each try to take another daemon's mail to it: the one
    whose move from `pending` counts answers it, so it is answered once."""
    stores = [await daemons() for _ in range(3)]

    async def take(store: Storage, msg_id: str, moved: list[int]) -> None:
        moved.append(await store.mail.advance([StateChange(msg_id, "agent", "delivered", T0)]))

    for round_ in range(1, 21):
        stored, _ = await stores[0].mail.post(
            mail("alice", ["agent"], f"ask {round_}", T0), [Delivery(name="agent")]
        )
        moved: list[int] = []
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(take, stores[n % 3], stored.msg_id, moved)
        assert sorted(moved) == [0] * 5 + [1], f"round {round_}"


@on_postgres
async def test_a_space_post_waits_for_a_change_of_its_members_in_flight_and_counts_it(
    daemons: Callable[[], Awaitable[Storage]], store_url: str
) -> None:
    """A join on one daemon, written and not yet committed (its lock held, as
    ``set_member`` holds it to its commit), holds up a post to the space on another:
    committed meanwhile, it counts."""
    joining, posting = await daemons(), await daemons()
    await joining.mail.set_member("eng", "ana", T0, member=True)
    conninfo, schema, _ = parse_postgres_url(store_url)
    lock = _lock_key("mail-space", schema or "public", "eng")
    posted: list[MailMessage] = []

    async def post() -> None:
        given = mail("ana", ["#eng"], "to eng", T0, space="eng")
        stored, _ = await posting.mail.post(given, [], from_space=FromSpace())
        posted.append(stored)

    with psycopg.connect(conninfo, options=f"-c search_path={schema}") as join:
        join.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        join.execute(
            "INSERT INTO space_members (space, name, joined_at) VALUES ('eng', 'bo', %s)", (T0,)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post)
            try:
                with trio.fail_after(10):  # another process's wait: seen only in pg_locks
                    while not query(  # noqa: ASYNC110
                        store_url,
                        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                        " AND classid::bigint = %s AND objid::bigint = %s",
                        (lock % 2**64) >> 32,
                        lock % 2**32,
                    ):
                        await trio.sleep(0.01)
                assert posted == [], "the post waits for the join"
            finally:
                join.commit()
    assert [m.recipients for m in posted] == [["bo"]]


@on_postgres
async def test_daemons_writing_at_once_neither_deadlock_nor_miscount(
    daemons: Callable[[], Awaitable[Storage]], store_url: str
) -> None:
    """Fan-outs, replies that mark their parent read, moves and marks, from two stores."""
    names = [f"n{i}" for i in range(5)]
    stores = [await daemons(), await daemons()]
    posted: list[str] = []

    async def writer(store: Storage, seed: int) -> None:
        rnd = random.Random(seed)
        for i in range(60):
            choice = rnd.random()
            if choice < 0.5 or not posted:
                sender = rnd.choice(names)
                to = rnd.sample([n for n in names if n != sender], rnd.randint(1, 4))
                parent = None
                if posted and rnd.random() < 0.5:
                    parent = ParentChange(
                        msg_id=rnd.choice(posted),
                        start_thread=True,
                        read_by=sender,
                        answered=rnd.random() < 0.5,
                    )
                stored, _ = await store.mail.post(
                    mail(sender, to, f"{seed}.{i}", T0 + timedelta(seconds=i), priority=i % 4),
                    [Delivery(name=name) for name in to],
                    parent=parent,
                    new_participants=[Participant(name=n) for n in rnd.sample(names, 3)],
                )
                posted.append(stored.msg_id)
            elif choice < 0.8:
                states: list[DeliveryState] = ["delivered", "read"]
                await store.mail.advance(
                    [
                        StateChange(rnd.choice(posted), rnd.choice(names), rnd.choice(states), T0)
                        for _ in range(rnd.randint(1, 8))
                    ]
                )
            elif choice < 0.9:
                await store.mail.mark_read(rnd.choice(names), T0)
            else:
                await store.mail.mark_read(rnd.choice(names), T0, msg_ids=posted[-5:])

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for seed in range(6):
                nursery.start_soon(writer, stores[seed % 2], seed)

    assert sorted(posted) == [msg_id_of(n) for n in range(1, len(posted) + 1)]
    recount = query(
        store_url,
        "SELECT name, priority, count(*) FROM deliveries WHERE state <> 'read' GROUP BY 1, 2",
    )
    expected: dict[str, dict[int, int]] = {}
    for name, priority, count in recount:
        expected.setdefault(name, {})[priority] = count
    for store in stores:
        assert await store.mail.unread_totals() == {
            name: sum(counts.values()) for name, counts in expected.items()
        }
        for name in names:
            assert await store.mail.unread_counts(name) == expected.get(name, {})
            unread = await store.mail.inbox(name, InboxQuery(unread_only=True), limit=1000)
            assert len(unread) == sum(expected.get(name, {}).values())
    assert [p.name for p in await stores[0].mail.participants()] == names


@on_postgres
async def test_daemons_changing_one_message_and_taking_one_lock_at_once_lose_nothing(
    daemons: Callable[[], Awaitable[Storage]],
) -> None:
    stores = [await daemons() for _ in range(3)]
    posted, _ = await stores[0].mail.post(mail("alice", ["bob"], "ship it", T0), [])
    names = [f"reactor{n:02d}" for n in range(24)]
    until = T0 + timedelta(minutes=5)
    taken: list[str] = []

    async def react_and_lock(n: int) -> None:
        store = stores[n % len(stores)]
        await store.mail.change_message(posted.msg_id, ReactChange(emoji="👍", by=names[n]))
        lock = LockHolder(
            resource="deploy", holder=names[n], mode="exclusive", acquired_at=T0, expires_at=until
        )
        won, holders = await store.mail.take_lock(lock, T0)
        if won:
            taken.append(names[n])
        assert len(holders) == 1  # the winner, whoever asks

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(len(names)):
                nursery.start_soon(react_and_lock, n)

    # Each read-modify-write saw the one before it, on whichever daemon it ran.
    message = await stores[1].mail.get_message(posted.msg_id)
    assert message is not None
    [reaction] = message.reactions
    assert sorted(reaction.by) == names
    assert len(taken) == 1
    assert [h.holder for h in await stores[2].mail.locks(T0, resource="deploy")] == taken
