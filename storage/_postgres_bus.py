"""The postgres store's ``Bus``: LISTEN/NOTIFY between the daemons, and a row of liveness each.

**Mailboxes.** Each daemon LISTENs on a channel of its own and on one that
every daemon of the schema listens on (for ``send(None, ...)``); channels are
named after a hash of the schema, so that stores in other schemas of the same
database never hear each other. NOTIFY carries at most 8000 bytes, so a
message is cut into pieces of at most ``PIECE_BYTES`` (on UTF-8 character
boundaries), each headed ``SENDER NUMBER INDEX COUNT``: the number also
keeps identical messages apart, which postgres would otherwise fold into one
within a transaction. Everything queued is sent by one statement, so one
transaction (``pg_notify`` over arrays), on a connection of its own with
``synchronous_commit`` off: a NOTIFY needs no durability, and a transaction
that notifies would otherwise wait for a WAL flush. Postgres delivers one
session's notifications in commit order, so messages arrive in the order they
were queued. The listening connection is read by a worker thread of its own,
which hands each notification to the trio loop (``run_sync_soon``) as it comes.

**Liveness.** ``daemons`` (migration 7) holds a row per daemon: who and
where it is, its heartbeat (``beat_at``, moved every ``BEAT_S``), the backend
pids of its listening and claim connections, and its runs in flight. A daemon
is alive while its beat is younger than ``DEAD_AFTER_S`` *and* its listening
backend exists: a daemon killed outright drops its connections, which the
server sees at once; one cut off by the network stops beating, and the server
drops its sessions (and with them its claims' advisory locks) once TCP
keepalives give up (``TCP_SETTINGS``: a few seconds).

**Holders.** A conversation's holder is read from ``pg_locks``: the claim is a
session advisory lock, so the backend holding it is the daemon's claim
connection, whose pid its row names. Nothing is written per claim, and a dead
daemon holds nothing the moment its session ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import secrets
import threading
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

import psycopg
import structlog
import trio

from ._bus import Node, Peer
from ._errors import StorageError
from ._search import one_line
from ._timestamps import utc

log = structlog.get_logger("chinwag.bus")

_T = TypeVar("_T")

BEAT_S = 1.0  # how often a daemon beats and reads who else is alive
DEAD_AFTER_S = 3.5  # a beat older than this: the daemon is gone
FORGET_AFTER = "1 hour"  # a dead daemon's row is deleted by the next daemon to join after this
PIECE_BYTES = 7800  # of a NOTIFY payload, header included; postgres takes 8000 at most
LISTEN_WAIT_S = 0.25  # how long the listening thread waits before it checks whether to stop
RECONNECT_S = 0.5

# Settings for every connection to a shared store (libpq's `options`): the server
# notices a silent network loss within seconds, not the hours TCP would take, and
# ends the session, which frees its advisory locks. Ignored on a Unix socket.
TCP_SETTINGS = (
    "-c tcp_keepalives_idle=1 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3"
    " -c tcp_user_timeout=4000"
)
# The client side of the same: a query on a connection the network lost fails
# within seconds instead of hanging.
CLIENT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 4000,
}

DAEMONS_MIGRATION: tuple[str, ...] = (
    """
    CREATE TABLE daemons (
        id text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        address text NOT NULL,
        started_at timestamptz NOT NULL,
        beat_at timestamptz NOT NULL,
        listen_pid integer NOT NULL,
        claims_pid integer,
        runs integer NOT NULL DEFAULT 0
    )
    """,
)

_LIVE = """
SELECT id, host, pid, address, started_at, beat_at, runs FROM daemons
WHERE beat_at > now() - make_interval(secs => %s)
  AND listen_pid IN (SELECT pid FROM pg_stat_activity)
ORDER BY started_at, id
"""

_BEAT = """
UPDATE daemons SET beat_at = now(), listen_pid = %s, claims_pid = %s, runs = %s WHERE id = %s
"""

_JOIN = """
INSERT INTO daemons (id, host, pid, address, started_at, beat_at, listen_pid, claims_pid)
VALUES (%s, %s, %s, %s, now(), now(), %s, %s)
ON CONFLICT (id) DO UPDATE SET beat_at = now(), listen_pid = EXCLUDED.listen_pid,
    claims_pid = EXCLUDED.claims_pid
