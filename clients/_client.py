"""The Python client library: one connection to the daemon, many requests over it.

Written against anyio, so it runs under asyncio and under trio. One reader task
in the connection's own task group decodes every frame and hands it, by `id`,
to the memory object stream of the request it answers; writes go out behind a
lock. Nothing here knows the daemon's internals: only PROTOCOL.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, NamedTuple, TypeVar, cast, overload
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from chinwag.protocol import (
    PROTOCOL_VERSION,
    AgentItem,
    Agents,
    Attach,
    Cancel,
    Codec,
    Compact,
    Compacted,
    ConversationItem,
    Conversations,
    Delete,
    Edit,
    Encoding,
    End,
    Entry,
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
    LockHolder,
    LockMode,
    LockResult,
    Locks,
    Mail,
    MailContext,
    MailFormat,
    MailItem,
    MailMessage,
    MailRead,
    MailUpdate,
    MarkRead,
    Members,
    Memory,
    MemoryHit,
    MessageReply,
    Messages,
    Ok,
    Participant,
    ParticipantKind,
    Participants,
    Pin,
    Ping,
    Pong,
    Post,
    Posted,
    Project,
    ProjectCreate,
    ProjectDelete,
    ProjectGet,
    ProjectReply,
    Projects,
    ProjectUpdate,
    ProtocolError,
    QueuePolicy,
    React,
    Ref,
    Register,
    Registered,
    ReplyToAsk,
    Request,
    SearchMail,
    SearchMemory,
    Sent,
    ServerMsg,
    Session,
    Space,
    SpaceArchive,
    SpaceCreate,
    SpaceInvite,
    SpaceJoin,
    SpaceLeave,
    SpaceMember,
    SpaceMembers,
    SpaceReply,
    Spaces,
    Stats,
    Stream,
    StreamEvent,
    StreamEventMsg,
    Subscribe,
    Subscribed,
    Unlock,
    UsageTotal,
    UsageTotals,
    Watch,
    Watching,
    Welcome,
    codec_for,
    default_socket_path,
    is_loopback,
)

__all__ = [
    "STREAM_BUFFER",
    "ChinwagError",
    "Client",
    "ConnectionLost",
    "EventStream",
    "MailWatch",
    "Subscription",
    "connect",
    "wait_for_socket",
]

#: How many frames a streaming request buffers for a consumer that has not
#: read them yet. A consumer further behind than this loses the request (it is
#: detached and raises ``ChinwagError`` 429, as the daemon does to a subscriber
#: that falls behind) rather than stalling the whole connection.
STREAM_BUFFER = 10_000

#: The additions to protocol v1 this client asks for in `hello`.
CLIENT_FEATURES = ("compaction", "mail")

_READ_CHUNK = 65_536
_MAX_INCOMING_FRAME = (1 << 32) - 1
# How long leaving a stream early waits for the daemon to confirm the detach.
_DETACH_TIMEOUT_S = 5.0
# How long closing waits for the reader to see the socket shut down.
_STOP_READER_TIMEOUT_S = 2.0

_Item = TypeVar("_Item")  # what a MailWatch yields
_R = TypeVar("_R", bound=msgspec.Struct)
_StrPath = str | PathLike[str]


class ChinwagError(Exception):
    """The daemon refused a request, or the connection failed.

    ``code`` follows PROTOCOL.md (HTTP-like: 404 unknown agent or conversation,
    409 conflict, ...); ``message`` is one sentence saying what went wrong.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class ConnectionLost(ChinwagError):
    """The connection to the daemon ended while requests were open.

    Raised from every pending request and open stream when the reader stops,
    and from every request made afterwards. The code is 503.
    """

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


class DaemonUnreachable(ConnectionLost):
    """Nothing answers on the daemon's socket; the message says why, and what to do."""

    @classmethod
    def nobody_at(cls, path: Path | str) -> DaemonUnreachable:
        return cls(f'no daemon is listening on {path}; start one with "chinwag serve"')


def _again(error: ChinwagError) -> ChinwagError:
    """A fresh copy of an error shared by many requests, so that each raise has
    its own traceback."""
    if isinstance(error, ConnectionLost):
        return ConnectionLost(error.message)
    return ChinwagError(error.code, error.message)


@dataclass(eq=False)
class _Pending:
    """One open request: where the reader puts its frames."""

    send: MemoryObjectSendStream[ServerMsg]
    receive: MemoryObjectReceiveStream[ServerMsg]
    # Set when the request ends other than by its terminal frame; the consumer
    # sees it after draining what was already buffered.
    error: ChinwagError | None = field(default=None)

    def fail(self, error: ChinwagError) -> None:
        if self.error is None:
            self.error = error
        self.send.close()

    async def next(self) -> ServerMsg:
        try:
            # What is buffered comes without a scheduling round per frame, so a
            # consumer drains a burst as fast as the reader buffers it.
            return self.receive.receive_nowait()
        except anyio.WouldBlock:
            pass
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self.error is None:
                raise ConnectionLost("The request ended without a reply.") from None
            raise _again(self.error) from None
        try:
            return await self.receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self.error is None:
                raise ConnectionLost("The request ended without a reply.") from None
            raise _again(self.error) from None


