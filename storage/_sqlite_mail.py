"""The sqlite backend's ``MailStore``: participants, messages and deliveries, in the same file.

It runs on ``SqliteStorage``'s own connections: each write is a function of the
write connection that the store commits as it commits an append (inline on the
loop under ``synchronous=normal``, grouped in the writer thread under ``full``;
one transaction, or one savepoint of a group's, durable and shielded from
cancellation once called), and each read runs on one of its read connections
in a worker thread. Its tables come with the store's schema, as migration 3
(``MAIL_MIGRATION``): a database of an older schema gains them on open, its
conversations untouched.

**Tables.** ``mail_messages`` holds each message encoded (msgpack ``body``,
exactly as the memory index keeps it, so ``structured`` and ``metadata`` read
back alike) beside the columns reads filter and sort on: ``number``, the
rowid (its msg_id is ``msg_id_of(number)``, taken as ``max + 1`` inside the
write's transaction: messages are never deleted, so a number is never given
twice, across restarts too), ``sender``, ``thread_id``, ``channel``,
``priority``, ``created_at`` (``to_text``, so text order is time order) and the
idempotency key, unique per sender. A reply that starts its parent's thread or
answers it rewrites the parent's body and ``thread_id`` in its own transaction.
``mail_scopes`` holds one row per (scope, message), for the inbox's scope filter.

``mail_deliveries`` has one row per (recipient, message), keyed ``(name,
number)`` ``WITHOUT ROWID``: an inbox page is a range scan of the primary key,
newest first, each message found by its rowid. A partial index holds the
deliveries not `read` (``unread_only`` pages, the pending replay), another the
ones that mention their recipient (``mentions_only``), and one by number
serves ``deliveries``. A page filtered by thread is read from the thread's
messages instead (a thread is short, an inbox long).

``mail_unread`` counts, per (name, priority), the deliveries not `read`. Two
triggers keep it: one on each delivery inserted not `read`, one on each that
moves to `read`; so every write keeps it in its own transaction, whatever
statement moved the delivery, and ``unread_counts``/``unread_totals`` read a
handful of rows however long the inbox. ``mail_participants`` holds each
participant as JSON (as ``MailIndex`` copies them: ``to_builtins``), by name.

**Part 2** (migration 4, ``MAIL_SPACES_MIGRATION``). ``mail_messages`` gains
``space``, ``deleted`` and ``pinned`` columns (a schema-3 database fills them
from each body), a partial index by space for space mail and its counts, and
``mail_messages_readers`` (number, sender, space), where search checks who may
read a match. A change rewrites the body and these columns in one write,
``changed()`` deciding it; an edit keeps the version it replaced in
``mail_versions``. ``mail_text`` is an FTS5 table of each message's current
content, by number, with memory search's tokenizer: an edit replaces its row, a
delete removes it. Search ORs the quoted words, keeps the matches the reader may
read, scores only those with ``bm25`` and reads the bodies of the page alone.
Spaces and projects are JSON by name, members one row per (space, name), locks
one row per (resource, holder), taken and released in the write's transaction
as ``lock_allows`` decides.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import msgspec
from chinwag.protocol import (
    DELIVERY_ORDER,
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
    EditChange,
    FromSpace,
    InboxQuery,
    MessageChange,
    ParentChange,
    StateChange,
    changed,
    lock_allows,
    msg_id_of,
    number_of,
    with_members,
)
from ._search import fts5_match
from ._timestamps import from_text, to_text

_T = TypeVar("_T")


class _Run(Protocol):
    """``SqliteStorage``'s ``_write_call`` or ``_read``: ``fn`` on one of its connections."""

    async def __call__(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T: ...


MAIL_MIGRATION: tuple[str, ...] = (
    """
    CREATE TABLE mail_participants (
        name TEXT PRIMARY KEY,
        body TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE mail_messages (
        number INTEGER PRIMARY KEY,
        sender TEXT NOT NULL,
        thread_id TEXT,
        channel TEXT,
        priority INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        idempotency_key TEXT,
        body BLOB NOT NULL
    )
    """,
    """
    CREATE UNIQUE INDEX mail_messages_by_key
        ON mail_messages (sender, idempotency_key) WHERE idempotency_key IS NOT NULL
    """,
    "CREATE INDEX mail_messages_by_sender ON mail_messages (sender, number)",
    """
    CREATE INDEX mail_messages_by_thread
        ON mail_messages (thread_id, number) WHERE thread_id IS NOT NULL
    """,
    """
    CREATE TABLE mail_scopes (
        type TEXT NOT NULL,
        value TEXT NOT NULL,
        number INTEGER NOT NULL REFERENCES mail_messages (number),
        PRIMARY KEY (type, value, number)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE mail_deliveries (
        name TEXT NOT NULL,
        number INTEGER NOT NULL REFERENCES mail_messages (number),
        state TEXT NOT NULL,
        delivered_at TEXT,
        read_at TEXT,
        mentioned INTEGER NOT NULL,
        PRIMARY KEY (name, number)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX mail_deliveries_by_number ON mail_deliveries (number)",
    """
    CREATE INDEX mail_deliveries_unread
        ON mail_deliveries (name, number) WHERE state != 'read'
    """,
    "CREATE INDEX mail_deliveries_mentions ON mail_deliveries (name, number) WHERE mentioned",
    """
    CREATE TABLE mail_unread (
        name TEXT NOT NULL,
        priority INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (name, priority)
    ) WITHOUT ROWID
    """,
    """
    CREATE TRIGGER mail_unread_on_insert AFTER INSERT ON mail_deliveries
    WHEN NEW.state != 'read'
    BEGIN
        INSERT INTO mail_unread (name, priority, count)
        VALUES (NEW.name, (SELECT priority FROM mail_messages WHERE number = NEW.number), 1)
        ON CONFLICT (name, priority) DO UPDATE SET count = count + 1;
    END
    """,
    """
    CREATE TRIGGER mail_unread_on_read AFTER UPDATE OF state ON mail_deliveries
    WHEN OLD.state != 'read' AND NEW.state = 'read'
    BEGIN
        UPDATE mail_unread SET count = count - 1
        WHERE name = NEW.name
            AND priority = (SELECT priority FROM mail_messages WHERE number = NEW.number);
        DELETE FROM mail_unread WHERE name = NEW.name AND count <= 0;
    END
    """,
)

MAIL_SPACES_MIGRATION: tuple[str, ...] = (
    # Part 1 never set these; a message's body is the truth, read by ``body_field``.
    "ALTER TABLE mail_messages ADD COLUMN space TEXT",
    "ALTER TABLE mail_messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE mail_messages ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",
    """
    UPDATE mail_messages SET
        space = mail_body_field(body, 'space'),
        deleted = mail_body_field(body, 'deleted'),
        pinned = mail_body_field(body, 'pinned')
    """,
    """
    CREATE INDEX mail_messages_by_space
        ON mail_messages (space, number) WHERE space IS NOT NULL
    """,
    "CREATE INDEX mail_messages_pinned ON mail_messages (number) WHERE pinned",
    # Who may read a match, for search: a seek here, not into the table's bodies.
    "CREATE INDEX mail_messages_readers ON mail_messages (number, sender, space)",
    """
    CREATE TABLE mail_versions (
        number INTEGER NOT NULL REFERENCES mail_messages (number),
        version INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (number, version)
    ) WITHOUT ROWID
    """,
    """
    CREATE VIRTUAL TABLE mail_text USING fts5 (
        content,
        tokenize = "unicode61 remove_diacritics 0 tokenchars '_'"
    )
    """,
    """
    INSERT INTO mail_text (rowid, content)
    SELECT number, mail_body_field(body, 'content') FROM mail_messages WHERE NOT deleted
    """,
    "CREATE TABLE mail_spaces (name TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID",
    """
    CREATE TABLE mail_members (
        space TEXT NOT NULL,
        name TEXT NOT NULL,
        joined_at TEXT NOT NULL,
        PRIMARY KEY (space, name)
    ) WITHOUT ROWID
    """,
    "CREATE TABLE mail_projects (name TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID",
    """
    CREATE TABLE mail_locks (
        resource TEXT NOT NULL,
        holder TEXT NOT NULL,
        mode TEXT NOT NULL,
        acquired_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        PRIMARY KEY (resource, holder)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX mail_locks_by_holder ON mail_locks (holder)",
)
_encode_message = msgspec.msgpack.Encoder().encode
_decode_message = msgspec.msgpack.Decoder(MailMessage).decode
_encode_participant = msgspec.json.Encoder().encode
_decode_participant = msgspec.json.Decoder(Participant).decode
_encode_json = msgspec.json.Encoder().encode
_decode_space = msgspec.json.Decoder(Space).decode
_decode_project = msgspec.json.Decoder(Project).decode
_decode_version = msgspec.msgpack.Decoder(MessageVersion).decode
_LOCK_COLUMNS = "resource, holder, mode, acquired_at, expires_at"

_DELIVERY_COLUMNS = "d.name, d.state, d.delivered_at, d.read_at, d.mentioned"
_RANK = "CASE state WHEN 'pending' THEN 0 WHEN 'delivered' THEN 1 ELSE 2 END"
# Moves one delivery forward, never back: to `delivered` (its time), or to `read` (its time,
# and the delivery's when it had none). A change to where it stands, or behind, moves nothing.
_ADVANCE = f"""
UPDATE mail_deliveries SET
    state = :state,
    delivered_at = CASE WHEN :state = 'delivered' THEN :at ELSE coalesce(delivered_at, :at) END,
    read_at = CASE WHEN :state = 'read' THEN :at ELSE read_at END
WHERE name = :name AND number = :number AND {_RANK} < :rank
"""
_MARK_READ = """
UPDATE mail_deliveries {} SET
    state = 'read', read_at = :at, delivered_at = coalesce(delivered_at, :at)
WHERE name = :name AND state != 'read'
"""
# Every one of name's deliveries not read yet: the partial index holds exactly them.
_READ_ALL = _MARK_READ.format("INDEXED BY mail_deliveries_unread")
# Those of a thread: its messages, each found in name's primary key range.
_READ_THREAD = (
    _MARK_READ.format("")
    + " AND number IN (SELECT number FROM mail_messages WHERE thread_id = :thread)"
)


def _advanced(conn: sqlite3.Connection, moves: Sequence[dict[str, Any]]) -> set[tuple[str, int]]:
    """Apply each of ``moves`` (``_ADVANCE``'s parameters); the (name, number) of each
    delivery that moved. Each cursor is closed here: one handed back to the loop and
    finalized there would touch the connection while the writer thread uses it."""
    moved = set()
    for params in moves:
        cursor = conn.execute(_ADVANCE, params)
        if cursor.rowcount:
            moved.add((params["name"], params["number"]))
        cursor.close()
    return moved


class SqliteMail:
    """A ``MailStore`` in the tables of a ``SqliteStorage``, on its connections."""

    def __init__(self, write: _Run, read: _Run) -> None:
        self._write = write  # fn(write connection) in a transaction of its own, committed
        self._read = read  # fn(a read connection), in a worker thread

    # --- writes -------------------------------------------------------------------

    async def put_participant(self, participant: Participant) -> None:
        body = _participant_body(participant)

        def put(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO mail_participants (name, body) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                (participant.name, body),
            )

        await self._write(f"Writing the participant {participant.name!r}", put)

    async def post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        *,
        parent: ParentChange | None = None,
        new_participants: Sequence[Participant] = (),
        from_space: FromSpace | None = None,
    ) -> tuple[MailMessage, bool]:
        fresh = [(p.name, _participant_body(p)) for p in new_participants]
        scopes = {(ref.type, ref.value) for ref in message.scopes}
        try:
            created_at = to_text(message.created_at)
        except ValueError as exc:
            raise StorageError(f"The message's created_at is not usable: {exc}.") from exc

        def post(conn: sqlite3.Connection) -> tuple[MailMessage, bool]:
            key = message.idempotency_key
            if key is not None:
                row = conn.execute(
                    "SELECT body FROM mail_messages WHERE sender = ? AND idempotency_key = ?",
                    (message.sender, key),
                ).fetchone()
                if row is not None:
                    return _decode_message(row[0]), False
            if from_space is not None and message.space is not None:
                found = conn.execute(
                    "SELECT name FROM mail_members WHERE space = ? ORDER BY name",
                    (message.space,),
                ).fetchall()
                members = [name for (name,) in found]
                posted, given = with_members(message, deliveries, members, from_space)
            else:
                posted, given = message, list(deliveries)
            rows = [_delivery_row(d) for d in {d.name: d for d in given}.values()]
            (number,) = conn.execute(
                "SELECT coalesce(max(number), 0) + 1 FROM mail_messages"
            ).fetchone()
            stored = msgspec.structs.replace(posted, msg_id=msg_id_of(number))
            body = _encode_message(stored)
            if parent is not None:
                _change_parent(conn, parent, stored, created_at)
            conn.execute(
                "INSERT INTO mail_messages (number, sender, thread_id, channel, priority,"
                " created_at, idempotency_key, body, space, deleted, pinned)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    number,
                    message.sender,
                    message.thread_id,
                    message.channel,
                    message.priority,
                    created_at,
                    key,
                    body,
                    message.space,
                    message.deleted,
                    message.pinned,
                ),
            )
            if not message.deleted:
                conn.execute(
                    "INSERT INTO mail_text (rowid, content) VALUES (?, ?)",
                    (number, message.content),
                )
            conn.executemany(
                "INSERT INTO mail_scopes (type, value, number) VALUES (?, ?, ?)",
                [(type_, value, number) for type_, value in scopes],
            )
            conn.executemany(
                "INSERT INTO mail_deliveries (number, name, state, delivered_at, read_at,"
                " mentioned) VALUES (?, ?, ?, ?, ?, ?)",
                [(number, *row) for row in rows],
            )
            conn.executemany(
                "INSERT INTO mail_participants (name, body) VALUES (?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                fresh,
            )
            return _decode_message(body), True

        return await self._write(f"Posting mail from {message.sender!r}", post)

    async def advance(self, changes: Sequence[StateChange]) -> int:
        moves = [
            {
                "state": change.state,
                "at": to_text(change.at),
                "name": change.name,
                "number": number,
                "rank": DELIVERY_ORDER[change.state],
            }
            for change in changes
            if (number := number_of(change.msg_id)) is not None
        ]
        if not moves:
            return 0

        def move(conn: sqlite3.Connection) -> int:
            return len(_advanced(conn, moves))

        moved: int = await self._write("Moving deliveries forward", move)
        return moved

    async def mark_read(
        self,
        name: str,
        at: datetime,
        *,
        msg_ids: Sequence[str] | None = None,
        thread_id: str | None = None,
    ) -> list[str]:
        when = to_text(at)
        params: dict[str, Any] = {"name": name, "at": when, "thread": thread_id}

        def mark(conn: sqlite3.Connection) -> set[int]:
            if msg_ids is not None:
                numbers = {n for n in map(number_of, msg_ids) if n is not None}
                moves = [
                    {"state": "read", "at": when, "name": name, "number": n, "rank": 2}
                    for n in numbers
                ]
                return {number for _, number in _advanced(conn, moves)}
            statement = _READ_THREAD if thread_id is not None else _READ_ALL
            rows = conn.execute(statement + " RETURNING number", params)
            return {number for (number,) in rows}

        moved: set[int] = await self._write(f"Marking the mail of {name!r} read", mark)
        return [msg_id_of(number) for number in sorted(moved)]

    async def change_message(self, msg_id: str, change: MessageChange) -> MailMessage | None:
        number = number_of(msg_id)
        if number is None:
            return None

        def change_it(conn: sqlite3.Connection) -> MailMessage | None:
            row = conn.execute(
                "SELECT body FROM mail_messages WHERE number = ?", (number,)
            ).fetchone()
            if row is None:
                return None
            message, replaced = changed(_decode_message(row[0]), change)
            body = _encode_message(message)
            conn.execute(
                "UPDATE mail_messages SET body = ?, deleted = ?, pinned = ? WHERE number = ?",
                (body, message.deleted, message.pinned, number),
            )
            if replaced is not None:
                conn.execute(
                    "INSERT INTO mail_versions (number, version, body) VALUES (?, ?, ?)",
                    (number, replaced.version, _encode_message(replaced)),
                )
            if message.deleted:
                conn.execute("DELETE FROM mail_text WHERE rowid = ?", (number,))
            elif isinstance(change, EditChange):
                conn.execute(
                    "UPDATE mail_text SET content = ? WHERE rowid = ?", (message.content, number)
                )
            return _decode_message(body)

        return await self._write(f"Changing the message {msg_id}", change_it)

    async def put_space(self, space: Space) -> None:
        body = _json(msgspec.structs.replace(space, members=0, messages=0), "space")
        await self._write(
            f"Writing the space {space.name!r}",
            lambda conn: conn.execute(
                "INSERT INTO mail_spaces (name, body) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                (space.name, body),
            ).close(),
        )

    async def set_member(self, space: str, name: str, at: datetime, *, member: bool) -> bool:
        when = to_text(at)

        def set_it(conn: sqlite3.Connection) -> bool:
            if member:
                cursor = conn.execute(
                    "INSERT INTO mail_members (space, name, joined_at) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (space, name, when),
                )
            else:
                cursor = conn.execute(
                    "DELETE FROM mail_members WHERE space = ? AND name = ?", (space, name)
                )
            moved: bool = cursor.rowcount > 0
            cursor.close()
            return moved

        return await self._write(f"Changing the members of {space!r}", set_it)

    async def put_project(self, project: Project) -> None:
        body = _json(project, "project")
        await self._write(
            f"Writing the project {project.name!r}",
            lambda conn: conn.execute(
                "INSERT INTO mail_projects (name, body) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                (project.name, body),
            ).close(),
        )

    async def delete_project(self, name: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM mail_projects WHERE name = ?", (name,))
            found: bool = cursor.rowcount > 0
            cursor.close()
            return found

        return await self._write(f"Deleting the project {name!r}", delete)

    async def take_lock(self, lock: LockHolder, now: datetime) -> tuple[bool, list[LockHolder]]:
        when = to_text(now)

        def take(conn: sqlite3.Connection) -> tuple[bool, list[LockHolder]]:
            conn.execute(
                "DELETE FROM mail_locks WHERE resource = ? AND expires_at <= ?",
                (lock.resource, when),
            ).close()
            live = [
                _lock(row)
                for row in conn.execute(
                    f"SELECT {_LOCK_COLUMNS} FROM mail_locks WHERE resource = ? ORDER BY holder",
                    (lock.resource,),
                ).fetchall()
            ]
            others = [h for h in live if h.holder != lock.holder]
            if not lock_allows(others, lock.mode):
                return False, live
            mine = next((h for h in live if h.holder == lock.holder), None)
            taken = (
                lock
                if mine is None
                else msgspec.structs.replace(lock, acquired_at=mine.acquired_at)
            )
            conn.execute(
                f"INSERT OR REPLACE INTO mail_locks ({_LOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (
                    taken.resource,
                    taken.holder,
                    taken.mode,
                    to_text(taken.acquired_at),
                    to_text(taken.expires_at),
                ),
            ).close()
            return True, sorted([*others, taken], key=lambda h: h.holder)

        return await self._write(f"Taking the lock on {lock.resource!r}", take)

    async def release_lock(self, resource: str, holder: str, now: datetime) -> bool:
        when = to_text(now)

        def release(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "DELETE FROM mail_locks WHERE resource = ? AND expires_at <= ?", (resource, when)
            ).close()
            cursor = conn.execute(
                "DELETE FROM mail_locks WHERE resource = ? AND holder = ?", (resource, holder)
            )
            held: bool = cursor.rowcount > 0
            cursor.close()
            return held

        return await self._write(f"Releasing the lock on {resource!r}", release)

    # --- reads --------------------------------------------------------------------

    async def participants(self) -> list[Participant]:
        rows = await self._read(
            "Reading the participants",
            lambda conn: conn.execute(
                "SELECT body FROM mail_participants ORDER BY name"
            ).fetchall(),
        )
        return [_decode_participant(body) for (body,) in rows]

    async def get_message(self, msg_id: str) -> MailMessage | None:
        number = number_of(msg_id)
        if number is None:
            return None
        row = await self._read(
            f"Reading the message {msg_id}",
            lambda conn: conn.execute(
                "SELECT body FROM mail_messages WHERE number = ?", (number,)
            ).fetchone(),
        )
        return None if row is None else _decode_message(row[0])

    async def deliveries(self, msg_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        wanted = {n: msg_id for msg_id in msg_ids if (n := number_of(msg_id)) is not None}
        if not wanted:
            return {}
        numbers = msgspec.json.encode(list(wanted)).decode()
        rows = await self._read(
            "Reading deliveries",
            lambda conn: conn.execute(
                f"SELECT m.number, {_DELIVERY_COLUMNS} FROM mail_messages AS m"
                " LEFT JOIN mail_deliveries AS d ON d.number = m.number"
                " WHERE m.number IN (SELECT value FROM json_each(?))"
                " ORDER BY m.number, d.name",
                (numbers,),
            ).fetchall(),
        )
        found: dict[int, list[Delivery]] = {}
        for row in rows:
            every = found.setdefault(row[0], [])
            if row[1] is not None:  # None: a message with no delivery
                every.append(_delivery(row[1:]))
        return {msg_id: found[n] for n, msg_id in wanted.items() if n in found}

    async def inbox(
        self, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery]]:
        bound = None if before is None else number_of(before)
        if limit < 1 or (before is not None and bound is None):
            return []
        sql, params = _inbox_sql(name, query, limit, bound)
        rows = await self._read(
            f"Reading the inbox of {name!r}", lambda conn: conn.execute(sql, params).fetchall()
        )
        return [(_decode_message(row[0]), _delivery(row[1:])) for row in rows]

    async def received(
        self, name: str, *, after: str | None, limit: int, pending_only: bool = False
    ) -> list[tuple[MailMessage, Delivery]]:
        if limit < 1:
            return []
        start = (None if after is None else number_of(after)) or 0
        if pending_only:
            source = "mail_deliveries AS d INDEXED BY mail_deliveries_unread"
            pending = " AND d.state != 'read' AND d.state = 'pending'"
        else:
            source, pending = "mail_deliveries AS d", ""
        sql = (
            f"SELECT m.body, {_DELIVERY_COLUMNS} FROM {source}"
            " CROSS JOIN mail_messages AS m ON m.number = d.number"
            f" WHERE d.name = ? AND d.number > ?{pending} ORDER BY d.number LIMIT ?"
        )
        rows = await self._read(
            f"Reading the mail {name!r} received",
            lambda conn: conn.execute(sql, (name, start, limit)).fetchall(),
        )
        return [(_decode_message(row[0]), _delivery(row[1:])) for row in rows]

    async def newest_received(self, name: str) -> str | None:
        row = await self._read(
            f"Reading the mail {name!r} received",
            lambda conn: conn.execute(
                "SELECT max(number) FROM mail_deliveries WHERE name = ?", (name,)
            ).fetchone(),
        )
        return None if row[0] is None else msg_id_of(row[0])

    async def unread_counts(self, name: str) -> dict[int, int]:
        rows = await self._read(
            f"Counting the unread mail of {name!r}",
            lambda conn: conn.execute(
                "SELECT priority, count FROM mail_unread WHERE name = ? AND count > 0", (name,)
            ).fetchall(),
        )
        return dict(rows)

    async def unread_totals(self) -> dict[str, int]:
        rows = await self._read(
            "Counting the unread mail",
            lambda conn: conn.execute(
                "SELECT name, sum(count) FROM mail_unread WHERE count > 0 GROUP BY name"
            ).fetchall(),
        )
        return dict(rows)

    async def sent(self, name: str, *, limit: int, before: str | None = None) -> list[MailMessage]:
        bound = None if before is None else number_of(before)
        if limit < 1 or (before is not None and bound is None):
            return []
        rows = await self._read(
            f"Reading the mail {name!r} sent",
            lambda conn: conn.execute(
                "SELECT body FROM mail_messages WHERE sender = ? AND number < ?"
                " ORDER BY number DESC LIMIT ?",
                (name, bound if bound is not None else 1 << 62, limit),
            ).fetchall(),
        )
        return [_decode_message(body) for (body,) in rows]

    async def thread(self, thread_id: str) -> list[MailMessage]:
        rows = await self._read(
            f"Reading the thread {thread_id}",
            lambda conn: conn.execute(
                "SELECT body FROM mail_messages WHERE thread_id = ? ORDER BY number", (thread_id,)
            ).fetchall(),
        )
        return [_decode_message(body) for (body,) in rows]

    async def messages_after(self, after: str | None, *, limit: int) -> list[MailMessage]:
        start = (None if after is None else number_of(after)) or 0
        rows = await self._read(
            "Reading new mail",
            lambda conn: conn.execute(
                "SELECT body FROM mail_messages WHERE number > ? ORDER BY number LIMIT ?",
                (start, max(limit, 0)),
            ).fetchall(),
        )
        return [_decode_message(body) for (body,) in rows]

    async def space_mail(
        self, space: str, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery | None]]:
        bound = None if before is None else number_of(before)
        if limit < 1 or (before is not None and bound is None):
            return []
        sql, params = _space_mail_sql(space, name, query, limit, bound)
        rows = await self._read(
            f"Reading the mail of #{space}", lambda conn: conn.execute(sql, params).fetchall()
        )
        return [
            (_decode_message(row[0]), None if row[1] is None else _delivery(row[1:]))
            for row in rows
        ]

    async def versions(self, msg_id: str) -> list[MessageVersion]:
        number = number_of(msg_id)
        if number is None:
            return []
        rows = await self._read(
            f"Reading the versions of {msg_id}",
            lambda conn: conn.execute(
                "SELECT body FROM mail_versions WHERE number = ? ORDER BY version", (number,)
            ).fetchall(),
        )
        return [_decode_version(body) for (body,) in rows]

    async def search(
        self,
        name: str,
        words: Sequence[str],
        *,
        readable_spaces: Sequence[str],
        only_spaces: Sequence[str] | None = None,
        limit: int,
    ) -> list[MailMessage]:
        if not words or limit < 1:
            return []
        params = {
            "match": fts5_match(words),
            "name": name,
            "readable": _json_list(readable_spaces),
            "only": None if only_spaces is None else _json_list(only_spaces),
            "limit": limit,
        }
        rows = await self._read(
            f"Searching the mail of {name!r}",
            lambda conn: conn.execute(_SEARCH, params).fetchall(),
        )
        return [_decode_message(body) for (body,) in rows]

    async def spaces(self) -> list[Space]:
        rows = await self._read(
            "Reading the spaces",
            lambda conn: conn.execute("SELECT body FROM mail_spaces ORDER BY name").fetchall(),
        )
        return [_decode_space(body) for (body,) in rows]

    async def members(self) -> dict[str, list[SpaceMember]]:
        rows = await self._read(
            "Reading the spaces' members",
            lambda conn: conn.execute(
                "SELECT space, name, joined_at FROM mail_members ORDER BY space, name"
            ).fetchall(),
        )
        found: dict[str, list[SpaceMember]] = {}
        for space, name, joined_at in rows:
            found.setdefault(space, []).append(
                SpaceMember(name=name, joined_at=from_text(joined_at))
            )
        return found

    async def space_counts(self) -> dict[str, int]:
        rows = await self._read(
            "Counting the spaces' mail",
            lambda conn: conn.execute(
                "SELECT space, count(*) FROM mail_messages INDEXED BY mail_messages_by_space"
                " WHERE space IS NOT NULL GROUP BY space"
            ).fetchall(),
        )
        return dict(rows)

    async def projects(self) -> list[Project]:
        rows = await self._read(
            "Reading the projects",
            lambda conn: conn.execute("SELECT body FROM mail_projects ORDER BY name").fetchall(),
        )
        return [_decode_project(body) for (body,) in rows]

    async def locks(
        self, now: datetime, *, resource: str | None = None, holder: str | None = None
    ) -> list[LockHolder]:
        rows = await self._read(
            "Reading the locks",
            lambda conn: conn.execute(
                f"SELECT {_LOCK_COLUMNS} FROM mail_locks WHERE expires_at > ?"
                " AND (? IS NULL OR resource = ?) AND (? IS NULL OR holder = ?)"
                " ORDER BY resource, holder",
                (to_text(now), resource, resource, holder, holder),
            ).fetchall(),
        )
        return [_lock(row) for row in rows]


