"""The transport: a Unix socket listener and one `Connection` per client.

A connection has one reader task that decodes frames and dispatches them, and
one writer task that drains a bounded buffer of encoded frames, coalescing
whatever is ready into one write. Nothing on the hot path blocks: events are
encoded and queued synchronously, and a client that lets the buffer fill up
(in frames or in bytes) is disconnected without touching its runs. A client
whose answers pile up is not read until they drain, so its requests cannot
fill the buffer.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar, assert_never

import structlog
import trio
from chinwag.protocol import (
    FEATURES,
    JSON,
    PROTOCOL_VERSION,
    AgentItem,
    Agents,
    Attach,
    Cancel,
    ChangeKind,
    ClientMsg,
    Codec,
    Compact,
    Compacted,
    Compaction,
    Conversations,
    Delete,
    Edit,
    Encoding,
    End,
    Error,
    ErrorInfo,
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
    LocalProtocolError,
    Lock,
    Mail,
    MailMessage,
    MailRead,
    MailUpdate,
    MarkRead,
    Memory,
    Ok,
    Pin,
    Ping,
    Pong,
    Post,
    ProjectCreate,
    ProjectDelete,
    ProjectGet,
    ProjectUpdate,
    ProtocolError,
    React,
    Register,
    ReplyToAsk,
    Request,
    SearchMail,
    SearchMemory,
    Sent,
    ServerMessage,
    Session,
    SpaceArchive,
    SpaceCreate,
    SpaceInvite,
    SpaceJoin,
    SpaceLeave,
    SpaceMembers,
    Stats,
    Stream,
    StreamEventMsg,
    Subscribe,
    Subscribed,
    TextDelta,
    ThinkingDelta,
    Unlock,
    UsageTotals,
    Watch,
    Watching,
    Welcome,
    codec_for,
)
from chinwag.storage import StorageError

from ._cluster import RemoteRun
from ._conversation import Run, Subscription
from ._errors import RequestError
from ._mail_requests import answer as answer_mail
from ._post_office import PostOffice, Watcher
from ._reaper import stat_fields
from ._runtime import Runtime
from ._tokens import Identity, Tokens

log = structlog.get_logger("chinwag.server")

SERVER_NAME = "chinwag/0.1.0"
UNIX_SENDER = "user"
READ_CHUNK = 65536
FLUSH_TIMEOUT_S = 2.0
MAIL_READ_BATCH = 500  # msg_ids in one `mail_read` at most: a `mark_read` may read thousands
ACCEPT_RETRY_S = 0.1
# What `accept` fails with while the process or the system is short of a resource
# that frees up as connections close.
_OUT_OF_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


_T = TypeVar("_T")


class ServeError(Exception):
    """The daemon cannot start serving (socket in use, unusable path)."""


class RequestSink:
    """Delivers one run's events to one `stream` or `attach` request."""

    def __init__(self, conn: Connection, request_id: int, key: tuple[str, str]) -> None:
        self.conn = conn
        self.request_id = request_id
        self.key = key
        self.open = True
        self.run: Run | RemoteRun | None = None

    def __call__(self, event: StreamEventMsg) -> bool:
        if not self.open:
            return False
        if type(event) is End:
            self.open = False
        elif type(event) is Compaction and "compaction" not in self.conn.session.features:
            return True  # an addition to v1 this client did not ask for
        # Stamped for the encoding only, not copied: other sinks see the same event
        # (a subscriber, an attach's replay), and it leaves here as it came.
        event.id = self.request_id
        try:
            return self.conn.send(event)
        finally:
            event.id = None

    def drop(self) -> None:
        """Take no more events; the run drops the sink at its next one."""
        self.open = False

    def detach(self) -> None:
        """End the request `detached`; the run goes on without it."""
        self.open = False
        if self.run is not None:
            self.run.remove_sink(self)
        last_seq = self.conn.runtime.last_seq(*self.key)
        self.conn.send(End(id=self.request_id, status="detached", error=None, last_seq=last_seq))


class _Buffered(Generic[_T]):
    """A long-lived request fed through its own bounded buffer, drained by its own task.

    One that falls behind by more than the buffer is dropped: its `end` with
    `error` 429 (``too_slow`` the sentence) follows what it had buffered, and
    nothing else is slowed.
    """

    #: The log event of a drop: ``subscriber_too_slow``, ``watcher_too_slow``.
    too_slow_event = ""
    #: What a drop counts as in the metrics: ``subscription``, ``watch``.
    consumer = ""

    def __init__(self, conn: Connection, request_id: int, size: int, too_slow: str) -> None:
        self.conn = conn
        self.request_id = request_id
        self._send, self._receive = trio.open_memory_channel[_T](size)
        self._too_slow = too_slow
        self._end: End | None = None  # the terminal frame, sent by `forward` once drained

    def _offer(self, item: _T) -> bool:
        """Buffer ``item``; False (and the request is dropped) when it is ended or full."""
        if self._end is not None:
            return False
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            log.warning(self.too_slow_event, request_id=self.request_id)
            self.conn.runtime.telemetry.dropped(self.consumer)
            self._end = End(
                id=self.request_id,
                status="error",
                error=ErrorInfo(code=429, message=self._too_slow),
                last_seq=None,
            )
            self._send.close()
            return False
        return True

    def detach(self) -> None:
        """Cancel: drop what is buffered and end the request now."""
        if self._end is not None:
            return
        self._end = End(id=self.request_id, status="detached", error=None, last_seq=None)
        self.drop()
        self.conn.send(self._end)

    def _leave(self) -> None:
        """Stop being fed (by runs, by the post office)."""
        raise NotImplementedError

    def drop(self) -> None:
        """Stop being fed and drop what is buffered, sending nothing."""
        self._leave()
        self._send.close()
        while True:
            try:
                self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._receive.close()


