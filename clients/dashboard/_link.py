"""The dashboard's one connection to the daemon, kept up across restarts, and the fan-out
of the daemon's run events and mail to every open page.

One `subscribe` request feeds every page's event stream, so that fifty open pages
cost the daemon one subscriber, not fifty. Each item is encoded once, as the
server-sent event every page that wants it is sent (``Shown``), and pages asking for
the same items are matched once (``_Interest``). Each page listens through a bounded
memory stream; one that falls behind loses its stream (the browser's
`EventSource` connects again), never stalls the others.

The events: ``daemon`` (``{up, reason}``, for the banner), ``run`` (a run event),
``inflight`` (``{run_id}``: a conversation's page's ``attach`` answered, on each
connection to the daemon: the run in flight then, or null; a run the page showed and
not this one ended unseen, the daemon having gone away while it ran), ``watching``
(the participant whose watch is on), ``mail`` (``{change, message}``, ``change`` null
for a new message), ``read`` (``{msg_ids}``: the participant's mail read, through any
client), ``roster`` (``{changed}``), ``resubscribed`` (``{}``: the daemon
dropped the link's subscription for falling behind, a busy machine's normal event, and
the link subscribed again on the same connection; what came between is lost, so the
page reads again what it shows, as when the daemon is back, without a banner) and
``missed`` (``{agent, sender, run_id}``: a run in flight as the subscription was dropped
had ended by the time the link looked for it again, its end unseen).

The new subscription has the rest of the runs in flight, but not what they sent
meanwhile. Each run that was in flight when the old one was dropped is looked for
with an ``attach`` of its conversation instead: still in flight, it is replayed from
its `start` and followed to its end (the subscription's events of it are left out, so
the pages get each once); gone, the pages are told it was ``missed``.

The events of each run in flight are kept (consecutive text merged) so that a page
opened in the middle of a run is shown the run from its `start`. A run that began
before the subscription did is not among them: a page showing one conversation
therefore sends an `attach` of its own, which replays the run in flight from its
`start`, and takes that run's events from it alone (the subscription's copies of them
are dropped for that page, and what came for the page before the `attach` answered
waits until it has), so that it sees each event once.

Mail comes the same way: one `watch` (with `updates` and `reads`) of each participant
some open page reads as, held while any page does and shared by them all. The dashboard never
registers: a watch needs no registration. Presence, spaces and locks have no push in
the protocol, so while a page shows them the link reads `participants`, `spaces` and
`locks` every ``poll_s`` seconds (once for every page) and tells the pages which of
them changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from chinwag.protocol import (
    End,
    Event,
    MailMessage,
    MailRead,
    MailUpdate,
    Start,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
)
from sse_starlette import ServerSentEvent

from .._client import ChinwagError, Client, Subscription, connect_explained

CLIENT_NAME = "chinwag-dashboard"

#: Items a page's stream holds for it before it counts as fallen behind.
PAGE_BUFFER = 10_000


class DaemonAway(Exception):
    """The daemon cannot be reached just now; ``reason`` says why, in one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DaemonState:
    """Whether the daemon is reachable: what a page's banner shows."""

    up: bool
    reason: str = ""


@dataclass(frozen=True)
class MailFollowed:
    """``reader``'s watch has begun (again): mail from now on comes as ``MailEvent``s,
    and what came before it is what ``inbox`` reads."""

    reader: str


@dataclass(frozen=True)
class MailEvent:
    """A message ``reader`` received (``change`` None), or a change to one it wrote or
    received (``change``: edit, delete, react or pin)."""

    reader: str
    message: MailMessage
    change: str | None = None


@dataclass(frozen=True)
class MarkedRead:
    """``reader``'s copies of ``msg_ids`` became read (through this dashboard or any other
    client)."""

    reader: str
    msg_ids: tuple[str, ...]


@dataclass(frozen=True)
class InFlight:
    """What a conversation's ``attach`` found in flight (``run_id``, None when idle): from
    here on its page is told of every run of it, so that one it showed and not this one
    has ended unseen."""

    run_id: str | None


#: What the roster poll reads, each a part a page may show.
ROSTER_PARTS = ("participants", "spaces", "locks")


@dataclass(frozen=True)
class RosterChanged:
    """Which of ``ROSTER_PARTS`` read differently from the time before."""

    changed: tuple[str, ...]


