"""The protocol layer's one error root."""

from __future__ import annotations


class ProtocolError(Exception):
    """A peer broke the wire contract.

    ``code`` is the HTTP-like code of PROTOCOL.md, ``message`` one sentence for
    the peer, ``request_id`` the offending request's id when it could be read,
    and ``fatal`` whether the connection must close (the stream can no longer
    be trusted).
    """

    def __init__(
        self, code: int, message: str, *, request_id: int | None = None, fatal: bool = True
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.fatal = fatal
