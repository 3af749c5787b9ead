"""The one value codec of Rooms: msgpack, for storage values, connection state and calls."""

from __future__ import annotations

from typing import Any

import msgpack

ALLOWED = "None, bool, int, float, str, bytes, list or dict values"


def encode(value: Any, what: str) -> bytes:
    """``value`` as msgpack; TypeError naming ``what`` if it cannot be encoded."""
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{what} is not msgpack-serialisable ({exc}); use {ALLOWED}") from None
    try:
        # Some values pack but do not read back (a tuple dict key comes back as an
        # unhashable list): refuse them now rather than fail every later read.
        decode(packed)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} cannot be read back from msgpack ({exc}); use {ALLOWED}") from None
    return packed


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
