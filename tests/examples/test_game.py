"""The example game (examples/game) through rooms.testing, on a virtual clock: the loop at
20 ticks a second, players in conn.state, watchers and players by tag, the alarm that
closes an abandoned game, hibernation of a board nobody plays on."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import trio
import trio.testing

from examples.game import app as game
from rooms.testing import ConnectionClosed, FakeClient, RoomsHarness


@pytest.fixture(autouse=True)
def virtual_time(clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    random.seed(7)
    # Each tick of a running game is a clock jump: keep the waits short in ticks.
    monkeypatch.setattr(game, "ABANDON_SECONDS", 5.0)


async def frames(client: FakeClient, kind: str, count: int = 1) -> list[Any]:
    """The next ``count`` frames of ``kind`` (others are skipped)."""
    found: list[Any] = []
    while len(found) < count:
        frame = json.loads(await client.receive())
        if kind in frame:
            found.append(frame[kind])
    return found


async def next_state(client: FakeClient) -> Any:
    return (await frames(client, "state"))[0]


def player(state: Any, name: str) -> Any:
    return next(p for p in state["players"] if p["name"] == name)


async def test_players_move_at_the_tick_rate_and_watchers_see_it(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(game.app) as rooms:
        alice = await rooms.connect("/game/t1")
        watcher = await rooms.connect("/game/t1")
        hello = (await frames(alice, "hello"))[0]
        assert (hello["width"], hello["height"]) == (game.WIDTH, game.HEIGHT)
        await alice.send(json.dumps({"join": "alice"}))
        start = await next_state(watcher)
        x0 = player(start, "alice")["x"]
        await alice.send(json.dumps({"go": "left" if x0 > game.WIDTH // 2 else "right"}))
        begun = trio.current_time()
        await trio.sleep(1.0)  # 20 ticks: a step every 3 ticks
        state = (await frames(watcher, "state", 1))[0]
        while trio.current_time() - begun < 1.0 or state["tick"] < start["tick"] + 20:
            state = await next_state(watcher)
        moved = abs(player(state, "alice")["x"] - x0)
        assert 5 <= moved <= 7, moved
        assert len(state["coins"]) == game.COINS


async def test_picking_up_coins_scores_and_the_best_is_kept(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(game.app) as rooms:
        bob = await rooms.connect("/game/t2")
        await bob.send(json.dumps({"join": "bob"}))
        state = await next_state(bob)
        for _ in range(400):  # steer towards the nearest coin until one is taken
            me = player(state, "bob")
            if me["score"]:
                break
            cx, cy = min(state["coins"], key=lambda c: abs(c[0] - me["x"]) + abs(c[1] - me["y"]))
            go = (
                ("right" if cx > me["x"] else "left")
                if cx != me["x"]
                else ("down" if cy > me["y"] else "up")
            )
            await bob.send(json.dumps({"go": go}))
            state = await next_state(bob)
        assert player(state, "bob")["score"] == 1
        await rooms.settle()
        late = await rooms.connect("/game/t2")
        assert (await frames(late, "hello"))[0]["best"] == [["bob", 1]]


async def test_bad_frames_get_an_error_and_the_game_goes_on(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(game.app) as rooms:
        carol = await rooms.connect("/game/t3")
        for bad in ("not json", "[1]", json.dumps({"go": "sideways"}), json.dumps({"go": "up"})):
            await carol.send(bad)  # the last: moving before joining
            error = (await frames(carol, "error"))[0]
            assert isinstance(error, str) and error
        await carol.send(json.dumps({"join": "carol"}))
        assert player(await next_state(carol), "carol")


async def test_an_abandoned_game_is_closed_by_its_alarm(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(game.app) as rooms:
        dave = await rooms.connect("/game/t4")
        watcher = await rooms.connect("/game/t4")
        await dave.send(json.dumps({"join": "dave"}))
        await next_state(watcher)
        await dave.disconnect()
        await trio.sleep(game.ABANDON_SECONDS - 1)
        assert not watcher.closed
        await trio.sleep(2)
        await rooms.settle()
        assert (await frames(watcher, "closed"))[0] == "abandoned"
        with pytest.raises(ConnectionClosed) as closed:
            await watcher.receive()
        assert closed.value.reason == "game closed: abandoned"


async def test_a_player_who_returns_in_time_keeps_the_game(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(game.app) as rooms:
        erin = await rooms.connect("/game/t5")
        await erin.send(json.dumps({"join": "erin"}))
        await next_state(erin)
        await erin.disconnect()
        await trio.sleep(game.ABANDON_SECONDS / 2)
        again = await rooms.connect("/game/t5")
        await again.send(json.dumps({"join": "erin"}))  # cancels the alarm
        await trio.sleep(game.ABANDON_SECONDS)
        assert not again.closed
        assert not any("closed" in json.loads(m) for m in again.received)


async def test_a_board_with_only_watchers_hibernates_and_wakes(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(game, "ABANDON_SECONDS", 300.0)  # not abandoned during the test
    async with RoomsHarness(game.app) as rooms:
        fay = await rooms.connect("/game/t6")
        await fay.send(json.dumps({"join": "fay"}))
        await next_state(fay)
        watcher = await rooms.connect("/game/t6")
        await trio.sleep(15)  # the loop runs: no hibernation while someone plays
        assert rooms.is_active(game.GameRoom, "t6")
        await fay.disconnect()
        await trio.sleep(11)
        await rooms.settle()
        assert not rooms.is_active(game.GameRoom, "t6")  # only a watcher: hibernated
        starts = rooms.metrics.room_activations_total
        watcher.drain()
        await watcher.send(json.dumps({"join": "gus"}))  # wakes it, and it plays on
        state = await next_state(watcher)
        assert [p["name"] for p in state["players"]] == ["gus"]
        assert rooms.metrics.room_activations_total == starts + 1


# -- the lobby ---------------------------------------------------------------------------------


async def post(rooms: RoomsHarness, path: str, name: str) -> Any:
    answer = await rooms.request("POST", path, json.dumps({"name": name}))
    assert answer.status == 200, answer.body
    return json.loads(answer.body)


async def test_fifty_quick_plays_fill_thirteen_boards_of_four_and_the_rest_watch() -> None:
    async with RoomsHarness(game.app) as rooms:
        seats: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def quickplay(i: int) -> None:
                seats.append(await post(rooms, "/api/quickplay", f"p{i}"))

            for i in range(50):
                nursery.start_soon(quickplay, i)
        assert len({seat["board"] for seat in seats}) == 13
        clients = []
        for i, seat in enumerate(seats):
            assert seat["url"].startswith("ws://") and seat["url"].endswith(seat["path"])
            client = await rooms.connect(seat["path"])
            assert (await frames(client, "hello"))[0]["seated"] is True
            await client.send(json.dumps({"join": f"p{i}"}))
            clients.append(client)
        await rooms.settle()
        listed = json.loads((await rooms.request("GET", "/api/boards")).body)
        assert sorted(board["players"] for board in listed) == [2] + [4] * 12
        assert {board["max_players"] for board in listed} == {4}
        full = next(board["name"] for board in listed if board["players"] == 4)
        late = await rooms.connect(f"/game/{full}")  # a fifth: watches
        assert (await frames(late, "hello"))[0]["seated"] is False
        await late.send(json.dumps({"join": "late"}))
        assert "full" in (await frames(late, "error"))[0]


async def test_a_private_board_is_not_listed_and_its_link_lets_friends_in() -> None:
    async with RoomsHarness(game.app) as rooms:
        mine = await post(rooms, "/api/boards", "host")
        host = await rooms.connect(mine["path"])
        await host.send(json.dumps({"join": "host"}))
        await rooms.settle()
        assert json.loads((await rooms.request("GET", "/api/boards")).body) == []
        friend = await rooms.connect(f"/game/{mine['board']}")  # the shared link: no ticket
        assert (await frames(friend, "hello"))[0]["seated"] is True
        bad = await rooms.request("POST", "/api/quickplay", "not json")
        assert bad.status == 400
