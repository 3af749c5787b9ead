"""Proxied WebSocket routes (``App.proxy``): the edge as a client of an upstream server.

The client's side is served by the edge exactly as for a room (limits, keepalive, rules,
accounting): the ``Upstream`` is its connection's ``Target``. ``connect`` opens the upstream
WebSocket before the client gets its 101, so an unreachable upstream is a 502 (504 after
``upstream_timeout``) and a refusing one has its status and body passed on. ``relay`` then
carries messages whole both ways: fragmented ones are reassembled and validated on the way,
text stays text, binary stays binary. Each side's pings are answered by the edge; Close codes
and reasons travel both ways.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import ssl
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from rooms import Request, Response
from rooms._engine import ProxyRoute, text_error

from .frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameParser,
    Ping,
    ProtocolError,
    Received,
    close_payload,
    encode_frame,
    encode_message,
)
from .handshake import HandshakeError, check_accept, client_headers, client_key
from .stream import RECV_SIZE, ConnectionBroken
from .websocket import Sessions, WebSocket

_MAX_REFUSAL_BODY = 64 * 1024  # of an upstream's refusal, passed on to the client
_RELAY_BACKLOG = 256 * 1024  # bytes queued for a proxied client before the upstream waits


class Upstream:
    """A client WebSocket to the upstream of one proxied connection; the ``Target`` of
    that connection (``client``, once it joined)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        request: Request,
        url: str,
        subprotocol: str | None,
        leftover: bytes,
        max_message_size: int,
    ) -> None:
        self.request = request
        self.url = url
        self.subprotocol = subprotocol
        self.id = secrets.token_hex(8)
        self._stream = stream
        self._parser = FrameParser(max_message_size=max_message_size, client=True)
        self._leftover = leftover
        self._sending = trio.StrictFIFOLock()  # the relay's two directions both send
        self.close_sent = False
        self.client: WebSocket | None = None

    # -- Target (what the client's read loop calls) --------------------------------------

    @property
    def label(self) -> str:
        return f"proxied connection {self.id} to {self.url}"

    async def deliver(self, message: str | bytes) -> None:
        await self.send(message)

    def end(self, code: int, reason: str, send_close: bool = False) -> None:
        # Nothing to order behind: a Close for the client goes out at once. (The relay
        # tells the upstream how the client's side ended.)
        if send_close and self.client is not None:
            self.client.close(code, reason)

    def usage(self) -> dict[str, Any]:
        return {
            "route": self.request.route,
            "room": None,
            "upstream": self.url,
            "connection": self.id,
            "client_ip": self.request.client[0],
        }

    # -- the upstream's side -------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self._send(OP_TEXT, message.encode())
        else:
            await self._send(OP_BINARY, message)

    async def pong(self, payload: bytes) -> None:
        await self._send(OP_PONG, payload)

    async def close(self, code: int | None, reason: str = "") -> None:
        """Send a Close frame (once); an empty one for ``code`` None."""
        if self.close_sent:
            return
        self.close_sent = True
        await self._send(OP_CLOSE, close_payload(code, reason))

    async def _send(self, opcode: int, payload: bytes) -> None:
        """Send one frame. A lost connection is not raised here: the receiving side finds
        it and closes the client (1011)."""
        frame = encode_frame(opcode, payload, mask=os.urandom(4))
        async with self._sending:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.send_all(frame)

    async def receive(self) -> list[Received]:
        """The next events from the upstream; ConnectionBroken at its end, ProtocolError
        when it breaks the protocol."""
        if self._leftover:
            data, self._leftover = self._leftover, b""
        else:
            try:
                data = bytes(await self._stream.receive_some(RECV_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionBroken(f"upstream connection lost: {exc}") from None
            if not data:
                raise ConnectionBroken("the upstream closed the connection without a Close")
        return self._parser.feed(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


async def connect(
    route: ProxyRoute, request: Request, secure: bool, timeout: float, max_message_size: int
) -> Upstream | Response:
    """Open the upstream WebSocket for ``request``, or the response to refuse the upgrade
    with (502, 504, or the upstream's own refusal)."""
    url = route.upstream_url(request.path_params, request.query_string)
    stream: trio.abc.Stream | None = None
    result: Upstream | Response
    try:
        with trio.fail_after(timeout):
            stream = await _open(url, route.ssl_context)
            result = await _handshake(stream, route, request, url, secure, max_message_size)
    except trio.TooSlowError:
        result = _bad_gateway(504, url, f"no answer within upstream_timeout ({timeout:g} s)")
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        result = _bad_gateway(502, url, str(cause or exc) or type(exc).__name__)
    except HandshakeError as exc:
        result = _bad_gateway(502, url, str(exc))
    if isinstance(result, Response) and stream is not None:
        await trio.aclose_forcefully(stream)
    return result


async def _open(url: str, context: ssl.SSLContext | None) -> trio.abc.Stream:
    parts = urlsplit(url)
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    tcp = await trio.open_tcp_stream(host, parts.port or (443 if tls else 80))
    if not tls:
        return tcp
    stream = trio.SSLStream(tcp, context or ssl.create_default_context(), server_hostname=host)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


async def _handshake(
    stream: trio.abc.Stream,
    route: ProxyRoute,
    request: Request,
    url: str,
    secure: bool,
    max_message_size: int,
) -> Upstream | Response:
    parts = urlsplit(url)
    key = client_key()
    offered = request.header("sec-websocket-protocol")
    forwarded = [(k, v) for k, v in request.headers if k.lower() in route.forward_headers]
    forwarded.append(("x-forwarded-for", request.client[0]))
    forwarded.append(("x-forwarded-proto", "https" if secure else "http"))
    headers = client_headers(parts.netloc, key, offered, forwarded)
    if isinstance(request.identity, str):
        headers.append(("x-rooms-identity", request.identity))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    h = h11.Connection(h11.CLIENT)
    data = h.send(h11.Request(method="GET", target=target, headers=headers)) or b""
    await stream.send_all(data + (h.send(h11.EndOfMessage()) or b""))
    answer = await _next(h, stream)
    if isinstance(answer, h11.InformationalResponse) and answer.status_code == 101:
        return _accepted(h, answer, stream, request, url, key, offered, max_message_size)
    if isinstance(answer, h11.Response) and answer.status_code >= 400:
        return await _refusal(h, answer, stream)
    if isinstance(answer, h11.ConnectionClosed):
        raise HandshakeError("closed the connection without answering the upgrade")
    raise HandshakeError(f"answered {getattr(answer, 'status_code', '?')} to a WebSocket upgrade")


def _accepted(
    h: h11.Connection,
    answer: h11.InformationalResponse,
    stream: trio.abc.Stream,
    request: Request,
    url: str,
    key: str,
    offered: str | None,
    max_message_size: int,
) -> Upstream:
    fields = {name.decode().lower(): value.decode("latin-1") for name, value in answer.headers}
    chosen = check_accept(fields, key, offered)
    leftover = h.trailing_data[0]
    return Upstream(stream, request, url, chosen, leftover, max_message_size)


async def _refusal(h: h11.Connection, answer: h11.Response, stream: trio.abc.Stream) -> Response:
    """The upstream's refusal, passed on: its status, body (bounded) and content type."""
    body = bytearray()
    while len(body) <= _MAX_REFUSAL_BODY:
        event = await _next(h, stream)
        if not isinstance(event, h11.Data):
            break
        body += event.data
    headers = {"x-upstream-status": str(answer.status_code)}
    for name, value in answer.headers:
        if name.lower() in (b"content-type", b"www-authenticate", b"retry-after"):
            headers[name.decode().lower()] = value.decode("latin-1")
    return Response(answer.status_code, bytes(body[:_MAX_REFUSAL_BODY]), headers)


async def _next(h: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(bytes(await stream.receive_some(RECV_SIZE)))
            continue
        if event is h11.PAUSED:
            raise HandshakeError("its answer could not be read")
        return event  # type: ignore[return-value]


def _bad_gateway(status: int, url: str, why: str) -> Response:
    return text_error(status, f"upstream {url}: {why}")


# -- the relay --------------------------------------------------------------------------------


async def relay(
    sessions: Sessions, ws: WebSocket, upstream: Upstream, data: bytes, close_timeout: float
) -> None:
    """A proxied connection: the client's messages go upstream (its read loop, with
    ``data`` that came with its upgrade), the upstream's come back."""
    async with trio.open_nursery() as nursery:
        upstream_done = trio.Event()
        nursery.start_soon(_from_upstream, ws, upstream, upstream_done)
        code, reason = await sessions.run(ws, data)
        # The client's side has ended: tell the upstream how, and wait (bounded) for its
        # answer. 1005 and 1006 cannot be sent: no code, or "going away".
        if code == 1005:
            await upstream.close(None)
        elif code == 1006:
            await upstream.close(1001, "the client went away")
        else:
            await upstream.close(code, reason)
        with trio.move_on_after(close_timeout):
            await upstream_done.wait()
        nursery.cancel_scope.cancel()
    await sessions.linger(ws, answered=code != 1006)


async def _from_upstream(ws: WebSocket, upstream: Upstream, done: trio.Event) -> None:
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
                await ws.wait_drained(math.inf)  # a slow client slows the upstream down
    except ProtocolError as exc:
        await upstream.close(exc.code, exc.reason)
        ws.close(1011, f"the upstream broke the protocol: {exc.reason}")
    except ConnectionBroken:
        # 1011, not 1014 ("bad gateway"): some clients (wsproto) refuse 1014.
        ws.close(1011, "the upstream connection was lost")
    finally:
        done.set()
