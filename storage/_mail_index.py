"""Mail held in process: the memory backend's ``MailStore``, and the jsonl backend's index.

``MailIndex`` answers every read from dicts and lists kept in msg_id order.
Its writes come in two halves, so that a backend with a log can write the
change down between them: ``plan_*`` checks a change and fixes what it will
be (numbers, times, which deliveries move) as a ``MailChange``, and ``apply``
makes it. Replaying the same changes into a fresh index rebuilds it exactly.
Messages are kept encoded, as sqlite keeps them, so a read returns a fresh copy.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

import msgspec
import trio
from chinwag.protocol import Delivery, DeliveryState, MailMessage, Participant

from ._base import StorageError
from ._mail import (
    InboxQuery,
    ParentChange,
    StateChange,
    advanced,
    msg_id_of,
    number_of,
)


class PutParticipant(msgspec.Struct, tag="participant", kw_only=True):
    participant: Participant


class PostMail(msgspec.Struct, tag="post", kw_only=True):
    message: MailMessage  # numbered
    deliveries: list[Delivery]
    parent: ParentChange | None = None
    new_participants: list[Participant] = msgspec.field(default_factory=list)


class Advance(msgspec.Struct, tag="advance", kw_only=True):
    changes: list[tuple[str, str, DeliveryState, datetime]]  # StateChange fields, each a move


MailChange = PutParticipant | PostMail | Advance
"""One write of a ``MailIndex``, as a log would hold it."""

_encode = msgspec.msgpack.Encoder().encode
_decode_message = msgspec.msgpack.Decoder(MailMessage).decode


class MailIndex:
    """Participants, messages and deliveries in memory, indexed by recipient, author, thread."""

    def __init__(self) -> None:
        self.participants_by_name: dict[str, Participant] = {}
        self._messages: dict[int, bytes] = {}  # by number
        self._deliveries: dict[int, dict[str, Delivery]] = {}
        self._received: dict[str, list[int]] = {}  # ascending numbers
        self._written: dict[str, list[int]] = {}
        self._threads: dict[str, list[int]] = {}
        self._keys: dict[tuple[str, str], int] = {}  # (sender, idempotency key) -> number
        self._unread: dict[str, dict[int, int]] = {}  # name -> priority -> count
        self._priority: dict[int, int] = {}
        self.last_number = 0

    # --- planning a change ----------------------------------------------------------

    def plan_post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        parent: ParentChange | None,
        new_participants: Sequence[Participant],
    ) -> tuple[MailMessage, PostMail | None]:
        """The stored message and the change that stores it; no change for a repeated key."""
        key = message.idempotency_key
        if key is not None and (number := self._keys.get((message.sender, key))) is not None:
            return self._message(number), None
        if parent is not None and number_of(parent.msg_id) not in self._messages:
            raise StorageError(f"The parent message {parent.msg_id} is not stored.")
        numbered = msgspec.structs.replace(message, msg_id=msg_id_of(self.last_number + 1))
        # Encoded now, so a message that cannot be stored fails before anything changes.
        _encode(numbered)
        fresh = [p for p in new_participants if p.name not in self.participants_by_name]
        change = PostMail(
            message=numbered,
            deliveries=[msgspec.structs.replace(d) for d in deliveries],
            parent=parent,
            new_participants=fresh,
        )
        return _decode_message(_encode(numbered)), change

    def plan_advance(self, changes: Sequence[StateChange]) -> Advance | None:
        moves: list[tuple[str, str, DeliveryState, datetime]] = []
        seen: dict[tuple[int, str], Delivery] = {}
        for change in changes:
            number = number_of(change.msg_id)
            if number is None:
                continue
            delivery = seen.get((number, change.name)) or self._deliveries.get(number, {}).get(
                change.name
            )
            if delivery is None:
                continue
            moved = advanced(delivery, change.state, change.at)
            if moved is not None:
                seen[(number, change.name)] = moved
                moves.append((change.msg_id, change.name, change.state, change.at))
        return Advance(changes=moves) if moves else None

    def plan_mark_read(
        self,
        name: str,
        at: datetime,
        msg_ids: Sequence[str] | None,
        thread_id: str | None,
    ) -> Advance | None:
        if msg_ids is not None:
            numbers: Iterator[int] = (n for n in map(number_of, msg_ids) if n is not None)
        elif thread_id is not None:
            numbers = iter(self._threads.get(thread_id, ()))
        else:
            numbers = iter(self._received.get(name, ()))
        return self.plan_advance([StateChange(msg_id_of(n), name, "read", at) for n in numbers])

    # --- making it ---------------------------------------------------------------------

    def apply(self, change: MailChange) -> None:
        match change:
            case PutParticipant(participant=participant):
                self.participants_by_name[participant.name] = _stored(participant)
            case PostMail():
                self._post(change)
            case Advance(changes=moves):
                for msg_id, name, state, at in moves:
                    number = number_of(msg_id)
                    assert number is not None
                    self._move(number, name, state, at)

    def _post(self, change: PostMail) -> None:
        message = change.message
        number = number_of(message.msg_id)
        assert number is not None
        for participant in change.new_participants:
            self.participants_by_name.setdefault(participant.name, _stored(participant))
        if (parent := change.parent) is not None:
            self._change_parent(parent, message)
        self._messages[number] = _encode(message)
        self.last_number = max(self.last_number, number)
        self._priority[number] = message.priority
        self._deliveries[number] = {d.name: d for d in change.deliveries}
        for delivery in change.deliveries:
            self._received.setdefault(delivery.name, []).append(number)
            if delivery.state != "read":
                self._count_unread(delivery.name, message.priority, 1)
        self._written.setdefault(message.sender, []).append(number)
        if message.thread_id is not None:
            self._threads.setdefault(message.thread_id, []).append(number)
        if message.idempotency_key is not None:
            self._keys[(message.sender, message.idempotency_key)] = number

    def _change_parent(self, parent: ParentChange, reply: MailMessage) -> None:
        number = number_of(parent.msg_id)
        assert number is not None
        stored = self._message(number)
        if parent.start_thread and stored.thread_id is None:
            stored.thread_id = stored.msg_id
            self._threads.setdefault(stored.msg_id, []).insert(0, number)
        if parent.answered:
            stored.answered_by = reply.msg_id
            stored.run_id = reply.run_id
        self._messages[number] = _encode(stored)
        if parent.read_by is not None:
            self._move(number, parent.read_by, "read", reply.created_at)

    def _move(self, number: int, name: str, state: DeliveryState, at: datetime) -> None:
        delivery = self._deliveries.get(number, {}).get(name)
        if delivery is None:
            return
        moved = advanced(delivery, state, at)
        if moved is None:
            return
        self._deliveries[number][name] = moved
        if moved.state == "read":
            self._count_unread(name, self._priority[number], -1)

    def _count_unread(self, name: str, priority: int, step: int) -> None:
        counts = self._unread.setdefault(name, {})
        counts[priority] = counts.get(priority, 0) + step
        if not counts[priority]:
            del counts[priority]
            if not counts:
                del self._unread[name]

    # --- reads -------------------------------------------------------------------------

    def _message(self, number: int) -> MailMessage:
        return _decode_message(self._messages[number])

    def get_message(self, msg_id: str) -> MailMessage | None:
        number = number_of(msg_id)
        if number is None or number not in self._messages:
            return None
        return self._message(number)

    def deliveries(self, msg_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        found: dict[str, list[Delivery]] = {}
        for msg_id in msg_ids:
            number = number_of(msg_id)
            if number is not None and number in self._deliveries:
                found[msg_id] = [  # by recipient name, as the protocol lists them
                    msgspec.structs.replace(d) for _, d in sorted(self._deliveries[number].items())
                ]
        return found

    def inbox(
        self, name: str, query: InboxQuery, limit: int, before: str | None
    ) -> list[tuple[MailMessage, Delivery]]:
        numbers = self._received.get(name, [])
        end = len(numbers)
        if before is not None:
            bound = number_of(before)
            end = bisect.bisect_left(numbers, bound) if bound is not None else 0
        page: list[tuple[MailMessage, Delivery]] = []
        for number in reversed(numbers[:end]):
            if len(page) >= limit:
                break
            delivery = self._deliveries[number][name]
            if query.unread_only and delivery.state == "read":
                continue
            if query.mentions_only and not delivery.mentioned:
                continue
            if self._priority[number] < query.priority_min:
                continue
            message = self._message(number)
            if _matches(message, query):
                page.append((message, msgspec.structs.replace(delivery)))
        return page

    def received(
        self, name: str, after: str | None, limit: int, pending_only: bool
    ) -> list[tuple[MailMessage, Delivery]]:
        numbers = self._received.get(name, [])
        start = 0
        if after is not None:
            bound = number_of(after)
            start = bisect.bisect_right(numbers, bound) if bound is not None else 0
        page: list[tuple[MailMessage, Delivery]] = []
        for number in numbers[start:]:
            if len(page) >= limit:
                break
            delivery = self._deliveries[number][name]
            if pending_only and delivery.state != "pending":
                continue
            page.append((self._message(number), msgspec.structs.replace(delivery)))
        return page

    def newest_received(self, name: str) -> str | None:
        numbers = self._received.get(name)
        return msg_id_of(numbers[-1]) if numbers else None

    def unread_counts(self, name: str) -> dict[int, int]:
        return dict(self._unread.get(name, {}))

    def unread_totals(self) -> dict[str, int]:
        return {name: sum(counts.values()) for name, counts in self._unread.items()}

    def sent(self, name: str, limit: int, before: str | None) -> list[MailMessage]:
        numbers = self._written.get(name, [])
        end = len(numbers)
        if before is not None:
            bound = number_of(before)
            end = bisect.bisect_left(numbers, bound) if bound is not None else 0
        return [self._message(n) for n in reversed(numbers[max(0, end - limit) : end])]

    def thread(self, thread_id: str) -> list[MailMessage]:
        return [self._message(n) for n in self._threads.get(thread_id, ())]

    def participants(self) -> list[Participant]:
        # Deep copies (roles, info): the caller's to change.
        return [_stored(p) for _, p in sorted(self.participants_by_name.items())]


def _stored(participant: Participant) -> Participant:
    """What a store keeps of a participant: presence and unread are the post office's."""
    return msgspec.convert(
        msgspec.to_builtins(msgspec.structs.replace(participant, online=False, unread=0)),
        Participant,
    )


