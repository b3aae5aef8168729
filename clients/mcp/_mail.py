"""Mail tools: an outside agent (Claude Code, Codex, ...) taking part in chinwag's mail.

The MCP session is one participant, its identity: ``$CHINWAG_NAME``, else the
name its token speaks as (over TCP), else the MCP client's name folded to the
participant alphabet. The first mail tool (any
tool here, or the server's send_message with ``to``, which calls ``send``)
registers it on a connection the server keeps while the identity lasts (a
registration lives as long as its connection: that is the identity's
presence), and the same connection watches the identity's mail into a log the
tools read (a session that never uses mail registers nothing). So no message
arriving between two tool calls goes unseen, and the answer to a message sent
with ``wait`` cannot come before anyone watches for it: the watch runs before
the message is posted. When the connection drops (the daemon restarted), the
next tool call registers again and watches with ``after`` set to the last
msg_id it got, and the daemon replays what came meanwhile.

``wait_for_message`` hands out the log in msg_id order, one message a call:
first the mail still unread when the identity was registered, then what
arrives, skipping what another tool already showed this session.
"""

from __future__ import annotations

import os
import re
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import anyio
import anyio.abc
import msgspec
from chinwag.protocol import MailItem, MailMessage, Participant, Posted
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from .._client import ChinwagError, Client
from .._settings import describe

NAME_ALPHABET = re.compile(r"[^a-z0-9_.:-]+")
RESERVED = frozenset({"everyone", "all", "daemon", "system", "chinwag"})
# The identity's arrived mail kept for wait_for_message and waiting senders;
# anything older stays in the inbox, for read_messages.
LOG_SIZE = 1000
# Unread mail from before the identity was registered taken into the log.
UNREAD_SEED = 200
PRIORITY_NAMES = {0: "routine", 1: "normal", 2: "high", 3: "critical"}
# How long a send or reply with wait waits for the reply unless told.
MAIL_WAIT_S = 120.0

Content = Annotated[str, Field(description="The message (markdown).")]
Wait = Annotated[
    bool,
    Field(
        description="Wait for the first reply to this message and return it. A hosted "
        "agent always answers mail to it; people and other sessions may not."
    ),
]
WaitTimeout = Annotated[
    float,
    Field(ge=0, description="With wait: give up waiting after this many seconds."),
]
Priority = Annotated[int, Field(ge=0, le=3, description="0 routine, 1 normal, 2 high, 3 critical.")]


def fold_name(raw: str) -> str:
    """``raw`` (an MCP client's name) as a participant name: ``Claude Code`` -> ``claude-code``."""
    ascii_text = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode()
    name = NAME_ALPHABET.sub("-", ascii_text.casefold())
    name = name.lstrip("_.:-")[:64].rstrip("_.:-")
    if not name:
        return "mcp-client"
    if name in RESERVED:
        return f"{name}-mcp"
    return name


@dataclass
class _Holding:
    """The connection holding the identity's registration and watching its mail."""

    name: str
    scope: anyio.CancelScope
    participant: Participant
    ended: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _Log:
    """One identity's mail as it arrived, for the tools to hand out."""

    name: str
    messages: dict[str, MailMessage] = field(default_factory=dict)  # by msg_id
    last: str | None = None  # the newest msg_id received as the watch knows (its `after`)
    returned: str = ""  # wait_for_message handed out everything up to this msg_id
    shown: set[str] = field(default_factory=set)  # shown by other tools: skipped
    changed: anyio.Event = field(default_factory=anyio.Event)

    def add(self, message: MailMessage) -> None:
        if message.msg_id in self.messages or message.msg_id <= self.returned:
            return
        self.messages[message.msg_id] = message
        if len(self.messages) > LOG_SIZE:
            for msg_id in sorted(self.messages)[: len(self.messages) - LOG_SIZE]:
                del self.messages[msg_id]
                self.shown.discard(msg_id)
        self.notify()

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def next_unseen(self) -> tuple[MailMessage | None, int]:
        """The oldest message not handed out or shown yet, and how many more there are."""
        waiting = [
            msg_id
            for msg_id in sorted(self.messages)
            if msg_id > self.returned and msg_id not in self.shown
        ]
        if not waiting:
            return None, 0
        return self.messages[waiting[0]], len(waiting) - 1

    def hand_out(self, message: MailMessage) -> None:
        self.returned = max(self.returned, message.msg_id)
        for msg_id in [m for m in self.messages if m <= self.returned]:
            del self.messages[msg_id]
            self.shown.discard(msg_id)

    def reply_to(self, msg_id: str) -> MailMessage | None:
        return next((m for m in self.messages.values() if m.reply_to == msg_id), None)


