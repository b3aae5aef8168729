"""Three daemons on one PostgreSQL database act as one: control requests reach the
daemon running the conversation, its events reach the others' clients, and a daemon
that dies frees its conversations for the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import AskUser, End, Queued, Start, TextDelta
from deadlines import collect, next_event, next_of

ASSISTANT = "assistant"


@pytest.fixture
def three(cluster):  # type: ignore[no-untyped-def]
    """Hosts a, b and c: network namespaces where the machine allows (cluster.mode)."""
    print(f"three daemons as {cluster.mode}")
    return [cluster.start(name) for name in "abc"]


async def test_kill_through_another_daemon_stops_the_run_within_a_second(three):
    a, b, _ = three
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        async with on_a.stream(ASSISTANT, "/slow 200 50") as running:
            await next_of(running, TextDelta)
            (item,) = (await on_b.list_conversations()).items
            assert item.running, "b lists the run on a as running"
            asked = time.monotonic()
            killed = await on_b.kill(ASSISTANT)
            events = await collect(running)
            stopped = time.monotonic() - asked
        assert isinstance(events[-1], End) and events[-1].status == "killed"
        assert killed.run_id is not None
        assert stopped < 1.0, f"the run ended {stopped:.2f} s after b was asked to kill it"
        (item,) = (await on_b.list_conversations()).items
        assert not item.running


async def test_attach_through_another_daemon_replays_from_start(three):
    a, b, _ = three
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        on_a.stream(ASSISTANT, "/slow 10 100") as running,
    ):
        first = await next_of(running, Start)
        await next_of(running, TextDelta)
        async with on_b.attach(ASSISTANT) as attached:
            seen = await collect(attached)
        mine = [first, *await collect(running)]
    assert isinstance(seen[0], Start) and seen[0].run_id == first.run_id
    words = [e.delta for e in seen if isinstance(e, TextDelta)]
    assert "".join(words).split() == [str(n) for n in range(1, 11)]
    assert seen[-1].status == "done" and mine[-1].status == "done"


async def test_an_attach_through_another_daemon_detaches_on_cancel(three):
    """Leaving the attach early cancels it there and on a; the run on a goes on, and a
    second attach through b replays it from `start` again."""
    a, b, _ = three
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        on_a.stream(ASSISTANT, "/slow 30 20") as running,
    ):
        await next_of(running, TextDelta)
        async with on_b.attach(ASSISTANT) as attached:
            await next_of(attached, TextDelta)
        async with on_b.attach(ASSISTANT) as again:
            replayed = await collect(again)
        events = await collect(running)
    assert isinstance(replayed[0], Start) and replayed[-1].status == "done"
    assert events[-1].status == "done"


async def test_an_ask_on_one_daemon_is_answered_through_another(three):
    a, _, c = three
    async with (
        connect(a.socket_path) as on_a,
        connect(c.socket_path) as on_c,
        on_a.stream(ASSISTANT, "/ask favourite colour?") as running,
    ):
        ask = await next_of(running, AskUser)
        with pytest.raises(ChinwagError, match="not 'wrong'"):
            await on_c.reply_to_ask(ASSISTANT, "red", ask_id="wrong")
        await on_c.reply_to_ask(ASSISTANT, "deep blue", ask_id=ask.ask_id)
        events = await collect(running)
    text = "".join(e.delta for e in events if isinstance(e, TextDelta))
    assert "deep blue" in text and events[-1].status == "done"


async def test_subscribe_on_one_daemon_sees_the_runs_of_another(three):
    a, _, c = three
    async with (
        connect(a.socket_path) as on_a,
        connect(c.socket_path) as on_c,
        on_c.subscribe(ASSISTANT) as subscription,
    ):
        async with on_a.stream(ASSISTANT, "three little words") as running:
            mine = await collect(running)
        seen = []
        while not seen or not isinstance(seen[-1].event, End):
            seen.append(await next_event(subscription))
    assert [type(e.event) for e in seen] == [type(e) for e in mine]
    assert {e.run_id for e in seen} == {mine[0].run_id}


async def test_a_run_waiting_on_another_daemon_counts_the_runs_ahead_there(three):
    a, b, _ = three
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        on_a.stream(ASSISTANT, "/slow 20 50") as first,
        on_a.stream(ASSISTANT, "second on a") as second,
    ):
        await next_of(first, TextDelta)
        queued = await next_event(second)
        assert isinstance(queued, Queued) and queued.position == 1
        async with on_b.stream(ASSISTANT, "third, on b") as third:
            queued = await next_event(third)
            assert isinstance(queued, Queued) and queued.position == 2
            ends = [(await collect(s))[-1] for s in (first, second, third)]
    assert [e.status for e in ends] == ["done"] * 3


async def test_a_run_waiting_on_another_daemon_goes_before_runs_asked_there_after_it(three):
    """Line order across daemons: b's run, queued while a ran, goes before a run asked
    for on a after it, not after every run a is given meanwhile."""
    a, b, _ = three
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        on_a.stream(ASSISTANT, "/slow 10 50") as first,
    ):
        await next_of(first, TextDelta)
        async with on_b.stream(ASSISTANT, "from b") as from_b:
            assert isinstance(await next_event(from_b), Queued)
            async with on_a.stream(ASSISTANT, "later on a") as later:
                ends = [(await collect(s))[-1] for s in (first, from_b, later)]
    assert [e.status for e in ends] == ["done"] * 3
    history = await on_b_history(b)
    assert history[::2] == ["/slow 10 50", "from b", "later on a"]


async def on_b_history(host) -> list[str]:  # type: ignore[no-untyped-def]
    async with connect(host.socket_path) as client:
        return [e.content for e in (await client.history(ASSISTANT)).entries]


async def test_a_killed_daemon_frees_its_conversation_and_its_followers_get_503(cluster, three):
    a, b, c = three
    async with connect(b.socket_path) as on_b, connect(c.socket_path) as on_c:
        async with connect(a.socket_path) as on_a, on_a.stream(ASSISTANT, "/slow 500 20") as run:
            await next_of(run, TextDelta)
            async with on_c.attach(ASSISTANT) as attached:
                await next_of(attached, TextDelta)
                cluster.kill9(a)
                with trio.fail_after(10):
                    ended = await collect(attached)
        assert ended[-1].status == "error" and ended[-1].error.code == 503
        async with on_b.stream(ASSISTANT, "mine now") as events:
            got = await collect(events)
        assert got[-1].status == "done"
        start = next(e for e in got if isinstance(e, Start))
        assert start.seq == 2, "the killed run kept its user entry and nothing torn"
        history = await on_b.history(ASSISTANT)
        assert [e.content for e in history.entries] == ["/slow 500 20", "mine now", "mine now"]


async def test_stats_list_every_live_daemon(cluster, three):
    a, b, c = three
    async with connect(b.socket_path) as on_b:
        await until_daemons(on_b, 3)
        stats = await on_b.stats()
        assert [d.address for d in stats.daemons] == [str(d.socket_path) for d in (a, b, c)]
        assert [d.this for d in stats.daemons] == [False, True, False]
        cluster.stop(c)
        await until_daemons(on_b, 2)


async def until_daemons(client, count: int) -> None:  # type: ignore[no-untyped-def]
    """Other processes' rows of liveness: nothing to await but their beats."""
    with trio.fail_after(10):
        while len((await client.stats()).daemons) != count:  # noqa: ASYNC110
            await trio.sleep(0.1)


