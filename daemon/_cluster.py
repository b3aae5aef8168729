"""This daemon among the others on a shared store: control reaches the daemon running
the conversation, and runs' events reach the daemons whose clients want them.

Several daemons on one postgres store act as one. A conversation runs on the
daemon holding its claim (``Storage.claim``); the others ask the bus who that
is (``Bus.holders``) and talk to it over the bus (storage/_bus.py):

- **Calls**: `kill`, `reply_to_ask`, `attach`, and a run that waits for the
  conversation (``Wait``: its place in the line, and a ``Released`` when the
  holder lets go) go to the holder as a ``Call`` and come back as a ``Reply``,
  or fail 504 after ``CALL_TIMEOUT_S``, or 503 as soon as the holder is seen dead.
- **Attach**: the holder relays the run's events, from the index asked for, to
  the daemon that attached, each ``Item`` numbered by its place in the run
  (the resume point: a gap, which only a reopened connection can make, is
  asked for again from the first missing one).
- **Subscribe**: a daemon with subscribers tells every other one what they
  filter on (``Interest``, acknowledged by ``Heard``), and each relays the
  events of its matching runs, as a subscriber of its own would get them.
- **Death**: a daemon seen dead at a beat ends what came from it: its
  attached runs and the runs subscribers were seeing end `error` 503, calls
  to it fail 503, and runs waiting for its conversations try to claim them.
- **Mail**: the post office's news (daemon/_mail_news.py) goes to the other
  daemons as it encoded it, unread here; the post office is told who joined
  and who went (``on_mail``, ``on_peers``).

Messages are msgspec JSON; a message never carries more than one request or
one batch of events, and the bus cuts what is long into pieces.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import structlog
import trio
from chinwag.protocol import DaemonInfo, End, ErrorInfo, Start, StreamEventMsg
from chinwag.storage import Bus, StorageError

from ._conversation import Conversation, Run, Sink, Subscription
from ._errors import RequestError

log = structlog.get_logger("chinwag.cluster")

Key = tuple[str, str]

CALL_TIMEOUT_S = 5.0  # how long a call waits for the holder's reply
TURN_S = 2.0  # how long a released conversation is kept for the daemons told, at most
HEARD_TIMEOUT_S = 2.0  # how long a new subscription waits for every daemon to hear of it
RECLAIM_S = 1.0  # how often a run waiting on another daemon tries the claim unprompted


class Served(Protocol):
    """What the cluster needs of this daemon's runtime (daemon/_runtime.py)."""

    conversations: dict[Key, Conversation]

    async def kill_here(self, agent: str, sender: str, *, everything: bool) -> str | None: ...

    async def answer_here(
        self, agent: str, sender: str, content: str, ask_id: str | None
    ) -> None: ...

    def subscriptions(self) -> list[Subscription]: ...

    def add_subscription(self, subscription: Subscription) -> None: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...

    def runs_in_flight(self) -> int: ...


# --- what daemons say to each other -------------------------------------------------


class Kill(msgspec.Struct, tag="kill"):
    agent: str
    sender: str
    everything: bool


class Answer(msgspec.Struct, tag="answer"):
    agent: str
    sender: str
    content: str
    ask_id: str | None


class Attach(msgspec.Struct, tag="attach"):
    agent: str
    sender: str
    watch: int  # the attaching daemon's number for it, on every item relayed
    since: int  # the index of the first event wanted (0: from `start`)


class Wait(msgspec.Struct, tag="wait"):
    agent: str
    sender: str


Op = Kill | Answer | Attach | Wait


class Call(msgspec.Struct, tag="call"):
    no: int
    op: Op


class Reply(msgspec.Struct, tag="reply", kw_only=True):
    no: int
    code: int = 0  # 0: done; else the RequestError's code and message
    message: str = ""
    run_id: str | None = None  # kill: the run stopped; attach: the run attached to
    position: int = 0  # wait: the runs ahead, the one in flight included
    idle: bool = False  # attach: nothing was running
    last_seq: int | None = None  # attach, when idle


class Detach(msgspec.Struct, tag="detach"):
    watch: int


class Released(msgspec.Struct, tag="released"):
    agent: str
    sender: str


class Turned(msgspec.Struct, tag="turned"):
    """A daemon told `released` took the conversation, or stopped waiting for it."""

    agent: str
    sender: str


