"""One end of a connection's session, sans-IO, in the manner of h11.

A `Session` is told of every message that crosses the wire, in both
directions, and keeps what the protocol says a connection must remember: the
handshake (`hello`, then `welcome`), the ids of the requests still open and
what each one asked, and which frame ends which request. The daemon's
connection and the client library both drive one; neither holds a copy of
these rules.

What the peer gets wrong raises ``ProtocolError`` (with the code and sentence
the peer is owed); what our own side gets wrong raises ``LocalProtocolError``,
a bug in the caller, never the peer's fault.
"""

from __future__ import annotations

from typing import Final

from ._errors import ProtocolError
from ._mail import (
    Delete,
    Edit,
    Focus,
    GetContext,
    GetMessage,
    GetThread,
    Heartbeat,
    Inbox,
    ListLocks,
    ListParticipants,
    ListProjects,
    ListSpaces,
    Lock,
    LockResult,
    Locks,
    Mail,
    MailContext,
    MailRead,
    MailUpdate,
    MarkRead,
    Members,
    MessageReply,
    Messages,
    Participants,
    Pin,
    Post,
    Posted,
    ProjectCreate,
    ProjectDelete,
    ProjectGet,
    ProjectReply,
    Projects,
    ProjectUpdate,
    React,
    Register,
    Registered,
    SearchMail,
    Sent,
    SpaceArchive,
    SpaceCreate,
    SpaceInvite,
    SpaceJoin,
    SpaceLeave,
    SpaceMembers,
    SpaceReply,
    Spaces,
    Unlock,
    Watch,
    Watching,
)
from ._messages import (
    FEATURES,
    PROTOCOL_VERSION,
    Agents,
    AskUser,
    Attach,
    Cancel,
    Compact,
    Compacted,
    Compaction,
    Conversations,
    End,
    Error,
    Event,
    GetHistory,
    GetStats,
    GetUsage,
    Hello,
    History,
    Kill,
    Killed,
    ListAgents,
    ListConversations,
    Memory,
    Ok,
    Ping,
    Pong,
    Queued,
    ReplyToAsk,
    Request,
    SearchMemory,
    ServerMessage,
    Start,
    Stats,
    Stream,
    Subscribe,
    Subscribed,
    TextDelta,
    ThinkingDelta,
    Title,
    ToolCall,
    ToolResult,
    Usage,
    UsageTotals,
    Welcome,
)
from ._unions import ClientMsg, ServerMsg


class LocalProtocolError(Exception):
    """Our own side tried to break the protocol: a bug in the caller, not the peer's doing."""


_EVENTS: Final = frozenset(
    {Queued, Start, TextDelta, ThinkingDelta, ToolCall, ToolResult, AskUser, Title, Usage}
    | {Compaction}
)

