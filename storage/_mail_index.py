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
import contextlib
import operator
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime
from typing import TypeVar

import msgspec
import trio
from chinwag.protocol import (
    Delivery,
    DeliveryState,
    LockHolder,
    MailMessage,
    MessageVersion,
    Participant,
    Project,
    Space,
    SpaceMember,
)

from ._errors import StorageError
from ._mail import (
    FromSpace,
    InboxQuery,
    MessageChange,
    ParentChange,
    StateChange,
    advanced,
    changed,
    lock_allows,
    msg_id_of,
    number_of,
    with_members,
)
from ._search import TextIndex

_R = TypeVar("_R")


class PutParticipant(msgspec.Struct, tag="participant", kw_only=True):
    participant: Participant


class PostMail(msgspec.Struct, tag="post", kw_only=True):
    message: MailMessage  # numbered
    deliveries: list[Delivery]
    parent: ParentChange | None = None
    new_participants: list[Participant] = msgspec.field(default_factory=list)


class Advance(msgspec.Struct, tag="advance", kw_only=True):
    changes: list[tuple[str, str, DeliveryState, datetime]]  # StateChange fields, each a move


class ChangeMessage(msgspec.Struct, tag="change", kw_only=True):
    msg_id: str
    change: MessageChange


class PutSpace(msgspec.Struct, tag="space", kw_only=True):
    space: Space


class SetMember(msgspec.Struct, tag="member", kw_only=True):
    space: str
    name: str
    at: datetime
    member: bool


class PutProject(msgspec.Struct, tag="project", kw_only=True):
    project: Project


class DeleteProject(msgspec.Struct, tag="project_deleted", kw_only=True):
    name: str


class SetLocks(msgspec.Struct, tag="locks", kw_only=True):
    resource: str
    holders: list[LockHolder]  # every holder it keeps, live or not yet forgotten


MailChange = (
    PutParticipant
    | PostMail
    | Advance
    | ChangeMessage
    | PutSpace
    | SetMember
    | PutProject
    | DeleteProject
    | SetLocks
)
"""One write of a ``MailIndex``, as a log would hold it."""

