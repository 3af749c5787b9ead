"""The host: live room activations, their mailboxes, the output gate, room-to-room calls.

Follow a message: the edge posts it into the room's mailbox (``Activation.post``); the
room's task takes events one at a time and runs the hook; whatever the hook sends passes the
output gate (``Activation.emit``), which writes it straight to the recipients' transports,
or holds it until the storage writes made before it are durable.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import math
import secrets
import time
import types
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Coroutine, Generator, Iterable
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


class _Tick:
    __slots__ = ("timer",)

    def __init__(self, timer: Timer) -> None:
        self.timer = timer


class _Alarm:
    __slots__ = ("retry",)

    def __init__(self, retry: int) -> None:
        self.retry = retry


Event = _Connect | _Message | _Closed | _Http | _Call | _Tick | _Alarm

_HOOK: dict[type, str] = {
    _Connect: "on_connect",
    _Message: "on_message",
    _Closed: "on_close",
    _Http: "on_request",
    _Call: "the called method",
    _Tick: "a timer callback",
    _Alarm: "on_alarm",
}

ALARM_RETRIES = 6
"""Times a failing on_alarm is retried (after 1, 2, 4... seconds) before it is given up."""


class Timer:
    """A room's timer (``Room.every`` / ``Room.after``): each tick is an event of the room.
    It lives as long as the room's instance: a restart or hibernation ends it."""

    __slots__ = ("_activation", "callback", "deadline", "interval", "queued")

    def __init__(
        self,
        activation: Activation,
        delay: float,
        interval: float | None,
        callback: Callable[[], Any],
    ) -> None:
        self._activation = activation
        self.callback = callback
        self.deadline = trio.current_time() + delay
        self.interval = interval
        self.queued = False  # a tick is in the mailbox

    @property
    def active(self) -> bool:
        return self in self._activation.timers

    def cancel(self) -> None:
        """Stop the timer (a tick already queued is dropped)."""
        if self.active:
            self._activation.timers.remove(self)


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

    __slots__ = (
        "_batch",
        "_busy",
        "_drained",
        "_durable",
        "_held",
        "_horizon",
        "_mailbox",
        "_mailbox_size",
        "_room_id",
        "_sleeper",
        "_space",
        "_storage",
        "_submitted",
        "attached",
        "evict_requested",
        "host",
        "instance",
        "key",
        "label",
        "last_used",
        "peers",
        "room_class",
        "running",
        "timers",
        "waiting_on",
    )

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
        self.key = f"{room_class.namespace}/{room_id.hex}"
        self._storage = RoomStorage(host.backend, self.key, self._first_write, room_id.name)
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
        # Lifecycle: the room's task runs while it has work or a reason to stay in memory;
        # without one it hibernates (instance dropped, connections kept) or unloads.
        self.running = False
        self.timers: list[Timer] = []
        self.last_used = trio.current_time()
        self.evict_requested = False  # by the host's bound on rooms in memory, or a test

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

    def start_timer(
        self, delay: float, interval: float | None, callback: Callable[[], Any]
    ) -> Timer:
        timer = Timer(self, delay, interval, callback)
        self.timers.append(timer)
        return timer

    def now(self) -> float:
        return self.host.now()

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
        self._drop_instance()
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
        self._ensure_running()

    def post_always(self, event: Event) -> None:
        """Queue an event past the mailbox bound: for closes, which must never wait (they
        are bounded by the number of connections, and a reader that is shutting down cannot
        wait for room in the mailbox), and alarms."""
        self._mailbox.append(event)
        self._wake()
        self._ensure_running()

    def _ensure_running(self) -> None:
        """Start the room's task if it is not running (a hibernated room wakes up)."""
        if not self.running:
            if self.peers:  # not running, yet connections: it was hibernated
                self.host.woke(self)
            self.running = True
            self.host.nursery.start_soon(self.run, name=f"room {self.label}")

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
        """The room's task: one event at a time, timer ticks among them, until the room has
        been idle long enough to hibernate (connections kept) or unload (none left)."""
        mailbox = self._mailbox
        burst = 0
        unload = True
        try:
            while True:
                if self.timers:
                    self._queue_ticks()
                if mailbox:
                    if burst == 0 and len(mailbox) > 1 and self._batch is None:
                        self._batch = {}  # a burst: batch its writes
                    event = mailbox.popleft()
                    self.evict_requested = False  # it is in use: only an idle room leaves
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
                self.last_used = trio.current_time()
                self.host.touch(self)
                if self._durable < self._submitted:
                    await self._sleep()  # commits on their way: woken when they land
                    continue
                if self.timers:
                    with trio.move_on_at(min(timer.deadline for timer in self.timers)):
                        await self._sleep()
                else:  # the host's sweeper wakes it when it has been idle too long
                    self.host.idle_soon(self)
                    await self._sleep()
                if mailbox or self._queue_ticks():
                    continue
                if self.evict_requested:
                    unload = not self.attached
                    return
        finally:
            self.flush()
            self.evict_requested = False
            self._drop_instance()
            self.running = False
            if unload or not self.peers:
                self.host.forget(self)
            else:
                self.host.hibernated(self)

    def idle_deadline(self) -> float:
        """When this room, idle since ``last_used``, leaves memory (inf: not while timers
        run, or with connections when hibernation is off)."""
        if self.timers:
            return math.inf
        if not self.attached:
            return self.last_used + self.host.settings.room_idle_timeout
        after = self.room_class.hibernate_after
        return math.inf if after is None else self.last_used + after

    def _queue_ticks(self) -> bool:
        """Queue a tick for each timer that is due; whether any was."""
        now = trio.current_time()
        queued = False
        for timer in self.timers:
            if timer.deadline <= now and not timer.queued:
                timer.queued = queued = True
                self._mailbox.append(_Tick(timer))
        return queued

    def _drop_instance(self) -> None:
        """The room's instance (and its timers) leave memory; storage stays on disk."""
        if self.instance is not None:
            self.instance = None
            self.host.stopped(self)
        self.timers.clear()
        self._storage.rollback()

    def evict(self) -> None:
        """Ask an idle room to leave memory: hibernate if it has connections, else unload."""
        if self.running:
            self.evict_requested = True
            self._wake()

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
        elif type(event) is _Tick:
            event.timer.queued = False
            if not event.timer.active:
                return  # cancelled, or its instance is gone
            self._next_tick(event.timer)
        try:
            if self.instance is None:
                await self._start()
            result = await self._dispatch(event)
        except Exception as exc:
            self._recover(event, exc)
            return
        self._commit()
        if isinstance(event, (_Http, _Call)):
            self.emit(event.reply.set, result)

    def _next_tick(self, timer: Timer) -> None:
        if timer.interval is None:
            timer.cancel()  # one-shot
        else:  # a late tick is not made up for: the next one is an interval from now
            timer.deadline = max(timer.deadline + timer.interval, trio.current_time())

    def _commit(self) -> None:
        """Hand the event's writes (and alarm change) to storage, if it made any."""
        storage = self._storage
        if storage.has_writes:
            change = storage.alarm_change
            if change is not None:
                self.host.alarms.changed(self, change[0])
            self._submitted += 1
            self.host.metrics.storage_commits_total += 1
            storage.commit(self._committed)
        self._horizon = self._submitted

    async def _start(self) -> None:
        instance = self.room_class.__new__(self.room_class)
        instance._ctx = self
        instance.__init__()  # type: ignore[misc]
        self.host.metrics.room_activations_total += 1
        try:
            await instance.on_start()
        except BaseException:
            self.timers.clear()  # set by the failed start: they end with it
            raise
        self.instance = instance
        self.host.started(self)

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
            result = getattr(room, event.method)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return decode(_pack(result, f"the result of {event.method}()"))
        elif type(event) is _Tick:
            result = event.timer.callback()
            if inspect.isawaitable(result):
                await result
        elif type(event) is _Alarm:
            at = await self._storage.get_alarm()
            if at is None or at > self.host.now():
                return None  # deleted or moved later since it was scheduled
            self._storage.delete_alarm()  # before the handler, which may set the next one
            await room.on_alarm(event.retry)
        return None

    def _recover(self, event: Event, exc: Exception) -> None:
        """A hook raised: report it to the event's origin, drop the event's writes and the
        outputs that depended on them, and restart the room from storage on its next event."""
        self.host.metrics.handler_errors_total += 1
        hook = "on_start" if self.instance is None else _HOOK[type(event)]
        self._drop_instance()
        while self._held and self._held[-1][0] > self._submitted:
            self._held.pop()
        self._horizon = self._submitted
        if isinstance(event, _Call):
            # The caller gets the exception itself; it is the caller's to handle or log.
            log.info("room %s: %s for call %s() raised %r", self.label, hook, event.method, exc)
            self.emit(event.reply.fail, exc)
            return
        if isinstance(event, _Alarm):
            self._alarm_failed(event.retry, hook, exc)
            return
        log.error(
            "room %s: %s raised; %s. The room restarts from storage on its next event.",
            self.label,
            hook,
            _REPORT[type(event)],
            exc_info=exc,
        )
        problem = "the room failed to start" if hook == "on_start" else "internal error in the room"
        if isinstance(event, _Http):
            self.emit(event.reply.set, Response.text(problem, 500))
        elif isinstance(event, _Connect):
            self.peers.pop(event.peer.conn.id, None)
            event.peer.close(1011, problem)
        elif isinstance(event, _Message):
            event.peer.close(1011, problem)

    def _alarm_failed(self, retry: int, hook: str, exc: Exception) -> None:
        if retry < ALARM_RETRIES:
            delay = 2.0**retry
            log.warning(
                "room %s: %s raised %r; retry %d of %d in %g s",
                self.label,
                hook,
                exc,
                retry + 1,
                ALARM_RETRIES,
                delay,
                exc_info=exc,
            )
            self.host.alarms.retry(self, delay, retry + 1)
            return
        log.error(
            "room %s: %s raised %r on its last retry (%d); the alarm is deleted",
            self.label,
            hook,
            exc,
            retry,
            exc_info=exc,
        )
        self._storage.delete_alarm()
        self._commit()


