"""The whole daemon in process: a `Server` over a `Runtime` on memory storage,
each client on its own `trio.testing.memory_stream_pair`, speaking framed
JSON (or MessagePack) as a real client would.

Time is the autojump clock's, so timeouts of tens of seconds take none. Every
read is bounded (`Client.next`), so a daemon that never answers fails the test
instead of hanging it. Most clients check every frame the daemon sends with a
client-side `Session`: a frame for a request that is not open, a second
terminal frame, or a frame its request cannot have fails the test where it
arrives.
"""

from __future__ import annotations

import errno
import os
import tracemalloc
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from chinwag.daemon._config import AgentConfig, Config, DaemonConfig
from chinwag.daemon._runtime import Runtime
from chinwag.daemon._server import Connection, Server
from chinwag.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    JSON,
    MSGPACK,
    PROTOCOL_VERSION,
    REPLIES,
    AskUser,
    Attach,
    Cancel,
    ClientMsg,
    Codec,
    Compact,
    Delete,
    Edit,
    End,
    Error,
    Event,
    Focus,
    FrameDecoder,
    GetContext,
    GetHistory,
    GetMessage,
    GetStats,
    GetThread,
    GetUsage,
    Heartbeat,
    Hello,
    History,
    Inbox,
    Kill,
    Killed,
    ListAgents,
    ListConversations,
    ListLocks,
    ListParticipants,
    ListProjects,
    ListSpaces,
    Lock,
    MarkRead,
    Ok,
    Pin,
    Ping,
    Pong,
    Post,
    Posted,
    ProjectCreate,
    ProjectDelete,
    ProjectGet,
    ProjectUpdate,
    React,
    Register,
    Registered,
    ReplyToAsk,
    Request,
    SearchMail,
    SearchMemory,
    Sent,
    ServerMsg,
    Session,
    SpaceArchive,
    SpaceCreate,
    SpaceInvite,
    SpaceJoin,
    SpaceLeave,
    SpaceMembers,
    Start,
    Stream,
    Subscribe,
    Subscribed,
    TextDelta,
    Title,
    Unlock,
    Watch,
    Welcome,
    frame,
)
from deadlines import deadline
from runtime_harness import open_runtime
from structlog.testing import capture_logs

# What makes a connection's two ends: the client's, then the daemon's.
Pair = Callable[[], tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]]
WAIT_S = 60.0  # the longest any one read may take, in the test's clock

AGENTS = {"assistant": AgentConfig(provider="echo", tools=["ask_user", "set_title"])}


# --- the harness -------------------------------------------------------------------


class Closed(Exception):
    """The daemon closed the connection while the test waited for a frame."""


class Client:
    """One end of a connection, read frame by frame; every read bounded by ``wait_s``."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        served: trio.Event,
        *,
        codec: Codec = JSON,
        check: bool = True,
        wait_s: float = WAIT_S,
    ) -> None:
        self.stream = stream
        self.served = served  # set once the daemon is done with this connection
        self.codec = codec
        self.wait_s = wait_s
        # Checks every frame against the protocol, unless the test breaks it on purpose.
        self.session: Session | None = Session() if check else None
        self.kinds: dict[int, type] = {}  # request id -> its type, as last sent
        self.frames: list[ServerMsg] = []  # everything received, in order
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)

    async def send(self, msg: Hello | Request) -> None:
        if self.session is not None:
            self.session.send_request(msg)
        if isinstance(msg, Request):
            self.kinds[msg.id] = type(msg)
        await self.send_bytes(self.codec.encode_frame(msg))

    async def send_bytes(self, data: bytes | bytearray) -> None:
        with deadline(self.wait_s, "the daemon to take what the client sends"):
            await self.stream.send_all(data)

    async def next(self) -> ServerMsg | None:
        """The next frame, or None once the daemon closed the connection."""
        with deadline(self.wait_s, "a frame from the daemon"):
            while (body := self._decoder.next_frame()) is None:
                data = await self.stream.receive_some(65536)
                if not data:
                    assert self._decoder.buffered == 0, "the daemon closed mid-frame"
                    return None
                self._decoder.feed(data)
        msg = self.codec.decode_server(body)
        if self.session is not None:
            self.session.receive_reply(msg)
        self.frames.append(msg)
        return msg

    async def until(self, done: Callable[[ServerMsg], bool]) -> list[ServerMsg]:
        """Every frame up to and including the first that ``done`` accepts."""
        got: list[ServerMsg] = []
        while True:
            msg = await self.next()
            if msg is None:
                raise Closed(f"closed before the awaited frame; got {got}")
            got.append(msg)
            if done(msg):
                return got

    async def answer(self, rid: int) -> list[ServerMsg]:
        """The frames of request ``rid`` up to its terminal frame (others are read past)."""
        ending = REPLIES[self.kinds[rid]][1]
        got = await self.until(lambda m: _id(m) == rid and type(m) in ending)
        return [m for m in got if _id(m) == rid]

    async def ask(self, msg: Request) -> ServerMsg:
        """Send a request that has no frame but its terminal one; that frame."""
        await self.send(msg)
        (reply,) = await self.answer(msg.id)
        return reply

    async def greet(self, *features: str) -> Welcome:
        await self.send(Hello(protocol=PROTOCOL_VERSION, client="test/1", features=list(features)))
        welcome = await self.next()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    async def closed(self) -> list[ServerMsg]:
        """Read to the end of the connection; what came before it."""
        got: list[ServerMsg] = []
        while (msg := await self.next()) is not None:
            got.append(msg)
        return got


def _id(msg: ServerMsg) -> int | None:
    return getattr(msg, "id", None)


@dataclass
class Daemon:
    runtime: Runtime
    server: Server
    nursery: trio.Nursery

    def connect(
        self,
        pair: Pair = trio.testing.memory_stream_pair,
        *,
        codec: Codec = JSON,
        check: bool = True,
        wait_s: float = WAIT_S,
    ) -> Client:
        """A new connection, served in the background; ``pair`` makes its two ends."""
        client_end, server_end = pair()
        served = trio.Event()

        async def serve() -> None:
            try:
                await self.server.handle(server_end)
            finally:
                served.set()

        self.nursery.start_soon(serve)
        return Client(client_end, served, codec=codec, check=check, wait_s=wait_s)

    async def connected(
        self, *features: str, codec: Codec = JSON, check: bool = True, wait_s: float = WAIT_S
    ) -> Client:
        client = self.connect(codec=codec, check=check, wait_s=wait_s)
        await client.greet(*features)
        return client


@asynccontextmanager
async def open_daemon(
    *, agents: dict[str, AgentConfig] | None = None, **daemon: object
) -> AsyncIterator[Daemon]:
    """A daemon as `chinwag serve` makes one, on memory storage: the post office started
    (the agents are mail participants, mail waiting for them is answered), no listener."""
    settings = DaemonConfig(**daemon)  # type: ignore[arg-type]
    config = Config(daemon=settings, agents=AGENTS if agents is None else agents)
    async with open_runtime(config) as runtime, trio.open_nursery() as nursery:
        server = Server(runtime)
        await server.post_office.start()
        yield Daemon(runtime, server, nursery)
        nursery.cancel_scope.cancel()


async def served_within(client: Client, seconds: float) -> None:
    """The daemon let go of ``client``'s connection within ``seconds``."""
    with deadline(seconds, "the daemon to let go of the connection"):
        await client.served.wait()


