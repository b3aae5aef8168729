"""Compaction of 1,000 entries: chinwag's own work, without the model's.

Each round compacts a conversation of N entries (turns of a user message, an
assistant tool call, its result and the answer) through the daemon's runtime,
cold (a fresh runtime, so the context is read from storage), with a provider
that answers a fixed summary at once: what is timed is reading the context,
building the transcript, and storing the archive and its marker atomically,
indexed for search. Baseline, same run, same file and `synchronous` mode: raw
sqlite3 reading the same N rows and committing one inserted row.

    python -m bench.compaction [--entries 1000] [--rounds 20] [--backend sqlite]

Target (issue 5): <= 50 ms for 1,000 entries on sqlite.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path

import trio
from chinwag.daemon._agent import Agent
from chinwag.daemon._config import AgentConfig, Config
from chinwag.daemon._logging import configure_logging
from chinwag.daemon._providers import Chunk, FinishChunk, ModelRequest, TextChunk
from chinwag.daemon._runtime import Runtime
from chinwag.protocol import Entry, ToolCallInfo
from chinwag.storage import Storage, open_store

SUMMARY = "The user and the assistant titled things many times; nothing is open."


class InstantSummary:
    """A provider that answers every request with `SUMMARY`, without waiting."""

    local = True  # answers from this process

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Chunk, None]:
        yield TextChunk(SUMMARY)
        yield FinishChunk("stop")

    async def aclose(self) -> None:
        pass

    async def list_models(self) -> list[str] | None:
        return None


def turn(n: int) -> list[Entry]:
    now = datetime.now(UTC)
    call = ToolCallInfo(call_id=f"call_{n}", name="set_title", arguments='{"title": "x"}')
    words = " ".join(f"word{n}-{i}" for i in range(20))
    return [
        Entry(seq=0, role="user", content=f"please title this {words}", created_at=now),
        Entry(seq=0, role="assistant", content="", tool_calls=[call], created_at=now),
        Entry(seq=0, role="tool", content="Title set to 'x'.", tool_call_id=call.call_id),
        Entry(seq=0, role="assistant", content=f"done: {words}", created_at=now),
    ]


async def fill(storage: Storage, sender: str, entries: int) -> None:
    await storage.create_conversation("assistant", sender, cwd=None, created_at=datetime.now(UTC))
    pending: list[Entry] = []
    for n in range(entries // 4):
        pending += turn(n)
        if len(pending) >= 200:
            await storage.append("assistant", sender, pending)
            pending = []
    if pending:
        await storage.append("assistant", sender, pending)


async def compaction_ms(storage: Storage, sender: str) -> float:
    config = Config(agents={"assistant": AgentConfig(provider="instant")})
    agent = Agent(name="assistant", config=config.agents["assistant"], provider=InstantSummary())
    async with trio.open_nursery() as nursery:
        runtime = Runtime(config, storage, {"assistant": agent}, nursery)
        started = time.perf_counter()
        done = await runtime.compacted(runtime.compact("assistant", sender, None))
        elapsed = (time.perf_counter() - started) * 1000
        nursery.cancel_scope.cancel()  # the conversation's task lives on otherwise
    assert done.summary == SUMMARY
    return elapsed


def raw_sqlite_ms(path: Path, entries: int, synchronous: str) -> float:
    """Read N rows and commit one insert, with sqlite3 alone."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE IF NOT EXISTS raw (k INTEGER PRIMARY KEY, body TEXT)")
    started = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    rows = db.execute(
        "SELECT seq, role, content FROM entries ORDER BY conversation_id, seq LIMIT ?", (entries,)
    ).fetchall()
    db.execute("INSERT INTO raw (body) VALUES (?)", (SUMMARY,))
    db.execute("COMMIT")
    elapsed = (time.perf_counter() - started) * 1000
    db.close()
    assert len(rows) == entries
    return elapsed


async def main(entries: int, rounds: int, backend: str) -> None:
    with tempfile.TemporaryDirectory(prefix="cw-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        url = f"sqlite:///{path}" if backend == "sqlite" else f"jsonl:///{Path(tmp) / 'store'}"
        measured: list[float] = []
        baseline: list[float] = []
        async with open_store(url) as storage:
            for i in range(rounds):
                await fill(storage, f"s{i}", entries)
            for i in range(rounds):
                measured.append(await compaction_ms(storage, f"s{i}"))
                if backend == "sqlite":
                    baseline.append(raw_sqlite_ms(path, entries, "FULL"))
    p50 = statistics.median(measured)
    print(f"compaction of {entries} entries on {backend}, {rounds} rounds, model excluded")
    print(
        f"  chinwag compact      p50 {p50:8.2f} ms   max {max(measured):8.2f} ms   target <= 50 ms"
    )
    if baseline:
        raw = statistics.median(baseline)
        print(f"  raw sqlite3 baseline p50 {raw:8.2f} ms   (read {entries} rows, commit 1 insert)")
        print(f"  ratio                {p50 / raw:8.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--backend", choices=["sqlite", "jsonl"], default="sqlite")
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    trio.run(main, args.entries, args.rounds, args.backend)