class Client:
    """One connection to the daemon. Make it with ``connect``, not directly."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        codec: Codec,
        welcome: Welcome,
        session: Session,
        decoder: FrameDecoder,
        task_group: anyio.abc.TaskGroup,
    ) -> None:
        self.welcome = welcome
        self.codec = codec
        # The protocol's state (open ids, which frame ends which request) is the
        # session's; `_pending` only says where each open request's frames go.
        self._session = session
        self._stream = stream
        self._decoder = decoder
        self._task_group = task_group
        self._write_lock = anyio.Lock()
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._closed: ChinwagError | None = None
        self._reader_done = anyio.Event()

    # --- plumbing -------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection has ended (the reader stopped)."""
        return self._closed is not None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _open(self, streaming: bool) -> tuple[int, _Pending]:
        if self._closed is not None:
            raise _again(self._closed)
        request_id = self._new_id()
        buffer = STREAM_BUFFER if streaming else 1
        send, receive = anyio.create_memory_object_stream[ServerMsg](buffer)
        pending = _Pending(send, receive)
        self._pending[request_id] = pending
        return request_id, pending

    def _forget(self, request_id: int, pending: _Pending) -> None:
        """Stop listening to a request: later frames for its id are dropped."""
        if self._pending.get(request_id) is pending:
            del self._pending[request_id]
        pending.send.close()
        pending.receive.close()

    async def _send(self, msg: Request) -> None:
        if self._closed is not None:
            raise _again(self._closed)
        data = self.codec.encode_frame(msg)
        if len(data) - 4 > self.welcome.max_frame_bytes:
            raise ChinwagError(
                413,
                f"The request is {len(data) - 4} bytes, over the daemon's limit of "
                f"{self.welcome.max_frame_bytes}; send less at once.",
            )
        self._session.send_request(msg)
        # Shielded: a write cut short by cancellation would leave half a frame
        # on the socket and break every other request on this connection.
        with anyio.CancelScope(shield=True):
            async with self._write_lock:
                try:
                    await self._stream.send(bytes(data))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    lost = ConnectionLost(f"The connection to the daemon broke: {exc or 'closed'}.")
                    self._shutdown(lost)
                    raise lost from exc

    async def _request(self, build: Callable[[int], Request], reply_type: type[_R]) -> _R:
        request_id, pending = self._open(streaming=False)
        try:
            await self._send(build(request_id))
            msg = await pending.next()
        finally:
            self._forget(request_id, pending)
        return _expect(msg, reply_type)

    async def _read(self) -> None:
        """The reader task: every frame from the daemon goes through here.

        It is never cancelled; ``_stop_reader`` ends it by shutting the socket
        down. On asyncio, cancelling a receive pending on a Unix socket races
        with the socket turning readable in the same loop iteration, and anyio
        then sets the result of a cancelled future: the loop logs an
        ``InvalidStateError`` traceback (seen when the daemon closes the
        connection just as the client leaves).
        """
        reason: ChinwagError = ConnectionLost("The daemon closed the connection.")
        try:
            while True:
                try:
                    with anyio.CancelScope(shield=True):
                        data = await self._stream.receive(_READ_CHUNK)
                except anyio.EndOfStream:
                    break
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    reason = ConnectionLost(f"The connection to the daemon broke: {exc}.")
                    break
                self._decoder.feed(data)
                for body in self._decoder:
                    self._dispatch(body)
        except ProtocolError as exc:
            reason = ConnectionLost(f"The daemon broke the protocol: {exc.message}")
        finally:
            self._shutdown(reason)
            self._reader_done.set()

    async def _stop_reader(self) -> None:
        """Shut the socket down and wait for the reader to see its end."""
        with anyio.CancelScope(shield=True):
            raw = self._stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
            if raw is not None:
                with contextlib.suppress(OSError):  # already disconnected
                    raw.shutdown(socket.SHUT_RDWR)
            with anyio.move_on_after(_STOP_READER_TIMEOUT_S):
                await self._reader_done.wait()
                return
            # Still blocked: closing the stream wakes a pending receive.
            await self._stream.aclose()
            await self._reader_done.wait()

    def _dispatch(self, body: bytes) -> None:
        try:
            msg = self.codec.decode_server(body)
        except ProtocolError as exc:
            if isinstance(exc.__cause__, msgspec.ValidationError):
                # Well framed but not a message this client knows (a newer
                # daemon's addition): skip it, the framing is intact.
                return
            raise
        terminal = self._session.receive_reply(msg)  # ProtocolError: the daemon broke it
        request_id = getattr(msg, "id", None)
        if request_id is None:
            if isinstance(msg, Error):
                # A connection-level error concerns every open request.
                error = ChinwagError(msg.code, msg.message)
                for open_request in list(self._pending.values()):
                    open_request.fail(error)
                self._pending.clear()
            return
        pending = self._pending.get(request_id)
        if pending is None:
            return  # a request this client stopped listening to
        try:
            pending.send.send_nowait(msg)
        except anyio.WouldBlock:
            self._overflow(request_id, pending)
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._pending.pop(request_id, None)
            return
        if terminal:
            self._pending.pop(request_id, None)
            pending.send.close()

    def _overflow(self, request_id: int, pending: _Pending) -> None:
        self._pending.pop(request_id, None)
        pending.fail(
            ChinwagError(
                429,
                f"The consumer fell more than {STREAM_BUFFER} frames behind request "
                f"{request_id}, so the client detached it; read events as they come.",
            )
        )
        self._task_group.start_soon(self._detach_quietly, request_id)

    async def _detach_quietly(self, request_id: int) -> None:
        with anyio.move_on_after(_DETACH_TIMEOUT_S, shield=True):
            # ChinwagError: already ended, or the connection is gone: nothing to detach.
            with contextlib.suppress(ChinwagError):
                await self.cancel(request_id)

    def _shutdown(self, reason: ChinwagError) -> None:
        if self._closed is None:
            self._closed = reason
        for pending in list(self._pending.values()):
            pending.fail(self._closed)
        self._pending.clear()

    # --- streaming requests ------------------------------------------------

    def stream(
        self,
        agent: str,
        content: str,
        *,
        sender: str | None = None,
        guest: str | None = None,
        cwd: str | None = None,
        queue: QueuePolicy = "enqueue",
    ) -> EventStream:
        """Run a turn: ``async with c.stream(...) as events: async for ev in events``.

        Yields the run's stream events up to and including its ``End``. Leaving
        the block before the ``End`` detaches (the run goes on in the daemon).
        An ``error`` frame answering the request raises ``ChinwagError``.
        """
        return EventStream(
            self,
            lambda rid: Stream(
                id=rid,
                agent=agent,
                content=content,
                sender=sender,
                guest=guest,
                cwd=cwd,
                queue=queue,
            ),
        )

    def attach(self, agent: str, sender: str | None = None) -> EventStream:
        """Follow the conversation's run in flight, replayed from its ``start``.

        Ends with ``End`` status ``idle`` when nothing is running.
        """
        return EventStream(self, lambda rid: Attach(id=rid, agent=agent, sender=sender))

    def subscribe(self, agent: str | None = None, sender: str | None = None) -> Subscription:
        """Watch every matching run: ``async with c.subscribe() as sub: async for ev in sub``.

        Entering waits for the daemon's ``subscribed``, so runs started after
        that are seen. Yields ``Event`` frames until the block exits (then
        cancels the subscription).
        """
        return Subscription(self, lambda rid: Subscribe(id=rid, agent=agent, sender=sender))

    # --- single-reply requests ---------------------------------------------

    async def kill(self, agent: str, sender: str | None = None, *, all: bool = False) -> Killed:
        """Kill the conversation's run in flight (and, with ``all``, what is queued).

        The reply comes after the ``end`` of every run it killed; its ``run_id``
        is None when nothing was running.
        """
        return await self._request(
            lambda rid: Kill(id=rid, agent=agent, sender=sender, all=all), Killed
        )

    async def reply_to_ask(
        self, agent: str, content: str, *, sender: str | None = None, ask_id: str | None = None
    ) -> None:
        """Answer the conversation's pending ``ask_user``."""
        await self._request(
            lambda rid: ReplyToAsk(
                id=rid, agent=agent, content=content, sender=sender, ask_id=ask_id
            ),
            Ok,
        )

    async def history(
        self,
        agent: str,
        sender: str | None = None,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        include_archived: bool = False,
    ) -> History:
        """One page of the conversation's entries with ``seq > after_seq``, oldest first.

        Without ``limit`` the daemon picks the page (200 entries at most, fewer
        when they would not fit one frame); ``iter_history`` reads them all.
        """
        return await self._request(
            lambda rid: GetHistory(
                id=rid,
                agent=agent,
                sender=sender,
                after_seq=after_seq,
                limit=limit,
                include_archived=include_archived,
            ),
            History,
        )

    async def iter_history(
        self,
        agent: str,
        sender: str | None = None,
        *,
        after_seq: int = 0,
        include_archived: bool = False,
        page_size: int = 200,
    ) -> AsyncGenerator[Entry, None]:
        """Every entry with ``seq > after_seq``, oldest first, read ``page_size`` at a time.

        Each page asks for the entries after the last one seen, until that one
        is the reply's ``last_seq``. Entries are compared by seq, never counted:
        a page may come back shorter than asked (the daemon cuts a history to
        fit a frame), and entries before the latest compact marker are skipped
        unless ``include_archived``.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        while True:
            page = await self.history(
                agent,
                sender,
                after_seq=after_seq,
                limit=page_size,
                include_archived=include_archived,
            )
            for entry in page.entries:
                yield entry
            if not page.entries or page.entries[-1].seq >= page.last_seq:
                return
            after_seq = page.entries[-1].seq

    async def list_conversations(
        self,
        agent: str | None = None,
        sender: str | None = None,
        *,
        limit: int = 100,
        cursor: str | None = None,
        query: str | None = None,
    ) -> Conversations:
        """One page of conversations, most recently updated first.

        With ``query``, only those whose title or sender contains it, casefolded (the
        daemon's ``conversation_search`` feature; a daemon without it is refused here,
        501, rather than asked: it would list every conversation).
        """
        if query is not None and "conversation_search" not in self.welcome.features:
            raise ChinwagError(
                501, "The daemon cannot search conversations; upgrade it to search them."
            )
        return await self._request(
            lambda rid: ListConversations(
                id=rid, agent=agent, sender=sender, limit=limit, cursor=cursor, query=query
            ),
            Conversations,
        )

    async def iter_conversations(
        self,
        agent: str | None = None,
        sender: str | None = None,
        *,
        page_size: int = 100,
        query: str | None = None,
    ) -> AsyncIterator[ConversationItem]:
        """Every matching conversation, following ``next_cursor`` page by page."""
        cursor: str | None = None
        while True:
            page = await self.list_conversations(
                agent, sender, limit=page_size, cursor=cursor, query=query
            )
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list_agents(self) -> list[AgentItem]:
        """The agents the daemon hosts."""
        reply = await self._request(lambda rid: ListAgents(id=rid), Agents)
        return reply.items

    async def compact(
        self, agent: str, sender: str | None = None, *, instructions: str | None = None
    ) -> Compacted:
        """Summarize the conversation into an archive; queued behind its runs."""
        return await self._request(
            lambda rid: Compact(id=rid, agent=agent, sender=sender, instructions=instructions),
            Compacted,
        )

    async def search_memory(self, agent: str, query: str, *, limit: int = 10) -> list[MemoryHit]:
        """The agent's notes and archives matching ``query``, best first."""
        reply = await self._request(
            lambda rid: SearchMemory(id=rid, agent=agent, query=query, limit=limit), Memory
        )
        return reply.items

    async def cancel(self, target_id: int) -> None:
        """Detach this connection's open stream, attach or subscribe ``target_id``.

        Its ``End`` (status ``detached``) arrives on the target before this
        returns. Never kills a run. ``ChinwagError`` 404 if it is not open.
        """
        await self._request(lambda rid: Cancel(id=rid, target=target_id), Ok)

    async def ping(self) -> None:
        """Round trip to the daemon."""
        await self._request(lambda rid: Ping(id=rid), Pong)

    async def stats(self) -> Stats:
        """The daemon's counters."""
        return await self._request(lambda rid: GetStats(id=rid), Stats)

    async def usage(
        self, agent: str | None = None, sender: str | None = None, *, since: str | None = None
    ) -> list[UsageTotal]:
        """The stored token totals, one per conversation and UTC day, by day, then agent,
        then sender; only ``agent``'s and ``sender``'s when given, and only the days from
        ``since`` on: a duration back from now (``12h``, ``7d``) or a day (``2026-12-01``)."""
        reply = await self._request(
            lambda rid: GetUsage(id=rid, agent=agent, sender=sender, since=since), UsageTotals
        )
        return reply.items

    # --- mail ---------------------------------------------------------------------
    #
    # Agents and people writing to each other (docs/protocol.md section 14). The
    # acting name is the first argument: `from` of a post, `as` of a read.

    async def register(
        self,
        name: str,
        *,
        kind: ParticipantKind = "session",
        roles: Iterable[str] = (),
        info: Mapping[str, Any] | None = None,
        takeover: bool = False,
    ) -> Participant:
        """Announce ``name`` as a participant for as long as this connection lives.

        ``ChinwagError`` 409 when another live session holds the name (unless
        ``takeover``), or when it is a hosted agent's.
        """
        reply = await self._request(
            lambda rid: Register(
                id=rid,
                name=name,
                kind=kind,
                roles=list(roles),
                info=dict(info or {}),
                takeover=takeover,
            ),
            Registered,
        )
        return reply.participant

    async def heartbeat(self, name: str, status: str | None = None) -> None:
        """Refresh ``name``'s presence, and set its status line when ``status`` is given."""
        await self._request(lambda rid: Heartbeat(id=rid, name=name, status=status), Ok)

    async def participants(
        self, *, online_only: bool = False, role: str | None = None
    ) -> list[Participant]:
        """Everyone with a mail address, by name, with presence, status and unread count."""
        reply = await self._request(
            lambda rid: ListParticipants(id=rid, online_only=online_only, role=role),
            Participants,
        )
        return reply.items

    async def post(
        self,
        sender: str,
        content: str,
        *,
        to: str | Iterable[str] = (),
        format: MailFormat = "markdown",
        structured: Any = None,
        priority: int = 1,
        channel: str | None = None,
        reply_to: str | None = None,
        scopes: Iterable[Ref | str] = (),
        refs: Iterable[Ref | str] = (),
        metadata: Mapping[str, Any] | None = None,
        mentions: Iterable[str] = (),
        idempotency_key: str | None = None,
    ) -> Posted:
        """Send one message from ``sender``; returns once it is durably stored.

        ``to`` holds names, ``@role``s, ``@everyone`` (one string is one
        recipient); it may be empty only for a reply, which then goes to the
        parent's author. ``scopes`` and ``refs`` are ``Ref``s or ``"type:value"``
        strings (``ValueError`` for a string without both halves).
        """
        recipients = [to] if isinstance(to, str) else list(to)
        about = [_ref(item) for item in scopes]
        pointing = [_ref(item) for item in refs]
        return await self._request(
            lambda rid: Post(
                id=rid,
                sender=sender,
                content=content,
                to=recipients,
                format=format,
                structured=structured,
                priority=priority,
                channel=channel,
                reply_to=reply_to,
                scopes=about,
                refs=pointing,
                metadata=dict(metadata or {}),
                mentions=list(mentions),
                idempotency_key=idempotency_key,
            ),
            Posted,
        )

    async def inbox(
        self,
        reader: str,
        *,
        unread_only: bool = False,
        mentions_only: bool = False,
        thread_id: str | None = None,
        channel: str | None = None,
        scope: str | None = None,
        priority_min: int = 0,
        since: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        mark_read: bool = False,
        pinned_only: bool = False,
        space: str | None = None,
        project: str | None = None,
        include_deleted: bool = False,
    ) -> Messages:
        """One page of ``reader``'s mail, newest first, each item with ``reader``'s state.

        ``scope`` is ``"type:value"``; ``since`` an RFC 3339 time or a duration
        back from now (``30m``, ``2h``, ``1d``). Pass ``next_cursor`` as
        ``cursor`` for the next page (``iter_inbox`` does). What it returns is
        ``delivered`` for ``reader`` from then on, ``read`` with ``mark_read``.
        With ``space``, the space's mail ``reader`` may read, received or not;
        ``project`` (default: ``reader``'s focus) narrows space mail to its spaces.
        Deleted mail is left out unless ``include_deleted``.
        """
        return await self._request(
            lambda rid: Inbox(
                id=rid,
                reader=reader,
                unread_only=unread_only,
                mentions_only=mentions_only,
                thread_id=thread_id,
                channel=channel,
                scope=scope,
                priority_min=priority_min,
                since=since,
                limit=limit,
                cursor=cursor,
                mark_read=mark_read,
                pinned_only=pinned_only,
                space=space,
                project=project,
                include_deleted=include_deleted,
            ),
            Messages,
        )

    async def iter_inbox(
        self,
        reader: str,
        *,
        unread_only: bool = False,
        mentions_only: bool = False,
        thread_id: str | None = None,
        channel: str | None = None,
        scope: str | None = None,
        priority_min: int = 0,
        since: str | None = None,
        mark_read: bool = False,
        page_size: int = 100,
    ) -> AsyncIterator[MailItem]:
        """Every matching message of ``reader``'s, newest first, following ``next_cursor``."""
        cursor: str | None = None
        while True:
            page = await self.inbox(
                reader,
                unread_only=unread_only,
                mentions_only=mentions_only,
                thread_id=thread_id,
                channel=channel,
                scope=scope,
                priority_min=priority_min,
                since=since,
                limit=page_size,
                cursor=cursor,
                mark_read=mark_read,
            )
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def sent(self, reader: str, *, limit: int = 50, cursor: str | None = None) -> Messages:
        """One page of what ``reader`` wrote, newest first, each item with its
        ``deliveries``: every recipient's state."""
        return await self._request(
            lambda rid: Sent(id=rid, reader=reader, limit=limit, cursor=cursor), Messages
        )

    async def thread(self, reader: str, thread_id: str) -> Messages:
        """The thread's messages ``reader`` wrote or received, oldest first (404: none)."""
        return await self._request(
            lambda rid: GetThread(id=rid, reader=reader, thread_id=thread_id), Messages
        )

    async def mark_read(
        self,
        reader: str,
        *,
        msg_ids: Iterable[str] | None = None,
        thread_id: str | None = None,
        space: str | None = None,
        all: bool = False,
    ) -> None:
        """Mark ``reader``'s copies read: these messages, this thread, this space's, or ``all``.

        Exactly one of the four (else ``ChinwagError`` 400).
        """
        ids = None if msg_ids is None else list(msg_ids)
        await self._request(
            lambda rid: MarkRead(
                id=rid, reader=reader, msg_ids=ids, thread_id=thread_id, space=space, all=all
            ),
            Ok,
        )

    async def get_message(self, reader: str, msg_id: str, *, history: bool = False) -> MessageReply:
        """One message, with ``reader``'s state; marks it read for ``reader``. With
        ``history``, its ``versions`` before each edit, oldest first.

        404 unless ``reader`` wrote or received it, or may read its space.
        """
        return await self._request(
            lambda rid: GetMessage(id=rid, reader=reader, msg_id=msg_id, history=history),
            MessageReply,
        )

    async def mail_context(self, reader: str) -> MailContext:
        """What ``reader`` needs at the start of a session: unread counts by
        priority, the threads with unread mail, and itself as a participant."""
        return await self._request(lambda rid: GetContext(id=rid, reader=reader), MailContext)

    @overload
    def watch(
        self,
        reader: str,
        *,
        after: str | None = None,
        updates: Literal[False] = False,
        reads: Literal[False] = False,
    ) -> MailWatch[MailMessage]: ...

    @overload
    def watch(
        self,
        reader: str,
        *,
        after: str | None = None,
        updates: Literal[True],
        reads: Literal[False] = False,
    ) -> MailWatch[MailMessage | MailUpdate]: ...

    @overload
    def watch(
        self, reader: str, *, after: str | None = None, updates: bool = False, reads: Literal[True]
    ) -> MailWatch[MailMessage | MailUpdate | MailRead]: ...

    def watch(
        self, reader: str, *, after: str | None = None, updates: bool = False, reads: bool = False
    ) -> MailWatch[Any]:
        """Follow ``reader``'s new mail: ``async with c.watch("ana") as mail: async for m in mail``.

        Entering waits for the daemon's ``watching``; its ``cursor`` is then the
        newest msg_id ``reader`` had received. With ``after`` (a msg_id, or an
        earlier watch's ``last_msg_id``) what came since is replayed first, so
        a reconnecting watcher sees each message once. With ``updates``, each
        edit, delete, reaction or pin of ``reader``'s mail comes too, as a
        ``MailUpdate``; with ``reads`` (a daemon offering the feature
        ``mail_read``), a ``MailRead`` names the msg_ids of ``reader``'s mail
        that became read, through any client. Leaving the block cancels the watch.
        """
        return MailWatch[Any](self, reader, after=after, updates=updates, reads=reads)

    # --- mail, part 2: changes, search, spaces, projects, focus, locks ---------------

    async def edit(
        self, sender: str, msg_id: str, content: str, *, structured: Any = None
    ) -> MailMessage:
        """Replace the text of ``sender``'s own message (403 for anyone else's); the
        earlier text stays readable as a version."""
        reply = await self._request(
            lambda rid: Edit(
                id=rid, sender=sender, msg_id=msg_id, content=content, structured=structured
            ),
            MessageReply,
        )
        return reply.message

    async def delete_message(
        self, sender: str, msg_id: str, *, reason: str | None = None
    ) -> MailMessage:
        """Delete ``sender``'s own message, softly: it stays, marked deleted."""
        reply = await self._request(
            lambda rid: Delete(id=rid, sender=sender, msg_id=msg_id, reason=reason), MessageReply
        )
        return reply.message

    async def react(
        self, sender: str, msg_id: str, emoji: str, *, remove: bool = False
    ) -> MailMessage:
        """Add (or ``remove``) ``sender``'s reaction to a message it may read."""
        reply = await self._request(
            lambda rid: React(id=rid, sender=sender, msg_id=msg_id, emoji=emoji, remove=remove),
            MessageReply,
        )
        return reply.message

    async def pin(self, sender: str, msg_id: str, *, unpin: bool = False) -> MailMessage:
        """Pin (or ``unpin``) a message; by its author or one of its recipients."""
        reply = await self._request(
            lambda rid: Pin(id=rid, sender=sender, msg_id=msg_id, unpin=unpin), MessageReply
        )
        return reply.message

    async def search_mail(
        self, reader: str, query: str, *, limit: int = 20, project: str | None = None
    ) -> Messages:
        """The mail ``reader`` may read that matches any word of ``query``, best first."""
        return await self._request(
            lambda rid: SearchMail(
                id=rid, reader=reader, query=query, limit=limit, project=project
            ),
            Messages,
        )

    async def space_create(
        self,
        sender: str,
        name: str,
        *,
        description: str = "",
        parent: str | None = None,
        project: str | None = None,
        private: bool = False,
    ) -> Space:
        """A new space, ``sender`` its first member (nesting 3 deep at most)."""
        reply = await self._request(
            lambda rid: SpaceCreate(
                id=rid,
                sender=sender,
                name=name,
                description=description,
                parent=parent,
                project=project,
                private=private,
            ),
            SpaceReply,
        )
        return reply.space

    async def space_join(self, sender: str, space: str) -> None:
        await self._request(lambda rid: SpaceJoin(id=rid, sender=sender, space=space), Ok)

    async def space_leave(self, sender: str, space: str) -> None:
        await self._request(lambda rid: SpaceLeave(id=rid, sender=sender, space=space), Ok)

    async def space_invite(self, sender: str, space: str, name: str) -> None:
        """Make ``name`` a member (the way into a private space); by a member."""
        await self._request(
            lambda rid: SpaceInvite(id=rid, sender=sender, space=space, name=name), Ok
        )

    async def space_archive(self, sender: str, space: str) -> None:
        await self._request(lambda rid: SpaceArchive(id=rid, sender=sender, space=space), Ok)

    async def space_members(self, space: str, *, reader: str | None = None) -> list[SpaceMember]:
        reply = await self._request(
            lambda rid: SpaceMembers(id=rid, space=space, reader=reader), Members
        )
        return reply.items

    async def spaces(
        self,
        *,
        reader: str | None = None,
        project: str | None = None,
        parent: str | None = None,
        top_level: bool = False,
        include_archived: bool = False,
    ) -> list[Space]:
        """The spaces ``reader`` may see, with member and message counts."""
        reply = await self._request(
            lambda rid: ListSpaces(
                id=rid,
                reader=reader,
                project=project,
                parent=parent,
                top_level=top_level,
                include_archived=include_archived,
            ),
            Spaces,
        )
        return reply.items

    async def project_create(self, sender: str, name: str, **fields: Any) -> Project:
        """A new project; ``fields`` are ``ProjectCreate``'s (description, path, tags...)."""
        reply = await self._request(
            lambda rid: ProjectCreate(id=rid, sender=sender, name=name, **fields), ProjectReply
        )
        return reply.project

    async def project_get(self, project: str) -> Project:
        reply = await self._request(lambda rid: ProjectGet(id=rid, project=project), ProjectReply)
        return reply.project

    async def projects(self, *, status: str | None = None, tag: str | None = None) -> list[Project]:
        reply = await self._request(
            lambda rid: ListProjects(id=rid, status=status, tag=tag), Projects
        )
        return reply.items

    async def project_update(self, sender: str, project: str, **fields: Any) -> Project:
        """Replace the ``fields`` given (description, path, tags, status...); keep the rest."""
        reply = await self._request(
            lambda rid: ProjectUpdate(id=rid, sender=sender, project=project, **fields),
            ProjectReply,
        )
        return reply.project

    async def project_delete(self, sender: str, project: str) -> None:
        """Forget a project (409 while a space refers to it)."""
        await self._request(lambda rid: ProjectDelete(id=rid, sender=sender, project=project), Ok)

    async def focus(self, reader: str, project: str | None) -> None:
        """Narrow ``reader``'s inbox, spaces and search to ``project``; None clears it."""
        await self._request(lambda rid: Focus(id=rid, reader=reader, project=project), Ok)

    async def lock(
        self,
        sender: str,
        resource: str,
        *,
        mode: LockMode = "exclusive",
        ttl_s: float = 300.0,
    ) -> LockResult:
        """Take or renew a lock; ``acquired`` False names the ``holders`` in the way."""
        return await self._request(
            lambda rid: Lock(id=rid, sender=sender, resource=resource, mode=mode, ttl_s=ttl_s),
            LockResult,
        )

    async def unlock(self, sender: str, resource: str) -> None:
        """Release ``sender``'s lock (403 when it holds none)."""
        await self._request(lambda rid: Unlock(id=rid, sender=sender, resource=resource), Ok)

    async def locks(
        self, *, resource: str | None = None, holder: str | None = None
    ) -> list[LockHolder]:
        reply = await self._request(
            lambda rid: ListLocks(id=rid, resource=resource, holder=holder), Locks
        )
        return reply.items