def text_of(frames: list[ServerMsg]) -> str:
    return "".join(m.delta for m in frames if isinstance(m, TextDelta))


# --- every client message gets an answer ------------------------------------------------

CONVERSATION_ID = 100  # the request that prepares what a sample acts on


async def stream_once(client: Client, content: str = "red and blue") -> None:
    await client.send(Stream(id=CONVERSATION_ID, agent="assistant", content=content))
    end = (await client.answer(CONVERSATION_ID))[-1]
    assert isinstance(end, End) and end.status == "done", end


async def run_in_flight(client: Client) -> None:
    await client.send(Stream(id=CONVERSATION_ID, agent="assistant", content="/slow 100 1000"))
    await client.until(lambda m: isinstance(m, Start))


async def ask_pending(client: Client) -> None:
    await client.send(Stream(id=CONVERSATION_ID, agent="assistant", content="/ask which colour?"))
    await client.until(lambda m: isinstance(m, AskUser))


async def subscribed(client: Client) -> None:
    await client.send(Subscribe(id=CONVERSATION_ID))
    await client.until(lambda m: isinstance(m, Subscribed))


async def cancel_it(client: Client, rid: int) -> None:
    await client.send(Cancel(id=rid + 1, target=rid))


async def cancel_once_watching(client: Client, rid: int) -> None:
    await client.until(lambda m: _id(m) == rid)  # `watching`: the watch is on
    await cancel_it(client, rid)


async def registered(client: Client) -> None:
    reply = await client.ask(Register(id=CONVERSATION_ID, name="ana"))
    assert isinstance(reply, Registered), reply


async def posted(client: Client) -> None:
    """Mail from ana to bob, then bob's reply: m000000000001 starts a thread."""
    first = await client.ask(Post(id=CONVERSATION_ID, sender="ana", to=["bob"], content="hi"))
    assert isinstance(first, Posted) and first.msg_id == "m000000000001", first
    reply = await client.ask(
        Post(id=CONVERSATION_ID, sender="bob", content="hello", reply_to=first.msg_id)
    )
    assert isinstance(reply, Posted) and reply.thread_id == first.msg_id, reply


async def mail_world(client: Client) -> None:
    """``posted``, then project web (space eng, by ana) and project spare, and ana's lock
    on paths.py."""
    await posted(client)
    for request in (
        ProjectCreate(id=CONVERSATION_ID, sender="ana", name="web"),
        ProjectCreate(id=CONVERSATION_ID, sender="ana", name="spare"),
        SpaceCreate(id=CONVERSATION_ID, sender="ana", name="eng", project="web"),
        Lock(id=CONVERSATION_ID, sender="ana", resource="paths.py"),
    ):
        reply = await client.ask(request)
        assert not isinstance(reply, Error), reply


@dataclass
class Sample:
    make: Callable[[int], Request]
    before: Callable[[Client], Awaitable[None]] | None = None  # what it needs to act on
    then: Callable[[Client, int], Awaitable[None]] | None = None  # what makes it end


