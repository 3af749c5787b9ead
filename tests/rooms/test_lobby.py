"""The lobby (``rooms.Lobby``, ``rooms.Listed``): join-or-create, seats, listing and its TTL."""

from __future__ import annotations

import json

import trio
import trio.testing

from rooms import App, Connection, Listed, Lobby, Request, Response, Room
from rooms.testing import HandshakeRejected, RoomsHarness


class Table(Room):
    """Four seats, listed in the lobby "tables"; says whether a connection is seated."""

    max_clients = 4
    when_full = "watch"

    async def on_start(self) -> None:
        self.listing = Listed(self, Tables, "tables", metadata={"mode": "duel"})
        self.every(self.listing.refresh_every, self.listing.update)  # (its own loop)

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.send(json.dumps({"seated": conn.seated, "identity": request.identity}))
        await self.listing.update()

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        await self.listing.update()

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "lock":
            self.lock()
            await self.listing.update()


class Tables(Lobby):
    room_class = Table


async def refusal(h: RoomsHarness, path: str) -> Response:
    """The response that refused an upgrade to ``path``."""
    try:
        await h.connect(path)
    except HandshakeRejected as rejected:
        return rejected.response
    raise AssertionError(f"{path} was not refused")


def app() -> App:
    application = App()
    application.room("/table/{name}", Table)
    application.room("/lobby/{name}", Tables)
    return application


async def test_fifty_quick_plays_fill_thirteen_tables_and_every_ticket_seats_once(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as h:
        lobby = h.stub(Tables, "tables")
        seats = []
        async with trio.open_nursery() as nursery:

            async def play(i: int) -> None:
                seats.append(await lobby.join_or_create({"name": f"p{i}"}, {"mode": "duel"}))

            for i in range(50):
                nursery.start_soon(play, i)
        tables = {seat["room"] for seat in seats}
        assert len(tables) == 13
        assert sorted(sum(s["room"] == t for s in seats) for t in tables) == [2] + [4] * 12
        players = []
        for seat in seats:
            client = await h.connect(f"/table/{seat['room']}?ticket={seat['ticket']}")
            said = json.loads(await client.receive())
            assert said["seated"] is True and said["identity"]["name"].startswith("p")
            players.append(client)
        await h.settle()
        listed = await lobby.rooms({"mode": "duel"}, limit=100)
        assert [entry["players"] for entry in listed] == [4] * 12 + [2]  # the fullest first
        assert (await lobby.rooms({"mode": "duel"}, sort="free", limit=1))[0]["players"] == 2
        assert len(await lobby.rooms({"mode": "duel"}, limit=5, offset=10)) == 3
        assert await lobby.rooms({"mode": "ranked"}) == []
        # The open table fills first; a ticket is good once.
        again = await lobby.join_or_create({"name": "late"}, {"mode": "duel"})
        assert again["room"] == next(e["name"] for e in listed if e["players"] == 2)
        path = f"/table/{seats[0]['room']}?ticket={seats[0]['ticket']}"
        assert (await refusal(h, path)).status == 409


async def test_private_tables_are_never_listed_and_locked_ones_get_no_player(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as h:
        lobby = h.stub(Tables, "tables")
        private = await lobby.create({"name": "host"})
        host = await h.connect(f"/table/{private['room']}?ticket={private['ticket']}")
        await host.receive()
        await h.settle()
        assert await lobby.rooms() == []
        public = await lobby.join_or_create({"name": "ada"})
        assert public["room"] != private["room"]
        ada = await h.connect(f"/table/{public['room']}?ticket={public['ticket']}")
        await ada.receive()
        await ada.send("lock")
        await h.settle()
        [entry] = await lobby.rooms()
        assert entry["locked"] is True
        fresh = await lobby.join_or_create({"name": "bob"})
        assert fresh["room"] not in (public["room"], private["room"])  # a locked table is skipped


async def test_a_listing_lives_through_a_missed_refresh_and_expires_after_its_ttl(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as h:
        lobby = h.stub(Tables, "tables")
        seat = await lobby.join_or_create({"name": "ada"})
        ada = await h.connect(f"/table/{seat['room']}?ticket={seat['ticket']}")
        await ada.receive()
        await h.settle()
        for _ in range(6):  # the table refreshes every ttl / 3 meanwhile
            clock.jump(Tables.ttl / 3)
            await h.settle()
        await h.settle()
        assert [e["name"] for e in await lobby.rooms()] == [seat["room"]]
        await ada.disconnect()
        await h.settle()
        assert await lobby.rooms() == []  # the last player left: removed at once
        await lobby.report("ghost", 1, 4, [])  # a room that reports once, then dies
        clock.jump(Tables.ttl / 2)  # (a refresh missed: still listed)
        assert [e["name"] for e in await lobby.rooms()] == ["ghost"]
        clock.jump(Tables.ttl)
        assert await lobby.rooms() == []


async def test_an_expired_or_forged_ticket_is_refused_at_the_upgrade(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as h:
        seat = await h.stub(Tables, "tables").join_or_create({"name": "ada"})
        clock.jump(Tables.seat_ttl + 1)
        late = await refusal(h, f"/table/{seat['room']}?ticket={seat['ticket']}")
        assert late.status == 401 and b"expired" in late.body
        forged = await refusal(h, f"/table/{seat['room']}?ticket={seat['ticket'][:-4]}AAAA")
        assert forged.status == 401 and b"not issued by this server" in forged.body
        watcher = await h.connect(f"/table/{seat['room']}")
        assert json.loads(await watcher.receive())["seated"] is True  # no ticket needed here
