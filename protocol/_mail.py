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
LockMode = Literal["advisory", "exclusive"]
ChangeKind = Literal["edit", "delete", "react", "pin"]

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
    pinned_by: str | None = None
    pinned_at: datetime | None = None
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
    focus: str | None = None  # the project its inbox, spaces and search are narrowed to


class MessageVersion(msgspec.Struct, kw_only=True):
    """A message's text as it was before an edit: ``version`` n held it until ``replaced_at``."""

    version: int
    content: str
    structured: Any = None
    created_at: datetime  # when this version was written (the post, or the edit before)
    replaced_at: datetime


class Space(msgspec.Struct, kw_only=True):
    """A broadcast group: mail to ``#name`` reaches every member but the author."""

    name: str
    description: str = ""
    parent: str | None = None  # nesting at most 3 deep
    project: str | None = None
    private: bool = False  # by invitation: only members post to it, read it, or list it
    archived: bool = False  # takes no more mail; still readable
    created_by: str
    created_at: datetime
    members: int = 0  # counts, filled in by the daemon's replies (a store keeps them 0)
    messages: int = 0


class SpaceMember(msgspec.Struct, kw_only=True):
    name: str
    joined_at: datetime
    online: bool = False  # filled in by the daemon


class Project(msgspec.Struct, kw_only=True):
    name: str
    description: str = ""
    path: str | None = None
    repository: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    status: str = "active"
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created_by: str
    created_at: datetime
    updated_at: datetime


class LockHolder(msgspec.Struct, kw_only=True):
    """One holder of a lock on ``resource``, until ``expires_at`` unless renewed."""

    resource: str
    holder: str
    mode: LockMode
    acquired_at: datetime
    expires_at: datetime


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
    pinned_only: bool = False
    space: str | None = None  # the space's mail the reader may read, received or not
    project: str | None = None  # mail in the project's spaces; default: the reader's focus
    include_deleted: bool = False


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
    space: str | None = None
    all: bool = False


class GetMessage(Request, tag="get_message", kw_only=True):
    reader: str = msgspec.field(name="as")
    msg_id: str
    history: bool = False  # also every earlier version (`versions`)


class Watch(Request, tag="watch", kw_only=True):
    reader: str = msgspec.field(name="as")
    after: str | None = None
    updates: bool = False  # also push `mail_update` for each change to the reader's mail
    reads: bool = False  # also push `mail_read` when the reader's copies become `read`


class GetContext(Request, tag="context", kw_only=True):
    reader: str = msgspec.field(name="as")


class Edit(Request, tag="edit", kw_only=True):
    sender: str = msgspec.field(name="from")
    msg_id: str
    content: str
    structured: Any = None


class Delete(Request, tag="delete", kw_only=True):
    sender: str = msgspec.field(name="from")
    msg_id: str
    reason: str | None = None


class React(Request, tag="react", kw_only=True):
    sender: str = msgspec.field(name="from")
    msg_id: str
    emoji: str
    remove: bool = False


class Pin(Request, tag="pin", kw_only=True):
    sender: str = msgspec.field(name="from")
    msg_id: str
    unpin: bool = False


class SearchMail(Request, tag="search_mail", kw_only=True):
    reader: str = msgspec.field(name="as")
    query: str
    limit: int = 20
    project: str | None = None  # default: the reader's focus


class SpaceCreate(Request, tag="space_create", kw_only=True):
    sender: str = msgspec.field(name="from")
    name: str
    description: str = ""
    parent: str | None = None
    project: str | None = None
    private: bool = False


class SpaceJoin(Request, tag="space_join", kw_only=True):
    sender: str = msgspec.field(name="from")
    space: str


class SpaceLeave(Request, tag="space_leave", kw_only=True):
    sender: str = msgspec.field(name="from")
    space: str


class SpaceInvite(Request, tag="space_invite", kw_only=True):
    sender: str = msgspec.field(name="from")
    space: str
    name: str


class SpaceArchive(Request, tag="space_archive", kw_only=True):
    sender: str = msgspec.field(name="from")
    space: str


class SpaceMembers(Request, tag="space_members", kw_only=True):
    space: str
    reader: str | None = msgspec.field(default=None, name="as")  # needed for a private space


class ListSpaces(Request, tag="spaces", kw_only=True):
    reader: str | None = msgspec.field(default=None, name="as")
    project: str | None = None  # default: the reader's focus
    parent: str | None = None
    top_level: bool = False
    include_archived: bool = False


class ProjectCreate(Request, tag="project_create", kw_only=True):
    sender: str = msgspec.field(name="from")
    name: str
    description: str = ""
    path: str | None = None
    repository: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    status: str = "active"
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class ProjectGet(Request, tag="project_get", kw_only=True):
    project: str


class ListProjects(Request, tag="projects", kw_only=True):
    status: str | None = None
    tag: str | None = None


class ProjectUpdate(Request, tag="project_update", kw_only=True):
    """Each field given replaces the stored one; a field left out keeps it."""

    sender: str = msgspec.field(name="from")
    project: str
    description: str | None = None
    path: str | None = None
    repository: str | None = None
    tags: list[str] | None = None
    status: str | None = None
    settings: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class ProjectDelete(Request, tag="project_delete", kw_only=True):
    sender: str = msgspec.field(name="from")
    project: str


class Focus(Request, tag="focus", kw_only=True):
    reader: str = msgspec.field(name="as")
    project: str | None = None  # None clears it


class Lock(Request, tag="lock", kw_only=True):
    sender: str = msgspec.field(name="from")
    resource: str
    mode: LockMode = "exclusive"
    ttl_s: float = 300.0


class Unlock(Request, tag="unlock", kw_only=True):
    sender: str = msgspec.field(name="from")
    resource: str


class ListLocks(Request, tag="locks", kw_only=True):
    resource: str | None = None
    holder: str | None = None


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
    versions: list[MessageVersion] | None = None  # with `history`: the earlier ones, oldest first


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
    spaces: list[str] = msgspec.field(default_factory=list)  # the spaces it is a member of
    locks: list[LockHolder] = msgspec.field(default_factory=list)  # the locks it holds
    focus: str | None = None


class MailUpdate(ServerMessage, tag="mail_update"):
    """A change to a message a `watch` received: ``message`` as it is now."""

    id: int
    msg_id: str
    change: ChangeKind
    message: MailMessage


class MailRead(ServerMessage, tag="mail_read"):
    """The reader's copies of ``msg_ids`` became `read` (through any client, on any daemon),
    in msg_id order; a `watch` with ``reads`` gets it. A read of many messages comes in
    several frames, each within ``max_frame_bytes``."""

    id: int
    msg_ids: list[str]


class Spaces(ServerMessage, tag="spaces"):
    id: int
    items: list[Space]


class SpaceReply(ServerMessage, tag="space"):
    id: int
    space: Space


class Members(ServerMessage, tag="members"):
    id: int
    items: list[SpaceMember]


class Projects(ServerMessage, tag="projects"):
    id: int
    items: list[Project]


class ProjectReply(ServerMessage, tag="project"):
    id: int
    project: Project


class LockResult(ServerMessage, tag="lock_result"):
    id: int
    acquired: bool
    holders: list[LockHolder]  # every live holder, the caller included when acquired
    expires_at: datetime | None  # the caller's, when acquired


class Locks(ServerMessage, tag="locks"):
    id: int
    items: list[LockHolder]
