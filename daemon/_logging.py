"""structlog set up once by the entry point: key-value on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog
from structlog.tracebacks import ExceptionDictTransformer


def configure_logging(level: int = logging.INFO) -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if sys.stderr.isatty():
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer()],
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
            # No frame locals: they can hold tokens and users' text.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(serializer=lambda event, **_: encoder.encode(event)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )
