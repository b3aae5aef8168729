"""Every message of protocol version 1 as msgspec Structs.

Client messages and server frames are two tagged unions (``tag_field="type"``).
Stream events carry ``id: int | None``: the runtime makes them without an id,
the transport stamps the id of the request they answer, and a `subscribe`
frame nests them without one (``omit_defaults`` drops the null id, and every
other event field is required so that nothing else is ever dropped).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

import msgspec

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

QueuePolicy = Literal["enqueue", "reject", "interrupt"]
EndStatus = Literal["done", "killed", "error", "detached", "idle"]


# --- shared value types -----------------------------------------------------


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: int
    message: str


class ToolCallInfo(msgspec.Struct, kw_only=True):
    call_id: str
    name: str
    arguments: str  # JSON text, as the model produced it


class TokenUsage(msgspec.Struct, kw_only=True):
    """The tokens one model call consumed, as its provider reported them."""

    input_tokens: int
    output_tokens: int


class Entry(msgspec.Struct, kw_only=True):
    """One history entry of a conversation."""

    seq: int
    kind: Literal["message", "compact"] = "message"
    role: str = ""
    content: str = ""
    agent: str = ""  # empty for the primary agent, the guest's name on a guest turn
    tool_calls: list[ToolCallInfo] = msgspec.field(default_factory=list)
    tool_call_id: str | None = None
    is_error: bool = False
    run_id: str | None = None
    created_at: datetime | None = None
    archive: str | None = None
    # On an assistant entry (and a compaction's marker): its model call's tokens, where
    # the provider reported them. The store adds them to the conversation's usage totals.
    usage: TokenUsage | None = None


class UsageTotal(msgspec.Struct, kw_only=True):
    """A conversation's model tokens on one day (UTC), kept by the store for good:
    compaction and restarts do not lower them."""

    agent: str
    sender: str
    day: date
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0  # model calls that reported usage


class MemoryHit(msgspec.Struct, kw_only=True):
    """A note or an archive of an agent's memory that matched a search, best first."""

    kind: Literal["archive", "note"]
    name: str
    sender: str | None  # the archived conversation's sender; None for a note
    snippet: str  # the matching text, matched words in [brackets]
    created_at: datetime | None  # when archived, or when the note was last written


class ConversationLimits(msgspec.Struct, kw_only=True):
    """An agent's limits on each of its conversations' live history; null where unset."""

    max_messages: int | None = None
    max_tokens: int | None = None
    expires_after: str | None = None  # a duration, as configured: "12h", "7d"


class ConversationItem(msgspec.Struct, kw_only=True):
    agent: str
    sender: str
    title: str = ""
    cwd: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_seq: int = 0
    running: bool = False
    # Usage of the live history (since the latest compaction) against `limits`;
    # all null when the agent sets no limit.
    messages: int | None = None  # user and assistant entries
    tokens: int | None = None  # estimated
    expires_at: datetime | None = None  # with expires_after: when streams start being refused
    limits: ConversationLimits | None = None
    # Every model call's tokens since the conversation began (the `usage` feature).
    tokens_in: int = 0
    tokens_out: int = 0


class AgentItem(msgspec.Struct, kw_only=True):
    name: str
    description: str = ""
    model: str = ""
    tools: list[str] = msgspec.field(default_factory=list)


class AskOption(msgspec.Struct, kw_only=True):
    label: str
    description: str = ""


class AskQuestion(msgspec.Struct, kw_only=True):
    question: str
    header: str = ""
    options: list[AskOption] = msgspec.field(default_factory=list)
    multi_select: bool = False


# --- client -> server ---------------------------------------------------------