SAMPLES: dict[type, Sample] = {
    Stream: Sample(lambda rid: Stream(id=rid, agent="assistant", content="hello there")),
    Kill: Sample(lambda rid: Kill(id=rid, agent="assistant"), before=run_in_flight),
    Attach: Sample(lambda rid: Attach(id=rid, agent="assistant"), before=stream_once),
    Compact: Sample(lambda rid: Compact(id=rid, agent="assistant"), before=stream_once),
    ReplyToAsk: Sample(
        lambda rid: ReplyToAsk(id=rid, agent="assistant", content="blue"), before=ask_pending
    ),
    GetHistory: Sample(lambda rid: GetHistory(id=rid, agent="assistant"), before=stream_once),
    ListConversations: Sample(lambda rid: ListConversations(id=rid), before=stream_once),
    ListAgents: Sample(lambda rid: ListAgents(id=rid)),
    Subscribe: Sample(lambda rid: Subscribe(id=rid), then=cancel_it),
    Cancel: Sample(lambda rid: Cancel(id=rid, target=CONVERSATION_ID), before=subscribed),
    Ping: Sample(lambda rid: Ping(id=rid)),
    GetStats: Sample(lambda rid: GetStats(id=rid)),
    GetUsage: Sample(lambda rid: GetUsage(id=rid, since="7d"), before=stream_once),
    SearchMemory: Sample(lambda rid: SearchMemory(id=rid, agent="assistant", query="blue")),
    Register: Sample(lambda rid: Register(id=rid, name="ana", roles=["reviewer"])),
    Heartbeat: Sample(lambda rid: Heartbeat(id=rid, name="ana", status="busy"), before=registered),
    ListParticipants: Sample(lambda rid: ListParticipants(id=rid), before=registered),
    Post: Sample(lambda rid: Post(id=rid, sender="ana", to=["assistant", "bob"], content="hi")),
    Inbox: Sample(lambda rid: Inbox(id=rid, reader="bob"), before=posted),
    Sent: Sample(lambda rid: Sent(id=rid, reader="ana"), before=posted),
    GetThread: Sample(
        lambda rid: GetThread(id=rid, reader="bob", thread_id="m000000000001"), before=posted
    ),
    MarkRead: Sample(lambda rid: MarkRead(id=rid, reader="bob", all=True), before=posted),
    GetMessage: Sample(
        lambda rid: GetMessage(id=rid, reader="bob", msg_id="m000000000001"), before=posted
    ),
    Watch: Sample(lambda rid: Watch(id=rid, reader="bob"), then=cancel_once_watching),
    GetContext: Sample(lambda rid: GetContext(id=rid, reader="bob"), before=posted),
    Edit: Sample(
        lambda rid: Edit(id=rid, sender="ana", msg_id="m000000000001", content="hey"),
        before=posted,
    ),
    Delete: Sample(lambda rid: Delete(id=rid, sender="ana", msg_id="m000000000001"), before=posted),
    React: Sample(
        lambda rid: React(id=rid, sender="bob", msg_id="m000000000001", emoji="+1"), before=posted
    ),
    Pin: Sample(lambda rid: Pin(id=rid, sender="bob", msg_id="m000000000001"), before=posted),
    SearchMail: Sample(lambda rid: SearchMail(id=rid, reader="bob", query="hi"), before=posted),
    SpaceCreate: Sample(lambda rid: SpaceCreate(id=rid, sender="ana", name="ops")),
    SpaceJoin: Sample(lambda rid: SpaceJoin(id=rid, sender="bob", space="eng"), before=mail_world),
    SpaceLeave: Sample(
        lambda rid: SpaceLeave(id=rid, sender="ana", space="eng"), before=mail_world
    ),
    SpaceInvite: Sample(
        lambda rid: SpaceInvite(id=rid, sender="ana", space="eng", name="bob"), before=mail_world
    ),
    SpaceArchive: Sample(
        lambda rid: SpaceArchive(id=rid, sender="ana", space="eng"), before=mail_world
    ),
    SpaceMembers: Sample(lambda rid: SpaceMembers(id=rid, space="eng"), before=mail_world),
    ListSpaces: Sample(lambda rid: ListSpaces(id=rid), before=mail_world),
    ProjectCreate: Sample(lambda rid: ProjectCreate(id=rid, sender="ana", name="site")),
    ProjectGet: Sample(lambda rid: ProjectGet(id=rid, project="web"), before=mail_world),
    ListProjects: Sample(lambda rid: ListProjects(id=rid), before=mail_world),
    ProjectUpdate: Sample(
        lambda rid: ProjectUpdate(id=rid, sender="ana", project="web", status="paused"),
        before=mail_world,
    ),
    ProjectDelete: Sample(
        lambda rid: ProjectDelete(id=rid, sender="ana", project="spare"), before=mail_world
    ),
    Focus: Sample(lambda rid: Focus(id=rid, reader="bob", project="web"), before=mail_world),
    Lock: Sample(lambda rid: Lock(id=rid, sender="ana", resource="deploy")),
    Unlock: Sample(
        lambda rid: Unlock(id=rid, sender="ana", resource="paths.py"), before=mail_world
    ),
    ListLocks: Sample(lambda rid: ListLocks(id=rid), before=mail_world),
}

REQUEST_TYPES = [kind for kind in typing.get_args(ClientMsg) if kind is not Hello]


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
@pytest.mark.parametrize("kind", REQUEST_TYPES, ids=lambda kind: kind.__name__)
async def test_every_client_message_gets_its_terminal_frame(kind, codec):
    # The real clock, not the autojump one: compact and search_memory index and
    # search memory in a worker thread, and an autojump clock jumps past a
    # thread's work straight to the next deadline (this test's own fail_after).
    if kind not in SAMPLES:
        pytest.fail(f"no sample {kind.__name__} request: add one to SAMPLES in {__file__}")
    sample = SAMPLES[kind]
    async with open_daemon() as daemon:
        client = await daemon.connected(codec=codec, wait_s=10.0)
        if sample.before is not None:
            await sample.before(client)
        msg = sample.make(1)
        assert type(msg) is kind
        await client.send(msg)
        if sample.then is not None:
            await sample.then(client, 1)
        frames = await client.answer(1)
        terminal = frames[-1]
        assert type(terminal) in REPLIES[kind][1]
        assert not isinstance(terminal, Error), terminal  # a valid request, a real answer


