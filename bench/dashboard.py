"""(w) The dashboard: how soon a page's event stream shows a run's text, and what open
pages cost the daemon.

A real `chinwag serve` (echo model) and a real `chinwag dashboard` on its socket. The
daemon is pinned to one CPU, alone; this client and the dashboard to the other.

- **Delivery.** RUNS runs stream at once (echo `/slow WORDS 20`: a word every 20 ms
  each). Each text delta's emission by the daemon is taken as its arrival at a direct
  socket `subscribe` client (the reference); the same delta's arrival at an SSE client
  of the dashboard's `/events` (httpx streaming, read line by line as a browser's
  `EventSource` reads it) is matched to it by run and position. The figure is the
  delay, p50 and p99; the baseline is the same delay for a second direct subscriber:
  what the measure reads when nothing stands between the daemon and the reader.
- **Run latency.** bench/first_event's client (`stream` "hello world", timed to its
  `start`) in blocks of BLOCK runs, taken in turns with STREAMS dashboard event
  streams open (`bench._event_streams`, in a process of its own, every stream read to
  the end as a browser's) and with none, the order of each pair swapped every round.
  For this part the dashboard and the streams' reader run at nice 19 on the client's
  CPU, as on a machine with a core for them they would not share the client's: the
  figure is the daemon's latency, not the client's share of a busy CPU. Also the
  daemon's and the dashboard's CPU in each state (the dashboard's per run event made),
  and how many run events the streams read: at this rate (~2,000 runs/s) a niced
  dashboard is not meant to keep up, and the streams read what it found the CPU for.
- **Paced runs with open streams.** STREAMS streams open (read as above), RUNS runs at
  once of PACED_WORDS words PACED_MS apart, a rate the streams must keep up with: the
  share of the text deltas the slowest stream read (every one, when they keep up), and
  each delta's delay at every stream after a direct subscriber's, p99 (the baseline: a
  second direct subscriber).

Targets (issue 16): delivery p99 <= 50 ms; run latency with STREAMS streams open
<= 1.03x with none (first event p50). The other figures have none.

    python -m bench.dashboard [--words 200] [--runs 2000] [--storage URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import trio
from chinwag.protocol import End, Event, Stream, Subscribe, Subscribed, TextDelta

from . import _processes
from ._processes import bench_env, chinwag_serve, echo_config, run_alone, storage_label
from ._report import Baseline, Figure, Target, percentile
from ._wire import connect
from .first_event import measure_daemon
from .mail import split_cores

TOKEN = "bench-dashboard-token"
RUNS = 10  # streaming at once
WORD_MS = 20
STREAMS = 50
BLOCK = 200
WARMUP = 200
PACED_WORDS = 100
PACED_MS = 50
PACED_GRACE_S = 10.0
START_S = 30.0
SECOND = "a second direct socket subscriber, same run"
NONE_OPEN = "no dashboard event stream open, same run"


@contextlib.contextmanager
def chinwag_dashboard(socket_path: Path, log_path: Path) -> Iterator[tuple[int, str]]:
    """A real `chinwag dashboard` on the daemon at ``socket_path``: its pid and address."""
    argv = [_processes.daemon_python, "-m", "chinwag.clients.cli", "--socket", str(socket_path)]
    argv += ["dashboard", "--port", "0", "--token", TOKEN]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=bench_env()
    )
    assert proc.stdout is not None
    output = proc.stdout
    address: queue.Queue[str] = queue.Queue()

    def drain() -> None:  # to the end, so that it never blocks on a full pipe
        with log_path.open("a") as log:
            for line in output:
                log.write(line)
                if found := re.search(r"chinwag dashboard on (\S+)", line):
                    address.put(found.group(1).rstrip("/"))

    threading.Thread(target=drain, daemon=True).start()
    try:
        try:
            url = address.get(timeout=START_S)
        except queue.Empty:
            raise RuntimeError(f"chinwag dashboard printed no address; see {log_path}") from None
        yield proc.pid, url
    finally:
        proc.terminate()
        proc.wait(10)


# --- delivery -------------------------------------------------------------------------

Arrivals = dict[tuple[str, int], float]  # (run_id, n-th text delta) -> when it arrived


async def subscriber(path: Path, arrivals: Arrivals, ready: trio.Event) -> None:
    conn = await connect(path)
    await conn.send(Subscribe(id=1))
    assert isinstance(await conn.recv(), Subscribed)
    ready.set()
    deltas: dict[str, int] = {}
    ended = 0
    while ended < RUNS:
        msg, at = await conn.recv_timed()
        if not isinstance(msg, Event):
            continue
        if isinstance(msg.event, TextDelta):
            n = deltas.get(msg.run_id, 0)
            deltas[msg.run_id] = n + 1
            arrivals[(msg.run_id, n)] = at
        elif isinstance(msg.event, End):
            ended += 1
    await conn.aclose()


async def browser(url: str, arrivals: Arrivals, ready: trio.Event) -> None:
    """The dashboard's event stream, as an `EventSource` reads it: line by line."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        login = await client.get("/feed", params={"token": TOKEN}, follow_redirects=True)
        login.raise_for_status()
        async with client.stream("GET", "/events") as response:
            kind = ""
            deltas: dict[str, int] = {}
            ended = 0
            async for line in response.aiter_lines():
                at = time.perf_counter()
                if line.startswith("event:"):
                    kind = line.partition(":")[2].strip()
                elif line.startswith("data:") and kind == "daemon":
                    ready.set()
                elif line.startswith("data:") and kind == "run":
                    item = json.loads(line.partition(":")[2])
                    event = item["event"]
                    if event["type"] == "text_delta":
                        n = deltas.get(item["run_id"], 0)
                        deltas[item["run_id"]] = n + 1
                        arrivals[(item["run_id"], n)] = at
                    elif event["type"] == "end":
                        ended += 1
                        if ended == RUNS:
                            return


