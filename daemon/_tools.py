"""Built-in tools. An agent is offered, and may call, only those its whitelist names."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from chinwag.protocol import AskQuestion, MailItem, MailMessage, MemoryHit, ToolCallInfo
from chinwag.storage import MAX_SEARCH_LIMIT

from ._errors import RequestError, ToolError
from ._providers import ToolSchema
from ._workspace import WORKSPACE_TOOLS, Workspace


class Mailbox(Protocol):
    """One agent's mail, as the mail tools use it. Raises ``RequestError`` as a request would."""

    async def send(
        self, to: Sequence[str], content: str, *, priority: int, reply_to: str | None
    ) -> tuple[MailMessage, list[str]]:
        """Post as this agent; the stored message and the post's warnings."""
        ...

    async def check(self, *, unread_only: bool, limit: int) -> list[MailItem]:
        """This agent's mail, newest first, marked read."""
        ...


class Mailboxes(Protocol):
    """Where runs find their agent's mail (the post office)."""

    def mailbox(self, name: str) -> Mailbox | None:
        """The mail of the agent ``name``; None when it has no mail address."""
        ...


class ToolContext(Protocol):
    """What a tool may do to the run that called it."""

    async def set_title(self, title: str) -> None: ...

    async def ask(self, questions: list[AskQuestion]) -> str:
        """Ask the user and wait for the answer; raises ``ToolError`` on timeout."""
        ...

    async def memory_search(self, query: str, limit: int) -> list[MemoryHit]:
        """The agent's notes and archives matching ``query``, best first."""
        ...

    async def memory_note(self, name: str, content: str) -> None:
        """Create or replace the agent's note ``name``."""
        ...

    async def delegate(self, agent: str, message: str) -> str:
        """Run a turn of ``agent`` in its conversation with this agent; its final text."""
        ...

    @property
    def workspace(self) -> Workspace | None:
        """The run's working directory and limits; None: the run has none."""
        ...

    @property
    def mail(self) -> Mailbox | None:
        """The speaking agent's mail; None: it has none."""
        ...


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[ToolContext, dict[str, Any]], Awaitable[str]]

    @property
    def schema(self) -> ToolSchema:
        return ToolSchema(name=self.name, description=self.description, parameters=self.parameters)


async def _set_title(ctx: ToolContext, args: dict[str, Any]) -> str:
    title = args.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ToolError("set_title needs a non-empty string `title`.")
    title = " ".join(title.split())[:200]
    await ctx.set_title(title)
    return f"Title set to {title!r}."


async def _ask_user(ctx: ToolContext, args: dict[str, Any]) -> str:
    raw = args.get("questions")
    if raw is None and "question" in args:
        raw = [args]
    try:
        questions = msgspec.convert(raw, list[AskQuestion])
    except msgspec.ValidationError as exc:
        raise ToolError(
            f"ask_user needs `questions`, a list of {{question, options}}: {exc}."
        ) from exc
    if not questions:
        raise ToolError("ask_user needs at least one question.")
    return await ctx.ask(questions)


async def _delegate(ctx: ToolContext, args: dict[str, Any]) -> str:
    agent, message = args.get("agent"), args.get("message")
    if not isinstance(agent, str) or not isinstance(message, str) or not message.strip():
        raise ToolError("delegate needs `agent` (an agent's name) and a non-empty `message`.")
    return await ctx.delegate(agent, message)


NOTE_NAME_CHARS = 100
NOTE_CHARS = 20_000


async def _memory_search(ctx: ToolContext, args: dict[str, Any]) -> str:
    query, limit = args.get("query"), args.get("limit", 5)
    if not isinstance(query, str) or not query.strip():
        raise ToolError("memory_search needs a non-empty string `query`.")
    if not isinstance(limit, int):
        raise ToolError(f"memory_search's `limit` must be an integer from 1 to {MAX_SEARCH_LIMIT}.")
    try:
        hits = await ctx.memory_search(query, limit)
    except ValueError as exc:  # the limit, out of range
        raise ToolError(f"memory_search: {exc}") from None
    if not hits:
        return f"Nothing in memory matches {query!r}."
    lines = [f"{len(hits)} match{'es' if len(hits) > 1 else ''} for {query!r}, best first:"]
    for number, hit in enumerate(hits, 1):
        about = [f"conversation with {hit.sender}"] if hit.sender else []
        if hit.created_at is not None:
            about.append(f"{hit.created_at:%Y-%m-%d}")
        label = f" ({', '.join(about)})" if about else ""
        lines.append(f"{number}. {hit.kind} {hit.name!r}{label}: {hit.snippet}")
    return "\n".join(lines)