# --- handshake and timeouts -------------------------------------------------------------


async def test_no_hello_within_hello_timeout_gets_408_and_the_connection_closes(
    autojump_clock,
):
    async with open_daemon(hello_timeout_s=7.5) as daemon:
        client = daemon.connect()
        began = trio.current_time()
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 408)
        assert trio.current_time() - began == pytest.approx(7.5, abs=1e-3)
        assert await client.closed() == []
        await served_within(client, 1)


async def test_the_hello_timeout_runs_from_connecting_whatever_else_arrives(autojump_clock):
    async with open_daemon(hello_timeout_s=10.0) as daemon:
        client = daemon.connect(check=False)
        began = trio.current_time()
        await trio.sleep(6)  # the client dawdles; the test's clock is the daemon's
        await client.send(Ping(id=1))
        refused = await client.next()
        assert isinstance(refused, Error) and (refused.id, refused.code) == (1, 400)
        timed_out = await client.next()
        assert isinstance(timed_out, Error) and (timed_out.id, timed_out.code) == (None, 408)
        assert trio.current_time() - began == pytest.approx(10.0, abs=1e-3)
        assert await client.closed() == []


async def test_a_request_before_hello_gets_400_with_its_id_and_the_connection_stays_open(
    autojump_clock,
):
    async with open_daemon() as daemon:
        client = daemon.connect(check=False)
        await client.send(GetStats(id=3))
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (3, 400)
        await client.greet()
        assert await client.ask(Ping(id=3)) == Pong(id=3)


async def test_a_second_hello_gets_400_without_an_id_and_the_first_one_holds(autojump_clock):
    async with open_daemon() as daemon:
        client = daemon.connect(check=False)
        await client.greet("compaction")
        await client.send(Hello(protocol=PROTOCOL_VERSION + 1, client="again"))
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 400)
        assert await client.ask(Ping(id=1)) == Pong(id=1)


async def test_a_wrong_protocol_version_gets_426_and_the_connection_closes(autojump_clock):
    async with open_daemon() as daemon:
        client = daemon.connect(check=False)
        await client.send(Hello(protocol=PROTOCOL_VERSION + 1, client="future/9"))
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 426)
        assert await client.closed() == []
        await served_within(client, 5)


async def test_idle_timeout_counts_from_the_last_frame_and_not_while_a_request_is_open(
    autojump_clock,
):
    async with open_daemon(idle_timeout_s=30.0) as daemon:
        client = await daemon.connected()
        await trio.sleep(20)  # quiet, but not for long enough
        assert await client.ask(Ping(id=1)) == Pong(id=1)
        # A run longer than the timeout keeps the connection, though nothing arrives.
        await client.send(Stream(id=2, agent="assistant", content="/slow 5 10000"))
        frames = await client.answer(2)
        end = frames[-1]
        assert isinstance(end, End) and end.status == "done"
        await trio.sleep(20)
        # Any frame counts as activity, even one the daemon refuses.
        await client.send_bytes(frame(b'{"type": "teleport"}'))
        refused = await client.next()
        assert isinstance(refused, Error) and (refused.id, refused.code) == (None, 400)
        last_heard = trio.current_time()
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 408)
        assert trio.current_time() - last_heard == pytest.approx(30.0, abs=1e-3)
        assert await client.closed() == []
        await served_within(client, 5)


async def test_an_idle_connection_quiet_from_the_handshake_gets_408(autojump_clock):
    async with open_daemon(idle_timeout_s=30.0) as daemon:
        client = await daemon.connected()
        greeted = trio.current_time()
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 408)
        assert trio.current_time() - greeted == pytest.approx(30.0, abs=1e-3)


async def test_without_idle_timeout_a_quiet_connection_stays_open(autojump_clock):
    async with open_daemon() as daemon:
        client = await daemon.connected()
        await trio.sleep(24 * 3600)  # a day of silence, on the test's clock
        assert not client.served.is_set()
        assert await client.ask(Ping(id=1)) == Pong(id=1)


async def test_past_max_connections_a_new_client_gets_503_and_is_closed(autojump_clock):
    async with open_daemon(max_connections=1) as daemon:
        first = await daemon.connected()
        second = daemon.connect()
        error = await second.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 503)
        assert await second.closed() == []
        await second.stream.aclose()
        await served_within(second, 5)
        assert await first.ask(Ping(id=1)) == Pong(id=1)


# --- ids, limits and cancel ---------------------------------------------------------------


async def test_an_id_still_open_gets_400_and_its_stream_still_ends_done(autojump_clock):
    async with open_daemon() as daemon:
        # Unchecked: a client that reuses an open id is broken, and the daemon's
        # refusal carries the id of the stream it leaves open.
        client = await daemon.connected(check=False)
        await client.send(Stream(id=1, agent="assistant", content="/slow 3 1000"))
        await client.until(lambda m: isinstance(m, Start))
        await client.send(Ping(id=1))
        frames = await client.until(lambda m: isinstance(m, End))
        errors = [m for m in frames if isinstance(m, Error)]
        assert [(e.id, e.code) for e in errors] == [(1, 400)]
        assert not any(isinstance(m, Pong) for m in frames)
        after = frames[frames.index(errors[0]) + 1 :]
        assert text_of(after) == "1 2 3"  # the whole answer came after the refusal
        assert frames[-1] == End(id=1, status="done", error=None, last_seq=2)


