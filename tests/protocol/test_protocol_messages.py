"""Every v1 message round-trips through both codecs, and the wire bytes are pinned.

The examples are fully populated (no field left at its default unless the
default is the only sensible value), so a field the codec drops or renames
fails the round trip.
"""

from __future__ import annotations

import re
import struct
import typing
from datetime import UTC, date, datetime, timedelta, timezone

import msgspec
import pytest
from chinwag.protocol import (
    JSON,
    MSGPACK,
    PROTOCOL_VERSION,
    AgentItem,
    Agents,
    AskOption,
    AskQuestion,
    AskUser,
    Attach,
    Cancel,
    ClientMsg,
    Codec,
    Compact,
    Compacted,
    Compaction,
    ConversationItem,
    Conversations,
    Delete,
    Delivery,
    Edit,
    Encoding,
    End,
    Entry,
    Error,
    ErrorInfo,
    Event,
    Focus,
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
    LockResult,
    Locks,
    Mail,
    MailContext,
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
    MessageVersion,
    Ok,
    Participant,
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
    Queued,
    React,
    Reaction,
    Ref,
    Register,
    Registered,
    ReplyToAsk,
    SearchMail,
    SearchMemory,
    Sent,
    ServerMsg,
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
    Start,
    Stats,
    Stream,
    StreamEventMsg,
    Subscribe,
    Subscribed,
    TextDelta,
    ThinkingDelta,
    ThreadSummary,
    Title,
    TokenUsage,
    ToolCall,
    ToolCallInfo,
    ToolResult,
    Unlock,
    Usage,
    UsageTotal,
    UsageTotals,
    Watch,
    Watching,
    Welcome,
    codec_for,
)

CODECS = [pytest.param(JSON, id="json"), pytest.param(MSGPACK, id="msgpack")]

CREATED = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)
UPDATED = datetime(2024, 5, 2, 9, 0, 1, 500000, tzinfo=timezone(timedelta(hours=2)))

