"""A room's events, one class per kind, each holding everything particular to its kind, and
the mailbox that queues them.

The room's task (``Activation``) treats every event alike: ``arrive`` (bookkeeping that must
happen even if the room cannot start; False drops the event), ``run`` (the hook, on the
room's instance), then, once the event's writes went to storage, ``done`` with the result;
if the hook raised, ``failed``, which tells the event's origin. Adding a kind of event is one
class here (as h11 keeps a state machine's rules in one table).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import trio

from rooms import HTTPError, Request, Response, Room, RoomCallError
from rooms._engine import decode, encode, error_response

from .gate import Reply
from .metrics import Metrics
from .placement import NotHere

if TYPE_CHECKING:
    from .activation import Activation, Peer, Timer

log = logging.getLogger("rooms.host")

ALARM_RETRIES = 6
"""Times a failing on_alarm is retried (after 1, 2, 4... seconds) before it is given up."""

MOVED = "room moved to another node: reconnect"
_START_FAILED = "the room failed to start"
_HOOK_FAILED = "internal error in the room"


@attrs.define(slots=True, eq=False)
class _Event:
    hook: ClassVar[str]
    """What runs, as logs name it."""
    report: ClassVar[str] = ""
    """What the event's origin was told when its hook raised."""

    def arrive(self, act: Activation) -> bool:
        return True

    def done(self, act: Activation, result: Any) -> None:
        pass

    def failed(self, act: Activation, hook: str, exc: Exception) -> None:
        """``hook`` raised ``exc``: log it and tell the origin. The room restarts."""
        log.error(
            "room %s: %s raised; %s. The room restarts from storage on its next event.",
            act.label,
            hook,
            self.report,
            exc_info=exc,
        )
        self.tell(act, _START_FAILED if hook == "on_start" else _HOOK_FAILED)

    def tell(self, act: Activation, problem: str) -> None:
        pass

    def moved(self, act: Activation) -> None:
        """The room moved to another node before this event ran (cluster mode): tell the
        origin to look for it there."""


@attrs.define(slots=True, eq=False)
class Connect(_Event):
    hook: ClassVar[str] = "on_connect"
    report: ClassVar[str] = "the connection was closed with 1011"
    peer: Peer

    def arrive(self, act: Activation) -> bool:
        act.peers[self.peer.conn.id] = self.peer
        return True

    async def run(self, act: Activation, room: Room) -> None:
        await room.on_connect(self.peer.conn, self.peer.conn.request)

    def tell(self, act: Activation, problem: str) -> None:
        act.peers.pop(self.peer.conn.id, None)
        self.peer.close(1011, problem)

    def moved(self, act: Activation) -> None:
        self.peer.transport.close(1012, MOVED)


@attrs.define(slots=True, eq=False)
class Message(_Event):
    hook: ClassVar[str] = "on_message"
    report: ClassVar[str] = "the sender's connection was closed with 1011"
    peer: Peer
    data: str | bytes

    def arrive(self, act: Activation) -> bool:
        return self.peer.conn.id in act.peers  # not if it failed to join, or already left

    async def run(self, act: Activation, room: Room) -> None:
        await room.on_message(self.peer.conn, self.data)

    def tell(self, act: Activation, problem: str) -> None:
        self.peer.close(1011, problem)


@attrs.define(slots=True, eq=False)
class Closed(_Event):
    """The connection ended with ``code``. With ``send_close`` the edge wants the Close
    frame sent in the room's output order: after every answer to what the client sent."""

    hook: ClassVar[str] = "on_close"
    report: ClassVar[str] = "the connection was already gone"
    peer: Peer
    code: int
    reason: str
    send_close: bool

    def arrive(self, act: Activation) -> bool:
        if self.send_close:
            self.peer.close(self.code, self.reason)
        act.attached -= 1
        act.seats.leave(self.peer.conn.seated)
        return act.peers.pop(self.peer.conn.id, None) is not None

    async def run(self, act: Activation, room: Room) -> None:
        await room.on_close(self.peer.conn, self.code, self.reason)


@attrs.define(slots=True, eq=False)
class Http(_Event):
    hook: ClassVar[str] = "on_request"
    report: ClassVar[str] = "the request was answered with 500"
    request: Request
    reply: Reply

    async def run(self, act: Activation, room: Room) -> Response:
        try:
            response = await room.on_request(self.request)
        except HTTPError as exc:
            return error_response(exc)
        if not isinstance(response, Response):
            raise TypeError(f"on_request returned {response!r}, not a rooms.Response")
        return response

    def done(self, act: Activation, result: Any) -> None:
        act.gate.emit(self.reply.set, result)

    def tell(self, act: Activation, problem: str) -> None:
        act.gate.emit(self.reply.set, Response.text(problem, 500))

    def moved(self, act: Activation) -> None:
        self.reply.fail(NotHere(MOVED))


@attrs.define(slots=True, eq=False)
class Call(_Event):
    """A method called through a stub; arguments and result travel as msgpack."""

    hook: ClassVar[str] = "the called method"
    method: str
    payload: bytes
    reply: Reply
    chain: list[str]
    """The rooms whose calls wait on this one (the cycle check's, across nodes)."""

    async def run(self, act: Activation, room: Room) -> Any:
        args, kwargs = decode(self.payload)
        act.chain = self.chain
        try:
            result = getattr(room, self.method)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        finally:
            act.chain = []
        return decode(pack(result, f"the result of {self.method}()"))

    def done(self, act: Activation, result: Any) -> None:
        act.gate.emit(self.reply.set, result)

    def failed(self, act: Activation, hook: str, exc: Exception) -> None:
        # The caller gets the exception itself; it is the caller's to handle or log.
        log.info("room %s: %s for call %s() raised %r", act.label, hook, self.method, exc)
        act.gate.emit(self.reply.fail, exc)

    def moved(self, act: Activation) -> None:
        self.reply.fail(NotHere(MOVED))


