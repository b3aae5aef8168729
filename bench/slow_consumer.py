"""Slow consumer: does a client that stops reading delay anyone else?

Client A sends a fast run (`/slow N 0.1`: the words 1..N, as fast as the
daemon's timers go, about 1,000 a second here) and, once its `start` arrives,
stops reading without closing, until its run has ended and is stored. The
daemon's writes to it block, its frames pile up in its connection's bounded
buffer (`outgoing_frames`, set to 2,048 here so that it fills within seconds
rather than the default 16,384's), and once that is full the daemon should
drop the connection while the run goes on; what A finally reads says whether
it did.

Meanwhile client B, on its own connection, streams `/slow M 20` (50 tokens/s).
B's event delay is defined as in (c): the gap since B's previous event minus
the model's 20 ms pause.

Baseline, same run, same daemon: the same two runs with A reading everything,
so that the only difference is the stall, not the load A's run puts on the
daemon.

    python -m bench.slow_consumer [--fast-tokens 6000] [--tokens 200] [--storage URL]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import trio
from chinwag.protocol import End, GetHistory, History, Start, Stream, TextDelta

from ._processes import (
    chinwag_serve,
    echo_config,
    run_alone,
    storage_label,
)
from ._report import Baseline, Figure, percentile
from ._wire import Framed, connect

PACE_MS = 20


@dataclass
class Trial:
    delays_ms: list[float]
    a_frames: int  # what A read in the end
    a_dropped: bool  # the daemon closed A's connection before A's `end`
    a_stored_words: int  # the words of A's answer in storage, once its run ended


async def steady(conn: Framed, sender: str, tokens: int) -> list[float]:
    """B: one paced run; each token's gap since the previous event, minus the pace, in ms."""
    await conn.send(Stream(id=1, agent="assistant", sender=sender, content=f"/slow {tokens} 20"))
    delays: list[float] = []
    previous = 0.0
    while True:
        event, arrived = await conn.recv_timed()
        if isinstance(event, Start):
            previous = arrived
        elif isinstance(event, TextDelta):
            delays.append((arrived - previous) * 1e3 - PACE_MS)
            previous = arrived
        elif isinstance(event, End):
            assert event.status == "done", event
            return delays


async def drain(conn: Framed) -> tuple[int, bool]:
    """Read what A's connection still holds: (frames, whether the daemon dropped it)."""
    frames = 0
    while True:
        try:
            event = await conn.recv()
        except (EOFError, trio.BrokenResourceError):
            return frames, True
        frames += 1
        if isinstance(event, End):
            return frames, False


async def answer_words(path: Path, sender: str) -> int:
    """Wait for A's run to end, then count the words of its stored answer."""
    conn = await connect(path)
    try:
        while True:
            await conn.send(GetHistory(id=1, agent="assistant", sender=sender))
            history = await conn.recv()
            assert isinstance(history, History), history
            answers = [e for e in history.entries if e.role == "assistant"]
            if answers:
                return len(answers[-1].content.split())
            await trio.sleep(0.1)
    finally:
        await conn.aclose()


async def trial(path: Path, fast_tokens: int, tokens: int, stall: bool, tag: str) -> Trial:
    a = await connect(path)
    b = await connect(path)
    a_sender = f"stalled-{tag}"
    await a.send(
        Stream(id=1, agent="assistant", sender=a_sender, content=f"/slow {fast_tokens} 0.1")
    )
    first = await a.recv()
    assert isinstance(first, Start), first
    a_frames, a_dropped = 1, False
    async with trio.open_nursery() as nursery:
        if not stall:

            async def read_a() -> None:
                nonlocal a_frames, a_dropped
                more, a_dropped = await drain(a)
                a_frames += more

            nursery.start_soon(read_a)
        delays = await steady(b, f"steady-{tag}", tokens)
    words = 0
    with trio.move_on_after(120):
        # Stalled: A still reads nothing until its run has ended and been stored.
        words = await answer_words(path, a_sender)
    if stall:
        with trio.move_on_after(60):
            more, a_dropped = await drain(a)
            a_frames += more
    await a.aclose()
    await b.aclose()
    return Trial(delays, a_frames, a_dropped, words)


async def measure(path: Path, fast_tokens: int, tokens: int) -> tuple[Trial, Trial]:
    await trial(path, 200, 20, stall=False, tag="warmup")
    reading = await trial(path, fast_tokens, tokens, stall=False, tag="reading")
    stalled = await trial(path, fast_tokens, tokens, stall=True, tag="stalled")
    return stalled, reading


BUFFER = 2048  # outgoing_frames


def figures(root: Path, fast_tokens: int, tokens: int, storage: str | None = None) -> list[Figure]:
    config = echo_config(daemon=f"outgoing_frames = {BUFFER}")
    with chinwag_serve(root / "slow-consumer", config, storage) as daemon:
        stalled, reading = trio.run(measure, daemon.socket_path, fast_tokens, tokens)
    label = "same, A reading everything"
    fate = (
        f"A dropped by the daemon after it read {stalled.a_frames:,} of {fast_tokens + 3:,} frames"
        if stalled.a_dropped
        else f"A was never dropped: it read all {stalled.a_frames:,} frames in the end"
    )
    stored = (
        "its run went on and was stored whole"
        if stalled.a_stored_words == fast_tokens
        else f"its stored answer has {stalled.a_stored_words} of {fast_tokens} words"
    )
    return [
        Figure(
            "slow_consumer_p50",
            "slow",
            "B's event delay p50 while A is stalled",
            "ms",
            percentile(stalled.delays_ms, 0.5),
            "lower",
            [Baseline(label, percentile(reading.delays_ms, 0.5))],
            note=f"A: `/slow {fast_tokens} 0.1`, B: `/slow {tokens} 20`, outgoing_frames "
            f"{BUFFER}, echo on {storage_label(storage)}; {fate}; {stored}",
        ),
        Figure(
            "slow_consumer_p99",
            "slow",
            "B's event delay p99 while A is stalled",
            "ms",
            percentile(stalled.delays_ms, 0.99),
            "lower",
            [Baseline(label, percentile(reading.delays_ms, 0.99))],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast-tokens", type=int, default=6000)
    parser.add_argument("--tokens", type=int, default=200)
    run_alone(parser, lambda root, args: figures(root, args.fast_tokens, args.tokens, args.storage))


if __name__ == "__main__":
    main()
