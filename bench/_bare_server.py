"""Bare trio servers on a Unix socket: the baselines chinwag is measured against.

    python -m bench._bare_server echo PATH     # every frame straight back: a round trip
    python -m bench._bare_server stream PATH   # chinwag's frames, with none of its work
    python -m bench._bare_server durable PATH DB full|normal   # `stream` + chinwag's commits

`stream` answers `hello` with `welcome` and a `stream` with the frames the
echo model's run would send (`start`, one `text_delta` per token, `usage`,
`end`), each encoded by msgspec as the daemon encodes it, but with no runtime,
no storage and no fan-out. Paced content (`/slow N MS`) sleeps MS ms before each
token and writes each frame at once, as the echo model paces a run; anything
else is sent as fast as the socket takes it, frames coalesced into writes of
up to 64 KiB (the daemon coalesces too).

`durable` (raw-durable) is `stream` plus the sqlite commits a chinwag run makes,
with the same `synchronous`, done inline on the event loop with no thread hop
and nothing else: the floor of chinwag's durable path. DB is a WAL database
with the daemon's `conversations` and `entries` tables and indexes (as of
chinwag's schema version 2); a run inserts its user entry and moves the
conversation's `last_seq` and `updated_at` in one transaction, committed
before `start` (a new conversation's row is inserted in that same
transaction: the least a new conversation needs); then, with the words, usage
and everything before it written out, the assistant entry the same way before
`end`.
"""

from __future__ import annotations

import sqlite3
import sys
import uuid
from datetime import UTC, datetime

import trio
from chinwag.protocol import (
    MSGPACK,
    End,
    FrameDecoder,
    Hello,
    Start,
    Stream,
    TextDelta,
    Usage,
    Welcome,
)

READ_CHUNK = 65536
COALESCE_BYTES = 65536


async def echo(stream: trio.SocketStream) -> None:
    decoder = FrameDecoder(1 << 30)
    async with stream:
        while data := await stream.receive_some(READ_CHUNK):
            decoder.feed(data)
            for body in decoder:
                await stream.send_all(len(body).to_bytes(4, "big") + body)


class Ledger:
    """Each conversation's last seq, in memory: all the `stream` server keeps."""

    durable = False

    def __init__(self) -> None:
        self.last_seq: dict[tuple[str, str], int] = {}

    def append(self, agent: str, sender: str, role: str, content: str, run_id: str) -> int:
        """Store one entry; its seq."""
        key = (agent, sender)
        seq = self.last_seq[key] = self.last_seq.get(key, 0) + 1
        return seq


