"""The host: live room activations, their mailboxes, the output gate, room-to-room calls.

Follow a message: the edge posts it into the room's mailbox (``Activation.post``); the
room's task takes events one at a time and runs the hook; whatever the hook sends passes the
output gate (``Activation.emit``), which writes it straight to the recipients' transports,
or holds it until the storage writes made before it are durable.
"""

from __future__ import annotations

import logging
import secrets
import types
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Generator
from typing import Any, Protocol

import trio

from rooms import CallCycleError, Connection, Request, Response, Room, RoomCallError, RoomId, Stub
from rooms._codec import decode, encode
from rooms._http import HTTPError

from .config import Settings
from .frames import encode_message
from .metrics import Metrics
from .storage import Backend, RoomStorage

log = logging.getLogger("rooms.host")


class Transport(Protocol):
    """A client connection as the host sees it (a socket in the edge, a fake in tests)."""

    def write(self, frame: bytes, messages: int = 1) -> None:
        """Queue encoded frames (``messages`` of them); never blocks. Ignored once the
        connection is closing."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Send a Close frame and finish the connection."""
        ...


class Reply:
    """A one-shot answer to an HTTP request or a call, waited on by whoever posted it."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Peer:
    """One WebSocket connection attached to a room: the link behind ``rooms.Connection``."""

    __slots__ = ("activation", "conn", "transport")

    def __init__(self, activation: Activation, transport: Transport, request: Request) -> None:
        self.activation = activation
        self.transport = transport
        self.conn = Connection(self, secrets.token_hex(8), request)

    def send(self, message: str | bytes) -> None:
        self.activation.emit(self._write, encode_message(message))
        self.activation.host.metrics.messages_out_total += 1

    def _write(self, frame: bytes) -> None:
        self.activation.write((self.transport,), frame)

    def close(self, code: int, reason: str) -> None:
        self.activation.emit(self._close_now, (code, reason))

    def _close_now(self, args: tuple[int, str]) -> None:
        self.activation.flush(self.transport)  # what was sent before the close goes first
        self.transport.close(*args)


# -- events ---------------------------------------------------------------------------------


class _Connect:
    __slots__ = ("peer",)

    def __init__(self, peer: Peer) -> None:
        self.peer = peer


class _Message:
    __slots__ = ("data", "peer")

    def __init__(self, peer: Peer, data: str | bytes) -> None:
        self.peer = peer
        self.data = data


class _Closed:
    __slots__ = ("code", "peer", "reason", "send_close")

    def __init__(self, peer: Peer, code: int, reason: str, send_close: bool) -> None:
        self.peer = peer
        self.code = code
        self.reason = reason
        self.send_close = send_close


class _Http:
    __slots__ = ("reply", "request")

    def __init__(self, request: Request, reply: Reply) -> None:
        self.request = request
        self.reply = reply


class _Call:
    __slots__ = ("method", "payload", "reply")

    def __init__(self, method: str, payload: bytes, reply: Reply) -> None:
        self.method = method
        self.payload = payload
        self.reply = reply


Event = _Connect | _Message | _Closed | _Http | _Call

_HOOK: dict[type, str] = {
    _Connect: "on_connect",
    _Message: "on_message",
    _Closed: "on_close",
    _Http: "on_request",
    _Call: "the called method",
}


def _pack(value: Any, what: str) -> bytes:
    try:
        return encode(value, what)
    except TypeError as exc:
        raise RoomCallError(str(exc)) from None


def callable_method(room_class: type[Room], method: str) -> bool:
    """Whether ``method`` may be called through a stub: public, and not a Room hook."""
    if method.startswith("_") or hasattr(Room, method):
        return False
    return callable(getattr(room_class, method, None))


_MAX_BURST = 64
"""Events a room handles before the writes it batched are sent (a latency bound)."""


@types.coroutine
def _finish(coro: Coroutine[Any, Any, None], trap: Any) -> Generator[Any, Any, None]:
    """Await the rest of ``coro``, which was started by hand and has just yielded ``trap``
    to the event loop: what ``await`` does, resumed half way (in the same task)."""
    value = trap
    while True:
        try:
            sent = yield value
        except BaseException as exc:  # cancellation and the like: the coroutine handles it
            try:
                value = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                value = coro.send(sent)
            except StopIteration:
                return


class Activation:
    """One live room: its instance, connections, mailbox, storage view and output gate."""

    def __init__(self, host: Host, room_class: type[Room], room_id: RoomId) -> None:
        self.host = host
        self.room_class = room_class
        self._room_id = room_id
        self.label = f"{room_class.__name__}:{room_id.hex[:12]}" + (
            f" ({room_id.name!r})" if room_id.name is not None else ""
        )
        self.instance: Room | None = None
        self.peers: dict[str, Peer] = {}
        self.attached = 0  # peers attached, including those whose connect is still queued
        self.waiting_on: set[Activation] = set()  # rooms whose calls this room awaits
        self._storage = RoomStorage(
            host.backend, f"{room_class.namespace}/{room_id.hex}", self._first_write
        )
        self._mailbox: deque[Event] = deque()
        self._mailbox_size = host.settings.mailbox_size
        self._space = trio.lowlevel.ParkingLot()
        # Output gate: commits are numbered; an output carries the number of the commit it
        # must wait for (its horizon) and is released once that many commits are durable.
        self._submitted = 0
        self._durable = 0
        self._horizon = 0
        self._held: deque[tuple[int, Callable[[Any], None], Any]] = deque()
        self._drained: trio.Event | None = None
        self._busy = False
        self._sleeper: trio.lowlevel.Task | None = None  # the room's task, while it sleeps
        # Frames written while the room works through a burst of queued events, per
        # connection: sent as one write each when the burst ends (one syscall per
        # connection per burst instead of one per frame).
        self._batch: dict[Transport, list[bytes]] | None = None

    # -- RoomContext (what the SDK calls) ------------------------------------------------

    @property
    def room_id(self) -> RoomId:
        return self._room_id

    @property
    def storage(self) -> RoomStorage:
        return self._storage

    def broadcast(self, message: str | bytes, exclude: Collection[str], tag: str | None) -> None:
        frame = encode_message(message)
        peers = [p for p in self._tagged(tag) if p.conn.id not in exclude]
        self.host.metrics.messages_out_total += len(peers)
        if self._gate_open:
            self.write([p.transport for p in peers], frame)
        else:
            horizon = self._horizon
            self._held.extend((horizon, p._write, frame) for p in peers)

    def write(self, transports: Collection[Transport], frame: bytes) -> None:
        """Write ``frame`` to each of ``transports`` now, or into the burst's batch."""
        batch = self._batch
        if batch is None:
            for transport in transports:
                transport.write(frame)
            return
        for transport in transports:
            frames = batch.get(transport)
            if frames is None:
                batch[transport] = [frame]
            else:
                frames.append(frame)

    def flush(self, transport: Transport | None = None) -> None:
        """Send what the current burst batched, one write per connection; with
        ``transport``, only that connection's (the burst goes on)."""
        if self._batch is None:
            return
        if transport is None:
            batch, self._batch = self._batch, None
        else:
            frames = self._batch.pop(transport, None)
            batch = {transport: frames} if frames else {}
        for target, frames in batch.items():
            if len(frames) == 1:
                target.write(frames[0])
            else:
                target.write(b"".join(frames), len(frames))

    def connections(self, tag: str | None) -> list[Connection]:
        return [p.conn for p in self._tagged(tag)]

    def _tagged(self, tag: str | None) -> list[Peer]:
        peers = self.peers.values()
        return list(peers) if tag is None else [p for p in peers if tag in p.conn.tags]

    async def call(
        self,
        room_class: type[Room],
        room: str | RoomId,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        return await self.host.call(room_class, room, method, args, kwargs, caller=self)

    # -- the output gate -----------------------------------------------------------------

    def emit(self, deliver: Callable[[Any], None], item: Any) -> None:
        """Deliver ``item`` now, or once every write made before it is durable."""
        if self._gate_open:
            deliver(item)
        else:
            self._held.append((self._horizon, deliver, item))

    @property
    def _gate_open(self) -> bool:
        """No write made so far is still on its way to disk, and nothing is held."""
        return self._horizon <= self._durable and not self._held

    def _first_write(self) -> None:
        self._horizon = self._submitted + 1

    def _committed(self, error: BaseException | None) -> None:
        self._durable += 1
        if error is not None:
            self._storage_failed(error)
        held = self._held
        if held and held[0][0] <= self._durable and self._batch is None:
            # Released outputs of a whole group commit go out as one write per connection.
            self._batch = {}
            self.host.flush_soon(self)
        while held and held[0][0] <= self._durable:
            _, deliver, item = held.popleft()
            deliver(item)
        if self._drained is not None and self._submitted - self._durable < self._max_inflight:
            self._drained.set()
            self._drained = None
        if self._durable == self._submitted:
            self._wake()  # may now unload when idle

    @property
    def _max_inflight(self) -> int:
        return self.host.settings.max_inflight_commits

    def _storage_failed(self, error: BaseException) -> None:
        """A commit failed: what clients were told may be lost. Drop the held outputs, close
        every connection (1011) so clients resync, and restart the room from storage."""
        self.host.metrics.storage_errors_total += 1
        log.error(
            "room %s: a storage commit failed (%s); closing its %d connections with 1011 and "
            "restarting it from storage",
            self.label,
            error,
            len(self.peers),
        )
        self.flush()
        held, self._held = self._held, deque()
        for _, deliver, _item in held:
            reply = getattr(deliver, "__self__", None)
            if isinstance(reply, Reply):  # a held answer: its waiter must not hang
                reply.fail(error)
        self._storage.rollback()
        self.instance = None
        for peer in list(self.peers.values()):
            peer.transport.close(1011, "storage failure: reconnect to resync")

    # -- the mailbox ---------------------------------------------------------------------

    async def post(self, event: Event) -> None:
        """Queue an event; wait while the mailbox is full (the caller stops reading)."""
        while len(self._mailbox) >= self._mailbox_size:
            self.host.metrics.limit_mailbox_full_total += 1
            await self._space.park()
        self._mailbox.append(event)
        self._wake()

    def post_always(self, event: Event) -> None:
        """Queue an event past the mailbox bound: for closes, which must never wait (they
        are bounded by the number of connections, and a reader that is shutting down cannot
        wait for room in the mailbox)."""
        self._mailbox.append(event)
        self._wake()

    def _wake(self) -> None:
        task = self._sleeper
        if task is not None:
            self._sleeper = None
            trio.lowlevel.reschedule(task)

    async def _sleep(self) -> None:
        """Until ``_wake`` (cheaper than a trio.Event per wait, on the hot path)."""
        self._sleeper = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._sleeper = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        """The room's task: one event at a time until the room is idle long enough."""
        host = self.host
        mailbox = self._mailbox
        burst = 0
        try:
            while True:
                if mailbox:
                    if burst == 0 and len(mailbox) > 1 and self._batch is None:
                        self._batch = {}  # a burst: batch its writes
                    event = mailbox.popleft()
                    if self._space:
                        self._space.unpark()
                    self._busy = True
                    handling = self._handle(event)
                    try:
                        trap = handling.send(None)
                    except StopIteration:
                        pass  # done without blocking: its writes may stay in the batch
                    else:  # it blocks (a storage read, a call): send the batch first
                        self.flush()
                        await _finish(handling, trap)
                    self._busy = False
                    burst += 1
                    too_many_commits = self._submitted - self._durable >= self._max_inflight
                    if not mailbox or burst >= _MAX_BURST or too_many_commits:
                        self.flush()
                        burst = 0
                    if too_many_commits:
                        self._drained = trio.Event()
                        await self._drained.wait()
                    continue
                if self.attached or self._durable < self._submitted:
                    await self._sleep()
                else:
                    with trio.move_on_after(host.settings.room_idle_timeout):
                        await self._sleep()
                    if not (mailbox or self.attached or self._durable < self._submitted):
                        return
        finally:
            self.flush()
            host.forget(self)

    # -- handling one event --------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No event queued or running, and every commit durable."""
        return not self._mailbox and not self._busy and self._durable == self._submitted

    async def _handle(self, event: Event) -> None:
        # Connection bookkeeping first: it must happen even if the room cannot start.
        if type(event) is _Closed:
            if event.send_close:  # after the answers to what the client sent before
                self.emit(event.peer._close_now, (event.code, event.reason))
            self.attached -= 1
            if self.peers.pop(event.peer.conn.id, None) is None:
                return
        elif type(event) is _Message:
            if event.peer.conn.id not in self.peers:
                return  # its connection failed to join, or already left
        elif type(event) is _Connect:
            self.peers[event.peer.conn.id] = event.peer
        try:
            if self.instance is None:
                await self._start()
            result = await self._dispatch(event)
        except Exception as exc:
            self._recover(event, exc)
            return
        if self._storage.has_writes:
            self._submitted += 1
            self.host.metrics.storage_commits_total += 1
            self._storage.commit(self._committed)
        self._horizon = self._submitted
        if isinstance(event, (_Http, _Call)):
            self.emit(event.reply.set, result)

    async def _start(self) -> None:
        instance = self.room_class.__new__(self.room_class)
        instance._ctx = self
        instance.__init__()  # type: ignore[misc]
        self.host.metrics.room_activations_total += 1
        await instance.on_start()
        self.instance = instance

    async def _dispatch(self, event: Event) -> Any:
        room = self.instance
        assert room is not None
        if type(event) is _Message:
            await room.on_message(event.peer.conn, event.data)
        elif type(event) is _Connect:
            await room.on_connect(event.peer.conn, event.peer.conn.request)
        elif type(event) is _Closed:
            await room.on_close(event.peer.conn, event.code, event.reason)
        elif type(event) is _Http:
            try:
                response = await room.on_request(event.request)
            except HTTPError as exc:
                return Response.text(exc.reason, exc.status, exc.headers)
            if not isinstance(response, Response):
                raise TypeError(f"on_request returned {response!r}, not a rooms.Response")
            return response
        elif type(event) is _Call:
            args, kwargs = decode(event.payload)
            result = await getattr(room, event.method)(*args, **kwargs)
            return decode(_pack(result, f"the result of {event.method}()"))
        return None

    def _recover(self, event: Event, exc: Exception) -> None:
        """A hook raised: report it to the event's origin, drop the event's writes and the
        outputs that depended on them, and restart the room from storage on its next event."""
        self.host.metrics.handler_errors_total += 1
        hook = "on_start" if self.instance is None else _HOOK[type(event)]
        self._storage.rollback()
        while self._held and self._held[-1][0] > self._submitted:
            self._held.pop()
        self._horizon = self._submitted
        self.instance = None
        if isinstance(event, _Call):
            # The caller gets the exception itself; it is the caller's to handle or log.
            log.info("room %s: %s for call %s() raised %r", self.label, hook, event.method, exc)
            self.emit(event.reply.fail, exc)
            return
        log.error(
            "room %s: %s raised; %s. The room restarts from storage on its next event.",
            self.label,
            hook,
            _REPORT[type(event)],
            exc_info=exc,
        )
        if isinstance(event, _Http):
            self.emit(event.reply.set, Response.text("internal error in the room", 500))
        elif isinstance(event, _Connect):
            self.peers.pop(event.peer.conn.id, None)
            event.peer.close(1011, "internal error in the room")
        elif isinstance(event, _Message):
            event.peer.close(1011, "internal error in the room")


_REPORT: dict[type, str] = {
    _Connect: "the connection was closed with 1011",
    _Message: "the sender's connection was closed with 1011",
    _Closed: "the connection was already gone",
    _Http: "the request was answered with 500",
    _Call: "the caller got the exception",
}


class Host:
    """All activations of one server process, at most one per room."""

    def __init__(
        self, backend: Backend, settings: Settings, metrics: Metrics, nursery: trio.Nursery
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self._nursery = nursery
        self._activations: dict[tuple[str, str], Activation] = {}
        self._classes: dict[str, type[Room]] = {}
        self._to_flush: list[Activation] = []

    def flush_soon(self, act: Activation) -> None:
        """Flush ``act``'s batch once the current run of storage callbacks is over."""
        if not self._to_flush:
            trio.lowlevel.current_trio_token().run_sync_soon(self._flush_all)
        self._to_flush.append(act)

    def _flush_all(self) -> None:
        acts, self._to_flush = self._to_flush, []
        for act in acts:
            act.flush()

    def activation(self, room_class: type[Room], room_id: RoomId) -> Activation:
        """The live activation of a room, started if needed."""
        key = (room_class.namespace, room_id.hex)
        act = self._activations.get(key)
        if act is None:
            known = self._classes.setdefault(room_class.namespace, room_class)
            if known is not room_class:
                raise RuntimeError(
                    f"room classes {known.__qualname__} and {room_class.__qualname__} share the "
                    f"storage namespace {room_class.namespace!r}; give one a distinct `namespace`"
                )
            act = self._activations[key] = Activation(self, room_class, room_id)
            self.metrics.rooms_active += 1
            self._nursery.start_soon(act.run, name=f"room {act.label}")
        return act

    def forget(self, act: Activation) -> None:
        key = (act.room_class.namespace, act.room_id.hex)
        if self._activations.get(key) is act:
            del self._activations[key]
            self.metrics.rooms_active -= 1

    def idle(self) -> bool:
        """Every room has handled its events and its commits are durable."""
        return all(act.idle for act in self._activations.values())

    def is_active(self, room_class: type[Room], room_id: RoomId) -> bool:
        return (room_class.namespace, room_id.hex) in self._activations

    # -- entry points for the edge -------------------------------------------------------

    def attach(
        self, room_class: type[Room], room_id: RoomId, transport: Transport, request: Request
    ) -> Peer | None:
        """Reserve a place for a new connection in the room; None if the room is full."""
        act = self.activation(room_class, room_id)
        if act.attached >= self.settings.max_connections_per_room:
            self.metrics.limit_room_connections_total += 1
            return None
        act.attached += 1
        return Peer(act, transport, request)

    async def connected(self, peer: Peer) -> None:
        await peer.activation.post(_Connect(peer))

    async def received(self, peer: Peer, data: str | bytes) -> None:
        self.metrics.messages_in_total += 1
        await peer.activation.post(_Message(peer, data))

    def disconnected(self, peer: Peer, code: int, reason: str, send_close: bool = False) -> None:
        """The connection ended with ``code``. With ``send_close`` the edge wants the Close
        frame sent in the room's output order: after every answer to earlier messages."""
        peer.activation.post_always(_Closed(peer, code, reason, send_close))

    async def request(self, room_class: type[Room], room_id: RoomId, request: Request) -> Response:
        reply = Reply()
        await self.activation(room_class, room_id).post(_Http(request, reply))
        response: Response = await reply.wait()
        return response

    # -- calls between rooms -------------------------------------------------------------

    async def call(
        self,
        room_class: type[Room],
        room: str | RoomId,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        caller: Activation | None = None,
    ) -> Any:
        if not callable_method(room_class, method):
            raise RoomCallError(
                f"{room_class.__name__} has no method {method!r} that can be called through a "
                "stub (public methods defined by the room class only)"
            )
        payload = _pack((list(args), kwargs), f"the arguments of {method}()")
        room_id = room if isinstance(room, RoomId) else RoomId.from_name(room)
        target = self.activation(room_class, room_id)
        if caller is not None:
            if caller is target or _waits_for(target, caller):
                raise CallCycleError(
                    f"room {caller.label} calling {method}() on {target.label} would wait on "
                    "itself (a call cycle); restructure the calls, e.g. return data instead of "
                    "calling back"
                )
            caller.waiting_on.add(target)
        try:
            reply = Reply()
            await target.post(_Call(method, payload, reply))
            return await reply.wait()
        finally:
            if caller is not None:
                caller.waiting_on.discard(target)

    def stub(self, room_class: type[Room], room: str | RoomId) -> Stub:
        """A stub for code outside any room (plain HTTP routes)."""

        async def call(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return await self.call(room_class, room, method, args, kwargs)

        return Stub(call, f"{room_class.__name__}:{room}")


def _waits_for(start: Activation, goal: Activation) -> bool:
    """Whether ``start`` waits, directly or through other rooms, on ``goal``."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        act = stack.pop()
        if act is goal:
            return True
        if id(act) in seen:
            continue
        seen.add(id(act))
        stack.extend(act.waiting_on)
    return False
