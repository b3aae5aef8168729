"""decode_client on bodies that break the contract: which code, which id, fatal or not.

Bodies are built as plain maps and encoded with msgspec's untyped encoders,
the way a client in another language would produce them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from chinwag.protocol import (
    JSON,
    MSGPACK,
    Codec,
    GetHistory,
    Hello,
    Kill,
    ListConversations,
    Ping,
    ProtocolError,
    Stream,
)

Encode = Callable[[Any], bytes]

CODECS = [
    pytest.param(JSON, msgspec.json.encode, id="json"),
    pytest.param(MSGPACK, msgspec.msgpack.encode, id="msgpack"),
]


def _error(codec: Codec, body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode_client(body)
    assert info.value.code == 400
    assert info.value.message  # one sentence for the peer, never empty
    return info.value


# --- schema errors: the connection stays open ----------------------------------------


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_unknown_type_is_400_with_the_id(codec: Codec, encode: Encode) -> None:
    err = _error(codec, encode({"type": "frobnicate", "id": 41}))
    assert err.request_id == 41
    assert not err.fatal
    assert "frobnicate" in err.message


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_unknown_type_without_an_integer_id(codec: Codec, encode: Encode) -> None:
    err = _error(codec, encode({"type": "frobnicate", "id": "41"}))
    assert err.request_id is None
    assert not err.fatal


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize("kind", [None, 5, ["ping"], {"t": "ping"}], ids=repr)
def test_type_that_is_not_a_string_is_400_with_the_id(
    codec: Codec, encode: Encode, kind: Any
) -> None:
    err = _error(codec, encode({"type": kind, "id": 6}))
    assert err.request_id == 6
    assert not err.fatal


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_missing_type_is_400_with_the_id(codec: Codec, encode: Encode) -> None:
    err = _error(codec, encode({"id": 6, "agent": "assistant"}))
    assert err.request_id == 6
    assert not err.fatal


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize("kind", ["ping", "stream", "cancel", "list_agents"])
def test_missing_id_is_400_without_an_id(codec: Codec, encode: Encode, kind: str) -> None:
    err = _error(codec, encode({"type": kind}))
    assert err.request_id is None
    assert not err.fatal


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize("bad_id", ["7", 7.0, 7.5, True, False, None, [7], {"id": 7}], ids=repr)
def test_non_integer_id_is_400_without_an_id(codec: Codec, encode: Encode, bad_id: Any) -> None:
    err = _error(codec, encode({"type": "ping", "id": bad_id}))
    assert err.request_id is None
    assert not err.fatal


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize(
    "body",
    [
        {"type": "cancel", "id": 9, "target": "3"},
        {"type": "stream", "id": 9, "agent": 1, "content": "hi"},
        {"type": "stream", "id": 9, "agent": "assistant", "content": ["hi"]},
        {"type": "stream", "id": 9, "agent": "assistant", "content": "hi", "queue": "later"},
        {"type": "stream", "id": 9, "agent": "assistant"},  # missing required content
        {"type": "kill", "id": 9, "agent": "assistant", "all": "yes"},
        {"type": "get_history", "id": 9, "agent": "assistant", "after_seq": 1.5},
        {"type": "list_conversations", "id": 9, "limit": None},
        {"type": "reply_to_ask", "id": 9, "agent": "assistant", "content": "x", "ask_id": 3},
    ],
    ids=[
        "cancel-target-str",
        "stream-agent-int",
        "stream-content-list",
        "stream-queue-unknown",
        "stream-content-missing",
        "kill-all-str",
        "history-after-seq-float",
        "conversations-limit-null",
        "reply-ask-id-int",
    ],
)
def test_wrong_field_is_400_with_the_id(codec: Codec, encode: Encode, body: dict[str, Any]) -> None:
    err = _error(codec, encode(body))
    assert err.request_id == 9
    assert not err.fatal
    assert body["type"] in err.message


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_hello_with_a_wrong_protocol_field_is_400(codec: Codec, encode: Encode) -> None:
    err = _error(codec, encode({"type": "hello", "protocol": "1", "client": "cli"}))
    assert err.request_id is None
    assert not err.fatal


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize("body", [[1, 2], "ping", 5, None, 1.5, True, []], ids=repr)
def test_a_body_that_is_not_a_map_is_400_and_not_fatal(
    codec: Codec, encode: Encode, body: Any
) -> None:
    err = _error(codec, encode(body))
    assert err.request_id is None
    assert not err.fatal


def test_msgpack_map_with_non_string_keys_is_400_with_the_id() -> None:
    err = _error(MSGPACK, msgspec.msgpack.encode({"type": "ping", "id": 3, 1: "x"}))
    assert err.request_id == 3
    assert not err.fatal


# --- bodies that do not decode at all: the connection closes ---------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"ping",',
        b'{"type": ping, "id": 1}',
        b'{"type":"ping","id":1}}',
        b'{"type":"ping","id":1} trailing',
        b"{",
        b"{}{}",
        b'{"type":"ping","id":01}',
        b'{"type":"p\\ud800","id":1}',  # a lone surrogate escape
        b"\xff\xfe{",
    ],
)
def test_malformed_json_is_400_and_fatal(body: bytes) -> None:
    err = _error(JSON, body)
    assert err.fatal
    assert err.request_id is None


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # the one opcode msgpack never uses
        b"\x82\xa4type\xa4ping\xa2id",  # truncated: the map promises another value
        msgspec.msgpack.encode({"type": "ping", "id": 1}) + b"\x00",  # trailing bytes
        b"\x81\xa4type\xd9",  # str8 without its length
        b"\xdf\xff\xff\xff\xff",  # map32 announcing four billion pairs
    ],
    ids=["c1", "truncated", "trailing", "str8-cut", "map32-huge"],
)
def test_malformed_msgpack_is_400_and_fatal(body: bytes) -> None:
    err = _error(MSGPACK, body)
    assert err.fatal
    assert err.request_id is None


@pytest.mark.parametrize(
    ("codec", "body"),
    [
        (JSON, b'{"type":"ping","id":"x",'),
        (JSON, b'{"type":"ping","id":"x"} garbage'),
        (JSON, b'{"type":"nope","id":1,"x":[1,'),
        (MSGPACK, msgspec.msgpack.encode({"type": "ping", "id": "x"}) + b"\xc1"),
        (MSGPACK, b"\x83\xa4type\xa4ping\xa2id\xa1x\xa1z"),  # the map's last value is missing
        # a timestamp extension must be 4, 8 or 12 bytes long
        (
            MSGPACK,
            msgspec.msgpack.encode(
                {"type": "ping", "id": "x", "z": msgspec.msgpack.Ext(-1, b"abc")}
            ),
        ),
    ],
    ids=[
        "json-truncated",
        "json-trailing",
        "json-unknown-type-truncated",
        "msgpack-trailing",
        "msgpack-truncated",
        "msgpack-bad-timestamp",
    ],
)
def test_body_malformed_after_a_schema_error_is_still_a_protocol_error(
    codec: Codec, body: bytes
) -> None:
    # Regression: the typed decoder stops at the first bad field with a
    # ValidationError; re-reading the rest of the body for the id used to let
    # msgspec's DecodeError/ValidationError escape decode_client.
    err = _error(codec, body)
    assert err.fatal


@pytest.mark.parametrize(
    "body",
    [
        b"\x82\xa4type\xa1\xff\xa2id\x01",  # in the tag
        b"\x83\xa4type\xa6stream\xa2id\x01\xa5agent\xa1\xff",  # in a known field
        b"\x83\xa4type\xa4ping\xa2id\xa1x\xa1z\xa1\xff",  # after a schema error
        b"\x82\xa1\xff\x01\xa4type\xa4ping",  # in a key
    ],
    ids=["tag", "field", "after-schema-error", "key"],
)
def test_msgpack_string_that_is_not_utf8_is_400_and_fatal(body: bytes) -> None:
    # Regression: msgspec raises UnicodeDecodeError here, which used to escape.
    assert _error(MSGPACK, body).fatal


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"\xff","id":1}',
        b'{"type":"stream","id":1,"agent":"\xff","content":"x"}',
    ],
    ids=["tag", "field"],
)
def test_json_string_that_is_not_utf8_is_400_and_fatal(body: bytes) -> None:
    assert _error(JSON, body).fatal


def _nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _nested_msgpack(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"  # fixarray(1) of fixarray(1) of ... of 1


@pytest.mark.parametrize("valid_id", [True, False], ids=["valid-id", "bad-id"])
def test_json_nested_too_deeply_is_400_and_fatal(valid_id: bool) -> None:
    # Regression: msgspec reports this as RecursionError, which used to escape.
    head = b'{"type":"ping","id":1,"x":' if valid_id else b'{"type":"ping","id":"1","x":'
    err = _error(JSON, head + _nested_json(100_000) + b"}")
    assert err.fatal
    assert _error(JSON, _nested_json(100_000)).fatal


@pytest.mark.parametrize("valid_id", [True, False], ids=["valid-id", "bad-id"])
def test_msgpack_nested_too_deeply_is_400_and_fatal(valid_id: bool) -> None:
    head = msgspec.msgpack.encode({"type": "ping", "id": 1 if valid_id else "1"})
    head = bytes([head[0] + 1]) + head[1:] + b"\xa1x"  # one more pair: "x" -> the nesting
    err = _error(MSGPACK, head + _nested_msgpack(100_000))
    assert err.fatal


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_moderate_nesting_in_an_unknown_field_is_fine(codec: Codec, encode: Encode) -> None:
    value: Any = 1
    for _ in range(50):
        value = [value, {"k": value}] if isinstance(value, int) else [value]
    assert codec.decode_client(encode({"type": "ping", "id": 1, "x": value})) == Ping(id=1)


# --- what is accepted ---------------------------------------------------------------


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_unknown_fields_are_ignored(codec: Codec, encode: Encode) -> None:
    body = encode(
        {
            "type": "ping",
            "id": 1,
            "extra": {"nested": [1, 2.5, None, "x"]},
            "zzz": None,
            "future_field": True,
        }
    )
    assert codec.decode_client(body) == Ping(id=1)


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_hello_ignores_an_id(codec: Codec, encode: Encode) -> None:
    msg = codec.decode_client(encode({"type": "hello", "protocol": 1, "client": "x", "id": 3}))
    assert msg == Hello(protocol=1, client="x")


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_defaults_are_applied(codec: Codec, encode: Encode) -> None:
    stream = codec.decode_client(
        encode({"type": "stream", "id": 1, "agent": "assistant", "content": "hi"})
    )
    assert isinstance(stream, Stream)
    assert stream.queue == "enqueue"
    assert (stream.sender, stream.guest, stream.cwd) == (None, None, None)

    kill = codec.decode_client(encode({"type": "kill", "id": 2, "agent": "assistant"}))
    assert kill == Kill(id=2, agent="assistant", sender=None, all=False)

    history = codec.decode_client(encode({"type": "get_history", "id": 3, "agent": "a"}))
    assert isinstance(history, GetHistory)
    assert (history.after_seq, history.limit, history.include_archived) == (0, None, False)

    listing = codec.decode_client(encode({"type": "list_conversations", "id": 4}))
    assert listing == ListConversations(id=4, agent=None, sender=None, limit=100, cursor=None)

    hello = codec.decode_client(encode({"type": "hello", "protocol": 1, "client": "x"}))
    assert hello == Hello(protocol=1, client="x", token=None)


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize("policy", ["enqueue", "reject", "interrupt"])
def test_every_queue_policy_is_accepted(codec: Codec, encode: Encode, policy: str) -> None:
    msg = codec.decode_client(
        encode({"type": "stream", "id": 1, "agent": "a", "content": "c", "queue": policy})
    )
    assert isinstance(msg, Stream)
    assert msg.queue == policy


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize("request_id", [0, -1, 2**63 - 1, -(2**63)])
def test_any_64_bit_integer_is_an_id(codec: Codec, encode: Encode, request_id: int) -> None:
    assert codec.decode_client(encode({"type": "ping", "id": request_id})) == Ping(id=request_id)
    err = _error(codec, encode({"type": "nope", "id": request_id}))
    assert err.request_id == request_id


# --- the client side ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "body"),
    [
        (JSON, b'{"type":"pong",'),
        (JSON, b'{"type":"pong"}'),
        (JSON, b'{"type":"nope","id":1}'),
        (JSON, b"[1]"),
        (
            JSON,
            b'{"type":"pong","id":1,"future_field":' + _nested_json(100_000) + b"}",
        ),
        (MSGPACK, b"\xc1"),
        (MSGPACK, msgspec.msgpack.encode({"type": "end", "id": 1, "status": "later"})),
        (MSGPACK, b"\x82\xa4type\xa5title\xa5title\xa1\xff"),
    ],
    ids=[
        "json-truncated",
        "pong-no-id",
        "unknown",
        "array",
        "deep",
        "msgpack-c1",
        "end-bad-status",
        "msgpack-not-utf8",
    ],
)
def test_decode_server_rejects_malformed_frames(codec: Codec, body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode_server(body)
    assert info.value.code == 400