# Best bm25 first (newer first on a tie), among what :name may read: mail to it (one
# primary-key probe of its deliveries per match: gathering a long inbox's numbers first
# cost ~10 ms a search at 60,000 deliveries, whatever the words), its own mail,
# mail in a space it may read; none deleted (they are not in mail_text), and with :only,
# space mail only of those spaces. Each match is checked in mail_messages_readers, far
# smaller than the table, and scored only when readable; bodies are read for the page only.
_SEARCH = """
SELECT m.body FROM (
    SELECT t.rowid AS number, bm25(mail_text) AS score
    FROM mail_text AS t
        CROSS JOIN mail_messages AS r INDEXED BY mail_messages_readers ON r.number = t.rowid
    WHERE mail_text MATCH :match
        AND (EXISTS (SELECT 1 FROM mail_deliveries AS d WHERE d.name = :name
                AND d.number = t.rowid)
            OR r.sender = :name
            OR r.space IN (SELECT value FROM json_each(:readable)))
        AND (:only IS NULL OR r.space IS NULL OR r.space IN (SELECT value FROM json_each(:only)))
    ORDER BY score, number DESC
    LIMIT :limit
) AS best CROSS JOIN mail_messages AS m ON m.number = best.number
ORDER BY best.score, best.number DESC
"""


