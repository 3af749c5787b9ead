"""One room in memory: its instance, connections, mailbox and task.

Follow a message: the edge hands it to the connection's ``Peer``, which posts it into the
room's mailbox (``Activation.post``); the room's task takes the events one at a time and runs
each to completion (``events``); whatever the hook sends passes the room's output gate
(``gate``), which writes it to the recipients' transports at once, or holds it until the
storage writes made before it are durable. During a burst of queued events the frames go
through the burst batch: one write per connection when the burst ends.
"""

from __future__ import annotations

import logging
import math
import secrets
import types
from collections.abc import Callable, Collection, Coroutine, Generator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import trio

from rooms import Connection, Request, Room, RoomId
from rooms._engine import new_room

from .events import MOVED, Closed, Mailbox, Message, RoomEvent, Tick
from .frames import encode_message
from .gate import Batch, OutputGate, Transport
from .placement import NotHere
from .seats import Seats
from .storage import FencedError, RoomStorage

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger("rooms.host")

_MAX_BURST = 64
"""Events a room handles before the writes it batched are sent (a latency bound)."""


class Peer:
    """One connection attached to a room, both ways: the ``ConnectionLink`` behind
    ``rooms.Connection`` (the room sends and closes) and the edge's ``Target`` (the client's
    messages and its end go to the room). ``room_told``: the room knows it ended."""

    __slots__ = ("activation", "conn", "room_told", "transport")

    def __init__(
        self, activation: Activation, transport: Transport, request: Request, seated: bool = True
    ) -> None:
        self.activation = activation
        self.transport = transport
        self.conn = Connection(self, secrets.token_hex(8), request, seated)
        self.room_told = False

    def send(self, message: str | bytes) -> None:
        self.activation.send((self.transport,), encode_message(message))

    def close(self, code: int, reason: str) -> None:
        self.activation.gate.emit(self._close_now, (code, reason))

    def _close_now(self, args: tuple[int, str]) -> None:
        self.activation.batch.flush(self.transport)  # what was sent before goes first
        self.transport.close(*args)

    # -- Target (what the edge calls) ----------------------------------------------------

    @property
    def label(self) -> str:
        return f"connection {self.conn.id} in room {self.activation.label}"

    async def deliver(self, message: str | bytes) -> None:
        act = self.activation
        auto = act.room_class.auto_reply
        if auto is not None and message == auto[0]:
            # Answered here, at once, without waking the room (a heartbeat costs nothing).
            self.transport.write(encode_message(auto[1]))
            act.host.metrics.auto_replies_total += 1
            return
        relay = act.room_class.relay_prefix
        if relay is not None and type(message) is bytes and message.startswith(relay):
            # Sent on here, without waking the room; the room reads the last one later.
            self.conn.relayed = message
            act.broadcast(message, (), None)
            act.host.metrics.relayed_messages_total += 1
            return
        act.host.metrics.messages_in_total += 1
        await act.post(Message(self, message))

    def end(self, code: int, reason: str, send_close: bool = False) -> None:
        if not self.room_told:
            self.room_told = True
            self.activation.post_unbounded(Closed(self, code, reason, send_close))

    @property
    def route(self) -> str:
        return self.conn.request.route

    @property
    def room(self) -> str:
        return self.activation.label

    def usage(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "room": self.room,
            "connection": self.conn.id,
            "client_ip": self.conn.request.client[0],
        }


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

    def advance(self) -> None:
        """A tick is about to run: schedule the next one (a late tick is not made up for:
        the next one is an interval from now), or end a one-shot timer."""
        if self.interval is None:
            self.cancel()
        else:
            self.deadline = max(self.deadline + self.interval, trio.current_time())


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], trap: Any) -> Generator[Any, Any, None]:
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


def room_label(room_class: type[Room], room_id: RoomId) -> str:
    """A room as logs and usage records name it: ``Chat:0123456789ab ('lobby')``."""
    name = f" ({room_id.name!r})" if room_id.name is not None else ""
    return f"{room_class.__name__}:{room_id.hex[:12]}{name}"


