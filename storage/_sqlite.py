"""The sqlite backend: one WAL database file, one connection, one worker thread at a time.

Every use of the connection goes through ``trio.to_thread.run_sync`` with a
``CapacityLimiter(1)``, so the trio loop never blocks on the disk and the
connection is never used by two threads at once.

Appends commit in groups: an append that arrives while another group is being
written waits for it, then writes in one transaction every append queued
meanwhile, each inside its own savepoint. An append stays all or nothing (a
failing one rolls back to its savepoint and only it fails), and none returns
before the COMMIT that made it durable; the thread hop and the fsync, which
dominate the cost of an append, are paid once per group instead of once per
append.

A compaction is an append of one marker that also stores its archive: it joins
a group like any append, and inside its savepoint checks the archive against
the conversation as committed so far (``check_archive``), inserts the marker,
the archive row and its search document, so it is all or nothing too.

**Memory search** (migration 2). ``archives`` holds one row per archive
(speakers as a JSON array), ``notes`` one per ``(agent, name)``, and ``memory``
is an FTS5 table with one document per archive (``archive_text``: its summary
and the archived messages) and per note (``note_text``: name and content),
and the agent it belongs to in an unindexed column. It is a standalone FTS5
table, not an external-content one: an archive's text spans many entry rows,
so no one table row could be its content, and ``snippet()`` needs the text at
hand; the text is copied once more, in exchange for a table that every write
keeps in the same transaction as its row (the compaction's savepoint,
``put_note``'s transaction) and that is never out of step. Its rowid is the
archive's id, or minus the note's id. The tokenizer is ``unicode61`` with
``_`` as a word character and diacritics kept, so its words are
``search_words``' words. A search quotes each word as an FTS5 string (no user
text is ever FTS5 syntax), ORs them, ranks by ``bm25`` and cuts the snippet
with ``snippet()``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlsplit

import msgspec
import trio
from chinwag.protocol import ConversationItem, Entry, MemoryHit, ToolCallInfo

from ._base import Archive, ConversationNotFound, StorageError, check_archive
from ._claims import LocalClaims
from ._cursor import decode_cursor, encode_cursor
from ._search import SNIPPET_WORDS, archive_text, database_search_words, note_text, one_line
from ._timestamps import from_text, to_text, utc

Synchronous = Literal["full", "normal"]

_T = TypeVar("_T")
_CURSOR_TAG = "sqlite"
_CACHE_SIZE = 65_536  # (agent, sender) -> (id, last_seq) pairs kept for appends

# Numbered migrations: MIGRATIONS[n - 1] takes the schema from version n - 1 to n.
# Append new ones; never edit one that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
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
        # Listing pages through these, newest first, with no sort. Every append moves
        # its conversation in both, so there is no third one for senders: a sender
        # has few conversations, found through UNIQUE (sender, agent) and sorted.
        "CREATE INDEX conversations_by_updated ON conversations (updated_at DESC, id DESC)",
        """
        CREATE INDEX conversations_by_agent
            ON conversations (agent, updated_at DESC, id DESC)
        """,
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
        # Finds the latest compact marker without reading the history before it.
        """
        CREATE INDEX entries_compact_markers
            ON entries (conversation_id, seq) WHERE kind = 'compact'
        """,
    ),
    (
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
    ),
)

_CONVERSATION_COLUMNS = "agent, sender, title, cwd, created_at, updated_at, last_seq, id"
_ENTRY_COLUMNS = (
    "seq, kind, role, content, agent, tool_calls, tool_call_id, is_error, run_id,"
    " created_at, archive"
)
_INSERT_ENTRY = (
    "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, tool_calls,"
    " tool_call_id, is_error, run_id, created_at, archive)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_ARCHIVE_COLUMNS = "name, first_seq, last_seq, summary, speakers, created_at"
_SEARCH = f"""
SELECT m.rowid, snippet(memory, 0, '[', ']', '…', {SNIPPET_WORDS}),
       a.name, c.sender, a.created_at, n.name, n.updated_at
FROM memory m
LEFT JOIN archives a ON a.id = m.rowid
LEFT JOIN conversations c ON c.id = a.conversation_id
LEFT JOIN notes n ON n.id = -m.rowid
WHERE memory MATCH :match AND m.agent = :agent
    AND (m.rowid < 0 OR :sender IS NULL OR c.sender = :sender)
