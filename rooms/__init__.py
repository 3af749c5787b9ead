"""Rooms: stateful WebSocket rooms for Python, on trio.

Write one ``Room`` subclass per kind of room, route URLs to it with an ``App``, and serve it
with ``rooms serve MODULE:APP``. The guarantees the engine gives are in docs/guarantees.md.

The names below are the whole public surface (``tests/rooms/test_exports.py`` pins it); they
live in private modules, and their ``__module__`` says ``rooms`` so that reprs, tracebacks and
the docs name them as users import them (as trio does).
"""

from ._app import App
from ._engine import Storage, Timer
from ._http import HTTPError, Request, Response
from ._ids import RoomId, is_room_id
from ._lobby import Listed, Lobby
from ._presence import Presence
from ._room import CallCycleError, Connection, Room, RoomCallError, Stub

__all__ = [
    "App",
    "CallCycleError",
    "Connection",
    "HTTPError",
    "Listed",
    "Lobby",
    "Presence",
    "Request",
    "Response",
    "Room",
    "RoomCallError",
    "RoomId",
    "Storage",
    "Stub",
    "Timer",
    "is_room_id",
]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
