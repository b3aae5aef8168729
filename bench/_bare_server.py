"""Bare trio servers on a Unix socket: the baselines chinwag is measured against.

    python -m bench._bare_server echo PATH     # every frame straight back: a round trip
    python -m bench._bare_server stream PATH   # chinwag's frames, with none of its work

`stream` answers `hello` with `welcome` and a `stream` with the frames the
echo model's run would send (`start`, one `text_delta` per token, `usage`,
`end`), each encoded by msgspec as the daemon encodes it, but with no runtime,
no storage and no fan-out. Paced content (`/slow N MS`) sleeps MS ms before each
token and writes each frame at once, as the echo model paces a run; anything
else is sent as fast as the socket takes it, frames coalesced into writes of
up to 64 KiB (the daemon coalesces too).
"""

from __future__ import annotations

import sys
import uuid

import trio
from chinwag.protocol import (
    MSGPACK,
    End,
    FrameDecoder,
    Hello,
    Start,
    Stream,
    TextDelta,
    Usage,
    Welcome,
)

READ_CHUNK = 65536
COALESCE_BYTES = 65536


async def echo(stream: trio.SocketStream) -> None:
    decoder = FrameDecoder(1 << 30)
    async with stream:
        while data := await stream.receive_some(READ_CHUNK):
            decoder.feed(data)
            for body in decoder:
                await stream.send_all(len(body).to_bytes(4, "big") + body)


def tokens(content: str) -> tuple[list[str], float]:
    """The words a run of the echo model streams for ``content``, and its pacing in s."""
    directive, _, rest = content.strip().partition(" ")
    if directive == "/slow":
        count, delay_ms = (float(part) for part in rest.split())
        return [str(i) for i in range(1, int(count) + 1)], delay_ms / 1000
    return content.split(), 0.0


async def run(stream: trio.SocketStream, lock: trio.Lock, msg: Stream, seq: int) -> None:
    words, delay = tokens(msg.content)
    rid = msg.id
    out = bytearray()

    async def emit(frame: bytes | bytearray, flush: bool) -> None:
        out.extend(frame)
        if flush or len(out) >= COALESCE_BYTES:
            async with lock:
                await stream.send_all(bytes(out))
            out.clear()

    await emit(
        MSGPACK.encode_frame(Start(id=rid, run_id=uuid.uuid4().hex, agent=msg.agent, seq=seq)),
        flush=bool(delay),
    )
    for i, word in enumerate(words):
        if delay:
            await trio.sleep(delay)
        delta = word if i == 0 else " " + word
        await emit(MSGPACK.encode_frame(TextDelta(id=rid, delta=delta)), flush=bool(delay))
    n = len(words)
    usage = Usage(
        id=rid, prompt_tokens=n, completion_tokens=n, context_tokens=2 * n, context_window=32768
    )
    await emit(MSGPACK.encode_frame(usage), flush=False)
    await emit(
        MSGPACK.encode_frame(End(id=rid, status="done", error=None, last_seq=seq + 1)), flush=True
    )


async def streams(stream: trio.SocketStream) -> None:
    decoder = FrameDecoder(1 << 30)
    lock = trio.Lock()
    seq = 0
    async with stream, trio.open_nursery() as nursery:
        while data := await stream.receive_some(READ_CHUNK):
            decoder.feed(data)
            for body in decoder:
                msg = MSGPACK.decode_client(body)
                if isinstance(msg, Hello):
                    welcome = Welcome(
                        protocol=1, server="bare", agents=["assistant"], max_frame_bytes=1 << 24
                    )
                    async with lock:
                        await stream.send_all(MSGPACK.encode_frame(welcome))
                elif isinstance(msg, Stream):
                    seq += 2
                    nursery.start_soon(run, stream, lock, msg, seq)
        nursery.cancel_scope.cancel()


async def main(mode: str, path: str) -> None:
    handler = {"echo": echo, "stream": streams}[mode]
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(4096)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left

    await trio.serve_listeners(handle, [listener])


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
