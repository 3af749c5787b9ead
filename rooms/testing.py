"""Test rooms in process: the real engine (host, routing, storage), fake connections.

    from rooms.testing import RoomsHarness

    async def test_chat():
        async with RoomsHarness(app) as rooms:
            alice = await rooms.connect("/room/lobby")
            await alice.send("hello")
            assert await alice.receive() == "hello"
            response = await rooms.request("GET", "/api/stats")

No sockets are opened. Storage is SQLite in memory, or in ``data_dir`` to test restarts
(open a second harness on the same folder, or call ``simulate_restart()``).

Time: alarms, timers, hibernation and unloading follow trio's clock, so a test run with a
virtual clock (``virtual_clock()``, or pytest-trio's ``mock_clock`` fixture with an
``autojump_threshold``) sees an hour pass in an instant::

    async def test_abandoned_game_closes(mock_clock):
        mock_clock.autojump_threshold = 0.01
        async with RoomsHarness(app) as rooms:
            ...
            await trio.sleep(3600)  # instant Everything the engine guarantees over real
sockets holds here too: the same host runs the rooms and the same router answers requests.
This module drives the engine through its public entry points; it is the one part of the
SDK that imports ``runtime``.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from types import TracebackType

import trio
import trio.testing

from runtime.config import Settings
from runtime.edge import Edge
from runtime.frames import Close, FrameParser
from runtime.host import Host, Peer
from runtime.metrics import Metrics
from runtime.server import database_path
from runtime.storage import SqliteBackend

from ._app import App, ProxyRoute
from ._http import Request, Response
from ._ids import RoomId
from ._room import Room, Stub


class HandshakeRejected(Exception):
    """``connect`` was answered with an HTTP response instead of joining a room."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"{response.status}: {response.body.decode(errors='replace').strip()}")
        self.response = response


