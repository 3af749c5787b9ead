"""The edge: accepts connections and takes each one through its phases to where it belongs.

One connection's life: accept, the TLS handshake (``stream``), the HTTP/1.1 phase (``http``);
for a WebSocket upgrade, the route (``router``), the handshake check (``handshake``), the
upgrade-time rules (``admission``) and, on a proxied route, the upstream (``proxy``); then
``join``: a place in the room and the 101; then the WebSocket's data path (``websocket``) or
the relay (``proxy``) until it closes. The edge also drains (every WebSocket closed with 1012
in its room's output order) and writes each closed WebSocket's usage record (``usage``).

In cluster mode a room may live on another node: ``join`` then attaches the client over the
link to that node (``link.Forwarded`` is its target), and the links from other nodes are
WebSockets served here too (``/_rooms/cluster``, ``link.InLink``).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import trio

from rooms import App, Request, Response
from rooms._engine import ProxyRoute, text_error

from .activation import Activation, Peer
from .admin import LIVE_PATH, AdminFeed, LiveAdmin, remote_refusal
from .admission import Admission
from .config import Settings, tls_context
from .gate import Transport
from .handshake import accept_response, check_upgrade, is_upgrade
from .host import Host
from .http import HttpServer, raw_response
from .inlink import InLink
from .link import LINK_PATH, PeerNode, check_link, link_settings, link_timing, networks
from .metrics import Metrics
from .outlink import Forwarded, Links
from .placement import ClusterUnavailable, Owner
from .proxy import Upstream, relay
from .proxy import connect as connect_upstream
from .router import RoomTarget, Router
from .seats import TICKET_PARAM, SeatRefused
from .stream import ConnectionBroken, Stream
from .usage import USAGE_TOTALS, Open, Usage
from .websocket import Sessions, WebSocket

log = logging.getLogger("rooms.edge")


@attrs.frozen
class Upgrade:
    """A checked WebSocket upgrade, ready to join: where it goes, and its 101."""

    request: Request
    target: RoomTarget | Upstream | PeerNode | LiveAdmin
    accept: bytes


class Edge:
    """Serves an ``App``: plain HTTP answered here or by rooms, upgrades handed to rooms."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        host: Host,
        metrics: Metrics,
        links: Links | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.metrics = metrics
        self.links = links  # cluster mode: this node's links to the others
        self._link_settings = link_settings(settings)
        self._link_networks = networks(settings.cluster_link_networks)
        self.admission = Admission(settings, metrics)
        self.usage = Usage(settings)
        self.router = Router(app, settings, metrics, host, self.usage, self._live_usage, links)
        self.http = HttpServer(settings, metrics, host.stub)
        own = [c.first_message_timeout for c in app.room_classes()]
        self.sessions = Sessions(
            settings, metrics, [settings.first_message_timeout, *(t for t in own if t)]
        )
        self._tls = tls_context(settings)
        self._websockets: set[WebSocket] = set()
        self._accepting = trio.CancelScope()
        self._draining = False
        self._all_closed: trio.Event | None = None  # set when draining and none is left

    async def serve(self, listener: socket.socket) -> None:
        """Accept connections on ``listener`` until ``drain``."""
        async with trio.open_nursery() as nursery:
            if self.sessions.timer_periods:
                nursery.start_soon(self.sessions.watch, self._websockets)
            nursery.start_soon(self.sessions.reads.run)
            with self._accepting:
                await self._accept(listener, nursery)

    async def drain(self, reason: str = "server restarting: reconnect shortly") -> None:
        """Stop accepting; close every WebSocket with 1012 after its room has answered what
        its client sent (the Close goes out in the room's output order); return once all
        are closed. Bound it with a timeout: clients that never answer keep it waiting."""
        self._draining = True
        self._accepting.cancel()
        log.info("draining: closing %d WebSockets with 1012", len(self._websockets))
        for ws in list(self._websockets):
            if isinstance(ws.target, InLink):
                ws.target.drain(1012, reason)
            elif ws.target is not None:
                ws.target.end(1012, reason, send_close=True)
        if self._websockets:
            self._all_closed = trio.Event()
            await self._all_closed.wait()

    async def _accept(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(listener)
            except trio.ClosedResourceError:
                return  # the server closed its listener: it is draining
            for _ in range(128):
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("cannot accept connections: %s (raise `ulimit -n`)", exc)
                        await trio.sleep(0.1)
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(self._connection, sock, addr)

    async def _connection(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        metrics = self.metrics
        metrics.connections_open += 1
        stream = Stream(sock, self._tls)
        try:
            await self._tls_handshake(stream, addr)  # (the 503 below is sent over TLS too)
            if metrics.connections_open > self.settings.max_connections:
                metrics.limit_connections_total += 1
                await self._refuse(stream, text_error(503, "server is at its connection limit"))
                return
            upgraded = await self.http.serve(stream, (addr[0], addr[1]), self.answer)
            if upgraded is not None:
                # The HTTP phase's state (h11, the request head) is gone by now: an idle
                # WebSocket holds only what the data path needs.
                await self._websocket(stream, *upgraded)
        except ConnectionBroken:
            pass
        except Exception:
            # A bug must cost this connection only, never the server and everyone on it.
            log.exception("connection from %s:%d failed unexpectedly; closed", *addr[:2])
        finally:
            metrics.connections_open -= 1
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _tls_handshake(self, stream: Stream, addr: tuple[str, int]) -> None:
        try:
            await stream.handshake(self.settings.handshake_timeout)
        except ConnectionBroken as exc:
            # Usually a scanner or a client that does not trust the certificate: debug only.
            self.metrics.tls_handshake_failures_total += 1
            log.debug("TLS with %s:%d: %s", addr[0], addr[1], exc)
            raise

    @staticmethod
    async def _refuse(stream: Stream, response: Response) -> None:
        await stream.send_all(raw_response(response))
        await stream.lingering_close(1.0)

    # -- the upgrade -----------------------------------------------------------------------

    async def answer(
        self, request: Request, http_version: bytes, secure: bool
    ) -> Response | Upgrade:
        """What one request gets: a response, or (a valid WebSocket upgrade) the upgrade."""
        if request.path == LINK_PATH and self.links is not None:
            return self._link_upgrade(request, http_version)
        if request.path == LIVE_PATH:
            return self._admin_upgrade(request, http_version)
        routed = await self.router.route(request, upgrade=is_upgrade(request))
        if isinstance(routed, Response):
            return routed
        return await self.upgrade(request, http_version, secure, routed)

    async def upgrade(
        self, request: Request, http_version: bytes, secure: bool, target: RoomTarget | ProxyRoute
    ) -> Upgrade | Response:
        """Check the handshake and the upgrade-time rules; for a proxied route, open the
        upstream WebSocket. The upgrade to answer 101, or the response refusing it."""
        rules = target if isinstance(target, ProxyRoute) else target[0]
        problem = check_upgrade(request, http_version) or await self.admission.admit(request, rules)
        if problem is not None:
            return problem
        if not isinstance(target, ProxyRoute):
            return self._check_ticket(request, target) or Upgrade(
                request, target, accept_response(request)
            )
        settings = self.settings
        upstream = await connect_upstream(
            target,
            request,
            secure=secure,
            timeout=settings.upstream_timeout,
            max_message_size=settings.max_message_bytes,
        )
        if isinstance(upstream, Response):
            if "x-upstream-status" in upstream.headers:
                self.metrics.upstream_refusals_total += 1
            else:
                self.metrics.upstream_failures_total += 1
                log.warning("%s %s: %s", request.method, request.path, upstream.body.decode())
            return upstream
        return Upgrade(request, upstream, accept_response(request, upstream.subprotocol))

    def _check_ticket(self, request: Request, target: RoomTarget) -> Response | None:
        """The upgrade's seat ticket, if it has one (``runtime.seats``), checked here, at the
        client's node: signed by this cluster, for this room, not expired, and for the
        identity ``on_before_connect`` gave, which it becomes if there was none (the node
        holding the room sees that it was not used before). A refusal, or None."""
        token = request.query_param(TICKET_PARAM)
        if token is None:
            return None
        room_class, room_id = target
        key = f"{room_class.namespace}/{room_id.hex}"
        try:
            ticket = self.host.tickets.check(token, key, self.host.now())
            if request.identity is not None and request.identity != ticket.identity:
                raise SeatRefused(403, "the seat ticket is for another identity")
        except SeatRefused as refused:
            self.metrics.tickets_refused_total += 1
            return text_error(refused.status, refused.text)
        request.identity = ticket.identity
        return None

    def _link_upgrade(self, request: Request, http_version: bytes) -> Upgrade | Response:
        """A link from another node of the cluster (``runtime.link``)."""
        assert self.links is not None
        refused = check_link(request, self.links.token, self._link_networks)
        if refused is not None:
            self.metrics.cluster_link_refusals_total += 1
            peer = f"node {request.header('x-rooms-node') or '?'} at {request.client[0]}"
            level = logging.ERROR if refused.status == 400 else logging.WARNING
            log.log(level, "refused a node link from %s: %s", peer, refused.body.decode())
            return refused
        node = PeerNode(request.header("x-rooms-node") or "?")
        return check_upgrade(request, http_version) or Upgrade(
            request, node, accept_response(request)
        )

    def _admin_upgrade(self, request: Request, http_version: bytes) -> Upgrade | Response:
        """The live admin page's WebSocket (``runtime.admin``): loopback only unless a token
        is set, which the page then sends first."""
        refused = remote_refusal(request, self.settings.admin_token)
        return (
            refused
            or check_upgrade(request, http_version)
            or Upgrade(request, LiveAdmin(), accept_response(request))
        )

    async def join(
        self, upgrade: Upgrade, transport: Transport, send: Callable[[bytes], Awaitable[None]]
    ) -> Peer | Forwarded | Upstream | InLink | AdminFeed | Response:
        """Take the connection's place (in its room, with ``transport``) and ``send`` the
        101; the room then gets its connect event. A 503 if the server is draining, the room
        is full or cannot be reached."""
        if self._draining:
            return text_error(503, "server restarting: retry shortly")
        target = upgrade.target
        if isinstance(target, Upstream):
            self.metrics.proxied_websockets_total += 1
            await send(upgrade.accept)
            return target
        if isinstance(target, PeerNode):
            await send(upgrade.accept)
            return InLink(self.host, transport, target.node_id, self.router.operator)
        if isinstance(target, LiveAdmin):
            await send(upgrade.accept)
            token, figures = self.settings.admin_token, self._admin_figures
            return AdminFeed(transport, token, self.metrics, figures)
        joined = await self._place(target, transport, upgrade.request)
        if isinstance(joined, Response):
            return joined
        try:
            await send(upgrade.accept)
        except ConnectionBroken:
            joined.end(1006, "")
            raise
        if isinstance(joined, Forwarded):
            joined.connected()
        else:
            await self.host.connected(joined)
        return joined

    async def _place(
        self, target: RoomTarget, transport: Transport, request: Request
    ) -> Peer | Forwarded | Response:
        """A place in the room, here or on the node that holds it, or the refusal (full,
        locked, a ticket not good: ``runtime.seats``)."""
        room_class, room_id = target

        async def here(act: Activation) -> Peer | Response:
            try:
                return self.host.attach(act, transport, request)
            except SeatRefused as refused:
                return text_error(refused.status, refused.text)

        async def there(_: object, owner: Owner, room: object) -> Forwarded | Response:
            assert self.links is not None
            return await self.links.attach(owner, room_class, room_id, transport, request)

        try:
            return await self.host.reach(room_class, room_id, here, there)
        except ClusterUnavailable as exc:
            return text_error(503, str(exc))

    # -- the WebSocket ---------------------------------------------------------------------

    async def _websocket(self, stream: Stream, upgrade: Upgrade, data: bytes) -> None:
        """Serve an upgraded connection (``data``: what the client sent after its request)."""
        try:
            async with trio.open_nursery() as nursery:
                link = isinstance(upgrade.target, PeerNode)
                settings = self._link_settings if link else self.settings
                ws = WebSocket(stream, settings, self.metrics, nursery)
                joined = await self.join(upgrade, ws, stream.send_all)
                if isinstance(joined, Response):
                    await self._refuse(stream, joined)
                    return
                ws.target = joined
                ws.first_message_timeout = self._first_message_timeout(upgrade.target)
                route = joined.route
                self.usage.opened(route)
                if not link:
                    ws.message_sizes = self.metrics.message_bytes.of(route)
                self.metrics.websocket_upgrades_total += 1
                self.metrics.websockets_open += 1
                self._websockets.add(ws)
                address = upgrade.request.client[0]
                self.admission.opened(address)
                try:
                    if isinstance(joined, AdminFeed):
                        nursery.start_soon(joined.run)
                    if isinstance(joined, InLink):
                        nursery.start_soon(self._watch_link, ws, joined)
                    if isinstance(joined, Upstream):
                        joined.client = ws
                        await relay(self.sessions, ws, joined, data, self.settings.close_timeout)
                    else:  # (no helper coroutine here: each frame is memory per connection)
                        code, _ = await self.sessions.run(ws, data)
                        await self.sessions.linger(ws, answered=code != 1006)
                finally:
                    self.admission.closed(address)
                    self._websockets.discard(ws)
                    record = self._usage_record(ws, time.time())
                    self.usage.closed(record)
                    duration = record["stop"] - record["start"]
                    self.metrics.connection_seconds.of(route).observe(duration)
                    if self._all_closed is not None and not self._websockets:
                        self._all_closed.set()
                    self.metrics.websockets_open -= 1
                    nursery.cancel_scope.cancel()
        finally:
            if isinstance(upgrade.target, Upstream):
                await upgrade.target.aclose()

    async def _watch_link(self, ws: WebSocket, link: InLink) -> None:
        """Close a link on which nothing came for a while (``link_timing``): its node pings
        it, so silence means that node, or the network to it, is gone. (A cut cable sends
        no FIN; its clients must not stay in their rooms until the clients' keepalive.)"""
        every, silence = link_timing(self.settings.cluster_lease_seconds)
        heard, since = ws.bytes_in, trio.current_time()
        while True:
            await trio.sleep(every)
            now = trio.current_time()
            if ws.bytes_in != heard:
                heard, since = ws.bytes_in, now
            elif now - since >= silence:
                self.metrics.keepalive_timeouts_total += 1
                log.warning("%s: nothing came for %.1f s; closing it (1011)", link.label, silence)
                ws.close(1011, "nothing came on the link")
                return

    def _first_message_timeout(self, target: RoomTarget | Upstream | PeerNode | LiveAdmin) -> float:
        if isinstance(target, PeerNode):
            return 0.0  # a node link carries many clients; it is not one
        own = target[0].first_message_timeout if isinstance(target, tuple) else None
        return self.settings.first_message_timeout if own is None else own

    def _admin_figures(self) -> dict[str, Any]:
        """What the live admin page shows besides the event and commit times."""
        closed = self.usage.report((), rooms=False)["routes"]
        closed.pop(LIVE_PATH, None)  # (what the pages themselves receive is not traffic)
        total = {key: sum(counts[key] for counts in closed.values()) for key in USAGE_TOTALS}
        # Every second, over every open connection: a loop of sums, nothing built per
        # connection (about 2 ms at 10,000 connections; bench/admin.py).
        opened = bytes_in = bytes_out = messages_in = messages_out = 0
        for ws in self._websockets:
            if ws.target is None or isinstance(ws.target, AdminFeed):
                continue
            opened += 1
            bytes_in += ws.bytes_in
            bytes_out += ws.bytes_out
            messages_in += ws.messages_in
            messages_out += ws.messages_out
        live = (opened, opened, 0, bytes_in, bytes_out, messages_in, messages_out)
        for key, value in zip(USAGE_TOTALS, live, strict=True):
            total[key] += value
        codes = self.usage.analytics.close_codes(3600)
        return {"metrics": self.metrics.counts(), "usage": total, "close_codes": codes}

    # -- accounting ------------------------------------------------------------------------

    def _live_usage(self) -> Iterator[Open]:
        """What each open WebSocket used so far (``Usage.report``)."""
        for ws in self._websockets:
            target = ws.target
            if target is not None:
                yield (
                    target.route,
                    target.room,
                    ws.bytes_in,
                    ws.bytes_out,
                    ws.messages_in,
                    ws.messages_out,
                )

    @staticmethod
    def _usage_record(ws: WebSocket, stop: float) -> dict[str, Any]:
        assert ws.target is not None
        return {
            "start": ws.started,
            "stop": stop,
            **ws.target.usage(),
            "close_code": ws.close_code,
            "close_reason": ws.close_reason,
            "closed_by": ws.closed_by,
            "bytes_in": ws.bytes_in,
            "bytes_out": ws.bytes_out,
            "messages_in": ws.messages_in,
            "messages_out": ws.messages_out,
        }
