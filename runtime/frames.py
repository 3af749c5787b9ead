"""A sans-I/O RFC 6455 frame codec for the server's data path.

Pure logic, no sockets (in the style of h11 / wsproto): ``FrameParser.feed`` takes whatever
``recv()`` returned and hands back complete events; the ``encode_*`` functions build frames to
send. There is no support for extensions (no permessage-deflate), so every RSV bit must be 0.

The parser is written for speed: one ``bytearray`` buffer with a read offset that is compacted
once per ``feed`` call, ``struct.unpack_from`` for extended lengths, unmasking as one big-integer
XOR, and a fast path for the common case of a complete, small, unfragmented masked data frame.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
from typing import Final

import attrs

from rooms._engine import is_valid_close_code

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Close",
    "FrameParser",
    "Ping",
    "Pong",
    "ProtocolError",
    "Received",
    "accept_key",
    "close_payload",
    "encode_close",
    "encode_frame",
    "encode_message",
    "is_valid_close_code",
    "unmask",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_MAX_CONTROL_PAYLOAD: Final = 125
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ProtocolError(Exception):
    """The peer broke the protocol; close the connection with `code` and `reason`."""

    code: int
    """1002 protocol error, 1007 invalid payload data (bad UTF-8), 1009 message too big."""
    reason: str
    """Short and human readable, e.g. "unmasked frame from client"."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


@attrs.frozen(slots=True)
class Ping:
    payload: bytes


@attrs.frozen(slots=True)
class Pong:
    payload: bytes


@attrs.frozen(slots=True)
class Close:
    code: int | None
    """None when the close frame had no payload (which means 1005, "no status received")."""
    reason: str


Received = str | bytes | Ping | Pong | Close
"""What the parser hands back: a complete text message is a str, a binary one bytes."""


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

_H16: Final = struct.Struct("!BBH")
_H64: Final = struct.Struct("!BBQ")
_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")

