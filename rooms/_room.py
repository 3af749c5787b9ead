"""The classes users write against: Room (one subclass per kind of room) and Connection."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from ._codec import encode
from ._http import HTTPError, Request, Response, upgrade_required
from ._ids import RoomId, is_room_id

if TYPE_CHECKING:  # the contract names its consumers; at run time it imports this module
    from ._engine import ConnectionLink, RoomContext, Storage, Timer

MAX_STATE_BYTES = 16 * 1024

_log = logging.getLogger("rooms")


class _RoomLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"room {self.extra['room']}: {msg}", kwargs  # type: ignore[index]


class Connection:
    """One WebSocket client of a room.

    ``id`` is unique within the server. ``request`` is the HTTP upgrade request (headers,
    query, client address). ``tags`` label the connection for ``Room.broadcast(tag=...)`` and
    ``Room.connections(tag)``. ``state`` is a small msgpack-encodable attachment (at most
    16 KiB encoded) that lives as long as the connection, across room restarts. ``seated``:
    whether it holds one of the room's seats (``Room.max_clients``; False: it watches).
    ``relayed``: the last message of this connection the server relayed for the room
    (``Room.relay_prefix``), or None.
    """

    __slots__ = ("_link", "_state", "id", "relayed", "request", "seated", "tags")

    def __init__(
        self, link: ConnectionLink, id: str, request: Request, seated: bool = True
    ) -> None:
        self._link = link
        self._state: Any = None
        self.id = id
        self.request = request
        self.seated = seated
        self.relayed: bytes | None = None
        self.tags: set[str] = set()

    def send(self, message: str | bytes) -> None:
        """Queue a text (``str``) or binary (``bytes``) message to this client. Never blocks."""
        self._link.send(message)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code`` and ``reason``. The Close frame goes out
        after the messages sent to this client before it (and, like them, once the writes
        before it are durable). ``code`` is one a Close frame may carry (1000-1003,
        1007-1014 or 3000-4999; others raise ValueError); 4400-4499 tell
        ``/_rooms/client.js`` and ``rooms.client`` not to reconnect."""
        if not is_valid_close_code(code):
            raise ValueError(
                f"close code {code} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999"
            )
        self._link.close(code, reason)

    @property
    def state(self) -> Any:
        """A value kept with this connection for as long as it is open, across hibernation
        and room restarts: anything msgpack encodes, at most 16 KiB encoded (a larger or
        unencodable value raises ValueError or TypeError when assigned). Default None."""
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        size = len(encode(value, "connection state"))
        if size > MAX_STATE_BYTES:
            raise ValueError(
                f"connection state is {size} bytes encoded; the limit is {MAX_STATE_BYTES}"
            )
        self._state = value

    def __repr__(self) -> str:
        return f"<Connection {self.id}>"


class Stub:
    """A handle on another room: ``await stub.some_method(*args)`` runs ``some_method`` as an
    event in that room, after the events already queued there, and returns its result or
    raises its exception. Arguments and results are copied through msgpack."""

    __slots__ = ("_call", "_label")

    def __init__(
        self, call: Callable[[str, tuple[Any, ...], dict[str, Any]], Awaitable[Any]], label: str
    ) -> None:
        self._call = call
        self._label = label

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        if method.startswith("_"):
            raise AttributeError(method)

        def invoke(*args: Any, **kwargs: Any) -> Awaitable[Any]:
            return self._call(method, args, kwargs)

        return invoke

    def __repr__(self) -> str:
        return f"<Stub {self._label}>"


