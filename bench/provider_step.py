"""The daemon's added latency per model step, over the model server's own first byte.

A fake OpenAI-compatible server (the test suite's, speaking the real SSE format)
answers every request at once. Measured in the same run: (a) from a client's
`stream` to its first `text_delta` through the daemon (user entry stored, context
built, the openai SDK's request, the first chunk streamed back); (b) the
baseline: the same Chat Completions request sent straight to the server over a
kept-alive HTTP connection, until the first byte of its first event; (c) the
same request through the openai SDK alone (`AsyncOpenAI`, streamed, kept-alive),
until its first content chunk. The daemon's added latency is (a) - (b); of it,
(c) - (b) is the SDK's and (a) - (c) the daemon's own code and storage.

    python -m bench.provider_step [--runs 500] [--storage memory:]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import trio
from chinwag.protocol import MSGPACK, End, Hello, Stream, TextDelta

# The fake server lives with the tests that pin its format; reuse it rather than copy it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "providers"))
from fake_openai import answer, open_fake_openai  # type: ignore[import-not-found]

from .first_event import Framed, percentile

CONFIG = """
[providers.fake]
kind = "openai"
base_url = "{base_url}"
api_key = "bench"
max_retries = 0

[agents.assistant]
provider = "fake"
model = "fake-model"
"""


async def wait_for_socket(path: Path) -> None:
    while True:
        try:
            probe = await trio.open_unix_socket(str(path))
        except OSError:
            await trio.sleep(0.02)  # a child process's socket: no event to await
            continue
        await probe.aclose()
        return


async def through_daemon(path: Path, runs: int, warmup: int) -> list[float]:
    stream = await trio.open_unix_socket(str(path))
    conn = Framed(stream)
    await stream.send_all(MSGPACK.encode_frame(Hello(protocol=1, client="bench")))
    await conn.recv_body()
    samples = []
    for i in range(warmup + runs):
        msg = Stream(id=1, agent="assistant", sender=f"bench-{i % 100}", content="hello world")
        t0 = time.perf_counter()
        await stream.send_all(MSGPACK.encode_frame(msg))
        first = None
        while True:
            event = MSGPACK.decode_server(await conn.recv_body())
            if first is None and isinstance(event, TextDelta):
                first = time.perf_counter() - t0
            if isinstance(event, End):
                assert event.status == "done", event
                break
        if i >= warmup:
            assert first is not None
            samples.append(first)
    await stream.aclose()
    return samples


async def direct(port: int, runs: int, warmup: int) -> list[float]:
    body = json.dumps(
        {
            "model": "fake-model",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "hello world"},
            ],
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer bench\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    samples = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        await stream.send_all(request)
        received = b""
        first = None
        while not received.endswith(b"0\r\n\r\n"):  # the end of the chunked body
            data = await stream.receive_some(65536)
            if first is None and b"data:" in data:
                first = time.perf_counter() - t0
            received += data
        if i >= warmup:
            assert first is not None
            samples.append(first)
    await stream.aclose()
    return samples


async def sdk_alone(base_url: str, runs: int, warmup: int) -> list[float]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    samples = []
    try:
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            first = None
            chunks = await client.chat.completions.create(
                model="fake-model",
                messages=[
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "hello world"},
                ],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with chunks:  # closed as the daemon closes it: the body read to its end
                async for chunk in chunks:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
            if i >= warmup:
                assert first is not None
                samples.append(first)
    finally:
        await client.close()
    return samples


async def main_async(runs: int, warmup: int, storage: str | None) -> None:
    async with open_fake_openai() as server:
        server.script(*[answer("hello world") for _ in range(2 * (runs + warmup))])
        with tempfile.TemporaryDirectory(prefix="cwb-", dir="/tmp") as tmp:
            root = Path(tmp)
            config = root / "config.toml"
            config.write_text(CONFIG.format(base_url=server.base_url))
            sock = root / "d.sock"
            url = storage or f"sqlite:///{root / 'bench.db'}"
            daemon = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "chinwag.daemon",
                    "--socket",
                    str(sock),
                    "--config",
                    str(config),
                    "--storage",
                    url,
                    "--log-level",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                with trio.fail_after(30):
                    await wait_for_socket(sock)
                ours = await through_daemon(sock, runs, warmup)
                base = await direct(server.port, runs, warmup)
                async with open_fake_openai() as alone:  # a server of its own, fresh
                    alone.script(*[answer("hello world") for _ in range(runs + warmup)])
                    sdk = await sdk_alone(alone.base_url, runs, warmup)
            finally:
                daemon.terminate()
                await daemon.wait()
    print(f"openai provider against a local fake server, {runs} runs, storage {url.split(':')[0]}")
    print(
        f"{'figure':<22}{'daemon':>9}{'direct':>9}{'SDK':>9}"
        f"{'added':>9}{'ratio':>7}{'of it SDK':>11}{'daemon':>9}"
    )
    for name, q in (("first text p50 (ms)", 0.5), ("first text p99 (ms)", 0.99)):
        a, b, c = (percentile(xs, q) * 1e3 for xs in (ours, base, sdk))
        print(
            f"{name:<22}{a:>9.3f}{b:>9.3f}{c:>9.3f}"
            f"{a - b:>9.3f}{a / b:>7.1f}{c - b:>11.3f}{a - c:>9.3f}"
        )
    print(
        "added = daemon - direct (target <= 1 ms); of it, SDK = SDK - direct (the openai"
        " SDK's own cost) and daemon = daemon - SDK (chinwag's code and storage)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--storage", default=None, help="storage URL (default: sqlite in a temp dir)"
    )
    args = parser.parse_args()
    trio.run(main_async, args.runs, args.warmup, args.storage)


if __name__ == "__main__":
    main()
