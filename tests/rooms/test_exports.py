"""The public surface of the SDK, pinned (as trio and websockets pin theirs): a name added to
or dropped from ``rooms`` or ``rooms.testing`` must be a decision, made here."""

from __future__ import annotations

import rooms
import rooms._engine
import rooms.client
import rooms.testing

ROOMS = [
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
TESTING = [
    "ConnectionClosed",
    "FakeClient",
    "HandshakeRejected",
    "RoomsHarness",
    "Settings",
    "virtual_clock",
]


def test_rooms_exports_exactly_its_public_names() -> None:
    assert sorted(rooms.__all__) == ROOMS
    public = {name for name in vars(rooms) if not name.startswith("_")}
    assert public - {"testing", "client", "yjs"} == set(ROOMS)  # (submodules, once imported)


def test_public_names_say_they_live_in_rooms() -> None:
    # Reprs and tracebacks name them as users import them, not by private module.
    for name in ROOMS:
        assert getattr(rooms, name).__module__ == "rooms", name
    assert repr(rooms.Room) == "<class 'rooms.Room'>"


def test_rooms_testing_exports_exactly_its_public_names() -> None:
    assert sorted(rooms.testing.__all__) == TESTING
    for name in TESTING:
        assert getattr(rooms.testing, name) is not None


def test_rooms_client_exports_exactly_its_public_names() -> None:
    assert sorted(rooms.client.__all__) == ["ConnectionClosed", "RoomClient", "connect"]


def test_the_engine_contract_names_exist() -> None:
    for name in rooms._engine.__all__:
        assert hasattr(rooms._engine, name), name
