"""The MCP server: chinwag's agents as tools for other agents, over stdio.

Built on the official SDK's ``MCPServer``. Each tool call, and each run the
server follows (see ``_watch``), opens its own connection to the daemon, so a
daemon restarted between calls is simply found again. A daemon's refusal
becomes a tool error (``isError``) reading ``error CODE: MESSAGE``, the way the
CLI says it. The session also takes part in chinwag's mail as one participant
(``_mail``), registered only once a mail tool is first used.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.abc
import msgspec
from chinwag.protocol import Entry
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from .._client import ChinwagError, Client, connect_explained
from .._settings import describe
from ._mail import MAIL_WAIT_S, MailTools, addresses
from ._watch import RunReport, RunWatch, Watches

CLIENT_NAME = "chinwag-mcp"

INSTRUCTIONS = """\
chinwag hosts LLM agents. You can talk with them in conversations, and write
mail to them and to the other participants (people, other agents' sessions).

Conversations: send_message with `agent` runs one turn of your conversation
with that agent and returns its reply. A conversation is named by an agent and
a sender; yours default to the sender `mcp:<your client's name>` (or the name
this server's token speaks as, over the network), so each tool
finds the same conversation again without being told. If the agent asks you a
question on the way (status `asking`, with an ask_id), answer it with
reply_to_ask and then call wait_for_reply for the rest of the turn. A turn
still going when send_message's timeout_s passes keeps running: wait_for_reply
collects it, kill stops it. list_agents says who is there; read_history and
list_conversations read what was said.

Mail: send_message with `to` writes to a participant, to `@role` (everyone
holding the role) or to `@everyone`; with wait=true it returns the first reply
(a hosted agent always answers mail addressed to it). You write mail as one
participant, under a name the mail tools tell you; list_participants says who
is there. read_messages shows your inbox, reply answers a message in its
thread, wait_for_message blocks until the next message to you arrives.
register_agent sets your name and roles, heartbeat your status line. The mail
you exchange with a hosted agent is your conversation with it under your mail
name: read_history with that name as sender reads it."""

Agent = Annotated[str, Field(description="The agent's name, as list_agents gives it.")]
Sender = Annotated[
    str | None,
    Field(
        description="Whose conversation with the agent (default: yours, "
        "`mcp:<your client's name>` unless the server sets another); "
        "`user` is the person at the chinwag CLI."
    ),
]
# send_message's two uses: a conversation's turn (agent) or mail (to).
TurnAgent = Annotated[
    str | None,
    Field(
        description="Conversation: the agent to run a turn with, as list_agents names it "
        "(give this or `to`)."
    ),
]
Recipients = Annotated[
    str | list[str] | None,
    Field(
        description="Mail: who gets it: a participant's name, `@role`, `@everyone`, or a "
        "list of them (a string may also list several, comma-separated) (give this or `agent`)."
    ),
]
SendTimeout = Annotated[
    float | None,
    Field(
        ge=0,
        description="With `agent`: return after this long even if the turn goes on "
        "(default: wait for its end). With `to` and wait: give up waiting for the reply "
        f"after this long (default {MAIL_WAIT_S:g}).",
    ),
]
MailPriority = Annotated[
    int, Field(ge=0, le=3, description="With `to`: 0 routine, 1 normal, 2 high, 3 critical.")
]
MailWait = Annotated[
    bool,
    Field(
        description="With `to`: wait for the first reply to this message and return it. "
        "A hosted agent always answers mail to it; people and other sessions may not."
    ),
]


class ChinwagTools:
    """The tools, bound to one daemon socket and the server's task group."""

    def __init__(self, socket: Path | str, sender: str | None, tasks: anyio.abc.TaskGroup) -> None:
        self._socket = socket
        self._sender = sender
        self._speaks_as: str | None = None  # the daemon's welcome's, once connected
        self._welcomed = False
        self._watches = Watches(tasks, self._connect)
        #: The mail tools; they connect (and register) only when first used.
        self.mail = MailTools(tasks, self._connect, self.token_name)

    # --- reading ------------------------------------------------------------------

    async def list_agents(self) -> CallToolResult:
        """List the agents chinwag hosts: each one's name, description, model and tools."""
        async with self._client() as client:
            agents = await client.list_agents()
        return _data({"agents": agents})

    async def list_conversations(
        self,
        agent: Annotated[
            str | None, Field(description="Only this agent's conversations (default: all).")
        ] = None,
        limit: Annotated[int, Field(ge=1, description="At most this many.")] = 20,
        cursor: Annotated[
            str | None, Field(description="next_cursor from the previous page, for the next one.")
        ] = None,
    ) -> CallToolResult:
        """List conversations, most recently updated first, one page at a time.

        Each item has agent, sender, title, last_seq and whether a run is going
        (`running`). next_cursor is null on the last page.
        """
        async with self._client() as client:
            page = await client.list_conversations(agent, limit=limit, cursor=cursor)
        return _data({"conversations": page.items, "next_cursor": page.next_cursor})

    async def read_history(
        self,
        agent: Agent,
        ctx: Context,
        sender: Sender = None,
        after_seq: Annotated[
            int, Field(ge=0, description="Only entries after this seq (default 0: from the first).")
        ] = 0,
        limit: Annotated[
            int | None,
            Field(ge=1, description="At most this many, oldest first (default 50; null: all)."),
        ] = 50,
        include_archived: Annotated[
            bool, Field(description="Also the entries a compaction archived.")
        ] = False,
    ) -> CallToolResult:
        """Read a conversation's entries in order: seq, role (user, assistant, tool), content,
        an assistant's tool_calls, a tool result's is_error, run_id; empty fields are left out.

        Pages go forwards: pass next_after_seq as after_seq for the next page
        (next_after_seq is null when there is no more). For the latest N entries,
        pass after_seq = last_seq - N.
        """
        sender = await self._sender_for(sender, ctx)
        entries: list[Entry] = []
        async with self._client() as client:
            # Paged: the daemon may send fewer entries than asked (what fits a frame).
            read = partial(
                client.iter_history,
                agent,
                sender,
                after_seq=after_seq,
                include_archived=include_archived,
            )
            pages = read() if limit is None else read(page_size=limit)
            async with aclosing(pages):
                async for entry in pages:
                    entries.append(entry)
                    if len(entries) == limit:
                        break
            # Asked after the entries, so that its last_seq is at least theirs.
            about = await client.history(agent, sender, limit=0)
        more = bool(entries) and entries[-1].seq < about.last_seq
        return _data(
            {
                "agent": about.agent,
                "sender": about.sender,
                "title": about.title,
                "cwd": about.cwd,
                "last_seq": about.last_seq,
                "entries": [_lean(entry) for entry in entries],
                "next_after_seq": entries[-1].seq if more else None,
            }
        )

    # --- runs ------------------------------------------------------------------------

    async def send_message(
        self,
        content: Annotated[str, Field(description="The message (markdown for mail).")],
        ctx: Context,
        agent: TurnAgent = None,
        to: Recipients = None,
        sender: Sender = None,
        timeout_s: SendTimeout = None,
        wait: MailWait = False,
        priority: MailPriority = 1,
    ) -> CallToolResult:
        """Send a message: give `agent` to talk with a hosted agent in your conversation
        with it, or `to` to send mail. Exactly one of the two.

        With `agent` (and optionally `sender`, `timeout_s`): runs one turn and returns
        the agent's reply: the text, then a line with the status, run_id, last_seq
        and the tools it called (all also in structured content). The status is
        `done`, `killed` or `error` when the turn ended. It is `asking` when the
        agent asked you a question: the question and its ask_id come with it, the
        turn waits; answer with reply_to_ask, then call wait_for_reply for the rest.
        It is `running` (or `queued`, behind another turn of the conversation) when
        timeout_s passed first: the turn goes on; wait_for_reply collects it, kill
        stops it. Cancelling this call never stops the turn.

        With `to` (and optionally `wait`, `timeout_s`, `priority`): sends mail under
        your participant name and returns its msg_id and thread; with wait=true, the
        first reply to it as well (a hosted agent's answer). A reply that has not
        come within timeout_s is not lost: wait_for_message returns it when it comes.
        """
        recipients = addresses(to)
        turn_with = agent if agent is not None and agent.strip() else None
        if turn_with is not None and recipients:
            raise ToolError(
                "send_message takes `agent` or `to`, not both: `agent` runs a turn of your "
                "conversation with that agent and returns its reply; `to` sends mail "
                "(to the agent's name with wait=true returns its answer by mail)."
            )
        if turn_with is None and not recipients:
            raise ToolError(
                "send_message needs `agent` or `to`: `agent` (an agent's name, as list_agents "
                "gives it) runs a turn of your conversation with it; `to` (a participant's "
                "name, `@role` or `@everyone`) sends mail."
            )
        if turn_with is not None:
            if wait or priority != 1:
                raise ToolError(
                    "`wait` and `priority` go with `to` (mail); with `agent` the turn's reply "
                    "comes back anyway (timeout_s bounds the wait)."
                )
            watch = self._watches.send(turn_with, await self._sender_for(sender, ctx), content)
            return await self._outcome(watch, timeout_s)
        if sender:
            raise ToolError(
                "`sender` goes with `agent` (a conversation); mail goes under your "
                "participant name (register_agent changes it)."
            )
        return await self.mail.send(
            ctx,
            recipients,
            content,
            wait=wait,
            timeout_s=MAIL_WAIT_S if timeout_s is None else timeout_s,
            priority=priority,
        )

    async def wait_for_reply(
        self,
        agent: Agent,
        timeout_s: Annotated[
            float, Field(ge=0, description="Give up waiting after this long (the run goes on).")
        ],
        ctx: Context,
        sender: Sender = None,
    ) -> CallToolResult:
        """Wait for a turn to end and return its reply as send_message does (the text of
        the whole turn, status, run_id, tools called).

        The turn is the oldest one send_message started in the conversation whose
        end you were not given yet (after reply_to_ask, or after send_message
        returned `running`), else whatever turn is in flight there. It returns
        early with status `asking` while the turn waits on a question you have not
        answered. With nothing running it returns at once with status `idle`. When
        timeout_s passes it says so (status `running`) and the turn goes on.
        """
        sender = await self._sender_for(sender, ctx)
        watch = self._watches.oldest(agent, sender) or self._watches.attach(agent, sender)
        return await self._outcome(watch, timeout_s)

    async def reply_to_ask(
        self,
        agent: Agent,
        content: Annotated[str, Field(description="The answer: an option's label, or free text.")],
        ctx: Context,
        sender: Sender = None,
        ask_id: Annotated[
            str | None,
            Field(description="The question answered (default: the one it is waiting on)."),
        ] = None,
    ) -> CallToolResult:
        """Answer the question an agent asked (send_message or wait_for_reply returned
        status `asking`). Returns at once: then call wait_for_reply for the rest of the turn.
        """
        sender = await self._sender_for(sender, ctx)
        watch = self._watches.asking(agent, sender, ask_id)
        if ask_id is None and watch is not None and watch.question is not None:
            ask_id = watch.question.ask_id
        async with self._client() as client:
            try:
                await client.reply_to_ask(agent, content, sender=sender, ask_id=ask_id)
            except ChinwagError as exc:
                if watch is not None and ask_id is not None and exc.code in (404, 409):
                    watch.dismissed.add(ask_id)  # not pending any more: never report it again
                raise
        if watch is not None and ask_id is not None:
            watch.dismissed.add(ask_id)
        return _data(
            {"agent": agent, "sender": sender, "ask_id": ask_id, "answered": True},
            text=f"Answered{f' question {ask_id}' if ask_id else ''}; "
            "call wait_for_reply for the rest of the turn.",
        )

    async def kill(
        self,
        agent: Agent,
        ctx: Context,
        sender: Sender = None,
        all: Annotated[bool, Field(description="Also drop every turn queued behind it.")] = False,
    ) -> CallToolResult:
        """Stop the conversation's turn in flight. What it completed stays in the history."""
        sender = await self._sender_for(sender, ctx)
        async with self._client() as client:
            killed = await client.kill(agent, sender, all=all)
        return _data(
            {"agent": agent, "sender": sender, "killed_run_id": killed.run_id},
            text=f"Killed run {killed.run_id}."
            if killed.run_id is not None
            else "Nothing was running.",
        )

    async def compact(
        self,
        agent: Agent,
        ctx: Context,
        sender: Sender = None,
        instructions: Annotated[
            str | None, Field(description="What the summary must keep.")
        ] = None,
    ) -> CallToolResult:
        """Summarize the conversation into an archive, so that the agent goes on from the
        summary with a small context. Waits for the turns before it.
        """
        sender = await self._sender_for(sender, ctx)
        async with self._client() as client:
            done = await client.compact(agent, sender, instructions=instructions)
        return _data(
            {
                "agent": agent,
                "sender": sender,
                "archive": done.archive,
                "summary": done.summary,
                "archived_entries": done.archived_entries,
            }
        )

    # --- plumbing ------------------------------------------------------------------

    async def _sender_for(self, given: str | None, ctx: Context) -> str:
        if given:
            return given
        if self._sender:
            return self._sender
        if (name := await self.token_name()) is not None:
            return name
        params = ctx.request_context.session.client_params
        return f"mcp:{params.client_info.name if params is not None else 'client'}"

    async def _outcome(self, watch: RunWatch, timeout_s: float | None) -> CallToolResult:
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            await watch.settled()
        if watch.over:
            self._watches.forget(watch)
        if watch.failure is not None:
            raise ToolError(describe(watch.failure))
        return _run_result(watch.report(), timeout_s)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Client]:
        """A connection to the daemon (one that is not there is ``ConnectionLost``); its
        welcome says whom the token speaks as, over TCP."""
        async with connect_explained(self._socket, client=CLIENT_NAME) as client:
            self._speaks_as, self._welcomed = client.welcome.speaks_as, True
            yield client

    async def token_name(self) -> str | None:
        """The one name this server's token speaks as, over TCP; None on the Unix socket,
        or for a token that speaks for several names (``tg:*``, ``*``)."""
        if not self._welcomed:
            async with self._client():
                pass
        name = self._speaks_as
        return name if name is not None and not name.endswith("*") else None

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[Client]:
        """``_connect`` for a tool: what the daemon refuses becomes the tool's error."""
        try:
            async with self._connect() as client:
                yield client
        except ChinwagError as exc:
            raise ToolError(describe(exc)) from None


def _lean(entry: Entry) -> dict[str, Any]:
    """An entry without its empty fields: a model reads the history, token by token."""
    fields: dict[str, Any] = msgspec.to_builtins(entry)
    return {
        name: value
        for name, value in fields.items()
        if value is not None and value is not False and value != "" and value != []
    }


def _data(value: dict[str, Any], text: str | None = None) -> CallToolResult:
    """A result whose structured content is ``value``; its text is ``text`` or the JSON."""
    structured: dict[str, Any] = msgspec.to_builtins(value)
    if text is None:
        text = msgspec.json.encode(structured).decode()
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=structured
    )


