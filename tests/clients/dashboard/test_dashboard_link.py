"""The link on a real daemon: each run event is encoded once, as its server-sent
event, and the same bytes go to every page that asked for it; a page opened while the
link lets a lost connection go waits for the next one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from chinwag.clients import Client, connect
from chinwag.clients._client import ChinwagError, Subscription, connect_explained
from chinwag.clients.dashboard import _link
from chinwag.clients.dashboard._link import (
    DaemonLink,
    DaemonState,
    MailFollowed,
    Missed,
    Resubscribed,
    Shown,
)
from chinwag.protocol import AskUser, End, Event, Start
from dashboard_harness import talk


async def until_end(page: MemoryObjectReceiveStream[Shown]) -> list[Shown]:
    """What the page is sent up to the end of a run, its state first."""
    seen: list[Shown] = []
    with anyio.fail_after(15):
        async for shown in page:
            seen.append(shown)
            if isinstance(shown.item, Event) and isinstance(shown.item.event, End):
                return seen
    raise AssertionError(f"the page's stream ended before the run did: {seen}")


def test_a_run_event_is_encoded_once_for_every_page(daemon: Any) -> None:
    async def main() -> None:
        link = DaemonLink(daemon.socket_path)
        async with anyio.create_task_group() as tasks:
            await tasks.start(link.run)
            with (
                link.listen(sender="ana") as first,
                link.listen(sender="ana") as second,
                link.listen(sender="bob") as other,
            ):
                async with connect(daemon.socket_path) as client:
                    await talk(client, "ana", "hello there")
                ones, twos = await until_end(first), await until_end(second)
                assert isinstance(ones[0].item, DaemonState) and ones[0].item.up
                runs = ones[1:]
                assert (
                    [type(shown.item) for shown in runs]
                    == [Event] * len(runs)
                    == [type(shown.item) for shown in twos[1:]]
                )
                # The same bytes, not equal ones: encoded once for both pages.
                assert all(one.frame is two.frame for one, two in zip(runs, twos[1:], strict=True))
                assert all(shown.frame.startswith(b"event: run\r\ndata: {") for shown in runs)
                # bob's page was sent its state and nothing of ana's run.
                assert isinstance(other.receive_nowait().item, DaemonState)
                assert other.statistics().current_buffer_used == 0
            tasks.cancel_scope.cancel()

    anyio.run(main, backend="trio")


def test_a_page_opened_while_the_link_lets_its_connection_go(
    daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    letting_go = anyio.Event()
    go_on = anyio.Event()

    @asynccontextmanager
    async def held_open(path: Path | str, *, client: str) -> AsyncIterator[Client]:
        """The link's connection, whose closing waits for ``go_on`` once it has begun."""
        async with connect_explained(path, client=client) as connection:
            try:
                yield connection
            finally:
                letting_go.set()
                await go_on.wait()

    monkeypatch.setattr(_link, "connect_explained", held_open)

    async def main() -> None:
        link = DaemonLink(daemon.socket_path, retry_s=0.05)
        async with anyio.create_task_group() as tasks:
            await tasks.start(link.run)
            await anyio.to_thread.run_sync(daemon.stop)
            with anyio.fail_after(15):
                await letting_go.wait()
                # The subscription has ended and the connection is closing: a page asking
                # for a conversation and mail now (a RuntimeError from the ended task
                # group before) has them once the daemon is back.
                with link.listen("assistant", "ana", reader="ana") as page:
                    go_on.set()
                    await anyio.to_thread.run_sync(daemon.start)
                    async for shown in page:
                        if isinstance(shown.item, MailFollowed):
                            break
            tasks.cancel_scope.cancel()

    anyio.run(main, backend="trio")


def first_subscription_as(
    kind: type[Subscription], monkeypatch: pytest.MonkeyPatch
) -> list[Subscription]:
    """The client's first `subscribe` made a ``kind`` (one the daemon drops, say); the
    subscriptions made, in order."""
    subscribe = Client.subscribe
    made: list[Subscription] = []

    def first_as_kind(self: Client, *args: Any, **kwargs: Any) -> Subscription:
        feed = subscribe(self, *args, **kwargs)
        if not made:
            feed.__class__ = kind
        made.append(feed)
        return feed

    monkeypatch.setattr(Client, "subscribe", first_as_kind)
    return made


