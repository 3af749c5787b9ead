"""Node links (cluster mode): how a client connected to one node reaches a room another holds.

A node opens one link to each peer whose rooms its clients use: a WebSocket to
``/_rooms/cluster`` at the peer's ``node_address``, authenticated by ``cluster_token``, whose
binary messages are msgpack arrays ``[kind, ...]``. Over it the client's node (the edge):

- attaches a client to the room (``ATTACH`` -> ``JOINED`` or ``REFUSED``), and once the
  client has its 101, connects it (``CONNECT``: the room's ``on_connect``); forwards its
  messages (``MESSAGE``) and its end (``ENDED``); calls rooms held there or sends them plain
  HTTP requests (``CALL``, ``REQUEST`` -> ``REPLY``);

and the room's node (the owner) sends back:

- what the room sends: ``SEND`` carries one encoded frame and the clients it goes to, once per
  node per burst, so the room's encode-once and one write per burst survive (the edge writes
  the same bytes to each socket); ``CLOSE``, in the room's output order;
- ``PAUSE`` / ``RESUME`` when a client's room has a full mailbox: the edge stops reading that
  client's socket, as it does for a room of its own.

Pings and ``auto_reply`` are answered at the client's node, so a hibernated room is not woken
by them. A link that breaks closes the clients it carried with 1012 (they reconnect and find
the room again) and fails its calls. Each direction of a pair of nodes is its own link: a
node's link to a peer carries its own clients and calls only, so neither side ever waits for
the other to open one.
"""

from __future__ import annotations

import builtins
import hmac
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import msgpack
import trio

from rooms import CallCycleError, Request, Response, Room, RoomCallError, RoomId
from rooms._engine import text_error

from .dial import ClientSocket, connect
from .events import Connect
from .frames import Close, Ping, ProtocolError, encode_message
from .gate import Reply, Transport
from .handshake import HandshakeError
from .metrics import Metrics
from .placement import ClusterUnavailable, NotHere, Owner
from .stream import ConnectionBroken

if TYPE_CHECKING:
    from .activation import Peer
    from .cluster import Cluster
    from .host import Host

log = logging.getLogger("rooms.cluster")

PROTOCOL = 1
ATTACH, JOINED, REFUSED, CONNECT, MESSAGE, ENDED, CALL, REQUEST, REPLY = range(1, 10)
SEND, CLOSE, PAUSE, RESUME = range(10, 14)
LINK_PATH = "/_rooms/cluster"
_LINK_OVERHEAD = 64 * 1024  # a link message's room for its header, past the client's limit

Room3 = tuple[str, str, str | None]
"""A room as it crosses a link: its class's namespace, its id's hex and name."""


@attrs.frozen
class PeerNode:
    """The ``Upgrade`` target of a link from another node (``/_rooms/cluster``)."""

    node_id: str


def link_settings(settings: Any) -> Any:
    """The settings a link's WebSocket is served with: messages as large as a client's (or
    a request's body) plus their header, a queue as deep as ``max_link_queue_bytes``, no
    idle timeout or message rate (links carry many clients)."""
    return attrs.evolve(
        settings,
        max_message_bytes=max(settings.max_message_bytes, settings.max_body_bytes) + _LINK_OVERHEAD,
        max_outbox_bytes=max(settings.max_outbox_bytes, settings.max_link_queue_bytes),
        idle_timeout=0.0,
        messages_per_second_per_connection=0.0,
    )


def check_link(request: Request, token: str) -> Response | None:
    """Why a link upgrade is refused (401 without the cluster's token, 400 for another
    protocol version), or None."""
    given = request.header("authorization") or ""
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return text_error(401, "node links need 'Authorization: Bearer <cluster_token>'")
    version = request.header("x-rooms-protocol")
    if version != str(PROTOCOL):
        return text_error(
            400, f"node link protocol {version} is not spoken here (this node: {PROTOCOL})"
        )
    return None


class LinkError(ProtocolError):
    """A link message that is not the protocol: the link is dropped (1002)."""

    def __init__(self, reason: str) -> None:
        super().__init__(1002, reason)


