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

import math
import secrets
from typing import Any

import h11
import trio

from rooms import Request, Response
from rooms._engine import ProxyRoute, text_error

from .dial import ClientSocket, check_switch, next_event, open_stream, send_upgrade
from .frames import (
    Close,
    Ping,
    ProtocolError,
    encode_message,
)
from .handshake import HandshakeError
from .stream import ConnectionBroken
from .websocket import Sessions, WebSocket

_MAX_REFUSAL_BODY = 64 * 1024  # of an upstream's refusal, passed on to the client
_RELAY_BACKLOG = 256 * 1024  # bytes queued for a proxied client before the upstream waits


class Upstream(ClientSocket):
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
        super().__init__(stream, leftover, max_message_size)
        self.request = request
        self.url = url
        self.subprotocol = subprotocol
        self.id = secrets.token_hex(8)
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

    room = None

    @property
    def route(self) -> str:
        return self.request.route

    def usage(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "room": None,
            "upstream": self.url,
            "connection": self.id,
            "client_ip": self.request.client[0],
        }


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
            stream = await open_stream(url, route.ssl_context)
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


async def _handshake(
    stream: trio.abc.Stream,
    route: ProxyRoute,
    request: Request,
    url: str,
    secure: bool,
    max_message_size: int,
) -> Upstream | Response:
    offered = request.header("sec-websocket-protocol")
    forwarded = [(k, v) for k, v in request.headers if k.lower() in route.forward_headers]
    forwarded.append(("x-forwarded-for", request.client[0]))
    forwarded.append(("x-forwarded-proto", "https" if secure else "http"))
    if isinstance(request.identity, str):
        forwarded.append(("x-rooms-identity", request.identity))
    h, answer, key = await send_upgrade(stream, url, offered, forwarded)
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
    chosen = check_switch(answer, key, offered)
    leftover = h.trailing_data[0]
    return Upstream(stream, request, url, chosen, leftover, max_message_size)


async def _refusal(h: h11.Connection, answer: h11.Response, stream: trio.abc.Stream) -> Response:
    """The upstream's refusal, passed on: its status, body (bounded) and content type."""
    body = bytearray()
    while len(body) <= _MAX_REFUSAL_BODY:
        event = await next_event(h, stream)
        if not isinstance(event, h11.Data):
            break
        body += event.data
    headers = {"x-upstream-status": str(answer.status_code)}
    for name, value in answer.headers:
        if name.lower() in (b"content-type", b"www-authenticate", b"retry-after"):
            headers[name.decode().lower()] = value.decode("latin-1")
    return Response(answer.status_code, bytes(body[:_MAX_REFUSAL_BODY]), headers)


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
