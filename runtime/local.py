"""The engine in process, for ``rooms.testing``: the server's own assembly, without sockets.

``LocalServer`` runs what ``rooms serve`` runs (``server.run_engine``: the same host, router,
upgrade-time rules and storage) and reaches it through the edge's own entry points: a fake
connection is routed by ``Router.route``, checked by ``Edge.upgrade`` (the handshake, the
rules) and joins by ``Edge.join``, exactly as a socket's upgrade does, with a fake transport
in place of the socket. This module is the only part of ``runtime`` that ``rooms.testing``
imports (``tests/test_layers.py`` pins it).
"""

from __future__ import annotations

import base64
import os
from types import TracebackType

import trio
import trio.testing

from rooms import App, Request, Response, Room, RoomId, Stub
from rooms._engine import ProxyRoute, room_id_of

from .activation import Peer
from .config import Settings
from .edge import Edge
from .frames import Close, FrameParser
from .gate import Transport
from .http import sendable
from .metrics import Metrics
from .server import open_backend, run_engine
from .storage import jobs_in_flight

__all__ = [
    "Close",
    "FrameParser",
    "LocalServer",
    "Peer",
    "Settings",
    "Transport",
    "storage_busy",
]


def storage_busy() -> bool:
    """Whether any storage job of this trio run is still with a backend's thread."""
    return jobs_in_flight()[0] > 0


class LocalServer:
    """One app's engine in process (``async with``). ``metrics`` are its counters."""

    def __init__(self, app: App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.metrics = Metrics()

    async def __aenter__(self) -> LocalServer:
        self.backend = open_backend(self.settings)
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            with trio.CancelScope(shield=True):
                await self.backend.aclose()

    async def _start(self) -> None:
        self._engine_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Edge]) -> None:
            with self._engine_scope:
                await run_engine(
                    self.app, self.settings, self.backend, self.metrics, task_status=task_status
                )

        self.edge: Edge = await self._nursery.start(run)

    async def restart(self) -> None:
        """Stop the engine (rooms leave memory, connections drop) and start a new one over
        the same storage, as a server process started again would."""
        self._engine_scope.cancel()
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        await self._start()

    # -- what clients do -----------------------------------------------------------------

    async def connect(
        self, path: str, headers: list[tuple[str, str]], client: tuple[str, int], fake: Transport
    ) -> Peer | Response:
        """Upgrade to ``path`` as a socket would, with ``fake`` as the connection: the peer
        in its room, or the response that refused it."""
        edge = self.edge
        request = self._request("GET", path, [*headers, *_upgrade_headers()], b"", client)
        routed = await edge.router.route(request, upgrade=True)
        if isinstance(routed, Response):
            return routed
        if isinstance(routed, ProxyRoute):
            raise TypeError(f"{path} is a proxied route: test it against a real server")
        upgrade = await edge.upgrade(request, b"1.1", False, routed)
        if isinstance(upgrade, Response):
            return upgrade
        joined = await edge.join(upgrade, fake, _discard)
        assert isinstance(joined, (Peer, Response))  # (a room route, embedded mode)
        return joined

    async def request(
        self, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> Response:
        """A plain HTTP request, routed as the server routes it."""
        request = self._request(method.upper(), path, headers, body, ("127.0.0.1", 0))
        answer = await self.edge.router.route(request, upgrade=False)
        assert isinstance(answer, Response)
        return sendable(answer, request)[0]  # what the server would send: one check for both

    def _request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        client: tuple[str, int],
    ) -> Request:
        target, _, query = path.partition("?")
        return Request(
            method, target, query, headers, body, client, stub_factory=self.edge.host.stub
        )

    # -- the rooms -----------------------------------------------------------------------

    def stub(self, room_class: type[Room], room: str | RoomId) -> Stub:
        return self.edge.host.stub(room_class, room)

    def now(self) -> float:
        return self.edge.host.now()

    def in_memory(self, room_class: type[Room], room: str | RoomId) -> bool:
        return self.edge.host.in_memory(room_class, room_id_of(room))

    async def leave_memory(
        self, room_class: type[Room], room: str | RoomId, hibernate: bool
    ) -> None:
        """Take that room out of memory now, after its queued events (see RoomsHarness)."""
        await self.settle()
        act = self.edge.host.known_activation(room_class, room_id_of(room))
        if act is None or not act.running:
            return
        if hibernate and not act.peers:
            raise ValueError(f"room {act.label} has no connections: use force_evict")
        act.evict()
        with trio.fail_after(5):
            while act.running:  # noqa: ASYNC110 - the host has no event for this
                await trio.sleep(0.001)

    async def settle(self, timeout: float = 5.0) -> None:
        """Until every room has handled its queued events and its commits are durable."""
        host = self.edge.host
        with trio.fail_after(timeout):
            while True:
                await trio.testing.wait_all_tasks_blocked(cushion=0.001)
                if host.idle():
                    return
                await host.wait_idle()


def _upgrade_headers() -> list[tuple[str, str]]:
    """What a WebSocket client's upgrade request carries, so the same checks pass."""
    key = base64.b64encode(os.urandom(16)).decode()
    return [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", key),
    ]


async def _discard(data: bytes) -> None:
    """A fake connection's 101 goes nowhere."""
