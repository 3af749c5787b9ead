"""Seats and seat tickets (``runtime.seats``): the rules alone, then through a server."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from rooms import App, Connection, Request, Room
from rooms.testing import Settings
from runtime.seats import SeatRefused, Seats, Tickets
from tests.support import start_server

ROOM = "Board/" + "a" * 64


def refused(call: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(SeatRefused) as caught:
        call(*args)
    return caught.value.status, caught.value.text


# -- tickets ------------------------------------------------------------------------------------


def test_a_ticket_names_its_room_and_identity_and_expires() -> None:
    tickets = Tickets(b"secret")
    token = tickets.issue(ROOM, {"name": "ada"}, 10, now=1000.0)
    ticket = tickets.check(token, ROOM, now=1009.0)
    assert (ticket.room, ticket.identity, ticket.expires) == (ROOM, {"name": "ada"}, 1010.0)
    assert refused(tickets.check, token, ROOM, 1010.5)[0] == 401  # expired
    assert refused(tickets.check, token, "Board/" + "b" * 64, 1001.0) == (
        403,
        "the seat ticket is for another room",
    )


def test_a_forged_or_garbled_ticket_is_refused() -> None:
    token = Tickets(b"other secret").issue(ROOM, None, 10, now=0.0)
    tickets = Tickets(b"secret")
    status, text = refused(tickets.check, token, ROOM, 1.0)
    assert status == 401 and "not issued by this server" in text
    body, _, mac = tickets.issue(ROOM, "bob", 10, now=0.0).partition(".")
    tampered = Tickets(b"secret").issue(ROOM, "eve", 10, now=0.0).split(".")[0] + "." + mac
    assert refused(tickets.check, tampered, ROOM, 1.0)[0] == 401
    for garbage in ("", "x", "!!.!!", body):
        assert refused(tickets.check, garbage, ROOM, 1.0)[0] == 401


# -- seats --------------------------------------------------------------------------------------


def test_seats_fill_then_refuse_or_let_watch() -> None:
    seats = Seats(2, by_ticket_only=False, when_full="refuse")
    assert seats.take(None, 0) and seats.take(None, 0)
    assert refused(seats.take, None, 0) == (503, "the room is full (2 seats)")
    seats.leave(True)
    assert seats.take(None, 0)
    watching = Seats(1, by_ticket_only=False, when_full="watch")
    assert watching.take(None, 0) is True
    assert watching.take(None, 0) is False  # a watcher: no seat, still admitted
    watching.leave(False)
    assert watching.taken == 1


def test_a_locked_room_gives_no_seat_and_a_ticket_is_good_once() -> None:
    tickets = Tickets(b"s")
    seats = Seats(4, by_ticket_only=True, when_full="refuse")
    assert refused(seats.take, None, 0)[0] == 401  # seats by ticket only
    ticket = tickets.check(tickets.issue(ROOM, "ada", 10, 0), ROOM, 0)
    seats.locked = True
    assert refused(seats.take, ticket, 1)[0] == 403
    seats.locked = False
    assert seats.take(ticket, 1)
    assert refused(seats.take, ticket, 2) == (
        409,
        "the seat ticket was used already: a ticket is good once",
    )
    assert seats.taken == 1  # (a refusal takes no seat)


def test_a_refused_ticket_is_not_spent() -> None:
    tickets = Tickets(b"s")
    seats = Seats(1, by_ticket_only=False, when_full="refuse")
    assert seats.take(None, 0)
    ticket = tickets.check(tickets.issue(ROOM, "ada", 10, 0), ROOM, 0)
    assert refused(seats.take, ticket, 1)[0] == 503  # full: the ticket stays good
    seats.leave(True)
    assert seats.take(ticket, 2)


# -- through a server ---------------------------------------------------------------------------


class Board(Room):
    """Four seats; the rest watch. Says whether a connection is seated."""

    max_clients = 4
    when_full = "watch"

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.send(f"seated={conn.seated} identity={request.identity}")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "lock":
            self.lock()
        elif message == "ticket":
            conn.send(self.seat_ticket(Board, "b", {"name": "ticketed"}, ttl=5))
        conn.send(f"locked={self.locked}")


class Duel(Room):
    max_clients = 2


async def test_simultaneous_joins_never_take_more_seats_than_there_are(
    nursery: trio.Nursery, settings: Settings
) -> None:
    app = App()
    app.room("/board/{name}", Board)
    app.room("/duel/{name}", Duel)
    port = await start_server(nursery, app, settings)
    said: list[str] = []
    statuses: list[int] = []

    async def join(path: str) -> None:
        try:
            async with open_websocket_url(f"ws://127.0.0.1:{port}{path}") as ws:
                if path.startswith("/board"):
                    said.append(str(await ws.get_message()))
                await trio.sleep(1)
                statuses.append(101)
        except ConnectionRejected as exc:
            statuses.append(exc.status_code)

    async with trio.open_nursery() as joins:
        for _ in range(12):
            joins.start_soon(join, "/board/b")
            joins.start_soon(join, "/duel/d")
    assert sorted(said) == ["seated=False identity=None"] * 8 + ["seated=True identity=None"] * 4
    assert sorted(statuses) == [101] * 12 + [101] * 2 + [503] * 10


async def test_a_ticket_admits_one_connection_with_its_identity(
    nursery: trio.Nursery, settings: Settings
) -> None:
    app = App()
    app.room("/board/{name}", Board)
    port = await start_server(nursery, app, settings)
    url = f"ws://127.0.0.1:{port}/board/b"
    async with open_websocket_url(url) as first:
        assert await first.get_message() == "seated=True identity=None"
        await first.send_message("ticket")
        ticket = str(await first.get_message())
        assert await first.get_message() == "locked=False"
        async with open_websocket_url(f"{url}?ticket={ticket}") as holder:
            assert await holder.get_message() == "seated=True identity={'name': 'ticketed'}"
            for bad, status in ((ticket, 409), (ticket[:-3] + "AAA", 401)):
                with pytest.raises(ConnectionRejected) as caught:
                    async with open_websocket_url(f"{url}?ticket={bad}"):
                        pass
                assert caught.value.status_code == status
                assert b"seat ticket" in (caught.value.body or b"")
        other = f"ws://127.0.0.1:{port}/board/elsewhere?ticket={ticket}"
        with pytest.raises(ConnectionRejected) as caught:
            async with open_websocket_url(other):
                pass
        assert caught.value.status_code == 403
        await first.send_message("lock")
        assert await first.get_message() == "locked=True"
        async with open_websocket_url(url) as late:
            assert await late.get_message() == "seated=False identity=None"  # locked: watches