async def test_past_max_open_requests_gets_429_and_cancel_still_goes_through(autojump_clock):
    async with open_daemon(max_open_requests=2) as daemon:
        client = await daemon.connected(check=False)
        for rid, sender in ((1, "a"), (2, "b")):
            await client.send(
                Stream(id=rid, agent="assistant", sender=sender, content="/slow 3 1000")
            )
        await client.send(Ping(id=3))
        error = (await client.until(lambda m: isinstance(m, Error)))[-1]
        assert isinstance(error, Error) and (error.id, error.code) == (3, 429)
        await client.send(Cancel(id=4, target=1))
        frames = await client.until(lambda m: _id(m) == 4)
        assert frames[-1] == Ok(id=4)
        assert [m.status for m in frames if isinstance(m, End)] == ["detached"]
        # One request open now: there is room again.
        await client.send(Ping(id=5))
        assert (await client.until(lambda m: _id(m) == 5))[-1] == Pong(id=5)
        end = (await client.until(lambda m: isinstance(m, End)))[-1]
        assert isinstance(end, End) and (end.id, end.status) == (2, "done")


async def test_cancel_ends_the_stream_detached_before_its_ok_and_the_run_is_stored(
    autojump_clock,
):
    async with open_daemon() as daemon:
        client = await daemon.connected()
        await client.send(Stream(id=1, agent="assistant", content="/slow 5 1000"))
        start = (await client.until(lambda m: isinstance(m, Start)))[-1]
        assert isinstance(start, Start)
        await client.send(Cancel(id=2, target=1))
        frames = await client.until(lambda m: _id(m) == 2)
        tail = [m for m in frames if _id(m) in (1, 2) and not isinstance(m, TextDelta)]
        assert tail == [End(id=1, status="detached", error=None, last_seq=1), Ok(id=2)]
        # The run goes on: an attach replays it from its start and follows it to the end.
        await client.send(Attach(id=3, agent="assistant"))
        replay = await client.answer(3)
        assert replay[0] == Start(id=3, run_id=start.run_id, agent="assistant", seq=1)
        assert text_of(replay) == "1 2 3 4 5"
        assert replay[-1] == End(id=3, status="done", error=None, last_seq=2)
        history = await client.ask(GetHistory(id=4, agent="assistant"))
        assert isinstance(history, History)
        assert [(e.role, e.content) for e in history.entries] == [
            ("user", "/slow 5 1000"),
            ("assistant", "1 2 3 4 5"),
        ]


async def test_cancel_of_a_request_that_is_not_open_gets_404(autojump_clock):
    async with open_daemon() as daemon:
        client = await daemon.connected()
        error = await client.ask(Cancel(id=1, target=42))
        assert isinstance(error, Error) and (error.id, error.code) == (1, 404)
        await client.send(Stream(id=2, agent="assistant", content="done already"))
        await client.answer(2)
        error = await client.ask(Cancel(id=3, target=2))
        assert isinstance(error, Error) and (error.id, error.code) == (3, 404)
        # Nor a request that is open but not a stream, attach or subscribe: here a
        # compact that waits behind a run, which waits for an answer.
        await client.send(Stream(id=4, agent="assistant", content="/ask really?"))
        await client.until(lambda m: isinstance(m, AskUser))
        await client.send(Compact(id=5, agent="assistant"))
        error = await client.ask(Cancel(id=6, target=5))
        assert isinstance(error, Error) and (error.id, error.code) == (6, 404)
        error = await client.ask(Cancel(id=7, target=7))
        assert isinstance(error, Error) and (error.id, error.code) == (7, 404)
        assert client.session is not None and client.session.is_open(5)


async def test_every_request_ends_with_exactly_one_terminal_frame(autojump_clock):
    async with open_daemon() as daemon:
        client = await daemon.connected()
        watcher = await daemon.connected()  # sees each run to its real end
        await client.send(Stream(id=1, agent="assistant", sender="a", content="/slow 3 1000"))
        await client.send(Stream(id=2, agent="assistant", sender="b", content="/slow 3 1000"))
        await client.send(Stream(id=3, agent="assistant", sender="c", content="/slow 9 1000"))
        await client.send(Stream(id=4, agent="assistant", sender="c", content="queued"))
        await client.send(Stream(id=5, agent="assistant", sender="d", content="/fail boom"))
        await client.send(Stream(id=6, agent="nobody", content="hello?"))
        await client.send(Attach(id=7, agent="assistant", sender="nobody-yet"))
        await client.until(lambda m: isinstance(m, Start) and m.id == 3)
        await client.send(Attach(id=8, agent="assistant", sender="c"))
        await client.send(Cancel(id=9, target=2))
        await client.send(Kill(id=10, agent="assistant", sender="c", all=True))
        await client.until(lambda m: _id(m) == 10)
        # Follow the detached run to its end, so that a frame it wrongly sent
        # to its detached stream would already be on the wire.
        await watcher.send(Attach(id=1, agent="assistant", sender="b"))
        assert (await watcher.answer(1))[-1].status in ("done", "idle")  # type: ignore[union-attr]
        await client.send(Ping(id=11))
        await client.until(lambda m: _id(m) == 11)

        assert client.session is not None and client.session.open_requests == 0
        terminals: dict[int, list[ServerMsg]] = {}
        for msg in client.frames:
            rid = _id(msg)
            if rid is not None and type(msg) in REPLIES[client.kinds[rid]][1]:
                terminals.setdefault(rid, []).append(msg)
        assert sorted(terminals) == list(range(1, 12))
        assert all(len(frames) == 1 for frames in terminals.values()), terminals
        status = {rid: getattr(frames[0], "status", None) for rid, frames in terminals.items()}
        assert status == {
            1: "done",
            2: "detached",
            3: "killed",
            4: "killed",
            5: "error",
            6: None,  # an `error` frame, not an `end`: no run was ever queued
            7: None,  # `error` 404: attach names a conversation that was never created
            8: "killed",
            9: None,
            10: None,
            11: None,
        }
        assert [(t[0].code, t[0].id) for t in terminals.values() if isinstance(t[0], Error)] == [
            (404, 6),
            (404, 7),
        ]
        killed = terminals[10][0]
        assert isinstance(killed, Killed) and killed.run_id is not None
        # `killed` comes only after the end of every run it killed.
        order = [id(m) for m in client.frames]
        assert order.index(id(killed)) > max(order.index(id(terminals[r][0])) for r in (3, 4))