_REPORT: dict[type, str] = {
    _Connect: "the connection was closed with 1011",
    _Message: "the sender's connection was closed with 1011",
    _Closed: "the connection was already gone",
    _Http: "the request was answered with 500",
    _Call: "the caller got the exception",
    _Tick: "the room's timers were stopped",
    _Alarm: "",
}


class Host:
    """All activations of one server process, at most one per room. ``room_classes`` are
    the app's (so that an alarm can start a room of a class not seen yet in this process)."""

    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        metrics: Metrics,
        nursery: trio.Nursery,
        room_classes: Iterable[type[Room]] = (),
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.nursery = nursery
        self._activations: dict[tuple[str, str], Activation] = {}
        self._classes: dict[str, type[Room]] = {}
        for room_class in room_classes:
            self._known_class(room_class)
        self._to_flush: list[Activation] = []
        self._in_memory: OrderedDict[Activation, None] = OrderedDict()  # least recent first
        self._sweep = trio.CancelScope()  # the sweeper's sleep until it looks for idle rooms
        self._swept_at = -math.inf
        self.alarms = AlarmClock(self)
        nursery.start_soon(self._sweeper, name="rooms: idle sweeper")
        nursery.start_soon(self.alarms.run, name="rooms: alarms")

    @staticmethod
    def now() -> float:
        """Seconds since the epoch, as rooms see them."""
        return _wall_origin() + trio.current_time()

    def _known_class(self, room_class: type[Room]) -> None:
        known = self._classes.setdefault(room_class.namespace, room_class)
        if known is not room_class:
            raise RuntimeError(
                f"room classes {known.__qualname__} and {room_class.__qualname__} share the "
                f"storage namespace {room_class.namespace!r}; give one a distinct `namespace`"
            )

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
            self._known_class(room_class)
            act = self._activations[key] = Activation(self, room_class, room_id)
            self.metrics.rooms_active += 1
            act._ensure_running()
        return act

    def room_class(self, namespace: str) -> type[Room] | None:
        return self._classes.get(namespace)

    def forget(self, act: Activation) -> None:
        key = (act.room_class.namespace, act.room_id.hex)
        if self._activations.get(key) is act:
            del self._activations[key]
            self.metrics.rooms_active -= 1

    # -- the lifecycle: rooms in memory, hibernated, unloaded ----------------------------

    def started(self, act: Activation) -> None:
        """``act``'s instance started: past ``max_rooms_in_memory``, the least recently
        used idle rooms leave memory (hibernated if they have connections)."""
        self._in_memory[act] = None
        self.metrics.rooms_in_memory = len(self._in_memory)
        excess = len(self._in_memory) - self.settings.max_rooms_in_memory
        if excess <= 0:
            return
        for other in self._in_memory:
            if excess <= 0:
                break
            if other is not act and other.idle and not other.evict_requested:
                self.metrics.room_evictions_total += 1
                other.evict()
                excess -= 1

    def idle_soon(self, act: Activation) -> None:
        """``act`` went idle: make sure the sweeper looks at it by its idle deadline."""
        at = act.idle_deadline()
        if at < self._sweep.deadline:
            self._sweep.deadline = max(at, self._swept_at + self._sweep_gap())

    async def _sweeper(self) -> None:
        """Rooms idle past their deadline leave memory (hibernated or unloaded). One task
        for every room: a deadline on each room's own sleep would cost a cancel scope (about
        8 us) per event. It looks when the earliest deadline comes, and at most every
        ``_sweep_gap()``."""
        while True:
            with self._sweep:
                await trio.sleep_forever()
            now = self._swept_at = trio.current_time()
            next_at = math.inf
            for act in list(self._activations.values()):
                if act.running and act.idle and not act.evict_requested:
                    at = act.idle_deadline()
                    if at <= now:
                        act.evict()
                    else:
                        next_at = min(next_at, at)
            self._sweep = trio.CancelScope(deadline=max(next_at, now + self._sweep_gap()))

    def _sweep_gap(self) -> float:
        """A tenth of the shortest idle period (0.05 to 1 s): the sweeps' lateness bound."""
        periods = [self.settings.room_idle_timeout]
        periods += [c.hibernate_after for c in self._classes.values() if c.hibernate_after]
        return min(1.0, max(0.05, min(periods) / 10))

    def touch(self, act: Activation) -> None:
        if act in self._in_memory:
            self._in_memory.move_to_end(act)

    def stopped(self, act: Activation) -> None:
        """``act``'s instance left memory."""
        self._in_memory.pop(act, None)
        self.metrics.rooms_in_memory = len(self._in_memory)

    def hibernated(self, act: Activation) -> None:
        """``act`` left memory but keeps its connections (and its place in the host)."""
        self.metrics.rooms_hibernated += 1
        self.metrics.room_hibernations_total += 1
        log.debug("room %s hibernated with %d connections", act.label, len(act.peers))

    def woke(self, act: Activation) -> None:
        """``act``, hibernated, starts its task again."""
        self.metrics.rooms_hibernated -= 1

    def idle(self) -> bool:
        """Every room has handled its events and its commits are durable."""
        return all(act.idle for act in self._activations.values())

    def live_activation(self, room_class: type[Room], room_id: RoomId) -> Activation | None:
        """The activation of that room if it is live or hibernated (not unloaded)."""
        return self._activations.get((room_class.namespace, room_id.hex))

    def is_active(self, room_class: type[Room], room_id: RoomId) -> bool:
        """Whether that room's task runs (it is in memory, not hibernated or unloaded)."""
        act = self.live_activation(room_class, room_id)
        return act is not None and act.running

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


