"""The client's node of a link (``runtime.link`` has the protocol): ``Links`` opens this
node's one link to each peer whose rooms its clients use (``OutLink``), and a client whose
room lives there is a ``Forwarded`` target whose messages cross it."""

from __future__ import annotations

import builtins
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from rooms import Request, Response, Room, RoomCallError, RoomId
from rooms._engine import text_error

from .activation import room_label
from .dial import ClientSocket, connect
from .frames import Close, Ping, ProtocolError, encode_message
from .gate import Reply, Transport
from .handshake import HandshakeError
from .link import (
    ATTACH,
    CALL,
    CALL_ERRORS,
    CLOSE,
    CONNECT,
    ENDED,
    JOINED,
    LINK_PATH,
    MESSAGE,
    OPERATOR,
    PAUSE,
    PROTOCOL,
    REQUEST,
    RESUME,
    SEND,
    TO_EDGE,
    link_timing,
    pack,
    request_to_wire,
    unpack,
)
from .metrics import Metrics
from .placement import ClusterUnavailable, NotHere, Owner, OwnerUnreachable, Room3
from .stream import ConnectionBroken

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("rooms.cluster")


def _one(group: BaseExceptionGroup[Exception]) -> BaseException:
    """The first exception of a group (the nurseries wrap them)."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class Forwarded:
    """The ``Target`` of a client whose room lives on another node: its messages go over the
    link; what the room sends comes back as ``SEND`` frames written to ``ws``."""

    __slots__ = ("_resumed", "auto_reply", "conn", "ended", "link", "request", "room", "ws")

    def __init__(
        self,
        link: OutLink,
        conn: int,
        room_class: type[Room],
        room_id: RoomId,
        ws: Transport,
        request: Request,
    ) -> None:
        self.link = link
        self.conn = conn
        self.room = room_label(room_class, room_id)  # (as a client of a room here names it)
        self.ws = ws
        self.request = request
        self.auto_reply = room_class.auto_reply
        self.ended = False
        self._resumed: trio.Event | None = None  # set while the room's mailbox is full

    @property
    def label(self) -> str:
        return f"connection {self.conn} to room {self.room} on node {self.link.owner.node_id}"

    async def deliver(self, message: str | bytes) -> None:
        auto = self.auto_reply
        if auto is not None and message == auto[0]:
            self.ws.write(encode_message(auto[1]))  # here: the room is not woken
            self.link.links.metrics.auto_replies_total += 1
            return
        while self._resumed is not None:  # the room is full: stop reading this client
            await self._resumed.wait()
        await self.link.send(MESSAGE, self.conn, message)

    def connected(self) -> None:
        """The client has its 101: the room may run ``on_connect``."""
        self.link.post(CONNECT, self.conn)

    def end(self, code: int, reason: str, send_close: bool = False) -> None:
        if not self.ended:
            self.ended = True
            self.link.post(ENDED, self.conn, code, reason, send_close)
        if not send_close:  # (with it, the room's CLOSE comes first, then this again)
            self.link.forget(self.conn)

    @property
    def route(self) -> str:
        return self.request.route

    def usage(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "room": self.room,
            "connection": f"{self.link.owner.node_id}:{self.conn}",
            "client_ip": self.request.client[0],
        }

    def pause(self) -> None:
        if self._resumed is None:
            self._resumed = trio.Event()

    def resume(self) -> None:
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None


class OutLink:
    """This node's link to one peer (``owner``): its clients' rooms and calls there."""

    def __init__(self, links: Links, owner: Owner) -> None:
        self.links = links
        self.owner = owner
        self.clients: dict[int, Forwarded] = {}
        self._next = 0
        self._waiting: dict[int, Reply] = {}  # ATTACH / CALL / REQUEST in flight, by number
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake = trio.Event()
        self._space = trio.Event()
        self.ws: ClientSocket | None = None
        self.ready = trio.Event()
        self.closed = False
        self._heard_at = 0.0  # (trio time) when the peer last sent anything

    def _number(self) -> int:
        self._next += 1
        return self._next

    # -- sending -------------------------------------------------------------------------

    def post(self, *items: Any) -> None:
        """Queue a message without waiting (ends, connects: what cannot wait)."""
        if self.closed:
            return
        data = pack(*items)
        self._queue.append(data)
        self._queued_bytes += len(data)
        self.links.metrics.cluster_link_queue_bytes += len(data)
        self._wake.set()

    async def send(self, *items: Any) -> None:
        """Queue a message, waiting while the link's queue is over ``max_link_queue_bytes``
        (the sender's socket is not read meanwhile)."""
        while self._queued_bytes > self.links.max_queue and not self.closed:
            self._space = trio.Event()
            await self._space.wait()
        if self.closed:
            raise ClusterUnavailable(f"the link to node {self.owner.node_id} was lost")
        self.post(*items)

    async def _writer(self, ws: ClientSocket) -> None:
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            batch = list(self._queue)  # everything queued meanwhile: one write
            self._queue.clear()
            size = sum(map(len, batch))
            self._queued_bytes -= size
            self.links.metrics.cluster_link_queue_bytes -= size
            self._space.set()
            await ws.send_all(batch)

    # -- the link's life -----------------------------------------------------------------

    async def run(self) -> None:
        url = f"ws://{self.owner.address}{LINK_PATH}"
        headers = [
            ("authorization", f"Bearer {self.links.token}"),
            ("x-rooms-node", self.links.cluster.node_id),
            ("x-rooms-protocol", str(PROTOCOL)),
        ]
        ws: ClientSocket | None = None
        try:
            with trio.fail_after(self.links.cluster.ttl):
                ws = await connect(url, headers, max_message_size=1 << 30)
            self.ws = ws
            self._heard_at = trio.current_time()
            self.ready.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws)
                nursery.start_soon(self._keepalive, ws)
                await self._read(ws)
        except* (OSError, HandshakeError, ConnectionBroken, trio.TooSlowError) as lost:
            log.warning(
                "link to node %s at %s: %s", self.owner.node_id, self.owner.address, _one(lost)
            )
        except* ProtocolError as broken:
            log.error("link to node %s broke the protocol: %s", self.owner.node_id, _one(broken))
            if ws is not None:
                error = _one(broken)
                assert isinstance(error, ProtocolError)
                await ws.close(error.code, error.reason)
        except* Exception as bug:  # a bug costs this link (its clients reconnect), not the node
            log.error("link to node %s failed", self.owner.node_id, exc_info=_one(bug))
        finally:
            self._lost()
            if ws is not None:
                await ws.aclose()

    async def _keepalive(self, ws: ClientSocket) -> None:
        """Ping the peer (it closes a silent link) and give the link up when nothing came
        back for a while (``link_timing``). A cut cable sends no FIN: without this, the
        clients here would wait in silence, not be told to reconnect."""
        every, silence = link_timing(self.links.cluster.ttl)
        while True:
            await trio.sleep(every)
            silent = trio.current_time() - self._heard_at
            if silent >= silence:
                raise ConnectionBroken(f"nothing came on the link for {silent:.1f} s")
            await ws.ping(b"")

    async def _read(self, ws: ClientSocket) -> None:
        while True:
            items = await ws.receive()
            self._heard_at = trio.current_time()
            for item in items:
                if isinstance(item, (str, bytes)):
                    self._receive(unpack(item, TO_EDGE))
                elif isinstance(item, Ping):
                    await ws.pong(item.payload)
                elif isinstance(item, Close):
                    await ws.close(item.code, item.reason)
                    raise ConnectionBroken(f"the node closed the link: {item.code} {item.reason}")

    def _lost(self) -> None:
        self.closed = True
        self.ready.set()
        self._space.set()
        self.links.metrics.cluster_link_queue_bytes -= self._queued_bytes
        self._queue.clear()
        for client in self.clients.values():
            client.ended = True
            client.ws.close(1012, "the node holding the room went away: reconnect")
        self.links.metrics.cluster_forwarded_websockets -= len(self.clients)
        self.clients.clear()
        for reply in self._waiting.values():
            reply.fail(ClusterUnavailable(f"the link to node {self.owner.node_id} was lost"))
        self._waiting.clear()
        self.links.lost(self)

    def _receive(self, items: list[Any]) -> None:
        kind = items[0]
        if kind == SEND:
            _, conns, frame, messages = items
            clients = self.clients
            for conn in conns:
                client = clients.get(conn)
                if client is not None:
                    client.ws.write(frame, messages)
        elif kind == CLOSE:
            _, conn, code, reason = items
            client = self.clients.get(conn)
            if client is not None:
                client.ws.close(code, reason)
        elif kind in (PAUSE, RESUME):
            client = self.clients.get(items[1])
            if client is not None:
                client.pause() if kind == PAUSE else client.resume()
        else:  # JOINED, REFUSED or REPLY
            reply = self._waiting.pop(items[1], None)
            if reply is not None:
                reply.set(items)

    def forget(self, conn: int) -> None:
        if self.clients.pop(conn, None) is not None:
            self.links.metrics.cluster_forwarded_websockets -= 1

    async def _ask(self, kind: int, *items: Any, number: int = 0) -> list[Any]:
        """Send a message numbered ``number`` (a fresh one by default) and await its answer."""
        number = number or self._number()
        reply = self._waiting[number] = Reply()
        try:
            await self.send(kind, number, *items)
            answer: list[Any] = await reply.wait()
        finally:
            self._waiting.pop(number, None)
        return answer

    # -- what the edge and the host ask ----------------------------------------------------

    async def attach(
        self, room_class: type[Room], room_id: RoomId, ws: Transport, request: Request
    ) -> Forwarded | Response:
        """A place for ``ws``'s client in the room there: its target, or the refusal
        (``NotHere`` if that node does not hold the room any more)."""
        conn = self._number()
        client = self.clients[conn] = Forwarded(self, conn, room_class, room_id, ws, request)
        self.links.metrics.cluster_forwarded_websockets += 1
        room = (room_class.namespace, room_id.hex, room_id.name)
        try:
            answer = await self._ask(ATTACH, *room, request_to_wire(request), number=conn)
        except BaseException:
            self.forget(conn)
            raise
        if answer[0] == JOINED:
            return client
        self.forget(conn)
        _, _, status, text = answer
        if status == 421:
            raise NotHere(text)
        return text_error(status, text)

    async def call(self, room: Room3, method: str, payload: bytes, chain: list[str]) -> Any:
        _, _, ok, value = await self._ask(CALL, *room, method, payload, chain)
        if ok:
            return value
        kind, text = value
        if kind == "NotHere":
            raise NotHere(text)
        error = CALL_ERRORS.get(kind) or getattr(builtins, kind, None)
        if isinstance(error, type) and issubclass(error, Exception):
            raise error(text)
        raise RoomCallError(f"{kind}: {text}")  # an exception class of the app's own

    async def request(self, room: Room3, request: Request) -> Response:
        _, _, ok, value = await self._ask(REQUEST, *room, request_to_wire(request))
        if not ok:
            raise NotHere(value[1])
        status, body, headers = value
        return Response(status, body, headers)

    async def operator(self, request: Request) -> Response:
        _, _, ok, value = await self._ask(OPERATOR, request_to_wire(request))
        if not ok:
            kind, text = value
            return text_error(500, f"node {self.owner.node_id} failed: {kind}: {text}")
        status, body, headers = value
        return Response(status, body, headers)


