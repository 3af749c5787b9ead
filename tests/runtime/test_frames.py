"""Tests of the sans-I/O RFC 6455 frame codec in ``runtime.frames``."""

from __future__ import annotations

import os
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameParser,
    Ping,
    Pong,
    ProtocolError,
    Received,
    encode_close,
    encode_frame,
    encode_message,
    is_valid_close_code,
    unmask,
)

MASK = b"\x37\xfa\x21\x3d"
LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70001]


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def feed_all(parser: FrameParser, data: bytes) -> list[Received]:
    return parser.feed(data)


def feed_bytewise(parser: FrameParser, data: bytes) -> list[Received]:
    events: list[Received] = []
    for i in range(len(data)):
        events.extend(parser.feed(data[i : i + 1]))
    return events


def expect_error(data: bytes, code: int, *, client: bool = False, max_size: int = 1 << 20) -> str:
    """Feed `data` whole and byte by byte; both must raise ProtocolError(code). Returns reason.

    Fed whole, events before the violation come back first and the next feed raises."""
    parser = FrameParser(client=client, max_message_size=max_size)
    with pytest.raises(ProtocolError) as whole:
        parser.feed(data)
        assert parser.error is not None
        parser.feed(b"")
    assert whole.value.code == code
    with pytest.raises(ProtocolError) as split:
        feed_bytewise(FrameParser(client=client, max_message_size=max_size), data)
    assert split.value.code == code
    return whole.value.reason


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_encode_frame_header_lengths(n: int) -> None:
    payload = os.urandom(n)
    frame = encode_frame(OP_BINARY, payload)
    if n < 126:
        assert frame[:2] == bytes((0x82, n))
        assert frame[2:] == payload
    elif n < 65536:
        assert frame[:4] == struct.pack("!BBH", 0x82, 126, n)
        assert frame[4:] == payload
    else:
        assert frame[:10] == struct.pack("!BBQ", 0x82, 127, n)
        assert frame[10:] == payload


def test_encode_frame_masked_and_fin() -> None:
    frame = encode_frame(OP_TEXT, b"Hello", fin=False, mask=MASK)
    assert frame[0] == 0x01
    assert frame[1] == 0x80 | 5
    assert frame[2:6] == MASK
    assert unmask(frame[6:], MASK) == b"Hello"
    with pytest.raises(ValueError):
        encode_frame(OP_TEXT, b"x", mask=b"abc")


def test_rfc_example_masked_hello() -> None:
    # RFC 6455 section 5.7
    frame = bytes.fromhex("818537fa213d7f9f4d5158")
    assert encode_frame(OP_TEXT, b"Hello", mask=MASK) == frame
    assert FrameParser().feed(frame) == ["Hello"]
    assert FrameParser(client=True).feed(bytes.fromhex("810548656c6c6f")) == ["Hello"]


