"""The dashboard's one connection to the daemon, kept up across restarts, and the fan-out
of the daemon's run events to every open page.

One `subscribe` request feeds every page's event stream, so that fifty open pages
cost the daemon one subscriber, not fifty. Each page listens through a bounded
memory stream; one that falls behind loses its stream (the browser's
`EventSource` connects again), never stalls the others.

The events of each run in flight are kept (consecutive text merged) so that a page
opened in the middle of a run is shown the run from its `start`.
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
from chinwag.protocol import End, Event, TextDelta, ThinkingDelta

from .._client import ChinwagError, Client, connect_explained

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


PageItem = Event | DaemonState


@dataclass(eq=False)
class _Listener:
    agent: str | None
    sender: str | None
    send: MemoryObjectSendStream[PageItem]

    def wants(self, event: Event) -> bool:
        return (self.agent is None or event.agent == self.agent) and (
            self.sender is None or event.sender == self.sender
        )


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
            # A copy: the merge above changes it, and listeners hold the original.
            new = type(new)(delta=new.delta)
        self.events.append(msgspec.structs.replace(event, event=new))


class DaemonLink:
    """Connects to the daemon, and again whenever it goes away, every ``retry_s`` seconds.

    ``run`` does it until cancelled; ``client`` is the connection while there is
    one (``DaemonAway`` otherwise); ``listen`` gives a page the run events.
    """

    def __init__(self, socket_path: Path, *, retry_s: float = 1.0) -> None:
        self.socket_path = socket_path
        self.retry_s = retry_s
        self._client: Client | None = None
        self.state = DaemonState(up=False, reason="The dashboard is connecting to the daemon.")
        self._listeners: set[_Listener] = set()
        self._runs: dict[str, _RunSoFar] = {}

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
                async with connect_explained(self.socket_path, client=CLIENT_NAME) as client:
                    self._client = client
                    async with client.subscribe() as feed:
                        self._set_state(DaemonState(up=True))
                        if starting:
                            starting = False
                            task_status.started()
                        async for event in feed:
                            self._publish(event)
            except ChinwagError as exc:
                reason = exc.message
            finally:
                self._client = None
                self._runs.clear()
            self._set_state(DaemonState(up=False, reason=f"The daemon is unreachable: {reason}"))
            if starting:
                starting = False
                task_status.started()
            await anyio.sleep(self.retry_s)

    async def until_up(self) -> None:
        """Return once the daemon is connected (at once if it is)."""
        with self.listen() as items:
            async for item in items:
                if isinstance(item, DaemonState) and item.up:
                    return

    @contextmanager
    def listen(
        self, agent: str | None = None, sender: str | None = None
    ) -> Iterator[MemoryObjectReceiveStream[PageItem]]:
        """The daemon's state, then each matching run in flight so far, then what comes.

        The stream ends when its reader falls ``PAGE_BUFFER`` items behind.
        """
        send, receive = anyio.create_memory_object_stream[PageItem](PAGE_BUFFER)
        listener = _Listener(agent, sender, send)
        # No await from here to the registration: nothing is missed, nothing doubled.
        send.send_nowait(self.state)
        for run in self._runs.values():
            for event in run.events:
                if listener.wants(event):
                    send.send_nowait(event)
        self._listeners.add(listener)
        try:
            with receive:
                yield receive
        finally:
            self._listeners.discard(listener)
            send.close()

    def _set_state(self, state: DaemonState) -> None:
        if state == self.state:
            return
        self.state = state
        for listener in list(self._listeners):
            self._offer(listener, state)

    def _publish(self, event: Event) -> None:
        run = self._runs.setdefault(event.run_id, _RunSoFar())
        if isinstance(event.event, End):
            del self._runs[event.run_id]
        else:
            run.add(event)
        for listener in list(self._listeners):
            if listener.wants(event):
                self._offer(listener, event)

    def _offer(self, listener: _Listener, item: PageItem) -> None:
        try:
            listener.send.send_nowait(item)
        except anyio.WouldBlock:
            # Fallen behind: its page's stream ends, and the browser connects again.
            self._listeners.discard(listener)
            listener.send.close()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._listeners.discard(listener)
