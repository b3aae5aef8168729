"""A conversation as a state machine: its queue of jobs, the one in flight, kill and shutdown.

A job is a turn (`Run`) or a compaction (`Compacting`). Each goes through
three states, queued -> running -> ended, and ends through its one
``finish``. A conversation's jobs run one at a time, in arrival order, on the
conversation's own long-lived task; ``enqueue``, ``interrupt`` (an enqueue
that stops the job in flight), ``kill`` and ``drain_for_shutdown`` are the
only ways in and out of its queue.

Consumers receive a run's events through sinks, plain callables that must not
block: a sink returns False once its consumer is gone (or too slow), and the
run drops it.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog
import trio
from chinwag.protocol import (
    AskQuestion,
    AskUser,
    Compaction,
    ConversationItem,
    End,
    EndStatus,
    Entry,
    ErrorInfo,
    MemoryHit,
    Queued,
    QueuePolicy,
    Start,
    StreamEventMsg,
    TextDelta,
    Title,
    TokenUsage,
    ToolResult,
)
from chinwag.storage import Archive, NewConversation, Storage, StorageError

from ._agent import Agent
from ._compaction import summarize, summary_request, transcript_parts
from ._config import Config
from ._context import Context, ProviderBlocks
from ._errors import RequestError, ToolError
from ._limits import refusal
from ._providers import Prompt, ProviderError
from ._steps import StepsExhausted, now, run_steps
from ._telemetry import NO_RUN, RunTelemetry, Telemetry
from ._tools import Mailbox, Mailboxes
from ._workspace import Workspace

log = structlog.get_logger("chinwag.runtime")

Sink = Callable[[StreamEventMsg], bool]
"""Takes one event without blocking; returns False when its consumer is gone."""

JobState = Literal["queued", "running", "ended"]
Stop = Literal["killed", "shutdown"]

CLAIM_POLL_S = 0.05  # how often a job waiting on another daemon's conversation retries, alone

# A run id: this process's random prefix and a counter, as long as a uuid4's hex
# and as unique across daemons and restarts, for a fraction of its cost.
_RUN_PREFIX = os.urandom(8).hex()
_run_numbers = itertools.count(1)


def new_run_id() -> str:
    return f"{_RUN_PREFIX}{next(_run_numbers):016x}"


@dataclass(eq=False)
class Subscription:
    """Events of every run whose conversation matches the filters, from its `start` on."""

    agent: str | None
    sender: str | None
    deliver: Callable[[str, str, str, StreamEventMsg], bool]

    def matches(self, agent: str, sender: str) -> bool:
        return (self.agent is None or self.agent == agent) and (
            self.sender is None or self.sender == sender
        )


class Line(Protocol):
    """The line for a conversation across the daemons sharing its store (daemon/_cluster.py)."""

    async def turn(self, agent: str, sender: str, asked_at: float) -> None:
        """Wait while runs that waited on other daemons since before ``asked_at`` go first."""
        ...

    async def wait_for(self, agent: str, sender: str) -> int:
        """Join the line at the daemon holding the conversation; the runs ahead."""
        ...

    async def released(self, agent: str, sender: str) -> None:
        """Return once the holder let go, or after a while."""
        ...

    def promised(self, agent: str, sender: str) -> bool:
        """Whether a holder will say when it lets go."""
        ...

    def done_waiting(self, agent: str, sender: str) -> None:
        """Claimed, or no longer waiting."""
        ...

    def let_go(self, agent: str, sender: str) -> None:
        """This daemon released the conversation."""
        ...


class Host(Protocol):
    """What a conversation needs of the runtime that holds it."""

    config: Config
    storage: Storage
    agents: dict[str, Agent]
    nursery: trio.Nursery
    post_office: Mailboxes | None
    telemetry: Telemetry

    @property
    def cluster(self) -> Line | None:
        """The other daemons on a shared store; None when alone."""
        ...

    def submit(
        self,
        *,
        agent: str,
        sender: str,
        content: str,
        guest: str | None,
        cwd: str | None,
        queue: QueuePolicy,
        sink: Sink,
        chain: tuple[str, ...] = (),
        framing: str | None = None,
    ) -> Run: ...

    def became_idle(self, conv: Conversation) -> None: ...

    def count_usage(self, entries: list[Entry]) -> None:
        """Count the model tokens of ``entries``, just stored, in the daemon's totals."""
        ...


