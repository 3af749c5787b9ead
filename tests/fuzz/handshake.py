"""Fuzz target: ``runtime.handshake``, the WebSocket opening handshake on both sides.

The input is text (Latin-1, as the edge decodes headers), in lines::

    GET 1.1                      <- the method and the HTTP version
    upgrade: websocket           <- request headers, "name: value"
    sec-websocket-key: ...
                                 <- a blank line, then
    sec-websocket-accept: ...    <- the fields of a server's 101, for the client's check

A header line h11 would refuse (no colon, a name that is not a token, a NUL or CR in the
value) is skipped, as such a request never reaches the checks. Documented: ``is_upgrade``
and ``check_upgrade`` answer (a refusal is a 400 or 426 with a body) and never raise;
``check_accept`` raises only ``HandshakeError``. And the two sides agree: the 101 that
``accept_response`` builds for a request ``check_upgrade`` passed is one ``check_accept``
accepts, with the subprotocol the server chose.
"""

from __future__ import annotations

import re

from rooms import Request
from runtime.handshake import (
    HandshakeError,
    _tokens,
    accept_response,
    check_accept,
    check_upgrade,
    is_upgrade,
)

TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
SAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
"""RFC 6455's example key (its accept is ``s3pPLMBiTxaQ9kYGzzhZRbK+xOo=``)."""


def one_input(data: bytes) -> None:
    text = data.decode("latin-1")
    request_part, _, response_part = text.partition("\n\n")
    first, _, header_lines = request_part.partition("\n")
    method, _, version = first.partition(" ")
    headers = fields(header_lines)
    request = Request(method=method, path="/", headers=headers)
    if not isinstance(is_upgrade(request), bool):
        raise AssertionError("is_upgrade answered a non-bool")
    refusal = check_upgrade(request, version.encode("latin-1"))
    if refusal is not None:
        if refusal.status not in (400, 426) or not refusal.body:
            raise AssertionError(f"unexpected refusal {refusal.status} {refusal.body!r}")
    else:
        agree(request)
    # The client's side: its key is its own (``client_key``), the request's when valid.
    key = SAMPLE_KEY if refusal is not None else request.header("sec-websocket-key") or ""
    offered = request.header("sec-websocket-protocol")
    answered = {name.lower(): value for name, value in fields(response_part)}
    try:
        check_accept(answered, key, offered)
    except HandshakeError as exc:
        if not str(exc):
            raise AssertionError("a HandshakeError without a reason") from exc


def agree(request: Request) -> None:
    """The server's 101 for a valid upgrade passes the client's check."""
    key = request.header("sec-websocket-key") or ""
    offered = request.header("sec-websocket-protocol")
    # An app picks one of the offered subprotocols (RFC 6455: a token), or none.
    valid = [token for token in _tokens(offered, lower=False) if TOKEN.fullmatch(token)]
    chosen = min(valid, default=None)
    response = accept_response(request, chosen).decode("ascii")
    head, sep, rest = response.partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    if status != "HTTP/1.1 101 Switching Protocols" or not sep or rest:
        raise AssertionError(f"malformed 101: {response!r}")
    answered = {}
    for line in lines:
        name, colon, value = line.partition(": ")
        if not colon or not TOKEN.fullmatch(name):
            raise AssertionError(f"malformed header line {line!r} in the 101")
        answered[name] = value
    if check_accept(answered, key, offered) != chosen:
        raise AssertionError(f"the client did not see the subprotocol {chosen!r}")


def fields(lines: str) -> list[tuple[str, str]]:
    """The header lines h11 would let through, as (name, value) with the value stripped."""
    headers = []
    for line in lines.split("\n"):
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if colon and TOKEN.fullmatch(name) and not {"\r", "\0"} & set(value):
            headers.append((name, value))
    return headers
