"""Opaque keyset cursors for ``list_conversations``.

A cursor is the position of the last item of a page: its ``updated_at`` (as
``_timestamps.to_text``) and its backend id, tagged with the backend that made
it, MessagePack-encoded and urlsafe-base64'd without padding. Pages run in
``(updated_at DESC, id DESC)`` order, so the next page is every row strictly
below that position.
"""

from __future__ import annotations

import base64
import binascii

import msgspec

from ._timestamps import from_text

_decoder = msgspec.msgpack.Decoder(tuple[str, str, int])


def encode_cursor(backend: str, updated_at: str, id_: int) -> str:
    raw = msgspec.msgpack.encode((backend, updated_at, id_))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(backend: str, cursor: str) -> tuple[str, int]:
    """``(updated_at text, id)``; ``ValueError`` for a cursor ``backend`` did not make."""
    try:
        padded = cursor.encode("ascii") + b"=" * (-len(cursor) % 4)
        raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        tag, updated_at, id_ = _decoder.decode(raw)
        from_text(updated_at)  # a position must name a real instant
    except (UnicodeEncodeError, binascii.Error, msgspec.DecodeError, ValueError) as exc:
        raise ValueError("The cursor is not one this store issued.") from exc
    if tag != backend:
        raise ValueError("The cursor is not one this store issued.")
    return updated_at, id_
