"""``open_store`` URLs, and what the sqlite backend promises about its file.

The behaviour every backend shares is in test_storage.py; these are the parts
a URL or a database file decides.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from chinwag.protocol import Entry
from chinwag.storage import (
    Archive,
    MemoryStorage,
    NewConversation,
    SqliteStorage,
    StorageError,
    _sqlite,
    open_store,
)
from chinwag.storage._sqlite import MIGRATIONS
from chinwag.storage._timestamps import to_text
from deadlines import deadline

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def read_db(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Query the file through a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# --- URLs ----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["mysql://localhost/db", "file:///tmp/x.db", "sqlite3:///x.db"])
async def test_an_unknown_scheme_names_the_supported_ones(url: str) -> None:
    with pytest.raises(ValueError, match=r"memory:.*sqlite:///") as caught:
        async with open_store(url):
            pass
    assert caught.value.args[0].count(".") >= 1  # one sentence, not a traceback


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("", "'' is not a storage URL; use memory:, sqlite:///relative/path.db"),
        ("memory", "'memory' is not a storage URL; use memory:"),
        ("memory:/tmp/x", "The memory store takes no path or options, got 'memory:/tmp/x'"),
        ("sqlite://host/x.db", "'sqlite://host/x.db' is not a sqlite URL; write sqlite:///"),
        ("sqlite:///", "The sqlite URL 'sqlite:///' names no database file"),
        ("sqlite:////", "The sqlite URL 'sqlite:////' names no database file"),
        ("sqlite:///dir/", "The sqlite URL 'sqlite:///dir/' names no database file"),
        ("sqlite:x.db", "'sqlite:x.db' is not a sqlite URL"),
        ("sqlite:///x.db?synchronous=off", "synchronous must be full or normal in .* not 'off'"),
        ("sqlite:///x.db?journal_mode=delete", "has the unknown parameter 'journal_mode'"),
    ],
)
async def test_malformed_urls_are_value_errors(
    url: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=words if ".*" in words else re.escape(words)):
        async with open_store(url):
            pass
    assert await trio.to_thread.run_sync(os.listdir, tmp_path) == []  # nothing created


@pytest.mark.parametrize("url", ["memory:", "memory://"])
async def test_memory_urls(url: str) -> None:
    async with open_store(url) as store:
        assert isinstance(store, MemoryStorage)


async def test_three_slashes_is_a_path_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_store("sqlite:///nested/dir/chinwag.db") as store:
        assert isinstance(store, SqliteStorage)
        await store.create_conversation("a", "s", cwd=None, created_at=T0)
    assert read_db(tmp_path / "nested/dir/chinwag.db", "SELECT agent FROM conversations") == [
        ("a",)
    ]


async def test_four_slashes_is_an_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "chinwag.db"
    async with open_store(f"sqlite:///{path}") as store:  # tmp_path starts with "/"
        assert isinstance(store, SqliteStorage)
        assert store.path == path
        await store.create_conversation("a", "s", cwd=None, created_at=T0)
    assert read_db(path, "SELECT agent, sender FROM conversations") == [("a", "s")]


@pytest.mark.parametrize(
    ("query", "name", "level"), [("", "full", 2), ("?synchronous=normal", "normal", 1)]
)
async def test_synchronous_comes_from_the_url(
    tmp_path: Path, query: str, name: str, level: int
) -> None:
    async with open_store(f"sqlite:///{tmp_path}/x.db{query}") as store:
        assert isinstance(store, SqliteStorage)
        assert store.synchronous == name
        (applied,) = await trio.to_thread.run_sync(
            lambda: store._conn.execute("PRAGMA synchronous").fetchone()
        )
    assert applied == level


async def test_open_store_closes_the_store_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"^boom$"):
        async with open_store(f"sqlite:///{tmp_path}/x.db") as store:
            raise RuntimeError("boom")
    with pytest.raises(StorageError, match="closed"):
        await store.get_conversation("a", "s")


# --- the sqlite file ------------------------------------------------------------


async def test_the_database_is_in_wal_mode_at_the_latest_schema(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}"):
        pass
    async with open_store(f"sqlite:///{path}"):  # opening again migrates nothing twice
        pass
    assert read_db(path, "PRAGMA journal_mode") == [("wal",)]
    assert read_db(path, "SELECT version FROM schema_version") == [
        (version,) for version in range(1, len(MIGRATIONS) + 1)
    ]


async def test_a_database_of_an_older_schema_is_upgraded_on_open(tmp_path: Path) -> None:
    """A version 1 file (before archives and notes) keeps its data and gains memory search."""
    path = tmp_path / "x.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 'then')")
        conn.execute(
            "INSERT INTO conversations (agent, sender, created_at, updated_at, last_seq)"
            " VALUES ('a', 's', ?, ?, 1)",
            (to_text(T0), to_text(T0)),
        )
        conn.execute(
            "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, is_error,"
            " created_at) VALUES (1, 1, 'message', 'user', 'an old quokka', '', 0, ?)",
            (to_text(T0),),
        )
    finally:
        conn.close()

    async with open_store(f"sqlite:///{path}") as store:
        archive = Archive(
            name="old", first_seq=1, last_seq=1, summary="s", speakers=[""], created_at=T0
        )
        assert (await store.compact("a", "s", archive)).seq == 2
        assert [hit.name for hit in await store.search_memory("a", "quokka")] == ["old"]
    assert read_db(path, "SELECT max(version) FROM schema_version") == [(len(MIGRATIONS),)]


async def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}"):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO schema_version VALUES (999, 'from the future')")
    conn.close()
    with pytest.raises(StorageError, match="schema version 999"):
        async with open_store(f"sqlite:///{path}"):
            pass
    assert read_db(path, "SELECT max(version) FROM schema_version") == [(999,)]


async def test_a_path_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match=r"Could not create the directory of .*a-file/x\.db"):
        async with open_store(f"sqlite:///{tmp_path}/a-file/x.db"):
            pass


SYNCHRONOUS = pytest.mark.parametrize("query", ["", "?synchronous=normal"], ids=["full", "normal"])


@SYNCHRONOUS
async def test_an_append_after_an_outside_writer_fails_once_then_recovers(
    tmp_path: Path, query: str
) -> None:
    # Nothing but the store should write its file; if something does anyway, the
    # store's cached last_seq is stale: the append must fail, not overwrite, and
    # the next one must read the truth back.
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}{query}") as store:
        await store.create_conversation("a", "s", cwd=None, created_at=T0)
        await store.append("a", "s", [Entry(seq=0, content="one", created_at=T0)])

        def outside_write() -> None:
            conn = sqlite3.connect(path)
            with conn:
                conn.execute(
                    "INSERT INTO entries (conversation_id, seq, kind, role, content, agent,"
                    " is_error, created_at) VALUES (1, 2, 'message', 'user', 'outside', '',"
                    " 0, '2024-05-01T12:00:00.000000Z')"
                )
                conn.execute("UPDATE conversations SET last_seq = 2")
            conn.close()

        await trio.to_thread.run_sync(outside_write)
        unique = r"Appending to \(a, s\) failed: UNIQUE constraint failed: entries"
        with pytest.raises(StorageError, match=unique):
            await store.append("a", "s", [Entry(seq=0, content="three", created_at=T0)])
        (stored,) = await store.append("a", "s", [Entry(seq=0, content="three", created_at=T0)])
        assert stored.seq == 3
        contents = [entry.content for entry in await store.history("a", "s")]
        assert contents == ["one", "outside", "three"]


CRASHING_WRITER = """
import os, sys, trio
from datetime import UTC, datetime
from chinwag.protocol import Entry
from chinwag.storage import open_store

