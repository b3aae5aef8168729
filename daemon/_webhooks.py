"""Mail webhooks: each `[[webhooks]]` entry is POSTed the mail it asks for, from a durable outbox.

Posting never waits on a webhook, nor even writes for one: the outbox
(storage/_outbox.py) is derived from the mail log. Each webhook has a cursor,
the newest msg_id it has looked at (the newest stored message when the
webhook is first seen: it does not replay history). Its task reads the mail
after the cursor, picks the messages its events and ``to`` ask for, and
enqueues them with the cursor moved past them in one write; then it POSTs
the deliveries that are due. A post wakes every task, and so does another
daemon's on a store they share (the post office hears of it on the bus); each
also looks for their mail every ``SHARED_POLL_S``, for news the bus lost.

A delivery is one message to one webhook: its id (the ``webhook-id`` header)
and its JSON body are fixed when it is enqueued, so every try, before or after
a restart, is the same delivery, and a receiver de-duplicates by the id. A 2xx
answer within ``SEND_TIMEOUT_S`` ends it; anything else is retried after
``FIRST_RETRY_S`` doubling each time up to ``MAX_RETRY_S``, each delay scaled
by a random factor within ``JITTER`` (5 s, 10 s, 20 s ... 1 h, then hourly),
until ``RETRY_FOR`` after it was enqueued, when the daemon gives it up and
logs it. A delivery under way when the daemon stops, or dies, stays pending
and is sent again. With a ``secret``, each try is signed the Standard Webhooks
way (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``: HMAC-SHA256
of ``id.timestamp.body``), by the ``standardwebhooks`` library receivers verify
with.

Time is trio's clock anchored to the wall clock when ``run`` starts, as for
locks: the retry schedule runs under trio's autojump clock in tests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import structlog
import trio
from chinwag.protocol import Delivery, MailMessage, WebhookBacklog
from chinwag.storage import OutboxDelivery, Storage, msg_id_of, number_of
from standardwebhooks import Webhook

from ._config import WebhookConfig, WebhookEvent

log = structlog.get_logger("chinwag.webhooks")

EVENTS: tuple[WebhookEvent, ...] = ("dm", "mention", "space", "critical")
READ_PAGE = 200  # messages read from the mail log at a time
SEND_PAGE = 100  # pending deliveries read at a time
SENDERS = 4  # one webhook's deliveries in flight at once
SEND_TIMEOUT_S = 10.0  # a try that has no answer by then failed
FIRST_RETRY_S = 5.0
MAX_RETRY_S = 3600.0
JITTER = 0.2  # each delay is scaled by a random factor in [1 - JITTER, 1 + JITTER]
RETRY_FOR = timedelta(hours=24)
SHARED_POLL_S = 2.0  # how often another daemon's mail is looked for, on a shared store
GAP_WAIT_S = 30.0  # how long a gap in the msg_ids of a shared store is waited for
STORE_RETRY_S = 30.0  # how long a webhook waits after its store failed
MAX_NUMBER = 10**12 - 1  # the highest number a msg_id holds (msg_id_of: 12 digits)


def matched_events(
    webhook: WebhookConfig, message: MailMessage, deliveries: Sequence[Delivery]
) -> list[WebhookEvent]:
    """The events of ``webhook`` that ``message`` (with its ``deliveries``) is, in
    ``EVENTS`` order; none when ``webhook.to`` is no recipient, or it was deleted.

    dm: a name in `to` (not a role, `@everyone` or a space), in no space; mention: a
    recipient named by `@name` or one of its `@role`s; space: posted to a space;
    critical: priority 3. With ``to``, a dm or mention must name that participant.
    """
    if message.deleted or (webhook.to is not None and webhook.to not in message.recipients):
        return []
    direct = {entry.casefold().removeprefix("@") for entry in message.to}
    direct &= set(message.recipients)  # leaves out roles, `@everyone` and `#space`
    mentioned = {delivery.name for delivery in deliveries if delivery.mentioned}
    if webhook.to is not None:
        direct &= {webhook.to}
        mentioned &= {webhook.to}
    happened = {
        "dm": message.space is None and bool(direct),
        "mention": bool(mentioned),
        "space": message.space is not None,
        "critical": message.priority == 3,
    }
    return [event for event in EVENTS if event in webhook.events and happened[event]]


def payload(events: Sequence[WebhookEvent], message: MailMessage) -> str:
    """The JSON a delivery POSTs, in the Standard Webhooks shape: ``type`` (``mail.`` and
    the first event), ``timestamp`` (the message's) and ``data``: every event it is,
    and the message as `get_message` gives it."""
    body = {
        "type": f"mail.{events[0]}",
        "timestamp": message.created_at,
        "data": {"events": list(events), "message": message},
    }
    return msgspec.json.encode(body).decode()


def retry_delay(attempts: int, rng: random.Random) -> timedelta:
    """How long after its ``attempts``-th failed try a delivery is tried again."""
    base = min(FIRST_RETRY_S * 2 ** min(attempts - 1, 32), MAX_RETRY_S)
    return timedelta(seconds=min(base * rng.uniform(1 - JITTER, 1 + JITTER), MAX_RETRY_S))


def passable(
    cursor: str,
    messages: Sequence[MailMessage],
    gap: tuple[int, float] | None,
    now: float,
    wait: float = GAP_WAIT_S,
) -> tuple[int, tuple[int, float] | None]:
    """How many of ``messages`` (the mail after ``cursor``, oldest first) a reader of a
    shared store's mail in msg_id order (a webhook; the post office's pushes) may pass
    now, and the gap it waits for: ``(the missing number, trio time first seen)``, None
    when none.

    Other daemons' posts take numbers in one order and may commit in another, so a
    missing number may still appear; it is waited for ``wait`` seconds (a post that
    failed leaves a gap for good), then passed.
    """
    expected = (number_of(cursor) or 0) + 1
    for at, message in enumerate(messages):
        number = number_of(message.msg_id) or 0
        if number != expected:
            if gap is None or gap[0] != expected:
                gap = (expected, now)
            if now < gap[1] + wait:
                return at, gap
        expected = number + 1
    return len(messages), None


async def newest_msg_id(storage: Storage) -> str:
    """The msg_id of the newest stored message (``msg_id_of(0)`` when there is none),
    found by bisection in a few dozen reads of one message each."""
    mail = storage.mail

    async def any_above(number: int) -> bool:
        return bool(await mail.messages_after(msg_id_of(number), limit=1))

    if not await any_above(0):
        return msg_id_of(0)
    low, high = 0, 1  # a message above low; then none above high
    while high < MAX_NUMBER and await any_above(high):
        low, high = high, min(2 * high, MAX_NUMBER)
    while high - low > 1:
        middle = (low + high) // 2
        if await any_above(middle):
            low = middle
        else:
            high = middle
    (newest,) = await mail.messages_after(msg_id_of(low), limit=1)
    return newest.msg_id


def _describe(exc: BaseException) -> str:
    """An error as the outbox records it: one short line, no NUL (postgres holds none)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace("\x00", "\ufffd")[:300]


