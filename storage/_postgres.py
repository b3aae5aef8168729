"""The postgres backend: one database shared by any number of daemons on any number of hosts.

**Threads, not asyncio.** psycopg 3's async API runs on asyncio only, and the
daemon is trio (STYLE.md: no asyncio in ``storage/``), so this backend uses the
blocking driver: psycopg_pool's ``ConnectionPool`` of autocommit connections,
every call in ``trio.to_thread.run_sync`` behind a ``CapacityLimiter`` the size
of the pool, so no thread ever waits for a connection and the loop never blocks.
A store holds at most ``pool_size`` (default 4) pooled connections, plus one
for claims.

**Schema.** Created and migrated on open: numbered ``MIGRATIONS`` and a
``schema_version`` table, like the sqlite backend, applied in one transaction
that first takes ``pg_advisory_xact_lock``, so daemons starting at once
migrate one after the other. The ``schema=NAME`` URL parameter puts every
table in that schema (created if missing) through the connections'
``search_path``; without it they go where the server's ``search_path`` says
(usually ``public``).

**Appends** are one statement, hence one transaction, and one round trip: its
UPDATE of the conversation row takes that row's lock (what ``SELECT ... FOR
UPDATE`` would) and moves ``last_seq`` and ``updated_at``; its INSERT numbers
the entries after the old ``last_seq``. Appends to one conversation, from this
daemon or another, queue on the row lock, so seqs stay gapless and unique. An
append that may create its conversation (``create=``) is one statement too: it
first inserts the conversation row, already moved past its entries (``ON
CONFLICT DO NOTHING``), and updates the existing row only when that inserted
nothing. A row another daemon inserted while the statement ran is in neither
(the UPDATE reads the statement's snapshot, taken before that row was
committed): nothing is appended, and the statement runs again, once, on a
snapshot that holds it. ``load_context`` is one statement too, so the
conversation and its entries come from one snapshot.
PostgreSQL text cannot hold NUL, so an entry's ``content`` is stored with each
NUL shown as U+FFFD, and its exact UTF-8 goes in ``content_bytes``, only for
the rare entry that has one. A NUL in any other text is a ``StorageError``.

**Claims.** ``shared`` is True: other daemons may append, so a daemon re-reads
a conversation before running it. ``claim`` takes a session-level advisory
lock (``pg_try_advisory_lock``) keyed by a 64-bit blake2b hash of (schema,
agent, sender), on one connection of its own rather than the pool's: a
daemon that dies drops that connection, and the server frees its claims
(``close`` unlocks them first, so they are free when it returns). Should that
connection break, its claims are gone; the next ``claim`` reconnects and takes
back the ones no other daemon took meanwhile.

**Archives and notes.** ``archives`` holds one row per archive
(conversation, name, archived ``first_seq``..``last_seq``, summary,
``speakers`` as a jsonb array, created_at) and ``body``, the archived
messages' text (``archived_text``), which is searched but never read back:
the archived entries stay in ``entries`` with their ``agent``. ``notes`` holds
one row per ``(agent, name)``. Each table has a generated ``search`` tsvector
under a GIN index (the ``simple`` configuration: no stemming, any language;
summary or name weighted A, body or content B). A tsvector holds at most 1 MB,
so ``body`` keeps only the first 256 KiB of that text (UTF-8): a tsvector of
unique short words is at most about 2.4 times its text. The text has each NUL
shown as U+FFFD, like ``entries.content``; a NUL in a summary or a note is a
``StorageError``.

``compact`` is one transaction: it locks the conversation row (``FOR
UPDATE``, the lock an append's UPDATE takes), checks the archive against the
latest marker and ``last_seq`` (``check_archive``), reads the archived
entries, inserts the archive, then the marker through the append statement.
Entries themselves carry no tsvector, so appends stay as cheap as they can be.

**Mail** (``store.mail``, the ``MailStore``) runs on the same pool and threads;
its tables (participants, messages, deliveries...) are migration 3, part 2's
(spaces, projects, versions, locks, each message's search vector) migration
4, and storage/_postgres_mail.py says how it stores, numbers and searches mail.
Migration 5 is the webhooks' outbox (storage/_postgres_outbox.py).

**Many daemons** (migration 7, ``daemons``): ``bus`` is the ``PostgresBus``
(storage/_postgres_bus.py): LISTEN/NOTIFY between the daemons, a row of liveness
each, and which daemon holds which conversation, read from ``pg_locks``.

**Usage** (migration 6). An entry's ``usage`` is in its row (``input_tokens``,
``output_tokens``, NULL when it has none, as in every row from before), and
``usage`` holds the totals, one row per conversation and UTC day. The append
statement adds the sums ``daily_usage`` gives to them in a CTE of its own (an
``INSERT ... ON CONFLICT DO UPDATE`` from the conversation the UPDATE locked,
so it runs after it and in the same transaction); a compaction's marker goes
through that statement too. Nothing else writes the table. ``total_tokens`` is
one ``SUM`` over it; every read of a conversation's row sums that conversation's
days on the primary key (``_CONVERSATION_COLUMNS``, and ``_LOAD_CONTEXT`` once
for its rows), a few probes per listed conversation.

**Conversation search** (migration 8). ``title_folded`` and ``sender_folded``
hold the title and sender casefolded by Python (PostgreSQL's ``lower`` folds by
the database's locale, not as ``casefold`` does), written with them and filled
for older rows by the migration; ``list_conversations(query=...)`` filters on
them with an escaped ``LIKE`` as it walks the listing's index, in SQL.

**Search** ORs the query's ``search_words``, each quoted, through
``websearch_to_tsquery('simple', ...)`` (a word is letters, digits and ``_``,
so no user text is ever query syntax), ranks the agent's archives and notes
together by ``ts_rank`` over 1 + log of the document's length, times how many
of the query's words the document holds (ts_rank alone knows no word's rarity,
so a long archive repeating one word would beat a note holding them all), and
runs ``ts_headline`` (``[``/``]`` around matches, one fragment of about 24
words) on the best ``limit`` only. ts_headline marks no cut, so the snippet
gets a "…" on a side where its words are not the ones the text starts or ends
with.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import msgspec
import psycopg
import trio
from chinwag.protocol import (
    ConversationItem,
    Entry,
    MemoryHit,
    TokenUsage,
    ToolCallInfo,
    UsageTotal,
)
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from ._base import Archive, NewConversation, check_archive
from ._bus import Bus
from ._conversation_search import LIKE_ESCAPE, like_pattern
from ._cursor import decode_cursor, encode_cursor
from ._errors import ConversationNotFound, StorageError
from ._mail import MailStore
from ._outbox import Outbox
from ._postgres_bus import (
    CLIENT_KEEPALIVES,
    DAEMONS_MIGRATION,
    TCP_SETTINGS,
    PostgresBus,
    error_line,
)
from ._postgres_mail import MAIL_MIGRATION, MAIL_SPACES_MIGRATION, PostgresMail, websearch_words
from ._postgres_outbox import OUTBOX_MIGRATION, PostgresOutbox
from ._search import SNIPPET_WORDS, WORD, archived_text, database_search_words, one_line
from ._timestamps import from_text, to_text, utc
from ._usage import daily_usage

_T = TypeVar("_T")
_CURSOR_TAG = "postgres"
_CACHE_SIZE = 65_536  # (agent, sender) -> conversation id, kept for history reads
DEFAULT_POOL_SIZE = 4
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # search_path would fold other names
_CONNECT_TIMEOUT = 10  # seconds; libpq alone would wait for TCP to give up
_BODY_BYTES = 256 * 1024  # of an archive's searched text; its tsvector must stay under 1 MB
_EDGE = 4096  # characters of a document's start and end a snippet is compared with
_POOL_TIMEOUT = 10.0  # seconds a call waits for the pool to (re)connect


def _fold_old_conversations(conn: psycopg.Connection[Any]) -> None:
    """Fill ``title_folded`` and ``sender_folded`` of the conversations stored before them,
    a batch at a time: casefold is Python's, not the database's."""
    after = 0
    while rows := conn.execute(
        "SELECT id, title, sender FROM conversations WHERE id > %s ORDER BY id LIMIT 1000",
        (after,),
    ).fetchall():
        with conn.cursor() as cursor:
            cursor.executemany(
                "UPDATE conversations SET title_folded = %s, sender_folded = %s WHERE id = %s",
                [(title.casefold(), sender.casefold(), id_) for id_, title, sender in rows],
            )
        after = rows[-1][0]


# Numbered migrations: MIGRATIONS[n - 1] takes the schema from version n - 1 to n.
# Append new ones; never edit one that has shipped.
MIGRATIONS: tuple[tuple[str | Callable[[psycopg.Connection[Any]], None], ...], ...] = (
    (
        """
        CREATE TABLE conversations (
            id bigserial PRIMARY KEY,
            agent text NOT NULL,
            sender text NOT NULL,
            title text NOT NULL DEFAULT '',
            cwd text,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            last_seq bigint NOT NULL DEFAULT 0,
            UNIQUE (sender, agent)
        )
        """,
        # As in sqlite: listing pages through these, newest first, with no sort;
        # a sender's few conversations are found through UNIQUE (sender, agent).
        "CREATE INDEX conversations_by_updated ON conversations (updated_at DESC, id DESC)",
        """
        CREATE INDEX conversations_by_agent
            ON conversations (agent, updated_at DESC, id DESC)
        """,
        """
        CREATE TABLE entries (
            conversation_id bigint NOT NULL REFERENCES conversations (id),
            seq bigint NOT NULL,
            kind text NOT NULL,
            role text NOT NULL,
            content text NOT NULL,
            content_bytes bytea,
            agent text NOT NULL,
            tool_calls jsonb,
            tool_call_id text,
            is_error boolean NOT NULL,
            run_id text,
            created_at timestamptz NOT NULL,
            archive text,
            PRIMARY KEY (conversation_id, seq)
        )
        """,
        # Finds the latest compact marker without reading the history before it.
        """
        CREATE INDEX entries_compact_markers
            ON entries (conversation_id, seq) WHERE kind = 'compact'
        """,
        """
        CREATE TABLE archives (
            conversation_id bigint NOT NULL REFERENCES conversations (id),
            name text NOT NULL,
            first_seq bigint NOT NULL,
            last_seq bigint NOT NULL,
            summary text NOT NULL,
            body text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL,
            search tsvector GENERATED ALWAYS AS (
                setweight(to_tsvector('simple', summary), 'A')
                || setweight(to_tsvector('simple', body), 'B')
            ) STORED,
            PRIMARY KEY (conversation_id, name)
        )
        """,
        "CREATE INDEX archives_search ON archives USING gin (search)",
    ),
    (
        # Nothing wrote archives before this version: the default only satisfies NOT NULL.
        "ALTER TABLE archives ADD COLUMN speakers jsonb NOT NULL DEFAULT '[]'",
        """
        CREATE TABLE notes (
            agent text NOT NULL,
            name text NOT NULL,
            content text NOT NULL,
            updated_at timestamptz NOT NULL,
            search tsvector GENERATED ALWAYS AS (
                setweight(to_tsvector('simple', name), 'A')
                || setweight(to_tsvector('simple', content), 'B')
            ) STORED,
            PRIMARY KEY (agent, name)
        )
        """,
        "CREATE INDEX notes_search ON notes USING gin (search)",
    ),
    MAIL_MIGRATION,  # participants, messages, deliveries: storage/_postgres_mail.py
    MAIL_SPACES_MIGRATION,  # spaces, projects, versions, locks, search: storage/_postgres_mail.py
    OUTBOX_MIGRATION,  # webhook cursors and deliveries: storage/_postgres_outbox.py
    (
        # Every entry stored before has no usage: NULL, as one without it has from now on.
        "ALTER TABLE entries ADD COLUMN input_tokens bigint, ADD COLUMN output_tokens bigint",
        """
        CREATE TABLE usage (
            conversation_id bigint NOT NULL REFERENCES conversations (id),
            day date NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            calls bigint NOT NULL,
            PRIMARY KEY (conversation_id, day)
        )
        """,
    ),
    DAEMONS_MIGRATION,  # a row of liveness per daemon: storage/_postgres_bus.py
    (
        # list_conversations(query=...) matches these (storage/_conversation_search.py).
        "ALTER TABLE conversations ADD COLUMN title_folded text NOT NULL DEFAULT '',"
        " ADD COLUMN sender_folded text NOT NULL DEFAULT ''",
        _fold_old_conversations,
    ),
)

# The conversation's row, then its usage totals summed over its days: each sum a
# correlated subquery that reads the conversation's totals by usage's primary key
# (sum(bigint) is numeric: cast back, so that psycopg gives ints, not Decimals).
_CONVERSATION_COLUMNS = (
    "agent, sender, title, cwd, created_at, updated_at, last_seq, id,"
    " (SELECT coalesce(sum(u.input_tokens), 0)::bigint FROM usage u"
    " WHERE u.conversation_id = conversations.id),"
    " (SELECT coalesce(sum(u.output_tokens), 0)::bigint FROM usage u"
    " WHERE u.conversation_id = conversations.id)"
)
_ENTRY_COLUMNS = (
    "e.seq, e.kind, e.role, e.content, e.content_bytes, e.agent, e.tool_calls::text,"
    " e.tool_call_id, e.is_error, e.run_id, e.created_at, e.archive, e.input_tokens,"
    " e.output_tokens"
)

# One statement: lock the row and move last_seq (UPDATE), add to the usage totals
# (counted: it reads conv, so it runs after the lock is taken), then number and insert.
_APPEND = """
WITH conv AS (
    UPDATE conversations SET last_seq = last_seq + %(count)s, updated_at = %(updated_at)s
    WHERE agent = %(agent)s AND sender = %(sender)s
    RETURNING id, last_seq - %(count)s AS base
), counted AS (
    INSERT INTO usage (conversation_id, day, input_tokens, output_tokens, calls)
    SELECT conv.id, u.day, u.input_tokens, u.output_tokens, u.calls
    FROM conv, unnest(
        %(usage_day)s::date[], %(usage_input)s::bigint[], %(usage_output)s::bigint[],
        %(usage_calls)s::bigint[]
    ) AS u(day, input_tokens, output_tokens, calls)
    ON CONFLICT (conversation_id, day) DO UPDATE SET
        input_tokens = usage.input_tokens + EXCLUDED.input_tokens,
        output_tokens = usage.output_tokens + EXCLUDED.output_tokens,
        calls = usage.calls + EXCLUDED.calls
)
INSERT INTO entries (conversation_id, seq, kind, role, content, content_bytes, agent,
                     tool_calls, tool_call_id, is_error, run_id, created_at, archive,
                     input_tokens, output_tokens)
