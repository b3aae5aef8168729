"""(a) First-event latency and sequential runs/s: the echo agent, one connection.

chinwag: a `stream` of "hello world" to the echo agent, timed from the write
of the request to the arrival of its `start` (the user entry is durably
stored by then); runs/s counts whole runs (through `end done`) back to back;
server CPU per run is the daemon process's user + system time over them.
The conversations rotate over 100 senders, as a bridge serving many chats does.

Baselines, measured in the same run, each in its own process like the daemon:
- raw-durable, on a sqlite store only (`bench._bare_server durable`): a bare
  trio server answering the same frames that makes the same sqlite commits per
  run as the daemon, with the same `synchronous`, inline on its loop: the
  user entry committed before `start`, the answer before `end`. The floor of
  the durable path;
- a bare trio Unix-socket server that answers each frame with the same frame
  (the client is the same thin framed-msgpack loop, so the ratio is what the
  daemon adds on top of a socket round trip);
- a bare Starlette endpoint under uvicorn, on a Unix socket, that streams the
  same events as Server-Sent Events (POST, then `start`, the words, `usage`,
  `end`); the client is a raw HTTP/1.1 keep-alive loop, timed to the first
  `data:` of the response and, for runs/s, to the end of the chunked body.

Targets (issue 11): on sqlite with synchronous=full, first event p50 <= 1.3x
raw-durable's and runs/s >= 0.7x; with synchronous=normal, p50 <= 0.45 ms and
>= 1,500 runs/s; on `memory:`, p50 <= 2x the bare round trip and >= 2,500 runs/s.

    python -m bench.first_event [--runs 2000] [--warmup 200] [--storage URL] [--no-sse]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from chinwag.protocol import MSGPACK, End, Start, Stream

from ._processes import (
    Server,
    bare_server,
    chinwag_serve,
    echo_config,
    raw_durable,
    run_alone,
    sse_server,
    storage_label,
    storage_short,
    storage_tag,
    synchronous_of,
)
from ._report import Baseline, Figure, Target, percentile
from ._wire import Framed, connect

__all__ = ["Framed", "figures", "main", "percentile"]

SENDERS = 100
CONTENT = "hello world"
ROUND_TRIP = "bare trio socket round trip"


def raw_durable_label(synchronous: str) -> str:
    return f"raw-durable: bare trio + sqlite {synchronous}"


async def one_run(conn: Framed, sender: str) -> float:
    """One run of CONTENT, read to its `end done`; seconds from the request to `start`."""
    t0 = time.perf_counter()
    await conn.send(Stream(id=1, agent="assistant", sender=sender, content=CONTENT))
    first = MSGPACK.decode_server(await conn.recv_body())
    latency = time.perf_counter() - t0
    assert isinstance(first, Start), first
    while True:
        event = MSGPACK.decode_server(await conn.recv_body())
        if isinstance(event, End):
            assert event.status == "done", event
            return latency


async def measure_daemon(path: Path, runs: int, warmup: int) -> tuple[list[float], float]:
    conn = await connect(path)
    firsts: list[float] = []
    started = 0.0
    for i in range(warmup + runs):
        if i == warmup:
            started = time.perf_counter()
        # Rotate over conversations, as a bridge serving many chats does, so that
        # no one context grows without bound (no compaction in this benchmark).
        latency = await one_run(conn, f"bench-{i % SENDERS}")
        if i >= warmup:
            firsts.append(latency)
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


def targets(storage: str | None) -> dict[str, Target]:
    """Issue 11's targets for first event p50 ("p50") and runs/s ("rate") on this store."""
    synchronous = synchronous_of(storage)
    if synchronous == "full":
        raw = raw_durable_label("full")
        return {"p50": Target("<=", 1.3, of=raw), "rate": Target(">=", 0.7, of=raw)}
    if synchronous == "normal":
        return {"p50": Target("<=", 0.45), "rate": Target(">=", 1500)}
    if storage == "memory:":
        return {"p50": Target("<=", 2, of=ROUND_TRIP), "rate": Target(">=", 2500)}
    return {}


def figures(
    root: Path, runs: int, warmup: int, storage: str | None = None, *, sse: bool = True
) -> list[Figure]:
    """Measure chinwag and its baselines, one after another, each over one connection.

    Keys and names carry the store unless it is the default (sqlite, synchronous=full);
    ``sse`` False leaves out the Starlette baseline.
    """
    with chinwag_serve(root / "first-event", echo_config(), storage) as daemon:
        d_first, d_rate, d_cpu = on(daemon, measure_daemon, runs, warmup)
    bases: dict[str, list[Baseline]] = {"p50": [], "p99": [], "rate": [], "cpu": []}

    def baseline(name: str, found: Measurement) -> None:
        latencies, rate, cpu = found
        bases["p50"].append(Baseline(name, percentile(latencies, 0.5) * 1e3))
        bases["p99"].append(Baseline(name, percentile(latencies, 0.99) * 1e3))
        bases["rate"].append(Baseline(name, rate))
        bases["cpu"].append(Baseline(name, cpu * 1e6))

    if (synchronous := synchronous_of(storage)) is not None:
        with raw_durable(root, synchronous) as durable:
            baseline(raw_durable_label(synchronous), on(durable, measure_daemon, runs, warmup))
    with bare_server(root, "echo") as bare:
        baseline(ROUND_TRIP, on(bare, measure_round_trip, runs, warmup))
    note = ""
    if sse and (missing := sse_available()) is None:
        with sse_server(root) as server:
            trio.run(check_sse, server.socket_path)
            s_first, s_rate, s_cpu = on(server, measure_sse, runs, warmup)
        sse_first = "Starlette SSE (uvicorn), first data"
        sse_whole = "Starlette SSE (uvicorn), whole stream"
        bases["p50"].append(Baseline(sse_first, percentile(s_first, 0.5) * 1e3))
        bases["p99"].append(Baseline(sse_first, percentile(s_first, 0.99) * 1e3))
        bases["rate"].append(Baseline(sse_whole, s_rate))
        bases["cpu"].append(Baseline(sse_whole, s_cpu * 1e6))
    elif sse:
        note = f"no SSE baseline: {missing}"
    tag = storage_tag(storage)
    key = f"_{tag}" if tag else ""
    where = f" [{storage_short(storage)}]" if tag else ""
    aims = targets(storage)
    return [
        Figure(
            f"first_event_p50{key}",
            "a",
            f"first event p50{where}",
            "ms",
            percentile(d_first, 0.5) * 1e3,
            "lower",
            bases["p50"],
            aims.get("p50"),
            note=f"stream -> `start` (user entry stored), echo on {storage_label(storage)}, "
            f"{runs} runs",
        ),
        Figure(
            f"first_event_p99{key}",
            "a",
            f"first event p99{where}",
            "ms",
            percentile(d_first, 0.99) * 1e3,
            "lower",
            bases["p99"],
        ),
        Figure(
            f"runs_per_s{key}",
            "a",
            f"sequential runs/s, one connection{where}",
            "runs/s",
            d_rate,
            "higher",
            bases["rate"],
            aims.get("rate"),
            note=note,
        ),
        Figure(
            f"cpu_per_run{key}",
            "a",
            f"server CPU per run{where}",
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
    parser.add_argument("--no-sse", action="store_true", help="leave out the Starlette baseline")
    run_alone(
        parser,
        lambda root, args: figures(root, args.runs, args.warmup, args.storage, sse=not args.no_sse),
    )


if __name__ == "__main__":
    main()
