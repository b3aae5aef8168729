"""The two tagged unions a codec decodes: every client message, every server frame."""

from __future__ import annotations

from ._mail import (
    GetContext,
    GetMessage,
    GetThread,
    Heartbeat,
    Inbox,
    ListParticipants,
    Mail,
    MailContext,
    MarkRead,
    MessageReply,
    Messages,
    Participants,
    Post,
    Posted,
    Register,
    Registered,
    Sent,
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
    | Registered
    | Participants
    | Posted
    | Messages
    | MessageReply
    | Watching
    | Mail
    | MailContext
)
