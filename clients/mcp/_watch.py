"""Runs followed to their end by the MCP server's own tasks.

A tool call may return before its run ends: the run asks the user a question,
or the caller's timeout passes. So the daemon stream of every run the server
starts (and every run it attaches to) is read by a task of the server's, not
by the tool call: the run's outcome accumulates in a ``RunWatch`` whatever the
calls do, and ``wait_for_reply`` picks it up where it was. Following the
original stream, rather than attaching again later, is what makes this
race-free: a run that ends between two tool calls still has its reply kept.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Literal

import anyio
import anyio.abc
import msgspec
from chinwag.protocol import (
    AskQuestion,
    AskUser,
    End,
    ErrorInfo,
    Queued,
    Start,
    StreamEventMsg,
    TextDelta,
    ToolCall,
    ToolResult,
)

from .._client import ChinwagError, Client, EventStream

RunStatus = Literal[
    "starting",  # sent; the daemon has not answered yet
    "queued",  # behind another run of the conversation
    "running",
    "asking",  # waiting for an answer to `ask_user`
    "done",
    "killed",
    "error",
    "detached",
    "idle",  # `attach` found nothing running
]


class ToolCallReport(msgspec.Struct, kw_only=True):
    """A tool the agent called during the run."""

    name: str
    arguments: str  # JSON text, as the model wrote it
    is_error: bool | None = None  # None until its result arrives


class RunReport(msgspec.Struct, kw_only=True):
    """What a run has said and done so far; a tool's structured result."""

    agent: str
    sender: str
    status: RunStatus
    run_id: str | None = None
    text: str = ""  # every step's assistant text, steps separated by a blank line
    tool_calls: list[ToolCallReport] = msgspec.field(default_factory=list)
    ask_id: str | None = None  # with `questions`, while the status is `asking`
    questions: list[AskQuestion] = msgspec.field(default_factory=list)
    last_seq: int | None = None  # the conversation's newest seq once the run ended
    error: ErrorInfo | None = None


class RunWatch:
    """One run's events as they arrive, and whether a tool waiting on it may return."""

    def __init__(self, agent: str, sender: str) -> None:
        self.agent = agent
        self.sender = sender
        self.end: End | None = None
        self.failure: ChinwagError | None = None
        #: Questions answered through this server (or found no longer pending):
        #: the run may not have moved on yet, but nobody needs to be told again.
        self.dismissed: set[str] = set()
        self._status: RunStatus = "starting"
        self._run_id: str | None = None
        self._steps: list[str] = []
        self._step: list[str] = []
        self._calls: dict[str, ToolCallReport] = {}
        self._ask: AskUser | None = None
        self._open_asks: set[str] = set()  # ask_user calls without a result yet
        self._changed = anyio.Event()

    @property
    def over(self) -> bool:
        """The run ended, or following it failed."""
        return self.end is not None or self.failure is not None

    @property
    def question(self) -> AskUser | None:
        """The question the run waits on, unless someone here already answered it."""
        ask = self._ask
        if ask is None or ask.ask_id in self.dismissed or self.over:
            return None
        return ask

    def take(self, event: StreamEventMsg) -> None:
        match event:
            case Queued():
                self._status = "queued"
            case Start(run_id=run_id):
                self._status = "running"
                self._run_id = run_id
            case TextDelta(delta=delta):
                self._step.append(delta)
            case ToolCall(call_id=call_id, name=name, arguments=arguments):
                self._close_step()
                self._calls[call_id] = ToolCallReport(name=name, arguments=arguments)
                if name == "ask_user":
                    self._open_asks.add(call_id)
            case ToolResult(call_id=call_id, is_error=is_error):
                if call_id in self._calls:
                    self._calls[call_id].is_error = is_error
                self._open_asks.discard(call_id)
                if not self._open_asks:
                    self._ask = None
            case AskUser():
                self._ask = event
            case End():
                self.end = event
            case _:
                return
        self._notify()

    def fail(self, error: ChinwagError) -> None:
        self.failure = error
        self._notify()

    async def settled(self) -> None:
        """Return once the run is over or waits on a question nobody here answered.

        Cancelling the wait (a timeout) leaves the run and its following alone.
        """
        while not self.over and self.question is None:
            await self._changed.wait()

    def report(self) -> RunReport:
        report = RunReport(
            agent=self.agent,
            sender=self.sender,
            status=self._status,
            run_id=self._run_id,
            text="\n\n".join(part for part in [*self._steps, "".join(self._step)] if part),
            tool_calls=list(self._calls.values()),
        )
        if self.end is not None:
            report.status = self.end.status
            report.last_seq = self.end.last_seq
            report.error = self.end.error
        elif (ask := self.question) is not None:
            report.status = "asking"
            report.ask_id = ask.ask_id
            report.questions = ask.questions
        return report

    def _close_step(self) -> None:
        if self._step:
            self._steps.append("".join(self._step))
            self._step = []

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


ClientOpener = Callable[[], AbstractAsyncContextManager[Client]]


class Watches:
    """The runs this server follows, per conversation, oldest first.

    A watch stays until a tool has reported its end, so that the replies to
    several messages sent in a row are each collected in turn.
    """

    def __init__(self, tasks: anyio.abc.TaskGroup, open_client: ClientOpener) -> None:
        self._tasks = tasks
        self._open_client = open_client
        self._by_conversation: dict[tuple[str, str], list[RunWatch]] = {}

    def send(self, agent: str, sender: str, content: str) -> RunWatch:
        """Start a run and follow it."""
        return self._follow(agent, sender, lambda c: c.stream(agent, content, sender=sender))

    def attach(self, agent: str, sender: str) -> RunWatch:
        """Follow the conversation's run in flight (started elsewhere), from its start."""
        return self._follow(agent, sender, lambda c: c.attach(agent, sender))

    def oldest(self, agent: str, sender: str) -> RunWatch | None:
        """The first run of the conversation whose end no tool has reported yet."""
        watches = self._by_conversation.get((agent, sender))
        return watches[0] if watches else None

    def asking(self, agent: str, sender: str, ask_id: str | None = None) -> RunWatch | None:
        """The followed run waiting on question ``ask_id`` (None: on any question)."""
        for watch in self._by_conversation.get((agent, sender), []):
            question = watch.question
            if question is not None and ask_id in (None, question.ask_id):
                return watch
        return None

    def forget(self, watch: RunWatch) -> None:
        """Its end was reported: stop keeping it."""
        key = (watch.agent, watch.sender)
        watches = self._by_conversation.get(key, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self._by_conversation.pop(key, None)

    def _follow(
        self, agent: str, sender: str, request: Callable[[Client], EventStream]
    ) -> RunWatch:
        watch = RunWatch(agent, sender)
        self._by_conversation.setdefault((agent, sender), []).append(watch)
        self._tasks.start_soon(self._read, watch, request)
        return watch

    async def _read(self, watch: RunWatch, request: Callable[[Client], EventStream]) -> None:
        try:
            async with self._open_client() as client, request(client) as events:
                async for event in events:
                    watch.take(event)
        except ChinwagError as exc:
            watch.fail(exc)
