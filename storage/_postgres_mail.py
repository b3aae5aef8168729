"""The postgres backend's ``MailStore``: participants, messages and deliveries, in its schema.

It runs on ``PostgresStorage``'s pool and threads (its ``_run``: a pooled
autocommit connection in ``trio.to_thread``), so mail shares the store's
``schema=``, limits and close. Its tables come with the store's schema, as
migrations 3 (``MAIL_MIGRATION``) and 4 (``MAIL_SPACES_MIGRATION``, mail's part
2); a database of an older schema gains them on open, its conversations and
mail untouched.

**Tables.** ``messages`` holds each message encoded (msgpack ``body``, as the
memory index keeps it: PostgreSQL text cannot hold NUL, jsonb cannot either,
and would turn a float like 1e300 into an integer) beside the columns reads
filter and sort on: ``number`` (its msg_id is ``msg_id_of(number)``),
``sender``, ``thread_id``, ``channel``, ``priority``, ``created_at`` and the
idempotency key, unique per sender. Three things about a message change after
it is posted, and live in columns only, laid over the body when it is read:
its ``thread_id`` (a reply starts its parent's thread), and its
``answered_by``/``run_id`` (``answered_by`` set: a hosted agent's answer named
it). Its msg_id is not in the body either: the number is the sequence's. A NUL
in any of those columns (a sender, key, thread, channel, scope or name) is a
``StorageError``; the rest of a message (content, to, metadata...) is exact.
``message_scopes`` holds one row per (scope, message), for the inbox's scope filter.

``deliveries`` has one row per (recipient, message), keyed ``(name, number)``
so that an inbox page is a range scan of its primary key, newest first; it
carries its message's ``priority`` and ``created_at`` too, so the priority and
``since`` filters read no message row they do not return (``since`` has an
index of its own, for when few of a long inbox are that recent). A partial
index holds the deliveries not `read`, for ``unread_only`` pages and the
pending replay. ``unread_counts`` keeps, per (name, priority), how many
deliveries are not `read`: every write that moves one updates it in the same
statement, so ``unread_counts`` and ``unread_totals`` read a handful of rows
however long the inbox. ``participants`` holds each participant encoded, by name.

**Part 2.** A message's ``space``, ``deleted`` and ``pinned`` are columns
beside its body, for the filters, and so is ``search``, the tsvector search
matches (GIN index; NULL once deleted). Postgres's own parser would keep
``api.example.com`` or ``src/_mail.py`` whole and split ``mail_store``, so the
vector is made here of the words memory search finds (``\\w+``, lowercased),
each a lexeme at its positions; a search ORs its ``search_words`` as lexemes,
ranks as notes and archives are ranked (``ts_rank`` over 1 + log of the
length, times how many of the words a message holds; the newer first on a
tie) among what the reader may read. A tsvector holds at most 1 MB, so a
message's vector stops at 768 KiB of distinct words: the ones after are not
found. Migration 4 makes the vectors of older mail from their bodies. ``message_versions`` keeps the
versions edits replaced; ``spaces`` and ``projects`` hold each encoded,
``space_members`` one row per member. ``change_message`` reads the message
``FOR UPDATE``, makes the change with ``changed`` and writes it back, in one
transaction. A lock is a row per (resource, holder); ``take_lock`` and
``release_lock`` take their turns on a resource under a transaction's advisory
lock of it, so two daemons never both decide a resource is free.

Over 100,000 messages of varied text (readers of about 4,000 deliveries and
9,000 messages in the spaces they read), a search of 1 to 3 words takes 5 ms
(median) once autovacuum has passed and 9 ms before; one of words most messages
hold (``the``) reads the row of every message holding them, about 50 ms.

**Writes** are one statement each, hence one transaction and one round trip,
shielded from cancellation once begun. ``post`` inserts the message and, only
when it did, its deliveries and scopes, the parent's change, the new
participants (``ON CONFLICT DO NOTHING``) and the counts. A post with an
idempotency key is a transaction of two round trips (pipelined): it first
takes a lock of that (schema, sender, key) (``pg_advisory_xact_lock``), so
posts with one key, from any daemon, take turns; its statement then sees the
first one committed, stores nothing and takes no number, and a second
statement reads the first message back. The key's unique constraint (``ON
CONFLICT DO NOTHING``) holds even without the turns: racing posts store one
message, and all get it back.

Locks come in an order every write follows, so writes of several daemons
queue and never deadlock: a keyed post takes its key's lock before any other,
a post inserts its message before it changes anything else (a post waiting on
the unique key of another holds nothing more), and its new
participants sorted by name (only posts lock more than one participant or
any message); ``advance`` and ``mark_read`` lock their deliveries sorted by
(name, number) before changing any, a post only the replier's delivery of
the parent; every write changes the counts after its deliveries, sorted by
(name, priority).

**Numbers** come from the identity sequence of ``messages``: unique across
daemons, but a post that fails after taking one leaves a gap, and they are
taken in ``nextval`` order, not commit order: while two daemons post at once,
the message numbered 8 may commit, and be read, before number 7. Everything
here orders by number; a reader that pages on msg_ids (``received(after=...)``,
a watch's replay) can pass over a lower number that commits after it read a
higher one. Pushing mail across daemons in order must allow for that (a later
issue).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import msgspec
import psycopg
import trio
from chinwag.protocol import (
    Delivery,
    LockHolder,
    MailMessage,
    MessageVersion,
    Participant,
    Project,
    Space,
    SpaceMember,
)

from ._errors import StorageError
from ._mail import (
    FromSpace,
    InboxQuery,
    MessageChange,
    NotAMember,
    ParentChange,
    StateChange,
    changed,
    lock_allows,
    msg_id_of,
    number_of,
    with_members,
)
from ._search import WORD
from ._timestamps import utc

_T = TypeVar("_T")


class _Run(Protocol):
    """``PostgresStorage._run``: ``fn`` on a pooled connection in a worker thread."""

    async def __call__(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T: ...


MAIL_MIGRATION: tuple[str, ...] = (
    """
    CREATE TABLE participants (
        name text PRIMARY KEY,
        body bytea NOT NULL
    )
    """,
    """
    CREATE TABLE messages (
        number bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sender text NOT NULL,
        idempotency_key text,
        thread_id text,
        channel text,
        priority integer NOT NULL,
        created_at timestamptz NOT NULL,
        answered_by bigint,
        answered_run_id text,
        body bytea NOT NULL,
        UNIQUE (sender, idempotency_key)
    )
    """,
    "CREATE INDEX messages_by_sender ON messages (sender, number)",
    "CREATE INDEX messages_by_thread ON messages (thread_id, number) WHERE thread_id IS NOT NULL",
    "CREATE INDEX messages_by_channel ON messages (channel, number) WHERE channel IS NOT NULL",
    """
    CREATE TABLE message_scopes (
        type text NOT NULL,
        value text NOT NULL,
        number bigint NOT NULL REFERENCES messages (number),
        PRIMARY KEY (type, value, number)
    )
    """,
    """
    CREATE TABLE deliveries (
        name text NOT NULL,
        number bigint NOT NULL REFERENCES messages (number),
        state text NOT NULL CHECK (state IN ('pending', 'delivered', 'read')),
        delivered_at timestamptz,
        read_at timestamptz,
        mentioned boolean NOT NULL,
        priority integer NOT NULL,
        created_at timestamptz NOT NULL,
        PRIMARY KEY (name, number)
    )
    """,
    "CREATE INDEX deliveries_by_message ON deliveries (number)",
    # Measured on an inbox of 100,000 with 3 not read: an unread_only page (or the pending
    # replay) takes 0.6 ms with this index, 83 ms without (the whole inbox is read).
    "CREATE INDEX deliveries_unread ON deliveries (name, number) WHERE state <> 'read'",
    # A `since` that only a few of 100,000 match: 0.9 ms with it, 28 ms without.
    "CREATE INDEX deliveries_by_time ON deliveries (name, created_at)",
    # Counting 10,000 unread of 100,000 through deliveries_unread took 10 ms; this reads
    # one row per priority.
    """
    CREATE TABLE unread_counts (
        name text NOT NULL,
        priority integer NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (name, priority)
    )
    """,
)
"""Migration 3 of ``PostgresStorage``'s schema: the mail tables."""


