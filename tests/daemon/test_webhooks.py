"""Mail webhooks in process (daemon/_webhooks.py): the `[[webhooks]]` config, which mail
each event matches, the signature a receiver verifies, the retry schedule on trio's
autojump clock, and a webhook that hangs or is down never slowing a post.

The post office posts into a memory store; the webhooks send through httpx, to an
``httpx.MockTransport`` whose handler plays the receiver, or to a real socket on
loopback that never answers. Nothing waits by sleeping but on the autojump clock:
a test waits for the request that shows what it awaits.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing
from chinwag.daemon._config import Config, ConfigError, WebhookConfig, load_config
from chinwag.daemon._post_office import PostOffice
from chinwag.daemon._runtime import Runtime
from chinwag.daemon._tools import TOOL_NAMES
from chinwag.daemon._webhooks import (
    FIRST_RETRY_S,
    GAP_WAIT_S,
    JITTER,
    MAX_RETRY_S,
    RETRY_FOR,
    Webhooks,
    matched_events,
    newest_msg_id,
    passable,
)
from chinwag.protocol import Delivery, MailMessage, WebhookBacklog
from chinwag.storage import MemoryStorage, msg_id_of
from deadlines import deadline
from runtime_harness import open_runtime
from standardwebhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
URL = "https://hooks.example.com/chinwag"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# --- config ----------------------------------------------------------------------------


def load(tmp_path: Path, tables: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text('[agents.assistant]\nprovider = "echo"\n' + tables)
    return load_config(path, tool_names=TOOL_NAMES)


def test_a_webhook_table_loads_with_its_to_folded(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f'[[webhooks]]\nurl = "{URL}"\nevents = ["dm", "critical"]\nto = "Ana"\n'
        f'secret = "{SECRET}"\n\n[[webhooks]]\nurl = "http://127.0.0.1:9/x"\n'
        'events = ["space"]\nname = "ops"\n',
    )
    first, second = config.webhooks
    assert (first.url, first.events, first.to, first.secret) == (
        URL,
        ["dm", "critical"],
        "ana",
        SECRET,
    )
    assert first.id.startswith("webhook-") and first.id != second.id
    assert second.id == "ops"
    assert SECRET not in repr(config) and "<hidden>" in repr(first)


def test_a_derived_id_depends_on_url_events_and_to_only() -> None:
    hook = WebhookConfig(url=URL, events=["dm", "mention"], to="ana", secret=SECRET)
    assert hook.id == WebhookConfig(url=URL, events=["mention", "dm"], to="ana").id
    assert hook.id != WebhookConfig(url=URL, events=["dm"], to="ana").id
    assert hook.id != WebhookConfig(url=URL + "/2", events=["dm", "mention"], to="ana").id
    assert hook.id != WebhookConfig(url=URL, events=["dm", "mention"]).id


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ('url = "ftp://example.com/x"\nevents = ["dm"]', "http:// or https://"),
        ('url = "https://"\nevents = ["dm"]', "with a host"),
        (f'url = "{URL}"\nevents = []', "at least one"),
        (f'url = "{URL}"\nevents = ["dm", "reply"]', "events"),
        (f'url = "{URL}"\nevents = ["dm"]\nto = "@ana"', "to must be"),
        (f'url = "{URL}"\nevents = ["dm"]\nto = "everyone"', "reserved"),
        (f'url = "{URL}"\nevents = ["dm"]\nname = "Has Space"', "name must be"),
        (f'url = "{URL}"\nevents = ["dm"]\nsecret = "whsec_not base64!"', "base64"),
        (f'url = "{URL}"\nevents = ["dm"]\nsecret = "whsec_c2hvcnQ="', "24 to 64 bytes"),
        (f'url = "{URL}"\nevents = ["dm"]\nsigning_key = "x"', "signing_key"),
    ],
)
def test_a_bad_webhook_table_is_refused(tmp_path: Path, table: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load(tmp_path, f"[[webhooks]]\n{table}\n")


def test_a_refused_secret_is_never_shown(tmp_path: Path) -> None:
    secret = "whsec_" + base64.b64encode(b"tiny but private").decode()
    with pytest.raises(ConfigError, match="24 to 64 bytes") as caught:
        load(tmp_path, f'[[webhooks]]\nurl = "{URL}"\nevents = ["dm"]\nsecret = "{secret}"\n')
    assert secret.removeprefix("whsec_") not in str(caught.value)


def test_the_same_webhook_twice_is_refused(tmp_path: Path) -> None:
    table = f'[[webhooks]]\nurl = "{URL}"\nevents = ["dm"]\n'
    with pytest.raises(ConfigError, match="same webhook as number 1"):
        load(tmp_path, table + "\n" + table)
    load(tmp_path, table + "\n" + table + 'name = "second"\n')  # named apart, both load


# --- which mail matches ----------------------------------------------------------------


def message(to: list[str], recipients: list[str], **fields: Any) -> MailMessage:
    return MailMessage(
        msg_id=msg_id_of(1),
        sender="zed",
        to=to,
        recipients=recipients,
        content="hi",
        created_at=T0,
        **fields,
    )


def hook(*events: str, to: str | None = None) -> WebhookConfig:
    return WebhookConfig(url=URL, events=list(events), to=to)  # type: ignore[arg-type]


ALL = ("dm", "mention", "space", "critical")
DM = message(["bob"], ["bob"])
AT_NAME_DM = message(["@bob"], ["bob"])
MENTIONS_CAROL = message(["bob"], ["bob", "carol"], mentions=["carol"])
ROLE = message(["@reviewers"], ["ana", "bob"])  # @role: each holder mentioned
EVERYONE = message(["@everyone"], ["ana", "bob", "carol"])
SPACE = message(["#ops"], ["ana", "bob"], space="ops")
CRITICAL_TO_ROLE = message(["@reviewers"], ["ana", "bob"], priority=3)
CRITICAL_IN_SPACE = message(["#ops"], ["ana"], space="ops", priority=3)
DELETED = message(["bob"], ["bob"], deleted=True)


def mentioned(*names: str, among: list[str]) -> list[Delivery]:
    return [Delivery(name=name, mentioned=name in names) for name in among]


@pytest.mark.parametrize(
    ("webhook", "mail", "deliveries", "events"),
    [
        (hook(*ALL), DM, mentioned(among=["bob"]), ["dm"]),
        (hook(*ALL), AT_NAME_DM, mentioned("bob", among=["bob"]), ["dm", "mention"]),
        (hook(*ALL), MENTIONS_CAROL, mentioned("carol", among=["bob", "carol"]), ["dm", "mention"]),
        (hook(*ALL), ROLE, mentioned("ana", "bob", among=["ana", "bob"]), ["mention"]),
        (hook(*ALL), EVERYONE, mentioned(among=["ana", "bob", "carol"]), []),
        (hook(*ALL), SPACE, mentioned(among=["ana", "bob"]), ["space"]),
        (
            hook(*ALL),
            CRITICAL_TO_ROLE,
            mentioned("ana", "bob", among=["ana", "bob"]),
            ["mention", "critical"],
        ),
        (hook(*ALL), CRITICAL_IN_SPACE, mentioned(among=["ana"]), ["space", "critical"]),
        (hook(*ALL), DELETED, mentioned(among=["bob"]), []),
        # Only the events asked for.
        (hook("critical"), DM, mentioned(among=["bob"]), []),
        (
            hook("space", "critical"),
            CRITICAL_IN_SPACE,
            mentioned(among=["ana"]),
            ["space", "critical"],
        ),
        (hook("mention"), MENTIONS_CAROL, mentioned("carol", among=["bob", "carol"]), ["mention"]),
        # With `to`: mail that participant receives, and a dm or mention naming it.
        (hook(*ALL, to="bob"), DM, mentioned(among=["bob"]), ["dm"]),
        (hook(*ALL, to="carol"), DM, mentioned(among=["bob"]), []),
        (
            hook(*ALL, to="carol"),
            MENTIONS_CAROL,
            mentioned("carol", among=["bob", "carol"]),
            ["mention"],
        ),
        (hook(*ALL, to="bob"), MENTIONS_CAROL, mentioned("carol", among=["bob", "carol"]), ["dm"]),
        (hook(*ALL, to="ana"), ROLE, mentioned("ana", "bob", among=["ana", "bob"]), ["mention"]),
        (hook(*ALL, to="carol"), EVERYONE, mentioned(among=["ana", "bob", "carol"]), []),
        (hook(*ALL, to="bob"), SPACE, mentioned(among=["ana", "bob"]), ["space"]),
        (hook(*ALL, to="carol"), SPACE, mentioned(among=["ana", "bob"]), []),
        (
            hook("critical", to="ana"),
            CRITICAL_TO_ROLE,
            mentioned("ana", among=["ana"]),
            ["critical"],
        ),
        (hook("critical", to="zed"), CRITICAL_TO_ROLE, [], []),  # its author: no recipient
    ],
)
def test_which_events_a_message_is(
    webhook: WebhookConfig, mail: MailMessage, deliveries: list[Delivery], events: list[str]
) -> None:
    assert matched_events(webhook, mail, deliveries) == events


# --- a daemon's post office with webhooks ----------------------------------------------


@dataclass
class Receiver:
    """The handler of an ``httpx.MockTransport``: answers each request with the next of
    ``statuses`` (the last one once they run out), or hangs while ``hang`` is set."""

    statuses: list[int] = field(default_factory=lambda: [200])
    hang: bool = False
    requests: list[httpx.Request] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # trio time of each request
    arrived: trio.Event = field(default_factory=trio.Event)  # set on each request, then new

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        self.arrived.set()
        self.arrived = trio.Event()
        if self.hang:
            await trio.sleep_forever()
        status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
        return httpx.Response(status)

    async def wait_for(self, count: int, within: float = 10) -> None:
        with deadline(within, f"{count} webhook requests", lambda: f"{len(self.requests)}"):
            while len(self.requests) < count:
                await self.arrived.wait()

    def bodies(self) -> list[Any]:
        return [json.loads(request.content) for request in self.requests]


class WatchedOutbox:
    """A store's outbox that says when it was written to: each write sets ``wrote``."""

    WRITES = frozenset({"enqueue", "delivered", "retry", "give_up"})

    def __init__(self, outbox: Any) -> None:
        self._outbox = outbox
        self.wrote = trio.Event()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._outbox, name)
        if name not in self.WRITES:
            return method

        async def write(*args: Any, **kwargs: Any) -> None:
            await method(*args, **kwargs)
            self.wrote.set()
            self.wrote = trio.Event()

        return write

    async def until(self, holds: Callable[[], Awaitable[bool]], what: str) -> None:
        """Wait for the writes after which ``holds()``."""
        with deadline(10, what):
            while True:
                wrote = self.wrote  # taken first: a write while ``holds`` runs is not missed
                if await holds():
                    return
                await wrote.wait()


