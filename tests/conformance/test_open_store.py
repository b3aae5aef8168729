"""``open_store`` URLs, and what the sqlite backend promises about its file.

The behaviour every backend shares is in test_storage.py; these are the parts
a URL or a database file decides.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from chinwag.protocol import Entry
from chinwag.storage import (
    Archive,
    MemoryStorage,
    SqliteStorage,
    StorageError,
    open_store,
)
from chinwag.storage._sqlite import MIGRATIONS
from chinwag.storage._timestamps import to_text

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
    "url",
    [
        "",
        "memory",
        "memory:/tmp/x",
        "sqlite://host/x.db",
        "sqlite:///",
        "sqlite:////",
        "sqlite:///dir/",
        "sqlite:x.db",
        "sqlite:///x.db?synchronous=off",
        "sqlite:///x.db?journal_mode=delete",
    ],
)
async def test_malformed_urls_are_value_errors(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):
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
    with pytest.raises(RuntimeError):
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
    with pytest.raises(StorageError):
        async with open_store(f"sqlite:///{tmp_path}/a-file/x.db"):
            pass


async def test_an_append_after_an_outside_writer_fails_once_then_recovers(
    tmp_path: Path,
) -> None:
    # Nothing but the store should write its file; if something does anyway, the
    # store's cached last_seq is stale: the append must fail, not overwrite, and
    # the next one must read the truth back.
    path = tmp_path / "x.db"
    async with open_store(f"sqlite:///{path}") as store:
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
        with pytest.raises(StorageError):
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


async def test_what_was_acknowledged_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(CRASHING_WRITER))
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), f"sqlite:///{path}"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        acknowledged, pending = 0, b""
        with trio.fail_after(30):
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