# Complete headers of unmasked final TEXT / BINARY frames with a 7-bit length.
_TEXT_HEADERS: Final = tuple(bytes((0x80 | OP_TEXT, n)) for n in range(126))
_BINARY_HEADERS: Final = tuple(bytes((0x80 | OP_BINARY, n)) for n in range(126))


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` repeated (masking and unmasking are the same)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One frame. With a 4-byte `mask` the frame is masked (as a client must send it)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0 if mask is None else 0x80
    if n < 126:
        header = bytes((b0, mbit | n))
    elif n < 0x10000:
        header = _H16.pack(b0, mbit | 126, n)
    else:
        header = _H64.pack(b0, mbit | 127, n)
    if mask is None:
        return header + payload
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    return header + mask + unmask(payload, mask)


def encode_message(message: str | bytes) -> bytes:
    """One unmasked final frame: TEXT for a str, BINARY for bytes / bytearray / memoryview."""
    if type(message) is str:
        data: bytes = message.encode()
        n = len(data)
        if n < 126:
            return _TEXT_HEADERS[n] + data
        if n < 0x10000:
            return _H16.pack(0x81, 126, n) + data
        return _H64.pack(0x81, 127, n) + data
    if type(message) is bytes:
        n = len(message)
        if n < 126:
            return _BINARY_HEADERS[n] + message
    elif isinstance(message, str):  # a str subclass
        return encode_message(str(message))
    elif not isinstance(message, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"a WebSocket message is str (text) or bytes (binary), not {type(message).__name__}"
            + (
                "; to send JSON, send json.dumps(value)"
                if isinstance(message, (dict, list))
                else ""
            )
        )
    if isinstance(message, memoryview):
        n = message.nbytes
        if not message.c_contiguous:
            message = message.tobytes()
    else:
        n = len(message)
    if n < 126:
        return _BINARY_HEADERS[n] + message
    if n < 0x10000:
        return _H16.pack(0x82, 126, n) + message
    return _H64.pack(0x82, 127, n) + message


def encode_close(code: int | None = 1000, reason: str = "") -> bytes:
    """An unmasked close frame (see ``close_payload``)."""
    payload = close_payload(code, reason)
    return bytes((0x88, len(payload))) + payload


def close_payload(code: int | None, reason: str) -> bytes:
    """A close frame's payload. `code` None gives an empty payload (and drops `reason`).

    The reason is UTF-8 encoded and truncated on a character boundary so that the whole
    payload fits the 125 bytes allowed for a control frame."""
    if code is None:
        return b""
    data = reason.encode()
    if len(data) > _MAX_CONTROL_PAYLOAD - 2:
        data = data[: _MAX_CONTROL_PAYLOAD - 2]
        # Drop a trailing partial character: back up over continuation bytes (10xxxxxx)
        # to the lead byte and cut before it if its sequence is incomplete.
        i = len(data) - 1
        while i > 0 and data[i] & 0xC0 == 0x80:
            i -= 1
        lead = data[i]
        need = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if len(data) - i < need:
            data = data[:i]
    return _U16.pack(code) + data


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept answer to a handshake's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode()


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_utf8_decoder: Final = codecs.getincrementaldecoder("utf-8")
_unpack16: Final = _U16.unpack_from
_unpack64: Final = _U64.unpack_from

# Used by the parser to tell a bad frame apart: RSV bits, then the opcode.
_DATA_OPCODES: Final = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
_CONTROL_OPCODES: Final = frozenset((OP_CLOSE, OP_PING, OP_PONG))


class FrameParser:
    """Turns the bytes a peer sent into events (``Received``), validating everything on the way.

    ``client=False`` (a server) requires every frame to be masked; ``client=True`` requires
    every frame to be unmasked. A message (the sum of its fragments) may be at most
    `max_message_size` bytes, which is checked as soon as a frame header announces its length.
    """

    __slots__ = (
        "_buf",
        "_client",
        "_decoder",
        "_error",
        "_fragments",
        "_max",
        "_msg_op",
        "_prefix_checked",
        "_prefix_decoder",
        "_want",
    )

    def __init__(self, *, max_message_size: int = 1 << 20, client: bool = False) -> None:
        self._buf = bytearray()
        self._client = client
        self._max = max_message_size
        self._want = 2  # bytes the buffer must hold before parsing can make progress
        self._error: ProtocolError | None = None
        # The fragmented message in progress: its opcode (0 when none) and payload so far.
        self._msg_op = 0
        self._fragments = bytearray()
        self._decoder: codecs.IncrementalDecoder | None = None
        # UTF-8 check of a text frame whose payload is still arriving: the decoder and how
        # many payload bytes it has seen (so a bad byte fails fast, not at the frame's end).
        self._prefix_decoder: codecs.IncrementalDecoder | None = None
        self._prefix_checked = 0

    @property
    def error(self) -> ProtocolError | None:
        """The violation that ended parsing, if any."""
        return self._error

    def feed(self, data: bytes) -> list[Received]:
        """Append `data`; return every event now complete, in order.

        Raises ``ProtocolError`` on a violation; the parser is unusable afterwards. When
        complete events precede the violation in the data, they are returned first (a peer's
        valid messages are not lost to its next mistake) and the error is kept in ``error``
        and raised by the next call."""
        if self._error is not None:
            raise ProtocolError(self._error.code, self._error.reason)
        buf = self._buf
        buf += data
        end = len(buf)
        if end < self._want:
            return []
        events: list[Received] = []
        prefix_checked = self._prefix_checked
        try:
            pos = self._parse(buf, end, events)
        except ProtocolError as exc:
            self._error = exc
            buf.clear()
            if events:
                return events
            raise
        if pos and self._prefix_decoder is not None and self._prefix_checked == prefix_checked:
            self._prefix_decoder = None  # the frame it was checking is complete
            self._prefix_checked = 0
        # Compact once per call; deleting a prefix of a bytearray is cheap in CPython.
        if pos == end:
            buf.clear()
        elif pos:
            del buf[:pos]
        return events

    def _parse(self, buf: bytearray, end: int, events: list[Received]) -> int:
        """Parse complete frames of ``buf[:end]``; return the offset of the first unparsed byte."""
        max_size = self._max
        masked = not self._client
        append = events.append
        pos = 0
        while True:
            avail = end - pos
            if avail < 2:
                self._want = 2
                return pos
            b0 = buf[pos]
            b1 = buf[pos + 1]

            # Fast path: a complete, final, masked TEXT/BINARY frame of at most 125 bytes
            # while no fragmented message is in progress.
            if (b0 == 0x81 or b0 == 0x82) and 0x80 <= b1 <= 0xFD and masked and not self._msg_op:
                n = b1 & 0x7F
                start = pos + 6
                stop = start + n
                if stop <= end and n <= max_size:
                    if n:
                        key = (buf[pos + 2 : start] * ((n >> 2) + 1))[:n]
                        payload = (
                            int.from_bytes(buf[start:stop], "little")
                            ^ int.from_bytes(key, "little")
                        ).to_bytes(n, "little")
                    else:
                        payload = b""
                    if b0 == 0x81:
                        try:
                            append(payload.decode())
                        except UnicodeDecodeError:
                            raise ProtocolError(1007, "invalid UTF-8 in text message") from None
                    else:
                        append(payload)
                    pos = stop
                    continue

            # General path.
            if b0 & 0x70:
                raise ProtocolError(1002, "reserved bits set")
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if bool(b1 & 0x80) is not masked:
                raise ProtocolError(
                    1002, "unmasked frame from client" if masked else "masked frame from server"
                )
            n = b1 & 0x7F
            header = 2
            if opcode in _CONTROL_OPCODES:
                if not fin:
                    raise ProtocolError(1002, "fragmented control frame")
                if n > _MAX_CONTROL_PAYLOAD:
                    raise ProtocolError(1002, "control frame payload over 125 bytes")
            elif opcode not in _DATA_OPCODES:
                raise ProtocolError(1002, f"unknown opcode {opcode:#x}")
            else:
                if opcode == OP_CONTINUATION:
                    if not self._msg_op:
                        raise ProtocolError(1002, "continuation frame without a message")
                elif self._msg_op:
                    raise ProtocolError(1002, "new data frame inside a fragmented message")
                if n == 126:
                    if avail < 4:
                        self._want = 4
                        return pos
                    n = _unpack16(buf, pos + 2)[0]
                    header = 4
                elif n == 127:
                    if avail < 10:
                        self._want = 10
                        return pos
                    n = _unpack64(buf, pos + 2)[0]
                    if n >> 63:
                        raise ProtocolError(1002, "frame length with the most significant bit set")
                    header = 10
                size = n + (len(self._fragments) if opcode == OP_CONTINUATION else 0)
                if size > max_size:
                    raise ProtocolError(1009, f"message exceeds {max_size} bytes")
            if masked:
                header += 4
            start = pos + header
            stop = start + n
            if stop > end:
                if opcode == OP_TEXT or (opcode == OP_CONTINUATION and self._msg_op == OP_TEXT):
                    self._check_text_prefix(buf, start, end, masked, fresh=pos > 0)
                    self._want = end - pos + 1  # check each new piece as it arrives
                else:
                    self._want = stop - pos
                return pos
            if masked and n:
                key = (buf[start - 4 : start] * ((n >> 2) + 1))[:n]
                payload = (
                    int.from_bytes(buf[start:stop], "little") ^ int.from_bytes(key, "little")
                ).to_bytes(n, "little")
            else:
                payload = bytes(buf[start:stop])
            pos = stop

            if opcode >= OP_CLOSE:
                if opcode == OP_PING:
                    append(Ping(payload))
                elif opcode == OP_PONG:
                    append(Pong(payload))
                else:
                    append(self._close(payload))
            elif opcode:  # TEXT or BINARY, the first frame of a message
                if fin:
                    if opcode == OP_TEXT:
                        try:
                            append(payload.decode())
                        except UnicodeDecodeError:
                            raise ProtocolError(1007, "invalid UTF-8 in text message") from None
                    else:
                        append(payload)
                else:
                    self._msg_op = opcode
                    if opcode == OP_TEXT:
                        self._decoder = _utf8_decoder()
                        self._decode(payload, False)
                    self._fragments += payload
            else:  # CONTINUATION
                # One growing buffer, not a list of pieces: a flood of tiny fragments costs
                # no more memory than the message itself.
                self._fragments += payload
                if self._msg_op == OP_TEXT:
                    self._decode(payload, bool(fin))  # fail fast on bad UTF-8
                if fin:
                    message = bytes(self._fragments)
                    self._fragments.clear()
                    if self._msg_op == OP_TEXT:
                        append(message.decode())
                        self._decoder = None
                    else:
                        append(message)
                    self._msg_op = 0

    def _check_text_prefix(
        self, buf: bytearray, start: int, end: int, masked: bool, fresh: bool
    ) -> None:
        """Check the UTF-8 of the part of a text frame's payload that has arrived so far."""
        decoder = self._prefix_decoder
        if fresh or decoder is None:
            decoder = self._prefix_decoder = _utf8_decoder()
            self._prefix_checked = 0
            if self._decoder is not None:  # a continuation: carry the message's state
                decoder.setstate(self._decoder.getstate())
        done = self._prefix_checked
        chunk = bytes(buf[start + done : end])
        if not chunk:
            return
        if masked:
            key = bytes(buf[start - 4 : start])
            shift = done % 4
            chunk = unmask(chunk, key[shift:] + key[:shift])
        _decode_utf8(decoder, chunk, False)
        self._prefix_checked = done + len(chunk)

    def _decode(self, payload: bytes, final: bool) -> None:
        """Check one fragment of a text message, failing as soon as the bytes are invalid."""
        assert self._decoder is not None
        _decode_utf8(self._decoder, payload, final)

    def _close(self, payload: bytes) -> Close:
        n = len(payload)
        if not n:
            return Close(None, "")
        if n == 1:
            raise ProtocolError(1002, "close frame with a 1-byte payload")
        code = _unpack16(payload)[0]
        if not is_valid_close_code(code):
            raise ProtocolError(1002, f"invalid close code {code}")
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            raise ProtocolError(1007, "invalid UTF-8 in close reason") from None
        return Close(code, reason)


def _decode_utf8(decoder: codecs.IncrementalDecoder, data: bytes, final: bool) -> str:
    """``data`` decoded; ProtocolError 1007 as soon as the bytes so far cannot be UTF-8."""
    try:
        text: str = decoder.decode(data, final)
    except UnicodeDecodeError:
        raise ProtocolError(1007, "invalid UTF-8 in text message") from None
    if not final:
        # CPython accepts a pending ED A0..ED BF (the start of a UTF-16 surrogate) until
        # the third byte arrives; reject it now.
        pending = decoder.getstate()[0]
        if len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
            raise ProtocolError(1007, "invalid UTF-8 in text message")
    return text