_WALL_ORIGIN: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("rooms_wall_origin")


def _wall_origin() -> float:
    """The wall clock rooms see (alarm times are wall-clock times) follows trio's clock, so
    that a test's virtual clock moves it too; fixed once per trio run, so that servers
    started one after the other in one run (a restart in a test) agree."""
    try:
        return _WALL_ORIGIN.get()
    except LookupError:
        origin = time.time() - trio.current_time()
        _WALL_ORIGIN.set(origin)
        return origin


class AlarmClock:
    """Fires the rooms' alarms: each room's stored alarm time is scheduled here (loaded at
    start, so an alarm missed while the server was down fires at once), and when it comes
    the room gets an alarm event, started if it was not in memory. Storage stays the truth:
    the room checks its stored alarm before running ``on_alarm``."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._due: dict[str, tuple[float, int, type[Room], RoomId]] = {}  # room key -> ...
        self._heap: list[tuple[float, str]] = []
        self._changed = trio.Event()

    async def run(self) -> None:
        host = self.host
        for key, at, name in await host.backend.alarms():
            namespace, _, hex_id = key.partition("/")
            room_class = host.room_class(namespace)
            if room_class is None:
                log.warning("an alarm of room %s: its class is not in this app; not fired", key)
                continue
            self._schedule(key, at, 0, room_class, RoomId(hex_id, name))
        while True:
            self._changed = trio.Event()
            deadline = self._heap[0][0] - host.now() + trio.current_time() if self._heap else None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._changed.wait()
            self._fire_due()

    def changed(self, act: Activation, at: float | None) -> None:
        """``act`` set its alarm to ``at`` (None: deleted), in a commit on its way to disk."""
        if at is None:
            self._due.pop(act.key, None)
        else:
            self._schedule(act.key, at, 0, act.room_class, act.room_id)

    def retry(self, act: Activation, delay: float, attempt: int) -> None:
        self._schedule(act.key, self.host.now() + delay, attempt, act.room_class, act.room_id)

    def _schedule(
        self, key: str, at: float, attempt: int, room_class: type[Room], room_id: RoomId
    ) -> None:
        self._due[key] = (at, attempt, room_class, room_id)
        heapq.heappush(self._heap, (at, key))
        if self._heap[0][1] == key:
            self._changed.set()

    def _fire_due(self) -> None:
        now = self.host.now()
        while self._heap and self._heap[0][0] <= now:
            at, key = heapq.heappop(self._heap)
            entry = self._due.get(key)
            if entry is None or entry[0] != at:
                continue  # deleted or moved since
            del self._due[key]
            _, attempt, room_class, room_id = entry
            self.host.metrics.alarms_fired_total += 1
            self.host.activation(room_class, room_id).post_always(_Alarm(attempt))


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
