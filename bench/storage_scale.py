"""Lazy loading at scale, and what an append costs over a raw commit.

(1) Start-up: a daemon over a store of 10,000 conversations x 20 entries, from
spawn to its first `pong`, and its RSS after listing a page of conversations;
baseline: a bare Python process that imports trio and answers on a Unix socket.
(2) Append cost per step (an assistant entry and its tool result) through
`Storage.append`, against a raw sqlite3 INSERT + COMMIT of the same rows in the
same run, with the same `synchronous` setting.

    python -m bench.storage_scale [--conversations 10000] [--entries 20]
        [--backends sqlite,jsonl,postgres] [--postgres URL]

postgres runs in a schema of its own on the server at ``--postgres`` (default
``$CHINWAG_TEST_POSTGRES``, else the local test database), dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import trio
from chinwag.protocol import MSGPACK, Entry, FrameDecoder, Hello, Ping, Pong, ToolCallInfo
from chinwag.storage import open_store
from psycopg import sql

from . import _processes
from ._report import Baseline, Figure, Target

# Fills a store in the daemon's interpreter, so that its own chinwag writes the schema
# it reads: `fill(url, conversations, entries, prefix)`.
FILL = """
import sys, trio
from bench.storage_scale import populate
url, prefix = sys.argv[1], sys.argv[4]
trio.run(populate, url, int(sys.argv[2]), int(sys.argv[3]), prefix)
"""


def fill(url: str, conversations: int, entries: int, prefix: str = "s") -> None:
    """`populate`, run by the daemon's Python (see `_processes.daemon_python`)."""
    _processes.in_daemon_python(FILL, url, str(conversations), str(entries), prefix)


BASELINE_SERVER = r"""
import socket, sys, trio
async def main(path):
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(path); sock.listen(16)
    async def handle(stream):
        async with stream:
            while await stream.receive_some(65536):
                await stream.send_all(b"\x00\x00\x00\x01x")
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])
trio.run(main, sys.argv[1])
"""


def step(n: int) -> list[Entry]:
    now = datetime.now(UTC)
    call = ToolCallInfo(call_id=f"call_{n}", name="set_title", arguments='{"title": "x"}')
    return [
        Entry(seq=0, role="assistant", content="", tool_calls=[call], run_id="r", created_at=now),
        Entry(
            seq=0,
            role="tool",
            content="Title set.",
            tool_call_id=call.call_id,
            run_id="r",
            created_at=now,
        ),
    ]


async def populate(url: str, conversations: int, entries: int, prefix: str = "s") -> None:
    """``conversations`` of the agent `assistant`, senders ``prefix`` + n, of ``entries``
    entries each (user and assistant turns), each written in one append."""
    async with open_store(url) as store:
        now = datetime.now(UTC)
        batch = [
            Entry(
                seq=0,
                role="user" if i % 2 == 0 else "assistant",
                content=f"message {i}",
                created_at=now,
            )
            for i in range(entries)
        ]
        limiter = trio.CapacityLimiter(64)

        async def one(n: int) -> None:
            async with limiter:
                sender = f"{prefix}{n}"
                await store.create_conversation("assistant", sender, cwd=None, created_at=now)
                await store.append("assistant", sender, batch)

        async with trio.open_nursery() as nursery:
            for n in range(conversations):
                nursery.start_soon(one, n)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def ping_when_up(path: Path, proc: subprocess.Popen[bytes], hello: bool) -> float:
    """Seconds from now until the server answers one request on ``path``."""
    started = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                decoder = FrameDecoder(1 << 30)
                msgs = [Hello(protocol=1, client="bench"), Ping(id=1)] if hello else [Ping(id=1)]
                for msg in msgs:
                    s.sendall(MSGPACK.encode_frame(msg))
                wanted = len(msgs)
                while wanted:
                    decoder.feed(s.recv(65536))
                    for body in decoder:
                        wanted -= 1
                        if hello and wanted == 0:
                            assert isinstance(MSGPACK.decode_server(body), Pong)
                return time.perf_counter() - started
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.002)


def measure_startup(url: str, root: Path) -> tuple[float, int]:
    sock = root / "d.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            _processes.daemon_python,
            "-m",
            "chinwag.daemon",
            "--socket",
            str(sock),
            "--storage",
            url,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, CHINWAG_CONFIG=str(root / "none.toml")),
    )
    try:
        seconds = ping_when_up(sock, proc, hello=True)
        # List a page, as a client would, then read the footprint.
        from chinwag.protocol import ListConversations

        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(MSGPACK.encode_frame(Hello(protocol=1, client="bench")))
            s.sendall(MSGPACK.encode_frame(ListConversations(id=2, limit=100)))
            decoder, frames = FrameDecoder(1 << 30), 0
            while frames < 2:
                decoder.feed(s.recv(1 << 20))
                frames += sum(1 for _ in decoder)
        return seconds, rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(20)


def measure_baseline_startup(root: Path) -> tuple[float, int]:
    sock = root / "b.sock"
    sock.unlink(missing_ok=True)  # a bare server stopped by SIGTERM leaves it behind
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(sock)])
    try:
        return ping_when_up(sock, proc, hello=False), rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(20)


