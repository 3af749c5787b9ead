"""WebSocket connections the engine opens itself, as a client: to a proxied route's upstream
(``proxy``) and to another node of the cluster (``link``).

The same frame codec as the server side (``frames``), with the client's rules: every frame
sent is masked, none received may be. h11 carries the upgrade request and its answer.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

import h11
import trio

from .frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    Received,
    close_payload,
    encode_frame,
)
from .handshake import HandshakeError, check_accept, client_headers, client_key
from .stream import RECV_SIZE, ConnectionBroken


class ClientSocket:
    """The client's end of a WebSocket: frames out (masked), events in."""

    def __init__(self, stream: trio.abc.Stream, leftover: bytes, max_message_size: int) -> None:
        self._stream = stream
        self._parser = FrameParser(max_message_size=max_message_size, client=True)
        self._leftover = leftover
        self._sending = trio.StrictFIFOLock()  # (several tasks may send)
        self.close_sent = False

    async def send(self, message: str | bytes) -> None:
        await self._send(_frame(message))

    async def send_all(self, messages: Iterable[str | bytes]) -> None:
        """Several messages in one write."""
        await self._send(b"".join(_frame(message) for message in messages))

    async def ping(self, payload: bytes) -> None:
        await self._send(encode_frame(OP_PING, payload, mask=os.urandom(4)))

    async def pong(self, payload: bytes) -> None:
        await self._send(encode_frame(OP_PONG, payload, mask=os.urandom(4)))

    async def close(self, code: int | None, reason: str = "") -> None:
        """Send a Close frame (once); an empty one for ``code`` None."""
        if self.close_sent:
            return
        self.close_sent = True
        await self._send(encode_frame(OP_CLOSE, close_payload(code, reason), mask=os.urandom(4)))

    async def _send(self, data: bytes) -> None:
        """A lost connection is not raised here: the receiving side finds it."""
        async with self._sending:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.send_all(data)

    async def receive(self) -> list[Received]:
        """The next events; ConnectionBroken at the connection's end, ProtocolError when
        the server breaks the protocol."""
        if self._leftover:
            data, self._leftover = self._leftover, b""
        else:
            try:
                data = bytes(await self._stream.receive_some(RECV_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionBroken(f"connection lost: {exc}") from None
            if not data:
                raise ConnectionBroken("the server closed the connection without a Close")
        return self._parser.feed(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


def _frame(message: str | bytes) -> bytes:
    if isinstance(message, str):
        return encode_frame(OP_TEXT, message.encode(), mask=os.urandom(4))
    return encode_frame(OP_BINARY, message, mask=os.urandom(4))


async def open_stream(url: str, context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """A TCP (``ws://``) or TLS (``wss://``) connection to ``url``'s host."""
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


async def send_upgrade(
    stream: trio.abc.Stream, url: str, offered: str | None, extra: Iterable[tuple[str, str]]
) -> tuple[h11.Connection, h11.Event, str]:
    """Send the upgrade request for ``url``: the h11 connection, its answer's first event
    and the key that was sent (for ``check_accept``)."""
    parts = urlsplit(url)
    key = client_key()
    headers = client_headers(parts.netloc, key, offered, extra)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    h = h11.Connection(h11.CLIENT)
    data = h.send(h11.Request(method="GET", target=target, headers=headers)) or b""
    await stream.send_all(data + (h.send(h11.EndOfMessage()) or b""))
    return h, await next_event(h, stream), key


def check_switch(answer: h11.InformationalResponse, key: str, offered: str | None) -> str | None:
    """Check a server's 101 against the request that sent ``key`` and offered ``offered``:
    the subprotocol it chose (HandshakeError if the 101 is wrong)."""
    fields = {name.decode().lower(): value.decode("latin-1") for name, value in answer.headers}
    return check_accept(fields, key, offered)


async def next_event(h: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(bytes(await stream.receive_some(RECV_SIZE)))
            continue
        if event is h11.PAUSED:
            raise HandshakeError("its answer could not be read")
        return event  # type: ignore[return-value]


async def connect(
    url: str, headers: Iterable[tuple[str, str]], max_message_size: int
) -> ClientSocket:
    """A WebSocket to ``url`` (a ``ws://`` one) sending ``headers`` with the upgrade;
    HandshakeError naming the status and body of a refusal, OSError if unreachable."""
    stream = await open_stream(url)
    try:
        h, answer, key = await send_upgrade(stream, url, None, headers)
        if isinstance(answer, h11.InformationalResponse) and answer.status_code == 101:
            fields = {
                name.decode().lower(): value.decode("latin-1") for name, value in answer.headers
            }
            check_accept(fields, key, None)
            return ClientSocket(stream, h.trailing_data[0], max_message_size)
        if isinstance(answer, h11.Response):
            body = await next_event(h, stream)
            text = body.data.decode(errors="replace") if isinstance(body, h11.Data) else ""
            raise HandshakeError(f"answered {answer.status_code} {text}".strip())
        raise HandshakeError("closed the connection without answering the upgrade")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