def body_field(body: bytes, field: str) -> Any:
    """A field of a stored message's body, for SQL (``mail_body_field``, migration 4)."""
    value = getattr(_decode_message(body), field)
    return int(value) if isinstance(value, bool) else value


# --- in the write's transaction ----------------------------------------------------------


def _change_parent(
    conn: sqlite3.Connection, parent: ParentChange, reply: MailMessage, at: str
) -> None:
    """Apply ``parent`` to the message ``reply`` answers; raises when it is not stored."""
    number = number_of(parent.msg_id)
    row = (
        None
        if number is None
        else conn.execute("SELECT body FROM mail_messages WHERE number = ?", (number,)).fetchone()
    )
    if row is None:
        raise StorageError(f"The parent message {parent.msg_id} is not stored.")
    stored = _decode_message(row[0])
    changed = False
    if parent.start_thread and stored.thread_id is None:
        stored.thread_id = stored.msg_id
        changed = True
    if parent.answered:
        stored.answered_by = reply.msg_id
        stored.run_id = reply.run_id
        changed = True
    if changed:
        conn.execute(
            "UPDATE mail_messages SET thread_id = ?, body = ? WHERE number = ?",
            (stored.thread_id, _encode_message(stored), number),
        )
    if parent.read_by is not None:
        conn.execute(
            _ADVANCE,
            {"state": "read", "at": at, "name": parent.read_by, "number": number, "rank": 2},
        )


