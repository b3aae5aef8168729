"""(j) How soon a kill ends a run, and a command's timeout its command: a real `chinwag serve`.

The tests wait for these ends with a deadline well below the run's natural
length (a kill that did nothing would leave the run streaming for 20 s or
sleeping for 30), so that a loaded machine does not fail them; how soon the
ends come is measured here instead. The bounds the tests used to assert are
the targets.

- kill of a streaming run: echo's ``/slow 1000 20`` on one connection, ``kill``
  from a second once a delta arrived; timed from the kill's send to the ``end
  killed`` on the first connection (target 2,000 ms, once ``took < 2.0``);
- kill during a command: ``run_command`` of ``sleep 30`` under its reaper, killed
  once the command runs; timed the same way (target 3,000 ms);
- a command's timeout: ``sleep 30`` with ``timeout_s = 0.5``; the time from the
  stream's send to its tool result, less the 0.5 s (target 4,500 ms: the test
  allowed 5 s in all).

Baseline: a ``ping`` round trip on the same daemon, in the same run.

    python -m bench.kill_latency [--runs 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import trio
from chinwag.clients import connect
from chinwag.protocol import End, TextDelta, ToolCall, ToolResult

from ._processes import chinwag_serve, run_alone
from ._report import Baseline, Figure, Target

CONFIG = """
[daemon]
allowed_roots = ["{root}"]

[agents.assistant]
provider = "echo"
tools = ["run_command"]
"""
TIMEOUT_S = 0.5
WAIT_S = 15.0  # longer than any bound, shorter than the runs' natural length


def _tool(command: str, **args: object) -> str:
    return "/tool run_command " + json.dumps({"command": command, **args})


async def _kill_after(socket_path: Path, content: str, started: type, cwd: str) -> float:
    """ms from a kill's send to the killed run's end, once an event of ``started`` came."""
    async with (
        connect(socket_path) as c,
        connect(socket_path) as killer,
        c.stream("assistant", content, cwd=cwd) as events,
    ):
        with trio.fail_after(WAIT_S):
            async for event in events:
                if isinstance(event, started):
                    break
            else:
                raise AssertionError(f"the run of {content!r} ended before it could be killed")
            if started is ToolCall:
                await trio.sleep(0.2)  # the command is running under its reaper
            began = time.perf_counter()
            await killer.kill("assistant")
            end = [e async for e in events][-1]
    assert isinstance(end, End) and end.status == "killed", end
    return (time.perf_counter() - began) * 1000


async def _timeout_overshoot(socket_path: Path, cwd: str) -> float:
    """ms past ``TIMEOUT_S`` before a timed-out command's result arrives."""
    async with connect(socket_path) as c:
        began = time.perf_counter()
        async with c.stream("assistant", _tool("sleep 30", timeout_s=TIMEOUT_S), cwd=cwd) as ev:
            with trio.fail_after(WAIT_S):
                async for event in ev:
                    if isinstance(event, ToolResult):
                        took = time.perf_counter() - began
                        assert "timed out" in event.output, event.output
                        break
    return (took - TIMEOUT_S) * 1000


async def _ping_ms(socket_path: Path) -> float:
    async with connect(socket_path) as c:
        began = time.perf_counter()
        await c.ping()
        return (time.perf_counter() - began) * 1000


async def _measure(socket_path: Path, ws: Path, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"stream": [], "command": [], "timeout": [], "ping": []}
    for _ in range(runs):  # interleaved, so that every kind sees the same machine
        cwd = str(ws)
        times["stream"].append(await _kill_after(socket_path, "/slow 1000 20", TextDelta, cwd))
        times["command"].append(await _kill_after(socket_path, _tool("sleep 30"), ToolCall, cwd))
        times["timeout"].append(await _timeout_overshoot(socket_path, cwd))
        times["ping"].append(await _ping_ms(socket_path))
    return times


def figures(root: Path, runs: int) -> list[Figure]:
    ws = root / "ws"
    ws.mkdir()
    with chinwag_serve(root / "daemon", CONFIG.format(root=ws)) as server:
        times = trio.run(_measure, server.socket_path, ws, runs)
    median = {name: statistics.median(found) for name, found in times.items()}
    ping = [Baseline("ping round trip, same daemon", median["ping"])]
    note = f"median of {runs}, interleaved"
    return [
        Figure(
            "kill_stream_ms", "j", "kill -> end of a streaming run", "ms",
            median["stream"], "lower", ping, Target("<=", 2000), note,
        ),
        Figure(
            "kill_command_ms", "j", "kill -> end of a run in run_command", "ms",
            median["command"], "lower", ping, Target("<=", 3000), note,
        ),
        Figure(
            "command_timeout_overshoot_ms", "j", "run_command timeout -> result, past it",
            "ms", median["timeout"], "lower", ping, Target("<=", 4500), note,
        ),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="of each kind (default 10)")
    run_alone(parser, lambda root, args: figures(root, args.runs))


if __name__ == "__main__":
    main()
