"""The edge: TCP accept, HTTP/1.1 (h11), the WebSocket upgrade, and the WebSocket data path.

Sockets are plain non-blocking stdlib sockets driven with ``trio.lowlevel.wait_readable`` /
``wait_writable``. Writes are synchronous: a frame goes straight into the kernel with one
``send()``; only what the kernel does not take is queued, and a writer task is started just
for that connection until its queue drains. A broadcast therefore encodes its frame once and
never awaits per recipient. With a certificate, TLS sits between the frames and the socket
(``runtime.stream``). A WebSocket's messages go to its room (``runtime.host``) or, on a
proxied route, to its upstream (``runtime.proxy``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import functools
import hashlib
import ipaddress
import logging
import math
import mimetypes
import select
import socket
import time
from collections import deque
from collections.abc import Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

from rooms import HTTPError, Request, Response, Room, RoomId
from rooms._app import App, FunctionRoute, ProxyRoute, RoomRoute

from .admission import Admission
from .config import Settings, tls_context
from .frames import (
    OP_PING,
    OP_PONG,
    Close,
    Event,
    FrameParser,
    Ping,
    ProtocolError,
    accept_key,
    encode_close,
    encode_frame,
    encode_message,
)
from .host import Host, Peer
from .metrics import Metrics
from .proxy import Upstream
from .proxy import connect as connect_upstream
from .stream import RECV_SIZE, ConnectionBroken, Stream, recv_socket
from .usage import Usage

log = logging.getLogger("rooms.edge")

_WRITE_CHUNK = 256 * 1024


_KEEPALIVE_PING = encode_frame(OP_PING, b"keepalive")
_RELAY_BACKLOG = 256 * 1024  # bytes queued for a proxied client before the upstream waits
_RATE_ERROR = encode_message('{"error": "too many messages: this one was dropped"}')


class _RateLimited(ProtocolError):
    """The client sent past messages_per_second_per_connection (message_rate_action close)."""


class ReadPoller:
    """Readiness of the WebSockets' sockets from one edge-triggered epoll set, where each
    socket is registered once: trio's own wait_readable() re-registers the socket with its
    epoll on every wait, one extra system call per message received."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiting: dict[int, trio.lowlevel.Task] = {}
        self._ready: set[int] = set()  # readiness that arrived while nobody waited

    def register(self, sock: socket.socket) -> None:
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        self._ready.discard(fd)
        self._waiting.pop(fd, None)

    async def run(self) -> None:
        epoll, waiting, ready = self._epoll, self._waiting, self._ready
        reschedule = trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0):
                    task = waiting.pop(fd, None)
                    if task is None:
                        ready.add(fd)
                    else:
                        reschedule(task)
        finally:
            epoll.close()

    async def wait_readable(self, sock: socket.socket) -> None:
        """Until ``sock`` (registered) has data, or an error or EOF to report."""
        fd = sock.fileno()
        if fd in self._ready:
            self._ready.discard(fd)
            await trio.lowlevel.checkpoint()
            return
        self._waiting[fd] = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiting.pop(fd, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class WebSocket:
    """A server-side WebSocket over a socket: the ``Transport`` the host writes to."""

    __slots__ = (
        "_close_sent",
        "_flushed",
        "_nursery",
        "bytes_in",
        "bytes_out",
        "close_code",
        "close_reason",
        "closed",
        "closed_by",
        "closing",
        "heard",
        "idle_mark",
        "idle_since",
        "label",
        "messages_in",
        "messages_out",
        "metrics",
        "pending",
        "pending_bytes",
        "pinged_at",
        "read_scope",
        "settings",
        "silent_since",
        "sock",
        "started",
        "stream",
        "tokens",
        "tokens_at",
        "told_host",
        "writing",
    )

    def __init__(
        self, stream: Stream, settings: Settings, metrics: Metrics, nursery: trio.Nursery
    ) -> None:
        self.stream = stream
        self.sock = stream.sock
        self.settings = settings
        self.metrics = metrics
        self._nursery = nursery
        self.pending: deque[bytes] = deque()  # what the kernel has not taken yet
        self.pending_bytes = 0
        self.writing = False  # a writer task is draining `pending`
        self.closing = False  # we sent a Close frame
        self.closed = False  # the socket failed or was closed
        self.read_scope = trio.CancelScope()
        # Keepalive: `heard` is set by every read and cleared by the pinger, which pings a
        # connection silent since `silent_since` and closes it if `pinged_at` goes unanswered.
        self.heard = True
        self.silent_since = 0.0
        self.pinged_at: float | None = None
        now = trio.current_time()
        self.idle_mark, self.idle_since = 0, now  # messages_in when it last changed
        # The message rate bucket (used when messages_per_second_per_connection is set).
        self.tokens, self.tokens_at = float(settings.message_burst_per_connection), now
        self.told_host = False  # the room has been told this connection ended
        # Accounting (runtime/usage.py): wall-clock start, counts both ways, how it ended.
        self.started = time.time()
        self.bytes_in = self.bytes_out = self.messages_in = self.messages_out = 0
        self.closed_by = "network"  # or "client" / "server": who sent the first Close
        self.close_code, self.close_reason = 1006, ""
        self.label = "connection"
        self._flushed: trio.Event | None = None
        self._close_sent: trio.Event | None = None

    def write(self, frame: bytes, messages: int = 1) -> None:
        if self.closing or self.closed:
            return
        self.messages_out += messages
        self._write(frame)

    def _write(self, frame: bytes) -> None:
        self.bytes_out += len(frame)
        if self.stream.tls is not None:
            frame = self.stream.encrypt(frame)
        if self.pending:
            self.pending.append(frame)
            self.pending_bytes += len(frame)
            if self.pending_bytes > self.settings.max_outbox_bytes and not self.closing:
                self._overflow()
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken()
            return
        if sent < len(frame):
            rest = frame[sent:]
            self.pending.append(rest)
            self.pending_bytes += len(rest)
            if not self.writing:
                self.writing = True
                self._nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        pending = self.pending
        try:
            while pending and not self.closed:
                await trio.lowlevel.wait_writable(self.sock)
                if len(pending) == 1:
                    data = pending[0]
                else:
                    chunk, size = [], 0
                    for frame in pending:
                        chunk.append(frame)
                        size += len(frame)
                        if size >= _WRITE_CHUNK:
                            break
                    data = b"".join(chunk)
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    continue
                except OSError:
                    self._broken()
                    return
                self.pending_bytes -= sent
                while sent:
                    head = pending[0]
                    if len(head) <= sent:
                        sent -= len(head)
                        pending.popleft()
                    else:
                        pending[0] = head[sent:]
                        sent = 0
        finally:
            self.writing = False
            if self._flushed is not None:
                self._flushed.set()

    def _overflow(self) -> None:
        """The client stopped reading: drop its backlog and close it (1008)."""
        self.metrics.limit_outbox_overflow_total += 1
        log.warning(
            "%s: closed with 1008, over %d bytes queued because the client is not reading",
            self.label,
            self.settings.max_outbox_bytes,
        )
        # Keep the head: it may be a frame already half sent. Under TLS keep everything: a
        # record dropped from the middle would break the stream, and the Close after it.
        while len(self.pending) > 1 and self.stream.tls is None:
            self.pending_bytes -= len(self.pending.pop())
        self.close(1008, "outbox overflow: the client is not reading fast enough")

    def close(self, code: int | None, reason: str) -> None:
        """Send a Close frame (an empty one for ``code`` None) and stop reading soon."""
        if self.closing or self.closed:
            return
        self.closing = True
        self._write(encode_close(code, reason))
        self.closed_by, self.close_code, self.close_reason = "server", code or 1005, reason
        self.read_scope.deadline = min(
            self.read_scope.deadline, trio.current_time() + self.settings.close_timeout
        )
        if self._close_sent is not None:
            self._close_sent.set()

    def _broken(self) -> None:
        self.closed = True
        self.pending.clear()
        self.pending_bytes = 0
        self.read_scope.cancel()
        if self._close_sent is not None:
            self._close_sent.set()

    async def wait_close_sent(self, timeout: float) -> bool:
        """Wait (bounded) until a Close frame was queued or the socket failed; whether it was."""
        if not (self.closing or self.closed):
            self._close_sent = trio.Event()
            with trio.move_on_after(timeout):
                await self._close_sent.wait()
        return self.closing or self.closed

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until everything queued reached the kernel."""
        if self.pending and not self.closed:
            self._flushed = trio.Event()
            with trio.move_on_after(timeout):
                await self._flushed.wait()


class Edge:
    """Serves an ``App``: plain HTTP answered here or by rooms, upgrades handed to rooms."""

    def __init__(self, app: App, settings: Settings, host: Host, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.host = host
        self.metrics = metrics
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]
        self._rate = settings.messages_per_second_per_connection
        self.admission = Admission(settings, metrics)
        self.usage = Usage(settings)
        self._tls = tls_context(settings)
        self._websockets: dict[WebSocket, Peer | Upstream] = {}
        self._reads = ReadPoller()
        self._accepting = trio.CancelScope()
        self._draining = False
        self._all_closed: trio.Event | None = None  # set when draining and none is left

    async def serve(self, listener: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            if self.settings.ping_interval > 0 or self.settings.idle_timeout > 0:
                nursery.start_soon(self._watch)
            nursery.start_soon(self._reads.run)
            with self._accepting:
                await self._accept(listener, nursery)

    @staticmethod
    def _usage_record(ws: WebSocket, target: Peer | Upstream, stop: float) -> dict[str, Any]:
        if isinstance(target, Upstream):
            request, connection = target.request, target.id
            where: dict[str, Any] = {"room": None, "upstream": target.url}
        else:
            request, connection = target.conn.request, target.conn.id
            where = {"room": target.activation.label}
        return {
            "start": ws.started,
            "stop": stop,
            "route": request.route,
            **where,
            "connection": connection,
            "client_ip": request.client[0],
            "close_code": ws.close_code,
            "close_reason": ws.close_reason,
            "closed_by": ws.closed_by,
            "bytes_in": ws.bytes_in,
            "bytes_out": ws.bytes_out,
            "messages_in": ws.messages_in,
            "messages_out": ws.messages_out,
        }

    async def drain(self, reason: str = "server restarting: reconnect shortly") -> None:
        """Stop accepting; close every WebSocket with 1012 after its room has answered what
        its client sent (the Close goes out in the room's output order); return once all
        are closed. Bound it with a timeout: clients that never answer keep it waiting."""
        self._draining = True
        self._accepting.cancel()
        log.info("draining: closing %d WebSockets with 1012", len(self._websockets))
        for ws, target in list(self._websockets.items()):
            if isinstance(target, Upstream):
                ws.close(1012, reason)  # the client's answer is passed upstream
            else:
                self._tell_room(ws, target, 1012, reason, send_close=True)
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

    async def _watch(self) -> None:
        """One task for every WebSocket's timers (keepalive pings, idle timeout): a pass
        over all connections a few times per period costs far less than a timer each."""
        settings = self.settings
        periods = [settings.ping_interval, settings.ping_timeout, settings.idle_timeout]
        tick = max(0.05, min(p for p in periods if p > 0) / 4)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for ws in self._websockets:
                if ws.closing:
                    continue
                if settings.ping_interval:
                    self._keepalive(ws, now)
                if settings.idle_timeout:
                    self._idle(ws, now)

    def _keepalive(self, ws: WebSocket, now: float) -> None:
        """Ping a connection silent for ping_interval; close it if the ping goes unanswered."""
        if ws.heard:
            ws.heard, ws.silent_since, ws.pinged_at = False, now, None
        elif ws.pinged_at is None:
            if now - ws.silent_since >= self.settings.ping_interval:
                ws.write(_KEEPALIVE_PING, 0)
                ws.pinged_at = now
        elif self.settings.ping_timeout and now - ws.pinged_at >= self.settings.ping_timeout:
            self.metrics.keepalive_timeouts_total += 1
            log.info("%s: no answer to a ping; closing (1011)", ws.label)
            ws.close(1011, "keepalive timeout")

    def _idle(self, ws: WebSocket, now: float) -> None:
        """Close a connection whose client sent no message for idle_timeout (1001)."""
        if ws.messages_in != ws.idle_mark:
            ws.idle_mark, ws.idle_since = ws.messages_in, now
        elif now - ws.idle_since >= self.settings.idle_timeout:
            self.metrics.idle_timeouts_total += 1
            ws.close(1001, "idle timeout")

    async def _connection(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        metrics = self.metrics
        metrics.connections_open += 1
        stream = Stream(sock, self._tls)
        try:
            await self._tls_handshake(stream, addr)  # (the 503 below is sent over TLS too)
            if metrics.connections_open > self.settings.max_connections:
                metrics.limit_connections_total += 1
                await stream.send_all(_raw_response(503, "server is at its connection limit"))
                await stream.lingering_close(1.0)
                return
            upgrade = await self._http(stream, (addr[0], addr[1]))
            if upgrade is not None:
                # The HTTP phase's state (h11, the request head) is gone by now: an idle
                # WebSocket holds only what the data path needs.
                await self._websocket(stream, upgrade)
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

    # -- HTTP ----------------------------------------------------------------------------

    async def _http(self, stream: Stream, client: tuple[str, int]) -> _Upgrade | None:
        """Serve HTTP requests until the connection closes (None) or upgrades."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        timeout = self.settings.handshake_timeout
        while True:
            received = await self._receive_request(h, stream, client, timeout)
            if received is None:
                return None
            if isinstance(received, Response):
                await self._send_response(h, stream, received)
                break
            event, request = received
            answer = await self.route(request, upgrade=_is_websocket_upgrade(request))
            if not isinstance(answer, Response):
                upgrade = await self._upgrade(stream, event, request, answer)
                if not isinstance(upgrade, Response):
                    return attrs.evolve(upgrade, data=h.trailing_data[0])
                answer = upgrade
            await self._send_response(h, stream, answer, head_only=request.method == "HEAD")
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                break
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                break
            timeout = self.settings.keepalive_timeout
        await stream.lingering_close(1.0)
        return None

    async def _upgrade(
        self,
        stream: Stream,
        event: h11.Request,
        request: Request,
        target: tuple[type[Room], RoomId] | ProxyRoute,
    ) -> _Upgrade | Response:
        """Check the handshake and the upgrade-time rules; for a proxied route, open the
        upstream WebSocket. The upgrade to answer 101, or the response refusing it."""
        rules = target if isinstance(target, ProxyRoute) else target[0]
        problem = _handshake_problem(event, request) or await self.admission.admit(request, rules)
        if problem is not None:
            return problem
        if not isinstance(target, ProxyRoute):
            return _Upgrade(request, target, _switch(request))
        settings = self.settings
        upstream = await connect_upstream(
            target,
            request,
            secure=stream.tls is not None,
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
        return _Upgrade(request, upstream, _switch(request, upstream.subprotocol))

    async def _receive_request(
        self, h: h11.Connection, stream: Stream, client: tuple[str, int], timeout: float
    ) -> tuple[h11.Request, Request] | Response | None:
        """The next request; or the error response to end the connection with; or None when
        the client closed, or an idle keep-alive connection timed out."""
        settings, metrics = self.settings, self.metrics
        try:
            event = await self._next_event(h, stream, timeout)
            if event is None:  # timed out waiting for a request head
                if h.their_state is h11.IDLE and timeout == settings.keepalive_timeout:
                    return None
                metrics.limit_handshake_timeout_total += 1
                return _error(408, "request head not received in time")
            if not isinstance(event, h11.Request):
                return None  # ConnectionClosed
            if _head_size(event) > settings.max_header_bytes:
                # h11 only bounds a head that is still incomplete; bound complete ones too.
                metrics.limit_header_too_big_total += 1
                return _error(431, "request head too large")
            return event, await self._read_request(h, stream, event, client)
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                metrics.limit_header_too_big_total += 1
            if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return None
            return _error(exc.error_status_hint, f"bad request: {exc}")
        except HTTPError as exc:
            if exc.status == 413:
                metrics.limit_body_too_big_total += 1
            return _error(exc.status, exc.reason)

    async def _next_event(
        self, h: h11.Connection, stream: Stream, timeout: float
    ) -> h11.Event | None:
        with trio.move_on_after(timeout):
            while True:
                event = h.next_event()
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
                h.receive_data(await stream.recv())
        return None

    async def _read_request(
        self, h: h11.Connection, stream: Stream, event: h11.Request, client: tuple[str, int]
    ) -> Request:
        limit = self.settings.max_body_bytes
        names = {name for name, _ in event.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # Ambiguous framing is how requests are smuggled past proxies: refuse it.
            raise HTTPError(
                400, "a request must not have both Content-Length and Transfer-Encoding"
            )
        length = _content_length(event)
        if length is not None and length > limit:
            raise HTTPError(413, f"request body over {limit} bytes")
        body = bytearray()
        while True:
            part = await self._next_event(h, stream, self.settings.handshake_timeout)
            if part is None:
                raise HTTPError(408, "request body not received in time")
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > limit:
                    raise HTTPError(413, f"request body over {limit} bytes")
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise HTTPError(400, "connection closed in the middle of the request body")
        target = event.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        return Request(
            method=event.method.decode("ascii"),
            path=path,
            query_string=query,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            body=bytes(body),
            client=self._client_address(client, event.headers),
            stub_factory=self.host.stub,
        )

    def _client_address(
        self, peer: tuple[str, int], headers: Iterable[tuple[bytes, bytes]]
    ) -> tuple[str, int]:
        """The socket peer, or, when the peer is a trusted proxy, the client its
        ``X-Forwarded-For`` names: the rightmost address no trusted proxy added."""
        if not self._trusted or not _is_in(peer[0], self._trusted):
            return peer
        forwarded = [
            hop.strip()
            for name, value in headers
            if name == b"x-forwarded-for"
            for hop in value.decode("latin-1").split(",")
        ]
        for hop in reversed(forwarded):
            if not _is_in(hop, self._trusted):
                return (hop, 0) if _is_address(hop) else peer
        return peer

    async def _send_response(
        self, h: h11.Connection, stream: Stream, response: Response, head_only: bool = False
    ) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
        headers.append((b"content-length", str(len(response.body)).encode()))
        if response.status >= 400 and response.status not in (404, 405):
            headers.append((b"connection", b"close"))
        head = h11.Response(
            status_code=response.status, headers=headers, reason=_reason(response.status)
        )
        data = h.send(head) or b""
        if response.body and not head_only:
            data += h.send(h11.Data(data=response.body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        self.metrics.http_requests_total += 1

    async def route(
        self, request: Request, upgrade: bool
    ) -> Response | tuple[type[Room], RoomId] | ProxyRoute:
        """The response to a request, or for a WebSocket upgrade the room it joins or the
        proxied route that relays it."""
        try:
            if request.path in ("/_rooms/metrics", "/_rooms/usage"):
                return self._admin(request)
            if request.path == "/_rooms/client.js":
                return _client_js(request)
            matched = self.app.match(request.path)
            if matched is None:
                return await self._static(request)
            route, request.path_params = matched
            request.route = route.pattern
            if isinstance(route, RoomRoute):
                room_id = route.room_class.resolve(request.path_params["name"])
                if upgrade:
                    return route.room_class, room_id
                return await self.host.request(route.room_class, room_id, request)
            if isinstance(route, ProxyRoute):
                if upgrade:
                    return route
                return Response.text(
                    "this URL takes WebSocket connections only\n", 426, {"upgrade": "websocket"}
                )
            return await self._function(route, request)
        except HTTPError as exc:
            return Response.text(exc.reason, exc.status, exc.headers)
        except Exception:
            log.exception("%s %s: the handler raised; answered 500", request.method, request.path)
            return _error(500, "internal server error")

    async def _function(self, route: FunctionRoute, request: Request) -> Response:
        if request.method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            return Response.text(f"method {request.method} not allowed", 405, {"allow": allow})
        response = await route.handler(request)
        if not isinstance(response, Response):
            raise TypeError(f"route {route.pattern} returned {response!r}, not a rooms.Response")
        return response

    async def _static(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _error(404, "not found")
        path = self.app.static_file(request.path)
        if path is None:
            return _error(404, "not found")
        body = await trio.to_thread.run_sync(path.read_bytes)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            kind += "; charset=utf-8"
        return Response(200, body, {"content-type": kind, "cache-control": "no-cache"})

    def _admin(self, request: Request) -> Response:
        """/_rooms/metrics (Prometheus text) and /_rooms/usage (JSON), for the operator."""
        token = self.settings.admin_token
        if token:
            if request.header("authorization") != f"Bearer {token}":
                return _error(401, f"{request.path} needs 'Authorization: Bearer <admin_token>'")
        elif request.client[0] not in ("127.0.0.1", "::1"):
            return _error(403, f"set admin_token to read {request.path} from another host")
        if request.path == "/_rooms/usage":
            now = time.time()
            live = [self._usage_record(ws, p, now) for ws, p in self._websockets.items()]
            return Response.json(self.usage.report(live))
        return Response(
            200, self.metrics.prometheus().encode(), {"content-type": "text/plain; version=0.0.4"}
        )

    # -- WebSocket -----------------------------------------------------------------------

    async def _websocket(self, stream: Stream, upgrade: _Upgrade) -> None:
        target = upgrade.target
        try:
            async with trio.open_nursery() as nursery:
                ws = WebSocket(stream, self.settings, self.metrics, nursery)
                attached = await self._attach(ws, upgrade)
                if attached is None:
                    await stream.lingering_close(1.0)
                    return
                self.metrics.websocket_upgrades_total += 1
                self.metrics.websockets_open += 1
                self._websockets[ws] = attached
                address = upgrade.request.client[0]
                self.admission.opened(address)
                try:
                    if isinstance(attached, Upstream):
                        await self._relay(ws, attached, upgrade.data)
                    else:  # (no helper coroutine here: each frame is memory per connection)
                        code, _ = await self._session(ws, upgrade.data, attached)
                        await self._finish(ws, answered=code != 1006)
                finally:
                    self.admission.closed(address)
                    del self._websockets[ws]
                    self.usage.closed(self._usage_record(ws, attached, time.time()))
                    if self._all_closed is not None and not self._websockets:
                        self._all_closed.set()
                    self.metrics.websockets_open -= 1
                    nursery.cancel_scope.cancel()
        finally:
            if isinstance(target, Upstream):
                await target.aclose()

    async def _attach(self, ws: WebSocket, upgrade: _Upgrade) -> Peer | Upstream | None:
        """Join the room (or take the upstream) and send the 101; None if refused (503)."""
        target = upgrade.target
        if self._draining:
            await ws.stream.send_all(_raw_response(503, "server restarting: retry shortly"))
            return None
        if isinstance(target, Upstream):
            ws.label = f"proxied connection {target.id} to {target.url}"
            self.metrics.proxied_websockets_total += 1
            await ws.stream.send_all(upgrade.switch)
            return target
        peer = self.host.attach(*target, ws, upgrade.request)
        if peer is None:
            await ws.stream.send_all(_raw_response(503, "room is full"))
            return None
        ws.label = f"connection {peer.conn.id} in room {peer.activation.label}"
        try:
            await ws.stream.send_all(upgrade.switch)
        except ConnectionBroken:
            self.host.disconnected(peer, 1006, "")
            raise
        await self.host.connected(peer)
        return peer

    async def _refuse_in_order(self, ws: WebSocket, peer: Peer, exc: ProtocolError) -> None:
        """Close a room's client for a protocol error: the room answers what the client sent
        before the violation, then the Close goes out; a room too busy to get there in time
        does not keep the socket open."""
        self._tell_room(ws, peer, exc.code, exc.reason, send_close=True)
        if not await ws.wait_close_sent(self.settings.close_timeout):
            ws.close(exc.code, exc.reason)

    async def _relay(self, ws: WebSocket, upstream: Upstream, data: bytes) -> None:
        """A proxied connection: client messages go upstream, the upstream's come back."""
        async with trio.open_nursery() as nursery:
            upstream_done = trio.Event()
            nursery.start_soon(self._from_upstream, ws, upstream, upstream_done)
            code, reason = await self._session(ws, data, upstream)
            # The client's side has ended: tell the upstream how, and wait (bounded) for
            # its answer. 1005 and 1006 cannot be sent: no code, or "going away".
            if code == 1005:
                await upstream.close(None)
            elif code == 1006:
                await upstream.close(1001, "the client went away")
            else:
                await upstream.close(code, reason)
            with trio.move_on_after(self.settings.close_timeout):
                await upstream_done.wait()
            nursery.cancel_scope.cancel()
        await self._finish(ws, answered=code != 1006)

    async def _from_upstream(self, ws: WebSocket, upstream: Upstream, done: trio.Event) -> None:
        """Relay the upstream's messages to the client, until the upstream closes."""
        try:
            while True:
                for item in await upstream.receive():
                    if isinstance(item, (str, bytes)):
                        ws.write(encode_message(item))
                    elif isinstance(item, Ping):
                        await upstream.pong(item.payload)
                    elif isinstance(item, Close):
                        await upstream.close(item.code, item.reason)  # the reply, if ours
                        ws.close(item.code, item.reason)
                        return
                if ws.pending_bytes > _RELAY_BACKLOG:
                    await ws.flush(math.inf)  # a slow client slows the upstream down
        except ProtocolError as exc:
            await upstream.close(exc.code, exc.reason)
            ws.close(1011, f"the upstream broke the protocol: {exc.reason}")
        except ConnectionBroken:
            # 1011, not 1014 ("bad gateway"): some clients (wsproto) refuse 1014.
            ws.close(1011, "the upstream connection was lost")
        finally:
            done.set()

    async def _session(
        self, ws: WebSocket, data: bytes, target: Peer | Upstream
    ) -> tuple[int, str]:
        """Read the client's frames until it closes, handing its messages to the room or the
        upstream; the code and reason of the client's Close, or 1006. A protocol violation
        closes the client (for a room, in the room's output order)."""
        stream, sock = ws.stream, ws.sock
        tls, wait_readable = stream.tls, self._reads.wait_readable
        parser = FrameParser(max_message_size=self.settings.max_message_bytes)
        code, reason = 1006, ""
        self._reads.register(sock)
        try:
            with ws.read_scope:
                while True:
                    if data:
                        closed = await self._deliver(ws, parser.feed(data), target)
                        if closed is not None:
                            code, reason = closed
                            break
                        if parser.error is not None:  # after the valid messages before it
                            raise parser.error
                    # Plain sockets are read here directly: no extra coroutine frame, no
                    # per-connection object (both are memory per idle connection).
                    if tls is None:
                        data = await recv_socket(sock, len(data) < RECV_SIZE, wait_readable)
                    else:
                        data = await stream.recv(len(data) < RECV_SIZE, wait_readable)
                    ws.heard = True
                    ws.bytes_in += len(data)
                    if not data:
                        break  # TCP closed without a Close frame
        except ProtocolError as exc:
            self._protocol_error(ws, exc)
            if isinstance(target, Upstream):
                ws.close(exc.code, exc.reason)
            else:
                await self._refuse_in_order(ws, target, exc)
        except ConnectionBroken:
            pass
        finally:
            self._reads.unregister(sock)
            if not isinstance(target, Upstream):
                self._tell_room(ws, target, code, reason)
        return code, reason

    def _protocol_error(self, ws: WebSocket, exc: ProtocolError) -> None:
        if not isinstance(exc, _RateLimited):
            self.metrics.protocol_errors_total += 1
        if exc.code == 1009:
            self.metrics.limit_message_too_big_total += 1
        log.info("%s: closed with %d: %s", ws.label, exc.code, exc.reason)

    async def _finish(self, ws: WebSocket, answered: bool) -> None:
        """Let what is queued reach the client before the socket closes. Unless the client
        ``answered`` with its Close (the handshake is complete), also wait (bounded) for it
        to close first, so that a TCP reset does not destroy what was sent last. Not
        shielded: a server being stopped does not wait on its clients."""
        if not ws.closed:
            await ws.flush(self.settings.close_timeout)
            if not answered:
                await ws.stream.lingering_close(self.settings.close_timeout)

    def _tell_room(
        self, ws: WebSocket, peer: Peer, code: int, reason: str, send_close: bool = False
    ) -> None:
        """Tell the room, once, that this connection ended (see ``Host.disconnected``)."""
        if not ws.told_host:
            ws.told_host = True
            self.host.disconnected(peer, code, reason, send_close)

    async def _deliver(
        self, ws: WebSocket, events: list[Event], target: Peer | Upstream
    ) -> tuple[int, str] | None:
        """Hand messages to the room (or upstream) and answer pings; the code and reason of
        a Close."""
        auto = target.activation.room_class.auto_reply if isinstance(target, Peer) else None
        for item in events:
            if isinstance(item, (str, bytes)):
                if ws.closing:
                    continue
                ws.messages_in += 1
                if self._rate and not self._within_rate(ws):
                    continue
                if auto is not None and item == auto[0]:
                    ws.write(encode_message(auto[1]))
                    self.metrics.auto_replies_total += 1
                    continue
                if isinstance(target, Peer):
                    await self.host.received(target, item)
                else:
                    await target.send(item)
            elif isinstance(item, Ping):
                ws.write(encode_frame(OP_PONG, item.payload), 0)
            elif isinstance(item, Close):
                return self._close_received(ws, item)
        return None

    def _within_rate(self, ws: WebSocket) -> bool:
        """Spend one of ``ws``'s message tokens; past the rate, apply the action."""
        now = trio.current_time()
        burst = float(self.settings.message_burst_per_connection)
        tokens = min(burst, ws.tokens + (now - ws.tokens_at) * self._rate)
        ws.tokens_at = now
        if tokens >= 1:
            ws.tokens = tokens - 1
            return True
        ws.tokens = tokens
        self.metrics.limit_message_rate_total += 1
        if self.settings.message_rate_action.lower() == "drop":
            ws.write(_RATE_ERROR)  # at once, not in the room's output order
            return False
        # Closed like a protocol error: after the room's answers to the earlier messages.
        raise _RateLimited(1008, "message rate limit exceeded")

    @staticmethod
    def _close_received(ws: WebSocket, close: Close) -> tuple[int, str]:
        if not ws.closing:
            # Echo the client's code, as RFC 6455 section 5.5.1 asks.
            ws.write(encode_close(close.code, ""), 0)
            ws.closing = True
            ws.closed_by = "client"
            ws.close_code, ws.close_reason = close.code or 1005, close.reason
        if close.code is None:
            return 1005, ""
        return close.code, close.reason


@attrs.frozen
class _Upgrade:
    """A valid WebSocket handshake, ready to be answered with ``switch`` (the 101)."""

    request: Request
    target: tuple[type[Room], RoomId] | Upstream
    switch: bytes
    data: bytes = b""  # what the client sent after its request head


def _switch(request: Request, subprotocol: str | None = None) -> bytes:
    key = request.header("sec-websocket-key") or ""
    protocol = f"sec-websocket-protocol: {subprotocol}\r\n" if subprotocol else ""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        f"sec-websocket-accept: {accept_key(key)}\r\n{protocol}\r\n"
    ).encode()


def _is_websocket_upgrade(request: Request) -> bool:
    upgrade = request.header("upgrade")
    return upgrade is not None and "websocket" in upgrade.lower()


def _handshake_problem(event: h11.Request, request: Request) -> Response | None:
    """Why this upgrade request is not a valid RFC 6455 handshake, as a response; or None."""
    if request.method != "GET":
        return _error(400, "a WebSocket upgrade must use GET")
    if event.http_version != b"1.1":
        return _error(400, "a WebSocket upgrade needs HTTP/1.1")
    tokens = {t.strip().lower() for t in (request.header("connection") or "").split(",")}
    if "upgrade" not in tokens:
        return _error(400, "a WebSocket upgrade needs 'Connection: Upgrade'")
    if request.header("sec-websocket-version") != "13":
        return Response.text(
            "unsupported Sec-WebSocket-Version: this server speaks version 13",
            426,
            {"sec-websocket-version": "13"},
        )
    key = request.header("sec-websocket-key") or ""
    try:
        valid_key = len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        valid_key = False
    if not valid_key:
        return _error(400, "invalid Sec-WebSocket-Key: expected 16 random bytes in base64")
    return None


_CLIENT_JS = Path(__file__).with_name("static") / "client.js"


@functools.cache
def _client_js_file() -> tuple[bytes, str]:
    body = _CLIENT_JS.read_bytes()
    return body, '"' + hashlib.sha1(body).hexdigest()[:16] + '"'


def _client_js(request: Request) -> Response:
    """The browser client (RoomSocket), revalidated by ETag."""
    if request.method not in ("GET", "HEAD"):
        return Response.text("method not allowed", 405, {"allow": "GET, HEAD"})
    body, etag = _client_js_file()
    headers = {"etag": etag, "cache-control": "no-cache"}
    if request.header("if-none-match") == etag:
        return Response(304, b"", headers)
    headers["content-type"] = "text/javascript; charset=utf-8"
    return Response(200, body, headers)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_in(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _head_size(event: h11.Request) -> int:
    return len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)
    return None


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _error(status: int, message: str) -> Response:
    return Response.text(message + "\n", status)


def _raw_response(status: int, message: str) -> bytes:
    body = (message + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {_reason(status).decode()}\r\n"
        f"content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body