_encode = msgspec.msgpack.Encoder().encode
_decode_message = msgspec.msgpack.Decoder(MailMessage).decode
_decode_version = msgspec.msgpack.Decoder(MessageVersion).decode


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
        self._versions: dict[int, list[bytes]] = {}  # each encoded, oldest first
        self._text: TextIndex[int] = TextIndex()  # content of messages not deleted
        self._in_space: dict[str, list[int]] = {}  # ascending numbers
        self.spaces: dict[str, Space] = {}
        self.members: dict[str, dict[str, SpaceMember]] = {}
        self.projects: dict[str, Project] = {}
        self.locks: dict[str, list[LockHolder]] = {}
        self.last_number = 0

    # --- planning a change ----------------------------------------------------------

    def repeated(self, message: MailMessage) -> MailMessage | None:
        """The message stored first with ``message``'s sender and idempotency key, if any."""
        key = message.idempotency_key
        if key is not None and (number := self._keys.get((message.sender, key))) is not None:
            return self._message(number)
        return None

    def plan_post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        parent: ParentChange | None,
        new_participants: Sequence[Participant],
    ) -> PostMail:
        """The change that stores ``message``, its key not used before (``repeated``)."""
        if parent is not None and number_of(parent.msg_id) not in self._messages:
            raise StorageError(f"The parent message {parent.msg_id} is not stored.")
        numbered = msgspec.structs.replace(message, msg_id=msg_id_of(self.last_number + 1))
        # Encoded now, so a message that cannot be stored fails before anything changes.
        _encode(numbered)
        fresh = [p for p in new_participants if p.name not in self.participants_by_name]
        return PostMail(
            message=numbered,
            deliveries=[msgspec.structs.replace(d) for d in deliveries],
            parent=parent,
            new_participants=fresh,
        )

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

    def plan_change(self, msg_id: str, change: MessageChange) -> ChangeMessage | None:
        if self.get_message(msg_id) is None:
            return None
        return ChangeMessage(msg_id=msg_id, change=change)

    def plan_member(self, space: str, name: str, at: datetime, member: bool) -> SetMember | None:
        if (name in self.members.get(space, {})) == member:
            return None
        return SetMember(space=space, name=name, at=at, member=member)

    def plan_lock(
        self, lock: LockHolder, now: datetime
    ) -> tuple[tuple[bool, list[LockHolder]], SetLocks | None]:
        kept = self.locks.get(lock.resource, [])
        live = [h for h in kept if h.expires_at > now]
        others = [h for h in live if h.holder != lock.holder]
        mine = next((h for h in live if h.holder == lock.holder), None)
        if not lock_allows(others, lock.mode):  # expired holders are forgotten all the same
            forget = SetLocks(resource=lock.resource, holders=live) if live != kept else None
            return (False, _by_holder(live)), forget
        acquired_at = lock.acquired_at if mine is None else mine.acquired_at
        holders = [*others, msgspec.structs.replace(lock, acquired_at=acquired_at)]
        return (True, _by_holder(holders)), SetLocks(resource=lock.resource, holders=holders)

    def plan_unlock(
        self, resource: str, holder: str, now: datetime
    ) -> tuple[bool, SetLocks | None]:
        kept = self.locks.get(resource, [])
        held = any(h.holder == holder and h.expires_at > now for h in kept)
        left = [h for h in kept if h.expires_at > now and h.holder != holder]
        return held, SetLocks(resource=resource, holders=left) if left != kept else None

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
            case ChangeMessage(msg_id=msg_id, change=message_change):
                self._change(msg_id, message_change)
            case PutSpace(space=space):
                self.spaces[space.name] = msgspec.structs.replace(space, members=0, messages=0)
            case SetMember(space=space, name=name, at=at, member=member):
                members = self.members.setdefault(space, {})
                if member:
                    members.setdefault(name, SpaceMember(name=name, joined_at=at))
                else:
                    members.pop(name, None)
                    if not members:
                        del self.members[space]
            case PutProject(project=project):
                self.projects[project.name] = _copy(project, Project)
            case DeleteProject(name=name):
                self.projects.pop(name, None)
            case SetLocks(resource=resource, holders=holders):
                if holders:
                    self.locks[resource] = [msgspec.structs.replace(h) for h in holders]
                else:
                    self.locks.pop(resource, None)

    def _change(self, msg_id: str, change: MessageChange) -> None:
        number = number_of(msg_id)
        assert number is not None
        message, replaced = changed(self._message(number), change)
        self._messages[number] = _encode(message)
        if replaced is not None:
            self._versions.setdefault(number, []).append(_encode(replaced))
        if message.deleted:
            self._text.remove(number)
        else:
            self._text.put(number, message.content)

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
        if message.space is not None:
            self._in_space.setdefault(message.space, []).append(number)
        if not message.deleted:
            self._text.put(number, message.content)
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

    def messages_after(self, after: str | None, limit: int) -> list[MailMessage]:
        start = (number_of(after) or 0) + 1 if after is not None else 1
        stop = min(self.last_number, start + limit - 1)
        return [self._message(n) for n in range(start, stop + 1) if n in self._messages]

    def space_mail(
        self, space: str, name: str, query: InboxQuery, limit: int, before: str | None
    ) -> list[tuple[MailMessage, Delivery | None]]:
        numbers = self._in_space.get(space, [])
        end = len(numbers)
        if before is not None:
            bound = number_of(before)
            end = bisect.bisect_left(numbers, bound) if bound is not None else 0
        page: list[tuple[MailMessage, Delivery | None]] = []
        for number in reversed(numbers[:end]):
            if len(page) >= limit:
                break
            delivery = self._deliveries[number].get(name)
            if (query.unread_only or query.mentions_only) and delivery is None:
                continue
            if query.unread_only and delivery is not None and delivery.state == "read":
                continue
            if query.mentions_only and delivery is not None and not delivery.mentioned:
                continue
            if self._priority[number] < query.priority_min:
                continue
            message = self._message(number)
            if _matches(message, query):
                copy = msgspec.structs.replace(delivery) if delivery is not None else None
                page.append((message, copy))
        return page

    def versions(self, msg_id: str) -> list[MessageVersion]:
        number = number_of(msg_id)
        found = self._versions.get(number, []) if number is not None else []
        return [_decode_version(v) for v in found]

    def search(
        self,
        name: str,
        words: Sequence[str],
        readable_spaces: Sequence[str],
        only_spaces: Sequence[str] | None,
        limit: int,
    ) -> list[MailMessage]:
        readable = set(self._received.get(name, ()))
        readable.update(self._written.get(name, ()))
        for space in readable_spaces:
            readable.update(self._in_space.get(space, ()))
        if only_spaces is not None:
            for space, numbers in self._in_space.items():
                if space not in only_spaces:
                    readable.difference_update(numbers)
        found = self._text.best(words, limit, among=readable, order=operator.neg)
        return [self._message(n) for n in found]

    def space_list(self) -> list[Space]:
        return [msgspec.structs.replace(self.spaces[n]) for n in sorted(self.spaces)]

    def member_lists(self) -> dict[str, list[SpaceMember]]:
        return {
            space: [msgspec.structs.replace(m) for _, m in sorted(members.items())]
            for space, members in self.members.items()
        }

    def space_counts(self) -> dict[str, int]:
        return {space: len(numbers) for space, numbers in self._in_space.items()}

    def project_list(self) -> list[Project]:
        return [_copy(self.projects[n], Project) for n in sorted(self.projects)]

    def live_locks(
        self, now: datetime, resource: str | None, holder: str | None
    ) -> list[LockHolder]:
        return [
            msgspec.structs.replace(h)
            for name in sorted(self.locks)
            if resource is None or name == resource
            for h in self.locks[name]
            if h.expires_at > now and (holder is None or h.holder == holder)
        ]

    def participants(self) -> list[Participant]:
        # Deep copies (roles, info): the caller's to change.
        return [_stored(p) for _, p in sorted(self.participants_by_name.items())]


