"""The client library against a scripted fake daemon, for what a real one rarely does.

Each test's server side is a coroutine that reads client messages and writes
exactly the frames the test needs: a connection-level error, an unknown frame
type, a flood of events, a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest
from chinwag.clients import ChinwagError, ConnectionLost, connect, wait_for_socket
from chinwag.clients import _client as client_module
from chinwag.protocol import (
    JSON,
    Cancel,
    ClientMsg,
    Codec,
    Encoding,
    End,
    Error,
    FrameDecoder,
    Hello,
    Ok,
    Ping,
    Pong,
    Start,
    Stream,
    TextDelta,
    Welcome,
    codec_for,
)

Runner = Callable[[Callable[[], Awaitable[object]]], object]

WELCOME = Welcome(protocol=1, server="fake", agents=["assistant"], max_frame_bytes=4096)
CLOSED = r"The daemon closed the connection\. \(503\)"


class FakeConnection:
    """The server end of one client connection."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(1 << 20)
        self.codec: Codec | None = None

    async def recv(self) -> ClientMsg:
        while True:
            body = self.decoder.next_frame()
            if body is not None:
                if self.codec is None:
                    self.codec = codec_for(Encoding.of(body))
                return self.codec.decode_client(body)
            self.decoder.feed(await self.stream.receive())

    async def send(self, msg: msgspec.Struct) -> None:
        assert self.codec is not None
        await self.stream.send(bytes(self.codec.encode_frame(msg)))

    async def send_raw_body(self, body: bytes) -> None:
        await self.stream.send(len(body).to_bytes(4, "big") + body)

    async def handshake(self, welcome: Welcome = WELCOME) -> Hello:
        hello = await self.recv()
        assert isinstance(hello, Hello)
        await self.send(welcome)
        return hello


Handler = Callable[[FakeConnection], Awaitable[None]]


@asynccontextmanager
async def fake_daemon(path: Path, handler: Handler) -> AsyncIterator[Path]:
    listener = await anyio.create_unix_listener(path)

    async def serve_one(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            # The client leaving while the script still reads is not a failure.
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await handler(FakeConnection(stream))

    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, serve_one)
        yield path
        tasks.cancel_scope.cancel()


@pytest.fixture
def sock(short_tmp: Path) -> Path:
    return short_tmp / "fake.sock"


def test_handshake_sends_hello_and_keeps_welcome(run: Runner, sock: Path) -> None:
    hellos: list[Hello] = []

    async def handler(conn: FakeConnection) -> None:
        hellos.append(await conn.handshake())
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock, client="tester") as c:
            assert c.welcome == WELCOME

    run(main)
    assert hellos == [Hello(protocol=1, client="tester", features=["compaction", "mail"])]


