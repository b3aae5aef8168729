"""The postgres backend's ``Outbox``: two tables beside the mail's (migration 5).

It runs on ``PostgresStorage``'s pool and threads (its ``_run``), each write one
transaction. ``webhook_cursors`` holds each webhook's cursor, moved only forward
(``GREATEST``), so daemons sharing the database that run the same webhook never
move it back; ``webhook_outbox`` one row per delivery not yet sent, keyed by its
id (``ON CONFLICT DO NOTHING``: such daemons enqueue each delivery once), with a
partial index of the pending ones in the order they fall due. Two such daemons
may both send a delivery that falls due: receivers de-duplicate by its id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import psycopg
from chinwag.protocol import WebhookBacklog

from ._outbox import OutboxDelivery, check_cursor
from ._timestamps import utc

_T = TypeVar("_T")


class _Run(Protocol):
    """``PostgresStorage._run``: ``fn`` on a pooled connection in a worker thread."""

    async def __call__(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T: ...


OUTBOX_MIGRATION: tuple[str, ...] = (
    """
    CREATE TABLE webhook_cursors (
        webhook text PRIMARY KEY,
        cursor text COLLATE "C" NOT NULL
    )
    """,
    """
    CREATE TABLE webhook_outbox (
        id text COLLATE "C" PRIMARY KEY,
        webhook text NOT NULL,
        msg_id text NOT NULL,
        body text NOT NULL,
        enqueued_at timestamptz NOT NULL,
        next_at timestamptz NOT NULL,
        attempts integer NOT NULL,
        last_error text,
        failed boolean NOT NULL
    )
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
        enqueued_at=utc(enqueued_at),
        next_at=utc(next_at),
        attempts=attempts,
        last_error=last_error,
        failed=failed,
    )


class PostgresOutbox:
    """An ``Outbox`` on ``PostgresStorage``'s pool: its ``_run``."""

    def __init__(self, run: _Run) -> None:
        self._run = run

    async def cursor(self, webhook: str) -> str | None:
        row = await self._run(
            "Reading a webhook's cursor",
            lambda conn: conn.execute(
                "SELECT cursor FROM webhook_cursors WHERE webhook = %s", (webhook,)
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
                utc(d.enqueued_at),
                utc(d.next_at),
                d.attempts,
                d.last_error,
                d.failed,
            )
            for d in deliveries
        ]

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO webhook_outbox ({_COLUMNS})"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                    rows,
                )
                cur.execute(
                    "INSERT INTO webhook_cursors (webhook, cursor) VALUES (%s, %s)"
                    " ON CONFLICT (webhook) DO UPDATE"
                    " SET cursor = GREATEST(webhook_cursors.cursor, excluded.cursor)",
                    (webhook, cursor),
                )

        await self._run("Enqueueing webhook deliveries", write)

    async def pending(self, webhook: str, *, limit: int) -> list[OutboxDelivery]:
        rows = await self._run(
            "Reading webhook deliveries",
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM webhook_outbox WHERE webhook = %s AND NOT failed"
                " ORDER BY next_at, id LIMIT %s",
                (webhook, max(limit, 0)),
            ).fetchall(),
        )
        return [_delivery(row) for row in rows]

    async def _change(self, what: str, statement: str, params: tuple[Any, ...]) -> None:
        await self._run(what, lambda conn: conn.execute(statement, params))

    async def delivered(self, id: str) -> None:
        await self._change(
            "Marking a webhook delivery sent",
            "DELETE FROM webhook_outbox WHERE id = %s AND NOT failed",
            (id,),
        )

    async def retry(self, id: str, *, attempts: int, next_at: datetime, error: str) -> None:
        await self._change(
            "Rescheduling a webhook delivery",
            "UPDATE webhook_outbox SET attempts = %s, next_at = %s, last_error = %s"
            " WHERE id = %s AND NOT failed",
            (attempts, utc(next_at), error, id),
        )

    async def give_up(self, id: str, *, attempts: int, error: str) -> None:
        await self._change(
            "Giving up a webhook delivery",
            "UPDATE webhook_outbox SET attempts = %s, last_error = %s, failed = true"
            " WHERE id = %s AND NOT failed",
            (attempts, error, id),
        )

    async def backlog(self) -> dict[str, WebhookBacklog]:
        rows = await self._run(
            "Counting webhook deliveries",
            lambda conn: conn.execute(
                "SELECT webhook, count(*) FILTER (WHERE NOT failed),"
                " count(*) FILTER (WHERE NOT failed AND attempts > 0),"
                " count(*) FILTER (WHERE failed)"
                " FROM webhook_outbox GROUP BY webhook ORDER BY webhook"
            ).fetchall(),
        )
        return {
            webhook: WebhookBacklog(name=webhook, pending=pending, retrying=retrying, failed=failed)
            for webhook, pending, retrying, failed in rows
        }
