"""OpenTelemetry traces, opt-in through the standard ``OTEL_*`` variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``console``, or
when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` turns it off
whatever else is set. The SDK reads the rest itself: the service name and
resource attributes, the endpoint, headers, timeout and compression, the
sampler, the batch processor's limits. OTLP goes over HTTP (protobuf), from
the batch processor's own thread.

Spans follow the GenAI semantic conventions of ``SEMCONV_VERSION``; no prompt,
completion, tool argument or tool result is put in one unless
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``, the variable
OpenTelemetry's own GenAI instrumentations read.

A span is recorded, then emitted: its start takes its ids (from the provider's
id generator), its clock and, for a run's, the provider's sampler's decision
(a model or tool call's follows its run's, as ``ParentBased`` would); its end
builds one ``ReadableSpan`` and hands it to the provider's span processors, a
model or tool call's with its run's, after the run's `end` has gone out.
The SDK's own spans cost several times as much to make, for what the daemon
never uses: a lock per attribute set, checks of every value, a processor's
``on_start``. The attributes are few and the daemon's own, within the SDK's
default limits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, TraceFlags

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

#: The GenAI semantic conventions the spans follow: every attribute name used is in it.
SEMCONV_VERSION = "1.38.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
#: "true" puts prompts, completions, tool arguments and results in spans.
CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
DEFAULT_SERVICE_NAME = "chinwag"

_EXPORTERS = ("otlp", "console")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def _named_exporters(environ: Mapping[str, str]) -> list[str]:
    listed = environ.get("OTEL_TRACES_EXPORTER", "")
    return [name.strip().lower() for name in listed.split(",") if name.strip()]


def traces_exporters(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks spans to go to; none: tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = _named_exporters(environ)
    if named:
        return [name for name in named if name != "none"]
    return ["otlp"] if any(environ.get(name) for name in _ENDPOINTS) else []


def tracing_problem(environ: Mapping[str, str]) -> str | None:
    """Why the ``OTEL_*`` variables ask for traces this daemon cannot send; None when it can."""
    unknown = [name for name in _named_exporters(environ) if name not in (*_EXPORTERS, "none")]
    if unknown:
        return (
            f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}; chinwag sends traces to otlp "
            "(over HTTP) or console, or to none"
        )
    if "otlp" in traces_exporters(environ):
        # The first that is set wins, as in the SDK.
        protocol = next((environ[name] for name in _PROTOCOLS if environ.get(name)), None)
        if protocol is not None and protocol.strip() != "http/protobuf":
            return (
                f"The OTLP protocol is set to {protocol.strip()!r}; chinwag sends OTLP as "
                '"http/protobuf" (port 4318 by default), so set that or unset it'
            )
    return None


def content_captured(environ: Mapping[str, str]) -> bool:
    """Whether spans may carry prompts, completions, tool arguments and results."""
    return environ.get(CAPTURE_CONTENT, "").strip().lower() == "true"


class Tracing:
    """Where the daemon's spans go: a provider's span processors, and whether spans may
    carry content.

    Built from the environment (``from_environment``), it owns its provider and
    flushes it on ``aclose``; handed a provider (tests, a program that embeds the
    daemon), it leaves the provider to its owner (no ``shutdown``). The provider's
    resource, sampler, id generator and span processors are used, never its
    tracers. Content is captured as ``capture_content`` says, else as the
    environment does.
    """

    def __init__(
        self,
        provider: TracerProvider,
        *,
        capture_content: bool | None = None,
        shutdown: Callable[[], object] | None = None,
    ) -> None:
        from opentelemetry.sdk.trace import ReadableSpan, Tracer
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        tracer = provider.get_tracer("chinwag.daemon", version("chinwag"), schema_url=SCHEMA_URL)
        assert isinstance(tracer, Tracer)  # an SDK provider's
        self._processor = tracer.span_processor  # all of the provider's, as it adds them
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        self.resource = provider.resource
        self._scope = InstrumentationScope("chinwag.daemon", version("chinwag"), SCHEMA_URL)
        self._readable = ReadableSpan
        if capture_content is None:
            capture_content = content_captured(os.environ)
        self.capture_content = capture_content
        self._shutdown = shutdown

    def start(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        parent: otel_context.Context | None,
    ) -> RecordedSpan:
        """A span starting now under the span current in ``parent`` (a new trace when
        none is), recorded as the provider's sampler decides."""
        return RecordedSpan(self, name, kind, attributes, None, parent)

    def identify(self, span: RecordedSpan, parent: otel_context.Context | None) -> SpanContext:
        """The ids and flags of ``span``, a child of the span current in ``parent``; the
        sampler decides whether it is recorded (``span.recorded``)."""
        above = trace.get_current_span(parent).get_span_context()
        if above.is_valid:
            trace_id = above.trace_id
            random = above.trace_flags.random_trace_id
            span.parent = above
        else:
            trace_id = self._ids.generate_trace_id()
            random = self._ids.is_trace_id_random()
        decided = self._sampler.should_sample(
            parent, trace_id, span.name, span.kind, span.attributes
        )
        if decided.attributes:
            span.attributes.update(decided.attributes)
        # The SDK's Decision leaves these two untyped.
        span.recorded = decided.decision.is_recording()  # type: ignore[no-untyped-call]
        sampled = decided.decision.is_sampled()  # type: ignore[no-untyped-call]
        flags = TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT
        if random:
            flags |= TraceFlags.RANDOM_TRACE_ID
        return SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=decided.trace_state,
        )

    def identify_child(self, span: RecordedSpan, parent: RecordedSpan) -> SpanContext:
        """The ids of ``span``, in ``parent``'s trace, recorded when ``parent`` is."""
        above = parent.get_span_context()
        span.parent = above
        span.recorded = parent.recorded
        return SpanContext(
            above.trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=above.trace_flags,
            trace_state=above.trace_state,
        )

    def emit(self, span: RecordedSpan, end_time: int) -> None:
        """Hand the ended ``span`` to the span processors."""
        self._processor.on_end(
            self._readable(
                span.name,
                context=span.get_span_context(),
                parent=span.parent,
                resource=self.resource,
                attributes=span.attributes,
                kind=span.kind,
                status=span.status,
                start_time=span.start_time,
                end_time=end_time,
                instrumentation_scope=self._scope,
            )
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Tracing | None:
        """Tracing as the ``OTEL_*`` variables set it up; None when they do not ask for it.

        The SDK is imported only then: a daemon that does not trace does not load it.
        """
        exporters = traces_exporters(environ)
        if not exporters:
            return None
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        # Shut down by `aclose`, when the daemon stops, not at the interpreter's exit.
        provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
        for name in exporters:
            exporter: SpanExporter
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                exporter = OTLPSpanExporter()
            else:
                exporter = ConsoleSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, capture_content=content_captured(environ), shutdown=provider.shutdown)

    async def aclose(self) -> None:
        """Send what is batched and stop the exporters' threads (a provider of our own only).

        Waits at most the exporters' timeouts, in a worker thread.
        """
        if self._shutdown is not None:
            await trio.to_thread.run_sync(self._shutdown)


