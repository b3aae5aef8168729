"""End to end: the real `chinwag serve` on the `anthropic` provider, against the fake Messages API.

The fake server runs in the test's trio loop; the daemon, a child process,
reaches it on 127.0.0.1. Each test asserts the requests the daemon sent as
well as the events and the history it produced.
"""

from __future__ import annotations

import json

import pytest
import trio
from chinwag.clients import connect
from chinwag.protocol import (
    End,
    Start,
    TextDelta,
    ThinkingDelta,
    Title,
    ToolCall,
    ToolResult,
    Usage,
)
from deadlines import collect, deadline, next_of
from fake_anthropic import (
    FakeAnthropic,
    Status,
    Stream,
    error_event,
    message_events,
    redacted_thinking_block,
    sign,
    text_block,
    text_stream,
    thinking_block,
    tool_block,
    tool_stream,
)

CONFIG = """
[daemon]
shutdown_grace_s = 1.0

[providers.claude]
kind = "anthropic"
base_url = "{base_url}"
api_key = "test"
max_retries = 0
max_tokens = 1000

[agents.assistant]
provider = "claude"
model = "claude-test"
system_prompt = "You are terse."
tools = ["set_title", "ask_user"]
context_window = 200000

[agents.helper]
provider = "claude"
model = "claude-helper"
system_prompt = "You help."

[providers.thinking]
kind = "anthropic"
base_url = "{base_url}"
api_key = "test"
max_retries = 0
max_tokens = 2000
thinking_budget = 1024

[agents.thinker]
provider = "thinking"
model = "claude-test"
system_prompt = "You are terse."
tools = ["set_title", "ask_user"]
context_window = 200000
"""


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeAnthropic:
    server = FakeAnthropic()
    await nursery.start(server.serve)
    return server


@pytest.fixture
def daemon(daemon_factory, fake):
    return daemon_factory(CONFIG.format(base_url=fake.base_url))


def text_of(events) -> str:
    return "".join(e.delta for e in events if isinstance(e, TextDelta))


def blocks_of(body, kind: str) -> list[dict]:
    return [b for m in body["messages"] for b in m["content"] if b["type"] == kind]


async def test_an_answer_streams_thinking_and_text_and_stores_the_text(fake, daemon):
    blocks = [thinking_block(0, ["Hmm", ", easy."]), text_block(1, ["Hello", " there"])]
    fake.script(Stream(message_events(blocks, input_tokens=30, output_tokens=2)))
    async with connect(daemon.socket_path) as c:
        async with c.stream("thinker", "hi") as events:
            got = await collect(events)
        history = await c.history("thinker")
    assert isinstance(got[0], Start) and got[0].agent == "thinker"
    assert [e.delta for e in got if isinstance(e, ThinkingDelta)] == ["Hmm", ", easy."]
    assert [e.delta for e in got if isinstance(e, TextDelta)] == ["Hello", " there"]
    (usage,) = [e for e in got if isinstance(e, Usage)]
    assert (usage.prompt_tokens, usage.completion_tokens) == (30, 2)
    assert usage.context_tokens == 32 and usage.context_window == 200000
    assert isinstance(got[-1], End) and got[-1].status == "done"
    assert [(e.role, e.content) for e in history.entries] == [
        ("user", "hi"),
        ("assistant", "Hello there"),
    ]
    (sent,) = fake.requests
    assert sent.path == "/v1/messages"
    body = sent.body
    assert body["model"] == "claude-test" and body["max_tokens"] == 2000 and body["stream"]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["system"] == "You are terse."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert [t["name"] for t in body["tools"]] == ["set_title", "ask_user"], "exactly the whitelist"
    assert all(set(t) == {"name", "description", "input_schema"} for t in body["tools"])
    assert body["tools"][0]["input_schema"]["type"] == "object"


