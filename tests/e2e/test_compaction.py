"""End to end on every backend: compaction, its archives, memory search, and guest attribution.

The real `chinwag serve` on the echo model, whose summary is one line per
archived message (who wrote it, and its first eight words), so every
assertion on a summary is exact.
"""

from __future__ import annotations

import json

import pytest
import trio
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import (
    JSON,
    Compact,
    Compacted,
    Compaction,
    End,
    Start,
    Stream,
    TextDelta,
    ToolResult,
)
from chinwag.storage import open_store
from deadlines import FRAME_S, collect, deadline, next_event

CONFIG = """
[daemon]
shutdown_grace_s = 0.5

[agents.assistant]
provider = "echo"
tools = ["set_title", "memory_search", "memory_note"]

[agents.helper]
provider = "echo"

[agents.other]
provider = "echo"
tools = ["memory_search"]
"""

AUTO_CONFIG = """
[daemon]
shutdown_grace_s = 0.5

[agents.assistant]
provider = "echo"
context_window = 100
compact_at = 0.5

[agents.roomy]
provider = "echo"
context_window = 100
"""

CAT = "my cat is called Pixel and she is nine years old"
CAR = "my first car was a red Volvo and its name was Bertha"


async def turn(client, content: str, *, agent: str = "assistant", **kwargs) -> list:
    async with client.stream(agent, content, **kwargs) as events:
        got = await collect(events, within=20)
    assert isinstance(got[-1], End) and got[-1].status == "done", got[-1]
    return got


def text_of(events) -> str:
    return "".join(e.delta for e in events if isinstance(e, TextDelta))


async def test_compaction_archives_every_turn_and_the_history_restarts_at_its_marker(
    daemon_factory, store_url
):
    daemon = daemon_factory(CONFIG, store_url)
    async with connect(daemon.socket_path) as c:
        await turn(c, CAT)
        await turn(c, "/title Cats")  # user, assistant with a tool call, its result, answer
        await turn(c, "what do you think of her", guest="helper")
        done = await c.compact("assistant", instructions="keep the cat's name")
        assert (done.archive, done.archived_entries) == ("archive-1-8", 8)
        assert done.summary.splitlines() == [
            "user: my cat is called Pixel and she is",
            "assistant: my cat is called Pixel and she is",
            "user: /title Cats",
            "assistant: Title set to 'Cats'.",
            "user: what do you think of her",
            "helper: what do you think of her",
        ]

        history = await c.history("assistant")
        assert history.last_seq == 9
        [marker] = history.entries
        assert (marker.seq, marker.kind, marker.role) == (9, "compact", "")
        assert (marker.archive, marker.content) == (done.archive, done.summary)
        everything = (await c.history("assistant", include_archived=True)).entries
        assert [e.seq for e in everything] == list(range(1, 10))
        assert [e.agent for e in everything[:8]] == ["", "", "", "", "", "", "", "helper"]
        assert everything[4].role == "tool" and everything[3].tool_calls[0].name == "set_title"

        await turn(c, "and now")
        after = (await c.history("assistant")).entries
        assert [(e.seq, e.kind, e.role) for e in after] == [
            (9, "compact", ""),
            (10, "message", "user"),
            (11, "message", "assistant"),
        ]
    daemon.stop()
    if store_url == "memory:":
        return
    async with open_store(store_url) as store:
        archive = await store.get_archive("assistant", "user", "archive-1-8")
    assert archive is not None
    assert (archive.first_seq, archive.last_seq, archive.summary) == (1, 8, done.summary)
    assert archive.speakers == ["", "", "", "", "", "", "", "helper"], "attribution survives"


async def test_compacting_twice_leaves_two_markers_and_two_archives(daemon_factory, store_url):
    daemon = daemon_factory(CONFIG, store_url)
    async with connect(daemon.socket_path) as c:
        await turn(c, CAT)
        first = await c.compact("assistant")
        await turn(c, "second turn")
        second = await c.compact("assistant")
        assert (first.archive, first.archived_entries) == ("archive-1-2", 2)
        assert (second.archive, second.archived_entries) == ("archive-4-5", 2)
        # The second summary carries the first forward, then what followed it.
        assert second.summary.splitlines() == [
            *first.summary.splitlines(),
            "user: second turn",
            "assistant: second turn",
        ]
        visible = (await c.history("assistant")).entries
        assert [(e.seq, e.archive) for e in visible] == [(3, "archive-1-2"), (6, "archive-4-5")]
        everything = (await c.history("assistant", include_archived=True)).entries
        assert [e.seq for e in everything] == [1, 2, 3, 4, 5, 6]
        assert [e.kind for e in everything].count("compact") == 2
    if store_url != "memory:":
        daemon.restart()
        async with connect(daemon.socket_path) as c:
            visible = (await c.history("assistant")).entries
            assert [e.seq for e in visible] == [3, 6]
            await turn(c, "after the restart")
            assert (await c.compact("assistant")).archive == "archive-7-8"