ORDER BY m.rank, m.rowid
LIMIT :limit
"""

_tool_calls_encoder = msgspec.json.Encoder()
_tool_calls_decoder = msgspec.json.Decoder(list[ToolCallInfo])
_speakers_encoder = msgspec.json.Encoder()
_speakers_decoder = msgspec.json.Decoder(list[str])

# An entry's row without its conversation id and seq, which the write assigns.
_RowTail = tuple[str, str, str, str, str | None, str | None, int, str | None, str, str | None]
# An archive's row from name on: name, first_seq, last_seq, summary, speakers, created_at.
_ArchiveRow = tuple[str, int, int, str, str, str]


def parse_sqlite_url(url: str) -> tuple[Path, Synchronous]:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db``, ``?synchronous=full|normal``."""
    parts = urlsplit(url, allow_fragments=False)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
        raise ValueError(
            f"{url!r} is not a sqlite URL; write sqlite:///relative/path.db or"
            " sqlite:////absolute/path.db."
        )
    path = parts.path[1:]
    if not path or path.endswith("/"):
        raise ValueError(f"The sqlite URL {url!r} names no database file.")
    synchronous: str = "full"
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name != "synchronous":
            raise ValueError(
                f"The sqlite URL {url!r} has the unknown parameter {name!r};"
                " only synchronous=full|normal is supported."
            )
        synchronous = value.lower()
    if synchronous not in get_args(Synchronous):
        raise ValueError(f"synchronous must be full or normal in {url!r}, not {synchronous!r}.")
    return Path(path), synchronous  # type: ignore[return-value]  # checked just above


class _PendingAppend:
    """One caller's append, waiting for the group that writes it."""

    __slots__ = ("agent", "archive", "entries", "error", "result", "rows", "sender", "updated_at")

    def __init__(
        self,
        agent: str,
        sender: str,
        entries: list[Entry],
        rows: list[_RowTail],
        updated_at: str,
    ) -> None:
        self.agent = agent
        self.sender = sender
        self.entries = entries  # stored copies, seq still to assign
        self.rows = rows
        self.updated_at = updated_at
        # A compaction's archive, stored with its marker (the one entry), and its row.
        self.archive: tuple[Archive, _ArchiveRow] | None = None
        self.result: list[Entry] | None = None
        self.error: StorageError | None = None


