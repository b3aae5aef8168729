"""A raw protocol connection for end-to-end tests that must control the bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from chinwag.protocol import (
    JSON,
    MSGPACK,
    Codec,
    FrameDecoder,
    Hello,
    ServerMsg,
    Welcome,
)
from deadlines import FRAME_S, RUN_S, deadline, describe


class RawConnection:
    """Frames in and out over a real socket, no client library in between."""

    def __init__(self, stream: trio.SocketStream, codec: Codec) -> None:
        self.stream = stream
        self.codec = codec
        self.decoder = FrameDecoder(1 << 30)

    async def send(self, msg: msgspec.Struct) -> None:
        await self.stream.send_all(self.codec.encode_frame(msg))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self, *, within: float = FRAME_S) -> ServerMsg:
        """The next frame; raises EOFError when the daemon closed the connection."""
        with deadline(within, "a frame from the daemon"):
            return await self._next_frame()

    async def _next_frame(self) -> ServerMsg:
        while True:
            body = self.decoder.next_frame()
            if body is not None:
                return self.codec.decode_server(body)
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.decoder.feed(data)

    async def recv_until(
        self, done: Callable[[Any], bool], *, within: float = RUN_S, what: str = ""
    ) -> list[ServerMsg]:
        """Frames up to and including the first that is ``done``, within ``within`` s."""
        frames: list[ServerMsg] = []
        what = what or "the frame a test awaits"
        with deadline(within, what, lambda: describe(frames)):
            while True:
                try:
                    frame = await self._next_frame()
                except EOFError:
                    raise AssertionError(
                        f"the daemon closed the connection before {what}: {describe(frames)}"
                    ) from None
                frames.append(frame)
                if done(frame):
                    return frames

    async def closed_by_peer(self, *, within: float = FRAME_S) -> bool:
        """Drain frames until EOF: True once the daemon closes the connection.

        Fails, naming the frames that came instead, when it has not closed it
        within ``within`` seconds.
        """
        frames: list[ServerMsg] = []
        with deadline(within, "the daemon to close the connection", lambda: describe(frames)):
            try:
                while True:
                    frames.append(await self._next_frame())
            except (EOFError, trio.BrokenResourceError):
                return True


@asynccontextmanager
async def raw_connection(
    socket_path: Path, *, codec: Codec = JSON, hello: bool = True
) -> AsyncIterator[RawConnection]:
    stream = await trio.open_unix_socket(str(socket_path))
    async with stream:
        conn = RawConnection(stream, codec)
        if hello:
            await conn.send(Hello(protocol=1, client="raw-test"))
            welcome = await conn.recv()
            assert isinstance(welcome, Welcome), welcome
        yield conn


@pytest.fixture
def raw() -> Callable[..., Any]:
    return raw_connection


__all__ = ["JSON", "MSGPACK", "RawConnection", "raw_connection"]