CLIENT_EXAMPLES: list[ClientMsg] = [
    Hello(
        protocol=PROTOCOL_VERSION, client="chinwag-cli/0.1", token="s3cret", features=["compaction"]
    ),
    Stream(
        id=1,
        agent="assistant",
        sender="alice",
        content="Hello there",
        guest="helper",
        cwd="/home/alice/src",
        queue="interrupt",
    ),
    Kill(id=2, agent="assistant", sender="alice", all=True),
    Attach(id=3, agent="assistant", sender="alice"),
    Compact(id=4, agent="assistant", sender="alice", instructions="keep the decisions"),
    ReplyToAsk(id=5, agent="assistant", sender="alice", content="the second", ask_id="ask-1"),
    GetHistory(
        id=6, agent="assistant", sender="alice", after_seq=10, limit=50, include_archived=True
    ),
    ListConversations(
        id=7, agent="assistant", sender="alice", limit=20, cursor="opaque==", query="Straße"
    ),
    ListAgents(id=8),
    Subscribe(id=9, agent="assistant", sender="bob"),
    Cancel(id=10, target=1),
    Ping(id=11),
    GetStats(id=12),
    SearchMemory(id=13, agent="assistant", query="favourite colour", limit=5),
    GetUsage(id=14, agent="assistant", sender="alice", since="7d"),  # additive: `usage`
    # mail (additive, docs/protocol.md section 14)
    Register(
        id=20,
        name="codex-41200",
        kind="person",
        roles=["reviewer", "ops"],
        info={"session": "s-1", "vendor": "openai", "pid": 41200, "cwd": "/home/ana/src"},
        takeover=True,
    ),
    Heartbeat(id=21, name="codex-41200", status="reviewing auth module"),
    ListParticipants(id=22, online_only=True, role="reviewer"),
    Post(
        id=23,
        sender="codex-41200",
        to=["ana", "@reviewer", "@everyone"],
        content='{"build": "green"}',
        format="json",
        structured={"build": "green", "tests": [1, 2]},
        priority=3,
        channel="coordination",
        reply_to="m000000000007",
        scopes=[Ref(type="module", value="auth")],
        refs=[Ref(type="pr", value="7")],
        metadata={"branch": "main", "working_dir": "/home/ana/src"},
        mentions=["@ops"],
        idempotency_key="retry-1",
    ),
    Inbox(
        id=24,
        reader="ana",
        unread_only=True,
        mentions_only=True,
        thread_id="m000000000007",
        channel="coordination",
        scope="module:auth",
        priority_min=2,
        since="30m",
        limit=20,
        cursor="m000000000042",
        mark_read=True,
    ),
    Sent(id=25, reader="codex-41200", limit=10, cursor="m000000000042"),
    GetThread(id=26, reader="ana", thread_id="m000000000007"),
    MarkRead(id=27, reader="ana", msg_ids=["m000000000008"], thread_id="m000000000007", all=True),
    GetMessage(id=28, reader="ana", msg_id="m000000000008"),
    Watch(id=29, reader="ana", after="m000000000008"),
    Watch(id=30, reader="ana", updates=True, reads=True),
    GetContext(id=30, reader="ana"),
    # mail, part 2 (additive, docs/protocol.md section 14)
    Edit(id=31, sender="ana", msg_id="m000000000008", content="fixed", structured={"v": 2}),
    Delete(id=32, sender="ana", msg_id="m000000000008", reason="sent twice"),
    React(id=33, sender="bob", msg_id="m000000000008", emoji="+1", remove=True),
    Pin(id=34, sender="bob", msg_id="m000000000008", unpin=True),
    SearchMail(id=35, reader="ana", query="auth tokens", limit=5, project="web"),
    SpaceCreate(
        id=36,
        sender="ana",
        name="api",
        description="the API",
        parent="eng",
        project="web",
        private=True,
    ),
    SpaceJoin(id=37, sender="bob", space="eng"),
    SpaceLeave(id=38, sender="bob", space="eng"),
    SpaceInvite(id=39, sender="ana", space="api", name="bob"),
    SpaceArchive(id=40, sender="ana", space="api"),
    SpaceMembers(id=41, space="api", reader="ana"),
    ListSpaces(
        id=42, reader="ana", project="web", parent="eng", top_level=True, include_archived=True
    ),
    ProjectCreate(
        id=43,
        sender="ana",
        name="web",
        description="the site",
        path="/src/web",
        repository="git@example.org:web.git",
        tags=["ui"],
        status="active",
        settings={"review": True},
        metadata={"owner": "ana"},
    ),
    ProjectGet(id=44, project="web"),
    ListProjects(id=45, status="active", tag="ui"),
    ProjectUpdate(id=46, sender="ana", project="web", status="paused", tags=["ui", "old"]),
    ProjectDelete(id=47, sender="ana", project="web"),
    Focus(id=48, reader="ana", project="web"),
    Lock(id=49, sender="ana", resource="paths.py", mode="advisory", ttl_s=60.0),
    Unlock(id=50, sender="ana", resource="paths.py"),
    ListLocks(id=51, resource="paths.py", holder="ana"),
]

ASK = AskUser(
    id=1,
    ask_id="ask-1",
    questions=[
        AskQuestion(
            question="Which database?",
            header="Storage",
            options=[
                AskOption(label="sqlite", description="one file, zero setup"),
                AskOption(label="postgres", description="for many writers"),
            ],
            multi_select=False,
        ),
        AskQuestion(
            question="Which extras?",
            header="Extras",
            options=[AskOption(label="fts"), AskOption(label="vectors", description="pgvector")],
            multi_select=True,
        ),
    ],
)

ENTRIES = [
    Entry(
        seq=1,
        kind="message",
        role="user",
        content="What is in /tmp?",
        agent="",
        run_id="run-1",
        created_at=CREATED,
    ),
    Entry(
        seq=2,
        kind="message",
        role="assistant",
        content="Let me look.",
        agent="helper",
        tool_calls=[
            ToolCallInfo(call_id="call-1", name="list_dir", arguments='{"path": "/tmp"}'),
            ToolCallInfo(call_id="call-2", name="stat", arguments="{}"),
        ],
        run_id="run-1",
        created_at=CREATED + timedelta(seconds=1),
        usage=TokenUsage(input_tokens=1200, output_tokens=34),
    ),
    Entry(
        seq=3,
        kind="message",
        role="tool",
        content="permission denied",
        tool_call_id="call-1",
        is_error=True,
        run_id="run-1",
        created_at=UPDATED,
    ),
    Entry(
        seq=4,
        kind="compact",
        role="",
        content="The user asked about /tmp.",
        created_at=UPDATED,
        archive="archive-0001",
        usage=TokenUsage(input_tokens=800, output_tokens=12),
    ),
]

