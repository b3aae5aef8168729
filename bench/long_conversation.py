"""(g) A 10,000-entry conversation: first event and server CPU per run, against 2-entry ones.

The store is filled before the daemon starts, through chinwag's own storage
(`bench.storage_scale.populate`, run by the daemon's Python): one conversation
of 10,000 entries (user and assistant turns, each one line) and 100
conversations of 2 entries. Then a daemon over that store runs "hello world"
runs, as in (a), on one connection: in the long conversation, and rotating
over the short ones, so that each of those stays short (2 entries, plus 2 per
run it had: at most 2 + 2 x (1 + runs / 100)).

Warm-up: one run in each short conversation and 20 in the long one, so that
the daemon has loaded every conversation (reading the long one's whole
history) before anything is measured. Then blocks of 100 runs, alternately in
the long conversation and in the short ones, so that a change of the
machine's load falls on both alike; the long one grows by 2 entries a run
(10,040 to 11,040 entries over 500 runs).

Figures: first event p50 and p99 (request -> `start`, as in (a)), and the
daemon's CPU per run (user + system, all threads, from /proc, read around each
block). The baseline is the same figure in the 2-entry conversations, same
daemon, same run: the ratio is what the length costs.

Target (issue 11): first event p50 and CPU per run within 1.2x of the 2-entry ones.

    python -m bench.long_conversation [--entries 10000] [--runs 500] [--storage URL]

The store is sqlite in a temporary directory (`?synchronous=` from --storage
when that is sqlite), or the one --storage names (not `memory:`, which cannot
be filled before the daemon starts).
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable
from pathlib import Path

import trio

from ._processes import (
    chinwag_serve,
    echo_config,
    run_alone,
    storage_label,
    synchronous_of,
)
from ._report import Baseline, Figure, Target, percentile
from ._wire import connect
from .first_event import one_run
from .storage_scale import fill, fill_url

SHORT = 100  # 2-entry conversations
BLOCK = 100  # runs in a row in one kind of conversation
LONG_WARMUP = 20
BASELINE = "the same in 2-entry conversations"


async def measure(
    path: Path, long: str, shorts: list[str], runs: int, cpu: Callable[[], float]
) -> dict[str, tuple[list[float], float]]:
    """Per kind ("long", "short"): first events (s) and server CPU s per run."""
    conn = await connect(path)
    for sender in [*shorts, *[long] * LONG_WARMUP]:
        await one_run(conn, sender)
    senders = {"long": [long], "short": shorts}
    firsts: dict[str, list[float]] = {kind: [] for kind in senders}
    cpu_s = dict.fromkeys(senders, 0.0)
    done = 0
    while done < runs:
        block = min(BLOCK, runs - done)
        for kind, names in senders.items():
            before = cpu()
            for i in range(done, done + block):
                firsts[kind].append(await one_run(conn, names[i % len(names)]))
            cpu_s[kind] += cpu() - before
        done += block
    await conn.aclose()
    return {kind: (firsts[kind], cpu_s[kind] / runs) for kind in senders}


def store_url(root: Path, storage: str | None) -> str:
    """The store to fill and serve: ``storage`` unless it is `memory:` or sqlite."""
    if storage is not None and storage != "memory:" and synchronous_of(storage) is None:
        return storage
    db = root / "long.db"
    return f"sqlite:///{db}?synchronous={synchronous_of(storage) or 'full'}"


def figures(root: Path, entries: int, runs: int, storage: str | None = None) -> list[Figure]:
    root.mkdir(parents=True, exist_ok=True)
    url = store_url(root, storage)
    tag = secrets.token_hex(4)  # a store named by --storage may hold earlier runs' senders
    fill(fill_url(url), 1, entries, f"long-{tag}-")
    fill(fill_url(url), SHORT, 2, f"short-{tag}-")
    shorts = [f"short-{tag}-{n}" for n in range(SHORT)]
    with chinwag_serve(root / "long-conversation", echo_config(), url) as daemon:
        found = trio.run(
            measure, daemon.socket_path, f"long-{tag}-0", shorts, runs, daemon.cpu_seconds
        )
    (long_first, long_cpu), (short_first, short_cpu) = found["long"], found["short"]
    head = (
        f"one conversation of {entries:,} entries (+2 a run) against {SHORT} of 2 (+2 a run), "
        f"{runs} runs each in alternate blocks of {BLOCK}; echo on {storage_label(url)}"
    )
    return [
        Figure(
            "long_first_event_p50",
            "g",
            f"{entries:,}-entry conversation: first event p50",
            "ms",
            percentile(long_first, 0.5) * 1e3,
            "lower",
            [Baseline(BASELINE, percentile(short_first, 0.5) * 1e3)],
            Target("<=", 1.2, of=BASELINE),
            note=head,
        ),
        Figure(
            "long_first_event_p99",
            "g",
            f"{entries:,}-entry conversation: first event p99",
            "ms",
            percentile(long_first, 0.99) * 1e3,
            "lower",
            [Baseline(BASELINE, percentile(short_first, 0.99) * 1e3)],
        ),
        Figure(
            "long_cpu_per_run",
            "g",
            f"{entries:,}-entry conversation: server CPU per run",
            "us",
            long_cpu * 1e6,
            "lower",
            [Baseline(BASELINE, short_cpu * 1e6)],
            Target("<=", 1.2, of=BASELINE),
            note="user + system time of the daemon (all its threads), from /proc, per block",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=500)
    run_alone(parser, lambda root, args: figures(root, args.entries, args.runs, args.storage))


if __name__ == "__main__":
    main()