# --- what the daemon cannot read --------------------------------------------------------------


async def test_a_frame_over_max_frame_bytes_gets_413_from_its_header_and_closes(
    autojump_clock,
):
    async with open_daemon(max_frame_bytes=1024) as daemon:
        client = daemon.connect(check=False)
        welcome = await client.greet()
        assert welcome.max_frame_bytes == 1024
        await client.send_bytes((1025).to_bytes(4, "big"))  # the header alone: no body follows
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 413)
        assert await client.closed() == []


async def test_a_body_that_is_not_json_gets_400_and_closes(autojump_clock):
    async with open_daemon() as daemon:
        client = daemon.connect(check=False)
        await client.greet()
        await client.send_bytes(frame(b'{"type": "ping", "id": 1'))  # cut short
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 400)
        assert await client.closed() == []


async def test_a_schema_error_gets_400_with_its_id_and_the_connection_stays_open(
    autojump_clock,
):
    async with open_daemon() as daemon:
        client = daemon.connect(check=False)
        await client.greet()
        await client.send_bytes(frame(b'{"type": "stream", "id": 5, "agent": "assistant"}'))
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (5, 400)
        assert "content" in error.message
        await client.send_bytes(frame(b'{"type": "teleport", "id": 6}'))
        error = await client.next()
        assert isinstance(error, Error) and (error.id, error.code) == (6, 400)
        assert await client.ask(Ping(id=5)) == Pong(id=5)


async def test_a_huge_frame_with_a_schema_error_gets_400_with_its_id_at_a_small_cost(
    autojump_clock,
):
    # Regression: refusing it decoded the body again as Python objects to find its
    # id: 16M empty lists, a peak of over a gigabyte, and every client stalled.
    head = MSGPACK.encode(Stream(id=7, agent="assistant", content="hi"))
    count = DEFAULT_MAX_FRAME_BYTES - len(head) - 16  # empty arrays, one byte each
    # `teleport` is no message type; then one more field, "x", holds the arrays.
    body = (
        bytes([head[0] + 1])
        + head[1:].replace(b"\xa6stream", b"\xa8teleport")
        + b"\xa1x\xdd"
        + count.to_bytes(4, "big")
        + b"\x90" * count
    )
    async with open_daemon() as daemon:
        other = await daemon.connected()
        flooder = await daemon.connected(codec=MSGPACK, check=False)
        tracemalloc.start()
        try:
            await flooder.send_bytes(frame(body))
            error = await flooder.next()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(error, Error) and (error.id, error.code) == (7, 400), error
        assert "teleport" in error.message
        # The frame's bytes are held a few times over on their way (the stream, the
        # decoder, the body); nothing is made of each of the 16M values in it.
        assert peak < 4 * len(body), f"{peak:,} bytes at the peak for a {len(body):,}-byte body"
        assert await flooder.ask(Ping(id=8)) == Pong(id=8)
        assert await other.ask(Ping(id=1)) == Pong(id=1)


TEXTS: dict[type, Callable[[int, str], Request]] = {
    Stream: lambda rid, text: Stream(id=rid, agent="assistant", content=text),
    ReplyToAsk: lambda rid, text: ReplyToAsk(id=rid, agent="assistant", content=text),
    Compact: lambda rid, text: Compact(id=rid, agent="assistant", instructions=text),
    SearchMemory: lambda rid, text: SearchMemory(id=rid, agent="assistant", query=text),
    Post: lambda rid, text: Post(id=rid, sender="ana", to=["bob"], content=text),
}


@pytest.mark.parametrize("kind", list(TEXTS), ids=lambda kind: kind.__name__)
async def test_text_over_max_content_bytes_gets_413_and_the_connection_stays_open(
    kind, autojump_clock
):
    async with open_daemon(max_content_bytes=16) as daemon:
        client = await daemon.connected()
        # 9 characters, 18 bytes of UTF-8: the limit counts bytes.
        error = await client.ask(TEXTS[kind](1, "é" * 9))
        assert isinstance(error, Error) and (error.id, error.code) == (1, 413)
        assert await client.ask(Ping(id=1)) == Pong(id=1)
        # 16 bytes is within the limit.
        await client.send(Stream(id=2, agent="assistant", content="é" * 8))
        end = (await client.answer(2))[-1]
        assert isinstance(end, End) and end.status == "done"


