"""The bus between daemons that share a store: short messages, who is alive, who holds what.

One daemon alone on its store needs none (its store's ``bus`` is None). On a
shared store (postgres) every daemon joins the bus: it gets an id, a row of
liveness that it beats, and a mailbox that other daemons address by that id.
What travels is text the daemon encodes and decodes (``daemon/_cluster.py``):
the bus only carries it, in order from one sender to one receiver, of any
length (it splits what the transport cannot take in one piece).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import trio


@dataclass(frozen=True)
class Peer:
    """A daemon on the bus, as its row of liveness says."""

    id: str
    host: str  # the machine it runs on (its hostname)
    pid: int
    address: str  # where clients reach it: its socket path, and its TCP address if it has one
    started_at: datetime
    beat_at: datetime  # its latest heartbeat
    runs: int  # its runs in flight at that beat


class Node(Protocol):
    """What the bus reports to the daemon that joined it, always on the daemon's trio thread."""

    def received(self, sender: str, text: str) -> None:
        """A message from the daemon ``sender``; must not block."""
        ...

    def peers_changed(self, live: frozenset[str]) -> None:
        """The ids of the daemons alive at the latest beat (this one's included),
        told whenever they differ from the beat before."""
        ...

    def runs_in_flight(self) -> int:
        """What this daemon's row says at each beat."""
        ...


class Bus(Protocol):
    me: str
    """This daemon's id on the bus, unique among every daemon that ever joined."""

    async def serve(
        self,
        node: Node,
        *,
        host: str,
        pid: int,
        address: str,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Join, listen, send and beat until cancelled; then leave (the row goes).

        Use with ``nursery.start``: it reports started once this daemon's row
        is written and its mailbox listens, so that nothing sent to it after
        that is lost. Raises ``StorageError`` when it cannot join.
        """
        ...

    def send(self, to: str | None, text: str) -> None:
        """Queue ``text`` for the daemon ``to`` (None: every other daemon); never blocks.

        Messages from this daemon reach each receiver in the order they were
        queued. What is queued for a daemon that is gone is lost, and nothing
        tells the sender: a daemon that waits for an answer waits with a timeout.
        """
        ...

    async def holders(
        self, conversations: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], str]:
        """The daemon that holds each of ``conversations`` (its claim, see
        ``Storage.claim``), by id, for those some daemon holds; read now, not cached."""
        ...

    async def peers(self) -> list[Peer]:
        """The daemons alive now, this one included, oldest first; read now."""
        ...