@dataclass(frozen=True)
class Resubscribed:
    """The daemon dropped the link's subscription for falling behind (the machine was
    busy) and the link has subscribed again: what came between is lost, and a run a
    page shows may have ended meanwhile."""


@dataclass(frozen=True)
class Missed:
    """A run in flight when the subscription was dropped is no longer in flight when
    the link looks for it on the new one (or cannot be looked for): its end went unseen.
    The daemon did not go away."""

    agent: str
    sender: str
    run_id: str


PageItem = (
    Event
    | DaemonState
    | InFlight
    | MailFollowed
    | MailEvent
    | MarkedRead
    | RosterChanged
    | Resubscribed
    | Missed
)


@dataclass(frozen=True, slots=True)
class Shown:
    """``item`` and ``frame``, its server-sent event as sent to a page: encoded once,
    the same bytes for every page."""

    item: PageItem
    frame: bytes

    @classmethod
    def of(cls, item: PageItem) -> Shown:
        if isinstance(item, Event):
            data, kind = msgspec.json.encode(item).decode(), "run"
        elif isinstance(item, DaemonState):
            state = {"up": item.up, "reason": item.reason}
            data, kind = msgspec.json.encode(state).decode(), "daemon"
        elif isinstance(item, InFlight):
            data, kind = msgspec.json.encode({"run_id": item.run_id}).decode(), "inflight"
        elif isinstance(item, MailFollowed):
            data, kind = item.reader, "watching"
        elif isinstance(item, MailEvent):
            mail = {"change": item.change, "message": item.message}
            data, kind = msgspec.json.encode(mail).decode(), "mail"
        elif isinstance(item, MarkedRead):
            data, kind = msgspec.json.encode({"msg_ids": item.msg_ids}).decode(), "read"
        elif isinstance(item, RosterChanged):
            data, kind = msgspec.json.encode({"changed": item.changed}).decode(), "roster"
        elif isinstance(item, Missed):
            missed = {"agent": item.agent, "sender": item.sender, "run_id": item.run_id}
            data, kind = msgspec.json.encode(missed).decode(), "missed"
        else:
            data, kind = "{}", "resubscribed"  # an event with no data is not dispatched
        return cls(item, ServerSentEvent(data, event=kind).encode())


@dataclass(frozen=True)
class _Interest:
    """What a page asked for: pages asking the same are matched once per item."""

    agent: str | None
    sender: str | None
    runs: bool
    reader: str | None
    roster: bool

    def wants(self, item: PageItem) -> bool:
        if isinstance(item, Event | Missed):
            return (
                self.runs
                and (self.agent is None or item.agent == self.agent)
                and (self.sender is None or item.sender == self.sender)
            )
        if isinstance(item, MailFollowed | MailEvent | MarkedRead):
            return item.reader == self.reader
        if isinstance(item, RosterChanged):
            return self.roster
        return True


@dataclass(eq=False)
class _Page:
    """One open page: what it asked for and its stream. A page showing one
    ``conversation`` follows its run in flight through an ``attach`` of its own
    (``attaching``): ``attached`` is that run, whose events from the subscription are
    not the page's; ``held`` keeps what came for the page while the ``attach`` had not
    answered yet (None when nothing waits on it)."""

    interest: _Interest
    send: MemoryObjectSendStream[Shown]
    conversation: tuple[str, str] | None
    attached: str | None = None
    held: list[Shown] | None = None
    attaching: anyio.CancelScope | None = None

    def offer(self, shown: Shown, *, attached: bool = False) -> None:
        """Send ``shown`` (``attached``: from the page's ``attach``), unless it is an
        event of the attached run from elsewhere; ``WouldBlock`` once the page has
        fallen behind."""
        item = shown.item
        if not attached and isinstance(item, Event) and item.run_id == self.attached:
            return
        if self.held is not None:
            self.held.append(shown)
        else:
            self.send.send_nowait(shown)


@dataclass
class _RunSoFar:
    """A run in flight's events, consecutive deltas of one kind merged into one."""

    events: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        last = self.events[-1].event if self.events else None
        new = event.event
        if isinstance(new, TextDelta | ThinkingDelta) and type(last) is type(new):
            assert isinstance(last, TextDelta | ThinkingDelta)
            last.delta += new.delta
            return
        if isinstance(new, TextDelta | ThinkingDelta):
            # A copy: the merge above changes it, and pages hold the original.
            new = type(new)(delta=new.delta)
        self.events.append(msgspec.structs.replace(event, event=new))


