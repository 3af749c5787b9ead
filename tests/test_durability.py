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

from .conftest import REPO, kill_9, server, wait_for_port

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
    app_dir, data = counter_app(tmp_path), tmp_path / "data"
    acks = 0
    with server("counterapp:app", app_dir, data) as (proc, port):
        await wait_for_port(port, proc)
        with trio.fail_after(15), trio.CancelScope() as client:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/counter/main") as ws:
                for i in range(30):
                    await ws.send_message(f"entry {i}")
                    assert await ws.get_message() == str(i + 1)
                    acks += 1
                kill_9(proc)  # at once: no time for anything to reach the disk later
                client.cancel()  # drop the client: there is nobody to close with
    assert acks == 30

    with server("counterapp:app", app_dir, data) as (proc, port):
        await wait_for_port(port, proc)
        with trio.fail_after(10):
            n, items = await dump(port)
    # each acknowledged write exactly once; nothing else was sent
    assert n == acks
    assert items == {f"item:{i:06d}": f"entry {i}" for i in range(acks)}


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
    while not frames or frames[-1] != {"ready": True}:
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
                    {"ready": True},
                ]
                await ws.send_message(json.dumps({"message": "after"}))
                after = json.loads(await ws.get_message())
    assert after["seq"] == 5  # the sequence continues
    assert after["timestamp"] > acked[-1]["timestamp"]
