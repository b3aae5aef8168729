"""The `anthropic` provider in process, against the fake Messages API: mapping, chunks, errors.

The daemon end to end is in test_anthropic_e2e.py.
"""

from __future__ import annotations

import json

import pytest
import trio
from chinwag.daemon._anthropic import AnthropicProvider, build_messages
from chinwag.daemon._config import ProviderConfig
from chinwag.daemon._providers import (
    FinishChunk,
    ModelMessage,
    ModelRequest,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallChunk,
    ToolSchema,
    UsageChunk,
    make_provider,
)
from chinwag.protocol import ToolCallInfo
from fake_anthropic import (
    FakeAnthropic,
    Status,
    Stream,
    error_event,
    message_events,
    text_block,
    text_stream,
    thinking_block,
    tool_block,
)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeAnthropic:
    server = FakeAnthropic()
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def provider(fake: FakeAnthropic):
    made = make_provider(
        ProviderConfig(
            kind="anthropic", base_url=fake.base_url, api_key="test", max_retries=0, max_tokens=77
        )
    )
    assert isinstance(made, AnthropicProvider)
    yield made
    await made.aclose()


def user(text: str) -> ModelRequest:
    return ModelRequest(
        model="claude-test",
        messages=[
            ModelMessage(role="system", content="Be brief."),
            ModelMessage(role="user", content=text),
        ],
    )


async def collect(provider: AnthropicProvider, request: ModelRequest) -> list[object]:
    return [chunk async for chunk in provider.stream(request)]


# --- building the request: pure ------------------------------------------------


def call(call_id: str, name: str, arguments: str) -> ToolCallInfo:
    return ToolCallInfo(call_id=call_id, name=name, arguments=arguments)


HISTORY = [
    ModelMessage(role="system", content="You are terse."),
    ModelMessage(role="system", content="Summary of the earlier conversation:\nhello"),
    ModelMessage(role="user", content="first"),
    ModelMessage(role="user", content="second, queued behind the first"),
    ModelMessage(
        role="assistant",
        content="Let me look.",
        tool_calls=[
            call("toolu_a", "set_title", '{"title": "x"}'),
            call("toolu_b", "read_file", "not json"),
        ],
    ),
    ModelMessage(role="tool", content="Title set.", tool_call_id="toolu_a"),
    ModelMessage(role="tool", content="No such file.", tool_call_id="toolu_b", is_error=True),
    ModelMessage(role="assistant", content="", tool_calls=[call("toolu_c", "list_dir", "{}")]),
    ModelMessage(role="tool", content="", tool_call_id="toolu_c"),
    ModelMessage(role="user", content="thanks"),
]


def test_messages_alternate_and_carry_tool_blocks():
    system, messages = build_messages(HISTORY, with_tools=True)
    assert system == "You are terse.\n\nSummary of the earlier conversation:\nhello"
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "first"},
                {"type": "text", "text": "second, queued behind the first"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_a", "name": "set_title", "input": {"title": "x"}},
                # arguments that are not a JSON object: the API still needs an object
                {"type": "tool_use", "id": "toolu_b", "name": "read_file", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_a",
                    "is_error": False,
                    "content": "Title set.",
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_b",
                    "is_error": True,
                    "content": "No such file.",
                },
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_c", "name": "list_dir", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_c", "is_error": False},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


def test_without_tools_the_history_s_calls_are_text():
    _, messages = build_messages(HISTORY, with_tools=False)
    blocks = [block for m in messages for block in m["content"]]
    assert {block["type"] for block in blocks} == {"text"}
    texts = [block["text"] for block in blocks]
    assert '[called the tool set_title with {"title": "x"}]' in texts
    assert "[the tool read_file failed: No such file.]" in texts
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]


def test_empty_and_blank_text_makes_no_block():
    system, messages = build_messages(
        [
            ModelMessage(role="system", content="  "),
            ModelMessage(role="user", content="hi"),
            ModelMessage(role="assistant", content=" \n"),
            ModelMessage(role="user", content="again"),
        ],
        with_tools=True,
    )
    assert system == ""
    assert messages == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}],
        }
    ]


# --- streaming -------------------------------------------------------------------


