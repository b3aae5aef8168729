"""The seam between the daemon and what it tells of itself: metrics and traces.

The runtime, the server and the post office call ``Telemetry``'s hooks at the
few places that matter: a run (``RunTelemetry``), each model call
(``ModelCall``), each tool call (``ToolTelemetry``), a history append, a
consumer dropped as too slow, a message posted and delivered. Behind them are
Prometheus series (``_metrics.py``, when ``[daemon] metrics`` is set) and
OpenTelemetry spans on the GenAI semantic conventions (``_tracing.py``, when
``OTEL_*`` asks for them).

With both off a run gets the shared ``NO_RUN``, its model calls ``NO_CALL``
and its tools ``NO_TOOL``, whose hooks do nothing: a text chunk costs one bool
check, and no event allocates anything.

Spans nest run -> model call -> tool call, a tool under the model call that
asked for it (ended by then). Each span is the current one (OpenTelemetry's
context, a contextvar: trio copies it into the tasks a task starts) on the
task that does its work, so the log lines written meanwhile carry its trace id
(``_logging.py``) and a run a tool starts (`delegate`, mail) is its child.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from contextvars import Token
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import msgspec
from chinwag.protocol import EndStatus, Entry, ErrorInfo, Mail, MailRead, MailUpdate, ToolCallInfo
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._agent import Agent
from ._config import BUILTIN_PROVIDERS, Config
from ._metrics import Metrics
from ._providers import ModelMessage, ModelRequest
from ._tracing import RecordedSpan, Tracing

# GenAI semantic conventions (SEMCONV_VERSION in _tracing.py).
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
MODEL = "gen_ai.request.model"
AGENT = "gen_ai.agent.name"
CONVERSATION = "gen_ai.conversation.id"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_TYPE = "gen_ai.tool.type"
ERROR_TYPE = "error.type"
# Content, only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"
# chinwag's own.
RUN_ID = "chinwag.run.id"
RUN_STATUS = "chinwag.run.status"
#: error.type of a tool call whose result is an error (call_tool tells no more).
TOOL_ERROR = "tool_error"

_NOT_TIMED = nullcontext()
_encode = msgspec.json.Encoder().encode


class Telemetry:
    """What the daemon reports of itself: metrics, spans, both or neither."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.on = metrics is not None or tracing is not None
        providers = BUILTIN_PROVIDERS | (config.providers if config is not None else {})
        # gen_ai.provider.name: the provider's kind ("openai", "anthropic", "echo").
        self._kinds = {name: table.kind for name, table in providers.items()}

    @classmethod
    def configure(cls, config: Config, *, tracing: Tracing | None = None) -> Telemetry:
        """Metrics when ``[daemon] metrics`` is set; traces to ``tracing``, else as the
        ``OTEL_*`` variables ask."""
        metrics = Metrics(config.agents) if config.daemon.metrics is not None else None
        return cls(config, metrics=metrics, tracing=tracing or Tracing.from_environment())

    async def aclose(self) -> None:
        """Stop serving `/metrics`; send the spans still batched (waits at most the
        exporter's timeout)."""
        if self.metrics is not None:
            await self.metrics.aclose()
        if self.tracing is not None:
            await self.tracing.aclose()

    # --- runs ---------------------------------------------------------------------

    def run(self, agent: Agent, conversation: tuple[str, str], run_id: str) -> RunTelemetry:
        """What the run ``run_id`` of ``agent`` will report; made when it is submitted, so
        its span descends from the span current then (the tool call that asked for it)."""
        if not self.on:
            return NO_RUN
        return _ObservedRun(self, agent, conversation, run_id)

    def untraced_task(self) -> None:
        """The calling task is long-lived and serves many jobs: it starts outside the span
        of whichever task happened to start it."""
        if self.tracing is not None:
            otel_context.attach(otel_context.Context())

    # --- the rest -----------------------------------------------------------------

    def appending(self) -> AbstractContextManager[object]:
        """Times one append to a conversation's history, around the awaited write."""
        metrics = self.metrics
        return _NOT_TIMED if metrics is None else metrics.storage_append_seconds.time()

    def dropped(self, consumer: str) -> None:
        """A ``connection``, ``subscription`` or ``watch`` was dropped as too slow."""
        if self.metrics is not None:
            self.metrics.dropped[consumer] += 1

    def mail_posted(self) -> None:
        if self.metrics is not None:
            self.metrics.mail_posted += 1

    def mail_delivered(self, frame: Mail | MailUpdate | MailRead) -> None:
        """``frame`` leaves a watch's buffer for its connection: a new message's delivery
        is timed from its post (its ``created_at``); a change to one, or its read, is not
        a delivery."""
        metrics = self.metrics
        if metrics is not None and type(frame) is Mail:
            waited = (datetime.now(UTC) - frame.message.created_at).total_seconds()
            metrics.mail_delivery_seconds.observe(max(waited, 0.0))

    def about(self, agent: Agent) -> dict[str, Any]:
        """The span attributes that say which agent on which model."""
        return {
            AGENT: agent.name,
            PROVIDER: self._kinds.get(agent.config.provider, agent.config.provider),
            MODEL: agent.config.model,
        }


