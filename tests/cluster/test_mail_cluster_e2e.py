"""Mail across daemons on one store: what is posted or changed on one daemon is pushed
to watchers on the others, as it is to its own."""

from __future__ import annotations

import time

import pytest
import trio
from chinwag.clients import connect
from chinwag.protocol import MailUpdate


@pytest.fixture
def two(cluster):  # type: ignore[no-untyped-def]
    print(f"two daemons as {cluster.mode}")
    return [cluster.start(name) for name in "ab"]


async def test_a_post_on_one_daemon_is_pushed_to_a_watch_on_another(two):
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        await on_a.register("ana")
        await on_b.register("bo")
        async with on_b.watch("bo", updates=True) as mail:
            sent = time.monotonic()
            posted = await on_a.post("ana", "hello from a", to="bo")
            with trio.fail_after(5):
                got = await anext(mail)
            took = time.monotonic() - sent
            assert got.msg_id == posted.msg_id and got.content == "hello from a"
            # Pushed, not polled: nothing here polls more often than once a second.
            assert took < 0.5, f"the post reached b's watch {took:.3f} s after it was sent"
            await on_a.react("ana", posted.msg_id, "👍")
            with trio.fail_after(5):
                update = await anext(mail)
            assert isinstance(update, MailUpdate) and update.change == "react"
            for n in range(20):
                await on_a.post("ana", f"burst {n}", to="bo")
            with trio.fail_after(10):
                burst = [await anext(mail) for _ in range(20)]
        assert [m.content for m in burst] == [f"burst {n}" for n in range(20)]
        first = next(i for i in (await on_b.inbox("bo")).items if i.message.msg_id == posted.msg_id)
        assert first.state in ("delivered", "read"), "pushed on b: delivered"


async def test_a_watch_begun_on_another_daemon_replays_without_repeats(two):
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        await on_a.register("ana")
        first = await on_a.post("ana", "before the watch", to="cy")
        async with on_b.watch("cy", after="m000000000000") as mail:
            await on_a.post("ana", "after the watch", to="cy")
            with trio.fail_after(5):
                got = [await anext(mail), await anext(mail)]
    assert [m.content for m in got] == ["before the watch", "after the watch"]
    assert got[0].msg_id == first.msg_id
