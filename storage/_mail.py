"""The MailStore protocol every backend implements beside ``Storage``, and its values.

The post office (daemon/) decides everything about a message (who receives it,
its thread, which deliveries start `delivered`); a store only keeps it, numbers
it, and answers reads. Each backend's ``Storage`` carries its ``MailStore`` as
``store.mail``, sharing its connection, files and durability. One conformance
suite (tests/conformance/test_mail.py) runs unchanged against every backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple, Protocol

import msgspec
from chinwag.protocol import (
    DELIVERY_ORDER,
    Delivery,
    DeliveryState,
    MailMessage,
    Participant,
    Ref,
)

_MSG_ID = re.compile(r"m(\d{12})")


def msg_id_of(number: int) -> str:
    """The msg_id of the store's ``number``-th message: fixed width, so it sorts as it counts."""
    return f"m{number:012d}"


def number_of(msg_id: str) -> int | None:
    """The inverse of ``msg_id_of``; None for a text that is no msg_id."""
    match = _MSG_ID.fullmatch(msg_id)
    return int(match.group(1)) if match else None


class InboxQuery(msgspec.Struct, kw_only=True, frozen=True):
    """The filters of an `inbox` read; every one given must hold (an AND)."""

    unread_only: bool = False  # state is not `read`
    mentions_only: bool = False  # the delivery is ``mentioned``
    thread_id: str | None = None
    channel: str | None = None
    scope: Ref | None = None  # among the message's scopes
    priority_min: int = 0
    since: datetime | None = None  # created at or after


class ParentChange(msgspec.Struct, kw_only=True, frozen=True):
    """What a reply changes on the message it answers, in the reply's own write."""

    msg_id: str
    start_thread: bool = False  # the parent had no thread: its thread_id becomes its msg_id
    read_by: str | None = None  # the replier's delivery of the parent becomes `read`
    answered: bool = False  # the reply is a hosted agent's answer: set the parent's
    # ``answered_by`` to the reply's msg_id and its ``run_id`` to the reply's


class StateChange(NamedTuple):
    """Move ``name``'s delivery of ``msg_id`` forward to ``state``, at ``at``."""

    msg_id: str
    name: str
    state: DeliveryState
    at: datetime


class MailStore(Protocol):
    """Durable home of participants, messages and per-recipient deliveries.

    Every write is all or nothing and durable when it returns, with the same
    cancellation promise as ``Storage.append``. Returned values are the
    caller's: changing them changes nothing stored. Times are given in UTC.
    Raises ``StorageError`` when the store fails or is closed.
    """

    async def put_participant(self, participant: Participant) -> None:
        """Create or replace the participant of that name (``online`` and ``unread`` are not
        stored: they read back False and 0)."""
        ...

    async def participants(self) -> list[Participant]:
        """Every stored participant, by name."""
        ...

    async def post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        *,
        parent: ParentChange | None = None,
        new_participants: Sequence[Participant] = (),
    ) -> tuple[MailMessage, bool]:
        """Store one message with one delivery per recipient, numbered after every other.

        The store sets ``msg_id`` (``msg_id_of`` the next number; whatever it held is
        ignored) and keeps every other field as given. ``parent`` is applied and
        ``new_participants`` put in the same write (a participant already stored is
        left as it is). Returns the stored message and True. When the message has an
        ``idempotency_key`` that the same ``sender`` used before, nothing is stored
        and the first message comes back with False.
        """
        ...

    async def get_message(self, msg_id: str) -> MailMessage | None:
        """The stored message, or None (also for a text that is no msg_id)."""
        ...

    async def deliveries(self, msg_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """Each message's deliveries, by recipient name; a msg_id not stored is left out."""
        ...

    async def advance(self, changes: Sequence[StateChange]) -> None:
        """Move deliveries forward, in one write: to `delivered` (sets ``delivered_at``) or
        to `read` (sets ``read_at``, and ``delivered_at`` when it had none). A change to the
        state a delivery has or one behind it, or to a delivery that does not exist, is
        left out: a state never goes back and its time is never rewritten."""
        ...

    async def mark_read(
        self,
        name: str,
        at: datetime,
        *,
        msg_ids: Sequence[str] | None = None,
        thread_id: str | None = None,
    ) -> int:
        """Mark ``name``'s deliveries that are not `read` as `read`: of ``msg_ids``, of the
        thread, or (neither given) all of them. Returns how many moved."""
        ...

    async def inbox(
        self, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery]]:
        """``name``'s received messages matching ``query``, newest first, with msg_id below
        ``before`` when given; at most ``limit``."""
        ...

    async def received(
        self, name: str, *, after: str | None, limit: int, pending_only: bool = False
    ) -> list[tuple[MailMessage, Delivery]]:
        """``name``'s received messages with msg_id above ``after`` (all when None), oldest
        first, at most ``limit``; with ``pending_only`` only those still `pending`."""
        ...

    async def newest_received(self, name: str) -> str | None:
        """The msg_id of the newest message ``name`` received, or None."""
        ...

    async def unread_counts(self, name: str) -> dict[int, int]:
        """``name``'s messages not `read`, counted by priority (a priority with none is left
        out)."""
        ...

    async def unread_totals(self) -> dict[str, int]:
        """Every name with messages not `read`, and how many."""
        ...

    async def sent(self, name: str, *, limit: int, before: str | None = None) -> list[MailMessage]:
        """The messages ``name`` wrote, newest first, below ``before`` when given."""
        ...

    async def thread(self, thread_id: str) -> list[MailMessage]:
        """Every message of the thread, oldest first (empty for an unknown thread)."""
        ...


def advanced(delivery: Delivery, state: DeliveryState, at: datetime) -> Delivery | None:
    """``delivery`` moved forward to ``state`` at ``at``, or None when that is no move."""
    if DELIVERY_ORDER[state] <= DELIVERY_ORDER[delivery.state]:
        return None
    if state == "read":
        return msgspec.structs.replace(
            delivery, state="read", read_at=at, delivered_at=delivery.delivered_at or at
        )
    return msgspec.structs.replace(delivery, state=state, delivered_at=at)