@dataclass(eq=False)
class _Hook:
    """One configured webhook and where its task stands."""

    config: WebhookConfig
    name: str
    signer: Webhook | None
    cursor: str | None = None  # None: not read from the store yet
    woken: trio.Event = field(default_factory=trio.Event)
    gap: tuple[int, float] | None = None  # see ``passable``


class Webhooks:
    """The daemon's webhooks: ``run`` delivers, ``wake`` says mail was posted, ``backlog``
    reports each one's outbox."""

    def __init__(
        self,
        configs: Sequence[WebhookConfig],
        storage: Storage,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``transport`` replaces the network (tests); ``rng`` draws the jitter."""
        self.storage = storage
        self._hooks = [
            _Hook(config, config.id, None if config.secret is None else Webhook(config.secret))
            for config in configs
        ]
        self._transport = transport
        self._rng = rng or random.Random()
        self._backlog: dict[str, WebhookBacklog] = {}
        # The clock's anchor: the wall clock and trio's, both read when ``run`` starts.
        self._wall = datetime.now(UTC)
        self._start = 0.0

    def wake(self) -> None:
        """Mail was posted: every webhook looks at it now."""
        for hook in self._hooks:
            hook.woken.set()

    def backlog(self) -> list[WebhookBacklog]:
        """Each configured webhook's outbox, as last read (zeros before the first read)."""
        return [
            self._backlog.get(hook.name, WebhookBacklog(name=hook.name)) for hook in self._hooks
        ]

    def now(self) -> datetime:
        """The wall clock's time, as trio's clock moves it on from ``run``'s start."""
        return self._wall + timedelta(seconds=trio.current_time() - self._start)

    def _trio_time(self, moment: datetime) -> float:
        return self._start + (moment - self._wall).total_seconds()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver every webhook's mail until cancelled; a failing store or receiver is
        retried, never fatal. Reports started once each webhook knows its cursor, so
        that mail posted from then on reaches it (a cursor the store could not give is
        read again later, from where the store says)."""
        self._wall, self._start = datetime.now(UTC), trio.current_time()
        if not self._hooks:
            task_status.started()
            return
        for hook in self._hooks:
            try:
                await self._find_cursor(hook)
            except Exception as exc:
                log.warning("webhook_outbox_failed", webhook=hook.name, error=_describe(exc))
        async with (
            httpx.AsyncClient(transport=self._transport, timeout=None) as client,
            trio.open_nursery() as nursery,
        ):
            task_status.started()
            for hook in self._hooks:
                nursery.start_soon(self._serve, hook, client)

    async def _find_cursor(self, hook: _Hook) -> str:
        if hook.cursor is None:
            cursor = await self.storage.outbox.cursor(hook.name)
            if cursor is None:  # first seen: from the newest message on
                cursor = await newest_msg_id(self.storage)
                await self.storage.outbox.enqueue(hook.name, cursor, [])
                log.info("webhook_added", webhook=hook.name, cursor=cursor)
            hook.cursor = cursor
        return hook.cursor

    async def _serve(self, hook: _Hook, client: httpx.AsyncClient) -> None:
        while True:
            hook.woken = trio.Event()  # a post from now on wakes the next round
            try:
                wake_at = await self._round(hook, client)
                self._backlog = await self.storage.outbox.backlog()
            except Exception as exc:
                log.warning("webhook_outbox_failed", webhook=hook.name, error=_describe(exc))
                wake_at = trio.current_time() + STORE_RETRY_S
            if self.storage.shared:
                wake_at = min(wake_at, trio.current_time() + SHARED_POLL_S)
            with trio.move_on_at(wake_at):
                await hook.woken.wait()

    async def _round(self, hook: _Hook, client: httpx.AsyncClient) -> float:
        """Enqueue the new mail, send what is due; the trio time to come back at."""
        wake_at = await self._collect(hook)
        return min(wake_at, await self._send_due(hook, client))

    async def _collect(self, hook: _Hook) -> float:
        """Enqueue ``hook``'s deliveries of the mail after its cursor, a page a write;
        the trio time a gap waited for ends (inf when none)."""
        mail = self.storage.mail
        while True:
            cursor = await self._find_cursor(hook)
            messages = await mail.messages_after(cursor, limit=READ_PAGE)
            if self.storage.shared:
                passed, hook.gap = passable(cursor, messages, hook.gap, trio.current_time())
                messages = messages[:passed]
            if not messages:
                return math.inf if hook.gap is None else hook.gap[1] + GAP_WAIT_S
            deliveries: dict[str, list[Delivery]] = {}
            if "mention" in hook.config.events:
                deliveries = await mail.deliveries([m.msg_id for m in messages])
            moment = self.now()
            queued = [
                OutboxDelivery(
                    id=f"{hook.name}.{message.msg_id}",
                    webhook=hook.name,
                    msg_id=message.msg_id,
                    body=payload(events, message),
                    enqueued_at=moment,
                    next_at=moment,
                )
                for message in messages
                if (
                    events := matched_events(
                        hook.config, message, deliveries.get(message.msg_id, [])
                    )
                )
            ]
            cursor = messages[-1].msg_id
            await self.storage.outbox.enqueue(hook.name, cursor, queued)
            hook.cursor = cursor
            if queued:
                log.debug("webhook_enqueued", webhook=hook.name, deliveries=len(queued))

    async def _send_due(self, hook: _Hook, client: httpx.AsyncClient) -> float:
        """Try every delivery of ``hook`` that is due; the trio time the next falls due."""
        limiter = trio.CapacityLimiter(SENDERS)
        while True:
            pending = await self.storage.outbox.pending(hook.name, limit=SEND_PAGE)
            moment = self.now()
            due = [delivery for delivery in pending if delivery.next_at <= moment]
            if not due:
                return self._trio_time(pending[0].next_at) if pending else math.inf
            async with trio.open_nursery() as nursery:
                for delivery in due:
                    nursery.start_soon(self._try, hook, client, delivery, limiter)

    async def _try(
        self,
        hook: _Hook,
        client: httpx.AsyncClient,
        delivery: OutboxDelivery,
        limiter: trio.CapacityLimiter,
    ) -> None:
        """POST ``delivery`` once, and record how it went."""
        async with limiter:
            moment = self.now()
            headers = {
                "content-type": "application/json",
                "webhook-id": delivery.id,
                "webhook-timestamp": str(math.floor(moment.timestamp())),
            }
            if hook.signer is not None:
                headers["webhook-signature"] = hook.signer.sign(delivery.id, moment, delivery.body)
            error = None
            with trio.move_on_after(SEND_TIMEOUT_S) as scope:
                try:
                    response = await client.post(
                        hook.config.url, content=delivery.body.encode(), headers=headers
                    )
                    if not response.is_success:
                        error = f"HTTP {response.status_code}"
                except Exception as exc:  # refused, reset, a bad answer: a failed try
                    error = f"{type(exc).__name__}: {_describe(exc)}"
            if scope.cancelled_caught:
                error = f"no answer within {SEND_TIMEOUT_S:g} s"
        outbox = self.storage.outbox
        attempts = delivery.attempts + 1
        if error is None:
            await outbox.delivered(delivery.id)
            log.info(
                "webhook_delivered",
                webhook=hook.name,
                delivery=delivery.id,
                msg_id=delivery.msg_id,
                attempts=attempts,
            )
            return
        deadline = delivery.enqueued_at + RETRY_FOR
        finished = self.now()
        if finished >= deadline:
            await outbox.give_up(delivery.id, attempts=attempts, error=error)
            log.warning(
                "webhook_gave_up",
                webhook=hook.name,
                delivery=delivery.id,
                msg_id=delivery.msg_id,
                attempts=attempts,
                error=error,
            )
            return
        next_at = min(finished + retry_delay(attempts, self._rng), deadline)
        await outbox.retry(delivery.id, attempts=attempts, next_at=next_at, error=error)
        log.info(
            "webhook_retry_scheduled",
            webhook=hook.name,
            delivery=delivery.id,
            msg_id=delivery.msg_id,
            attempts=attempts,
            error=error,
            next_at=next_at.isoformat(),
        )