def test_refused_hello_raises_its_code(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.recv()
        # An error before the encoding is known is JSON, whatever the client spoke.
        await conn.send_raw_body(JSON.encode(Error(id=None, code=426, message="Too new.")))

    async def main() -> None:
        async with fake_daemon(sock, handler):
            with pytest.raises(ChinwagError) as info:
                async with connect(sock):
                    pass
            assert (info.value.code, info.value.message) == (426, "Too new.")

    run(main)


def test_connection_level_error_reaches_every_pending_request(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        await conn.recv()
        await conn.recv()
        await conn.send(Error(id=None, code=503, message="Shutting down."))
        await anyio.sleep_forever()

    async def main() -> None:
        errors: list[ChinwagError] = []

        async def ping(c: client_module.Client) -> None:
            try:
                await c.ping()
            except ChinwagError as exc:
                errors.append(exc)

        async with fake_daemon(sock, handler), connect(sock) as c:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(ping, c)
                tasks.start_soon(ping, c)
            assert [(e.code, e.message) for e in errors] == [(503, "Shutting down.")] * 2

    run(main)


def test_frames_of_unknown_type_are_skipped(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        ping = await conn.recv()
        assert isinstance(ping, Ping)
        await conn.send_raw_body(msgspec.msgpack.encode({"type": "from_the_future", "id": ping.id}))
        await conn.send(Pong(id=ping.id))
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock) as c:
            await c.ping()

    run(main)


def test_dropped_connection_raises_connection_lost_everywhere(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        stream = await conn.recv()
        assert isinstance(stream, Stream)
        await conn.send(Start(id=stream.id, run_id="r1", agent="assistant", seq=1))
        await conn.recv()  # a ping, never answered: the connection just ends

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock) as c:
            async with c.stream("assistant", "hi") as events:
                first = await events.__anext__()
                assert isinstance(first, Start)
                with pytest.raises(ConnectionLost, match=CLOSED):
                    await c.ping()
                with pytest.raises(ConnectionLost, match=CLOSED):
                    await events.__anext__()
            with pytest.raises(ConnectionLost) as info:
                await c.ping()
            assert info.value.code == 503
            assert c.closed

    run(main)


def test_a_consumer_far_behind_loses_its_stream_not_the_connection(
    run: Runner, sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "STREAM_BUFFER", 5)
    cancelled: list[int] = []
    got_cancel: list[anyio.Event] = []  # made inside the event loop

    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        stream = await conn.recv()
        assert isinstance(stream, Stream)
        for n in range(20):
            await conn.send(TextDelta(id=stream.id, delta=str(n)))
        while True:
            msg = await conn.recv()
            if isinstance(msg, Cancel):
                cancelled.append(msg.target)
                got_cancel[0].set()
                await conn.send(End(id=msg.target, status="detached", error=None, last_seq=1))
                await conn.send(Ok(id=msg.id))
            elif isinstance(msg, Ping):
                await conn.send(Pong(id=msg.id))

    async def main() -> None:
        got_cancel.append(anyio.Event())
        async with fake_daemon(sock, handler), connect(sock) as c:
            async with c.stream("assistant", "flood") as events:
                # Let the flood arrive without reading it, then prove the
                # connection still answers.
                await got_cancel[0].wait()
                await c.ping()
                seen = []
                with pytest.raises(ChinwagError) as info:
                    async for event in events:
                        assert isinstance(event, TextDelta)
                        seen.append(event.delta)
                assert seen == ["0", "1", "2", "3", "4"]
                assert info.value.code == 429
                assert "behind" in info.value.message
            assert cancelled == [events.id]

    run(main)


def test_leaving_a_stream_early_detaches_it(run: Runner, sock: Path) -> None:
    log: list[str] = []

    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        stream = await conn.recv()
        assert isinstance(stream, Stream)
        await conn.send(Start(id=stream.id, run_id="r1", agent="assistant", seq=1))
        cancel = await conn.recv()
        assert isinstance(cancel, Cancel)
        log.append(f"cancel {cancel.target}")
        await conn.send(End(id=cancel.target, status="detached", error=None, last_seq=1))
        await conn.send(Ok(id=cancel.id))
        ping = await conn.recv()
        assert isinstance(ping, Ping)
        await conn.send(Pong(id=ping.id))
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock) as c:
            async with c.stream("assistant", "hi") as events:
                async for event in events:
                    assert isinstance(event, Start)
                    break
            log.append("left")
            await c.ping()
            assert log == [f"cancel {events.id}", "left"]

    run(main)


def test_a_request_over_the_frame_limit_fails_alone(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        while True:
            msg = await conn.recv()
            assert isinstance(msg, Ping), "the oversized request must never be sent"
            await conn.send(Pong(id=msg.id))

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock) as c:
            with pytest.raises(ChinwagError) as info:
                async with c.stream("assistant", "x" * 10_000) as events:
                    await events.collect()
            assert info.value.code == 413
            await c.ping()

    run(main)


def test_a_search_is_never_asked_of_a_daemon_that_cannot_search(run: Runner, sock: Path) -> None:
    """A daemon without `conversation_search` would ignore the query and list everything."""

    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        while True:
            msg = await conn.recv()
            assert isinstance(msg, Ping), "the search must never be sent"
            await conn.send(Pong(id=msg.id))

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock) as c:
            with pytest.raises(ChinwagError) as info:
                await c.list_conversations(query="roof")
            assert info.value.code == 501
            assert info.value.message == (
                "The daemon cannot search conversations; upgrade it to search them."
            )
            await c.ping()

    run(main)


def test_the_callers_exception_comes_out_unwrapped(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler):
            with pytest.raises(KeyError, match=r"^'mine'$"):
                async with connect(sock):
                    raise KeyError("mine")

    run(main)


def test_json_encoding_is_spoken_when_asked(run: Runner, sock: Path) -> None:
    encodings: list[Encoding] = []

    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        assert conn.codec is not None
        encodings.append(conn.codec.encoding)
        ping = await conn.recv()
        await conn.send(Pong(id=ping.id))  # type: ignore[union-attr]
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock, encoding=Encoding.JSON) as c:
            await c.ping()

    run(main)
    assert encodings == [Encoding.JSON]


def test_connect_without_a_daemon_raises_oserror(run: Runner, sock: Path) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError, match="No such file or directory"):
            async with connect(sock):
                pass

    run(main)


def test_leaving_as_the_daemon_hangs_up_logs_nothing_on_asyncio(sock: Path) -> None:
    """Regression: cancelling the reader's pending receive as the socket turned
    readable made anyio set a cancelled future's result, and asyncio logged an
    `InvalidStateError` traceback (the CLI printed it when the daemon shut down)."""
    loop_errors: list[dict[str, object]] = []

    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        stream = await conn.recv()
        assert isinstance(stream, Stream)
        await conn.send(Start(id=stream.id, run_id="r1", agent="assistant", seq=1))
        await conn.send(End(id=stream.id, status="done", error=None, last_seq=2))
        await anyio.sleep(random.random() / 1000)  # hang up around when the client leaves

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        async with fake_daemon(sock, handler):
            for _ in range(1000):
                async with connect(sock) as c, c.stream("assistant", "hi") as events:
                    await events.collect()

    anyio.run(main, backend="asyncio")
    assert loop_errors == []


def test_wait_for_socket_returns_once_a_daemon_listens(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        await anyio.sleep_forever()

    async def main() -> None:
        with anyio.move_on_after(0.2) as nothing_yet:
            await wait_for_socket(sock)
        assert nothing_yet.cancelled_caught

        async def listen_later() -> None:
            await anyio.sleep(0.1)
            async with fake_daemon(sock, handler):
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listen_later)
            with anyio.fail_after(5):
                await wait_for_socket(sock)
            async with connect(sock) as c:
                assert c.welcome == WELCOME
            tasks.cancel_scope.cancel()

    run(main)