class SqliteStorage:
    """A ``Storage`` in one sqlite database file; make one with ``await SqliteStorage.open``."""

    shared = False

    def __init__(self, conn: sqlite3.Connection, path: Path, synchronous: Synchronous) -> None:
        """Wrap an open, migrated connection; ``open`` is the way to get one."""
        self.path = path
        self.synchronous = synchronous
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)
        self._write_lock = trio.Lock()
        self._queue: list[_PendingAppend] = []
        # The committed (id, last_seq) of recently used conversations. Only writes of
        # this store change them, so a hit spares the append a SELECT.
        self._cache: dict[tuple[str, str], tuple[int, int]] = {}
        self._claims = LocalClaims()
        self._closed = False

    @classmethod
    async def open(cls, path: Path | str, *, synchronous: Synchronous = "full") -> SqliteStorage:
        """Open (creating the file and its directory if missing) and migrate the database."""
        path = Path(path)
        conn = await trio.to_thread.run_sync(_connect, path, synchronous)
        return cls(conn, path, synchronous)

    # --- plumbing -------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread; ``what`` failing becomes a StorageError.

        Cancellable only while waiting for the thread: once running, ``fn`` completes.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(f"{what} failed: {exc}.") from exc

    def _lookup(self, agent: str, sender: str) -> tuple[int, int]:
        """(id, last_seq) of the conversation, from the cache or the database. Worker thread."""
        key = (agent, sender)
        state = self._cache.get(key)
        if state is None:
            row = self._conn.execute(
                "SELECT id, last_seq FROM conversations WHERE agent = ? AND sender = ?", key
            ).fetchone()
            if row is None:
                raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
            state = self._remember(key, (row[0], row[1]))
        return state

    def _remember(self, key: tuple[str, str], state: tuple[int, int]) -> tuple[int, int]:
        if key not in self._cache and len(self._cache) >= _CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # the oldest insertion
        self._cache[key] = state
        return state

    # --- conversations ----------------------------------------------------------

    async def get_conversation(self, agent: str, sender: str) -> ConversationItem | None:
        return await self._run(
            f"Reading the conversation ({agent}, {sender})", self._get_conversation, agent, sender
        )

    def _get_conversation(self, agent: str, sender: str) -> ConversationItem | None:
        row = self._conn.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE agent = ? AND sender = ?",
            (agent, sender),
        ).fetchone()
        if row is None:
            return None
        self._remember((agent, sender), (row[7], row[6]))
        return _conversation(row)

    async def create_conversation(
        self, agent: str, sender: str, *, cwd: str | None, created_at: datetime
    ) -> ConversationItem:
        return await self._run(
            f"Creating the conversation ({agent}, {sender})",
            self._create_conversation,
            agent,
            sender,
            cwd,
            to_text(created_at),
        )

    def _create_conversation(
        self, agent: str, sender: str, cwd: str | None, created_at: str
    ) -> ConversationItem:
        self._conn.execute(
            "INSERT INTO conversations (agent, sender, cwd, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sender, agent) DO NOTHING",
            (agent, sender, cwd, created_at, created_at),
        )
        item = self._get_conversation(agent, sender)
        assert item is not None  # inserted or already there, and nothing deletes
        return item

    async def set_title(self, agent: str, sender: str, title: str) -> None:
        await self._run(
            f"Setting the title of ({agent}, {sender})", self._update, agent, sender, "title", title
        )

    async def set_cwd(self, agent: str, sender: str, cwd: str | None) -> None:
        await self._run(
            f"Setting the cwd of ({agent}, {sender})", self._update, agent, sender, "cwd", cwd
        )

    def _update(self, agent: str, sender: str, column: str, value: str | None) -> None:
        cursor = self._conn.execute(
            f"UPDATE conversations SET {column} = ? WHERE agent = ? AND sender = ?",
            (value, agent, sender),
        )
        if cursor.rowcount == 0:
            raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")

    async def list_conversations(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[ConversationItem], str | None]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}.")
        position = None if cursor is None else decode_cursor(_CURSOR_TAG, cursor)
        rows = await self._run(
            "Listing conversations", self._list_conversations, agent, sender, limit + 1, position
        )
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(_CURSOR_TAG, last[5], last[7])
        return [_conversation(row) for row in rows[:limit]], next_cursor

    def _list_conversations(
        self,
        agent: str | None,
        sender: str | None,
        limit: int,
        position: tuple[str, int] | None,
    ) -> list[tuple[Any, ...]]:
        where: list[str] = []
        params: list[Any] = []
        if agent is not None:
            where.append("agent = ?")
            params.append(agent)
        if sender is not None:
            where.append("sender = ?")
            params.append(sender)
        if position is not None:
            where.append("(updated_at, id) < (?, ?)")
            params.extend(position)
        sql = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        params.append(limit)
        return self._conn.execute(sql, params).fetchall()

    # --- entries ----------------------------------------------------------------

    async def append(self, agent: str, sender: str, entries: Sequence[Entry]) -> list[Entry]:
        """Append atomically and durably; see ``Storage.append``.

        Not cancellable: once called, the append completes or fails, and a
        cancellation lands at the caller's next checkpoint.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        if not entries:
            await self._run(f"Reading ({agent}, {sender})", self._lookup, agent, sender)
            return []
        return await self._write(_prepare(agent, sender, entries))

    async def _write(self, pending: _PendingAppend) -> list[Entry]:
        """Queue ``pending`` for the next group and wait until it is written. Shielded."""
        with trio.CancelScope(shield=True):
            self._queue.append(pending)
            async with self._write_lock:  # fair: groups go out in arrival order
                if pending.result is None and pending.error is None:
                    group, self._queue = self._queue, []
                    try:
                        await trio.to_thread.run_sync(
                            self._write_group, group, limiter=self._limiter
                        )
                    finally:
                        for other in group:
                            if other.result is None and other.error is None:
                                other.error = StorageError("The append was not written.")
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _write_group(self, group: list[_PendingAppend]) -> None:
        """Write every append of ``group`` in one transaction, each in a savepoint. Worker thread.

        Sets each pending append's ``result`` or ``error``; no sqlite error escapes.
        """
        conn = self._conn
        staged: dict[tuple[str, str], tuple[int, int]] = {}  # what COMMIT will make true
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for pending in group:
                    conn.execute("SAVEPOINT append")
                    try:
                        pending.result = self._write_one(pending, staged)
                    except StorageError as exc:  # not found, or an archive check_archive refused
                        pending.error = exc
                    except Exception as exc:  # a lone surrogate, a constraint, a full disk
                        self._cache.pop((pending.agent, pending.sender), None)
                        pending.error = StorageError(
                            f"Appending to ({pending.agent}, {pending.sender}) failed: {exc}."
                        )
                        pending.error.__cause__ = exc
                    if pending.error is not None:
                        conn.execute("ROLLBACK TO append")
                    conn.execute("RELEASE append")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            # A COMMIT that failed in its fsync may still be seen by the next read:
            # forget what the cache believes and read it back next time.
            for key in staged:
                self._cache.pop(key, None)
            for pending in group:
                pending.result = None
                pending.error = StorageError(
                    f"Appending to ({pending.agent}, {pending.sender}) failed: {exc}."
                )
                pending.error.__cause__ = exc
            return
        for key, state in staged.items():
            self._remember(key, state)

    def _write_one(
        self, pending: _PendingAppend, staged: dict[tuple[str, str], tuple[int, int]]
    ) -> list[Entry]:
        key = (pending.agent, pending.sender)
        state = staged.get(key)
        conv_id, last_seq = state if state is not None else self._lookup(*key)
        if pending.archive is not None:
            self._store_archive(conv_id, last_seq, pending.agent, *pending.archive)
        self._conn.executemany(
            _INSERT_ENTRY,
            [(conv_id, seq, *row) for seq, row in enumerate(pending.rows, last_seq + 1)],
        )
        last_seq += len(pending.rows)
        self._conn.execute(
            "UPDATE conversations SET last_seq = ?, updated_at = ? WHERE id = ?",
            (last_seq, pending.updated_at, conv_id),
        )
        staged[key] = (conv_id, last_seq)
        for seq, entry in enumerate(pending.entries, last_seq - len(pending.entries) + 1):
            entry.seq = seq
        return pending.entries

    def _store_archive(
        self, conv_id: int, last_seq: int, agent: str, archive: Archive, row: _ArchiveRow
    ) -> None:
        """Check ``archive`` against the conversation, then store it and its search document.

        Inside the savepoint of its marker's append, before the marker is inserted.
        """
        conn = self._conn
        used = conn.execute(
            "SELECT name FROM archives WHERE conversation_id = ? AND name = ?",
            (conv_id, archive.name),
        ).fetchall()
        check_archive(
            archive,
            marker_seq=self._marker_seq(conv_id),
            last_seq=last_seq,
            names={name for (name,) in used},
        )
        archived = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE conversation_id = ? AND seq >= ?"
            " ORDER BY seq",
            (conv_id, archive.first_seq),
        ).fetchall()
        cursor = conn.execute(
            f"INSERT INTO archives (conversation_id, {_ARCHIVE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (conv_id, *row),
        )
        conn.execute(
            "INSERT INTO memory (rowid, text, agent) VALUES (?, ?, ?)",
            (cursor.lastrowid, archive_text(archive.summary, map(_entry, archived)), agent),
        )

    def _marker_seq(self, conv_id: int) -> int:
        """The seq of the conversation's latest compact marker, 0 when none. Worker thread."""
        (seq,) = self._conn.execute(
            "SELECT coalesce(max(seq), 0) FROM entries"
            " WHERE conversation_id = ? AND kind = 'compact'",
            (conv_id,),
        ).fetchone()
        return int(seq)

    async def history(
        self,
        agent: str,
        sender: str,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        include_archived: bool = False,
    ) -> list[Entry]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}.")
        rows = await self._run(
            f"Reading the history of ({agent}, {sender})",
            self._history,
            agent,
            sender,
            after_seq,
            -1 if limit is None else limit,
            include_archived,
        )
        return [_entry(row) for row in rows]

    def _history(
        self, agent: str, sender: str, after_seq: int, limit: int, include_archived: bool
    ) -> list[tuple[Any, ...]]:
        conv_id, _ = self._lookup(agent, sender)
        marker_seq = 0 if include_archived else self._marker_seq(conv_id)
        if marker_seq <= after_seq + 1:  # nothing to hide after after_seq
            return self._conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE conversation_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (conv_id, after_seq, limit),
            ).fetchall()
        # The earlier markers (through the partial index, without reading what they
        # archived), then everything from the latest marker on.
        return self._conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE conversation_id = :id"
            " AND kind = 'compact' AND seq > :after AND seq < :marker"
            f" UNION ALL SELECT {_ENTRY_COLUMNS} FROM entries"
            " WHERE conversation_id = :id AND seq >= :marker"
            " ORDER BY seq LIMIT :limit",
            {"id": conv_id, "after": after_seq, "marker": marker_seq, "limit": limit},
        ).fetchall()

    # --- archives and notes -------------------------------------------------------

    async def compact(self, agent: str, sender: str, archive: Archive) -> Entry:
        """Store the archive and append its marker; see ``Storage.compact``.

        Not cancellable, like ``append``.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        pending = _prepare(agent, sender, [archive.marker()])
        try:
            speakers = _speakers_encoder.encode(archive.speakers).decode()
        except (UnicodeEncodeError, TypeError) as exc:
            raise StorageError(f"The archive's speakers could not be encoded: {exc}.") from exc
        row = (
            archive.name,
            archive.first_seq,
            archive.last_seq,
            archive.summary,
            speakers,
            pending.updated_at,  # the marker's created_at, which is the archive's
        )
        pending.archive = (archive, row)
        (marker,) = await self._write(pending)
        return marker

    async def get_archive(self, agent: str, sender: str, name: str) -> Archive | None:
        row = await self._run(
            f"Reading the archive {name!r} of ({agent}, {sender})",
            self._get_archive,
            agent,
            sender,
            name,
        )
        if row is None:
            return None
        return Archive(
            name=row[0],
            first_seq=row[1],
            last_seq=row[2],
            summary=row[3],
            speakers=_speakers_decoder.decode(row[4]),
            created_at=from_text(row[5]),
        )

    def _get_archive(self, agent: str, sender: str, name: str) -> tuple[Any, ...] | None:
        conv_id, _ = self._lookup(agent, sender)
        row: tuple[Any, ...] | None = self._conn.execute(
            f"SELECT {_ARCHIVE_COLUMNS} FROM archives WHERE conversation_id = ? AND name = ?",
            (conv_id, name),
        ).fetchone()
        return row

    async def put_note(self, agent: str, name: str, content: str, *, updated_at: datetime) -> None:
        """Create or replace the note; see ``Storage.put_note``. Shielded: it completes."""
        when = to_text(updated_at)
        with trio.CancelScope(shield=True):
            await self._run(
                f"Writing the note {name!r} of {agent}", self._put_note, agent, name, content, when
            )

    def _put_note(self, agent: str, name: str, content: str, updated_at: str) -> None:
        with _transaction(self._conn) as conn:
            (id_,) = conn.execute(
                "INSERT INTO notes (agent, name, content, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (agent, name)"
                " DO UPDATE SET content = excluded.content, updated_at = excluded.updated_at"
                " RETURNING id",
                (agent, name, content, updated_at),
            ).fetchone()
            conn.execute("DELETE FROM memory WHERE rowid = ?", (-id_,))
            conn.execute(
                "INSERT INTO memory (rowid, text, agent) VALUES (?, ?, ?)",
                (-id_, note_text(name, content), agent),
            )

    async def search_memory(
        self, agent: str, query: str, *, limit: int = 10, sender: str | None = None
    ) -> list[MemoryHit]:
        """The agent's notes and archives matching any word of ``query``, best bm25 first."""
        words = await database_search_words(query, limit, closed=self._closed)
        if not words:
            return []
        # Each word an FTS5 string ("" escapes a quote), so no user text is FTS5 syntax.
        match = " OR ".join('"{}"'.format(word.replace('"', '""')) for word in words)
        rows = await self._run(
            f"Searching the memory of {agent}",
            lambda: self._conn.execute(
                _SEARCH, {"match": match, "agent": agent, "sender": sender, "limit": limit}
            ).fetchall(),
        )
        return [_hit(row) for row in rows]

    # --- claims: one daemon per file, so only this store's own claims refuse ------

    async def claim(self, agent: str, sender: str) -> bool:
        """Take the conversation for this store's runs; see ``Storage.claim``."""
        return await self._claims.claim(agent, sender)

    async def release(self, agent: str, sender: str) -> None:
        """Give up a claim; see ``Storage.release``."""
        await self._claims.release(agent, sender)

    # --- lifetime -----------------------------------------------------------------

    async def close(self) -> None:
        """Let queued appends finish, then close the connection. Idempotent; shielded."""
        if self._closed:
            return
        self._closed = True
        self._claims.close()
        with trio.CancelScope(shield=True):
            async with self._write_lock:  # behind every append already queued
                await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)


