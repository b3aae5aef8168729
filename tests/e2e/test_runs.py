"""End to end: the real `chinwag serve` process, driven over its socket by the client library."""

from __future__ import annotations

import pytest
import trio
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import (
    AskUser,
    End,
    Killed,
    Queued,
    Start,
    Stream,
    TextDelta,
    Title,
    ToolCall,
    ToolResult,
    Usage,
)
from deadlines import FRAME_S, collect, deadline, next_event, next_of, watch_until_end

SLOW_CONFIG = """
[daemon]
shutdown_grace_s = 0.5

[agents.assistant]
provider = "echo"
tools = ["set_title", "ask_user"]

[agents.helper]
provider = "echo"

[agents.brief]
provider = "echo"
tools = ["set_title"]
max_steps = 1
"""

DELEGATE_CONFIG = """
[agents.assistant]
provider = "echo"
tools = ["delegate"]

[agents.helper]
provider = "echo"
"""

# Long enough for a run of /slow 50 100 (5 s) to finish after the SIGTERM.
PATIENT_CONFIG = """
[daemon]
shutdown_grace_s = 30.0

[agents.assistant]
provider = "echo"
"""


def text_of(events) -> str:
    return "".join(e.delta for e in events if isinstance(e, TextDelta))


async def test_stream_echoes_word_by_word_and_stores_the_turn(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "hello there  world") as events:
            got = await collect(events)
        assert isinstance(got[0], Start) and got[0].seq == 1 and got[0].agent == "assistant"
        assert [e.delta for e in got if isinstance(e, TextDelta)] == ["hello", " there", " world"]
        usage = next(e for e in got if isinstance(e, Usage))
        assert usage.completion_tokens == 3 and usage.context_window > 0
        end = got[-1]
        assert isinstance(end, End) and end.status == "done" and end.last_seq == 2
        history = await c.history("assistant")
        assert [(e.seq, e.role, e.content) for e in history.entries] == [
            (1, "user", "hello there  world"),
            (2, "assistant", "hello there world"),
        ]
        assert all(e.run_id == got[0].run_id for e in history.entries)


async def test_streams_on_one_connection_interleave(daemon, raw):
    async with raw(daemon.socket_path) as conn:
        await conn.send(Stream(id=1, agent="assistant", sender="a", content="/slow 5 20"))
        await conn.send(Stream(id=2, agent="assistant", sender="b", content="/slow 5 20"))
        frames = await conn.recv_until(lambda f: isinstance(f, End) and f.id == 2)
        if not any(isinstance(f, End) and f.id == 1 for f in frames):
            frames += await conn.recv_until(lambda f: isinstance(f, End) and f.id == 1)
    first_end = next(i for i, f in enumerate(frames) if isinstance(f, End))
    before = {f.id for f in frames[:first_end] if isinstance(f, TextDelta)}
    assert before == {1, 2}, "both runs streamed before either ended"
    for rid in (1, 2):
        assert text_of(f for f in frames if f.id == rid) == "1 2 3 4 5"


async def test_two_clients_on_one_conversation_are_serialized(daemon):
    async with connect(daemon.socket_path) as a, connect(daemon.socket_path) as b:
        async with a.stream("assistant", "/slow 5 20") as first:
            await next_of(first, Start)
            async with b.stream("assistant", "second") as second:
                queued = await next_event(second)
                assert isinstance(queued, Queued) and queued.position == 1
                rest = await collect(first)
                assert rest[-1].status == "done" and rest[-1].last_seq == 2
                later = await collect(second)
        assert isinstance(later[0], Start) and later[0].seq == 3
        assert later[-1].status == "done"


async def test_reject_policy_gets_409_on_a_busy_conversation(daemon):
    async with connect(daemon.socket_path) as c, c.stream("assistant", "/slow 5 20") as first:
        await next_of(first, Start)
        with pytest.raises(ChinwagError) as err:
            async with c.stream("assistant", "no", queue="reject") as second:
                await collect(second)
        assert err.value.code == 409
        assert (await collect(first))[-1].status == "done"


