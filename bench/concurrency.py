"""(c) 1,000 concurrent conversations, each streaming at 50 tokens/s.

Each conversation has its own connection (1,000 clients at once) and sends
`/slow N 20` to the echo agent: the words 1..N, the model pausing 20 ms before
each. All requests are written at once.

Event delay, defined: for the k-th `text_delta` of a run, the gap since the
previous event of that run (its `start` for k = 1) minus the model's 20 ms
pause, or 0 when the gap was shorter (a token right behind a late one waited
no more than the pace): what the daemon, the socket and the client added on
top of the model's pace. Only gaps that end while every conversation is streaming count
(the window from the last `start` to the first run's last token); runs start
staggered because each stores its user entry first.

Also reported: lateness against the ideal schedule (the k-th token due k x 20 ms
after the run's `start` arrived), which accumulates the delays; and the
daemon's CPU over the same window, from /proc/<pid>/stat, in % of one core.

Baseline, same run: a bare trio server (`bench._bare_server stream`) that
sends the same frames on the same pacing (sleep 20 ms, send one frame) to the
same client, with no runtime and no storage.

The client is one process driving every socket with epoll, decoding each
frame; it stamps each read with time.perf_counter().

Target (issue 11): event delay p99 <= 1.3x the bare server's p99, same run.

    python -m bench.concurrency [--conversations 1000] [--tokens 150] [--storage URL]
"""

from __future__ import annotations

import argparse
import errno
import itertools
import select
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from chinwag.protocol import MSGPACK, End, FrameDecoder, Hello, Start, Stream, TextDelta, Welcome

from ._processes import (
    Server,
    bare_server,
    chinwag_serve,
    echo_config,
    run_alone,
    storage_label,
)
from ._report import Baseline, Figure, Target, percentile

PACE_MS = 20
SAMPLE_EVERY_S = 0.2


@dataclass
class Conv:
    sock: socket.socket
    sender: str
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(1 << 30))
    sent: float = 0.0
    start: float = 0.0
    tokens: list[float] = field(default_factory=list)
    end: float = 0.0
    status: str = ""


@dataclass
class Outcome:
    convs: list[Conv]
    samples: list[tuple[float, float, int]]  # (time, server CPU s, server RSS KiB)
    client_cpu_s: float
    wall_s: float
    ended: float  # when the client stopped reading (all ended, or the deadline)


def open_conn(path: Path) -> socket.socket:
    """Connect and say hello, retrying while the listener's backlog is full."""
    for attempt in range(10):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED):
                raise
            time.sleep(0.01 * 2**attempt)
            continue
        sock.sendall(MSGPACK.encode_frame(Hello(protocol=1, client="bench-load")))
        decoder = FrameDecoder(1 << 30)
        while (body := decoder.next_frame()) is None:
            data = sock.recv(65536)
            if not data:
                raise EOFError("the server closed the connection before `welcome`")
            decoder.feed(data)
        assert isinstance(MSGPACK.decode_server(body), Welcome)
        return sock
    raise OSError(f"{path}: the backlog stayed full")


