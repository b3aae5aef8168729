"""structlog set up once by the entry point: key-value on a terminal, JSON lines otherwise.

Neither shows a traceback's frame locals: a provider's frames hold its API key,
a run's the users' text. A URL's credentials (``https://user:key@host``, a
``postgresql://user:password@host`` store) are hidden in every line, wherever
a URL is logged; ``without_credentials`` does the same for what the daemon
says elsewhere (a run's error, `chinwag doctor`'s report). A line written
while a span is current (a run's, when traces are on) carries its
``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog
from chinwag.protocol import without_credentials
from opentelemetry import trace
from structlog.tracebacks import ExceptionDictTransformer


def _hide_url_credentials(value: Any) -> Any:
    if isinstance(value, str):
        return without_credentials(value)
    if isinstance(value, list | tuple):
        return [_hide_url_credentials(item) for item in value]
    if isinstance(value, dict):  # a rendered exception: its messages, its frames
        return {key: _hide_url_credentials(item) for key, item in value.items()}
    return value


def hide_url_credentials(
    logger: Any, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """The structlog processor: ``without_credentials`` on every value of the line."""
    for key, value in event_dict.items():
        event_dict[key] = _hide_url_credentials(value)
    return event_dict


def add_trace_ids(
    logger: Any, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """The structlog processor: the current span's trace and span ids, as OTLP shows them,
    on a line written while one is current (none when traces are off)."""
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event_dict["trace_id"] = trace.format_trace_id(span.trace_id)
        event_dict["span_id"] = trace.format_span_id(span.span_id)
    return event_dict


def configure_logging(level: int = logging.INFO) -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if sys.stderr.isatty():
        no_locals = structlog.dev.RichTracebackFormatter(show_locals=False)
        structlog.configure(
            processors=[
                *shared,
                hide_url_credentials,
                structlog.dev.ConsoleRenderer(exception_formatter=no_locals),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.WriteLoggerFactory(sys.stderr),
            cache_logger_on_first_use=True,
        )
        return
    # msgspec renders a line several times faster than json.dumps: logs sit on every run.
    encoder = msgspec.json.Encoder()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            hide_url_credentials,  # after the exception is rendered: its messages too
            structlog.processors.JSONRenderer(serializer=lambda event, **_: encoder.encode(event)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )
