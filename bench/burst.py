"""(f) 1,000 conversations started at once: how long each waits for its `start`.

chinwag: 1,000 connections are opened and say hello first; then each sends one
`stream` of "hello world" to the echo agent, for a sender of its own that has
no conversation yet, all written one after another as fast as the client
goes (a few ms for all). First event, per request: from writing it to reading
its `start`, so each run's user entry (and its new conversation) is stored
by then. Reported: p50 and p99 over the 1,000, and how long until every run
had ended.

Baselines, same run, same client (`bench.concurrency`'s, one process with epoll):
- the bare trio server (`bench._bare_server stream`): the same frames, no storage;
- raw-durable (`bench._bare_server durable`, sqlite stores only): the same plus
  the daemon's commits per run with the same `synchronous`, one after another
  inline on its loop, so its runs queue behind each other's commits (the
  daemon may group them, it need not do them one by one).

Target (issue 11): first event p99 <= 1 s.

    python -m bench.burst [--conversations 1000] [--storage URL]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._processes import (
    Server,
    bare_server,
    chinwag_serve,
    echo_config,
    raw_durable,
    run_alone,
    storage_label,
    synchronous_of,
)
from ._report import Baseline, Figure, Target, percentile
from .concurrency import drive, first_events_ms
from .first_event import CONTENT, raw_durable_label

TIMEOUT_S = 120  # for all the runs to end; what had started by then is reported


def measure(server: Server, conversations: int) -> tuple[list[float], float]:
    """First events (ms) of the runs that started, and seconds until the last `end`."""
    outcome = drive(server, conversations, CONTENT, len(CONTENT.split()), TIMEOUT_S)
    return first_events_ms(outcome), max(c.end for c in outcome.convs) - min(
        c.sent for c in outcome.convs
    )


def figures(root: Path, conversations: int, storage: str | None = None) -> list[Figure]:
    with chinwag_serve(root / "burst", echo_config(), storage) as daemon:
        ours, ours_s = measure(daemon, conversations)
    found: dict[str, tuple[list[float], float]] = {}
    with bare_server(root, "stream") as bare:
        found["bare trio server, same frames, no storage"] = measure(bare, conversations)
    if (synchronous := synchronous_of(storage)) is not None:
        with raw_durable(root, synchronous) as durable:
            found[raw_durable_label(synchronous)] = measure(durable, conversations)
    started = f"{len(ours)} of {conversations} started"
    spans = ", ".join(f"{span:.2f} s" for _, span in found.values())
    return [
        Figure(
            "burst_first_event_p50",
            "f",
            f"{conversations} new conversations at once: first event p50",
            "ms",
            percentile(ours, 0.5),
            "lower",
            [Baseline(name, percentile(firsts, 0.5)) for name, (firsts, _) in found.items()],
            note=f"{conversations} connections, one `stream` each to a new sender, written at "
            f"once; request -> `start`; echo on {storage_label(storage)}; {started}; all "
            f"ended {ours_s:.2f} s after the first request (baselines: {spans})",
        ),
        Figure(
            "burst_first_event_p99",
            "f",
            f"{conversations} new conversations at once: first event p99",
            "ms",
            percentile(ours, 0.99),
            "lower",
            [Baseline(name, percentile(firsts, 0.99)) for name, (firsts, _) in found.items()],
            Target("<=", 1000),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    run_alone(parser, lambda root, args: figures(root, args.conversations, args.storage))


if __name__ == "__main__":
    main()
