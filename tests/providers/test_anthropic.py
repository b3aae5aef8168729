"""The `anthropic` provider in process, against the fake Messages API: mapping, chunks, errors.

The daemon end to end is in test_anthropic_e2e.py.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import trio
from chinwag.daemon import ConfigError, load_config
from chinwag.daemon._anthropic import AnthropicProvider, build_messages
from chinwag.daemon._config import ProviderConfig
from chinwag.daemon._provider_kinds import make_provider
from chinwag.daemon._providers import (
    FinishChunk,
    ModelMessage,
    ModelRequest,
    ProviderBlockChunk,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallChunk,
    ToolSchema,
    UsageChunk,
)
from chinwag.daemon._tools import TOOL_NAMES
from chinwag.protocol import ToolCallInfo
from deadlines import deadline
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
    thinking_refusal,
    tool_block,
    tool_stream,
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


@pytest.fixture
async def thinker(fake: FakeAnthropic):
    """A provider that asks for extended thinking."""
    made = AnthropicProvider(
        ProviderConfig(
            kind="anthropic",
            base_url=fake.base_url,
            api_key="test",
            max_retries=0,
            max_tokens=2000,
            thinking_budget=1024,
        )
    )
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
                    text_block(0, ["Looking"]),
                    tool_block(1, "toolu_1", "set_title", ['{"ti', 'tle": "Tr', 'ip"}']),
                    # input in content_block_start, no deltas
                    [
                        (
                            "content_block_start",
                            {
                                "type": "content_block_start",
                                "index": 2,
                                "content_block": {
                                    "type": "tool_use",
                                    "id": "toolu_2",
                                    "name": "list_dir",
                                    "input": {"path": "."},
                                },
                            },
                        ),
                        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
                    ],
                    tool_block(3, "toolu_3", "list_dir", ["", "{}"]),
                ],
                stop_reason="tool_use",
            )
        )
    )
    chunks = await collect(provider, user("go"))
    assert chunks == [
        TextChunk("Looking"),
        ToolCallChunk(call("toolu_1", "set_title", '{"title": "Trip"}')),
        ToolCallChunk(call("toolu_2", "list_dir", '{"path": "."}')),
        ToolCallChunk(call("toolu_3", "list_dir", "{}")),
        UsageChunk(10, 5),
        FinishChunk("tool_calls"),
    ]
    assert json.loads(chunks[1].call.arguments) == {"title": "Trip"}


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
        with deadline(5, "the provider to close its connection to the fake"):
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


# --- extended thinking -------------------------------------------------------------------

SIGNED = {"type": "thinking", "thinking": "Title first.", "signature": sign("Title first.")}
REDACTED = {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"}


def test_a_step_s_provider_blocks_lead_its_message_unchanged():
    _, messages = build_messages(
        [
            ModelMessage(role="user", content="name it"),
            ModelMessage(
                role="assistant",
                content="Naming it.",
                tool_calls=[call("toolu_a", "set_title", '{"title": "x"}')],
                provider_blocks=[SIGNED, REDACTED],
            ),
            ModelMessage(role="tool", content="Title set.", tool_call_id="toolu_a"),
        ],
        with_tools=True,
    )
    assert messages[1]["content"] == [
        SIGNED,
        REDACTED,
        {"type": "text", "text": "Naming it."},
        {"type": "tool_use", "id": "toolu_a", "name": "set_title", "input": {"title": "x"}},
    ]


async def test_thinking_is_asked_for_only_when_configured(fake, provider, thinker):
    blocks = [thinking_block(0, ["Hmm", ", easy."]), text_block(1, ["Hi"])]
    fake.script(Stream(message_events(blocks)), Stream(message_events(blocks)))
    plain = await collect(provider, user("hi"))
    assert "thinking" not in fake.bodies[0]
    # Unasked, the API sends no thinking (the fake cuts its scripted block).
    assert plain == [TextChunk("Hi"), UsageChunk(10, 5), FinishChunk("stop")]

    thought = await collect(thinker, user("hi"))
    assert fake.bodies[1]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert fake.bodies[1]["max_tokens"] == 2000
    assert thought == [
        ThinkingChunk("Hmm"),
        ThinkingChunk(", easy."),
        # the whole block, for the step's next request, once its signature is in
        ProviderBlockChunk(
            {"type": "thinking", "thinking": "Hmm, easy.", "signature": sign("Hmm, easy.")}
        ),
        TextChunk("Hi"),
        UsageChunk(10, 5),
        FinishChunk("stop"),
    ]


async def test_redacted_and_unsigned_thinking(fake, thinker):
    fake.script(
        Stream(
            message_events(
                [
                    redacted_thinking_block(0, "ZW5jcnlwdGVk"),
                    thinking_block(1, ["unsigned"], signature=""),
                    tool_block(2, "toolu_1", "list_dir", ["{}"]),
                ],
                stop_reason="tool_use",
            )
        )
    )
    chunks = await collect(thinker, user("go"))
    assert chunks[:3] == [
        ProviderBlockChunk(REDACTED),  # as it came
        # a block without its signature could not be sent back: none is kept
        ThinkingChunk("unsigned"),
        ToolCallChunk(call("toolu_1", "list_dir", "{}")),
    ]


def loop_request(provider_blocks: list[dict]) -> ModelRequest:
    """The request that goes on after a set_title step (toolu_1) with these blocks."""
    request = user("name it")
    request.tools = [ToolSchema(name="set_title", description="Set.", parameters={})]
    request.messages += [
        ModelMessage(
            role="assistant",
            content="",
            tool_calls=[call("toolu_1", "set_title", '{"title": "T"}')],
            provider_blocks=provider_blocks,
        ),
        ModelMessage(role="tool", content="Title set.", tool_call_id="toolu_1"),
    ]
    return request


async def test_a_tool_loop_goes_on_with_the_step_s_thinking(fake, thinker):
    fake.script(
        tool_stream(("toolu_1", "set_title", ['{"title": "T"}']), thinking="Title first."),
        text_stream("Done."),
    )
    first = await collect(thinker, user("name it"))
    (kept,) = [c.block for c in first if isinstance(c, ProviderBlockChunk)]
    assert kept == SIGNED
    assert (await collect(thinker, loop_request([kept])))[0] == TextChunk("Done.")
    assert fake.bodies[1]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert fake.bodies[1]["messages"][1]["content"][0] == SIGNED


async def test_a_tool_loop_step_without_its_thinking_goes_on_without_thinking(fake, thinker):
    """A step whose thinking was lost (a restart): the API's advice, disable thinking."""
    fake.script(tool_stream(("toolu_1", "set_title", ['{"title": "T"}']), thinking="Title first."))
    await collect(thinker, user("name it"))
    assert (await collect(thinker, loop_request([])))[0] == TextChunk("ok")
    assert "thinking" not in fake.bodies[1]
    # A new user turn ends the loop: thinking again.
    request = loop_request([])
    request.messages.append(ModelMessage(role="assistant", content="Named."))
    request.messages.append(ModelMessage(role="user", content="thanks"))
    await collect(thinker, request)
    assert fake.bodies[2]["thinking"]["type"] == "enabled"