class Room:
    """Base class of a kind of room. Subclass it and override the ``on_*`` hooks.

    The engine keeps at most one live instance per room id and delivers its events (connect,
    message, close, HTTP request, calls from other rooms) one at a time, in arrival order: a
    hook runs to completion, across its awaits, before the next event starts. Keep lasting
    state in ``self.storage`` (or per connection in ``conn.state``); attributes are lost when
    the room restarts (after an error, or when it hibernates or is unloaded while idle). Do
    setup in ``on_start``, which runs after every start.

    Class settings (class attributes of the subclass):

    - ``namespace``: the storage namespace of this class (default: the class name). Set it
      explicitly to rename a class without losing its data.
    - ``max_name_length``: longest room name ``resolve`` accepts (default 64).
    - ``allowed_origins``: the ``Origin`` values a browser may connect from, e.g.
      ``("https://example.com",)``; others get 403 at the upgrade. None (default): any. A
      request without ``Origin`` (not a browser) is not checked.
    - ``hibernate_after``: seconds without events after which a room that still has
      connections hibernates: its instance leaves memory, its connections stay open with
      their ``state`` and ``tags``, and the next event starts it again (``on_start``, then
      the event). Not while timers run. None: never. Default 10.
    - ``auto_reply``: a pair ``(request, reply)`` of text messages, e.g. ``("ping",
      "pong")``: a message equal to ``request`` is answered with ``reply`` by the server
      itself, without reaching ``on_message`` (a heartbeat for ``/_rooms/client.js``, which
      costs the room nothing). Default None: every message reaches the room.
    - ``first_message_timeout``: seconds a new connection may stay silent before its first
      message (any message, ``auto_reply`` ones included); then the server closes it with
      1008 without waking the room, so connections that never speak cannot pile up. For
      rooms whose clients start with a message (a join, a hello); 0: never. Default None:
      the server's ``first_message_timeout`` setting (0 unless set).
    - ``relay_prefix``: a prefix of binary messages (e.g. ``b"\\x01"``) that the server sends on to
      every connection of the room, the sender's included, without waking the room, keeping
      each connection's last one as ``conn.relayed``: presence traffic such as Yjs awareness
      (renewed every 15 s per client) that would otherwise keep an idle room in memory. Such
      messages never reach ``on_message``, and the room does not check them. Default None.
    - ``max_clients``: seats. At most this many connections of a room hold one
      (``conn.seated``); the edge takes and counts them as connections attach, on the node
      that holds the room, so simultaneous joins never take more and never see a false
      "full". A connection with a seat ticket (``seat_ticket``, in ``?ticket=``) takes a
      seat; one without takes a free seat unless ``seats_by_ticket``. None (default): no
      limit, every connection is seated.
    - ``seats_by_ticket``: seats only for connections with a ticket. Default False.
    - ``when_full``: what a connection gets when no seat is free (full, locked, or no
      ticket where one is needed): ``"refuse"`` (default: 503 full, 403 locked, 401 no
      ticket) or ``"watch"`` (it joins without a seat).
    """

    hibernate_after: ClassVar[float | None] = 10.0
    namespace: ClassVar[str] = ""
    max_name_length: ClassVar[int] = 64
    auto_reply: ClassVar[tuple[str, str] | None] = None
    allowed_origins: ClassVar[tuple[str, ...] | None] = None
    first_message_timeout: ClassVar[float | None] = None
    relay_prefix: ClassVar[bytes | None] = None
    max_clients: ClassVar[int | None] = None
    seats_by_ticket: ClassVar[bool] = False
    when_full: ClassVar[str] = "refuse"

    _ctx: RoomContext

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("namespace"):
            cls.namespace = cls.__name__
        if cls.when_full not in ("refuse", "watch"):
            raise ValueError(f"{cls.__name__}.when_full must be 'refuse' or 'watch'")
        if cls.max_clients is not None and cls.max_clients < 0:
            raise ValueError(f"{cls.__name__}.max_clients must be a number of seats, or None")

    # -- hooks ----------------------------------------------------------------------------

    @classmethod
    async def on_before_connect(cls, request: Request) -> Any:
        """Runs at the edge before a WebSocket upgrade to a room of this class, without
        waking the room (as PartyKit's onBeforeConnect). Raise ``HTTPError(401, "...")`` (or
        403...) to refuse the upgrade with that status and body; the value returned becomes
        ``request.identity`` (``conn.request.identity`` in the room). Default: None."""
        return None

    async def on_start(self) -> None:
        """Runs after every activation, before the event that caused it."""

    async def on_connect(self, conn: Connection, request: Request) -> None:
        """A WebSocket client joined. Raise to refuse it (it is closed with 1011)."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        """A complete message arrived: ``str`` for text frames, ``bytes`` for binary."""

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        """A client left. ``code`` is 1006 when the TCP connection dropped without a Close."""

    async def on_alarm(self, retry_count: int) -> None:
        """This room's alarm (``set_alarm``) is due. Runs at least once per alarm, even if
        the room was hibernated, unloaded or the server restarted (an alarm missed while the
        server was down fires at start). If it raises, it is retried after 1, 2, 4... seconds
        with ``retry_count`` 1, 2, 3..., six times, then the alarm is deleted and logged."""

    async def on_request(self, request: Request) -> Response:
        """A plain HTTP request routed to this room. The default answers 426 (the route
        expects a WebSocket upgrade)."""
        return upgrade_required()

    # -- addressing -----------------------------------------------------------------------

    @classmethod
    def resolve(cls, name: str) -> RoomId:
        """Turn the ``{name}`` of a URL into a room id.

        The default accepts a 64-hex room id as is (a private room handed out by
        ``RoomId.unique()``) and derives an id from any other name of 1 to
        ``max_name_length`` printable characters. Raise ``HTTPError`` to refuse a name.
        """
        if is_room_id(name):
            return RoomId.from_string(name)
        if not name or len(name) > cls.max_name_length:
            raise HTTPError(400, f"room name must be 1 to {cls.max_name_length} characters")
        if not name.isprintable():
            raise HTTPError(400, "room name must not contain control characters")
        return RoomId.from_name(name)

    # -- what a room can do ---------------------------------------------------------------

    @property
    def id(self) -> RoomId:
        """This room's id."""
        return self._ctx.room_id

    @property
    def name(self) -> str | None:
        """The name this room's id was derived from, or None for a unique id."""
        return self._ctx.room_id.name

    @property
    def storage(self) -> Storage:
        """This room's durable storage (see ``rooms.Storage``)."""
        return self._ctx.storage

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose messages start with this room's class and id."""
        return _RoomLog(_log, {"room": f"{type(self).__name__}:{self.id.hex[:12]}"})

    def broadcast(
        self,
        message: str | bytes,
        exclude: Iterable[Connection | str] = (),
        tag: str | None = None,
    ) -> None:
        """Send ``message`` to every connection of this room (or those with ``tag``), except
        those in ``exclude``. The frame is encoded once; every recipient sees the room's
        broadcasts in the same order."""
        excluded: Collection[str] = (
            () if not exclude else {c if isinstance(c, str) else c.id for c in exclude}
        )
        self._ctx.broadcast(message, excluded, tag)

    def connections(self, tag: str | None = None) -> list[Connection]:
        """The open connections of this room, or those carrying ``tag``."""
        return self._ctx.connections(tag)

    def now(self) -> float:
        """Seconds since the epoch (virtual under a test's mock clock): for alarm times."""
        return self._ctx.now()

    def every(self, interval: float, callback: Callable[[], Any]) -> Timer:
        """Call ``callback()`` (a function or coroutine function) every ``interval`` seconds,
        as an event of this room, serial with its messages: a game loop. A late tick is not
        made up for. It runs as long as this instance: a room with running timers does not
        hibernate; a restart ends them (start them again in ``on_start``)."""
        if interval <= 0:
            raise ValueError(f"timer interval must be positive, got {interval}")
        return self._ctx.start_timer(interval, interval, callback)

    def after(self, delay: float, callback: Callable[[], Any]) -> Timer:
        """Call ``callback()`` once, ``delay`` seconds from now, as an event of this room. In
        memory only: for a time that must survive restarts, use ``set_alarm``."""
        return self._ctx.start_timer(max(0.0, delay), None, callback)

    def set_alarm(self, when: float | datetime.datetime) -> None:
        """Set this room's one alarm (replacing any other) to ``when``: seconds since the
        epoch (``self.now() + 60``) or an aware datetime. Stored durably with the event's
        writes; ``on_alarm`` runs when it is due (see there)."""
        if isinstance(when, datetime.datetime):
            if when.tzinfo is None:
                raise ValueError(
                    "set_alarm needs an aware datetime (e.g. datetime.now(UTC) + timedelta(...)) "
                    "or seconds since the epoch (self.now() + 60)"
                )
            when = when.timestamp()
        self._ctx.storage.set_alarm(float(when))

    async def get_alarm(self) -> float | None:
        """When this room's alarm is due (seconds since the epoch), or None."""
        return await self._ctx.storage.get_alarm()

    def delete_alarm(self) -> None:
        """Cancel this room's alarm, if any."""
        self._ctx.storage.delete_alarm()

    def lock(self) -> None:
        """Take no new players: no seat is given until ``unlock`` (connections already in
        keep theirs; new ones are refused with 403, or watch, as ``when_full`` says). In
        memory: the lock ends when the room leaves memory with no connections."""
        self._ctx.seats.locked = True

    def unlock(self) -> None:
        """Give seats again (see ``lock``)."""
        self._ctx.seats.locked = False

    @property
    def locked(self) -> bool:
        """Whether ``lock`` holds."""
        return self._ctx.seats.locked

    def seat_ticket(
        self, room_class: type[Room], room: str | RoomId, identity: Any = None, ttl: float = 15.0
    ) -> str:
        """A seat ticket for one connection to that room as ``identity`` (anything msgpack
        encodes; it becomes ``request.identity`` there unless ``on_before_connect`` gives one,
        which must then be equal), good for ``ttl`` seconds and once. The client passes it
        in the upgrade URL's query as ``?ticket=``; the edge checks it without waking either
        room. What a lobby hands out."""
        room_id = room if isinstance(room, RoomId) else room_class.resolve(room)  # (as its URL)
        return self._ctx.issue_ticket(f"{room_class.namespace}/{room_id.hex}", identity, ttl)

    def stub(self, room_class: type[Room], room: str | RoomId) -> Stub:
        """A stub to call public methods of another room, by name or id.

        Calls that would close a cycle (this room calls B which, directly or through other
        rooms, calls this room back while this room waits) fail at once with
        ``CallCycleError`` instead of deadlocking.
        """
        return make_stub(self._ctx.call, room_class, room)


