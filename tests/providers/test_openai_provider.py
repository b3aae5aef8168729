"""The `openai` provider in process against the fake server; its config checks."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from chinwag.daemon._config import ConfigError, ProviderConfig, load_config
from chinwag.daemon._openai import OpenAIProvider
from chinwag.daemon._provider_kinds import make_provider
from chinwag.daemon._providers import (
    FinishChunk,
    ModelMessage,
    ModelRequest,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallChunk,
    UsageChunk,
)
from chinwag.daemon._tools import TOOL_NAMES
from deadlines import deadline
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

REQUEST = ModelRequest(
    model="m",
    messages=[ModelMessage(role="system", content="S"), ModelMessage(role="user", content="U")],
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with open_fake_openai() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAIProvider]:
    p = OpenAIProvider(
        ProviderConfig(kind="openai", base_url=fake.base_url, api_key="k", max_retries=0)
    )
    yield p
    await p.aclose()


async def chunks_of(provider: OpenAIProvider, request: ModelRequest = REQUEST) -> list[object]:
    with trio.fail_after(10):
        return [c async for c in provider.stream(request)]


async def test_chunks_in_order_tool_calls_whole_after_the_text(fake, provider):
    fake.script(
        SSE(
            [
                chunk({"role": "assistant", "content": ""}),
                reasoning("hm"),
                text("A"),
                tool_delta(1, '{"b"', call_id="id_b", name="second"),
                tool_delta(0, "", call_id="id_a", name="first"),
                tool_delta(0, "{}"),
                tool_delta(1, ": 2}"),
                text("B"),
                finish("tool_calls"),
                usage(5, 6),
            ]
        )
    )
    got = await chunks_of(provider)
    assert got[:3] == [ThinkingChunk("hm"), TextChunk("A"), TextChunk("B")]
    calls = [(c.call.call_id, c.call.name, c.call.arguments) for c in got[3:5]]
    assert calls == [("id_a", "first", "{}"), ("id_b", "second", '{"b": 2}')]
    assert got[5:] == [UsageChunk(5, 6), FinishChunk("tool_calls")]


async def test_calls_without_index_or_id_and_with_repeated_names(fake, provider):
    # Not to spec, but seen in the wild: no index, no id, the name sent again.
    def bare(fragment: dict[str, object]) -> dict[str, object]:
        return chunk({"tool_calls": [fragment]})

    fake.script(
        SSE(
            [
                bare({"id": "one", "function": {"name": "lone", "arguments": '{"x":'}}),
                bare({"function": {"arguments": " 1}"}}),
                bare({"id": "two", "function": {"name": "other", "arguments": "{}"}}),
                tool_delta(5, "", name="again"),
                tool_delta(5, "{}", name="again"),
                finish("stop"),
            ]
        )
    )
    got = await chunks_of(provider)
    calls = [c.call for c in got if isinstance(c, ToolCallChunk)]
    assert [(c.call_id, c.name, c.arguments) for c in calls[:2]] == [
        ("one", "lone", '{"x": 1}'),
        ("two", "other", "{}"),
    ]
    assert (calls[2].name, calls[2].arguments) == ("again", "{}")
    assert calls[2].call_id.startswith("call_"), "a call without an id gets one"
    assert got[-1] == FinishChunk("stop")


async def test_a_tool_call_without_a_name_is_a_provider_error(fake, provider):
    fake.script(SSE([tool_delta(0, "{}", call_id="c"), finish("tool_calls")]))
    with pytest.raises(ProviderError, match="without a name") as err:
        await chunks_of(provider)
    assert err.value.code == 502


@pytest.mark.parametrize(
    ("reply", "code", "message"),
    [
        (Status(401, "invalid api key."), 502, "The model provider answered 401: invalid api key."),
        (Status(404, body={}), 502, "The model provider answered 404: Not Found."),
        (Status(400, body={"detail": "bad model"}), 502, "answered 400: bad model."),
        (Status(500, body="plain text"), 502, "answered 500: plain text."),
        (Status(429, body={"message": "slow down"}), 502, "answered 429: slow down."),
        (SSE([text("x"), "not json"]), 502, "malformed stream: JSONDecodeError"),
        (
            SSE([text("x"), {"choices": [{"delta": {"content": 5}}]}]),
            502,
            "malformed stream: ValidationError: Expected `str | null`, got `int`"
            " - at `$.choices[0].delta.content`.",
        ),
        (SSE([text("x"), {"choices": "none"}]), 502, "malformed stream: ValidationError"),
        (SSE([text("x"), {"error": {"message": "boom"}}]), 502, "failed mid-answer: boom."),
        (SSE([text("x")], abort=True), 502, "connection to the model provider at http"),
        (SSE([text("x"), finish()], done=False), None, None),
        (SSE([text("x")]), 502, "ended before the model finished"),
        (SSE([]), 502, "ended before the model finished"),
    ],
)
async def test_failures_are_provider_errors(fake, provider, reply, code, message):
    fake.script(reply)
    if code is None:  # a finished stream without [DONE] is complete enough
        assert (await chunks_of(provider))[-1] == FinishChunk("stop")
        return
    with pytest.raises(ProviderError) as err:
        await chunks_of(provider)
    assert err.value.code == code
    assert message in err.value.message


async def test_a_slow_server_times_out_502(fake):
    fake.script(SSE([text("x")], hang=True))
    config = ProviderConfig(kind="openai", base_url=fake.base_url, timeout_s=0.2, max_retries=0)
    provider = OpenAIProvider(config)
    try:
        with pytest.raises(ProviderError) as err:
            await chunks_of(provider)
    finally:
        await provider.aclose()
    assert err.value.code == 502
    assert err.value.message == "The model provider did not answer within 0.2 s."


async def test_cancellation_propagates_and_closes_the_connection(fake, provider):
    fake.script(SSE([text("x")] * 100, delay_s=0.01, hang=True))
    got = []
    with trio.move_on_after(0.2) as scope:
        async for c in provider.stream(REQUEST):
            got.append(c)
    assert scope.cancelled_caught, "trio.Cancelled is not turned into a ProviderError"
    assert got and all(isinstance(c, TextChunk) for c in got)
    with deadline(2, "the provider to close its connection to the fake"):
        await fake.client_left.wait()


async def test_cancellation_reaches_the_retry_back_off(fake):
    fake.script(
        Status(500, headers={"retry-after": "30"}), Status(500, headers={"retry-after": "30"})
    )
    provider = OpenAIProvider(ProviderConfig(kind="openai", base_url=fake.base_url, max_retries=2))
    try:
        with trio.move_on_after(0.5) as scope:
            await chunks_of(provider)
    finally:
        await provider.aclose()
    assert scope.cancelled_caught and len(fake.requests) == 1


async def test_without_a_key_a_placeholder_is_sent_and_aclose_closes(fake):
    fake.script(answer("hi"))
    provider = make_provider(ProviderConfig(kind="openai", base_url=fake.base_url))
    assert isinstance(provider, OpenAIProvider)
    await chunks_of(provider)  # type: ignore[arg-type]
    assert fake.requests[0].headers["authorization"] == "Bearer no-key"
    await provider.aclose()
    assert provider._client.is_closed()


async def test_the_key_comes_from_the_named_variable(fake, monkeypatch):
    monkeypatch.setenv("CW_TEST_KEY", "from-env")
    fake.script(answer("hi"))
    config = ProviderConfig(kind="openai", base_url=fake.base_url, api_key_env="CW_TEST_KEY")
    provider = OpenAIProvider(config)
    try:
        await chunks_of(provider)
    finally:
        await provider.aclose()
    assert fake.requests[0].headers["authorization"] == "Bearer from-env"


async def test_effort_is_sent_as_reasoning_effort_only_when_configured(fake, provider):
    fake.script(answer("hi"), answer("hi"))
    await chunks_of(provider)
    assert "reasoning_effort" not in fake.bodies[0]
    config = ProviderConfig(kind="openai", base_url=fake.base_url, max_retries=0, effort="high")
    reasoner = OpenAIProvider(config)
    try:
        await chunks_of(reasoner)
    finally:
        await reasoner.aclose()
    assert fake.bodies[1]["reasoning_effort"] == "high"


# --- configuration ----------------------------------------------------------------------


def load(tmp_path: Path, provider_table: str):
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(provider_table) + '\n[agents.a]\nprovider = "p"\nmodel = "m"\n')
    return load_config(path, tool_names=TOOL_NAMES)


def test_config_defaults(tmp_path):
    config = load(tmp_path, '[providers.p]\nkind = "openai"\nbase_url = "http://h/v1"\n')
    p = config.providers["p"]
    assert (p.timeout_s, p.max_retries, p.extra_headers, p.resolve_api_key()) == (600, 2, {}, None)


def test_a_missing_key_variable_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CW_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError) as err:
        load(tmp_path, '[providers.p]\nkind = "openai"\napi_key_env = "CW_NO_SUCH_KEY"\n')
    assert "[providers.p]" in str(err.value) and "$CW_NO_SUCH_KEY" in str(err.value)


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ('kind = "openai"\n', "api.openai.com, which needs api_key or api_key_env"),
        ('kind = "openai"\napi_key = "a"\napi_key_env = "B"\n', "both api_key and api_key_env"),
        ('kind = "openai"\napi_key = "a"\ntimeout_s = 0\n', "timeout_s must be positive"),
        ('kind = "openai"\napi_key = "a"\nmax_retries = -1\n', "max_retries must not be negative"),
        ('kind = "openai"\napi_key = "a"\nextra_headers = 3\n', "extra_headers"),
    ],
)
def test_bad_provider_tables_are_config_errors(tmp_path, table, fragment):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "[providers.p]\n" + table)
    assert fragment in str(err.value) and "providers" in str(err.value)