async def test_the_fake_refuses_what_the_api_refuses(fake, thinker):
    fake.script(tool_stream(("toolu_1", "set_title", ['{"title": "T"}']), thinking="Title first."))
    await collect(thinker, user("name it"))
    other = {"type": "thinking", "thinking": "Other.", "signature": sign("Other.")}
    tampered = {**SIGNED, "thinking": "Title first!"}
    for blocks, fragment in [
        ([other], "are not the ones sent with them"),  # signed, but not this step's
        ([tampered], "Invalid `signature`"),
    ]:
        err = await expect_error(thinker, loop_request(blocks))
        assert "HTTP 400 (invalid_request_error)" in err.message and fragment in err.message
    # A request missing the step's thinking (the provider never sends one): refused too.
    body = {
        "max_tokens": 2000,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": build_messages(loop_request([]).messages, with_tools=True)[1],
    }
    refusal = fake_refusal(body, fake)
    assert refusal is not None and "found `tool_use`" in refusal.message
    assert fake_refusal({**body, "thinking": {"type": "enabled", "budget_tokens": 2000}}, fake)


def fake_refusal(body: dict, fake: FakeAnthropic) -> Status | None:
    return thinking_refusal(body, fake.thinking_sent)


# --- configuration ---------------------------------------------------------------------