def _one(group: BaseExceptionGroup[Exception]) -> BaseException:
    """The first exception of a group (the nurseries wrap them)."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def pack(*items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: str | bytes) -> list[Any]:
    if not isinstance(data, bytes):
        raise LinkError("a link message must be binary")
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise LinkError(f"not msgpack: {exc}") from None
    if not isinstance(items, list) or not items or not isinstance(items[0], int):
        raise LinkError("a link message is a list whose first item is its kind")
    return items


def request_to_wire(request: Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": request.headers,
        "body": request.body,
        "client": list(request.client),
        "params": request.path_params,
        "identity": request.identity,
        "route": request.route,
    }


def request_from_wire(data: dict[str, Any], stub_factory: Any) -> Request:
    return Request(
        data["method"],
        data["path"],
        data["query"],
        [(name, value) for name, value in data["headers"]],
        data["body"],
        (data["client"][0], data["client"][1]),
        data["params"],
        data["identity"],
        data["route"],
        stub_factory=stub_factory,
    )


_ERRORS: dict[str, type[Exception]] = {
    "CallCycleError": CallCycleError,
    "RoomCallError": RoomCallError,
}
"""Exceptions of a call that cross a link as themselves (with builtins); others become a
RoomCallError naming their class."""


# -- the client's node ----------------------------------------------------------------------


class Forwarded:
    """The ``Target`` of a client whose room lives on another node: its messages go over the
    link; what the room sends comes back as ``SEND`` frames written to ``ws``."""

    __slots__ = ("_resumed", "auto_reply", "conn", "ended", "key", "link", "request", "ws")

    def __init__(
        self,
        link: OutLink,
        conn: int,
        room_class: type[Room],
        key: str,
        ws: Transport,
        request: Request,
    ) -> None:
        self.link = link
        self.conn = conn
        self.key = key
        self.ws = ws
        self.request = request
        self.auto_reply = room_class.auto_reply
        self.ended = False
        self._resumed: trio.Event | None = None  # set while the room's mailbox is full

    @property
    def label(self) -> str:
        return f"connection {self.conn} to room {self.key} on node {self.link.owner.node_id}"

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

    def usage(self) -> dict[str, Any]:
        return {
            "route": self.request.route,
            "room": self.key,
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
            with trio.fail_after(5):
                ws = await connect(url, headers, max_message_size=1 << 30)
            self.ws = ws
            self.ready.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws)
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

    async def _read(self, ws: ClientSocket) -> None:
        while True:
            for item in await ws.receive():
                if isinstance(item, (str, bytes)):
                    self._receive(unpack(item))
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
        elif kind in (JOINED, REFUSED, REPLY):
            reply = self._waiting.pop(items[1], None)
            if reply is not None:
                reply.set(items)
        else:
            raise LinkError(f"unknown kind {kind}")

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
        key = f"{room_class.namespace}/{room_id.hex}"
        client = self.clients[conn] = Forwarded(self, conn, room_class, key, ws, request)
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
        error = _ERRORS.get(kind) or getattr(builtins, kind, None)
        if isinstance(error, type) and issubclass(error, Exception):
            raise error(text)
        raise RoomCallError(f"{kind}: {text}")  # an exception class of the app's own

    async def request(self, room: Room3, request: Request) -> Response:
        _, _, ok, value = await self._ask(REQUEST, *room, request_to_wire(request))
        if not ok:
            raise NotHere(value[1])
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
            assert self._nursery is not None
            link = self._links[owner.node_id] = OutLink(self, owner)
            self._nursery.start_soon(link.run)
        await link.ready.wait()
        if link.closed:
            raise ClusterUnavailable(
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


# -- the room's node ------------------------------------------------------------------------


class LinkTransport:
    """The ``Transport`` of a room's client that is connected through another node."""

    __slots__ = ("conn", "link")

    def __init__(self, link: InLink, conn: int) -> None:
        self.link = link
        self.conn = conn

    def write(self, frame: bytes, messages: int = 1) -> None:
        self.link.queue_frame(self.conn, frame, messages)

    def close(self, code: int, reason: str) -> None:
        self.link.close_client(self.conn, code, reason)