STREAM_EVENT_EXAMPLES: list[StreamEventMsg] = [
    Queued(id=1, position=2),
    Start(id=1, run_id="run-1", agent="helper", seq=41),
    TextDelta(id=1, delta="Hel"),
    ThinkingDelta(id=1, delta="the user wants"),
    ToolCall(id=1, call_id="call-1", name="list_dir", arguments='{"path": "/tmp"}'),
    ToolResult(id=1, call_id="call-1", output="a\nb\n", is_error=True, duration_ms=12.5),
    ASK,
    Title(id=1, title="Listing /tmp"),
    Usage(id=1, prompt_tokens=1200, completion_tokens=34, context_tokens=1234, context_window=8192),
    End(
        id=1,
        status="error",
        error=ErrorInfo(code=502, message="The model provider timed out; try again."),
        last_seq=44,
    ),
    Compaction(id=1, archive="archive-1-40", summary="user: hello there", archived_entries=40),
    End(id=1, status="done", error=None, last_seq=45),
]

PARTICIPANT = Participant(
    name="codex-41200",
    kind="person",
    roles=["reviewer"],
    online=True,
    last_seen=UPDATED,
    status="reviewing auth module",
    info={"session": "s-1", "pid": 41200},
    unread=3,
)

SPACE = Space(
    name="api",
    description="the API",
    parent="eng",
    project="web",
    private=True,
    archived=False,
    created_by="ana",
    created_at=CREATED,
    members=3,
    messages=12,
)
PROJECT = Project(
    name="web",
    description="the site",
    path="/src/web",
    repository="git@example.org:web.git",
    tags=["ui"],
    status="active",
    settings={"review": True},
    metadata={"owner": "ana"},
    created_by="ana",
    created_at=CREATED,
    updated_at=UPDATED,
)
LOCK = LockHolder(
    resource="paths.py", holder="ana", mode="exclusive", acquired_at=CREATED, expires_at=UPDATED
)
MAIL_MESSAGE = MailMessage(
    msg_id="m000000000008",
    sender="codex-41200",
    to=["ana", "@reviewer"],
    recipients=["ana", "bob"],
    content='{"build": "green"}',
    created_at=CREATED,
    thread_id="m000000000007",
    format="json",
    structured={"build": "green"},
    priority=2,
    channel="coordination",
    reply_to="m000000000007",
    scopes=[Ref(type="module", value="auth")],
    refs=[Ref(type="pr", value="7"), Ref(type="mention", value="bob")],
    metadata={"branch": "main"},
    mentions=["bob"],
    idempotency_key="retry-1",
    space="ops",
    edited_at=UPDATED,
    version=2,
    deleted=True,
    delete_reason="sent twice",
    reactions=[Reaction(emoji="+1", by=["ana", "bob"])],
    pinned=True,
    run_id="run-1",
    answered_by="m000000000009",
)