async def append_cost(url: str, steps: int) -> float:
    async with open_store(url) as store:
        now = datetime.now(UTC)
        await store.create_conversation("assistant", "append-bench", cwd=None, created_at=now)
        started = time.perf_counter()
        for n in range(steps):
            await store.append("assistant", "append-bench", step(n))
        return (time.perf_counter() - started) / steps


def raw_commit_cost(path: Path, synchronous: str, steps: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS e (c INTEGER, seq INTEGER, role TEXT, content TEXT, "
        "tool_calls TEXT, tool_call_id TEXT, created_at TEXT, PRIMARY KEY (c, seq))"
    )
    started = time.perf_counter()
    for n in range(steps):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO e VALUES (1, ?, 'assistant', '', ?, NULL, ?)",
            (2 * n, '[{"call_id": "c", "name": "set_title"}]', "2026-01-01T00:00:00Z"),
        )
        conn.execute(
            "INSERT INTO e VALUES (1, ?, 'tool', 'Title set.', NULL, 'c', ?)",
            (2 * n + 1, "2026-01-01T00:00:00Z"),
        )
        conn.execute("COMMIT")
    conn.close()
    return (time.perf_counter() - started) / steps


def fill_url(url: str) -> str:
    """The URL to fill a store through: sqlite without an fsync per commit, since
    only the daemon's start-up over the result is measured."""
    return f"{url.split('?')[0]}?synchronous=normal" if url.startswith("sqlite:") else url


def startup_figures(root: Path, conversations: int, entries: int) -> list[Figure]:
    """(d) for `python -m bench`: start-up and RSS over a filled sqlite store."""
    base_s, base_rss = measure_baseline_startup(root)
    url = f"sqlite:///{root / 'scale.db'}"
    t0 = time.perf_counter()
    fill(fill_url(url), conversations, entries)
    filled = time.perf_counter() - t0
    seconds, rss = measure_startup(url, root)
    label = "bare trio process answering a ping"
    return [
        Figure(
            "startup_s",
            "d",
            f"start-up over {conversations:,} stored conversations",
            "s",
            seconds,
            "lower",
            [Baseline(label, base_s)],
            Target("<=", 0.5),
            note=f"spawn -> first `pong`; sqlite, {entries} entries each, filled in {filled:.0f} s",
        ),
        Figure(
            "startup_rss",
            "d",
            "RSS after listing a page of them",
            "MiB",
            rss / 1024,
            "lower",
            [Baseline(label, base_rss / 1024)],
            Target("<=", 100),
        ),
    ]


def drop_schema(postgres: str, schema: str) -> None:
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--backends", default="sqlite", help="comma-separated: sqlite,jsonl,postgres"
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "CHINWAG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        help="the server for the postgres backend (a fresh schema in it is used and dropped)",
    )
    _processes.add_daemon_options(parser, storage=False)
    args = parser.parse_args()
    _processes.use_daemon_options(args)
    schema = f"chinwag_bench_{secrets.token_hex(6)}"
    with tempfile.TemporaryDirectory(prefix="cwb-", dir="/tmp") as tmp:
        root = Path(tmp)
        base_s, base_rss = measure_baseline_startup(root)
        print(
            f"start-up with {args.conversations} conversations x {args.entries} entries "
            "(baseline: bare trio process answering on a Unix socket)"
        )
        print(
            f"{'backend':<10}{'start-up s':>12}{'baseline s':>12}{'ratio':>8}"
            f"{'RSS MiB':>10}{'baseline':>10}{'ratio':>8}   targets: <= 0.5 s, <= 100 MiB"
        )
        for backend in args.backends.split(","):
            url = {
                "sqlite": f"sqlite:///{root / 'scale.db'}",
                "jsonl": f"jsonl:///{root / 'scale-jsonl'}",
                "postgres": f"{args.postgres}{'&' if '?' in args.postgres else '?'}schema={schema}",
            }[backend]
            t0 = time.perf_counter()
            try:
                fill(fill_url(url), args.conversations, args.entries)
                filled = time.perf_counter() - t0
                seconds, rss = measure_startup(url, root)
            finally:
                if backend == "postgres":
                    drop_schema(args.postgres, schema)
            print(
                f"{backend:<10}{seconds:>12.3f}{base_s:>12.3f}{seconds / base_s:>8.1f}"
                f"{rss / 1024:>10.1f}{base_rss / 1024:>10.1f}{rss / base_rss:>8.1f}"
                f"   (filled in {filled:.1f} s)"
            )
        print()
        print(
            f"append cost per step (assistant + tool result), {args.steps} steps, one conversation"
        )
        print(
            f"{'synchronous':<12}{'append ms':>11}{'raw commit ms':>15}{'ratio':>8}   target <= 2x"
        )
        for sync in ("full", "normal"):
            ours = trio.run(
                append_cost,
                f"sqlite:///{root / f'append-{sync}.db'}?synchronous={sync}",
                args.steps,
            )
            raw = raw_commit_cost(root / f"raw-{sync}.db", sync, args.steps)
            print(f"{sync:<12}{ours * 1e3:>11.3f}{raw * 1e3:>15.3f}{ours / raw:>8.2f}")


if __name__ == "__main__":
    main()
