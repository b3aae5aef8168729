"""Encodings: JSON or MessagePack, fixed per connection by its first frame."""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

import msgspec

from ._errors import ProtocolError
from ._framing import HEADER_BYTES
from ._unions import ClientMsg, ServerMsg

# What msgspec raises for a body it cannot read at all. Besides DecodeError it
# lets UnicodeDecodeError through for a string that is not UTF-8, and
# RecursionError for nesting past the interpreter's recursion limit.
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
_pack_header = struct.Struct(">I").pack_into  # a frame's 4-byte big-endian length


# After a schema error, a body up to this size is read whole as Python objects (at
# most a few MB of them); a larger one only at its top level.
WHOLE_BODY_BYTES = 16 * 1024


class _Envelope(msgspec.Struct):
    """What a refusal needs of a message: its id and type, left encoded."""

    id: msgspec.Raw = msgspec.Raw()
    type: msgspec.Raw = msgspec.Raw()


class _TopLevel(NamedTuple):
    id: object
    type: object


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
        self._envelope_decoder = mod.Decoder(_Envelope)
        self._skim_decoder = mod.Decoder(msgspec.Raw)
        self._scalar_decoders = {kind: mod.Decoder(kind) for kind in (int, str)}

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
            top = self._top_level(body)
        except _UNREADABLE as exc:
            raise self._malformed(exc) from exc
        raise self._invalid(top, schema_error) from schema_error

    def _top_level(self, body: bytes) -> _TopLevel | None:
        """The `id` and `type` of a body that broke the schema; None if it is no map.

        A small body is read whole, which also finds bad bytes in the fields the
        typed decoder did not reach (and a msgpack map with keys that are not
        strings). A larger one is read only as far as the envelope: its other
        values are checked, as ignored fields are, for structure, and none becomes
        an object: 16 MiB of empty arrays would be 16M lists, over a gigabyte.
        """
        if len(body) <= WHOLE_BODY_BYTES:
            raw = self._any_decoder.decode(body)
            if not isinstance(raw, dict):
                return None
            return _TopLevel(id=raw.get("id"), type=raw.get("type"))
        try:
            envelope = self._envelope_decoder.decode(body)
        except msgspec.ValidationError:  # not a map, or a key that is not a string
            self._skim_decoder.decode(body)  # stopped at once: check the rest's structure
            return None
        return _TopLevel(id=self._value(envelope.id, int), type=self._value(envelope.type, str))

    def _value(self, raw: msgspec.Raw, kind: type[int] | type[str]) -> object:
        """``raw`` decoded as ``kind``, or None when it is absent or something else."""
        if not raw:
            return None
        try:
            return self._scalar_decoders[kind].decode(raw)
        except (msgspec.ValidationError, *_UNREADABLE):
            return None

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

    def _invalid(self, top: _TopLevel | None, exc: msgspec.ValidationError) -> ProtocolError:
        # The body decodes but does not fit the schema: the framing is intact,
        # so the connection stays open and the error names the request if it can.
        if top is None:
            return ProtocolError(400, "A message must be a map with a `type` field.", fatal=False)
        request_id = top.id if type(top.id) is int else None
        kind = top.type
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
