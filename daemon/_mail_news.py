"""What the post offices of daemons sharing a store tell each other, and who is online where.

Mail lives in the store, but each post office keeps some of it in memory: the
participants it knows, the spaces and their members, the watchers it pushes to,
and who is registered on its connections. So that several daemons act as one,
each tells the others, over the bus (daemon/_cluster.py carries the news
unread), what it changed: a message stored or changed (the others read it back
from the store and push it to their own watchers), a reader's mail read (pushed
as told), participants as stored now, registrations begun and ended, spaces
changed. A daemon that joins, or comes back after it lost the others, asks each
for its registrations (``RollCall``); a daemon seen dead is online nowhere any
more.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from chinwag.protocol import ChangeKind, Participant


class Posted(msgspec.Struct, tag="posted"):
    """A message stored."""

    msg_id: str


class Changed(msgspec.Struct, tag="changed"):
    """A message edited, deleted, reacted to or pinned."""

    msg_id: str
    change: ChangeKind


class Read(msgspec.Struct, tag="read"):
    """``name``'s copies of these messages became `read` (in msg_id order)."""

    name: str
    msg_ids: list[str]


class Known(msgspec.Struct, tag="known"):
    """Participants as stored now (made, focused, a heartbeat without a registration)."""

    participants: list[Participant]


class Online(msgspec.Struct, tag="online"):
    """Participants registered on the sending daemon, as stored now: a registration
    (``registered``: it replaces an older one of the name anywhere else), a heartbeat, or
    (``every``) all of them, answering a ``RollCall``."""

    participants: list[Participant]
    registered: bool = False
    every: bool = False


class Offline(msgspec.Struct, tag="offline"):
    """Registrations on the sending daemon that ended."""

    names: list[str]


class SpacesChanged(msgspec.Struct, tag="spaces"):
    """A space, a membership or a project changed: read them again."""


class RollCall(msgspec.Struct, tag="roll_call"):
    """Say who is registered on your connections (an ``Online`` with ``every``)."""


News = Posted | Changed | Read | Known | Online | Offline | SpacesChanged | RollCall

encode_news = msgspec.json.Encoder().encode
decode_news = msgspec.json.Decoder(News).decode


@dataclass
class Remote:
    """A registration on another daemon, as it told it."""

    participant: Participant
    seen_at: float  # trio time it was told of (registered, or a heartbeat)


class Presence:
    """Who is registered on the other daemons: name -> daemon -> registration."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, Remote]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def of(self, name: str) -> list[Remote]:
        return list(self._by_name.get(name, {}).values())

    def online(self, peer: str, participants: list[Participant], at: float, *, every: bool) -> None:
        if every:
            self.gone(frozenset({peer}))
        for participant in participants:
            self._by_name.setdefault(participant.name, {})[peer] = Remote(participant, at)

    def offline(self, peer: str, names: list[str]) -> None:
        for name in names:
            held = self._by_name.get(name, {})
            held.pop(peer, None)
            if not held:
                self._by_name.pop(name, None)

    def gone(self, peers: frozenset[str]) -> None:
        """Those daemons died, or this one lost them: nobody is registered there."""
        for name, held in list(self._by_name.items()):
            for peer in peers & held.keys():
                del held[peer]
            if not held:
                del self._by_name[name]