RoomCall = Callable[
    [type[Room], "str | RoomId", str, tuple[Any, ...], dict[str, Any]], Awaitable[Any]
]
"""Runs a method of a room: (room class, room, method, args, kwargs) -> its result."""


def make_stub(call: RoomCall, room_class: type[Room], room: str | RoomId) -> Stub:
    """A stub on ``room`` whose calls go through ``call`` (a room's own, or the host's)."""

    def invoke(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Awaitable[Any]:
        return call(room_class, room, method, args, kwargs)

    return Stub(invoke, f"{room_class.__name__}:{room}")


def new_room(room_class: type[Room], context: RoomContext) -> Room:
    """An instance of ``room_class`` bound to the engine's ``context`` before its
    ``__init__`` runs (so that ``__init__`` may already use ``self.id``)."""
    room = room_class.__new__(room_class)
    room._ctx = context
    room.__init__()  # type: ignore[misc]
    return room


def is_valid_close_code(code: int) -> bool:
    """Whether a Close frame may carry ``code`` (RFC 6455 7.4 and the IANA registry): the
    rule for codes a room sends and codes a client sends alike."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class CallCycleError(RuntimeError):
    """A room-to-room call would wait on itself (A calls B calls A): it fails instead of
    deadlocking."""


class RoomCallError(RuntimeError):
    """A call to another room could not be made (unknown method, unencodable arguments)."""
