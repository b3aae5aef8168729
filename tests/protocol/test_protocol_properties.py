"""Property tests: whatever bytes arrive, the protocol layer answers with messages or
ProtocolError, never with another exception.

Valid messages are generated from the Structs' own type information
(``msgspec.inspect``), so a field added to a message is generated too.
"""

from __future__ import annotations

import itertools
import typing
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import msgspec
import msgspec.inspect as mi
from chinwag.protocol import (
    JSON,
    MSGPACK,
    ClientMsg,
    Codec,
    FrameDecoder,
    Ping,
    ProtocolError,
    ServerMsg,
    frame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The whole directory should run in a few seconds; the tests a failure would
# most likely hide in get 200 examples, the narrower ones 100.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIGHT = settings(FAST, max_examples=100)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # what msgpack can carry
TEXT = st.text(max_size=24)  # hypothesis never generates lone surrogates here
OFFSETS = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
DATETIMES = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC) | OFFSETS
)


def _values(t: mi.Type) -> st.SearchStrategy[Any]:
    """Valid values of one msgspec type; recurses into lists, unions and Structs."""
    match t:
        case mi.IntType():
            return INT64
        case mi.FloatType():
            return st.floats(allow_nan=False, allow_infinity=False)
        case mi.StrType():
            return TEXT
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.DateTimeType():
            return DATETIMES
        case mi.DateType():
            return st.dates(min_value=date(1, 1, 2), max_value=date(9999, 12, 30))
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.ListType():
            return st.lists(_values(t.item_type), max_size=3)
        case mi.DictType():
            return st.dictionaries(_values(t.key_type), _values(t.value_type), max_size=3)
        case mi.AnyType():  # free JSON: what both encodings give back as they got it
            return st.recursive(
                st.none() | st.booleans() | INT64 | TEXT,
                lambda inner: (
                    st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3)
                ),
                max_leaves=6,
            )
        case mi.UnionType():
            return st.one_of([_values(member) for member in t.types])
        case mi.StructType():
            return st.builds(t.cls, **{f.name: _values(f.type) for f in t.fields})
    raise AssertionError(f"no strategy for {t!r}; extend _values")


CLIENT_MESSAGES: st.SearchStrategy[ClientMsg] = _values(mi.type_info(ClientMsg))
SERVER_MESSAGES: st.SearchStrategy[ServerMsg] = _values(mi.type_info(ServerMsg))
CODECS = st.sampled_from([JSON, MSGPACK])


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _check_error(err: ProtocolError) -> None:
    assert err.code in (400, 413)
    assert isinstance(err.message, str)
    assert err.message
    assert err.request_id is None or type(err.request_id) is int


# --- valid traffic ---------------------------------------------------------------------


