"""The chat's presence (``rooms.Presence``), for clients that ask for it: one roster line per
name across tabs, a grace period before "quit", typing relayed and never stored; the demo's
clients, which do not ask, see the protocol they always did. On a virtual clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from examples.chat import app as chat
from rooms.testing import FakeClient, RoomsHarness


@pytest.fixture(autouse=True)
def no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat.RateLimiter, "grace", 1e9)  # (every test client is one address)


async def joining(
    h: RoomsHarness, name: str, presence: bool
) -> tuple[FakeClient, list[dict[str, Any]]]:
    """A client of room "p" once ready, and the roster and typing frames it got first."""
    client = await h.connect("/api/room/p/websocket")
    hello: dict[str, Any] = {"name": name}
    if presence:
        hello["presence"] = True
    await client.send(json.dumps(hello))
    before = []
    while "ready" not in (frame := json.loads(await client.receive())):
        before.append(frame)
    return client, [f for f in before if {"joined", "quit", "typing"} & f.keys()]


async def joined(h: RoomsHarness, name: str, presence: bool) -> FakeClient:
    return (await joining(h, name, presence))[0]


async def roster_frames(h: RoomsHarness, client: FakeClient) -> list[dict[str, Any]]:
    """What ``client`` got since the last look, roster and typing frames only."""
    await h.settle()
    frames = [json.loads(text) for text in client.drain()]
    return [f for f in frames if {"joined", "quit", "typing"} & f.keys()]


async def test_one_roster_line_per_name_however_many_tabs(clock: trio.testing.MockClock) -> None:
    async with RoomsHarness(chat.app) as h:
        watcher = await joined(h, "watcher", presence=True)
        demo = await joined(h, "demo", presence=False)  # a workers-chat-demo client
        for client in (watcher, demo):
            await roster_frames(h, client)
        first = await joined(h, "ada", presence=True)
        second = await joined(h, "ada", presence=True)  # a second tab
        assert await roster_frames(h, watcher) == [{"joined": "ada"}]  # once
        assert await roster_frames(h, demo) == [{"joined": "ada"}, {"joined": "ada"}]
        late, roster = await joining(h, "late", presence=True)
        got = [f["joined"] for f in roster + await roster_frames(h, late)]
        assert sorted(got) == ["ada", "demo", "late", "watcher"]  # one line each
        for client in (watcher, demo):  # (late's joined: seen)
            await roster_frames(h, client)
        await first.disconnect()
        assert await roster_frames(h, watcher) == []  # ada still has a tab
        assert await roster_frames(h, demo) == [{"quit": "ada"}]  # the demo's: per connection
        await second.disconnect()
        await h.settle()
        clock.jump(chat.ChatRoom.presence_grace + 1)
        assert await roster_frames(h, watcher) == [{"quit": "ada"}]


async def test_a_reload_within_the_grace_period_neither_quits_nor_joins(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(chat.app) as h:
        watcher = await joined(h, "watcher", presence=True)
        ada = await joined(h, "ada", presence=True)
        await roster_frames(h, watcher)
        await ada.disconnect()
        await h.settle()
        clock.jump(chat.ChatRoom.presence_grace / 2)
        await joined(h, "ada", presence=True)  # the reload
        clock.jump(chat.ChatRoom.presence_grace * 2)
        assert await roster_frames(h, watcher) == []


async def test_typing_is_relayed_to_presence_clients_only_and_never_stored(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(chat.app) as h:
        ada = await joined(h, "ada", presence=True)
        bob = await joined(h, "bob", presence=True)
        demo = await joined(h, "demo", presence=False)
        for client in (ada, bob, demo):
            await roster_frames(h, client)
        await ada.send(json.dumps({"typing": True}))
        await ada.send(json.dumps({"typing": True}))  # no change: not sent again
        assert await roster_frames(h, bob) == [{"typing": {"name": "ada", "typing": True}}]
        assert await roster_frames(h, demo) == []
        assert await roster_frames(h, ada) == []  # not to itself
        _, roster = await joining(h, "late", presence=True)
        assert {"typing": {"name": "ada", "typing": True}} in roster
        assert await roster_frames(h, bob) == [{"joined": "late"}]
        await ada.send(json.dumps({"message": "hi"}))  # sending a line clears it
        assert await roster_frames(h, bob) == [{"typing": {"name": "ada", "typing": False}}]
        response = await h.request("GET", "/api/room/p/history")
        assert "typing" not in response.body.decode()


async def test_a_room_with_presence_clients_hibernates_and_keeps_its_roster(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(chat.app) as h:
        ada = await joined(h, "ada", presence=True)
        await ada.send(json.dumps({"typing": True}))
        bob = await joined(h, "bob", presence=True)
        await roster_frames(h, bob)
        clock.jump(60)
        await h.settle()
        assert not h.is_active(chat.ChatRoom, "p")  # presence keeps nothing awake
        late, roster = await joining(h, "late", presence=True)  # wakes it: roster intact
        got = sorted(f["joined"] for f in roster + await roster_frames(h, late) if "joined" in f)
        assert got == ["ada", "bob", "late"]