async def main():
    async with open_store(sys.argv[1]) as store:
        now = datetime.now(UTC)
        await store.create_conversation("a", "s", cwd=None, created_at=now)
        n = 0
        while True:
            n += 1
            user = Entry(seq=0, role="user", content=f"u{n}", created_at=now)
            reply = Entry(seq=0, role="assistant", content=f"a{n}", created_at=now)
            stored = await store.append("a", "s", [user, reply])
            print(stored[-1].seq, flush=True)  # acknowledged

trio.run(main)
"""


@SYNCHRONOUS
async def test_what_was_acknowledged_survives_a_killed_process(tmp_path: Path, query: str) -> None:
    path = tmp_path / "x.db"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(CRASHING_WRITER))
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), f"sqlite:///{path}{query}"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        acknowledged, pending = 0, b""
        with deadline(30, "the writer to acknowledge 200 appends"):
            while acknowledged < 200:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the writer died on its own"
                *lines, pending = (pending + chunk).split(b"\n")
                if lines:
                    acknowledged = int(lines[-1])
    finally:
        proc.kill()  # SIGKILL: no close, no checkpoint, appends in flight
        await proc.wait()

    async with open_store(f"sqlite:///{path}") as store:
        history = await store.history("a", "s")
        item = await store.get_conversation("a", "s")
    seqs = [entry.seq for entry in history]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= acknowledged
    assert len(seqs) % 2 == 0  # no append is ever half there
    assert [entry.content for entry in history[-2:]] == [f"u{len(seqs) // 2}", f"a{len(seqs) // 2}"]
    assert item is not None and item.last_seq == len(seqs)


# --- the hot path: inline writes, the writer thread, readers, checkpoints -----------


def message(content: str) -> Entry:
    return Entry(seq=0, role="user", content=content, created_at=T0)


@contextmanager
def traced(conn: sqlite3.Connection) -> Iterator[list[tuple[str, str]]]:
    """Every statement run on ``conn`` meanwhile, with the name of the thread that ran it."""
    seen: list[tuple[str, str]] = []
    conn.set_trace_callback(lambda sql: seen.append((threading.current_thread().name, sql)))
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)


async def some_writes(store: Any, sender: str) -> None:
    """One write of each kind."""
    await store.append("a", sender, [message("hi"), message("there")], create=NewConversation())
    await store.create_conversation("a", f"{sender}-2", cwd=None, created_at=T0)
    await store.set_title("a", sender, "title")
    await store.set_cwd("a", sender, "/w")
    await store.put_note("a", "note", "content", updated_at=T0)
    archive = Archive(
        name=sender, first_seq=1, last_seq=2, summary="s", speakers=["", ""], created_at=T0
    )
    await store.compact("a", sender, archive)


async def test_under_normal_writes_run_on_the_loop_with_no_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(f"sqlite:///{tmp_path}/x.db?synchronous=normal") as store:
        assert isinstance(store, SqliteStorage)
        hops: list[object] = []
        real = trio.to_thread.run_sync

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            hops.append(fn)
            return await real(fn, *args, **kwargs)

        monkeypatch.setattr(trio.to_thread, "run_sync", counted)
        with traced(store._conn) as seen:
            await some_writes(store, "s")
        monkeypatch.undo()
        assert hops == []
        assert {thread for thread, _ in seen} == {threading.current_thread().name}
        assert [sql for _, sql in seen].count("COMMIT") == 6  # one transaction per write
        assert [e.seq for e in await store.history("a", "s")] == [3]


async def append_creating(store: Any, sender: str, content: str) -> None:
    await store.append("a", sender, [message(content)], create=NewConversation())


async def test_under_full_writes_commit_in_groups_on_one_writer_thread(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/x.db") as store:
        assert isinstance(store, SqliteStorage)
        with traced(store._conn) as seen:
            await some_writes(store, "s")
            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(append_creating, store, f"c{n % 50}", f"m{n}")
        assert {thread for thread, _ in seen} == {"chinwag-sqlite-writer"}
        statements = [sql for _, sql in seen]
        # The 200 appends arrive while the first commit is under way: a few groups.
        assert statements.count("COMMIT") <= 6 + 50
        assert statements.count("SAVEPOINT write") >= 150
        for n in range(50):
            assert [e.seq for e in await store.history("a", f"c{n}")] == [1, 2, 3, 4]


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection, holding the database's write lock until the block ends."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")
        conn.close()


@SYNCHRONOUS
async def test_a_write_waits_out_a_write_lock_with_the_loop_free_and_reads_going_on(
    tmp_path: Path, query: str
) -> None:
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}{query}") as store:
        await store.append("a", "s", [message("before")], create=NewConversation())
        done: dict[int, int] = {}  # writer -> the seq its append got
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.005)
                ticks += 1

        async def writer(n: int) -> None:
            (stored,) = await store.append("a", "s", [message(f"w{n}")])
            done[n] = stored.seq

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            with trio.fail_after(10):
                async with trio.open_nursery() as writers:
                    with write_lock_held(path):
                        for n in range(5):
                            writers.start_soon(writer, n)
                            await trio.sleep(0.01)  # so that they queue in this order
                        await trio.sleep(0.3)
                        assert done == {}  # they wait...
                        assert ticks >= 10  # ...without blocking the loop...
                        history = await store.history("a", "s")  # ...or the readers
                        assert [e.content for e in history] == ["before"]
                        loaded = await store.load_context("a", "s")
                        assert loaded is not None and loaded[0].last_seq == 1
            nursery.cancel_scope.cancel()
        assert done == {n: n + 2 for n in range(5)}  # in the order they were made
        contents = [e.content for e in await store.history("a", "s")]
        assert contents == ["before", "w0", "w1", "w2", "w3", "w4"]


@SYNCHRONOUS
async def test_a_write_lock_held_too_long_fails_the_write(
    tmp_path: Path, query: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite, "_BUSY_TIMEOUT", 0.2)
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}{query}") as store:
        await store.append("a", "s", [message("before")], create=NewConversation())
        with write_lock_held(path):
            with pytest.raises(StorageError, match=r"\(a, s\).*locked"):
                await store.append("a", "s", [message("refused")])
            with pytest.raises(StorageError, match=r"\(a, new\).*locked"):
                await store.append("a", "new", [message("refused")], create=NewConversation())
        (stored,) = await store.append("a", "s", [message("after")])
        assert stored.seq == 2
        assert await store.get_conversation("a", "new") is None


def wal_restarts(wal: Path) -> int:
    """The WAL header's checkpoint sequence number: +1 each time the WAL starts over."""
    with wal.open("rb") as file:
        header = file.read(16)
    return int.from_bytes(header[12:16], "big") if len(header) == 16 else 0