async def test_the_tool_loop_with_fragmented_input_and_tool_errors(fake, daemon):
    fake.script(
        tool_stream(
            ("toolu_title", "set_title", ['{"ti', 'tle": "Trip to', ' Lisbon"}']),
            # not on the whitelist: an error result the model sees, not a failed run
            ("toolu_read", "read_file", ['{"path": ', '"x"}']),
            text="Setting it.",
        ),
        text_stream("Done."),
    )
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "name this chat") as events:
            got = await collect(events)
        history = await c.history("assistant")
    calls = [e for e in got if isinstance(e, ToolCall)]
    assert [(e.call_id, e.name, json.loads(e.arguments)) for e in calls] == [
        ("toolu_title", "set_title", {"title": "Trip to Lisbon"}),
        ("toolu_read", "read_file", {"path": "x"}),
    ]
    results = {e.call_id: e for e in got if isinstance(e, ToolResult)}
    assert not results["toolu_title"].is_error and results["toolu_read"].is_error
    assert [e.title for e in got if isinstance(e, Title)] == ["Trip to Lisbon"]
    assert text_of(got) == "Setting it.Done." and got[-1].status == "done"
    assert not any(isinstance(e, ThinkingDelta) for e in got)
    assert not any("thinking" in body for body in fake.bodies), "not configured: not asked"
    assert [(e.role, e.tool_call_id) for e in history.entries] == [
        ("user", None),
        ("assistant", None),
        ("tool", "toolu_title"),
        ("tool", "toolu_read"),
        ("assistant", None),
    ]
    assert [c.call_id for c in history.entries[1].tool_calls] == ["toolu_title", "toolu_read"]

    second = fake.bodies[1]
    assert second["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Setting it."},
            {
                "type": "tool_use",
                "id": "toolu_title",
                "name": "set_title",
                "input": {"title": "Trip to Lisbon"},
            },
            {"type": "tool_use", "id": "toolu_read", "name": "read_file", "input": {"path": "x"}},
        ],
    }
    # Both results in one user message, echoing the tool_use ids, the failure flagged.
    (results_message,) = second["messages"][2:]
    assert results_message["role"] == "user"
    assert [(b["tool_use_id"], b["is_error"]) for b in results_message["content"]] == [
        ("toolu_title", False),
        ("toolu_read", True),
    ]
    assert "not available" in results_message["content"][1]["content"]
    assert [t["name"] for t in second["tools"]] == ["set_title", "ask_user"]


THOUGHT = "The user wants a title; set it, then say so."


async def test_a_tool_loop_with_thinking_sends_each_step_s_thinking_back(fake, daemon):
    first_step = message_events(
        [
            thinking_block(0, ["The user wants a title;", " set it, then say so."]),
            redacted_thinking_block(1, "ZW5jcnlwdGVkIHRoaW5raW5n"),
            text_block(2, ["Naming it."]),
            tool_block(3, "toolu_title", "set_title", ['{"title": ', '"Lisbon"}']),
        ],
        stop_reason="tool_use",
    )
    fake.script(
        Stream(first_step),
        Stream(message_events([thinking_block(0, ["Done; tell them."]), text_block(1, ["Done."])])),
        text_stream("You are welcome."),
    )
    async with connect(daemon.socket_path) as c:
        async with c.stream("thinker", "name this chat") as events:
            got = await collect(events)
        async with c.stream("thinker", "thanks") as events:
            later = await collect(events)
        history = await c.history("thinker")
    assert got[-1].status == "done" and later[-1].status == "done"
    assert [e.delta for e in got if isinstance(e, ThinkingDelta)] == [
        "The user wants a title;",
        " set it, then say so.",
        "Done; tell them.",
    ]
    assert [e.title for e in got if isinstance(e, Title)] == ["Lisbon"]
    assert text_of(got) == "Naming it.Done."
    # Thinking is streamed, never stored.
    assert [(e.role, e.content) for e in history.entries] == [
        ("user", "name this chat"),
        ("assistant", "Naming it."),
        ("tool", "Title set to 'Lisbon'."),
        ("assistant", "Done."),
        ("user", "thanks"),
        ("assistant", "You are welcome."),
    ]

    first, second, third = fake.bodies
    assert all(b["thinking"] == {"type": "enabled", "budget_tokens": 1024} for b in fake.bodies)
    assert first["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "name this chat"}]}
    ]
    step = {
        "role": "assistant",
        "content": [
            # the step's thinking first, as it came: the text whole, with its signature
            {"type": "thinking", "thinking": THOUGHT, "signature": sign(THOUGHT)},
            {"type": "redacted_thinking", "data": "ZW5jcnlwdGVkIHRoaW5raW5n"},
            {"type": "text", "text": "Naming it."},
            {
                "type": "tool_use",
                "id": "toolu_title",
                "name": "set_title",
                "input": {"title": "Lisbon"},
            },
        ],
    }
    assert second["messages"][1] == step
    assert [b["type"] for b in second["messages"][2]["content"]] == ["tool_result"]
    # The next turn still carries the step (the final answer's thinking is not needed).
    assert third["messages"][1] == step
    assert third["messages"][3] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Done."}],
    }


