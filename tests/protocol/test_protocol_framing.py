"""FrameDecoder: bytes in, bodies out, however the transport happens to chunk them."""

from __future__ import annotations

import msgspec
import pytest
from chinwag.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    JSON,
    MSGPACK,
    Codec,
    End,
    FrameDecoder,
    Hello,
    Ping,
    ProtocolError,
    Stream,
    TextDelta,
    frame,
)

CODECS = [pytest.param(JSON, id="json"), pytest.param(MSGPACK, id="msgpack")]

BODIES = [
    b"x",
    JSON.encode(Hello(protocol=1, client="cli")),
    MSGPACK.encode(Ping(id=1)),
    b"\x00" * 300,  # longer than 255: the length uses more than its last header byte
    JSON.encode(Stream(id=2, agent="assistant", content="h\u00e9llo \U0001f600")),
]
STREAM = b"".join(frame(b) for b in BODIES)


def _drain(decoder: FrameDecoder) -> list[bytes]:
    return list(decoder)


def test_frame_prefixes_a_big_endian_length() -> None:
    assert HEADER_BYTES == 4
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"\x01" * 0x10203) == b"\x00\x01\x02\x03" + b"\x01" * 0x10203
    assert frame(bytearray(b"ab")) == b"\x00\x00\x00\x02ab"


def test_whole_stream_at_once() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    decoder.feed(STREAM)
    assert _drain(decoder) == BODIES
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_split_at_every_byte_boundary(cut: int) -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    decoder.feed(STREAM[:cut])
    got = _drain(decoder)
    decoder.feed(STREAM[cut:])
    got += _drain(decoder)
    assert got == BODIES
    assert decoder.buffered == 0


def test_split_at_every_pair_of_boundaries() -> None:
    stream = STREAM[: sum(HEADER_BYTES + len(b) for b in BODIES[:3])]
    expected = BODIES[:3]
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
            got: list[bytes] = []
            for chunk in (stream[:first], stream[first:second], stream[second:]):
                decoder.feed(chunk)
                got += _drain(decoder)
            assert got == expected, (first, second)


def test_one_byte_at_a_time() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    got: list[bytes] = []
    ends = set()
    position = 0
    for body in BODIES:
        position += HEADER_BYTES + len(body)
        ends.add(position)
    for i in range(len(STREAM)):
        decoder.feed(STREAM[i : i + 1])
        before = len(got)
        got += _drain(decoder)
        # a body comes out exactly when its last byte arrives, never earlier or later
        assert len(got) - before == (1 if i + 1 in ends else 0), i
    assert got == BODIES


def test_feed_accepts_bytearray_and_memoryview() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    decoder.feed(bytearray(STREAM[:7]))
    decoder.feed(memoryview(STREAM)[7:])
    assert _drain(decoder) == BODIES


def test_buffered_counts_bytes_not_yet_returned() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    assert decoder.buffered == 0
    decoder.feed(frame(b"abc") + b"\x00\x00")
    assert decoder.buffered == 9
    assert decoder.next_frame() == b"abc"
    assert decoder.buffered == 2
    assert decoder.next_frame() is None
    assert decoder.buffered == 2


def test_many_frames_in_small_chunks_keep_the_buffer_bounded() -> None:
    bodies = [str(i).encode() * (i % 17 + 1) for i in range(2000)]
    stream = b"".join(frame(b) for b in bodies)
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    got: list[bytes] = []
    for i in range(0, len(stream), 7):
        decoder.feed(stream[i : i + 7])
        got += _drain(decoder)
        assert decoder.buffered < 7 + HEADER_BYTES + 17 * 4
    assert got == bodies
    # consumed bytes are dropped, not kept forever behind the read offset
    assert len(decoder._buffer) < 1024


def test_returned_bodies_are_independent_bytes() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    decoder.feed(frame(b"abc"))
    body = decoder.next_frame()
    decoder.feed(frame(b"xyz") * 50)
    assert type(body) is bytes
    assert body == b"abc"


# --- errors -------------------------------------------------------------------


def test_zero_length_is_400() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == 400
    assert info.value.fatal
    assert info.value.request_id is None


def test_zero_length_after_good_frames_yields_them_first() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    decoder.feed(frame(b"a") + frame(b"b") + b"\x00\x00\x00\x00" + frame(b"c"))
    assert decoder.next_frame() == b"a"
    assert decoder.next_frame() == b"b"
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == 400


def test_oversized_length_is_413_from_the_header_alone() -> None:
    decoder = FrameDecoder(1000)
    decoder.feed((1001).to_bytes(4, "big"))  # the header only: no body has arrived
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == 413
    assert info.value.fatal
    assert "1001" in info.value.message
    assert "1000" in info.value.message


def test_oversized_length_is_413_with_the_default_limit() -> None:
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError) as info:
        list(decoder)
    assert info.value.code == 413


def test_partial_header_is_not_an_error_yet() -> None:
    decoder = FrameDecoder(1000)
    decoder.feed(b"\xff\xff\xff")
    assert decoder.next_frame() is None
    decoder.feed(b"\xff")
    with pytest.raises(ProtocolError, match="A frame of 4294967295 bytes exceeds") as info:
        decoder.next_frame()
    assert info.value.code == 413


def test_length_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(10)
    decoder.feed(frame(b"0123456789"))
    assert decoder.next_frame() == b"0123456789"
    decoder.feed(frame(b"0123456789a"))
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == 413


@pytest.mark.parametrize(
    ("bad", "code"),
    [(b"\x00\x00\x00\x00", 400), ((11).to_bytes(4, "big"), 413)],
    ids=["zero", "too-large"],
)
def test_after_an_error_it_keeps_raising(bad: bytes, code: int) -> None:
    decoder = FrameDecoder(10)
    decoder.feed(bad)
    with pytest.raises(ProtocolError) as first:
        decoder.next_frame()
    assert first.value.code == code
    # good frames arriving afterwards are never returned: the stream is untrusted
    decoder.feed(frame(b"fine") * 3)
    for _ in range(3):
        with pytest.raises(ProtocolError) as again:
            decoder.next_frame()
        assert again.value.code == code
    with pytest.raises(ProtocolError) as iterated:
        list(decoder)
    assert iterated.value.code == code


# --- codecs produce frames ---------------------------------------------------------

MESSAGES = [
    Hello(protocol=1, client="cli", token=None),
    Stream(id=1, agent="assistant", content="x" * 70000),  # a length over 16 bits
    TextDelta(id=1, delta="\u00e9"),
    End(id=1, status="done", error=None, last_seq=3),
]


@pytest.mark.parametrize("codec", CODECS)
def test_encode_frame_is_a_length_prefix_and_the_body(codec: Codec) -> None:
    for msg in MESSAGES:
        encoded = codec.encode_frame(msg)
        assert bytes(encoded) == frame(codec.encode(msg))
        assert int.from_bytes(encoded[:HEADER_BYTES], "big") == len(encoded) - HEADER_BYTES


@pytest.mark.parametrize("codec", CODECS)
def test_encode_frame_decodes_back_through_the_frame_decoder(codec: Codec) -> None:
    stream = b"".join(codec.encode_frame(m) for m in MESSAGES)
    decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
    got: list[msgspec.Struct] = []
    for i in range(0, len(stream), 4096):
        decoder.feed(stream[i : i + 4096])
        for body in decoder:
            client_side = isinstance(MESSAGES[len(got)], Hello | Stream)
            got.append(codec.decode_client(body) if client_side else codec.decode_server(body))
    assert got == MESSAGES
