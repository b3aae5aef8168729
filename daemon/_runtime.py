"""The conversation runtime: conversations, their run queues, runs, and event fan-out.

The runtime knows neither sockets nor encodings. Consumers receive events
through sinks, plain callables that must not block: a sink returns False once
its consumer is gone (or too slow), and the run drops it. Runs belong to the
runtime's nursery, never to the connection that asked for them.
"""

from __future__ import annotations

import math
import time
import unicodedata
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
import trio
from chinwag.protocol import (
    AgentItem,
    AskQuestion,
    AskUser,
    Compaction,
    ConversationItem,
    End,
    EndStatus,
    Entry,
    ErrorInfo,
    History,
    MemoryHit,
    Queued,
    QueuePolicy,
    Start,
    Stats,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
    Title,
    ToolCall,
    ToolCallInfo,
    ToolResult,
    Usage,
)
from chinwag.storage import Archive, Storage, StorageError

from ._compaction import summary_request, transcript_parts
from ._config import AgentConfig, Config
from ._errors import RequestError, ToolError
from ._providers import (
    FinishChunk,
    ModelMessage,
    ModelRequest,
    Provider,
    ProviderBlockChunk,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallChunk,
    UsageChunk,
)
from ._tools import call_tool, schemas_for
from ._workspace import Workspace, workdir_problem

log = structlog.get_logger("chinwag.runtime")

Sink = Callable[[StreamEventMsg], bool]
"""Takes one event without blocking; returns False when its consumer is gone."""

Key = tuple[str, str]

MAX_SENDER_BYTES = 256
CLAIM_POLL_S = 0.05
# Chunks a run publishes before it lets other tasks run, when the model sends
# them without pause: a burst never outgrows a connection's or a subscriber's buffer.
BURST_CHUNKS = 256  # how often a run waiting on another daemon's conversation retries


def now() -> datetime:
    return datetime.now(UTC)


def check_sender(sender: str) -> None:
    """A sender is 1 to 256 bytes of UTF-8 without control characters."""
    if not sender or len(sender.encode()) > MAX_SENDER_BYTES:
        raise RequestError(400, "A sender must be 1 to 256 bytes of UTF-8.")
    if any(unicodedata.category(ch) == "Cc" for ch in sender):
        raise RequestError(400, "A sender must not contain control characters.")


@dataclass(eq=False)
class Subscription:
    """Events of every run whose conversation matches the filters."""

    agent: str | None
    sender: str | None
    deliver: Callable[[str, str, str, StreamEventMsg], bool]

    def matches(self, agent: str, sender: str) -> bool:
        return (self.agent is None or self.agent == agent) and (
            self.sender is None or self.sender == sender
        )


@dataclass(eq=False)
class Agent:
    name: str
    config: AgentConfig
    provider: Provider

    @property
    def item(self) -> AgentItem:
        return AgentItem(
            name=self.name,
            description=self.config.description,
            model=self.config.model,
            tools=list(self.config.tools),
        )


@dataclass(eq=False)
class PendingAsk:
    ask_id: str
    answered: trio.Event = field(default_factory=trio.Event)
    answer: str = ""