async def one_slow_run(path: Path, index: int, words: int, word_ms: int = WORD_MS) -> None:
    conn = await connect(path)
    content = f"/slow {words} {word_ms}"
    await conn.send(Stream(id=1, agent="assistant", sender=f"bench-{index}", content=content))
    while not isinstance(msg := await conn.recv(), End):
        pass
    assert msg.status == "done", msg
    await conn.aclose()


async def delivery(path: Path, url: str, words: int) -> tuple[list[float], list[float]]:
    """Per text delta: (second subscriber's arrival, the SSE client's) after the first's."""
    first: Arrivals = {}
    second: Arrivals = {}
    sse: Arrivals = {}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            readies = [trio.Event() for _ in range(3)]
            nursery.start_soon(subscriber, path, first, readies[0])
            nursery.start_soon(subscriber, path, second, readies[1])
            nursery.start_soon(browser, url, sse, readies[2])
            for ready in readies:
                await ready.wait()
            for index in range(RUNS):
                nursery.start_soon(one_slow_run, path, index, words)
    expected = RUNS * words
    if not (len(first) == len(second) == len(sse) == expected):
        raise RuntimeError(
            f"{expected} text deltas made; the readers got {len(first)}, {len(second)}, {len(sse)}"
        )
    return [second[k] - first[k] for k in first], [sse[k] - first[k] for k in first]


# --- run latency with open streams ------------------------------------------------------


@contextlib.contextmanager
def open_streams(
    url: str, root: Path, ends: int | None = None
) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """STREAMS event streams of the dashboard, open and read (with ``ends``, until that
    many runs have ended; see bench._event_streams); the report file and the reader."""
    report = root / f"streams-{time.monotonic_ns()}.txt"
    argv = [sys.executable, "-m", "bench._event_streams", url, TOKEN, str(STREAMS), str(report)]
    argv += [] if ends is None else [str(ends)]
    proc = subprocess.Popen(argv, env=bench_env(), preexec_fn=lambda: os.nice(19))
    try:
        deadline = time.monotonic() + START_S
        while not report.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{STREAMS} dashboard event streams did not open")
            time.sleep(0.05)
        yield report, proc
    finally:
        proc.terminate()
        proc.wait(10)


