"""The contract between the SDK and the engine that runs it, both ways.

SDK to engine: the engine (``runtime``) hands every room activation a ``RoomContext`` and
every connection a ``ConnectionLink``; ``Room``, ``Connection`` and ``Stub`` only ever call
these, so the engine can change freely behind them. ``Storage`` and ``Timer`` are the public
types of what the context returns.

Engine to SDK: ``runtime`` imports the public names of ``rooms`` and, beyond them, only what
this module re-exports (the route records of an ``App``, the value codec, how a room instance
is bound to its context). A test pins both rules (``tests/test_layers.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from ._app import FunctionRoute, ProxyRoute, RoomRoute, Route, StaticRoute
from ._codec import decode, encode
from ._http import RouteHandler, StubFactory, error_response, text_error, upgrade_required
from ._ids import RoomId, room_id_of
from ._room import Connection, Room, RoomCall, is_valid_close_code, make_stub, new_room

__all__ = [
    "ConnectionLink",
    "FunctionRoute",
    "ProxyRoute",
    "RoomCall",
    "RoomContext",
    "RoomRoute",
    "Route",
    "RouteHandler",
    "StaticRoute",
    "Storage",
    "StubFactory",
    "Timer",
    "decode",
    "encode",
    "error_response",
    "is_valid_close_code",
    "make_stub",
    "new_room",
    "room_id_of",
    "text_error",
    "upgrade_required",
]


class Storage(Protocol):
    """A room's durable key-value storage.

    Writes (``put``, ``delete``, ``delete_all``) are buffered and commit atomically, all
    together, when the current event's handler returns. Reads see the room's own pending
    writes. Messages sent after a write are held until that write is durable (output gate).
    Values are anything msgpack can encode (None, bool, int, float, str, bytes, lists,
    dicts); tuples come back as lists. Keys are str of at most 2048 bytes in UTF-8 (as
    Durable Objects'), listed in code point order.
    """

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        ...

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The stored values of those ``keys`` that exist."""
        ...

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (raises TypeError naming the key if not encodable)."""
        ...

    def put_many(self, entries: dict[str, Any]) -> None:
        """Store every entry of ``entries``, as ``put`` would each, in the same commit."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing happens if it is absent)."""
        ...

    async def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Entries in key order (``reverse`` for descending): keys with ``prefix``, at or
        after ``start``, before ``end``; at most ``limit`` of them."""
        ...

    def delete_all(self) -> None:
        """Remove every key of this room (not its alarm)."""
        ...

    async def get_alarm(self) -> float | None:
        """The time (seconds since the epoch) of this room's alarm, or None."""
        ...

    def set_alarm(self, at: float) -> None:
        """Set this room's one alarm (replacing any other) to ``at``, committed with the
        event's other writes. ``Room.set_alarm`` also takes an aware datetime."""
        ...

    def delete_alarm(self) -> None:
        """Remove this room's alarm, if any, committed with the event's other writes."""
        ...


class Timer(Protocol):
    """A running timer of a room (``Room.every`` / ``Room.after``)."""

    @property
    def active(self) -> bool:
        """Still scheduled (not cancelled, not a one-shot that fired, instance alive)."""
        ...

    def cancel(self) -> None:
        """Stop the timer: its callback is not called again, and a tick already queued is
        dropped. Cancelling a timer that is no longer active does nothing."""
        ...


class ConnectionLink(Protocol):
    """What a ``Connection`` needs from the engine."""

    def send(self, message: str | bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class RoomContext(Protocol):
    """What a room activation needs from the engine."""

    @property
    def room_id(self) -> RoomId: ...

    @property
    def storage(self) -> Storage: ...

    def broadcast(
        self, message: str | bytes, exclude: Collection[str], tag: str | None
    ) -> None: ...

    def connections(self, tag: str | None) -> list[Connection]: ...

    async def call(
        self,
        room_class: type[Room],
        room: str | RoomId,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any: ...

    def start_timer(
        self, delay: float, interval: float | None, callback: Callable[[], Any]
    ) -> Timer: ...

    def now(self) -> float: ...

    @property
    def seats(self) -> Seats: ...

    def issue_ticket(self, room_key: str, identity: Any, ttl: float) -> str: ...


class Seats(Protocol):
    """A room's seats, as the room sees them (``Room.lock``)."""

    locked: bool
