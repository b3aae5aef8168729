"""The runtime: every conversation of one daemon, and what clients may ask of them.

It knows neither sockets nor encodings and builds no reply: it answers with
domain values (a run, a page of history, counters) that the server turns into
frames. Runs belong to the runtime's nursery, never to the connection that
asked for them.
"""

from __future__ import annotations

import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import structlog
import trio
from chinwag.protocol import (
    Compaction,
    ConversationItem,
    DaemonInfo,
    End,
    Entry,
    MemoryHit,
    QueuePolicy,
    StreamEventMsg,
    UsageTotal,
)
from chinwag.storage import MAX_QUERY_CHARS, Storage

from ._agent import Agent
from ._cluster import Cluster, PeerInterest, RemoteRun
from ._config import Config, parse_duration
from ._conversation import Compacting, Conversation, Job, Run, Sink, Subscription
from ._errors import RequestError
from ._limits import show_usage
from ._telemetry import Telemetry
from ._tools import Mailboxes
from ._workspace import workdir_problem

log = structlog.get_logger("chinwag.runtime")

Key = tuple[str, str]

MAX_NAME_BYTES = 256
HISTORY_PAGE = 200  # entries in a `get_history` page when the client sets no limit


def check_name(name: str, what: str = "A sender") -> None:
    """A sender, or an agent a request may name unconfigured (``what``: "An agent"), is
    1 to 256 bytes of UTF-8 without control characters."""
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise RequestError(400, f"{what} must be 1 to 256 bytes of UTF-8.")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise RequestError(400, f"{what} must not contain control characters.")


def first_day(since: str, moment: datetime) -> date:
    """The first UTC day a `usage` request's ``since`` takes in: the one a duration back
    from ``moment`` (UTC) falls on (``12h``, ``7d``), or the day it names (``2026-12-01``)."""
    if (duration := parse_duration(since)) is not None:
        try:
            return (moment - duration).date()
        except OverflowError:  # further back than any date: every day
            return date.min
    try:
        return date.fromisoformat(since)
    except ValueError:
        raise RequestError(
            400,
            f"since must be a duration such as 12h or 7d, or a day such as 2026-12-01: {since!r}.",
        ) from None


@dataclass(frozen=True)
class HistoryPage:
    """What `get_history` reads: the conversation's metadata and one page of entries."""

    title: str
    cwd: str | None
    entries: list[Entry]
    last_seq: int


@dataclass(frozen=True)
class RuntimeStats:
    uptime_s: float
    conversations: int  # held in memory
    runs_in_flight: int
    runs_queued: int
    runs_total: int  # submitted since start
    subscriptions: int