@pytest.mark.parametrize("n", LENGTHS)
def test_encode_message_matches_encode_frame(n: int) -> None:
    text = "é" * (n // 2) + "a" * (n % 2)
    assert encode_message(text) == encode_frame(OP_TEXT, text.encode())
    data = os.urandom(n)
    assert encode_message(data) == encode_frame(OP_BINARY, data)
    assert encode_message(bytearray(data)) == encode_frame(OP_BINARY, data)  # type: ignore[arg-type]
    assert encode_message(memoryview(data)) == encode_frame(OP_BINARY, data)  # type: ignore[arg-type]
    assert type(encode_message(bytearray(data))) is bytes  # type: ignore[arg-type]


def test_encode_message_odd_memoryviews() -> None:
    ints = memoryview(bytearray(range(8))).cast("I")
    assert encode_message(ints) == encode_frame(OP_BINARY, bytes(range(8)))  # type: ignore[arg-type]
    strided = memoryview(bytes(range(10)))[::2]
    assert encode_message(strided) == encode_frame(OP_BINARY, bytes(range(0, 10, 2)))  # type: ignore[arg-type]


def test_encode_message_str_subclass() -> None:
    class S(str):
        pass

    assert encode_message(S("hi")) == b"\x81\x02hi"


def test_unmask() -> None:
    assert unmask(b"", MASK) == b""
    for n in range(0, 20):
        data = os.urandom(n)
        expected = bytes(b ^ MASK[i % 4] for i, b in enumerate(data))
        assert unmask(data, MASK) == expected
        assert unmask(expected, MASK) == data


def test_encode_close() -> None:
    assert encode_close() == b"\x88\x02\x03\xe8"
    assert encode_close(None) == b"\x88\x00"
    assert encode_close(None, "ignored") == b"\x88\x00"
    assert encode_close(1001, "bye") == b"\x88\x05\x03\xe9bye"
    assert FrameParser(client=True).feed(encode_close(4000, "ok")) == [Close(4000, "ok")]


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
@pytest.mark.parametrize("count", [60, 61, 62, 63, 122, 123, 124, 200])
def test_encode_close_truncates_on_character_boundary(char: str, count: int) -> None:
    reason = char * count
    frame = encode_close(1000, reason)
    assert frame[0] == 0x88
    assert frame[1] == len(frame) - 2 <= 125
    text = frame[4:].decode()  # valid UTF-8
    assert reason.startswith(text)
    # as long as possible: one more character would not fit
    assert len(text.encode()) + len(char.encode()) > 123 or text == reason
    assert FrameParser(client=True).feed(frame) == [Close(1000, text)]


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_encode_close_truncation_property(reason: str) -> None:
    frame = encode_close(1000, reason)
    assert len(frame) - 2 <= 125
    assert frame[1] == len(frame) - 2
    text = frame[4:].decode()
    assert reason.startswith(text)
    if text != reason:
        assert len(text.encode()) + len(reason[len(text)].encode()) > 123


def test_close_code_validity_table() -> None:
    valid = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))
    for code in range(0, 70000):
        assert is_valid_close_code(code) is (code in valid), code
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
        assert not is_valid_close_code(code)
    for code in (1000, 1001, 1002, 1003, 1007, 1010, 1011, 1014, 3000, 4999):
        assert is_valid_close_code(code)


# --------------------------------------------------------------------------------------------
# Parsing: round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_masked_to_server(n: int) -> None:
    text = "x" * n
    data = os.urandom(n)
    stream = masked(OP_TEXT, text.encode()) + masked(OP_BINARY, data)
    events = FrameParser().feed(stream)
    assert events == [text, data]
    assert type(events[1]) is bytes