# For each request: the frames that may answer it before its end, and those that end it.
# `error` ends any request.
REPLIES: Final[dict[type[Request], tuple[frozenset[type], frozenset[type]]]] = {
    Stream: (_EVENTS, frozenset({End, Error})),
    Attach: (_EVENTS, frozenset({End, Error})),
    Subscribe: (frozenset({Subscribed, Event}), frozenset({End, Error})),
    Kill: (frozenset(), frozenset({Killed, Error})),
    Compact: (frozenset(), frozenset({Compacted, Error})),
    ReplyToAsk: (frozenset(), frozenset({Ok, Error})),
    GetHistory: (frozenset(), frozenset({History, Error})),
    ListConversations: (frozenset(), frozenset({Conversations, Error})),
    ListAgents: (frozenset(), frozenset({Agents, Error})),
    Cancel: (frozenset(), frozenset({Ok, Error})),
    Ping: (frozenset(), frozenset({Pong, Error})),
    GetStats: (frozenset(), frozenset({Stats, Error})),
    GetUsage: (frozenset(), frozenset({UsageTotals, Error})),
    SearchMemory: (frozenset(), frozenset({Memory, Error})),
    Register: (frozenset(), frozenset({Registered, Error})),
    Heartbeat: (frozenset(), frozenset({Ok, Error})),
    ListParticipants: (frozenset(), frozenset({Participants, Error})),
    Post: (frozenset(), frozenset({Posted, Error})),
    Inbox: (frozenset(), frozenset({Messages, Error})),
    Sent: (frozenset(), frozenset({Messages, Error})),
    GetThread: (frozenset(), frozenset({Messages, Error})),
    MarkRead: (frozenset(), frozenset({Ok, Error})),
    GetMessage: (frozenset(), frozenset({MessageReply, Error})),
    Watch: (frozenset({Watching, Mail, MailUpdate, MailRead}), frozenset({End, Error})),
    GetContext: (frozenset(), frozenset({MailContext, Error})),
    Edit: (frozenset(), frozenset({MessageReply, Error})),
    Delete: (frozenset(), frozenset({MessageReply, Error})),
    React: (frozenset(), frozenset({MessageReply, Error})),
    Pin: (frozenset(), frozenset({MessageReply, Error})),
    SearchMail: (frozenset(), frozenset({Messages, Error})),
    SpaceCreate: (frozenset(), frozenset({SpaceReply, Error})),
    SpaceJoin: (frozenset(), frozenset({Ok, Error})),
    SpaceLeave: (frozenset(), frozenset({Ok, Error})),
    SpaceInvite: (frozenset(), frozenset({Ok, Error})),
    SpaceArchive: (frozenset(), frozenset({Ok, Error})),
    SpaceMembers: (frozenset(), frozenset({Members, Error})),
    ListSpaces: (frozenset(), frozenset({Spaces, Error})),
    ProjectCreate: (frozenset(), frozenset({ProjectReply, Error})),
    ProjectGet: (frozenset(), frozenset({ProjectReply, Error})),
    ListProjects: (frozenset(), frozenset({Projects, Error})),
    ProjectUpdate: (frozenset(), frozenset({ProjectReply, Error})),
    ProjectDelete: (frozenset(), frozenset({Ok, Error})),
    Focus: (frozenset(), frozenset({Ok, Error})),
    Lock: (frozenset(), frozenset({LockResult, Error})),
    Unlock: (frozenset(), frozenset({Ok, Error})),
    ListLocks: (frozenset(), frozenset({Locks, Error})),
}
"""Which frames answer which request; every request type of ``ClientMsg`` has a row."""

_Row = tuple[type[Request], frozenset[type], frozenset[type]]
_ROWS: Final[dict[type, _Row]] = {
    kind: (kind, passing, ending) for kind, (passing, ending) in REPLIES.items()
}