SERVER_EXAMPLES: list[ServerMsg] = [
    Welcome(
        protocol=PROTOCOL_VERSION,
        server="chinwag/0.1.0",
        agents=["assistant", "helper"],
        max_frame_bytes=16 * 1024 * 1024,
        features=["compaction", "search_memory"],
    ),
    Error(id=3, code=404, message="No agent named 'nope'; list_agents shows the agents."),
    Error(id=None, code=413, message="Frame too large."),
    *STREAM_EVENT_EXAMPLES,
    Killed(id=2, run_id="run-1"),
    Killed(id=2, run_id=None),
    Compacted(
        id=4, archive="archive-0001", summary="The user asked about /tmp.", archived_entries=3
    ),
    Ok(id=5),
    Memory(
        id=13,
        items=[
            MemoryHit(
                kind="archive",
                name="archive-1-40",
                sender="alice",
                snippet="her favourite [colour] is teal",
                created_at=UPDATED,
            ),
            MemoryHit(kind="note", name="colours", sender=None, snippet="teal", created_at=None),
        ],
    ),
    History(
        id=6,
        agent="assistant",
        sender="alice",
        title="Listing /tmp",
        cwd="/home/alice/src",
        entries=ENTRIES,
        last_seq=4,
    ),
    Conversations(
        id=7,
        items=[
            ConversationItem(
                agent="assistant",
                sender="alice",
                title="Listing /tmp",
                cwd="/home/alice",
                created_at=CREATED,
                updated_at=UPDATED,
                last_seq=4,
                running=True,
                tokens_in=2000,
                tokens_out=46,
            ),
            ConversationItem(agent="helper", sender="bob", title="", cwd=None, last_seq=0),
        ],
        next_cursor="page-2",
    ),
    Agents(
        id=8,
        items=[
            AgentItem(
                name="assistant",
                description="Echoes the user",
                model="echo",
                tools=["set_title", "ask_user"],
            )
        ],
    ),
    Subscribed(id=9),
    Event(
        id=9,
        agent="assistant",
        sender="alice",
        run_id="run-1",
        event=ToolResult(call_id="call-1", output="ok", is_error=False, duration_ms=3.0),
    ),
    Event(
        id=9,
        agent="assistant",
        sender="alice",
        run_id="run-1",
        event=msgspec.structs.replace(ASK, id=None),
    ),
    Event(
        id=9,
        agent="assistant",
        sender="alice",
        run_id="run-1",
        event=End(status="done", error=None, last_seq=45),
    ),
    Pong(id=11),
    Stats(
        id=12,
        uptime_s=3600.25,
        connections=3,
        conversations=17,
        runs_in_flight=1,
        runs_queued=2,
        runs_total=99,
        subscriptions=1,
        participants_online=2,
        watches=1,
        tokens_in=120_000,
        tokens_out=3_400,
    ),
    UsageTotals(
        id=14,
        items=[
            UsageTotal(
                agent="assistant",
                sender="alice",
                day=date(2024, 5, 1),
                input_tokens=2000,
                output_tokens=46,
                calls=2,
            )
        ],
    ),
    # mail (additive, docs/protocol.md section 14)
    Registered(id=20, participant=PARTICIPANT),
    Participants(id=22, items=[PARTICIPANT, Participant(name="assistant", kind="agent")]),
    Posted(
        id=23,
        msg_id="m000000000008",
        thread_id="m000000000007",
        recipients=["ana", "bob"],
        created_at=CREATED,
        warnings=["bob is not registered: it will get this when it does."],
    ),
    Messages(
        id=24,
        items=[
            MailItem(
                message=MAIL_MESSAGE,
                state="read",
                delivered_at=CREATED,
                read_at=UPDATED,
            ),
            MailItem(
                message=MAIL_MESSAGE,
                deliveries=[
                    Delivery(
                        name="ana",
                        state="read",
                        delivered_at=CREATED,
                        read_at=UPDATED,
                        mentioned=False,
                    ),
                    Delivery(name="bob", state="pending", mentioned=True),
                ],
            ),
        ],
        next_cursor="m000000000008",
        unread=4,
    ),
    MessageReply(id=28, message=MAIL_MESSAGE, state="delivered"),
    Watching(id=29, cursor="m000000000008"),
    Mail(id=29, msg_id="m000000000008", message=MAIL_MESSAGE),
    MailContext(
        id=30,
        name="ana",
        unread=5,
        unread_by_priority={1: 2, 3: 3},
        threads=[
            ThreadSummary(
                thread_id="m000000000007",
                last_msg_id="m000000000008",
                last_from="codex-41200",
                unread=2,
            )
        ],
        participant=PARTICIPANT,
        spaces=["eng"],
        locks=[LOCK],
        focus="web",
    ),
    MessageReply(
        id=31,
        message=MAIL_MESSAGE,
        versions=[
            MessageVersion(
                version=1,
                content="first",
                structured={"v": 1},
                created_at=CREATED,
                replaced_at=UPDATED,
            )
        ],
    ),
    MailUpdate(id=29, msg_id="m000000000008", change="react", message=MAIL_MESSAGE),
    MailRead(id=29, msg_ids=["m000000000007", "m000000000008"]),
    Spaces(id=42, items=[SPACE]),
    SpaceReply(id=36, space=SPACE),
    Members(id=41, items=[SpaceMember(name="ana", joined_at=CREATED, online=True)]),
    Projects(id=45, items=[PROJECT]),
    ProjectReply(id=43, project=PROJECT),
    LockResult(id=49, acquired=False, holders=[LOCK], expires_at=None),
    Locks(id=51, items=[LOCK]),
]