@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_unmasked_to_client(n: int) -> None:
    text = "ü" * (n // 2)
    data = os.urandom(n)
    stream = encode_message(text) + encode_message(data)
    events = FrameParser(client=True).feed(stream)
    assert events == [text, data]
    assert type(events[1]) is bytes


@pytest.mark.parametrize("n", [0, 5, 125, 126, 300, 65536])
def test_byte_by_byte_gives_same_events(n: int) -> None:
    stream = (
        masked(OP_TEXT, b"a" * n)
        + masked(OP_PING, b"p")
        + masked(OP_BINARY, b"\x00" * n)
        + masked(OP_TEXT, "€".encode() * 10, fin=False)
        + masked(OP_PONG, b"")
        + masked(OP_CONTINUATION, "😀".encode() * n)
        + masked(OP_CLOSE, struct.pack("!H", 1000) + b"done")
    )
    whole = FrameParser().feed(stream)
    assert whole == [
        "a" * n,
        Ping(b"p"),
        b"\x00" * n,
        Pong(b""),
        "€" * 10 + "😀" * n,
        Close(1000, "done"),
    ]
    if n <= 300:
        assert feed_bytewise(FrameParser(), stream) == whole
    chunks = FrameParser()
    events: list[Received] = []
    for i in range(0, len(stream), 7):
        events.extend(chunks.feed(stream[i : i + 7]))
    assert events == whole


def test_many_small_frames_in_one_buffer() -> None:
    messages = [f"message {i}" for i in range(1000)]
    stream = b"".join(masked(OP_TEXT, m.encode()) for m in messages)
    assert FrameParser().feed(stream) == messages


def test_partial_frame_waits() -> None:
    parser = FrameParser()
    frame = masked(OP_TEXT, b"hello world")
    assert parser.feed(frame[:1]) == []
    assert parser.feed(frame[1:5]) == []
    assert parser.feed(frame[5:-1]) == []
    assert parser.feed(frame[-1:] + frame[:3]) == ["hello world"]
    assert parser.feed(frame[3:]) == ["hello world"]
    assert parser.feed(b"") == []


def test_fragmented_text_with_interleaved_ping() -> None:
    euro = "€".encode()  # 3 bytes, split across fragments
    stream = (
        masked(OP_TEXT, b"ab" + euro[:1], fin=False)
        + masked(OP_PING, b"ping!")
        + masked(OP_CONTINUATION, euro[1:], fin=False)
        + masked(OP_CONTINUATION, b"", fin=False)
        + masked(OP_PONG, b"pong!")
        + masked(OP_CONTINUATION, b"cd")
    )
    assert FrameParser().feed(stream) == [Ping(b"ping!"), Pong(b"pong!"), "ab€cd"]
    assert feed_bytewise(FrameParser(), stream) == [Ping(b"ping!"), Pong(b"pong!"), "ab€cd"]


def test_fragmented_binary_with_interleaved_ping_and_close() -> None:
    stream = (
        masked(OP_BINARY, b"\x01\x02", fin=False)
        + masked(OP_PING, b"")
        + masked(OP_CONTINUATION, b"\x03")
        + masked(OP_BINARY, b"\x04")
        + masked(OP_CLOSE, b"")
    )
    events = FrameParser().feed(stream)
    assert events == [Ping(b""), b"\x01\x02\x03", b"\x04", Close(None, "")]
    assert type(events[1]) is bytes


def test_fragmented_client_side() -> None:
    stream = (
        encode_frame(OP_TEXT, b"he", fin=False)
        + encode_frame(OP_PING, b"x")
        + encode_frame(OP_CONTINUATION, b"llo")
    )
    assert FrameParser(client=True).feed(stream) == [Ping(b"x"), "hello"]


def test_empty_fragmented_messages() -> None:
    stream = (
        masked(OP_TEXT, b"", fin=False)
        + masked(OP_CONTINUATION, b"")
        + masked(OP_BINARY, b"", fin=False)
        + masked(OP_CONTINUATION, b"")
    )
    assert FrameParser().feed(stream) == ["", b""]


def test_close_events() -> None:
    parser = FrameParser()
    assert parser.feed(masked(OP_CLOSE, b"")) == [Close(None, "")]
    assert parser.feed(masked(OP_CLOSE, b"\x03\xe8")) == [Close(1000, "")]
    reason = "ü" * 61  # 122 bytes
    assert parser.feed(masked(OP_CLOSE, b"\x0f\xa0" + reason.encode())) == [Close(4000, reason)]


def test_message_exactly_at_limit() -> None:
    parser = FrameParser(max_message_size=10)
    assert parser.feed(masked(OP_TEXT, b"0123456789")) == ["0123456789"]
    stream = masked(OP_BINARY, b"01234", fin=False) + masked(OP_CONTINUATION, b"56789")
    assert parser.feed(stream) == [b"0123456789"]


# --------------------------------------------------------------------------------------------
# Parsing: errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_reserved_bits(rsv: int) -> None:
    frame = bytearray(masked(OP_TEXT, b"hi"))
    frame[0] |= rsv
    assert expect_error(bytes(frame), 1002) == "reserved bits set"
    ping = bytearray(masked(OP_PING, b""))
    ping[0] |= rsv
    expect_error(bytes(ping), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcode(opcode: int) -> None:
    expect_error(masked(opcode, b""), 1002)
    expect_error(masked(opcode, b"x" * 200), 1002)
    expect_error(encode_frame(opcode, b""), 1002, client=True)


def test_unmasked_frame_from_client() -> None:
    assert expect_error(encode_frame(OP_TEXT, b"hi"), 1002) == "unmasked frame from client"
    expect_error(encode_frame(OP_PING, b""), 1002)
    expect_error(encode_frame(OP_BINARY, b"x" * 70000), 1002)


def test_masked_frame_from_server() -> None:
    assert expect_error(masked(OP_TEXT, b"hi"), 1002, client=True) == "masked frame from server"
    expect_error(masked(OP_BINARY, b"hi"), 1002, client=True)
    expect_error(masked(OP_CLOSE, b""), 1002, client=True)


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_fragmented_control_frame(opcode: int) -> None:
    expect_error(masked(opcode, b"", fin=False), 1002)


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
@pytest.mark.parametrize("n", [126, 127, 65536])
def test_control_frame_too_long(opcode: int, n: int) -> None:
    payload = b"\x03\xe8" + b"a" * (n - 2)
    expect_error(masked(opcode, payload), 1002)
    # refused from the header alone
    with pytest.raises(ProtocolError) as exc:
        FrameParser().feed(masked(opcode, payload)[:4])
    assert exc.value.code == 1002


def test_control_frame_of_125_bytes_is_fine() -> None:
    assert FrameParser().feed(masked(OP_PING, b"p" * 125)) == [Ping(b"p" * 125)]


def test_continuation_without_message() -> None:
    expect_error(masked(OP_CONTINUATION, b"x"), 1002)
    expect_error(masked(OP_CONTINUATION, b"x", fin=False), 1002)
    # after a message completed, too
    expect_error(
        masked(OP_TEXT, b"a", fin=False) + masked(OP_CONTINUATION, b"b") + masked(0, b"c"), 1002
    )


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("fin", [True, False])
def test_new_data_frame_inside_fragmented_message(second: int, fin: bool) -> None:
    stream = masked(OP_BINARY, b"a", fin=False) + masked(second, b"b", fin=fin)
    expect_error(stream, 1002)
    stream = masked(OP_TEXT, b"a", fin=False) + masked(OP_PING, b"") + masked(second, b"b")
    expect_error(stream, 1002)


def test_64_bit_length_with_msb_set() -> None:
    header = struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + MASK
    expect_error(header, 1002, max_size=1 << 70)
    header = struct.pack("!BBQ", 0x82, 0x7F, (1 << 64) - 1)
    expect_error(header, 1002, client=True, max_size=1 << 70)


def test_message_too_big_from_header_alone() -> None:
    # a masked header announcing 2**40 bytes, without the mask key or any payload
    header = struct.pack("!BBQ", 0x82, 0xFF, 1 << 40)
    parser = FrameParser()
    with pytest.raises(ProtocolError) as exc:
        parser.feed(header)
    assert exc.value.code == 1009
    assert exc.value.reason == "message exceeds 1048576 bytes"
    assert expect_error(header, 1009) == "message exceeds 1048576 bytes"


def test_message_too_big_16_bit_and_7_bit_lengths() -> None:
    expect_error(masked(OP_TEXT, b"a" * 300)[:4], 1009, max_size=200)
    expect_error(masked(OP_TEXT, b"a" * 11), 1009, max_size=10)
    expect_error(masked(OP_BINARY, b"a" * 11), 1009, max_size=10)
    expect_error(encode_frame(OP_BINARY, b"a" * 11), 1009, max_size=10, client=True)


def test_fragmented_message_too_big() -> None:
    stream = masked(OP_BINARY, b"a" * 6, fin=False) + masked(OP_CONTINUATION, b"b" * 5)
    expect_error(stream, 1009, max_size=10)
    # refused at the header of the fragment that goes over
    stream = masked(OP_TEXT, b"a" * 6, fin=False) + masked(OP_CONTINUATION, b"b" * 1000)[:4]
    expect_error(stream, 1009, max_size=10)
    # control frames do not count towards the message
    stream = (
        masked(OP_TEXT, b"a" * 6, fin=False)
        + masked(OP_PING, b"p" * 100)
        + masked(OP_CONTINUATION, b"b" * 4)
    )
    assert FrameParser(max_message_size=10).feed(stream) == [Ping(b"p" * 100), "a" * 6 + "b" * 4]


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"a\xf4\x90\x80\x80", b"\xce\xba\xe1", b"\x80"],
)
def test_invalid_utf8_unfragmented(payload: bytes) -> None:
    expect_error(masked(OP_TEXT, payload), 1007)
    expect_error(encode_frame(OP_TEXT, payload), 1007, client=True)