async def test_a_frame_the_daemon_cannot_send_within_max_frame_bytes_ends_its_request(
    autojump_clock,
):
    # A word that fits in the stream's own frames, but not in the `event` frame
    # that wraps it for a subscriber: that frame becomes an `error` 500, which
    # is terminal, so the subscription must send nothing after it.
    limit = 1024
    word = "w" * (limit - len(JSON.encode(Stream(id=1, agent="assistant", content=""))))
    assert len(JSON.encode(TextDelta(id=1, delta=word))) <= limit
    wrapped = Event(
        id=1, agent="assistant", sender="user", run_id="r" * 32, event=TextDelta(delta=word)
    )
    assert len(JSON.encode(wrapped)) > limit
    async with open_daemon(max_frame_bytes=limit) as daemon:
        # Unchecked, to show everything the daemon sends after the error.
        watcher = await daemon.connected(check=False)
        await watcher.send(Subscribe(id=1))
        assert await watcher.next() == Subscribed(id=1)
        streamer = await daemon.connected()
        await streamer.send(Stream(id=1, agent="assistant", content=word))
        frames = await streamer.answer(1)
        assert text_of(frames) == word
        assert frames[-1] == End(id=1, status="done", error=None, last_seq=2)
        await streamer.send(Stream(id=2, agent="assistant", content="another run"))
        await streamer.answer(2)
        # Both runs are over, and the ping's answer comes after all they sent the watcher.
        await watcher.send(Ping(id=2))
        seen = await watcher.until(lambda m: _id(m) == 2)
        assert seen[-1] == Pong(id=2)
        errors = [m for m in seen if isinstance(m, Error)]
        assert [(e.id, e.code) for e in errors] == [(1, 500)]
        assert not any(isinstance(m, Event) and m.event == TextDelta(delta=word) for m in seen)
        # The error ended the subscription: nothing more may follow for it.
        after = [(type(m).__name__, _id(m)) for m in seen[seen.index(errors[0]) + 1 : -1]]
        assert after == []


# --- slow consumers ---------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_dropped_and_the_others_stream_on(
    autojump_clock,
):
    async with open_daemon(outgoing_frames=8) as daemon:
        # memory_stream_pair buffers without limit, so a client that stops reading
        # there never holds the daemon's writer up. lockstep_stream_pair has no
        # buffer at all: each write waits until the client has read all of it, as
        # a socket whose kernel buffer is full would. So once this client stops
        # reading, the daemon's writer stays in its send and frames pile up in
        # the connection's own buffer of outgoing_frames.
        stalled = daemon.connect(trio.testing.lockstep_stream_pair)
        await stalled.greet()
        reader = await daemon.connected()
        with capture_logs() as logs:
            await stalled.send(
                Stream(id=1, agent="assistant", sender="stalled", content="/slow 40 10")
            )
            # ...and `stalled` reads nothing more until it has been dropped.
            await reader.send(
                Stream(id=1, agent="assistant", sender="reader", content="/slow 40 10")
            )
            frames = await reader.answer(1)
            assert stalled.served.is_set()  # dropped while the other run streamed on
        assert text_of(frames) == " ".join(str(n) for n in range(1, 41))
        assert isinstance(frames[0], Start)
        assert frames[-1] == End(id=1, status="done", error=None, last_seq=2)
        assert [e["buffered_frames"] for e in logs if e["event"] == "client_too_slow"] == [8]
        # The dropped client gets what was already on its way, no error, then the end.
        assert not any(isinstance(m, Error) for m in await stalled.closed())
        # Its run went on and was stored.
        await reader.send(Attach(id=2, agent="assistant", sender="stalled"))
        assert (await reader.answer(2))[-1].status in ("done", "idle")  # type: ignore[union-attr]
        history = await reader.ask(GetHistory(id=3, agent="assistant", sender="stalled"))
        assert isinstance(history, History)
        assert history.entries[-1].content == " ".join(str(n) for n in range(1, 41))


async def test_a_run_that_fills_outgoing_bytes_drops_its_client_and_goes_on(autojump_clock):
    # As the test above, with the bytes limit reached long before the frames limit.
    words = " ".join(f"{n:040d}" for n in range(200))  # ~10 KB of deltas
    async with open_daemon(outgoing_bytes=4096) as daemon:
        stalled = daemon.connect(trio.testing.lockstep_stream_pair)
        await stalled.greet()
        reader = await daemon.connected()
        with capture_logs() as logs:
            await stalled.send(Stream(id=1, agent="assistant", sender="stalled", content=words))
            await served_within(stalled, WAIT_S)
        (slow,) = [e for e in logs if e["event"] == "client_too_slow"]
        assert slow["buffered_bytes"] >= 4096 and slow["buffered_frames"] < 16384
        await reader.send(Attach(id=2, agent="assistant", sender="stalled"))
        assert (await reader.answer(2))[-1].status in ("done", "idle")  # type: ignore[union-attr]
        history = await reader.ask(GetHistory(id=3, agent="assistant", sender="stalled"))
        assert isinstance(history, History) and history.entries[-1].content == words


async def test_a_client_that_pauses_for_fewer_frames_than_the_limit_keeps_them_all(
    autojump_clock,
):
    async with open_daemon(outgoing_frames=8) as daemon:
        paused = daemon.connect(trio.testing.lockstep_stream_pair)  # see the test above
        await paused.greet()
        await paused.send(Stream(id=1, agent="assistant", content="/slow 3 10"))
        # Another client follows the run to its end (start, 3 words, usage, end: 6
        # frames for `paused`, which has read none of them).
        watcher = await daemon.connected()
        await watcher.send(Attach(id=1, agent="assistant"))
        assert (await watcher.answer(1))[-1] == End(id=1, status="done", error=None, last_seq=2)
        assert not paused.served.is_set()
        frames = await paused.answer(1)
        assert text_of(frames) == "1 2 3"
        assert frames[-1] == End(id=1, status="done", error=None, last_seq=2)


