"""The two tagged unions a codec decodes: every client message, every server frame."""

from __future__ import annotations

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
    SearchMemory,
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

ClientMsg = (
    Hello
    | Stream
    | Kill
    | Attach
    | Compact
    | ReplyToAsk
    | GetHistory
    | ListConversations
    | ListAgents
    | Subscribe
    | Cancel
    | Ping
    | GetStats
    | GetUsage
    | SearchMemory
    | Register
    | Heartbeat
    | ListParticipants
    | Post
    | Inbox
    | Sent
    | GetThread
    | MarkRead
    | GetMessage
    | Watch
    | GetContext
    | Edit
    | Delete
    | React
    | Pin
    | SearchMail
    | SpaceCreate
    | SpaceJoin
    | SpaceLeave
    | SpaceInvite
    | SpaceArchive
    | SpaceMembers
    | ListSpaces
    | ProjectCreate
    | ProjectGet
    | ListProjects
    | ProjectUpdate
    | ProjectDelete
    | Focus
    | Lock
    | Unlock
    | ListLocks
)

ServerMsg = (
    Welcome
    | Error
    | Queued
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
    | Killed
    | Compacted
    | Ok
    | History
    | Conversations
    | Agents
    | Subscribed
    | Event
    | Memory
    | Pong
    | Stats
    | UsageTotals
    | Registered
    | Participants
    | Posted
    | Messages
    | MessageReply
    | Watching
    | Mail
    | MailContext
    | MailUpdate
    | MailRead
    | Spaces
    | SpaceReply
    | Members
    | Projects
    | ProjectReply
    | LockResult
    | Locks
)
