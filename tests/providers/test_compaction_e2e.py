"""End to end against the fake OpenAI server: what the model is asked to summarize, and
what it sees once a conversation is compacted, on every storage backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from chinwag.clients import ChinwagError, connect
from chinwag.daemon._compaction import SUMMARY_PROMPT
from chinwag.protocol import End
from deadlines import collect, deadline
from fake_openai import (
    SSE,
    FakeOpenAI,
    answer,
    finish,
    open_fake_openai,
    text,
    tool_delta,
    usage,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as server:
        yield server


def config_for(server: FakeOpenAI) -> str:
    return f"""
[daemon]
shutdown_grace_s = 0.5

[providers.fake]
kind = "openai"
base_url = "{server.base_url}"
api_key = "test"
max_retries = 0

[agents.assistant]
provider = "fake"
model = "main-model"
system_prompt = "You are the test assistant."
tools = ["set_title", "memory_search"]

[agents.helper]
provider = "fake"
model = "helper-model"
system_prompt = "You are the helper."
"""


async def turn(daemon, content: str, **kwargs) -> list:
    async with connect(daemon.socket_path) as c, c.stream("assistant", content, **kwargs) as ev:
        events = await collect(ev, within=20)
    assert isinstance(events[-1], End) and events[-1].status == "done", events[-1]
    return events


async def test_the_summary_request_and_the_context_after_compaction(
    fake, daemon_factory, store_url
):
    fake.script(
        # Turn 1: a tool step, then the answer.
        SSE(
            [
                tool_delta(0, '{"title": "Pets"}', call_id="call_t", name="set_title"),
                finish("tool_calls"),
                usage(30, 5),
            ]
        ),
        answer("Noted: Pixel the cat."),
        # Turn 2: a guest speaks.
        answer("A fine cat name."),
        # The compaction's summary.
        answer("The user has a cat named Pixel; helper liked the name."),
        # Turn 3, after the compaction.
        answer("Pixel it is."),
    )
    daemon = daemon_factory(config_for(fake), store_url)
    await turn(daemon, "My cat is Pixel.")
    await turn(daemon, "Nice name?", guest="helper")
    async with connect(daemon.socket_path) as c:
        done = await c.compact("assistant", instructions="the cat's name")
    assert done.summary == "The user has a cat named Pixel; helper liked the name."
    assert done.archived_entries == 6

    summarize = fake.bodies[3]
    assert summarize["model"] == "main-model"
    assert "tools" not in summarize, "the summarizer is offered no tools"
    system, ask = summarize["messages"]
    assert system == {"role": "system", "content": SUMMARY_PROMPT.format(agent="assistant")}
    assert ask["role"] == "user"
    transcript = ask["content"]
    assert "The summary must also keep: the cat's name" in transcript
    for heading in [
        "## 1 · user\nMy cat is Pixel.",
        '## 2 · agent assistant\n(calls set_title {"title": "Pets"})',
        "## 3 · tool result of set_title\nTitle set to 'Pets'.",
        "## 4 · agent assistant\nNoted: Pixel the cat.",
        "## 5 · user\nNice name?",
        "## 6 · agent helper\nA fine cat name.",
    ]:
        assert heading in transcript, heading

    await turn(daemon, "So?")
    after = fake.bodies[4]["messages"]
    assert after[0] == {"role": "system", "content": "You are the test assistant."}
    assert after[1]["role"] == "system"
    assert after[1]["content"].startswith(
        "The earlier part of this conversation was compacted into the archive 'archive-1-6'."
    )
    assert f"<summary>\n{done.summary}\n</summary>" in after[1]["content"]
    assert "memory_search finds the archived details." in after[1]["content"]
    assert after[2:] == [{"role": "user", "content": "So?"}], "nothing archived, no orphan"
    assert [t["function"]["name"] for t in fake.bodies[4]["tools"]] == [
        "set_title",
        "memory_search",
    ]

    async with connect(daemon.socket_path) as c:
        entries = (await c.history("assistant")).entries
    assert [(e.kind, e.role, e.content) for e in entries] == [
        ("compact", "", done.summary),
        ("message", "user", "So?"),
        ("message", "assistant", "Pixel it is."),
    ], "the injected summary message and framing are never stored"


async def test_the_guest_framing_is_injected_never_stored(fake, daemon_factory, store_url):
    fake.script(answer("primary one"), answer("guest one"), answer("primary two"))
    daemon = daemon_factory(config_for(fake), store_url)
    await turn(daemon, "hello")
    await turn(daemon, "guest?", guest="helper")
    await turn(daemon, "back to you")
    primary = fake.bodies[2]["messages"]
    assert primary[1]["role"] == "system" and "helper" in primary[1]["content"]
    assert {"role": "assistant", "content": '<from agent="helper">guest one</from>'} in primary
    assert {"role": "assistant", "content": "primary one"} in primary
    async with connect(daemon.socket_path) as c:
        entries = (await c.history("assistant", include_archived=True)).entries
    assert [(e.role, e.agent, e.content) for e in entries] == [
        ("user", "", "hello"),
        ("assistant", "", "primary one"),
        ("user", "", "guest?"),
        ("assistant", "helper", "guest one"),
        ("user", "", "back to you"),
        ("assistant", "", "primary two"),
    ]


async def test_kill_stops_a_compaction_in_flight_and_nothing_is_archived(fake, daemon_factory):
    fake.script(answer("first answer"), SSE([text("partial summ")], hang=True))
    daemon = daemon_factory(config_for(fake))
    await turn(daemon, "hello")
    async with connect(daemon.socket_path) as c:
        refused: list[ChinwagError] = []

        async def compact() -> None:
            with pytest.raises(ChinwagError) as info:
                await c.compact("assistant")
            refused.append(info.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(compact)
            with deadline(20, "the summary request to reach the model"):
                await fake.wait_for_requests(2)
            killed = await c.kill("assistant")
        assert killed.run_id is not None
        assert refused[0].code == 409 and "killed" in refused[0].message
        entries = (await c.history("assistant", include_archived=True)).entries
        assert [e.kind for e in entries] == ["message", "message"], "no archive, no marker"


async def test_a_transcript_too_long_for_the_model_is_summarized_in_parts(fake, daemon_factory):
    config = config_for(fake).replace(
        'model = "main-model"', 'model = "main-model"\ncontext_window = 200'
    )
    long_turns = [f"turn {n}: " + "word " * 70 for n in range(3)]  # ~90 tokens each
    fake.script(
        *(answer(f"ok {n}") for n in range(3)),
        answer("S1"),
        answer("S2"),
        answer("S3"),
    )
    daemon = daemon_factory(config)
    for content in long_turns:
        await turn(daemon, content)
    async with connect(daemon.socket_path) as c:
        done = await c.compact("assistant")
    assert (done.summary, done.archived_entries) == ("S3", 6)
    first, second, third = (body["messages"][1]["content"] for body in fake.bodies[3:6])
    assert "turn 0" in first and "turn 1" not in first and "## earlier" not in first
    assert "## earlier · summary of what came before\nS1" in second and "turn 1" in second
    assert "## earlier · summary of what came before\nS2" in third and "turn 2" in third
