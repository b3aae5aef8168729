"""(e) Agent-to-agent delivery: `delegate` from one echo agent to another.

chinwag: the agent `assistant` (given the `delegate` tool) is sent
`/tool delegate {"agent": "helper", "message": "hi"}`; the echo model calls the
tool, the daemon runs a turn of `helper` in the conversation
(helper, agent:assistant) and returns its answer. Delivery latency is the time
between the client reading the run's `tool_call` and its `tool_result`: the
whole turn of the other agent (its user entry and its answer stored, as for
any run), with no socket in between.

Baselines, same run: the same turn asked for by a client instead, `hi` sent to
`helper` on one connection and timed from the request to its `end` (one
conversation, growing as the delegated one does); and a bare trio socket round
trip (`bench._bare_server echo`), the least any delivery through a socket costs.

    python -m bench.delegation [--rounds 300] [--storage URL]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import trio
from chinwag.protocol import End, Stream, ToolCall, ToolResult

from ._processes import (
    bare_server,
    chinwag_serve,
    echo_config,
    run_alone,
    storage_label,
)
from ._report import Baseline, Figure, percentile
from ._wire import connect
from .first_event import measure_round_trip

WARMUP = 20
SENDERS = 100
DELEGATE = "/tool delegate " + json.dumps({"agent": "helper", "message": "hi"})


async def measure(path: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Delegation latencies, then the same turn's stream -> end latencies, in seconds."""
    conn = await connect(path)
    delegated: list[float] = []
    for i in range(WARMUP + rounds):
        sender = f"deleg-{i % SENDERS}"
        await conn.send(Stream(id=1, agent="assistant", sender=sender, content=DELEGATE))
        called = 0.0
        while True:
            event, arrived = await conn.recv_timed()
            if isinstance(event, ToolCall):
                called = arrived
            elif isinstance(event, ToolResult):
                assert not event.is_error and event.output == "hi", event
                if i >= WARMUP:
                    delegated.append(arrived - called)
            elif isinstance(event, End):
                assert event.status == "done", event
                break
    direct: list[float] = []
    for i in range(WARMUP + rounds):
        t0 = time.perf_counter()
        await conn.send(Stream(id=1, agent="helper", sender="plain", content="hi"))
        while True:
            event = await conn.recv()
            if isinstance(event, End):
                assert event.status == "done", event
                break
        if i >= WARMUP:
            direct.append(time.perf_counter() - t0)
    await conn.aclose()
    return delegated, direct


def figures(root: Path, rounds: int, storage: str | None = None) -> list[Figure]:
    with chinwag_serve(root / "delegation", echo_config(["delegate"]), storage) as daemon:
        delegated, direct = trio.run(measure, daemon.socket_path, rounds)
    with bare_server(root, "echo") as bare:
        rtt, _ = trio.run(measure_round_trip, bare.socket_path, rounds, WARMUP)
    plain = "the same turn from a client, stream -> end"
    bare_rtt = "bare trio socket round trip"
    found: list[Figure] = []
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        found.append(
            Figure(
                f"delegate_{label}",
                "e",
                f"delegate delivery {label}",
                "ms",
                percentile(delegated, q) * 1e3,
                "lower",
                [
                    Baseline(plain, percentile(direct, q) * 1e3),
                    Baseline(bare_rtt, percentile(rtt, q) * 1e3),
                ],
                note=""
                if q != 0.5
                else f"`tool_call` -> `tool_result`: a helper turn, {rounds} rounds, echo on "
                f"{storage_label(storage)}",
            )
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    run_alone(parser, lambda root, args: figures(root, args.rounds, args.storage))


if __name__ == "__main__":
    main()