class Subscriber(_Buffered[Event]):
    """A `subscribe` request: the events of the runs it matches, never slowing them."""

    too_slow_event = "subscriber_too_slow"
    consumer = "subscription"

    def __init__(self, conn: Connection, request_id: int, size: int) -> None:
        super().__init__(
            conn, request_id, size, "The subscription fell too far behind and was dropped."
        )
        self.subscription: Subscription | None = None

    def _leave(self) -> None:
        if self.subscription is not None:
            self.conn.runtime.unsubscribe(self.subscription)

    def deliver(self, agent: str, sender: str, run_id: str, event: StreamEventMsg) -> bool:
        """Called by runs; returning False makes the run drop the subscription."""
        if self._end is not None:
            return False
        frame = Event(id=self.request_id, agent=agent, sender=sender, run_id=run_id, event=event)
        return self._offer(frame)

    async def forward(self) -> None:
        try:
            async for frame in self._receive:
                await self.conn.send_waiting(frame)
                # Then everything else already buffered, without a scheduling round
                # for each: a burst must drain as fast as runs fill the buffer.
                while True:
                    try:
                        frame = self._receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    await self.conn.send_waiting(frame)
        except trio.ClosedResourceError:  # detached: its end is already sent
            return
        if self._end is not None and self._end.status == "error":
            self.conn.send(self._end)


class MailWatch(_Buffered[Mail | MailUpdate | MailRead]):
    """A `watch` request: what the reader missed since ``after``, then each new message,
    never slowing the author or the other watchers."""

    too_slow_event = "watcher_too_slow"
    consumer = "watch"

    def __init__(self, conn: Connection, request_id: int, size: int) -> None:
        super().__init__(
            conn,
            request_id,
            size,
            "The watch fell too far behind and was dropped; watch again with `after` set "
            "to the last msg_id you got.",
        )
        self.watcher: Watcher | None = None

    def room(self) -> bool:
        """Whether ``deliver`` would take one more message now."""
        stats = self._send.statistics()
        return self._end is None and stats.current_buffer_used < stats.max_buffer_size

    def deliver(self, message: MailMessage) -> bool:
        """Called by the post office; False makes it drop this watch."""
        return self._offer(self._mail(message))

    def update(self, change: ChangeKind, message: MailMessage) -> bool:
        """A change to a message the reader received; False makes the post office drop it."""
        return self._offer(
            MailUpdate(id=self.request_id, msg_id=message.msg_id, change=change, message=message)
        )

    def read(self, msg_ids: list[str]) -> bool:
        """The reader's copies of ``msg_ids`` became `read`: as many frames as keep each
        within the frame size; False makes the post office drop this watch."""
        # A msg_id and its separator take at most 32 bytes, the frame's other fields 256.
        batch = max(1, min(MAIL_READ_BATCH, (self.conn.max_frame_bytes - 256) // 32))
        return all(
            self._offer(MailRead(id=self.request_id, msg_ids=msg_ids[at : at + batch]))
            for at in range(0, len(msg_ids), batch)
        )

    def _leave(self) -> None:
        if self.watcher is not None:
            self.conn.server.post_office.unwatch(self.watcher)

    def _mail(self, message: MailMessage) -> Mail:
        return Mail(id=self.request_id, msg_id=message.msg_id, message=message)

    def _detached(self) -> bool:
        return self._end is not None and self._end.status == "detached"

    async def forward(self, name: str, after: str | None, cursor: str | None) -> None:
        office = self.conn.server.post_office
        try:
            # The replay, page by page, up to the cursor. A watch dropped as too slow
            # meanwhile still sends all of it and then what it buffered, so what the
            # client got has no gap; one cancelled (or whose connection closed) stops.
            # Each page is stored delivered before it goes, as live mail is.
            while after is not None:
                page = await office.replay(name, after, cursor)
                if self._detached():
                    break
                await office.replayed(name, page)
                for message, _ in page:
                    if self._detached():
                        break
                    await self.conn.send_waiting(self._mail(message))
                after = page[-1][0].msg_id if page else None
            telemetry = self.conn.runtime.telemetry
            async for frame in self._receive:
                telemetry.mail_delivered(frame)
                await self.conn.send_waiting(frame)
        except (trio.ClosedResourceError, trio.EndOfChannel):
            pass
        except StorageError as exc:
            log.error("storage_failed", error=str(exc))
            self._end = End(
                id=self.request_id,
                status="error",
                error=ErrorInfo(code=500, message=f"Storage failed: {exc}"),
                last_seq=None,
            )
            self.drop()
        if self._end is not None and self._end.status == "error":
            self.conn.send(self._end)


Handle = RequestSink | Subscriber | MailWatch
"""What a `cancel` detaches: an open `stream`, `attach`, `subscribe` or `watch`."""

# A run's deltas and a subscription's events are worth batching; any other frame is
# awaited by someone, and goes to the socket at once, with what is queued before it.
# So does a delta that comes alone (nothing queued, none written in the last LONE_S):
# a model's paced tokens cost no writer wake-up each, a burst is still batched.
_BATCHED = frozenset({TextDelta, ThinkingDelta, Event})
LONE_S = 0.001
# Answers to reads (history, conversations, memory) one connection makes at once.
READS_AT_ONCE = 4
_NO_DEADLINE = contextlib.nullcontext()


class Connection:
    """One client: its reader, its writer, its session and the requests it can cancel.

    The `Session` (protocol/) holds the protocol's state: the handshake, the
    open request ids, which frame ends which request; this class holds the
    I/O, the limits and the dispatch.
    """

    def __init__(self, server: Server, stream: trio.abc.Stream, number: int, *, tcp: bool) -> None:
        self.server = server
        self.tcp = tcp  # a TCP client: it names a token, which fixes who it is
        self.identity: Identity | None = None  # on TCP, once its hello named a known token
        self.runtime = server.runtime
        self.stream = stream
        self.number = number
        daemon = server.runtime.config.daemon
        self.max_frame_bytes = daemon.max_frame_bytes
        self.max_content = daemon.max_content_bytes
        self.hello_timeout = daemon.hello_timeout_s
        self.idle_timeout = daemon.idle_timeout_s
        self.connected_at = self.last_active = trio.current_time()
        self.session = Session(max_open=daemon.max_open_requests)
        self.codec: Codec | None = None  # fixed by the first frame
        self._append_frame = JSON.append_frame  # the codec's, once it is fixed
        self.closed = False
        self.linger = False  # drain the client's input before closing (after a fatal error)
        self.handles: dict[int, Handle] = {}  # by request id
        # Frames waiting for the writer, encoded one after the other into one buffer.
        self._out = bytearray()
        self._queued = 0  # frames in _out
        self._sending = 0  # bytes the writer took from _out and is sending
        self._limit = daemon.outgoing_frames
        self._byte_limit = daemon.outgoing_bytes
        # (frames, bytes) from which the buffer counts as busy: subscriptions wait for
        # room from half of it, the reader from a quarter; never from zero.
        self._half = (max(1, self._limit // 2), max(1, self._byte_limit // 2))
        self._quarter = (max(1, self._limit // 4), max(1, self._byte_limit // 4))
        self._ready = trio.Event()  # _out has frames, or the connection is finishing
        self._room = trio.Event()  # the writer took what was queued, or sent it
        self._writing = False  # the writer is in a send: nothing else may write
        self._written_at = -math.inf  # when a frame was last written straight to the socket
        # A socket's descriptor, for frames written at once from the task that sends them.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._reads = trio.Semaphore(READS_AT_ONCE)  # see _call's `paced`
        self._last_post = trio.Event()  # set once this connection's latest `post` is done
        self._last_post.set()
        self._nursery: trio.Nursery | None = None
        self._writer_scope = trio.CancelScope()
        self.done = trio.Event()

    # --- output -----------------------------------------------------------------

    def send(self, msg: ServerMessage) -> bool:
        """Queue one frame without blocking; False (and the connection drops) if too slow.

        A frame that ends its request closes its id (the session says which).
        """
        if self.closed:
            return False
        try:
            ended = self.session.send_reply(msg)
        except LocalProtocolError as exc:  # a bug of ours: never put it on the wire
            log.error("frame_refused", type=type(msg).__name__, reason=str(exc))
            return False
        if ended:
            self.handles.pop(msg.id, None)  # type: ignore[attr-defined]
            self.last_active = trio.current_time()
        return self._queue(msg)

    def _refuse(self, error: ProtocolError) -> None:
        """Send the `error` for a message the session refused; it closes no request."""
        if not self.closed:
            self._queue(self.session.refusal(error))

    @property
    def buffered_bytes(self) -> int:
        """What the client has yet to be sent: queued, or in the writer's hands."""
        return len(self._out) + self._sending

    def _queue(self, msg: ServerMessage) -> bool:
        """Encode ``msg`` for the writer; False when it did not go (nor will its request's next).

        The buffer is full at ``outgoing_frames`` or ``outgoing_bytes``: a frame never
        waits for room (a run must not stall on a client), so it drops the client.
        The frame that crosses ``outgoing_bytes`` still goes: one reply may be larger.
        """
        out = self._out
        start = len(out)
        if self._queued >= self._limit or start + self._sending >= self._byte_limit:
            log.warning(
                "client_too_slow", buffered_frames=self._queued, buffered_bytes=self.buffered_bytes
            )
            self.runtime.telemetry.dropped("connection")
            self.abort()
            return False
        size = self._append_frame(msg, out)
        self._queued += 1
        kept = size <= self.max_frame_bytes or self._too_large(msg, start, size)
        if (
            not self._writing
            and self._fd is not None
            and (type(msg) not in _BATCHED or (start == 0 and self._lone()))
        ):
            # The writer is idle and the frame should not wait for it: write it (and
            # what is queued before it) now, from here, and spare the writer's wake-up.
            return self._write_now() and kept
        self._ready.set()
        return kept

    def _too_large(self, msg: ServerMessage, start: int, size: int) -> bool:
        """Put an `error` in place of the frame just queued; it ends its request, here as
        on the wire. Never send what the client was told it may refuse. False when
        the request was open (and is no more)."""
        del self._out[start:]
        log.error("reply_too_large", type=type(msg).__name__, size=size)
        rid: int | None = getattr(msg, "id", None)
        refusal = Error(
            id=rid, code=500, message=f"The reply would be {size} bytes, over max_frame_bytes."
        )
        self._append_frame(refusal, self._out)
        if rid is None or not self.session.is_open(rid):
            return True
        self.session.send_reply(refusal)
        if (handle := self.handles.pop(rid, None)) is not None:
            handle.drop()
        return False

    def _write_now(self) -> bool:
        """Write what is queued from this task; the writer sends what the socket does not
        take. False when the connection broke."""
        assert self._fd is not None
        out = self._out
        try:
            sent = os.write(self._fd, out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return False
        if sent == len(out):
            out.clear()
            self._emptied()
        else:
            del out[:sent]
            self._ready.set()
        return True

    def _lone(self) -> bool:
        """No frame was written straight to the socket in the last ``LONE_S``."""
        now = trio.current_time()
        if now - self._written_at < LONE_S:
            return False
        self._written_at = now
        return True

    def _emptied(self) -> None:
        """Everything queued was taken: wake whoever waits for room."""
        self._queued = 0
        self._made_room()

    def _made_room(self) -> None:
        self._room.set()
        self._room = trio.Event()

    def _holds(self, mark: tuple[int, int]) -> bool:
        """The buffer holds at least ``mark``'s frames or its bytes."""
        frames, size = mark
        return self._queued >= frames or self.buffered_bytes >= size

    async def send_waiting(self, msg: ServerMessage) -> None:
        """Queue one frame, waiting for room (subscriptions pace themselves this way)."""
        # Half the buffer at most: the rest stays free for the frames of runs,
        # which never wait, so a busy subscription cannot get its connection dropped.
        while not self.closed and self._holds(self._half):
            await self._room.wait()
        self.send(msg)

    async def _caught_up(self) -> None:
        """Return once the writer has less than a quarter of the buffer left to send.

        The reader waits here before each request: a client that does not read its
        answers stops being read, so its requests stop making answers nobody takes,
        and its own writes block, rather than the daemon's memory growing.
        """
        while not self.closed and self._holds(self._quarter):
            await self._room.wait()

    async def _writer(self) -> None:
        try:
            while True:
                if not self._out:
                    if self.closed:
                        return  # finished, and everything queued is written
                    await self._ready.wait()
                    self._ready = trio.Event()
                    # Let the tasks that are ready run first: what they queue in this
                    # tick leaves in the same write, one wakeup of the client, not many.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    continue
                data, self._out = self._out, bytearray()
                self._sending = len(data)
                self._emptied()
                self._writing = True
                try:
                    await self.stream.send_all(data)
                finally:
                    self._writing = False
                self._sending = 0
                self._made_room()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.abort()

    def abort(self) -> None:
        """Drop the connection now; its runs go on."""
        self.closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- lifecycle ---------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until the client leaves, breaks the protocol, or is too slow."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery

                async def read() -> None:
                    await self._read(nursery)
                    self.finish()

                nursery.start_soon(read)
                with self._writer_scope:
                    await self._writer()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            for handle in list(self.handles.values()):
                if isinstance(handle, RequestSink):
                    handle.open = False
                else:
                    handle.detach()
            self.handles.clear()
            self.server.post_office.leave(self)
            with trio.move_on_after(FLUSH_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                if self.linger:
                    await self._drain()
                await self.stream.aclose()
            self.done.set()

    async def _drain(self) -> None:
        """Close our side, then discard what the client still sends until it closes too.

        Closing a socket with unread input resets it, and a reset can destroy the
        error frame just sent; a client that broke the protocol still gets to read why.
        """
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):  # TLS has no half-close
                await self.stream.send_eof()
            while await self.stream.receive_some(READ_CHUNK):
                pass

    def finish(self) -> None:
        """Stop taking frames, flush what is queued (for a bounded time), then close."""
        if not self.closed:
            self.closed = True
            self._ready.set()  # the writer flushes what is queued, then returns
            self._writer_scope.deadline = trio.current_time() + FLUSH_TIMEOUT_S

    async def _read(self, nursery: trio.Nursery) -> None:
        decoder = FrameDecoder(self.max_frame_bytes)
        while not self.closed:
            data: bytes | bytearray | None = None
            quiet_until = self._quiet_until()
            # A cancel scope only when a deadline applies: a read is once per request.
            with trio.move_on_at(quiet_until) if quiet_until < math.inf else _NO_DEADLINE:
                try:
                    data = await self.stream.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if data is None:  # silent until the deadline: timed out, unless it moved
                if trio.current_time() >= self._quiet_until():
                    self._time_out()
                    return
                continue
            self.last_active = trio.current_time()
            if not data:
                return
            decoder.feed(data)
            try:
                for body in decoder:
                    if self._holds(self._quarter):
                        await self._caught_up()
                        if self.closed:
                            return
                    if self.codec is None:
                        self.codec = codec_for(Encoding.of(body))
                        self._append_frame = self.codec.append_frame
                    try:
                        msg = self.codec.decode_client(body)
                    except ProtocolError as exc:
                        log.info("bad_message", code=exc.code, message=exc.message)
                        self._refuse(exc)
                        if exc.fatal:
                            self.linger = True
                            return
                        continue
                    await self._take(msg, nursery)
                    if self.closed:
                        return
            except ProtocolError as exc:  # framing: the stream can no longer be trusted
                log.info("bad_frame", code=exc.code, message=exc.message)
                self._refuse(exc)
                self.linger = True
                return

    def _quiet_until(self) -> float:
        """When this connection's silence becomes a timeout (inf: it never does now)."""
        if not self.session.greeted:
            return self.connected_at + self.hello_timeout
        if self.idle_timeout is None:
            return math.inf
        if self.session.open_requests:  # busy: look again later; requests end without a frame in
            return trio.current_time() + self.idle_timeout
        return self.last_active + self.idle_timeout

    def _time_out(self) -> None:
        if self.session.greeted:
            why = f"sent nothing for {self.idle_timeout:g} s with no request open"
        else:
            why = f"sent no `hello` within {self.hello_timeout:g} s"
        log.info("connection_timed_out", greeted=self.session.greeted)
        self.send(Error(id=None, code=408, message=f"This connection {why}; it is closed."))

    # --- dispatch -----------------------------------------------------------------

    async def _take(self, msg: ClientMsg, nursery: trio.Nursery) -> None:
        """Open ``msg``'s request (or refuse it), check what the session cannot, dispatch."""
        try:
            self.session.receive_request(msg)
        except ProtocolError as exc:
            self._refuse(exc)
            if exc.fatal:
                self.finish()
            return
        if isinstance(msg, Request) and not isinstance(msg, Cancel):
            problem = self.identity.check(msg) if self.identity is not None else None
            problem = problem or await self._problem(msg)
            if problem is not None:
                self.send(Error(id=msg.id, code=problem[0], message=problem[1]))
                return
        self._dispatch(msg, nursery)

    async def _problem(self, msg: Request) -> tuple[int, str] | None:
        """What is wrong with a request the session opened, as (code, sentence), or None."""
        if self.server.shutting_down:
            return 503, "The daemon is shutting down; retry later."
        if (size := _text_bytes(msg)) > self.max_content:
            return 413, (
                f"The request carries {size} bytes of text, over this daemon's "
                f"max_content_bytes of {self.max_content}."
            )
        # A stream's cwd is checked in a thread; the frames after it wait for the
        # answer, so this connection's requests keep their order.
        if isinstance(msg, Stream) and msg.cwd is not None:
            problem = await self.runtime.cwd_problem(msg.cwd)
            if problem is not None:
                return 400, problem
        return None

    def _dispatch(self, msg: ClientMsg, nursery: trio.Nursery) -> None:
        """Answer one opened request; every type of ``ClientMsg`` has its case."""
        runtime = self.runtime
        match msg:
            case Hello():
                self._welcome(msg)
            case Cancel():
                self._cancel(msg)
            case Stream():
                self._stream(msg)
            case Attach():
                sink = RequestSink(self, msg.id, (msg.agent, self._sender(msg.sender)))
                self.handles[msg.id] = sink
                self._call(nursery, msg.id, lambda: self._attach(sink))
            case Kill():
                sender = self._sender(msg.sender)
                self._call(nursery, msg.id, lambda: self._kill(msg, sender))
            case ReplyToAsk():
                sender = self._sender(msg.sender)
                self._call(nursery, msg.id, lambda: self._reply(msg, sender))
            case GetHistory():
                self._call(nursery, msg.id, lambda: self._history(msg), paced=True)
            case ListConversations():
                self._call(nursery, msg.id, lambda: self._list(msg), paced=True)
            case Compact():
                self._compact(msg, nursery)
            case SearchMemory():
                self._call(nursery, msg.id, lambda: self._search(msg), paced=True)
            case Subscribe():
                self._subscribe(msg, nursery)
            case ListAgents():
                items = [
                    AgentItem(
                        name=agent.name,
                        description=agent.config.description,
                        model=agent.config.model,
                        tools=list(agent.config.tools),
                    )
                    for agent in runtime.agents.values()
                ]
                self.send(Agents(id=msg.id, items=items))
            case Ping():
                self.send(Pong(id=msg.id))
            case GetStats():
                self._call(nursery, msg.id, lambda: self._stats(msg))
            case GetUsage():
                self._call(nursery, msg.id, lambda: self._usage(msg), paced=True)
            case Watch():
                self._watch(msg, nursery)
            case Post():
                self._post(msg, nursery)
            case (
                Register()
                | Heartbeat()
                | ListParticipants()
                | Inbox()
                | Sent()
                | GetThread()
                | MarkRead()
                | GetMessage()
                | GetContext()
                | Edit()
                | Delete()
                | React()
                | Pin()
                | SearchMail()
                | SpaceCreate()
                | SpaceJoin()
                | SpaceLeave()
                | SpaceInvite()
                | SpaceArchive()
                | SpaceMembers()
                | ListSpaces()
                | ProjectCreate()
                | ProjectGet()
                | ListProjects()
                | ProjectUpdate()
                | ProjectDelete()
                | Focus()
                | Lock()
                | Unlock()
                | ListLocks()
            ):
                office = self.server.post_office
                self._call(nursery, msg.id, lambda: answer_mail(office, self, msg), paced=True)
            case _:
                assert_never(msg)

    def _sender(self, sender: str | None) -> str:
        return UNIX_SENDER if sender is None else sender

    def _welcome(self, msg: Hello) -> None:
        if self.tcp:
            self.identity = self.server.tokens.identify(msg.token)
            if self.identity is None:
                log.warning("token_refused", client=msg.client, given=msg.token is not None)
                what = "an unknown token" if msg.token else "no token"
                self.send(
                    Error(
                        id=None,
                        code=401,
                        message=f"This daemon's TCP clients name a token it knows; this "
                        f"hello named {what}.",
                    )
                )
                self.linger = True  # let the client read why before the connection closes
                self.finish()
                return
        log.info("client_greeted", client=msg.client)
        self.send(
            Welcome(
                protocol=PROTOCOL_VERSION,
                server=SERVER_NAME,
                agents=list(self.runtime.agents),
                max_frame_bytes=self.max_frame_bytes,
                features=list(FEATURES),
                speaks_as=self.identity.name if self.identity is not None else None,
            )
        )

    def _stream(self, msg: Stream) -> None:
        sender = self._sender(msg.sender)
        sink = RequestSink(self, msg.id, (msg.agent, sender))
        try:
            sink.run = self.runtime.submit(
                agent=msg.agent,
                sender=sender,
                content=msg.content,
                guest=msg.guest,
                cwd=msg.cwd,
                queue=msg.queue,
                sink=sink,
            )
        except RequestError as exc:
            self.send(Error(id=msg.id, code=exc.code, message=exc.message))
            return
        if sink.open:  # not ended already (a run refused before it was queued)
            self.handles[msg.id] = sink

    def _cancel(self, msg: Cancel) -> None:
        handle = self.handles.get(msg.target)
        if handle is None:
            self.send(
                Error(
                    id=msg.id,
                    code=404,
                    message=f"No stream, attach or subscribe with id {msg.target} is open.",
                )
            )
            return
        handle.detach()
        self.send(Ok(id=msg.id))

    def _subscribe(self, msg: Subscribe, nursery: trio.Nursery) -> None:
        subscriber = Subscriber(self, msg.id, self.runtime.config.daemon.subscription_events)
        try:
            subscriber.subscription = self.runtime.subscribe(
                msg.agent, msg.sender, subscriber.deliver
            )
        except RequestError as exc:
            self.send(Error(id=msg.id, code=exc.code, message=exc.message))
            return
        self.handles[msg.id] = subscriber
        nursery.start_soon(self._subscribed, subscriber)

    async def _subscribed(self, subscriber: Subscriber) -> None:
        """`subscribed` once every daemon sharing the store knows of it, then its events
        (those of runs here are buffered meanwhile)."""
        await self.runtime.heard()
        self.send(Subscribed(id=subscriber.request_id))
        await subscriber.forward()

    def _call(
        self,
        nursery: trio.Nursery,
        rid: int,
        handler: Callable[[], Awaitable[ServerMessage | None]],
        *,
        paced: bool = False,
    ) -> None:
        """Run a request that awaits (storage, a kill) in its own task.

        ``paced``: a read whose answer may be large (a page of history) is made only
        while the client has room for it, and a few at a time, since the reader may
        take many of them at once before any answer is queued. Never a request that
        may wait long (a kill, a compaction), which would hold the others up.
        """

        async def call() -> None:
            try:
                reply = await (self._paced(handler) if paced else handler())
            except RequestError as exc:
                reply = Error(id=rid, code=exc.code, message=exc.message)
            except StorageError as exc:
                log.error("storage_failed", error=str(exc))
                reply = Error(id=rid, code=500, message=f"Storage failed: {exc}")
            except Exception:
                log.exception("request_crashed", request_id=rid)
                reply = Error(id=rid, code=500, message="The request failed on an internal error.")
            if reply is not None:
                self.send(reply)

        nursery.start_soon(call)

    async def _paced(
        self, handler: Callable[[], Awaitable[ServerMessage | None]]
    ) -> ServerMessage | None:
        async with self._reads:
            await self._caught_up()
            return await handler()

    async def _attach(self, sink: RequestSink) -> None:
        try:
            sink.run = await self.runtime.attach(*sink.key, sink)
        except RequestError:
            if not sink.open:
                return  # cancelled before it resolved: its `end detached` was the answer
            sink.open = False
            raise

    async def _kill(self, msg: Kill, sender: str) -> Killed:
        run_id = await self.runtime.kill(msg.agent, sender, everything=msg.all)
        return Killed(id=msg.id, run_id=run_id)

    async def _reply(self, msg: ReplyToAsk, sender: str) -> Ok:
        await self.runtime.reply_to_ask(msg.agent, sender, msg.content, msg.ask_id)
        return Ok(id=msg.id)

    async def _history(self, msg: GetHistory) -> History:
        sender = self._sender(msg.sender)
        page = await self.runtime.history(
            msg.agent,
            sender,
            after_seq=msg.after_seq,
            limit=msg.limit,
            include_archived=msg.include_archived,
        )
        history = History(
            id=msg.id,
            agent=msg.agent,
            sender=sender,
            title=page.title,
            cwd=page.cwd,
            entries=page.entries,
            last_seq=page.last_seq,
        )
        # A long history may not fit one frame: send the oldest entries that fit;
        # `last_seq` tells the client to page on with `after_seq`.
        codec = self.codec or JSON
        while len(history.entries) > 1 and len(codec.encode(history)) > self.max_frame_bytes:
            history.entries = history.entries[: len(history.entries) // 2]
        return history

    def _compact(self, msg: Compact, nursery: trio.Nursery) -> None:
        # Queued here and now, like a stream, so it keeps its place among them.
        try:
            job = self.runtime.compact(msg.agent, self._sender(msg.sender), msg.instructions)
        except RequestError as exc:
            self.send(Error(id=msg.id, code=exc.code, message=exc.message))
            return

        async def answer() -> Compacted:
            done = await self.runtime.compacted(job)
            return Compacted(
                id=msg.id,
                archive=done.archive,
                summary=done.summary,
                archived_entries=done.archived_entries,
            )

        self._call(nursery, msg.id, answer)

    async def _stats(self, msg: GetStats) -> Stats:
        stats = self.runtime.stats()
        online, watches = self.server.post_office.stats()
        tokens_in, tokens_out = await self.runtime.tokens()
        return Stats(
            id=msg.id,
            uptime_s=stats.uptime_s,
            connections=len(self.server.connections),
            conversations=stats.conversations,
            runs_in_flight=stats.runs_in_flight,
            runs_queued=stats.runs_queued,
            runs_total=stats.runs_total,
            subscriptions=stats.subscriptions,
            participants_online=online,
            watches=watches,
            webhooks=self.server.post_office.webhooks.backlog(),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            daemons=await self.runtime.daemons(),
        )

    async def _usage(self, msg: GetUsage) -> UsageTotals:
        items = await self.runtime.usage(agent=msg.agent, sender=msg.sender, since=msg.since)
        return UsageTotals(id=msg.id, items=items)

    async def _search(self, msg: SearchMemory) -> Memory:
        hits = await self.runtime.search_memory(msg.agent, msg.query, msg.limit)
        return Memory(id=msg.id, items=hits)

    def _post(self, msg: Post, nursery: trio.Nursery) -> None:
        # A connection's posts are stored in the order it sent them, as its streams'
        # runs are queued in theirs: each waits for the one before (the post office
        # stores one at a time anyway). Not paced: `posted` is small.
        before, done = self._last_post, trio.Event()
        self._last_post = done

        async def post() -> ServerMessage:
            try:
                await before.wait()
                return await answer_mail(self.server.post_office, self, msg)
            finally:
                done.set()

        self._call(nursery, msg.id, post)

    def _watch(self, msg: Watch, nursery: trio.Nursery) -> None:
        watch = MailWatch(self, msg.id, self.runtime.config.daemon.subscription_events)
        self.handles[msg.id] = watch

        async def start() -> None:
            try:
                watch.watcher, cursor = await self.server.post_office.watch(
                    msg.reader,
                    watch.deliver,
                    watch.update if msg.updates else None,
                    watch.room,
                    watch.read if msg.reads else None,
                )
                if msg.after is not None:
                    self.server.post_office.check_cursor(msg.after)
            except (RequestError, StorageError) as exc:
                watch.drop()
                code, text = (
                    (exc.code, exc.message)
                    if isinstance(exc, RequestError)
                    else (500, f"Storage failed: {exc}")
                )
                if self.handles.pop(msg.id, None) is not None:
                    self.send(Error(id=msg.id, code=code, message=text))
                return
            if watch._end is not None:  # cancelled while it started
                watch.drop()
                return
            self.send(Watching(id=msg.id, cursor=cursor))
            await watch.forward(watch.watcher.name, msg.after, cursor)

        nursery.start_soon(start)

    async def _list(self, msg: ListConversations) -> Conversations:
        items, cursor = await self.runtime.list_conversations(
            agent=msg.agent,
            sender=msg.sender,
            limit=msg.limit,
            cursor=msg.cursor,
            query=msg.query,
        )
        return Conversations(id=msg.id, items=items, next_cursor=cursor)


def _text_bytes(msg: Request) -> int:
    """The size of the free text a request carries, in UTF-8 bytes."""
    match msg:
        case (
            Stream(content=text)
            | ReplyToAsk(content=text)
            | SearchMemory(query=text)
            | Post(content=text)
            | Edit(content=text)
        ):
            return len(text.encode())
        case Compact(instructions=str(text)):
            return len(text.encode())
    return 0


class Server:
    """Accepts clients on a Unix socket and serves each on its own `Connection`."""

    def __init__(self, runtime: Runtime, *, max_connections: int | None = None) -> None:
        self.runtime = runtime
        self.post_office = PostOffice(runtime, runtime.storage.mail)
        # Fewer than configured when the open file limit cannot hold that many.
        self.max_connections = max_connections or runtime.config.daemon.max_connections
        self.connections: set[Connection] = set()
        self.shutting_down = False
        self._numbers = itertools.count(1)
        allowed = runtime.config.daemon.allowed_uids
        self._allowed_uids = {os.getuid(), *allowed}
        self.tokens = Tokens(runtime.config.tokens)
        self._allow_descendants = runtime.config.daemon.allow_descendants

    async def accept(
        self, listener: trio.abc.Listener[trio.abc.Stream], *, tcp: bool = False
    ) -> None:
        """Serve every client ``listener`` accepts; ``tcp``: a TCP (or TLS) listener."""
        short_since: float | None = None  # when accepting began to fail for want of a resource
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                except OSError as exc:
                    if exc.errno not in _OUT_OF_CAPACITY:
                        raise  # not a shortage that passes: fail loudly
                    # Out of descriptors or memory for now: keep serving who we have,
                    # and say so once, not at every retry.
                    if short_since is None:
                        short_since = trio.current_time()
                        log.warning("accept_failed", error=str(exc))
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                if short_since is not None:
                    log.info("accept_resumed", after_s=round(trio.current_time() - short_since, 1))
                    short_since = None
                nursery.start_soon(partial(self.handle, stream, tcp=tcp))

    async def handle(self, stream: trio.abc.Stream, *, tcp: bool = False) -> None:
        """Serve one client on its own `Connection`, until it is done.

        ``stream`` is an accepted socket, or any trio stream (the tests serve
        `trio.testing.memory_stream_pair` this way, in process).
        """
        number = next(self._numbers)
        structlog.contextvars.bind_contextvars(conn=number)
        peer = None if tcp else peer_credentials(stream)
        if peer is not None and peer.uid not in self._allowed_uids:
            log.warning("peer_refused", uid=peer.uid)
            refusal = Error(
                id=None, code=401, message="This daemon serves only its own user's processes."
            )
            await self._refuse(stream, refusal)
            return
        if peer is not None and await self._is_descendant(peer):
            # A command an agent runs could otherwise read every conversation here,
            # whatever the agent's memory_scope.
            log.warning("descendant_refused", pid=peer.pid)
            refusal = Error(
                id=None,
                code=401,
                message="This daemon does not serve the processes its own commands start; "
                "set [daemon] allow_descendants = true to let them in.",
            )
            await self._refuse(stream, refusal)
            return
        limit = self.max_connections
        if len(self.connections) >= limit:
            log.warning("connection_refused", connections=len(self.connections))
            refusal = Error(
                id=None,
                code=503,
                message=f"The daemon already serves {limit} connections, its max_connections; "
                "retry once one closes.",
            )
            await self._refuse(stream, refusal)
            return
        conn = Connection(self, stream, number, tcp=tcp)
        self.connections.add(conn)
        log.debug("client_connected")
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            log.debug("client_disconnected")

    async def _is_descendant(self, peer: PeerCredentials) -> bool:
        """Whether the peer is a process this daemon started, or one of theirs. Only the
        daemon's own user's are looked at: another user's are let in or refused by
        allowed_uids alone."""
        if self._allow_descendants or peer.uid != os.getuid() or peer.pid == 0:
            return False  # pid 0: a pid namespace this daemon cannot see, none of its own
        return await trio.to_thread.run_sync(descends_from, peer.pid, os.getpid())

    async def _refuse(self, stream: trio.abc.Stream, refusal: Error) -> None:
        """Send one connection-level error (JSON, before any hello) and close."""
        with trio.move_on_after(FLUSH_TIMEOUT_S):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(JSON.encode_frame(refusal))
                # Let the peer read the refusal: closing on its unread hello would reset it.
                if isinstance(stream, trio.abc.HalfCloseableStream):  # TLS has no half-close
                    await stream.send_eof()
                while await stream.receive_some(READ_CHUNK):
                    pass
        await trio.aclose_forcefully(stream)

    async def close_connections(self) -> None:
        """At shutdown: flush every client's queued frames, then close them."""
        conns = list(self.connections)
        for conn in conns:
            conn.finish()
        with trio.move_on_after(FLUSH_TIMEOUT_S):
            for conn in conns:
                await conn.done.wait()


class PeerCredentials(NamedTuple):
    pid: int
    uid: int


def peer_credentials(stream: trio.abc.Stream) -> PeerCredentials | None:
    """The connecting process (SO_PEERCRED), where the platform and stream tell it."""
    if not hasattr(socket, "SO_PEERCRED") or not isinstance(stream, trio.SocketStream):
        return None
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return PeerCredentials(pid=pid, uid=uid)


# The generations walked up from a peer to find the daemon among its ancestors.
MAX_GENERATIONS = 256


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` descends from ``ancestor``, by the parents /proc shows.

    Blocking (it reads /proc). What cannot be told counts as a descendant: a peer
    gone since it connected may have handed its socket to a child of its own (which
    a command can do to hide where it comes from), and a chain longer than
    ``MAX_GENERATIONS`` is one a command can build on purpose. Without /proc
    (not Linux), nothing can be told and nobody counts as one.
    """
    if not os.path.exists("/proc/self/stat"):
        return False
    for _ in range(MAX_GENERATIONS):
        try:
            pid = int(stat_fields(pid)[1])
        except OSError:
            return True
        if pid == ancestor:
            return True
        if pid <= 1:  # init (or the kernel): the chain ends without the daemon
            return False
    return True


SD_LISTEN_FDS_START = 3  # systemd's first passed file descriptor


def inherited_listener() -> trio.SocketListener | None:
    """The listening Unix socket systemd passed (socket activation), or None.

    Follows sd_listen_fds(3): ``LISTEN_PID`` must be this process and
    ``LISTEN_FDS`` 1. The variables leave the environment either way, so no
    child process (a `run_command`) takes the socket for its own.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or count is None:
        return None
    if count != "1":
        raise ServeError(
            f"systemd passed {count} sockets; chinwag listens on one (one ListenStream=)."
        )
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ServeError(f"The socket systemd passed is unusable: {exc.strerror}.") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ServeError("The socket systemd passed is not a Unix stream socket.")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ServeError(
            "The socket systemd passed is a connection, not a listener: use Accept=no."
        )
    sock.set_inheritable(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def bind_unix(path: Path) -> trio.SocketListener:
    """Listen on ``path``: a 0600 socket; its directory created 0700 if missing.

    A socket file left by a dead daemon is replaced; one a live daemon answers
    on is not (``ServeError``).
    """
    stale = await trio.to_thread.run_sync(_prepare_socket_path, path)
    if stale:
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ServeError(f"Cannot check the socket {path}: {exc.strerror}.") from exc
            os.unlink(path)  # stale: its daemon is gone
        else:
            raise ServeError(f"A daemon is already listening on {path}.")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ServeError(f"Cannot listen on {path}: {exc.strerror}.") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(4096)  # the kernel caps it at net.core.somaxconn
    return trio.SocketListener(sock)


def _prepare_socket_path(path: Path) -> bool:
    """Create the socket's directory; True when a socket file is already there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ServeError(f"{path} exists and is not a socket; remove it or pick another path.")
    return True