def _index_old_mail(conn: psycopg.Connection[Any]) -> None:
    """Fill ``search`` (and the columns part 1 never set) from each stored body, a batch of
    messages at a time."""
    after = 0
    while rows := conn.execute(
        "SELECT number, body FROM messages WHERE number > %s ORDER BY number LIMIT 1000", (after,)
    ).fetchall():
        updates = []
        for number, body in rows:
            m = _decode_message(body)
            updates.append((_search_vector(m.content), m.space, m.deleted, m.pinned, number))
        with conn.cursor() as cursor:
            cursor.executemany(
                "UPDATE messages SET search = %s::tsvector, space = %s, deleted = %s,"
                " pinned = %s WHERE number = %s",
                updates,
            )
        after = rows[-1][0]


MAIL_SPACES_MIGRATION: tuple[str | Callable[[psycopg.Connection[Any]], None], ...] = (
    "ALTER TABLE messages ADD COLUMN space text",
    "ALTER TABLE messages ADD COLUMN deleted boolean NOT NULL DEFAULT false",
    "ALTER TABLE messages ADD COLUMN pinned boolean NOT NULL DEFAULT false",
    "ALTER TABLE messages ADD COLUMN search tsvector",
    _index_old_mail,
    "CREATE INDEX messages_search ON messages USING gin (search)",
    "CREATE INDEX messages_by_space ON messages (space, number) WHERE space IS NOT NULL",
    # An inbox of 4,000 with a few pinned: a pinned_only page takes 0.6 ms with it, 19 without.
    "CREATE INDEX messages_pinned ON messages (number) WHERE pinned",
    """
    CREATE TABLE message_versions (
        number bigint NOT NULL REFERENCES messages (number),
        version integer NOT NULL,
        body bytea NOT NULL,
        PRIMARY KEY (number, version)
    )
    """,
    "CREATE TABLE spaces (name text PRIMARY KEY, body bytea NOT NULL)",
    """
    CREATE TABLE space_members (
        space text NOT NULL,
        name text NOT NULL,
        joined_at timestamptz NOT NULL,
        PRIMARY KEY (space, name)
    )
    """,
    "CREATE TABLE projects (name text PRIMARY KEY, body bytea NOT NULL)",
    """
    CREATE TABLE locks (
        resource text NOT NULL,
        holder text NOT NULL,
        mode text NOT NULL,
        acquired_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (resource, holder)
    )
    """,
    "CREATE INDEX locks_by_holder ON locks (holder)",
)
"""Migration 4: spaces, projects, versions, locks, and each message's search vector."""

_MESSAGE_COLUMNS = "m.number, m.body, m.thread_id, m.answered_by, m.answered_run_id"
_DELIVERY_COLUMNS = "d.state, d.delivered_at, d.read_at, d.mentioned"

# Adds (name, priority, step) rows to the counts, in the one order every write locks them.
_COUNT = """
    INSERT INTO unread_counts (name, priority, count)
    SELECT name, priority, sum(step) FROM {steps} AS s GROUP BY name, priority
    ORDER BY name, priority
    ON CONFLICT (name, priority) DO UPDATE SET count = unread_counts.count + EXCLUDED.count
"""

