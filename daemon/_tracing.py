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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from importlib.metadata import version

import trio
from opentelemetry.trace import Tracer, TracerProvider

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
    """Where the daemon's spans go: a tracer, and whether they may carry content.

    Built from the environment (``from_environment``), it owns its provider and
    flushes it on ``aclose``; handed a provider (tests, a program that embeds the
    daemon), it leaves the provider to its owner (no ``shutdown``). Content is
    captured as ``capture_content`` says, else as the environment does.
    """

    def __init__(
        self,
        provider: TracerProvider,
        *,
        capture_content: bool | None = None,
        shutdown: Callable[[], object] | None = None,
    ) -> None:
        self.tracer: Tracer = provider.get_tracer(
            "chinwag.daemon", version("chinwag"), schema_url=SCHEMA_URL
        )
        if capture_content is None:
            capture_content = content_captured(os.environ)
        self.capture_content = capture_content
        self._shutdown = shutdown

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