def _matches(message: MailMessage, query: InboxQuery) -> bool:
    if query.thread_id is not None and message.thread_id != query.thread_id:
        return False
    if query.channel is not None and message.channel != query.channel:
        return False
    if query.scope is not None and query.scope not in message.scopes:
        return False
    return query.since is None or message.created_at >= query.since


class IndexedMail:
    """The reads of a ``MailStore`` served from a ``MailIndex`` (memory's and jsonl's)."""

    async def _ready(self) -> MailIndex:
        """The index, once the store is known to be open; a checkpoint."""
        raise NotImplementedError

    async def participants(self) -> list[Participant]:
        return (await self._ready()).participants()

    async def get_message(self, msg_id: str) -> MailMessage | None:
        return (await self._ready()).get_message(msg_id)

    async def deliveries(self, msg_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        return (await self._ready()).deliveries(msg_ids)

    async def inbox(
        self, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery]]:
        return (await self._ready()).inbox(name, query, limit, before)

    async def received(
        self, name: str, *, after: str | None, limit: int, pending_only: bool = False
    ) -> list[tuple[MailMessage, Delivery]]:
        return (await self._ready()).received(name, after, limit, pending_only)

    async def newest_received(self, name: str) -> str | None:
        return (await self._ready()).newest_received(name)

    async def unread_counts(self, name: str) -> dict[int, int]:
        return (await self._ready()).unread_counts(name)

    async def unread_totals(self) -> dict[str, int]:
        return (await self._ready()).unread_totals()

    async def sent(self, name: str, *, limit: int, before: str | None = None) -> list[MailMessage]:
        return (await self._ready()).sent(name, limit, before)

    async def thread(self, thread_id: str) -> list[MailMessage]:
        return (await self._ready()).thread(thread_id)


