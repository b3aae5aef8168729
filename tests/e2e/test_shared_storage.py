"""Two daemons on one PostgreSQL database: a conversation runs on one daemon at a time."""

from __future__ import annotations

from chinwag.clients import connect
from chinwag.protocol import End, Queued, Start, TextDelta
from deadlines import collect, next_event


async def test_a_conversation_busy_on_one_daemon_waits_on_the_other(daemon_factory, postgres_url):
    first = daemon_factory(storage_url=postgres_url, name="first")
    second = daemon_factory(storage_url=postgres_url, name="second")
    async with connect(first.socket_path) as a, connect(second.socket_path) as b:
        async with a.stream("assistant", "/slow 20 20") as running:
            assert isinstance(await next_event(running), Start)
            assert isinstance(await next_event(running), TextDelta)
            async with b.stream("assistant", "rejected", queue="reject") as refused:
                (end,) = await collect(refused)
            assert end.status == "error" and end.error.code == 409
            async with b.stream("assistant", "after you") as waiting:
                assert isinstance(await next_event(waiting), Queued)
                rest = await collect(running)
                assert rest[-1].status == "done" and rest[-1].last_seq == 2
                later = await collect(waiting)
        start = next(e for e in later if isinstance(e, Start))
        assert start.seq == 3, "the second daemon re-read what the first one stored"
        assert isinstance(later[-1], End) and later[-1].status == "done"
        history = await a.history("assistant")
        assert [e.content for e in history.entries] == [
            "/slow 20 20",
            " ".join(str(n) for n in range(1, 21)),
            "after you",
            "after you",
        ]


async def test_a_dead_daemon_frees_its_conversations(daemon_factory, postgres_url):
    first = daemon_factory(storage_url=postgres_url, name="first")
    second = daemon_factory(storage_url=postgres_url, name="second")
    async with (
        connect(first.socket_path) as a,
        a.stream("assistant", "/slow 1000 20") as running,
    ):
        await next_event(running)
        first.kill9()
    async with connect(second.socket_path) as b, b.stream("assistant", "mine now") as events:
        got = await collect(events)
    assert got[-1].status == "done"
    start = next(e for e in got if isinstance(e, Start))
    assert start.seq == 2, "the killed run kept its user entry, nothing torn"