class _OpenRequest:
    """Shared by ``EventStream`` and ``Subscription``: one streaming request."""

    def __init__(self, client: Client, build: Callable[[int], Request]) -> None:
        self._client = client
        self._build = build
        self._id: int | None = None
        self._pending: _Pending | None = None
        self._finished = False

    @property
    def id(self) -> int:
        """The request's id on the connection (for ``Client.cancel``)."""
        if self._id is None:
            raise RuntimeError("the request has not been sent yet; enter its context first")
        return self._id

    async def _start(self) -> _Pending:
        if self._pending is None:
            self._id, self._pending = self._client._open(streaming=True)
            try:
                await self._client._send(self._build(self._id))
            except BaseException:
                self._finish()
                raise
        return self._pending

    def _finish(self) -> None:
        """The request is over: stop listening for its frames."""
        self._finished = True
        if self._id is not None and self._pending is not None:
            self._client._forget(self._id, self._pending)

    async def _next_frame(self) -> ServerMsg:
        pending = await self._start()
        try:
            msg = await pending.next()
        except ChinwagError:
            self._finish()
            raise
        if isinstance(msg, Error):
            self._finish()
            raise ChinwagError(msg.code, msg.message)
        return msg

    async def _opened(self, reply_type: type[_R]) -> _R:
        """The first frame of a long-lived request, which says it stands."""
        try:
            msg = await self._next_frame()
        except BaseException:
            await self._close()  # cancelled while waiting: still detach
            raise
        if not isinstance(msg, reply_type):
            self._finish()
            raise _unexpected(msg, f"`{reply_type.__struct_config__.tag}`")
        return msg

    async def _close(self) -> None:
        if self._finished or self._id is None:
            return
        self._finish()
        if self._client.closed:
            return
        # Shielded so that leaving on cancellation still detaches; bounded so
        # that a daemon that never answers cannot hold the caller forever.
        with anyio.move_on_after(_DETACH_TIMEOUT_S, shield=True):
            # ChinwagError: the request ended meanwhile, or the connection is gone.
            with contextlib.suppress(ChinwagError):
                await self._client.cancel(self._id)