def _tag(msg: msgspec.Struct) -> str:
    tag = type(msg).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def _raw(codec: Codec, body: bytes) -> typing.Any:
    """The body as plain values, the way a client in another language sees it."""
    return msgspec.json.decode(body) if codec is JSON else msgspec.msgpack.decode(body)


def _ids(msgs: typing.Sequence[msgspec.Struct]) -> list[str]:
    return [f"{i}-{_tag(m)}" for i, m in enumerate(msgs)]


# --- coverage of the examples themselves -------------------------------------


def test_every_client_message_type_has_an_example() -> None:
    assert {type(m) for m in CLIENT_EXAMPLES} == set(typing.get_args(ClientMsg))


def test_every_server_message_type_has_an_example() -> None:
    assert {type(m) for m in SERVER_EXAMPLES} == set(typing.get_args(ServerMsg))


def test_client_tags_are_the_protocol_names() -> None:
    assert {_tag(m) for m in CLIENT_EXAMPLES} == {
        "hello",
        "stream",
        "kill",
        "attach",
        "compact",
        "reply_to_ask",
        "get_history",
        "list_conversations",
        "list_agents",
        "subscribe",
        "cancel",
        "ping",
        "stats",
        "search_memory",  # additive, docs/protocol.md
        "usage",  # additive, docs/protocol.md
        # mail, additive: docs/protocol.md section 14
        "register",
        "heartbeat",
        "participants",
        "post",
        "inbox",
        "sent",
        "thread",
        "mark_read",
        "get_message",
        "watch",
        "context",
        # mail, part 2
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
    }


def test_server_tags_are_the_protocol_names() -> None:
    assert {_tag(m) for m in SERVER_EXAMPLES} == {
        "welcome",
        "error",
        "queued",
        "start",
        "text_delta",
        "thinking_delta",
        "tool_call",
        "tool_result",
        "ask_user",
        "title",
        "usage",
        "end",
        "killed",
        "compacted",
        "ok",
        "history",
        "conversations",
        "agents",
        "subscribed",
        "event",
        "pong",
        "stats",
        "compaction",  # additive, docs/protocol.md
        "memory",  # additive, docs/protocol.md
        "usage_totals",  # additive, docs/protocol.md
        # mail, additive: docs/protocol.md section 14
        "registered",
        "participants",
        "posted",
        "messages",
        "message",
        "watching",
        "mail",
        "context",
        # mail, part 2
        "mail_update",
        "mail_read",  # additive: the `mail_read` feature
        "spaces",
        "space",
        "members",
        "projects",
        "project",
        "lock_result",
        "locks",
    }


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("msg", CLIENT_EXAMPLES, ids=_ids(CLIENT_EXAMPLES))
def test_client_message_round_trips(codec: Codec, msg: ClientMsg) -> None:
    decoded = codec.decode_client(codec.encode(msg))
    assert type(decoded) is type(msg)
    assert decoded == msg


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("msg", SERVER_EXAMPLES, ids=_ids(SERVER_EXAMPLES))
def test_server_message_round_trips(codec: Codec, msg: ServerMsg) -> None:
    decoded = codec.decode_server(codec.encode(msg))
    assert type(decoded) is type(msg)
    assert decoded == msg


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("msg", SERVER_EXAMPLES, ids=_ids(SERVER_EXAMPLES))
def test_every_field_is_on_the_wire_in_snake_case(codec: Codec, msg: ServerMsg) -> None:
    raw = _raw(codec, codec.encode(msg))
    assert raw["type"] == _tag(msg)
    expected = set(msg.__struct_fields__)
    if isinstance(msg, StreamEventMsg) and msg.id is None:
        expected.discard("id")
    assert set(raw) == expected | {"type"}
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", key) for key in raw)


def test_codecs_are_distinct_encodings() -> None:
    assert JSON.encoding is Encoding.JSON
    assert MSGPACK.encoding is Encoding.MSGPACK
    assert codec_for(Encoding.JSON) is JSON
    assert codec_for(Encoding.MSGPACK) is MSGPACK