SELECT conv.id, conv.base + e.n, e.kind, e.role, e.content, e.content_bytes, e.agent,
       e.tool_calls::jsonb, e.tool_call_id, e.is_error, e.run_id, e.created_at, e.archive,
       e.input_tokens, e.output_tokens
FROM conv, unnest(
    %(kind)s::text[], %(role)s::text[], %(content)s::text[], %(content_bytes)s::bytea[],
    %(entry_agent)s::text[], %(tool_calls)s::text[], %(tool_call_id)s::text[],
    %(is_error)s::boolean[], %(run_id)s::text[], %(created_at)s::timestamptz[],
    %(archive)s::text[], %(input_tokens)s::bigint[], %(output_tokens)s::bigint[]
) WITH ORDINALITY AS e(kind, role, content, content_bytes, agent, tool_calls,
                       tool_call_id, is_error, run_id, created_at, archive,
                       input_tokens, output_tokens, n)
RETURNING seq
"""

# The same, for an append that may create its conversation: the row is inserted already
# past its entries, or, when it exists, updated as _APPEND does.
_APPEND_CREATING = _APPEND.replace(
    """WITH conv AS (
    UPDATE conversations SET last_seq = last_seq + %(count)s, updated_at = %(updated_at)s
    WHERE agent = %(agent)s AND sender = %(sender)s
    RETURNING id, last_seq - %(count)s AS base
)""",
    """WITH created AS (
    INSERT INTO conversations (agent, sender, sender_folded, cwd, created_at, updated_at,
                               last_seq)
    VALUES (%(agent)s, %(sender)s, %(sender_folded)s, %(cwd)s, %(first_created_at)s,
            %(updated_at)s, %(count)s)
    ON CONFLICT (sender, agent) DO NOTHING
    RETURNING id, 0::bigint AS base
), updated AS (
    UPDATE conversations SET last_seq = last_seq + %(count)s, updated_at = %(updated_at)s
    WHERE agent = %(agent)s AND sender = %(sender)s AND NOT EXISTS (SELECT FROM created)
    RETURNING id, last_seq - %(count)s AS base
), conv AS (
    SELECT id, base FROM created UNION ALL SELECT id, base FROM updated
)""",
)
assert _APPEND_CREATING != _APPEND

# The conversation and the entries from its latest compact marker on, in one snapshot:
# one row per entry, or one with NULL entry columns when it has none.
_LOAD_CONTEXT = f"""
SELECT c.agent, c.sender, c.title, c.cwd, c.created_at, c.updated_at, c.last_seq, c.id,
       t.tokens_in, t.tokens_out, {_ENTRY_COLUMNS}