class Interest(msgspec.Struct, tag="interest"):
    version: int
    filters: list[tuple[str | None, str | None]]  # (agent, sender); None: any


class Heard(msgspec.Struct, tag="heard"):
    version: int


class MailNews(msgspec.Struct, tag="mail"):
    """The post office's news (daemon/_mail_news.py), carried as it encoded it."""

    news: msgspec.Raw


class Item(msgspec.Struct, array_like=True):
    watch: int  # the attach it answers; 0: for the subscriptions
    agent: str
    sender: str
    run_id: str
    index: int  # the event's place in its run, from `start`
    event: StreamEventMsg


class Relayed(msgspec.Struct, tag="relayed"):
    items: list[Item]


Message = Call | Reply | Detach | Released | Turned | Interest | Heard | Relayed | MailNews

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Message).decode


def _text(message: Message) -> str:
    return _encode(message).decode()


# --- this daemon's side of other daemons' requests ----------------------------------------


class PeerInterest(Subscription):
    """Another daemon's subscribers, as one subscription on this daemon: it relays."""

    def __init__(self, cluster: Cluster, peer: str, filters: list[tuple[str | None, str | None]]):
        super().__init__(None, None, self._relay)
        self.cluster = cluster
        self.peer = peer
        self.filters = filters

    def matches(self, agent: str, sender: str) -> bool:
        return any(
            (a is None or a == agent) and (s is None or s == sender) for a, s in self.filters
        )

    def _relay(self, agent: str, sender: str, run_id: str, event: StreamEventMsg) -> bool:
        item = Item(0, agent, sender, run_id, 0, event)
        self.cluster.bus.send(self.peer, _text(Relayed([item])))
        return True


@dataclass(eq=False)
class RelaySink:
    """An attach from another daemon: the run's events, numbered, to that daemon."""

    cluster: Cluster
    peer: str
    watch: int
    run: Run
    index: int  # of the next event

    def __call__(self, event: StreamEventMsg) -> bool:
        cluster = self.cluster
        if (self.peer, self.watch) not in cluster.relays:  # detached, or its daemon is gone
            return False
        run, conv = self.run, self.run.conversation
        item = Item(self.watch, conv.agent, conv.sender, run.id, self.index, event)
        self.index += 1
        cluster.bus.send(self.peer, _text(Relayed([item])))
        if type(event) is End:
            cluster.relays.pop((self.peer, self.watch), None)
        return True


# --- another daemon's run, seen from here --------------------------------------------------


@dataclass(eq=False)
class RemoteRun:
    """A run on another daemon that a client here attached to."""

    cluster: Cluster
    holder: str
    key: Key
    watch: int
    sink: Sink
    next_index: int = 0
    run_id: str | None = None

    def deliver(self, item: Item) -> None:
        if item.index < self.next_index:  # already delivered (asked for again after a gap)
            return
        if item.index > self.next_index:  # a gap: ask again from the first one missing
            self.cluster.reattach(self)
            return
        self.next_index += 1
        if not self.sink(item.event) or type(item.event) is End:
            self.cluster.forget(self)

    def remove_sink(self, sink: Sink) -> bool:
        """The client detached: the holder stops relaying."""
        del sink
        self.cluster.forget(self)
        return True

    def gone(self) -> None:
        """Its daemon died: the run ends here 503."""
        self.sink(
            End(
                status="error",
                error=ErrorInfo(
                    code=503,
                    message="The daemon running this conversation went away; "
                    "another daemon serves it from now on.",
                ),
                last_seq=None,
            )
        )


@dataclass(eq=False)
class _Turn:
    """A conversation released here while other daemons waited for it."""

    peers: set[str]  # the daemons told, until each took it or stopped waiting
    since: float  # when the first of them began to wait
    later: list[str] = field(default_factory=list)  # to be told once those took it, in order
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class _Pending:
    peer: str
    what: str  # for the timeout's message
    done: trio.Event = field(default_factory=trio.Event)
    reply: Reply | None = None


