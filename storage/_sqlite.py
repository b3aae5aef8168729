"""The sqlite backend: one WAL database file, one writer, readers beside it.

**Writes** (``append``, ``compact``, ``create_conversation``, ``set_title``,
``set_cwd``, ``put_note``) all go through one write connection, each in a
transaction of its own or in a savepoint of a group's, so each stays all or
nothing. How they reach it depends on ``synchronous``, for what a commit costs:

- ``normal``: a COMMIT writes the WAL without an fsync (20-30 µs), less than a
  thread hop (50-70 µs), so writes run **inline on the trio loop**, one
  transaction each, with no hop at all. The connection's ``busy_timeout`` is 0,
  so the loop never sleeps on a lock: nothing else should write the file, and
  should something (a person with the sqlite shell) hold its write lock, the
  write waits its turn asynchronously, retrying for up to ``_BUSY_TIMEOUT``
  seconds, and the writes after it queue behind it in order.
- ``full``: a COMMIT fsyncs (150-200 µs), so writes go to **one long-lived
  writer thread**, fed by a queue, that commits in groups: every write queued
  while a commit is in flight goes into the next transaction, each in its own
  savepoint (a failing one rolls back to its savepoint and fails alone), and
  the fsync is paid once per group. The thread hands results back with a
  ``TrioToken.run_sync_soon`` wake-up, cheaper than a ``trio.to_thread`` hop.

Either way a write returns only after the COMMIT that made it durable (under
``full`` against power loss, under ``normal`` against a crash of the process),
and is shielded from cancellation once called. ``close`` waits for the writes
already made.

**Reads** go to ``_READERS`` read-only connections of their own, each used by
one worker thread at a time (``trio.to_thread`` behind a ``CapacityLimiter``),
so a long read blocks neither the loop nor the writer; WAL lets them read
beside it. A read that several statements make (``history``, ``load_context``)
runs in one read transaction, so it sees one snapshot. Each statement of a read
sees every transaction committed before it began, so a read after an
acknowledged write sees that write.

**Checkpoints** run in a thread of their own, on a connection of their own:
the write connection has ``wal_autocheckpoint=0``, so no COMMIT ever pays for
one. The thread runs a PASSIVE checkpoint, which takes no lock a writer needs,
every ``_CHECKPOINT_INTERVAL`` seconds when something was written, sooner when
the writers count ``_CHECKPOINT_PAGES`` pages written since the last, and a
last one on close. Sustained writes can keep a PASSIVE checkpoint from ever
catching up with the WAL, which then never starts over and grows without end;
so when the WAL holds more than ``_WAL_HIGH_WATER`` frames, the thread holds
the writers off (the ``_Gate``) for one more checkpoint, which then backfills
every frame, and the next write starts the WAL over from its beginning.

A compaction is an append of one marker that also stores its archive: it joins
a group like any append, and inside its savepoint checks the archive against
the conversation as committed so far (``check_archive``), inserts the marker,
the archive row and its search document, so it is all or nothing too. An append
with ``create=`` inserts its conversation, already moved past its entries,
when the conversation is missing, in the same transaction (or savepoint).

The writer keeps the ``(id, last_seq)`` of recently used conversations: only
its own writes change them, so a hit spares an append a SELECT. Should anything
else write the file anyway, the stale ``last_seq`` makes the next append fail on
the primary key, which drops it from the cache: the append after reads the truth.

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

**Mail** (migrations 3 and 4): ``self.mail`` keeps participants, messages,
deliveries, spaces, projects and locks in tables of their own
(storage/_sqlite_mail.py), written through ``_write_call`` as every write here
is and read on the read connections. Migration 5 is the webhooks' outbox
(storage/_sqlite_outbox.py).

**Usage** (migration 6). An entry's ``usage`` is in its row (``input_tokens``,
``output_tokens``, NULL when it has none, as in every row from before), and
``usage`` holds the totals: one row per conversation and UTC day (``day`` as
``YYYY-MM-DD`` text, which sorts as the days do). An append (a compaction's
too) upserts the sums ``daily_usage`` gives, ``ON CONFLICT DO UPDATE``, in the
transaction or savepoint of its entries, so a total counts exactly the calls
stored. Nothing else writes the table: compaction leaves it as it is.
``total_tokens`` is one ``SUM`` over it; every read of a conversation's row
(``_CONVERSATION_COLUMNS``) sums that conversation's days in correlated
subqueries on the primary key, a few probes per listed conversation.

**Conversation search** (migration 7). ``title_folded`` and ``sender_folded``
hold the title and sender casefolded by Python, written with them (and filled
for older rows by the migration, through a ``casefold`` SQL function it
registers); ``list_conversations(query=...)`` filters on them with an escaped
``LIKE`` while it walks the listing's index newest first, so a page reads the
rows down to its last match, never the whole table into Python.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlsplit

import msgspec
import structlog
import trio
from chinwag.protocol import (
    ConversationItem,
    Entry,
    MemoryHit,
    TokenUsage,
    ToolCallInfo,
    UsageTotal,
)

from ._base import Archive, NewConversation, check_archive
from ._bus import Bus
from ._claims import LocalClaims
from ._conversation_search import LIKE_ESCAPE, like_pattern
from ._cursor import decode_cursor, encode_cursor
from ._errors import ConversationNotFound, StorageError
from ._mail import MailStore
from ._outbox import Outbox
from ._search import (
    SNIPPET_WORDS,
    archive_text,
    database_search_words,
    fts5_match,
    note_text,
    one_line,
)
from ._sqlite_mail import MAIL_MIGRATION, MAIL_SPACES_MIGRATION, SqliteMail, body_field
from ._sqlite_outbox import OUTBOX_MIGRATION, SqliteOutbox
from ._timestamps import from_text, to_text, utc
from ._usage import daily_usage

Synchronous = Literal["full", "normal"]

_T = TypeVar("_T")
_CURSOR_TAG = "sqlite"
_CACHE_SIZE = 65_536  # (agent, sender) -> (id, last_seq) pairs kept for appends
_READERS = 4  # read connections: a long read leaves others free, and hops overlap
_BUSY_TIMEOUT = 5.0  # seconds a write waits for another connection's write lock
_CHECKPOINT_INTERVAL = 1.0  # seconds between checkpoints, while anything is written
_CHECKPOINT_PAGES = 1000  # pages written that call for a checkpoint before the interval ends
_WAL_HIGH_WATER = 4000  # WAL frames past which a checkpoint holds the writers off to catch up
_PAGES_PER_WRITE = 4  # pages a small write dirties: a row and its indexes
_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file is cut back to when it starts over

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
    MAIL_MIGRATION,  # participants, messages, deliveries: storage/_sqlite_mail.py
    MAIL_SPACES_MIGRATION,  # spaces, projects, versions, locks, search: storage/_sqlite_mail.py
    OUTBOX_MIGRATION,  # webhook cursors and deliveries: storage/_sqlite_outbox.py
    (
        # Every entry stored before has no usage: NULL, as one without it has from now on.
        "ALTER TABLE entries ADD COLUMN input_tokens INTEGER",
        "ALTER TABLE entries ADD COLUMN output_tokens INTEGER",
        """
        CREATE TABLE usage (
            conversation_id INTEGER NOT NULL REFERENCES conversations (id),
            day TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            calls INTEGER NOT NULL,
            PRIMARY KEY (conversation_id, day)
        ) WITHOUT ROWID
        """,
    ),
    (
        # list_conversations(query=...) matches these (storage/_conversation_search.py);
        # casefold is Python's, registered by _migrate for the rows stored before.
        "ALTER TABLE conversations ADD COLUMN title_folded TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE conversations ADD COLUMN sender_folded TEXT NOT NULL DEFAULT ''",
        "UPDATE conversations SET title_folded = casefold(title), sender_folded = casefold(sender)",
    ),
)

# The conversation's row, then its usage totals summed over its days: each sum a
# correlated subquery that reads the conversation's totals by usage's primary key.
_CONVERSATION_COLUMNS = (
    "agent, sender, title, cwd, created_at, updated_at, last_seq, id,"
    " (SELECT coalesce(sum(u.input_tokens), 0) FROM usage u"
    " WHERE u.conversation_id = conversations.id),"
    " (SELECT coalesce(sum(u.output_tokens), 0) FROM usage u"
    " WHERE u.conversation_id = conversations.id)"
)
_ENTRY_COLUMNS = (
    "seq, kind, role, content, agent, tool_calls, tool_call_id, is_error, run_id,"
    " created_at, archive, input_tokens, output_tokens"
)
_INSERT_ENTRY = (
    "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, tool_calls,"
    " tool_call_id, is_error, run_id, created_at, archive, input_tokens, output_tokens)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD_USAGE = (
    "INSERT INTO usage (conversation_id, day, input_tokens, output_tokens, calls)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (conversation_id, day) DO UPDATE SET"
    " input_tokens = input_tokens + excluded.input_tokens,"
    " output_tokens = output_tokens + excluded.output_tokens,"
    " calls = calls + excluded.calls"
)
# The conditions of the filters given only: sqlite plans ``:agent IS NULL OR ...`` as a
# scan of every total, where ``c.sender = :sender`` finds the conversation by its index.
_USAGE_FILTERS = {
    "agent": "c.agent = :agent",
    "sender": "c.sender = :sender",
    "since": "u.day >= :since",
}


def _usage_query(params: dict[str, str | None]) -> str:
    """The statement that reads the totals matching ``params``' filters that are not None."""
    where = " AND ".join(
        _USAGE_FILTERS[name] for name, value in params.items() if value is not None
    )
    return f"""
SELECT c.agent, c.sender, u.day, u.input_tokens, u.output_tokens, u.calls
FROM conversations c JOIN usage u ON u.conversation_id = c.id
WHERE {where or "true"}
ORDER BY u.day, c.agent, c.sender
"""