FROM conversations c
CROSS JOIN LATERAL (
    SELECT coalesce(max(seq), 0) AS seq FROM entries
    WHERE conversation_id = c.id AND kind = 'compact'
) m
CROSS JOIN LATERAL (  -- once for the conversation, not on each entry's row
    SELECT coalesce(sum(input_tokens), 0)::bigint AS tokens_in,
           coalesce(sum(output_tokens), 0)::bigint AS tokens_out
    FROM usage WHERE conversation_id = c.id
) t
LEFT JOIN entries e ON e.conversation_id = c.id AND e.seq >= m.seq
WHERE c.agent = %(agent)s AND c.sender = %(sender)s
ORDER BY e.seq
"""

# Everything after after_seq; the earlier markers (through the partial index,
# without reading what they archived), then everything from the latest marker on.
_HISTORY_ALL = (
    f"SELECT {_ENTRY_COLUMNS} FROM entries e WHERE e.conversation_id = %(id)s"
    " AND e.seq > %(after)s ORDER BY e.seq LIMIT %(limit)s"
)
_HISTORY_VISIBLE = f"""
WITH marker AS MATERIALIZED (
    SELECT coalesce(max(seq), 0) AS seq FROM entries
    WHERE conversation_id = %(id)s AND kind = 'compact'
)
SELECT {_ENTRY_COLUMNS} FROM entries e, marker m
WHERE e.conversation_id = %(id)s AND e.kind = 'compact' AND e.seq > %(after)s AND e.seq < m.seq
UNION ALL
SELECT {_ENTRY_COLUMNS} FROM entries e, marker m
WHERE e.conversation_id = %(id)s AND e.seq > %(after)s AND e.seq >= m.seq
ORDER BY seq LIMIT %(limit)s
"""

_USAGE = """
SELECT c.agent, c.sender, u.day, u.input_tokens, u.output_tokens, u.calls
FROM usage u JOIN conversations c ON c.id = u.conversation_id
WHERE (%(agent)s::text IS NULL OR c.agent = %(agent)s::text)
    AND (%(sender)s::text IS NULL OR c.sender = %(sender)s::text)
    AND (%(since)s::date IS NULL OR u.day >= %(since)s::date)