# One statement: the message, unless its key was used (a repeat takes no number) or its
# parent is missing; then, only when it was inserted, everything else the post changes.
# Every write in it waits for `ins` (each refers to it), so a post waiting on the unique
# key of another's uncommitted message holds no other lock meanwhile.
_POST = f"""
WITH ins AS (
    INSERT INTO messages (sender, idempotency_key, thread_id, channel, priority, created_at, body,
                          space, deleted, pinned, search)
    SELECT %(sender)s, %(key)s, %(thread_id)s, %(channel)s, %(priority)s, %(created_at)s,
           %(body)s, %(space)s, %(deleted)s, %(pinned)s, %(search)s::tsvector
    WHERE (%(parent)s::bigint IS NULL
           OR EXISTS (SELECT FROM messages WHERE number = %(parent)s::bigint))
      AND (%(key)s::text IS NULL OR NOT EXISTS (
           SELECT FROM messages WHERE sender = %(sender)s AND idempotency_key = %(key)s::text))
    ON CONFLICT (sender, idempotency_key) DO NOTHING
    RETURNING number
), parent AS (
    UPDATE messages p SET
        thread_id = CASE WHEN %(start_thread)s THEN coalesce(p.thread_id, %(parent_id)s)
                    ELSE p.thread_id END,
        answered_by = CASE WHEN %(answered)s THEN ins.number ELSE p.answered_by END,
        answered_run_id = CASE WHEN %(answered)s THEN %(run_id)s ELSE p.answered_run_id END
    FROM ins
    WHERE p.number = %(parent)s::bigint AND (%(start_thread)s OR %(answered)s)
), parent_read AS (
    UPDATE deliveries d SET
        state = 'read', read_at = %(created_at)s,
        delivered_at = coalesce(d.delivered_at, %(created_at)s)
    WHERE d.name = %(read_by)s AND d.number = %(parent)s::bigint AND d.state <> 'read'
      AND EXISTS (SELECT FROM ins)
    RETURNING d.name, d.priority
), new AS (
    INSERT INTO deliveries
        (name, number, state, delivered_at, read_at, mentioned, priority, created_at)
    SELECT r.name, ins.number, r.state, r.delivered_at, r.read_at, r.mentioned,
           %(priority)s, %(created_at)s
    FROM ins, unnest(%(names)s::text[], %(states)s::text[], %(delivered_at)s::timestamptz[],
                     %(read_at)s::timestamptz[], %(mentioned)s::boolean[])
         AS r(name, state, delivered_at, read_at, mentioned)
    RETURNING name, state
), scopes AS (
    INSERT INTO message_scopes (type, value, number)
    SELECT s.type, s.value, ins.number
    FROM ins, unnest(%(scope_types)s::text[], %(scope_values)s::text[]) AS s(type, value)
), people AS (
    INSERT INTO participants (name, body)
    SELECT p.name, p.body FROM unnest(%(people)s::text[], %(bodies)s::bytea[]) AS p(name, body)
    WHERE EXISTS (SELECT FROM ins)
    ORDER BY p.name
    ON CONFLICT (name) DO NOTHING
), counted AS ({
    _COUNT.format(
        steps="(SELECT name, %(priority)s AS priority, 1 AS step FROM new WHERE state <> 'read'"
        " UNION ALL SELECT name, priority, -1 FROM parent_read)"
    )
})
SELECT number FROM ins
"""

# Moves deliveries forward: each (name, number) of the changes at most once, to `delivered`
# at d_at (only from `pending`) and/or to `read` at r_at. The rows are locked in order
# first; the counts follow the moves to `read`. {changes} yields (name, number, d_at, r_at);
# {moved} is what it answers of the moved rows.
_MOVE = f"""
WITH c AS ({{changes}}), locked AS (
    SELECT d.name, d.number FROM deliveries d JOIN c ON d.name = c.name AND d.number = c.number
    ORDER BY d.name, d.number
    FOR UPDATE OF d
), moved AS (
    UPDATE deliveries d SET
        state = CASE WHEN c.r_at IS NOT NULL THEN 'read' ELSE 'delivered' END,
        delivered_at = CASE WHEN d.state = 'pending' AND c.d_at IS NOT NULL THEN c.d_at
                       ELSE coalesce(d.delivered_at, c.r_at) END,
        read_at = coalesce(c.r_at, d.read_at)
    FROM locked l JOIN c ON c.name = l.name AND c.number = l.number
    WHERE d.name = l.name AND d.number = l.number
      AND ((d.state = 'pending' AND (c.d_at IS NOT NULL OR c.r_at IS NOT NULL))
           OR (d.state = 'delivered' AND c.r_at IS NOT NULL))
    RETURNING d.name, d.number, d.priority, d.state
), counted AS ({
    _COUNT.format(steps="(SELECT name, priority, -1 AS step FROM moved WHERE state = 'read')")
})
SELECT {{moved}} FROM moved
"""
# What a move answers: how many moved (``advance``), or which (``mark_read``, one reader's).
_HOW_MANY = "count(*)"
_WHICH = "coalesce(array_agg(number ORDER BY number), '{}')"
_CHANGES = (
    "SELECT * FROM unnest(%(names)s::text[], %(numbers)s::bigint[], %(d_at)s::timestamptz[],"
    " %(r_at)s::timestamptz[]) AS c(name, number, d_at, r_at)"
)
_ADVANCE = _MOVE.format(changes=_CHANGES, moved=_HOW_MANY)
_READ_LISTED = _MOVE.format(
    changes="SELECT DISTINCT %(name)s::text AS name, number, NULL::timestamptz AS d_at,"
    " %(at)s::timestamptz AS r_at FROM unnest(%(numbers)s::bigint[]) AS n(number)",
    moved=_WHICH,
)
_READ_THREAD = _MOVE.format(
    changes="SELECT %(name)s::text AS name, number, NULL::timestamptz AS d_at,"
    " %(at)s::timestamptz AS r_at FROM messages WHERE thread_id = %(thread_id)s",
    moved=_WHICH,
)
_READ_ALL = _MOVE.format(
    changes="SELECT name, number, NULL::timestamptz AS d_at, %(at)s::timestamptz AS r_at"
    " FROM deliveries WHERE name = %(name)s AND state <> 'read'",
    moved=_WHICH,
)

_encode = msgspec.msgpack.Encoder().encode
_decode_message = msgspec.msgpack.Decoder(MailMessage).decode
_decode_participant = msgspec.msgpack.Decoder(Participant).decode
_decode_space = msgspec.msgpack.Decoder(Space).decode
_decode_project = msgspec.msgpack.Decoder(Project).decode
_decode_version = msgspec.msgpack.Decoder(MessageVersion).decode
_LOCK_COLUMNS = "resource, holder, mode, acquired_at, expires_at"