async def _memory_note(ctx: ToolContext, args: dict[str, Any]) -> str:
    name, content = args.get("name"), args.get("content")
    if not isinstance(name, str) or not name.strip() or len(name) > NOTE_NAME_CHARS:
        raise ToolError(f"memory_note needs a `name` of 1 to {NOTE_NAME_CHARS} characters.")
    if not isinstance(content, str) or not content.strip() or len(content) > NOTE_CHARS:
        raise ToolError(f"memory_note needs a `content` of 1 to {NOTE_CHARS} characters.")
    name = " ".join(name.split())
    await ctx.memory_note(name, content)
    return f"Saved the note {name!r}; memory_search finds it."


MAIL_LIMIT = 20


def _mailbox(ctx: ToolContext) -> Mailbox:
    if ctx.mail is None:
        raise ToolError("Mail is not available to this agent (its name is not a mail address).")
    return ctx.mail


def _recipients(args: dict[str, Any]) -> list[str]:
    to = args.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to or not all(isinstance(t, str) for t in to):
        raise ToolError("`to` must name at least one recipient: a name, @role or @everyone.")
    return to


async def _post(
    ctx: ToolContext, args: dict[str, Any], *, to: list[str], reply_to: str | None
) -> str:
    mailbox = _mailbox(ctx)
    content = args.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ToolError("A message needs a non-empty `content`.")
    priority = args.get("priority", 1)
    if not isinstance(priority, int):
        raise ToolError("`priority` must be 0 (routine), 1 (normal), 2 (high) or 3 (critical).")
    try:
        sent, warnings = await mailbox.send(to, content, priority=priority, reply_to=reply_to)
    except RequestError as exc:
        raise ToolError(exc.message) from None
    line = f"Sent {sent.msg_id} to {', '.join(sent.recipients) or 'nobody'}"
    if sent.thread_id is not None:
        line += f" (thread {sent.thread_id})"
    return " ".join([line + ".", *warnings])


async def _send_mail(ctx: ToolContext, args: dict[str, Any]) -> str:
    return await _post(ctx, args, to=_recipients(args), reply_to=None)


async def _reply_mail(ctx: ToolContext, args: dict[str, Any]) -> str:
    msg_id = args.get("msg_id")
    if not isinstance(msg_id, str) or not msg_id:
        raise ToolError("reply_mail needs the `msg_id` of the message it answers.")
    return await _post(ctx, args, to=[], reply_to=msg_id)


async def _check_mail(ctx: ToolContext, args: dict[str, Any]) -> str:
    mailbox = _mailbox(ctx)
    unread_only = args.get("unread_only", True)
    limit = args.get("limit", 10)
    if (
        not isinstance(unread_only, bool)
        or not isinstance(limit, int)
        or not 1 <= limit <= MAIL_LIMIT
    ):
        raise ToolError(
            f"check_mail takes `unread_only` (true/false) and a `limit` of 1 to {MAIL_LIMIT}."
        )
    try:
        items = await mailbox.check(unread_only=unread_only, limit=limit)
    except RequestError as exc:
        raise ToolError(exc.message) from None
    if not items:
        return "No unread mail." if unread_only else "No mail."
    lines = [f"{len(items)} message(s), newest first:"]
    for item in items:
        m = item.message
        about = [f"from {m.sender}", f"{m.created_at:%Y-%m-%d %H:%M} UTC", f"priority {m.priority}"]
        if m.thread_id is not None:
            about.append(f"thread {m.thread_id}")
        lines.append(f"- {m.msg_id} ({', '.join(about)}): {m.content}")
    return "\n".join(lines)


_OPTION = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "description": {"type": "string"}},
    "required": ["label"],
}

TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in [
        Tool(
            name="set_title",
            description="Set a short title for this conversation.",
            parameters={
                "type": "object",
                "properties": {"title": {"type": "string", "description": "A few words."}},
                "required": ["title"],
            },
            run=_set_title,
        ),
        Tool(
            name="ask_user",
            description=(
                "Ask the user one or more questions and wait for the answer. "
                "Offer options where the answer is a choice."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "questions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "question": {"type": "string"},
                                "header": {"type": "string"},
                                "options": {"type": "array", "items": _OPTION},
                                "multi_select": {"type": "boolean"},
                            },
                            "required": ["question"],
                        },
                    }
                },
                "required": ["questions"],
            },
            run=_ask_user,
        ),
        Tool(
            name="memory_search",
            description=(
                "Search your long-term memory: your notes, and the archived summaries and "
                "transcripts of your earlier, compacted conversations. Returns the best "
                "matches with a snippet each; any of the query's words may match."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "Words to look for."},
                    "limit": {
                        "type": "integer",
                        "description": "At most this many matches (default 5).",
                        "minimum": 1,
                        "maximum": MAX_SEARCH_LIMIT,
                    },
                },
                "required": ["query"],
            },
            run=_memory_search,
        ),
        Tool(
            name="memory_note",
            description=(
                "Write a note to your long-term memory, or replace the note of that name: "
                "facts, preferences and decisions worth keeping across conversations."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "A short name for the note."},
                    "content": {"type": "string", "description": "The note's full text."},
                },
                "required": ["name", "content"],
            },
            run=_memory_note,
        ),
        Tool(
            name="delegate",
            description=(
                "Ask another agent to do something and wait for its answer. It sees only "
                "your message and its own conversation with you."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "agent": {"type": "string", "description": "The other agent's name."},
                    "message": {"type": "string", "description": "What to ask it."},
                },
                "required": ["agent", "message"],
            },
            run=_delegate,
        ),
        Tool(
            name="send_mail",
            description=(
                "Send mail, as yourself, to other agents or people: a name, @role (everyone "
                "holding that role) or @everyone. A hosted agent you write to answers by mail; "
                "read answers with check_mail."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "to": {"type": "array", "items": {"type": "string"}},
                    "content": {"type": "string", "description": "The message (Markdown)."},
                    "priority": {
                        "type": "integer",
                        "description": "0 routine, 1 normal (default), 2 high, 3 critical.",
                        "minimum": 0,
                        "maximum": 3,
                    },
                },
                "required": ["to", "content"],
            },
            run=_send_mail,
        ),
        Tool(
            name="check_mail",
            description=(
                "Read your mail, newest first (unread only by default); what it shows is "
                "marked read. Each message has a msg_id for reply_mail."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "unread_only": {"type": "boolean"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAIL_LIMIT},
                },
            },
            run=_check_mail,
        ),
        Tool(
            name="reply_mail",
            description="Reply to a message you received, in its thread, to its author.",
            parameters={
                "type": "object",
                "properties": {
                    "msg_id": {"type": "string"},
                    "content": {"type": "string"},
                    "priority": {"type": "integer", "minimum": 0, "maximum": 3},
                },
                "required": ["msg_id", "content"],
            },
            run=_reply_mail,
        ),
        *(Tool(*spec) for spec in WORKSPACE_TOOLS),  # read_file, write_file, list_dir, run_command
    ]
}

TOOL_NAMES = frozenset(TOOLS)


def schemas_for(allowed: list[str]) -> list[ToolSchema]:
    """The schemas offered to an agent: exactly its whitelist, in its order."""
    return [TOOLS[name].schema for name in allowed if name in TOOLS]


async def call_tool(ctx: ToolContext, allowed: list[str], call: ToolCallInfo) -> tuple[str, bool]:
    """Run one tool call; returns ``(output, is_error)``. Never raises but Cancelled."""
    tool = TOOLS.get(call.name)
    if tool is None or call.name not in allowed:
        return f"The tool {call.name!r} is not available to this agent.", True
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"The arguments of {call.name} are not valid JSON: {exc}.", True
    if not isinstance(args, dict):
        return f"The arguments of {call.name} must be a JSON object.", True
    try:
        return await tool.run(ctx, args), False
    except ToolError as exc:
        return str(exc), True
    except Exception as exc:  # a tool's bug is the model's error result, not a failed run
        return f"{call.name} failed: {type(exc).__name__}: {exc}", True