class Session:
    """The protocol state of one connection, seen from one end.

    The daemon calls ``receive_request`` with every message it decodes and
    ``send_reply`` with every frame before it encodes it; the client calls
    ``send_request`` and ``receive_reply``. ``receive_request`` refuses
    (``ProtocolError``, ``fatal`` False but for a wrong protocol version) a
    second `hello`, a request before `hello`, an id still open, and a request
    past ``max_open``; the refused request is not opened, so its `error` goes
    out with ``refusal`` and touches no other request. On the client,
    ``receive_reply`` refuses a frame for no open request, or one its request
    cannot have. The terminal frame of a request closes its id, in either
    direction, and the id may then be used again.
    """

    def __init__(self, *, max_open: int | None = None) -> None:
        self.max_open = max_open
        self.hello_sent = False  # client: `hello` went out; server: it came in
        self.greeted = False  # `welcome` crossed the wire
        self.features: frozenset[str] = frozenset()  # the additions to v1 both ends want
        # request id -> what it asked, the frames that may answer it, those that end it
        self._open: dict[int, _Row] = {}

    @property
    def open_requests(self) -> int:
        return len(self._open)

    def is_open(self, request_id: int) -> bool:
        return request_id in self._open

    # --- what arrives ----------------------------------------------------------

    def receive_request(self, msg: ClientMsg) -> None:
        """Server: a client message arrived; opens its request, or raises ``ProtocolError``."""
        if type(msg) is Hello:
            self._hello(msg)
            return
        assert isinstance(msg, Request)
        rid = msg.id
        if not self.greeted:
            raise ProtocolError(400, "Say `hello` before any request.", request_id=rid, fatal=False)
        if rid in self._open:
            raise ProtocolError(
                400,
                f"The id {rid} belongs to a request still open; use another id.",
                request_id=rid,
                fatal=False,
            )
        if (
            self.max_open is not None
            and type(msg) is not Cancel
            and len(self._open) >= self.max_open
        ):
            raise ProtocolError(
                429,
                f"This connection has {self.max_open} requests open, the limit; "
                "wait for some to end.",
                request_id=rid,
                fatal=False,
            )
        self._open[rid] = _ROWS[type(msg)]

    def _hello(self, msg: Hello) -> None:
        if self.hello_sent:
            raise ProtocolError(400, "`hello` was already sent on this connection.", fatal=False)
        if msg.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                426,
                f"Protocol version {msg.protocol} is not supported; "
                f"this daemon speaks version {PROTOCOL_VERSION}.",
            )
        self.hello_sent = True
        self.features = frozenset(msg.features) & frozenset(FEATURES)

    def receive_reply(self, msg: ServerMsg) -> bool:
        """Client: a frame arrived; True when it ends its request (whose id is then free).

        A frame without an id (`welcome`, an `error` of the whole connection)
        returns False. ``ProtocolError`` when the daemon sent what no open
        request can have.
        """
        if type(msg) is Welcome:
            if not self.hello_sent or self.greeted:
                raise ProtocolError(400, "The daemon sent `welcome` out of turn.")
            self.greeted = True
            self.features &= frozenset(msg.features)
            return False
        rid: int | None = getattr(msg, "id", None)
        if rid is None:
            if type(msg) is Error:
                return False
            raise ProtocolError(400, f"The daemon sent `{_tag(msg)}` with no request id.")
        row = self._open.get(rid)
        if row is None:
            raise ProtocolError(
                400, f"The daemon sent `{_tag(msg)}` for request {rid}, which is not open."
            )
        if type(msg) in row[1]:
            return False
        if type(msg) in row[2]:
            del self._open[rid]
            return True
        raise ProtocolError(400, f"The daemon sent {_misplaced(row, msg)}")

    # --- what goes out -----------------------------------------------------------

    def send_request(self, msg: Hello | Request) -> None:
        """Client: ``msg`` is about to go out; opens its request."""
        if type(msg) is Hello:
            if self.hello_sent:
                raise LocalProtocolError("`hello` was already sent on this connection.")
            self.hello_sent = True
            self.features = frozenset(msg.features)
            return
        assert isinstance(msg, Request)
        if not self.hello_sent:
            raise LocalProtocolError("A request cannot go out before `hello`.")
        if msg.id in self._open:
            raise LocalProtocolError(f"The id {msg.id} belongs to a request still open.")
        self._open[msg.id] = _ROWS[type(msg)]

    def send_reply(self, msg: ServerMessage) -> bool:
        """Server: ``msg`` is about to go out; True when it ends its request.

        A frame without an id (`welcome`, an `error` of the whole connection)
        returns False. ``LocalProtocolError`` for a frame no open request can have.
        On every event of every run: the common case (a frame that passes) first.
        """
        rid: int | None = getattr(msg, "id", None)
        if rid is None:
            if type(msg) is Welcome:
                if not self.hello_sent or self.greeted:
                    raise LocalProtocolError("`welcome` answers `hello`, once.")
                self.greeted = True
                self.features &= frozenset(msg.features)
                return False
            if type(msg) is Error:
                return False
            raise LocalProtocolError(f"`{_tag(msg)}` needs the id of its request.")
        row = self._open.get(rid)
        if row is None:
            raise LocalProtocolError(f"`{_tag(msg)}` answers request {rid}, which is not open.")
        if type(msg) in row[1]:
            return False
        if type(msg) in row[2]:
            del self._open[rid]
            return True
        raise LocalProtocolError(_misplaced(row, msg))

    def refusal(self, error: ProtocolError) -> Error:
        """The `error` frame for a message ``receive_request`` refused; it closes nothing."""
        return Error(id=error.request_id, code=error.code, message=error.message)


def _misplaced(row: _Row, msg: ServerMessage) -> str:
    return f"`{_tag(msg)}` where a `{_tag(row[0])}` request cannot have it."


def _tag(msg: object) -> str:
    config = getattr(msg, "__struct_config__", None)
    tag = getattr(config, "tag", None)
    return str(tag) if tag is not None else type(msg).__name__
