"""Acknowledged writes survive ``kill -9`` of a real server process.

A client's acknowledgement is a message the room sent after its write: the output gate
releases it only once that write is durable. So whatever a client saw must still be there
after the process is killed with SIGKILL and started again on the same data folder: exactly
once, and with nothing missing before it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.support import REPO, kill_9, metric, server, wait_for_port

COUNTER_APP = """
import json

from rooms import App, Connection, Room


class Counter(Room):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "dump":
            items = await self.storage.list(prefix="item:")
            conn.send(json.dumps({"n": await self.storage.get("n", 0), "items": items}))
            return
        n = await self.storage.get("n", 0)
        self.storage.put("n", n + 1)
        self.storage.put(f"item:{n:06d}", message)
        conn.send(str(n + 1))


app = App()
app.room("/counter/{name}", Counter)
"""


async def dump(port: int) -> tuple[int, dict[str, str]]:
    """The counter room's ``n`` and its items, read back over a WebSocket."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}/counter/main") as ws:
        await ws.send_message("dump")
        data = json.loads(await ws.get_message())
    return data["n"], data["items"]


def counter_app(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "counterapp.py").write_text(COUNTER_APP)
    return folder


async def test_every_acknowledged_write_survives_kill_9(tmp_path: Path) -> None:
    """Killed after 1, then 7, then 13 more acknowledged writes: counts that no batching or
    commit period lines up with. Each restart must hold exactly what was acknowledged."""
    app_dir, data = counter_app(tmp_path), tmp_path / "data"
    acked = 0
    for writes in (1, 7, 13, 0):
        with server("counterapp:app", app_dir, data) as (proc, port):
            await wait_for_port(port, proc)
            with trio.fail_after(10):
                n, items = await dump(port)
            # each acknowledged write exactly once; nothing else was sent
            assert n == acked
            assert items == {f"item:{i:06d}": f"entry {i}" for i in range(acked)}
            if not writes:
                break
            with trio.fail_after(15), trio.CancelScope() as client:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/counter/main") as ws:
                    for i in range(acked, acked + writes):
                        await ws.send_message(f"entry {i}")
                        assert await ws.get_message() == str(i + 1)
                    kill_9(proc)  # at once: no time for anything to reach the disk later
                    client.cancel()  # drop the client: there is nobody to close with
            acked += writes
    assert acked == 21


async def test_pipelined_writes_none_acknowledged_is_lost(tmp_path: Path) -> None:
    app_dir, data = counter_app(tmp_path), tmp_path / "data"
    acks = 0
    with server("counterapp:app", app_dir, data) as (proc, port):
        await wait_for_port(port, proc)
        with trio.fail_after(20), trio.CancelScope() as client:
            async with (
                open_websocket_url(f"ws://127.0.0.1:{port}/counter/main") as ws,
                trio.open_nursery() as nursery,
            ):

                async def send_all() -> None:
                    for i in range(200):
                        await ws.send_message(f"entry {i}")

                nursery.start_soon(send_all)  # 200 writes in flight, no waiting for acks
                while acks < 100:
                    assert await ws.get_message() == str(acks + 1)
                    acks += 1
                kill_9(proc)  # mid-stream: later writes may or may not have committed
                # Drop the client without a close handshake: trio-websocket 0.12 can hang in
                # its close when the peer died while acks were still queued unread.
                client.cancel()

    with server("counterapp:app", app_dir, data) as (proc, port):
        await wait_for_port(port, proc)
        with trio.fail_after(10):
            n, items = await dump(port)
    # every acknowledged write is there; what is there is contiguous, in order, whole
    assert acks <= n <= 200
    assert items == {f"item:{i:06d}": f"entry {i}" for i in range(n)}


async def chat_join(ws: WebSocketConnection, name: str) -> list[dict[str, Any]]:
    await ws.send_message(json.dumps({"name": name}))
    frames: list[dict[str, Any]] = []
    while not frames or "ready" not in frames[-1]:
        frames.append(json.loads(await ws.get_message()))
    return frames