async def test_text_usage_and_the_request_sent(fake, provider):
    fake.script(text_stream("Hello there world", input_tokens=21, output_tokens=4))
    chunks = await collect(provider, user("hi"))
    assert chunks == [
        TextChunk("Hello"),
        TextChunk(" there"),
        TextChunk(" world"),
        UsageChunk(21, 4),
        FinishChunk("stop"),
    ]
    (sent,) = fake.requests
    assert sent.method == "POST" and sent.path == "/v1/messages"
    assert sent.body == {
        "model": "claude-test",
        "max_tokens": 77,
        "stream": True,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }


async def test_tools_are_sent_as_input_schemas(fake, provider):
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    request = user("search")
    request.tools = [ToolSchema(name="memory_search", description="Search.", parameters=schema)]
    fake.script(text_stream("none"))
    await collect(provider, request)
    assert fake.bodies[0]["tools"] == [
        {"name": "memory_search", "description": "Search.", "input_schema": schema}
    ]


async def test_fragmented_tool_input_is_assembled_per_block(fake, provider):
    fake.script(
        Stream(
            message_events(
                [
                    thinking_block(0, ["Two calls", ", then stop."]),
                    text_block(1, ["Looking"]),
                    tool_block(2, "toolu_1", "set_title", ['{"ti', 'tle": "Tr', 'ip"}']),
                    # input in content_block_start, no deltas
                    [
                        (
                            "content_block_start",
                            {
                                "type": "content_block_start",
                                "index": 3,
                                "content_block": {
                                    "type": "tool_use",
                                    "id": "toolu_2",
                                    "name": "list_dir",
                                    "input": {"path": "."},
                                },
                            },
                        ),
                        ("content_block_stop", {"type": "content_block_stop", "index": 3}),
                    ],
                    tool_block(4, "toolu_3", "list_dir", ["", "{}"]),
                ],
                stop_reason="tool_use",
            )
        )
    )
    chunks = await collect(provider, user("go"))
    assert chunks == [
        ThinkingChunk("Two calls"),
        ThinkingChunk(", then stop."),
        TextChunk("Looking"),
        ToolCallChunk(call("toolu_1", "set_title", '{"title": "Trip"}')),
        ToolCallChunk(call("toolu_2", "list_dir", '{"path": "."}')),
        ToolCallChunk(call("toolu_3", "list_dir", "{}")),
        UsageChunk(10, 5),
        FinishChunk("tool_calls"),
    ]
    assert json.loads(chunks[3].call.arguments) == {"title": "Trip"}


async def test_stop_reasons_and_cached_input_tokens(fake, provider):
    events = message_events([text_block(0, ["cut"])], stop_reason="max_tokens")
    usage = events[0][1]["message"]["usage"]
    usage.update(cache_creation_input_tokens=100, cache_read_input_tokens=1000)
    fake.script(Stream(events), text_stream("x", stop_reason="stop_sequence"))
    assert (await collect(provider, user("a")))[-2:] == [UsageChunk(1110, 5), FinishChunk("length")]
    assert (await collect(provider, user("b")))[-1] == FinishChunk("stop")


async def test_a_body_that_lingers_after_message_stop_does_not_hold_the_answer(fake, provider):
    fake.script(Stream(text_stream("done").events, hold_s=30))
    with trio.fail_after(5):
        chunks = await collect(provider, user("hi"))
    assert chunks[-1] == FinishChunk("stop")


# --- errors --------------------------------------------------------------------------


async def expect_error(provider, request=None) -> ProviderError:
    with pytest.raises(ProviderError) as err:
        await collect(provider, request or user("hi"))
    assert err.value.code == 502
    assert err.value.message.endswith("."), "one clear sentence"
    return err.value


async def test_http_errors_name_the_upstream_status_and_message(fake, provider):
    fake.script(
        Status(529, "Overloaded", "overloaded_error"),
        Status(400, "messages: roles must alternate", "invalid_request_error"),
    )
    err = await expect_error(provider)
    assert err.message == "The Anthropic API answered HTTP 529 (overloaded_error): Overloaded."
    err = await expect_error(provider)
    assert "HTTP 400 (invalid_request_error)" in err.message and "alternate" in err.message