def _stored(participant: Participant) -> Participant:
    """What a store keeps of a participant: presence and unread are the post office's."""
    return _copy(msgspec.structs.replace(participant, online=False, unread=0), Participant)


def _copy(value: _R, kind: type[_R]) -> _R:
    """A deep copy of a stored struct (its lists and dicts too): the caller's to change."""
    return msgspec.convert(msgspec.to_builtins(value), kind)


def _by_holder(holders: list[LockHolder]) -> list[LockHolder]:
    """Copies of ``holders``, by holder name."""
    return sorted((msgspec.structs.replace(h) for h in holders), key=lambda h: h.holder)


def _matches(message: MailMessage, query: InboxQuery) -> bool:
    if message.deleted and not query.include_deleted:
        return False
    if query.pinned_only and not message.pinned:
        return False
    if (
        query.only_spaces is not None
        and message.space is not None
        and message.space not in query.only_spaces
    ):
        return False
    if query.thread_id is not None and message.thread_id != query.thread_id:
        return False
    if query.channel is not None and message.channel != query.channel:
        return False
    if query.scope is not None and query.scope not in message.scopes:
        return False
    return query.since is None or message.created_at >= query.since


class IndexedMail:
    """A ``MailStore`` served from a ``MailIndex`` (memory's and jsonl's).

    A subclass says how the store is reached (``_ready``, ``_writing``) and how a
    change is made (``_commit``); every write plans its change on the index
    under ``_writing``, and commits it.
    """

    async def _ready(self) -> MailIndex:
        """The index, once the store is known to be open; a checkpoint."""
        raise NotImplementedError

    def _writing(self) -> contextlib.AbstractAsyncContextManager[MailIndex]:
        """The index, to plan one change on and ``_commit`` it, with no other write between."""
        raise NotImplementedError

    async def _commit(self, change: MailChange) -> None:
        """Make ``change``: apply it to the index (after logging it, for a log). Under
        ``_writing``."""
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

    async def messages_after(self, after: str | None, *, limit: int) -> list[MailMessage]:
        return (await self._ready()).messages_after(after, limit)

    async def space_mail(
        self, space: str, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery | None]]:
        return (await self._ready()).space_mail(space, name, query, limit, before)

    async def versions(self, msg_id: str) -> list[MessageVersion]:
        return (await self._ready()).versions(msg_id)

    async def search(
        self,
        name: str,
        words: Sequence[str],
        *,
        readable_spaces: Sequence[str],
        only_spaces: Sequence[str] | None = None,
        limit: int,
    ) -> list[MailMessage]:
        index = await self._ready()
        return index.search(name, words, readable_spaces, only_spaces, limit)

    async def spaces(self) -> list[Space]:
        return (await self._ready()).space_list()

    async def members(self) -> dict[str, list[SpaceMember]]:
        return (await self._ready()).member_lists()

    async def space_counts(self) -> dict[str, int]:
        return (await self._ready()).space_counts()

    async def projects(self) -> list[Project]:
        return (await self._ready()).project_list()

    async def locks(
        self, now: datetime, *, resource: str | None = None, holder: str | None = None
    ) -> list[LockHolder]:
        return (await self._ready()).live_locks(now, resource, holder)

    # --- writes -------------------------------------------------------------------------

    async def put_participant(self, participant: Participant) -> None:
        async with self._writing():
            await self._commit(PutParticipant(participant=_stored(participant)))

    async def post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        *,
        parent: ParentChange | None = None,
        new_participants: Sequence[Participant] = (),
        from_space: FromSpace | None = None,
    ) -> tuple[MailMessage, bool]:
        async with self._writing() as index:
            if (first := index.repeated(message)) is not None:  # whoever its members are now
                return first, False
            if from_space is not None and message.space is not None:
                members = sorted(index.members.get(message.space, {}))
                message, deliveries = with_members(message, deliveries, members, from_space)
            try:
                change = index.plan_post(message, deliveries, parent, new_participants)
            except (UnicodeEncodeError, TypeError, OverflowError) as exc:
                raise StorageError(f"The message could not be encoded: {exc}.") from exc
            await self._commit(change)
            kept = index.get_message(change.message.msg_id)
        assert kept is not None
        return kept, True

    async def advance(self, changes: Sequence[StateChange]) -> int:
        async with self._writing() as index:
            change = index.plan_advance(changes)
            if change is None:
                return 0
            await self._commit(change)
        return len({(msg_id, name) for msg_id, name, _, _ in change.changes})

    async def mark_read(
        self,
        name: str,
        at: datetime,
        *,
        msg_ids: Sequence[str] | None = None,
        thread_id: str | None = None,
    ) -> list[str]:
        async with self._writing() as index:
            change = index.plan_mark_read(name, at, msg_ids, thread_id)
            if change is None:
                return []
            await self._commit(change)
        return sorted({msg_id for msg_id, _, _, _ in change.changes})

    async def change_message(self, msg_id: str, change: MessageChange) -> MailMessage | None:
        async with self._writing() as index:
            planned = index.plan_change(msg_id, change)
            if planned is None:
                return None
            await self._commit(planned)
            return index.get_message(msg_id)

    async def put_space(self, space: Space) -> None:
        async with self._writing():
            await self._commit(PutSpace(space=space))

    async def set_member(self, space: str, name: str, at: datetime, *, member: bool) -> bool:
        async with self._writing() as index:
            change = index.plan_member(space, name, at, member)
            if change is None:
                return False
            await self._commit(change)
        return True

    async def put_project(self, project: Project) -> None:
        async with self._writing():
            await self._commit(PutProject(project=project))

    async def delete_project(self, name: str) -> bool:
        async with self._writing() as index:
            if name not in index.projects:
                return False
            await self._commit(DeleteProject(name=name))
        return True

    async def take_lock(self, lock: LockHolder, now: datetime) -> tuple[bool, list[LockHolder]]:
        async with self._writing() as index:
            result, change = index.plan_lock(lock, now)
            if change is not None:
                await self._commit(change)
        return result

    async def release_lock(self, resource: str, holder: str, now: datetime) -> bool:
        async with self._writing() as index:
            held, change = index.plan_unlock(resource, holder, now)
            if change is not None:
                await self._commit(change)
        return held


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

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[MailIndex]:
        yield await self._ready()  # a write makes no checkpoint: nothing comes between

    async def _commit(self, change: MailChange) -> None:
        self.index.apply(change)