# Best first among what %(name)s may read, ranked as memory search ranks (ts_rank over 1 +
# log of the length, times how many of the words a message holds), newer first on a tie.
_SEARCH = f"""
SELECT {_MESSAGE_COLUMNS} FROM messages m
WHERE m.search @@ %(query)s::tsquery AND NOT m.deleted
  AND (m.sender = %(name)s OR m.space = ANY(%(readable)s)
       OR EXISTS (SELECT FROM deliveries d WHERE d.name = %(name)s AND d.number = m.number))
  AND (%(only)s::text[] IS NULL OR m.space IS NULL OR m.space = ANY(%(only)s::text[]))
ORDER BY ts_rank(m.search, %(query)s::tsquery, 1) * (
             SELECT count(*) FROM unnest(%(terms)s::tsquery[]) t WHERE m.search @@ t
         ) DESC, m.number DESC
LIMIT %(limit)s
"""
_MAX_WORD_BYTES = 2047  # of a lexeme
_MAX_POSITION = 16383  # a lexeme's last position: the words after it are all there
_MAX_POSITIONS = 256  # a lexeme's most positions: postgres keeps the first
# Of the 1 MB a tsvector may hold: each lexeme takes its bytes and at most 12 more, and
# all the positions past each lexeme's first fewer than 16383 * 2 bytes.
_VECTOR_BYTES = 768 * 1024