def test_invalid_utf8_fails_fast_on_fragment() -> None:
    first = masked(OP_TEXT, "κόσμε".encode(), fin=False)
    parser = FrameParser()
    assert parser.feed(first) == []
    with pytest.raises(ProtocolError) as exc:
        # the message has not ended: this fragment alone must already be refused
        parser.feed(masked(OP_CONTINUATION, b"\xf4\x90\x80\x80", fin=False))
    assert exc.value.code == 1007


@pytest.mark.parametrize(
    "bad",
    [b"\xf4\x90", b"\xed\xa0", b"\xed\xbf", b"\xe0\x80", b"\xf0\x80", b"\xf8", b"\xc0", b"\xff"],
)
def test_invalid_utf8_prefix_fails_fast(bad: bytes) -> None:
    parser = FrameParser()
    with pytest.raises(ProtocolError) as exc:
        parser.feed(masked(OP_TEXT, b"ok" + bad, fin=False))
    assert exc.value.code == 1007


@pytest.mark.parametrize("partial", [b"\xf4", b"\xed", b"\xed\x9f", b"\xe2\x82", b"\xf0\x9f\x98"])
def test_incomplete_utf8_waits_for_next_fragment(partial: bytes) -> None:
    parser = FrameParser()
    assert parser.feed(masked(OP_TEXT, b"ok" + partial, fin=False)) == []
    # ... and fails at FIN if never completed
    with pytest.raises(ProtocolError) as exc:
        parser.feed(masked(OP_CONTINUATION, b""))
    assert exc.value.code == 1007