# --- the wire format itself, pinned ---------------------------------------------


def test_hello_json_bytes() -> None:
    assert JSON.encode(Hello(protocol=1, client="cli")) == (
        b'{"type":"hello","protocol":1,"client":"cli","token":null,"features":[]}'
    )


def test_stream_json_bytes() -> None:
    msg = Stream(id=1, agent="assistant", content="hi")
    assert JSON.encode(msg) == (
        b'{"type":"stream","id":1,"agent":"assistant","content":"hi",'
        b'"sender":null,"guest":null,"cwd":null,"queue":"enqueue"}'
    )


def test_minimal_stream_json_from_a_foreign_client_decodes() -> None:
    msg = JSON.decode_client(b'{"id": 7, "content": "hi", "type": "stream", "agent": "a"}')
    assert msg == Stream(id=7, agent="a", content="hi")


@pytest.mark.parametrize("codec", CODECS)
def test_mail_names_its_author_from_and_its_reader_as_on_the_wire(codec: Codec) -> None:
    # `from` and `as` are Python keywords: the structs say sender/reader, the wire must not.
    post = _raw(codec, codec.encode(Post(id=1, sender="ana", to=["bob"], content="hi")))
    assert post["from"] == "ana" and "sender" not in post
    for request in (
        Inbox(id=2, reader="bob"),
        Watch(id=3, reader="bob"),
        GetContext(id=4, reader="bob"),
    ):
        raw = _raw(codec, codec.encode(request))
        assert raw["as"] == "bob" and "reader" not in raw
    pushed = _raw(codec, codec.encode(Mail(id=3, msg_id=MAIL_MESSAGE.msg_id, message=MAIL_MESSAGE)))
    assert pushed["message"]["from"] == "codex-41200" and "sender" not in pushed["message"]


def test_minimal_mail_requests_from_a_foreign_client_decode() -> None:
    post = JSON.decode_client(b'{"type":"post","id":1,"from":"Ana","to":["bob"],"content":"hi"}')
    assert post == Post(id=1, sender="Ana", to=["bob"], content="hi")
    assert (post.format, post.priority, post.reply_to) == ("markdown", 1, None)
    watch = JSON.decode_client(b'{"type":"watch","id":2,"as":"bob"}')
    assert watch == Watch(id=2, reader="bob", after=None)
    assert not watch.updates and not watch.reads  # a v1 client is sent no frame it lacks
    register = JSON.decode_client(b'{"type":"register","id":3,"name":"bob"}')
    assert register == Register(id=3, name="bob", kind="session", roles=[], info={})


def test_a_mail_item_leaves_out_what_it_does_not_say() -> None:
    # An inbox item has the reader's state and no deliveries; a sent item the reverse.
    message = MailMessage(
        msg_id="m000000000001",
        sender="ana",
        to=["bob"],
        recipients=["bob"],
        content="hi",
        created_at=CREATED,
    )
    inbox = msgspec.json.decode(JSON.encode(MailItem(message=message, state="pending")))
    assert set(inbox) == {"message", "state"}
    sent = msgspec.json.decode(JSON.encode(MailItem(message=message, deliveries=[])))
    assert set(sent) == {"message", "deliveries"}


def test_error_without_id_encodes_null_id() -> None:
    assert JSON.encode(Error(id=None, code=413, message="too big")) == (
        b'{"type":"error","id":null,"code":413,"message":"too big"}'
    )


def test_end_without_error_encodes_explicit_null() -> None:
    body = JSON.encode(End(id=7, status="done", error=None, last_seq=12))
    assert body == b'{"type":"end","id":7,"status":"done","error":null,"last_seq":12}'
    detached = JSON.encode(End(id=7, status="detached", error=None, last_seq=None))
    assert detached == b'{"type":"end","id":7,"status":"detached","error":null,"last_seq":null}'


def test_end_without_error_encodes_explicit_nil_in_msgpack() -> None:
    raw = msgspec.msgpack.decode(MSGPACK.encode(End(id=7, status="done", error=None, last_seq=12)))
    assert raw == {"type": "end", "id": 7, "status": "done", "error": None, "last_seq": 12}
    assert b"\xa5error\xc0" in MSGPACK.encode(End(id=7, status="done", error=None, last_seq=12))