def _as_subscribed(like: Event, event: StreamEventMsg) -> Event:
    """An event of an ``attach``, as the subscription frames the events of ``like``'s
    run: in an ``Event``, without an id of its own."""
    return msgspec.structs.replace(like, event=msgspec.structs.replace(event, id=None))


class DaemonLink:
    """Connects to the daemon, and again whenever it goes away, every ``retry_s`` seconds.

    ``run`` does it until cancelled; ``client`` is the connection while there is
    one (``DaemonAway`` otherwise); ``listen`` gives a page the run events.
    """

    def __init__(
        self, socket_path: Path | str, *, retry_s: float = 1.0, poll_s: float = 1.0
    ) -> None:
        self.socket_path = socket_path
        self.retry_s = retry_s
        self.poll_s = poll_s
        self._client: Client | None = None
        self.state = DaemonState(up=False, reason="The dashboard is connecting to the daemon.")
        # The open pages, by what they asked for.
        self._pages: dict[_Interest, set[_Page]] = {}
        self._runs: dict[str, _RunSoFar] = {}
        # Runs followed through an attach since a dropped subscription missed some of
        # their events: the subscriptions' events of them are left out.
        self._recovering: set[str] = set()
        # Mail: how many pages read as each participant, and the watch held for each.
        self._readers: dict[str, int] = {}
        self._watches: dict[str, anyio.CancelScope] = {}
        self._tasks: anyio.abc.TaskGroup | None = None

    @property
    def client(self) -> Client:
        """The connection to the daemon; ``DaemonAway`` while there is none."""
        if self._client is None or self._client.closed:
            raise DaemonAway(self.state.reason)
        return self._client

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Stay connected and subscribed until cancelled; started (``task_group.start``)
        once the first attempt has connected or failed, so that the first pages say which."""
        starting = True
        while True:
            reason = "The daemon ended the dashboard's subscription."
            try:
                async with (
                    connect_explained(self.socket_path, client=CLIENT_NAME) as client,
                    anyio.create_task_group() as tasks,
                ):
                    self._client = client
                    try:
                        async with client.subscribe() as feed:
                            # The pages' own requests from here on: a run that began
                            # before the subscription is then in the replay of an attach.
                            self._tasks = tasks
                            tasks.start_soon(self._poll_roster, client)
                            for reader in self._readers:
                                self._follow(reader)
                            for pages in self._pages.values():
                                for page in pages:
                                    if page.conversation is not None:
                                        self._attach(page)
                            self._set_state(DaemonState(up=True))
                            if starting:
                                starting = False
                                task_status.started()
                            lost = await self._follow_runs(feed)
                        while lost is not None:  # for falling behind: the daemon is there
                            async with client.subscribe() as feed:
                                self._fan_out(Resubscribed())
                                for run in lost:
                                    tasks.start_soon(self._recover, client, run)
                                lost = await self._follow_runs(feed)
                    except ChinwagError as exc:
                        reason = exc.message
                    finally:
                        # Nothing more starts on this connection: it is closing, and
                        # what a page asks for meanwhile begins on the next one.
                        self._tasks = None
                    tasks.cancel_scope.cancel()
            except ChinwagError as exc:
                reason = exc.message
            finally:
                self._client = None
                self._watches.clear()
                self._runs.clear()
                self._recovering.clear()
            self._set_state(DaemonState(up=False, reason=f"The daemon is unreachable: {reason}"))
            if starting:
                starting = False
                task_status.started()
            await anyio.sleep(self.retry_s)

    async def _follow_runs(self, feed: Subscription) -> list[Event] | None:
        """Publish the subscription's events until it ends. When the daemon drops it for
        falling behind (429: the connection, the pages' attaches and watches go on), the
        runs it was following, each as its first event: they are forgotten (what came
        of them meanwhile is lost) and, on the next subscription, ``_recover``ed."""
        try:
            async for event in feed:
                if event.run_id not in self._recovering:  # else its attach brings it
                    self._publish(event)
        except ChinwagError as exc:
            if exc.code != 429:
                raise
            lost = [
                run.events[0]
                for run_id, run in self._runs.items()
                if run_id not in self._recovering
            ]
            for first in lost:
                del self._runs[first.run_id]
                self._recovering.add(first.run_id)  # before the next subscription's events
            return lost
        return None

    async def _recover(self, client: Client, lost: Event) -> None:
        """Follow ``lost``'s run, which a dropped subscription was following, through an
        ``attach`` of its conversation: replayed from its `start` and published to its end
        if it is still in flight, else ``Missed``. Its id stays in ``_recovering`` (ids are
        never reused), so that the subscription's late events of it are left out too."""
        try:
            async with client.attach(lost.agent, lost.sender) as events:
                start = await anext(events)
                if not isinstance(start, Start) or start.run_id != lost.run_id:
                    self._fan_out(Missed(lost.agent, lost.sender, lost.run_id))
                    return
                like = Event(
                    id=events.id,
                    agent=lost.agent,
                    sender=lost.sender,
                    run_id=lost.run_id,
                    event=start,
                )
                self._publish(_as_subscribed(like, start))
                async for event in events:
                    self._publish(_as_subscribed(like, event))
        except ChinwagError as exc:
            # Too many requests open (429): not to be followed, so its end goes unseen.
            # Otherwise the connection is gone, and the pages are told the daemon is.
            if exc.code == 429:
                self._fan_out(Missed(lost.agent, lost.sender, lost.run_id))

    async def until_up(self) -> None:
        """Return once the daemon is connected (at once if it is)."""
        with self.listen() as items:
            async for shown in items:
                if isinstance(shown.item, DaemonState) and shown.item.up:
                    return

    @contextmanager
    def listen(
        self,
        agent: str | None = None,
        sender: str | None = None,
        *,
        runs: bool = True,
        reader: str | None = None,
        roster: bool = False,
    ) -> Iterator[MemoryObjectReceiveStream[Shown]]:
        """The daemon's state, then each matching run in flight so far, then what comes:
        with ``runs``, run events (of ``agent``, ``sender``: with both, one conversation,
        whose run in flight comes from its ``attach``, from its ``start``); with
        ``reader``, the mail of that participant (``MailFollowed`` once its watch is on,
        then ``MailEvent``s); with ``roster``, ``RosterChanged``.

        The stream ends when its reader falls ``PAGE_BUFFER`` items behind.
        """
        send, receive = anyio.create_memory_object_stream[Shown](PAGE_BUFFER)
        interest = _Interest(agent, sender, runs, reader, roster)
        conversation = (agent, sender) if runs and agent and sender else None
        page = _Page(interest, send, conversation)
        attach = conversation is not None and self._tasks is not None
        if attach:
            page.held = []  # from now until its attach answers
        # No await from here to the registration: nothing is missed, nothing doubled.
        page.offer(Shown.of(self.state))
        for run in self._runs.values():
            for event in run.events:
                if interest.wants(event):
                    page.offer(Shown.of(event))
        if reader is not None and reader in self._watches:
            page.offer(Shown.of(MailFollowed(reader)))
        self._pages.setdefault(interest, set()).add(page)
        if attach:
            self._attach(page)
        if reader is not None:
            self._readers[reader] = self._readers.get(reader, 0) + 1
            if reader not in self._watches and self._tasks is not None:
                self._follow(reader)
        try:
            with receive:
                yield receive
        finally:
            self._drop(page)
            if reader is not None:
                self._readers[reader] -= 1
                if not self._readers[reader]:
                    del self._readers[reader]
                    if (scope := self._watches.pop(reader, None)) is not None:
                        scope.cancel()

    # --- a conversation's run in flight, for the page showing it ------------------------

    def _attach(self, page: _Page) -> None:
        """Follow ``page``'s conversation's run in flight through an ``attach`` of its
        own, until the run ends or the page closes; what comes for the page meanwhile
        waits for its answer."""
        assert self._tasks is not None and self._client is not None
        page.attaching = anyio.CancelScope()
        page.attached = None
        page.held = page.held or []
        self._tasks.start_soon(self._follow_run, self._client, page, page.attaching)

    def _release(self, page: _Page, first: Shown | None = None) -> None:
        """The page's ``attach`` answered (or failed): ``first``, then what waited for
        it goes on, but the attached run's."""
        held, page.held = page.held, None
        if first is not None and not self._deliver(page, first):
            return
        for shown in held or ():
            if not self._deliver(page, shown):
                return

    async def _follow_run(self, client: Client, page: _Page, scope: anyio.CancelScope) -> None:
        assert page.conversation is not None
        agent, sender = page.conversation
        with scope:
            try:
                async with client.attach(agent, sender) as events:
                    start = await anext(events)
                    running = start.run_id if isinstance(start, Start) else None
                    page.attached = running
                    # Before what waited: it came after the attach answered.
                    self._release(page, Shown.of(InFlight(running)))
                    if not isinstance(start, Start):
                        return  # `end` (idle): no run in flight
                    like = Event(
                        id=events.id, agent=agent, sender=sender, run_id=start.run_id, event=start
                    )
                    if not self._deliver(
                        page, Shown.of(_as_subscribed(like, start)), attached=True
                    ):
                        return
                    async for event in events:
                        shown = Shown.of(_as_subscribed(like, event))
                        if not self._deliver(page, shown, attached=True):
                            return
            except ChinwagError:
                # Not begun (404), too many requests open (429: the subscription's
                # events do), or the connection gone (the link attaches anew).
                pass
            finally:
                self._release(page)

    # --- mail ---------------------------------------------------------------------------

    def _follow(self, reader: str) -> None:
        """Hold a watch of ``reader``'s mail on this connection until no page reads it."""
        assert self._tasks is not None and self._client is not None
        scope = anyio.CancelScope()
        self._watches[reader] = scope
        self._tasks.start_soon(self._watch, self._client, reader, scope)

    async def _watch(self, client: Client, reader: str, scope: anyio.CancelScope) -> None:
        after: str | None = None
        with scope:
            while True:
                watch = client.watch(reader, after=after, updates=True, reads=True)
                try:
                    async with watch:
                        self._fan_out(MailFollowed(reader))
                        async for item in watch:
                            if isinstance(item, MailRead):
                                self._fan_out(MarkedRead(reader, tuple(item.msg_ids)))
                            elif isinstance(item, MailUpdate):
                                self._fan_out(MailEvent(reader, item.message, item.change))
                            else:
                                self._fan_out(MailEvent(reader, item))
                except ChinwagError as exc:
                    if exc.code != 429:
                        # A name the daemon refuses, or the connection gone (the link
                        # connects again and watches anew).
                        break
                    after = watch.last_msg_id  # dropped for falling behind: on from there
        if self._watches.get(reader) is scope:
            del self._watches[reader]

    async def _poll_roster(self, client: Client) -> None:
        """While a page shows them, read presence, spaces and locks each ``poll_s``
        seconds, and say which changed."""
        seen: dict[str, bytes] = {}
        while True:
            if any(interest.roster for interest in self._pages):
                try:
                    now = {
                        "participants": msgspec.json.encode(await client.participants()),
                        "spaces": msgspec.json.encode(await client.spaces(include_archived=True)),
                        "locks": msgspec.json.encode(await client.locks()),
                    }
                except ChinwagError:
                    return  # the connection is gone: the link connects again
                changed = tuple(part for part in ROSTER_PARTS if seen.get(part) != now[part])
                seen = now
                if changed:
                    self._fan_out(RosterChanged(changed))
            else:
                seen = {}
            await anyio.sleep(self.poll_s)

    def _set_state(self, state: DaemonState) -> None:
        if state == self.state:
            return
        self.state = state
        self._fan_out(state)

    def _publish(self, event: Event) -> None:
        run = self._runs.setdefault(event.run_id, _RunSoFar())
        if isinstance(event.event, End):
            del self._runs[event.run_id]
        else:
            run.add(event)
        self._fan_out(event)

    def _fan_out(self, item: PageItem) -> None:
        shown: Shown | None = None  # encoded once some page wants it
        for interest, pages in list(self._pages.items()):
            if not interest.wants(item):
                continue
            shown = shown or Shown.of(item)
            for page in list(pages):
                self._deliver(page, shown)

    def _deliver(self, page: _Page, shown: Shown, *, attached: bool = False) -> bool:
        """Offer ``shown`` to ``page``; False when the page is gone, or has fallen behind
        (its stream ends then, and the browser connects again)."""
        try:
            page.offer(shown, attached=attached)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._drop(page)
            return False
        return True

    def _drop(self, page: _Page) -> None:
        pages = self._pages.get(page.interest)
        if pages is not None:
            pages.discard(page)
            if not pages:
                del self._pages[page.interest]
        page.send.close()
        if page.attaching is not None:
            page.attaching.cancel()