class Activation:
    """One room of the host: its instance (while in memory), connections, mailbox, storage
    view and output gate. It is the ``RoomContext`` its instance talks to."""

    __slots__ = (
        "_busy",
        "_commit_times",
        "_drained",
        "_event_times",
        "_room_id",
        "_storage",
        "attached",
        "batch",
        "chain",
        "evict_requested",
        "fenced",
        "gate",
        "host",
        "instance",
        "key",
        "label",
        "last_used",
        "mailbox",
        "peers",
        "room_class",
        "running",
        "seats",
        "timers",
        "waiting_on",
    )

    def __init__(self, host: Host, room_class: type[Room], room_id: RoomId) -> None:
        self.host = host
        self.room_class = room_class
        self._room_id = room_id
        self.label = room_label(room_class, room_id)
        self.instance: Room | None = None
        self.peers: dict[str, Peer] = {}
        self.attached = 0  # peers attached, including those whose connect is still queued
        self.seats = Seats(room_class.max_clients, room_class.seats_by_ticket, room_class.when_full)
        self.waiting_on: set[Activation] = set()  # rooms whose calls this room awaits
        self.key = f"{room_class.namespace}/{room_id.hex}"
        self.chain: list[str] = []  # the rooms waiting on the call this room handles now
        self.fenced = False  # another node holds the room now (cluster mode)
        self.gate = OutputGate()
        epoch = None if host.directory is None else host.directory.epochs.get(self.key)
        self._storage = RoomStorage(
            host.backend,
            self.key,
            self.gate.wrote,
            room_id.name,
            epoch,
            host.settings.storage_cache_bytes,
            self._cache_full,
        )
        self.mailbox = Mailbox(host.settings.mailbox_size, host.metrics)
        self._drained: trio.Event | None = None  # set when commits in flight fall below max
        self._busy = False
        self.batch = Batch()
        name = room_class.__name__
        self._event_times = host.metrics.event_seconds.of(name)
        self._commit_times = host.metrics.commit_seconds.of(name)
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
        transports = [p.transport for p in self._tagged(tag) if p.conn.id not in exclude]
        self.send(transports, encode_message(message))

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

    def issue_ticket(self, room_key: str, identity: Any, ttl: float) -> str:
        return self.host.tickets.issue(room_key, identity, ttl, self.host.now())

    def now(self) -> float:
        return self.host.now()

    # -- writing to connections ----------------------------------------------------------

    def send(self, transports: Collection[Transport], frame: bytes) -> None:
        """Send ``frame`` to each of ``transports`` through the output gate."""
        self.host.metrics.messages_out_total += len(transports)
        if self.gate.open:
            self.batch.write(transports, frame)
        else:
            self.gate.hold(self._write_held, (transports, frame))

    def _write_held(self, item: tuple[Collection[Transport], bytes]) -> None:
        self.batch.write(*item)

    # -- storage commits -----------------------------------------------------------------

    def commit(self) -> None:
        """Hand the event's writes (and alarm change) to storage, if it made any."""
        storage = self._storage
        if storage.has_writes:
            change = storage.alarm_change
            if change is not None:
                self.host.alarms.changed(self, change[0])
            self.gate.submit()
            self.host.metrics.storage_commits_total += 1
            started = perf_counter()
            storage.commit(lambda error: self._committed(error, started))

    def _committed(self, error: BaseException | None, started: float) -> None:
        self._commit_times.observe(perf_counter() - started)
        gate = self.gate
        gate.landed()
        if error is not None:
            self._storage_failed(error)
        if gate.releasable and not self.batch.open:
            # Released outputs of a whole group commit go out as one write per connection.
            self.batch.start()
            self.host.flush_soon(self)
        gate.release()
        if self._drained is not None and gate.inflight < self.host.settings.max_inflight_commits:
            self._drained.set()
            self._drained = None
        if not gate.inflight:
            self.mailbox.wake()  # may now unload when idle

    def _cache_full(self) -> None:
        self.host.metrics.storage_cache_resets_total += 1

    def _storage_failed(self, error: BaseException) -> None:
        """A commit failed: what clients were told may be lost. Drop the held outputs, close
        every connection (1011) so clients resync, and restart the room from storage."""
        if isinstance(error, FencedError):
            self.host.metrics.cluster_fenced_commits_total += 1
            self.host.fence(self, str(error))
            return
        self.host.metrics.storage_errors_total += 1
        log.error(
            "room %s: a storage commit failed (%s); closing its %d connections with 1011 and "
            "restarting it from storage",
            self.label,
            error,
            len(self.peers),
        )
        self.batch.flush()
        self.gate.fail(error)
        self._drop_instance()
        for peer in list(self.peers.values()):
            peer.transport.close(1011, "storage failure: reconnect to resync")

    def fence(self, why: str) -> None:
        """Another node holds the room now (``Host.fence``): what passed the gate goes out,
        nothing held does (its writes were refused, or may be); every client is closed with
        1012 and the events still queued are turned away."""
        log.warning(
            "room %s: %s; closing its %d connections with 1012 (they reconnect to the node "
            "that holds it now)",
            self.label,
            why,
            len(self.peers),
        )
        self.fenced = True
        self.batch.flush()
        self.gate.fail(NotHere(f"room {self.label} moved to another node"))
        self._drop_instance()
        for peer in list(self.peers.values()):
            peer.transport.close(1012, MOVED)
        self.mailbox.wake()

    # -- the mailbox ---------------------------------------------------------------------

    async def post(self, event: RoomEvent) -> None:
        """Queue an event; wait while the mailbox is full (the caller stops reading)."""
        mailbox = self.mailbox
        if len(mailbox.events) >= mailbox.size:
            await mailbox.wait_for_space()
        mailbox.put(event)
        self._ensure_running()

    def post_unbounded(self, event: RoomEvent) -> None:
        """Queue an event past the mailbox bound (see ``Mailbox``)."""
        self.mailbox.put(event)
        self._ensure_running()

    def _ensure_running(self) -> None:
        """Start the room's task if it is not running (a hibernated room wakes up)."""
        if not self.running:
            if self.peers:  # not running, yet connections: it was hibernated
                self.host.woke(self)
            self.running = True
            self.host.nursery.start_soon(self.run, name=f"room {self.label}")

    # -- the room's task -----------------------------------------------------------------

    async def run(self) -> None:
        """The room's task: one event at a time, timer ticks among them, until the room has
        been idle long enough to hibernate (connections kept) or unload (none left)."""
        mailbox, gate, batch = self.mailbox, self.gate, self.batch
        events = mailbox.events
        max_inflight = self.host.settings.max_inflight_commits
        burst = 0
        unload = True
        try:
            while True:
                if self.timers:
                    self._queue_ticks()
                if events:
                    if burst == 0 and len(events) > 1 and not batch.open:
                        batch.start()  # a burst: batch its writes
                    event = events.popleft()
                    mailbox.took()
                    self.evict_requested = False  # it is in use: only an idle room leaves
                    self._busy = True
                    handling = self._handle(event)
                    try:
                        trap = handling.send(None)
                    except StopIteration:
                        pass  # done without blocking: its writes may stay in the batch
                    else:  # it blocks (a storage read, a call): send the batch first
                        batch.flush()
                        await _resume(handling, trap)
                    self._busy = False
                    burst += 1
                    too_many_commits = gate.inflight >= max_inflight
                    if not events or burst >= _MAX_BURST or too_many_commits:
                        batch.flush()
                        burst = 0
                    if too_many_commits:
                        self._drained = trio.Event()
                        await self._drained.wait()
                    continue
                self.last_used = trio.current_time()
                self.host.mark_used(self)
                if gate.inflight:
                    await mailbox.sleep()  # commits on their way: woken when they land
                    continue
                if self.host.idle_event is not None:
                    self.host.went_idle()
                if self.timers:
                    with trio.move_on_at(min(timer.deadline for timer in self.timers)):
                        await mailbox.sleep()
                else:  # the host's sweeper wakes it when it has been idle too long
                    self.host.idle_soon(self)
                    await mailbox.sleep()
                if events or self._queue_ticks():
                    continue
                if self.evict_requested:
                    unload = not self.attached
                    return
        finally:
            batch.flush()
            self.evict_requested = False
            self._drop_instance()
            self.running = False
            if unload or not self.peers or self.fenced:
                self.host.forget(self)
            else:
                self.host.hibernated(self)

    async def _handle(self, event: RoomEvent) -> None:
        if not event.arrive(self):  # bookkeeping first: it happens even if the room fails
            return
        if self.fenced:
            event.moved(self)
            return
        try:
            room = self.instance
            if room is None:
                room = await self._start()
            started = perf_counter()
            result = await event.run(self, room)
            self._event_times.observe(perf_counter() - started)
        except Exception as exc:
            self._recover(event, exc)
            return
        if room is not self.instance:
            self._outrun(event)
            return
        self.commit()
        event.done(self, result)

    def _outrun(self, event: RoomEvent) -> None:
        """The instance ``event`` ran on left while it ran, across an await (an earlier
        commit failed, and the room restarts from storage): what it did was built on a state
        that is gone. Its writes, and what it sent after them, are dropped, as for a hook
        that raised; its origin is told to retry (a client is being closed with 1011)."""
        log.warning(
            "room %s: %s ran on across a restart; its writes dropped", self.label, event.hook
        )
        self._storage.rollback()
        self.gate.rollback()
        event.tell(self, "the room restarted from storage meanwhile: retry")

    async def _start(self) -> Room:
        instance = new_room(self.room_class, self)
        self.host.metrics.room_activations_total += 1
        try:
            await instance.on_start()
        except BaseException:
            self.timers.clear()  # set by the failed start: they end with it
            raise
        self.instance = instance
        self.host.started(self)
        return instance

    def _recover(self, event: RoomEvent, exc: Exception) -> None:
        """A hook raised: drop the event's writes and the outputs that depended on them,
        tell the event's origin, and restart the room from storage on its next event."""
        self.host.metrics.handler_errors_total += 1
        hook = "on_start" if self.instance is None else event.hook
        self._drop_instance()
        self.gate.rollback()
        event.failed(self, hook, exc)

    # -- leaving memory ------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No event queued or running, and every commit durable."""
        return not self.mailbox.events and not self._busy and not self.gate.inflight

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
                self.mailbox.events.append(Tick(timer))
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
            self.mailbox.wake()
