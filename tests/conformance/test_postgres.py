"""What the postgres backend promises beyond the shared suite.

Several daemons share one database: their claims exclude each other and die
with them, their appends to one conversation interleave without gaps, and
they migrate the schema one at a time. The tests that need the server run on
the ``store_url`` fixture (a fresh schema, dropped after the test; see
conftest.py), pinned to postgres.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from chinwag.protocol import Entry
from chinwag.storage import (
    Archive,
    NewConversation,
    PostgresStorage,
    Storage,
    StorageError,
    open_store,
)
from chinwag.storage._postgres import MIGRATIONS, parse_postgres_url
from deadlines import deadline
from psycopg import sql

SCHEMA_RULE = "schema must be 1 to 63 lowercase letters, digits or _, not starting with a digit"
on_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
AGENT, SENDER = "assistant", "user"


def query(url: str, statement: str | sql.Composable, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement in the store's schema through a connection of its own."""
    conninfo, schema, _ = parse_postgres_url(url)
    options = {} if schema is None else {"options": f"-c search_path={schema}"}
    with psycopg.connect(conninfo, autocommit=True, **options) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
async def stores() -> AsyncIterator[Any]:
    """``await stores(url)`` opens a store that is closed after the test."""
    async with AsyncExitStack() as stack:

        async def open_(url: str) -> Storage:
            return await stack.enter_async_context(open_store(url))

        yield open_


@pytest.fixture
def other_schema_url(store_url: str) -> Iterator[str]:
    """``store_url`` with another schema of the same database, dropped after the test."""
    _, schema, _ = parse_postgres_url(store_url)
    assert schema is not None
    url = store_url.replace(f"schema={schema}", f"schema={schema}_b")
    yield url
    query(url, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(f"{schema}_b")))


# --- URLs (no server needed) ---------------------------------------------------------