def drive(server: Server, conversations: int, content: str, tokens: int, timeout: float) -> Outcome:
    """Open a connection per conversation (each new, its sender unique), then send
    ``content`` on each at once and read every event as it comes; every run that
    ends must end `done` with ``tokens`` words."""
    convs = [
        Conv(open_conn(server.socket_path), f"load-{i}-{time.monotonic_ns()}")
        for i in range(conversations)
    ]
    by_fd = {c.sock.fileno(): c for c in convs}
    poller = select.epoll()
    for c in convs:
        c.sock.setblocking(False)
        poller.register(c.sock.fileno(), select.EPOLLIN)
    samples = [(time.perf_counter(), server.cpu_seconds(), server.rss_kib())]
    cpu0 = time.process_time()
    for c in convs:
        frame = MSGPACK.encode_frame(
            Stream(id=1, agent="assistant", sender=c.sender, content=content)
        )
        c.sent = time.perf_counter()
        c.sock.sendall(frame)
    started = time.perf_counter()
    open_count = len(convs)
    next_sample = started + SAMPLE_EVERY_S
    deadline = started + timeout
    decode = MSGPACK.decode_server
    while open_count:
        for fd, _ in poller.poll(SAMPLE_EVERY_S / 2):
            c = by_fd[fd]
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            now = time.perf_counter()
            if not data:
                raise EOFError(f"{c.sender}: the server closed the connection mid-run")
            c.decoder.feed(data)
            for body in c.decoder:
                event = decode(body)
                if type(event) is TextDelta:
                    c.tokens.append(now)
                elif type(event) is Start:
                    c.start = now
                elif type(event) is End:
                    c.end, c.status = now, event.status
                    poller.unregister(fd)
                    open_count -= 1
        now = time.perf_counter()
        if now >= next_sample:
            samples.append((now, server.cpu_seconds(), server.rss_kib()))
            next_sample = now + SAMPLE_EVERY_S
        if now > deadline:
            break  # the runs left unfinished are reported, not waited for
    ended = time.perf_counter()
    samples.append((ended, server.cpu_seconds(), server.rss_kib()))
    wall = ended - started
    client_cpu = time.process_time() - cpu0
    poller.close()
    for c in convs:
        c.sock.close()
    # A run that ended must have ended `done` with every token; one still open is reported.
    bad = [c for c in convs if c.status and (c.status != "done" or len(c.tokens) != tokens)]
    assert not bad, f"{len(bad)} runs went wrong, e.g. {bad[0].status} {len(bad[0].tokens)}"
    return Outcome(convs, samples, client_cpu, wall, ended)


@dataclass
class Analysis:
    finished: int  # runs that reached `end` before the deadline
    first_event_ms: list[float]  # request -> `start`, per run that started
    delays_ms: list[float]
    lateness_ms: list[float]
    window: tuple[float, float]
    full: bool  # True when every conversation streamed at once for a while
    cpu_pct: float  # of one core, over the window
    rss_mib: float  # the most seen

    @property
    def window_s(self) -> float:
        return self.window[1] - self.window[0]


def analyse(outcome: Outcome) -> Analysis:
    pace = PACE_MS / 1000
    convs = outcome.convs
    started = [c for c in convs if c.start]
    finished = sum(1 for c in convs if c.status)
    # A run still open at the deadline was streaming until then.
    last = [c.tokens[-1] if c.status else outcome.ended for c in convs]
    lo = max(c.start for c in started)
    hi = min(last)
    full = len(started) == len(convs) and hi > lo + 1.0
    if not full:  # never all at once: count the whole runs, and say so
        lo = min(c.start for c in started)
        hi = max(last)
    delays: list[float] = []
    lateness: list[float] = []
    for c in convs:
        previous = c.start
        for k, t in enumerate(c.tokens, 1):
            if lo <= t <= hi:
                # A token that follows a late one closely is not early: it waited no more.
                delays.append(max(0.0, t - previous - pace) * 1e3)
                lateness.append((t - c.start - k * pace) * 1e3)
            previous = t
    return Analysis(
        finished,
        first_events_ms(outcome),
        delays,
        lateness,
        (lo, hi),
        full,
        cpu_between(outcome.samples, lo, hi),
        peak_rss(outcome),
    )


def first_events_ms(outcome: Outcome) -> list[float]:
    """Per run that started, ms from writing its request to reading its `start`."""
    return [(c.start - c.sent) * 1e3 for c in outcome.convs if c.start]