class PostgresMail:
    """``PostgresStorage.mail``: a ``MailStore`` on the storage's pool and worker threads."""

    def __init__(self, run: _Run, closed: Callable[[], bool], schema: str) -> None:
        self._run = run  # raises StorageError once the store is closed
        self._closed = closed
        self._schema = schema

    async def _nothing(self) -> None:
        """A call that needs no statement still checkpoints, and fails on a closed store."""
        await trio.lowlevel.checkpoint()
        if self._closed():
            raise StorageError("The store is closed.")

    async def _write(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """``fn`` run to its end: cancelled before it begins, nothing is written."""
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
            result = await self._run(what, fn)
        return result

    # --- participants ---------------------------------------------------------------

    async def put_participant(self, participant: Participant) -> None:
        params = (participant.name, _encode(_stored(participant)))
        await self._write(
            f"Storing the participant {participant.name!r}",
            lambda conn: conn.execute(
                "INSERT INTO participants (name, body) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                params,
            ),
        )

    async def participants(self) -> list[Participant]:
        rows = await self._run(
            "Reading the participants",
            lambda conn: conn.execute(
                'SELECT body FROM participants ORDER BY name COLLATE "C"'
            ).fetchall(),
        )
        return [_decode_participant(row[0]) for row in rows]

    # --- posting ----------------------------------------------------------------------

    async def post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        *,
        parent: ParentChange | None = None,
        new_participants: Sequence[Participant] = (),
        from_space: FromSpace | None = None,
    ) -> tuple[MailMessage, bool]:
        # The msg_id is the sequence's, laid over the body when read; encoded now, so a
        # message that cannot be stored fails before anything is written.
        body = _encode(msgspec.structs.replace(message, msg_id=""))
        created_at = utc(message.created_at)
        scopes = list(dict.fromkeys((ref.type, ref.value) for ref in message.scopes))
        people = list({p.name: p for p in reversed(new_participants)}.values())  # the first
        parent_number = None
        if parent is not None:
            parent_number = number_of(parent.msg_id)
            if parent_number is None:
                parent_number = -1  # no msg_id: never stored
        params: dict[str, Any] = {
            "sender": message.sender,
            "key": message.idempotency_key,
            "thread_id": message.thread_id,
            "channel": message.channel,
            "priority": message.priority,
            "created_at": created_at,
            "body": body,
            "space": message.space,
            "deleted": message.deleted,
            "pinned": message.pinned,
            "parent": parent_number,
            "parent_id": parent.msg_id if parent is not None else None,
            "start_thread": parent is not None and parent.start_thread,
            "answered": parent is not None and parent.answered,
            "run_id": message.run_id,
            "read_by": parent.read_by if parent is not None else None,
            **_deliveries(deliveries),
            "scope_types": [type_ for type_, _ in scopes],
            "scope_values": [value for _, value in scopes],
            "people": [p.name for p in people],
            "bodies": [_encode(_stored(p)) for p in people],
        }

        key = message.idempotency_key
        space = message.space if from_space is not None else None

        def repeated(conn: psycopg.Connection[Any]) -> MailMessage | None:
            """The message stored first with this sender and key, if any."""
            if key is None:
                return None
            first = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
                " WHERE m.sender = %s AND m.idempotency_key = %s",
                (message.sender, key),
            ).fetchone()
            return None if first is None else _message(*first)

        def insert(conn: psycopg.Connection[Any]) -> tuple[MailMessage, bool]:
            row = conn.execute(_POST, params).fetchone()
            if row is not None:
                return _message(row[0], params["body"], message.thread_id, None, None), True
            # Nothing inserted: the key was used (by a post committed before this
            # statement began, or while it waited on the unique key), or no parent.
            if (first := repeated(conn)) is not None:
                return first, False
            if parent is not None:
                raise StorageError(f"The parent message {parent.msg_id} is not stored.")
            raise StorageError("The message was not stored.")  # never: nothing else skips it

        def post(conn: psycopg.Connection[Any]) -> tuple[MailMessage, bool]:
            # Made here, in the worker thread: a long message takes a while to split.
            params["search"] = None if message.deleted else _search_vector(message.content)
            if key is None and space is None:
                return insert(conn)
            with conn.pipeline(), conn.transaction():
                if key is not None:
                    # Posts with one key take turns (a lock per schema, sender and key,
                    # held to the commit), so the post's statement sees the one before it
                    # committed: the first takes the next number, and a repeat takes
                    # none. Without the turns, racing posts would each take a number, and
                    # the one that inserts first would win, not always the one numbered
                    # first.
                    lock = _lock_key("mail-key", self._schema, message.sender, key)
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                if space is not None and from_space is not None:
                    # The space's members as of now: a membership changed before is
                    # committed (set_member holds the lock exclusively to its commit), and
                    # one changing now waits for this post to commit. The members are
                    # read by a statement begun after the lock is held, so it sees them.
                    conn.execute(
                        "SELECT pg_advisory_xact_lock_shared(%s)", (self._space_lock(space),)
                    )
                    members = conn.execute(
                        'SELECT name FROM space_members WHERE space = %s ORDER BY name COLLATE "C"',
                        (space,),
                    ).fetchall()
                    try:
                        posted, given = with_members(
                            message, deliveries, [name for (name,) in members], from_space
                        )
                    except NotAMember:  # a repeat still answers with the first
                        if (first := repeated(conn)) is not None:
                            return first, False
                        raise
                    params["body"] = _encode(msgspec.structs.replace(posted, msg_id=""))
                    params.update(_deliveries(given))
                return insert(conn)

        return await self._write(f"Posting a message from {message.sender!r}", post)

    # --- moving deliveries ----------------------------------------------------------------

    async def advance(self, changes: Sequence[StateChange]) -> int:
        # Each (name, number) once: the first move to `delivered` before any to `read`, and
        # the first to `read`. Applied one by one from any state, the changes end where
        # _MOVE takes that pair (a state never goes back; later times are never written).
        moves: dict[tuple[str, int], list[datetime | None]] = {}
        for change in changes:
            number = number_of(change.msg_id)
            if number is None or change.state == "pending":
                continue
            move = moves.setdefault((change.name, number), [None, None])
            if move[1] is not None:
                continue  # `read`: no later change moves it
            if change.state == "read":
                move[1] = utc(change.at)
            elif move[0] is None:
                move[0] = utc(change.at)
        if not moves:
            await self._nothing()
            return 0
        keys = sorted(moves)
        params = {
            "names": [name for name, _ in keys],
            "numbers": [number for _, number in keys],
            "d_at": [moves[key][0] for key in keys],
            "r_at": [moves[key][1] for key in keys],
        }
        row = await self._write(
            "Moving deliveries", lambda conn: conn.execute(_ADVANCE, params).fetchone()
        )
        assert row is not None
        return int(row[0])

    async def mark_read(
        self,
        name: str,
        at: datetime,
        *,
        msg_ids: Sequence[str] | None = None,
        thread_id: str | None = None,
    ) -> list[str]:
        params: dict[str, Any] = {"name": name, "at": utc(at)}
        if msg_ids is not None:
            statement = _READ_LISTED
            params["numbers"] = [n for n in map(number_of, msg_ids) if n is not None]
        elif thread_id is not None:
            statement = _READ_THREAD
            params["thread_id"] = thread_id
        else:
            statement = _READ_ALL
        row = await self._write(
            f"Marking the mail of {name!r} read",
            lambda conn: conn.execute(statement, params).fetchone(),
        )
        assert row is not None
        return [msg_id_of(number) for number in row[0]]

    # --- changes to messages, spaces, projects, locks -------------------------------------

    async def change_message(self, msg_id: str, change: MessageChange) -> MailMessage | None:
        number = number_of(msg_id)
        if number is None:
            await self._nothing()
            return None

        def change_it(conn: psycopg.Connection[Any]) -> MailMessage | None:
            with conn.transaction():
                row = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.number = %s FOR UPDATE",
                    (number,),
                ).fetchone()
                if row is None:
                    return None
                message, replaced = changed(_message(*row), change)
                edited = replaced is not None and not message.deleted
                conn.execute(
                    "UPDATE messages SET body = %(body)s, deleted = %(deleted)s,"
                    " pinned = %(pinned)s, search = CASE WHEN %(deleted)s THEN NULL"
                    # a reaction or a pin leaves the words as they were
                    " WHEN %(edited)s THEN %(search)s::tsvector ELSE search END"
                    " WHERE number = %(number)s",
                    {
                        "body": _encode(msgspec.structs.replace(message, msg_id="")),
                        "deleted": message.deleted,
                        "pinned": message.pinned,
                        "edited": edited,
                        "search": _search_vector(message.content) if edited else None,
                        "number": number,
                    },
                )
                if replaced is not None:
                    conn.execute(
                        "INSERT INTO message_versions (number, version, body) VALUES (%s, %s, %s)",
                        (number, replaced.version, _encode(replaced)),
                    )
                return message

        return await self._write(f"Changing the message {msg_id}", change_it)

    async def put_space(self, space: Space) -> None:
        params = (space.name, _encode(msgspec.structs.replace(space, members=0, messages=0)))
        await self._write(
            f"Storing the space {space.name!r}",
            lambda conn: conn.execute(
                "INSERT INTO spaces (name, body) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                params,
            ),
        )

    def _space_lock(self, space: str) -> int:
        """The advisory lock a post to ``space`` shares, and a change of its members holds."""
        return _lock_key("mail-space", self._schema, space)

    async def set_member(self, space: str, name: str, at: datetime, *, member: bool) -> bool:
        lock = self._space_lock(space)
        if member:
            statement = (
                "INSERT INTO space_members (space, name, joined_at) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING"
            )
            params: tuple[Any, ...] = (space, name, utc(at))
        else:
            statement = "DELETE FROM space_members WHERE space = %s AND name = %s"
            params = (space, name)

        def set_it(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                return conn.execute(statement, params).rowcount

        moved = await self._write(f"Changing the members of {space!r}", set_it)
        return moved > 0

    async def put_project(self, project: Project) -> None:
        params = (project.name, _encode(project))
        await self._write(
            f"Storing the project {project.name!r}",
            lambda conn: conn.execute(
                "INSERT INTO projects (name, body) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                params,
            ),
        )

    async def delete_project(self, name: str) -> bool:
        deleted = await self._write(
            f"Deleting the project {name!r}",
            lambda conn: conn.execute("DELETE FROM projects WHERE name = %s", (name,)).rowcount,
        )
        return deleted > 0

    async def take_lock(self, lock: LockHolder, now: datetime) -> tuple[bool, list[LockHolder]]:
        key = _lock_key("mail-lock", self._schema, lock.resource)

        def take(conn: psycopg.Connection[Any]) -> tuple[bool, list[LockHolder]]:
            # One resource's takers take turns, on every daemon: a lock of the resource.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                conn.execute(
                    "DELETE FROM locks WHERE resource = %s AND expires_at <= %s",
                    (lock.resource, utc(now)),
                )
                live = [
                    _lock(*row)
                    for row in conn.execute(
                        f"SELECT {_LOCK_COLUMNS} FROM locks WHERE resource = %s"
                        ' ORDER BY holder COLLATE "C"',
                        (lock.resource,),
                    ).fetchall()
                ]
                others = [h for h in live if h.holder != lock.holder]
                if not lock_allows(others, lock.mode):
                    return False, live
                conn.execute(
                    f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (resource, holder) DO UPDATE SET mode = EXCLUDED.mode,"
                    " expires_at = EXCLUDED.expires_at",
                    (
                        lock.resource,
                        lock.holder,
                        lock.mode,
                        utc(lock.acquired_at),
                        utc(lock.expires_at),
                    ),
                )
                mine = next((h for h in live if h.holder == lock.holder), lock)
                taken = msgspec.structs.replace(lock, acquired_at=mine.acquired_at)
                return True, sorted([*others, taken], key=lambda h: h.holder)

        return await self._write(f"Taking the lock on {lock.resource!r}", take)

    async def release_lock(self, resource: str, holder: str, now: datetime) -> bool:
        key = _lock_key("mail-lock", self._schema, resource)

        def release(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                conn.execute(
                    "DELETE FROM locks WHERE resource = %s AND expires_at <= %s",
                    (resource, utc(now)),
                )
                deleted = conn.execute(
                    "DELETE FROM locks WHERE resource = %s AND holder = %s", (resource, holder)
                ).rowcount
            return deleted > 0

        return await self._write(f"Releasing the lock on {resource!r}", release)

    # --- reads ------------------------------------------------------------------------------

    async def get_message(self, msg_id: str) -> MailMessage | None:
        number = number_of(msg_id)
        if number is None:
            await self._nothing()
            return None
        row = await self._run(
            f"Reading the message {msg_id}",
            lambda conn: conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.number = %s", (number,)
            ).fetchone(),
        )
        return None if row is None else _message(*row)

    async def deliveries(self, msg_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        numbers = list({n for n in map(number_of, msg_ids) if n is not None})
        rows = await self._run(
            "Reading deliveries",
            lambda conn: conn.execute(
                f"SELECT m.number, d.name, {_DELIVERY_COLUMNS}"
                " FROM messages m LEFT JOIN deliveries d ON d.number = m.number"
                ' WHERE m.number = ANY(%s) ORDER BY m.number, d.name COLLATE "C"',
                (numbers,),
            ).fetchall(),
        )
        by_number: dict[int, list[Delivery]] = {}
        for row in rows:  # a message without deliveries: one row of NULLs
            delivered = by_number.setdefault(row[0], [])
            if row[1] is not None:
                delivered.append(_delivery(row[1], *row[2:]))
        found: dict[str, list[Delivery]] = {}
        for msg_id in msg_ids:
            number = number_of(msg_id)
            if number is not None and number in by_number:
                found[msg_id] = [msgspec.structs.replace(d) for d in by_number[number]]
        return found

    async def inbox(
        self, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery]]:
        where = ["d.name = %(name)s", "d.priority >= %(priority_min)s"]
        joined: list[str] = []  # the filters on the message
        params: dict[str, Any] = {
            "name": name,
            "priority_min": query.priority_min,
            "limit": max(limit, 0),
        }
        if before is not None:
            where.append("d.number < %(before)s")
            params["before"] = number_of(before) or 0  # no msg_id: nothing is below it
        if query.unread_only:
            where.append("d.state <> 'read'")
        if query.mentions_only:
            where.append("d.mentioned")
        if query.since is not None:
            where.append("d.created_at >= %(since)s")
            params["since"] = utc(query.since)
        joined.extend(_message_filters(query, params))
        if joined and before is not None:
            # Bounds the messages' side of a merge join too: the planner does not carry
            # d.number < x over to m.number, and would start at the newest message.
            joined.append("m.number < %(before)s")
        statement = _page(where, joined, descending=True)
        rows = await self._run(
            f"Reading the inbox of {name!r}",
            # Planned for these values each time, never as a generic prepared plan: how
            # many rows a name, a `since` or a channel selects decides the plan.
            lambda conn: conn.execute(statement, params, prepare=False).fetchall(),
        )
        return [(_message(*row[:5]), _delivery(name, *row[5:])) for row in rows]

    async def received(
        self, name: str, *, after: str | None, limit: int, pending_only: bool = False
    ) -> list[tuple[MailMessage, Delivery]]:
        where = ["d.name = %(name)s", "d.number > %(after)s"]
        if pending_only:
            where.append("d.state = 'pending'")  # found through deliveries_unread
        params: dict[str, Any] = {"name": name, "after": 0, "limit": max(limit, 0)}
        if after is not None:
            params["after"] = number_of(after) or 0  # no msg_id: from the first
        statement = _page(where, [], descending=False)
        rows = await self._run(
            f"Reading the mail {name!r} received",
            lambda conn: conn.execute(statement, params).fetchall(),
        )
        return [(_message(*row[:5]), _delivery(name, *row[5:])) for row in rows]

    async def newest_received(self, name: str) -> str | None:
        row = await self._run(
            f"Reading the mail {name!r} received",
            lambda conn: conn.execute(
                "SELECT max(number) FROM deliveries WHERE name = %s", (name,)
            ).fetchone(),
        )
        return None if row is None or row[0] is None else msg_id_of(row[0])

    async def unread_counts(self, name: str) -> dict[int, int]:
        rows = await self._run(
            f"Counting the unread mail of {name!r}",
            lambda conn: conn.execute(
                "SELECT priority, count FROM unread_counts WHERE name = %s AND count > 0",
                (name,),
            ).fetchall(),
        )
        return {priority: count for priority, count in rows}

    async def unread_totals(self) -> dict[str, int]:
        rows = await self._run(
            "Counting unread mail",
            lambda conn: conn.execute(
                "SELECT name, sum(count) FROM unread_counts WHERE count > 0 GROUP BY name"
            ).fetchall(),
        )
        return {name: int(total) for name, total in rows}

    async def sent(self, name: str, *, limit: int, before: str | None = None) -> list[MailMessage]:
        below = 2**63 - 1
        if before is not None:
            below = number_of(before) or 0  # no msg_id: nothing is below it
        rows = await self._run(
            f"Reading the mail {name!r} sent",
            lambda conn: conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.sender = %s AND m.number < %s"
                " ORDER BY m.number DESC LIMIT %s",
                (name, below, max(limit, 0)),
            ).fetchall(),
        )
        return [_message(*row) for row in rows]

    async def thread(self, thread_id: str) -> list[MailMessage]:
        rows = await self._run(
            f"Reading the thread {thread_id}",
            lambda conn: conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.thread_id = %s"
                " ORDER BY m.number",
                (thread_id,),
            ).fetchall(),
        )
        return [_message(*row) for row in rows]

    async def messages_after(self, after: str | None, *, limit: int) -> list[MailMessage]:
        start = (None if after is None else number_of(after)) or 0
        rows = await self._run(
            "Reading new mail",
            lambda conn: conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE m.number > %s"
                " ORDER BY m.number LIMIT %s",
                (start, max(limit, 0)),
            ).fetchall(),
        )
        return [_message(*row) for row in rows]

    async def space_mail(
        self, space: str, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery | None]]:
        where = ["m.space = %(space)s", "m.priority >= %(priority_min)s"]
        params: dict[str, Any] = {
            "space": space,
            "name": name,
            "priority_min": query.priority_min,
            "limit": max(limit, 0),
        }
        if before is not None:
            where.append("m.number < %(before)s")
            params["before"] = number_of(before) or 0
        if query.unread_only:
            where.append("d.state <> 'read'")
        if query.mentions_only:
            where.append("d.mentioned")
        if query.since is not None:
            where.append("m.created_at >= %(since)s")
            params["since"] = utc(query.since)
        where.extend(_message_filters(query, params))
        rows = await self._run(
            f"Reading the mail of #{space}",
            lambda conn: conn.execute(
                f"SELECT {_MESSAGE_COLUMNS}, d.name, {_DELIVERY_COLUMNS} FROM messages m"
                " LEFT JOIN deliveries d ON d.name = %(name)s AND d.number = m.number"
                f" WHERE {' AND '.join(where)} ORDER BY m.number DESC LIMIT %(limit)s",
                params,
                prepare=False,
            ).fetchall(),
        )
        return [
            (_message(*row[:5]), None if row[5] is None else _delivery(*row[5:])) for row in rows
        ]

    async def versions(self, msg_id: str) -> list[MessageVersion]:
        number = number_of(msg_id)
        if number is None:
            await self._nothing()
            return []
        rows = await self._run(
            f"Reading the versions of {msg_id}",
            lambda conn: conn.execute(
                "SELECT body FROM message_versions WHERE number = %s ORDER BY version", (number,)
            ).fetchall(),
        )
        return [_decode_version(row[0]) for row in rows]

    async def search(
        self,
        name: str,
        words: Sequence[str],
        *,
        readable_spaces: Sequence[str],
        only_spaces: Sequence[str] | None = None,
        limit: int,
    ) -> list[MailMessage]:
        # Each word a lexeme as _search_vector made it (a \w+ word holds no quote or
        # backslash); one too long to be one is in no message.
        terms = [f"'{word}'" for word in words if len(word.encode()) <= _MAX_WORD_BYTES]
        if not terms or limit < 1:
            await self._nothing()
            return []
        params = {
            "query": " | ".join(terms),
            "terms": terms,
            "name": name,
            "readable": list(readable_spaces),
            "only": None if only_spaces is None else list(only_spaces),
            "limit": limit,
        }
        rows = await self._run(
            f"Searching the mail of {name!r}",
            lambda conn: conn.execute(_SEARCH, params, prepare=False).fetchall(),
        )
        return [_message(*row) for row in rows]

    async def spaces(self) -> list[Space]:
        rows = await self._run(
            "Reading the spaces",
            lambda conn: conn.execute(
                'SELECT body FROM spaces ORDER BY name COLLATE "C"'
            ).fetchall(),
        )
        return [_decode_space(row[0]) for row in rows]

    async def members(self) -> dict[str, list[SpaceMember]]:
        rows = await self._run(
            "Reading the spaces' members",
            lambda conn: conn.execute(
                'SELECT space, name, joined_at FROM space_members ORDER BY space, name COLLATE "C"'
            ).fetchall(),
        )
        found: dict[str, list[SpaceMember]] = {}
        for space, member, joined_at in rows:
            found.setdefault(space, []).append(
                SpaceMember(name=member, joined_at=joined_at.astimezone(UTC))
            )
        return found

    async def space_counts(self) -> dict[str, int]:
        rows = await self._run(
            "Counting the spaces' mail",
            lambda conn: conn.execute(
                "SELECT space, count(*) FROM messages WHERE space IS NOT NULL GROUP BY space"
            ).fetchall(),
        )
        return {space: int(count) for space, count in rows}

    async def projects(self) -> list[Project]:
        rows = await self._run(
            "Reading the projects",
            lambda conn: conn.execute(
                'SELECT body FROM projects ORDER BY name COLLATE "C"'
            ).fetchall(),
        )
        return [_decode_project(row[0]) for row in rows]

    async def locks(
        self, now: datetime, *, resource: str | None = None, holder: str | None = None
    ) -> list[LockHolder]:
        rows = await self._run(
            "Reading the locks",
            lambda conn: conn.execute(
                f"SELECT {_LOCK_COLUMNS} FROM locks WHERE expires_at > %(now)s"
                " AND (%(resource)s::text IS NULL OR resource = %(resource)s::text)"
                " AND (%(holder)s::text IS NULL OR holder = %(holder)s::text)"
                ' ORDER BY resource COLLATE "C", holder COLLATE "C"',
                {"now": utc(now), "resource": resource, "holder": holder},
            ).fetchall(),
        )
        return [_lock(*row) for row in rows]


