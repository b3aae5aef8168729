"""The outbox held in dicts: ``OutboxIndex``, the ``OutboxChange`` writes that move it, and
``IndexedOutbox``, the ``Outbox`` served from one (the memory backend's ``MemoryOutbox``,
and the jsonl backend's, which replays its log into one).

Every write is an ``OutboxChange`` encoded as JSON and applied as decoded, by
both backends: what the memory backend returns is what the jsonl backend
returns after a reopen, and a change that cannot be encoded stores nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import msgspec
import trio
from chinwag.protocol import WebhookBacklog

from ._errors import StorageError
from ._outbox import OutboxDelivery, check_cursor
from ._timestamps import utc


class EnqueueChange(msgspec.Struct, tag="enqueue", kw_only=True):
    webhook: str
    cursor: str
    deliveries: list[OutboxDelivery]


class DeliveredChange(msgspec.Struct, tag="delivered", kw_only=True):
    id: str


class RetryChange(msgspec.Struct, tag="retry", kw_only=True):
    id: str
    attempts: int
    next_at: datetime
    error: str


class GiveUpChange(msgspec.Struct, tag="give_up", kw_only=True):
    id: str
    attempts: int
    error: str


OutboxChange = EnqueueChange | DeliveredChange | RetryChange | GiveUpChange

_encoder = msgspec.json.Encoder()
decode_change = msgspec.json.Decoder(OutboxChange).decode


def encode_change(change: OutboxChange) -> bytes:
    """``change`` as one JSON line; ``StorageError`` when it cannot be encoded."""
    try:
        return _encoder.encode(change) + b"\n"
    except (UnicodeEncodeError, TypeError, OverflowError) as exc:
        raise StorageError(f"The outbox change could not be encoded: {exc}.") from exc


def _in_utc(delivery: OutboxDelivery) -> OutboxDelivery:
    """``delivery`` with its times in UTC, as every backend gives them back."""
    return msgspec.structs.replace(
        delivery, enqueued_at=utc(delivery.enqueued_at), next_at=utc(delivery.next_at)
    )


def _moved(current: str | None, cursor: str) -> str:
    """The cursor after moving ``current`` to ``cursor``: never back."""
    return cursor if current is None or cursor > current else current


def _due_order(delivery: OutboxDelivery) -> tuple[datetime, str]:
    return delivery.next_at, delivery.id


def _backlog_of(deliveries: Sequence[OutboxDelivery]) -> dict[str, WebhookBacklog]:
    """What ``Outbox.backlog`` answers, counted over every stored delivery."""
    counts: dict[str, WebhookBacklog] = {}
    for delivery in deliveries:
        backlog = counts.setdefault(delivery.webhook, WebhookBacklog(name=delivery.webhook))
        if delivery.failed:
            backlog.failed += 1
        else:
            backlog.pending += 1
            backlog.retrying += delivery.attempts > 0
    return counts


class OutboxIndex:
    """Every webhook's cursor and every delivery not yet sent, by id."""

    def __init__(self) -> None:
        self.cursors: dict[str, str] = {}
        self.deliveries: dict[str, OutboxDelivery] = {}

    def apply(self, change: OutboxChange) -> None:
        match change:
            case EnqueueChange(webhook=webhook, cursor=cursor, deliveries=deliveries):
                for delivery in deliveries:
                    self.deliveries.setdefault(delivery.id, delivery)
                self.cursors[webhook] = _moved(self.cursors.get(webhook), cursor)
            case DeliveredChange(id=id):
                if self.pending_one(id) is not None:
                    del self.deliveries[id]
            case RetryChange(id=id, attempts=attempts, next_at=next_at, error=error):
                if (tried := self.pending_one(id)) is not None:
                    self.deliveries[id] = msgspec.structs.replace(
                        tried, attempts=attempts, next_at=next_at, last_error=error
                    )
            case GiveUpChange(id=id, attempts=attempts, error=error):
                if (tried := self.pending_one(id)) is not None:
                    self.deliveries[id] = msgspec.structs.replace(
                        tried, attempts=attempts, last_error=error, failed=True
                    )

    def pending_one(self, id: str) -> OutboxDelivery | None:
        delivery = self.deliveries.get(id)
        return None if delivery is None or delivery.failed else delivery


class IndexedOutbox:
    """An ``Outbox`` served from an ``OutboxIndex``; each backend says how a change is kept."""

    index: OutboxIndex

    async def _ready(self) -> OutboxIndex:
        """The index, to read; raises ``StorageError`` when the store is closed."""
        raise NotImplementedError

    async def _commit(self, change: OutboxChange) -> None:
        """Keep ``change`` durably, then apply it to the index as decoded. Not cancellable
        once under way (as ``Storage.append``)."""
        raise NotImplementedError

    async def cursor(self, webhook: str) -> str | None:
        return (await self._ready()).cursors.get(webhook)

    async def enqueue(
        self, webhook: str, cursor: str, deliveries: Sequence[OutboxDelivery]
    ) -> None:
        check_cursor(cursor)
        stored = [_in_utc(delivery) for delivery in deliveries]  # a naive time fails here
        await self._commit(EnqueueChange(webhook=webhook, cursor=cursor, deliveries=stored))

    async def pending(self, webhook: str, *, limit: int) -> list[OutboxDelivery]:
        index = await self._ready()
        waiting = [d for d in index.deliveries.values() if d.webhook == webhook and not d.failed]
        return sorted(waiting, key=_due_order)[: max(limit, 0)]

    async def delivered(self, id: str) -> None:
        if (await self._ready()).pending_one(id) is not None:
            await self._commit(DeliveredChange(id=id))

    async def retry(self, id: str, *, attempts: int, next_at: datetime, error: str) -> None:
        if (await self._ready()).pending_one(id) is not None:
            change = RetryChange(id=id, attempts=attempts, next_at=utc(next_at), error=error)
            await self._commit(change)

    async def give_up(self, id: str, *, attempts: int, error: str) -> None:
        if (await self._ready()).pending_one(id) is not None:
            await self._commit(GiveUpChange(id=id, attempts=attempts, error=error))

    async def backlog(self) -> dict[str, WebhookBacklog]:
        return _backlog_of(list((await self._ready()).deliveries.values()))


class MemoryOutbox(IndexedOutbox):
    """The memory backend's ``Outbox``: an index, gone with the process."""

    def __init__(self, closed: Callable[[], bool]) -> None:
        self.index = OutboxIndex()
        self._closed = closed

    async def _ready(self) -> OutboxIndex:
        await trio.lowlevel.checkpoint()
        if self._closed():
            raise StorageError("The store is closed.")
        return self.index

    async def _commit(self, change: OutboxChange) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()
        if self._closed():
            raise StorageError("The store is closed.")
        self.index.apply(decode_change(encode_change(change)))
