"""One message to the agent, followed until its run ends and shown as it streams."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import structlog
from chinwag.protocol import (
    AskUser,
    End,
    Entry,
    ErrorInfo,
    Queued,
    Start,
    StreamEventMsg,
    TextDelta,
    ToolCall,
    ToolResult,
)

from .._client import ChinwagError, Client, ConnectionLost, EventStream
from .._render import QuietCalls, tool_call_summary
from ._chat import Chat
from ._link import Backoff, DaemonLink
from ._reply import LiveReply
from ._spool import Spool, Spooled

log = structlog.get_logger()

# The daemon's code for "going away": it is shutting down, or the connection broke.
_GONE = 503


class Turn:
    """A message sent to the agent and the run that answers it.

    It survives the daemon going away. A run that had started is attached
    again once the bridge has reconnected (its events replay from `start`;
    those already shown are skipped) or, if it ended meanwhile, read back from
    the history. A run that had not started is sent again: a daemon that went
    away before starting it did not keep it.

    While the run is queued or works (thinking, writing, in a tool), the chat
    shows "typing…"; not while it waits for an answer to a question. A message
    that waits for the daemon to come back is answered at once, once per outage
    and chat, that it is kept.

    The message stays in the spool until its answer is shown in the chat (the
    run's `end` handled: its final text, or its error, delivered), so that a
    bridge stopped before then sends it on its next start or, if the daemon
    took it, follows its run again (attached while it runs, read back from the
    history once it ended) and shows its answer. `queued` is not enough, nor
    `start`: the daemon keeps its queue in memory, and drops it when it shuts
    down; a run started goes on without the bridge that was showing it.
    """

    def __init__(
        self, chat: Chat, link: DaemonLink, agent: str, message: Spooled, spool: Spool
    ) -> None:
        self._chat = chat
        self._link = link
        self._agent = agent
        self._content = message.text
        self._guest = message.guest
        self._update_id = message.update_id
        self._reply_to = message.reply_to
        self._answer_ids = message.answer_ids
        self._spool = spool
        self._typing = chat.typing
        self._quiet = QuietCalls()  # ask_user is shown as its question, not as a call
        self._start: Start | None = None
        self._seen = 0  # events of the run handled so far, its `start` included
        self._before = ""  # the run's text already shown above a question it asked
        self._heading = ""
        self._asks: list[str] = []

    async def run(self, ticket: int, resume: Start | None = None) -> None:
        """Send the message when ``ticket`` comes up, and show the reply until the run ends.

        With ``resume``, the daemon already took the message (before the bridge
        stopped) and started that run: it is followed, and the message not sent again.
        The message leaves the spool once the run's answer is shown.
        """
        if resume is not None:
            self._chat.release(ticket)
            self._start, self._seen = resume, 1
            if resume.agent != self._agent:
                self._heading = f"**{resume.agent}:**\n"
        async with anyio.create_task_group() as painters:
            self._painters = painters
            # The first reply answers the message (a reply to it, in a group), in
            # the messages an earlier bridge began to show it in, if any.
            self._live = self._new_reply(
                reply_to=self._reply_to,
                shown=self._answer_ids,
                on_shown=partial(self._spool.answer, self._update_id),
            )
            async with anyio.create_task_group() as typing:
                typing.start_soon(self._typing.run)
                try:
                    end = await self._follow(ticket)
                finally:
                    self._typing.want(self, False)  # before another turn's run takes over
                typing.cancel_scope.cancel()
            await self._conclude(end)
        # The answer is in the chat (or Telegram would not take it): nothing is
        # left to do for the message.
        await self._spool.done(self._update_id)
        for ask_id in self._asks:
            await self._chat.withdraw(ask_id)

    def _new_reply(self, **options: Any) -> LiveReply:
        reply = LiveReply(self._chat.outbox, self._chat.thread_id, self._heading, **options)
        self._painters.start_soon(reply.paint)
        return reply

    async def _follow(self, ticket: int) -> End:
        retry = Backoff(first=0.2, ceiling=5.0)
        while True:
            self._typing.want(self, False)
            client = await self._connected()
            try:
                if self._start is None:
                    end = await self._send(client, ticket)
                else:
                    end = await self._attach(client)
            except ChinwagError as exc:
                if exc.code != _GONE:
                    return End(
                        status="error",
                        error=ErrorInfo(code=exc.code, message=exc.message),
                        last_seq=None,
                    )
                log.info(
                    "run_interrupted",
                    sender=self._chat.sender,
                    started=self._start is not None,
                    error=str(exc),
                )
                if not isinstance(exc, ConnectionLost):
                    await anyio.sleep(retry.next())  # still connected to a daemon on its way out
                continue
            if end is not None:
                return end
            await anyio.sleep(retry.next())

    async def _connected(self) -> Client:
        """The connection to the daemon, once there is one. A message not sent yet
        that waits for the daemon to come back is answered that it is kept."""
        if self._start is not None:
            return await self._link.client()
        async with anyio.create_task_group() as waiting:
            waiting.start_soon(self._tell_outage)
            client = await self._link.client()
            waiting.cancel_scope.cancel()
        return client

    async def _tell_outage(self) -> None:
        outage = await self._link.outage()
        await self._chat.tell_outage(outage)

    async def _send(self, client: Client, ticket: int) -> End | None:
        """Send the message and relay its run; None when it must be sent again."""
        async with contextlib.AsyncExitStack() as stack:
            async with self._chat.in_order(ticket):
                await self._spool.sent(self._update_id, datetime.now(UTC))
                events = await stack.enter_async_context(
                    client.stream(
                        self._agent, self._content, sender=self._chat.sender, guest=self._guest
                    )
                )
            self._typing.want(self, True)
            end = await self._relay(events)
        if self._start is None and end.error is not None and end.error.code == _GONE:
            return None  # the daemon shut down before the run started
        return end

    async def _attach(self, client: Client) -> End:
        """Follow the run again after a reconnection, or read how it ended."""
        assert self._start is not None
        async with client.attach(self._agent, self._chat.sender) as events:
            first = await anext(events)
            if isinstance(first, Start) and first.run_id == self._start.run_id:
                self._typing.want(self, True)
                return await self._relay(events, skip=self._seen - 1)
        return await self._recover(client)

    async def _relay(self, events: EventStream, skip: int = 0) -> End:
        """Show the run's events up to its `end`, after skipping ``skip`` of them."""
        async for event in events:
            if isinstance(event, End):
                return event
            if skip:
                skip -= 1
            else:
                self._typing.want(self, not isinstance(event, AskUser))
                await self._show(event)
        raise ConnectionLost("The run's events ended without an `end`.")

    async def _show(self, event: StreamEventMsg) -> None:
        match event:
            case Queued(position=position):
                ahead = "1 message" if position == 1 else f"{position} messages"
                await self._chat.say(
                    f"⏳ Queued behind {ahead}; I'll answer when the agent is free.",
                    insist=False,
                    reply_to=self._reply_to,
                )
            case Start(agent=speaker):
                self._start = event
                if speaker != self._agent:
                    self._heading = self._live.heading = f"**{speaker}:**\n"
            case TextDelta(delta=delta):
                self._live.add(delta)
            case ToolCall() if not self._quiet.hides(event):
                self._live.tool_started(event.call_id, tool_call_summary(event))
            case ToolResult() if not self._quiet.hides(event):
                self._live.tool_ended(event.call_id)
            case AskUser():
                # The question goes below what the run said so far; what it
                # says after the answer, below the question.
                await self._live.finish(self._live.text)
                self._before += self._live.text
                self._live = self._new_reply()
                self._asks.append(event.ask_id)
                await self._chat.present(event)
        if self._start is not None:
            self._seen += 1

    async def _recover(self, client: Client) -> End:
        """The run ended while the bridge was away: its answer, from the history."""
        assert self._start is not None
        # Archived entries too: a compaction since may have archived the run.
        # Read to the end, paged: the last entry's seq is then the conversation's newest.
        last_seq = self._start.seq
        entries: list[Entry] = []
        async for entry in client.iter_history(
            self._agent, self._chat.sender, after_seq=self._start.seq, include_archived=True
        ):
            last_seq = entry.seq
            if entry.run_id == self._start.run_id and entry.kind == "message":
                entries.append(entry)
        text = "".join(entry.content for entry in entries if entry.role == "assistant")
        text = text.removeprefix(self._before)
        finished = bool(entries) and entries[-1].role == "assistant" and not entries[-1].tool_calls
        log.info("run_recovered", sender=self._chat.sender, entries=len(entries), done=finished)
        # Unfinished, the run kept only its completed steps: keep the text
        # already streamed unless the history holds more; and what an earlier
        # bridge showed, which may be more than that, in its messages.
        if not finished:
            self._live.leave_earlier()
        if finished or len(text) > len(self._live.text):
            self._live.replace(text)
        if finished:
            return End(status="done", error=None, last_seq=last_seq)
        return End(
            status="error",
            error=ErrorInfo(code=_GONE, message="The daemon went away before the run finished."),
            last_seq=last_seq,
        )

    async def _conclude(self, end: End) -> None:
        note = _note(end)
        text = self._live.text
        if not text.strip() and note is None and not self._before:
            note = "_(The agent answered without text.)_"
        await self._live.finish("\n\n".join(part for part in (text, note) if part))


def _note(end: End) -> str | None:
    """What to add below the reply about how its run ended."""
    if end.status == "done":
        return None
    if end.status == "killed":
        return "⏹ _Stopped._"
    if end.status == "error" and end.error is not None:
        return f"⚠️ Error {end.error.code}: {end.error.message}"
    return f"_(The run ended {end.status}.)_"