def websearch_words(words: Sequence[str]) -> str:
    """``websearch_to_tsquery`` text for any of ``words`` (each quoted; ``\\w+`` holds no
    quote), so no user text is ever query syntax."""
    return " or ".join(f'"{word}"' for word in words)


def _search_vector(content: str) -> str:
    """The tsvector, as text, that search matches ``content`` on: each of its words as memory
    search finds them at its positions, up to what a tsvector holds (a word too long to be a
    lexeme is left out)."""
    positions: dict[str, list[int]] = {}
    size = 0
    for n, match in enumerate(WORD.finditer(content), 1):
        word = match.group().lower()
        position = min(n, _MAX_POSITION)
        at = positions.get(word)
        if at is not None:
            if len(at) < _MAX_POSITIONS and at[-1] < position:
                at.append(position)
            continue
        length = len(word.encode())
        if length > _MAX_WORD_BYTES:
            continue
        size += length + 12
        if size > _VECTOR_BYTES:
            break
        positions[word] = [position]
    return " ".join(f"'{word}':{','.join(map(str, at))}" for word, at in positions.items())


def _message_filters(query: InboxQuery, params: dict[str, Any]) -> list[str]:
    """The conditions of ``query`` on the message ``m`` that part 2 added, and the thread,
    channel and scope filters; their parameters go into ``params``."""
    where = []
    if query.thread_id is not None:
        where.append("m.thread_id = %(thread_id)s")
        params["thread_id"] = query.thread_id
    if query.channel is not None:
        where.append("m.channel = %(channel)s")
        params["channel"] = query.channel
    if query.scope is not None:
        where.append(
            "EXISTS (SELECT FROM message_scopes s WHERE s.type = %(scope_type)s"
            " AND s.value = %(scope_value)s AND s.number = m.number)"
        )
        params.update(scope_type=query.scope.type, scope_value=query.scope.value)
    if not query.include_deleted:
        where.append("NOT m.deleted")
    if query.pinned_only:
        where.append("m.pinned")
    if query.only_spaces is not None:
        where.append("(m.space IS NULL OR m.space = ANY(%(only)s::text[]))")
        params["only"] = list(query.only_spaces)
    return where


