"""The sqlite backend's ``Outbox``: two tables in the store's file (migration 5).

It runs on ``SqliteStorage``'s connections as its mail does: each write is a
function of the write connection, committed as one transaction (durable and
shielded once called), each read a function of a read connection in a worker
thread. ``webhook_cursors`` holds each webhook's cursor; ``webhook_outbox`` one
row per delivery not yet sent, keyed by its id (so one enqueued twice is stored
once), its times as ``to_text`` (text order is time order), with a partial
index of the pending ones in the order they fall due.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from chinwag.protocol import WebhookBacklog

from ._outbox import OutboxDelivery, check_cursor
from ._timestamps import from_text, to_text

_T = TypeVar("_T")


class _Run(Protocol):
    """``SqliteStorage``'s ``_write_call`` or ``_read``: ``fn`` on one of its connections."""

    async def __call__(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T: ...


OUTBOX_MIGRATION: tuple[str, ...] = (
    """
    CREATE TABLE webhook_cursors (
        webhook TEXT PRIMARY KEY,
        cursor TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE webhook_outbox (
        id TEXT PRIMARY KEY,
        webhook TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        body TEXT NOT NULL,
        enqueued_at TEXT NOT NULL,
        next_at TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT,
        failed INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX webhook_outbox_due ON webhook_outbox (webhook, next_at, id) WHERE NOT failed",
)

_COLUMNS = "id, webhook, msg_id, body, enqueued_at, next_at, attempts, last_error, failed"


def _delivery(row: Sequence[Any]) -> OutboxDelivery:
    id, webhook, msg_id, body, enqueued_at, next_at, attempts, last_error, failed = row
    return OutboxDelivery(
        id=id,
        webhook=webhook,
        msg_id=msg_id,
        body=body,
        enqueued_at=from_text(enqueued_at),
        next_at=from_text(next_at),
        attempts=attempts,
        last_error=last_error,
        failed=bool(failed),
    )


class SqliteOutbox:
    """An ``Outbox`` on ``SqliteStorage``'s connections: its ``_write_call`` and ``_read``."""

    def __init__(self, write: _Run, read: _Run) -> None:
        self._write = write
        self._read = read

    async def cursor(self, webhook: str) -> str | None:
        row = await self._read(
            "Reading a webhook's cursor",
            lambda conn: conn.execute(
                "SELECT cursor FROM webhook_cursors WHERE webhook = ?", (webhook,)
            ).fetchone(),
        )
        return None if row is None else str(row[0])

    async def enqueue(
        self, webhook: str, cursor: str, deliveries: Sequence[OutboxDelivery]
    ) -> None:
        check_cursor(cursor)
        rows = [
            (
                d.id,
                d.webhook,
                d.msg_id,
                d.body,
                to_text(d.enqueued_at),
                to_text(d.next_at),
                d.attempts,
                d.last_error,
                d.failed,
            )
            for d in deliveries
        ]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"INSERT INTO webhook_outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                rows,
            )
            conn.execute(
                "INSERT INTO webhook_cursors (webhook, cursor) VALUES (?, ?)"
                " ON CONFLICT (webhook) DO UPDATE SET cursor = max(cursor, excluded.cursor)",
                (webhook, cursor),
            )

        await self._write("Enqueueing webhook deliveries", write)

    async def pending(self, webhook: str, *, limit: int) -> list[OutboxDelivery]:
        rows = await self._read(
            "Reading webhook deliveries",
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM webhook_outbox WHERE webhook = ? AND NOT failed"
                " ORDER BY next_at, id LIMIT ?",
                (webhook, max(limit, 0)),
            ).fetchall(),
        )
        return [_delivery(row) for row in rows]

    async def _change(self, what: str, statement: str, params: tuple[Any, ...]) -> None:
        # Closed in the write: a cursor handed back to the loop and finalized there would
        # touch the connection while the writer thread uses it (as the mail's writes say).
        await self._write(what, lambda conn: conn.execute(statement, params).close())

    async def delivered(self, id: str) -> None:
        await self._change(
            "Marking a webhook delivery sent",
            "DELETE FROM webhook_outbox WHERE id = ? AND NOT failed",
            (id,),
        )

    async def retry(self, id: str, *, attempts: int, next_at: datetime, error: str) -> None:
        await self._change(
            "Rescheduling a webhook delivery",
            "UPDATE webhook_outbox SET attempts = ?, next_at = ?, last_error = ?"
            " WHERE id = ? AND NOT failed",
            (attempts, to_text(next_at), error, id),
        )

    async def give_up(self, id: str, *, attempts: int, error: str) -> None:
        await self._change(
            "Giving up a webhook delivery",
            "UPDATE webhook_outbox SET attempts = ?, last_error = ?, failed = 1"
            " WHERE id = ? AND NOT failed",
            (attempts, error, id),
        )

    async def backlog(self) -> dict[str, WebhookBacklog]:
        rows = await self._read(
            "Counting webhook deliveries",
            lambda conn: conn.execute(
                "SELECT webhook, sum(NOT failed), sum(NOT failed AND attempts > 0), sum(failed)"
                " FROM webhook_outbox GROUP BY webhook ORDER BY webhook"
            ).fetchall(),
        )
        return {
            webhook: WebhookBacklog(name=webhook, pending=pending, retrying=retrying, failed=failed)
            for webhook, pending, retrying, failed in rows
        }