@dataclass
class Daemon:
    runtime: Runtime
    office: PostOffice
    nursery: trio.Nursery
    outbox: WatchedOutbox

    async def post(self, to: list[str], content: str, **fields: Any) -> MailMessage:
        given: dict[str, Any] = {
            "format": "markdown",
            "structured": None,
            "priority": 1,
            "channel": None,
            "reply_to": None,
            "scopes": [],
            "refs": [],
            "metadata": {},
            "mentions": [],
            "idempotency_key": None,
        }
        result = await self.office.post(sender="zed", to=to, content=content, **(given | fields))
        return result.message

    async def start_webhooks(
        self, *configs: WebhookConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> Webhooks:
        """Webhooks on this daemon's store, running, and woken by its posts."""
        webhooks = Webhooks(
            configs, self.runtime.storage, transport=transport, rng=random.Random(7)
        )
        self.office.webhooks = webhooks
        await self.nursery.start(webhooks.run)
        return webhooks


@asynccontextmanager
async def open_mail(storage: MemoryStorage | None = None) -> AsyncIterator[Daemon]:
    async with open_runtime(Config(agents={})) as runtime, trio.open_nursery() as nursery:
        if storage is not None:
            runtime.storage = storage
        watched = WatchedOutbox(runtime.storage.outbox)
        runtime.storage.outbox = watched  # type: ignore[misc]
        office = PostOffice(runtime, runtime.storage.mail)
        await office.start()
        try:
            yield Daemon(runtime, office, nursery, watched)
        finally:
            runtime.storage.outbox = watched._outbox  # type: ignore[misc]
        nursery.cancel_scope.cancel()


def mock(receiver: Receiver) -> httpx.MockTransport:
    return httpx.MockTransport(receiver)


async def test_mail_reaches_its_webhook_signed_and_verifiable() -> None:
    receiver = Receiver()
    async with open_mail() as daemon:
        await daemon.start_webhooks(
            WebhookConfig(url=URL, events=["dm"], secret=SECRET, name="ops"),
            transport=mock(receiver),
        )
        posted = await daemon.post(["bob"], "the build is green", priority=2)
        await receiver.wait_for(1)

    (request,) = receiver.requests
    assert (request.method, str(request.url)) == ("POST", URL)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == f"ops.{posted.msg_id}"
    body = Webhook(SECRET).verify(request.content, dict(request.headers))
    assert body["type"] == "mail.dm" and body["data"]["events"] == ["dm"]
    sent = msgspec.convert(body["data"]["message"], MailMessage)
    assert (sent.msg_id, sent.sender, sent.content, sent.priority) == (
        posted.msg_id,
        "zed",
        "the build is green",
        2,
    )
    other = "whsec_" + base64.b64encode(b"another secret of thirty-two by").decode()
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(other).verify(request.content, dict(request.headers))
    tampered = request.content.replace(b"green", b"red!!")
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(tampered, dict(request.headers))


async def test_without_a_secret_there_is_no_signature() -> None:
    receiver = Receiver()
    async with open_mail() as daemon:
        await daemon.start_webhooks(WebhookConfig(url=URL, events=["dm"]), transport=mock(receiver))
        await daemon.post(["bob"], "hello")
        await receiver.wait_for(1)
    (request,) = receiver.requests
    assert "webhook-signature" not in request.headers
    assert request.headers["webhook-id"] and request.headers["webhook-timestamp"].isdigit()


async def test_only_matching_mail_is_sent_and_history_is_not_replayed() -> None:
    receiver = Receiver()
    async with open_mail() as daemon:
        await daemon.post(["bob"], "before the webhook")  # history: never sent
        webhooks = await daemon.start_webhooks(
            WebhookConfig(url=URL, events=["critical"], to="bob", name="pager"),
            transport=mock(receiver),
        )
        await daemon.post(["bob"], "routine")
        await daemon.post(["carol"], "critical, but for carol", priority=3)
        urgent = await daemon.post(["bob", "carol"], "critical for bob", priority=3)
        await receiver.wait_for(1)
        assert webhooks.backlog() == [WebhookBacklog(name="pager")]

    assert [body["data"]["message"]["msg_id"] for body in receiver.bodies()] == [urgent.msg_id]
    assert receiver.bodies()[0]["type"] == "mail.critical"


async def test_a_slow_webhook_does_not_delay_posting() -> None:
    """The receiver is a real socket on loopback that reads a request and never answers."""
    hanging = trio.Event()

    async def never_answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        hanging.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as servers:
        (listener,) = await servers.start(
            functools.partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        async with open_mail() as daemon:
            await daemon.start_webhooks(
                WebhookConfig(url=f"http://127.0.0.1:{port}/hook", events=["dm"], name="slow")
            )
            first = await daemon.post(["bob"], "one")
            with deadline(10, "the webhook's request to reach the receiver"):
                await hanging.wait()
            # A try is under way and will not end for SEND_TIMEOUT_S: posting goes on.
            with deadline(1, "a post while the webhook hangs"):
                second = await daemon.post(["bob"], "two")
                third = await daemon.post(["carol"], "three")
            assert [
                m.msg_id
                for m in await daemon.runtime.storage.mail.messages_after(first.msg_id, limit=10)
            ] == [second.msg_id, third.msg_id]
            (delivery, *_) = await daemon.runtime.storage.outbox.pending("slow", limit=10)
            assert delivery.msg_id == first.msg_id and delivery.attempts == 0  # still under way
        servers.cancel_scope.cancel()


async def test_a_webhook_that_is_down_does_not_delay_posting() -> None:
    """Nothing listens on the port: each try is refused, and retried later."""
    with trio.socket.socket() as probe:  # a port just freed: nothing listens on it
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with open_mail() as daemon:
        webhooks = await daemon.start_webhooks(
            WebhookConfig(url=f"http://127.0.0.1:{port}/hook", events=["dm"], name="down")
        )
        with deadline(2, "ten posts to a webhook that is down"):
            for n in range(10):
                await daemon.post(["bob"], f"n{n}")
        refused = WebhookBacklog(name="down", pending=10, retrying=10)

        async def all_refused() -> bool:
            return (await daemon.outbox.backlog()).get("down") == refused

        await daemon.outbox.until(all_refused, "the refused tries to be recorded")
        pending = await daemon.outbox.pending("down", limit=10)
        assert all("ConnectError" in (d.last_error or "") for d in pending)
        await trio.testing.wait_all_tasks_blocked()  # the webhook's round over: it waits
        assert webhooks.backlog() == [WebhookBacklog(name="down", pending=10, retrying=10)]


# --- retries -------------------------------------------------------------------------------


async def test_retries_back_off_then_give_up_after_24_hours(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver(statuses=[500])
    async with open_mail() as daemon:
        webhooks = await daemon.start_webhooks(
            WebhookConfig(url=URL, events=["dm"], name="flaky"), transport=mock(receiver)
        )
        with capture_logs() as logs:
            await daemon.post(["bob"], "hello?")
            await receiver.wait_for(1)
            enqueued = receiver.times[0]
            await trio.sleep(RETRY_FOR.total_seconds() * 2)  # virtual: the autojump clock's
        outbox = daemon.runtime.storage.outbox
        assert await outbox.backlog() == {"flaky": WebhookBacklog(name="flaky", failed=1)}
        assert webhooks.backlog() == [WebhookBacklog(name="flaky", failed=1)]

    times = receiver.times
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # 5 s, doubling each time up to an hour, each scaled by at most 20% either way...
    for attempts, gap in enumerate(gaps[:-1], 1):
        base = min(FIRST_RETRY_S * 2 ** (attempts - 1), MAX_RETRY_S)
        assert base * (1 - JITTER) <= gap <= min(base * (1 + JITTER), MAX_RETRY_S), attempts
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps[:11]))
    # ...and the last try exactly 24 hours after the first, then none.
    assert times[-1] - enqueued == pytest.approx(RETRY_FOR.total_seconds())
    assert 30 <= len(times) <= 40
    (gave_up,) = [e for e in logs if e["event"] == "webhook_gave_up"]
    assert gave_up["attempts"] == len(times) and gave_up["error"] == "HTTP 500"
    assert "url" not in gave_up
    retried = [e for e in logs if e["event"] == "webhook_retry_scheduled"]
    assert len(retried) == len(times) - 1


async def test_a_receiver_that_recovers_gets_each_delivery_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver(statuses=[500, 503, 502, 200])
    async with open_mail() as daemon:
        await daemon.start_webhooks(
            WebhookConfig(url=URL, events=["dm"], name="ops"), transport=mock(receiver)
        )
        posted = [await daemon.post(["bob"], f"n{n}") for n in range(3)]
        await receiver.wait_for(6)  # three failed tries, then one each
        await trio.sleep(RETRY_FOR.total_seconds())  # virtual: nothing more comes
        assert await daemon.runtime.storage.outbox.backlog() == {}

    ids = [request.headers["webhook-id"] for request in receiver.requests]
    assert len(ids) == 6
    assert sorted(set(ids)) == sorted(f"ops.{m.msg_id}" for m in posted)
    succeeded = ids[3:]
    assert sorted(succeeded) == sorted(set(ids))  # each once after the failures


async def test_a_try_cut_short_by_a_stop_stays_pending_and_is_sent_again() -> None:
    storage = MemoryStorage()
    receiver = Receiver(hang=True)
    async with open_mail(storage) as daemon:
        await daemon.start_webhooks(
            WebhookConfig(url=URL, events=["dm"], name="ops"), transport=mock(receiver)
        )
        posted = await daemon.post(["bob"], "in flight")
        await receiver.wait_for(1)
    # The daemon stopped mid-try: nothing recorded, the delivery still due.
    (pending,) = await storage.outbox.pending("ops", limit=10)
    assert (pending.msg_id, pending.attempts) == (posted.msg_id, 0)

    again = Receiver()
    async with open_mail(storage) as daemon:
        await daemon.post(["bob"], "posted while it was down")
        await daemon.start_webhooks(
            WebhookConfig(url=URL, events=["dm"], name="ops"), transport=mock(again)
        )
        await again.wait_for(2)

        async def empty() -> bool:
            return not await storage.outbox.backlog()

        await daemon.outbox.until(empty, "the outbox to empty")
    (cut_short,) = receiver.requests
    assert cut_short.headers["webhook-id"] == f"ops.{posted.msg_id}"
    sent = {request.headers["webhook-id"]: request.content for request in again.requests}
    assert len(sent) == len(again.requests) == 2
    assert sent[f"ops.{posted.msg_id}"] == cut_short.content  # the same delivery, again


# --- the outbox's reading of the mail log ------------------------------------------------


async def test_the_newest_msg_id_is_found_by_bisection() -> None:
    storage = MemoryStorage()
    assert await newest_msg_id(storage) == msg_id_of(0)
    async with open_mail(storage) as daemon:
        for count in [1, 2, 3, 37]:
            while len(await storage.mail.messages_after(None, limit=100)) < count:
                await daemon.post(["bob"], "x")
            assert await newest_msg_id(storage) == msg_id_of(count)


def test_a_gap_on_a_shared_store_is_waited_for_then_passed() -> None:
    def mail(*numbers: int) -> list[MailMessage]:
        return [
            MailMessage(
                msg_id=msg_id_of(n),
                sender="a",
                to=["b"],
                recipients=["b"],
                content="",
                created_at=T0,
            )
            for n in numbers
        ]

    cursor = msg_id_of(4)
    assert passable(cursor, mail(5, 6, 7), None, 100.0) == (3, None)
    # 7 is missing: 5 and 6 pass, 8 waits for it.
    assert passable(cursor, mail(5, 6, 8), None, 100.0) == (2, (7, 100.0))
    assert passable(cursor, mail(5, 6, 8), (7, 100.0), 100 + GAP_WAIT_S - 1) == (2, (7, 100.0))
    assert passable(cursor, mail(5, 6, 8), (7, 100.0), 100 + GAP_WAIT_S) == (3, None)
    # It came meanwhile: no gap.
    assert passable(cursor, mail(5, 6, 7, 8), (7, 100.0), 101.0) == (4, None)
    # A gap right after the cursor holds everything back.
    assert passable(cursor, mail(6), None, 5.0) == (0, (5, 5.0))