"""

_HOLDERS = """
SELECT d.id, l.classid::bigint, l.objid::bigint FROM pg_locks l
JOIN daemons d ON d.claims_pid = l.pid
WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND (l.classid::bigint, l.objid::bigint) IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))
"""


class _Run(Protocol):
    """``PostgresStorage._run``: ``fn`` on a pooled connection in a worker thread."""

    async def __call__(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T: ...


class PostgresBus:
    """The ``Bus`` of the daemons on one postgres schema; one per ``PostgresStorage``."""

    def __init__(
        self,
        conninfo: str,
        schema: str,
        *,
        run: _Run,
        lock_key: Callable[[str, str], int],
        claims_pid: Callable[[], int | None],
    ) -> None:
        self.me = secrets.token_hex(6)
        self._conninfo = conninfo
        self._run = run
        self._lock_key = lock_key
        self._claims_pid = claims_pid
        prefix = "chinwag_" + hashlib.blake2b(schema.encode(), digest_size=6).hexdigest()
        self._everyone = f"{prefix}_all"
        self._channel = f"{prefix}_{self.me}"
        self._prefix = prefix
        self._numbers = itertools.count()
        self._outgoing: deque[tuple[str, str]] = deque()  # (channel, payload piece)
        self._queued = trio.Event()
        self._pieces: dict[tuple[str, str], list[str]] = {}  # a message being put back together
        self._listener: psycopg.Connection[Any] | None = None  # the listening thread's
        self._sender: psycopg.Connection[Any] | None = None  # used under _sending only
        self._sending = trio.CapacityLimiter(1)
        self._stopping = threading.Event()
        self._whoami: tuple[str, int, str] = ("", 0, "")  # host, pid, address: for its row

    # --- sending ----------------------------------------------------------------

    def send(self, to: str | None, text: str) -> None:
        channel = self._everyone if to is None else f"{self._prefix}_{to}"
        self._outgoing.extend((channel, piece) for piece in self._cut(text))
        self._queued.set()

    def _cut(self, text: str) -> list[str]:
        """``text`` as NOTIFY payloads, each headed with who sent it and where it fits."""
        number = next(self._numbers)
        data = text.encode()
        room = PIECE_BYTES - 64  # the header: two ids and three counts
        if len(data) <= room:
            return [f"{self.me} {number} 0 1 {text}"]
        bodies = []
        start = 0
        while start < len(data):
            end = min(start + room, len(data))
            while end < len(data) and data[end] & 0xC0 == 0x80:  # inside a UTF-8 character
                end -= 1
            bodies.append(data[start:end].decode())
            start = end
        count = len(bodies)
        return [f"{self.me} {number} {i} {count} {body}" for i, body in enumerate(bodies)]

    async def _send_queued(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            batch = list(self._outgoing)
            self._outgoing.clear()
            try:
                await trio.to_thread.run_sync(self._notify, batch, limiter=self._sending)
            except psycopg.Error as exc:
                log.warning("bus_send_failed", messages=len(batch), error=error_line(exc))

    def _notify(self, batch: list[tuple[str, str]]) -> None:
        """Worker thread, holding ``_sending``: every piece in one transaction."""
        conn = self._sending_connection()
        try:
            conn.execute(
                "SELECT count(pg_notify(c, p)) FROM unnest(%s::text[], %s::text[]) AS m(c, p)",
                ([c for c, _ in batch], [p for _, p in batch]),
            )
        except psycopg.Error:
            conn.close()
            raise

    def _sending_connection(self) -> psycopg.Connection[Any]:
        conn = self._sender
        if conn is None or conn.closed:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            conn.execute("SET synchronous_commit = off")
            self._sender = conn
        return conn

    # --- listening --------------------------------------------------------------

    def _listen(self, token: trio.lowlevel.TrioToken, node: Node) -> None:
        """Worker thread: hand every notification to the loop until told to stop.

        A broken connection is reopened (and listens again); what was sent
        meanwhile is lost, as the bus promises.
        """
        while not self._stopping.is_set():
            conn = self._listener
            try:
                if conn is None or conn.closed:
                    conn = self._listen_connection()
                for notification in conn.notifies(timeout=LISTEN_WAIT_S):
                    token.run_sync_soon(self._heard, notification.payload, node)
            except psycopg.Error as exc:
                log.warning("bus_listen_failed", error=error_line(exc))
                if conn is not None:
                    conn.close()
                self._stopping.wait(RECONNECT_S)
            except trio.RunFinishedError:
                return
        if self._listener is not None:
            self._listener.close()

    def _listen_connection(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            conn.execute(f'LISTEN "{self._channel}"')
            conn.execute(f'LISTEN "{self._everyone}"')
        except BaseException:
            conn.close()
            raise
        self._listener = conn
        return conn

    def _heard(self, payload: str, node: Node) -> None:
        """On the loop: one piece of a message; the message goes to ``node`` once whole."""
        sender, number, index, count, body = payload.split(" ", 4)
        if sender == self.me:  # its own broadcast
            return
        if count == "1":
            node.received(sender, body)
            return
        key = (sender, number)
        pieces = self._pieces.setdefault(key, [])
        if int(index) != len(pieces):  # a piece went missing (a connection was reopened)
            del self._pieces[key]
            return
        pieces.append(body)
        if len(pieces) == int(count):
            del self._pieces[key]
            node.received(sender, "".join(pieces))

    # --- liveness -----------------------------------------------------------------

    async def serve(
        self,
        node: Node,
        *,
        host: str,
        pid: int,
        address: str,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        token = trio.lowlevel.current_trio_token()
        self._whoami = (host, pid, address)
        try:
            await trio.to_thread.run_sync(self._listen_connection, limiter=self._sending)
            await trio.to_thread.run_sync(self._join, limiter=self._sending)
        except psycopg.Error as exc:
            raise StorageError(f"Joining the other daemons failed: {error_line(exc)}.") from exc
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_queued)
                nursery.start_soon(self._beat_forever, node)
                nursery.start_soon(self._listen_in_thread, token, node)
                task_status.started()
        finally:
            self._stopping.set()
            with trio.CancelScope(shield=True), contextlib.suppress(psycopg.Error):
                await trio.to_thread.run_sync(self._leave, limiter=self._sending)

    async def _listen_in_thread(self, token: trio.lowlevel.TrioToken, node: Node) -> None:
        # Abandoned on cancellation: the thread sees _stopping within LISTEN_WAIT_S and
        # closes its connection itself.
        await trio.to_thread.run_sync(self._listen, token, node, abandon_on_cancel=True)

    def _join(self) -> None:
        """Worker thread, holding ``_sending``: this daemon's row, written (again)."""
        conn = self._sending_connection()
        listener = self._listener
        listen_pid = listener.info.backend_pid if listener is not None else 0
        conn.execute("DELETE FROM daemons WHERE beat_at < now() - %s::interval", (FORGET_AFTER,))
        conn.execute(_JOIN, (self.me, *self._whoami, listen_pid, self._claims_pid()))

    def _leave(self) -> None:
        self._sending_connection().execute("DELETE FROM daemons WHERE id = %s", (self.me,))
        if self._sender is not None:
            self._sender.close()

    async def _beat_forever(self, node: Node) -> None:
        live: frozenset[str] = frozenset()
        while True:
            try:
                peers = await trio.to_thread.run_sync(
                    self._beat, node.runs_in_flight(), limiter=self._sending
                )
                now_live = frozenset(peer.id for peer in peers) | {self.me}
            except psycopg.Error as exc:
                log.warning("bus_beat_failed", error=error_line(exc))
                now_live = frozenset({self.me})  # cut off: no other daemon can be reached
            if now_live != live:
                live = now_live
                node.peers_changed(live)
            await trio.sleep(BEAT_S)

    def _beat(self, runs: int) -> list[Peer]:
        """Worker thread, holding ``_sending``: move this daemon's beat, read who is alive."""
        conn = self._sending_connection()
        listener = self._listener
        listen_pid = listener.info.backend_pid if listener is not None else 0
        try:
            with conn.transaction():
                moved = conn.execute(_BEAT, (listen_pid, self._claims_pid(), runs, self.me))
                if moved.rowcount == 0:  # taken for dead and forgotten meanwhile
                    raise _Forgotten
                rows = conn.execute(_LIVE, (DEAD_AFTER_S,)).fetchall()
        except _Forgotten:  # a long pause (a network loss): back with a new row
            log.warning("bus_rejoined", daemon=self.me)
            self._join()
            return self._beat(runs)
        except psycopg.Error:
            conn.close()
            raise
        return [_peer(row) for row in rows]

    async def peers(self) -> list[Peer]:
        def live(conn: psycopg.Connection[Any]) -> list[Peer]:
            return [_peer(row) for row in conn.execute(_LIVE, (DEAD_AFTER_S,)).fetchall()]

        return await self._run("Reading the daemons", live)

    async def holders(
        self, conversations: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], str]:
        if not conversations:
            await trio.lowlevel.checkpoint()
            return {}
        by_lock = {self._lock_key(*key): key for key in conversations}
        high = [(key >> 32) & 0xFFFFFFFF for key in by_lock]
        low = [key & 0xFFFFFFFF for key in by_lock]

        def read(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(_HOLDERS, (high, low)).fetchall()

        rows = await self._run("Reading who holds the conversations", read)
        held = {}
        for daemon, classid, objid in rows:
            key = (classid << 32) | objid
            if key >= 1 << 63:  # back to the signed key
                key -= 1 << 64
            held[by_lock[key]] = daemon
        return held


class _Forgotten(Exception):
    """This daemon's row was gone at its beat."""


def _peer(row: tuple[Any, ...]) -> Peer:
    id_, host, pid, address, started_at, beat_at, runs = row
    return Peer(
        id=id_,
        host=host,
        pid=pid,
        address=address,
        started_at=utc(started_at),
        beat_at=utc(beat_at),
        runs=runs,
    )


def error_line(exc: BaseException) -> str:
    """The error's message on one line, without a closing period (ours adds one)."""
    return one_line(str(exc)).rstrip(".") or type(exc).__name__