class InLink:
    """The ``Target`` of a link's WebSocket on the room's node: what a peer's clients send,
    and their rooms' calls and requests."""

    def __init__(self, host: Host, ws: Transport, node_id: str) -> None:
        self.host = host
        self.ws = ws
        self.node_id = node_id
        self.peers: dict[int, Peer] = {}
        self.draining = False
        # This tick's SEND frames in order, each with its message count and clients; where
        # each frame's and each client's latest entry is.
        self._pending: list[tuple[bytes, int, list[int]]] = []
        self._frame_at: dict[bytes, int] = {}
        self._conn_at: dict[int, int] = {}
        self._flushing = False
        self._backlog: dict[int, deque[str | bytes]] = {}  # messages held for a full room

    @property
    def label(self) -> str:
        return f"link from node {self.node_id}"

    def usage(self) -> dict[str, Any]:
        return {"route": LINK_PATH, "room": None, "connection": self.node_id, "client_ip": ""}

    def end(self, code: int, reason: str, send_close: bool = False) -> None:
        if send_close:  # a drain: each room closes its clients, then the link closes
            self.draining = True
            for peer in list(self.peers.values()):
                peer.end(code, reason, send_close=True)
            self._closed_if_drained()
            return
        for peer in self.peers.values():  # the link is gone: so are its clients
            peer.end(1006, "")
        self.host.metrics.cluster_remote_peers -= len(self.peers)
        self.peers.clear()

    def _closed_if_drained(self) -> None:
        if self.draining and not self.peers:
            self.flush()
            self.ws.close(1001, "node draining")

    # -- what comes in ---------------------------------------------------------------------

    async def deliver(self, message: str | bytes) -> None:
        items = unpack(message)
        kind = items[0]
        if kind == MESSAGE:
            _, conn, data = items
            peer = self.peers.get(conn)
            if peer is not None:
                await self._message(conn, peer, data)
        elif kind == CONNECT:
            peer = self.peers.get(items[1])
            if peer is not None:
                peer.activation.post_unbounded(Connect(peer))
        elif kind == ENDED:
            _, conn, code, reason, send_close = items
            peer = self.peers.get(conn) if send_close else self.peers.pop(conn, None)
            if peer is not None:
                if not send_close:
                    self.host.metrics.cluster_remote_peers -= 1
                peer.end(code, reason, send_close)
                self._closed_if_drained()
        elif kind == ATTACH:
            self._attach(*items[1:])
        elif kind in (CALL, REQUEST):
            self.host.nursery.start_soon(self._answer, items)
        else:
            raise LinkError(f"unknown kind {kind}")

    def _attach(
        self, conn: int, namespace: str, hex_id: str, name: str | None, data: dict[str, Any]
    ) -> None:
        host = self.host
        act = None if self.draining else host.held(namespace, hex_id, name)
        if act is None:
            self._write(REFUSED, conn, 421, "that room is not held by this node")
            return
        peer = host.attach(act, LinkTransport(self, conn), request_from_wire(data, host.stub))
        if peer is None:
            self._write(REFUSED, conn, 503, "room is full")
            return
        self.peers[conn] = peer
        host.metrics.cluster_remote_peers += 1
        self._write(JOINED, conn)

    async def _message(self, conn: int, peer: Peer, data: str | bytes) -> None:
        """Post ``data`` without ever waiting (the link carries every other client too): a
        full room's messages are held here and its client's node stops reading it."""
        backlog = self._backlog.get(conn)
        mailbox = peer.activation.mailbox
        if backlog is None and len(mailbox.events) < mailbox.size:
            await peer.deliver(data)  # (the mailbox has room: this does not wait)
            return
        if backlog is None:
            backlog = self._backlog[conn] = deque()
            self._write(PAUSE, conn)
            self.host.nursery.start_soon(self._drain, conn, peer, backlog)
        backlog.append(data)

    async def _drain(self, conn: int, peer: Peer, backlog: deque[str | bytes]) -> None:
        while backlog:
            await peer.deliver(backlog.popleft())  # waits while the mailbox is full
        del self._backlog[conn]
        self._write(RESUME, conn)

    async def _answer(self, items: list[Any]) -> None:
        kind, number, namespace, hex_id, name = items[:5]
        host = self.host
        try:
            act = host.held(namespace, hex_id, name)
            if act is None:
                raise NotHere("that room is not held by this node")
            if kind == CALL:
                method, payload, chain = items[5:]
                value = await host.call_here(act, method, payload, chain)
            else:
                response = await host.request_here(act, request_from_wire(items[5], host.stub))
                value = [response.status, response.body, response.headers]
            answer = (REPLY, number, True, value)
        except Exception as exc:
            answer = (REPLY, number, False, [type(exc).__name__, str(exc)])
        self._write(*answer)

    def _write(self, *items: Any) -> None:
        self.ws.write(encode_message(pack(*items)))

    # -- what goes out ---------------------------------------------------------------------

    def queue_frame(self, conn: int, frame: bytes, messages: int) -> None:
        """Send ``frame`` to the client ``conn`` there, grouped with the other clients that
        get the same frame in this tick (one SEND per frame per link, as a broadcast is),
        unless ``conn`` was queued another frame since: then in a SEND of its own, after that
        one, so that each client gets its frames in order."""
        at = self._frame_at.get(frame)
        if at is None or self._conn_at.get(conn, -1) > at:
            at = self._frame_at[frame] = len(self._pending)
            self._pending.append((frame, messages, [conn]))
        else:
            self._pending[at][2].append(conn)
        self._conn_at[conn] = at
        if not self._flushing:
            self._flushing = True
            trio.lowlevel.current_trio_token().run_sync_soon(self.flush)

    def flush(self) -> None:
        self._flushing = False
        pending, self._pending = self._pending, []
        self._frame_at, self._conn_at = {}, {}
        for frame, messages, conns in pending:
            self.ws.write(encode_message(pack(SEND, conns, frame, messages)), messages * len(conns))

    def close_client(self, conn: int, code: int, reason: str) -> None:
        """The room closes the client ``conn``: after what it sent before. (The peer stays
        until its ``ENDED`` comes back, so that the room hears of its end.)"""
        self.flush()
        self._write(CLOSE, conn, code, reason)


__all__ = [
    "LINK_PATH",
    "Forwarded",
    "InLink",
    "LinkError",
    "LinkTransport",
    "Links",
    "OutLink",
    "PeerNode",
    "check_link",
    "link_settings",
]
