"""A lobby: a room that lists rooms of one kind and hands out seats in them.

A lobby is an ordinary room (one per kind of game, or per mode: ``/lobby/duel``), so
join-or-create is atomic: the lobby picks a room with a free seat, or names a new one, and
issues a seat ticket in one event, and a room is never "created" anywhere: its id is its
owner. Rooms report themselves (``Listed``): their seated players, capacity, lock, privacy
and metadata, on every join and leave and at least every ``refresh`` seconds; an entry not
refreshed for ``ttl`` seconds is dropped, so one missed report never drops a live room.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ._ids import RoomId
from ._room import Room

_ENTRIES = "lobby:entries"  # the stored listing
_SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "players": lambda entry: (-entry["players"], entry["name"]),
    "free": lambda entry: (entry["players"] - (entry["max_players"] or 0), entry["name"]),
    "name": lambda entry: entry["name"],
}


class Lobby(Room):
    """Lists rooms of ``room_class`` and hands out their seats.

    Class settings: ``room_class`` (the rooms it lists; required), ``ttl`` (seconds an entry
    lives without a report; default 30), ``seat_ttl`` (seconds a ticket is good for, during
    which its seat counts as taken; default 15).

    Call it through a stub (``self.stub(MyLobby, "duel")`` in a room, ``request.stub(...)``
    in an HTTP route): ``join_or_create``, ``create``, ``rooms``; its listed rooms call
    ``report`` and ``remove`` (``Listed`` does).
    """

    room_class: ClassVar[type[Room]]
    ttl: ClassVar[float] = 30.0
    seat_ttl: ClassVar[float] = 15.0
    hibernate_after = None  # (its listing is in memory: keep it)

    async def on_start(self) -> None:
        self.entries: dict[str, dict[str, Any]] = await self.storage.get(_ENTRIES, {})
        self.pending: dict[str, dict[str, float]] = {}  # room -> ticket -> expiry

    # -- what listed rooms call -------------------------------------------------------------

    async def report(
        self,
        room: str,
        players: int,
        max_players: int | None,
        tickets: list[str],
        locked: bool = False,
        private: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Room ``room`` has ``players`` seated (of ``max_players``); ``tickets``: those its
        seated players came with (their seats are no longer pending)."""
        pending = self.pending.get(room, {})
        for ticket in tickets:
            pending.pop(ticket, None)
        private = private or self.entries.get(room, {}).get("private", False)  # (as created)
        self._list(room, players, max_players, locked, private, metadata or {})
        self.storage.put(_ENTRIES, self.entries)

    async def remove(self, room: str) -> None:
        """Room ``room`` is gone (empty, or closed)."""
        if self.entries.pop(room, None) is not None:
            self.storage.put(_ENTRIES, self.entries)
        self.pending.pop(room, None)

    # -- what players call -------------------------------------------------------------------

    async def rooms(
        self,
        filters: dict[str, Any] | None = None,
        sort: str = "players",
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """The public rooms (never the private ones) whose metadata matches ``filters``:
        name, players (pending seats included), max_players, locked, metadata; sorted by
        ``sort``, "players" (the fullest first), "free" (the most free seats first) or
        "name"; ``limit`` of them from ``offset``."""
        if sort not in _SORTS:
            raise ValueError(f"sort is one of {', '.join(_SORTS)}")
        found = [self._public(entry) for entry in self._live(filters) if not entry["private"]]
        found.sort(key=_SORTS[sort])
        return found[offset : offset + limit]

    async def join_or_create(
        self, identity: Any = None, filters: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A seat in the fullest open public room matching ``filters`` (its metadata), or in
        a new one: ``{"room": NAME, "ticket": TICKET, "created": bool}``."""
        open_rooms = [
            entry
            for entry in self._live(filters)
            if not entry["private"] and not entry["locked"] and self._free(entry) > 0
        ]
        if open_rooms:
            entry = max(open_rooms, key=lambda e: (self._taken(e), e["name"]))
            return {**self._seat(entry["name"], identity), "created": False}
        return self._new(identity, False, dict(filters or {}))

    async def create(self, identity: Any = None, private: bool = True) -> dict[str, Any]:
        """A new room (private by default: never listed; share its name) and a seat in it."""
        return self._new(identity, private, {})

    def _new(self, identity: Any, private: bool, metadata: dict[str, Any]) -> dict[str, Any]:
        """A new room, listed (until its ttl) before any report, and a seat in it."""
        name = RoomId.unique().hex
        self._list(name, 0, self.room_class.max_clients, False, private, metadata)
        return {**self._seat(name, identity), "created": True}

    def _list(
        self,
        room: str,
        players: int,
        max_players: int | None,
        locked: bool,
        private: bool,
        metadata: dict[str, Any],
    ) -> None:
        self.entries[room] = {
            "name": room,
            "players": players,
            "max_players": max_players,
            "locked": locked,
            "private": private,
            "metadata": metadata,
            "expires": self.now() + self.ttl,
        }

    # -- the listing --------------------------------------------------------------------------

    def _live(self, filters: dict[str, Any] | None) -> list[dict[str, Any]]:
        now = self.now()
        expired = [name for name, entry in self.entries.items() if entry["expires"] < now]
        for name in expired:
            del self.entries[name]
            self.pending.pop(name, None)
        if expired:
            self.storage.put(_ENTRIES, self.entries)
        wanted = (filters or {}).items()
        return [
            entry
            for entry in self.entries.values()
            if all(entry["metadata"].get(key) == value for key, value in wanted)
        ]

    def _taken(self, entry: dict[str, Any]) -> int:
        """Seated players and the seats of tickets not used yet (nor expired)."""
        now = self.now()
        pending = self.pending.get(entry["name"], {})
        for ticket in [t for t, expires in pending.items() if expires < now]:
            del pending[ticket]
        return int(entry["players"]) + len(pending)

    def _free(self, entry: dict[str, Any]) -> int:
        capacity = entry["max_players"]
        return 1 if capacity is None else int(capacity) - self._taken(entry)

    def _public(self, entry: dict[str, Any]) -> dict[str, Any]:
        shown = {key: entry[key] for key in ("name", "max_players", "locked", "metadata")}
        return {**shown, "players": self._taken(entry)}

    def _seat(self, room: str, identity: Any) -> dict[str, Any]:
        ticket = self.seat_ticket(self.room_class, room, identity, ttl=self.seat_ttl)
        self.pending.setdefault(room, {})[ticket] = self.now() + self.seat_ttl
        return {"room": room, "ticket": ticket}


class Listed:
    """What a listed room tells its lobby (``Lobby``): create one in ``on_start``, call
    ``update()`` after each connect and close, and at least every ``refresh_every`` seconds
    (a third of the lobby's ``ttl``) while the room should stay listed, e.g. from its game
    loop. ``metadata`` and ``private`` go with each report. A room that stops reporting
    (it hibernated with nothing going on, or died with its node) leaves the listing after
    the ttl; one with no seated connection is removed at once. (No timer of its own: that
    would keep an idle room from hibernating.)"""

    def __init__(
        self,
        room: Room,
        lobby_class: type[Lobby],
        lobby: str,
        metadata: dict[str, Any] | None = None,
        private: bool = False,
    ) -> None:
        self.room = room
        self.lobby = room.stub(lobby_class, lobby)
        self.metadata = metadata or {}
        self.private = private
        self.refresh_every = lobby_class.ttl / 3

    async def update(self) -> None:
        """Report the room's seated players now (or its removal, if it has none)."""
        room = self.room
        name = room.name or room.id.hex  # (a unique room is listed by its id)
        seated = [conn for conn in room.connections() if conn.seated]
        if not seated:
            await self.lobby.remove(name)
            return
        tickets = [t for t in (conn.request.query_param("ticket") for conn in seated) if t]
        capacity = type(room).max_clients
        await self.lobby.report(
            name, len(seated), capacity, tickets, room.locked, self.private, self.metadata
        )
