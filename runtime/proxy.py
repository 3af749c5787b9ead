"""Proxied WebSocket routes (``App.proxy``): the edge as a client of an upstream server.

The client's side is served by the edge exactly as for a room (limits, keepalive, rules,
accounting). ``connect`` opens the upstream WebSocket before the client gets its 101, so an
unreachable upstream is a 502 (504 after ``upstream_timeout``) and a refusing one has its
status and body passed on. Messages are relayed whole: fragmented ones are reassembled and
validated on the way, text stays text, binary stays binary. Each side's pings are answered
by the edge; Close codes and reasons travel both ways.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import ssl
from urllib.parse import urlsplit

import h11
import trio

from rooms import Request, Response
from rooms._app import ProxyRoute

from .frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PONG,
    OP_TEXT,
    Event,
    FrameParser,
    accept_key,
    close_payload,
    encode_frame,
)
from .stream import RECV_SIZE, ConnectionBroken

_MAX_REFUSAL_BODY = 64 * 1024  # of an upstream's refusal, passed on to the client


class Upstream:
    """A client WebSocket to the upstream of one proxied connection."""

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

    async def receive(self) -> list[Event]:
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
    except _Invalid as exc:
        result = _bad_gateway(502, url, str(exc))
    if isinstance(result, Response) and stream is not None:
        await trio.aclose_forcefully(stream)
    return result


class _Invalid(Exception):
    """The upstream answered, but not with a usable WebSocket handshake."""


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
    key = base64.b64encode(os.urandom(16)).decode()
    offered = request.header("sec-websocket-protocol")
    headers = [
        ("host", parts.netloc),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", key),
        ("sec-websocket-version", "13"),
        *(
            (name, value)
            for name, value in request.headers
            if name.lower() in route.forward_headers
        ),
        ("x-forwarded-for", request.client[0]),
        ("x-forwarded-proto", "https" if secure else "http"),
    ]
    if offered:
        headers.append(("sec-websocket-protocol", offered))
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
        raise _Invalid("closed the connection without answering the upgrade")
    raise _Invalid(f"answered {getattr(answer, 'status_code', '?')} to a WebSocket upgrade")


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
    if fields.get("sec-websocket-accept") != accept_key(key):
        raise _Invalid("wrong Sec-WebSocket-Accept in its 101")
    if fields.get("sec-websocket-extensions"):
        raise _Invalid("it chose an extension that was not offered")
    chosen = fields.get("sec-websocket-protocol")
    if chosen is not None and chosen not in {p.strip() for p in (offered or "").split(",")}:
        raise _Invalid(f"it chose subprotocol {chosen!r}, which the client did not offer")
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
            raise _Invalid("its answer could not be read")
        return event  # type: ignore[return-value]


def _bad_gateway(status: int, url: str, why: str) -> Response:
    return Response.text(f"upstream {url}: {why}\n", status)