# --- building and reading rows -----------------------------------------------------------


def _space_mail_sql(
    space: str, name: str, query: InboxQuery, limit: int, bound: int | None
) -> tuple[str, dict[str, Any]]:
    """The space mail page's statement: the space's messages newest first, each with
    ``name``'s delivery or none. Filtered by thread, it starts from the thread's
    messages, else by pinned, from the pinned ones: either is mostly far shorter."""
    params: dict[str, Any] = {"name": name, "space": space, "limit": limit}
    where = ["m.space = :space", *_filters(query, params)]
    if query.thread_id is not None:
        where.append("m.thread_id = :thread")
        params["thread"] = query.thread_id
    if query.scope is not None:
        where.append(_IN_SCOPE)
        params["scope_type"] = query.scope.type
        params["scope_value"] = query.scope.value
    if bound is not None:
        where.append("m.number < :before")
        params["before"] = bound
    if query.thread_id is not None:
        index = "mail_messages_by_thread"
    elif query.pinned_only:
        index = "mail_messages_pinned"
    else:
        index = "mail_messages_by_space"
    sql = (
        f"SELECT m.body, {_DELIVERY_COLUMNS} FROM mail_messages AS m INDEXED BY {index}"
        " LEFT JOIN mail_deliveries AS d ON d.name = :name AND d.number = m.number"
        f" WHERE {' AND '.join(where)} ORDER BY m.number DESC LIMIT :limit"
    )
    return sql, params


def _inbox_sql(
    name: str, query: InboxQuery, limit: int, bound: int | None
) -> tuple[str, dict[str, Any]]:
    """The inbox page's statement: a range scan of ``name``'s deliveries, newest first.

    Filtered by thread, it starts from the thread's messages instead, else by pinned,
    from the pinned messages, else by scope, from the scope's: each is mostly far
    shorter.
    """
    params: dict[str, Any] = {"name": name, "limit": limit}
    where = []
    if query.thread_id is not None:
        source = (
            "mail_messages AS m CROSS JOIN mail_deliveries AS d"
            " ON d.name = :name AND d.number = m.number"
        )
        where.append("m.thread_id = :thread")
        params["thread"] = query.thread_id
        key = "m.number"
    elif query.pinned_only:
        source = (
            "mail_messages AS m INDEXED BY mail_messages_pinned CROSS JOIN mail_deliveries AS d"
            " ON d.name = :name AND d.number = m.number"
        )
        key = "m.number"
    elif query.scope is not None:
        source = (
            "mail_scopes AS s CROSS JOIN mail_deliveries AS d"
            " ON d.name = :name AND d.number = s.number"
            " CROSS JOIN mail_messages AS m ON m.number = s.number"
        )
        key = "s.number"
    else:
        deliveries = "mail_deliveries AS d"
        if query.unread_only:
            deliveries += " INDEXED BY mail_deliveries_unread"
        elif query.mentions_only:
            deliveries += " INDEXED BY mail_deliveries_mentions"
        source = f"{deliveries} CROSS JOIN mail_messages AS m ON m.number = d.number"
        where.append("d.name = :name")
        key = "d.number"
    if bound is not None:
        where.append(f"{key} < :before")
        params["before"] = bound
    if query.scope is not None:
        if key == "s.number":
            where.append("s.type = :scope_type AND s.value = :scope_value")
        else:
            where.append(_IN_SCOPE)
        params["scope_type"] = query.scope.type
        params["scope_value"] = query.scope.value
    where.extend(_filters(query, params))
    sql = (
        f"SELECT m.body, {_DELIVERY_COLUMNS} FROM {source} WHERE {' AND '.join(where)}"
        f" ORDER BY {key} DESC LIMIT :limit"
    )
    return sql, params