async def test_an_error_event_mid_stream(fake, provider):
    events = message_events([text_block(0, ["partial"])])[:4]
    fake.script(Stream([*events, error_event("overloaded_error", "Overloaded")]))
    chunks: list[object] = []
    with pytest.raises(ProviderError) as err:
        async for chunk in provider.stream(user("hi")):
            chunks.append(chunk)
    assert chunks == [TextChunk("partial")]
    assert err.value.code == 502
    assert err.value.message == (
        "The Anthropic stream failed mid-answer with overloaded_error: Overloaded."
    )


async def test_malformed_and_truncated_streams(fake, provider):
    whole = message_events([text_block(0, ["a", "b"])])
    fake.script(
        Stream(whole, abort_after=4),  # the connection drops mid-body
        Stream(whole[:-1]),  # a clean end, but no message_stop
        Stream(whole[:3], raw=b"event: content_block_delta\ndata: {not json\n\n"),
        Stream([whole[0], whole[3]]),  # a delta for a block never started
        Stream([whole[0], whole[2], whole[-1]]),  # message_stop inside a block
        Stream(
            [
                whole[0],
                tool_block(0, "toolu_1", "x", ["{}"])[0],
                ("content_block_delta", {"type": "content_block_delta", "index": 0}),
            ]
        ),
    )
    messages = [(await expect_error(provider)).message for _ in range(6)]
    assert "broke off" in messages[0]
    assert "ended before its message_stop" in messages[1]
    assert "malformed" in messages[2]
    assert "block 0 was not started" in messages[3]
    assert "stopped inside a content block" in messages[4]
    assert "malformed" in messages[5]


async def test_connection_refused_and_timeouts(fake):
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = AnthropicProvider(
        ProviderConfig(
            kind="anthropic", base_url=f"http://127.0.0.1:{port}", api_key="t", max_retries=0
        )
    )
    err = await expect_error(refused)
    assert "cannot be reached" in err.message
    await refused.aclose()

    slow = AnthropicProvider(
        ProviderConfig(
            kind="anthropic", base_url=fake.base_url, api_key="t", max_retries=0, timeout_s=0.3
        )
    )
    fake.script(Stream(message_events([text_block(0, ["late"])]), delay_s=1.0))
    err = await expect_error(slow)
    assert "ReadTimeout" in err.message
    await slow.aclose()


async def test_retries_then_succeeds(fake):
    patient = AnthropicProvider(
        ProviderConfig(kind="anthropic", base_url=fake.base_url, api_key="t", max_retries=1)
    )
    fake.script(Status(503, "busy", "api_error"), text_stream("recovered"))
    chunks = await collect(patient, user("hi"))
    assert chunks[0] == TextChunk("recovered")
    assert len(fake.requests) == 2 and fake.requests[1].body == fake.requests[0].body
    await patient.aclose()


async def test_cancellation_propagates_and_drops_the_connection(fake, provider):
    fake.script(Stream(message_events([text_block(0, ["w"] * 200)]), delay_s=0.02))
    got: list[object] = []
    with trio.move_on_after(5) as outer:
        with trio.CancelScope() as scope:
            async for chunk in provider.stream(user("hi")):
                got.append(chunk)
                if len(got) == 3:
                    scope.cancel()
        assert scope.cancelled_caught, "Cancelled went through the provider, not ProviderError"
        await fake.client_left.wait()
    assert not outer.cancelled_caught, "the fake server never saw the client leave"
    assert len(got) == 3


async def test_the_api_key_and_extra_headers_are_sent(fake, monkeypatch):
    monkeypatch.setenv("CW_TEST_ANTHROPIC_KEY", "from-env")
    made = AnthropicProvider(
        ProviderConfig(
            kind="anthropic",
            base_url=fake.base_url,
            api_key_env="CW_TEST_ANTHROPIC_KEY",
            extra_headers={"x-team": "chinwag"},
            max_retries=0,
        )
    )
    await collect(made, user("hi"))
    await made.aclose()
    headers = fake.requests[0].headers
    assert headers["x-team"] == "chinwag"
    assert "from-env" in (headers.get("x-api-key", "") + headers.get("authorization", ""))