class ClientMessage(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every client message; `type` is the tag."""


class Hello(ClientMessage, tag="hello"):
    protocol: int
    client: str
    token: str | None = None
    # Additive server frames this client understands and wants (see FEATURES);
    # a v1 client that names none never receives one.
    features: list[str] = msgspec.field(default_factory=list)


class Request(ClientMessage):
    """A client message that opens a request: every type but `hello`."""

    id: int


class Stream(Request, tag="stream", kw_only=True):
    agent: str
    content: str
    sender: str | None = None
    guest: str | None = None
    cwd: str | None = None
    queue: QueuePolicy = "enqueue"


class Kill(Request, tag="kill", kw_only=True):
    agent: str
    sender: str | None = None
    all: bool = False


class Attach(Request, tag="attach", kw_only=True):
    agent: str
    sender: str | None = None


class Compact(Request, tag="compact", kw_only=True):
    agent: str
    sender: str | None = None
    instructions: str | None = None


class ReplyToAsk(Request, tag="reply_to_ask", kw_only=True):
    agent: str
    content: str
    sender: str | None = None
    ask_id: str | None = None


class GetHistory(Request, tag="get_history", kw_only=True):
    agent: str
    sender: str | None = None
    after_seq: int = 0
    limit: int | None = None
    include_archived: bool = False


class ListConversations(Request, tag="list_conversations", kw_only=True):
    agent: str | None = None
    sender: str | None = None
    limit: int = 100
    cursor: str | None = None
    query: str | None = None  # the `conversation_search` feature: title or sender contains it


class ListAgents(Request, tag="list_agents", kw_only=True):
    pass


class Subscribe(Request, tag="subscribe", kw_only=True):
    agent: str | None = None
    sender: str | None = None


class Cancel(Request, tag="cancel", kw_only=True):
    target: int


class Ping(Request, tag="ping", kw_only=True):
    pass


class GetStats(Request, tag="stats", kw_only=True):
    pass


class SearchMemory(Request, tag="search_memory", kw_only=True):
    agent: str
    query: str
    limit: int = 10


class GetUsage(Request, tag="usage", kw_only=True):
    """The stored usage totals, a row per conversation and day (the `usage` feature)."""

    agent: str | None = None
    sender: str | None = None
    since: str | None = None  # a duration back from now ("7d", "12h") or a day ("2026-12-01")


# --- server -> client ---------------------------------------------------------


class ServerMessage(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every server frame; `type` is the tag."""


class Welcome(ServerMessage, tag="welcome"):
    protocol: int
    server: str
    agents: list[str]
    max_frame_bytes: int
    features: list[str] = msgspec.field(default_factory=list)  # what this daemon offers
    speaks_as: str | None = None  # on TCP: the name the hello's token speaks as


FEATURES = (
    "compaction",
    "search_memory",
    "history_pages",
    "mail",
    "usage",
    "daemons",
    "tcp",
    "mail_read",
    "conversation_search",
    "speaks_as",
)
"""This daemon's additions to v1: the `compaction` event, sent only to a client
whose `hello` names it, the `search_memory` request, and `history_pages`: a
`get_history` without `limit` answers one page (200 entries at most), and `mail`
(agents and people messaging each other, protocol/_mail.py), and `usage`: stored
token totals, asked with the `usage` request and carried by `stats` and
`list_conversations`, and `daemons`: on a store several daemons share, control
requests reach the daemon running the conversation, `attach` and `subscribe` see
runs on every daemon, and `stats` lists the daemons, and `tcp`: on a TCP connection
(`listen_tcp`, TLS) the hello's token holds every request to the name it speaks as:
a sender, author or reader outside it is 401, one left out is the token's own, so
reads are confined to it, and `speaks_as`: on TCP, the welcome's `speaks_as` names
it, and `mail_read`: a
`watch` with `reads` is told, in `mail_read` frames, when the reader's mail becomes
`read`, whichever client or daemon read it, and `conversation_search`:
`list_conversations` takes a `query` and lists only the conversations whose title or
sender contains it, casefolded."""


class Error(ServerMessage, tag="error"):
    id: int | None
    code: int
    message: str


class StreamEvent(ServerMessage, omit_defaults=True):
    """An event of a run; `id` is stamped per request, absent when nested."""

    id: int | None = None


class Queued(StreamEvent, tag="queued", kw_only=True):
    position: int


class Start(StreamEvent, tag="start", kw_only=True):
    run_id: str
    agent: str
    seq: int


class TextDelta(StreamEvent, tag="text_delta", kw_only=True):
    delta: str


class ThinkingDelta(StreamEvent, tag="thinking_delta", kw_only=True):
    delta: str


class ToolCall(StreamEvent, tag="tool_call", kw_only=True):
    call_id: str
    name: str
    arguments: str


class ToolResult(StreamEvent, tag="tool_result", kw_only=True):
    call_id: str
    output: str
    is_error: bool
    duration_ms: float


class AskUser(StreamEvent, tag="ask_user", kw_only=True):
    ask_id: str
    questions: list[AskQuestion]


class Title(StreamEvent, tag="title", kw_only=True):
    title: str


class Usage(StreamEvent, tag="usage", kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int
    context_window: int


class Compaction(StreamEvent, tag="compaction", kw_only=True):
    """The conversation was compacted automatically before this run began."""

    archive: str
    summary: str
    archived_entries: int


class End(StreamEvent, tag="end", kw_only=True):
    status: EndStatus
    error: ErrorInfo | None
    last_seq: int | None


StreamEventMsg = (
    Queued
    | Start
    | TextDelta
    | ThinkingDelta
    | ToolCall
    | ToolResult
    | AskUser
    | Title
    | Usage
    | Compaction
    | End
)


class Killed(ServerMessage, tag="killed"):
    id: int
    run_id: str | None


class Compacted(ServerMessage, tag="compacted"):
    id: int
    archive: str
    summary: str
    archived_entries: int


class Ok(ServerMessage, tag="ok"):
    id: int


class History(ServerMessage, tag="history"):
    id: int
    agent: str
    sender: str
    title: str
    cwd: str | None
    entries: list[Entry]
    last_seq: int


class Conversations(ServerMessage, tag="conversations"):
    id: int
    items: list[ConversationItem]
    next_cursor: str | None


class Agents(ServerMessage, tag="agents"):
    id: int
    items: list[AgentItem]


class Subscribed(ServerMessage, tag="subscribed"):
    id: int


class Event(ServerMessage, tag="event"):
    id: int
    agent: str
    sender: str
    run_id: str
    event: StreamEventMsg


class Memory(ServerMessage, tag="memory"):
    id: int
    items: list[MemoryHit]


class Pong(ServerMessage, tag="pong"):
    id: int


class WebhookBacklog(msgspec.Struct, kw_only=True):
    """One configured webhook's outbox, as the daemon last read it."""

    name: str  # the webhook's `name`, or the one derived from its url, events and to
    pending: int = 0  # deliveries still to make
    retrying: int = 0  # of those, the ones that failed at least once
    failed: int = 0  # deliveries given up after 24 hours of retries


class DaemonInfo(msgspec.Struct, kw_only=True):
    """A daemon sharing the store, as its row of liveness says (the `daemons` feature)."""

    id: str  # its id among the daemons, for logs and errors
    host: str  # the machine it runs on
    pid: int
    address: str  # where clients reach it
    started_at: datetime
    beat_at: datetime  # its latest heartbeat
    runs_in_flight: int = 0  # at that beat
    this: bool = False  # the daemon that answered


class Stats(ServerMessage, tag="stats"):
    id: int
    uptime_s: float
    connections: int
    conversations: int
    runs_in_flight: int
    runs_queued: int = 0
    runs_total: int = 0
    subscriptions: int = 0
    participants_online: int = 0  # mail: names registered on live connections
    watches: int = 0  # mail: open `watch` requests
    webhooks: list[WebhookBacklog] = msgspec.field(default_factory=list)  # mail: each outbox
    tokens_in: int = 0  # usage: every model call's tokens the store holds, all conversations
    tokens_out: int = 0
    # daemons: every live daemon on a shared store, this one included; empty when alone
    daemons: list[DaemonInfo] = msgspec.field(default_factory=list)


class UsageTotals(ServerMessage, tag="usage_totals"):
    id: int
    items: list[UsageTotal]  # by day, then agent, then sender