_IN_SCOPE = (
    "EXISTS (SELECT 1 FROM mail_scopes AS s WHERE s.type = :scope_type"
    " AND s.value = :scope_value AND s.number = m.number)"
)


def _filters(query: InboxQuery, params: dict[str, Any]) -> list[str]:
    """The conditions of ``query`` on ``m`` (a message) and ``d`` (the reader's delivery)
    that neither choose nor order the rows; their parameters go into ``params``."""
    where = ["m.priority >= :priority"]
    params["priority"] = query.priority_min
    if query.unread_only:
        where.append("d.state != 'read'")
    if query.mentions_only:
        where.append("d.mentioned")
    if query.channel is not None:
        where.append("m.channel = :channel")
        params["channel"] = query.channel
    if query.since is not None:
        where.append("m.created_at >= :since")
        params["since"] = to_text(query.since)
    if not query.include_deleted:
        where.append("NOT m.deleted")
    if query.pinned_only:
        where.append("m.pinned")
    if query.only_spaces is not None:
        where.append("(m.space IS NULL OR m.space IN (SELECT value FROM json_each(:only)))")
        params["only"] = _json_list(query.only_spaces)
    return where


def _json_list(values: Sequence[str]) -> str:
    return msgspec.json.encode(list(values)).decode()


def _json(value: Space | Project, what: str) -> str:
    try:
        return _encode_json(value).decode()
    except (TypeError, UnicodeEncodeError, OverflowError) as exc:
        raise StorageError(f"The {what} {value.name!r} could not be encoded: {exc}.") from exc