class Links:
    """This node's links to its peers, one per peer, opened when first needed (the
    ``RemoteRooms`` of the host)."""

    def __init__(self, cluster: Cluster, token: str, max_queue: int, metrics: Metrics) -> None:
        self.cluster = cluster
        self.token = token
        self.max_queue = max_queue
        self.metrics = metrics
        self._links: dict[str, OutLink] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def to(self, owner: Owner) -> OutLink:
        link = self._links.get(owner.node_id)
        if link is None or link.closed:
            # A node that misses its lease renewals is cut off, or gone: a dial to it would
            # wait out its timeout while its rooms could be claimed here. (Once per link.)
            if not await self.cluster.renewing(owner.node_id):
                raise OwnerUnreachable(
                    f"the node holding the room ({owner.node_id} at {owner.address}) misses "
                    "its lease renewals: retry shortly"
                )
            link = self._links.get(owner.node_id)  # (another client may have dialled)
        if link is None or link.closed:
            assert self._nursery is not None
            link = self._links[owner.node_id] = OutLink(self, owner)
            self._nursery.start_soon(link.run)
        await link.ready.wait()
        if link.closed:
            raise OwnerUnreachable(
                f"the node holding the room ({owner.node_id} at {owner.address}) cannot be "
                "reached: retry shortly"
            )
        return link

    def lost(self, link: OutLink) -> None:
        if self._links.get(link.owner.node_id) is link:
            del self._links[link.owner.node_id]
        self.cluster.forget_node(link.owner.node_id)
        if self._nursery is not None:
            self._nursery.start_soon(self.cluster.link_lost, link.owner.node_id)

    def node_dead(self, node_id: str) -> None:
        """The cluster declared ``node_id`` dead: drop the link (its clients reconnect)."""
        link = self._links.get(node_id)
        if link is not None and link.ws is not None and self._nursery is not None:
            self._nursery.start_soon(link.ws.aclose)

    async def attach(
        self,
        owner: Owner,
        room_class: type[Room],
        room_id: RoomId,
        ws: Transport,
        request: Request,
    ) -> Forwarded | Response:
        link = await self.to(owner)
        try:
            return await link.attach(room_class, room_id, ws, request)
        except TypeError as exc:  # (msgpack) an identity that cannot cross to another node
            log.error(
                "%s %s: cannot join room on node %s: %s",
                request.method,
                request.path,
                owner.node_id,
                exc,
            )
            return text_error(500, "the connection's identity cannot be sent to another node")

    async def call(
        self, owner: Owner, room: Room3, method: str, payload: bytes, chain: list[str]
    ) -> Any:
        link = await self.to(owner)
        return await link.call(room, method, payload, chain)

    async def request(self, owner: Owner, room: Room3, request: Request) -> Response:
        link = await self.to(owner)
        return await link.request(room, request)

    async def operator(self, node: Owner, request: Request) -> Response:
        """An operator's request answered by ``node``'s own view of itself
        (``runtime.admin``); the caller checked the token."""
        link = await self.to(node)
        return await link.operator(request)


__all__ = ["Forwarded", "Links", "OutLink"]