class RunFailed(Exception):
    """The job cannot go on; it ends `error` with this code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class PendingAsk:
    ask_id: str
    answered: trio.Event = field(default_factory=trio.Event)
    answer: str = ""


# --- jobs ------------------------------------------------------------------------


class Job:
    """What a conversation runs, one at a time and in arrival order."""

    #: What it reports of itself (a run's metrics and span); nothing by default.
    observed: RunTelemetry = NO_RUN

    def __init__(self, conversation: Conversation) -> None:
        self.id = new_run_id()
        self.conversation = conversation
        self.state: JobState = "queued"
        self.scope = trio.CancelScope()
        self.stopped: Stop | None = None  # why it was stopped, if it was
        self.done = trio.Event()  # set once ended
        self.asked_at = trio.current_time()  # where it stands in line among the daemons

    def stop(self, reason: Stop) -> None:
        """Cancel the job: it ends at its next checkpoint (a write under way completes)."""
        if self.state != "ended":
            self.stopped = self.stopped or reason
            self.scope.cancel()

    def queued(self, position: int) -> None:
        """The job waits behind ``position`` others (the one in flight included)."""

    async def execute(self) -> None:
        """Run the job to its end, which ``finish`` tells; never raises but for the
        daemon's own cancellation. A job stopped while queued ends without a start."""
        structlog.contextvars.bind_contextvars(run_id=self.id)
        self.state = "running"
        if self.stopped is not None:  # stopped while queued: it stores nothing
            self.finish(*self._stopped_outcome())
            return
        with self.observed:  # its clock started and its span current, on this task
            failure: Exception | None = None
            with self.scope:
                try:
                    await self._work()
                except Exception as exc:
                    failure = exc
                finally:
                    await self._settle()
            failure = self._failed_beside() or failure
            status: EndStatus = "done"
            error: ErrorInfo | None = None
            if failure is not None:
                status, error = "error", self._outcome(failure)
            elif self.scope.cancelled_caught and not self._completed():
                status, error = self._stopped_outcome()
            log.debug("run_ended", status=status, code=error.code if error else None)
            self.finish(status, error)

    async def _work(self) -> None:
        """What the job does, in its scope; raises why it could not."""
        raise NotImplementedError

    async def _settle(self) -> None:
        """Wait, shielded, for what the job began beside its scope (nothing by default)."""

    def _failed_beside(self) -> Exception | None:
        """What failed beside the job's scope, and ends it whatever it did (nothing by default)."""
        return None

    def _completed(self) -> bool:
        """Whether the job did its work although it was stopped."""
        return False

    def finish(self, status: EndStatus, error: ErrorInfo | None) -> None:
        """The one way a job ends, queued or running."""
        raise NotImplementedError

    def _outcome(self, exc: Exception) -> ErrorInfo:
        """A failure as the job's `error`, logged."""
        if isinstance(exc, RunFailed | ProviderError):
            if isinstance(exc, ProviderError):
                log.warning("provider_failed", code=exc.code, message=exc.message)
            return ErrorInfo(code=exc.code, message=exc.message)
        if isinstance(exc, StorageError):
            log.error("storage_failed", error=str(exc))
            return ErrorInfo(code=500, message=f"Storage failed: {exc}")
        log.error("run_crashed", exc_info=exc)
        return ErrorInfo(code=500, message="The run failed on an internal error.")

    def _stopped_outcome(self) -> tuple[EndStatus, ErrorInfo | None]:
        if self.stopped == "shutdown":
            return "error", ErrorInfo(
                code=503, message="The daemon shut down during the run; completed steps are kept."
            )
        return "killed", None


