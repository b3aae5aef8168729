"""First-event latency and sequential runs/s: the echo agent on sqlite, one connection.

Baseline, measured in the same run: a bare trio Unix-socket server that answers
each framed request with one framed reply, in its own process like the daemon.
The client is the same thin framed-msgpack loop for both, so the ratio is what
the daemon adds on top of a socket round trip.

    python -m bench.first_event [--runs 2000] [--warmup 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from chinwag.protocol import MSGPACK, End, FrameDecoder, Hello, Start, Stream

CONFIG = """
[agents.assistant]
provider = "echo"
"""

SENDERS = 100

BASELINE_SERVER = r"""
import sys, trio
async def handle(stream):
    buf = bytearray()
    async with stream:
        while data := await stream.receive_some(65536):
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                n = int.from_bytes(buf[:4], "big")
                body = bytes(buf[4:4 + n]); del buf[:4 + n]
                await stream.send_all(len(body).to_bytes(4, "big") + body)
async def main(path):
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path); sock.listen(16)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])
trio.run(main, sys.argv[1])
"""


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                time.sleep(0.02)
    raise SystemExit(f"nothing listened on {path}")


class Framed:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(1 << 30)

    async def recv_body(self) -> bytes:
        while (body := self.decoder.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.decoder.feed(data)
        return body


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_daemon(path: Path, runs: int, warmup: int) -> tuple[list[float], float]:
    stream = await trio.open_unix_socket(str(path))
    conn = Framed(stream)
    await stream.send_all(MSGPACK.encode_frame(Hello(protocol=1, client="bench")))
    await conn.recv_body()
    firsts: list[float] = []
    started = 0.0
    for i in range(warmup + runs):
        if i == warmup:
            started = time.perf_counter()
        # Rotate over conversations, as a bridge serving many chats does, so that
        # no one context grows without bound (no compaction in this benchmark).
        msg = Stream(id=1, agent="assistant", sender=f"bench-{i % SENDERS}", content="hello world")
        t0 = time.perf_counter()
        await stream.send_all(MSGPACK.encode_frame(msg))
        first = MSGPACK.decode_server(await conn.recv_body())
        assert isinstance(first, Start), first
        if i >= warmup:
            firsts.append(time.perf_counter() - t0)
        while True:
            event = MSGPACK.decode_server(await conn.recv_body())
            if isinstance(event, End):
                assert event.status == "done", event
                break
    elapsed = time.perf_counter() - started
    await stream.aclose()
    return firsts, runs / elapsed


async def measure_baseline(path: Path, runs: int, warmup: int) -> tuple[list[float], float]:
    stream = await trio.open_unix_socket(str(path))
    conn = Framed(stream)
    frame = MSGPACK.encode_frame(
        Stream(id=1, agent="assistant", sender="bench", content="hello world")
    )
    samples: list[float] = []
    started = 0.0
    for i in range(warmup + runs):
        if i == warmup:
            started = time.perf_counter()
        t0 = time.perf_counter()
        await stream.send_all(frame)
        await conn.recv_body()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    await stream.aclose()
    return samples, runs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--storage", default=None, help="storage URL (default: sqlite in a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cwb-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "config.toml").write_text(CONFIG)
        storage = args.storage or f"sqlite:///{root / 'bench.db'}"
        daemon_sock, base_sock = root / "d.sock", root / "b.sock"
        env = dict(os.environ, CHINWAG_CONFIG=str(root / "config.toml"))
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chinwag.daemon",
                "--socket",
                str(daemon_sock),
                "--storage",
                storage,
                "--config",
                str(root / "config.toml"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        baseline = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(base_sock)])
        try:
            wait_for_socket(daemon_sock, daemon)
            wait_for_socket(base_sock, baseline)
            d_first, d_rate = trio.run(measure_daemon, daemon_sock, args.runs, args.warmup)
            b_rtt, b_rate = trio.run(measure_baseline, base_sock, args.runs, args.warmup)
        finally:
            for proc in (daemon, baseline):
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    rows = [
        ("first event p50 (ms)", percentile(d_first, 0.5) * 1e3, percentile(b_rtt, 0.5) * 1e3, 0.5),
        (
            "first event p99 (ms)",
            percentile(d_first, 0.99) * 1e3,
            percentile(b_rtt, 0.99) * 1e3,
            None,
        ),
        ("sequential runs/s", d_rate, b_rate, 2000),
    ]
    print(
        f"echo agent on {storage.split(':')[0]}, {args.runs} runs over one connection "
        f"(baseline: bare trio socket round trip)"
    )
    print(f"{'figure':<24}{'chinwag':>12}{'baseline':>12}{'ratio':>9}{'target':>10}")
    for name, ours, base, target in rows:
        print(
            f"{name:<24}{ours:>12.3f}{base:>12.3f}{ours / base:>9.2f}"
            f"{'' if target is None else format(target, 'g'):>10}"
        )


if __name__ == "__main__":
    main()