_UNSET = Status()


class RecordedSpan(NonRecordingSpan):
    """A span from its start to its end: the daemon sets its attributes and status as
    the work goes, and ``end`` emits it once, when its trace is recorded.

    To OpenTelemetry's API it is a span that records nothing: ``current``, the
    context with it as the current span, is attached on the task that does its
    work, so that log lines and the spans started meanwhile see its ids. Those are
    made when first asked for (a log line, a child, its end), off the way to a
    run's first event, and the sampler asked then.
    """

    def __init__(
        self,
        tracing: Tracing,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        parent: RecordedSpan | None,
        parent_context: otel_context.Context | None,
    ) -> None:
        self.start_time = time.time_ns()
        self._tracing = tracing
        self.name = name
        self.kind = kind
        self.attributes = attributes
        self.status = _UNSET
        self.ended = False
        self.recorded = False  # set with its ids: whether the sampler said to record it
        self.parent: SpanContext | None = None  # set with its ids
        self.end_time = 0
        self._above = parent
        # The run's span, over its model and tool calls' spans: they are emitted with it.
        self._root: RecordedSpan | None = None if parent is None else parent._root or parent
        self._held: list[RecordedSpan] = []  # ended under this root, emitted when it ends
        self._parent_context = parent_context
        self._context: SpanContext | None = None  # type: ignore[assignment]
        self.current = trace.set_span_in_context(self, parent_context)

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            above = self._above
            if above is None:
                context = self._tracing.identify(self, self._parent_context)
            else:
                context = self._tracing.identify_child(self, above)
            self._context = context
        return context

    def child(self, name: str, kind: SpanKind, attributes: dict[str, Any]) -> RecordedSpan:
        """A span starting now under this one, recorded when this one is."""
        return RecordedSpan(self._tracing, name, kind, attributes, self, self.current)

    def end(self, end_time: int | None = None) -> None:
        """End it (now by default), unless it has ended.

        A span under a root that has not ended (a model or tool call's, under its
        run's) is emitted with the root, once the run has sent its `end`: the ids,
        the sampler and the span processors are not on the client's way to it.
        """
        if self.ended:
            return
        self.ended = True
        self.end_time = end_time or time.time_ns()
        root = self._root
        if root is not None and not root.ended:
            root._held.append(self)
            return
        for span in self._held:  # in the order they ended, before their root, as the SDK's
            span._emit()
        self._held.clear()
        self._emit()

    def _emit(self) -> None:
        self.get_span_context()
        if self.recorded:
            self._tracing.emit(self, self.end_time)
