"""The webhooks' outbox: the ``Outbox`` protocol every backend implements, and its values.

The outbox is derived from the mail log, so posting never touches it: each
configured webhook has a cursor (the msg_id of the newest message it has looked
at), and the daemon's task for it reads the mail after its cursor, stores the
deliveries it wants with the cursor moved past them in one write, then sends
them (daemon/_webhooks.py). A delivery stays pending until it is sent, or given
up; one stored twice (the same id) is stored once. Each backend keeps its
outbox beside its mail as ``store.outbox`` (storage/_outbox_index.py for memory,
_jsonl_outbox.py, _sqlite_outbox.py, _postgres_outbox.py); one conformance suite
(tests/conformance/test_outbox.py) runs unchanged against every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import msgspec
from chinwag.protocol import WebhookBacklog

from ._mail import number_of


class OutboxDelivery(msgspec.Struct, kw_only=True, frozen=True):
    """One message for one webhook: sent until a try succeeds, or the daemon gives up."""

    id: str  # the `webhook-id` header: the same on every try, across restarts
    webhook: str
    msg_id: str
    body: str  # the JSON posted, fixed when it was enqueued
    enqueued_at: datetime
    next_at: datetime  # when the next try is due
    attempts: int = 0  # tries that failed
    last_error: str | None = None
    failed: bool = False  # given up: never tried again


class Outbox(Protocol):
    """Durable webhook deliveries and the cursors they were read up to.

    Every write is all or nothing and durable when it returns, with the same
    cancellation promise as ``Storage.append``. Times are given in UTC.
    Raises ``StorageError`` when the store fails or is closed.
    """

    async def cursor(self, webhook: str) -> str | None:
        """The msg_id ``webhook`` has looked at the mail up to; None when never set."""
        ...

    async def enqueue(
        self, webhook: str, cursor: str, deliveries: Sequence[OutboxDelivery]
    ) -> None:
        """In one write, store ``deliveries`` (``webhook``'s, pending) and move its cursor
        to ``cursor`` (a msg_id, else ``ValueError``). A delivery whose id is stored already
        is left as it is; a cursor is never moved back (a lower one leaves it where it is)."""
        ...

    async def pending(self, webhook: str, *, limit: int) -> list[OutboxDelivery]:
        """``webhook``'s deliveries neither sent nor given up, the soonest due first (then
        by id), at most ``limit``."""
        ...

    async def delivered(self, id: str) -> None:
        """The delivery was sent: forget it. A no-op for an id not pending."""
        ...

    async def retry(self, id: str, *, attempts: int, next_at: datetime, error: str) -> None:
        """A try failed: record it and when the next one is due. A no-op for an id not
        pending."""
        ...

    async def give_up(self, id: str, *, attempts: int, error: str) -> None:
        """Never try it again; it is kept, and counted as failed. A no-op for an id not
        pending."""
        ...

    async def backlog(self) -> dict[str, WebhookBacklog]:
        """Every webhook with deliveries pending or given up, and how many."""
        ...


def check_cursor(cursor: str) -> None:
    """Raise ``ValueError`` for a cursor that is no msg_id."""
    if number_of(cursor) is None:
        raise ValueError(f"A webhook's cursor must be a msg_id, not {cursor!r}.")