class RunFailed(Exception):
    """The run cannot go on; it ends `error` with this code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Run:
    """One turn: the user's entry, then model steps until a final answer."""

    def __init__(
        self,
        conversation: Conversation,
        *,
        content: str,
        speaker: Agent,
        cwd: str | None,
        chain: tuple[str, ...] = (),
        policy: QueuePolicy = "enqueue",
        compact: bool = False,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.conversation = conversation
        self.compact = compact  # a compaction: ``content`` holds its instructions
        self.compaction: Compaction | None = None  # what a compaction archived
        self.content = content
        self.speaker = speaker
        self.is_guest = speaker.name != conversation.agent
        self.cwd = cwd
        self.chain = chain  # the agents whose delegation led to this run, outermost first
        self.policy = policy
        self.queued = False  # `queued` was sent (at most once)
        self.scope = trio.CancelScope()
        self.sinks: list[Sink] = []
        self.events: list[StreamEventMsg] = []  # from `start` on, replayed to `attach`
        self.started = False
        self.shutting_down = False
        self.done = trio.Event()
        self.end: End | None = None  # once finished
        # The provider blocks of this run's tool steps, by the seq of the step's
        # assistant entry: its later requests send them back (ModelMessage.provider_blocks).
        # Kept in memory only; a step converted once keeps them in the primary's messages.
        self.provider_blocks: dict[int, list[dict[str, Any]]] = {}

    # --- fan-out ---------------------------------------------------------

    def publish(self, event: StreamEventMsg) -> None:
        self.events.append(event)
        self._deliver(event)
        subscriptions = self.conversation.runtime.subscriptions
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

    def _deliver(self, event: StreamEventMsg) -> None:
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

    def finish(self, status: EndStatus, error: ErrorInfo | None) -> None:
        self.end = end = End(status=status, error=error, last_seq=self.conversation.last_seq)
        if self.started:
            self.publish(end)
        else:  # subscribers see runs from `start` on; a run that never started is not theirs
            self._deliver(end)
        self.sinks.clear()
        self.done.set()

    # --- ToolContext ----------------------------------------------------

    @property
    def workspace(self) -> Workspace | None:
        """The stream's cwd, else the conversation's stored one, else the agent's."""
        conv = self.conversation
        stored = conv.info.cwd if conv.info is not None else None
        root = self.cwd or stored or conv.runtime.agents[conv.agent].config.cwd
        if root is None:
            return None
        daemon = conv.runtime.config.daemon
        return Workspace(
            root=root,
            allowed_roots=tuple(daemon.roots),
            command_timeout_s=daemon.command_timeout_s,
        )

    async def set_title(self, title: str) -> None:
        conv = self.conversation
        with trio.CancelScope(shield=True):
            await conv.runtime.storage.set_title(conv.agent, conv.sender, title)
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
            timeout = conv.runtime.config.daemon.ask_timeout_s
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await ask.answered.wait()
                return ask.answer
            raise ToolError(f"The user did not answer within {timeout:g} s.")
        finally:
            conv.pending_ask = None

    async def memory_search(self, query: str, limit: int) -> list[MemoryHit]:
        conv = self.conversation
        mine = self.speaker.config.memory_scope == "conversation"
        return await conv.runtime.storage.search_memory(
            self.speaker.name, query, limit=limit, sender=conv.sender if mine else None
        )

    async def memory_note(self, name: str, content: str) -> None:
        storage = self.conversation.runtime.storage
        with trio.CancelScope(shield=True):
            await storage.put_note(self.speaker.name, name, content, updated_at=now())

    async def delegate(self, agent: str, message: str) -> str:
        runtime = self.conversation.runtime
        me = self.speaker.name
        chain = (*self.chain, me)
        if agent in chain:
            raise ToolError(f"Delegating to {agent} would loop: {' -> '.join((*chain, agent))}.")
        limit = runtime.config.daemon.delegate_depth
        if len(chain) > limit:
            raise ToolError(f"Delegation goes at most {limit} agents deep; answer without it.")
        answer = DelegateAnswer()
        try:
            run = runtime.submit(
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
            if not run.done.is_set():
                run.scope.cancel()  # the caller was killed, and its delegate with it
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


class Conversation:
    """The owner of one `(agent, sender)`: its history cache, run queue and pending ask.

    Every mutation of the conversation's history goes through its runs, one
    at a time, in the order they were submitted.
    """

    def __init__(self, runtime: Runtime, agent: str, sender: str) -> None:
        self.runtime = runtime
        self.agent = agent
        self.sender = sender
        self.info: ConversationItem | None = None  # None: not stored (yet)
        # The latest compact marker, if any, and what follows; read on the first run.
        self.context: list[Entry] | None = None
        self.current: Run | None = None  # in flight, or about to start
        self.queue: deque[Run] = deque()
        self.pending_ask: PendingAsk | None = None
        self.context_tokens = 0  # as the model last reported it; 0 until a run reports
        # `primary_messages`' cache: the context list it converted, and what it made.
        self._converted: list[Entry] | None = None
        self._messages: list[ModelMessage] = []
        self._authors: set[str] = set()
        self.loaded = False
        self._load_lock = trio.Lock()

    @property
    def key(self) -> Key:
        return (self.agent, self.sender)

    @property
    def last_seq(self) -> int:
        return self.info.last_seq if self.info is not None else 0

    @property
    def busy(self) -> bool:
        return self.current is not None

    def primary_messages(
        self, convert: Callable[[Entry], ModelMessage]
    ) -> tuple[list[ModelMessage], set[str]]:
        """The context as the primary's model messages, and who wrote its assistant entries.

        Kept between runs: only entries appended since the last call are
        converted; a context replaced (compaction, a reload) starts afresh.
        """
        context = self.context or []
        if self._converted is not context:
            self._converted, self._messages, self._authors = context, [], set()
        for entry in context[len(self._messages) :]:  # one message per entry
            self._messages.append(convert(entry))
            if entry.role == "assistant":
                self._authors.add(entry.agent or self.agent)
        return self._messages, self._authors

    async def load(self) -> None:
        """Read the conversation's metadata from storage, once."""
        async with self._load_lock:
            if not self.loaded:
                self.info = await self.runtime.storage.get_conversation(self.agent, self.sender)
                self.loaded = True

    async def load_context(self) -> list[Entry]:
        """The working context, read from storage on the first run after a load."""
        await self.load()
        if self.context is None:
            entries: list[Entry] = []
            if self.info is not None:
                entries = await self.runtime.storage.history(self.agent, self.sender)
                markers = [i for i, e in enumerate(entries) if e.kind == "compact"]
                entries = entries[markers[-1] :] if markers else entries
            self.context = entries
        return self.context

    async def exists(self) -> bool:
        """Stored, or about to be: a conversation whose first run is queued exists."""
        await self.load()
        return self.info is not None or self.busy


def _model_message(entry: Entry, run: Run) -> ModelMessage:
    """An entry as the model sees it in ``run``: another agent's words wrapped as theirs."""
    if entry.kind == "compact":
        return ModelMessage(role="system", content=_summary_message(entry, run))
    content = entry.content
    if entry.role == "assistant":
        author = entry.agent or run.conversation.agent
        if author != run.speaker.name:
            content = f'<from agent="{author}">{content}</from>'
    return ModelMessage(
        role=entry.role,
        content=content,
        tool_calls=entry.tool_calls,
        tool_call_id=entry.tool_call_id,
        is_error=entry.is_error,
        provider_blocks=run.provider_blocks.get(entry.seq, []),
    )


def _summary_message(marker: Entry, run: Run) -> str:
    """The auto-injected stand-in for what a compact marker archived."""
    text = (
        f"The earlier part of this conversation was compacted into the archive {marker.archive!r}. "
        f"Summary of the earlier conversation:\n<summary>\n{marker.content}\n</summary>"
    )
    if not run.is_guest and "memory_search" in run.speaker.config.tools:
        text += "\nmemory_search finds the archived details."
    return text


class Runtime:
    """All conversations of one daemon, the runs in its nursery, and the subscriptions."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        agents: dict[str, Agent],
        nursery: trio.Nursery,
    ) -> None:
        self.config = config
        self.storage = storage
        self.agents = agents
        self.nursery = nursery
        self.conversations: dict[Key, Conversation] = {}
        self._idle: OrderedDict[Key, None] = OrderedDict()
        self.subscriptions: list[Subscription] = []
        self.accepting = True
        self.started_at = time.monotonic()
        self.runs_total = 0

    # --- lookups --------------------------------------------------------------

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            raise RequestError(
                404, f"There is no agent named {name!r}; list_agents names the configured ones."
            ) from None

    def _conversation(self, agent: str, sender: str) -> Conversation:
        key = (agent, sender)
        conv = self.conversations.get(key)
        if conv is None:
            conv = self.conversations[key] = Conversation(self, agent, sender)
        return conv

    async def existing(self, agent: str, sender: str) -> Conversation:
        """The named conversation; ``RequestError`` 404 if it was never created."""
        self.agent(agent)
        check_sender(sender)
        conv = self._conversation(agent, sender)
        found = await conv.exists()
        if not found:
            if self.conversations.get(conv.key) is conv:
                del self.conversations[conv.key]  # no placeholder for what does not exist
            raise RequestError(
                404, f"No conversation ({agent}, {sender}) exists; a `stream` creates it."
            )
        if not conv.busy:
            self._became_idle(conv)  # kept warm like any idle conversation, evicted in turn
        return conv

    # --- runs -----------------------------------------------------------------

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
    ) -> Run:
        """Queue a run and attach ``sink`` to it; synchronous, so runs keep arrival order.

        ``cwd`` must have passed ``cwd_problem`` (a delegate's is its caller's).
        ``chain`` names the agents whose `delegate` calls led here, outermost first.
        """
        if not self.accepting:
            raise RequestError(503, "The daemon is shutting down; retry once it is back.")
        primary = self.agent(agent)
        check_sender(sender)
        speaker = primary
        if guest is not None:
            if guest == agent:
                raise RequestError(400, "A guest must be an agent other than the primary.")
            speaker = self.agent(guest)
        conv = self._conversation(agent, sender)
        if queue == "reject" and conv.busy:
            raise RequestError(409, "The conversation is busy with another run; retry later.")
        run = Run(conv, content=content, speaker=speaker, cwd=cwd, chain=chain, policy=queue)
        run.add_sink(sink)
        self._enqueue(run)
        return run

    async def cwd_problem(self, cwd: str) -> str | None:
        """Why a stream's ``cwd`` cannot be its working directory, or None when it can.

        The file system is asked in a worker thread, off the loop.
        """
        return await trio.to_thread.run_sync(workdir_problem, cwd, self.config.daemon.roots)

    def compact(self, agent: str, sender: str, instructions: str | None) -> Run:
        """Queue a compaction behind the runs before it; synchronous, so it keeps arrival order.

        ``compacted`` awaits its outcome.
        """
        if not self.accepting:
            raise RequestError(503, "The daemon is shutting down; retry once it is back.")
        primary = self.agent(agent)
        check_sender(sender)
        conv = self._conversation(agent, sender)
        run = Run(conv, content=instructions or "", speaker=primary, cwd=None, compact=True)
        self._enqueue(run)
        return run

    async def compacted(self, run: Run) -> Compaction:
        """What the compaction ``run`` archived, once it ended.

        Raises ``RequestError``: 404 for an unknown conversation, 409 when
        nothing was added since the last compaction or the compaction was killed.
        """
        await run.done.wait()
        if run.compaction is not None:
            return run.compaction
        if run.end is not None and run.end.error is not None:
            raise RequestError(run.end.error.code, run.end.error.message)
        raise RequestError(409, "The compaction was killed before it stored anything.")

    def _enqueue(self, run: Run) -> None:
        conv = run.conversation
        self.runs_total += 1
        self._idle.pop(conv.key, None)
        if conv.current is None:
            conv.current = run
            self.nursery.start_soon(self._work, conv)
        elif run.policy == "interrupt":
            conv.queue.appendleft(run)
            run.queued = True
            run._deliver(Queued(position=1))
            conv.current.scope.cancel()
        else:
            conv.queue.append(run)
            run.queued = True
            run._deliver(Queued(position=len(conv.queue)))

    async def _work(self, conv: Conversation) -> None:
        structlog.contextvars.bind_contextvars(agent=conv.agent, sender=conv.sender)
        while (run := conv.current) is not None:
            await self._execute(run)
            conv.current = conv.queue.popleft() if conv.queue else None
        self._became_idle(conv)

    async def _execute(self, run: Run) -> None:
        structlog.contextvars.bind_contextvars(run_id=run.id)
        status: EndStatus = "done"
        error: ErrorInfo | None = None
        with run.scope:
            try:
                await run.conversation.load_context()
                await trio.lowlevel.checkpoint()  # a run killed before its start stores nothing
                if self.storage.shared:
                    await self._claimed_execute(run)
                else:
                    await self._perform(run)
            except RunFailed as exc:
                status, error = "error", ErrorInfo(code=exc.code, message=exc.message)
            except ProviderError as exc:
                log.warning("provider_failed", code=exc.code, message=exc.message)
                status, error = "error", ErrorInfo(code=exc.code, message=exc.message)
            except StorageError as exc:
                log.error("storage_failed", error=str(exc))
                status = "error"
                error = ErrorInfo(code=500, message=f"Storage failed: {exc}")
            except Exception:
                log.exception("run_crashed")
                status = "error"
                error = ErrorInfo(code=500, message="The run failed on an internal error.")
        if run.scope.cancelled_caught:
            if run.shutting_down:
                status = "error"
                error = ErrorInfo(
                    code=503,
                    message="The daemon shut down during the run; completed steps are kept.",
                )
            else:
                status = "killed"
        log.info("run_ended", status=status, code=error.code if error else None)
        run.finish(status, error)

    async def _claimed_execute(self, run: Run) -> None:
        """On a store other daemons share: run only while holding the conversation.

        A conversation busy on another daemon makes the run wait there (`queued`),
        or, under `reject`, end `error` 409. Once claimed, the conversation is
        re-read, since another daemon may have added to it.
        """
        conv = run.conversation
        storage = self.storage
        if not await storage.claim(conv.agent, conv.sender):
            if run.policy == "reject":
                raise RunFailed(409, "The conversation is busy on another daemon; retry later.")
            if not run.queued:
                run.queued = True
                run._deliver(Queued(position=1))
            # No trio.Event crosses daemons: the other one's release is seen by polling.
            while not await storage.claim(conv.agent, conv.sender):  # noqa: ASYNC110
                await trio.sleep(CLAIM_POLL_S)
        try:
            info = await storage.get_conversation(conv.agent, conv.sender)
            if info is not None and (conv.info is None or info.last_seq != conv.info.last_seq):
                conv.info, conv.context = info, None
                await conv.load_context()
            await self._perform(run)
        finally:
            await storage.release(conv.agent, conv.sender)

    async def _perform(self, run: Run) -> None:
        """A compaction, or a turn (compacting first when the context has grown too big)."""
        conv = run.conversation
        if run.compact:
            if conv.info is None:
                raise RunFailed(
                    404,
                    f"No conversation ({conv.agent}, {conv.sender}) exists; a `stream` creates it.",
                )
            run.compaction = await self._compact(conv, run.content or None)
            return
        await self._compact_if_full(run)
        await self._begin(run)
        await self._steps(run)

    async def _compact_if_full(self, run: Run) -> None:
        """Auto-compaction: before a turn, when the last run filled the primary's threshold."""
        conv = run.conversation
        config = self.agents[conv.agent].config
        if (
            config.compact_at is None
            or conv.context_tokens <= config.compact_at * config.context_window
        ):
            return
        conv.context_tokens = 0  # tried once per fill, whatever happens next
        try:
            compaction = await self._compact(conv, None)
        except (RunFailed, ProviderError) as exc:
            # The turn still runs on its full context; the next fill tries again.
            log.warning("auto_compaction_failed", code=exc.code, message=exc.message)
            return
        except StorageError as exc:
            log.error("auto_compaction_failed", code=500, message=str(exc))
            return
        log.info("auto_compacted", archive=compaction.archive)
        run._deliver(compaction)

    async def _compact(self, conv: Conversation, instructions: str | None) -> Compaction:
        """Summarize every entry after the latest marker; store the archive and its marker."""
        context = await conv.load_context()
        previous = context[0] if context and context[0].kind == "compact" else None
        archived = context[1:] if previous is not None else list(context)
        if not archived:
            raise RunFailed(
                409, "Nothing was added since the last compaction, so there is nothing to compact."
            )
        agent = self.agents[conv.agent]
        summary = previous.content if previous is not None else None
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
            parts: list[str] = []
            async with aclosing(agent.provider.stream(request)) as chunks:
                async for chunk in chunks:
                    if isinstance(chunk, TextChunk):
                        parts.append(chunk.delta)
            summary = "".join(parts).strip()
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
            marker = await self.storage.compact(conv.agent, conv.sender, archive)
        assert conv.info is not None
        conv.context = [marker]
        conv.context_tokens = 0  # the next usage report tells how full it is again
        conv.info.last_seq = marker.seq
        conv.info.updated_at = marker.created_at
        log.info("compacted", archive=archive.name, entries=len(archived))
        return Compaction(archive=archive.name, summary=summary, archived_entries=len(archived))

    async def _begin(self, run: Run) -> None:
        """Store the user entry (shielded: once begun it completes), then `start`."""
        conv = run.conversation
        storage = self.storage
        cwd = run.cwd or self.agents[conv.agent].config.cwd
        user = Entry(seq=0, role="user", content=run.content, run_id=run.id, created_at=now())
        with trio.CancelScope(shield=True):
            if conv.info is None:
                conv.info = await storage.create_conversation(
                    conv.agent, conv.sender, cwd=cwd, created_at=user.created_at or now()
                )
            elif run.cwd is not None and run.cwd != conv.info.cwd:
                await storage.set_cwd(conv.agent, conv.sender, run.cwd)
                conv.info.cwd = run.cwd
            stored = await self._append(conv, [user])
        run.started = True
        log.debug("run_started", seq=stored[0].seq, speaker=run.speaker.name)
        run.publish(Start(run_id=run.id, agent=run.speaker.name, seq=stored[0].seq))

    async def _append(self, conv: Conversation, entries: list[Entry]) -> list[Entry]:
        with trio.CancelScope(shield=True):
            stored = await self.storage.append(conv.agent, conv.sender, entries)
        assert conv.context is not None and conv.info is not None
        conv.context.extend(stored)
        conv.info.last_seq = stored[-1].seq
        conv.info.updated_at = stored[-1].created_at
        return stored

    async def _steps(self, run: Run) -> None:
        conv = run.conversation
        speaker = run.speaker
        attribution = speaker.name if run.is_guest else ""
        allowed = [] if run.is_guest else speaker.config.tools
        tools = schemas_for(allowed)
        for _ in range(speaker.config.max_steps):
            request = ModelRequest(
                model=speaker.config.model, messages=self._context(run), tools=tools
            )
            text: list[str] = []
            calls: list[ToolCallInfo] = []
            provider_blocks: list[dict[str, Any]] = []
            async with aclosing(speaker.provider.stream(request)) as chunks:
                burst = 0
                async for chunk in chunks:
                    burst += 1
                    if burst == BURST_CHUNKS:  # let the writers drain a burst as it grows
                        burst = 0
                        await trio.lowlevel.checkpoint()
                    match chunk:
                        case TextChunk(delta):
                            text.append(delta)
                            run.publish(TextDelta(delta=delta))
                        case ThinkingChunk(delta):
                            run.publish(ThinkingDelta(delta=delta))
                        case ProviderBlockChunk(block):
                            provider_blocks.append(block)
                        case ToolCallChunk(call):
                            if run.is_guest:
                                continue  # a guest speaks text only: its calls are ignored
                            calls.append(call)
                            run.publish(
                                ToolCall(
                                    call_id=call.call_id, name=call.name, arguments=call.arguments
                                )
                            )
                        case UsageChunk(prompt_tokens, completion_tokens):
                            conv.context_tokens = prompt_tokens + completion_tokens
                            run.publish(
                                Usage(
                                    prompt_tokens=prompt_tokens,
                                    completion_tokens=completion_tokens,
                                    context_tokens=prompt_tokens + completion_tokens,
                                    context_window=speaker.config.context_window,
                                )
                            )
                        case FinishChunk():
                            pass
            assistant = Entry(
                seq=0,
                role="assistant",
                content="".join(text),
                agent=attribution,
                tool_calls=calls,
                run_id=run.id,
                created_at=now(),
            )
            if not calls:
                await self._append(conv, [assistant])
                return
            results = await self._call_tools(run, calls, allowed)
            stored = await self._append(conv, [assistant, *results])
            if provider_blocks:  # for the next step's request, which goes on with this one
                run.provider_blocks[stored[0].seq] = provider_blocks
        raise RunFailed(
            500,
            f"The agent stopped after max_steps={speaker.config.max_steps} steps without a "
            "final answer; its completed steps are stored.",
        )

    async def _call_tools(
        self, run: Run, calls: list[ToolCallInfo], allowed: list[str]
    ) -> list[Entry]:
        """Run a step's tool calls concurrently; results in call order for storage."""
        results: dict[str, Entry] = {}

        async def one(call: ToolCallInfo) -> None:
            started = time.perf_counter()
            output, is_error = await call_tool(run, allowed, call)
            duration_ms = (time.perf_counter() - started) * 1000
            results[call.call_id] = Entry(
                seq=0,
                role="tool",
                content=output,
                tool_call_id=call.call_id,
                is_error=is_error,
                run_id=run.id,
                created_at=now(),
            )
            run.publish(
                ToolResult(
                    call_id=call.call_id,
                    output=output,
                    is_error=is_error,
                    duration_ms=round(duration_ms, 3),
                )
            )

        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(one, call)
        return [results[call.call_id] for call in calls]

    def _context(self, run: Run) -> list[ModelMessage]:
        """System prompt, framing, summary, then the entries after the latest marker.

        Framing and the summary are injected here and never stored. The
        primary's messages are kept with the conversation and extended as it
        grows, so a step costs the same however long the conversation is; a
        guest's are made afresh.
        """
        conv = run.conversation
        speaker = run.speaker
        if run.is_guest:
            entries = conv.context or []
            body = [_model_message(entry, run) for entry in entries]
            authors = {e.agent or conv.agent for e in entries if e.role == "assistant"}
        else:
            body, authors = conv.primary_messages(lambda entry: _model_message(entry, run))
        head = [ModelMessage(role="system", content=speaker.config.system_prompt)]
        others = authors - {speaker.name}
        if run.is_guest:
            head.append(
                ModelMessage(
                    role="system",
                    content=(
                        f"You are {speaker.name}, a guest in a conversation between the user "
                        f"and the agent {conv.agent}. Answer the user's latest message in text "
                        'only. Messages wrapped in <from agent="NAME"> were written by that '
                        "agent, not by you."
                    ),
                )
            )
        elif others:
            head.append(
                ModelMessage(
                    role="system",
                    content=(
                        f"You are {speaker.name}. Guest agents ({', '.join(sorted(others))}) "
                        "have spoken in this conversation; their messages are wrapped in <from "
                        'agent="NAME">, and they are not you.'
                    ),
                )
            )
        return [*head, *body]

    # --- kill, attach, ask ---------------------------------------------------

    async def kill(self, agent: str, sender: str, *, everything: bool) -> str | None:
        """Kill the run in flight (and with ``everything`` all queued behind it).

        Returns once every killed run has sent its `end`; the id of the run
        that was in flight, or None when nothing ran.
        """
        conv = await self.existing(agent, sender)
        killed: list[Run] = []
        if everything:
            while conv.queue:
                run = conv.queue.pop()
                run.scope.cancel()
                run.finish("killed", None)
                killed.append(run)
        current = conv.current
        if current is not None:
            current.scope.cancel()
            killed.append(current)
        for run in killed:
            await run.done.wait()
        return current.id if current is not None else None

    async def attach(self, agent: str, sender: str, sink: Sink) -> Run | None:
        """Replay the run in flight from its `start` into ``sink``, then keep it attached.

        When nothing has started, ``sink`` gets an `end` with status `idle`.
        """
        conv = await self.existing(agent, sender)
        run = conv.current
        if run is None or not run.started or run.done.is_set():
            sink(End(status="idle", error=None, last_seq=conv.last_seq))
            return None
        for event in run.events:
            if not sink(event):
                return run
        run.add_sink(sink)
        return run

    async def reply_to_ask(self, agent: str, sender: str, content: str, ask_id: str | None) -> None:
        conv = await self.existing(agent, sender)
        ask = conv.pending_ask
        if ask is None:
            raise RequestError(404, f"No question is waiting for an answer in ({agent}, {sender}).")
        if ask_id is not None and ask_id != ask.ask_id:
            raise RequestError(
                409, f"The pending question is {ask.ask_id!r}, not {ask_id!r}; answer that one."
            )
        ask.answer = content
        ask.answered.set()

    # --- reads ----------------------------------------------------------------

    async def history(
        self,
        agent: str,
        sender: str,
        *,
        request_id: int,
        after_seq: int,
        limit: int | None,
        include_archived: bool,
    ) -> History:
        if after_seq < 0 or (limit is not None and limit < 0):
            raise RequestError(400, "after_seq and limit must not be negative.")
        info = (await self.existing(agent, sender)).info
        if info is None:  # created by a stream whose run has not started: nothing stored yet
            return History(
                id=request_id,
                agent=agent,
                sender=sender,
                title="",
                cwd=None,
                entries=[],
                last_seq=0,
            )
        entries = await self.storage.history(
            agent, sender, after_seq=after_seq, limit=limit, include_archived=include_archived
        )
        return History(
            id=request_id,
            agent=agent,
            sender=sender,
            title=info.title,
            cwd=info.cwd,
            entries=entries,
            last_seq=info.last_seq,
        )

    async def list_conversations(
        self, *, agent: str | None, sender: str | None, limit: int, cursor: str | None
    ) -> tuple[list[ConversationItem], str | None]:
        if not 1 <= limit <= 1000:
            raise RequestError(400, "limit must be between 1 and 1000.")
        if agent is not None:
            self.agent(agent)
        if sender is not None:
            check_sender(sender)
        try:
            items, next_cursor = await self.storage.list_conversations(
                agent=agent, sender=sender, limit=limit, cursor=cursor
            )
        except ValueError:
            raise RequestError(
                400, "The cursor is not one this daemon issued; start again without it."
            ) from None
        for item in items:
            conv = self.conversations.get((item.agent, item.sender))
            item.running = conv is not None and conv.busy
        return items, next_cursor

    async def search_memory(self, agent: str, query: str, limit: int) -> list[MemoryHit]:
        self.agent(agent)
        try:
            return await self.storage.search_memory(agent, query, limit=limit)
        except ValueError as exc:  # the limit
            raise RequestError(400, str(exc)) from None

    def stats(self, request_id: int, connections: int) -> Stats:
        busy = [c for c in self.conversations.values() if c.busy]
        return Stats(
            id=request_id,
            uptime_s=round(time.monotonic() - self.started_at, 3),
            connections=connections,
            conversations=len(self.conversations),
            runs_in_flight=len(busy),
            runs_queued=sum(len(c.queue) for c in busy),
            runs_total=self.runs_total,
            subscriptions=len(self.subscriptions),
        )

    # --- lifecycle ------------------------------------------------------------

    def _became_idle(self, conv: Conversation) -> None:
        if conv.loaded and conv.info is None:  # nothing stored: no placeholder to keep
            if self.conversations.get(conv.key) is conv:
                del self.conversations[conv.key]
            return
        self._idle[conv.key] = None
        self._idle.move_to_end(conv.key)
        while len(self._idle) > self.config.daemon.idle_conversations:
            key, _ = self._idle.popitem(last=False)
            old = self.conversations.get(key)
            if old is not None and not old.busy and old.pending_ask is None:
                del self.conversations[key]

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new runs, let runs finish for ``grace_s``, then cancel the rest."""
        self.accepting = False
        with trio.move_on_after(grace_s):
            for conv in list(self.conversations.values()):
                while conv.current is not None:
                    await conv.current.done.wait()
        runs = [
            run
            for conv in self.conversations.values()
            for run in ([conv.current] if conv.current else []) + list(conv.queue)
        ]
        for conv in self.conversations.values():
            conv.queue.clear()
        for run in runs:
            run.shutting_down = True
            run.scope.cancel()
            if not run.started and run is not run.conversation.current:
                run.finish(
                    "error",
                    ErrorInfo(code=503, message="The daemon shut down before the run started."),
                )
        with trio.move_on_after(5):
            for run in runs:
                await run.done.wait()
        if runs:
            log.info("runs_cancelled_at_shutdown", count=len(runs))
