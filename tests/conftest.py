"""Shared fixtures: free ports, an in-process server on a real socket."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio

from rooms import App
from runtime.config import Settings
from runtime.server import serve


@pytest.fixture
def settings(tmp_path: object) -> Settings:
    return Settings(host="127.0.0.1", port=0, data_dir=str(tmp_path))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started as processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def start_server(nursery: trio.Nursery, app: App, settings: Settings) -> int:
    """Serve ``app`` in ``nursery`` on a free loopback port; return the port."""
    port: int = await nursery.start(serve, app, settings)
    return port


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()