async def test_a_frame_written_at_once_wakes_a_subscription_waiting_for_room(autojump_clock):
    """A reply goes straight to the socket with everything queued before it; a
    subscription that was waiting for room in the buffer must then go on.

    Over a real socket pair (frames are written at once only to a socket), and
    with no writer task running, so that the frames stay queued until the reply
    takes them: the subscription once waited forever here.
    """
    async with open_daemon(outgoing_frames=8) as daemon:
        peer, ours = trio.socket.socketpair()
        conn = Connection(daemon.server, trio.SocketStream(ours), 1, tcp=False)
        conn.session.receive_request(Hello(protocol=PROTOCOL_VERSION, client="t"))
        conn.session.send_reply(Welcome(protocol=1, server="s", agents=[], max_frame_bytes=1))
        conn.session.receive_request(Subscribe(id=1))
        conn.session.receive_request(Ping(id=2))
        event = Event(id=1, agent="assistant", sender="user", run_id="r", event=Title(title="t"))
        # The first goes out at once (it comes alone); the next four are half of
        # outgoing_frames: a subscription now waits for room.
        for _ in range(5):
            conn.send(event)
        sent = trio.Event()

        async def subscription() -> None:
            await conn.send_waiting(event)
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscription)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            assert conn.send(Pong(id=2))  # written at once, with the events queued before it
            with trio.fail_after(1):
                await sent.wait()
        decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        frames: list[ServerMsg] = []
        with trio.fail_after(1):
            while len(frames) < 6:
                decoder.feed(await peer.recv(65536))
                frames.extend(JSON.decode_server(body) for body in decoder)
        assert [type(f) for f in frames] == [Event] * 5 + [Pong]
        peer.close()
        ours.close()


@pytest.mark.parametrize("per_write", [1, 200], ids=["one-by-one", "all-at-once"])
async def test_a_client_that_never_reads_is_held_back_at_most_the_cap(per_write, autojump_clock):
    """A client sends `get_history` after `get_history` and reads nothing. Past a
    quarter of outgoing_bytes buffered for it, the daemon takes none of its requests
    until the writer catches up (the client's writes block), and answers those it
    took only as the client makes room for them; the client is not dropped, the
    daemon holds at most the cap for it, and other clients are served meanwhile."""
    cap = 64 * 1024
    requests = 200  # within max_open_requests; their replies would be ~800 KB
    async with open_daemon(outgoing_bytes=cap) as daemon:
        reader = await daemon.connected()
        await stream_once(reader, "x" * 2000)  # each history then takes ~4 KB
        hog = daemon.connect(trio.testing.lockstep_stream_pair, check=False)  # see above
        await hog.greet()
        conn = max(daemon.server.connections, key=lambda c: c.number)  # the hog's
        frames = [JSON.encode_frame(GetHistory(id=rid, agent="assistant")) for rid in range(1, 201)]
        sent = 0

        async def ask_for_history() -> None:
            nonlocal sent
            for at in range(0, requests, per_write):
                # No deadline: it is meant to block, and the autojump clock would fire one.
                await hog.stream.send_all(b"".join(frames[at : at + per_write]))
                sent = at + per_write

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_for_history)
            await trio.testing.wait_all_tasks_blocked()
            if per_write == 1:
                assert sent < requests, "the daemon took every request of a client that reads none"
            assert not hog.served.is_set(), "held back, not dropped"
            assert conn.buffered_bytes <= cap
            assert await reader.ask(Ping(id=2)) == Pong(id=2)
            # Once it reads, it gets every answer, and the daemon reads it again.
            answered: set[int] = set()
            while len(answered) < requests:
                msg = await hog.next()
                assert isinstance(msg, History), msg
                answered.add(msg.id)
            assert sent == requests


class FailingListener:
    """A listener whose `accept` fails as told, then is closed."""

    def __init__(self, *failures: int) -> None:
        self.failures = list(failures)
        self.tried = 0

    async def accept(self) -> trio.abc.HalfCloseableStream:
        await trio.lowlevel.checkpoint()
        self.tried += 1
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        raise trio.ClosedResourceError


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
async def test_accept_retries_while_out_of_a_resource(autojump_clock, code):
    async with open_daemon() as daemon:
        listener = FailingListener(code, code)
        with trio.fail_after(5):
            await daemon.server.accept(listener)  # type: ignore[arg-type]
        assert listener.tried == 3, "two shortages waited out, then the listener closed"


async def test_a_shortage_is_logged_once_however_long_it_lasts(autojump_clock):
    # Regression: the accept loop warned at every retry, ten times a second.
    async with open_daemon() as daemon:
        listener = FailingListener(*[errno.EMFILE] * 50)
        with capture_logs() as logs, trio.fail_after(30):
            await daemon.server.accept(listener)  # type: ignore[arg-type]
        assert listener.tried == 51
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["accept_failed"]


async def test_accept_fails_loudly_on_anything_else(autojump_clock):
    async with open_daemon() as daemon:
        listener = FailingListener(errno.EBADF)
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, check=lambda e: e.errno == errno.EBADF)):
            await daemon.server.accept(listener)  # type: ignore[arg-type]
        assert listener.tried == 1
