"""Session, both ends of it, with no event loop: a client and a server `Session`
hand each other every message through the JSON codec, as the wire would.

The tables below hold one sample of every request and every frame that answers
one. A request or frame type added to the protocol without a sample, or a
request type without a row in ``REPLIES``, fails here by name.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import pytest
from chinwag.protocol import (
    FEATURES,
    JSON,
    PROTOCOL_VERSION,
    REPLIES,
    AgentItem,
    Agents,
    AskQuestion,
    AskUser,
    Attach,
    Cancel,
    ClientMsg,
    Compact,
    Compacted,
    Compaction,
    Conversations,
    End,
    Error,
    ErrorInfo,
    Event,
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
    ListParticipants,
    LocalProtocolError,
    Mail,
    MailContext,
    MailMessage,
    MarkRead,
    Memory,
    MessageReply,
    Messages,
    Ok,
    Participant,
    Participants,
    Ping,
    Pong,
    Post,
    Posted,
    ProtocolError,
    Queued,
    Register,
    Registered,
    ReplyToAsk,
    Request,
    SearchMemory,
    Sent,
    ServerMessage,
    ServerMsg,
    Session,
    Start,
    Stats,
    Stream,
    StreamEvent,
    Subscribe,
    Subscribed,
    TextDelta,
    ThinkingDelta,
    Title,
    ToolCall,
    ToolResult,
    Usage,
    UsageTotals,
    Watch,
    Watching,
    Welcome,
)
from test_protocol_messages import CLIENT_EXAMPLES, SERVER_EXAMPLES

REQUEST_TYPES = [kind for kind in typing.get_args(ClientMsg) if kind is not Hello]

REQUESTS: dict[type, Callable[[int], Request]] = {
    Stream: lambda rid: Stream(id=rid, agent="assistant", content="hello"),
    Kill: lambda rid: Kill(id=rid, agent="assistant"),
    Attach: lambda rid: Attach(id=rid, agent="assistant"),
    Compact: lambda rid: Compact(id=rid, agent="assistant", instructions="keep the names"),
    ReplyToAsk: lambda rid: ReplyToAsk(id=rid, agent="assistant", content="yes"),
    GetHistory: lambda rid: GetHistory(id=rid, agent="assistant"),
    ListConversations: lambda rid: ListConversations(id=rid),
    ListAgents: lambda rid: ListAgents(id=rid),
    Subscribe: lambda rid: Subscribe(id=rid),
    Cancel: lambda rid: Cancel(id=rid, target=rid + 1000),
    Ping: lambda rid: Ping(id=rid),
    GetStats: lambda rid: GetStats(id=rid),
    SearchMemory: lambda rid: SearchMemory(id=rid, agent="assistant", query="colour"),
    Register: lambda rid: Register(id=rid, name="ana"),
    Heartbeat: lambda rid: Heartbeat(id=rid, name="ana", status="reviewing"),
    ListParticipants: lambda rid: ListParticipants(id=rid),
    Post: lambda rid: Post(id=rid, sender="ana", to=["bob"], content="hi"),
    Inbox: lambda rid: Inbox(id=rid, reader="bob"),
    Sent: lambda rid: Sent(id=rid, reader="ana"),
    GetThread: lambda rid: GetThread(id=rid, reader="bob", thread_id="m000000000001"),
    MarkRead: lambda rid: MarkRead(id=rid, reader="bob", all=True),
    GetMessage: lambda rid: GetMessage(id=rid, reader="bob", msg_id="m000000000001"),
    Watch: lambda rid: Watch(id=rid, reader="bob"),
    GetContext: lambda rid: GetContext(id=rid, reader="bob"),
    GetUsage: lambda rid: GetUsage(id=rid, since="7d"),
}

WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def mail_message(msg_id: str = "m000000000001") -> MailMessage:
    return MailMessage(
        msg_id=msg_id, sender="ana", to=["bob"], recipients=["bob"], content="hi", created_at=WHEN
    )


# One frame of each type that carries a request id; `welcome` is the handshake's.
FRAMES: dict[type, Callable[[int], ServerMessage]] = {
    Error: lambda rid: Error(id=rid, code=500, message="It broke."),
    Queued: lambda rid: Queued(id=rid, position=1),
    Start: lambda rid: Start(id=rid, run_id="run-1", agent="assistant", seq=1),
    TextDelta: lambda rid: TextDelta(id=rid, delta="hi"),
    ThinkingDelta: lambda rid: ThinkingDelta(id=rid, delta="hmm"),
    ToolCall: lambda rid: ToolCall(id=rid, call_id="c1", name="set_title", arguments="{}"),
    ToolResult: lambda rid: ToolResult(
        id=rid, call_id="c1", output="ok", is_error=False, duration_ms=1.5
    ),
    AskUser: lambda rid: AskUser(id=rid, ask_id="a1", questions=[AskQuestion(question="Why?")]),
    Title: lambda rid: Title(id=rid, title="A title"),
    Usage: lambda rid: Usage(
        id=rid, prompt_tokens=1, completion_tokens=2, context_tokens=3, context_window=4
    ),
    Compaction: lambda rid: Compaction(
        id=rid, archive="archive-1-2", summary="s", archived_entries=2
    ),
    End: lambda rid: End(id=rid, status="done", error=None, last_seq=2),
    Killed: lambda rid: Killed(id=rid, run_id=None),
    Compacted: lambda rid: Compacted(
        id=rid, archive="archive-1-2", summary="s", archived_entries=2
    ),
    Ok: lambda rid: Ok(id=rid),
    History: lambda rid: History(
        id=rid, agent="assistant", sender="user", title="", cwd=None, entries=[], last_seq=0
    ),
    Conversations: lambda rid: Conversations(id=rid, items=[], next_cursor=None),
    Agents: lambda rid: Agents(id=rid, items=[AgentItem(name="assistant")]),
    Subscribed: lambda rid: Subscribed(id=rid),
    Event: lambda rid: Event(
        id=rid,
        agent="assistant",
        sender="user",
        run_id="run-1",
        event=TextDelta(delta="hi"),
    ),
    Memory: lambda rid: Memory(id=rid, items=[]),
    Pong: lambda rid: Pong(id=rid),
    UsageTotals: lambda rid: UsageTotals(id=rid, items=[]),
    Stats: lambda rid: Stats(
        id=rid, uptime_s=1.0, connections=1, conversations=0, runs_in_flight=0
    ),
    Registered: lambda rid: Registered(id=rid, participant=Participant(name="ana")),
    Participants: lambda rid: Participants(id=rid, items=[Participant(name="ana")]),
    Posted: lambda rid: Posted(
        id=rid, msg_id="m000000000001", thread_id=None, recipients=["bob"], created_at=WHEN
    ),
    Messages: lambda rid: Messages(id=rid, items=[], next_cursor=None, unread=0),
    MessageReply: lambda rid: MessageReply(id=rid, message=mail_message(), state="read"),
    Watching: lambda rid: Watching(id=rid, cursor=None),
    Mail: lambda rid: Mail(id=rid, msg_id="m000000000001", message=mail_message()),
    MailContext: lambda rid: MailContext(
        id=rid, name="bob", unread=0, unread_by_priority={}, threads=[]
    ),
}
# Mail's part 2 takes its samples from the wire examples, each with the id asked for.
PART_TWO = {
    "edit",
    "delete",
    "react",
    "pin",
    "search_mail",
    "space_create",
    "space_join",
    "space_leave",
    "space_invite",
    "space_archive",
    "space_members",
    "spaces",
    "project_create",
    "project_get",
    "projects",
    "project_update",
    "project_delete",
    "focus",
    "lock",
    "unlock",
    "locks",
    "mail_update",
    "mail_read",
    "space",
    "members",
    "project",
    "lock_result",
}
for _example in [*CLIENT_EXAMPLES, *SERVER_EXAMPLES]:
    if type(_example).__struct_config__.tag in PART_TWO:
        _samples: dict[type, Callable[[int], typing.Any]] = (
            REQUESTS if isinstance(_example, Request) else FRAMES  # type: ignore[assignment]
        )
        _samples.setdefault(
            type(_example), lambda rid, e=_example: msgspec.structs.replace(e, id=rid)
        )
FRAME_TYPES = [kind for kind in typing.get_args(ServerMsg) if kind is not Welcome]


def request(kind: type, rid: int) -> Request:
    if kind not in REQUESTS:
        pytest.fail(f"no sample {kind.__name__} request: add one to REQUESTS in {__file__}")
    return REQUESTS[kind](rid)


def reply(kind: type, rid: int) -> ServerMessage:
    if kind not in FRAMES:
        pytest.fail(f"no sample {kind.__name__} frame: add one to FRAMES in {__file__}")
    return FRAMES[kind](rid)


def tag(kind: type) -> str:
    """A message type's name on the wire (``text_delta``), as the session's errors say it."""
    return str(kind.__struct_config__.tag)


def to_server(msg: msgspec.Struct) -> ClientMsg:
    return JSON.decode_client(JSON.encode(msg))


def to_client(msg: msgspec.Struct) -> ServerMsg:
    return JSON.decode_server(JSON.encode(msg))


def hello(*features: str, protocol: int = PROTOCOL_VERSION) -> Hello:
    return Hello(protocol=protocol, client="test/1", features=list(features))


def welcome(*features: str) -> Welcome:
    return Welcome(
        protocol=PROTOCOL_VERSION,
        server="chinwag/test",
        agents=["assistant"],
        max_frame_bytes=1024,
        features=list(features),
    )


class Wire:
    """A client session and a server session, and the wire between them."""

    def __init__(self, max_open: int | None = None) -> None:
        self.client = Session()
        self.server = Session(max_open=max_open)

    def greet(self, asked: tuple[str, ...] = (), offered: tuple[str, ...] = FEATURES) -> None:
        self.client.send_request(hello(*asked))
        self.server.receive_request(to_server(hello(*asked)))
        assert self.server.send_reply(welcome(*offered)) is False
        assert self.client.receive_reply(to_client(welcome(*offered))) is False

    def request(self, msg: Request) -> None:
        self.client.send_request(msg)
        self.server.receive_request(to_server(msg))

    def reply(self, msg: ServerMessage) -> bool:
        """Server to client; whether the frame ended its request, as both ends agree."""
        ended = self.server.send_reply(msg)
        assert self.client.receive_reply(to_client(msg)) is ended
        return ended

    def is_open(self, rid: int) -> bool:
        assert self.client.is_open(rid) == self.server.is_open(rid)
        return self.server.is_open(rid)


def greeted(max_open: int | None = None) -> Wire:
    wire = Wire(max_open)
    wire.greet()
    return wire


def refused(session: Session, msg: Hello | Request) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        session.receive_request(to_server(msg))
    return caught.value


# --- tables ------------------------------------------------------------------------


def test_every_request_type_has_a_row_in_replies() -> None:
    assert set(REPLIES) == set(REQUEST_TYPES)


def test_every_row_names_only_frames_that_carry_a_request_id() -> None:
    for kind, (passing, ending) in REPLIES.items():
        assert Error in ending, kind
        assert not passing & ending, kind
        assert passing | ending <= set(FRAME_TYPES), kind


# --- handshake ---------------------------------------------------------------------


def test_hello_then_welcome_greets_both_ends() -> None:
    wire = Wire()
    assert not wire.client.hello_sent and not wire.server.hello_sent
    wire.client.send_request(hello())
    assert wire.client.hello_sent and not wire.client.greeted
    wire.server.receive_request(to_server(hello()))
    assert wire.server.hello_sent and not wire.server.greeted
    assert wire.server.send_reply(welcome()) is False
    assert wire.server.greeted
    assert wire.client.receive_reply(to_client(welcome())) is False
    assert wire.client.greeted
    assert wire.client.open_requests == wire.server.open_requests == 0


@pytest.mark.parametrize(
    ("asked", "offered", "client", "server"),
    [
        ((), FEATURES, set(), set()),
        (("compaction",), FEATURES, {"compaction"}, {"compaction"}),
        (("compaction", "search_memory"), ("search_memory",), {"search_memory"}, {"search_memory"}),
        (("compaction",), (), set(), set()),
        # A feature this daemon lacks: the client may agree on it with some other
        # daemon's welcome, but this daemon's session never does.
        (
            ("compaction", "teleport"),
            ("compaction", "teleport"),
            {"compaction", "teleport"},
            {"compaction"},
        ),
    ],
)
def test_features_are_the_intersection_of_what_both_ends_want(
    asked, offered, client, server
) -> None:
    wire = Wire()
    wire.greet(asked, offered)
    assert wire.client.features == client
    assert wire.server.features == server


def test_welcome_before_hello_is_refused_on_both_ends() -> None:
    wire = Wire()
    with pytest.raises(ProtocolError) as caught:
        wire.client.receive_reply(to_client(welcome()))
    assert caught.value.code == 400
    assert not wire.client.greeted
    with pytest.raises(LocalProtocolError, match="`welcome` answers `hello`, once"):
        wire.server.send_reply(welcome())
    assert not wire.server.greeted


def test_a_second_welcome_is_refused_on_both_ends() -> None:
    wire = greeted()
    with pytest.raises(ProtocolError, match="The daemon sent `welcome` out of turn") as caught:
        wire.client.receive_reply(to_client(welcome()))
    assert caught.value.code == 400
    with pytest.raises(LocalProtocolError, match="`welcome` answers `hello`, once"):
        wire.server.send_reply(welcome())


def test_the_client_cannot_send_a_request_before_hello_nor_hello_twice() -> None:
    client = Session()
    with pytest.raises(LocalProtocolError, match="A request cannot go out before `hello`"):
        client.send_request(Ping(id=1))
    client.send_request(hello())
    with pytest.raises(LocalProtocolError, match="`hello` was already sent on this connection"):
        client.send_request(hello())


# --- refusals, in the order of checks --------------------------------------------------


def test_a_request_before_hello_is_refused_400_with_its_id_and_the_connection_lives() -> None:
    server = Session()
    error = refused(server, Ping(id=7))
    assert (error.code, error.request_id, error.fatal) == (400, 7, False)
    assert server.refusal(error) == Error(id=7, code=400, message=error.message)
    assert server.open_requests == 0 and not server.is_open(7)
    # The handshake still works afterwards.
    server.receive_request(to_server(hello()))
    server.send_reply(welcome())
    server.receive_request(to_server(Ping(id=7)))
    assert server.is_open(7)


def test_a_request_after_hello_but_before_welcome_went_out_is_refused() -> None:
    server = Session()
    server.receive_request(to_server(hello()))
    error = refused(server, Ping(id=1))
    assert (error.code, error.request_id, error.fatal) == (400, 1, False)
    assert server.open_requests == 0


def test_a_second_hello_is_refused_400_without_an_id_and_the_first_one_holds() -> None:
    wire = Wire()
    wire.greet(asked=("compaction",))
    wire.request(Ping(id=1))
    error = refused(wire.server, hello(protocol=PROTOCOL_VERSION + 1))
    assert (error.code, error.request_id, error.fatal) == (400, None, False)
    assert wire.server.refusal(error).id is None
    assert wire.server.greeted and wire.server.features == {"compaction"}
    assert wire.server.is_open(1) and wire.server.open_requests == 1


def test_a_wrong_protocol_version_is_refused_426_and_fatal() -> None:
    server = Session()
    error = refused(server, hello(protocol=PROTOCOL_VERSION + 1))
    assert (error.code, error.request_id, error.fatal) == (426, None, True)
    assert server.refusal(error) == Error(id=None, code=426, message=error.message)
    assert not server.hello_sent and not server.greeted


@pytest.mark.parametrize("kind", REQUEST_TYPES, ids=lambda k: k.__name__)
def test_an_id_still_open_is_refused_400_and_the_open_request_is_untouched(kind) -> None:
    wire = greeted()
    wire.request(Kill(id=1, agent="assistant"))
    error = refused(wire.server, request(kind, 1))
    assert (error.code, error.request_id, error.fatal) == (400, 1, False)
    assert wire.server.refusal(error) == Error(id=1, code=400, message=error.message)
    assert wire.server.open_requests == 1
    # Still the kill's: what a kill cannot have is still refused, and `killed` ends it.
    with pytest.raises(LocalProtocolError, match="`text_delta` where a `kill` request cannot"):
        wire.server.send_reply(TextDelta(id=1, delta="x"))
    assert wire.reply(Killed(id=1, run_id=None)) is True
    assert not wire.is_open(1)


def test_past_max_open_a_request_is_refused_429_and_opens_nothing() -> None:
    wire = greeted(max_open=2)
    wire.request(Stream(id=1, agent="assistant", content="one"))
    wire.request(Stream(id=2, agent="assistant", content="two"))
    error = refused(wire.server, Ping(id=3))
    assert (error.code, error.request_id, error.fatal) == (429, 3, False)
    assert wire.server.refusal(error) == Error(id=3, code=429, message=error.message)
    assert wire.server.open_requests == 2 and not wire.server.is_open(3)
    # Once one ends there is room again.
    assert wire.reply(End(id=1, status="done", error=None, last_seq=2)) is True
    wire.server.receive_request(to_server(Ping(id=3)))
    assert wire.server.is_open(3)


def test_cancel_is_exempt_from_max_open_but_not_from_the_id_check() -> None:
    wire = greeted(max_open=1)
    wire.request(Stream(id=1, agent="assistant", content="one"))
    wire.request(Cancel(id=2, target=1))
    assert wire.server.open_requests == 2
    error = refused(wire.server, Cancel(id=1, target=2))
    assert (error.code, error.request_id) == (400, 1)
    assert wire.server.open_requests == 2


def test_the_id_check_comes_before_the_limit() -> None:
    wire = greeted(max_open=1)
    wire.request(Ping(id=1))
    assert refused(wire.server, Ping(id=1)).code == 400
    assert refused(wire.server, Ping(id=2)).code == 429


def test_cancel_before_hello_is_refused_400() -> None:
    error = refused(Session(max_open=0), Cancel(id=4, target=1))
    assert (error.code, error.request_id, error.fatal) == (400, 4, False)


def test_the_client_cannot_reuse_an_id_still_open() -> None:
    wire = greeted()
    wire.request(Ping(id=1))
    with pytest.raises(LocalProtocolError, match="The id 1 belongs to a request still open"):
        wire.client.send_request(GetStats(id=1))
    assert wire.client.open_requests == 1
    assert wire.reply(Pong(id=1)) is True  # still the ping's


# --- terminal frames -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "ending"),
    [(kind, end) for kind, (_, ending) in REPLIES.items() for end in sorted(ending, key=str)],
    ids=lambda x: x.__name__,
)
def test_every_terminal_frame_closes_its_request_and_frees_its_id(kind, ending) -> None:
    passing, _ = REPLIES[kind]
    wire = greeted()
    for _round in range(2):  # the second round reuses the id the first one freed
        wire.request(request(kind, 5))
        assert wire.is_open(5)
        for frame in sorted(passing, key=str):
            assert wire.reply(reply(frame, 5)) is False
            assert wire.is_open(5)
        assert wire.reply(reply(ending, 5)) is True
        assert not wire.is_open(5)
        assert wire.client.open_requests == wire.server.open_requests == 0


@pytest.mark.parametrize("kind", list(REPLIES), ids=lambda k: k.__name__)
def test_error_ends_any_request_and_leaves_the_others_open(kind) -> None:
    wire = greeted()
    wire.request(Ping(id=1))
    wire.request(request(kind, 2))
    assert wire.reply(Error(id=2, code=404, message="Nothing there.")) is True
    assert not wire.is_open(2)
    assert wire.is_open(1)


@pytest.mark.parametrize("kind", list(REPLIES), ids=lambda k: k.__name__)
def test_a_frame_its_request_cannot_have_is_refused_on_both_ends(kind) -> None:
    passing, ending = REPLIES[kind]
    misplaced = [frame for frame in FRAME_TYPES if frame not in passing | ending]
    assert misplaced
    wire = greeted()
    wire.request(request(kind, 3))
    for frame in misplaced:
        where = f"`{tag(frame)}` where a `{tag(kind)}` request cannot have it."
        with pytest.raises(LocalProtocolError, match=where):
            wire.server.send_reply(reply(frame, 3))
        with pytest.raises(ProtocolError) as caught:
            wire.client.receive_reply(to_client(reply(frame, 3)))
        assert caught.value.code == 400
        assert wire.is_open(3), frame
    # The request is none the worse for it.
    assert wire.reply(Error(id=3, code=500, message="Done.")) is True


def test_pong_cannot_answer_a_kill() -> None:
    wire = greeted()
    wire.request(Kill(id=1, agent="assistant"))
    with pytest.raises(ProtocolError) as caught:
        wire.client.receive_reply(to_client(Pong(id=1)))
    assert caught.value.code == 400
    assert "pong" in caught.value.message and "kill" in caught.value.message
    assert wire.client.is_open(1)


@pytest.mark.parametrize("frame", FRAME_TYPES, ids=lambda k: k.__name__)
def test_a_frame_for_an_id_never_opened_is_refused_on_both_ends(frame) -> None:
    wire = greeted()
    wire.request(Ping(id=1))
    never = f"`{tag(frame)}` answers request 99, which is not open."
    with pytest.raises(LocalProtocolError, match=never):
        wire.server.send_reply(reply(frame, 99))
    with pytest.raises(ProtocolError) as caught:
        wire.client.receive_reply(to_client(reply(frame, 99)))
    assert caught.value.code == 400
    assert wire.is_open(1) and wire.client.open_requests == 1


def test_nothing_may_follow_a_terminal_frame() -> None:
    wire = greeted()
    wire.request(Stream(id=1, agent="assistant", content="hi"))
    assert wire.reply(TextDelta(id=1, delta="hi")) is False
    assert wire.reply(End(id=1, status="done", error=None, last_seq=2)) is True
    for late in (End(id=1, status="done", error=None, last_seq=2), TextDelta(id=1, delta="!")):
        name = tag(type(late))
        with pytest.raises(LocalProtocolError, match=f"`{name}` answers request 1, which is not"):
            wire.server.send_reply(late)
        with pytest.raises(ProtocolError, match=f"sent `{name}` for request 1, which is not open"):
            wire.client.receive_reply(to_client(late))


def test_frames_of_interleaved_requests_end_only_their_own() -> None:
    wire = greeted()
    wire.request(Stream(id=1, agent="assistant", content="one"))
    wire.request(Subscribe(id=2))
    wire.request(Cancel(id=3, target=2))
    assert wire.reply(Subscribed(id=2)) is False
    assert wire.reply(TextDelta(id=1, delta="o")) is False
    assert wire.reply(End(id=2, status="detached", error=None, last_seq=None)) is True
    assert wire.reply(Ok(id=3)) is True
    assert wire.is_open(1) and not wire.is_open(2) and not wire.is_open(3)
    assert wire.reply(End(id=1, status="done", error=None, last_seq=2)) is True
    assert wire.server.open_requests == wire.client.open_requests == 0


def test_an_error_of_the_whole_connection_ends_no_request() -> None:
    wire = greeted()
    wire.request(Ping(id=1))
    assert wire.reply(Error(id=None, code=408, message="Too quiet.")) is False
    assert wire.is_open(1)


@pytest.mark.parametrize(
    "frame",
    [kind for kind in FRAME_TYPES if issubclass(kind, StreamEvent)],
    ids=lambda k: k.__name__,
)
def test_an_event_without_an_id_is_refused_on_both_ends(frame) -> None:
    wire = greeted()
    wire.request(Stream(id=1, agent="assistant", content="one"))
    bare = reply(frame, 1)
    bare.id = None  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError, match=f"`{tag(frame)}` needs the id of its request."):
        wire.server.send_reply(bare)
    with pytest.raises(ProtocolError, match=f"The daemon sent `{tag(frame)}` with no request id."):
        wire.client.receive_reply(to_client(bare))
    assert wire.is_open(1)


# --- watch: a long-lived request, like subscribe -------------------------------------------


def test_a_watch_passes_watching_and_its_mail_until_its_end() -> None:
    wire = greeted()
    wire.request(Watch(id=4, reader="bob", after="m000000000001"))
    assert wire.reply(Watching(id=4, cursor="m000000000003")) is False
    for number in (2, 3, 4):  # the replay up to the cursor, then live mail: all alike
        msg_id = f"m{number:012d}"
        assert wire.reply(Mail(id=4, msg_id=msg_id, message=mail_message(msg_id))) is False
        assert wire.is_open(4)
    assert wire.reply(End(id=4, status="detached", error=None, last_seq=None)) is True
    assert not wire.is_open(4)


@pytest.mark.parametrize(
    "ending",
    [
        Error(id=4, code=400, message="`as` must be 1-64 characters."),
        End(
            id=4,
            status="error",
            error=ErrorInfo(code=429, message="The watch fell too far behind and was dropped."),
            last_seq=None,
        ),
    ],
    ids=["error", "end-429"],
)
def test_an_error_or_an_end_ends_a_watch_and_no_mail_may_follow(ending) -> None:
    wire = greeted()
    wire.request(Watch(id=4, reader="bob"))
    # A watch refused at its start (`error`) never says `watching`; one dropped as too
    # slow (`end` 429) had been watching.
    if isinstance(ending, End):
        assert wire.reply(Watching(id=4, cursor=None)) is False
        assert wire.reply(Mail(id=4, msg_id="m000000000001", message=mail_message())) is False
    assert wire.reply(ending) is True
    assert not wire.is_open(4)
    late = Mail(id=4, msg_id="m000000000002", message=mail_message("m000000000002"))
    with pytest.raises(LocalProtocolError, match="`mail` answers request 4, which is not open"):
        wire.server.send_reply(late)
    with pytest.raises(ProtocolError, match="sent `mail` for request 4, which is not open"):
        wire.client.receive_reply(to_client(late))


def test_a_watch_is_ended_by_cancel_and_requests_beside_it_end_on_their_own() -> None:
    wire = greeted()
    wire.request(Watch(id=1, reader="bob"))
    assert wire.reply(Watching(id=1, cursor=None)) is False
    wire.request(Post(id=2, sender="bob", to=["ana"], content="hi"))
    assert (
        wire.reply(
            Posted(
                id=2, msg_id="m000000000002", thread_id=None, recipients=["ana"], created_at=WHEN
            )
        )
        is True
    )
    assert (
        wire.reply(Mail(id=1, msg_id="m000000000003", message=mail_message("m000000000003")))
        is False
    )
    wire.request(Cancel(id=3, target=1))
    assert wire.reply(End(id=1, status="detached", error=None, last_seq=None)) is True
    assert wire.reply(Ok(id=3)) is True
    assert wire.server.open_requests == wire.client.open_requests == 0


@pytest.mark.parametrize("kind", [Subscribe, Post, Inbox], ids=lambda k: k.__name__)
def test_mail_and_watching_belong_to_a_watch_only(kind) -> None:
    wire = greeted()
    wire.request(request(kind, 6))
    for frame in (
        Mail(id=6, msg_id="m000000000001", message=mail_message()),
        Watching(id=6, cursor=None),
    ):
        with pytest.raises(LocalProtocolError, match=f"`{tag(type(frame))}` where a `{tag(kind)}`"):
            wire.server.send_reply(frame)
        with pytest.raises(ProtocolError, match="where a `"):
            wire.client.receive_reply(to_client(frame))
    assert wire.is_open(6)


def test_a_mail_frame_cannot_lack_its_watch_id() -> None:
    # Unlike a run's events, `mail` is never nested: its id is required, so a frame
    # without one is malformed before any session sees it.
    message = msgspec.to_builtins(mail_message())
    bare = msgspec.json.encode({"type": "mail", "msg_id": "m000000000001", "message": message})
    with pytest.raises(ProtocolError, match="missing required field `id`"):
        JSON.decode_server(bare)