_TOTAL_TOKENS = "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) FROM usage"

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
_RowTail = tuple[
    str,
    str,
    str,
    str,
    str | None,
    str | None,
    int,
    str | None,
    str,
    str | None,
    int | None,
    int | None,
]
# What an append adds to its conversation's usage: (day, input, output, calls) per day.
_UsageRow = tuple[str, int, int, int]
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


class _Busy(Exception):
    """Another connection holds the write lock; nothing of the write was done."""


class _Write:
    """One caller's write, waiting for the transaction that commits it.

    ``apply`` runs it on the write connection inside that transaction (and,
    in a group, inside a savepoint of its own); ``finish`` runs once the
    transaction committed. Either may run in the writer thread.
    """

    __slots__ = ("error", "key", "result", "waiter", "what")

    def __init__(self, what: str, key: tuple[str, str] | None) -> None:
        self.what = what  # "Appending to (a, s)": what a failure message starts with
        self.key = key  # the conversation it writes, if any
        self.result: Any = None
        self.error: StorageError | None = None
        # The task waiting for the writer thread, rescheduled once the thread is done with it.
        self.waiter: trio.lowlevel.Task | None = None

    def apply(self, store: SqliteStorage, staged: _Staged) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """The transaction committed: make ``result`` what the caller gets."""

    @property
    def pages(self) -> int:
        """About how many pages the write dirties, for the checkpoint thread."""
        return _PAGES_PER_WRITE