def niced(pid: int) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), 19)


class Taken:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.cpu = 0.0
        self.dashboard_cpu = 0.0


async def run_events(path: Path) -> int:
    """How many events one of bench/first_event's runs makes, as a subscriber reads them."""
    conn = await connect(path)
    await conn.send(Subscribe(id=1))
    assert isinstance(await conn.recv(), Subscribed)
    count = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(measure_daemon, path, 1, 0)
        while True:
            msg = await conn.recv()
            if isinstance(msg, Event):
                count += 1
                if isinstance(msg.event, End):
                    break
    await conn.aclose()
    return count


def run_latency(
    server: _processes.Server, dashboard: int, url: str, runs: int, root: Path
) -> tuple[Taken, Taken, list[list[int]]]:
    """(none open, STREAMS open, per block they were open: the fewest and the most run
    events a stream read, and how many times streams were opened again)."""
    none, opened = Taken(), Taken()
    read: list[list[int]] = []
    trio.run(measure_daemon, server.socket_path, 0, WARMUP)
    done = 0
    turn = 0
    while done < runs:
        block = min(BLOCK, runs - done)
        for state in ("none", "open") if turn % 2 == 0 else ("open", "none"):
            with contextlib.ExitStack() as stack:
                report = stack.enter_context(open_streams(url, root)) if state == "open" else None
                cpu = server.cpu_seconds()
                dashboard_cpu = _processes.cpu_seconds(dashboard)
                latencies, _ = trio.run(measure_daemon, server.socket_path, block, 0)
                taken = opened if state == "open" else none
                taken.cpu += server.cpu_seconds() - cpu
                taken.latencies += latencies
            # After the streams have closed: what the dashboard still had to send them.
            taken.dashboard_cpu += _processes.cpu_seconds(dashboard) - dashboard_cpu
            if report is not None:
                read.append([int(n) for n in report[0].read_text().split()])
        done += block
        turn += 1
    return none, opened, read


async def paced_runs(path: Path, words: int) -> tuple[Arrivals, Arrivals]:
    """RUNS runs of ``words`` words PACED_MS apart at once: the two direct subscribers'
    arrivals of their text deltas."""
    first: Arrivals = {}
    second: Arrivals = {}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            readies = [trio.Event() for _ in range(2)]
            nursery.start_soon(subscriber, path, first, readies[0])
            nursery.start_soon(subscriber, path, second, readies[1])
            for ready in readies:
                await ready.wait()
            for index in range(RUNS):
                nursery.start_soon(one_slow_run, path, index, words, PACED_MS)
    return first, second


class Paced:
    """The paced block: each text delta's delay at every open stream (and at a second
    direct subscriber) after the first subscriber, how many were made, the fewest a
    stream read, and how many times a stream was opened again."""

    def __init__(self, server: _processes.Server, url: str, words: int, root: Path) -> None:
        with open_streams(url, root, ends=RUNS) as (report, proc):
            first, second = trio.run(paced_runs, server.socket_path, words)
            # Every stream done once it has read the RUNS ends; one that fell behind
            # never is, and is stopped after this.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(PACED_GRACE_S)
        read = json.loads(report.read_text())
        self.made = len(first)
        self.second = [second[key] - first[key] for key in first]
        self.streams = [at - first[(run_id, n)] for s in read["arrivals"] for run_id, n, at in s]
        self.fewest = min(len(arrivals) for arrivals in read["arrivals"])
        self.reopened: int = read["reopened"]


