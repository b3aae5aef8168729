"""Encodings: JSON or MessagePack, fixed per connection by its first frame."""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgspec

from ._errors import ProtocolError
from ._framing import HEADER_BYTES
from ._messages import ClientMsg, ServerMsg

# What msgspec raises for a body it cannot read at all. Besides DecodeError it
# lets UnicodeDecodeError through for a string that is not UTF-8, and
# RecursionError for nesting past the interpreter's recursion limit.
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
_pack_header = struct.Struct(">I").pack_into  # a frame's 4-byte big-endian length


def _unreadable_reason(exc: Exception) -> str:
    return "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)


class Encoding(enum.Enum):
    JSON = "json"
    MSGPACK = "msgpack"

    @classmethod
    def of(cls, body: bytes) -> Encoding:
        """The encoding a connection uses, from its first frame's body."""
        return cls.JSON if body[:1] == b"{" else cls.MSGPACK


class Codec:
    """Encoders and typed decoders for one encoding, built once and shared."""

    def __init__(self, encoding: Encoding) -> None:
        self.encoding = encoding
        mod: Any = msgspec.json if encoding is Encoding.JSON else msgspec.msgpack
        self._encoder = mod.Encoder()
        self._client_decoder = mod.Decoder(ClientMsg)
        self._server_decoder = mod.Decoder(ServerMsg)
        self._any_decoder = mod.Decoder()

    def encode(self, msg: msgspec.Struct) -> bytes:
        """One message as a body, without its length prefix."""
        body: bytes = self._encoder.encode(msg)
        return body

    def encode_frame(self, msg: msgspec.Struct) -> bytearray:
        """One message as a whole frame: the length prefix, then the body."""
        buf = bytearray()
        self.append_frame(msg, buf)
        return buf

    def append_frame(self, msg: msgspec.Struct, buf: bytearray) -> int:
        """Encode one message as a frame at the end of ``buf``; its body's length.

        Writers that queue many frames append them to one buffer this way,
        instead of making a buffer per frame.
        """
        start = len(buf)
        self._encoder.encode_into(msg, buf, start + HEADER_BYTES)
        size = len(buf) - start - HEADER_BYTES
        _pack_header(buf, start, size)
        return size

    def decode_client(self, body: bytes) -> ClientMsg:
        """Decode a client message, or raise ``ProtocolError`` saying what is wrong."""
        try:
            msg: ClientMsg = self._client_decoder.decode(body)
        except msgspec.ValidationError as exc:
            schema_error = exc
        except _UNREADABLE as exc:
            raise self._malformed(exc) from exc
        else:
            return msg
        # The typed decoder stops at the first field that breaks the schema, so
        # the rest of the body is still unchecked: it may be truncated or garbage,
        # and that closes the connection like any other undecodable body.
        try:
            raw = self._any_decoder.decode(body)
        except _UNREADABLE as exc:
            raise self._malformed(exc) from exc
        raise self._invalid(raw, schema_error) from schema_error

    def decode_server(self, body: bytes) -> ServerMsg:
        """Decode a server frame (client side); ``ProtocolError`` if it is malformed."""
        try:
            msg: ServerMsg = self._server_decoder.decode(body)
        except _UNREADABLE as exc:
            raise ProtocolError(
                400, f"The server sent a malformed frame: {_unreadable_reason(exc)}."
            ) from exc
        return msg

    def _malformed(self, exc: Exception) -> ProtocolError:
        return ProtocolError(
            400,
            f"The frame body is not valid {self.encoding.value} ({_unreadable_reason(exc)}); "
            "the connection is closed.",
        )

    def _invalid(self, raw: Any, exc: msgspec.ValidationError) -> ProtocolError:
        # The body decodes but does not fit the schema: the framing is intact,
        # so the connection stays open and the error names the request if it can.
        if not isinstance(raw, dict):
            return ProtocolError(400, "A message must be a map with a `type` field.", fatal=False)
        request_id = raw.get("id")
        if type(request_id) is not int:
            request_id = None
        kind = raw.get("type")
        what = f"`{kind}` message" if isinstance(kind, str) else "message"
        reason = str(exc)
        if not isinstance(kind, str):
            return ProtocolError(
                400,
                "The message has no string `type` field; every message names its type.",
                request_id=request_id,
                fatal=False,
            )
        if "$.type" in reason:
            return ProtocolError(
                400,
                f"Unknown message type {kind!r}; see the protocol's list of client messages.",
                request_id=request_id,
                fatal=False,
            )
        return ProtocolError(400, f"Invalid {what}: {reason}.", request_id=request_id, fatal=False)


JSON = Codec(Encoding.JSON)
MSGPACK = Codec(Encoding.MSGPACK)


def codec_for(encoding: Encoding) -> Codec:
    return JSON if encoding is Encoding.JSON else MSGPACK