def test_close_payload_errors() -> None:
    assert expect_error(masked(OP_CLOSE, b"\x03"), 1002)
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
        expect_error(masked(OP_CLOSE, struct.pack("!H", code)), 1002)
    expect_error(masked(OP_CLOSE, b"\x03\xe8\xff"), 1007)
    expect_error(masked(OP_CLOSE, b"\x03\xe8" + "é".encode()[:1]), 1007)


def test_parser_unusable_after_error() -> None:
    parser = FrameParser()
    with pytest.raises(ProtocolError):
        parser.feed(encode_frame(OP_TEXT, b"unmasked"))
    with pytest.raises(ProtocolError) as exc:
        parser.feed(masked(OP_TEXT, b"fine"))
    assert exc.value.code == 1002


def test_protocol_error_attributes() -> None:
    exc = ProtocolError(1009, "message exceeds 10 bytes")
    assert exc.code == 1009
    assert exc.reason == "message exceeds 10 bytes"
    assert "1009" in str(exc)
    assert isinstance(exc, Exception)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

message_strategy = st.one_of(st.text(max_size=300), st.binary(max_size=300))


@st.composite
def framed_messages(draw: st.DrawFn) -> tuple[list[Received], bytes, bool]:
    """A list of messages and control frames, the bytes encoding them, and the side."""
    client = draw(st.booleans())
    items = draw(
        st.lists(
            st.one_of(
                message_strategy,
                st.binary(max_size=125).map(Ping),
                st.binary(max_size=125).map(Pong),
            ),
            max_size=12,
        )
    )
    mask = None if client else draw(st.binary(min_size=4, max_size=4))
    expected: list[Received] = []
    chunks: list[bytes] = []
    pending_controls: list[Received] = []
    for item in items:
        if isinstance(item, Ping | Pong):
            op = OP_PING if isinstance(item, Ping) else OP_PONG
            chunks.append(encode_frame(op, item.payload, mask=mask))
            expected.append(item)
            continue
        assert isinstance(item, str | bytes)
        data = item.encode() if isinstance(item, str) else item
        op = OP_TEXT if isinstance(item, str) else OP_BINARY
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            chunks.append(
                encode_frame(op if i == 0 else OP_CONTINUATION, piece, fin=last, mask=mask)
            )
            if not last and draw(st.booleans()):
                ping = Ping(draw(st.binary(max_size=10)))
                chunks.append(encode_frame(OP_PING, ping.payload, mask=mask))
                pending_controls.append(ping)
        expected.extend(pending_controls)
        pending_controls.clear()
        expected.append(item)
    return expected, b"".join(chunks), client


@given(framed_messages(), st.lists(st.integers(min_value=0), max_size=20))
@settings(max_examples=200, deadline=None)
def test_round_trip_split_anywhere(
    case: tuple[list[Received], bytes, bool], split_points: list[int]
) -> None:
    expected, stream, client = case
    points = sorted({p % (len(stream) + 1) for p in split_points})
    parser = FrameParser(client=client)
    events: list[Received] = []
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        events.extend(parser.feed(stream[a:b]))
    assert events == expected
    for event, want in zip(events, expected, strict=True):
        assert type(event) is type(want)


@given(st.lists(message_strategy, max_size=20))
@settings(max_examples=200, deadline=None)
def test_encode_message_round_trip(messages: list[str | bytes]) -> None:
    stream = b"".join(encode_message(m) for m in messages)
    assert FrameParser(client=True).feed(stream) == messages


