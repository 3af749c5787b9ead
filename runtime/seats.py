"""Seats and seat tickets: how many of a room's connections play (``Room.max_clients``), the
room's lock, and the tickets a lobby hands out.

A seat is taken and counted in one synchronous step as a connection attaches to its room, on
the node that holds the room (``Host.attach``), so simultaneous joins can never take more
seats than there are, nor be told "full" while one is free. A ticket is signed with the
server's ``ticket_secret`` (HMAC-SHA256), names one room and an identity, expires within
seconds and is good for one connection: the edge checks its signature, room and expiry at the
upgrade, the room's node that it was not used before; neither wakes the room.

Sans-I/O: the clock is passed in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Any

import attrs
import msgpack

TICKET_PARAM = "ticket"
"""The query parameter an upgrade carries its ticket in (``?ticket=...``)."""


class SeatRefused(Exception):
    """A connection that may not join: its HTTP status and why; ``ticket``: for its ticket
    (not for want of a seat)."""

    def __init__(self, status: int, text: str, ticket: bool = False) -> None:
        super().__init__(text)
        self.status, self.text, self.ticket = status, text, ticket


def _bad_ticket(status: int, text: str) -> SeatRefused:
    return SeatRefused(status, text, ticket=True)


@attrs.frozen
class Ticket:
    """A checked seat ticket: its room (``namespace/hex``), identity, expiry and nonce."""

    room: str
    identity: Any
    expires: float
    nonce: str


class Tickets:
    """Issues and checks seat tickets with one secret (every node of a cluster shares it)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def issue(self, room: str, identity: Any, ttl: float, now: float) -> str:
        """A ticket for one connection to ``room`` as ``identity``, good for ``ttl`` s."""
        payload = msgpack.packb([room, identity, round(now + ttl, 3), secrets.token_hex(8)])
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def check(self, token: str, room: str, now: float) -> Ticket:
        """The ticket ``token`` is, if it is one this secret signed, for ``room``, not expired
        (SeatRefused 401 or 403 otherwise)."""
        try:
            body, _, mac = token.partition(".")
            payload, signature = _unb64(body), _unb64(mac)
        except (ValueError, binascii.Error):
            raise _bad_ticket(
                401, "the seat ticket is not one (ask the lobby for a seat)"
            ) from None
        if not hmac.compare_digest(signature, self._mac(payload)):
            raise _bad_ticket(401, "the seat ticket was not issued by this server: forged?")
        named, identity, expires, nonce = msgpack.unpackb(payload, raw=False)
        if named != room:
            raise _bad_ticket(403, "the seat ticket is for another room")
        if now > expires:
            raise _bad_ticket(401, "the seat ticket expired: ask the lobby for another")
        return Ticket(named, identity, expires, nonce)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:16]


def ticket_secret(configured: str, cluster_token: str) -> bytes:
    """The secret tickets are signed with: ``ticket_secret`` if set; in a cluster, one
    derived from ``cluster_token`` (every node must agree); else a fresh one per process
    (tickets live seconds: a restart only voids those outstanding)."""
    if configured:
        return configured.encode()
    if cluster_token:
        return hmac.new(cluster_token.encode(), b"rooms seat tickets", hashlib.sha256).digest()
    return secrets.token_bytes(32)


class Seats:
    """One room's seats, on the node that holds it: ``max_clients`` (None: no limit), seats
    given by ticket only or to any connection while free, and what a connection gets when
    none is: refused (``when_full`` "refuse") or admitted to watch ("watch")."""

    __slots__ = ("_used", "by_ticket_only", "locked", "max_clients", "taken", "when_full")

    def __init__(self, max_clients: int | None, by_ticket_only: bool, when_full: str) -> None:
        self.max_clients, self.by_ticket_only, self.when_full = (
            max_clients,
            by_ticket_only,
            when_full,
        )
        self.taken = 0
        self.locked = False
        self._used: dict[str, float] = {}  # nonce -> expiry, of the tickets admitted

    def take(self, ticket: Ticket | None, now: float) -> bool:
        """Admit one connection (holding ``ticket``, if any): whether it holds a seat (False:
        it watches); SeatRefused if it may not join."""
        if ticket is not None and ticket.nonce in self._used:
            raise _bad_ticket(409, "the seat ticket was used already: a ticket is good once")
        seated = self._seat(ticket is not None)
        if ticket is not None:
            self._spend(ticket, now)
        return seated

    def _seat(self, ticketed: bool) -> bool:
        if self.max_clients is None:
            return True
        free = not self.locked and self.taken < self.max_clients
        if free and (ticketed or not self.by_ticket_only):
            self.taken += 1
            return True
        if self.when_full == "watch":
            return False
        if self.locked:
            raise SeatRefused(403, "the room is locked: it takes no new players")
        if not ticketed and self.by_ticket_only:
            raise SeatRefused(401, "this room's seats are handed out with tickets (?ticket=)")
        raise SeatRefused(503, f"the room is full ({self.max_clients} seats)")

    def leave(self, seated: bool) -> None:
        """A connection that held a seat (``seated``) or watched left."""
        if seated and self.max_clients is not None:
            self.taken -= 1

    def _spend(self, ticket: Ticket, now: float) -> None:
        for nonce in [n for n, expires in self._used.items() if expires < now]:
            del self._used[nonce]  # (expired tickets are refused anyway)
        self._used[ticket.nonce] = ticket.expires


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = ["TICKET_PARAM", "SeatRefused", "Seats", "Ticket", "Tickets", "ticket_secret"]
