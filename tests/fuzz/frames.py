"""Fuzz target: ``runtime.frames.FrameParser``, the data path's RFC 6455 frame parser.

The first byte picks the side (bit 0: client, i.e. unmasked frames) and the message limit
(bits 1-2), the second how the rest is cut into ``feed`` calls; the rest is the peer's bytes.
The only documented error is ``ProtocolError`` (raised, or kept in ``parser.error`` behind
the events that preceded it). Beyond that, three properties of the parser are checked, since
each is what a caller relies on:

- the same bytes give the same events and the same error however ``recv`` cut them;
- once an error is kept, the next ``feed`` raises it;
- every event re-encodes (``encode_message``, ``encode_close``) to a frame that parses back
  to itself.
"""

from __future__ import annotations

from runtime.frames import (
    Close,
    FrameParser,
    Ping,
    Pong,
    ProtocolError,
    Received,
    encode_close,
    encode_message,
)

LIMITS = (125, 126, 65535, 1 << 20)
"""Message size limits to try: around the 7- and 16-bit length encodings, and the default."""
CODES = frozenset((1002, 1007, 1009))
"""The close codes a ``ProtocolError`` may carry (its docstring)."""

Outcome = tuple[list[Received], tuple[int, str] | None]


def one_input(data: bytes) -> None:
    """Parse ``data[2:]`` whole, then in the pieces ``data[1]`` names; compare."""
    if len(data) < 2:
        return
    client = bool(data[0] & 1)
    limit = LIMITS[(data[0] >> 1) & 3]
    stream = data[2:]
    whole = parse(stream, [len(stream)], client, limit)
    pieced = parse(stream, pieces(data[1], len(stream)), client, limit)
    if pieced != whole:
        raise AssertionError(f"cut by {data[1]}: {pieced!r}, whole: {whole!r}")
    for event in whole[0]:
        check_event(event, limit)


def pieces(spec: int, total: int) -> list[int]:
    """The sizes of the ``feed`` calls: 0 gives single bytes, else a cycle of small sizes
    (so a header, a mask or a UTF-8 sequence is split at every offset over a corpus)."""
    if spec == 0:
        return [1] * total
    pair = (spec & 7) + 1, (spec >> 3) + 1
    return list(pair) * (total // sum(pair) + 1)


def parse(stream: bytes, sizes: list[int], client: bool, limit: int) -> Outcome:
    """Feed ``stream`` in pieces of ``sizes``: every event, and the error that ended it."""
    parser = FrameParser(max_message_size=limit, client=client)
    events: list[Received] = []
    offset = 0
    for size in sizes:
        piece, offset = stream[offset : offset + size], offset + size
        try:
            events += parser.feed(piece)
        except ProtocolError as exc:
            return events, checked(exc)
        if parser.error is not None:
            kept = checked(parser.error)
            try:
                parser.feed(b"")
            except ProtocolError as again:
                if (again.code, again.reason) != kept:
                    raise AssertionError(f"kept {kept}, then raised {again!r}") from again
                return events, kept
            raise AssertionError(f"error {kept} kept but the next feed did not raise it")
    return events, None


def checked(error: ProtocolError) -> tuple[int, str]:
    if error.code not in CODES or not error.reason:
        raise AssertionError(f"undocumented ProtocolError {error.code} {error.reason!r}")
    return error.code, error.reason


def check_event(event: Received, limit: int) -> None:
    """What the parser handed back is what its types say, and re-encodes to itself."""
    if isinstance(event, str | bytes):
        if len(event.encode() if isinstance(event, str) else event) > limit:
            raise AssertionError(f"a message over the {limit}-byte limit came through")
        again = FrameParser(client=True, max_message_size=limit).feed(encode_message(event))
        if again != [event]:
            raise AssertionError(f"{event!r} re-encoded parses as {again!r}")
    elif isinstance(event, Ping | Pong):
        if len(event.payload) > 125:
            raise AssertionError(f"a control frame over 125 bytes came through: {event!r}")
    elif isinstance(event, Close):
        frame = encode_close(event.code, event.reason)
        again = FrameParser(client=True).feed(frame)
        if again != [event]:
            raise AssertionError(f"{event!r} re-encoded parses as {again!r}")
    else:
        raise AssertionError(f"unexpected event {event!r}")
