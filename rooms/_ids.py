"""Room addresses: the 64-hex id that names exactly one room of a class."""

from __future__ import annotations

import hashlib
import re
import secrets

import attrs

_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_room_id(text: str) -> bool:
    """True if `text` has the form of a room id (64 lowercase hex characters)."""
    return len(text) == 64 and _HEX64.fullmatch(text) is not None


@attrs.frozen(slots=True)
class RoomId:
    """The address of one room within its room class (like a Durable Object id).

    Three ways to get one, as in Durable Objects:

    - ``RoomId.from_name("lobby")``: deterministic, the same name always gives the same id;
    - ``RoomId.unique()``: a new random id, 256 bits, unguessable (for private rooms);
    - ``RoomId.from_string(text)``: parse an id that was handed out earlier.

    ``str(room_id)`` is the 64-character lowercase hex form. ``name`` is the name the id was
    derived from, when it was derived from one (it does not take part in equality).
    """

    hex: str
    """The id: 64 lowercase hex characters."""
    name: str | None = attrs.field(default=None, eq=False, hash=False)
    """The name given to ``from_name``; None for ``unique`` and ``from_string`` ids."""

    @classmethod
    def from_name(cls, name: str) -> RoomId:
        """The id derived from ``name``: a SHA-256 digest of the name (behind a fixed
        prefix), so one name always gives the same room, on any server and after any
        restart. The name is kept in ``name`` (a room reads it as ``self.name``)."""
        digest = hashlib.sha256(b"rooms-id\0" + name.encode("utf-8", "surrogatepass")).hexdigest()
        return cls(digest, name)

    @classmethod
    def unique(cls) -> RoomId:
        """A new random id, 256 bits from ``secrets``: nobody can guess it, so handing it
        out is how a private room is shared. Its ``name`` is None."""
        return cls(secrets.token_hex(32))

    @classmethod
    def from_string(cls, text: str) -> RoomId:
        """The id whose hex form (``str(room_id)``) is ``text``, e.g. one handed out by
        ``unique`` earlier. Anything but 64 lowercase hex characters raises ValueError.
        The name an id was derived from is not in its hex form, so ``name`` is None."""
        if not is_room_id(text):
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise ValueError(
                f"invalid room id {shown!r}: a room id is exactly 64 lowercase hex characters"
            )
        return cls(text)

    def __str__(self) -> str:
        return self.hex


def room_id_of(room: str | RoomId) -> RoomId:
    """``room`` as an id: an id as it is, a name through ``RoomId.from_name``."""
    return room if isinstance(room, RoomId) else RoomId.from_name(room)
