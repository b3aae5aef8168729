"""The daemon's error root: a request refused with a protocol code and one sentence."""

from __future__ import annotations


class RequestError(Exception):
    """Refuse the request: ``code`` per PROTOCOL.md, ``message`` one clear sentence."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
