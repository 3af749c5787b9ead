"""Test rooms in process: the real engine (host, routing, storage), fake connections.

    from rooms.testing import RoomsHarness

    async def test_chat():
        async with RoomsHarness(app) as rooms:
            alice = await rooms.connect("/room/lobby")
            await alice.send("hello")
            assert await alice.receive() == "hello"
            response = await rooms.request("GET", "/api/stats")

No sockets are opened. Storage is SQLite in memory, or in ``data_dir`` to test restarts
(open a second harness on the same folder, or call ``simulate_restart()``). ``settings``
takes a ``Settings`` (re-exported here) for the limits and timeouts to test.

Time: alarms, timers, hibernation and unloading follow trio's clock, so a test run on a
virtual clock (``virtual_clock()``, returned from a fixture) sees an hour pass in an instant:

    @pytest.fixture
    def clock():
        return virtual_clock()

    async def test_abandoned_game_closes(clock):
        async with RoomsHarness(app) as rooms:
            ...
            await trio.sleep(3600)  # instant

Everything the engine guarantees over real sockets holds here too: the harness runs the
server's own assembly, and a connection is routed, checked against the upgrade-time rules
and joins its room through the same entry points as a socket's upgrade
(``runtime.local``, the one part of the engine this module imports).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from types import TracebackType

import trio
import trio.testing

from runtime.local import Close, FrameParser, LocalServer, Peer, Settings, storage_busy

from ._app import App
from ._http import Response
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
            self._peer.end(code, reason)

    # -- the client's side ---------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        """Send a message to the room (waits while the room's mailbox is full)."""
        if self.closed or self._peer is None:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        await self._peer.deliver(message)

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
            self._peer.end(code, reason)
        await trio.lowlevel.checkpoint()

    def _dropped(self) -> None:
        """The server went away without a Close (a simulated restart): 1006."""
        if not self.closed:
            self.closed = True
            self.close_code, self.close_reason = 1006, ""
            self._arrived.set()

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
        self._server = LocalServer(self.app, self.settings)
        self.metrics = self._server.metrics
        self._clients: list[FakeClient] = []

    async def __aenter__(self) -> RoomsHarness:
        await self._server.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._server.__aexit__(exc_type, exc, tb)

    async def connect(
        self,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        client: tuple[str, int] = ("127.0.0.1", 50000),
    ) -> FakeClient:
        """Open a WebSocket to ``path`` through the app's routes and upgrade-time rules
        (``allowed_origins``, ``on_before_connect``); HandshakeRejected if the app answers
        with an HTTP response instead."""
        fake = FakeClient(self)
        joined = await self._server.connect(path, list(headers or []), client, fake)
        if isinstance(joined, Response):
            raise HandshakeRejected(joined)
        fake._peer = joined
        self._clients.append(fake)
        return fake

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        """A plain HTTP request through the app's routes."""
        data = body.encode() if isinstance(body, str) else body
        return await self._server.request(method, path, data, list(headers or []))

    def stub(self, room_class: type[Room], room: str | RoomId) -> Stub:
        """A stub to call a room's methods from the test."""
        return self._server.stub(room_class, room)

    def now(self) -> float:
        """Seconds since the epoch as rooms see them (``Room.now``): virtual time included."""
        return self._server.now()

    def is_active(self, room_class: type[Room], room: str | RoomId) -> bool:
        """Whether that room is in memory now (not hibernated, not unloaded)."""
        return self._server.in_memory(room_class, room)

    async def force_hibernate(self, room_class: type[Room], room: str | RoomId) -> None:
        """Take that room out of memory now, as if it had been idle for ``hibernate_after``:
        its connections stay open with their state and tags; its next event starts it again
        (``on_start`` first). Its queued events are handled first."""
        await self._server.leave_memory(room_class, room, hibernate=True)

    async def force_evict(self, room_class: type[Room], room: str | RoomId) -> None:
        """Take that room out of memory now, as the bound on rooms in memory would (with
        connections it hibernates; without, it unloads)."""
        await self._server.leave_memory(room_class, room, hibernate=False)

    async def simulate_restart(self) -> None:
        """Restart the server over the same storage: every room leaves memory, every
        connection drops (clients see 1006), and the rooms start again on demand; alarms
        are loaded again and one that came due meanwhile fires. Events already handled are
        durable first (``settle``)."""
        await self.settle()
        for client in self._clients:
            client._dropped()
        self._clients.clear()
        await self._server.restart()

    async def settle_events(self) -> None:
        """Wait until every task is blocked (events handled as far as they can go), without
        waiting for storage commits."""
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every room has handled its queued events and its commits are durable."""
        await self._server.settle(timeout)


def virtual_clock() -> trio.testing.MockClock:
    """A clock for ``trio.run(..., clock=virtual_clock())`` (or return it from a pytest
    fixture: pytest-trio runs the test on it): time jumps ahead whenever every task has
    waited 10 ms of real time and no storage work is in flight, so alarms, timers and
    hibernation come at once and never overtake the disk.

    A read or commit runs in the storage writer, and on a busy machine it can take longer
    than any wall-time threshold: a jump meanwhile would let a deadline pass "during" it. So
    the clock's jump is skipped while storage work is in flight (trio's run loop asks again
    after the next idle threshold). ``MockClock`` is final; its jump is wrapped on the
    instance (``tests/rooms/test_testing.py`` pins that this keeps working)."""
    clock = trio.testing.MockClock(autojump_threshold=0.01)
    jump = clock._autojump

    def jump_unless_storage_is_busy() -> None:
        if not storage_busy():
            jump()

    clock._autojump = jump_unless_storage_is_busy  # type: ignore[method-assign]
    return clock


__all__ = [
    "ConnectionClosed",
    "FakeClient",
    "HandshakeRejected",
    "RoomsHarness",
    "Settings",
    "virtual_clock",
]
