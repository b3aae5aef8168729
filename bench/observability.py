"""(o) What metrics and tracing cost: first event and runs/s, against the daemon with both off.

Four `chinwag serve`, the same echo config and the same kind of store, up side by side:

- **off**: no `metrics`, and `OTEL_SDK_DISABLED=true` (so no OTEL_* of the caller's
  environment turns tracing on);
- **metrics**: `[daemon] metrics = "127.0.0.1:PORT"`, its `/metrics` scraped once a
  second through the run by a process of its own, as Prometheus would (more often than
  Prometheus's default of once a minute);
- **tracing**, the issue's measure: `bench._traced_daemon`, the daemon tracing every
  run through the SDK's BatchSpanProcessor to an exporter that drops the spans (a no-op
  exporter), so the figure is tracing's own cost;
- **otlp**, what a user runs (no target): `OTEL_TRACES_EXPORTER=otlp`,
  `OTEL_EXPORTER_OTLP_ENDPOINT` a local receiver (`bench._otlp_sink`) that answers every
  export 200 and keeps nothing: the spans are also encoded and sent over HTTP.

The client is bench/first_event's (`stream` of "hello world" to the echo agent over 100
senders, timed from the request's write to its `start`; runs/s through `end done`),
run in blocks of BLOCK runs on each daemon in turn, so that a change of the machine's
load falls on all four alike; the client is pinned to one CPU and the daemons to the
other. First event is the p50 of all of a daemon's runs, runs/s the median of its
blocks', and the daemon's CPU (user + system, all threads) per run over its blocks.
Afterwards `/metrics` must count every run made, the tracing daemon must have made
spans and the receiver taken some: a setting that did nothing fails the benchmark.

Target (issue 17): each costs <= 3%: first event p50 <= 1.03x off's, runs/s >= 0.97x.
On sqlite (`synchronous=full`, the default) and on `memory:`, where a run costs least,
so any overhead is the largest share of it.

    python -m bench.observability [--runs 3000] [--storage URL]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from ._processes import (
    Server,
    chinwag_serve,
    echo_config,
    run_alone,
    storage_label,
    storage_short,
    storage_tag,
)
from ._report import Baseline, Figure, Target, percentile
from .first_event import measure_daemon
from .mail import split_cores

BLOCK = 200
WARMUP = 300
OFF = "same daemon, metrics and tracing off, same run"
OTEL_OFF = {"OTEL_SDK_DISABLED": "true"}
SCRAPER = """
import sys, time, urllib.request
while True:
    urllib.request.urlopen(sys.argv[1], timeout=10).read()
    time.sleep(1)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Taken:
    """One daemon's samples: first-event latencies, each block's runs/s, its CPU time."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.rates: list[float] = []
        self.cpu = 0.0  # seconds, over every block


def alternate(servers: dict[str, Server], runs: int) -> dict[str, Taken]:
    """Every server's samples, taken in turns, a block of each at a time."""
    found = {name: Taken() for name in servers}
    for server in servers.values():
        trio.run(measure_daemon, server.socket_path, 0, WARMUP)
    done = 0
    while done < runs:
        block = min(BLOCK, runs - done)
        for name, server in servers.items():
            cpu = server.cpu_seconds()
            latencies, rate = trio.run(measure_daemon, server.socket_path, block, 0)
            taken = found[name]
            taken.cpu += server.cpu_seconds() - cpu
            taken.latencies.extend(latencies)
            taken.rates.append(rate)
        done += block
    return found


def runs_counted(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "chinwag_runs"
        for sample in family.samples
        if sample.name == "chinwag_runs_total"
    )