ORDER BY u.day, c.agent COLLATE "C", c.sender COLLATE "C"
"""

# sum(bigint) is numeric: cast back, so that psycopg gives ints, not Decimals.
_TOTAL_TOKENS = (
    "SELECT coalesce(sum(input_tokens), 0)::bigint, coalesce(sum(output_tokens), 0)::bigint"
    " FROM usage"
)

_ARCHIVE_COLUMNS = "name, first_seq, last_seq, summary, speakers::text, created_at"
# The conversation, locked as an append locks it, its latest marker, and whether the
# archive's name is taken.
_LOCK_FOR_COMPACTION = """
SELECT c.id, c.last_seq,
       (SELECT coalesce(max(seq), 0) FROM entries
        WHERE conversation_id = c.id AND kind = 'compact'),
       EXISTS (SELECT FROM archives WHERE conversation_id = c.id AND name = %(name)s)
FROM conversations c WHERE c.agent = %(agent)s AND c.sender = %(sender)s
FOR UPDATE
"""
_INSERT_ARCHIVE = (
    "INSERT INTO archives"
    " (conversation_id, name, first_seq, last_seq, summary, speakers, created_at, body)"
    " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s)"
)

# The agent's best `limit` archives and notes, then the text and headline of those only.
_SEARCH = """
WITH query AS MATERIALIZED (SELECT websearch_to_tsquery('simple', %(words)s) AS q),
ranked AS (
    SELECT 'archive' AS kind, a.conversation_id, a.name,
           ts_rank(a.search, query.q, 1) * (
               SELECT count(*) FROM unnest(%(terms)s::text[]) t
               WHERE a.search @@ plainto_tsquery('simple', t)
           ) AS rank
    FROM archives a JOIN conversations c ON c.id = a.conversation_id, query
    WHERE c.agent = %(agent)s AND a.search @@ query.q
        AND (%(sender)s::text IS NULL OR c.sender = %(sender)s::text)
    UNION ALL
    SELECT 'note', NULL, n.name,
           ts_rank(n.search, query.q, 1) * (
               SELECT count(*) FROM unnest(%(terms)s::text[]) t
               WHERE n.search @@ plainto_tsquery('simple', t)
           )
    FROM notes n, query
    WHERE n.agent = %(agent)s AND n.search @@ query.q
    ORDER BY rank DESC, kind, conversation_id, name
    LIMIT %(limit)s
),
found AS (
    SELECT r.kind, r.conversation_id, r.name, r.rank, c.sender,
           coalesce(a.created_at, n.updated_at) AS created_at,
           coalesce(a.summary || E'\n' || a.body, n.name || E'\n' || n.content) AS text
    FROM ranked r
    LEFT JOIN archives a
        ON r.kind = 'archive' AND a.conversation_id = r.conversation_id AND a.name = r.name
    LEFT JOIN conversations c ON c.id = a.conversation_id
    LEFT JOIN notes n ON r.kind = 'note' AND n.agent = %(agent)s AND n.name = r.name
)
SELECT f.kind, f.name, f.sender, f.created_at, ts_headline('simple', f.text, query.q, %(options)s),
       left(f.text, %(edge)s), right(f.text, %(edge)s)
