"""Node links (cluster mode): how a client connected to one node reaches a room another holds.

A node opens one link to each peer whose rooms its clients use: a WebSocket to
``/_rooms/cluster`` at the peer's ``node_address``, authenticated by ``cluster_token``, whose
binary messages are msgpack arrays ``[kind, ...]``. Over it the client's node (the edge):

- attaches a client to the room (``ATTACH`` -> ``JOINED`` or ``REFUSED``), and once the
  client has its 101, connects it (``CONNECT``: the room's ``on_connect``); forwards its
  messages (``MESSAGE``) and its end (``ENDED``); calls rooms held there or sends them plain
  HTTP requests (``CALL``, ``REQUEST`` -> ``REPLY``); asks that node's operator's view about
  itself for an admin page open on another node (``OPERATOR`` -> ``REPLY``: an operator's
  request to ``/_rooms/admin/...``, whose token the asking node checked);

and the room's node (the owner) sends back:

- what the room sends: ``SEND`` carries one encoded frame and the clients it goes to, once per
  node per burst, so the room's encode-once and one write per burst survive (the edge writes
  the same bytes to each socket); ``CLOSE``, in the room's output order;
- ``PAUSE`` / ``RESUME`` when a client's room has a full mailbox: the edge stops reading that
  client's socket, as it does for a room of its own.

Pings and ``auto_reply`` are answered at the client's node, so a hibernated room is not woken
by them. A link that breaks closes the clients it carried with 1012 (they reconnect and find
the room again) and fails its calls. Each direction of a pair of nodes is its own link: a
node's link to a peer carries its own clients and calls only, so neither side ever waits for
the other to open one.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

import attrs
import msgpack

from rooms import CallCycleError, Request, Response, RoomCallError
from rooms._engine import text_error

from .frames import ProtocolError

log = logging.getLogger("rooms.cluster")

PROTOCOL = 2  # (2: OPERATOR)
ATTACH, JOINED, REFUSED, CONNECT, MESSAGE, ENDED, CALL, REQUEST, REPLY = range(1, 10)
SEND, CLOSE, PAUSE, RESUME, OPERATOR = range(10, 15)
LINK_PATH = "/_rooms/cluster"
_LINK_OVERHEAD = 64 * 1024  # a link message's room for its header, past the client's limit


@attrs.frozen
class PeerNode:
    """The ``Upgrade`` target of a link from another node (``/_rooms/cluster``)."""

    node_id: str


def link_settings(settings: Any) -> Any:
    """The settings a link's WebSocket is served with: messages as large as a client's (or
    a request's body) plus their header, a queue as deep as ``max_link_queue_bytes``, no
    idle timeout or message rate (links carry many clients)."""
    return attrs.evolve(
        settings,
        max_message_bytes=max(settings.max_message_bytes, settings.max_body_bytes) + _LINK_OVERHEAD,
        max_outbox_bytes=max(settings.max_outbox_bytes, settings.max_link_queue_bytes),
        idle_timeout=0.0,
        messages_per_second_per_connection=0.0,
    )


def link_timing(lease: float) -> tuple[float, float]:
    """How often the client node of a link pings it (a sixth of ``lease``), and how long
    either end waits in silence before giving the link up (two thirds: a cut cable sends
    no FIN, and the clients across it are told to reconnect before the owner could be
    fenced)."""
    return lease / 6, lease * 2 / 3


Networks = list[ipaddress.IPv4Network | ipaddress.IPv6Network]


def networks(texts: Iterable[str]) -> Networks:
    return [ipaddress.ip_network(text, strict=False) for text in texts]


def check_link(request: Request, token: str, allowed: Networks) -> Response | None:
    """Why a link upgrade is refused (403 from outside the ``allowed`` networks, 401 without
    the cluster's token, 400 for another link protocol: a rolling upgrade across versions that
    cannot talk fails loudly at the link, instead of garbling what crosses it), or None."""
    try:
        address = ipaddress.ip_address(request.client[0])
    except ValueError:
        address = None
    if address is None or not any(address in network for network in allowed):
        return text_error(
            403, "node links are taken from cluster_link_networks only (see the settings)"
        )
    given = request.header("authorization") or ""
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return text_error(401, "node links need 'Authorization: Bearer <cluster_token>'")
    version = request.header("x-rooms-protocol")
    if version != str(PROTOCOL):
        return text_error(
            400,
            f"node link protocol {version} met protocol {PROTOCOL} here: the nodes of a "
            "cluster must all speak one link protocol (finish upgrading every node)",
        )
    return None


class LinkError(ProtocolError):
    """A link message that is not the protocol: the link is dropped (1002)."""

    def __init__(self, reason: str) -> None:
        super().__init__(1002, reason)


def pack(*items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)  # type: ignore[no-any-return]


_Types = type | tuple[type, ...]
_NAME = (str, type(None))
_SHAPES: dict[int, tuple[_Types, ...]] = {
    # what the edge sends (the owner reads these)
    ATTACH: (int, str, str, _NAME, dict),  # conn, namespace, room hex, name, request
    CONNECT: (int,),
    MESSAGE: (int, (str, bytes)),
    ENDED: (int, int, str, bool),  # conn, code, reason, send_close
    CALL: (int, str, str, _NAME, str, bytes, list),  # number, room, method, payload, chain
    REQUEST: (int, str, str, _NAME, dict),
    OPERATOR: (int, dict),  # number, request
    # what the owner sends (the edge reads these)
    JOINED: (int,),
    REFUSED: (int, int, str),  # conn, status, text
    REPLY: (int, bool, object),  # number, ok, value or [error class, text]
    SEND: (list, bytes, int),  # conns, frame, messages
    CLOSE: (int, int, str),
    PAUSE: (int,),
    RESUME: (int,),
}
TO_OWNER = frozenset({ATTACH, CONNECT, MESSAGE, ENDED, CALL, REQUEST, OPERATOR})
"""The kinds a node reads on a link another node opened to it."""
TO_EDGE = frozenset({JOINED, REFUSED, REPLY, SEND, CLOSE, PAUSE, RESUME})
"""The kinds a node reads on a link it opened."""


def unpack(data: str | bytes, kinds: frozenset[int]) -> list[Any]:
    """A link message, ``[kind, ...]``, checked: a kind of ``kinds`` with its items of the
    types that kind has (LinkError otherwise, which drops the link with 1002: a peer that
    does not speak the protocol must not reach code that trusts it)."""
    if not isinstance(data, bytes):
        raise LinkError("a link message must be binary")
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise LinkError(f"not msgpack: {exc}") from None
    if not isinstance(items, list) or not items or type(items[0]) is not int:
        raise LinkError("a link message is a list whose first item is its kind")
    kind, shape = items[0], _SHAPES.get(items[0])
    if shape is None or kind not in kinds:
        raise LinkError(f"unexpected kind {kind} on this link")
    if len(items) != len(shape) + 1 or not all(map(isinstance, items[1:], shape)):
        raise LinkError(f"a message of kind {kind} with the wrong items")
    if kind == SEND and not all(type(conn) is int for conn in items[1]):
        raise LinkError("a SEND whose clients are not numbers")
    if kind == CALL and not all(isinstance(link, str) for link in items[7]):
        raise LinkError("a CALL whose chain is not strings")
    return items


def request_to_wire(request: Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": request.headers,
        "body": request.body,
        "client": list(request.client),
        "params": request.path_params,
        "identity": request.identity,
        "route": request.route,
    }


def request_from_wire(data: dict[str, Any], stub_factory: Any) -> Request:
    """The request ``request_to_wire`` sent; LinkError if ``data`` is not one."""
    try:
        headers = [(name, value) for name, value in data["headers"]]
        client = (data["client"][0], data["client"][1])
        fields = [data[key] for key in ("method", "path", "query", "body", "params", "route")]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise LinkError(f"a request that is not one ({type(exc).__name__}: {exc})") from None
    method, path, query, body, params, route = fields
    texts = (method, path, query, route, client[0], *(text for pair in headers for text in pair))
    if not all(isinstance(text, str) for text in texts) or not isinstance(body, bytes):
        raise LinkError("a request whose method, path, headers or body are of the wrong type")
    if type(client[1]) is not int or not isinstance(params, dict):
        raise LinkError("a request whose client or path parameters are of the wrong type")
    return Request(
        method,
        path,
        query,
        headers,
        body,
        (client[0], client[1]),
        params,
        data.get("identity"),
        route,
        stub_factory=stub_factory,
    )


CALL_ERRORS: dict[str, type[Exception]] = {
    "CallCycleError": CallCycleError,
    "RoomCallError": RoomCallError,
}
"""Exceptions of a call that cross a link as themselves (with builtins); others become a
RoomCallError naming their class."""


__all__ = [
    "CALL_ERRORS",
    "LINK_PATH",
    "TO_EDGE",
    "TO_OWNER",
    "LinkError",
    "PeerNode",
    "check_link",
    "link_settings",
    "link_timing",
    "networks",
    "pack",
    "request_from_wire",
    "request_to_wire",
    "unpack",
]