async def test_compact_refuses_what_it_cannot_do(daemon_factory, store_url):
    daemon = daemon_factory(CONFIG, store_url)
    async with connect(daemon.socket_path) as c:
        with pytest.raises(ChinwagError) as unknown:
            await c.compact("assistant", "nobody")
        assert unknown.value.code == 404
        with pytest.raises(ChinwagError) as agent:
            await c.compact("ghost")
        assert agent.value.code == 404
        await turn(c, "hello")
        await c.compact("assistant")
        with pytest.raises(ChinwagError) as empty:
            await c.compact("assistant")
        assert empty.value.code == 409
        assert "nothing to compact" in empty.value.message
        assert [e.seq for e in (await c.history("assistant", include_archived=True)).entries] == [
            1,
            2,
            3,
        ]


async def test_a_compaction_waits_for_the_run_before_it_and_archives_it(daemon):
    async with connect(daemon.socket_path) as c:
        await turn(c, "first")
        async with c.stream("assistant", "/slow 3 100") as events:
            assert isinstance(await next_event(events), Start)
            compacted = []
            async with trio.open_nursery() as nursery:

                async def compact() -> None:
                    compacted.append(await c.compact("assistant"))

                nursery.start_soon(compact)
                rest = await collect(events)
                assert not compacted, "the compaction waited for the run in flight"
        assert rest[-1].status == "done"
        assert compacted[0].archived_entries == 4
        assert compacted[0].summary.splitlines()[-1] == "assistant: 1 2 3"


async def test_kill_all_drops_a_queued_compaction_and_nothing_is_archived(daemon):
    async with connect(daemon.socket_path) as c:
        await turn(c, "first")
        async with c.stream("assistant", "/slow 50 100") as events:
            assert isinstance(await next_event(events), Start)
            outcome: list[BaseException] = []
            async with trio.open_nursery() as nursery:

                async def compact() -> None:
                    try:
                        await c.compact("assistant")
                    except ChinwagError as exc:
                        outcome.append(exc)

                nursery.start_soon(compact)
                async with connect(daemon.socket_path) as killer:
                    with deadline(FRAME_S, "the compaction to wait in the queue"):
                        # The daemon is another process: its queue is seen by asking.
                        while (await killer.stats()).runs_queued < 1:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    await killer.kill("assistant", all=True)
            assert (await collect(events))[-1].status == "killed"
        [refused] = outcome
        assert isinstance(refused, ChinwagError) and refused.code == 409
        assert "killed" in refused.message
        kinds = [e.kind for e in (await c.history("assistant", include_archived=True)).entries]
        assert "compact" not in kinds


async def test_memory_search_finds_a_fact_from_an_archived_turn(daemon_factory, store_url):
    daemon = daemon_factory(CONFIG, store_url)
    async with connect(daemon.socket_path) as c:
        await turn(c, CAR)
        done = await c.compact("assistant")
        assert "Bertha" not in done.summary, "the fact is only in the archived turn"
        events = await turn(c, '/tool memory_search {"query": "Bertha"}')
        [result] = [e for e in events if isinstance(e, ToolResult)]
        assert not result.is_error
        assert "archive 'archive-1-2' (conversation with user" in result.output
        assert "[Bertha]" in result.output

        note = json.dumps({"name": "car", "content": "Bertha is a red Volvo from 1998"})
        await turn(c, f"/tool memory_note {note}")
        hits = await c.search_memory("assistant", "volvo 1998")
        assert [(h.kind, h.name, h.sender) for h in hits] == [
            ("note", "car", None),
            ("archive", "archive-1-2", "user"),
        ], "the note holds both words and ranks first"
        assert "[1998]" in hits[0].snippet
        assert await c.search_memory("other", "Bertha") == [], "memory is per agent"
        assert await c.search_memory("assistant", "?!") == []
        with pytest.raises(ChinwagError) as bad:
            await c.search_memory("assistant", "x", limit=0)
        assert bad.value.code == 400
    if store_url != "memory:":
        daemon.restart()
        async with connect(daemon.socket_path) as c:
            hits = await c.search_memory("assistant", "Bertha")
            assert {h.name for h in hits} == {"car", "archive-1-2"}