# The (id, last_seq) of the conversations a transaction wrote, as its COMMIT will leave them.
_Staged = dict[tuple[str, str], tuple[int, int]]


class _Append(_Write):
    """An append, a compaction (an append of its marker, with ``archive``), or both."""

    __slots__ = ("archive", "base", "create", "entries", "rows", "updated_at", "usage")

    def __init__(
        self,
        agent: str,
        sender: str,
        entries: list[Entry],
        rows: list[_RowTail],
        usage: list[_UsageRow],
        create: NewConversation | None,
    ) -> None:
        super().__init__(f"Appending to ({agent}, {sender})", (agent, sender))
        self.entries = entries  # the caller's, created_at stamped; seqs set by finish
        self.rows = rows
        self.usage = usage
        self.updated_at = rows[-1][8]  # the newest entry's created_at, as text
        self.create = create
        # A compaction's archive, stored with its marker (the one entry), and its row.
        self.archive: tuple[Archive, _ArchiveRow] | None = None
        self.base = 0  # the last seq before the entries

    def apply(self, store: SqliteStorage, staged: _Staged) -> None:
        conn = store._conn
        assert self.key is not None
        state = staged.get(self.key) or store._cache.get(self.key)
        count = len(self.rows)
        if state is None and self.create is not None:
            # Created already past its entries, so no UPDATE follows.
            row = conn.execute(
                "INSERT INTO conversations"
                " (agent, sender, sender_folded, cwd, created_at, updated_at, last_seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sender, agent) DO NOTHING"
                " RETURNING id",
                (
                    *self.key,
                    self.key[1].casefold(),
                    self.create.cwd,
                    self.rows[0][8],
                    self.updated_at,
                    count,
                ),
            ).fetchone()
            if row is not None:
                conn.executemany(
                    _INSERT_ENTRY, [(row[0], seq, *tail) for seq, tail in enumerate(self.rows, 1)]
                )
                conn.executemany(_ADD_USAGE, [(row[0], *day) for day in self.usage])
                staged[self.key] = (row[0], count)
                self.base = 0
                return
        conv_id, last_seq = state if state is not None else store._select(*self.key)
        if self.archive is not None:
            store._store_archive(conv_id, last_seq, self.key[0], *self.archive)
        conn.executemany(
            _INSERT_ENTRY,
            [(conv_id, seq, *tail) for seq, tail in enumerate(self.rows, last_seq + 1)],
        )
        conn.executemany(_ADD_USAGE, [(conv_id, *day) for day in self.usage])
        conn.execute(
            "UPDATE conversations SET last_seq = ?, updated_at = ? WHERE id = ?",
            (last_seq + count, self.updated_at, conv_id),
        )
        staged[self.key] = (conv_id, last_seq + count)
        self.base = last_seq

    def finish(self) -> None:
        for seq, entry in enumerate(self.entries, self.base + 1):
            entry.seq = seq
        self.result = self.entries

    @property
    def pages(self) -> int:
        return _PAGES_PER_WRITE + len(self.rows) // 4


class _Create(_Write):
    """``create_conversation``: insert it unless it exists; the result is it, either way."""

    __slots__ = ("created_at", "cwd")

    def __init__(self, agent: str, sender: str, cwd: str | None, created_at: str) -> None:
        super().__init__(f"Creating the conversation ({agent}, {sender})", (agent, sender))
        self.cwd = cwd
        self.created_at = created_at

    def apply(self, store: SqliteStorage, staged: _Staged) -> None:
        assert self.key is not None
        conn = store._conn
        conn.execute(
            "INSERT INTO conversations (agent, sender, sender_folded, cwd, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sender, agent) DO NOTHING",
            (*self.key, self.key[1].casefold(), self.cwd, self.created_at, self.created_at),
        )
        row = conn.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE agent = ? AND sender = ?",
            self.key,
        ).fetchone()
        staged[self.key] = (row[7], row[6])
        self.result = _conversation(row)


class _Update(_Write):
    """``set_title`` (with ``title_folded``) or ``set_cwd``: ``values`` by column."""

    __slots__ = ("values",)

    def __init__(self, agent: str, sender: str, values: dict[str, str | None]) -> None:
        column = next(iter(values))
        super().__init__(f"Setting the {column} of ({agent}, {sender})", (agent, sender))
        self.values = values

    def apply(self, store: SqliteStorage, staged: _Staged) -> None:
        assert self.key is not None
        columns = ", ".join(f"{column} = ?" for column in self.values)
        cursor = store._conn.execute(
            f"UPDATE conversations SET {columns} WHERE agent = ? AND sender = ?",
            (*self.values.values(), *self.key),
        )
        if cursor.rowcount == 0:
            raise ConversationNotFound(f"No conversation is stored for {_pair(self.key)}.")