# --- a run --------------------------------------------------------------------------


class RunTelemetry:
    """What one run reports: entered on its task when it starts, ``ended`` by its finish.

    This base reports nothing: it is ``NO_RUN``, every run's when telemetry is off.
    """

    #: True until the model's first output (text, thinking, a tool call) is reported.
    awaits_first = False

    def __enter__(self) -> RunTelemetry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def first_output(self) -> None:
        """The model said its first thing of the run."""

    def model_call(self, request: ModelRequest) -> ModelCall:
        """One step's model call, with ``request``."""
        return NO_CALL

    def ended(self, status: EndStatus, error: ErrorInfo | None) -> None:
        """The run ended (from its queue too, never started)."""


NO_RUN = RunTelemetry()


class _ObservedRun(RunTelemetry):
    def __init__(
        self, telemetry: Telemetry, agent: Agent, conversation: tuple[str, str], run_id: str
    ) -> None:
        self.awaits_first = True
        self.telemetry = telemetry
        self.agent = agent
        self.conversation_id = "/".join(conversation)  # (agent, sender); never a label
        self.run_id = run_id
        metrics = telemetry.metrics
        self.series = metrics.agents.get(agent.name) if metrics is not None else None
        # Its span descends from the one current where it was asked for (a tool call).
        self.parent = otel_context.get_current() if telemetry.tracing is not None else None
        self.about: dict[str, Any] = {}  # which agent on which model, for its spans
        self.span: RecordedSpan | None = None  # its calls' parent
        self.input_tokens = 0
        self.output_tokens = 0
        self._started: float | None = None
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> RunTelemetry:
        self._started = time.perf_counter()
        telemetry = self.telemetry
        if telemetry.tracing is not None:
            self.about = telemetry.about(self.agent)
            attributes = self.about | {
                OPERATION: "invoke_agent",
                CONVERSATION: self.conversation_id,
                RUN_ID: self.run_id,
            }
            self.span = span = telemetry.tracing.start(
                f"invoke_agent {self.agent.name}", SpanKind.INTERNAL, attributes, self.parent
            )
            self._token = otel_context.attach(span.current)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        span = self.span
        if span is not None and not span.ended:  # the daemon's cancellation
            if exc is not None:
                _failed(span, exc)
            span.end()

    def first_output(self) -> None:
        self.awaits_first = False
        if self.series is not None and self._started is not None:
            self.series.first_output_seconds.observe(time.perf_counter() - self._started)

    def model_call(self, request: ModelRequest) -> ModelCall:
        return _ObservedCall(self, request)

    def ended(self, status: EndStatus, error: ErrorInfo | None) -> None:
        series = self.series
        if series is not None:
            runs = series.runs
            runs[status] = runs.get(status, 0) + 1
            if self._started is not None:
                series.run_seconds.observe(time.perf_counter() - self._started)
        span = self.span
        if span is not None:
            attributes = span.attributes
            attributes[RUN_STATUS] = status
            attributes[INPUT_TOKENS] = self.input_tokens
            attributes[OUTPUT_TOKENS] = self.output_tokens
            if error is not None:
                attributes[ERROR_TYPE] = str(error.code)
                span.status = Status(StatusCode.ERROR, error.message)
            span.end()


# --- a model call ---------------------------------------------------------------------


class ModelCall:
    """What one model call reports, entered around its stream; this base reports nothing."""

    def __enter__(self) -> ModelCall:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        """The tokens the provider reported for this call."""

    def finished(self, reason: str) -> None:
        """The provider's finish reason (stop, tool_calls, length)."""

    def answered(self, entry: Entry) -> None:
        """What the model answered, as stored (its text and tool calls)."""

    def tool(self, call: ToolCallInfo) -> ToolTelemetry:
        """One of the tool calls this model call asked for, entered around its run."""
        return NO_TOOL


NO_CALL = ModelCall()


class _ObservedCall(ModelCall):
    def __init__(self, run: _ObservedRun, request: ModelRequest) -> None:
        self._run = run
        self._request = request
        self._started = 0.0
        self._span: RecordedSpan | None = None  # its tools' parent
        self._token: Token[otel_context.Context] | None = None
        self._usage: tuple[int, int] | None = None
        self._reasons: list[str] = []

    def __enter__(self) -> ModelCall:
        self._started = time.perf_counter()
        run = self._run
        tracing = run.telemetry.tracing
        if tracing is not None and run.span is not None:
            attributes = run.about | {OPERATION: "chat", CONVERSATION: run.conversation_id}
            if tracing.capture_content:
                system, messages = _input_messages(self._request.messages)
                attributes |= {SYSTEM_INSTRUCTIONS: system, INPUT_MESSAGES: messages}
            self._span = span = run.span.child(
                f"chat {self._request.model}", SpanKind.CLIENT, attributes
            )
            self._token = otel_context.attach(span.current)
        return self

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        self._usage = (input_tokens, output_tokens)

    def finished(self, reason: str) -> None:
        self._reasons.append(reason)

    def answered(self, entry: Entry) -> None:
        tracing = self._run.telemetry.tracing
        if self._span is not None and tracing is not None and tracing.capture_content:
            self._span.attributes[OUTPUT_MESSAGES] = _output_messages(entry, self._reasons)

    def tool(self, call: ToolCallInfo) -> ToolTelemetry:
        return _ObservedTool(self._run.telemetry, call, parent=self._span)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        run = self._run
        series = run.series
        if series is not None:
            series.model_call_seconds.observe(time.perf_counter() - self._started)
        span = self._span
        if self._usage is not None:
            input_tokens, output_tokens = self._usage
            run.input_tokens += input_tokens
            run.output_tokens += output_tokens
            if series is not None:
                series.input_tokens += input_tokens
                series.output_tokens += output_tokens
            if span is not None:
                span.attributes[INPUT_TOKENS] = input_tokens
                span.attributes[OUTPUT_TOKENS] = output_tokens
        if span is not None:
            if self._reasons:
                span.attributes[FINISH_REASONS] = tuple(self._reasons)
            if exc is not None:
                _failed(span, exc)
            span.end()


