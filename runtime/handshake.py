"""The WebSocket opening handshake and closing rules, sans-I/O (RFC 6455 sections 4, 5.5.1, 7).

No sockets here, as in wsproto's ``handshake.py`` and ``connection.py``: the server side checks
an upgrade request and builds its 101; the client side (a proxied route's upstream) builds its
request headers and checks the answer; ``CloseState`` and its two transitions say what a
connection may still send once a Close frame has gone either way. The edge and the proxy do
the I/O around these functions; the tests drive them with values and bytes.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
from collections.abc import Iterable, Mapping

from rooms import Request, Response
from rooms._engine import text_error

from .frames import Close, accept_key, encode_close

# -- the server side ------------------------------------------------------------------------


def is_upgrade(request: Request) -> bool:
    """Whether ``request`` asks for a WebSocket (it is then checked by ``check_upgrade``)."""
    return "websocket" in _tokens(request.header("upgrade"))


def check_upgrade(request: Request, http_version: bytes) -> Response | None:
    """Why this upgrade request is not a valid RFC 6455 handshake, as the response that
    refuses it; None when it is valid."""
    if request.method != "GET":
        return text_error(400, "a WebSocket upgrade must use GET")
    if http_version != b"1.1":
        return text_error(400, "a WebSocket upgrade needs HTTP/1.1")
    if "upgrade" not in _tokens(request.header("connection")):
        return text_error(400, "a WebSocket upgrade needs 'Connection: Upgrade'")
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
        return text_error(400, "invalid Sec-WebSocket-Key: expected 16 random bytes in base64")
    return None


def accept_response(request: Request, subprotocol: str | None = None) -> bytes:
    """The 101 that accepts a checked upgrade request, with the chosen ``subprotocol``."""
    key = request.header("sec-websocket-key") or ""
    protocol = f"sec-websocket-protocol: {subprotocol}\r\n" if subprotocol else ""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        f"sec-websocket-accept: {accept_key(key)}\r\n{protocol}\r\n"
    ).encode()


# -- the client side ------------------------------------------------------------------------


class HandshakeError(Exception):
    """The server answered, but not with a usable WebSocket handshake."""


def client_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes in base64."""
    return base64.b64encode(os.urandom(16)).decode()


def client_headers(
    host: str, key: str, offered: str | None, extra: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The headers of a client's upgrade request to ``host``, offering the subprotocols
    ``offered`` (a Sec-WebSocket-Protocol value) and carrying ``extra``."""
    headers = [
        ("host", host),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", key),
        ("sec-websocket-version", "13"),
        *extra,
    ]
    if offered:
        headers.append(("sec-websocket-protocol", offered))
    return headers


def check_accept(fields: Mapping[str, str], key: str, offered: str | None) -> str | None:
    """Check a server's 101 (its header ``fields``, lower-case names) against the request
    that sent ``key`` and ``offered``; the subprotocol it chose. HandshakeError if wrong."""
    if "websocket" not in _tokens(fields.get("upgrade")):
        raise HandshakeError("its 101 lacks 'Upgrade: websocket'")
    if "upgrade" not in _tokens(fields.get("connection")):
        raise HandshakeError("its 101 lacks 'Connection: Upgrade'")
    if fields.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError("wrong Sec-WebSocket-Accept in its 101")
    if fields.get("sec-websocket-extensions"):
        raise HandshakeError("it chose an extension that was not offered")
    chosen = fields.get("sec-websocket-protocol")
    if chosen is not None and chosen not in _tokens(offered, lower=False):
        raise HandshakeError(f"it chose subprotocol {chosen!r}, which the client did not offer")
    return chosen


def _tokens(value: str | None, lower: bool = True) -> set[str]:
    """The tokens of a comma-separated header value (lower-cased for case-blind ones)."""
    tokens = {t.strip() for t in (value or "").split(",")} - {""}
    return {t.lower() for t in tokens} if lower else tokens


# -- closing --------------------------------------------------------------------------------


class CloseState(enum.IntEnum):
    """Where a connection is in the closing handshake; only OPEN may send messages."""

    OPEN = 0
    """Messages flow both ways."""
    CLOSING = 1
    """We sent a Close first: reading on (bounded by close_timeout) until the peer's."""
    CLOSED = 2
    """Both Close frames have been sent (ours may be the echo of the peer's)."""
    BROKEN = 3
    """The socket failed: nothing more is sent or read."""


def start_close(state: CloseState) -> bool:
    """Whether a Close frame may be sent first now (it moves the connection to CLOSING)."""
    return state is CloseState.OPEN


def receive_close(state: CloseState, close: Close) -> tuple[CloseState, bytes]:
    """The peer's Close arrived: the new state, and the frame to answer with (the echo of
    its code, as section 5.5.1 asks; nothing if we had sent ours already)."""
    if state is CloseState.OPEN:
        return CloseState.CLOSED, encode_close(close.code, "")
    if state is CloseState.CLOSING:
        return CloseState.CLOSED, b""
    return state, b""
