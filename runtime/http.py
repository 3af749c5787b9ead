"""The HTTP/1.1 phase of a client connection (h11): requests in, responses out, until the
connection closes or a request is answered with a WebSocket upgrade.

Every request head must arrive within ``handshake_timeout`` (408: a slowloris guard) and
within ``max_header_bytes`` (431); its body, whole, within ``body_timeout`` of the head (408:
a trickled body, R-U-Dead-Yet, does not hold a connection slot) and ``max_body_bytes`` (413).
Each is one deadline for the whole part, not a timeout per read. Ambiguous framing
(Content-Length with Transfer-Encoding) is refused. Behind ``trusted_proxies`` the client's
address is the one ``X-Forwarded-For`` names.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import TypeVar

import attrs
import h11
import trio

from rooms import HTTPError, Request, Response
from rooms._engine import StubFactory, text_error

from .config import Settings
from .metrics import Metrics
from .stream import Stream

log = logging.getLogger("rooms.edge")

T = TypeVar("T")
Answer = Callable[[Request, bytes, bool], Awaitable[Response | T]]
"""Answers one request (its HTTP version; whether it came over TLS): a response, or an
upgrade to hand over."""


class HttpServer:
    """Serves HTTP/1.1 on the connections of one server."""

    def __init__(self, settings: Settings, metrics: Metrics, stub_factory: StubFactory) -> None:
        self.settings = settings
        self.metrics = metrics
        self._stub_factory = stub_factory
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]

    async def serve(
        self, stream: Stream, client: tuple[str, int], answer: Answer[T]
    ) -> tuple[T, bytes] | None:
        """Serve requests until the connection closes (None) or ``answer`` returns an
        upgrade: then the upgrade, and the bytes the client sent after its request."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        timeout = self.settings.handshake_timeout
        while True:
            received = await self._receive(h, stream, client, timeout)
            if received is None:
                return None
            if isinstance(received, Refusal):
                await self._send(h, stream, received.response, head=received.head)
                break
            event, request = received
            result = await answer(request, event.http_version, stream.tls is not None)
            if not isinstance(result, Response):
                return result, h.trailing_data[0]
            await self._send(h, stream, result, request, head=request.method == "HEAD")
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                break
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                break
            timeout = self.settings.keepalive_timeout
        await stream.lingering_close(1.0)
        return None

    async def _receive(
        self, h: h11.Connection, stream: Stream, client: tuple[str, int], timeout: float
    ) -> tuple[h11.Request, Request] | Refusal | None:
        """The next request; or the error answer to end the connection with; or None when
        the client closed, or an idle keep-alive connection timed out."""
        settings, metrics = self.settings, self.metrics
        event: h11.Event | None = None
        try:
            event = await _next_event(h, stream, trio.current_time() + timeout)
            if event is None:  # timed out waiting for a request head
                if h.their_state is h11.IDLE and timeout == settings.keepalive_timeout:
                    return None
                metrics.limit_handshake_timeout_total += 1
                return Refusal(text_error(408, "request head not received in time"))
            if not isinstance(event, h11.Request):
                return None  # ConnectionClosed
            if _head_size(event) > settings.max_header_bytes:
                # h11 only bounds a head that is still incomplete; bound complete ones too.
                metrics.limit_header_too_big_total += 1
                return Refusal.of(event, text_error(431, "request head too large"))
            return event, await self._read_request(h, stream, event, client)
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                metrics.limit_header_too_big_total += 1
            if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return None
            return Refusal.of(event, text_error(exc.error_status_hint, f"bad request: {exc}"))
        except HTTPError as exc:
            if exc.status == 413:
                metrics.limit_body_too_big_total += 1
            elif exc.status == 408:
                metrics.limit_body_timeout_total += 1
                log.info("%s:%d: %s; answered 408", client[0], client[1], exc.reason)
            return Refusal.of(event, text_error(exc.status, exc.reason))

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
        deadline = trio.current_time() + self.settings.body_timeout
        while True:
            part = await _next_event(h, stream, deadline)
            if part is None:
                raise HTTPError(
                    408, f"request body not received within {self.settings.body_timeout:g} s"
                )
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
            stub_factory=self._stub_factory,
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

    async def _send(
        self,
        h: h11.Connection,
        stream: Stream,
        response: Response,
        request: Request | None = None,
        *,
        head: bool,
    ) -> None:
        """Send ``response`` (to ``request``); to a HEAD (``head``) without its body."""
        response, response_head = sendable(response, request)
        data = h.send(response_head) or b""
        if response.body and not head:
            data += h.send(h11.Data(data=response.body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        self.metrics.http_requests_total += 1


def sendable(response: Response, request: Request | None = None) -> tuple[Response, h11.Response]:
    """``response`` and its head as h11 writes it; or, if it cannot be sent as HTTP (a header
    value with a line break, a character outside Latin-1), the 500 that replaces it, logged
    with the request it answers. The harness checks its answers here too."""
    try:
        return response, _head(response)
    except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
        where = f"{request.method} {request.path}" if request is not None else "a request"
        log.error("%s: the response cannot be sent as HTTP (%s); answered 500", where, exc)
        error = text_error(500, "internal server error")
        return error, _head(error)


def _head(response: Response) -> h11.Response:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    headers.append((b"content-length", str(len(response.body)).encode()))
    if response.status >= 400 and response.status not in (404, 405):
        headers.append((b"connection", b"close"))
    return h11.Response(
        status_code=response.status, headers=headers, reason=_reason(response.status)
    )


@attrs.frozen
class Refusal:
    """An error answer that ends the connection; ``head``: it answers a HEAD request, so it
    goes without its body, as every answer to a HEAD does."""

    response: Response
    head: bool = False

    @classmethod
    def of(cls, event: h11.Event | None, response: Response) -> Refusal:
        """``response`` as the answer to the request ``event`` began (None: none began)."""
        return cls(response, isinstance(event, h11.Request) and event.method == b"HEAD")


def raw_response(response: Response) -> bytes:
    """``response`` as bytes that end the connection, without h11: for the refusals sent
    outside the HTTP phase (a 503 at the connection limit, or after the upgrade)."""
    head = [f"HTTP/1.1 {response.status} {_reason(response.status).decode()}"]
    head += [f"{name}: {value}" for name, value in response.headers.items()]
    head += [f"content-length: {len(response.body)}", "connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + response.body


async def _next_event(h: h11.Connection, stream: Stream, deadline: float) -> h11.Event | None:
    """The next event, or None if it is not complete by ``deadline``."""
    with trio.move_on_at(deadline):
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            h.receive_data(await stream.recv())
    return None


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
