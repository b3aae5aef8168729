"""End to end: the real `chinwag serve` on the `openai` provider, against the fake server.

The fake server runs in the test's trio loop; the daemon is a child process
that reaches it over 127.0.0.1. Each test scripts the server's answers, drives
the daemon with the client library, and checks what the daemon sent upstream,
the events it streamed, and the history it stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest
import trio
from chinwag.clients import connect
from chinwag.daemon._tools import TOOLS
from chinwag.protocol import End, Start, TextDelta, ThinkingDelta, ToolCall, ToolResult, Usage
from deadlines import collect, deadline, describe, next_of
from fake_openai import (
    SSE,
    FakeOpenAI,
    Status,
    answer,
    chunk,
    finish,
    open_fake_openai,
    reasoning,
    text,
    tool_delta,
    usage,
)


def config_for(
    server: FakeOpenAI, *, base_url: str | None = None, max_retries: int = 0, timeout_s: float = 60
) -> str:
    return f"""
[daemon]
shutdown_grace_s = 1.0

[providers.fake]
kind = "openai"
base_url = "{base_url or server.base_url}"
api_key = "test"
max_retries = {max_retries}
timeout_s = {timeout_s}
extra_headers = {{ "X-Chinwag-Test" = "yes" }}

[agents.assistant]
provider = "fake"
model = "fake-model"
system_prompt = "You are the test assistant."
tools = ["set_title", "ask_user"]

[agents.helper]
provider = "fake"
model = "helper-model"
system_prompt = "You are the helper."
tools = ["set_title"]

