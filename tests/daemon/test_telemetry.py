"""Traces on the GenAI semantic conventions, in process: a runtime over memory storage
whose spans go to the SDK's in-memory exporter, the tracer provider handed in through
`Telemetry` (no global provider); the log lines of a run; the OTEL_* variables and
`[daemon] metrics` values the daemon takes or refuses."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from chinwag.daemon._config import AgentConfig, Config, ConfigError, listen_address, load_config
from chinwag.daemon._logging import add_trace_ids, configure_logging
from chinwag.daemon._runtime import Runtime
from chinwag.daemon._serve import build_agents, make_providers
from chinwag.daemon._telemetry import NO_CALL, NO_RUN, NO_TOOL, Telemetry
from chinwag.daemon._tools import TOOL_NAMES
from chinwag.daemon._tracing import (
    CAPTURE_CONTENT,
    SCHEMA_URL,
    SEMCONV_VERSION,
    Tracing,
    traces_exporters,
    tracing_problem,
)
from chinwag.protocol import Start, ToolCall, ToolCallInfo, Usage
from chinwag.storage import MemoryStorage
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from runtime_harness import Recorder, submit
from structlog.testing import capture_logs

CONFIG = Config(
    agents={
        "assistant": AgentConfig(provider="echo", model="echo-1", tools=["set_title", "delegate"]),
        "helper": AgentConfig(provider="echo", model="echo-2"),
    }
)
CONTENT_KEYS = {
    "gen_ai.system_instructions",
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@asynccontextmanager
async def traced(
    exporter: InMemorySpanExporter, *, capture: bool | None = None, sampler: Sampler | None = None
) -> AsyncIterator[Runtime]:
    """A runtime whose spans go to ``exporter``; content captured as ``capture`` says,
    else as the environment does; sampled by ``sampler``, else as the environment says."""
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(CONFIG, tracing=Tracing(provider, capture_content=capture))
    agents = build_agents(CONFIG, make_providers(CONFIG))
    async with trio.open_nursery() as nursery:
        yield Runtime(CONFIG, MemoryStorage(), agents, nursery, telemetry)
        nursery.cancel_scope.cancel()


def named(spans: Any, name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def own_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


async def run(rt: Runtime, content: str, **where: Any) -> Recorder:
    sink = submit(rt, content, **where)
    await sink.finished()
    return sink


async def test_a_run_is_invoke_agent_over_its_chats_over_its_tools(
    exporter: InMemorySpanExporter,
) -> None:
    async with traced(exporter) as rt:
        sink = await run(rt, "/title Weekly plans")
    assert sink.end.status == "done"
    spans = exporter.get_finished_spans()
    (agent,) = named(spans, "invoke_agent assistant")
    asked, answered = named(spans, "chat echo-1")
    (tool,) = named(spans, "execute_tool set_title")
    assert len(spans) == 4

    start = next(e for e in sink.events if isinstance(e, Start))
    usage = [e for e in sink.events if isinstance(e, Usage)]
    call = next(e for e in sink.events if isinstance(e, ToolCall))
    assert agent.kind == SpanKind.INTERNAL and agent.parent is None
    assert dict(agent.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "assistant",
        "gen_ai.conversation.id": "assistant/user",
        "gen_ai.provider.name": "echo",
        "gen_ai.request.model": "echo-1",
        "gen_ai.usage.input_tokens": sum(u.prompt_tokens for u in usage),
        "gen_ai.usage.output_tokens": sum(u.completion_tokens for u in usage),
        "chinwag.run.id": start.run_id,
        "chinwag.run.status": "done",
    }
    for chat, used, reason in zip((asked, answered), usage, ("tool_calls", "stop"), strict=True):
        assert chat.kind == SpanKind.CLIENT and parent_of(chat) == own_id(agent)
        assert dict(chat.attributes or {}) == {
            "gen_ai.operation.name": "chat",
            "gen_ai.agent.name": "assistant",
            "gen_ai.conversation.id": "assistant/user",
            "gen_ai.provider.name": "echo",
            "gen_ai.request.model": "echo-1",
            "gen_ai.usage.input_tokens": used.prompt_tokens,
            "gen_ai.usage.output_tokens": used.completion_tokens,
            "gen_ai.response.finish_reasons": (reason,),
        }
    # The tool under the call that asked for it, which had ended when the tool ran.
    assert tool.kind == SpanKind.INTERNAL and parent_of(tool) == own_id(asked)
    assert (asked.end_time or 0) <= (tool.start_time or 0)
    assert dict(tool.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "set_title",
        "gen_ai.tool.call.id": call.call_id,
        "gen_ai.tool.type": "function",
    }
    assert {s.context.trace_id for s in spans if s.context is not None} == {
        agent.context.trace_id if agent.context is not None else 0
    }
    assert all(s.status.status_code == StatusCode.UNSET for s in spans)
    assert {s.instrumentation_scope.schema_url for s in spans if s.instrumentation_scope} == {
        SCHEMA_URL
    }
    assert SCHEMA_URL.endswith(f"/{SEMCONV_VERSION}")


@pytest.mark.parametrize("capture", [False, True])
async def test_spans_carry_prompts_and_answers_only_when_asked_to(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, capture: bool
) -> None:
    if capture:
        monkeypatch.setenv(CAPTURE_CONTENT, "true")
    else:
        monkeypatch.delenv(CAPTURE_CONTENT, raising=False)
    async with traced(exporter) as rt:  # the variable decides
        await run(rt, "/title Secret plans")
    spans = exporter.get_finished_spans()
    shown = {key for s in spans for key in (s.attributes or {})}
    everything = json.dumps([dict(s.attributes or {}) for s in spans], default=list)
    if not capture:
        assert not shown & CONTENT_KEYS
        assert "Secret" not in everything and "helpful assistant" not in everything
        return
    asked, answered = named(spans, "chat echo-1")
    (tool,) = named(spans, "execute_tool set_title")
    attributes = dict(asked.attributes or {})
    assert json.loads(str(attributes["gen_ai.system_instructions"])) == [
        {"type": "text", "content": "You are a helpful assistant."}
    ]
    assert json.loads(str(attributes["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": "/title Secret plans"}]}
    ]
    (said,) = json.loads(str(attributes["gen_ai.output.messages"]))
    assert said["role"] == "assistant" and said["finish_reason"] == "tool_calls"
    (part,) = said["parts"]
    assert (part["type"], part["name"]) == ("tool_call", "set_title")
    assert json.loads(part["arguments"]) == {"title": "Secret plans"}
    tool_attributes = dict(tool.attributes or {})
    assert json.loads(str(tool_attributes["gen_ai.tool.call.arguments"])) == {
        "title": "Secret plans"
    }
    assert "Secret plans" in str(tool_attributes["gen_ai.tool.call.result"])
    later = json.loads(str(dict(answered.attributes or {})["gen_ai.input.messages"]))
    assert [m["role"] for m in later] == ["user", "assistant", "tool"]
    assert later[2]["parts"][0]["type"] == "tool_call_response"
    assert later[2]["parts"][0]["id"] == part["id"]


async def test_failures_set_the_status_and_error_type(exporter: InMemorySpanExporter) -> None:
    async with traced(exporter) as rt:
        failed = await run(rt, "/fail upstream said no")
        wrong_tool = await run(rt, "/tool no_such_tool {}")
    assert (failed.end.status, wrong_tool.end.status) == ("error", "done")
    spans = exporter.get_finished_spans()
    failed_run, tool_run = named(spans, "invoke_agent assistant")
    assert failed_run.status.status_code == StatusCode.ERROR
    assert failed_run.status.description == "upstream said no"
    assert dict(failed_run.attributes or {})["error.type"] == "502"
    failed_chat = next(s for s in spans if parent_of(s) == own_id(failed_run))
    assert failed_chat.status.status_code == StatusCode.ERROR
    assert dict(failed_chat.attributes or {})["error.type"] == (
        "chinwag.daemon._providers.ProviderError"
    )
    (tool,) = named(spans, "execute_tool no_such_tool")
    assert tool.status.status_code == StatusCode.ERROR
    assert tool.status.description is None  # the result is content: not shown by default
    assert dict(tool.attributes or {})["error.type"] == "tool_error"
    assert tool_run.status.status_code == StatusCode.UNSET
    assert "error.type" not in dict(tool_run.attributes or {})


async def test_a_killed_run_ends_its_spans(
    exporter: InMemorySpanExporter, autojump_clock: trio.abc.Clock
) -> None:
    async with traced(exporter) as rt:
        sink = submit(rt, "/slow 100 1000")
        await trio.testing.wait_all_tasks_blocked()  # the model waits before its first word
        await rt.kill("assistant", "user", everything=False)
        assert (await sink.finished()).status == "killed"
    spans = exporter.get_finished_spans()
    (agent,) = named(spans, "invoke_agent assistant")
    (chat,) = named(spans, "chat echo-1")
    assert dict(agent.attributes or {})["chinwag.run.status"] == "killed"
    assert agent.status.status_code == StatusCode.UNSET  # a kill is not a failure
    assert dict(chat.attributes or {})["error.type"] == "trio.Cancelled"


async def test_a_delegated_run_is_a_child_of_the_tool_call_that_asked(
    exporter: InMemorySpanExporter,
) -> None:
    with capture_logs(processors=[add_trace_ids]) as logs:
        async with traced(exporter) as rt:
            asked = await run(rt, '/tool delegate {"agent": "helper", "message": "hi there"}')
            assert asked.end.status == "done"
            # The helper's conversation, whose task the delegation started, traces its
            # next run on its own, not under that old tool call; nor are the lines of
            # what else it does in that call's trace.
            later = await run(rt, "again", agent="helper", sender="agent:assistant")
            assert later.end.status == "done"
            await rt.compacted(rt.compact("helper", "agent:assistant", None))
    (compacted,) = [line for line in logs if line["event"] == "compacted"]
    assert "trace_id" not in compacted
    spans = exporter.get_finished_spans()
    (caller,) = named(spans, "invoke_agent assistant")
    (delegate,) = named(spans, "execute_tool delegate")
    delegated, on_its_own = named(spans, "invoke_agent helper")
    assert parent_of(delegated) == own_id(delegate)
    assert delegated.context is not None and caller.context is not None
    assert delegated.context.trace_id == caller.context.trace_id
    assert dict(delegated.attributes or {})["gen_ai.conversation.id"] == "helper/agent:assistant"
    assert on_its_own.parent is None


async def test_a_run_s_log_lines_carry_its_trace_id(exporter: InMemorySpanExporter) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, add_trace_ids]) as logs:
        async with traced(exporter) as rt:
            sink = await run(rt, "hello")
    (agent,) = named(exporter.get_finished_spans(), "invoke_agent assistant")
    assert agent.context is not None
    run_id = next(e for e in sink.events if isinstance(e, Start)).run_id
    lines = [line for line in logs if line.get("run_id") == run_id]
    assert {line["event"] for line in lines} >= {"run_started", "run_ended"}
    assert {line.get("trace_id") for line in lines} == {format_trace_id(agent.context.trace_id)}
    assert {line.get("span_id") for line in lines} == {format_span_id(agent.context.span_id)}


async def test_a_run_the_sampler_drops_sends_no_span_but_its_lines_name_its_trace(
    exporter: InMemorySpanExporter,
) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, add_trace_ids]) as logs:
        async with traced(exporter, sampler=ALWAYS_OFF) as rt:
            sink = await run(rt, "/title Unsampled")
    assert sink.end.status == "done"
    assert exporter.get_finished_spans() == ()
    run_id = next(e for e in sink.events if isinstance(e, Start)).run_id
    lines = [line for line in logs if line.get("run_id") == run_id]
    assert lines and all(len(str(line.get("trace_id"))) == 32 for line in lines)


async def test_without_telemetry_a_run_reports_through_shared_no_ops() -> None:
    with capture_logs(processors=[add_trace_ids]) as logs:
        async with trio.open_nursery() as nursery:
            agents = build_agents(CONFIG, make_providers(CONFIG))
            rt = Runtime(CONFIG, MemoryStorage(), agents, nursery)
            sink = await run(rt, "/title Quietly")
            nursery.cancel_scope.cancel()
    assert sink.end.status == "done"
    assert not any("trace_id" in line for line in logs)
    # Nothing is made per run, per model call or per tool call.
    telemetry = rt.telemetry
    assert not telemetry.on
    assert telemetry.run(agents["assistant"], ("assistant", "user"), "r1") is NO_RUN
    assert NO_RUN.model_call(None) is NO_CALL  # type: ignore[arg-type]
    assert NO_CALL.tool(ToolCallInfo(call_id="c", name="set_title", arguments="{}")) is NO_TOOL


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.BytesIO]:
    """The daemon's logging as it is set up off a terminal, into a buffer."""
    written = io.BytesIO()
    stderr = io.TextIOWrapper(written)  # held: collected, it would close the buffer
    monkeypatch.setattr("sys.stderr", stderr)
    configure_logging(logging.DEBUG)
    yield written
    structlog.reset_defaults()
    stderr.detach()


