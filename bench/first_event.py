"""(a) First-event latency and sequential runs/s: the echo agent on sqlite, one connection.

chinwag: a `stream` of "hello world" to the echo agent, timed from the write
of the request to the arrival of its `start` (the user entry is durably
stored by then); runs/s counts whole runs (through `end done`) back to back.
The conversations rotate over 100 senders, as a bridge serving many chats does.

Baselines, measured in the same run, each in its own process like the daemon:
- a bare trio Unix-socket server that answers each frame with the same frame
  (the client is the same thin framed-msgpack loop, so the ratio is what the
  daemon adds on top of a socket round trip);
- a bare Starlette endpoint under uvicorn, on a Unix socket, that streams the
  same events as Server-Sent Events (POST, then `start`, the words, `usage`,
  `end`); the client is a raw HTTP/1.1 keep-alive loop, timed to the first
  `data:` of the response and, for runs/s, to the end of the chunked body.

    python -m bench.first_event [--runs 2000] [--warmup 200] [--storage URL]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from chinwag.protocol import MSGPACK, End, Start, Stream

from ._processes import Server, bare_server, chinwag_serve, echo_config, sse_server, storage_label
from ._report import Baseline, Figure, Target, percentile, print_figures
from ._wire import Framed, connect

__all__ = ["Framed", "figures", "main", "percentile"]

SENDERS = 100
CONTENT = "hello world"


async def measure_daemon(path: Path, runs: int, warmup: int) -> tuple[list[float], float]:
    conn = await connect(path)
    firsts: list[float] = []
    started = 0.0
    for i in range(warmup + runs):
        if i == warmup:
            started = time.perf_counter()
        # Rotate over conversations, as a bridge serving many chats does, so that
        # no one context grows without bound (no compaction in this benchmark).
        msg = Stream(id=1, agent="assistant", sender=f"bench-{i % SENDERS}", content=CONTENT)
        t0 = time.perf_counter()
        await conn.send(msg)
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
    await conn.aclose()
    return firsts, runs / elapsed


async def measure_round_trip(path: Path, runs: int, warmup: int) -> tuple[list[float], float]:
    conn = Framed(await trio.open_unix_socket(str(path)))
    frame = MSGPACK.encode_frame(Stream(id=1, agent="assistant", sender="bench", content=CONTENT))
    samples: list[float] = []
    started = 0.0
    for i in range(warmup + runs):
        if i == warmup:
            started = time.perf_counter()
        t0 = time.perf_counter()
        await conn.stream.send_all(frame)
        await conn.recv_body()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    await conn.aclose()
    return samples, runs / elapsed


def sse_request(content: str) -> bytes:
    body = b'{"content": "' + content.encode() + b'"}'
    head = (
        "POST /stream HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def measure_sse(path: Path, runs: int, warmup: int) -> tuple[list[float], float]:
    stream = await trio.open_unix_socket(str(path))
    request = sse_request(CONTENT)
    firsts: list[float] = []
    started = 0.0
    for i in range(warmup + runs):
        if i == warmup:
            started = time.perf_counter()
        t0 = time.perf_counter()
        await stream.send_all(request)
        received = b""
        first = None
        # The whole response: headers, then a chunk per event, then the last chunk.
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("uvicorn closed the connection")
            received += data
            if first is None and b"data:" in received:
                first = time.perf_counter() - t0
        assert b"event: end" in received, received
        if i >= warmup:
            assert first is not None
            firsts.append(first)
    elapsed = time.perf_counter() - started
    await stream.aclose()
    return firsts, runs / elapsed


async def check_sse(path: Path) -> None:
    """With httpx, as a real client would: the endpoint speaks valid SSE, the same words."""
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=str(path))
    deltas: list[str] = []
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
        client.stream("POST", "/stream", json={"content": CONTENT}) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind == "text_delta":
                deltas.append(json.loads(line.removeprefix("data: "))["delta"])
    assert "".join(deltas) == CONTENT, deltas


def sse_available() -> str | None:
    """Why the SSE baseline cannot run, or None."""
    try:
        import httpx  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: pip install '.[bench]'"
    return None


Measurement = tuple[list[float], float, float]  # latencies (s), rate (/s), server CPU s per run


def on(
    server: Server,
    measure: Callable[[Path, int, int], Awaitable[tuple[list[float], float]]],
    runs: int,
    warmup: int,
) -> Measurement:
    """Warm up, then measure, reading the server's CPU time around the measured runs."""
    trio.run(measure, server.socket_path, warmup, 0)
    cpu = server.cpu_seconds()
    latencies, rate = trio.run(measure, server.socket_path, runs, 0)
    return latencies, rate, (server.cpu_seconds() - cpu) / runs


def figures(root: Path, runs: int, warmup: int, storage: str | None = None) -> list[Figure]:
    """Measure chinwag and its baselines, one after another, each over one connection."""
    with chinwag_serve(root / "first-event", echo_config(), storage) as daemon:
        d_first, d_rate, d_cpu = on(daemon, measure_daemon, runs, warmup)
    with bare_server(root, "echo") as bare:
        b_rtt, b_rate, b_cpu = on(bare, measure_round_trip, runs, warmup)
    trio_rtt = "bare trio socket round trip"
    bases = {
        "p50": [Baseline(trio_rtt, percentile(b_rtt, 0.5) * 1e3)],
        "p99": [Baseline(trio_rtt, percentile(b_rtt, 0.99) * 1e3)],
        "rate": [Baseline(trio_rtt, b_rate)],
        "cpu": [Baseline(trio_rtt, b_cpu * 1e6)],
    }
    note = ""
    if (missing := sse_available()) is None:
        with sse_server(root) as sse:
            trio.run(check_sse, sse.socket_path)
            s_first, s_rate, s_cpu = on(sse, measure_sse, runs, warmup)
        sse_first = "Starlette SSE (uvicorn), first data"
        sse_whole = "Starlette SSE (uvicorn), whole stream"
        bases["p50"].append(Baseline(sse_first, percentile(s_first, 0.5) * 1e3))
        bases["p99"].append(Baseline(sse_first, percentile(s_first, 0.99) * 1e3))
        bases["rate"].append(Baseline(sse_whole, s_rate))
        bases["cpu"].append(Baseline(sse_whole, s_cpu * 1e6))
    else:
        note = f"no SSE baseline: {missing}"
    where = storage_label(storage)
    return [
        Figure(
            "first_event_p50",
            "a",
            "first event p50",
            "ms",
            percentile(d_first, 0.5) * 1e3,
            "lower",
            bases["p50"],
            Target("<=", 0.5),
            note=f"stream -> `start` (user entry stored), echo on {where}, {runs} runs",
        ),
        Figure(
            "first_event_p99",
            "a",
            "first event p99",
            "ms",
            percentile(d_first, 0.99) * 1e3,
            "lower",
            bases["p99"],
        ),
        Figure(
            "runs_per_s",
            "a",
            "sequential runs/s, one connection",
            "runs/s",
            d_rate,
            "higher",
            bases["rate"],
            Target(">=", 2000),
            note=note,
        ),
        Figure(
            "cpu_per_run",
            "a",
            "server CPU per run",
            "us",
            d_cpu * 1e6,
            "lower",
            bases["cpu"],
            note="user + system time of the server process (all its threads), from /proc",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--storage", default=None, help="storage URL (default: sqlite in a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cwb-", dir="/tmp") as tmp:
        found = figures(Path(tmp), args.runs, args.warmup, args.storage)
    print_figures(__doc__.splitlines()[0], found)


if __name__ == "__main__":
    main()