def cpu_between(samples: list[tuple[float, float, int]], lo: float, hi: float) -> float:
    """CPU used between two instants, interpolated between samples, in % of one core."""

    def at(t: float) -> float:
        for (t0, c0, _), (t1, c1, _) in itertools.pairwise(samples):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0)
        return samples[-1][1] if t > samples[-1][0] else samples[0][1]

    return 100 * (at(hi) - at(lo)) / (hi - lo) if hi > lo else 0.0


def peak_rss(outcome: Outcome) -> float:
    return max(rss for _, _, rss in outcome.samples) / 1024


def figures(
    root: Path, conversations: int, tokens: int, storage: str | None = None, *, main: bool = True
) -> list[Figure]:
    """The figures of one scale; ``main`` False: keys get the scale, and no target."""
    # A server that cannot keep the pace gets this long; what it sent by then is analysed.
    timeout = 10 + tokens * PACE_MS / 1000 * 3
    content = f"/slow {tokens} {PACE_MS}"
    with chinwag_serve(root / f"concurrency-{conversations}", echo_config(), storage) as daemon:
        ours_raw = drive(daemon, conversations, content, tokens, timeout)
    with bare_server(root, "stream") as bare:
        base_raw = drive(bare, conversations, content, tokens, timeout)
    ours, base = analyse(ours_raw), analyse(base_raw)
    suffix = "" if main else f"_{conversations}"
    label = "bare trio server, sleep 20 ms + frame"
    window = (
        f"{ours.window_s:.1f} s with all {conversations} streaming"
        if ours.full
        else f"runs never all streamed at once; whole runs, {ours.window_s:.1f} s"
    )
    head = (
        f"{conversations} x `/slow {tokens} {PACE_MS}`, echo on {storage_label(storage)}; "
        f"runs finished: {ours.finished} (baseline {base.finished}) of {conversations} in "
        f"{timeout:g} s; first event p50/p99 {percentile(ours.first_event_ms, 0.5):.0f}/"
        f"{percentile(ours.first_event_ms, 0.99):.0f} ms"
    )
    return [
        Figure(
            f"concurrent_delay_p50{suffix}",
            "c",
            f"{conversations} streams at 50 tok/s: event delay p50",
            "ms",
            percentile(ours.delays_ms, 0.5),
            "lower",
            [Baseline(label, percentile(base.delays_ms, 0.5))],
            note=f"{head}; delay = max(0, gap since the run's previous event - 20 ms); "
            f"window: {window}",
        ),
        Figure(
            f"concurrent_delay_p99{suffix}",
            "c",
            f"{conversations} streams at 50 tok/s: event delay p99",
            "ms",
            percentile(ours.delays_ms, 0.99),
            "lower",
            [Baseline(label, percentile(base.delays_ms, 0.99))],
            Target("<=", 1.3, of=label) if main else None,
        ),
        Figure(
            f"concurrent_lateness_p99{suffix}",
            "c",
            f"{conversations} streams: lateness vs schedule p99",
            "ms",
            percentile(ours.lateness_ms, 0.99),
            "lower",
            [Baseline(label, percentile(base.lateness_ms, 0.99))],
            note="k-th token vs `start` + k x 20 ms: the delays accumulated along a run",
        ),
        Figure(
            f"concurrent_cpu{suffix}",
            "c",
            f"{conversations} streams: server CPU",
            "% of a core",
            ours.cpu_pct,
            "lower",
            [Baseline(label, base.cpu_pct)],
            note=f"load client used {100 * ours_raw.client_cpu_s / ours_raw.wall_s:.0f}% of a "
            f"core (baseline run: {100 * base_raw.client_cpu_s / base_raw.wall_s:.0f}%)",
        ),
        Figure(
            f"concurrent_rss{suffix}",
            "c",
            f"{conversations} streams: server RSS, peak",
            "MiB",
            ours.rss_mib,
            "lower",
            [Baseline(label, base.rss_mib)],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=150)
    run_alone(
        parser, lambda root, args: figures(root, args.conversations, args.tokens, args.storage)
    )


if __name__ == "__main__":
    main()
