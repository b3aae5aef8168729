"""Mail: the messages of agents and people writing to each other (the `mail` feature).

A participant (a configured agent, an outside agent session, a person) has a
name; mail goes from one name to others, `@role` and `@everyone` fan out, and a
reply threads under its parent. Each recipient's delivery moves forward only:
`pending` -> `delivered` -> `read`. `watch` pushes each message the moment it
is stored. ``from`` and ``as`` are Python keywords, so those fields are named
``sender``/``reader`` here and renamed on the wire.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from ._messages import Request, ServerMessage

MailFormat = Literal["markdown", "plain", "json"]
DeliveryState = Literal["pending", "delivered", "read"]
ParticipantKind = Literal["agent", "session", "person"]

DELIVERY_ORDER: dict[str, int] = {"pending": 0, "delivered": 1, "read": 2}
"""A delivery state's rank: a state only ever moves to a higher one."""


# --- values ---------------------------------------------------------------------


class Ref(msgspec.Struct, kw_only=True):
    """What a message is about (`scopes`) or points to (`refs`): ``module:auth``, ``pr:7``."""

    type: str
    value: str


class Reaction(msgspec.Struct, kw_only=True):
    emoji: str
    by: list[str]


class MailMessage(msgspec.Struct, kw_only=True):
    """A stored message, as every reply and push carries it."""

    msg_id: str  # unique in the store; sorts in creation order
    sender: str = msgspec.field(name="from")
    to: list[str]  # as the author wrote it: names, `@role`, `@everyone`
    recipients: list[str]  # `to` and `mentions` resolved to names, the author left out
    content: str
    created_at: datetime
    thread_id: str | None = None  # the msg_id of the thread's first message
    format: MailFormat = "markdown"
    structured: Any = None
    priority: int = 1
    channel: str | None = None
    reply_to: str | None = None
    scopes: list[Ref] = msgspec.field(default_factory=list)
    refs: list[Ref] = msgspec.field(default_factory=list)  # mentions included, type `mention`
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    mentions: list[str] = msgspec.field(default_factory=list)
    idempotency_key: str | None = None
    space: str | None = None
    edited_at: datetime | None = None
    version: int = 1
    deleted: bool = False
    delete_reason: str | None = None
    reactions: list[Reaction] = msgspec.field(default_factory=list)
    pinned: bool = False
    run_id: str | None = None  # the hosted agent's run that answered it, or that it answers
    answered_by: str | None = None  # the msg_id of a hosted agent's answer to it


class Delivery(msgspec.Struct, kw_only=True):
    """One recipient's copy of a message: where it stands, and since when."""

    name: str
    state: DeliveryState = "pending"
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    mentioned: bool = False  # named by `@name` or one of its `@role`s


class MailItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A message in a `messages` page: ``state`` for the reader (`inbox`, `thread`), or
    ``deliveries`` for its author (`sent`)."""

    message: MailMessage
    state: DeliveryState | None = None  # None: the reader is not among its recipients
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    deliveries: list[Delivery] | None = None


class Participant(msgspec.Struct, kw_only=True):
    name: str
    kind: ParticipantKind = "session"
    roles: list[str] = msgspec.field(default_factory=list)
    online: bool = False
    last_seen: datetime | None = None
    status: str = ""
    info: dict[str, Any] = msgspec.field(default_factory=dict)
    unread: int = 0


class ThreadSummary(msgspec.Struct, kw_only=True):
    thread_id: str
    last_msg_id: str
    last_from: str
    unread: int


# --- requests ---------------------------------------------------------------------


class Register(Request, tag="register", kw_only=True):
    name: str
    kind: ParticipantKind = "session"
    roles: list[str] = msgspec.field(default_factory=list)
    info: dict[str, Any] = msgspec.field(default_factory=dict)
    takeover: bool = False


class Heartbeat(Request, tag="heartbeat", kw_only=True):
    name: str
    status: str | None = None


class ListParticipants(Request, tag="participants", kw_only=True):
    online_only: bool = False
    role: str | None = None


class Post(Request, tag="post", kw_only=True):
    sender: str = msgspec.field(name="from")
    content: str
    to: list[str] = msgspec.field(default_factory=list)
    format: MailFormat = "markdown"
    structured: Any = None
    priority: int = 1
    channel: str | None = None
    reply_to: str | None = None
    scopes: list[Ref] = msgspec.field(default_factory=list)
    refs: list[Ref] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    mentions: list[str] = msgspec.field(default_factory=list)
    idempotency_key: str | None = None


class Inbox(Request, tag="inbox", kw_only=True):
    reader: str = msgspec.field(name="as")
    unread_only: bool = False
    mentions_only: bool = False
    thread_id: str | None = None
    channel: str | None = None
    scope: str | None = None  # "type:value"
    priority_min: int = 0
    since: str | None = None  # an RFC 3339 time, or a duration back from now: 30m, 2h, 1d
    limit: int = 50
    cursor: str | None = None
    mark_read: bool = False


class Sent(Request, tag="sent", kw_only=True):
    reader: str = msgspec.field(name="as")
    limit: int = 50
    cursor: str | None = None


class GetThread(Request, tag="thread", kw_only=True):
    reader: str = msgspec.field(name="as")
    thread_id: str


class MarkRead(Request, tag="mark_read", kw_only=True):
    reader: str = msgspec.field(name="as")
    msg_ids: list[str] | None = None
    thread_id: str | None = None
    all: bool = False


class GetMessage(Request, tag="get_message", kw_only=True):
    reader: str = msgspec.field(name="as")
    msg_id: str


class Watch(Request, tag="watch", kw_only=True):
    reader: str = msgspec.field(name="as")
    after: str | None = None


class GetContext(Request, tag="context", kw_only=True):
    reader: str = msgspec.field(name="as")


# --- replies ----------------------------------------------------------------------


class Registered(ServerMessage, tag="registered"):
    id: int
    participant: Participant


class Participants(ServerMessage, tag="participants"):
    id: int
    items: list[Participant]


class Posted(ServerMessage, tag="posted"):
    id: int
    msg_id: str
    thread_id: str | None
    recipients: list[str]
    created_at: datetime
    warnings: list[str] = msgspec.field(default_factory=list)


class Messages(ServerMessage, tag="messages"):
    id: int
    items: list[MailItem]
    next_cursor: str | None = None
    unread: int = 0


class MessageReply(ServerMessage, tag="message"):
    id: int
    message: MailMessage
    state: DeliveryState | None = None  # the reader's, when it is a recipient


class Watching(ServerMessage, tag="watching"):
    id: int
    cursor: str | None  # the newest msg_id the reader had received before this watch


class Mail(ServerMessage, tag="mail"):
    """A message pushed to a `watch`: new for the watcher, in msg_id order."""

    id: int
    msg_id: str
    message: MailMessage


class MailContext(ServerMessage, tag="context"):
    id: int
    name: str
    unread: int
    unread_by_priority: dict[int, int]  # priority -> unread count, 0 to 3
    threads: list[ThreadSummary]  # threads with unread mail, newest first
    participant: Participant | None = None
