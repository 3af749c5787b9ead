"""The README's examples, run as written."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

import examples.proxy.app
from examples.counter.app import app
from examples.echo.app import app as echo_app
from rooms.testing import RoomsHarness
from runtime.config import Settings
from tests.support import start_server


async def test_counter() -> None:
    async with RoomsHarness(app) as rooms:
        alice = await rooms.connect("/counter/lobby")
        assert await alice.receive() == "0"
        await alice.send("+1")
        assert await alice.receive() == "1"
        response = await rooms.request("GET", "/counter/lobby")
        assert response.status == 426


async def test_counter_survives_a_restart(tmp_path: Path) -> None:
    for expected in ("0", "1"):
        async with RoomsHarness(app, data_dir=tmp_path) as rooms:
            bob = await rooms.connect("/counter/kept")
            assert await bob.receive() == expected
            await bob.send("+1")
            assert await bob.receive() == str(int(expected) + 1)


async def test_proxy(
    nursery: trio.Nursery, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream_port = await start_server(nursery, echo_app, settings)
    monkeypatch.setenv("UPSTREAM", f"ws://127.0.0.1:{upstream_port}/echo/{{topic}}")
    proxy = importlib.reload(examples.proxy.app)
    port = await start_server(nursery, proxy.app, settings.replace(data_dir=":memory:"))
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/feed/news?token=demo") as ws:
            await ws.send_message("via the proxy")
            assert await ws.get_message() == "via the proxy"
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/feed/news"):
                pass
        assert refused.value.status_code == 401