def _run_result(report: RunReport, timeout_s: float | None) -> CallToolResult:
    """The reply's text first, for the calling model to read, then what became of the run."""
    parts = [report.text] if report.text else []
    parts.append(_run_note(report, timeout_s))
    return CallToolResult(
        content=[TextContent(type="text", text="\n\n".join(parts))],
        structured_content=msgspec.to_builtins(report),
        is_error=report.status == "error",
    )


def _run_note(report: RunReport, timeout_s: float | None) -> str:
    facts: list[str] = [report.status]
    if report.run_id is not None:
        facts.append(f"run_id {report.run_id}")
    if report.last_seq is not None:
        facts.append(f"last_seq {report.last_seq}")
    if report.tool_calls:
        calls = (call.name + (" (failed)" if call.is_error else "") for call in report.tool_calls)
        facts.append(f"tools called: {', '.join(calls)}")
    note = f"[{' · '.join(facts)}]"
    match report.status:
        case "error" if report.error is not None:
            return f"{note} error {report.error.code}: {report.error.message}"
        case "killed":
            return f"{note} The turn was killed; any text above is what it said before."
        case "asking":
            lines = [f"{note} The agent asks (ask_id {report.ask_id}):"]
            for question in report.questions:
                header = f"{question.header}: " if question.header else ""
                lines.append(f"- {header}{question.question}")
                for option in question.options:
                    about = f": {option.description}" if option.description else ""
                    lines.append(f"  - {option.label}{about}")
                if question.multi_select:
                    lines.append("  (several options may be chosen)")
            lines.append("Answer with reply_to_ask, then call wait_for_reply for the rest.")
            return "\n".join(lines)
        case "starting" | "queued" | "running":
            waited = f" after {timeout_s:g} s" if timeout_s is not None else ""
            return (
                f"{note} Not finished{waited}; the turn goes on: wait_for_reply "
                "waits for its end, kill stops it."
            )
        case "idle":
            return (
                f"{note} Nothing is running in ({report.agent}, {report.sender}); "
                "read_history shows what was said."
            )
        case _:
            return note


def build_server(tools: ChinwagTools) -> MCPServer:
    """The server with every tool: the conversations' and the mail's."""
    server = MCPServer(
        "chinwag",
        version=version("chinwag"),
        instructions=INSTRUCTIONS,
        log_level="WARNING",
    )
    reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    running = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
    server.add_tool(tools.list_agents, annotations=reading)
    server.add_tool(tools.list_conversations, annotations=reading)
    server.add_tool(tools.read_history, annotations=reading)
    server.add_tool(tools.send_message, annotations=running)
    server.add_tool(tools.wait_for_reply, annotations=reading)
    server.add_tool(tools.reply_to_ask, annotations=running)
    server.add_tool(
        tools.kill,
        annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False),
    )
    server.add_tool(tools.compact, annotations=running)
    tools.mail.add_to(server)
    return server


async def serve(socket: Path | str, sender: str | None) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin.

    Runs still followed then are left to the daemon, which finishes them; the
    mail identity's registration, if a mail tool made one, ends with the server.
    """
    async with anyio.create_task_group() as tasks:
        await build_server(ChinwagTools(socket, sender, tasks)).run_stdio_async()
        tasks.cancel_scope.cancel()