def test_end_with_error_json_bytes() -> None:
    msg = End(id=2, status="error", error=ErrorInfo(code=502, message="boom"), last_seq=None)
    assert JSON.encode(msg) == (
        b'{"type":"end","id":2,"status":"error",'
        b'"error":{"code":502,"message":"boom"},"last_seq":null}'
    )


def test_stream_event_json_bytes_carry_the_request_id() -> None:
    assert (
        JSON.encode(TextDelta(id=3, delta="Hel")) == b'{"type":"text_delta","id":3,"delta":"Hel"}'
    )


def test_event_nests_the_stream_event_without_id_json() -> None:
    msg = Event(id=3, agent="a", sender="u", run_id="r1", event=TextDelta(delta="hi"))
    assert JSON.encode(msg) == (
        b'{"type":"event","id":3,"agent":"a","sender":"u","run_id":"r1",'
        b'"event":{"type":"text_delta","delta":"hi"}}'
    )


def test_event_nests_end_without_id_but_with_null_error() -> None:
    msg = Event(
        id=3, agent="a", sender="u", run_id="r1", event=End(status="done", error=None, last_seq=5)
    )
    assert JSON.encode(msg) == (
        b'{"type":"event","id":3,"agent":"a","sender":"u","run_id":"r1",'
        b'"event":{"type":"end","status":"done","error":null,"last_seq":5}}'
    )


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "msg", [m for m in SERVER_EXAMPLES if isinstance(m, Event)], ids=lambda m: _tag(m.event)
)
def test_nested_event_has_no_id_key(codec: Codec, msg: Event) -> None:
    body = codec.encode(msg)
    raw = _raw(codec, body)
    assert raw["id"] == msg.id
    assert "id" not in raw["event"]
    decoded = codec.decode_server(body)
    assert isinstance(decoded, Event)
    assert decoded.event.id is None


def test_pong_msgpack_bytes() -> None:
    # fixmap(2) "type" "pong" "id" 5
    assert MSGPACK.encode(Pong(id=5)) == b"\x82\xa4type\xa4pong\xa2id\x05"


def test_ping_msgpack_from_a_foreign_client_decodes() -> None:
    assert MSGPACK.decode_client(b"\x82\xa2id\x05\xa4type\xa4ping") == Ping(id=5)


def test_history_entry_json_shape() -> None:
    entry = Entry(
        seq=2,
        role="assistant",
        content="x",
        tool_calls=[ToolCallInfo(call_id="c1", name="ls", arguments="{}")],
        run_id="r1",
        created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )
    body = JSON.encode(
        History(id=1, agent="a", sender="u", title="", cwd=None, entries=[entry], last_seq=2)
    )
    assert body == (
        b'{"type":"history","id":1,"agent":"a","sender":"u","title":"","cwd":null,'
        b'"entries":[{"seq":2,"kind":"message","role":"assistant","content":"x","agent":"",'
        b'"tool_calls":[{"call_id":"c1","name":"ls","arguments":"{}"}],'
        b'"tool_call_id":null,"is_error":false,"run_id":"r1",'
        b'"created_at":"2024-05-01T12:00:00Z","archive":null,"usage":null}],"last_seq":2}'
    )


# --- datetimes ------------------------------------------------------------------

RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})",
)


@pytest.mark.parametrize("when", [CREATED, UPDATED], ids=["utc", "plus-two"])
def test_json_datetimes_are_rfc3339_strings(when: datetime) -> None:
    body = JSON.encode(Entry(seq=1, created_at=when))
    text = msgspec.json.decode(body)["created_at"]
    assert isinstance(text, str)
    assert RFC3339.fullmatch(text), text
    assert datetime.fromisoformat(text) == when
    items = [ConversationItem(agent="a", sender="u", created_at=when, updated_at=when)]
    listing = Conversations(id=1, items=items, next_cursor=None)
    assert JSON.decode_server(JSON.encode(listing)) == listing