ClientOpener = Callable[[], AbstractAsyncContextManager[Client]]


class MailTools:
    """The mail tools of one MCP session, acting as its identity."""

    def __init__(
        self,
        tasks: anyio.abc.TaskGroup,
        open_client: ClientOpener,
        token_name: Callable[[], Awaitable[str | None]],
    ) -> None:
        self._tasks = tasks
        self._open_client = open_client
        self._token_name = token_name
        self._session = uuid.uuid4().hex  # `info.session`: a reconnect is not a conflict
        self._name: str | None = None  # the name registered (the daemon's folding of it)
        self._roles: list[str] = []
        self._info: dict[str, Any] = {}
        self._holding: _Holding | None = None
        self._log: _Log | None = None
        self._lock = anyio.Lock()

    def add_to(self, server: MCPServer) -> None:
        """Offer the mail tools on ``server``."""
        reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)
        writing = ToolAnnotations(
            read_only_hint=False, destructive_hint=False, open_world_hint=False
        )
        # send_message with `to` is the server's send_message, which calls `send`.
        server.add_tool(self.read_messages, annotations=writing)  # it marks them read
        server.add_tool(self.reply, annotations=writing)
        server.add_tool(self.mark_read, annotations=writing)
        server.add_tool(self.wait_for_message, annotations=writing)
        server.add_tool(self.list_participants, annotations=reading)
        server.add_tool(self.register_agent, annotations=writing)
        server.add_tool(self.heartbeat, annotations=writing)
        server.add_tool(self.search_messages, annotations=reading)
        server.add_tool(self.edit_message, annotations=writing)
        server.add_tool(self.react, annotations=writing)
        server.add_tool(self.pin_message, annotations=writing)
        server.add_tool(self.list_spaces, annotations=reading)
        server.add_tool(self.create_space, annotations=writing)
        server.add_tool(self.join_space, annotations=writing)
        server.add_tool(self.leave_space, annotations=writing)
        server.add_tool(self.space_members, annotations=reading)
        server.add_tool(self.lock_resource, annotations=writing)
        server.add_tool(self.unlock_resource, annotations=writing)
        server.add_tool(self.list_locks, annotations=reading)

    # --- identity ----------------------------------------------------------------------

    async def identity(self, ctx: Context) -> str:
        """The participant this session acts as: the name it registered, else
        ``$CHINWAG_NAME``, else the name its token speaks as (over TCP), else the MCP
        client's name folded."""
        if self._name is not None:
            return self._name
        given = os.environ.get("CHINWAG_NAME", "").strip()
        if given:
            return given.casefold()
        if (name := await self._token_name()) is not None:
            return name
        params = ctx.request_context.session.client_params
        return fold_name(params.client_info.name if params is not None else "mcp-client")

    async def _me(self, ctx: Context) -> str:
        """The identity, registered and watched (again, after a lost connection)."""
        async with self._lock:
            holding = self._holding
            if holding is None or holding.ended.is_set():
                holding = await self._hold(await self.identity(ctx), ctx, takeover=False)
            return holding.name

    async def _hold(self, name: str, ctx: Context, *, takeover: bool) -> _Holding:
        """Register ``name`` on a new connection that watches its mail. The one held
        before is let go only once this one stands, so a refusal changes nothing."""
        info = self._auto_info(ctx) | self._info | {"session": self._session}
        log = self._log if self._log is not None and self._log.name == name else None
        holding: _Holding = await self._tasks.start(self._watch, name, info, takeover, log)
        previous, self._holding = self._holding, holding
        self._name = holding.name
        if previous is not None:
            previous.scope.cancel()
        return holding

    def _auto_info(self, ctx: Context) -> dict[str, Any]:
        params = ctx.request_context.session.client_params
        info: dict[str, Any] = {"pid": os.getppid(), "cwd": os.getcwd(), "via": "chinwag mcp"}
        if params is not None:
            info["vendor"] = params.client_info.name
            info["vendor_version"] = params.client_info.version
        return info

    async def _watch(
        self,
        name: str,
        info: dict[str, Any],
        takeover: bool,
        log: _Log | None,
        *,
        task_status: anyio.abc.TaskStatus[_Holding],
    ) -> None:
        """Hold the registration and log the watched mail until cancelled or cut off.

        What fails before the watch stands is raised to the caller of
        ``start``; a connection lost afterwards only ends the holding.
        """
        holding: _Holding | None = None
        try:
            with anyio.CancelScope() as scope:
                async with self._open_client() as client:
                    participant = await client.register(
                        name, roles=self._roles, info=info, takeover=takeover
                    )
                    name = participant.name
                    if log is None:
                        log = _Log(name)
                    async with client.watch(name, after=log.last) as mail:
                        if log.last is None:
                            # Nothing to replay after: what is unread comes from the inbox.
                            await _seed(client, log, mail.cursor)
                            log.last = mail.cursor
                        holding = _Holding(name, scope, participant)
                        self._log = log
                        task_status.started(holding)
                        async for message in mail:
                            log.last = message.msg_id
                            log.add(message)
        except ChinwagError:
            if holding is None:
                raise
        finally:
            if holding is not None:
                holding.ended.set()
                if log is not None:
                    log.notify()

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[Client]:
        """A connection for one tool call: what the daemon refuses becomes the tool's error."""
        try:
            async with self._open_client() as client:
                yield client
        except ChinwagError as exc:
            raise ToolError(describe(exc)) from None

    async def _ready(self, ctx: Context) -> tuple[str, _Log]:
        try:
            name = await self._me(ctx)
        except ChinwagError as exc:
            hint = ""
            if exc.code == 409:
                hint = " (register_agent takes another name, or the name with takeover=true)"
            raise ToolError(describe(exc) + hint) from None
        assert self._log is not None
        return name, self._log

    # --- tools ---------------------------------------------------------------------------

    async def register_agent(
        self,
        ctx: Context,
        name: Annotated[
            str | None,
            Field(
                description="The name to act as from now on: 1-64 of a-z 0-9 _ . : - "
                "(default: the current one)."
            ),
        ] = None,
        roles: Annotated[
            list[str] | None,
            Field(description="Roles others can write to as `@role` (default: keep them)."),
        ] = None,
        info: Annotated[
            dict[str, Any] | None,
            Field(description="Free facts about you: model, repository, branch, task, ..."),
        ] = None,
        takeover: Annotated[
            bool,
            Field(description="Take the name over from another live session that holds it."),
        ] = False,
    ) -> CallToolResult:
        """Register this session as a mail participant: its name, roles and info.

        The session registers itself on first use of any mail tool; call this to
        take another name, hold roles or describe yourself. Mail to a name waits for
        it while nobody holds it.
        """
        async with self._lock:
            kept = (self._roles, self._info)
            if roles is not None:
                self._roles = list(roles)
            if info is not None:
                self._info = dict(info)
            target = await self.identity(ctx) if name is None else name.strip().casefold()
            try:
                holding = await self._hold(target, ctx, takeover=takeover)
            except ChinwagError as exc:
                self._roles, self._info = kept
                raise ToolError(describe(exc)) from None
        participant = holding.participant
        text = f"You are {participant.name}" + (
            f", with the roles {', '.join(participant.roles)}." if participant.roles else "."
        )
        if participant.unread:
            text += (
                f" {participant.unread} unread message(s) wait for you: read_messages "
                "shows them, wait_for_message hands them out one by one."
            )
        return _result(text, {"participant": _participant(participant)})

    async def heartbeat(
        self,
        ctx: Context,
        status: Annotated[
            str | None,
            Field(description="Your status line, e.g. `reviewing the auth module` (max 500)."),
        ] = None,
    ) -> CallToolResult:
        """Say you are still here, and optionally what you are doing: others see it in
        list_participants."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            await client.heartbeat(name, status=status)
        text = f"{name} is here" + (f": {status}" if status else ".")
        return _result(text, {"name": name, "status": status})

    async def list_participants(
        self,
        ctx: Context,
        online_only: Annotated[bool, Field(description="Only those online now.")] = False,
        role: Annotated[str | None, Field(description="Only those holding this role.")] = None,
    ) -> CallToolResult:
        """List who can be written to: name, kind (agent: hosted by chinwag, always
        answers; session: an outside agent; person), roles, online, status, unread."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            participants = await client.participants(online_only=online_only, role=role)
        lines = [_participant_line(p, you=p.name == name) for p in participants]
        text = "\n".join(lines) if lines else "Nobody."
        return _result(text, {"you": name, "participants": [_participant(p) for p in participants]})

    async def send(
        self,
        ctx: Context,
        to: list[str],
        content: str,
        *,
        wait: bool = False,
        timeout_s: float = MAIL_WAIT_S,
        priority: int = 1,
    ) -> CallToolResult:
        """send_message with ``to`` (addresses as ``addresses`` splits them): the message's
        msg_id and thread; with ``wait``, the first reply to it (a hosted agent's answer)
        as well, or a note that none came within ``timeout_s`` (wait_for_message gets it)."""
        return await self._post(ctx, to, content, None, wait, timeout_s, priority)

    async def reply(
        self,
        msg_id: Annotated[str, Field(description="The message answered (its msg_id).")],
        content: Content,
        ctx: Context,
        wait: Wait = False,
        timeout_s: WaitTimeout = MAIL_WAIT_S,
        priority: Priority = 1,
    ) -> CallToolResult:
        """Reply to a message, in its thread, to its author (to its recipients when you
        wrote it). It marks that message read. wait=true returns the reply to your reply."""
        return await self._post(ctx, [], content, msg_id, wait, timeout_s, priority)

    async def read_messages(
        self,
        ctx: Context,
        unread_only: Annotated[bool, Field(description="Only messages not read yet.")] = True,
        limit: Annotated[int, Field(ge=1, le=500, description="At most this many.")] = 20,
        mark_read: Annotated[bool, Field(description="Mark the messages shown as read.")] = True,
    ) -> CallToolResult:
        """Read your inbox, newest first: each message's msg_id, author, recipients, time,
        thread and text. By default the unread ones, which it then marks read."""
        name, log = await self._ready(ctx)
        async with self._client() as client:
            page = await client.inbox(
                name, unread_only=unread_only, limit=limit, mark_read=mark_read
            )
        for item in page.items:
            log.shown.add(item.message.msg_id)
        what = "unread message" if unread_only else "message"
        if not page.items:
            text = f"No {what}s for {name}."
        else:
            blocks = [_message_text(item.message, item.state) for item in page.items]
            more = " (more: raise limit)" if page.next_cursor is not None else ""
            head = f"{len(page.items)} {what}(s) for {name}, newest first{more}"
            if mark_read:
                head += "; now marked read"
            text = head + ":\n\n" + "\n\n".join(blocks)
        return _result(
            text,
            {
                "you": name,
                "messages": [_item(item) for item in page.items],
                "unread": page.unread,
                "more": page.next_cursor is not None,
            },
        )

    async def mark_read(
        self,
        ctx: Context,
        msg_ids: Annotated[
            list[str] | None, Field(description="These messages (their msg_ids).")
        ] = None,
        thread_id: Annotated[str | None, Field(description="Every message of this thread.")] = None,
        all: Annotated[bool, Field(description="Every message you received.")] = False,
    ) -> CallToolResult:
        """Mark messages read: give exactly one of msg_ids, thread_id or all."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            await client.mark_read(name, msg_ids=msg_ids, thread_id=thread_id, all=all)
        if msg_ids is not None:
            what = ", ".join(msg_ids)
        elif thread_id is not None:
            what = f"thread {thread_id}"
        else:
            what = "all your mail"
        return _result(f"Marked read: {what}.", {"you": name, "marked": True})

    # --- search, changes, spaces, locks ---------------------------------------------------

    async def search_messages(
        self,
        ctx: Context,
        query: Annotated[str, Field(description="Words to find (any of them).")],
        limit: Annotated[int, Field(ge=1, le=100, description="At most this many.")] = 10,
    ) -> CallToolResult:
        """Search the mail you may read (yours, and your spaces'), best match first."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            page = await client.search_mail(name, query, limit=limit)
        if not page.items:
            text = f"No message of {name}'s matches {query!r}."
        else:
            blocks = [_message_text(item.message, item.state) for item in page.items]
            text = f"{len(page.items)} match(es), best first:\n\n" + "\n\n".join(blocks)
        return _result(text, {"you": name, "messages": [_item(i) for i in page.items]})

    async def edit_message(
        self,
        ctx: Context,
        msg_id: Annotated[str, Field(description="Your message's msg_id.")],
        content: Content,
    ) -> CallToolResult:
        """Replace the text of a message you wrote; the earlier text is kept as a version."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            message = await client.edit(name, msg_id, content)
        return _result(
            f"Edited {msg_id} (now version {message.version}).", {"message": _message(message)}
        )

    async def react(
        self,
        ctx: Context,
        msg_id: Annotated[str, Field(description="The message's msg_id.")],
        emoji: Annotated[str, Field(description="The reaction, such as 👍.")],
        remove: Annotated[bool, Field(description="Take your reaction back.")] = False,
    ) -> CallToolResult:
        """React to a message you may read."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            message = await client.react(name, msg_id, emoji, remove=remove)
        summary = ", ".join(f"{r.emoji} {len(r.by)}" for r in message.reactions) or "none"
        return _result(f"Reactions on {msg_id}: {summary}.", {"message": _message(message)})

    async def pin_message(
        self,
        ctx: Context,
        msg_id: Annotated[str, Field(description="The message's msg_id.")],
        unpin: Annotated[bool, Field(description="Unpin it instead.")] = False,
    ) -> CallToolResult:
        """Pin a message you wrote or received (in its space or thread)."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            message = await client.pin(name, msg_id, unpin=unpin)
        verb = "Pinned" if message.pinned else "Unpinned"
        return _result(f"{verb} {msg_id}.", {"message": _message(message)})

    async def list_spaces(self, ctx: Context) -> CallToolResult:
        """The spaces you may see: each one's members and messages. Send to one with
        send_message to "#name"."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            spaces = await client.spaces(reader=name)
        lines = [
            f"#{s.name}{' (private)' if s.private else ''}: {s.members} member(s), "
            f"{s.messages} message(s){f' - {s.description}' if s.description else ''}"
            for s in spaces
        ]
        text = "\n".join(lines) if lines else "No spaces yet: create_space makes one."
        return _result(text, {"spaces": [_lean(s) for s in spaces]})

    async def create_space(
        self,
        ctx: Context,
        space: Annotated[str, Field(description="Its name, without #.")],
        description: Annotated[str, Field(description="What it is for.")] = "",
        private: Annotated[bool, Field(description="By invitation only.")] = False,
        parent: Annotated[str | None, Field(description="A space to nest it under.")] = None,
    ) -> CallToolResult:
        """Create a space (a broadcast group); you become its first member."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            made = await client.space_create(
                name, space, description=description, private=private, parent=parent
            )
        return _result(f"Created #{made.name}.", {"space": _lean(made)})

    async def join_space(
        self, ctx: Context, space: Annotated[str, Field(description="The space's name.")]
    ) -> CallToolResult:
        """Join a space: its mail reaches you from now on."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            await client.space_join(name, space)
        return _result(f"{name} joined #{space.removeprefix('#')}.", {"joined": True})

    async def leave_space(
        self, ctx: Context, space: Annotated[str, Field(description="The space's name.")]
    ) -> CallToolResult:
        """Leave a space."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            await client.space_leave(name, space)
        return _result(f"{name} left #{space.removeprefix('#')}.", {"left": True})

    async def space_members(
        self, ctx: Context, space: Annotated[str, Field(description="The space's name.")]
    ) -> CallToolResult:
        """Who is in a space, and who of them is online."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            members = await client.space_members(space, reader=name)
        text = ", ".join(f"{m.name}{' (online)' if m.online else ''}" for m in members)
        return _result(text or "Nobody.", {"members": [_lean(m) for m in members]})

    async def lock_resource(
        self,
        ctx: Context,
        resource: Annotated[str, Field(description="What to lock, such as a file path.")],
        exclusive: Annotated[
            bool, Field(description="Yours alone; false: shared with other advisory holders.")
        ] = True,
        ttl_s: Annotated[
            float, Field(ge=1, description="It lapses after this many seconds unless renewed.")
        ] = 300.0,
    ) -> CallToolResult:
        """Take (or renew, by taking again) a lock; if others hold it, says who."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            result = await client.lock(
                name, resource, mode="exclusive" if exclusive else "advisory", ttl_s=ttl_s
            )
        if result.acquired:
            text = f"{name} holds {resource} until {_when(result.expires_at)}."
        else:
            holders = ", ".join(
                f"{h.holder} ({h.mode}, until {_when(h.expires_at)})" for h in result.holders
            )
            text = f"Not taken: {resource} is held by {holders}."
        return _result(
            text,
            {
                "acquired": result.acquired,
                "holders": [_lean(h) for h in result.holders],
                "expires_at": _when(result.expires_at) if result.expires_at else None,
            },
        )

    async def unlock_resource(
        self, ctx: Context, resource: Annotated[str, Field(description="What you locked.")]
    ) -> CallToolResult:
        """Release a lock you hold."""
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            await client.unlock(name, resource)
        return _result(f"{name} released {resource}.", {"released": True})

    async def list_locks(
        self,
        ctx: Context,
        resource: Annotated[str | None, Field(description="Only this resource's.")] = None,
    ) -> CallToolResult:
        """The locks held now, by whom and until when."""
        await self._ready(ctx)
        async with self._client() as client:
            held = await client.locks(resource=resource)
        lines = [f"{h.resource}: {h.holder} ({h.mode}) until {_when(h.expires_at)}" for h in held]
        return _result(
            "\n".join(lines) or "No locks are held.", {"locks": [_lean(h) for h in held]}
        )

    async def wait_for_message(
        self,
        ctx: Context,
        timeout_s: Annotated[
            float, Field(ge=0, description="Give up after this many seconds.")
        ] = 60.0,
        mark_read: Annotated[bool, Field(description="Mark the message returned read.")] = True,
    ) -> CallToolResult:
        """Wait for the next message to you and return it (at once if one is waiting).

        Messages come one a call, oldest first: the mail unread when this session
        registered, then each new one; none is missed between calls, and none that
        another tool (read_messages, send_message with wait) showed you comes again.
        """
        name, log = await self._ready(ctx)
        found: MailMessage | None = None
        more = 0
        with anyio.move_on_after(timeout_s):
            while True:
                changed = log.changed
                found, more = log.next_unseen()
                if found is not None:
                    break
                name, log = await self._ready(ctx)  # a lost connection: register again
                await changed.wait()
        if found is None:
            return _result(
                f"No message for {name} within {timeout_s:g} s.",
                {"you": name, "message": None},
            )
        log.hand_out(found)
        if mark_read:
            async with self._client() as client:
                await client.mark_read(name, msg_ids=[found.msg_id])
        text = _message_text(found, "read" if mark_read else None)
        if more:
            text += f"\n\n({more} more waiting: call wait_for_message again.)"
        return _result(text, {"you": name, "message": _message(found), "more_waiting": more})

    # --- posting ---------------------------------------------------------------------------

    async def _post(
        self,
        ctx: Context,
        to: list[str],
        content: str,
        reply_to: str | None,
        wait: bool,
        timeout_s: float,
        priority: int,
    ) -> CallToolResult:
        # The watch is up before the post: no reply can come unseen.
        name, _ = await self._ready(ctx)
        async with self._client() as client:
            posted = await client.post(name, content, to=to, reply_to=reply_to, priority=priority)
        summary = _posted_text(posted, reply_to)
        data: dict[str, Any] = {"you": name, "posted": _posted(posted)}
        if not wait:
            return _result(summary, data)
        answer = await self._answer(ctx, posted.msg_id, timeout_s)
        if answer is None:
            data["reply"] = None
            return _result(
                f"{summary}\nNo reply within {timeout_s:g} s; wait_for_message returns it "
                "when it comes.",
                data,
            )
        async with self._client() as client:  # shown: read, as wait_for_message does
            await client.mark_read(name, msg_ids=[answer.msg_id])
        data["reply"] = _message(answer)
        return _result(f"{summary}\nReply:\n{_message_text(answer, None)}", data)

    async def _answer(self, ctx: Context, msg_id: str, timeout_s: float) -> MailMessage | None:
        with anyio.move_on_after(timeout_s):
            while True:
                _, log = await self._ready(ctx)
                changed = log.changed
                if (answer := log.reply_to(msg_id)) is not None:
                    log.shown.add(answer.msg_id)  # wait_for_message skips it
                    return answer
                await changed.wait()
        return None


async def _seed(client: Client, log: _Log, cursor: str | None) -> None:
    """Take the unread mail received before the watch began (up to ``cursor``) into ``log``:
    the newest ``UNREAD_SEED``; what arrived after ``cursor`` the watch pushes."""
    if cursor is None:
        return
    page = await client.inbox(log.name, unread_only=True, limit=UNREAD_SEED)
    for item in page.items:
        if item.message.msg_id <= cursor:
            log.add(item.message)


def addresses(to: str | list[str] | None) -> list[str]:
    """Recipients as given (one string, comma- or space-separated, or a list): each one."""
    if to is None:
        return []
    entries = [to] if isinstance(to, str) else to
    return [part for entry in entries for part in re.split(r"[,\s]+", entry) if part]


# --- what a model reads ---------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _message_text(message: MailMessage, state: str | None) -> str:
    """A message's header line (msg_id, who, when, thread) over its text."""
    to = ", ".join(message.to) if message.to else ", ".join(message.recipients)
    facts = [message.msg_id, f"from {message.sender} to {to}", _when(message.created_at)]
    if message.thread_id is not None:
        facts.append(f"thread {message.thread_id}")
    if message.reply_to is not None:
        facts.append(f"reply to {message.reply_to}")
    if message.priority != 1:
        facts.append(f"priority {PRIORITY_NAMES.get(message.priority, message.priority)}")
    if message.channel:
        facts.append(f"channel {message.channel}")
    if state == "pending" or state == "delivered":
        facts.append("unread")
    if message.edited_at is not None:
        facts.append(f"edited {_when(message.edited_at)}")
    if message.deleted:
        facts.append("deleted")
    content = message.content
    if message.structured is not None:
        content += "\n" + msgspec.json.encode(message.structured).decode()
    return f"[{' · '.join(facts)}]\n{content}"


def _posted_text(posted: Posted, reply_to: str | None) -> str:
    to = ", ".join(posted.recipients) if posted.recipients else "nobody"
    what = f"Replied to {reply_to}" if reply_to is not None else "Sent"
    text = f"{what}: {posted.msg_id} to {to}"
    if posted.thread_id is not None:
        text += f", thread {posted.thread_id}"
    text += "."
    for warning in posted.warnings:
        text += f"\nNote: {warning}"
    return text


def _participant_line(participant: Participant, *, you: bool) -> str:
    facts = [participant.kind, "online" if participant.online else "offline"]
    if participant.roles:
        facts.append("roles " + ", ".join(f"@{role}" for role in participant.roles))
    if participant.unread:
        facts.append(f"{participant.unread} unread")
    if not participant.online and participant.last_seen is not None:
        facts.append(f"last seen {_when(participant.last_seen)}")
    line = f"{participant.name}{' (you)' if you else ''}: {', '.join(facts)}"
    if participant.status:
        line += f" · {participant.status}"
    return line


def _lean(value: Any) -> dict[str, Any]:
    """A struct's fields without the empty ones: a model reads them, token by token."""
    fields: dict[str, Any] = msgspec.to_builtins(value)
    return {
        name: field_value
        for name, field_value in fields.items()
        if field_value is not None
        and field_value is not False
        and field_value != ""
        and field_value != []
        and field_value != {}
    }


def _message(message: MailMessage) -> dict[str, Any]:
    fields = _lean(message)
    fields.pop("idempotency_key", None)  # the author's bookkeeping
    if fields.get("format") == "markdown":
        del fields["format"]
    if fields.get("version") == 1:
        del fields["version"]
    return fields


def _item(item: MailItem) -> dict[str, Any]:
    return {**_message(item.message), "state": item.state}


def _participant(participant: Participant) -> dict[str, Any]:
    return msgspec.to_builtins(participant)  # type: ignore[no-any-return]


def _posted(posted: Posted) -> dict[str, Any]:
    fields: dict[str, Any] = msgspec.to_builtins(posted)
    fields.pop("id", None)
    fields.pop("type", None)
    return fields


def _result(text: str, structured: dict[str, Any]) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=msgspec.to_builtins(structured),
    )