class _PutNote(_Write):
    """``put_note``: the note's row and its search document."""

    __slots__ = ("agent", "content", "name", "updated_at")

    def __init__(self, agent: str, name: str, content: str, updated_at: str) -> None:
        super().__init__(f"Writing the note {name!r} of {agent}", None)
        self.agent = agent
        self.name = name
        self.content = content
        self.updated_at = updated_at

    def apply(self, store: SqliteStorage, staged: _Staged) -> None:
        conn = store._conn
        (id_,) = conn.execute(
            "INSERT INTO notes (agent, name, content, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (agent, name)"
            " DO UPDATE SET content = excluded.content, updated_at = excluded.updated_at"
            " RETURNING id",
            (self.agent, self.name, self.content, self.updated_at),
        ).fetchone()
        conn.execute("DELETE FROM memory WHERE rowid = ?", (-id_,))
        conn.execute(
            "INSERT INTO memory (rowid, text, agent) VALUES (?, ?, ?)",
            (-id_, note_text(self.name, self.content), self.agent),
        )


class _Call(_Write):
    """A write that is a function of the write connection: the mail's (``_write_call``)."""

    __slots__ = ("fn",)

    def __init__(self, what: str, fn: Callable[[sqlite3.Connection], Any]) -> None:
        super().__init__(what, None)
        self.fn = fn

    def apply(self, store: SqliteStorage, staged: _Staged) -> None:
        self.result = self.fn(store._conn)


