"""The live admin page (``runtime.admin``) over real sockets: who may open it and its
WebSocket, and what the WebSocket pushes (a snapshot a second, with rates that move when
traffic flows). The page itself in Chromium: tests/system/test_browser.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from examples.echo.app import EchoRoom
from examples.echo.app import app as echo_app
from rooms import App, Connection, Request
from runtime.config import Settings
from tests.support import raw_request, start_server

FORWARDED = "x-forwarded-for: 203.0.113.9\r\n"  # a client elsewhere, behind a trusted proxy


async def get(port: int, path: str, extra: str = "") -> tuple[int, bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nconnection: close\r\n{extra}\r\n"
    head, _, body = (await raw_request(port, request.encode())).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def snapshot(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def test_the_page_and_its_live_socket_from_loopback_without_a_token(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings)
    status, body = await get(port, "/_rooms/admin")
    assert status == 200 and b"/_rooms/admin/live" in body
    async with open_websocket_url(f"ws://127.0.0.1:{port}/_rooms/admin/live") as live:
        await live.send_message("")
        first = await snapshot(live)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/a") as client:
            for _ in range(5):
                await client.send_message("hello")
                assert await client.get_message() == "hello"
            second = await snapshot(live)
        assert second["time"] - first["time"] == pytest.approx(1.0, abs=0.5)
        moved = second["metrics"]["messages_in_total"] - first["metrics"]["messages_in_total"]
        assert moved == 5
        assert second["metrics"]["websockets_open"] == 2  # the client and this page
        assert second["usage"]["bytes_out"] > first["usage"]["bytes_out"]
        assert second["event_ms"]["p99"] is not None  # the echo's events in that second
        third = await snapshot(live)
        assert third["close_codes"] == {"1000": 1}  # the client's, in the last hour
        assert third["usage"]["closed"] == 1
        assert third["usage"]["websockets"] == 1  # (the page's own socket is not traffic)


async def test_from_elsewhere_the_page_needs_a_token_and_the_socket_asks_for_it(
    nursery: trio.Nursery, settings: Settings
) -> None:
    open_ = settings.replace(trusted_proxies=("127.0.0.1",))
    port = await start_server(nursery, echo_app, open_)
    assert (await get(port, "/_rooms/admin", FORWARDED))[0] == 403
    assert (await get(port, "/_rooms/metrics", FORWARDED))[0] == 403

    guarded = settings.replace(admin_token="s3cret", data_dir=":memory:")
    port = await start_server(nursery, echo_app, guarded)
    assert (await get(port, "/_rooms/admin"))[0] == 200  # the page holds no data
    url = f"ws://127.0.0.1:{port}/_rooms/admin/live"
    async with open_websocket_url(url) as live:
        await live.send_message("guess")
        with pytest.raises(ConnectionClosed) as closed:
            await snapshot(live)
        assert closed.value.reason is not None and closed.value.reason.code == 4401
    async with open_websocket_url(url) as live:
        await live.send_message("s3cret")
        assert "websockets_open" in (await snapshot(live))["metrics"]


class Sleepy(EchoRoom):
    """Hibernates at once when idle; sets an alarm for an hour when asked."""

    hibernate_after = 0.2

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "alarm":
            self.set_alarm(self.now() + 3600)
            self.storage.put("note", "x" * 1000)
        conn.send(message)


async def test_finding_rooms_by_class_name_and_traffic(
    nursery: trio.Nursery, settings: Settings
) -> None:
    app = App()
    app.room("/echo/{name}", EchoRoom)
    app.room("/sleepy/{name}", Sleepy)
    port = await start_server(nursery, app, settings)
    url = f"ws://127.0.0.1:{port}"

    async def rooms(query: str = "") -> dict[str, Any]:
        status, body = await get(port, f"/_rooms/admin/rooms{query}")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    async with (
        open_websocket_url(f"{url}/echo/quiet") as quiet,
        open_websocket_url(f"{url}/echo/busy") as busy,
        open_websocket_url(f"{url}/echo/busy") as busy_too,
        open_websocket_url(f"{url}/sleepy/dozing") as dozing,
    ):
        for ws, times in ((quiet, 1), (busy, 10), (busy_too, 1), (dozing, 1)):
            for _ in range(times):
                await ws.send_message("x" * 100)
                await ws.get_message()
        await dozing.send_message("alarm")
        await dozing.get_message()
        await trio.sleep(0.6)  # the sleepy room hibernates, its client still connected
        by_connections = await rooms()
        assert by_connections["total"] == 3
        assert by_connections["rooms"][0]["name"] == "busy"
        busiest = (await rooms("?sort=traffic"))["rooms"][0]
        assert (busiest["name"], busiest["connections"], busiest["messages_in"]) == ("busy", 2, 11)
        assert busiest["bytes_out"] > 1000 and busiest["state"] == "live"
        [sleepy] = (await rooms("?class=Sleepy"))["rooms"]
        assert (sleepy["name"], sleepy["connections"]) == ("dozing", 1)
        assert sleepy["state"] == "hibernated"
        assert 3500 < sleepy["alarm"] - time.time() <= 3600  # in an hour (seconds since epoch)
        assert [r["name"] for r in (await rooms("?q=QUI"))["rooms"]] == ["quiet"]
        assert (await rooms("?limit=1&offset=1"))["total"] == 3
        assert len((await rooms("?limit=1&offset=1"))["rooms"]) == 1
        assert (await get(port, "/_rooms/admin/rooms?sort=size"))[0] == 400
        largest = (await rooms("?sort=stored"))["rooms"]
        assert (largest[0]["name"], largest[0]["stored_keys"]) == ("dozing", 1)
        assert largest[0]["stored_bytes"] > 1000 and largest[1]["stored_bytes"] == 0


class Noted(EchoRoom):
    """Tags its clients, keeps a little state per connection and writes two keys."""

    hibernate_after = None

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.tags.add("player")
        conn.state = {"score": 7}
        self.storage.put("config:colour", "blue")
        self.storage.put("log:1", "x" * 500)


async def test_a_rooms_page_and_the_operators_actions_run_in_its_order(
    nursery: trio.Nursery, settings: Settings, tmp_path: Path
) -> None:
    app = App()
    app.room("/noted/{name}", Noted)
    usage_log = tmp_path / "usage.jsonl"
    port = await start_server(nursery, app, settings.replace(usage_log=str(usage_log)))
    url = f"ws://127.0.0.1:{port}/noted/table"

    async def post(body: dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(body)
        request = (
            f"POST /_rooms/admin/room HTTP/1.1\r\nHost: x\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n{data}"
        )
        head, _, answer = (await raw_request(port, request.encode())).partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(answer) if answer.startswith(b"{") else answer

    async with open_websocket_url(url) as first, open_websocket_url(url) as second:
        await first.send_message("hi")
        assert await first.get_message() == "hi"
        status, body = await get(port, "/_rooms/admin/rooms?q=table")
        key = json.loads(body)["rooms"][0]["key"]
        status, body = await get(port, f"/_rooms/admin/room?key={key}&prefix=config:")
        assert status == 200, body
        room = json.loads(body)
        assert [entry["key"] for entry in room["storage"]] == ["config:colour"]
        assert room["storage"][0]["value"] == '"blue"'
        assert room["stored_keys"] == 2 and room["stored_bytes"] > 500
        [one, two] = sorted(room["connections"], key=lambda c: c["messages_in"])
        assert (two["messages_in"], two["tags"], two["client"]) == (1, ["player"], "127.0.0.1")
        assert one["state_bytes"] > 0 and one["since"] > 0
        _, body = await get(port, f"/_rooms/admin/room?key={key}&prefix=log:")
        assert json.loads(body)["storage"][0]["value"].endswith("…")  # cut at 200

        # A GET never acts, whatever it asks: the next thing the clients get is the POST's.
        acting = f"/_rooms/admin/room?key={key}&action=notice&text=not+sent"
        assert (await get(port, acting))[0] == 200
        status, done = await post({"key": key, "action": "notice", "text": "closing soon"})
        assert status == 200 and done["result"] == "notice sent to 2 connections"
        for ws in (first, second):
            assert json.loads(await ws.get_message()) == {"notice": "closing soon"}
        status, done = await post(
            {"key": key, "action": "close", "connection": one["id"], "code": 4000, "reason": "bye"}
        )
        assert status == 200, done
        codes = []
        for ws in (first, second):
            with trio.move_on_after(2):
                try:
                    await ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    codes.append((exc.reason.code, exc.reason.reason))
        assert codes == [(4000, "bye")]
        assert (await post({"key": key, "action": "fly"}))[0] == 400
        assert (await post({"key": key, "action": "close", "connection": "x", "code": 1005}))[
            0
        ] == 400
        assert (await post({"key": "Noted/" + "0" * 64, "action": "evict"}))[0] == 404
    audits = [json.loads(line) for line in usage_log.read_text().splitlines() if '"audit"' in line]
    assert [a["audit"]["action"] for a in audits] == ["notice", "close"]
    assert (
        audits[1]["audit"]["connection"] == one["id"] and audits[1]["audit"]["who"] == "127.0.0.1"
    )