def figures(root: Path, words: int, runs: int, storage: str | None) -> list[Figure]:
    root.mkdir(parents=True, exist_ok=True)
    with (
        chinwag_serve(root / "daemon", echo_config(), storage) as server,
        split_cores([server.pid]) as placement,
        chinwag_dashboard(server.socket_path, root / "dashboard.log") as (pid, url),
    ):
        second, sse = trio.run(delivery, server.socket_path, url, words)
        niced(pid)
        none, opened, read = run_latency(server, pid, url, runs, root)
        events_per_run = trio.run(run_events, server.socket_path)
        paced = Paced(server, url, PACED_WORDS, root)
    dropped = server.log_path.read_text().count("subscriber_too_slow")
    ms = 1e3
    note = (
        f"echo on {storage_label(storage)}; {RUNS} runs at once, {words} words each "
        f"{WORD_MS} ms apart: {len(sse):,} text deltas matched; {placement}, the dashboard "
        "with the client"
    )
    fewest, most = min(r[0] for r in read), max(r[1] for r in read)
    first_note = (
        f"{runs} runs in each state after {WARMUP} for warm-up, in blocks of {BLOCK} taken in "
        f"turns; {placement}, the dashboard and the streams' reader at nice 19; an open "
        f"stream read {fewest:,} to {most:,} run events in a block of ~{BLOCK * 5:,} made; "
        f"streams ended for falling behind and opened again: {sum(r[2] for r in read):,}; "
        f"the daemon dropped the dashboard's subscription for falling behind {dropped} times"
    )
    return [
        Figure(
            "dashboard_delivery_p50",
            "w",
            "a text delta, daemon to dashboard SSE client, p50",
            "ms",
            percentile(sse, 0.5) * ms,
            "lower",
            [Baseline(SECOND, percentile(second, 0.5) * ms)],
            note=note,
        ),
        Figure(
            "dashboard_delivery_p99",
            "w",
            "a text delta, daemon to dashboard SSE client, p99",
            "ms",
            percentile(sse, 0.99) * ms,
            "lower",
            [Baseline(SECOND, percentile(second, 0.99) * ms)],
            Target("<=", 50.0),
        ),
        Figure(
            "dashboard_streams_first_event_p50",
            "w",
            f"first event p50, {STREAMS} dashboard event streams open",
            "ms",
            percentile(opened.latencies, 0.5) * ms,
            "lower",
            [Baseline(NONE_OPEN, percentile(none.latencies, 0.5) * ms)],
            Target("<=", 1.03, of=NONE_OPEN),
            note=first_note,
        ),
        Figure(
            "dashboard_streams_cpu_per_run",
            "w",
            f"daemon CPU per run, {STREAMS} dashboard event streams open",
            "us",
            opened.cpu / runs * 1e6,
            "lower",
            [Baseline(NONE_OPEN, none.cpu / runs * 1e6)],
            note="user + system time of the daemon process over its blocks, per run",
        ),
        Figure(
            "dashboard_streams_cpu_per_event",
            "w",
            f"dashboard CPU per run event, {STREAMS} event streams open",
            "us",
            opened.dashboard_cpu / (runs * events_per_run) * 1e6,
            "lower",
            [Baseline(NONE_OPEN, none.dashboard_cpu / (runs * events_per_run) * 1e6)],
            note=(
                f"user + system time of the dashboard process over the blocks above (until "
                f"the streams closed), per run event made ({events_per_run} a run)"
            ),
        ),
        Figure(
            "dashboard_paced_read",
            "w",
            f"text deltas read by the slowest of {STREAMS} event streams, paced runs",
            "%",
            paced.fewest / paced.made * 100,
            "higher",
            note=(
                f"{RUNS} runs at once, {PACED_WORDS} words each {PACED_MS} ms apart "
                f"({paced.made:,} text deltas), {STREAMS} dashboard event streams open and "
                f"read (the reader and the dashboard at nice 19 on the client's CPU); "
                f"streams ended for falling behind and opened again: {paced.reopened}"
            ),
        ),
        Figure(
            "dashboard_paced_delivery_p99",
            "w",
            f"a text delta, daemon to each of {STREAMS} event streams, paced runs, p99",
            "ms",
            percentile(paced.streams, 0.99) * ms,
            "lower",
            [Baseline(SECOND, percentile(paced.second, 0.99) * ms)],
            note=f"{len(paced.streams):,} deliveries matched",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=200, help="words of each streaming run")
    parser.add_argument("--runs", type=int, default=2000, help="runs in each state")
    run_alone(parser, lambda root, args: figures(root, args.words, args.runs, args.storage))


if __name__ == "__main__":
    main()
