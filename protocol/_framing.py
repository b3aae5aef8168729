"""Length-prefixed framing, sans-IO: feed bytes in, take frame bodies out."""

from __future__ import annotations

from collections.abc import Iterator

from ._errors import ProtocolError

HEADER_BYTES = 4


def frame(body: bytes | bytearray) -> bytes:
    """Prefix one body with its 4-byte big-endian length."""
    return len(body).to_bytes(HEADER_BYTES, "big") + body


class FrameDecoder:
    """Split a byte stream into frame bodies.

    Feed it whatever the transport read, in chunks of any size; iterate it to
    take every complete body. A zero length raises ``ProtocolError`` 400, a
    length over ``max_frame_bytes`` raises 413, before the body is buffered.
    After an error the decoder is unusable: the stream can no longer be trusted.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._offset = 0
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._offset and self._offset >= len(self._buffer) // 2:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """Return the next complete body, or None until more bytes arrive."""
        if self._failed is not None:
            raise self._failed
        available = len(self._buffer) - self._offset
        if available < HEADER_BYTES:
            return None
        start = self._offset
        length = int.from_bytes(self._buffer[start : start + HEADER_BYTES], "big")
        if length == 0:
            self._failed = ProtocolError(400, "A frame had length 0; every frame needs a body.")
            raise self._failed
        if length > self.max_frame_bytes:
            self._failed = ProtocolError(
                413,
                f"A frame of {length} bytes exceeds the limit of {self.max_frame_bytes} bytes; "
                "send smaller messages.",
            )
            raise self._failed
        end = start + HEADER_BYTES + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[start + HEADER_BYTES : end])
        self._offset = end
        return body

    def __iter__(self) -> Iterator[bytes]:
        while (body := self.next_frame()) is not None:
            yield body
