"""Presence: who is in a room, one entry per person across their tabs and devices."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ._room import Connection, Room

_TAG = "presence:"  # a connection's member key, as a tag: it lasts across hibernation


class Presence:
    """The members of ``room``: one entry per key (a name, a user id) however many
    connections carry it, each with a small ephemeral state (typing, cursor, status) that is
    never stored.

    ``join`` says whether a connection brings a new member (announce it); when a member's
    last connection goes, it stays for ``grace`` seconds, so a reconnect within them (a
    reload, a flaky network) neither leaves nor joins, then ``on_leave(key)`` runs (announce
    it). Keys live in the connections' tags, so presence survives hibernation and restarts:
    create the Presence in ``on_start``. It keeps no timer but a leaving member's grace, so
    it never keeps an idle room from hibernating for longer.
    """

    def __init__(
        self,
        room: Room,
        on_leave: Callable[[str], Awaitable[None] | None],
        grace: float = 5.0,
    ) -> None:
        self.room = room
        self.on_leave = on_leave
        self.grace = grace
        self.states: dict[str, dict[str, Any]] = {}
        self._leaving: dict[str, Any] = {}  # key -> its grace timer
        for conn in room.connections():
            key = self.key_of(conn)
            if key is not None:
                self.states.setdefault(key, {})

    @staticmethod
    def key_of(conn: Connection) -> str | None:
        """The member ``conn`` belongs to, if it joined."""
        for tag in conn.tags:
            if tag.startswith(_TAG):
                return tag[len(_TAG) :]
        return None

    def members(self) -> dict[str, dict[str, Any]]:
        """Every member (those in their grace period too) with its state."""
        return {key: dict(state) for key, state in self.states.items()}

    def join(self, conn: Connection, key: str) -> bool:
        """``conn`` is one of member ``key``'s connections: True if that member is new
        (it was neither here nor in its grace period)."""
        conn.tags.add(_TAG + key)
        timer = self._leaving.pop(key, None)
        if timer is not None:
            timer.cancel()  # back within the grace period: it never left
            return False
        if key in self.states:
            return False
        self.states[key] = {}
        return True

    def leave(self, conn: Connection) -> None:
        """``conn`` is gone (call it in ``on_close``): if it was its member's last
        connection, the member leaves after the grace period."""
        key = self.key_of(conn)
        if key is None or key not in self.states:
            return
        others = [c for c in self.room.connections() if c is not conn and self.key_of(c) == key]
        if not others and key not in self._leaving:
            self._leaving[key] = self.room.after(self.grace, lambda: self._left(key))

    def update(self, conn: Connection, **fields: Any) -> dict[str, Any]:
        """Set fields of ``conn``'s member's ephemeral state; the fields that changed (empty:
        none did), to send to the others."""
        key = self.key_of(conn)
        if key is None:
            raise ValueError("update the presence of a connection that joined (Presence.join)")
        state = self.states.setdefault(key, {})
        changed = {name: value for name, value in fields.items() if state.get(name) != value}
        state.update(changed)
        return changed

    async def _left(self, key: str) -> None:
        self._leaving.pop(key, None)
        if any(self.key_of(conn) == key for conn in self.room.connections()):
            return
        self.states.pop(key, None)
        result = self.on_leave(key)
        if result is not None:
            await result