@given(st.binary(max_size=400), st.booleans(), st.lists(st.integers(min_value=0), max_size=8))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_only_raise_protocol_error(
    data: bytes, client: bool, split_points: list[int]
) -> None:
    parser = FrameParser(client=client, max_message_size=256)
    points = sorted({p % (len(data) + 1) for p in split_points})
    try:
        for a, b in zip([0, *points], [*points, len(data)], strict=True):
            for event in parser.feed(data[a:b]):
                assert isinstance(event, str | bytes | Ping | Pong | Close)
    except ProtocolError as exc:
        assert exc.code in (1002, 1007, 1009)


@given(
    st.lists(
        st.tuples(st.integers(0, 15), st.booleans(), st.binary(max_size=140)),
        max_size=10,
    ),
    st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_arbitrary_frames_only_raise_protocol_error(
    frames: list[tuple[int, bool, bytes]], client: bool
) -> None:
    """Well-formed framing with arbitrary opcodes, FIN bits and payloads."""
    mask = None if client else MASK
    stream = b"".join(encode_frame(op, p, fin=fin, mask=mask) for op, fin, p in frames)
    try:
        FrameParser(client=client).feed(stream)
    except ProtocolError as exc:
        assert exc.code in (1002, 1007, 1009)


# --------------------------------------------------------------------------------------------
# Errors after valid data, and UTF-8 checked while a frame is still arriving
# --------------------------------------------------------------------------------------------


def test_valid_messages_before_a_violation_are_returned_first() -> None:
    parser = FrameParser()
    data = masked(OP_TEXT, b"first") + masked(OP_BINARY, b"second") + b"\xf1\x80"  # RSV1 set
    assert parser.feed(data) == ["first", b"second"]
    assert parser.error is not None and parser.error.code == 1002
    with pytest.raises(ProtocolError) as exc:
        parser.feed(b"")
    assert exc.value.code == 1002


def test_no_error_is_recorded_for_valid_data() -> None:
    parser = FrameParser()
    assert parser.feed(masked(OP_TEXT, b"fine")) == ["fine"]
    assert parser.error is None


@pytest.mark.parametrize("chop", [1, 2, 3, 5, 7])
def test_invalid_utf8_fails_before_the_frame_is_complete(chop: int) -> None:
    payload = "κόσμε".encode() + b"\xce\xba\xe1\x80\x80\xed\xa0\x80" + b"edited" * 40
    frame = masked(OP_TEXT, payload)
    parser = FrameParser()
    fed = 0
    with pytest.raises(ProtocolError) as exc:
        while fed < len(frame) - 1:
            parser.feed(frame[fed : fed + chop])
            fed += chop
    assert exc.value.code == 1007
    header = 2 + 2 + 4  # 126-form length and the mask
    assert fed < header + len("κόσμε".encode()) + 12  # stopped near the bad bytes


@pytest.mark.parametrize("chop", [1, 3, 64])
def test_valid_utf8_arriving_in_pieces_is_accepted(chop: int) -> None:
    text = "héllo wörld ✓ 😀 " * 30
    for frame_data, parts in [
        (masked(OP_TEXT, text.encode()), [text]),
        (
            masked(OP_TEXT, text.encode()[:301], fin=False)
            + masked(OP_CONTINUATION, text.encode()[301:]),
            [text],
        ),
    ]:
        parser = FrameParser()
        events = []
        for i in range(0, len(frame_data), chop):
            events += parser.feed(frame_data[i : i + chop])
        assert events == parts


def test_a_partly_checked_frame_followed_by_another() -> None:
    parser = FrameParser()
    first = masked(OP_TEXT, "é".encode() * 100)
    second = masked(OP_TEXT, b"\xff" + b"x" * 200)
    assert parser.feed(first[:50]) == []
    assert parser.feed(first[50:] + second[:20]) == ["é" * 100]
    with pytest.raises(ProtocolError) as exc:
        parser.feed(second[20:40])
    assert exc.value.code == 1007


def test_a_flood_of_tiny_fragments_costs_no_more_memory_than_the_message() -> None:
    parser = FrameParser(max_message_size=200_000)
    flood = masked(OP_BINARY, b"x", fin=False) + masked(OP_CONTINUATION, b"", fin=False) * 1000
    flood += masked(OP_CONTINUATION, b"y", fin=False) * 20_000
    tracemalloc.start()
    try:
        assert parser.feed(flood) == []
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 100_000  # the 20 KB message and a buffer, not 20,000 objects
    assert parser.feed(masked(OP_CONTINUATION, b"z")) == [b"x" + b"y" * 20_000 + b"z"]