async def test_a_tool_loop_cut_short_goes_on_with_its_thinking_or_after_a_restart_without(
    fake, daemon
):
    """A run killed after its tool step: the next turn goes on with that step's loop.

    In the same daemon the step's thinking is still at hand and is sent back; after
    a restart it is gone (it is never stored), and that one request goes without
    thinking, which the API accepts, instead of failing every turn after it.
    """
    slow = Stream(message_events([text_block(0, [f" w{i}" for i in range(200)])]), delay_s=0.05)

    async def cut_short(c, sender: str, call_id: str) -> None:
        fake.script(
            tool_stream((call_id, "set_title", ['{"title": "T"}']), thinking=f"Title {sender}."),
            slow,
        )
        async with c.stream("thinker", "title it", sender=sender) as events:
            await next_of(events, TextDelta)  # the step after the tool call is streaming
            await c.kill("thinker", sender=sender)
            rest = await collect(events)
        assert rest[-1].status == "killed"

    async with connect(daemon.socket_path) as c:
        await cut_short(c, "a", "toolu_a")
        await cut_short(c, "b", "toolu_b")
        async with c.stream("thinker", "go on", sender="a") as events:
            assert (await collect(events))[-1].status == "done"
    went_on = fake.bodies[-1]
    assert went_on["thinking"]["type"] == "enabled"
    assert went_on["messages"][1]["content"][0] == {
        "type": "thinking",
        "thinking": "Title a.",
        "signature": sign("Title a."),
    }

    await trio.to_thread.run_sync(daemon.restart)
    async with connect(daemon.socket_path) as c:
        async with c.stream("thinker", "go on", sender="b") as events:
            assert (await collect(events))[-1].status == "done"
        after_restart = fake.bodies[-1]
        async with c.stream("thinker", "and now?", sender="b") as events:
            assert (await collect(events))[-1].status == "done"
    assert "thinking" not in after_restart
    assert [b["type"] for b in after_restart["messages"][1]["content"]] == ["tool_use"]
    assert [b["type"] for b in after_restart["messages"][2]["content"]] == ["tool_result", "text"]
    assert fake.bodies[-1]["thinking"]["type"] == "enabled", "the loop is over: thinking again"


