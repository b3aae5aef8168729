"""The client library against a real `chinwag serve`, on asyncio and on trio."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import anyio
import pytest
from chinwag.clients import ChinwagError, Client, ConnectionLost, EventStream, connect
from chinwag.protocol import (
    AskUser,
    Encoding,
    End,
    Event,
    Queued,
    Start,
    StreamEventMsg,
    TextDelta,
    Title,
    ToolCall,
    ToolResult,
    Usage,
)

Runner = Callable[[Callable[[], Awaitable[object]]], object]

_senders = itertools.count()


def fresh_sender() -> str:
    """A conversation of its own for each test: the daemon is shared by nothing else,
    but a unique sender keeps every assertion about history exact."""
    return f"client-test-{next(_senders)}"


def text_of(events: list[StreamEventMsg]) -> str:
    return "".join(e.delta for e in events if isinstance(e, TextDelta))


async def next_of(events: EventStream, kind: type[StreamEventMsg]) -> StreamEventMsg:
    async for event in events:
        if isinstance(event, kind):
            return event
    raise AssertionError(f"the stream ended without a {kind.__name__}")


def test_handshake(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path, client="client-tests") as c:
            assert c.welcome.protocol == 1
            assert sorted(c.welcome.agents) == ["assistant", "helper"]
            assert c.welcome.max_frame_bytes > 0
            await c.ping()
            stats = await c.stats()
            assert stats.connections >= 1

    run(main)


@pytest.mark.parametrize("encoding", [Encoding.MSGPACK, Encoding.JSON])
def test_stream_yields_start_words_usage_end(daemon, run: Runner, encoding: Encoding) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path, encoding=encoding) as c,
            c.stream("assistant", "the quick brown fox", sender=sender) as events,
        ):
            got = await events.collect()
        assert isinstance(got[0], Start)
        assert got[0].agent == "assistant"
        assert got[0].seq == 1
        deltas = [e for e in got if isinstance(e, TextDelta)]
        assert [d.delta.strip() for d in deltas] == ["the", "quick", "brown", "fox"]
        assert text_of(got) == "the quick brown fox"
        assert any(isinstance(e, Usage) for e in got)
        end = got[-1]
        assert isinstance(end, End)
        assert (end.status, end.error, end.last_seq) == ("done", None, 2)
        assert all(e.id == events.id for e in got)

    run(main)


def test_two_streams_interleave_on_one_connection(daemon, run: Runner) -> None:
    a, b = fresh_sender(), fresh_sender()

    async def main() -> None:
        order: list[str] = []
        results: dict[str, list[StreamEventMsg]] = {}

        async def consume(c: Client, sender: str) -> None:
            async with c.stream("assistant", "/slow 6 30", sender=sender) as events:
                got = []
                async for event in events:
                    got.append(event)
                    if isinstance(event, TextDelta):
                        order.append(sender)
                results[sender] = got

        async with connect(daemon.socket_path) as c, anyio.create_task_group() as tasks:
            tasks.start_soon(consume, c, a)
            tasks.start_soon(consume, c, b)

        for sender in (a, b):
            end = results[sender][-1]
            assert isinstance(end, End) and end.status == "done"
            assert text_of(results[sender]).split() == [str(n) for n in range(1, 7)]
        # Interleaved: neither stream's words all arrived before the other's began.
        assert order.index(b) < len(order) - 1 - order[::-1].index(a)
        assert order.index(a) < len(order) - 1 - order[::-1].index(b)

    run(main)


def test_history_after_a_run(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "hello history", sender=sender) as events:
                await events.collect()
            history = await c.history("assistant", sender)
        assert (history.agent, history.sender) == ("assistant", sender)
        assert [(e.seq, e.role, e.content) for e in history.entries] == [
            (1, "user", "hello history"),
            (2, "assistant", "hello history"),
        ]
        assert history.last_seq == 2

    run(main)


def test_kill_ends_the_run_killed_and_keeps_the_user_entry(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path) as c,
            c.stream("assistant", "/slow 50 20", sender=sender) as events,
        ):
            start = await next_of(events, Start)
            await next_of(events, TextDelta)
            killed = await c.kill("assistant", sender)
            rest = await events.collect()
            history = await c.history("assistant", sender)
        assert isinstance(start, Start)
        assert killed.run_id == start.run_id
        end = rest[-1]
        assert isinstance(end, End) and end.status == "killed"
        assert [(e.role, e.content) for e in history.entries] == [("user", "/slow 50 20")]

    run(main)


def test_kill_with_nothing_running(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "hi", sender=sender) as events:
                await events.collect()
            killed = await c.kill("assistant", sender)
        assert killed.run_id is None

    run(main)


def test_error_frames_raise_chinwag_error_with_the_code(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            with pytest.raises(ChinwagError) as info:
                async with c.stream("no-such-agent", "hi") as events:
                    await events.collect()
            assert info.value.code == 404
            assert info.value.message
            with pytest.raises(ChinwagError) as info:
                await c.history("assistant", "nobody-ever")
            assert info.value.code == 404
            with pytest.raises(ChinwagError) as info:
                await c.reply_to_ask("no-such-agent", "yes")
            assert info.value.code == 404
            await c.ping()  # the connection survives its requests' errors

    run(main)


def test_subscribe_sees_a_run_from_another_connection(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path) as watcher,
            connect(daemon.socket_path) as runner,
            watcher.subscribe(agent="assistant", sender=sender) as subscription,
        ):
            async with runner.stream("assistant", "seen from afar", sender=sender) as events:
                ran = await events.collect()
            frames: list[Event] = []
            async for frame in subscription:
                frames.append(frame)
                if isinstance(frame.event, End):
                    break
        start = ran[0]
        assert isinstance(start, Start)
        assert {(f.agent, f.sender, f.run_id) for f in frames} == {
            ("assistant", sender, start.run_id)
        }
        assert isinstance(frames[0].event, Start)
        end = frames[-1].event
        assert isinstance(end, End) and end.status == "done"
        assert text_of([f.event for f in frames]) == "seen from afar"

    run(main)


def test_leaving_a_stream_early_detaches_and_the_run_goes_on(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "/slow 5 30", sender=sender) as events:
                await next_of(events, Start)
            # The run was not killed: attach follows it to its end.
            async with c.attach("assistant", sender) as attached:
                got = await attached.collect()
            end = got[-1]
            # `idle` only if it already finished: either way it was not killed.
            assert isinstance(end, End) and end.status in ("done", "idle")
            history = await c.history("assistant", sender)
            assert [e.role for e in history.entries] == ["user", "assistant"]
            assert history.entries[1].content.split() == ["1", "2", "3", "4", "5"]

    run(main)


def test_attach_replays_a_run_in_flight(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path) as first,
            connect(daemon.socket_path) as second,
            first.stream("assistant", "/slow 8 30", sender=sender) as events,
        ):
            await next_of(events, TextDelta)
            async with second.attach("assistant", sender) as attached:
                replayed = await attached.collect()
            original = await events.collect()
        assert isinstance(replayed[0], Start)
        assert text_of(replayed).split() == [str(n) for n in range(1, 9)]
        end = replayed[-1]
        assert isinstance(end, End) and end.status == "done"
        assert isinstance(original[-1], End) and original[-1].status == "done"

    run(main)


def test_attach_with_nothing_running_ends_idle(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "hi", sender=sender) as events:
                await events.collect()
            async with c.attach("assistant", sender) as attached:
                got = await attached.collect()
        assert len(got) == 1
        assert isinstance(got[0], End) and got[0].status == "idle"

    run(main)


def test_ask_user_and_reply(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path) as c,
            c.stream("assistant", "/ask Which colour?", sender=sender) as events,
        ):
            ask = await next_of(events, AskUser)
            assert isinstance(ask, AskUser)
            assert ask.questions[0].question == "Which colour?"
            await c.reply_to_ask("assistant", "teal", sender=sender, ask_id=ask.ask_id)
            rest = await events.collect()
        end = rest[-1]
        assert isinstance(end, End) and end.status == "done"
        results = [e for e in rest if isinstance(e, ToolResult)]
        assert results and "teal" in results[0].output
        assert "teal" in text_of(rest)

    run(main)


def test_title_event(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "/title Gardening", sender=sender) as events:
                got = await events.collect()
            history = await c.history("assistant", sender)
        assert any(isinstance(e, ToolCall) and e.name == "set_title" for e in got)
        assert [e.title for e in got if isinstance(e, Title)] == ["Gardening"]
        assert history.title == "Gardening"

    run(main)


def test_listing_agents_and_conversations(daemon, run: Runner) -> None:
    senders = [fresh_sender() for _ in range(3)]

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            for sender in senders:
                async with c.stream("helper", "hi", sender=sender) as events:
                    await events.collect()
            agents = await c.list_agents()
            page = await c.list_conversations(agent="helper", limit=2)
            every = [item async for item in c.iter_conversations(agent="helper", page_size=2)]
        assert {a.name for a in agents} == {"assistant", "helper"}
        assert len(page.items) == 2 and page.next_cursor is not None
        assert sorted(item.sender for item in every) == sorted(senders)
        # Most recently updated first.
        assert [item.sender for item in every] == senders[::-1]

    run(main)


def test_dropped_daemon_raises_connection_lost(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "/slow 50 20", sender=sender) as events:
                await next_of(events, TextDelta)
                await anyio.to_thread.run_sync(daemon.kill9)
                with pytest.raises(ConnectionLost, match=r"daemon closed the connection\. \(503\)"):
                    await events.collect()
            with pytest.raises(ConnectionLost, match=r"daemon closed the connection\. \(503\)"):
                await c.ping()

    run(main)


def test_a_stream_iterated_without_its_context(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            got = [event async for event in c.stream("assistant", "no context", sender=sender)]
        assert isinstance(got[0], Start)
        assert text_of(got) == "no context"
        assert isinstance(got[-1], End) and got[-1].status == "done"

    run(main)


def test_cancel_detaches_an_open_stream(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path) as c,
            c.stream("assistant", "/slow 100 20", sender=sender) as events,
        ):
            await next_of(events, TextDelta)
            await c.cancel(events.id)
            rest = await events.collect()
            end = rest[-1]
            assert isinstance(end, End) and end.status == "detached"
            with pytest.raises(ChinwagError) as info:
                await c.cancel(events.id)  # no longer open
            assert info.value.code == 404
            killed = await c.kill("assistant", sender)  # detaching did not kill it
            assert killed.run_id is not None

    run(main)


def test_queued_runs_and_queue_policies(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path) as c,
            c.stream("assistant", "/slow 100 20", sender=sender) as first,
        ):
            await next_of(first, TextDelta)
            with pytest.raises(ChinwagError) as info:
                async with c.stream("assistant", "no", sender=sender, queue="reject") as ev:
                    await ev.collect()
            assert info.value.code == 409
            async with c.stream("assistant", "waiting", sender=sender) as second:
                queued = await second.__anext__()
                assert queued == Queued(id=second.id, position=1)
                async with c.stream(
                    "assistant", "cutting in", sender=sender, queue="interrupt"
                ) as third:
                    cut_in = await third.collect()
                first_rest = await first.collect()
                second_all = await second.collect()
        end = first_rest[-1]
        assert isinstance(end, End) and end.status == "killed"
        assert text_of(cut_in) == "cutting in"
        # The interrupting run went ahead of the one queued before it.
        cut_in_seq = [e.seq for e in cut_in if isinstance(e, Start)]
        second_seq = [e.seq for e in second_all if isinstance(e, Start)]
        assert len(cut_in_seq) == len(second_seq) == 1
        assert cut_in_seq[0] < second_seq[0]
        assert text_of(second_all) == "waiting"
        assert isinstance(second_all[-1], End) and second_all[-1].status == "done"

    run(main)


def test_guest_turn(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "hello host", sender=sender) as events:
                await events.collect()
            async with c.stream(
                "assistant", "hello guest", sender=sender, guest="helper"
            ) as events:
                got = await events.collect()
            history = await c.history("assistant", sender, after_seq=2)
        start = got[0]
        assert isinstance(start, Start) and start.agent == "helper"
        assert [(e.role, e.agent) for e in history.entries] == [
            ("user", ""),
            ("assistant", "helper"),
        ]

    run(main)


def test_compact(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.stream("assistant", "worth keeping", sender=sender) as events:
                await events.collect()
            done = await c.compact("assistant", sender, instructions="keep it short")
            assert (done.archive, done.archived_entries) == ("archive-1-2", 2)
            with pytest.raises(ChinwagError) as info:
                await c.compact("assistant", sender)
            assert info.value.code == 409
            current = await c.history("assistant", sender)
            everything = await c.history("assistant", sender, include_archived=True)
        assert [e.kind for e in current.entries] == ["compact"]
        assert [e.kind for e in everything.entries] == ["message", "message", "compact"]

    run(main)


def test_kill_all_drops_the_queue_too(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def main() -> None:
        async with (
            connect(daemon.socket_path) as c,
            c.stream("assistant", "/slow 100 20", sender=sender) as first,
            c.stream("assistant", "never runs", sender=sender) as second,
        ):
            start = await next_of(first, Start)
            assert isinstance(await second.__anext__(), Queued)
            killed = await c.kill("assistant", sender, all=True)
            first_rest = await first.collect()
            second_rest = await second.collect()
            history = await c.history("assistant", sender)
        assert isinstance(start, Start) and killed.run_id == start.run_id
        for rest in (first_rest, second_rest):
            end = rest[-1]
            assert isinstance(end, End) and end.status == "killed"
        assert not any(isinstance(e, Start) for e in second_rest)  # it never started
        assert [e.content for e in history.entries] == ["/slow 100 20"]

    run(main)


def test_conversations_survive_a_daemon_restart(daemon, run: Runner) -> None:
    sender = fresh_sender()

    async def before() -> None:
        async with (
            connect(daemon.socket_path) as c,
            c.stream("assistant", "still here", sender=sender) as events,
        ):
            await events.collect()

    async def after() -> None:
        async with connect(daemon.socket_path) as c:
            history = await c.history("assistant", sender)
            async with c.stream("assistant", "and again", sender=sender) as events:
                got = await events.collect()
        assert [e.content for e in history.entries] == ["still here", "still here"]
        start = got[0]
        assert isinstance(start, Start) and start.seq == 3

    run(before)
    daemon.restart()
    run(after)