def _lock(
    resource: str, holder: str, mode: Any, acquired_at: datetime, expires_at: datetime
) -> LockHolder:
    return LockHolder(
        resource=resource,
        holder=holder,
        mode=mode,
        acquired_at=acquired_at.astimezone(UTC),
        expires_at=expires_at.astimezone(UTC),
    )


def _page(where: list[str], joined: list[str], *, descending: bool) -> str:
    """A page of deliveries with their messages, in number order, ``%(limit)s`` long.

    Without filters on the message, the page is cut from the deliveries alone and
    only its own messages are read; with them, the join is filtered, then cut.
    """
    order = "DESC" if descending else ""
    if not joined:
        return (
            f"SELECT {_MESSAGE_COLUMNS}, {_DELIVERY_COLUMNS} FROM ("
            f" SELECT * FROM deliveries d WHERE {' AND '.join(where)}"
            f" ORDER BY d.number {order} LIMIT %(limit)s"
            f") d JOIN messages m ON m.number = d.number ORDER BY d.number {order}"
        )
    return (
        f"SELECT {_MESSAGE_COLUMNS}, {_DELIVERY_COLUMNS}"
        " FROM deliveries d JOIN messages m ON m.number = d.number"
        f" WHERE {' AND '.join(where + joined)} ORDER BY d.number {order} LIMIT %(limit)s"
    )


