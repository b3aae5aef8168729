"""`python -m bench`: every benchmark against a real `chinwag serve`, one table, one JSON file.

Each figure is printed beside the same measurement of a baseline taken in the
same run, with the ratio chinwag / baseline, and beside its target where the
project set one. Needs `pip install '.[bench]'` for the Starlette SSE baseline
(the rest runs without it, and says so).

    python -m bench                       # everything, about 3 minutes on 2 cores
    python -m bench --quick               # scaled down, about a minute
    python -m bench --only a,c --repeat 3 # some benchmarks, the median of 3
    python -m bench --daemon-python /tmp/venv/bin/python   # another installed chinwag
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import (
    _processes,
    _profile,
    burst,
    cli_start,
    cluster,
    concurrency,
    dashboard,
    delegation,
    first_event,
    hog,
    kill_latency,
    long_conversation,
    mail,
    mail_spaces,
    observability,
    slow_consumer,
    storage_scale,
    throughput,
)
from ._processes import add_daemon_options, storage_label, use_daemon_options
from ._report import (
    REPO,
    Figure,
    calibration,
    describe_machine,
    git_revision,
    load_average,
    machine,
    markdown,
    median_of,
    table,
    write_json,
)

DEFAULT_JSON = REPO / "bench" / "results.json"


@dataclass(frozen=True)
class Scale:
    runs: int = 2000  # (a) sequential runs
    warmup: int = 200
    tokens: int = 10_000  # (b) tokens in the one run
    tput_rounds: int = 5
    conversations: int = 1000  # (c)
    few_conversations: int = 100  # (c) again, at a scale a small machine sustains
    paced_tokens: int = 150  # (c) tokens per conversation, 20 ms apart
    stored: int = 10_000  # (d) idle stored conversations
    entries: int = 20
    delegations: int = 300  # (e)
    fast_tokens: int = 6000  # slow consumer: the stalled client's run
    steady_tokens: int = 300  # slow consumer: the other client's run, 20 ms apart
    burst: int = 1000  # (f) new conversations started at once
    long_entries: int = 10_000  # (g) entries of the long conversation
    long_runs: int = 500  # (g) runs in it, and in the short ones
    cli_runs: int = 30  # (h) `chinwag send` processes, and as many of each baseline
    hog_s: float = 3.0  # (i) how long the client that never reads writes requests
    kill_runs: int = 10  # (j) kills of each kind, and command timeouts
    mail_posts: int = 1000  # (m) sequential DMs to one watcher, on each store
    mail_watchers: int = 100  # (m) watchers an @everyone post reaches
    mail_fanout_posts: int = 50  # (m) @everyone posts (and as many DMs)
    mail_stored: int = 100_000  # (m) messages in the inbox read
    mail_inbox_calls: int = 200  # (m) inbox first pages (and as many pings)
    search_stored: int = 100_000  # (s) messages searched
    searches: int = 300  # (s) search_mail calls (and as many pings)
    space_watchers: int = 100  # (s) members of the space, each watching
    space_posts: int = 50  # (s) posts to the space (and as many DMs)
    lock_rounds: int = 1000  # (s) lock + unlock, on each store
    observed_runs: int = 3000  # (o) runs on each of the three daemons, on each store
    dashboard_words: int = 200  # (w) words of each of the 10 runs streaming at once
    dashboard_runs: int = 2000  # (w) runs with 50 dashboard event streams open, and with none
    cluster_samples: int = 200  # (x) kills, runs and posts of each kind across daemons
    cluster_clients: int = 300  # (x) load clients over three daemons
    cluster_runs: int = 10  # (x) runs of each load client


QUICK = Scale(
    runs=300,
    warmup=50,
    tput_rounds=2,
    conversations=300,
    few_conversations=50,
    paced_tokens=100,
    stored=1000,
    delegations=50,
    fast_tokens=4000,
    steady_tokens=100,
    burst=300,
    long_runs=200,
    cli_runs=10,
    hog_s=1.5,
    kill_runs=4,
    mail_posts=300,
    mail_fanout_posts=30,
    mail_stored=20_000,
    mail_inbox_calls=100,
    search_stored=20_000,
    searches=100,
    space_posts=30,
    lock_rounds=300,
    observed_runs=600,
    dashboard_words=50,
    dashboard_runs=400,
    cluster_samples=30,
    cluster_clients=60,
    cluster_runs=3,
)

Bench = Callable[[Path, Scale, "str | None"], list[Figure]]


def bench_a(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    found = first_event.figures(root / "sqlite", s.runs, s.warmup, storage)
    if storage is None:  # the other stores issue 11 sets targets for
        normal = f"sqlite:///{root / 'normal' / 'bench.db'}?synchronous=normal"
        found += first_event.figures(root / "normal", s.runs, s.warmup, normal, sse=False)
        found += first_event.figures(root / "memory", s.runs, s.warmup, "memory:", sse=False)
    return found


def bench_b(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    found = throughput.figures(root / "sqlite", s.tokens, s.tput_rounds, storage)
    if storage is None:  # to tell storage's share from the daemon's
        found += throughput.figures(
            root / "memory", s.tokens, s.tput_rounds, "memory:", key="memory"
        )[:1]
    return found


def bench_c(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    found = concurrency.figures(root, s.conversations, s.paced_tokens, storage)
    if s.few_conversations:
        found += concurrency.figures(root, s.few_conversations, s.paced_tokens, storage, main=False)
    return found


def bench_d(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return storage_scale.startup_figures(root, s.stored, s.entries)


def bench_e(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return delegation.figures(root, s.delegations, storage)


def bench_slow(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return slow_consumer.figures(root, s.fast_tokens, s.steady_tokens, storage)


def bench_f(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return burst.figures(root, s.burst, storage)


def bench_g(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return long_conversation.figures(root, s.long_entries, s.long_runs, storage)


def bench_h(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return cli_start.figures(root, s.cli_runs, storage)


def bench_i(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return hog.figures(root, s.hog_s, storage)


def bench_j(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    del storage  # a kill's latency is the run's and the reaper's, not the store's
    return kill_latency.figures(root, s.kill_runs)


def bench_m(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return mail.figures(
        root,
        s.mail_posts,
        s.mail_watchers,
        s.mail_fanout_posts,
        s.mail_stored,
        s.mail_inbox_calls,
        storage,
    )


def bench_s(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return mail_spaces.figures(
        root,
        s.search_stored,
        s.searches,
        s.space_watchers,
        s.space_posts,
        s.lock_rounds,
        storage,
    )


def bench_o(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return observability.all_figures(root, s.observed_runs, storage)


def bench_w(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    return dashboard.figures(root, s.dashboard_words, s.dashboard_runs, storage)


def bench_x(root: Path, s: Scale, storage: str | None) -> list[Figure]:
    del storage  # several daemons share one postgres schema: bench/cluster.py's own
    return cluster.figures(root, s.cluster_samples, s.cluster_clients, s.cluster_runs)


BENCHES: dict[str, tuple[str, Bench]] = {
    "a": ("first_event", bench_a),
    "b": ("throughput", bench_b),
    "c": ("concurrency", bench_c),
    "d": ("startup", bench_d),
    "e": ("delegation", bench_e),
    "slow": ("slow_consumer", bench_slow),
    "f": ("burst", bench_f),
    "g": ("long_conversation", bench_g),
    "h": ("cli_start", bench_h),
    "i": ("hog", bench_i),
    "j": ("kill_latency", bench_j),
    "m": ("mail", bench_m),
    "s": ("mail_spaces", bench_s),
    "o": ("observability", bench_o),
    "w": ("dashboard", bench_w),
    "x": ("cluster", bench_x),
}


def pick(only: str | None) -> list[str]:
    if not only:
        return list(BENCHES)
    names = {name: key for key, (name, _) in BENCHES.items()}
    chosen = []
    for word in only.split(","):
        word = word.strip()
        key = word if word in BENCHES else names.get(word)
        if key is None:
            known = ", ".join(f"{k} ({n})" for k, (n, _) in BENCHES.items())
            raise SystemExit(f"unknown benchmark {word!r}; known: {known}")
        chosen.append(key)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0].replace("`", "")
    )
    parser.add_argument(
        "--only",
        help="comma-separated: a,b,c,d,e,slow,f,g,h,i,j,m,s,o,w,x (or first_event, throughput, "
        "mail, ...)",
    )
    parser.add_argument("--quick", action="store_true", help="scaled down, about a minute")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each benchmark N times; each figure, and each baseline, is the median",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    add_daemon_options(
        parser,
        storage_help="storage URL for the daemon (default: sqlite in a temp dir with "
        "synchronous=full, and beside it for (a) sqlite normal and memory:, for (b) memory:); "
        "(d) always uses sqlite, (g) sqlite unless the URL names a jsonl or postgres store; "
        "(m) delivery on sqlite full and normal, fan-out on full, inbox on normal; "
        "(s) search on sqlite normal and memory:, fan-out on full, locks on full and normal",
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="also write the table as Markdown"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record every daemon with py-spy into DIR (collapsed stacks and a summary each); "
        "slows the daemon a little, so its figures are not comparable",
    )
    args = parser.parse_args()
    use_daemon_options(args)
    if args.profile is not None:
        if not _profile.available():
            raise SystemExit("--profile needs py-spy on the PATH (pip install py-spy)")
        _processes.profile_dir = args.profile.resolve()
    scale = QUICK if args.quick else Scale()
    chosen = pick(args.only)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    info = machine()
    info["calibration"] = calibration()
    load_before = load_average()
    started = time.perf_counter()
    source = _processes.daemon_source()
    revision = git_revision(source)
    print(
        f"chinwag benchmarks of {revision} ({source}, run by {_processes.daemon_python}) "
        f"on {describe_machine(info)}",
        file=sys.stderr,
    )
    print(f"load average before: {load_before}", file=sys.stderr)
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    loads: dict[str, list[float]] = {}  # after each benchmark: the machine is shared
    for key in chosen:
        name, bench = BENCHES[key]
        rounds: list[list[Figure]] = []
        t0 = time.perf_counter()
        for attempt in range(args.repeat):
            print(f"({key}) {name}, run {attempt + 1} of {args.repeat}...", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="cwb-", dir="/tmp") as tmp:
                rounds.append(bench(Path(tmp), scale, args.storage))
        timings[key] = round(time.perf_counter() - t0, 1)
        print(f"({key}) {name}: {timings[key]} s", file=sys.stderr)
        figures += median_of(rounds)
        loads[key] = load_average()
        print(f"load average: {loads[key]}", file=sys.stderr)
    duration = time.perf_counter() - started
    load_after = load_average()
    missed = [f.key for f in figures if f.met() is False]
    met = [f.key for f in figures if f.met()]
    print()
    print(
        f"chinwag {revision}, echo model, storage {storage_label(args.storage)} "
        "(but d, j and x, which bring their own); "
        f"{'quick, ' if args.quick else ''}median of {args.repeat}; ratio = chinwag / baseline"
    )
    print(f"machine: {describe_machine(info)}")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print()
    print(table(figures))
    print()
    print(f"targets met: {len(met)}, missed: {len(missed)} ({', '.join(missed) or 'none'})")
    report: dict[str, object] = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "revision": revision,
        "daemon_source": str(source),
        "bench_revision": git_revision(REPO, ["bench"]),
        "started_at": started_at,
        "duration_s": round(duration, 1),
        "seconds_per_benchmark": timings,
        "quick": args.quick,
        "repeat": args.repeat,
        "scale": asdict(scale),
        "storage": storage_label(args.storage),
        "python": sys.executable,
        "daemon_python": _processes.daemon_python,
        "machine": info,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "load_average_after_each": loads,
        "targets_met": met,
        "targets_missed": missed,
    }
    write_json(args.json, report, figures)
    if args.markdown is not None:
        args.markdown.write_text(markdown(figures) + "\n")
    print(f"written to {args.json} in {duration:.0f} s")
    if args.profile is not None:
        for summary in sorted(args.profile.glob("*.summary.txt")):
            print(f"py-spy summary: {summary}")


if __name__ == "__main__":
    main()
