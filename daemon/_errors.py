"""The daemon's error roots: a request refused with a protocol code and one sentence,
and a tool call refused with the sentence the model sees."""

from __future__ import annotations


class RequestError(Exception):
    """Refuse the request: ``code`` per PROTOCOL.md, ``message`` one clear sentence."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ToolError(Exception):
    """A tool refused or failed; its message is the error result the model sees."""