@FAST
@given(
    codec=CODECS,
    msgs=st.lists(CLIENT_MESSAGES, min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_client_frames_survive_any_chunking(
    codec: Codec, msgs: list[ClientMsg], cuts: list[int]
) -> None:
    stream = b"".join(codec.encode_frame(m) for m in msgs)
    decoder = FrameDecoder(len(stream))
    got = []
    for chunk in _cut(stream, cuts):
        decoder.feed(chunk)
        got += [codec.decode_client(body) for body in decoder]
    assert got == msgs
    assert decoder.buffered == 0


@FAST
@given(
    codec=CODECS,
    msgs=st.lists(SERVER_MESSAGES, min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_server_frames_survive_any_chunking(
    codec: Codec, msgs: list[ServerMsg], cuts: list[int]
) -> None:
    stream = b"".join(codec.encode_frame(m) for m in msgs)
    decoder = FrameDecoder(len(stream))
    got = []
    for chunk in _cut(stream, cuts):
        decoder.feed(chunk)
        got += [codec.decode_server(body) for body in decoder]
    assert got == msgs


@LIGHT
@given(
    bodies=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_arbitrary_bodies_survive_any_chunking(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(b) for b in bodies)
    decoder = FrameDecoder(300)
    got: list[bytes] = []
    for chunk in _cut(stream, cuts):
        decoder.feed(chunk)
        got += list(decoder)
    assert got == bodies


# --- hostile traffic -------------------------------------------------------------------

# Raw bytes alone rarely form a plausible header, so mix in framed random bodies and
# framed bodies that start like a message in either encoding.
PLAUSIBLE_BODIES = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.binary(max_size=200).map(lambda b: b'{"type":"stream","id":1,' + b),
    st.binary(max_size=200).map(lambda b: b"\x83\xa4type\xa6stream\xa2id\x01" + b),
)
HOSTILE_STREAMS = st.lists(
    st.one_of(st.binary(max_size=64), PLAUSIBLE_BODIES.map(frame)), min_size=1, max_size=8
).map(b"".join)


@FAST
@given(
    codec=CODECS,
    stream=HOSTILE_STREAMS,
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    max_frame_bytes=st.integers(min_value=1, max_value=512),
)
def test_random_bytes_only_ever_raise_protocol_error(
    codec: Codec, stream: bytes, cuts: list[int], max_frame_bytes: int
) -> None:
    decoder = FrameDecoder(max_frame_bytes)
    try:
        for chunk in _cut(stream, cuts):
            decoder.feed(chunk)
            for body in decoder:
                assert 1 <= len(body) <= max_frame_bytes
                try:
                    codec.decode_client(body)
                except ProtocolError as err:
                    _check_error(err)
                    if err.fatal:
                        return
                try:
                    codec.decode_server(body)
                except ProtocolError as err:
                    _check_error(err)
    except ProtocolError as err:  # from the framing: 400 or 413, and the stream is done
        _check_error(err)
        assert err.fatal


# Message-shaped values: a real tag and a plausible id most of the time, then random
# fields, so the schema-error path (id recovery, fatal or not) is exercised, not just
# "not a map".
KEYS = st.sampled_from(
    ["type", "id", "agent", "sender", "content", "queue", "target", "limit", "all", "protocol"]
) | st.text(max_size=8)
TAGS = st.sampled_from(
    [typing.cast(str, t.__struct_config__.tag) for t in typing.get_args(ClientMsg)]
)
HUGE_STRINGS = st.integers(min_value=10_000, max_value=1_000_000).map(lambda n: "x" * n)
HUGE_ARRAYS = st.integers(min_value=10_000, max_value=200_000).map(lambda n: [0] * n)


def _nest(depth: int, leaf: Any, as_map: bool) -> Any:
    for _ in range(depth):
        leaf = {"k": leaf} if as_map else [leaf]
    return leaf


def _json_ish(ints: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | ints | st.floats(allow_nan=False) | TEXT | HUGE_STRINGS
    scalars |= HUGE_ARRAYS
    # Nesting the encoders can still produce; deeper nesting is built as raw bytes below.
    nested = st.builds(_nest, st.integers(min_value=1, max_value=100), scalars, st.booleans())
    values = st.recursive(
        scalars | nested,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
        max_leaves=8,
    )
    head = st.fixed_dictionaries({}, optional={"type": TAGS | values, "id": ints | values})
    rest = st.dictionaries(KEYS, values, max_size=3)
    shaped = st.builds(lambda rest, head: {**rest, **head}, rest, head)
    return values | shaped


def _decode_value(codec: Codec, body: bytes, value: Any) -> None:
    try:
        msg = codec.decode_client(body)
    except ProtocolError as err:
        _check_error(err)
        assert err.code == 400
        # well-formed bytes: a schema problem, never a reason to close the connection
        assert not err.fatal, err.message
        if err.request_id is not None:
            assert isinstance(value, dict)
            assert value["id"] == err.request_id
    else:
        assert isinstance(msg, typing.get_args(ClientMsg))
        assert isinstance(value, dict)
        assert value["type"] == msg.__struct_config__.tag


@FAST
@given(value=_json_ish(st.integers()))
def test_json_values_decode_to_a_message_or_protocol_error(value: Any) -> None:
    _decode_value(JSON, msgspec.json.encode(value), value)


@FAST
@given(value=_json_ish(INT64))
def test_msgpack_values_decode_to_a_message_or_protocol_error(value: Any) -> None:
    _decode_value(MSGPACK, msgspec.msgpack.encode(value), value)


def _deep_json(depth: int, as_map: bool, leaf: bytes) -> bytes:
    if as_map:
        return b'{"k":' * depth + leaf + b"}" * depth
    return b"[" * depth + leaf + b"]" * depth


def _deep_msgpack(depth: int, as_map: bool, leaf: bytes) -> bytes:
    return (b"\x81\xa1k" if as_map else b"\x91") * depth + leaf  # fixmap/fixarray of one


@LIGHT
@given(
    codec=CODECS,
    depth=st.integers(min_value=1, max_value=20_000),
    as_map=st.booleans(),
    where=st.sampled_from(["bare", "unknown-field", "id", "after-bad-id"]),
)
def test_deep_nesting_decodes_or_raises_protocol_error(
    codec: Codec, depth: int, as_map: bool, where: str
) -> None:
    if codec is JSON:
        deep = _deep_json(depth, as_map, b"1")
        heads = {
            "bare": (b"", b""),
            "unknown-field": (b'{"type":"ping","id":1,"x":', b"}"),
            "id": (b'{"type":"ping","id":', b"}"),
            "after-bad-id": (b'{"type":"ping","id":"1","x":', b"}"),
        }
    else:
        deep = _deep_msgpack(depth, as_map, b"\x01")
        heads = {
            "bare": (b"", b""),
            "unknown-field": (b"\x83\xa4type\xa4ping\xa2id\x01\xa1x", b""),
            "id": (b"\x82\xa4type\xa4ping\xa2id", b""),
            "after-bad-id": (b"\x83\xa4type\xa4ping\xa2id\xa11\xa1x", b""),
        }
    head, tail = heads[where]
    try:
        msg = codec.decode_client(head + deep + tail)
    except ProtocolError as err:
        _check_error(err)
        assert err.request_id is None
        if depth <= 100:  # well within any recursion limit: a schema error at most
            assert where != "unknown-field"
            assert not err.fatal
        if depth > 10_000:  # past the recursion limit: the body cannot be read at all
            assert err.fatal
    else:
        assert where == "unknown-field"
        assert msg == Ping(id=1)


@LIGHT
@given(codec=CODECS, msg=CLIENT_MESSAGES, data=st.data())
def test_truncated_or_extended_messages_only_raise_protocol_error(
    codec: Codec, msg: ClientMsg, data: st.DataObject
) -> None:
    body = codec.encode(msg)
    cut = data.draw(st.integers(min_value=1, max_value=len(body)), label="cut")
    tail = data.draw(st.binary(max_size=16), label="tail")
    mangled = body[:cut] + tail
    try:
        decoded = codec.decode_client(mangled)
    except ProtocolError as err:
        _check_error(err)
    else:
        assert isinstance(decoded, typing.get_args(ClientMsg))