async def test_a_daemon_cut_off_by_the_network_frees_its_conversation_within_seconds(
    cluster, three
):
    """A silent network loss (its packets dropped, no reset): the server ends the lost
    daemon's sessions once keepalives fail, which frees its claim; b then serves the
    conversation, and c's client following the run gets `end` 503."""
    a, b, c = three
    async with connect(b.socket_path) as on_b, connect(c.socket_path) as on_c:
        async with connect(a.socket_path) as on_a, on_a.stream(ASSISTANT, "/slow 2000 20") as run:
            await next_of(run, TextDelta)
            async with on_c.attach(ASSISTANT) as attached:
                await next_of(attached, TextDelta)
                cluster.cut(a)
                cut_at = trio.current_time()
                with trio.fail_after(15):
                    ended = await collect(attached, within=15)
            assert ended[-1].status == "error" and ended[-1].error.code == 503
            async with on_b.stream(ASSISTANT, "mine now") as events:
                got = await collect(events, within=30)
            freed = trio.current_time() - cut_at
        assert got[-1].status == "done"
        assert freed < 15, f"b served the conversation {freed:.1f} s after a was cut off"
        print(f"b served the conversation {freed:.1f} s after a was cut off")
        cluster.heal(a)


async def test_a_holder_that_stops_answering_fails_the_call_with_a_clear_error(cluster, three):
    """a frozen (SIGSTOP) holds its claim but answers nothing: b's kill fails 503 or 504
    within a few seconds, saying the daemon did not answer, and b stays usable."""
    a, b, _ = three
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        on_a.stream(ASSISTANT, "/slow 100 50") as running,
    ):
        await next_of(running, TextDelta)
        a.daemon.proc.send_signal(signal.SIGSTOP)
        try:
            with (
                trio.fail_after(10),
                pytest.raises(ChinwagError, match=r"(stopped|did not) answer") as refused,
            ):
                await on_b.kill(ASSISTANT)
            assert refused.value.code in (503, 504)
            assert [agent.name for agent in await on_b.list_agents()] == ["assistant", "helper"]
        finally:
            a.daemon.proc.send_signal(signal.SIGCONT)
        await collect(running)


def test_doctor_lists_every_daemon_sharing_the_store(three):
    a, b, c = three
    doctor = subprocess.run(
        [sys.executable, "-m", "chinwag.clients.cli", "--socket", str(b.socket_path), "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, NO_COLOR="1", COLUMNS="300"),
    )
    lines = [line for line in doctor.stdout.splitlines() if " pid " in line]
    assert len(lines) == 3, doctor.stdout
    for host, line in zip((a, b, c), lines, strict=True):
        assert str(host.socket_path) in line
    assert "(this one)" in lines[1] and "(this one)" not in lines[0] + lines[2]
