"""The post office among other daemons, in process: another daemon is played by a fake
cluster (what this daemon tells it is kept) and by writes straight to the store; its
news is handed to the post office as the cluster would. Messages another daemon has
numbered but not yet committed are hidden from the post office's reads (``Uncommitted``),
so msg_ids stored out of their order can be made at will. Time is the autojump clock's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import trio
import trio.testing
from chinwag.daemon._config import Config, DaemonConfig
from chinwag.daemon._mail_news import (
    Changed,
    News,
    Offline,
    Online,
    Posted,
    RollCall,
    decode_news,
    encode_news,
)
from chinwag.daemon._post_office import PUSH_GAP_WAIT_S, PostOffice
from chinwag.daemon._server import Server
from chinwag.protocol import (
    Delivery,
    Error,
    Mail,
    MailMessage,
    MailUpdate,
    Participant,
    Register,
)
from chinwag.storage import EditChange, MailStore
from runtime_harness import open_runtime
from test_connection import AGENTS, Daemon
from test_post_office import BEFORE_ANY, Party, party

THERE = "there"  # the other daemon's id


class FakeCluster:
    """What the post office asks of daemon/_cluster.py's Cluster: it keeps what is told."""

    me = "here"

    def __init__(self) -> None:
        self.live = frozenset({self.me, THERE})
        self.on_peers: Any = None
        self.told: list[tuple[News, str | None]] = []

    def mail_news(self, news: bytes, to: str | None = None) -> None:
        self.told.append((decode_news(news), to))

    async def holders(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return {}


class Uncommitted:
    """The post office's store, without the messages in ``hidden``: numbered by another
    daemon, not yet committed."""

    def __init__(self, store: MailStore) -> None:
        self.store = store
        self.hidden: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def get_message(self, msg_id: str) -> MailMessage | None:
        return None if msg_id in self.hidden else await self.store.get_message(msg_id)

    async def messages_after(self, after: str | None, *, limit: int) -> list[MailMessage]:
        rows = await self.store.messages_after(after, limit=limit)
        return [m for m in rows if m.msg_id not in self.hidden]

    async def received(self, name: str, **fields: Any) -> list[tuple[MailMessage, Delivery]]:
        rows = await self.store.received(name, **fields)
        return [(m, d) for m, d in rows if m.msg_id not in self.hidden]

    async def newest_received(self, name: str) -> str | None:
        rows = await self.received(name, after=None, limit=10_000)
        return rows[-1][0].msg_id if rows else None


@asynccontextmanager
async def open_shared() -> AsyncIterator[tuple[Daemon, FakeCluster, Uncommitted]]:
    config = Config(daemon=DaemonConfig(), agents=AGENTS)
    async with open_runtime(config) as runtime, trio.open_nursery() as nursery:
        cluster = FakeCluster()
        runtime.cluster = cluster  # type: ignore[assignment]
        server = Server(runtime)
        office = server.post_office
        store = Uncommitted(office.store)
        office.store = store  # type: ignore[assignment]
        await office.start()
        yield Daemon(runtime, server, nursery), cluster, store
        nursery.cancel_scope.cancel()


def office_of(daemon: Daemon) -> PostOffice:
    office = daemon.server.post_office
    assert isinstance(office, PostOffice)
    return office


async def stored_there(store: Uncommitted, to: str, content: str) -> str:
    """A message the other daemon stored: its msg_id."""
    message = MailMessage(
        msg_id="",
        sender="ana",
        to=[to],
        recipients=[to],
        content=content,
        created_at=datetime.now(UTC),
    )
    stored, _ = await store.store.post(message, [Delivery(name=to)])
    return stored.msg_id


def hear(daemon: Daemon, news: News) -> None:
    office_of(daemon).heard(THERE, encode_news(news))


async def nothing_for(member: Party, rid: int, seconds: float) -> None:
    with trio.move_on_after(seconds) as waited:
        got = await member.frame(lambda m: getattr(m, "id", None) == rid)
        raise AssertionError(f"pushed too soon: {got}")
    assert waited.cancelled_caught


async def test_a_message_above_a_gap_waits_for_the_gap_to_fill(autojump_clock):
    """Another daemon numbered m1, then m2, and m2 committed first: bo gets m1 then m2,
    and a change to m2 told before m2 was pushed comes as m2 as it is now, not before it."""
    async with open_shared() as (daemon, _, store):
        bo = await party(daemon, "bo")
        rid, _ = await bo.watch(updates=True)
        first = await stored_there(store, "bo", "first")
        second = await stored_there(store, "bo", "second")
        store.hidden.add(first)
        hear(daemon, Posted(second))
        await store.store.change_message(
            second, EditChange(content="second, edited", structured=None, at=datetime.now(UTC))
        )
        hear(daemon, Changed(second, "edit"))
        await nothing_for(bo, rid, PUSH_GAP_WAIT_S / 2)
        store.hidden.clear()
        hear(daemon, Posted(first))
        got = [await bo.mail(rid), await bo.mail(rid)]
        assert [(m.msg_id, m.message.content) for m in got] == [
            (first, "first"),
            (second, "second, edited"),
        ]
        await nothing_for(bo, rid, PUSH_GAP_WAIT_S * 2)  # no update of it: it came edited
        hear(daemon, Changed(second, "edit"))
        update = await bo.frame(lambda m: isinstance(m, (MailUpdate, Mail)))
        assert isinstance(update, MailUpdate) and update.msg_id == second


async def test_a_gap_never_filled_is_passed_after_a_wait_and_filled_late_is_pushed(
    autojump_clock,
):
    async with open_shared() as (daemon, _, store):
        bo = await party(daemon, "bo")
        rid, _ = await bo.watch()
        lost = await stored_there(store, "bo", "slow to commit")
        later = await stored_there(store, "bo", "later")
        store.hidden.add(lost)
        heard_at = trio.current_time()
        hear(daemon, Posted(later))
        assert (await bo.mail(rid)).msg_id == later
        waited = trio.current_time() - heard_at
        assert PUSH_GAP_WAIT_S <= waited < PUSH_GAP_WAIT_S + 0.5, waited
        store.hidden.clear()
        hear(daemon, Posted(lost))
        assert (await bo.mail(rid)).msg_id == lost  # late, but not never


async def test_a_watch_begun_while_a_message_waits_on_a_gap_gets_each_once(autojump_clock):
    """bo's newest message (m2) is stored but waits on m1: the watch's cursor stops below
    it, so its replay has neither and its pushes have both, in order."""
    async with open_shared() as (daemon, _, store):
        bo = await party(daemon, "bo")
        first = await stored_there(store, "bo", "first")
        second = await stored_there(store, "bo", "second")
        store.hidden.add(first)
        hear(daemon, Posted(second))
        await trio.testing.wait_all_tasks_blocked()  # the news is taken
        rid, watching = await bo.watch(after=BEFORE_ANY)
        assert watching.cursor is not None and watching.cursor < first
        store.hidden.clear()
        hear(daemon, Posted(first))
        assert await bo.mails(rid, 2) == [first, second]
        await nothing_for(bo, rid, PUSH_GAP_WAIT_S * 2)


async def test_mail_posted_here_is_told_and_follows_the_order_too(autojump_clock):
    """A post here above another daemon's number not yet committed waits for it."""
    async with open_shared() as (daemon, cluster, store):
        bo = await party(daemon, "bo")
        ana = await party(daemon, "ana")
        rid, _ = await bo.watch()
        theirs = await stored_there(store, "bo", "theirs")
        store.hidden.add(theirs)
        mine = (await ana.post(["bo"], "mine")).msg_id
        assert (Posted(mine), None) in cluster.told
        await nothing_for(bo, rid, PUSH_GAP_WAIT_S / 2)
        store.hidden.clear()
        hear(daemon, Posted(theirs))
        assert await bo.mails(rid, 2) == [theirs, mine]


async def test_registrations_elsewhere_are_online_here_until_their_daemon_goes(autojump_clock):
    async with open_shared() as (daemon, cluster, _):
        ana = Participant(name="ana", kind="person", roles=["ops"], info={"session": "s-a"})
        hear(daemon, Online([ana], registered=True))
        watcher = await party(daemon, "bo")
        seen = await watcher.participants(online_only=True, role="ops")
        assert list(seen) == ["ana"] and seen["ana"].info == {"session": "s-a"}
        refused = await watcher.refused(Register, name="ana", info={"session": "s-b"})
        assert isinstance(refused, Error) and refused.code == 409 and "s-a" in refused.message
        assert cluster.on_peers is not None
        cluster.on_peers(frozenset({THERE}), frozenset())
        assert "ana" not in await watcher.participants(online_only=True)
        cluster.told.clear()
        cluster.on_peers(frozenset(), frozenset({THERE}))
        assert cluster.told == [(RollCall(), THERE)]
        hear(daemon, RollCall())
        await trio.testing.wait_all_tasks_blocked()  # the news is taken
        answer, to = cluster.told[-1]
        assert to == THERE and isinstance(answer, Online) and answer.every
        assert [p.name for p in answer.participants] == ["bo"]


async def test_a_newer_registration_elsewhere_ends_the_one_here(autojump_clock):
    async with open_shared() as (daemon, cluster, _):
        cy = await party(daemon, "cy", info={"session": "s-1"})
        mine = (await cy.participants())["cy"]
        assert mine.online and mine.last_seen is not None
        newer = Participant(name="cy", kind="session", last_seen=datetime.now(UTC))
        hear(daemon, Online([newer], registered=True))
        await trio.testing.wait_all_tasks_blocked()  # the news is taken
        assert (Offline(["cy"]), None) in cluster.told
        assert "cy" not in office_of(daemon).registrations
        hear(daemon, Offline(["cy"]))
        assert not (await cy.participants())["cy"].online
