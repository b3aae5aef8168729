"""The conformance suite's fixtures: one ``store`` parametrized over every backend.

A new backend joins the suite by adding one ``Backend`` to ``BACKENDS`` (a
backend that needs a server, like postgres, skips in ``url`` when none is
configured).
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import pytest
import trio
from chinwag.storage import Storage, _jsonl, open_store

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


@asynccontextmanager
async def _sqlite_failing_appends(url: str, content: str, when: FailAt) -> AsyncIterator[None]:
    """Triggers, added through a second connection, that break the marked insert.

    ``insert`` aborts the INSERT itself; ``commit`` lets it through but leaves a
    deferred foreign key violation behind, so the COMMIT after it fails.
    """
    path = url.removeprefix("sqlite:///")

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
        Backend(
            name="jsonl",
            url=lambda tmp: f"jsonl:///{tmp / 'data' / 'jsonl'}",  # absolute: 4 slashes
            durable=True,
            failing_appends=_jsonl_failing_appends,
        ),
    ]
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def store_url(backend: Backend, tmp_path: Path) -> str:
    return backend.url(tmp_path)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Storage]:
    async with open_store(store_url) as opened:
        yield opened


@pytest.fixture
def foreign_store_url(backend: Backend, tmp_path: Path) -> str:
    """The URL of a store of another backend, for what must not cross backends."""
    other = next(b for name, b in sorted(BACKENDS.items()) if name != backend.name)
    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir()
    return other.url(foreign_dir)


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