# chinwag's two tables of schema version 1 (storage/_sqlite.py at commit ec5b901), with the
# indexes every append moves: the floor must write what the daemon writes. A copy, not
# an import: the baseline must stay put while the daemon's storage changes, and it runs
# in the bench's interpreter, which need not hold the chinwag measured.
SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS conversations (
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
    """CREATE INDEX IF NOT EXISTS conversations_by_updated
        ON conversations (updated_at DESC, id DESC)""",
    """CREATE INDEX IF NOT EXISTS conversations_by_agent
        ON conversations (agent, updated_at DESC, id DESC)""",
    """
    CREATE TABLE IF NOT EXISTS entries (
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
    """CREATE INDEX IF NOT EXISTS entries_compact_markers
        ON entries (conversation_id, seq) WHERE kind = 'compact'""",
)


class Journal(Ledger):
    """The same, committed to sqlite, blocking the loop for each commit (see the docstring)."""

    durable = True

    def __init__(self, db: str, synchronous: str) -> None:
        super().__init__()
        self.ids: dict[tuple[str, str], int] = {}
        self.conn = sqlite3.connect(db, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self.conn.execute("PRAGMA foreign_keys = ON")
        for statement in SCHEMA:
            self.conn.execute(statement)

    def append(self, agent: str, sender: str, role: str, content: str, run_id: str) -> int:
        key = (agent, sender)
        # The daemon's text form of a timestamp: UTC, six fractional digits, a Z.
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        if key not in self.ids:
            self.ids[key] = (
                conn.execute(
                    "INSERT INTO conversations (agent, sender, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?)",
                    (agent, sender, now, now),
                ).lastrowid
                or 0
            )
        conv_id = self.ids[key]
        seq = super().append(agent, sender, role, content, run_id)
        conn.execute(
            "INSERT INTO entries (conversation_id, seq, kind, role, content, agent, tool_calls,"
            " tool_call_id, is_error, run_id, created_at, archive)"
            " VALUES (?, ?, 'message', ?, ?, '', NULL, NULL, 0, ?, ?, NULL)",
            (conv_id, seq, role, content, run_id, now),
        )
        conn.execute(
            "UPDATE conversations SET last_seq = ?, updated_at = ? WHERE id = ?",
            (seq, now, conv_id),
        )
        conn.execute("COMMIT")
        return seq


def tokens(content: str) -> tuple[list[str], float]:
    """The words a run of the echo model streams for ``content``, and its pacing in s."""
    directive, _, rest = content.strip().partition(" ")
    if directive == "/slow":
        count, delay_ms = (float(part) for part in rest.split())
        return [str(i) for i in range(1, int(count) + 1)], delay_ms / 1000
    return content.split(), 0.0


async def run(stream: trio.SocketStream, lock: trio.Lock, msg: Stream, ledger: Ledger) -> None:
    words, delay = tokens(msg.content)
    rid = msg.id
    run_id = uuid.uuid4().hex
    out = bytearray()

    async def emit(frame: bytes | bytearray, flush: bool) -> None:
        out.extend(frame)
        if flush or len(out) >= COALESCE_BYTES:
            async with lock:
                await stream.send_all(bytes(out))
            out.clear()

    sender = msg.sender or ""
    seq = ledger.append(msg.agent, sender, "user", msg.content, run_id)
    await emit(
        MSGPACK.encode_frame(Start(id=rid, run_id=run_id, agent=msg.agent, seq=seq)),
        flush=bool(delay),
    )
    for i, word in enumerate(words):
        if delay:
            await trio.sleep(delay)
        delta = word if i == 0 else " " + word
        await emit(MSGPACK.encode_frame(TextDelta(id=rid, delta=delta)), flush=bool(delay))
    n = len(words)
    usage = Usage(
        id=rid, prompt_tokens=n, completion_tokens=n, context_tokens=2 * n, context_window=32768
    )
    # Durable: what the run said goes out before its answer's commit, as the daemon's does.
    await emit(MSGPACK.encode_frame(usage), flush=ledger.durable)
    last_seq = ledger.append(msg.agent, sender, "assistant", " ".join(words), run_id)
    await emit(
        MSGPACK.encode_frame(End(id=rid, status="done", error=None, last_seq=last_seq)), flush=True
    )


async def streams(stream: trio.SocketStream, ledger: Ledger) -> None:
    decoder = FrameDecoder(1 << 30)
    lock = trio.Lock()
    async with stream, trio.open_nursery() as nursery:
        while data := await stream.receive_some(READ_CHUNK):
            decoder.feed(data)
            for body in decoder:
                msg = MSGPACK.decode_client(body)
                if isinstance(msg, Hello):
                    welcome = Welcome(
                        protocol=1, server="bare", agents=["assistant"], max_frame_bytes=1 << 24
                    )
                    async with lock:
                        await stream.send_all(MSGPACK.encode_frame(welcome))
                elif isinstance(msg, Stream):
                    nursery.start_soon(run, stream, lock, msg, ledger)
        nursery.cancel_scope.cancel()


async def main(mode: str, path: str, *store: str) -> None:
    if mode == "echo":
        handler = echo
    else:
        ledger = Journal(*store) if mode == "durable" else Ledger()

        async def handler(stream: trio.SocketStream) -> None:
            await streams(stream, ledger)

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(4096)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left

    await trio.serve_listeners(handle, [listener])


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], *sys.argv[3:])