def test_a_subscription_the_daemon_drops_is_taken_again_on_the_same_connection(
    daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon drops a subscription that falls behind (429), as it did the link's on
    a busy machine (bench w): the daemon is not away, so the pages are told they were
    resubscribed, not that it is unreachable, and the runs after it reach them."""

    class Dropped(Subscription):
        async def __anext__(self) -> Event:
            raise ChinwagError(429, "The subscription fell too far behind and was dropped.")

    subscriptions = first_subscription_as(Dropped, monkeypatch)

    async def main() -> None:
        link = DaemonLink(daemon.socket_path, retry_s=0.05)
        with link.listen(sender="ana") as page:
            async with anyio.create_task_group() as tasks:
                await tasks.start(link.run)
                states = []
                with anyio.fail_after(15):
                    async for shown in page:
                        if isinstance(shown.item, DaemonState):
                            states.append(shown.item.up)
                        if isinstance(shown.item, Resubscribed):
                            break
                assert states == [False, True]  # connecting, then up: never away
                async with connect(daemon.socket_path) as client:
                    await talk(client, "ana", "hello there")
                seen = await until_end(page)
                assert all(not isinstance(shown.item, DaemonState) for shown in seen), seen
                assert len(subscriptions) == 2
                tasks.cancel_scope.cancel()

    anyio.run(main, backend="trio")


def test_the_runs_a_dropped_subscription_followed_are_followed_again_or_missed(
    daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of the runs in flight as the subscription was dropped, one still going is replayed
    from its start and followed to its end (through an attach), each of its events once
    though the new subscription has them too, and one that ended meanwhile is told
    missed, its end unseen, never as if the daemon had gone away."""
    drop = anyio.Event()
    ended_meanwhile = anyio.Event()

    class DroppedOnCue(Subscription):
        async def __anext__(self) -> Event:
            event = await super().__anext__()
            if drop.is_set():
                # The end of the run answered meanwhile comes to no subscription.
                await ended_meanwhile.wait()
                raise ChinwagError(429, "The subscription fell too far behind and was dropped.")
            return event

    subscriptions = first_subscription_as(DroppedOnCue, monkeypatch)

    async def asked(page: MemoryObjectReceiveStream[Shown], *senders: str) -> dict[str, str]:
        """The run of each of ``senders`` once it asks, by sender."""
        runs: dict[str, str] = {}
        async for shown in page:
            item = shown.item
            if isinstance(item, Event) and isinstance(item.event, AskUser):
                runs[item.sender] = item.run_id
                if set(runs) == set(senders):
                    return runs
        raise AssertionError("the page's stream ended")

    async def until_missed(page: MemoryObjectReceiveStream[Shown]) -> list[Shown]:
        seen: list[Shown] = []
        async for shown in page:
            seen.append(shown)
            if isinstance(shown.item, Missed):
                return seen
        raise AssertionError(f"the page's stream ended: {seen}")

    async def ask(client: Client, sender: str) -> None:
        content = "later" if sender == "zoe" else "/ask which one"
        async with client.stream("assistant", content, sender=sender) as events:
            await events.collect()
        if sender == "yann":
            ended_meanwhile.set()

    async def main() -> None:
        link = DaemonLink(daemon.socket_path, retry_s=0.05)
        async with anyio.create_task_group() as tasks:
            await tasks.start(link.run)
            with link.listen() as page, anyio.fail_after(15):
                async with connect(daemon.socket_path) as client:
                    tasks.start_soon(ask, client, "xena")
                    tasks.start_soon(ask, client, "yann")
                    runs = await asked(page, "xena", "yann")
                    drop.set()
                    await client.reply_to_ask("assistant", "this one", sender="yann")
                    seen = await until_missed(page)
                    await client.reply_to_ask("assistant", "that one", sender="xena")
                    seen += await until_end(page)
                    # A run after it: what the page got of xena's before zoe's end, it got.
                    tasks.start_soon(ask, client, "zoe")
                    while not any(
                        isinstance(s.item, Event)
                        and s.item.sender == "zoe"
                        and isinstance(s.item.event, End)
                        for s in seen
                    ):
                        seen += await until_end(page)
            tasks.cancel_scope.cancel()
        items = [shown.item for shown in seen]
        after = items[[type(item) for item in items].index(Resubscribed) :]
        assert not any(isinstance(item, DaemonState) for item in after), items
        assert Missed("assistant", "yann", runs["yann"]) in after
        xena = [item.event for item in after if isinstance(item, Event) and item.sender == "xena"]
        assert {item.sender for item in after if isinstance(item, Event)} == {"xena", "zoe"}
        kinds = [type(event).__name__ for event in xena]
        assert kinds.count("Start") == 1 and kinds.count("End") == 1, kinds
        # Replayed from its start, then on to its end as the subscription would have.
        assert isinstance(xena[0], Start)
        assert isinstance(xena[-1], End) and xena[-1].status == "done"
        assert len(subscriptions) == 2

    anyio.run(main, backend="trio")