def _lock(row: Sequence[Any]) -> LockHolder:
    return LockHolder(
        resource=row[0],
        holder=row[1],
        mode=row[2],
        acquired_at=from_text(row[3]),
        expires_at=from_text(row[4]),
    )


def _participant_body(participant: Participant) -> str:
    """What is kept of a participant: presence and unread are the post office's."""
    stored = msgspec.structs.replace(participant, online=False, unread=0)
    try:
        return _encode_participant(stored).decode()
    except (TypeError, UnicodeEncodeError, OverflowError) as exc:
        raise StorageError(
            f"The participant {participant.name!r} could not be encoded: {exc}."
        ) from exc


def _delivery_row(delivery: Delivery) -> tuple[str, str, str | None, str | None, int]:
    return (
        delivery.name,
        delivery.state,
        None if delivery.delivered_at is None else to_text(delivery.delivered_at),
        None if delivery.read_at is None else to_text(delivery.read_at),
        int(delivery.mentioned),
    )


def _delivery(row: Sequence[Any]) -> Delivery:
    """A delivery from ``_DELIVERY_COLUMNS``."""
    return Delivery(
        name=row[0],
        state=row[1],
        delivered_at=None if row[2] is None else from_text(row[2]),
        read_at=None if row[3] is None else from_text(row[3]),
        mentioned=bool(row[4]),
    )