FROM found f, query
ORDER BY f.rank DESC, f.kind, f.conversation_id, f.name
"""
_HEADLINE_OPTIONS = (
    f"StartSel=[, StopSel=], MaxFragments=1, MaxWords={SNIPPET_WORDS},"
    f" MinWords={SNIPPET_WORDS // 2}, ShortWord=0"
)

_tool_calls_encoder = msgspec.json.Encoder()
_tool_calls_decoder = msgspec.json.Decoder(list[ToolCallInfo])
_speakers_encoder = msgspec.json.Encoder()
_speakers_decoder = msgspec.json.Decoder(list[str])
_key_encoder = msgspec.msgpack.Encoder()


def parse_postgres_url(url: str) -> tuple[str, str | None, int]:
    """``(conninfo, schema, pool_size)`` of a ``postgresql://`` or ``postgres://`` URL.

    ``schema=NAME`` (lowercase letters, digits, ``_``) and ``pool_size=N`` (the
    connections, and so the concurrent calls, per store; default 4) are ours;
    every other parameter goes to libpq as written (``sslmode``, ``options``...).
    """
    parts = urlsplit(url, allow_fragments=False)
    if parts.scheme not in ("postgresql", "postgres") or not url.startswith(f"{parts.scheme}://"):
        raise ValueError(f"{url!r} is not a postgresql://... URL.")
    schema: str | None = None
    pool_size = DEFAULT_POOL_SIZE
    seen: set[str] = set()
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ("schema", "pool_size"):
            if name in seen:
                raise ValueError(f"The postgres URL gives {name} twice.")
            seen.add(name)
        if name == "schema":
            schema = value
        elif name == "pool_size":
            try:
                pool_size = int(value)
            except ValueError:
                raise ValueError(f"pool_size must be a whole number, not {value!r}.") from None
        else:
            rest.append((name, value))
    conninfo = url.partition("?")[0]  # urlunsplit would turn postgresql:///db into postgresql:/db
    if rest:
        conninfo += "?" + urlencode(rest, quote_via=quote)
    _check_options(schema, pool_size)
    try:
        conninfo_to_dict(conninfo)  # libpq's own parser: unknown parameters, bad ports
    except psycopg.Error as exc:
        raise ValueError(f"The postgres URL is not one libpq takes: {error_line(exc)}.") from None
    return conninfo, schema, pool_size


def _check_options(schema: str | None, pool_size: int) -> None:
    if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"schema must be 1 to 63 lowercase letters, digits or _, not starting with a digit;"
            f" got {schema!r}."
        )
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, got {pool_size}.")


class PostgresStorage:
    """A ``Storage`` in a PostgreSQL database; make one with ``await PostgresStorage.open``."""

    shared = True

    def __init__(
        self,
        pool: ConnectionPool[psycopg.Connection[Any]],
        locks: psycopg.Connection[Any],
        *,
        conninfo: str,
        schema: str,
        pool_size: int,
    ) -> None:
        """Wrap an open pool and claim connection; ``open`` is the way to get them."""
        self.schema = schema  # where the tables are: the one named, or the server's default
        self.pool_size = pool_size
        self._pool = pool
        self._conninfo = conninfo
        self._limiter = trio.CapacityLimiter(pool_size)
        self._ids: dict[tuple[str, str], int] = {}  # conversation ids never change
        self._claims: set[tuple[str, str]] = set()  # claimed or being claimed, trio side
        # The claim connection and the lock keys it holds; touched only in a worker
        # thread holding _locks_limiter.
        self._locks: psycopg.Connection[Any] | None = locks
        self._locked: set[int] = set()
        self._locks_limiter = trio.CapacityLimiter(1)
        self._closed = False
        self.mail: MailStore = PostgresMail(self._run, lambda: self._closed, schema)
        self.outbox: Outbox = PostgresOutbox(self._run)
        self.bus: Bus | None = PostgresBus(
            conninfo, schema, run=self._run, lock_key=self._lock_key, claims_pid=self._claims_pid
        )

    @classmethod
    async def open(
        cls, conninfo: str, *, schema: str | None = None, pool_size: int = DEFAULT_POOL_SIZE
    ) -> PostgresStorage:
        """Connect, create ``schema`` if it is given and missing, and migrate.

        ``conninfo`` is any libpq connection string or URL. Raises ``ValueError``
        for bad arguments and ``StorageError`` when the database cannot be used.
        """
        _check_options(schema, pool_size)
        conninfo = _with_defaults(conninfo, schema)
        locks, effective_schema = await trio.to_thread.run_sync(_connect, conninfo, schema)
        try:
            pool = await trio.to_thread.run_sync(_open_pool, conninfo, pool_size)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(locks.close)
            raise
        return cls(pool, locks, conninfo=conninfo, schema=effective_schema, pool_size=pool_size)

    # --- plumbing -------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``fn`` with a pooled connection on a worker thread; failures become StorageError.

        Cancellable only while waiting for a thread: once running, ``fn`` completes.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        try:
            return await trio.to_thread.run_sync(self._with_connection, fn, limiter=self._limiter)
        except psycopg.Error as exc:
            raise StorageError(f"{what} failed: {error_line(exc)}.") from exc
        except UnicodeEncodeError as exc:  # a lone surrogate: a str, but no UTF-8
            raise StorageError(f"{what} failed: {exc}.") from exc

    def _with_connection(self, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        with self._pool.connection() as conn:
            return fn(conn)

    def _remember(self, key: tuple[str, str], id_: int) -> None:
        if key not in self._ids and len(self._ids) >= _CACHE_SIZE:
            del self._ids[next(iter(self._ids))]  # the oldest insertion
        self._ids[key] = id_

    # --- conversations ----------------------------------------------------------

    async def get_conversation(self, agent: str, sender: str) -> ConversationItem | None:
        row = await self._run(
            f"Reading the conversation ({agent}, {sender})",
            lambda conn: conn.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
                " WHERE agent = %s AND sender = %s",
                (agent, sender),
            ).fetchone(),
        )
        if row is None:
            return None
        self._remember((agent, sender), row[7])
        return _conversation(row)

    async def create_conversation(
        self, agent: str, sender: str, *, cwd: str | None, created_at: datetime
    ) -> ConversationItem:
        created_at = utc(created_at)

        def create(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
            row: tuple[Any, ...] | None = conn.execute(
                "INSERT INTO conversations (agent, sender, sender_folded, cwd, created_at,"
                " updated_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (sender, agent)"
                f" DO NOTHING RETURNING {_CONVERSATION_COLUMNS}",
                (agent, sender, sender.casefold(), cwd, created_at, created_at),
            ).fetchone()
            if row is None:  # there already; a new statement sees it even if just committed
                row = conn.execute(
                    f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
                    " WHERE agent = %s AND sender = %s",
                    (agent, sender),
                ).fetchone()
                assert row is not None  # nothing deletes conversations
            return row

        row = await self._run(f"Creating the conversation ({agent}, {sender})", create)
        self._remember((agent, sender), row[7])
        return _conversation(row)

    async def set_title(self, agent: str, sender: str, title: str) -> None:
        await self._update(
            f"Setting the title of ({agent}, {sender})",
            agent,
            sender,
            {"title": title, "title_folded": title.casefold()},
        )

    async def set_cwd(self, agent: str, sender: str, cwd: str | None) -> None:
        await self._update(f"Setting the cwd of ({agent}, {sender})", agent, sender, {"cwd": cwd})

    async def _update(
        self, what: str, agent: str, sender: str, values: dict[str, str | None]
    ) -> None:
        statement = sql.SQL("UPDATE conversations SET {} WHERE agent = %s AND sender = %s").format(
            sql.SQL(", ").join(
                sql.SQL("{} = %s").format(sql.Identifier(column)) for column in values
            )
        )
        rowcount = await self._run(
            what,
            lambda conn: conn.execute(statement, (*values.values(), agent, sender)).rowcount,
        )
        if rowcount == 0:
            raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")

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
        where: list[str] = []
        params: list[Any] = []
        if agent is not None:
            where.append("agent = %s")
            params.append(agent)
        if sender is not None:
            where.append("sender = %s")
            params.append(sender)
        if query is not None:
            pattern = like_pattern(query)
            where.append("(title_folded LIKE %s ESCAPE %s OR sender_folded LIKE %s ESCAPE %s)")
            params.extend((pattern, LIKE_ESCAPE, pattern, LIKE_ESCAPE))
        if cursor is not None:
            text, id_ = decode_cursor(_CURSOR_TAG, cursor)
            where.append("(updated_at, id) < (%s, %s)")
            params.extend((from_text(text), id_))
        statement = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
        if where:
            statement += " WHERE " + " AND ".join(where)
        statement += " ORDER BY updated_at DESC, id DESC LIMIT %s"
        params.append(limit + 1)
        rows = await self._run(
            "Listing conversations", lambda conn: conn.execute(statement, params).fetchall()
        )
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(_CURSOR_TAG, to_text(last[5]), last[7])
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
        if not entries:
            if create is None:
                await self._conversation_id(agent, sender)
            else:
                await self.create_conversation(
                    agent, sender, cwd=create.cwd, created_at=datetime.now(UTC)
                )
            return []
        params = _prepare(entries)
        params.update(agent=agent, sender=sender)
        statement = _APPEND
        if create is not None:
            statement = _APPEND_CREATING
            params.update(
                sender_folded=sender.casefold(),
                cwd=create.cwd,
                first_created_at=entries[0].created_at,
            )

        def append(conn: psycopg.Connection[Any]) -> list[int]:
            seqs = [row[0] for row in conn.execute(statement, params).fetchall()]
            if not seqs and create is not None:
                # Created by another daemon while the statement ran: visible to the next.
                seqs = [row[0] for row in conn.execute(statement, params).fetchall()]
            return seqs

        with trio.CancelScope(shield=True):
            seqs = await self._run(f"Appending to ({agent}, {sender})", append)
        if not seqs:
            raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
        for entry, seq in zip(entries, sorted(seqs), strict=True):
            entry.seq = seq
        return list(entries)

    async def load_context(
        self, agent: str, sender: str
    ) -> tuple[ConversationItem, list[Entry]] | None:
        """The metadata and the entries from the latest marker on; see ``Storage.load_context``."""
        rows = await self._run(
            f"Reading the conversation ({agent}, {sender})",
            lambda conn: conn.execute(_LOAD_CONTEXT, {"agent": agent, "sender": sender}).fetchall(),
        )
        if not rows:
            return None
        self._remember((agent, sender), rows[0][7])
        entries = [_entry(row[10:]) for row in rows if row[10] is not None]
        return _conversation(rows[0]), entries

    async def _conversation_id(self, agent: str, sender: str) -> int:
        """Its id, from the cache or the database; raises ``ConversationNotFound``."""
        key = (agent, sender)
        id_ = self._ids.get(key)
        if id_ is None:
            row = await self._run(
                f"Reading the conversation ({agent}, {sender})",
                lambda conn: conn.execute(
                    "SELECT id FROM conversations WHERE agent = %s AND sender = %s", key
                ).fetchone(),
            )
            if row is None:
                raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
            id_ = row[0]
            self._remember(key, id_)
        return id_

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
        id_ = await self._conversation_id(agent, sender)
        params = {"id": id_, "after": after_seq, "limit": limit}  # LIMIT NULL: no limit
        statement = _HISTORY_ALL if include_archived else _HISTORY_VISIBLE
        rows = await self._run(
            f"Reading the history of ({agent}, {sender})",
            lambda conn: conn.execute(statement, params).fetchall(),
        )
        return [_entry(row) for row in rows]

    # --- archives and notes -------------------------------------------------------

    async def compact(
        self, agent: str, sender: str, archive: Archive, *, usage: TokenUsage | None = None
    ) -> Entry:
        """Store the archive and append its marker in one transaction; see ``Storage.compact``.

        Not cancellable, like ``append``.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        marker = archive.marker(usage)
        params = _prepare([marker])
        params.update(agent=agent, sender=sender)
        try:
            speakers = _speakers_encoder.encode(archive.speakers).decode()
        except (UnicodeEncodeError, TypeError) as exc:
            raise StorageError(f"The archive's speakers could not be encoded: {exc}.") from exc

        def compact(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                row = conn.execute(
                    _LOCK_FOR_COMPACTION,
                    {"agent": agent, "sender": sender, "name": archive.name},
                ).fetchone()
                if row is None:
                    raise ConversationNotFound(
                        f"No conversation is stored for ({agent}, {sender})."
                    )
                id_, last_seq, marker_seq, used = row
                check_archive(
                    archive,
                    marker_seq=marker_seq,
                    last_seq=last_seq,
                    names={archive.name} if used else set(),
                )
                archived = conn.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries e"
                    " WHERE e.conversation_id = %s AND e.seq >= %s ORDER BY e.seq",
                    (id_, archive.first_seq),
                ).fetchall()
                conn.execute(
                    _INSERT_ARCHIVE,
                    (
                        id_,
                        archive.name,
                        archive.first_seq,
                        archive.last_seq,
                        archive.summary,
                        speakers,
                        marker.created_at,
                        _body([_entry(entry) for entry in archived]),
                    ),
                )
                seq_row = conn.execute(_APPEND, params).fetchone()
                assert seq_row is not None  # the row is locked: the conversation is there
                return int(seq_row[0])

        with trio.CancelScope(shield=True):
            marker.seq = await self._run(f"Compacting ({agent}, {sender})", compact)
        return marker

    async def usage(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        since: date | None = None,
    ) -> list[UsageTotal]:
        """The usage totals by day, agent and sender; see ``Storage.usage``."""
        params = {"agent": agent, "sender": sender, "since": since}
        rows = await self._run(
            "Reading the usage totals", lambda conn: conn.execute(_USAGE, params).fetchall()
        )
        return [
            UsageTotal(
                agent=row[0],
                sender=row[1],
                day=row[2],
                input_tokens=row[3],
                output_tokens=row[4],
                calls=row[5],
            )
            for row in rows
        ]

    async def total_tokens(self) -> tuple[int, int]:
        """Every stored call's tokens; see ``Storage.total_tokens``."""

        def total(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            row = conn.execute(_TOTAL_TOKENS).fetchone()
            assert row is not None  # an aggregate gives one row
            return row[0], row[1]

        return await self._run("Reading the usage totals", total)

    async def get_archive(self, agent: str, sender: str, name: str) -> Archive | None:
        id_ = await self._conversation_id(agent, sender)
        row = await self._run(
            f"Reading the archive {name!r} of ({agent}, {sender})",
            lambda conn: conn.execute(
                f"SELECT {_ARCHIVE_COLUMNS} FROM archives WHERE conversation_id = %s AND name = %s",
                (id_, name),
            ).fetchone(),
        )
        if row is None:
            return None
        return Archive(
            name=row[0],
            first_seq=row[1],
            last_seq=row[2],
            summary=row[3],
            speakers=_speakers_decoder.decode(row[4]),
            created_at=row[5].astimezone(UTC),
        )

    async def put_note(self, agent: str, name: str, content: str, *, updated_at: datetime) -> None:
        """Create or replace the note; see ``Storage.put_note``. Shielded: it completes."""
        params = (agent, name, content, utc(updated_at))
        with trio.CancelScope(shield=True):
            await self._run(
                f"Writing the note {name!r} of {agent}",
                lambda conn: conn.execute(
                    "INSERT INTO notes (agent, name, content, updated_at) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (agent, name)"
                    " DO UPDATE SET content = EXCLUDED.content, updated_at = EXCLUDED.updated_at",
                    params,
                ),
            )

    async def search_memory(
        self, agent: str, query: str, *, limit: int = 10, sender: str | None = None
    ) -> list[MemoryHit]:
        """The agent's notes and archives matching any word of ``query``, best ``ts_rank`` first."""
        words = await database_search_words(query, limit, closed=self._closed)
        if not words:
            return []
        params = {
            "words": websearch_words(words),
            "terms": words,
            "agent": agent,
            "sender": sender,
            "limit": limit,
            "options": _HEADLINE_OPTIONS,
            "edge": _EDGE,
        }
        rows = await self._run(
            f"Searching the memory of {agent}",
            lambda conn: conn.execute(_SEARCH, params).fetchall(),
        )
        return [
            MemoryHit(
                kind=row[0],
                name=row[1],
                sender=row[2],
                snippet=_snippet(row[4], row[5], row[6]),
                created_at=row[3].astimezone(UTC),
            )
            for row in rows
        ]

    # --- claims -------------------------------------------------------------------

    async def claim(self, agent: str, sender: str) -> bool:
        """Take the conversation for this store's runs, without waiting; see ``Storage.claim``.

        Cancellable only while waiting for the claim connection.
        """
        if self._closed:
            raise StorageError("The store is closed.")
        key = (agent, sender)
        if key in self._claims:
            await trio.lowlevel.checkpoint()
            return False
        self._claims.add(key)  # before the thread hop: a second claim sees it
        taken = False
        try:
            taken = await trio.to_thread.run_sync(
                self._try_lock, self._lock_key(agent, sender), limiter=self._locks_limiter
            )
        except psycopg.Error as exc:
            raise StorageError(f"Claiming ({agent}, {sender}) failed: {error_line(exc)}.") from exc
        finally:
            if not taken:
                self._claims.discard(key)
        return taken

    async def release(self, agent: str, sender: str) -> None:
        """Give up a claim; see ``Storage.release``. Shielded; never raises."""
        key = (agent, sender)
        if key not in self._claims or self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(
                    self._unlock, self._lock_key(agent, sender), limiter=self._locks_limiter
                )
            finally:
                self._claims.discard(key)

    def _claims_pid(self) -> int | None:
        """The server's pid for the claim connection, which holds the advisory locks."""
        conn = self._locks
        return None if conn is None or conn.closed else conn.info.backend_pid

    def _lock_key(self, agent: str, sender: str) -> int:
        return _advisory_key("claim", self.schema, agent, sender)

    def _try_lock(self, key: int) -> bool:
        """Worker thread, holding ``_locks_limiter``."""
        if self._closed and self._locks is not None and self._locks.closed:
            raise StorageError("The store is closed.")  # and must not reconnect
        conn = self._locks
        if conn is not None and not conn.closed:
            try:
                return self._try_lock_on(conn, key)
            except psycopg.Error:
                self._drop_locks()  # its session, and every lock it held, is gone
        return self._try_lock_on(self._reconnect_locks(), key)

    def _try_lock_on(self, conn: psycopg.Connection[Any], key: int) -> bool:
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        except psycopg.Error:
            self._drop_locks()
            raise
        assert row is not None
        if row[0]:
            self._locked.add(key)
        return bool(row[0])

    def _unlock(self, key: int) -> None:
        """Worker thread, holding ``_locks_limiter``. A lost connection freed the lock already."""
        if key not in self._locked:
            return
        self._locked.discard(key)
        conn = self._locks
        if conn is None or conn.closed:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error:
            self._drop_locks()  # the session, and every lock it held, is gone

    def _reconnect_locks(self) -> psycopg.Connection[Any]:
        """A fresh claim connection that takes back the claims no one else took meanwhile."""
        conn = psycopg.connect(self._conninfo, autocommit=True)
        lost: set[int] = set()
        try:
            for key in self._locked:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                if not (row and row[0]):
                    lost.add(key)  # another daemon has it now; its release is a no-op here
        except BaseException:
            conn.close()
            raise
        self._locked -= lost
        self._locks = conn
        return conn

    def _drop_locks(self) -> None:
        if self._locks is not None:
            self._locks.close()

    def _close_locks(self) -> None:
        """Unlock, then close: the server ends a closed session a moment later, not at once."""
        if self._locks is not None and not self._locks.closed and self._locked:
            with contextlib.suppress(psycopg.Error):  # a broken session holds nothing
                self._locks.execute("SELECT pg_advisory_unlock_all()")
        self._locked.clear()
        self._drop_locks()

    # --- lifetime -----------------------------------------------------------------

    async def close(self) -> None:
        """Close the pool and the claim connection, which frees every claim. Idempotent; shielded.

        Calls already made, running or waiting for a thread, finish first; later
        ones raise ``StorageError``.
        """
        if self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            # The limiters are fair: taking every token waits behind the calls queued.
            for borrower in [object() for _ in range(self.pool_size)]:
                await self._limiter.acquire_on_behalf_of(borrower)
            await trio.to_thread.run_sync(self._pool.close)
            await trio.to_thread.run_sync(self._close_locks, limiter=self._locks_limiter)


def _advisory_key(*parts: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_*`` locks."""
    digest = hashlib.blake2b(_key_encoder.encode(parts), digest_size=8, person=b"chinwag")
    return int.from_bytes(digest.digest(), "big", signed=True)


def _with_defaults(conninfo: str, schema: str | None) -> str:
    """``conninfo`` with our search_path, a connect timeout, an application name, and
    keepalives on both ends of the connection (storage/_postgres_bus.py: a daemon the
    network lost lets go of its claims within seconds)."""
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise ValueError(f"The postgres URL is not one libpq takes: {error_line(exc)}.") from None
    extra: dict[str, Any] = {k: v for k, v in CLIENT_KEEPALIVES.items() if k not in given}
    options = f"{given.get('options') or ''} {TCP_SETTINGS}"
    if schema is not None:
        options += f" -c search_path={schema}"
    extra["options"] = options.strip()
    if "connect_timeout" not in given:
        extra["connect_timeout"] = _CONNECT_TIMEOUT
    if "application_name" not in given:
        extra["application_name"] = "chinwag"
    return make_conninfo(conninfo, **extra)


def _where(conninfo: str) -> str:
    """The database a conninfo names, for messages; never the password."""
    given = conninfo_to_dict(conninfo)
    host = given.get("host") or "the local socket"
    port = f":{given['port']}" if given.get("port") else ""
    return f"{given.get('dbname') or '(default)'} on {host}{port}"


def _connect(conninfo: str, schema: str | None) -> tuple[psycopg.Connection[Any], str]:
    """The claim connection, once the schema is migrated, and the schema in use. Worker thread."""
    where = _where(conninfo)
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        reason = error_line(exc)
        raise StorageError(f"Could not connect to the database {where}: {reason}.") from exc
    try:
        _migrate(conn, schema, where)
        row = conn.execute("SELECT current_schema()").fetchone()
        assert row is not None and row[0] is not None  # _migrate created tables in it
        return conn, row[0]
    except psycopg.Error as exc:
        conn.close()
        raise StorageError(f"Could not prepare the database {where}: {error_line(exc)}.") from exc
    except BaseException:
        conn.close()
        raise


def _migrate(conn: psycopg.Connection[Any], schema: str | None, where: str) -> None:
    """Bring the schema to ``len(MIGRATIONS)`` in one transaction, one daemon at a time."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_advisory_key("migrate", schema or ""),))
        if schema is not None:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        row = conn.execute("SELECT current_schema()").fetchone()
        if row is None or row[0] is None:
            raise StorageError(
                f"The database {where} has no schema to create tables in: its search_path"
                " names none that exists; add ?schema=NAME to the URL."
            )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        assert row is not None
        current: int = row[0]
        if current > len(MIGRATIONS):
            raise StorageError(
                f"The database {where} has schema version {current}, newer than this"
                f" chinwag knows ({len(MIGRATIONS)}); upgrade chinwag."
            )
        now = datetime.now(UTC)
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                if isinstance(statement, str):
                    conn.execute(statement)
                else:  # a step SQL alone cannot take, such as reading encoded bodies
                    statement(conn)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)", (version, now)
            )