class Run(Job):
    """A turn: the user's entry, then model steps until a final answer.

    The user entry's write starts first and the model's first request goes
    out while it is in flight; what the model says before the write is done
    is held back, so that `start` (stored at seq) is always the first event.
    """

    def __init__(
        self,
        conversation: Conversation,
        *,
        content: str,
        speaker: Agent,
        cwd: str | None,
        chain: tuple[str, ...] = (),
        policy: QueuePolicy = "enqueue",
        framing: str | None = None,
    ) -> None:
        super().__init__(conversation)
        self.content = content
        self.framing = framing
        self.speaker = speaker
        self.is_guest = speaker.name != conversation.agent
        self.cwd = cwd
        self.chain = chain  # the agents whose delegation led to this run, outermost first
        self.policy = policy
        self.sinks: list[Sink] = []
        self.events: list[StreamEventMsg] = []  # from `start` on, replayed to `attach`
        self.end: End | None = None  # once ended
        # A tool step's provider blocks go back in the run's later requests
        # (ModelMessage.provider_blocks); in memory only.
        self.blocks: ProviderBlocks = {}
        self._told_queued = False
        self._held: list[StreamEventMsg] | None = []  # published before `start`; None after
        self._pending: Entry | None = None  # the user entry while its write is in flight
        self._writing: trio.Event | None = None  # set once the write in flight is done
        self._write_error: Exception | None = None
        # Made now: its span descends from the one current where it was asked for.
        self.observed = conversation.telemetry.run(speaker, conversation.key, self.id)

    @property
    def started(self) -> bool:
        return self._held is None

    # --- fan-out -------------------------------------------------------------

    def publish(self, event: StreamEventMsg) -> None:
        """Send ``event`` to the run's sinks and the matching subscriptions, from `start` on."""
        held = self._held
        if held is not None:
            held.append(event)
            return
        self.events.append(event)
        sinks = self.sinks
        if len(sinks) == 1:  # the common case, once per event: `tell` without its call
            if not sinks[0](event):
                sinks.clear()
        else:
            self.tell(event)
        subscriptions = self.conversation.subscriptions
        if not subscriptions:  # the common case, once per event: nothing to scan
            return
        conv = self.conversation
        gone = [
            sub
            for sub in subscriptions
            if sub.matches(conv.agent, conv.sender)
            and not sub.deliver(conv.agent, conv.sender, self.id, event)
        ]
        for sub in gone:  # a subscriber that returns False leaves the list to us
            subscriptions.remove(sub)

    def tell(self, event: StreamEventMsg) -> None:
        """Send ``event`` to the run's own sinks only (not recorded, no subscriber)."""
        sinks = self.sinks
        if len(sinks) == 1:  # the common case, once per event: no list to build
            if not sinks[0](event):
                sinks.clear()
            return
        gone = [sink for sink in sinks if not sink(event)]
        for sink in gone:
            sinks.remove(sink)

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink: Sink) -> bool:
        try:
            self.sinks.remove(sink)
        except ValueError:
            return False
        return True

    def queued(self, position: int) -> None:
        if not self._told_queued:  # at most once
            self._told_queued = True
            self.tell(Queued(position=position))

    # --- the job -------------------------------------------------------------

    async def _work(self) -> None:
        conv = self.conversation
        await conv.load_context()
        try:
            if conv.storage.shared:
                async with conv.claimed(self, self.policy):
                    await self._turn()
            else:
                await self._turn()
        except StepsExhausted:
            steps = self.speaker.config.max_steps
            raise RunFailed(
                500,
                f"The agent stopped after max_steps={steps} steps without a final answer; "
                "its completed steps are stored.",
            ) from None

    async def _settle(self) -> None:
        writing = self._writing
        if writing is not None and not writing.is_set():
            with trio.CancelScope(shield=True):  # `start` (or the write's failure) first
                await writing.wait()

    def _failed_beside(self) -> Exception | None:
        return self._write_error

    async def _turn(self) -> None:
        conv = self.conversation
        await conv.compact_if_full(self)
        assert conv.context is not None  # loaded by `_work`
        config = conv.agents[conv.agent].config
        if problem := refusal(conv.agent, conv.sender, config, conv.context.entries, now()):
            raise RunFailed(409, problem)  # before the user entry: a refused run stores nothing
        user = Entry(seq=0, role="user", content=self.content, run_id=self.id, created_at=now())
        if self.speaker.provider.local:  # no round trip to overlap the write with
            self._begin(await conv.store_user_entry(user, self.cwd))
        else:
            self._pending, self._writing = user, trio.Event()
            conv.spawn(self._write_pending)
        await run_steps(self, self.speaker, guest=self.is_guest)

    async def _write_pending(self) -> None:
        """Store the user entry while the model's first request is out, then send `start`.

        Runs on the conversation's task, outside the run's scope: a kill lets the
        write complete, and the run waits for it before it ends.
        """
        assert self._pending is not None and self._writing is not None
        try:
            stored = await self.conversation.store_user_entry(self._pending, self.cwd)
        except Exception as exc:
            self._write_error = exc
            self.scope.cancel()  # the steps can store nothing after a lost user entry
        else:
            self._begin(stored)
        finally:
            self._pending = None
            self._writing.set()

    def _begin(self, stored: Entry) -> None:
        """The user entry is stored: send `start`, then what the model said meanwhile."""
        log.debug("run_started", seq=stored.seq, speaker=self.speaker.name)
        held, self._held = self._held, None
        self.publish(Start(run_id=self.id, agent=self.speaker.name, seq=stored.seq))
        for event in held or ():
            self.publish(event)

    def finish(self, status: EndStatus, error: ErrorInfo | None) -> None:
        self.state = "ended"
        self.end = end = End(status=status, error=error, last_seq=self.conversation.last_seq)
        if self.started:
            self.publish(end)
        else:  # subscribers see runs from `start` on; a run that never started is not theirs
            self.tell(end)
        self.sinks.clear()
        # Once `end` has gone out: what the run reports (its spans emitted, its counts)
        # is not on the client's way to it.
        self.observed.ended(status, error)
        self.done.set()

    # --- Turn: what the step loop asks of the run ---------------------------------

    @property
    def context_tokens(self) -> int:
        return self.conversation.context_tokens

    @context_tokens.setter
    def context_tokens(self, tokens: int) -> None:
        self.conversation.context_tokens = tokens

    def prompt(self) -> Prompt:
        context = self.conversation.context
        assert context is not None  # loaded before the turn
        return context.prompt(
            self.speaker, blocks=self.blocks, pending=self._pending, framing=self.framing
        )

    async def _user_entry_written(self) -> None:
        """Wait for the user entry's write in flight, if any; raise what it failed with."""
        writing = self._writing
        if writing is not None and not writing.is_set():
            await writing.wait()
        if self._write_error is not None:
            raise self._write_error

    async def append(self, entries: list[Entry], blocks: list[dict[str, Any]]) -> None:
        await self._user_entry_written()
        stored = await self.conversation.append(entries)
        if blocks:  # for the next step's request, which goes on with this one
            self.blocks[stored[0].seq] = blocks

    # --- ToolContext: what a tool may do to the run that called it -----------------

    @property
    def workspace(self) -> Workspace | None:
        """The stream's cwd, else the conversation's stored one, else the agent's."""
        conv = self.conversation
        agent = conv.agents[conv.agent].config
        stored = conv.info.cwd if conv.info is not None else None
        root = self.cwd or stored or agent.cwd
        if root is None:
            return None
        daemon = conv.config.daemon
        return Workspace.for_agent(
            root, agent, allowed_roots=daemon.roots, command_timeout_s=daemon.command_timeout_s
        )

    async def set_title(self, title: str) -> None:
        conv = self.conversation
        # A first run's conversation is created by its user entry's write, which a
        # network model's tool call can overtake.
        await self._user_entry_written()
        with trio.CancelScope(shield=True):
            await conv.storage.set_title(conv.agent, conv.sender, title)
        if conv.info is not None:
            conv.info.title = title
        self.publish(Title(title=title))

    async def ask(self, questions: list[AskQuestion]) -> str:
        conv = self.conversation
        if conv.pending_ask is not None:
            raise ToolError("Another question is already waiting for the user; ask one at a time.")
        ask = PendingAsk(ask_id=uuid.uuid4().hex[:12])
        conv.pending_ask = ask
        try:
            self.publish(AskUser(ask_id=ask.ask_id, questions=questions))
            timeout = conv.config.daemon.ask_timeout_s
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await ask.answered.wait()
                return ask.answer
            raise ToolError(f"The user did not answer within {timeout:g} s.")
        finally:
            conv.pending_ask = None

    async def memory_search(self, query: str, limit: int) -> list[MemoryHit]:
        conv = self.conversation
        mine = self.speaker.config.memory_scope == "conversation"
        return await conv.storage.search_memory(
            self.speaker.name, query, limit=limit, sender=conv.sender if mine else None
        )

    async def memory_note(self, name: str, content: str) -> None:
        with trio.CancelScope(shield=True):
            await self.conversation.storage.put_note(
                self.speaker.name, name, content, updated_at=now()
            )

    @property
    def mail(self) -> Mailbox | None:
        office = self.conversation.host.post_office
        return office.mailbox(self.speaker.name) if office is not None else None

    async def delegate(self, agent: str, message: str) -> str:
        host = self.conversation.host
        me = self.speaker.name
        chain = (*self.chain, me)
        if agent in chain:
            raise ToolError(f"Delegating to {agent} would loop: {' -> '.join((*chain, agent))}.")
        limit = self.conversation.config.daemon.delegate_depth
        if len(chain) > limit:
            raise ToolError(f"Delegation goes at most {limit} agents deep; answer without it.")
        answer = DelegateAnswer()
        try:
            run = host.submit(
                agent=agent,
                sender=f"agent:{me}",
                content=message,
                guest=None,
                cwd=self.cwd,
                queue="enqueue",
                sink=answer,
                chain=chain,
            )
        except RequestError as exc:
            raise ToolError(exc.message) from None
        try:
            await run.done.wait()
        finally:
            run.stop("killed")  # a no-op once it ended; else the caller was killed, and it too
        end = run.end
        assert end is not None  # set before `done`
        if end.status != "done":
            reason = end.error.message if end.error else end.status
            raise ToolError(f"{agent} gave no answer: {reason}")
        return answer.text