def figures(root: Path, runs: int, storage: str | None) -> list[Figure]:
    root.mkdir(parents=True, exist_ok=True)
    port, sink_port = free_port(), free_port()
    counts = root / "otlp-counts.txt"
    made = WARMUP + runs
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(
            process([sys.executable, "-m", "bench._otlp_sink", str(sink_port), str(counts)])
        )
        wait_for_port(sink_port, sink)
        servers = {
            "off": chinwag_serve(
                root / "off", echo_config(), storage, {"OTEL_SDK_DISABLED": "true"}
            ),
            "metrics": chinwag_serve(
                root / "metrics",
                echo_config(daemon=f'metrics = "127.0.0.1:{port}"'),
                storage,
                OTEL_OFF,
            ),
            "tracing": chinwag_serve(
                root / "tracing",
                echo_config(),
                storage,
                command=[sys.executable, "-m", "bench._traced_daemon"],
            ),
            "otlp": chinwag_serve(
                root / "otlp",
                echo_config(),
                storage,
                {
                    "OTEL_TRACES_EXPORTER": "otlp",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                    "OTEL_SERVICE_NAME": "chinwag-bench",
                },
            ),
        }
        for server in servers.values():
            stack.enter_context(server)
        url = f"http://127.0.0.1:{port}/metrics"
        stack.enter_context(process([sys.executable, "-c", SCRAPER, url]))
        with split_cores([s.pid for s in servers.values()]) as placement:
            found = alternate(servers, runs)
        counted = runs_counted(port)
        if counted != made:
            raise RuntimeError(f"/metrics counted {counted} runs of the {made} made")
    sent = counts.read_text().split() if counts.exists() else ["0", "0"]
    if int(sent[0]) == 0:
        raise RuntimeError("the OTLP daemon sent no spans to the receiver")
    log = servers["tracing"].log_path.read_text()
    dropped = re.search(r"spans dropped: (\d+)", log)
    if dropped is None or int(dropped[1]) == 0:
        raise RuntimeError("the tracing daemon made no spans")
    tag = storage_tag(storage)
    key = f"_{tag}" if tag else ""
    where = f" [{storage_short(storage)}]"
    off = found["off"]
    p50_off = [Baseline(OFF, percentile(off.latencies, 0.5) * 1e3)]
    rate_off = [Baseline(OFF, statistics.median(off.rates))]
    cpu_off = [Baseline(OFF, off.cpu / runs * 1e6)]
    note = (
        f"echo on {storage_label(storage)}, {runs} runs each after {WARMUP} for warm-up, in "
        f"blocks of {BLOCK} taken in turns; {placement}"
    )
    kinds = {
        "metrics": ("metrics on", f"; /metrics counted {made:,} runs", True),
        "tracing": (
            "tracing on (no-op exporter)",
            f"; {int(dropped[1]):,} spans made and dropped",
            True,
        ),
        "otlp": (
            "tracing on (OTLP/HTTP)",
            f"; a local receiver took {sent[0]} OTLP exports, {int(sent[1]):,} bytes",
            False,
        ),
    }
    out: list[Figure] = []
    for name, (what, checked, aimed) in kinds.items():
        taken = found[name]
        out += [
            Figure(
                f"{name}_first_event_p50{key}",
                "o",
                f"first event p50, {what}{where}",
                "ms",
                percentile(taken.latencies, 0.5) * 1e3,
                "lower",
                p50_off,
                Target("<=", 1.03, of=OFF) if aimed else None,
                note=note + checked,
            ),
            Figure(
                f"{name}_runs_per_s{key}",
                "o",
                f"sequential runs/s, {what}{where}",
                "runs/s",
                statistics.median(taken.rates),
                "higher",
                rate_off,
                Target(">=", 0.97, of=OFF) if aimed else None,
            ),
            Figure(
                f"{name}_cpu_per_run{key}",
                "o",
                f"daemon CPU per run, {what}{where}",
                "us",
                taken.cpu / runs * 1e6,
                "lower",
                cpu_off,
                note="user + system time of the daemon process (all its threads) over its "
                "blocks, per run",
            ),
        ]
    return out


def stores(storage: str | None) -> list[str | None]:
    return [storage] if storage is not None else [None, "memory:"]


def all_figures(root: Path, runs: int, storage: str | None) -> list[Figure]:
    found: list[Figure] = []
    for store in stores(storage):
        found += figures(root / (storage_tag(store) or "sqlite"), runs, store)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000, help="runs per daemon")
    run_alone(parser, lambda root, args: all_figures(root, args.runs, args.storage))


if __name__ == "__main__":
    main()
