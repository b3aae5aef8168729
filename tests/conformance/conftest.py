"""The conformance suite's fixtures: one ``store`` parametrized over every backend.

A new backend joins the suite by adding one ``Backend`` to ``BACKENDS`` (a
backend that needs a server, like postgres, skips in ``url`` when none is
configured).

Postgres runs on the server ``CHINWAG_TEST_POSTGRES`` names (default
``postgresql://postgres@127.0.0.1:5432/test``), in a database of the test
process's own (tests/worker_database.py: one per xdist worker), each store URL
in a fresh schema (``?schema=chinwag_test_<random>``) dropped after its test,
so runs on one server never see each other's data. An unreachable server skips the postgres
tests, or fails them under ``CI=true``.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import psycopg
import pytest
import trio
import worker_database
from chinwag.storage import Storage, _jsonl, open_store
from chinwag.storage._postgres import parse_postgres_url
from psycopg import sql

FailAt = Literal["insert", "commit"]


@dataclass(frozen=True)
class Backend:
    name: str
    url: Callable[[Path], str]  # the store's URL, given a fresh temporary directory
    durable: bool  # a store opened again on the same URL sees what was stored
    # (url, content, when): while entered, appending an entry with that content
    # fails inside the backend's write, after the entries before it were written
    # ("insert"), or when the write is committed ("commit"); None if it cannot.
    failing_appends: Callable[[str, str, FailAt], AbstractAsyncContextManager[None]] | None = None
    # Removes, after the test, what a store on the URL left outside the temporary
    # directory (a postgres schema).
    drop: Callable[[str], None] | None = None


@asynccontextmanager
async def _sqlite_failing_appends(url: str, content: str, when: FailAt) -> AsyncIterator[None]:
    """Triggers, added through a second connection, that break the marked insert.

    ``insert`` aborts the INSERT itself; ``commit`` lets it through but leaves a
    deferred foreign key violation behind, so the COMMIT after it fails.
    """
    path = url.removeprefix("sqlite:///").partition("?")[0]

    def ddl(*statements: str) -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()

    condition = "NEW.content = '{}'".format(content.replace("'", "''"))
    if when == "insert":
        setup = [
            f"CREATE TRIGGER inject_failure BEFORE INSERT ON entries WHEN {condition}"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        ]
    else:
        setup = [
            "CREATE TABLE inject_parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE inject_child (parent INTEGER"
            " REFERENCES inject_parent (id) DEFERRABLE INITIALLY DEFERRED)",
            f"CREATE TRIGGER inject_failure AFTER INSERT ON entries WHEN {condition}"
            " BEGIN INSERT INTO inject_child VALUES (1); END",
        ]
    await trio.to_thread.run_sync(ddl, *setup)
    try:
        yield
    finally:
        teardown = ["DROP TRIGGER inject_failure"]
        if when == "commit":
            teardown += ["DROP TABLE inject_child", "DROP TABLE inject_parent"]
        await trio.to_thread.run_sync(ddl, *teardown)


@asynccontextmanager
async def _jsonl_failing_appends(url: str, content: str, when: FailAt) -> AsyncIterator[None]:
    """Replaces the jsonl backend's write and sync seams with ones that fail the marked line.

    ``insert`` writes the lines before the marked one, then fails like a full
    disk; ``commit`` writes everything, then fails the fsync that follows, as a
    dying disk does.
    """
    del url  # the seams are the module's: any jsonl store's appends go through them
    marked = b'"content":' + msgspec.json.encode(content) + b","
    real_write, real_sync = _jsonl._write_all, _jsonl._sync
    doomed: set[int] = set()  # fds whose next sync fails

    def write_all(fd: int, data: bytes) -> None:
        at = data.find(marked)
        if at < 0:
            real_write(fd, data)
        elif when == "insert":
            real_write(fd, data[: data.rfind(b"\n", 0, at) + 1])
            raise OSError(errno.ENOSPC, "injected failure")
        else:
            real_write(fd, data)
            doomed.add(fd)

    def sync(fd: int) -> None:
        if fd in doomed:
            doomed.discard(fd)
            raise OSError(errno.EIO, "injected failure")
        real_sync(fd)

    _jsonl._write_all, _jsonl._sync = write_all, sync
    try:
        yield
    finally:
        _jsonl._write_all, _jsonl._sync = real_write, real_sync


def _postgres_url(tmp: Path) -> str:
    problem = worker_database.unreachable()
    if problem is not None:
        reason = f"no PostgreSQL at CHINWAG_TEST_POSTGRES={worker_database.SERVER_URL}: {problem}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    database = worker_database.database_url()
    separator = "&" if "?" in database else "?"
    return f"{database}{separator}schema=chinwag_test_{secrets.token_hex(8)}"


def postgres_connect(url: str) -> psycopg.Connection:
    """An autocommit connection to the database of a postgres store URL, in its schema."""
    conninfo, schema, _ = parse_postgres_url(url)
    options = {} if schema is None else {"options": f"-c search_path={schema}"}
    return psycopg.connect(conninfo, autocommit=True, **options)


def _postgres_drop(url: str) -> None:
    _, schema, _ = parse_postgres_url(url)
    with postgres_connect(url) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@asynccontextmanager
async def _postgres_failing_appends(url: str, content: str, when: FailAt) -> AsyncIterator[None]:
    """A trigger on entries that raises for the marked content.

    ``insert`` raises in the INSERT itself; ``commit`` is a deferred constraint
    trigger, so it raises when the append's transaction commits.
    """

    def ddl(*statements: sql.Composable) -> None:
        with postgres_connect(url) as conn:
            for statement in statements:
                conn.execute(statement)

    if when == "insert":
        trigger = "CREATE TRIGGER inject_failure BEFORE INSERT ON entries"
    else:
        trigger = (
            "CREATE CONSTRAINT TRIGGER inject_failure AFTER INSERT ON entries"
            " DEFERRABLE INITIALLY DEFERRED"
        )
    await trio.to_thread.run_sync(
        ddl,
        sql.SQL(
            "CREATE FUNCTION inject_failure() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.content = TG_ARGV[0] THEN RAISE EXCEPTION 'injected failure'; END IF;"
            " RETURN NEW; END $$"
        ),
        sql.SQL(trigger + " FOR EACH ROW EXECUTE FUNCTION inject_failure({})").format(
            sql.Literal(content)
        ),
    )
    try:
        yield
    finally:
        await trio.to_thread.run_sync(
            ddl,
            sql.SQL("DROP TRIGGER inject_failure ON entries"),
            sql.SQL("DROP FUNCTION inject_failure()"),
        )


BACKENDS = {
    backend.name: backend
    for backend in [
        Backend(name="memory", url=lambda tmp: "memory:", durable=False),
        Backend(
            name="sqlite",
            url=lambda tmp: f"sqlite:///{tmp / 'data' / 'chinwag.db'}",  # absolute: 4 slashes
            durable=True,
            failing_appends=_sqlite_failing_appends,
        ),
        # synchronous=normal writes inline on the trio loop, full in a writer thread:
        # two ways to the file, so the suite runs on both.
        Backend(
            name="sqlite-normal",
            url=lambda tmp: f"sqlite:///{tmp / 'data' / 'chinwag.db'}?synchronous=normal",
            durable=True,
            failing_appends=_sqlite_failing_appends,
        ),
        Backend(
            name="jsonl",
            url=lambda tmp: f"jsonl:///{tmp / 'data' / 'jsonl'}",  # absolute: 4 slashes
            durable=True,
            failing_appends=_jsonl_failing_appends,
        ),
        Backend(
            name="postgres",
            url=_postgres_url,
            durable=True,
            failing_appends=_postgres_failing_appends,
            drop=_postgres_drop,
        ),
    ]
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def store_url(backend: Backend, tmp_path: Path) -> Iterator[str]:
    url = backend.url(tmp_path)
    yield url
    if backend.drop is not None:
        backend.drop(url)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Storage]:
    async with open_store(store_url) as opened:
        yield opened


@pytest.fixture
def foreign_store_url(backend: Backend, tmp_path: Path) -> Iterator[str]:
    """The URL of a store of another backend, for what must not cross backends."""
    other = next(b for name, b in sorted(BACKENDS.items()) if name != backend.name)
    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir()
    url = other.url(foreign_dir)
    yield url
    if other.drop is not None:
        other.drop(url)


Reopen = Callable[[Storage], Awaitable[Storage]]


@pytest.fixture
def durable(backend: Backend) -> None:
    """Skips the test on a backend that keeps nothing once closed."""
    if not backend.durable:
        pytest.skip(f"{backend.name} keeps nothing once closed")


@pytest.fixture
async def reopen(durable: None, store_url: str) -> AsyncIterator[Reopen]:
    """``await reopen(store)`` closes ``store`` and opens a fresh one on the same URL.

    Tests that use it skip on backends that do not outlive their process.
    """
    async with AsyncExitStack() as stack:

        async def reopen_(old: Storage) -> Storage:
            await old.close()
            return await stack.enter_async_context(open_store(store_url))

        yield reopen_


FailingAppends = Callable[..., AbstractAsyncContextManager[None]]


@pytest.fixture
def failing_appends(backend: Backend, store_url: str) -> FailingAppends:
    """``async with failing_appends(content, when="insert"|"commit"):`` such appends fail.

    The failure happens inside the backend's write, after the entries before it
    were written, or at its commit; tests that use it skip on backends with no
    such hook.
    """
    inject = backend.failing_appends
    if inject is None:
        pytest.skip(f"{backend.name} has no way to inject a failure mid-append")

    def failing(content: str, when: FailAt = "insert") -> AbstractAsyncContextManager[None]:
        assert inject is not None
        return inject(store_url, content, when)

    return failing