def test_the_daemon_s_log_lines_name_the_current_span(json_log: io.BytesIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    log = structlog.get_logger("chinwag.test")
    with tracer.start_as_current_span("work") as span:
        log.info("inside")
    log.info("outside")
    inside, outside = (json.loads(line) for line in json_log.getvalue().splitlines())
    context = span.get_span_context()
    assert (inside["trace_id"], inside["span_id"]) == (
        format_trace_id(context.trace_id),
        format_span_id(context.span_id),
    )
    assert "trace_id" not in outside and "span_id" not in outside


# --- the environment and the config ---------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "TRUE"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ["otlp"]),
    ],
)
def test_the_otel_variables_turn_tracing_on_and_off(
    environ: dict[str, str], exporters: list[str]
) -> None:
    assert traces_exporters(environ) == exporters
    assert tracing_problem(environ) is None
    assert (Tracing.from_environment(environ) is None) == (not exporters)


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER names zipkin"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "The OTLP protocol is set to 'grpc'",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json",
            },
            "The OTLP protocol is set to 'http/json'",
        ),
    ],
)
def test_otel_variables_the_daemon_cannot_follow_stop_it_at_start(
    environ: dict[str, str],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.toml"
    path.write_text('[agents.assistant]\nprovider = "echo"\n')
    with pytest.raises(ConfigError, match=problem):
        load_config(path, tool_names=TOOL_NAMES)


async def test_tracing_from_the_environment_names_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    plain = Tracing.from_environment({"OTEL_TRACES_EXPORTER": "console"})
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chinwag-eu")
    named_service = Tracing.from_environment({"OTEL_TRACES_EXPORTER": "otlp"})
    assert plain is not None and named_service is not None
    assert plain.resource.attributes["service.name"] == "chinwag"
    assert named_service.resource.attributes["service.name"] == "chinwag-eu"
    for tracing in (plain, named_service):
        await tracing.aclose()  # its own provider: shut down, nothing batched to send


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_a_metrics_address_is_host_and_port(text: str, address: tuple[str, int]) -> None:
    assert listen_address(text) == address


@pytest.mark.parametrize(
    "text", ["9464", ":9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "::1:9464", "[x]:1"]
)
def test_a_metrics_value_that_is_no_address_is_refused(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not HOST:PORT"):
        listen_address(text)
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nmetrics = "{text}"\n')
    with pytest.raises(ConfigError, match=r"\[daemon\] metrics must be \"HOST:PORT\""):
        load_config(path, tool_names=TOOL_NAMES)
