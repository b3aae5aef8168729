"""`chinwag serve` tracing every run to an exporter that drops the spans.

    python -m bench._traced_daemon [chinwag serve's options]

What tracing costs the daemon without any exporter's work: the spans are recorded
by the daemon and batched by the SDK's BatchSpanProcessor as they are with OTLP,
and the exporter then keeps nothing. The daemon takes a `Tracing` as a program that embeds
it would; `chinwag serve` builds its own from OTEL_*, so here the one it would
build is replaced by this one.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from chinwag.daemon import _tracing
from chinwag.daemon.__main__ import main
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class Dropped(SpanExporter):
    spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        Dropped.spans += len(spans)
        return SpanExportResult.SUCCESS


def dropping(environ: Mapping[str, str] | None = None) -> _tracing.Tracing:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    return _tracing.Tracing(provider, capture_content=False, shutdown=provider.shutdown)


if __name__ == "__main__":
    _tracing.Tracing.from_environment = dropping  # type: ignore[method-assign]
    code = main(sys.argv[1:])
    print(f"spans dropped: {Dropped.spans}", file=sys.stderr)
    sys.exit(code)