class Runtime:
    """All conversations of one daemon, the jobs in its nursery, and the subscriptions."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        agents: dict[str, Agent],
        nursery: trio.Nursery,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.agents = agents
        self.nursery = nursery
        self.telemetry = telemetry or Telemetry()  # metrics and traces; none by default
        self.conversations: dict[Key, Conversation] = {}
        self._idle: OrderedDict[Key, None] = OrderedDict()
        self._subscriptions: list[Subscription] = []
        self.accepting = True
        self.started_at = time.monotonic()
        self.runs_total = 0
        self.post_office: Mailboxes | None = None  # set by the post office, when mail is on
        # The other daemons on a shared store (daemon/_cluster.py); None when alone.
        self.cluster: Cluster | None = None
        # Every model call's tokens the store holds, on a store of this daemon's alone:
        # summed once at start (`count_stored_usage`), then each stored call added.
        self._tokens_in = self._tokens_out = 0

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
            conv = Conversation(self, agent, sender, self._subscriptions)
            self.conversations[key] = conv
        return conv

    async def existing(self, agent: str, sender: str) -> Conversation:
        """The named conversation; ``RequestError`` 404 if it was never created."""
        self.agent(agent)
        check_name(sender)
        conv = self._conversation(agent, sender)
        if not await conv.exists():
            self._forget(conv)  # no placeholder for what does not exist
            raise RequestError(
                404, f"No conversation ({agent}, {sender}) exists; a `stream` creates it."
            )
        if not conv.busy:
            self.became_idle(conv)  # kept warm like any idle conversation, evicted in turn
        return conv

    def last_seq(self, agent: str, sender: str) -> int | None:
        """The newest seq of a conversation held in memory; None when none is."""
        conv = self.conversations.get((agent, sender))
        return conv.last_seq if conv is not None else None

    # --- jobs -----------------------------------------------------------------

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
    ) -> Run:
        """Queue a run and attach ``sink`` to it; synchronous, so runs keep arrival order.

        ``cwd`` must have passed ``cwd_problem`` (a delegate's is its caller's).
        ``chain`` names the agents whose `delegate` calls led here, outermost first.
        ``framing`` is a system message the model sees before this run's steps, never
        stored (what mail says of the message it answers).
        """
        self._check_accepting()
        primary = self.agent(agent)
        check_name(sender)
        speaker = primary
        if guest is not None:
            if guest == agent:
                raise RequestError(400, "A guest must be an agent other than the primary.")
            speaker = self.agent(guest)
        conv = self._conversation(agent, sender)
        if queue == "reject" and conv.busy:
            raise RequestError(409, "The conversation is busy with another run; retry later.")
        run = Run(
            conv,
            content=content,
            speaker=speaker,
            cwd=cwd,
            chain=chain,
            policy=queue,
            framing=framing,
        )
        run.add_sink(sink)
        self._enqueue(conv, run, interrupt=queue == "interrupt")
        if queue == "interrupt" and self.cluster is not None and not conv.holding:
            self.nursery.start_soon(self.cluster.interrupt, agent, sender)
        return run

    async def cwd_problem(self, cwd: str) -> str | None:
        """Why a stream's ``cwd`` cannot be its working directory, or None when it can.

        The file system is asked in a worker thread, off the loop.
        """
        return await trio.to_thread.run_sync(workdir_problem, cwd, self.config.daemon.roots)

    def compact(self, agent: str, sender: str, instructions: str | None) -> Compacting:
        """Queue a compaction behind the jobs before it; synchronous, so it keeps arrival order.

        ``compacted`` awaits its outcome.
        """
        self._check_accepting()
        self.agent(agent)
        check_name(sender)
        conv = self._conversation(agent, sender)
        job = Compacting(conv, instructions or None)
        self._enqueue(conv, job)
        return job

    async def compacted(self, job: Compacting) -> Compaction:
        """What the compaction ``job`` archived, once it ended.

        Raises ``RequestError``: 404 for an unknown conversation, 409 when
        nothing was added since the last compaction or the compaction was killed.
        """
        await job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise RequestError(503, "The daemon is shutting down; retry once it is back.")

    def _enqueue(self, conv: Conversation, job: Job, *, interrupt: bool = False) -> None:
        self.runs_total += 1
        self._idle.pop(conv.key, None)
        conv.enqueue(job, interrupt=interrupt)

    # --- kill, attach, ask ---------------------------------------------------

    async def kill(self, agent: str, sender: str, *, everything: bool) -> str | None:
        """Kill the job in flight (and with ``everything`` all queued behind it), on
        whichever daemon runs it.

        Returns once every killed job has ended; the id of the one that was in
        flight, or None when nothing ran.
        """
        conv = await self.existing(agent, sender)
        if self.cluster is not None and not conv.holding:
            elsewhere, run_id = await self.cluster.kill(agent, sender, everything=everything)
            if elsewhere:
                if everything:  # and the runs waiting here for it
                    await self._kill(conv, everything=True)
                return run_id
        return await self._kill(conv, everything=everything)

    async def kill_here(self, agent: str, sender: str, *, everything: bool) -> str | None:
        """``kill`` on this daemon only: another daemon asks, having found it the holder."""
        return await self._kill(await self.existing(agent, sender), everything=everything)

    async def _kill(self, conv: Conversation, *, everything: bool) -> str | None:
        current = conv.current
        stopped = conv.kill(everything=everything)
        for job in stopped:
            await job.done.wait()
        return current.id if current is not None else None

    async def attach(self, agent: str, sender: str, sink: Sink) -> Run | RemoteRun | None:
        """Replay the run in flight from its `start` into ``sink``, then keep it attached;
        the run may be on another daemon.

        When nothing has started, ``sink`` gets an `end` with status `idle`.
        """
        conv = await self.existing(agent, sender)
        run = conv.current
        if not isinstance(run, Run) or not run.started or run.state == "ended":
            if self.cluster is not None and not conv.holding:
                remote = await self.cluster.attach(agent, sender, sink)
                if remote is not None:
                    return remote
            sink(End(status="idle", error=None, last_seq=conv.last_seq))
            return None
        for event in run.events:
            if not sink(event):
                return run
        run.add_sink(sink)
        return run

    async def reply_to_ask(self, agent: str, sender: str, content: str, ask_id: str | None) -> None:
        """Answer the pending question of the conversation's run, on whichever daemon runs it."""
        conv = await self.existing(agent, sender)
        cluster = self.cluster
        if conv.pending_ask is None and cluster is not None:
            elsewhere = await cluster.answer(agent, sender, content, ask_id)
            if elsewhere:
                return
        self._answer(conv, content, ask_id)

    async def answer_here(self, agent: str, sender: str, content: str, ask_id: str | None) -> None:
        """``reply_to_ask`` on this daemon only: another daemon asks, having found it the holder."""
        self._answer(await self.existing(agent, sender), content, ask_id)

    def _answer(self, conv: Conversation, content: str, ask_id: str | None) -> None:
        ask = conv.pending_ask
        if ask is None:
            raise RequestError(
                404, f"No question is waiting for an answer in ({conv.agent}, {conv.sender})."
            )
        if ask_id is not None and ask_id != ask.ask_id:
            raise RequestError(
                409, f"The pending question is {ask.ask_id!r}, not {ask_id!r}; answer that one."
            )
        ask.answer = content
        ask.answered.set()

    # --- subscriptions -----------------------------------------------------------

    def subscribe(
        self,
        agent: str | None,
        sender: str | None,
        deliver: Callable[[str, str, str, StreamEventMsg], bool],
    ) -> Subscription:
        """Deliver the events of every matching run from its `start` on, until ``unsubscribe``.

        ``deliver(agent, sender, run_id, event)`` returning False ends it.
        """
        if agent is not None:
            self.agent(agent)
        if sender is not None:
            check_name(sender)
        subscription = Subscription(agent, sender, deliver)
        self.add_subscription(subscription)
        return subscription

    async def heard(self) -> None:
        """Return once every other daemon knows what this one's subscribers want (at
        once when alone): from then on their runs' events reach them too."""
        if self.cluster is not None:
            await self.cluster.heard(self.cluster.version)

    def add_subscription(self, subscription: Subscription) -> None:
        self._subscriptions.append(subscription)
        if self.cluster is not None:
            self.cluster.subscriptions_changed()

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
            if self.cluster is not None:
                self.cluster.subscriptions_changed()

    def subscriptions(self) -> list[Subscription]:
        """Every subscription on this daemon: its clients', and other daemons' (the cluster's)."""
        return self._subscriptions

    # --- reads ----------------------------------------------------------------

    async def history(
        self,
        agent: str,
        sender: str,
        *,
        after_seq: int,
        limit: int | None,
        include_archived: bool,
    ) -> HistoryPage:
        """One page of the conversation's entries; ``HISTORY_PAGE`` of them when no ``limit``."""
        if after_seq < 0 or (limit is not None and limit < 0):
            raise RequestError(400, "after_seq and limit must not be negative.")
        info = (await self.existing(agent, sender)).info
        if info is None:  # created by a stream whose run has not started: nothing stored yet
            return HistoryPage(title="", cwd=None, entries=[], last_seq=0)
        entries = await self.storage.history(
            agent,
            sender,
            after_seq=after_seq,
            limit=HISTORY_PAGE if limit is None else limit,
            include_archived=include_archived,
        )
        return HistoryPage(title=info.title, cwd=info.cwd, entries=entries, last_seq=info.last_seq)

    async def list_conversations(
        self,
        *,
        agent: str | None,
        sender: str | None,
        limit: int,
        cursor: str | None,
        query: str | None = None,
    ) -> tuple[list[ConversationItem], str | None]:
        if not 1 <= limit <= 1000:
            raise RequestError(400, "limit must be between 1 and 1000.")
        if query is not None and len(query) > MAX_QUERY_CHARS:
            raise RequestError(400, f"query must be at most {MAX_QUERY_CHARS} characters.")
        if agent is not None:
            self.agent(agent)
        if sender is not None:
            check_name(sender)
        try:
            items, next_cursor = await self.storage.list_conversations(
                agent=agent, sender=sender, limit=limit, cursor=cursor, query=query
            )
        except ValueError:
            raise RequestError(
                400, "The cursor is not one this daemon issued; start again without it."
            ) from None
        elsewhere: dict[Key, str] = {}
        if self.cluster is not None:
            elsewhere = await self.cluster.holders([(item.agent, item.sender) for item in items])
        for item in items:
            key = (item.agent, item.sender)
            conv = self.conversations.get(key)
            item.running = (conv is not None and conv.busy) or key in elsewhere
            hosted = self.agents.get(item.agent)  # None: no longer configured
            if hosted is not None and hosted.config.limited:
                show_usage(item, hosted.config, await self._working_context(item, conv))
        return items, next_cursor

    async def _working_context(
        self, item: ConversationItem, conv: Conversation | None
    ) -> list[Entry]:
        """The listed conversation's entries from its latest marker on: those in memory,
        unless other daemons may have added to them, else read from storage."""
        if conv is not None and conv.context is not None and not self.storage.shared:
            return conv.context.entries
        loaded = await self.storage.load_context(item.agent, item.sender)
        return loaded[1] if loaded is not None else []

    async def search_memory(self, agent: str, query: str, limit: int) -> list[MemoryHit]:
        self.agent(agent)
        try:
            return await self.storage.search_memory(agent, query, limit=limit)
        except ValueError as exc:  # the limit
            raise RequestError(400, str(exc)) from None

    # --- usage ------------------------------------------------------------------

    async def count_stored_usage(self) -> None:
        """At start, before any job: take up the totals the store holds, which each
        stored model call then adds to (`count_usage`)."""
        if not self.storage.shared:
            self._tokens_in, self._tokens_out = await self.storage.total_tokens()

    def count_usage(self, entries: list[Entry]) -> None:
        """Count the model tokens of ``entries``, just stored, in the daemon's totals."""
        for entry in entries:
            if entry.usage is not None:
                self._tokens_in += entry.usage.input_tokens
                self._tokens_out += entry.usage.output_tokens

    async def tokens(self) -> tuple[int, int]:
        """Every model call's tokens the store holds, in and out, all conversations."""
        # Alone on its store, this daemon stored every call since it summed them at
        # start, so `stats` costs no read. On a shared store the other daemons' calls
        # count too and nothing tells this one of them: the store sums its totals each time.
        if self.storage.shared:
            return await self.storage.total_tokens()
        return self._tokens_in, self._tokens_out

    async def usage(
        self, *, agent: str | None, sender: str | None, since: str | None
    ) -> list[UsageTotal]:
        """The stored usage totals, a row per conversation and day. Any agent may be
        named, configured or not: its totals outlive its config."""
        if agent is not None and agent not in self.agents:  # a configured one is a name
            check_name(agent, "An agent")
        if sender is not None:
            check_name(sender)
        day = None if since is None else first_day(since, datetime.now(UTC))
        return await self.storage.usage(agent=agent, sender=sender, since=day)

    async def daemons(self) -> list[DaemonInfo]:
        """Every live daemon on a shared store, this one included; none when alone."""
        return [] if self.cluster is None else await self.cluster.daemons()

    def runs_in_flight(self) -> int:
        return sum(conv.busy for conv in self.conversations.values())

    def stats(self) -> RuntimeStats:
        busy = [c for c in self.conversations.values() if c.busy]
        return RuntimeStats(
            uptime_s=round(time.monotonic() - self.started_at, 3),
            conversations=len(self.conversations),
            runs_in_flight=len(busy),
            runs_queued=sum(len(c.queue) for c in busy),
            runs_total=self.runs_total,
            subscriptions=sum(not isinstance(s, PeerInterest) for s in self._subscriptions),
        )

    # --- lifecycle ------------------------------------------------------------

    def became_idle(self, conv: Conversation) -> None:
        """Keep ``conv`` warm among the idle ones, forgetting the oldest past the limit."""
        if conv.loaded and conv.info is None:  # nothing stored: no placeholder to keep
            self._forget(conv)
            return
        self._idle[conv.key] = None
        self._idle.move_to_end(conv.key)
        while len(self._idle) > self.config.daemon.idle_conversations:
            key, _ = self._idle.popitem(last=False)
            old = self.conversations.get(key)
            if old is not None and not old.busy and old.pending_ask is None:
                self._forget(old)

    def _forget(self, conv: Conversation) -> None:
        if self.conversations.get(conv.key) is conv and not conv.busy:
            del self.conversations[conv.key]
            conv.close()

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new jobs, let those in flight finish for ``grace_s``, then stop the rest."""
        self.accepting = False
        with trio.move_on_after(grace_s):
            for conv in list(self.conversations.values()):
                while conv.current is not None:
                    await conv.current.done.wait()
        stopped = [job for conv in self.conversations.values() for job in conv.drain_for_shutdown()]
        with trio.move_on_after(5):
            for job in stopped:
                await job.done.wait()
        if stopped:
            log.info("runs_cancelled_at_shutdown", count=len(stopped))