def _lock_key(*parts: str) -> int:
    """The signed 64-bit ``pg_advisory_xact_lock`` key of ``parts``: ``("mail-key", schema,
    sender, key)`` for an idempotency key, ``("mail-lock", schema, resource)`` for a lock,
    ``("mail-space", schema, space)`` for a space's members."""
    digest = hashlib.blake2b(_encode(parts), digest_size=8, person=b"chinwag")
    return int.from_bytes(digest.digest(), "big", signed=True)


def _deliveries(deliveries: Sequence[Delivery]) -> dict[str, list[Any]]:
    """``_POST``'s parameters for ``deliveries``: one per name, the last."""
    recipients = list({d.name: d for d in deliveries}.values())
    return {
        "names": [d.name for d in recipients],
        "states": [d.state for d in recipients],
        "delivered_at": [_utc_or_none(d.delivered_at) for d in recipients],
        "read_at": [_utc_or_none(d.read_at) for d in recipients],
        "mentioned": [d.mentioned for d in recipients],
    }


def _stored(participant: Participant) -> Participant:
    """What is kept of a participant: presence and unread are the post office's."""
    return msgspec.structs.replace(participant, online=False, unread=0)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else utc(moment)


def _message(
    number: int,
    body: bytes,
    thread_id: str | None,
    answered_by: int | None,
    answered_run_id: str | None,
) -> MailMessage:
    """The stored message: its body with the columns that outrank it laid over."""
    message = _decode_message(body)
    message.msg_id = msg_id_of(number)
    message.thread_id = thread_id
    if answered_by is not None:
        message.answered_by = msg_id_of(answered_by)
        message.run_id = answered_run_id
    return message


def _delivery(
    name: str,
    state: Any,
    delivered_at: datetime | None,
    read_at: datetime | None,
    mentioned: bool,
) -> Delivery:
    return Delivery(
        name=name,
        state=state,
        delivered_at=None if delivered_at is None else delivered_at.astimezone(UTC),
        read_at=None if read_at is None else read_at.astimezone(UTC),
        mentioned=mentioned,
    )