class ConnectionClosed(Exception):
    """The server closed this fake connection (``code``, ``reason``)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed: {code} {reason}")
        self.code = code
        self.reason = reason


class FakeClient:
    """A WebSocket client of a room, without a socket. ``received`` lists every message the
    server sent so far; ``close_code``/``close_reason`` are set once the server closed it."""

    def __init__(self, harness: RoomsHarness) -> None:
        self._harness = harness
        self._parser = FrameParser(max_message_size=1 << 40, client=True)
        self._inbox: deque[str | bytes] = deque()
        self._arrived = trio.Event()
        self._peer: Peer | None = None
        self.received: list[str | bytes] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = False

    # -- Transport: called by the engine -------------------------------------------------

    def write(self, frame: bytes, messages: int = 1) -> None:
        if self.closed:
            return
        for item in self._parser.feed(frame):
            if isinstance(item, (str, bytes)):
                self._inbox.append(item)
                self.received.append(item)
            elif isinstance(item, Close):
                self.close(item.code or 1005, item.reason)
        self._arrived.set()

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code, self.close_reason = code, reason
        self._arrived.set()
        if self._peer is not None:
            self._harness._host.disconnected(self._peer, code, reason)

    # -- the client's side ---------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        """Send a message to the room (waits while the room's mailbox is full)."""
        if self.closed or self._peer is None:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        await self._harness._host.received(self._peer, message)

    async def receive(self, timeout: float = 5.0) -> str | bytes:
        """The next message from the server; ConnectionClosed once closed and drained."""
        with trio.fail_after(timeout):
            while not self._inbox:
                if self.closed:
                    raise ConnectionClosed(self.close_code or 1006, self.close_reason)
                self._arrived = trio.Event()
                await self._arrived.wait()
        return self._inbox.popleft()

    def drain(self) -> list[str | bytes]:
        """Take every message that arrived and was not received yet (to wait for what
        comes next, not what is queued)."""
        queued = list(self._inbox)
        self._inbox.clear()
        return queued

    async def disconnect(self, code: int = 1000, reason: str = "") -> None:
        """Close from the client's side, as a Close frame would."""
        if self.closed:
            return
        self.closed = True
        self.close_code, self.close_reason = code, reason
        if self._peer is not None:
            self._harness._host.disconnected(self._peer, code, reason)
        await trio.lowlevel.checkpoint()

    @property
    def id(self) -> str:
        """The connection id the room sees."""
        assert self._peer is not None
        return self._peer.conn.id


class RoomsHarness:
    """Runs an app (or bare room classes) in process. Use as ``async with``."""

    def __init__(
        self,
        app: App | None = None,
        *,
        data_dir: str | Path | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.app = app or App()
        self.settings = (settings or Settings()).replace(
            data_dir=str(data_dir) if data_dir is not None else ":memory:"
        )
        self.metrics = Metrics()

    async def __aenter__(self) -> RoomsHarness:
        self._backend = SqliteBackend(database_path(self.settings), self.settings.synchronous)
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._clients: list[FakeClient] = []
        await self._start_host()
        return self

    async def _start_host(self) -> None:
        """A host and router over the harness's storage, as a server process has."""
        self._host_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Host]) -> None:
            with self._host_scope:
                async with trio.open_nursery() as nursery:
                    host = Host(
                        self._backend, self.settings, self.metrics, nursery, self.app.room_classes()
                    )
                    task_status.started(host)

        self._host: Host = await self._nursery.start(run)
        self._edge = Edge(self.app, self.settings, self._host, self.metrics)

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
                await self._backend.aclose()

    async def connect(
        self,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        client: tuple[str, int] = ("127.0.0.1", 50000),
    ) -> FakeClient:
        """Open a WebSocket to ``path`` through the app's routes and upgrade-time rules
        (``allowed_origins``, ``on_before_connect``); HandshakeRejected if the app answers
        with an HTTP response instead."""
        target, _, query = path.partition("?")
        request = Request(
            "GET", target, query, list(headers or []), b"", client, stub_factory=self._host.stub
        )
        answer = await self._edge.route(request, upgrade=True)
        if isinstance(answer, ProxyRoute):
            raise TypeError(f"{path} is a proxied route: test it against a real server")
        if not isinstance(answer, Response):  # the upgrade-time rules, as at a real edge
            answer = await self._edge.admission.admit(request, answer[0]) or answer
        if isinstance(answer, Response):
            raise HandshakeRejected(answer)
        fake = FakeClient(self)
        self._clients.append(fake)
        peer = self._host.attach(answer[0], answer[1], fake, request)
        if peer is None:
            raise HandshakeRejected(Response.text("room is full", 503))
        fake._peer = peer
        await self._host.connected(peer)
        return fake

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        """A plain HTTP request through the app's routes."""
        target, _, query = path.partition("?")
        data = body.encode() if isinstance(body, str) else body
        request = Request(
            method.upper(), target, query, list(headers or []), data, stub_factory=self._host.stub
        )
        answer = await self._edge.route(request, upgrade=False)
        assert isinstance(answer, Response)
        return answer

    def stub(self, room_class: type[Room], room: str | RoomId) -> Stub:
        """A stub to call a room's methods from the test."""
        return self._host.stub(room_class, room)

    def now(self) -> float:
        """Seconds since the epoch as rooms see them (``Room.now``): virtual time included."""
        return self._host.now()

    def is_active(self, room_class: type[Room], room: str | RoomId) -> bool:
        """Whether that room is in memory now (not hibernated, not unloaded)."""
        return self._host.is_active(room_class, _room_id(room))

    async def force_hibernate(self, room_class: type[Room], room: str | RoomId) -> None:
        """Take that room out of memory now, as if it had been idle for ``hibernate_after``:
        its connections stay open with their state and tags; its next event starts it again
        (``on_start`` first). Its queued events are handled first."""
        await self._leave_memory(room_class, room, hibernate=True)

    async def force_evict(self, room_class: type[Room], room: str | RoomId) -> None:
        """Take that room out of memory now, as the bound on rooms in memory would (with
        connections it hibernates; without, it is unloaded)."""
        await self._leave_memory(room_class, room, hibernate=False)

    async def _leave_memory(
        self, room_class: type[Room], room: str | RoomId, hibernate: bool
    ) -> None:
        await self.settle()
        act = self._host.live_activation(room_class, _room_id(room))
        if act is None or not act.running:
            return
        if hibernate and not act.peers:
            raise ValueError(f"room {act.label} has no connections: use force_evict")
        act.evict()
        with trio.fail_after(5):
            while act.running:  # noqa: ASYNC110 - the host has no event for this
                await trio.sleep(0.001)

    async def simulate_restart(self) -> None:
        """Restart the server over the same storage: every room leaves memory, every
        connection drops (clients see 1006), and the rooms start again on demand; alarms
        are loaded again and one that came due meanwhile fires. Events already handled are
        durable first (``settle``)."""
        await self.settle()
        for client in self._clients:
            if not client.closed:
                client.closed = True
                client.close_code, client.close_reason = 1006, ""
                client._arrived.set()
        self._clients.clear()
        self._host_scope.cancel()
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        await self._start_host()

    async def settle_events(self) -> None:
        """Wait until every task is blocked (events handled as far as they can go), without
        waiting for storage commits."""
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every room has handled its queued events and its commits are durable."""
        with trio.fail_after(timeout):
            while True:
                await trio.testing.wait_all_tasks_blocked(cushion=0.001)
                if self._host.idle():
                    return
                await trio.sleep(0.001)


def virtual_clock() -> trio.testing.MockClock:
    """A clock for ``trio.run(..., clock=virtual_clock())``: time jumps ahead whenever every
    task has waited 10 ms of real time, so alarms, timers and hibernation come at once.
    (The threshold lets storage, which runs in a thread, answer before time jumps.)"""
    return trio.testing.MockClock(autojump_threshold=0.01)


def _room_id(room: str | RoomId) -> RoomId:
    return room if isinstance(room, RoomId) else RoomId.from_name(room)


__all__ = ["ConnectionClosed", "FakeClient", "HandshakeRejected", "RoomsHarness", "virtual_clock"]