def _open_pool(conninfo: str, pool_size: int) -> ConnectionPool[psycopg.Connection[Any]]:
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        conninfo,
        kwargs={"autocommit": True},
        min_size=1,
        max_size=pool_size,
        open=False,
        timeout=_POOL_TIMEOUT,
        name="chinwag",
    )
    try:
        pool.open(wait=True, timeout=_POOL_TIMEOUT)
    except psycopg.Error as exc:
        pool.close()
        raise StorageError(
            f"Could not open connections to the database {_where(conninfo)}: {error_line(exc)}."
        ) from exc
    return pool


def _prepare(entries: Sequence[Entry]) -> dict[str, Any]:
    """``_APPEND``'s column arrays; stamps each entry's ``created_at`` (UTC) in place."""
    now = datetime.now(UTC)
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "kind",
            "role",
            "content",
            "content_bytes",
            "entry_agent",
            "tool_calls",
            "tool_call_id",
            "is_error",
            "run_id",
            "created_at",
            "archive",
            "input_tokens",
            "output_tokens",
        )
    }
    for entry in entries:
        created_at = entry.created_at = now if entry.created_at is None else utc(entry.created_at)
        try:
            tool_calls = (
                _tool_calls_encoder.encode(entry.tool_calls).decode() if entry.tool_calls else None
            )
            exact = entry.content.encode() if "\x00" in entry.content else None
        except (UnicodeEncodeError, TypeError) as exc:
            raise StorageError(f"An entry could not be encoded: {exc}.") from exc
        columns["kind"].append(entry.kind)
        columns["role"].append(entry.role)
        columns["content"].append(entry.content.replace("\x00", "\ufffd"))
        columns["content_bytes"].append(exact)
        columns["entry_agent"].append(entry.agent)
        columns["tool_calls"].append(tool_calls)
        columns["tool_call_id"].append(entry.tool_call_id)
        columns["is_error"].append(entry.is_error)
        columns["run_id"].append(entry.run_id)
        columns["created_at"].append(created_at)
        columns["archive"].append(entry.archive)
        columns["input_tokens"].append(None if entry.usage is None else entry.usage.input_tokens)
        columns["output_tokens"].append(None if entry.usage is None else entry.usage.output_tokens)
    params: dict[str, Any] = dict(columns)
    params.update(count=len(entries), updated_at=columns["created_at"][-1])
    days = daily_usage(entries)
    params.update(
        usage_day=list(days),
        usage_input=[total.input_tokens for total in days.values()],
        usage_output=[total.output_tokens for total in days.values()],
        usage_calls=[total.calls for total in days.values()],
    )
    return params


