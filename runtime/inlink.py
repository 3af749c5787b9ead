"""The room's node of a link (``runtime.link`` has the protocol): ``InLink`` is the target
of a peer's link, a ``LinkTransport`` the transport of each of that peer's clients in a room
here."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from rooms import Request, Response

from .events import Connect
from .frames import encode_message
from .gate import Transport
from .link import (
    ATTACH,
    CALL,
    CLOSE,
    CONNECT,
    ENDED,
    JOINED,
    LINK_PATH,
    MESSAGE,
    OPERATOR,
    PAUSE,
    REFUSED,
    REPLY,
    RESUME,
    SEND,
    TO_OWNER,
    pack,
    request_from_wire,
    unpack,
)
from .placement import NotHere
from .seats import SeatRefused

if TYPE_CHECKING:
    from .activation import Peer
    from .host import Host

log = logging.getLogger("rooms.cluster")


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
    their rooms' calls and requests, and its operator's requests (answered by ``operator``,
    this node's own view: the peer checked the token)."""

    def __init__(
        self,
        host: Host,
        ws: Transport,
        node_id: str,
        operator: Callable[[Request], Awaitable[Response]],
    ) -> None:
        self.host = host
        self.ws = ws
        self.node_id = node_id
        self.operator = operator
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

    route, room = LINK_PATH, None

    def usage(self) -> dict[str, Any]:
        return {"route": LINK_PATH, "room": None, "connection": self.node_id, "client_ip": ""}

    def drain(self, code: int, reason: str) -> None:
        """The node drains: each room closes its clients here (``code``, ``reason``) in its
        output order, then the link closes."""
        self.draining = True
        for peer in list(self.peers.values()):
            peer.end(code, reason, send_close=True)
        self._closed_if_drained()

    def end(self, code: int, reason: str, send_close: bool = False) -> None:
        if send_close:  # the peer broke the protocol: after what is queued, the Close
            self.flush()
            self.ws.close(code, reason)
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
        items = unpack(message, TO_OWNER)
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
        else:  # CALL, REQUEST or OPERATOR
            self.host.nursery.start_soon(self._answer, items)

    def _attach(
        self, conn: int, namespace: str, hex_id: str, name: str | None, data: dict[str, Any]
    ) -> None:
        host = self.host
        act = None if self.draining else host.held(namespace, hex_id, name)
        if act is None:
            self._write(REFUSED, conn, 421, "that room is not held by this node")
            return
        try:
            peer = host.attach(act, LinkTransport(self, conn), request_from_wire(data, host.stub))
        except SeatRefused as refused:
            self._write(REFUSED, conn, refused.status, refused.text)
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
        kind, number, host = items[0], items[1], self.host
        try:
            if kind == OPERATOR:
                value = _wire(await self.operator(request_from_wire(items[2], host.stub)))
            else:
                value = await self._answer_room(items)
            answer = (REPLY, number, True, value)
        except Exception as exc:
            answer = (REPLY, number, False, [type(exc).__name__, str(exc)])
        self._write(*answer)

    async def _answer_room(self, items: list[Any]) -> Any:
        kind, _, namespace, hex_id, name = items[:5]
        host = self.host
        act = host.held(namespace, hex_id, name)
        if act is None:
            raise NotHere("that room is not held by this node")
        if kind == CALL:
            method, payload, chain = items[5:]
            return await host.call_here(act, method, payload, chain)
        return _wire(await host.request_here(act, request_from_wire(items[5], host.stub)))

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


def _wire(response: Response) -> list[Any]:
    return [response.status, response.body, response.headers]


__all__ = ["InLink", "LinkTransport"]