class DelegateAnswer:
    """The sink of a delegated run: keeps its final text, shows nothing to any client."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def __call__(self, event: StreamEventMsg) -> bool:
        match event:
            case TextDelta(delta=delta):
                self._parts.append(delta)
            case ToolResult():
                self._parts.clear()  # text before a tool step is not the final answer
        return True


class Compacting(Job):
    """A `compact` request: summarize the conversation, queued behind its runs."""

    def __init__(self, conversation: Conversation, instructions: str | None) -> None:
        super().__init__(conversation)
        self.instructions = instructions
        self.result: Compaction | None = None
        self.error: RequestError | None = None

    async def _work(self) -> None:
        conv = self.conversation
        await conv.load_context()
        if conv.info is None:
            raise RunFailed(
                404, f"No conversation ({conv.agent}, {conv.sender}) exists; a `stream` creates it."
            )
        if conv.storage.shared:
            async with conv.claimed(self, "enqueue"):
                self.result = await conv.compact(self.instructions)
        else:
            self.result = await conv.compact(self.instructions)

    def _completed(self) -> bool:
        return self.result is not None

    def finish(self, status: EndStatus, error: ErrorInfo | None) -> None:
        self.state = "ended"
        if error is not None:
            self.error = RequestError(error.code, error.message)
        elif self.result is None:
            self.error = RequestError(409, "The compaction was killed before it stored anything.")
        self.done.set()


# --- the conversation ------------------------------------------------------------


class Conversation:
    """The owner of one `(agent, sender)`: its context, its jobs, its pending ask.

    Every mutation of the conversation's history goes through its jobs, one
    at a time, in the order they were enqueued, on the conversation's own
    task (started with its first job, ended when the runtime forgets it).
    """

    def __init__(
        self, host: Host, agent: str, sender: str, subscriptions: list[Subscription]
    ) -> None:
        self.host = host
        self.storage = host.storage
        self.config = host.config
        self.agents = host.agents
        self.telemetry = host.telemetry
        self.agent = agent
        self.sender = sender
        self.subscriptions = subscriptions  # the runtime's, shared by every conversation
        self.info: ConversationItem | None = None  # None: not stored (yet)
        self.loaded = False  # `info` was read
        self.context: Context | None = None  # read on the first job
        self.current: Job | None = None  # in flight, or about to start
        self.queue: deque[Job] = deque()
        self.pending_ask: PendingAsk | None = None
        self.holding = False  # on a shared store: this daemon holds its claim now
        self.context_tokens = 0  # as the model last reported it; 0 until a run reports
        self._load_lock = trio.Lock()
        self._serving = False  # its task is running
        self._closing = False  # forgotten by the runtime: its task ends when idle
        self._wakeup = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.agent, self.sender)

    @property
    def last_seq(self) -> int:
        return self.info.last_seq if self.info is not None else 0

    @property
    def busy(self) -> bool:
        return self.current is not None

    # --- the state machine -----------------------------------------------------

    def enqueue(self, job: Job, *, interrupt: bool = False) -> None:
        """Queue ``job`` behind the others, or with ``interrupt`` stop the one in flight
        and go next. Synchronous, so jobs keep their arrival order."""
        if self.current is None:
            self.current = job
            self._wake()
        elif interrupt:
            self.queue.appendleft(job)
            job.queued(1)
            self.current.stop("killed")
        else:
            self.queue.append(job)
            job.queued(len(self.queue))

    def kill(self, *, everything: bool) -> list[Job]:
        """Stop the job in flight (with ``everything``, end every queued one too).

        Returns the jobs stopped; each has ended once its ``done`` is set.
        """
        stopped: list[Job] = []
        if everything:
            while self.queue:
                job = self.queue.pop()
                job.stop("killed")
                job.finish("killed", None)
                stopped.append(job)
        if self.current is not None:
            self.current.stop("killed")
            stopped.append(self.current)
        return stopped

    def drain_for_shutdown(self) -> list[Job]:
        """End every queued job (503, nothing stored) and stop the one in flight."""
        stopped = list(self.queue)
        self.queue.clear()
        for job in stopped:
            job.stop("shutdown")
            job.finish(
                "error", ErrorInfo(code=503, message="The daemon shut down before the run started.")
            )
        if self.current is not None:
            self.current.stop("shutdown")
            stopped.append(self.current)
        return stopped

    def close(self) -> None:
        """The runtime forgets the conversation: its task ends once idle."""
        self._closing = True
        self._wakeup.unpark_all()

    def spawn(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` beside the job in flight, on the conversation's task."""
        assert self._nursery is not None  # only jobs spawn, and they run inside `serve`
        self._nursery.start_soon(fn)

    def _wake(self) -> None:
        self._closing = False
        if self._serving:
            self._wakeup.unpark()
        else:
            self._serving = True
            self.host.nursery.start_soon(self._serve)

    async def _serve(self) -> None:
        structlog.contextvars.bind_contextvars(agent=self.agent, sender=self.sender)
        self.telemetry.untraced_task()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                job = self.current
                if job is None:
                    if self._closing:
                        self._serving = False
                        break
                    await self._wakeup.park()
                    continue
                await job.execute()
                self.current = self.queue.popleft() if self.queue else None
                if self.current is None:
                    self.host.became_idle(self)

    # --- storage -----------------------------------------------------------------

    async def load(self) -> None:
        """Read the conversation's metadata from storage, once."""
        if self.loaded:
            return
        async with self._load_lock:
            if not self.loaded:
                self.info = await self.storage.get_conversation(self.agent, self.sender)
                self.loaded = True

    async def load_context(self) -> Context:
        """The working context, with the metadata read in the same go, once."""
        if self.context is not None:
            return self.context
        async with self._load_lock:
            if self.context is None:
                loaded = await self.storage.load_context(self.agent, self.sender)
                entries: list[Entry] = []
                if loaded is not None:
                    self.info, entries = loaded
                else:
                    self.info = None
                self.loaded = True
                self.context = Context(self.agent, entries)
        return self.context

    async def exists(self) -> bool:
        """Stored, or about to be: a conversation whose first run is queued exists."""
        await self.load()
        return self.info is not None or self.busy

    async def store_user_entry(self, user: Entry, cwd: str | None) -> Entry:
        """Append a run's user entry, creating the conversation in the same write if new."""
        if self.info is not None:
            if cwd is not None and cwd != self.info.cwd:
                with trio.CancelScope(shield=True):
                    await self.storage.set_cwd(self.agent, self.sender, cwd)
                self.info.cwd = cwd
            (stored,) = await self.append([user])
            return stored
        cwd = cwd or self.agents[self.agent].config.cwd
        with self.telemetry.appending():
            (stored,) = await self.storage.append(
                self.agent, self.sender, [user], create=NewConversation(cwd=cwd)
            )
        self.info = ConversationItem(
            agent=self.agent,
            sender=self.sender,
            cwd=cwd,
            created_at=stored.created_at,
            updated_at=stored.created_at,
            last_seq=stored.seq,
        )
        assert self.context is not None
        self.context.extend([stored])
        return stored

    async def append(self, entries: list[Entry]) -> list[Entry]:
        """Append to the history; like every storage write, once begun it completes."""
        with self.telemetry.appending():
            stored = await self.storage.append(self.agent, self.sender, entries)
        self.host.count_usage(stored)
        assert self.context is not None and self.info is not None
        self.context.extend(stored)
        self.info.last_seq = stored[-1].seq
        self.info.updated_at = stored[-1].created_at
        return stored

    @asynccontextmanager
    async def claimed(self, job: Job, policy: QueuePolicy) -> AsyncIterator[None]:
        """On a store other daemons share: hold the conversation while the job runs.

        A conversation busy on another daemon makes the job wait (`queued`,
        counting the runs ahead of it there), or under `reject` fail 409. The
        holder says when it lets go (daemon/_cluster.py); without a word the
        claim is tried again now and then. A job lets runs that waited on other
        daemons since before it was asked for go first. Once claimed, the
        conversation is re-read, since another daemon may have added to it.
        """
        storage, cluster = self.storage, self.host.cluster
        if cluster is not None:  # runs waiting elsewhere since before this one go first
            await cluster.turn(self.agent, self.sender, job.asked_at)
        if not await storage.claim(self.agent, self.sender):
            if policy == "reject":
                raise RunFailed(409, "The conversation is busy on another daemon; retry later.")
            if cluster is None:
                job.queued(1)
                while not await storage.claim(self.agent, self.sender):  # noqa: ASYNC110
                    await trio.sleep(CLAIM_POLL_S)
            else:
                try:
                    job.queued(await cluster.wait_for(self.agent, self.sender))
                    while not await storage.claim(self.agent, self.sender):
                        if cluster.promised(self.agent, self.sender):
                            await cluster.released(self.agent, self.sender)
                        # Else another daemon claimed it since we looked: join its line.
                        await cluster.wait_for(self.agent, self.sender)
                finally:
                    cluster.done_waiting(self.agent, self.sender)
        self.holding = True
        try:
            info = await storage.get_conversation(self.agent, self.sender)
            if info is not None and (self.info is None or info.last_seq != self.info.last_seq):
                self.context = None
                await self.load_context()
            yield
        finally:
            await storage.release(self.agent, self.sender)
            # Only now: a daemon asking to wait before this is told when we let go.
            self.holding = False
            if cluster is not None:
                cluster.let_go(self.agent, self.sender)

    # --- compaction -----------------------------------------------------------------

    async def compact_if_full(self, run: Run) -> None:
        """Auto-compaction: before a turn, when the last run filled the primary's threshold."""
        config = self.agents[self.agent].config
        if config.compact_at is None or self.context_tokens <= config.compact_at * (
            config.context_window
        ):
            return
        self.context_tokens = 0  # tried once per fill, whatever happens next
        try:
            compaction = await self.compact(None)
        except (RunFailed, ProviderError) as exc:
            # The turn still runs on its full context; the next fill tries again.
            log.warning("auto_compaction_failed", code=exc.code, message=exc.message)
            return
        except StorageError as exc:
            log.error("auto_compaction_failed", code=500, message=str(exc))
            return
        log.info("auto_compacted", archive=compaction.archive)
        run.tell(compaction)

    async def compact(self, instructions: str | None) -> Compaction:
        """Summarize every entry after the latest marker; store the archive and its marker."""
        context = await self.load_context()
        previous = context.marker
        archived = context.entries[1:] if previous is not None else list(context.entries)
        if not archived:
            raise RunFailed(
                409, "Nothing was added since the last compaction, so there is nothing to compact."
            )
        agent = self.agents[self.agent]
        summary = previous.content if previous is not None else None
        used: TokenUsage | None = None  # the parts' calls summed: the store counts one
        # A transcript too long for the model is summarized a part at a time, each
        # part read with the summary of the parts before it.
        for part in transcript_parts(archived, budget=agent.config.context_window // 2):
            request = summary_request(
                agent=agent.name,
                model=agent.config.model,
                entries=part,
                previous_summary=summary,
                instructions=instructions,
            )
            summary, used = await summarize(agent.provider, request, used)
            if not summary:
                raise RunFailed(502, "The model returned an empty summary; nothing was archived.")
        assert summary is not None
        first, last = archived[0].seq, archived[-1].seq
        archive = Archive(
            name=f"archive-{first}-{last}",
            first_seq=first,
            last_seq=last,
            summary=summary,
            speakers=[entry.agent for entry in archived],
            created_at=now(),
        )
        with trio.CancelScope(shield=True):
            marker = await self.storage.compact(self.agent, self.sender, archive, usage=used)
        self.host.count_usage([marker])
        assert self.info is not None
        self.context = Context(self.agent, [marker])
        self.context_tokens = 0  # the next usage report tells how full it is again
        self.info.last_seq = marker.seq
        self.info.updated_at = marker.created_at
        log.info("compacted", archive=archive.name, entries=len(archived))
        return Compaction(archive=archive.name, summary=summary, archived_entries=len(archived))