@SYNCHRONOUS
async def test_the_wal_starts_over_and_stays_bounded_under_sustained_writes(
    tmp_path: Path, query: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writes that never pause keep a PASSIVE checkpoint from catching up, and the
    # WAL from starting over: it grows by hundreds of MB a second unless the
    # checkpoint thread holds the writers off now and then. The store's own
    # thresholds are larger; these show the same in less time.
    monkeypatch.setattr(_sqlite, "_WAL_HIGH_WATER", 300)
    monkeypatch.setattr(_sqlite, "_CHECKPOINT_PAGES", 100)
    monkeypatch.setattr(_sqlite, "_CHECKPOINT_INTERVAL", 0.05)
    path = tmp_path / "x.db"
    wal = tmp_path / "x.db-wal"
    async with open_store(f"sqlite:///{path}{query}") as store:
        written = 0
        largest = 0
        restarts: set[int] = set()
        stop = False

        async def writer(k: int) -> None:
            nonlocal written
            while not stop:
                batch = [message("x" * 300) for _ in range(4)]
                await store.append("a", f"s{k}", batch, create=NewConversation())
                written += 1

        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(writer, k)
            with trio.move_on_after(2.0):
                while True:
                    await trio.sleep(0.02)
                    largest = max(largest, wal.stat().st_size)
                    restarts.add(await trio.to_thread.run_sync(wal_restarts, wal))
            stop = True
        assert written > 500  # enough to grow it, unchecked, far past the bound
        assert len(restarts) >= 3, "the WAL never started over"
        assert largest < 32 * 1024 * 1024, f"the WAL grew to {largest} bytes"
    assert not wal.exists() or wal.stat().st_size == 0  # close checkpointed it all