async def test_interrupt_kills_the_run_in_flight_and_goes_next(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/slow 100 20") as first:
            await next_of(first, TextDelta)
            async with c.stream("assistant", "urgent", queue="interrupt") as second:
                killed = (await collect(first))[-1]
                assert killed.status == "killed"
                events = await collect(second)
        assert [type(e) for e in events][:2] == [Queued, Start]
        assert text_of(events) == "urgent" and events[-1].status == "done"
        history = await c.history("assistant")
        assert [e.content for e in history.entries] == ["/slow 100 20", "urgent", "urgent"]


async def test_kill_mid_stream_keeps_the_user_entry_only(daemon):
    async with connect(daemon.socket_path) as c, connect(daemon.socket_path) as killer:
        async with c.stream("assistant", "/slow 100 20") as events:
            start = await next_of(events, Start)
            await next_of(events, TextDelta)
            killed = await killer.kill("assistant")
            rest = await collect(events)
        assert killed == Killed(id=killed.id, run_id=start.run_id)
        assert rest[-1].status == "killed" and rest[-1].last_seq == 1
        history = await c.history("assistant")
        assert [(e.role, e.content) for e in history.entries] == [("user", "/slow 100 20")]
        assert (await c.kill("assistant")).run_id is None


async def test_kill_all_drops_the_queued_runs(daemon):
    async with connect(daemon.socket_path) as c:
        async with (
            c.stream("assistant", "/slow 100 20") as first,
            c.stream("assistant", "queued one") as second,
        ):
            await next_of(first, Start)
            assert isinstance(await next_event(second), Queued)
            await c.kill("assistant", all=True)
            assert (await collect(first))[-1].status == "killed"
            ends = await collect(second)
            assert [type(e) for e in ends] == [End] and ends[0].status == "killed"
        history = await c.history("assistant")
        assert [e.content for e in history.entries] == ["/slow 100 20"]


async def test_kill_of_an_unknown_conversation_is_404(daemon):
    async with connect(daemon.socket_path) as c:
        with pytest.raises(ChinwagError) as err:
            await c.kill("assistant", "nobody")
        assert err.value.code == 404


async def test_detach_and_disconnect_lose_nothing(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/slow 5 20", sender="detach") as events:
            await next_of(events, TextDelta)
        # Leaving the block detached; the run goes on and is stored.
        async with (
            connect(daemon.socket_path) as gone,
            gone.stream("assistant", "/slow 5 20", sender="gone") as events,
        ):
            await next_of(events, TextDelta)
            await gone.stats()  # the run is mid-stream when the connection drops
    async with connect(daemon.socket_path) as c:
        for sender in ("detach", "gone"):
            async with c.attach("assistant", sender) as events:
                await collect(events)
            history = await c.history("assistant", sender)
            assert [e.content for e in history.entries] == ["/slow 5 20", "1 2 3 4 5"]


async def test_cancel_ends_the_stream_detached(daemon, raw):
    async with raw(daemon.socket_path) as conn:
        await conn.send(Stream(id=7, agent="assistant", content="/slow 5 20"))
        await conn.recv_until(lambda f: isinstance(f, TextDelta))
        from chinwag.protocol import Cancel, Ok

        await conn.send(Cancel(id=8, target=7))
        frames = await conn.recv_until(lambda f: isinstance(f, Ok))
        end = next(f for f in frames if isinstance(f, End))
        assert end.id == 7 and end.status == "detached" and end.last_seq == 1
        assert frames.index(end) < len(frames) - 1, "the target's end comes before the ok"
        await conn.send(Cancel(id=9, target=7))
        from chinwag.protocol import Error

        err = await conn.recv()
        assert isinstance(err, Error) and err.id == 9 and err.code == 404


async def test_attach_replays_the_run_in_flight(daemon):
    async with connect(daemon.socket_path) as a, connect(daemon.socket_path) as b:
        async with a.stream("assistant", "/slow 10 20") as events:
            start = await next_of(events, Start)
            await next_of(events, TextDelta)
            await next_of(events, TextDelta)
            async with b.attach("assistant") as replay:
                seen = await collect(replay)
            await collect(events)
        assert seen[0] == start and text_of(seen) == "1 2 3 4 5 6 7 8 9 10"
        assert seen[-1].status == "done"
        async with b.attach("assistant") as idle:
            (end,) = await collect(idle)
        assert end.status == "idle" and end.last_seq == 2


async def test_ask_user_round_trips_from_a_second_connection(daemon):
    async with connect(daemon.socket_path) as a, connect(daemon.socket_path) as b:
        async with a.stream("assistant", "/ask What colour?") as events:
            call = await next_of(events, ToolCall)
            ask = await next_of(events, AskUser)
            assert call.name == "ask_user" and ask.questions[0].question == "What colour?"
            with pytest.raises(ChinwagError) as err:
                await b.reply_to_ask("assistant", "blue", ask_id="not-it")
            assert err.value.code == 409
            await b.reply_to_ask("assistant", "deep blue", ask_id=ask.ask_id)
            rest = await collect(events)
        result = next(e for e in rest if isinstance(e, ToolResult))
        assert result.output == "deep blue" and not result.is_error
        assert text_of(rest) == "deep blue" and rest[-1].status == "done"
        with pytest.raises(ChinwagError) as err:
            await b.reply_to_ask("assistant", "late")
        assert err.value.code == 404
        history = await a.history("assistant")
        assert [e.role for e in history.entries] == ["user", "assistant", "tool", "assistant"]
        assert history.entries[1].tool_calls[0].call_id == history.entries[2].tool_call_id


async def test_kill_clears_a_pending_ask(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/ask Still there?") as events:
            await next_of(events, AskUser)
            await c.kill("assistant")
            assert (await collect(events))[-1].status == "killed"
        with pytest.raises(ChinwagError) as err:
            await c.reply_to_ask("assistant", "yes")
        assert err.value.code == 404
        history = await c.history("assistant")
        assert [e.role for e in history.entries] == ["user"], "the unfinished step is dropped"


async def test_title_tool_sets_the_title(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/title Trip   to Lisbon") as events:
            got = await collect(events)
        titles = [e.title for e in got if isinstance(e, Title)]
        assert titles == ["Trip to Lisbon"]
        assert (await c.history("assistant")).title == "Trip to Lisbon"
        (item,) = (await c.list_conversations()).items
        assert item.title == "Trip to Lisbon" and not item.running


async def test_tools_outside_the_whitelist_get_an_error_result(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("helper", '/tool set_title {"title": "x"}') as events:
            got = await collect(events)
        result = next(e for e in got if isinstance(e, ToolResult))
        assert result.is_error and "not available" in result.output
        assert got[-1].status == "done"
        history = await c.history("helper")
        assert history.title == "" and history.entries[2].is_error


async def test_provider_failure_and_max_steps_end_in_errors(daemon_factory):
    daemon = daemon_factory(SLOW_CONFIG)
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/fail upstream said no") as events:
            end = (await collect(events))[-1]
        assert end.status == "error" and end.error.code == 502
        assert end.error.message == "upstream said no"
        async with c.stream("brief", "/title Once") as events:
            end = (await collect(events))[-1]
        assert end.status == "error" and end.error.code == 500 and "max_steps" in end.error.message
        history = await c.history("brief")
        assert [e.role for e in history.entries] == ["user", "assistant", "tool"]


async def test_guest_turn_is_attributed_to_the_guest(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "first") as events:
            await collect(events)
        async with c.stream("assistant", "/title guests use no tools", guest="helper") as events:
            got = await collect(events)
        assert got[0].agent == "helper"
        assert not any(isinstance(e, ToolCall | ToolResult) for e in got)
        history = await c.history("assistant")
        assert [(e.role, e.agent) for e in history.entries] == [
            ("user", ""),
            ("assistant", ""),
            ("user", ""),
            ("assistant", "helper"),
        ]


async def test_kill_stops_a_guest_turn_and_keeps_only_its_user_entry(daemon):
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/slow 100 50", guest="helper") as events:
            start = await next_event(events)
            assert isinstance(start, Start) and start.agent == "helper"
            await next_of(events, TextDelta)
            killed = await c.kill("assistant")
            assert killed.run_id == start.run_id
            rest = await collect(events)
        assert rest[-1].status == "killed"
        history = await c.history("assistant")
        assert [(e.role, e.agent, e.content) for e in history.entries] == [
            ("user", "", "/slow 100 50")
        ]


async def test_bad_requests_get_clear_codes(daemon, short_tmp):
    async with connect(daemon.socket_path) as c:
        cases = [
            (dict(agent="nobody", content="x"), 404),
            (dict(agent="assistant", content="x", sender="bad\nsender"), 400),
            (dict(agent="assistant", content="x", sender=""), 400),
            (dict(agent="assistant", content="x", sender="x" * 257), 400),
            (dict(agent="assistant", content="x", guest="assistant"), 400),
            (dict(agent="assistant", content="x", guest="nobody"), 404),
            (dict(agent="assistant", content="x", cwd=str(short_tmp / "missing")), 400),
        ]
        for kwargs, code in cases:
            with pytest.raises(ChinwagError) as err:
                async with c.stream(**kwargs) as events:
                    await collect(events)
            assert err.value.code == code, kwargs
            assert err.value.message.endswith("."), "one clear sentence"
        with pytest.raises(ChinwagError) as err:
            await c.history("assistant", "never-seen")
        assert err.value.code == 404
        # The connection stays usable after every refusal.
        async with c.stream("assistant", "still fine", sender="x" * 256) as events:
            assert (await collect(events))[-1].status == "done"


async def test_list_conversations_pages_most_recent_first(daemon):
    async with connect(daemon.socket_path) as c:
        for n in range(5):
            async with c.stream("assistant", f"hi {n}", sender=f"s{n}") as events:
                await collect(events)
        page = await c.list_conversations(limit=2)
        senders = [i.sender for i in page.items]
        while page.next_cursor is not None:
            page = await c.list_conversations(limit=2, cursor=page.next_cursor)
            senders += [i.sender for i in page.items]
        assert senders == ["s4", "s3", "s2", "s1", "s0"]
        only = await c.list_conversations(sender="s2")
        assert [i.sender for i in only.items] == ["s2"] and only.items[0].last_seq == 2
        with pytest.raises(ChinwagError) as err:
            await c.list_conversations(cursor="garbage")
        assert err.value.code == 400


async def test_list_conversations_searches_titles_and_senders_page_by_page(daemon):
    async with connect(daemon.socket_path) as c:
        assert "conversation_search" in c.welcome.features
        for sender, title in [("s0", "Quokka one"), ("s1", "Other"), ("s2", "QUOKKA two")]:
            async with c.stream("assistant", f"/title {title}", sender=sender) as events:
                await collect(events)
        async with c.stream("helper", "hi", sender="quokka-fan") as events:
            await collect(events)

        page = await c.list_conversations(query="quokka", limit=1)
        senders = [i.sender for i in page.items]
        while page.next_cursor is not None:
            page = await c.list_conversations(query="quokka", limit=1, cursor=page.next_cursor)
            senders += [i.sender for i in page.items]
        assert senders == ["quokka-fan", "s2", "s0"]
        only = await c.list_conversations(agent="assistant", query="Quokka")
        assert [(i.sender, i.title) for i in only.items] == [
            ("s2", "QUOKKA two"),
            ("s0", "Quokka one"),
        ]
        with pytest.raises(ChinwagError) as err:
            await c.list_conversations(query="q" * 1001)
        assert (err.value.code, err.value.message) == (
            400,
            "query must be at most 1000 characters.",
        )


async def test_agents_stats_and_ping(daemon):
    async with connect(daemon.socket_path) as c:
        agents = await c.list_agents()
        assert [a.name for a in agents] == ["assistant", "helper"]
        assert agents[0].tools == ["set_title", "ask_user"]
        await c.ping()
        async with c.stream("assistant", "/slow 5 20") as events:
            await next_of(events, Start)
            stats = await c.stats()
            assert stats.runs_in_flight == 1 and stats.connections >= 1
            await collect(events)
        assert c.welcome.agents == ["assistant", "helper"]


async def test_subscribe_sees_runs_from_other_connections(daemon):
    async with connect(daemon.socket_path) as watcher, connect(daemon.socket_path) as c:
        async with watcher.subscribe(agent="assistant") as sub:
            async with c.stream("helper", "not this one") as events:
                await collect(events)
            async with c.stream("assistant", "watch me", sender="w") as events:
                mine = await collect(events)
            seen = await watch_until_end(sub)
        assert {f.agent for f in seen} == {"assistant"} and {f.sender for f in seen} == {"w"}
        assert [f.event for f in seen] == [
            type(e)(**{**{k: getattr(e, k) for k in e.__struct_fields__}, "id": None}) for e in mine
        ]


async def test_a_run_survives_kill_9_of_the_daemon_without_a_torn_turn(daemon):
    async with connect(daemon.socket_path) as c:
        for word in ("one", "two"):
            async with c.stream("assistant", word) as events:
                await collect(events)
        with pytest.raises(ChinwagError, match="The daemon closed the connection") as lost:
            async with c.stream("assistant", "/slow 100 20") as events:
                await next_of(events, TextDelta)
                daemon.kill9()
                await collect(events)
        assert lost.value.code == 503
    daemon.start()
    async with connect(daemon.socket_path) as c:
        history = await c.history("assistant")
        assert [(e.seq, e.role, e.content) for e in history.entries] == [
            (1, "user", "one"),
            (2, "assistant", "one"),
            (3, "user", "two"),
            (4, "assistant", "two"),
            (5, "user", "/slow 100 20"),
        ]
        async with c.stream("assistant", "three") as events:
            got = await collect(events)
        assert got[0].seq == 6 and got[-1].status == "done"


async def test_sigterm_finishes_short_runs_and_cancels_long_ones(daemon_factory):
    daemon = daemon_factory(SLOW_CONFIG)
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/slow 1000 20") as events:
            await next_of(events, TextDelta)
            daemon.proc.terminate()
            end = (await collect(events))[-1]
        assert end.status == "error" and end.error.code == 503
    assert await trio.to_thread.run_sync(daemon.proc.wait, 10) == 0
    assert not daemon.socket_path.exists()
    daemon.start()
    async with connect(daemon.socket_path) as c:
        history = await c.history("assistant")
        assert [e.role for e in history.entries] == ["user"]


async def test_sigterm_refuses_new_streams_503_while_a_run_in_flight_finishes(daemon_factory):
    daemon = daemon_factory(PATIENT_CONFIG)
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/slow 50 100") as events:
            await next_of(events, TextDelta)
            daemon.proc.terminate()
            with deadline(FRAME_S, "a ping refused 503 once the daemon shuts down"):
                # The daemon's answers say when it has begun to shut down: ping until one
                # is refused (each ping waits for its answer; there is no other event).
                while True:
                    try:
                        await c.ping()
                    except ChinwagError as err:
                        assert err.code == 503, err
                        break
            with pytest.raises(ChinwagError) as refused:
                async with c.stream("assistant", "too late", sender="late") as late:
                    await collect(late)
            assert refused.value.code == 503
            assert refused.value.message == "The daemon is shutting down; retry later."
            rest = await collect(events, what="the run in flight to finish")
        end = rest[-1]
        assert isinstance(end, End) and end.status == "done", end
        assert text_of(rest).split()[-1] == "50", "the run streamed on to its last word"
    assert await trio.to_thread.run_sync(daemon.proc.wait, 10) == 0
    daemon.start()
    async with connect(daemon.socket_path) as c:
        history = await c.history("assistant")
        assert [e.role for e in history.entries] == ["user", "assistant"]
        assert history.entries[1].content == " ".join(str(i) for i in range(1, 51))
        with pytest.raises(ChinwagError) as err:
            await c.history("assistant", "late")
        assert err.value.code == 404, "the refused stream stored nothing"


async def test_delegate_returns_the_helpers_answer_and_streams_none_of_its_text(
    daemon_factory,
):
    daemon = daemon_factory(DELEGATE_CONFIG)
    arguments = '{"agent": "helper", "message": "hi there"}'
    async with connect(daemon.socket_path) as c, connect(daemon.socket_path) as watcher:
        async with watcher.subscribe(agent="helper") as helper_run:
            async with c.stream("assistant", f"/tool delegate {arguments}") as events:
                got = await collect(events)
            seen = await watch_until_end(helper_run)

        assert [type(e) for e in got if isinstance(e, Start | End)] == [Start, End]
        assert got[0].agent == "assistant" and got[-1].status == "done"
        (call,) = [e for e in got if isinstance(e, ToolCall)]
        assert (call.name, call.arguments) == ("delegate", arguments)
        (result,) = [e for e in got if isinstance(e, ToolResult)]
        assert result.call_id == call.call_id
        assert result.output == "hi there" and not result.is_error
        # The helper's own deltas would come before the result: the only text is the
        # assistant's echo of the result, after it.
        at = got.index(result)
        assert not any(isinstance(e, TextDelta) for e in got[:at])
        assert [e.delta for e in got[at:] if isinstance(e, TextDelta)] == ["hi", " there"]

        # The helper did stream its answer, to its own conversation only.
        assert {(f.agent, f.sender) for f in seen} == {("helper", "agent:assistant")}
        assert text_of(f.event for f in seen) == "hi there"

        delegated = await c.history("helper", "agent:assistant")
        assert [(e.role, e.content) for e in delegated.entries] == [
            ("user", "hi there"),
            ("assistant", "hi there"),
        ]
        mine = await c.history("assistant")
        assert [(e.role, e.content) for e in mine.entries] == [
            ("user", f"/tool delegate {arguments}"),
            ("assistant", ""),
            ("tool", "hi there"),
            ("assistant", "hi there"),
        ]
        assert mine.entries[2].tool_call_id == call.call_id


async def test_a_burst_larger_than_the_buffer_reaches_a_reading_client(daemon_factory):
    # 9,000 deltas with no pause between them, past outgoing_frames: a client that
    # reads gets them all (the run lets the writer drain as the burst grows).
    daemon = daemon_factory(
        '[daemon]\noutgoing_frames = 2048\n[agents.assistant]\nprovider = "echo"\n'
    )
    async with connect(daemon.socket_path) as c, c.stream("assistant", "/slow 9000 0") as events:
        got = await collect(events)
    assert got[-1].status == "done"
    assert sum(isinstance(e, TextDelta) for e in got) == 9000
