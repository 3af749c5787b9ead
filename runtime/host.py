"""The host: every room of one server process, at most one activation per room.

It starts rooms on demand (``activation``), is what the edge talks to (``attach`` and
``connected`` for a new connection, whose ``Peer`` then carries its messages; ``request``
for a plain HTTP request to a room), keeps the number of rooms in
memory bounded (least recently used idle rooms leave first, and a sweeper unloads or
hibernates rooms idle past their deadline), runs calls between rooms with a cycle check, and
fires alarms (``AlarmClock``). Each room itself is an ``Activation``.

In cluster mode (``directory`` set) a room's events go where the room lives: ``place`` finds
or claims it (``runtime.cluster``); the rooms this node holds run here, the others are reached
over the links to their nodes (``links``, ``runtime.link``). A room this node stops holding
is fenced: its clients are closed with 1012 and its activation leaves the host.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import trio

from rooms import CallCycleError, Request, Response, Room, RoomCallError, RoomId, Stub
from rooms._engine import make_stub, room_id_of

from .activation import Activation, Peer, room_label
from .config import Settings
from .events import Alarm, Call, Connect, Http, Operator, pack
from .gate import Reply, Transport
from .metrics import Metrics
from .placement import (
    ClusterUnavailable,
    Directory,
    NotHere,
    Owner,
    OwnerUnreachable,
    RemoteRooms,
    Room3,
)
from .seats import TICKET_PARAM, SeatRefused, Tickets, ticket_secret
from .storage import Backend

log = logging.getLogger("rooms.host")

T = TypeVar("T")


_PLACE_ATTEMPTS = 3  # a room that moved while it was being reached is looked up again
_UNREACHABLE_RETRY = 0.25  # seconds between looks at a room whose node cannot serve it


def is_stub_callable(room_class: type[Room], method: str) -> bool:
    """Whether ``method`` may be called through a stub: public, and not a Room hook."""
    if method.startswith("_") or hasattr(Room, method):
        return False
    return callable(getattr(room_class, method, None))


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
        directory: Directory | None = None,
    ) -> None:
        self.backend = backend
        self.directory = directory
        self.links: RemoteRooms | None = None  # cluster mode: set by the server
        self.settings = settings
        self.metrics = metrics
        self.nursery = nursery
        self.tickets = Tickets(ticket_secret(settings.ticket_secret, settings.cluster_token))
        self._activations: dict[tuple[str, str], Activation] = {}
        self._classes: dict[str, type[Room]] = {}
        for room_class in room_classes:
            self._register_class(room_class)
        self._to_flush: list[Activation] = []
        self.idle_event: trio.Event | None = None  # while someone waits for every room idle
        self._in_memory: OrderedDict[Activation, None] = OrderedDict()  # least recent first
        self._sweep = trio.CancelScope()  # the sweeper's sleep until it looks for idle rooms
        self._swept_at = -math.inf
        self.alarms = AlarmClock(self)
        nursery.start_soon(self._sweeper, name="rooms: idle sweeper")
        nursery.start_soon(self.alarms.run, name="rooms: alarms")
        if directory is not None:
            nursery.start_soon(self.alarms.orphans, name="rooms: alarms of dead nodes' rooms")

    @staticmethod
    def now() -> float:
        """Seconds since the epoch, as rooms see them."""
        return _wall_origin() + trio.current_time()

    def _register_class(self, room_class: type[Room]) -> None:
        known = self._classes.setdefault(room_class.namespace, room_class)
        if known is not room_class:
            raise RuntimeError(
                f"room classes {known.__qualname__} and {room_class.__qualname__} share the "
                f"storage namespace {room_class.namespace!r}; give one a distinct `namespace`"
            )

    def flush_soon(self, act: Activation) -> None:
        """Flush ``act``'s batch once the current run of storage answers is delivered
        (``flush_released``: the engine hands it to the backend's ``answered``)."""
        self._to_flush.append(act)

    def flush_released(self) -> None:
        acts, self._to_flush = self._to_flush, []
        for act in acts:
            act.batch.flush()

    def activation(self, room_class: type[Room], room_id: RoomId) -> Activation:
        """That room's activation (in memory, hibernated or new), its task started."""
        key = (room_class.namespace, room_id.hex)
        act = self._activations.get(key)
        if act is None:
            self._register_class(room_class)
            act = self._activations[key] = Activation(self, room_class, room_id)
            self.metrics.rooms_active += 1
            act._ensure_running()
        return act

    def room_class(self, namespace: str) -> type[Room] | None:
        return self._classes.get(namespace)

    # -- where rooms live (cluster mode) -------------------------------------------------

    async def place(self, room_class: type[Room], room_id: RoomId) -> Activation | Owner:
        """Where that room's events go: its activation here, or (cluster mode) the node that
        holds it. A room claimed here brings its stored alarm along."""
        directory = self.directory
        if directory is None:
            return self.activation(room_class, room_id)
        key = f"{room_class.namespace}/{room_id.hex}"
        claimed = key not in directory.epochs
        owner = await directory.locate(key)
        if owner.node_id != directory.node_id:
            return owner
        act = self.activation(room_class, room_id)
        if claimed:
            at = await self.backend.get_alarm(key)
            if at is not None and directory.epochs.get(key) == owner.epoch:
                self.alarms.schedule(act, at)
        return act

    def held(self, namespace: str, hex_id: str, name: str | None) -> Activation | None:
        """The activation of a room this node holds (for a peer's request); None if it does
        not hold it, or has no class of that namespace."""
        room_class = self._classes.get(namespace)
        if room_class is None or self.directory is None:
            return None
        if f"{namespace}/{hex_id}" not in self.directory.epochs:
            return None
        return self.activation(room_class, RoomId(hex_id, name))

    def rooms(self) -> list[dict[str, Any]]:
        """Every room the host knows of, for the operator (``room``): those with an
        activation, then those out of memory with an alarm set."""
        alarms = self.alarms.entries()
        known = [self._room_entry(act.key, alarms) for act in self._activations.values()]
        held = {act.key for act in self._activations.values()}
        return known + [self._room_entry(key, alarms) for key in alarms if key not in held]

    def room(self, key: str) -> dict[str, Any] | None:
        """The room ``key`` ("namespace/hex") for the operator: its key, label, class, name,
        state (in memory: "live"; connections kept, instance gone: "hibernated"; out of
        memory with an alarm set: "unloaded"), connections and alarm time (seconds since
        the epoch); None if the host knows nothing of it."""
        alarms = self.alarms.entries()
        return self._room_entry(key, alarms) if self.known(key) or key in alarms else None

    def _room_entry(
        self, key: str, alarms: dict[str, tuple[float, type[Room], RoomId]]
    ) -> dict[str, Any]:
        act, alarm = self.known(key), alarms.get(key)
        if act is not None:
            room_class, room_id = act.room_class, act.room_id
            state = "live" if act.instance is not None else "hibernated"
        else:
            assert alarm is not None
            _, room_class, room_id = alarm
            state = "unloaded"
        return {
            "key": key,
            "label": room_label(room_class, room_id),
            "room_class": room_class.__name__,
            "name": room_id.name,
            "state": state,
            "connections": 0 if act is None else len(act.peers),
            "alarm": None if alarm is None else alarm[0],
        }

    def known(self, key: str) -> Activation | None:
        """The activation of the room ``key`` ("namespace/hex") if this host has one."""
        namespace, _, hex_id = key.partition("/")
        return self._activations.get((namespace, hex_id))

    async def operate(self, act: Activation, action: str, args: dict[str, Any]) -> str:
        """Run an operator's action (``events.Operator``) as an event of ``act``'s room, in
        its order; what it did."""
        reply = Reply()
        await act.post(Operator(action, args, reply))
        done: str = await reply.wait()
        return done

    def fence(self, act: Activation, why: str) -> None:
        """This node no longer holds ``act``'s room: it leaves the host, its clients are
        closed with 1012 (they reconnect and reach the room where it lives now)."""
        self.forget(act)
        if self.directory is not None:
            self.directory.forget(act.key)
        act.fence(why)

    def fence_all(self, why: str) -> None:
        """This node stopped holding every room (it lost its lease)."""
        for act in list(self._activations.values()):
            self.fence(act, why)

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

    def mark_used(self, act: Activation) -> None:
        """``act`` just handled events: it becomes the last to leave memory."""
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

    async def wait_idle(self) -> None:
        """Until every room is idle (``idle``): a drain, or a test settling."""
        while not self.idle():
            self.idle_event = trio.Event()
            await self.idle_event.wait()

    def went_idle(self) -> None:
        """A room went idle while someone waits in ``wait_idle``: let it look again."""
        if self.idle_event is not None:
            self.idle_event.set()
            self.idle_event = None

    def known_activation(self, room_class: type[Room], room_id: RoomId) -> Activation | None:
        """That room's activation if it has one (in memory or hibernated; not unloaded)."""
        return self._activations.get((room_class.namespace, room_id.hex))

    def in_memory(self, room_class: type[Room], room_id: RoomId) -> bool:
        """Whether that room's task runs (it is in memory, not hibernated or unloaded)."""
        act = self.known_activation(room_class, room_id)
        return act is not None and act.running

    # -- entry points for the edge -------------------------------------------------------

    def attach(self, act: Activation, transport: Transport, request: Request) -> Peer:
        """A place for a new connection in the room, with a seat if it gets one
        (``runtime.seats``: its ticket, if any, is checked and spent here); SeatRefused if
        the room is full (``max_connections_per_room``, or no seat where one is needed),
        locked, or the ticket is not good."""
        if act.attached >= self.settings.max_connections_per_room:
            self.metrics.limit_room_connections_total += 1
            raise SeatRefused(503, "room is full")
        token, now = request.query_param(TICKET_PARAM), self.now()
        try:
            ticket = None if token is None else self.tickets.check(token, act.key, now)
            seated = act.seats.take(ticket, now)
        except SeatRefused as refused:
            if refused.ticket:
                self.metrics.tickets_refused_total += 1
            else:
                self.metrics.limit_seats_total += 1
            raise
        act.attached += 1
        return Peer(act, transport, request, seated)

    async def connected(self, peer: Peer) -> None:
        await peer.activation.post(Connect(peer))

    async def reach(
        self,
        room_class: type[Room],
        room_id: RoomId,
        here: Callable[[Activation], Awaitable[T]],
        there: Callable[[RemoteRooms, Owner, Room3], Awaitable[T]],
    ) -> T:
        """``here(activation)`` if the room lives on this node, else ``there(links, owner,
        room)``; looked up again if it moved meanwhile (``NotHere``), a few times; while its
        node misses its lease renewals and cannot serve it (unreachable, or fenced), again
        and again until that node is found dead and the room can be claimed."""
        moves, give_up_at = 0, None
        while True:
            placed = await self.place(room_class, room_id)
            try:
                if isinstance(placed, Activation):
                    return await here(placed)
                assert self.links is not None
                return await there(
                    self.links, placed, (room_class.namespace, room_id.hex, room_id.name)
                )
            except (NotHere, OwnerUnreachable) as exc:
                assert self.directory is not None and isinstance(placed, Owner)
                if give_up_at is None and not await self.directory.renewing(placed.node_id):
                    # Its node misses its renewals: cut off from the database, it fenced
                    # itself (NotHere) or cannot answer at all. Its lease runs out, it is
                    # found dead and the room claimed again: wait for that rather than turn
                    # the client away to try its luck elsewhere.
                    give_up_at = trio.current_time() + self.directory.dead_within
                if give_up_at is not None:
                    if trio.current_time() >= give_up_at:
                        raise ClusterUnavailable(
                            f"room {room_id.hex[:12]}: its node stopped answering: retry"
                        ) from None
                    await trio.sleep(_UNREACHABLE_RETRY)
                elif isinstance(exc, OwnerUnreachable):
                    raise  # it renews: cut off from this node only, so another may reach it
                else:
                    moves += 1
                    if moves == _PLACE_ATTEMPTS:
                        raise ClusterUnavailable(
                            f"room {room_id.hex[:12]} keeps moving between nodes: retry"
                        ) from None
            self.moved(room_class, room_id)

    async def request(self, room_class: type[Room], room_id: RoomId, request: Request) -> Response:
        """A plain HTTP request to a room, wherever it lives."""
        return await self.reach(
            room_class,
            room_id,
            lambda act: self.request_here(act, request),
            lambda links, owner, room: links.request(owner, room, request),
        )

    async def request_here(self, act: Activation, request: Request) -> Response:
        reply = Reply()
        await act.post(Http(request, reply))
        response: Response = await reply.wait()
        return response

    def moved(self, room_class: type[Room], room_id: RoomId) -> None:
        """The room was not where it was thought to be: look it up again next time."""
        assert self.directory is not None  # (only a cluster's rooms move)
        self.directory.forget(f"{room_class.namespace}/{room_id.hex}")

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
        if not is_stub_callable(room_class, method):
            raise RoomCallError(
                f"{room_class.__name__} has no method {method!r} that can be called through a "
                "stub (public methods defined by the room class only)"
            )
        payload = pack((list(args), kwargs), f"the arguments of {method}()")
        room_id = room_id_of(room)
        # The rooms whose calls wait on this one: a call back to any of them is a cycle,
        # wherever they live (the chain travels with calls between nodes).
        chain = [*caller.chain, caller.key] if caller is not None else []
        return await self.reach(
            room_class,
            room_id,
            lambda act: self.call_here(act, method, payload, chain, caller),
            lambda links, owner, room: links.call(owner, room, method, payload, chain),
        )

    async def call_here(
        self,
        target: Activation,
        method: str,
        payload: bytes,
        chain: list[str],
        caller: Activation | None = None,
    ) -> Any:
        """A call to a room of this host, from ``caller`` here or (``chain``) elsewhere."""
        if caller is target or target.key in chain or (caller and _waits_for(target, caller)):
            where = caller.label if caller is not None else chain[-1]
            raise CallCycleError(
                f"room {where} calling {method}() on {target.label} would wait on itself (a "
                "call cycle); restructure the calls, e.g. return data instead of calling back"
            )
        if caller is not None:
            caller.waiting_on.add(target)
        try:
            reply = Reply()
            await target.post(Call(method, payload, reply, chain))
            return await reply.wait()
        finally:
            if caller is not None:
                caller.waiting_on.discard(target)

    def stub(self, room_class: type[Room], room: str | RoomId) -> Stub:
        """A stub for code outside any room (plain HTTP routes, tests)."""
        return make_stub(self.call, room_class, room)


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


_ORPHAN_SWEEP_SECONDS = 1.0


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

    def entries(self) -> dict[str, tuple[float, type[Room], RoomId]]:
        """The alarms scheduled, by room key: when, and the room."""
        return {key: (at, cls, room_id) for key, (at, _, cls, room_id) in self._due.items()}

    def changed(self, act: Activation, at: float | None) -> None:
        """``act`` set its alarm to ``at`` (None: deleted), in a commit on its way to disk."""
        if at is None:
            self._due.pop(act.key, None)
        else:
            self._schedule(act.key, at, 0, act.room_class, act.room_id)

    def retry(self, act: Activation, delay: float, attempt: int) -> None:
        self._schedule(act.key, self.host.now() + delay, attempt, act.room_class, act.room_id)

    def schedule(self, act: Activation, at: float) -> None:
        """``act``'s room, claimed here, has its alarm stored for ``at``."""
        self._schedule(act.key, at, 0, act.room_class, act.room_id)

    async def orphans(self) -> None:
        """Cluster mode: every second, claim the rooms whose alarm is due and whose node
        died (the claim schedules the alarm here), so that it fires, at least once."""
        host = self.host
        assert host.directory is not None
        while True:
            await trio.sleep(_ORPHAN_SWEEP_SECONDS)
            try:
                due = await host.directory.due_alarms()
                for key, _, name in due:
                    namespace, _, hex_id = key.partition("/")
                    room_class = host.room_class(namespace)
                    if room_class is not None:
                        await host.place(room_class, RoomId(hex_id, name))
            except Exception as exc:  # the database is away: the next sweep tries again
                log.warning("cannot look for the due alarms of dead nodes' rooms: %s", exc)

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
            directory = self.host.directory
            if directory is not None and key not in directory.epochs:
                continue  # the room moved: its alarm fires where it lives now
            _, attempt, room_class, room_id = entry
            self.host.metrics.alarms_fired_total += 1
            self.host.activation(room_class, room_id).post_unbounded(Alarm(attempt))


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
