"""The live admin page (``runtime.admin``) over real sockets: who may open it and its
WebSocket, and what the WebSocket pushes (a snapshot a second, with rates that move when
traffic flows). The page itself in Chromium: tests/system/test_browser.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from examples.echo.app import app as echo_app
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