def test_our_url_parameters_are_taken_out_and_the_rest_left_to_libpq() -> None:
    conninfo, schema, pool_size = parse_postgres_url(
        "postgres://me:p%40ss@db.example:6543/chats?schema=team_a&sslmode=require"
        "&pool_size=9&options=-c%20statement_timeout%3D5s"
    )
    assert (schema, pool_size) == ("team_a", 9)
    assert psycopg.conninfo.conninfo_to_dict(conninfo) == {
        "user": "me",
        "password": "p@ss",
        "host": "db.example",
        "port": "6543",
        "dbname": "chats",
        "sslmode": "require",
        "options": "-c statement_timeout=5s",
    }
    assert parse_postgres_url("postgresql:///chats")[1:] == (None, 4)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("postgresql://h/db?schema=Upper", f"{SCHEMA_RULE}; got 'Upper'"),
        ("postgresql://h/db?schema=1st", f"{SCHEMA_RULE}; got '1st'"),
        ("postgresql://h/db?schema=", f"{SCHEMA_RULE}; got ''"),
        ("postgresql://h/db?schema=a;drop", f"{SCHEMA_RULE}; got 'a;drop'"),
        (f"postgresql://h/db?schema={'x' * 64}", f"{SCHEMA_RULE}; got 'xxxx"),
        ("postgresql://h/db?schema=a&schema=b", "The postgres URL gives schema twice."),
        ("postgresql://h/db?pool_size=0", "pool_size must be at least 1, got 0."),
        ("postgresql://h/db?pool_size=many", "pool_size must be a whole number, not 'many'."),
        ("postgresql://h/db?bogus=1", "The postgres URL is not one libpq takes: invalid URI"),
        ("postgresql:h/db", "'postgresql:h/db' is not a postgresql://... URL."),
    ],
)
async def test_malformed_postgres_urls_are_value_errors(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        async with open_store(url):
            pass


async def test_an_unreachable_server_is_a_storage_error_that_hides_the_password() -> None:
    with trio.fail_after(15), pytest.raises(StorageError) as caught:
        async with open_store("postgresql://chinwag:s3cret@127.0.0.1:1/nowhere"):
            pass
    message = caught.value.args[0]
    assert "nowhere on 127.0.0.1:1" in message and "s3cret" not in message
    assert "\n" not in message


# --- the schema ------------------------------------------------------------------------


@on_postgres
async def test_either_scheme_opens_a_shared_store_in_the_named_schema(
    store_url: str, stores: Any
) -> None:
    _, schema, _ = parse_postgres_url(store_url)
    for url in (store_url, "postgres" + store_url[store_url.index(":") :]):
        store = await stores(url)
        assert isinstance(store, PostgresStorage)
        assert store.shared is True and PostgresStorage.shared is True
        assert (store.schema, store.pool_size) == (schema, 4)
    tables = query(
        store_url,
        "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1",
        schema,
    )
    assert tables == [
        ("archives",),
        ("conversations",),
        ("daemons",),
        ("deliveries",),
        ("entries",),
        ("locks",),
        ("message_scopes",),
        ("message_versions",),
        ("messages",),
        ("notes",),
        ("participants",),
        ("projects",),
        ("schema_version",),
        ("space_members",),
        ("spaces",),
        ("unread_counts",),
        ("usage",),
        ("webhook_cursors",),
        ("webhook_outbox",),
    ]


@on_postgres
async def test_daemons_starting_at_once_migrate_once(store_url: str, stores: Any) -> None:
    opened: list[Storage] = []

    async def open_one() -> None:
        opened.append(await stores(store_url))

    async with trio.open_nursery() as nursery:  # the schema does not exist yet
        for _ in range(4):
            nursery.start_soon(open_one)
    assert len(opened) == 4
    assert query(store_url, "SELECT version FROM schema_version ORDER BY 1") == [
        (version,) for version in range(1, len(MIGRATIONS) + 1)
    ]
    await opened[0].create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
    assert await opened[3].get_conversation(AGENT, SENDER) is not None


@on_postgres
async def test_a_database_of_an_older_schema_is_upgraded_on_open(store_url: str) -> None:
    """A version 1 schema (archives without speakers, no notes) keeps its data and gains them."""
    _, schema, _ = parse_postgres_url(store_url)
    query(store_url, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    query(
        store_url,
        "CREATE TABLE schema_version (version integer PRIMARY KEY, applied_at timestamptz)",
    )
    for statement in MIGRATIONS[0]:
        query(store_url, statement)
    query(store_url, "INSERT INTO schema_version VALUES (1, now())")
    query(
        store_url,
        "INSERT INTO conversations (agent, sender, created_at, updated_at, last_seq)"
        " VALUES ('a', 's', %s, %s, 1)",
        T0,
        T0,
    )
    query(
        store_url,
        "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, is_error,"
        " created_at) SELECT id, 1, 'message', 'user', 'an old quokka', '', false, %s"
        " FROM conversations",
        T0,
    )

    async with open_store(store_url) as store:
        archive = Archive(
            name="old", first_seq=1, last_seq=1, summary="s", speakers=["x"], created_at=T0
        )
        assert (await store.compact("a", "s", archive)).seq == 2
        assert await store.get_archive("a", "s", "old") == archive
        await store.put_note("a", "new", "a quokka note", updated_at=T0)
        assert sorted(hit.name for hit in await store.search_memory("a", "quokka")) == [
            "new",
            "old",
        ]
    assert query(store_url, "SELECT max(version) FROM schema_version") == [(len(MIGRATIONS),)]


@on_postgres
async def test_a_newer_schema_is_refused_untouched(store_url: str) -> None:
    async with open_store(store_url):
        pass
    query(store_url, "INSERT INTO schema_version VALUES (999, now())")
    with pytest.raises(StorageError, match="schema version 999"):
        async with open_store(store_url):
            pass
    assert query(store_url, "SELECT max(version) FROM schema_version") == [(999,)]


@on_postgres
async def test_a_nul_is_kept_exactly_and_the_text_column_stays_searchable(
    store: Storage, store_url: str
) -> None:
    await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
    await store.append(
        AGENT, SENDER, [Entry(seq=0, content="plain"), Entry(seq=0, content="a\x00b")]
    )
    assert [e.content for e in await store.history(AGENT, SENDER)] == ["plain", "a\x00b"]
    rows = query(store_url, "SELECT content, content_bytes FROM entries ORDER BY seq")
    assert rows == [("plain", None), ("a\ufffdb", b"a\x00b")]


# --- several daemons on one database ---------------------------------------------------


@on_postgres
async def test_schemas_keep_stores_and_their_claims_apart(
    store_url: str, other_schema_url: str, stores: Any
) -> None:
    a, b = await stores(store_url), await stores(other_schema_url)
    await a.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
    assert await b.get_conversation(AGENT, SENDER) is None
    assert await b.list_conversations() == ([], None)
    assert await a.claim(AGENT, SENDER) and await b.claim(AGENT, SENDER)


@on_postgres
async def test_claims_exclude_other_daemons_until_released_or_closed(
    store_url: str, stores: Any
) -> None:
    a, b, c = await stores(store_url), await stores(store_url), await stores(store_url)
    assert await a.claim(AGENT, "x")
    assert not await b.claim(AGENT, "x")
    assert await b.claim(AGENT, "y")
    assert not await a.claim(AGENT, "y")
    await b.release(AGENT, "x")  # not b's to give up: a keeps it
    assert not await c.claim(AGENT, "x")

    await a.release(AGENT, "x")
    assert await b.claim(AGENT, "x")
    assert not await a.claim(AGENT, "x")

    await b.close()  # frees x and y
    assert await a.claim(AGENT, "x") and await c.claim(AGENT, "y")


HOLDER = """
import sys, time, trio
from chinwag.storage import open_store

async def main():
    async with open_store(sys.argv[1]) as store:
        assert await store.claim("assistant", "user")
        print("claimed", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


@on_postgres
async def test_a_killed_daemon_frees_its_claims(
    store_url: str, stores: Any, tmp_path: Path
) -> None:
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER))
    store = await stores(store_url)
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), store_url], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        with deadline(30, "the other process to claim the conversation"):
            assert b"claimed" in await proc.stdout.receive_some()
        assert not await store.claim(AGENT, SENDER)
    finally:
        proc.kill()  # SIGKILL: no release, no close
        await proc.wait()
    for _ in range(200):  # the server notices the dead session within moments
        if await store.claim(AGENT, SENDER):
            break
        await trio.sleep(0.05)
    else:
        pytest.fail("the killed daemon's claim outlived it by 10 s")


@on_postgres
async def test_a_lost_claim_connection_is_replaced_and_its_claims_taken_back(
    store_url: str, stores: Any
) -> None:
    a, b = await stores(store_url), await stores(store_url)
    assert await a.claim(AGENT, "kept") and await a.claim(AGENT, "lost")

    def terminate_claim_connection() -> None:
        assert isinstance(a, PostgresStorage) and a._locks is not None
        pid = a._locks.info.backend_pid
        assert query(store_url, "SELECT pg_terminate_backend(%s, 5000)", pid) == [(True,)]

    await trio.to_thread.run_sync(terminate_claim_connection)
    assert await b.claim(AGENT, "lost")  # the server freed a's claims with its session

    assert await a.claim(AGENT, "new")  # a reconnects, takes back what is still free
    assert not await b.claim(AGENT, "kept")
    assert not await a.claim(AGENT, "lost")  # still a's to release
    await a.release(AGENT, "lost")  # frees nothing of b's
    assert await b.list_conversations() == ([], None)
    async with open_store(store_url) as c:
        assert not await c.claim(AGENT, "lost")
        assert not await c.claim(AGENT, "new")


@on_postgres
async def test_daemons_appending_to_one_conversation_interleave_without_gaps(
    store_url: str, stores: Any
) -> None:
    daemons = [await stores(store_url) for _ in range(3)]
    await daemons[0].create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
    returned: list[list[Entry]] = []

    async def writer(store: Storage, name: str) -> None:
        for n in range(15):
            batch = [Entry(seq=0, content=f"{name}-{n}-{k}") for k in range(1 + n % 3)]
            returned.append(await store.append(AGENT, SENDER, batch))

    async with trio.open_nursery() as nursery:
        for d, store in enumerate(daemons):
            for w in range(3):
                nursery.start_soon(writer, store, f"d{d}w{w}")

    history = await daemons[1].history(AGENT, SENDER)
    assert [entry.seq for entry in history] == list(range(1, len(history) + 1))
    assert len(history) == sum(len(batch) for batch in returned) == 9 * 30
    by_seq = {entry.seq: entry for entry in history}
    for batch in returned:
        assert [e.seq for e in batch] == list(range(batch[0].seq, batch[0].seq + len(batch)))
        assert all(by_seq[e.seq] == e for e in batch)
    for store in daemons:
        item = await store.get_conversation(AGENT, SENDER)
        assert item is not None and item.last_seq == len(history)


@on_postgres
async def test_daemons_creating_conversations_by_appending_at_once_create_each_once(
    store_url: str, stores: Any
) -> None:
    # An INSERT that meets a row another daemon inserted, but committed only after
    # the statement began, leaves that row out of the statement's UPDATE too:
    # the append runs its statement again rather than report it not found.
    daemons = [await stores(store_url) for _ in range(3)]
    senders = [f"s{n}" for n in range(20)]
    returned: dict[str, list[Entry]] = {sender: [] for sender in senders}

    async def writer(store: Storage, name: str) -> None:
        for sender in senders:
            batch = [Entry(seq=0, content=name), Entry(seq=0, content=name)]
            stored = await store.append(AGENT, sender, batch, create=NewConversation(cwd=name))
            returned[sender].extend(stored)

    async with trio.open_nursery() as nursery:
        for d, store in enumerate(daemons):
            for w in range(2):
                nursery.start_soon(writer, store, f"d{d}w{w}")

    for sender in senders:
        history = await daemons[0].history(AGENT, sender)
        assert [entry.seq for entry in history] == list(range(1, 13))
        assert sorted(returned[sender], key=lambda e: e.seq) == history
        item = await daemons[2].get_conversation(AGENT, sender)
        assert item is not None and item.cwd == history[0].content  # the first append's
    assert len(query(store_url, "SELECT id FROM conversations")) == len(senders)


@on_postgres
async def test_close_lets_the_calls_already_made_finish(store: Storage) -> None:
    await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
    outcomes: list[object] = []

    async def append(n: int) -> None:
        try:
            outcomes.append(await store.append(AGENT, SENDER, [Entry(seq=0, content=str(n))]))
        except StorageError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for n in range(20):  # more than the pool has connections: most wait for a thread
            nursery.start_soon(append, n)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(store.close)
    assert len(outcomes) == 20 and all(isinstance(o, list) for o in outcomes)
    with pytest.raises(StorageError, match="closed"):
        await store.append(AGENT, SENDER, [Entry(seq=0, content="late")])
