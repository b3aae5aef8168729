"""Encodings: JSON or MessagePack, fixed per connection by its first frame."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from ._errors import ProtocolError
from ._framing import HEADER_BYTES
from ._messages import ClientMsg, ServerMsg


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
        buf = bytearray(HEADER_BYTES)
        self._encoder.encode_into(msg, buf, HEADER_BYTES)
        buf[:HEADER_BYTES] = (len(buf) - HEADER_BYTES).to_bytes(HEADER_BYTES, "big")
        return buf

    def decode_client(self, body: bytes) -> ClientMsg:
        """Decode a client message, or raise ``ProtocolError`` saying what is wrong."""
        try:
            msg: ClientMsg = self._client_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise self._invalid(body, exc) from exc
        except msgspec.DecodeError as exc:
            raise ProtocolError(
                400,
                f"The frame body is not valid {self.encoding.value} ({exc}); "
                "the connection is closed.",
            ) from exc
        return msg

    def decode_server(self, body: bytes) -> ServerMsg:
        """Decode a server frame (client side); ``ProtocolError`` if it is malformed."""
        try:
            msg: ServerMsg = self._server_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ProtocolError(400, f"The server sent a malformed frame: {exc}.") from exc
        return msg

    def _invalid(self, body: bytes, exc: msgspec.ValidationError) -> ProtocolError:
        # The body decodes but does not fit the schema: the framing is intact,
        # so the connection stays open and the error names the request if it can.
        raw = self._any_decoder.decode(body)
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
