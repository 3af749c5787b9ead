"""Node links (cluster mode): how a client connected to one node reaches a room another holds.

A node opens one link to each peer whose rooms its clients use: a WebSocket to
``/_rooms/cluster`` at the peer's ``node_address``, authenticated by ``cluster_token``, whose
binary messages are msgpack arrays ``[kind, ...]``. Over it the client's node (the edge):

- attaches a client to the room (``ATTACH`` -> ``JOINED`` or ``REFUSED``), and once the
  client has its 101, connects it (``CONNECT``: the room's ``on_connect``); forwards its
  messages (``MESSAGE``) and its end (``ENDED``); calls rooms held there or sends them plain
  HTTP requests (``CALL``, ``REQUEST`` -> ``REPLY``);

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
import logging
from typing import TYPE_CHECKING, Any

import attrs
import msgpack

from rooms import CallCycleError, Request, Response, RoomCallError
from rooms._engine import text_error

from .frames import ProtocolError

if TYPE_CHECKING:
    pass

log = logging.getLogger("rooms.cluster")

PROTOCOL = 1
ATTACH, JOINED, REFUSED, CONNECT, MESSAGE, ENDED, CALL, REQUEST, REPLY = range(1, 10)
SEND, CLOSE, PAUSE, RESUME = range(10, 14)
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


def check_link(request: Request, token: str) -> Response | None:
    """Why a link upgrade is refused (401 without the cluster's token, 400 for another
    protocol version), or None."""
    given = request.header("authorization") or ""
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return text_error(401, "node links need 'Authorization: Bearer <cluster_token>'")
    version = request.header("x-rooms-protocol")
    if version != str(PROTOCOL):
        return text_error(
            400, f"node link protocol {version} is not spoken here (this node: {PROTOCOL})"
        )
    return None


class LinkError(ProtocolError):
    """A link message that is not the protocol: the link is dropped (1002)."""

    def __init__(self, reason: str) -> None:
        super().__init__(1002, reason)


def pack(*items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: str | bytes) -> list[Any]:
    if not isinstance(data, bytes):
        raise LinkError("a link message must be binary")
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise LinkError(f"not msgpack: {exc}") from None
    if not isinstance(items, list) or not items or not isinstance(items[0], int):
        raise LinkError("a link message is a list whose first item is its kind")
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
    return Request(
        data["method"],
        data["path"],
        data["query"],
        [(name, value) for name, value in data["headers"]],
        data["body"],
        (data["client"][0], data["client"][1]),
        data["params"],
        data["identity"],
        data["route"],
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
    "LinkError",
    "PeerNode",
    "check_link",
    "link_settings",
    "pack",
    "request_from_wire",
    "request_to_wire",
    "unpack",
]