async def test_chat_history_survives_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked: list[dict[str, Any]] = []
    with server("examples.chat.app:app", REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        url = f"ws://127.0.0.1:{port}/api/room/durable/websocket"
        with trio.fail_after(15), trio.CancelScope() as client:
            async with open_websocket_url(url) as ws:
                await chat_join(ws, "alice")
                for i in range(4):  # within the default rate limiter's burst
                    await ws.send_message(json.dumps({"message": f"m{i}"}))
                    entry = json.loads(await ws.get_message())
                    assert entry["message"] == f"m{i}", entry
                    acked.append(entry)  # its broadcast is the acknowledgement
                kill_9(proc)
                client.cancel()
    assert [e["seq"] for e in acked] == [1, 2, 3, 4]

    with server("examples.chat.app:app", REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        url = f"ws://127.0.0.1:{port}/api/room/durable/websocket"
        with trio.fail_after(10):
            async with open_websocket_url(url) as ws:
                # the history holds each acknowledged message once, unchanged
                assert await chat_join(ws, "bob") == [
                    *acked,
                    {"joined": "bob"},
                    {"ready": True, "seq": 4},
                ]
                await ws.send_message(json.dumps({"message": "after"}))
                after = json.loads(await ws.get_message())
    assert after["seq"] == 5  # the sequence continues
    assert after["timestamp"] > acked[-1]["timestamp"]


LOAD_APP = """
from examples.chat.app import RateLimiter, app

RateLimiter.grace = 1e9  # every test client is 127.0.0.1: no rate limit under load
"""


async def test_chat_under_load_nothing_seen_is_lost_or_duplicated_after_kill_9(
    tmp_path: Path,
) -> None:
    """12 clients in 4 rooms each keep 3 messages in flight (sending the next one as soon as
    one of theirs comes back); the server is killed (SIGKILL) mid-stream. After a restart
    each room's history holds every message any client saw, once, unchanged, and its
    sequence numbers have no gap."""
    app_dir, data = tmp_path / "app", tmp_path / "data"
    app_dir.mkdir()
    (app_dir / "chatload.py").write_text(LOAD_APP)
    rooms, per_room, per_client, window = 4, 3, 30, 3
    seen: dict[str, dict[int, dict[str, Any]]] = {f"load-{r}": {} for r in range(rooms)}
    enough = trio.Event()  # a third of all messages seen: time to kill

    async def client(port: int, room: str, name: str) -> None:
        url = f"ws://127.0.0.1:{port}/api/room/{room}/websocket"
        async with open_websocket_url(url) as ws:
            await chat_join(ws, name)
            sent = 0
            for sent in range(window):
                await ws.send_message(json.dumps({"message": f"{name} #{sent}"}))
            while True:
                entry = json.loads(await ws.get_message())
                if "message" not in entry:
                    continue
                seen[room][entry["seq"]] = entry
                if sum(map(len, seen.values())) >= rooms * per_room * per_client // 3:
                    enough.set()
                if entry["name"] == name and sent + 1 < per_client:
                    sent += 1
                    await ws.send_message(json.dumps({"message": f"{name} #{sent}"}))

    with server("chatload:app", app_dir, data) as (proc, port):
        await wait_for_port(port, proc)
        with trio.fail_after(30), trio.CancelScope() as clients:
            async with trio.open_nursery() as nursery:
                for r in range(rooms):
                    for c in range(per_room):
                        nursery.start_soon(client, port, f"load-{r}", f"r{r}c{c}")
                await enough.wait()
                kill_9(proc)
                clients.cancel()
    assert all(seen.values())  # every room had acknowledged messages at the kill

    with server("chatload:app", app_dir, data) as (proc, port):
        await wait_for_port(port, proc)
        for room, entries in seen.items():
            with trio.fail_after(10):
                url = f"ws://127.0.0.1:{port}/api/room/{room}/websocket"
                async with open_websocket_url(url) as ws:
                    history = [e for e in await chat_join(ws, "checker") if "message" in e]
            assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
            texts = [e["message"] for e in history]
            assert len(texts) == len(set(texts)), "a message was stored twice"
            stored = {e["seq"]: e for e in history}
            assert all(stored.get(seq) == entry for seq, entry in entries.items())


async def test_an_alarm_survives_kill_9_and_fires_when_the_server_is_back(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The game sets an alarm when its last player leaves; the server is killed before it
    is due and comes back after: the alarm fires as the server starts."""
    monkeypatch.setenv("GAME_ABANDON_SECONDS", "1")
    data = tmp_path / "data"
    with server("examples.game.app:app", REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        with trio.fail_after(10):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/game/kill") as ws:
                await ws.send_message(json.dumps({"join": "ann"}))
                while "state" not in json.loads(await ws.get_message()):
                    pass
            # The close (and its alarm) reached the room once the watcher sees no player.
            async with open_websocket_url(f"ws://127.0.0.1:{port}/game/kill") as watcher:
                await watcher.send_message("{}")  # answered after the close was handled
                while "error" not in json.loads(await watcher.get_message()):
                    pass
            assert await metric(port, "alarms_fired_total") == 0
        kill_9(proc)
    await trio.sleep(1.5)  # the alarm comes due while the server is down
    with server("examples.game.app:app", REPO, data) as (proc, port):
        await wait_for_port(port, proc)
        with trio.fail_after(10):
            while await metric(port, "alarms_fired_total") == 0:  # noqa: ASYNC110 - polling
                await trio.sleep(0.05)
            assert await metric(port, "room_activations_total") == 1  # started by its alarm