class MemoryMail(IndexedMail):
    """The memory backend's ``MailStore``: a ``MailIndex`` and nothing more."""

    def __init__(self, closed: Callable[[], bool]) -> None:
        self.index = MailIndex()
        self._closed = closed

    async def _ready(self) -> MailIndex:
        await trio.lowlevel.checkpoint()
        if self._closed():
            raise StorageError("The store is closed.")
        return self.index

    async def put_participant(self, participant: Participant) -> None:
        (await self._ready()).apply(PutParticipant(participant=participant))

    async def post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        *,
        parent: ParentChange | None = None,
        new_participants: Sequence[Participant] = (),
    ) -> tuple[MailMessage, bool]:
        index = await self._ready()
        stored, change = index.plan_post(message, deliveries, parent, new_participants)
        if change is not None:
            index.apply(change)
        return stored, change is not None

    async def advance(self, changes: Sequence[StateChange]) -> None:
        index = await self._ready()
        if (change := index.plan_advance(changes)) is not None:
            index.apply(change)

    async def mark_read(
        self,
        name: str,
        at: datetime,
        *,
        msg_ids: Sequence[str] | None = None,
        thread_id: str | None = None,
    ) -> int:
        index = await self._ready()
        change = index.plan_mark_read(name, at, msg_ids, thread_id)
        if change is None:
            return 0
        index.apply(change)
        return len(change.changes)