class Cluster:
    """This daemon's side of the bus: the ``Node`` it joins with, and the calls it makes."""

    def __init__(self, runtime: Served, bus: Bus) -> None:
        self.runtime = runtime
        self.bus = bus
        self.me = bus.me
        self.live: frozenset[str] = frozenset({bus.me})
        self.relays: dict[tuple[str, int], RelaySink] = {}  # (peer, watch): attaches served here
        self._numbers = itertools.count(1)
        self._calls: dict[int, _Pending] = {}
        self._watches: dict[int, RemoteRun] = {}
        self._interests: dict[str, PeerInterest] = {}  # other daemons' subscribers, here
        self._filters: frozenset[tuple[str | None, str | None]] = frozenset()  # ours, told
        self.version = 0  # of ``_filters``, as last told
        self._heard: dict[str, int] = {}  # the version each daemon acknowledged
        self._heard_changed = trio.Event()
        # Daemons waiting for conversations held here, and since when (trio.current_time).
        self._waiters: dict[Key, dict[str, float]] = {}
        self._turns: dict[Key, _Turn] = {}  # released here, kept for the daemons told
        self._released: dict[Key, trio.Event] = {}  # conversations waited for here
        self._releasers: dict[Key, set[str]] = {}  # who said `released` of them
        self._promised: set[Key] = set()  # waited for here, a holder to say `released`
        self._seen: dict[str, tuple[str, str, str]] = {}  # relayed runs under way: id -> origin
        # The post office's news from another daemon, and who joined or went (its
        # `heard` and `peers_changed`).
        self.on_mail: Callable[[str, bytes], None] | None = None
        self.on_peers: Callable[[frozenset[str], frozenset[str]], None] | None = None

    async def serve(self, address: str, *, task_status: trio.TaskStatus[None]) -> None:
        """Join the bus and answer the others until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._join, address)
            task_status.started()

    async def _join(self, address: str, *, task_status: trio.TaskStatus[None]) -> None:
        await self.bus.serve(
            self,
            host=socket.gethostname(),
            pid=os.getpid(),
            address=address,
            task_status=task_status,
        )

    # --- Node ------------------------------------------------------------------------

    def received(self, sender: str, text: str) -> None:
        try:
            message = _decode(text)
        except msgspec.ValidationError as exc:  # a daemon of another version
            log.warning("cluster_message_refused", peer=sender, error=str(exc))
            return
        match message:
            case Relayed(items):
                self._relayed(sender, items)
            case Call():
                self._nursery.start_soon(self._answer, sender, message)
            case Reply(no=no):
                pending = self._calls.pop(no, None)
                if pending is not None:
                    pending.reply = message
                    pending.done.set()
            case Released(agent, conv_sender):
                key = (agent, conv_sender)
                if key not in self._released:  # waits here no more: its turn is over at once
                    self.bus.send(sender, _text(Turned(agent, conv_sender)))
                else:
                    self._releasers.setdefault(key, set()).add(sender)
                    self._wake(key)
            case Turned(agent, conv_sender):
                self._turned((agent, conv_sender), sender)
            case Interest(version, filters):
                self._interested(sender, filters)
                self.bus.send(sender, _text(Heard(version)))
            case Heard(version):
                self._heard[sender] = max(version, self._heard.get(sender, 0))
                self._heard_changed.set()
                self._heard_changed = trio.Event()
            case Detach(watch):
                self.relays.pop((sender, watch), None)
            case MailNews(news):
                if self.on_mail is not None:
                    self.on_mail(sender, bytes(news))

    def peers_changed(self, live: frozenset[str]) -> None:
        gone, new = self.live - live, live - self.live
        self.live = live
        if gone:
            log.warning("daemons_gone", daemons=sorted(gone))
        if new - {self.me}:
            log.info("daemons_joined", daemons=sorted(new - {self.me}))
        for peer in new - {self.me}:
            if self._filters:
                self.bus.send(peer, _text(Interest(self.version, sorted(self._filters, key=str))))
        for no, pending in list(self._calls.items()):
            if pending.peer in gone:
                del self._calls[no]
                pending.reply = Reply(
                    no=no,
                    code=503,
                    message=f"The daemon {pending.what} went away or stopped answering; retry.",
                )
                pending.done.set()
        for remote in list(self._watches.values()):
            if remote.holder in gone:
                self.forget(remote)
                remote.gone()
        for run_id, (peer, agent, sender) in list(self._seen.items()):
            if peer in gone:
                del self._seen[run_id]
                self._to_subscribers(agent, sender, run_id, _GONE)
        for peer, watch in list(self.relays):
            if peer in gone:
                del self.relays[(peer, watch)]
        for peer in gone:
            interest = self._interests.pop(peer, None)
            if interest is not None:
                self.runtime.unsubscribe(interest)
            self._heard.pop(peer, None)
        self._heard_changed.set()
        self._heard_changed = trio.Event()
        for key in list(self._released):  # a conversation it held is free: try now
            self._wake(key)
        for key, turn in list(self._turns.items()):
            for peer in turn.peers & gone:
                self._turned(key, peer)
        if self.on_peers is not None:
            self.on_peers(gone, new - {self.me})

    def runs_in_flight(self) -> int:
        return self.runtime.runs_in_flight()

    # --- asking the holder ---------------------------------------------------------------

    async def holder(self, agent: str, sender: str) -> str | None:
        """The other daemon running the conversation, if one is."""
        try:
            held = await self.bus.holders([(agent, sender)])
        except StorageError as exc:
            raise RequestError(503, f"The daemons could not be asked: {exc}") from None
        holder = held.get((agent, sender))
        return None if holder == self.me else holder

    async def holders(self, keys: list[Key]) -> dict[Key, str]:
        """Which other daemon runs each of ``keys``, for those one does."""
        held = await self.bus.holders(keys)
        return {key: daemon for key, daemon in held.items() if daemon != self.me}

    async def _call(self, peer: str, op: Op) -> Reply:
        no = next(self._numbers)
        what = f"running ({op.agent}, {op.sender})"
        pending = self._calls[no] = _Pending(peer, what)
        self.bus.send(peer, _text(Call(no, op)))
        with trio.move_on_after(CALL_TIMEOUT_S):
            await pending.done.wait()
        self._calls.pop(no, None)
        reply = pending.reply
        if reply is None:
            raise RequestError(
                504, f"The daemon {what} did not answer within {CALL_TIMEOUT_S:g} s; retry."
            )
        if reply.code:
            raise RequestError(reply.code, reply.message)
        return reply

    async def kill(self, agent: str, sender: str, *, everything: bool) -> tuple[bool, str | None]:
        """Kill the run on the daemon that holds the conversation: (whether one does, the
        id of the run it stopped)."""
        peer = await self.holder(agent, sender)
        if peer is None:
            return False, None
        reply = await self._call(peer, Kill(agent, sender, everything))
        return True, reply.run_id

    async def interrupt(self, agent: str, sender: str) -> None:
        """A `stream` with `queue: interrupt` here: stop the run in flight elsewhere."""
        try:
            await self.kill(agent, sender, everything=False)
        except RequestError as exc:
            log.warning("interrupt_failed", agent=agent, sender=sender, error=exc.message)

    async def answer(self, agent: str, sender: str, content: str, ask_id: str | None) -> bool:
        """Answer the question of the run on the daemon that holds the conversation;
        False when no other daemon holds it."""
        peer = await self.holder(agent, sender)
        if peer is None:
            return False
        await self._call(peer, Answer(agent, sender, content, ask_id))
        return True

    async def attach(self, agent: str, sender: str, sink: Sink) -> RemoteRun | None:
        """Attach ``sink`` to the run on the daemon that holds the conversation: the
        remote run, or None when no other daemon runs one."""
        peer = await self.holder(agent, sender)
        if peer is None:
            return None
        watch = next(self._numbers)
        remote = self._watches[watch] = RemoteRun(self, peer, (agent, sender), watch, sink)
        try:
            reply = await self._call(peer, Attach(agent, sender, watch, 0))
        except BaseException:
            self._watches.pop(watch, None)
            raise
        if reply.idle:
            self._watches.pop(watch, None)
            return None
        remote.run_id = reply.run_id
        return remote

    def reattach(self, remote: RemoteRun) -> None:
        agent, sender = remote.key
        again = Attach(agent, sender, remote.watch, remote.next_index)
        self.bus.send(remote.holder, _text(Call(next(self._numbers), again)))

    def forget(self, remote: RemoteRun) -> None:
        if self._watches.pop(remote.watch, None) is not None:
            self.bus.send(remote.holder, _text(Detach(remote.watch)))

    async def wait_for(self, agent: str, sender: str) -> int:
        """Ask the daemon holding the conversation to say when it lets go; the runs ahead
        of this one (1 when none holds it now)."""
        key = (agent, sender)
        self._released[key] = trio.Event()  # set by its `released`, from now on
        self._promised.discard(key)
        peer = await self.holder(agent, sender)
        if peer is None:
            return 1
        try:
            position = (await self._call(peer, Wait(agent, sender))).position
        except RequestError:
            return 1
        if position:  # else it let go meanwhile, and will say nothing: try the claim now
            self._promised.add(key)
        return max(position, 1)

    def promised(self, agent: str, sender: str) -> bool:
        """Whether, since the latest ``wait_for``, a holder will say when it lets go."""
        return (agent, sender) in self._promised

    async def released(self, agent: str, sender: str) -> None:
        """Return once the holder let go of the conversation since ``wait_for``, or after
        ``RECLAIM_S``."""
        event = self._released.setdefault((agent, sender), trio.Event())
        with trio.move_on_after(RECLAIM_S):
            await event.wait()

    def done_waiting(self, agent: str, sender: str) -> None:
        """This daemon took the conversation, or gave up waiting for it: tell the daemons
        that let it go to it, which keep it for us meanwhile (``turn``)."""
        key = (agent, sender)
        self._released.pop(key, None)
        self._promised.discard(key)
        for releaser in self._releasers.pop(key, ()):
            self.bus.send(releaser, _text(Turned(agent, sender)))

    def let_go(self, agent: str, sender: str) -> None:
        """This daemon released the conversation: tell whoever waits for it, and keep it
        for them (``turn``) until they took it."""
        key = (agent, sender)
        # Not filtered by `live`, which lags a beat behind a daemon that just joined.
        waiting = self._waiters.pop(key, {})
        if not waiting:
            return
        line = sorted(waiting, key=waiting.__getitem__)  # the first to wait goes first
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn(set(), waiting[line[0]])
        turn.since = min(turn.since, *waiting.values())
        for peer in line:
            if peer in turn.peers:  # told before, beaten to it, and waiting again: tell again
                self.bus.send(peer, _text(Released(agent, sender)))
            elif peer not in turn.later:
                turn.later.append(peer)
        if not turn.peers:  # the first in line is told now, the others once it took it
            self._turned(key, "")

    async def turn(self, agent: str, sender: str, asked_at: float) -> None:
        """Wait, before a job asked for at ``asked_at`` claims the conversation, while
        daemons that waited for it since before then take their turn (at most ``TURN_S``)."""
        turn = self._turns.get((agent, sender))
        if turn is None or turn.since > asked_at:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(TURN_S):
            await turn.done.wait()
        if self._turns.get((agent, sender)) is turn:
            del self._turns[(agent, sender)]

    def _turned(self, key: Key, peer: str) -> None:
        turn = self._turns.get(key)
        if turn is None:
            return
        turn.peers.discard(peer)
        while not turn.peers and turn.later:  # the next in line: it finds the holder now
            nxt = turn.later.pop(0)
            turn.peers.add(nxt)
            self.bus.send(nxt, _text(Released(*key)))
        if not turn.peers:
            del self._turns[key]
            turn.done.set()

    def _wake(self, key: Key) -> None:
        event = self._released.get(key)
        if event is not None:
            event.set()

    # --- answering ------------------------------------------------------------------------

    async def _answer(self, peer: str, call: Call) -> None:
        op = call.op
        runtime = self.runtime
        try:
            match op:
                case Kill(agent, sender, everything):
                    run_id = await runtime.kill_here(agent, sender, everything=everything)
                    reply = Reply(no=call.no, run_id=run_id)
                case Answer(agent, sender, content, ask_id):
                    await runtime.answer_here(agent, sender, content, ask_id)
                    reply = Reply(no=call.no)
                case Attach():
                    reply = self._attach_here(peer, call.no, op)
                case Wait(agent, sender):
                    reply = Reply(no=call.no, position=self._wait_here(peer, (agent, sender)))
        except RequestError as exc:
            reply = Reply(no=call.no, code=exc.code, message=exc.message)
        except Exception as exc:  # e.g. the store failing: the asker gets 500, we go on
            log.error("cluster_call_failed", peer=peer, op=type(op).__name__, exc_info=exc)
            reply = Reply(no=call.no, code=500, message="The daemon running it failed to answer.")
        self.bus.send(peer, _text(reply))

    def _attach_here(self, peer: str, no: int, op: Attach) -> Reply:
        conv = self.runtime.conversations.get((op.agent, op.sender))
        run = conv.current if conv is not None else None
        if not isinstance(run, Run) or not run.started or run.state == "ended":
            return Reply(no=no, idle=True, last_seq=conv.last_seq if conv is not None else None)
        old = self.relays.pop((peer, op.watch), None)
        if old is not None:
            old.run.remove_sink(old)
        sink = self.relays[(peer, op.watch)] = RelaySink(self, peer, op.watch, run, op.since)
        for event in run.events[op.since :]:
            sink(event)
        if (peer, op.watch) in self.relays:  # not ended during the replay
            run.add_sink(sink)
        return Reply(no=no, run_id=run.id)

    def _wait_here(self, peer: str, key: Key) -> int:
        """``peer`` waits for ``key``: the runs ahead of it, once it is in line here; 0 when
        this daemon holds it no more (it let go before the call came: try again now)."""
        conv = self.runtime.conversations.get(key)
        if conv is None or not conv.holding:
            return 0
        waiting = self._waiters.setdefault(key, {})
        ahead = 1 + len(conv.queue) + len(waiting.keys() - {peer})
        waiting.setdefault(peer, trio.current_time())
        return ahead

    # --- subscriptions -----------------------------------------------------------------------

    def subscriptions_changed(self) -> int:
        """Tell the other daemons what this one's subscribers filter on, if that changed;
        the version they must acknowledge (``heard``)."""
        filters = frozenset(
            (sub.agent, sub.sender)
            for sub in self.runtime.subscriptions()
            if not isinstance(sub, PeerInterest)
        )
        if filters != self._filters:
            self._filters = filters
            self.version += 1
            self.bus.send(None, _text(Interest(self.version, sorted(filters, key=str))))
        return self.version

    async def heard(self, version: int) -> None:
        """Return once every live daemon acknowledged ``version`` of the filters (or
        after ``HEARD_TIMEOUT_S``): runs starting after that reach the subscriber."""
        with trio.move_on_after(HEARD_TIMEOUT_S):
            while any(self._heard.get(peer, 0) < version for peer in self.live if peer != self.me):
                await self._heard_changed.wait()

    def _interested(self, peer: str, filters: list[tuple[str | None, str | None]]) -> None:
        old = self._interests.pop(peer, None)
        if old is not None:
            self.runtime.unsubscribe(old)
        if filters:
            interest = self._interests[peer] = PeerInterest(self, peer, filters)
            self.runtime.add_subscription(interest)

    def _relayed(self, peer: str, items: list[Item]) -> None:
        for item in items:
            if item.watch:
                remote = self._watches.get(item.watch)
                if remote is not None:
                    remote.deliver(item)
                continue
            event = item.event
            if type(event) is Start:
                self._seen[item.run_id] = (peer, item.agent, item.sender)
            elif type(event) is End:
                self._seen.pop(item.run_id, None)
            self._to_subscribers(item.agent, item.sender, item.run_id, event)

    def _to_subscribers(self, agent: str, sender: str, run_id: str, event: StreamEventMsg) -> None:
        """An event of a run on another daemon, to this daemon's own subscribers."""
        for sub in list(self.runtime.subscriptions()):
            if isinstance(sub, PeerInterest) or not sub.matches(agent, sender):
                continue
            if not sub.deliver(agent, sender, run_id, event):
                self.runtime.unsubscribe(sub)

    # --- mail ------------------------------------------------------------------------------

    def mail_news(self, news: bytes, to: str | None = None) -> None:
        """The post office's news, to the daemon ``to`` or (None) every other one."""
        self.bus.send(to, _text(MailNews(msgspec.Raw(news))))

    # --- who is there ----------------------------------------------------------------------

    async def daemons(self) -> list[DaemonInfo]:
        try:
            peers = await self.bus.peers()
        except StorageError as exc:
            raise RequestError(503, f"The daemons could not be listed: {exc}") from None
        return [
            DaemonInfo(
                id=peer.id,
                host=peer.host,
                pid=peer.pid,
                address=peer.address,
                started_at=peer.started_at,
                beat_at=peer.beat_at,
                runs_in_flight=peer.runs,
                this=peer.id == self.me,
            )
            for peer in peers
        ]


_GONE = End(
    status="error",
    error=ErrorInfo(
        code=503,
        message="The daemon running this conversation went away during the run.",
    ),
    last_seq=None,
)
