"""The Outbox conformance suite: every backend's ``store.outbox`` passes it unchanged.

The contract is the docstrings of storage/_outbox.py. ``store`` is parametrized over
the backends in conftest.py; a test that needs durability (``reopen``) skips on a
backend that keeps nothing once closed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from chinwag.protocol import WebhookBacklog
from chinwag.storage import OutboxDelivery, Storage, StorageError, msg_id_of, open_store
from structlog.testing import capture_logs
from test_mail import STORE_CLOSED, Reopen

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
MANY = 1000


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def delivery(
    number: int, webhook: str = "ops", *, due: float = 0, body: str = '{"type":"mail.dm"}'
) -> OutboxDelivery:
    msg_id = msg_id_of(number)
    return OutboxDelivery(
        id=f"{webhook}-{msg_id}",
        webhook=webhook,
        msg_id=msg_id,
        body=body,
        enqueued_at=T0,
        next_at=at(due),
    )


async def pending_ids(store: Storage, webhook: str = "ops") -> list[str]:
    return [d.id for d in await store.outbox.pending(webhook, limit=MANY)]


# --- cursors ---------------------------------------------------------------------------


async def test_a_webhook_never_seen_has_no_cursor(store: Storage) -> None:
    assert await store.outbox.cursor("ops") is None


async def test_enqueue_moves_the_cursor_forward_only(store: Storage) -> None:
    await store.outbox.enqueue("ops", msg_id_of(0), [])
    assert await store.outbox.cursor("ops") == msg_id_of(0)
    await store.outbox.enqueue("ops", msg_id_of(12), [])
    assert await store.outbox.cursor("ops") == msg_id_of(12)
    await store.outbox.enqueue("ops", msg_id_of(9), [delivery(9)])  # lower: kept where it is
    assert await store.outbox.cursor("ops") == msg_id_of(12)
    assert await pending_ids(store) == ["ops-m000000000009"]  # the deliveries still stored
    await store.outbox.enqueue("ops", msg_id_of(100), [])
    assert await store.outbox.cursor("ops") == msg_id_of(100)  # by number, not by length
    assert await store.outbox.cursor("audit") is None  # each webhook has its own


async def test_a_cursor_that_is_no_msg_id_is_refused_storing_nothing(store: Storage) -> None:
    for bad in ["", "m12", "42", "m00000000001x"]:
        with pytest.raises(ValueError, match="msg_id"):
            await store.outbox.enqueue("ops", bad, [delivery(1)])
    assert await store.outbox.cursor("ops") is None
    assert await pending_ids(store) == []


# --- deliveries ------------------------------------------------------------------------


async def test_enqueued_deliveries_come_back_as_given_soonest_due_first(store: Storage) -> None:
    late, soon, tie_b, tie_a = delivery(1, due=60), delivery(2, due=5), delivery(4), delivery(3)
    await store.outbox.enqueue("ops", msg_id_of(4), [late, soon, tie_b, tie_a])
    await store.outbox.enqueue("audit", msg_id_of(4), [delivery(1, "audit")])

    pending = await store.outbox.pending("ops", limit=MANY)
    assert pending == [tie_a, tie_b, soon, late]  # due first, then by id; every field kept
    assert [d.id for d in await store.outbox.pending("ops", limit=2)] == [tie_a.id, tie_b.id]
    assert await store.outbox.pending("ops", limit=0) == []
    assert await pending_ids(store, "audit") == ["audit-m000000000001"]
    assert await pending_ids(store, "nobody") == []


async def test_times_come_back_in_utc(store: Storage) -> None:
    plus_two = timezone(timedelta(hours=2))
    given = delivery(1)
    given = OutboxDelivery(
        **{
            **{f: getattr(given, f) for f in given.__struct_fields__},
            "enqueued_at": T0.astimezone(plus_two),
            "next_at": at(5).astimezone(plus_two),
        }
    )
    await store.outbox.enqueue("ops", msg_id_of(1), [given])
    await store.outbox.retry(given.id, attempts=1, next_at=at(30).astimezone(plus_two), error="x")
    (stored,) = await store.outbox.pending("ops", limit=MANY)
    assert stored.enqueued_at == T0 and stored.enqueued_at.utcoffset() == timedelta(0)
    assert stored.next_at == at(30) and stored.next_at.utcoffset() == timedelta(0)


async def test_a_naive_time_is_refused_storing_nothing(store: Storage) -> None:
    naive = OutboxDelivery(
        id="ops-naive",
        webhook="ops",
        msg_id=msg_id_of(1),
        body="{}",
        enqueued_at=datetime(2024, 5, 1, 12, 0),
        next_at=T0,
    )
    with pytest.raises(ValueError, match="naive"):
        await store.outbox.enqueue("ops", msg_id_of(2), [delivery(1), naive])
    assert await store.outbox.cursor("ops") is None
    assert await pending_ids(store) == []


async def test_a_body_that_cannot_be_stored_stores_nothing(store: Storage) -> None:
    broken = delivery(2, body="\ud800")  # a lone surrogate: a str, but no UTF-8
    with pytest.raises(StorageError, match="surrogates not allowed"):
        await store.outbox.enqueue("ops", msg_id_of(2), [delivery(1), broken])
    assert await store.outbox.cursor("ops") is None
    assert await pending_ids(store) == []


async def test_a_delivery_enqueued_again_is_left_as_it_is(store: Storage) -> None:
    first = delivery(1)
    await store.outbox.enqueue("ops", msg_id_of(1), [first])
    await store.outbox.retry(first.id, attempts=2, next_at=at(40), error="HTTP 500")
    await store.outbox.enqueue("ops", msg_id_of(1), [delivery(1, body='{"again":true}')])
    (stored,) = await store.outbox.pending("ops", limit=MANY)
    assert (stored.body, stored.attempts, stored.next_at) == (first.body, 2, at(40))


async def test_delivered_forgets_the_delivery(store: Storage) -> None:
    await store.outbox.enqueue("ops", msg_id_of(2), [delivery(1), delivery(2)])
    await store.outbox.delivered("ops-m000000000001")
    assert await pending_ids(store) == ["ops-m000000000002"]
    await store.outbox.delivered("ops-m000000000001")  # already sent: a no-op
    await store.outbox.delivered("no-such-id")
    assert await pending_ids(store) == ["ops-m000000000002"]
    assert await store.outbox.backlog() == {"ops": WebhookBacklog(name="ops", pending=1)}


async def test_a_retry_records_the_failure_and_reorders(store: Storage) -> None:
    await store.outbox.enqueue("ops", msg_id_of(2), [delivery(1), delivery(2, due=10)])
    await store.outbox.retry("ops-m000000000001", attempts=1, next_at=at(20), error="refused")
    first, second = await store.outbox.pending("ops", limit=MANY)
    assert first.id == "ops-m000000000002" and first.attempts == 0
    assert (second.id, second.attempts, second.next_at, second.last_error) == (
        "ops-m000000000001",
        1,
        at(20),
        "refused",
    )
    await store.outbox.retry("no-such-id", attempts=1, next_at=at(1), error="x")  # a no-op
    assert await pending_ids(store) == ["ops-m000000000002", "ops-m000000000001"]


async def test_given_up_deliveries_are_kept_out_of_pending_and_counted(store: Storage) -> None:
    await store.outbox.enqueue("ops", msg_id_of(3), [delivery(1), delivery(2), delivery(3)])
    await store.outbox.retry("ops-m000000000002", attempts=1, next_at=at(5), error="HTTP 503")
    await store.outbox.give_up("ops-m000000000003", attempts=30, error="timed out")
    assert await pending_ids(store) == ["ops-m000000000001", "ops-m000000000002"]
    expected = WebhookBacklog(name="ops", pending=2, retrying=1, failed=1)
    assert await store.outbox.backlog() == {"ops": expected}

    # A delivery given up is never tried again: nothing moves it.
    await store.outbox.retry("ops-m000000000003", attempts=31, next_at=at(1), error="x")
    await store.outbox.delivered("ops-m000000000003")
    await store.outbox.give_up("ops-m000000000003", attempts=32, error="y")
    assert await store.outbox.backlog() == {"ops": expected}
    # Nor is it stored again.
    await store.outbox.enqueue("ops", msg_id_of(3), [delivery(3)])
    assert await pending_ids(store) == ["ops-m000000000001", "ops-m000000000002"]


async def test_backlog_counts_each_webhook(store: Storage) -> None:
    assert await store.outbox.backlog() == {}
    await store.outbox.enqueue("ops", msg_id_of(2), [delivery(1), delivery(2)])
    await store.outbox.enqueue("audit", msg_id_of(2), [delivery(2, "audit")])
    await store.outbox.give_up("audit-m000000000002", attempts=3, error="HTTP 410")
    assert await store.outbox.backlog() == {
        "ops": WebhookBacklog(name="ops", pending=2),
        "audit": WebhookBacklog(name="audit", failed=1),
    }
    await store.outbox.delivered("ops-m000000000001")
    await store.outbox.delivered("ops-m000000000002")
    assert await store.outbox.backlog() == {"audit": WebhookBacklog(name="audit", failed=1)}


# --- durability and lifetime -----------------------------------------------------------


async def test_everything_survives_a_reopen(store: Storage, reopen: Reopen) -> None:
    await store.outbox.enqueue("ops", msg_id_of(3), [delivery(1), delivery(2), delivery(3)])
    await store.outbox.delivered("ops-m000000000001")
    await store.outbox.retry("ops-m000000000002", attempts=4, next_at=at(90), error="HTTP 502")
    await store.outbox.give_up("ops-m000000000003", attempts=30, error="refused")
    before = await store.outbox.pending("ops", limit=MANY)

    store = await reopen(store)
    assert await store.outbox.cursor("ops") == msg_id_of(3)
    assert await store.outbox.pending("ops", limit=MANY) == before
    assert before[0].last_error == "HTTP 502"
    assert await store.outbox.backlog() == {
        "ops": WebhookBacklog(name="ops", pending=1, retrying=1, failed=1)
    }


async def test_a_closed_store_refuses_every_call(store: Storage) -> None:
    await store.close()
    calls = [
        store.outbox.cursor("ops"),
        store.outbox.enqueue("ops", msg_id_of(1), [delivery(1)]),
        store.outbox.pending("ops", limit=MANY),
        store.outbox.delivered("ops-m000000000001"),
        store.outbox.retry("ops-m000000000001", attempts=1, next_at=T0, error="x"),
        store.outbox.give_up("ops-m000000000001", attempts=1, error="x"),
        store.outbox.backlog(),
    ]
    for call in calls:
        with pytest.raises(StorageError, match=STORE_CLOSED):
            await call


async def test_cancelled_enqueues_are_whole_or_absent(store: Storage) -> None:
    returned: list[int] = []

    async def writer(n: int) -> None:
        pair = [delivery(2 * n + 1), delivery(2 * n + 2)]
        await store.outbox.enqueue(f"hook{n}", msg_id_of(2 * n + 2), pair)
        returned.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(writer, n)
        for _ in range(3):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()  # lands wherever each enqueue is

    stored = [n for n in range(20) if await store.outbox.cursor(f"hook{n}") is not None]
    assert sorted(returned) == stored, "stored, yet not returned"
    ids = await pending_ids(store)
    assert ids == sorted(delivery(k).id for n in stored for k in (2 * n + 1, 2 * n + 2))


async def test_jsonl_drops_a_torn_last_line_of_its_outbox(store_url: str) -> None:
    if not store_url.startswith("jsonl:"):
        pytest.skip("the jsonl backend's own file")
    async with open_store(store_url) as store:
        await store.outbox.enqueue("ops", msg_id_of(2), [delivery(1), delivery(2)])
        await store.outbox.delivered("ops-m000000000001")
    path = Path(store_url.removeprefix("jsonl:///")) / "outbox.jsonl"
    good = path.read_bytes()
    with path.open("ab") as file:
        file.write(b'{"type":"delivered","id":"ops-m0000')  # a crash mid-write

    with capture_logs() as logs:
        async with open_store(store_url) as store:
            assert await pending_ids(store) == ["ops-m000000000002"]
            assert await store.outbox.cursor("ops") == msg_id_of(2)
    (event,) = [e for e in logs if e["event"] == "torn_line_dropped"]
    assert event["file"] == str(path) and event["line"] == 3
    assert path.read_bytes() == good