class _Gate:
    """Lets the checkpoint thread hold the writers off for one checkpoint.

    A writer passes it around each transaction: the loop only ever tries
    (``try_enter``, never waiting), the writer thread waits (``enter``). The
    checkpoint thread asks for it (``holding``), which turns new writers away
    at once, and has it when the transaction under way ends. Nothing depends
    on it for correctness (a PASSIVE checkpoint is safe beside a writer), only
    for the checkpoint to catch up: so the writers' side takes no lock, and a
    writer slipping past a request at the very moment it is made does no harm.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._writing = False
        self._wanted = False  # by the checkpoint thread, from asking until done

    def try_enter(self) -> bool:
        if self._wanted:
            return False
        self._writing = True
        return True

    def enter(self) -> None:
        if self._wanted:
            with self._changed:
                self._changed.wait_for(lambda: not self._wanted)
        self._writing = True

    def leave(self) -> None:
        self._writing = False
        if self._wanted:
            with self._changed:
                self._changed.notify_all()

    @contextmanager
    def holding(self) -> Iterator[None]:
        with self._changed:
            self._wanted = True
            self._changed.wait_for(lambda: not self._writing, timeout=_BUSY_TIMEOUT)
        try:
            yield
        finally:
            with self._changed:
                self._wanted = False
                self._changed.notify_all()


class _Writer:
    """The thread that commits the writes of a ``synchronous=full`` store, a group at a time."""

    def __init__(self, store: SqliteStorage, token: trio.lowlevel.TrioToken) -> None:
        self._store = store
        self._token = token
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        # A daemon thread: a store never closed must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name="chinwag-sqlite-writer", daemon=True)
        self._thread.start()

    def put(self, write: _Write) -> None:
        self._queue.put(write)

    def stop(self) -> None:
        """Let the writes queued so far be written, then end. Call ``join`` to wait for it."""
        self._queue.put(None)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        store = self._store
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            while True:  # everything queued while the last group committed
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                group.append(more)
            try:
                store._gate.enter()
                try:
                    store._commit(group)
                finally:
                    store._gate.leave()
            except _Busy as exc:  # busy_timeout ran out
                _fail(group, exc.__cause__ or exc)
            except BaseException as exc:  # a bug: its callers must hear of it all the same
                _fail(group, exc)
            with contextlib.suppress(trio.RunFinishedError):  # nobody is waiting any more
                self._token.run_sync_soon(_wake, group)


def _refuse_abort(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _wake(group: list[_Write]) -> None:
    """On the trio loop: tell the callers of ``group`` that it was written."""
    for write in group:
        assert write.waiter is not None
        trio.lowlevel.reschedule(write.waiter)


def _fail(group: list[_Write], exc: BaseException) -> None:
    """Every write of ``group`` failed with ``exc``, none of it stored."""
    for write in group:
        write.result = None
        write.error = StorageError(f"{write.what} failed: {exc}.")
        write.error.__cause__ = exc


class _Checkpointer:
    """The thread that checkpoints the WAL into the database; see the module's docstring."""

    def __init__(self, conn: sqlite3.Connection, store: SqliteStorage) -> None:
        self._conn = conn
        self._store = store
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name="chinwag-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def nudge(self) -> None:
        """Many pages were written: checkpoint now rather than at the next interval."""
        self._wake.set()

    def stop(self) -> None:
        """Checkpoint one last time, close the connection and end; blocks until it has."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        checkpointed = 0  # the store's page count at the last checkpoint
        try:
            while not self._stopping:
                self._wake.wait(_CHECKPOINT_INTERVAL)
                self._wake.clear()
                written = self._store._pages
                if written != checkpointed and not self._stopping:
                    checkpointed = written
                    self._checkpoint()
            self._checkpoint(final=True)
        finally:
            self._conn.close()

    def _checkpoint(self, *, final: bool = False) -> None:
        try:
            _, frames, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames > _WAL_HIGH_WATER and not final:
                with self._store._gate.holding():
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # the next one tries again; the WAL keeps everything
            structlog.get_logger("chinwag.storage").warning(
                "checkpoint_failed", database=str(self._store.path), error=str(exc)
            )


class SqliteStorage:
    """A ``Storage`` in one sqlite database file; make one with ``await SqliteStorage.open``."""

    shared = False
    bus: Bus | None = None  # alone on its store: no other daemon to hear

    def __init__(
        self,
        conn: sqlite3.Connection,
        readers: list[sqlite3.Connection],
        checkpoints: sqlite3.Connection,
        path: Path,
        synchronous: Synchronous,
    ) -> None:
        """Wrap open, configured connections and start the store's threads; use ``open``.

        Runs in trio: the writer thread wakes this trio run's tasks.
        """
        self.path = path
        self.synchronous = synchronous
        self._conn = conn  # writes only: inline on the loop (normal) or the writer thread (full)
        self._readers = readers  # the ones free; a worker thread takes one, then puts it back
        self._read_limiter = trio.CapacityLimiter(len(readers))
        # Read side: (agent, sender) -> id, which never changes.
        self._ids: dict[tuple[str, str], int] = {}
        # Write side, touched only by whoever writes (loop or writer thread): the
        # committed (id, last_seq) of recently used conversations.
        self._cache: dict[tuple[str, str], tuple[int, int]] = {}
        self._gate = _Gate()
        self._pages = 0  # about how many pages were written, for the checkpoint thread
        self._pages_nudged = 0
        self._later = trio.Lock()  # normal: writes that could not go inline, in arrival order
        self._waiting = 0  # normal: writes waiting for _later or in it
        self._claims = LocalClaims()
        self._closed = False
        self._checkpointer = _Checkpointer(checkpoints, self)
        self._writer: _Writer | None = None
        if synchronous == "full":
            self._writer = _Writer(self, trio.lowlevel.current_trio_token())
        self.mail: MailStore = SqliteMail(self._write_call, self._read)
        self.outbox: Outbox = SqliteOutbox(self._write_call, self._read)

    @classmethod
    async def open(cls, path: Path | str, *, synchronous: Synchronous = "full") -> SqliteStorage:
        """Open (creating the file and its directory if missing) and migrate the database.

        Starts the store's threads: ``close`` it to end them.
        """
        path = Path(path)
        conn, readers, checkpoints = await trio.to_thread.run_sync(_connect, path, synchronous)
        return cls(conn, readers, checkpoints, path, synchronous)

    # --- writing --------------------------------------------------------------

    async def _write(self, write: _Write) -> Any:
        """Commit ``write`` and return its result; raises its error. Shielded: it completes."""
        if self._closed:
            raise StorageError("The store is closed.")
        if self._writer is not None:
            write.waiter = trio.lowlevel.current_task()
            self._writer.put(write)
            # Uncancellable, and cheaper than a shielded scope around an Event: a
            # cancellation waits until the thread is done, then lands at the next
            # checkpoint.
            await trio.lowlevel.wait_task_rescheduled(_refuse_abort)
        else:
            with trio.CancelScope(shield=True):
                if self._waiting or not self._inline_now(write):
                    await self._write_later(write)  # behind the writes already waiting
                else:
                    await trio.lowlevel.cancel_shielded_checkpoint()
        if write.error is not None:
            raise write.error
        return write.result

    async def _write_call(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(write connection)`` committed as a write of its own; see ``_write``."""
        result: _T = await self._write(_Call(what, fn))
        return result

    def _inline_now(self, write: _Write) -> bool:
        """Commit ``write`` on the loop, now; False, having done nothing, if it cannot."""
        try:
            return self._try_inline(write)
        except _Busy:
            return False

    def _try_inline(self, write: _Write) -> bool:
        """Commit ``write`` on the loop, now; False, having done nothing, if the gate is held.

        Raises ``_Busy`` when another connection holds the write lock.
        """
        if not self._gate.try_enter():
            return False
        try:
            self._commit([write])
        finally:
            self._gate.leave()
        return True

    async def _write_later(self, write: _Write) -> None:
        """Commit ``write`` on the loop once the gate and the write lock are free, in turn."""
        self._waiting += 1
        try:
            async with self._later:
                delay, deadline = 0.0005, trio.current_time() + _BUSY_TIMEOUT
                while True:
                    try:
                        if self._try_inline(write):
                            return
                    except _Busy as exc:
                        if trio.current_time() >= deadline:
                            _fail([write], exc.__cause__ or exc)
                            return
                    await trio.sleep(delay)
                    delay = min(2 * delay, 0.05)
        finally:
            self._waiting -= 1

    def _commit(self, group: list[_Write]) -> None:
        """Write ``group`` in one transaction, each write in a savepoint when there are several.

        Sets each write's ``result`` or ``error``; no sqlite error escapes, but
        ``_Busy`` when the transaction could not begin (then nothing was done).
        Runs wherever writes run: the loop (normal) or the writer thread (full).
        """
        conn = self._conn
        alone = len(group) == 1
        staged: _Staged = {}  # what COMMIT will make true
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                raise _Busy from exc
            _fail(group, exc)
            return
        try:
            try:
                for write in group:
                    if not alone:
                        conn.execute("SAVEPOINT write")
                    try:
                        write.apply(self, staged)
                    except StorageError as exc:  # not found, or an archive check_archive refused
                        write.error = exc
                    except Exception as exc:  # a lone surrogate, a constraint, a full disk
                        if write.key is not None:
                            self._cache.pop(write.key, None)
                        _fail([write], exc)
                    if not alone:
                        if write.error is not None:
                            conn.execute("ROLLBACK TO write")
                        conn.execute("RELEASE write")
                if alone and group[0].error is not None:
                    conn.execute("ROLLBACK")
                    return
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
            _fail(group, exc)
            return
        for key, state in staged.items():
            self._remember(key, state)
        pages = self._pages
        for write in group:
            if write.error is None:
                write.finish()
                pages += write.pages
        self._pages = pages
        if pages - self._pages_nudged >= _CHECKPOINT_PAGES:
            self._pages_nudged = pages
            self._checkpointer.nudge()

    def _select(self, agent: str, sender: str) -> tuple[int, int]:
        """(id, last_seq) of the conversation, read on the write connection.

        Raises ``ConversationNotFound``.
        """
        row = self._conn.execute(
            "SELECT id, last_seq FROM conversations WHERE agent = ? AND sender = ?", (agent, sender)
        ).fetchone()
        if row is None:
            raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
        return row[0], row[1]

    def _remember(self, key: tuple[str, str], state: tuple[int, int]) -> None:
        if key not in self._cache and len(self._cache) >= _CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # the oldest insertion
        self._cache[key] = state

    # --- reading --------------------------------------------------------------

    async def _read(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(reader, *args)`` in a worker thread; ``what`` failing becomes a StorageError.

        Cancellable only while waiting for a reader: once running, ``fn`` completes.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        try:
            return await trio.to_thread.run_sync(
                self._with_reader, fn, *args, limiter=self._read_limiter
            )
        except sqlite3.Error as exc:
            raise StorageError(f"{what} failed: {exc}.") from exc

    def _with_reader(self, fn: Callable[..., _T], *args: Any) -> _T:
        # The limiter lets no more threads in than there are readers: one is free.
        conn = self._readers.pop()
        try:
            return fn(conn, *args)
        finally:
            self._readers.append(conn)

    def _conversation_id(self, conn: sqlite3.Connection, agent: str, sender: str) -> int:
        """The conversation's id, from the cache or the reader; raises ``ConversationNotFound``."""
        key = (agent, sender)
        id_ = self._ids.get(key)
        if id_ is None:
            row = conn.execute(
                "SELECT id FROM conversations WHERE agent = ? AND sender = ?", key
            ).fetchone()
            if row is None:
                raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
            id_ = row[0]
            if len(self._ids) >= _CACHE_SIZE:
                self._ids.clear()  # ids are one SELECT away; no need to age them one by one
            self._ids[key] = id_
        return id_

    # --- conversations ----------------------------------------------------------

    async def get_conversation(self, agent: str, sender: str) -> ConversationItem | None:
        return await self._read(
            f"Reading the conversation ({agent}, {sender})", _get_conversation, agent, sender
        )

    async def create_conversation(
        self, agent: str, sender: str, *, cwd: str | None, created_at: datetime
    ) -> ConversationItem:
        item: ConversationItem = await self._write(_Create(agent, sender, cwd, to_text(created_at)))
        return item

    async def set_title(self, agent: str, sender: str, title: str) -> None:
        await self._write(
            _Update(agent, sender, {"title": title, "title_folded": title.casefold()})
        )

    async def set_cwd(self, agent: str, sender: str, cwd: str | None) -> None:
        await self._write(_Update(agent, sender, {"cwd": cwd}))

    async def list_conversations(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        query: str | None = None,
    ) -> tuple[list[ConversationItem], str | None]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}.")
        pattern = None if query is None else like_pattern(query)
        position = None if cursor is None else decode_cursor(_CURSOR_TAG, cursor)
        rows = await self._read(
            "Listing conversations",
            _list_conversations,
            agent,
            sender,
            pattern,
            limit + 1,
            position,
        )
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(_CURSOR_TAG, last[5], last[7])
        return [_conversation(row) for row in rows[:limit]], next_cursor

    # --- entries ----------------------------------------------------------------

    async def append(
        self,
        agent: str,
        sender: str,
        entries: Sequence[Entry],
        *,
        create: NewConversation | None = None,
    ) -> list[Entry]:
        """Append atomically and durably; see ``Storage.append``.

        Not cancellable: once called, the append completes or fails, and a
        cancellation lands at the caller's next checkpoint.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        if entries:
            stored: list[Entry] = await self._write(_prepare(agent, sender, entries, create))
            return stored
        if create is not None:
            await self._write(_Create(agent, sender, create.cwd, to_text(datetime.now(UTC))))
        else:
            await self._read(
                f"Reading the conversation ({agent}, {sender})",
                self._conversation_id,
                agent,
                sender,
            )
        return []

    async def load_context(
        self, agent: str, sender: str
    ) -> tuple[ConversationItem, list[Entry]] | None:
        """The metadata and the entries from the latest marker on; see ``Storage.load_context``."""
        return await self._read(
            f"Reading the conversation ({agent}, {sender})", _load_context, agent, sender
        )

    def _store_archive(
        self, conv_id: int, last_seq: int, agent: str, archive: Archive, row: _ArchiveRow
    ) -> None:
        """Check ``archive`` against the conversation, then store it and its search document.

        Inside the transaction of its marker's append, before the marker is inserted.
        """
        conn = self._conn
        used = conn.execute(
            "SELECT name FROM archives WHERE conversation_id = ? AND name = ?",
            (conv_id, archive.name),
        ).fetchall()
        check_archive(
            archive,
            marker_seq=_marker_seq(conn, conv_id),
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
        return await self._read(
            f"Reading the history of ({agent}, {sender})",
            self._history,
            agent,
            sender,
            after_seq,
            -1 if limit is None else limit,
            include_archived,
        )

    def _history(
        self,
        conn: sqlite3.Connection,
        agent: str,
        sender: str,
        after_seq: int,
        limit: int,
        include_archived: bool,
    ) -> list[Entry]:
        conv_id = self._conversation_id(conn, agent, sender)
        with _snapshot(conn):
            marker_seq = 0 if include_archived else _marker_seq(conn, conv_id)
            if marker_seq <= after_seq + 1:  # nothing to hide after after_seq
                rows = conn.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE conversation_id = ? AND seq > ?"
                    " ORDER BY seq LIMIT ?",
                    (conv_id, after_seq, limit),
                ).fetchall()
            else:
                # The earlier markers (through the partial index, without reading what
                # they archived), then everything from the latest marker on.
                rows = conn.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE conversation_id = :id"
                    " AND kind = 'compact' AND seq > :after AND seq < :marker"
                    f" UNION ALL SELECT {_ENTRY_COLUMNS} FROM entries"
                    " WHERE conversation_id = :id AND seq >= :marker"
                    " ORDER BY seq LIMIT :limit",
                    {"id": conv_id, "after": after_seq, "marker": marker_seq, "limit": limit},
                ).fetchall()
        return [_entry(row) for row in rows]

    # --- archives and notes -------------------------------------------------------

    async def compact(
        self, agent: str, sender: str, archive: Archive, *, usage: TokenUsage | None = None
    ) -> Entry:
        """Store the archive and append its marker; see ``Storage.compact``.

        Not cancellable, like ``append``.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        write = _prepare(agent, sender, [archive.marker(usage)], None)
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
            write.updated_at,  # the marker's created_at, which is the archive's
        )
        write.archive = (archive, row)
        stored: list[Entry] = await self._write(write)
        return stored[0]

    async def usage(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        since: date | None = None,
    ) -> list[UsageTotal]:
        """The usage totals by day, agent and sender; see ``Storage.usage``."""
        day = None if since is None else since.isoformat()
        params = {"agent": agent, "sender": sender, "since": day}
        query = _usage_query(params)
        rows = await self._read(
            "Reading the usage totals", lambda conn: conn.execute(query, params).fetchall()
        )
        return [
            UsageTotal(
                agent=row[0],
                sender=row[1],
                day=date.fromisoformat(row[2]),
                input_tokens=row[3],
                output_tokens=row[4],
                calls=row[5],
            )
            for row in rows
        ]

    async def total_tokens(self) -> tuple[int, int]:
        """Every stored call's tokens; see ``Storage.total_tokens``."""
        row = await self._read(
            "Reading the usage totals", lambda conn: conn.execute(_TOTAL_TOKENS).fetchone()
        )
        return row[0], row[1]

    async def get_archive(self, agent: str, sender: str, name: str) -> Archive | None:
        row = await self._read(
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

    def _get_archive(
        self, conn: sqlite3.Connection, agent: str, sender: str, name: str
    ) -> tuple[Any, ...] | None:
        conv_id = self._conversation_id(conn, agent, sender)
        row: tuple[Any, ...] | None = conn.execute(
            f"SELECT {_ARCHIVE_COLUMNS} FROM archives WHERE conversation_id = ? AND name = ?",
            (conv_id, name),
        ).fetchone()
        return row

    async def put_note(self, agent: str, name: str, content: str, *, updated_at: datetime) -> None:
        """Create or replace the note; see ``Storage.put_note``. Shielded: it completes."""
        await self._write(_PutNote(agent, name, content, to_text(updated_at)))

    async def search_memory(
        self, agent: str, query: str, *, limit: int = 10, sender: str | None = None
    ) -> list[MemoryHit]:
        """The agent's notes and archives matching any word of ``query``, best bm25 first."""
        words = await database_search_words(query, limit, closed=self._closed)
        if not words:
            return []
        params = {"match": fts5_match(words), "agent": agent, "sender": sender, "limit": limit}
        rows = await self._read(
            f"Searching the memory of {agent}",
            lambda conn: conn.execute(_SEARCH, params).fetchall(),
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
        """Let the writes and reads already made finish, checkpoint, close. Idempotent; shielded."""
        if self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._closed = True
        self._claims.close()
        with trio.CancelScope(shield=True):
            if self._writer is not None:
                self._writer.stop()
                await trio.to_thread.run_sync(self._writer.join)
            else:
                async with self._later:  # behind every write waiting its turn
                    pass
            # The limiter is fair: taking every token waits behind the reads queued.
            for borrower in [object() for _ in range(int(self._read_limiter.total_tokens))]:
                await self._read_limiter.acquire_on_behalf_of(borrower)
            await trio.to_thread.run_sync(self._checkpointer.stop)
            await trio.to_thread.run_sync(self._close_connections)

    def _close_connections(self) -> None:
        for conn in self._readers:
            conn.close()
        self._conn.close()  # the last: it checkpoints what is left and removes the WAL


def _connect(
    path: Path, synchronous: Synchronous
) -> tuple[sqlite3.Connection, list[sqlite3.Connection], sqlite3.Connection]:
    """Open, configure and migrate the database: (writer, readers, checkpointer). Worker thread."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"Could not create the directory of {path}: {exc}.") from exc
    opened: list[sqlite3.Connection] = []

    def connect() -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, ours are explicit.
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT
        )
        opened.append(conn)
        return conn

    try:
        conn = connect()
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode.lower() != "wal":
            raise StorageError(f"The sqlite database {path} cannot use WAL (it is in {mode}).")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpoint thread does it
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        if synchronous == "normal":
            conn.execute("PRAGMA busy_timeout = 0")  # used on the loop: never sleep there
        readers = [connect() for _ in range(_READERS)]
        for reader in readers:
            reader.execute("PRAGMA query_only = ON")
        checkpoints = connect()
        checkpoints.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except sqlite3.Error as exc:
        for conn in opened:
            conn.close()
        if exc.sqlite_errorcode in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise StorageError(
                f"The sqlite database {path} is damaged ({exc}): restore it from a backup, "
                "or move it aside for the daemon to start a new one."
            ) from exc
        raise StorageError(f"Could not open the sqlite database {path}: {exc}.") from exc
    except BaseException:
        for conn in opened:
            conn.close()
        raise
    return conn, readers, checkpoints


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction, so that the statements inside see one snapshot."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


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
        conn.create_function("mail_body_field", 2, body_field, deterministic=True)
        conn.create_function("casefold", 1, str.casefold, deterministic=True)
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now)
            )


def _prepare(
    agent: str, sender: str, entries: Sequence[Entry], create: NewConversation | None
) -> _Append:
    """The append's write: each entry's ``created_at`` stamped (UTC) in place, and its row.

    Raises (a naive time, tool calls that do not encode) before anything is queued.
    """
    now = datetime.now(UTC)
    rows: list[_RowTail] = []
    for entry in entries:
        created_at = entry.created_at = now if entry.created_at is None else utc(entry.created_at)
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
                None if entry.usage is None else entry.usage.input_tokens,
                None if entry.usage is None else entry.usage.output_tokens,
            )
        )
    usage = [
        (day.isoformat(), total.input_tokens, total.output_tokens, total.calls)
        for day, total in daily_usage(entries).items()
    ]
    return _Append(agent, sender, list(entries), rows, usage, create)


# --- reads, in a worker thread on a reader ----------------------------------------------


def _get_conversation(conn: sqlite3.Connection, agent: str, sender: str) -> ConversationItem | None:
    row = conn.execute(
        f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE agent = ? AND sender = ?",
        (agent, sender),
    ).fetchone()
    return None if row is None else _conversation(row)


def _load_context(
    conn: sqlite3.Connection, agent: str, sender: str
) -> tuple[ConversationItem, list[Entry]] | None:
    with _snapshot(conn):
        row = conn.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE agent = ? AND sender = ?",
            (agent, sender),
        ).fetchone()
        if row is None:
            return None
        entries = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE conversation_id = ? AND seq >= ?"
            " ORDER BY seq",
            (row[7], _marker_seq(conn, row[7])),
        ).fetchall()
    return _conversation(row), [_entry(entry) for entry in entries]


def _list_conversations(
    conn: sqlite3.Connection,
    agent: str | None,
    sender: str | None,
    pattern: str | None,
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
    if pattern is not None:
        # Both sides are casefolded, so LIKE's ASCII case-insensitivity changes nothing.
        where.append("(title_folded LIKE ? ESCAPE ? OR sender_folded LIKE ? ESCAPE ?)")
        params.extend((pattern, LIKE_ESCAPE, pattern, LIKE_ESCAPE))
    if position is not None:
        where.append("(updated_at, id) < (?, ?)")
        params.extend(position)
    sql = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
    params.append(limit)
    return conn.execute(sql, params).fetchall()


def _marker_seq(conn: sqlite3.Connection, conv_id: int) -> int:
    """The seq of the conversation's latest compact marker, 0 when none."""
    (seq,) = conn.execute(
        "SELECT coalesce(max(seq), 0) FROM entries WHERE conversation_id = ? AND kind = 'compact'",
        (conv_id,),
    ).fetchone()
    return int(seq)


def _pair(key: tuple[str, str]) -> str:
    return f"({key[0]}, {key[1]})"


def _conversation(row: tuple[Any, ...]) -> ConversationItem:
    return ConversationItem(
        agent=row[0],
        sender=row[1],
        title=row[2],
        cwd=row[3],
        created_at=from_text(row[4]),
        updated_at=from_text(row[5]),
        last_seq=row[6],
        tokens_in=row[8],
        tokens_out=row[9],
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
        usage=None if row[11] is None else TokenUsage(input_tokens=row[11], output_tokens=row[12]),
    )