@attrs.define(slots=True, eq=False)
class Tick(_Event):
    hook: ClassVar[str] = "a timer callback"
    report: ClassVar[str] = "the room's timers were stopped"
    timer: Timer

    def arrive(self, act: Activation) -> bool:
        timer = self.timer
        timer.queued = False
        if not timer.active:
            return False  # cancelled, or its instance is gone
        timer.advance()
        return True

    async def run(self, act: Activation, room: Room) -> None:
        result = self.timer.callback()
        if inspect.isawaitable(result):
            await result


@attrs.define(slots=True, eq=False)
class Alarm(_Event):
    """The room's stored alarm came due (``retry``: how many times it failed so far)."""

    hook: ClassVar[str] = "on_alarm"
    retry: int

    async def run(self, act: Activation, room: Room) -> None:
        # Storage is the truth: the alarm may have been deleted or moved since.
        at = await act.storage.get_alarm()
        if at is None or at > act.host.now():
            return
        act.storage.delete_alarm()  # before the handler, which may set the next one
        await room.on_alarm(self.retry)

    def failed(self, act: Activation, hook: str, exc: Exception) -> None:
        retry = self.retry
        if retry < ALARM_RETRIES:
            delay = 2.0**retry
            log.warning(
                "room %s: %s raised %r; retry %d of %d in %g s",
                act.label,
                hook,
                exc,
                retry + 1,
                ALARM_RETRIES,
                delay,
                exc_info=exc,
            )
            act.host.alarms.retry(act, delay, retry + 1)
            return
        log.error(
            "room %s: %s raised %r on its last retry (%d); the alarm is deleted",
            act.label,
            hook,
            exc,
            retry,
            exc_info=exc,
        )
        act.storage.delete_alarm()
        act.commit()


def pack(value: Any, what: str) -> bytes:
    """``value`` as msgpack for a call; RoomCallError naming ``what`` if it cannot be."""
    try:
        return encode(value, what)
    except TypeError as exc:
        raise RoomCallError(str(exc)) from None


@attrs.define(slots=True, eq=False)
class Operator(_Event):
    """An operator's action from the admin page, run in the room's own order: ``close`` one
    connection (``connection``, ``code``, ``reason``), send a ``notice`` (``text``) to every
    client, or ``evict`` the room from memory (it hibernates if it has connections)."""

    hook: ClassVar[str] = "an operator's action"
    report: ClassVar[str] = "the operator was answered 500"
    action: str
    args: dict[str, Any]
    reply: Reply

    async def run(self, act: Activation, room: Room) -> str:
        if self.action == "close":
            peer = act.peers.get(self.args["connection"])
            if peer is None:
                return "no such connection in this room"
            peer.conn.close(self.args["code"], self.args["reason"])
            return f"connection {peer.conn.id} closed with {self.args['code']}"
        if self.action == "notice":
            act.broadcast(json.dumps({"notice": self.args["text"]}), (), None)
            return f"notice sent to {len(act.peers)} connections"
        act.evict()
        return "the room leaves memory once this event is done"

    def done(self, act: Activation, result: Any) -> None:
        act.gate.emit(self.reply.set, result)

    def tell(self, act: Activation, problem: str) -> None:
        act.gate.emit(self.reply.set, problem)

    def moved(self, act: Activation) -> None:
        self.reply.fail(NotHere(MOVED))


RoomEvent = Connect | Message | Closed | Http | Call | Tick | Alarm | Operator


class Mailbox:
    """A room's queue of events, and where its task waits for the next one.

    What clients send is bounded: while ``size`` events are queued the sender waits in
    ``wait_for_space`` (so the edge stops reading its socket). Closes and alarms are not
    (they are bounded by the connections and alarms, and a reader that is shutting down
    cannot wait). ``put`` queues either. The room's task takes ``events`` itself and calls
    ``took``; it parks in ``sleep`` until ``wake`` (cheaper than a ``trio.Event`` per wait,
    on the hot path)."""

    __slots__ = ("_metrics", "_sleeper", "_space", "events", "size")

    def __init__(self, size: int, metrics: Metrics) -> None:
        self.events: deque[RoomEvent] = deque()
        self.size = size
        self._metrics = metrics
        self._space = trio.lowlevel.ParkingLot()  # senders waiting for room in the queue
        self._sleeper: trio.lowlevel.Task | None = None  # the room's task, while it sleeps

    async def wait_for_space(self) -> None:
        """Until fewer than ``size`` events are queued."""
        while len(self.events) >= self.size:
            self._metrics.limit_mailbox_full_total += 1
            await self._space.park()

    def put(self, event: RoomEvent) -> None:
        self.events.append(event)
        self.wake()

    def took(self) -> None:
        """The task took an event: one waiting sender may go on."""
        if self._space:
            self._space.unpark()

    def wake(self) -> None:
        task = self._sleeper
        if task is not None:
            self._sleeper = None
            trio.lowlevel.reschedule(task)

    async def sleep(self) -> None:
        """Until ``wake`` (or the caller's cancel scope ends the wait)."""
        self._sleeper = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._sleeper = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