class EventStream(_OpenRequest):
    """The events of one ``stream`` or ``attach`` request, ending with its ``End``.

    An async context manager and an async iterator. Leaving the context before
    the ``End`` sends ``cancel`` for the request (the run itself goes on).
    """

    async def __aenter__(self) -> EventStream:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StreamEventMsg:
        if self._finished:
            raise StopAsyncIteration
        msg = await self._next_frame()
        if isinstance(msg, End):
            self._finish()
        if not isinstance(msg, StreamEvent):
            self._finish()
            raise _unexpected(msg, "a stream event")
        return msg

    async def collect(self) -> list[StreamEventMsg]:
        """Every remaining event, up to and including the ``End``."""
        return [event async for event in self]


class _Feed(_OpenRequest):
    """A long-lived request's frames of one kind, until its `end` or the context exits."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _next_of(self, kind: type[_R], what: str) -> _R:
        """The next ``kind`` frame; StopAsyncIteration at the `end` (ChinwagError when it
        carries an error: the daemon dropped a consumer that fell behind)."""
        if self._finished:
            raise StopAsyncIteration
        msg = await self._next_frame()
        if isinstance(msg, End):  # detached by us, or dropped by the daemon
            self._finish()
            if msg.error is not None:
                raise ChinwagError(msg.error.code, msg.error.message)
            raise StopAsyncIteration
        if not isinstance(msg, kind):
            self._finish()
            raise _unexpected(msg, what)
        return msg


class Subscription(_Feed):
    """The ``Event`` frames of one ``subscribe`` request, until the context exits."""

    async def __aenter__(self) -> Subscription:
        await self._opened(Subscribed)
        return self

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self._next_of(Event, "an `event` frame")


class MailWatch(_Feed, Generic[_Item]):
    """The messages of one ``watch`` request, in msg_id order, until the context exits
    (and, when it was asked for ``updates``, each ``MailUpdate``; for ``reads``, each
    ``MailRead``).

    ``cursor`` is the daemon's ``watching`` cursor (the newest msg_id the reader
    had received when the watch began); ``last_msg_id`` moves on with every
    message yielded, and is what to pass as ``after`` to watch again without
    a gap or a repeat. A watch the daemon drops (it fell too far behind)
    raises ``ChinwagError`` 429.
    """

    def __init__(
        self,
        client: Client,
        reader: str,
        *,
        after: str | None,
        updates: bool = False,
        reads: bool = False,
    ) -> None:
        super().__init__(
            client,
            lambda rid: Watch(id=rid, reader=reader, after=after, updates=updates, reads=reads),
        )
        self._kinds: tuple[type, ...] = (
            Mail,
            *((MailUpdate,) if updates else ()),
            *((MailRead,) if reads else ()),
        )
        self._after = after
        self._cursor: str | None = None
        self._last: str | None = None

    @property
    def cursor(self) -> str | None:
        """The newest msg_id the reader had received before this watch began."""
        return self._cursor

    @property
    def last_msg_id(self) -> str | None:
        """The msg_id of the last message yielded, else ``cursor``, else ``after``."""
        return self._last

    async def __aenter__(self) -> MailWatch[_Item]:
        watching = await self._opened(Watching)
        self._cursor = watching.cursor
        # The replay starts after `after`; without one, what is pushed after the cursor.
        self._last = self._after if self._after is not None else watching.cursor
        return self

    def __aiter__(self) -> MailWatch[_Item]:
        return self

    async def __anext__(self) -> _Item:
        kinds: Any = self._kinds
        msg: Mail | MailUpdate | MailRead = await self._next_of(kinds, "a `mail` frame")
        if isinstance(msg, MailUpdate | MailRead):
            return cast(_Item, msg)
        self._last = msg.msg_id
        return cast(_Item, msg.message)


def _ref(item: Ref | str) -> Ref:
    """A scope or ref, given as a ``Ref`` or written ``type:value``."""
    if isinstance(item, Ref):
        return item
    kind, colon, value = item.partition(":")
    if not colon or not kind or not value:
        raise ValueError(f"a scope or ref is written type:value, such as pr:7; not {item!r}")
    return Ref(type=kind, value=value)


def _type_name(msg: msgspec.Struct) -> str:
    tag = msg.__struct_config__.tag
    return str(tag) if tag is not None else type(msg).__name__


def _unexpected(msg: msgspec.Struct, wanted: str) -> ChinwagError:
    return ChinwagError(
        500, f"The daemon answered with `{_type_name(msg)}` where {wanted} was expected."
    )


def _expect(msg: ServerMsg, reply_type: type[_R]) -> _R:
    if isinstance(msg, Error):
        raise ChinwagError(msg.code, msg.message)
    if not isinstance(msg, reply_type):
        raise _unexpected(msg, f"`{reply_type.__struct_config__.tag}`")
    return msg


async def _handshake(
    stream: anyio.abc.ByteStream,
    codec: Codec,
    client: str,
    session: Session,
    decoder: FrameDecoder,
    token: str | None = None,
) -> Welcome:
    greeting = Hello(
        protocol=PROTOCOL_VERSION, client=client, token=token, features=list(CLIENT_FEATURES)
    )
    session.send_request(greeting)
    hello = bytes(codec.encode_frame(greeting))
    # If the daemon hung up (or refused us first), what it said, if anything, is read below.
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(hello)
    while True:
        body = decoder.next_frame()
        if body is not None:
            break
        try:
            data = await stream.receive(_READ_CHUNK)
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            raise ConnectionLost("The daemon closed the connection during the handshake.") from exc
        decoder.feed(data)
    # An error before the encoding is settled may come as JSON whatever we sent.
    try:
        reply = codec_for(Encoding.of(body)).decode_server(body)
    except ProtocolError as exc:
        raise ConnectionLost(f"The daemon broke the protocol: {exc.message}") from exc
    if isinstance(reply, Error):
        raise ChinwagError(reply.code, reply.message)
    if not isinstance(reply, Welcome):
        raise _unexpected(reply, "`welcome`")
    session.receive_reply(reply)
    return reply


#: How long a daemon reached over TCP gets to answer the hello (TLS included) before the
#: next address is tried: a host the network lost, or a frozen daemon, never answers.
ANSWER_TIMEOUT_S = 10.0
_CONNECT_ATTEMPTS = 8  # while the daemon's accept backlog is full: 10 ms, 20 ms, ... 1.3 s


async def _connect_unix(path: Path) -> anyio.abc.SocketStream:
    """Connect, retrying while the listener's backlog is full.

    A non-blocking connect to a Unix socket whose backlog is full fails with
    EAGAIN, which the event loops take for "in progress": they return a socket
    that never connected. It is found by asking for the peer, and tried again.
    """
    for attempt in range(_CONNECT_ATTEMPTS):
        stream = await anyio.connect_unix(path)
        try:
            stream.extra(anyio.abc.SocketAttribute.raw_socket).getpeername()
        except OSError:
            await stream.aclose()
            await anyio.sleep(0.01 * 2**attempt)  # the daemon is busy accepting: back off
            continue
        return stream
    raise OSError(f"The daemon at {path} accepts no connection; its backlog stays full.")


@asynccontextmanager
async def connect_explained(path: Path | str, *, client: str) -> AsyncIterator[Client]:
    """``connect``, failing to reach the daemon as ``DaemonUnreachable`` (one sentence).

    Only a failure to connect is turned; what the block raises passes as it is.
    """
    connected = False
    try:
        async with connect(path, client=client) as conn:
            connected = True
            yield conn
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        if connected:
            raise
        raise DaemonUnreachable.nobody_at(path) from exc
    except OSError as exc:
        if connected:
            raise
        raise DaemonUnreachable(f"cannot connect to {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class Address:
    """Where a daemon listens: its Unix socket, or a TCP host and port (TLS unless ``tls``
    is False, which only a loopback host may be)."""

    path: Path | None = None
    host: str = ""
    port: int = 0
    tls: bool = True

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"chinwag+{'tls' if self.tls else 'tcp'}://{host}:{self.port}"


def addresses(target: _StrPath | None) -> list[Address]:
    """The daemons ``target`` names, in the order to try them: a socket path, or URLs
    separated by commas (``unix:///PATH``, ``chinwag+tls://HOST:PORT``,
    ``chinwag+tcp://HOST:PORT`` on a loopback host); None: ``default_socket_path()``.
    ``ValueError`` says what is wrong with one that is not."""
    if target is None:
        return [Address(path=default_socket_path())]
    text = str(target)
    if "://" not in text:
        return [Address(path=Path(text))]
    found = []
    for url in (part.strip() for part in text.split(",")):
        parts = urlsplit(url)
        if parts.scheme == "unix" and parts.path:
            found.append(Address(path=Path(parts.path)))
            continue
        if parts.scheme not in ("chinwag+tls", "chinwag+tcp"):
            raise ValueError(
                f"{url!r} is not a daemon's address: unix:///PATH, chinwag+tls://HOST:PORT "
                "or chinwag+tcp://HOST:PORT."
            )
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValueError(f"{url!r} names no host and port.")
        tls = parts.scheme == "chinwag+tls"
        if not tls and not is_loopback(parts.hostname):
            raise ValueError(
                f"{url!r}: plain TCP only to this machine (a loopback host); "
                "use chinwag+tls:// across the network."
            )
        found.append(Address(host=parts.hostname, port=port, tls=tls))
    return found


async def _open(address: Address, ca: str | None) -> anyio.abc.ByteStream:
    if address.path is not None:
        return await _connect_unix(address.path)
    if not address.tls:
        return await anyio.connect_tcp(address.host, address.port)
    context = ssl.create_default_context(cafile=ca)
    return await anyio.connect_tcp(
        address.host,
        address.port,
        ssl_context=context,
        tls_hostname=address.host,
        tls_standard_compatible=False,
    )


class _Reached(NamedTuple):
    stream: anyio.abc.ByteStream
    welcome: Welcome
    session: Session
    decoder: FrameDecoder


async def _reach(
    targets: list[Address], codec: Codec, client: str, token: str | None, ca: str | None
) -> _Reached:
    """The first of ``targets`` that answers the hello; each tried in turn, on a fresh
    session, a TCP one for ``ANSWER_TIMEOUT_S`` at most.

    A daemon that refuses the hello for good (401, 426: ``ChinwagError``) is the
    answer: the next is not tried; one going away (503) or silent is passed over. When
    none answers, one address's own error is raised as it came; several, one
    ``OSError`` naming each and why.
    """
    failures: list[tuple[Address, Exception]] = []
    for address in targets:
        on_tcp = address.path is None
        with anyio.move_on_after(ANSWER_TIMEOUT_S if on_tcp else math.inf) as waiting:
            try:
                stream = await _open(address, ca)
            except (OSError, anyio.BrokenResourceError) as exc:  # anyio's: closed mid-TLS
                failures.append((address, exc))
                continue
            # The daemon's `max_frame_bytes` bounds what it accepts; what it sends
            # (a long history) is only bounded by the 4-byte length, so be lenient.
            decoder = FrameDecoder(_MAX_INCOMING_FRAME)
            session = Session()
            try:
                welcome = await _handshake(
                    stream, codec, client, session, decoder, token if on_tcp else None
                )
            except ChinwagError as exc:
                await anyio.aclose_forcefully(stream)
                if exc.code != 503:
                    raise
                failures.append((address, exc))
                continue
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
            return _Reached(stream, welcome, session, decoder)
        if waiting.cancelled_caught:
            failures.append((address, TimeoutError(f"no answer within {ANSWER_TIMEOUT_S:g} s")))
    if len(failures) == 1:
        raise failures[0][1]
    reasons = "; ".join(f"{address}: {exc}" for address, exc in failures)
    raise OSError(f"No daemon answered: {reasons}.")


@asynccontextmanager
async def connect(
    path: _StrPath | None = None,
    *,
    client: str = "chinwag-python",
    encoding: Encoding = Encoding.MSGPACK,
    token: str | None = None,
    ca: str | None = None,
) -> AsyncIterator[Client]:
    """Connect to the daemon and say hello.

    ``path`` is the daemon's Unix socket, or URLs separated by commas, tried in order
    until one answers (see ``addresses``); None means ``default_socket_path()``. Over
    TCP the hello carries ``token`` (default ``$CHINWAG_TOKEN``), and TLS checks the
    daemon's certificate against the system's CAs, or the CA file ``ca`` (default
    ``$CHINWAG_CA``). Yields a ``Client`` whose ``welcome`` holds the daemon's
    greeting. Raises ``OSError`` when nothing answers, ``ValueError`` for an address
    that is not one, ``ChinwagError`` when the daemon refuses the hello. On exit the
    reader is cancelled and the connection closed; open streams then raise
    ``ConnectionLost``.
    """
    targets = addresses(path)
    token = token if token is not None else (os.environ.get("CHINWAG_TOKEN") or None)
    ca = ca if ca is not None else (os.environ.get("CHINWAG_CA") or None)
    codec = codec_for(encoding)
    stream, welcome, session, decoder = await _reach(targets, codec, client, token, ca)
    async with stream:
        body_error: BaseException | None = None
        unwrapped: BaseException | None = None
        try:
            async with anyio.create_task_group() as task_group:
                conn = Client(stream, codec, welcome, session, decoder, task_group)
                task_group.start_soon(conn._read)
                try:
                    yield conn
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    conn._shutdown(ConnectionLost("The connection was closed by this client."))
                    await conn._stop_reader()
                    task_group.cancel_scope.cancel()  # detaches still in flight
        except BaseExceptionGroup as group:
            # The caller's block runs inside our task group, which wraps what it
            # raises in a group; hand the caller back its own exception.
            if body_error is None or leaves(group) != [body_error]:
                raise
            unwrapped = body_error
        if unwrapped is not None:
            raise unwrapped


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions an exception group holds, at any depth; ``[exc]`` for any other."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


async def wait_for_socket(path: _StrPath) -> None:
    """Return once something accepts connections on ``path``.

    Polls until then; bound it with the caller's cancel scope
    (``with anyio.fail_after(10): await wait_for_socket(p)``). Each probe
    connection is closed at once (the daemon sees a client that left before
    its hello).
    """
    while True:
        try:
            probe = await anyio.connect_unix(Path(path))
        except OSError:
            await anyio.sleep(0.05)  # polling a socket file: there is no event to await
            continue
        await probe.aclose()
        return