# --- a tool call ------------------------------------------------------------------------


class ToolTelemetry:
    """What one tool call reports, entered on the task that runs it; this base reports
    nothing."""

    def __enter__(self) -> ToolTelemetry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def result(self, output: str, is_error: bool, seconds: float) -> None:
        """The tool's result, and how long the call took."""


NO_TOOL = ToolTelemetry()


class _ObservedTool(ToolTelemetry):
    def __init__(
        self,
        telemetry: Telemetry,
        call: ToolCallInfo,
        *,
        parent: RecordedSpan | None,
    ) -> None:
        self._telemetry = telemetry
        self._call = call
        self._parent = parent
        self._span: RecordedSpan | None = None
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> ToolTelemetry:
        tracing = self._telemetry.tracing
        if tracing is not None and self._parent is not None:
            call = self._call
            attributes: dict[str, Any] = {
                OPERATION: "execute_tool",
                TOOL_NAME: call.name,
                TOOL_CALL_ID: call.call_id,
                TOOL_TYPE: "function",
            }
            if tracing.capture_content:
                attributes[TOOL_ARGUMENTS] = call.arguments
            self._span = span = self._parent.child(
                f"execute_tool {call.name}", SpanKind.INTERNAL, attributes
            )
            self._token = otel_context.attach(span.current)
        return self

    def result(self, output: str, is_error: bool, seconds: float) -> None:
        metrics = self._telemetry.metrics
        if metrics is not None:
            series = metrics.tool(self._call.name)
            if is_error:
                series.error += 1
            else:
                series.ok += 1
            series.seconds.observe(seconds)
        span = self._span
        tracing = self._telemetry.tracing
        if span is not None and tracing is not None:
            if tracing.capture_content:
                span.attributes[TOOL_RESULT] = output
            if is_error:
                span.attributes[ERROR_TYPE] = TOOL_ERROR
                # The result is the tool's own text: shown only where content may be.
                shown = output if tracing.capture_content else None
                span.status = Status(StatusCode.ERROR, shown)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        span = self._span
        if span is not None:
            if exc is not None:
                _failed(span, exc)
            span.end()


# --- helpers --------------------------------------------------------------------------


def _failed(span: RecordedSpan, exc: BaseException) -> None:
    """Mark ``span`` failed with ``exc``: its type's full name as error.type, and the
    daemon's sentence (a ``ProviderError``'s) as the status; a cancellation has none."""
    kind = type(exc)
    span.attributes[ERROR_TYPE] = f"{kind.__module__}.{kind.__qualname__}"
    span.status = Status(StatusCode.ERROR, str(exc) if isinstance(exc, Exception) else None)


def _input_messages(messages: Iterable[ModelMessage]) -> tuple[str, str]:
    """A request's system messages and the others, as gen_ai.system_instructions and
    gen_ai.input.messages (JSON)."""
    system: list[dict[str, Any]] = []
    chat: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            system.append({"type": "text", "content": message.content})
        elif message.role == "tool":
            answer = {
                "type": "tool_call_response",
                "id": message.tool_call_id,
                "response": message.content,
            }
            chat.append({"role": "tool", "parts": [answer]})
        else:
            parts = _parts(message.content, message.tool_calls)
            chat.append({"role": message.role, "parts": parts})
    return _encode(system).decode(), _encode(chat).decode()


def _output_messages(entry: Entry, reasons: Sequence[str]) -> str:
    """What the model answered, as gen_ai.output.messages (JSON)."""
    reason = reasons[-1] if reasons else ("tool_calls" if entry.tool_calls else "stop")
    answer = {
        "role": "assistant",
        "parts": _parts(entry.content, entry.tool_calls),
        "finish_reason": reason,
    }
    return _encode([answer]).decode()


def _parts(text: str, calls: Sequence[ToolCallInfo]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "content": text}] if text else []
    parts.extend(
        {"type": "tool_call", "id": call.call_id, "name": call.name, "arguments": call.arguments}
        for call in calls
    )
    return parts