def _connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    """Open, configure and migrate the database. Worker thread."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"Could not create the directory of {path}: {exc}.") from exc
    try:
        # isolation_level=None: no implicit transactions, ours are explicit.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    except sqlite3.Error as exc:
        raise StorageError(f"Could not open the sqlite database {path}: {exc}.") from exc
    try:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode.lower() != "wal":
            raise StorageError(f"The sqlite database {path} cannot use WAL (it is in {mode}).")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"Could not prepare the sqlite database {path}: {exc}.") from exc
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE``, then ``COMMIT``, or ``ROLLBACK`` if the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to ``len(MIGRATIONS)``, all in one transaction."""
    with _transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        (current,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        if current > len(MIGRATIONS):
            raise StorageError(
                f"The sqlite database {path} has schema version {current}, newer than this"
                f" chinwag knows ({len(MIGRATIONS)}); upgrade chinwag."
            )
        now = to_text(datetime.now(UTC))
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now)
            )


def _prepare(agent: str, sender: str, entries: Sequence[Entry]) -> _PendingAppend:
    """The stored copies and their rows; raises before anything is queued."""
    now = datetime.now(UTC)
    copies: list[Entry] = []
    rows: list[_RowTail] = []
    for entry in entries:
        created_at = now if entry.created_at is None else utc(entry.created_at)
        copy = msgspec.structs.replace(
            entry,
            created_at=created_at,
            tool_calls=[msgspec.structs.replace(call) for call in entry.tool_calls],
        )
        try:
            tool_calls = (
                _tool_calls_encoder.encode(entry.tool_calls).decode() if entry.tool_calls else None
            )
        except (UnicodeEncodeError, TypeError) as exc:
            raise StorageError(f"The tool calls of an entry could not be encoded: {exc}.") from exc
        rows.append(
            (
                entry.kind,
                entry.role,
                entry.content,
                entry.agent,
                tool_calls,
                entry.tool_call_id,
                int(entry.is_error),
                entry.run_id,
                to_text(created_at),
                entry.archive,
            )
        )
        copies.append(copy)
    return _PendingAppend(agent, sender, copies, rows, rows[-1][8])


def _conversation(row: tuple[Any, ...]) -> ConversationItem:
    return ConversationItem(
        agent=row[0],
        sender=row[1],
        title=row[2],
        cwd=row[3],
        created_at=from_text(row[4]),
        updated_at=from_text(row[5]),
        last_seq=row[6],
    )


def _hit(row: tuple[Any, ...]) -> MemoryHit:
    """A row of ``_SEARCH``: an archive's (rowid > 0) or a note's."""
    snippet = one_line(row[1])
    if row[0] > 0:
        return MemoryHit(
            kind="archive",
            name=row[2],
            sender=row[3],
            snippet=snippet,
            created_at=from_text(row[4]),
        )
    return MemoryHit(
        kind="note", name=row[5], sender=None, snippet=snippet, created_at=from_text(row[6])
    )


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(
        seq=row[0],
        kind=row[1],
        role=row[2],
        content=row[3],
        agent=row[4],
        tool_calls=[] if row[5] is None else _tool_calls_decoder.decode(row[5]),
        tool_call_id=row[6],
        is_error=bool(row[7]),
        run_id=row[8],
        created_at=from_text(row[9]),
        archive=row[10],
    )