def _body(archived: list[Entry]) -> str:
    """An archive's searched text: the archived messages, NUL-free, capped at ``_BODY_BYTES``."""
    text = archived_text(archived).replace("\x00", "\ufffd").encode()
    return text[:_BODY_BYTES].decode(errors="ignore")  # "ignore": a character cut in two


def _snippet(headline: str, start: str, end: str) -> str:
    """``ts_headline``'s fragment on one line, with "…" where it does not reach the text's edge.

    ``start`` and ``end`` are the text's first and last ``_EDGE`` characters: the
    fragment reaches an edge when its words and the edge's agree as far as both go.
    """
    words = WORD.findall(headline)
    from_start = _agree(words, WORD.findall(start))
    to_end = _agree(words[::-1], WORD.findall(end)[::-1])
    return f"{'' if from_start else '…'}{one_line(headline)}{'' if to_end else '…'}"


def _agree(one: list[str], other: list[str]) -> bool:
    common = min(len(one), len(other))
    return one[:common] == other[:common]


def _conversation(row: tuple[Any, ...]) -> ConversationItem:
    return ConversationItem(
        agent=row[0],
        sender=row[1],
        title=row[2],
        cwd=row[3],
        created_at=row[4].astimezone(UTC),
        updated_at=row[5].astimezone(UTC),
        last_seq=row[6],
        tokens_in=row[8],
        tokens_out=row[9],
    )


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(
        seq=row[0],
        kind=row[1],
        role=row[2],
        content=row[3] if row[4] is None else bytes(row[4]).decode(),
        agent=row[5],
        tool_calls=[] if row[6] is None else _tool_calls_decoder.decode(row[6]),
        tool_call_id=row[7],
        is_error=row[8],
        run_id=row[9],
        created_at=row[10].astimezone(UTC),
        archive=row[11],
        usage=None if row[12] is None else TokenUsage(input_tokens=row[12], output_tokens=row[13]),
    )
