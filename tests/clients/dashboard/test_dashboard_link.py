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
    Resubscribed,
    Shown,
)
from chinwag.protocol import End, Event
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


def test_a_subscription_the_daemon_drops_is_taken_again_on_the_same_connection(
    daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon drops a subscription that falls behind (429), as it did the link's on
    a busy machine (bench w): the daemon is not away, so the pages are told they were
    resubscribed, not that it is unreachable, and the runs after it reach them."""
    subscribe = Client.subscribe
    subscriptions = 0

    class Dropped(Subscription):
        async def __anext__(self) -> Event:
            raise ChinwagError(429, "The subscription fell too far behind and was dropped.")

    def dropped_once(self: Client, *args: Any, **kwargs: Any) -> Subscription:
        nonlocal subscriptions
        subscriptions += 1
        feed = subscribe(self, *args, **kwargs)
        if subscriptions == 1:
            feed.__class__ = Dropped
        return feed

    monkeypatch.setattr(Client, "subscribe", dropped_once)

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
                assert subscriptions == 2
                tasks.cancel_scope.cancel()

    anyio.run(main, backend="trio")