async def test_adaptive_thinking_and_effort(fake):
    adaptive = AnthropicProvider(
        ProviderConfig(
            kind="anthropic",
            base_url=fake.base_url,
            api_key="test",
            max_retries=0,
            thinking="adaptive",
            effort="medium",
        )
    )
    try:
        fake.script(
            tool_stream(("toolu_1", "set_title", ['{"title": "T"}']), thinking="Title first."),
            text_stream("Done."),
            text_stream("ok"),
        )
        first = await collect(adaptive, user("name it"))
        assert fake.bodies[0]["thinking"] == {"type": "adaptive"}
        assert fake.bodies[0]["output_config"] == {"effort": "medium"}
        (kept,) = [c.block for c in first if isinstance(c, ProviderBlockChunk)]
        assert (await collect(adaptive, loop_request([kept])))[0] == TextChunk("Done.")
        assert fake.bodies[1]["messages"][1]["content"][0] == kept
        # A step without thinking (the model may skip it) goes on thinking adaptively.
        assert (await collect(adaptive, loop_request([])))[0] == TextChunk("ok")
        assert fake.bodies[2]["thinking"] == {"type": "adaptive"}
    finally:
        await adaptive.aclose()


def load(tmp_path: Path, provider_table: str):
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(provider_table) + '\n[agents.a]\nprovider = "p"\nmodel = "m"\n')
    return load_config(path, tool_names=TOOL_NAMES)


def test_thinking_budget_is_off_by_default_and_read_when_set(tmp_path):
    table = '[providers.p]\nkind = "anthropic"\napi_key = "k"\n'
    assert load(tmp_path, table).providers["p"].thinking_budget is None
    config = load(tmp_path, table + "max_tokens = 8192\nthinking_budget = 2048\n")
    assert (config.providers["p"].thinking_budget, config.providers["p"].max_tokens) == (2048, 8192)
    adaptive = load(tmp_path, table + 'thinking = "adaptive"\neffort = "high"\n').providers["p"]
    assert (adaptive.thinking, adaptive.effort) == ("adaptive", "high")
    assert adaptive.thinking_budget is None


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        (
            'kind = "anthropic"\nthinking_budget = 4096\n',  # max_tokens 4096 by default
            "thinking_budget (4096) must be less than max_tokens (4096)",
        ),
        (
            'kind = "anthropic"\nmax_tokens = 2000\nthinking_budget = 3000\n',
            "thinking_budget (3000) must be less than max_tokens (2000)",
        ),
        ('kind = "anthropic"\nthinking_budget = 512\n', "thinking_budget must be at least 1024"),
        (
            'kind = "openai"\nbase_url = "http://h/v1"\nthinking_budget = 2048\n',
            'thinking_budget, which only kind = "anthropic" takes',
        ),
        ('kind = "anthropic"\nthinking_budget = "lots"\n', "thinking_budget"),
        (
            'kind = "anthropic"\nthinking = "adaptive"\nthinking_budget = 2048\n',
            'sets both thinking = "adaptive" and thinking_budget',
        ),
        ('kind = "anthropic"\nthinking = "always"\n', "thinking"),
        ('kind = "anthropic"\neffort = " "\n', "effort is empty"),
        ('kind = "echo"\neffort = "high"\n', 'sets effort, which kind = "echo" does not take'),
        (
            'kind = "openai"\nbase_url = "http://h/v1"\nthinking = "adaptive"\n',
            'thinking, which only kind = "anthropic" takes',
        ),
    ],
)
def test_bad_thinking_settings_are_config_errors(tmp_path, table, fragment):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "[providers.p]\n" + table)
    assert fragment in str(err.value) and "providers" in str(err.value)