async def test_a_guest_turn_carries_no_tools_and_its_calls_are_ignored(fake, daemon):
    fake.script(
        tool_stream(("toolu_1", "set_title", ['{"title": "T"}'])),
        text_stream("Titled."),
        tool_stream(("toolu_g", "set_title", ['{"title": "guest"}']), text="I would rename it."),
    )
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "title it") as events:
            await collect(events)
        async with c.stream("assistant", "what do you think?", guest="helper") as events:
            got = await collect(events)
        history = await c.history("assistant")
    assert got[0].agent == "helper" and got[-1].status == "done"
    assert not any(isinstance(e, ToolCall | ToolResult | Title) for e in got)
    assert text_of(got) == "I would rename it."
    assert history.title == "T"
    assert (history.entries[-1].role, history.entries[-1].agent) == ("assistant", "helper")
    assert history.entries[-1].tool_calls == []

    guest = fake.bodies[2]
    assert guest["model"] == "claude-helper"
    assert "tools" not in guest
    assert guest["system"].startswith("You help.\n\nYou are helper, a guest")
    assert not blocks_of(guest, "tool_use") and not blocks_of(guest, "tool_result")
    roles = [m["role"] for m in guest["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"], "alternating turns"
    texts = [b["text"] for b in blocks_of(guest, "text")]
    assert texts[-1] == "what do you think?"
    assert any(t.startswith('<from agent="assistant">') for t in texts)


async def test_provider_errors_end_the_run_502_and_store_no_half_step(fake, daemon):
    partial = message_events([text_block(0, ["half", " an", " answer"])])
    fake.script(
        Status(529, "Overloaded", "overloaded_error"),
        Stream([*partial[:5], error_event("api_error", "Internal server error")]),
        Stream(partial, abort_after=5),
        Stream(partial[:4], raw=b"event: content_block_delta\ndata: {oops\n\n"),
        # a tool call that never completes: nothing of the step may be stored
        Stream(tool_stream(("toolu_x", "set_title", ['{"title": "X"}'])).events[:5]),
        text_stream("Still here."),
    )
    messages = []
    async with connect(daemon.socket_path) as c:
        for n in range(5):
            async with c.stream("assistant", f"try {n}") as events:
                got = await collect(events)
            end = got[-1]
            assert end.status == "error" and end.error.code == 502, end
            messages.append(end.error.message)
        assert not any(isinstance(e, ToolResult | Title) for e in got)
        async with c.stream("assistant", "again") as events:
            got = await collect(events)
        assert text_of(got) == "Still here." and got[-1].status == "done"
        history = await c.history("assistant")
    assert messages[0] == "The Anthropic API answered HTTP 529 (overloaded_error): Overloaded."
    assert "api_error" in messages[1] and "Internal server error" in messages[1]
    assert "broke off" in messages[2]
    assert "malformed" in messages[3]
    assert "ended before its message_stop" in messages[4]
    assert all(m.endswith(".") and "Traceback" not in m for m in messages)
    assert [(e.role, e.content) for e in history.entries] == [
        *((("user", f"try {n}")) for n in range(5)),
        ("user", "again"),
        ("assistant", "Still here."),
    ]
    assert history.title == ""
    # The failed turns are user turns in a row: the next request merged them into one.
    assert [m["role"] for m in fake.bodies[-1]["messages"]] == ["user"]
    assert len(fake.bodies[-1]["messages"][0]["content"]) == 6


async def test_kill_mid_stream_is_quick_and_drops_the_upstream_connection(fake, daemon):
    words = [f" w{i}" for i in range(400)]
    fake.script(Stream(message_events([text_block(0, words)]), delay_s=0.05))
    async with connect(daemon.socket_path) as c, connect(daemon.socket_path) as killer:
        async with c.stream("assistant", "talk a lot") as events:
            await anext(events)  # start
            first = await anext(events)
            assert isinstance(first, TextDelta)
            await killer.kill("assistant")
            # The fake streams for 20 s: ended within 10, the kill ended it (how soon is a
            # figure of bench/kill_latency.py).
            rest = await collect(events, within=10, what="the killed run's end")
        history = await c.history("assistant")
    assert rest[-1].status == "killed"
    assert len([e for e in rest if isinstance(e, TextDelta)]) < 100
    with deadline(5, "the daemon to drop its upstream connection"):
        await fake.client_left.wait()
    assert [e.role for e in history.entries] == ["user"], "the step in progress is discarded"


async def test_connection_refused_is_a_502(daemon_factory):
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = daemon_factory(CONFIG.format(base_url=f"http://127.0.0.1:{port}"))
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "anyone?") as events:
            end = (await collect(events))[-1]
        assert end.status == "error" and end.error.code == 502
        assert "cannot be reached" in end.error.message
        assert [e.role for e in (await c.history("assistant")).entries] == ["user"]
