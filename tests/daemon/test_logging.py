"""The daemon's log lines hide a URL's credentials, wherever the URL is."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog
from chinwag.daemon._logging import configure_logging
from chinwag.protocol import without_credentials


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:sk-key@api.example.com/v1", "https://***@api.example.com/v1"),
        ("https://sk-key@api.example.com/v1", "https://***@api.example.com/v1"),
        ("postgresql://me:p@ss@db:5432/chinwag", "postgresql://***@db:5432/chinwag"),
        (
            "The connection to the model provider at http://u:k@[::1]:8080/v1 failed: refused.",
            "The connection to the model provider at http://***@[::1]:8080/v1 failed: refused.",
        ),
        ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1"),
        ("sqlite:////home/me@work/chinwag.db", "sqlite:////home/me@work/chinwag.db"),
        ("memory:", "memory:"),
        ("ask me@example.com", "ask me@example.com"),
    ],
)
def test_without_credentials(text: str, shown: str) -> None:
    assert without_credentials(text) == shown


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.BytesIO]:
    """The daemon's logging as it is set up off a terminal, into a buffer."""
    written = io.BytesIO()
    stderr = io.TextIOWrapper(written)  # held: collected, it would close the buffer
    monkeypatch.setattr("sys.stderr", stderr)
    configure_logging()
    yield written
    structlog.reset_defaults()
    stderr.detach()


def test_no_line_shows_a_url_s_credentials(json_log: io.BytesIO) -> None:
    log = structlog.get_logger("chinwag.daemon")
    log.info("daemon_started", storage="postgresql://chinwag:hunter2@db/chinwag", agents=["a"])
    try:
        raise ConnectionError("could not reach https://bot:hunter2@api.example.com")
    except ConnectionError:
        log.exception("request_crashed")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["daemon_started", "request_crashed"]
    assert lines[0]["storage"] == "postgresql://***@db/chinwag"
    assert lines[1]["exception"][0]["exc_value"] == "could not reach https://***@api.example.com"
    assert b"hunter2" not in json_log.getvalue()
