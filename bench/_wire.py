"""The thin framed-msgpack client every trio benchmark uses, against chinwag and baselines.

Deliberately not `chinwag.clients`: its reader task and per-request channels
would be measured too. This is the least a client can do: write a frame, read
frames, decode them.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import trio
from chinwag.protocol import MSGPACK, FrameDecoder, Hello, ServerMsg, Welcome


class Framed:
    """One connection: frames out, frame bodies in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(1 << 30)
        self.arrived = 0.0  # when the last read returned

    async def recv_body(self) -> bytes:
        while (body := self.decoder.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.decoder.feed(data)
        return body

    async def recv(self) -> ServerMsg:
        return MSGPACK.decode_server(await self.recv_body())

    async def recv_timed(self) -> tuple[ServerMsg, float]:
        """The next message and when the bytes that completed it arrived."""
        while (body := self.decoder.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.arrived = time.perf_counter()
            self.decoder.feed(data)
        return MSGPACK.decode_server(body), self.arrived

    async def frames(self, count: int) -> tuple[list[bytes], list[float]]:
        """Read ``count`` frames without decoding them: the first and last bodies,
        and when each frame arrived.

        For throughput, where decoding every frame in Python would make the
        client, not the server, the bottleneck: each frame costs one header read.
        """
        assert self.decoder.buffered == 0, "frames() starts on a frame boundary"
        arrivals: list[float] = []
        buf = bytearray()
        offset = 0
        first = last = b""
        while len(arrivals) < count:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError
            now = time.perf_counter()
            if offset:
                del buf[:offset]
                offset = 0
            buf += data
            end = len(buf)
            while offset + 4 <= end:
                size = int.from_bytes(buf[offset : offset + 4], "big")
                if offset + 4 + size > end:
                    break
                if not arrivals:
                    first = bytes(buf[offset + 4 : offset + 4 + size])
                arrivals.append(now)
                offset += 4 + size
                if len(arrivals) == count:
                    last = bytes(buf[offset - size : offset])
                    break
        assert offset == len(buf), "more frames arrived than expected"
        return [first, last], arrivals

    async def send(self, msg: msgspec.Struct) -> None:
        await self.stream.send_all(MSGPACK.encode_frame(msg))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def connect(path: Path, client: str = "bench") -> Framed:
    """Connect and say hello; the `welcome` is read and checked."""
    conn = Framed(await trio.open_unix_socket(str(path)))
    await conn.send(Hello(protocol=1, client=client))
    welcome = await conn.recv()
    assert isinstance(welcome, Welcome), welcome
    return conn