def test_json_datetime_with_offset_decodes_to_the_same_instant() -> None:
    body = (
        b'{"type":"conversations","id":1,"next_cursor":null,"items":[{"agent":"a","sender":"u",'
        b'"created_at":"2024-05-01T14:30:45.123456+02:00","updated_at":"2024-05-01T12:30:45.123456Z"}]}'
    )
    msg = JSON.decode_server(body)
    assert isinstance(msg, Conversations)
    assert msg.items[0].created_at == CREATED
    assert msg.items[0].updated_at == CREATED
    assert msg.items[0].created_at.utcoffset() == timedelta(hours=2)


def _msgpack_timestamp(when: datetime) -> bytes:
    """The msgpack spec's timestamp extension (type -1), smallest form."""
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    seconds = delta.days * 86400 + delta.seconds
    nanos = delta.microseconds * 1000
    if seconds >> 34 == 0:
        if nanos == 0 and seconds >> 32 == 0:
            return b"\xd6\xff" + struct.pack(">I", seconds)
        return b"\xd7\xff" + struct.pack(">Q", (nanos << 34) | seconds)
    return b"\xc7\x0c\xff" + struct.pack(">Iq", nanos, seconds)


@pytest.mark.parametrize(
    ("when", "prefix"),
    [
        (datetime(2024, 5, 1, 12, 0, tzinfo=UTC), b"\xd6\xff"),  # timestamp 32
        (CREATED, b"\xd7\xff"),  # timestamp 64
        (UPDATED, b"\xd7\xff"),  # an offset is the same instant in UTC
        (datetime(1960, 1, 1, tzinfo=UTC), b"\xc7\x0c\xff"),  # timestamp 96, before the epoch
    ],
    ids=["ts32", "ts64", "ts64-offset", "ts96"],
)
def test_msgpack_datetimes_are_timestamp_extensions(when: datetime, prefix: bytes) -> None:
    body = MSGPACK.encode(Entry(seq=1, created_at=when))
    key = b"\xaacreated_at"  # fixstr(10)
    value = body[body.index(key) + len(key) :]
    assert value.startswith(prefix)
    # fixext 4 / fixext 8 put the ext type right after the marker; ext 8 after its length byte
    ext_type = value[2] if value[0] == 0xC7 else value[1]
    assert struct.unpack(">b", bytes([ext_type]))[0] == -1
    assert value.startswith(_msgpack_timestamp(when))
    decoded = MSGPACK.decode_server(
        MSGPACK.encode(
            History(
                id=1,
                agent="a",
                sender="u",
                title="",
                cwd=None,
                entries=[Entry(seq=1, created_at=when)],
                last_seq=1,
            )
        )
    )
    assert isinstance(decoded, History)
    assert decoded.entries[0].created_at == when
    assert decoded.entries[0].created_at.tzinfo is not None


def test_msgpack_datetime_is_not_a_string() -> None:
    raw = msgspec.msgpack.decode(MSGPACK.encode(Entry(seq=1, created_at=CREATED)))
    assert raw["created_at"] == CREATED  # msgspec maps ext -1 back to a datetime
    assert CREATED.isoformat().encode() not in MSGPACK.encode(Entry(seq=1, created_at=CREATED))


# --- choosing the encoding --------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "encoding"),
    [
        (b"{", Encoding.JSON),
        (b'{"type":"hello","protocol":1}', Encoding.JSON),
        (b"\x82\xa4type", Encoding.MSGPACK),
        (b"\xde\x00\x02", Encoding.MSGPACK),
        (b" {", Encoding.MSGPACK),  # the first byte decides; no whitespace skipping
        (b"[", Encoding.MSGPACK),
        (b"\x7b"[:0], Encoding.MSGPACK),
    ],
    ids=["brace", "hello", "fixmap", "map16", "space-brace", "bracket", "empty"],
)
def test_encoding_of_first_byte(first: bytes, encoding: Encoding) -> None:
    assert Encoding.of(first) is encoding


@pytest.mark.parametrize(
    "msg", [*CLIENT_EXAMPLES, *SERVER_EXAMPLES], ids=_ids([*CLIENT_EXAMPLES, *SERVER_EXAMPLES])
)
def test_encoding_of_recognises_each_codecs_output(msg: msgspec.Struct) -> None:
    assert Encoding.of(JSON.encode(msg)) is Encoding.JSON
    assert Encoding.of(MSGPACK.encode(msg)) is Encoding.MSGPACK
