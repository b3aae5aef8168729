"""decode_client on bodies that break the contract: which code, which id, fatal or not.

Bodies are built as plain maps and encoded with msgspec's untyped encoders,
the way a client in another language would produce them.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from chinwag.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
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


# --- a schema error in a body of millions of values -----------------------------------

FLOOD_VALUES = DEFAULT_MAX_FRAME_BYTES - 64  # as many empty arrays as fit one frame
# What refusing such a body may allocate: a handful of small objects, nothing per value.
FLOOD_PEAK_BYTES = 64 * 1024


def _flood(codec: Codec, head: dict[str, Any] | None) -> bytes:
    """A body of ~16 MiB whose bulk is empty arrays: alone (``head`` None), or as the
    value of one more field `x` of the map ``head``. Built by hand: encoding 16M
    Python lists to make it would cost what the test checks the decoder does not."""
    if codec is JSON:
        arrays = b"[" + b"[]," * (FLOOD_VALUES // 3 - 1) + b"[]]"
        if head is None:
            return arrays
        return msgspec.json.encode(head)[:-1] + b',"x":' + arrays + b"}"
    count = FLOOD_VALUES
    arrays = b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count  # array32 of fixarray(0)
    if head is None:
        return arrays
    encoded = msgspec.msgpack.encode(head)
    assert 0x80 <= encoded[0] < 0x8F, "a fixmap with room for one more pair"
    return bytes([encoded[0] + 1]) + encoded[1:] + b"\xa1x" + arrays


def _refused_within(codec: Codec, body: bytes, peak: int) -> ProtocolError:
    """The error for ``body``, checking that decoding it allocated at most ``peak`` bytes."""
    tracemalloc.start()
    try:
        err = _error(codec, body)
        _, used = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert used <= peak, f"refusing the body allocated {used:,} bytes at its peak"
    return err


@pytest.mark.parametrize(("codec", "encode"), CODECS)
@pytest.mark.parametrize(
    "head",
    [
        {"type": "teleport", "id": 7},  # refused at its tag, before the flood is read
        {"id": 7, "type": "stream", "agent": "a"},  # refused after it: `content` is missing
        {"type": "ping", "id": "7"},  # an id that is not an integer: no id to answer with
    ],
    ids=["unknown-type", "missing-field", "string-id"],
)
def test_a_body_of_millions_of_values_is_refused_without_reading_them_into_memory(
    codec: Codec, encode: Encode, head: dict[str, Any]
) -> None:
    # Regression: after the schema error the whole body was decoded again as Python
    # objects to find its id: 16M empty lists, a 1.5 GB peak and seconds of stall.
    body = _flood(codec, head)
    assert len(body) <= DEFAULT_MAX_FRAME_BYTES
    err = _refused_within(codec, body, FLOOD_PEAK_BYTES)
    assert not err.fatal
    assert err.request_id == (head["id"] if type(head["id"]) is int else None)
    small = _error(codec, encode(head))  # the same message without the flood
    assert err.message == small.message


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_a_body_that_is_millions_of_values_and_no_map_is_refused_cheaply(
    codec: Codec, encode: Encode
) -> None:
    err = _refused_within(codec, _flood(codec, None), FLOOD_PEAK_BYTES)
    assert (err.request_id, err.fatal) == (None, False)
    assert err.message == _error(codec, encode([[]])).message


@pytest.mark.parametrize(("codec", "encode"), CODECS)
def test_a_flood_cut_short_after_a_schema_error_still_closes_the_connection(
    codec: Codec, encode: Encode
) -> None:
    body = _flood(codec, {"type": "teleport", "id": 7})
    assert _refused_within(codec, body[:-1], FLOOD_PEAK_BYTES).fatal


@pytest.mark.parametrize(
    ("codec", "tail"), [(JSON, b"]"), (MSGPACK, b"\xc1")], ids=["json", "msgpack"]
)
def test_a_large_body_that_is_no_map_and_is_malformed_closes_the_connection(
    codec: Codec, tail: bytes
) -> None:
    # Past the size read whole, the envelope stops at the first byte of a body that
    # is no map: the rest must still be read for its structure.
    body = _flood(codec, None)[: 64 * 1024] + tail
    assert _error(codec, body).fatal
