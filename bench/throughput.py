"""(b) Events/s through one connection: one run of 10,000 tokens.

chinwag: `/slow 10000 0` to the echo agent (the words 1..10000 with no pause,
one `text_delta` each), timed from the write of the request to the arrival of
its `end` (so the two durable appends are inside); events counted are every
frame of the run (`start`, the deltas, `usage`, `end`). Each round uses a new
conversation. (The deltas alone are not timed: the echo model yields no
checkpoint between words, so the daemon queues the whole run before its
writer sends the first delta, and the deltas arrive in one burst.)

Baseline, same run: a bare trio server (`bench._bare_server stream`) that
answers the same request with the same frames, each encoded by msgspec, and
nothing else: no runtime, no storage. The client is the same for both: it
splits the frames by their length headers and decodes the first and the last,
so that it outruns both servers (decoding every frame in Python would measure
the client).

Target (issue 11): events/s >= 0.8x the bare server's.

    python -m bench.throughput [--tokens 10000] [--rounds 5] [--storage URL]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import trio
from chinwag.protocol import MSGPACK, End, Start, Stream

from ._processes import (
    Server,
    bare_server,
    chinwag_serve,
    echo_config,
    run_alone,
    storage_label,
    storage_short,
)
from ._report import Baseline, Figure, Target
from ._wire import connect


@dataclass
class Round:
    events: int
    whole_s: float  # request written -> `end` read

    @property
    def events_per_s(self) -> float:
        return self.events / self.whole_s


async def measure(path: Path, tokens: int, rounds: int) -> list[Round]:
    conn = await connect(path)
    results: list[Round] = []
    expected = tokens + 3  # start, the deltas, usage, end
    for i in range(rounds + 1):  # the first round warms up
        msg = Stream(id=1, agent="assistant", sender=f"tput-{i}", content=f"/slow {tokens} 0")
        t0 = time.perf_counter()
        await conn.send(msg)
        (first, last), arrivals = await conn.frames(expected)
        whole = arrivals[-1] - t0
        start, end = MSGPACK.decode_server(first), MSGPACK.decode_server(last)
        assert isinstance(start, Start), start
        assert isinstance(end, End) and end.status == "done", end
        if i:
            results.append(Round(expected, whole))
    await conn.aclose()
    return results


def on(server: Server, tokens: int, rounds: int) -> tuple[list[Round], float]:
    """The rounds, and the server's CPU time per event over all of them (warm-up too)."""
    cpu = server.cpu_seconds()
    found = trio.run(measure, server.socket_path, tokens, rounds)
    return found, (server.cpu_seconds() - cpu) / ((rounds + 1) * (tokens + 3))


def figures(
    root: Path, tokens: int, rounds: int, storage: str | None = None, *, key: str = ""
) -> list[Figure]:
    """``key``: appended to the figures' keys and names, e.g. "memory" (and no target)."""
    with chinwag_serve(root / "throughput", echo_config(), storage) as daemon:
        ours, ours_cpu = on(daemon, tokens, rounds)
    with bare_server(root, "stream") as bare:
        base, base_cpu = on(bare, tokens, rounds)
    median = statistics.median
    label = "bare trio server, same msgspec frames"
    suffix, where = (f"_{key}", f" [{storage_short(storage)}]") if key else ("", "")
    return [
        Figure(
            f"events_per_s{suffix}",
            "b",
            f"events/s, one {tokens:,}-token run{where}",
            "events/s",
            median(r.events_per_s for r in ours),
            "higher",
            [Baseline(label, median(r.events_per_s for r in base))],
            None if key else Target(">=", 0.8, of=label),
            note=f"request -> `end`, all frames of the run; median of {rounds}, echo on "
            f"{storage_label(storage)}",
        ),
        Figure(
            f"cpu_per_event{suffix}",
            "b",
            f"server CPU per event{where}",
            "us",
            ours_cpu * 1e6,
            "lower",
            [Baseline(label, base_cpu * 1e6)],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    run_alone(parser, lambda root, args: figures(root, args.tokens, args.rounds, args.storage))


if __name__ == "__main__":
    main()