async def test_auto_compaction_runs_before_the_next_turn_and_says_so(daemon_factory, store_url):
    daemon = daemon_factory(AUTO_CONFIG, store_url)
    words = " ".join(f"w{i}" for i in range(30))  # 30 words in, 30 out: 60 > 0.5 x 100
    async with connect(daemon.socket_path) as c:
        first = await turn(c, words)
        assert not any(isinstance(e, Compaction) for e in first)
        second = await turn(c, "short")
        assert isinstance(second[0], Compaction), second[0]
        assert (second[0].archive, second[0].archived_entries) == ("archive-1-2", 2)
        assert isinstance(second[1], Start) and second[1].seq == 4
        assert text_of(second) == "short"
        visible = (await c.history("assistant")).entries
        assert [(e.seq, e.kind) for e in visible] == [
            (3, "compact"),
            (4, "message"),
            (5, "message"),
        ]
        third = await turn(c, "small")  # the context is small again: no compaction
        assert not any(isinstance(e, Compaction) for e in third)

        # Without compact_at the same growth never compacts.
        await turn(c, words, agent="roomy")
        later = await turn(c, "short", agent="roomy")
        assert not any(isinstance(e, Compaction) for e in later)
        assert all(e.kind == "message" for e in (await c.history("roomy")).entries)


async def test_a_compact_keeps_its_place_before_a_stream_sent_after_it(daemon, raw):
    async with connect(daemon.socket_path) as c:
        await turn(c, "before")
    async with raw(daemon.socket_path) as conn:
        both = JSON.encode_frame(Compact(id=1, agent="assistant")) + JSON.encode_frame(
            Stream(id=2, agent="assistant", content="after")
        )
        await conn.send_bytes(both)  # one write: the daemon reads them together
        frames = await conn.recv_until(lambda f: isinstance(f, End) and f.id == 2)
        compacted = [f for f in frames if isinstance(f, Compacted)]
        if not compacted:
            compacted = [await conn.recv()]
    assert (compacted[0].archive, compacted[0].archived_entries) == ("archive-1-2", 2)
    start = next(f for f in frames if isinstance(f, Start))
    assert start.seq == 4, "the stream's turn follows the marker at seq 3"


async def test_compacting_a_conversation_never_created_leaves_no_trace(daemon):
    async with connect(daemon.socket_path) as c:
        with pytest.raises(ChinwagError) as unknown:
            await c.compact("assistant", "ghost")
        assert unknown.value.code == 404
        assert (await c.stats()).conversations == 0
        assert (await c.list_conversations()).items == []


SCOPED_CONFIG = """
[daemon]
shutdown_grace_s = 0.5

[agents.assistant]
provider = "echo"
tools = ["memory_search", "memory_note"]
memory_scope = "conversation"
"""


async def test_a_conversation_scoped_agent_never_shows_one_sender_anothers_archive(
    daemon_factory,
):
    daemon = daemon_factory(SCOPED_CONFIG)
    async with connect(daemon.socket_path) as c:
        await turn(c, CAR, sender="tg:alice")
        await c.compact("assistant", "tg:alice")
        search = '/tool memory_search {"query": "Bertha"}'
        [alice] = [e for e in await turn(c, search, sender="tg:alice") if isinstance(e, ToolResult)]
        [bob] = [e for e in await turn(c, search, sender="tg:bob") if isinstance(e, ToolResult)]
    assert "[Bertha]" in alice.output
    assert bob.output == "Nothing in memory matches 'Bertha'."


async def test_a_v1_client_that_did_not_ask_gets_no_compaction_event(daemon_factory, raw):
    daemon = daemon_factory(AUTO_CONFIG)
    words = " ".join(f"w{i}" for i in range(30))
    async with raw(daemon.socket_path) as conn:  # its hello names no features
        await conn.send(Stream(id=1, agent="assistant", content=words))
        await conn.recv_until(lambda f: isinstance(f, End))
        await conn.send(Stream(id=2, agent="assistant", content="short"))
        frames = await conn.recv_until(lambda f: isinstance(f, End))
    assert not any(isinstance(f, Compaction) for f in frames)
    start = next(f for f in frames if isinstance(f, Start))
    assert start.seq == 4, "compacted all the same: the marker took seq 3"