[agents.plain]
provider = "fake"
model = "plain-model"
system_prompt = "You have no tools."
"""


def tool_schemas(names: list[str]) -> list[dict[str, object]]:
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": TOOLS[name].description,
                "parameters": TOOLS[name].parameters,
            },
        }
        for name in names
    ]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as server:
        yield server


async def run_turn(daemon, agent: str, content: str, **kwargs):
    async with connect(daemon.socket_path) as c, c.stream(agent, content, **kwargs) as events:
        return await collect(events, within=20)


async def history_of(daemon, agent: str, sender: str | None = None):
    async with connect(daemon.socket_path) as c:
        return (await c.history(agent, sender)).entries


def texts(events) -> str:
    return "".join(e.delta for e in events if isinstance(e, TextDelta))


async def test_a_streamed_answer_with_reasoning_and_usage(fake, daemon_factory):
    fake.script(
        SSE(
            [
                chunk({"role": "assistant", "content": ""}),
                reasoning("Let me "),
                reasoning("think.", key="reasoning"),
                text("Hello"),
                text(", world"),
                finish("stop"),
                usage(42, 7),
            ]
        )
    )
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "hi")

    assert isinstance(events[0], Start)
    assert [e.delta for e in events if isinstance(e, ThinkingDelta)] == ["Let me ", "think."]
    assert [e.delta for e in events if isinstance(e, TextDelta)] == ["Hello", ", world"]
    (use,) = [e for e in events if isinstance(e, Usage)]
    assert (use.prompt_tokens, use.completion_tokens, use.context_tokens) == (42, 7, 49)
    assert isinstance(events[-1], End) and events[-1].status == "done"

    (request,) = fake.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer test"
    assert request.headers["x-chinwag-test"] == "yes"
    body = request.body
    assert body["model"] == "fake-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "You are the test assistant."},
        {"role": "user", "content": "hi"},
    ]
    assert body["tools"] == tool_schemas(["set_title", "ask_user"])

    entries = await history_of(daemon, "assistant")
    assert [(e.role, e.content) for e in entries] == [("user", "hi"), ("assistant", "Hello, world")]


async def test_fragmented_tool_calls_run_and_their_results_go_back(fake, daemon_factory):
    first_args = '{"title": "Alpha"}'
    second_args = '{"title": "Beta"}'
    fake.script(
        SSE(
            [
                chunk({"role": "assistant", "content": None}),
                text("Setting titles."),
                tool_delta(0, first_args[:3], call_id="call_a", name="set_title"),
                tool_delta(1, "", call_id="call_b", name="set_title"),
                tool_delta(0, first_args[3:9]),
                tool_delta(1, second_args[:5]),
                tool_delta(1, second_args[5:]),
                tool_delta(0, first_args[9:]),
                finish("tool_calls"),
                usage(30, 12),
            ]
        ),
        answer("Both titles are set.", prompt_tokens=60),
    )
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "title this twice")

    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_a", "set_title", {"title": "Alpha"}),
        ("call_b", "set_title", {"title": "Beta"}),
    ]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert sorted(r.call_id for r in results) == ["call_a", "call_b"]
    assert not any(r.is_error for r in results)
    assert texts(events) == "Setting titles.Both titles are set."
    assert events[-1].status == "done"

    assert len(fake.requests) == 2
    second = fake.bodies[1]["messages"]
    assert second[0] == {"role": "system", "content": "You are the test assistant."}
    assert second[1] == {"role": "user", "content": "title this twice"}
    assert second[2] == {
        "role": "assistant",
        "content": "Setting titles.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "set_title", "arguments": first_args},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "set_title", "arguments": second_args},
            },
        ],
    }
    assert [(m["role"], m["tool_call_id"]) for m in second[3:]] == [
        ("tool", "call_a"),
        ("tool", "call_b"),
    ]
    outputs = {r.call_id: r.output for r in results}
    assert [m["content"] for m in second[3:]] == [outputs["call_a"], outputs["call_b"]]
    assert fake.bodies[1]["tools"] == tool_schemas(["set_title", "ask_user"])

    entries = await history_of(daemon, "assistant")
    assert [(e.role, e.tool_call_id) for e in entries] == [
        ("user", None),
        ("assistant", None),
        ("tool", "call_a"),
        ("tool", "call_b"),
        ("assistant", None),
    ]
    step = entries[1]
    assert step.content == "Setting titles."
    assert [(c.call_id, c.arguments) for c in step.tool_calls] == [
        ("call_a", first_args),
        ("call_b", second_args),
    ]
    assert entries[-1].content == "Both titles are set."

    assert daemon.stop() == 0, "the provider's client closes cleanly at shutdown"
    assert "Traceback" not in daemon.log_path.read_text()


async def test_an_agent_without_tools_sends_no_tools_key(fake, daemon_factory):
    fake.script(answer("plain words"))
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "plain", "hello")
    assert texts(events) == "plain words" and events[-1].status == "done"
    body = fake.bodies[0]
    assert "tools" not in body
    assert body["model"] == "plain-model"
    assert body["messages"][0] == {"role": "system", "content": "You have no tools."}


async def test_a_guest_turn_carries_no_tools_and_its_tool_calls_are_ignored(fake, daemon_factory):
    fake.script(
        answer("primary answer"),
        SSE(
            [
                text("guest answer"),
                tool_delta(0, '{"title": "no"}', call_id="call_g", name="set_title"),
                finish("tool_calls"),
                usage(20, 3),
            ]
        ),
    )
    daemon = daemon_factory(config_for(fake))
    await run_turn(daemon, "assistant", "first")
    events = await run_turn(daemon, "assistant", "and you?", guest="helper")

    assert events[0].agent == "helper"
    assert not any(isinstance(e, ToolCall | ToolResult) for e in events)
    assert texts(events) == "guest answer" and events[-1].status == "done"

    guest = fake.bodies[1]
    assert "tools" not in guest
    assert guest["model"] == "helper-model"
    messages = guest["messages"]
    assert messages[0] == {"role": "system", "content": "You are the helper."}
    assert messages[1]["role"] == "system" and "guest" in messages[1]["content"]
    assert messages[2:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": '<from agent="assistant">primary answer</from>'},
        {"role": "user", "content": "and you?"},
    ]
    entries = await history_of(daemon, "assistant")
    assert [(e.role, e.agent, e.content, e.tool_calls) for e in entries[-2:]] == [
        ("user", "", "and you?", []),
        ("assistant", "helper", "guest answer", []),
    ]
    assert len(fake.requests) == 2, "the guest's ignored call started no second step"


async def assert_failed_with_no_step(daemon, events, code: int, *fragments: str) -> None:
    end = events[-1]
    assert isinstance(end, End) and end.status == "error", end
    assert end.error is not None and end.error.code == code
    for fragment in fragments:
        assert fragment in end.error.message, end.error.message
    entries = await history_of(daemon, "assistant")
    assert [e.role for e in entries] == ["user"], "no half step is stored"


async def test_an_error_status_ends_the_run_502_naming_it(fake, daemon_factory):
    fake.script(Status(401, "invalid api key."))
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "hi")
    await assert_failed_with_no_step(daemon, events, 502)
    assert events[-1].error.message == "The model provider answered 401: invalid api key."
    # The daemon lives on: the next run works.
    fake.script(answer("fine now"))
    assert texts(await run_turn(daemon, "assistant", "again")) == "fine now"


async def test_a_server_error_is_retried_then_reported(fake, daemon_factory):
    retry_soon = {"retry-after-ms": "10"}
    fake.script(
        Status(500, "upstream exploded", headers=retry_soon),
        Status(503, "still down", headers=retry_soon),
    )
    daemon = daemon_factory(config_for(fake, max_retries=1))
    events = await run_turn(daemon, "assistant", "hi")
    await assert_failed_with_no_step(daemon, events, 502, "answered 503", "still down")
    assert len(fake.requests) == 2
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == ["0", "1"]


async def test_an_error_object_mid_stream_fails_the_step(fake, daemon_factory):
    fake.script(SSE([text("Half an ans"), {"error": {"message": "The model is overloaded"}}]))
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "hi")
    assert texts(events) == "Half an ans"
    await assert_failed_with_no_step(daemon, events, 502, "The model is overloaded.")


async def test_a_connection_dropped_mid_stream_fails_the_step(fake, daemon_factory):
    fake.script(
        SSE([text("Half"), tool_delta(0, '{"ti', call_id="c", name="set_title")], abort=True)
    )
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "hi")
    assert not any(isinstance(e, ToolCall) for e in events), "a partial call is never sent"
    await assert_failed_with_no_step(daemon, events, 502, "connection to the model provider")


async def test_invalid_json_in_the_stream_fails_the_step(fake, daemon_factory):
    fake.script(SSE([text("ok so far"), '{"choices": [ not json']))
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "hi")
    await assert_failed_with_no_step(daemon, events, 502, "malformed stream")


async def test_a_stream_that_ends_without_a_finish_fails_the_step(fake, daemon_factory):
    fake.script(SSE([text("and then")]))
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "hi")
    await assert_failed_with_no_step(daemon, events, 502, "ended before the model finished")


async def test_a_failing_second_step_keeps_the_first(fake, daemon_factory):
    fake.script(
        SSE(
            [
                tool_delta(0, '{"title": "T"}', call_id="call_1", name="set_title"),
                finish("tool_calls"),
            ]
        ),
        Status(400, "context too long"),
    )
    daemon = daemon_factory(config_for(fake))
    events = await run_turn(daemon, "assistant", "hi")
    end = events[-1]
    assert end.status == "error" and end.error.code == 502
    assert end.error.message == "The model provider answered 400: context too long."
    entries = await history_of(daemon, "assistant")
    assert [(e.role, e.tool_call_id) for e in entries] == [
        ("user", None),
        ("assistant", None),
        ("tool", "call_1"),
    ]


async def test_an_unreachable_server_is_502(fake, daemon_factory):
    with trio.socket.socket() as probe:  # a port that nothing listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = daemon_factory(config_for(fake, base_url=f"http://127.0.0.1:{port}/v1"))
    events = await run_turn(daemon, "assistant", "hi")
    await assert_failed_with_no_step(
        daemon, events, 502, f"model provider at http://127.0.0.1:{port}/v1 failed"
    )


async def test_a_silent_server_times_out_502(fake, daemon_factory):
    fake.script(SSE([text("then silence")], hang=True))
    daemon = daemon_factory(config_for(fake, timeout_s=0.5))
    events = await run_turn(daemon, "assistant", "hi")
    await assert_failed_with_no_step(daemon, events, 502, "did not answer within 0.5 s")


async def test_kill_mid_stream_closes_the_upstream_connection(fake, daemon_factory):
    fake.script(SSE([text(f"{i} ") for i in range(1000)], delay_s=0.02, hang=True))
    daemon = daemon_factory(config_for(fake))
    async with connect(daemon.socket_path) as c, connect(daemon.socket_path) as killer:
        async with c.stream("assistant", "count") as events:
            await next_of(events, TextDelta)
            await killer.kill("assistant")
            # The fake streams for 20 s: ended within 10, the kill ended it (how soon is a
            # figure of bench/kill_latency.py).
            rest = await collect(events, within=10, what="the killed run's end")
        assert rest[-1].status == "killed"
        with deadline(5, "the daemon to drop its upstream connection"):
            await fake.client_left.wait()
        entries = (await c.history("assistant")).entries
        assert [e.role for e in entries] == ["user"]


async def test_a_key_variable_that_is_not_set_stops_serve_at_start(fake, daemon_factory):
    config = config_for(fake).replace('api_key = "test"', 'api_key_env = "CW_UNSET_TEST_KEY"')
    with pytest.raises(RuntimeError) as err:
        daemon_factory(config)
    assert "[providers.fake] takes its key from $CW_UNSET_TEST_KEY" in str(err.value)
    assert "Traceback" not in str(err.value)


async def test_a_steps_tool_calls_run_concurrently_and_are_stored_in_call_order(
    fake, daemon_factory, short_tmp
):
    work = short_tmp / "work"
    work.mkdir()
    # The slow command waits on a FIFO the test holds open for writing, and the test
    # writes to it only once the fast command's result has arrived: the fast result
    # can only come first if the daemon runs both calls at once (run one after the
    # other, the slow one would block the fast one until the test times out).
    gate = work / "gate"
    os.mkfifo(gate)
    slow_args = json.dumps({"command": "read -r -t 30 word <> gate; echo slow $word"})
    fast_args = json.dumps({"command": "echo fast"})
    fake.script(
        SSE(
            [
                chunk({"role": "assistant", "content": None}),
                tool_delta(0, slow_args, call_id="call_slow", name="run_command"),
                tool_delta(1, fast_args, call_id="call_fast", name="run_command"),
                finish("tool_calls"),
                usage(30, 12),
            ]
        ),
        answer("Both commands ran.", prompt_tokens=60),
    )
    roots = f'[daemon]\nallowed_roots = ["{short_tmp}"]\n'
    runner = '[agents.runner]\nprovider = "fake"\nmodel = "fake-model"\ntools = ["run_command"]\n'
    daemon = daemon_factory(config_for(fake).replace("[daemon]\n", roots) + runner)

    writer = os.open(gate, os.O_RDWR | os.O_NONBLOCK)  # both ends: never blocks on Linux
    try:
        events = []
        async with (
            connect(daemon.socket_path) as c,
            c.stream("runner", "run both", cwd=str(work)) as stream,
        ):
            with deadline(20, "both tool results", lambda: describe(events)):
                async for event in stream:
                    events.append(event)
                    if isinstance(event, ToolResult) and event.call_id == "call_fast":
                        os.write(writer, b"go\n")
    finally:
        os.close(writer)

    assert [c.call_id for c in events if isinstance(c, ToolCall)] == ["call_slow", "call_fast"]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.call_id for r in results] == ["call_fast", "call_slow"], "completion order"
    outputs = {r.call_id: r.output for r in results}
    assert outputs == {
        "call_fast": "fast\n[exit code 0]",
        "call_slow": "slow go\n[exit code 0]",
    }
    assert not any(r.is_error for r in results)
    assert texts(events) == "Both commands ran." and events[-1].status == "done"

    assert len(fake.requests) == 2
    second = fake.bodies[1]["messages"]
    assert [c["id"] for c in second[-3]["tool_calls"]] == ["call_slow", "call_fast"]
    assert second[-2:] == [
        {"role": "tool", "tool_call_id": "call_slow", "content": outputs["call_slow"]},
        {"role": "tool", "tool_call_id": "call_fast", "content": outputs["call_fast"]},
    ]

    entries = await history_of(daemon, "runner")
    assert [(e.role, e.tool_call_id) for e in entries] == [
        ("user", None),
        ("assistant", None),
        ("tool", "call_slow"),
        ("tool", "call_fast"),
        ("assistant", None),
    ]
    assert [c.call_id for c in entries[1].tool_calls] == ["call_slow", "call_fast"]
    assert [e.content for e in entries[2:4]] == [outputs["call_slow"], outputs["call_fast"]]
