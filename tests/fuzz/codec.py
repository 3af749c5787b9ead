"""Fuzz target: ``rooms._codec``, the msgpack codec of stored values, connection state and
call payloads.

The input is read as a stored value (``decode``); garbage may only fail with ValueError or
TypeError, which is what msgpack raises for it and what ``encode`` itself catches when it
reads its own output back. A value that decodes is then stored again (``encode``), which may
only refuse it with its documented TypeError naming the value; and what ``encode`` wrote
must read back and encode to the same bytes (a value survives any number of restarts).
"""

from __future__ import annotations

from rooms._codec import decode, encode

WHAT = "the fuzzed value"


def one_input(data: bytes) -> None:
    try:
        value = decode(data)
    except (ValueError, TypeError):
        return
    try:
        packed = encode(value, WHAT)
    except TypeError as exc:
        if WHAT not in str(exc):
            raise AssertionError(f"encode's TypeError does not name the value: {exc}") from exc
        return
    again = encode(decode(packed), WHAT)
    if again != packed:
        raise AssertionError(f"{value!r}: stored as {packed!r}, then as {again!r}")
