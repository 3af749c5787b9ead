"""The operator's view: ``/_rooms/admin`` (a page); ``/_rooms/admin/live``, its WebSocket,
which pushes a snapshot of the server's figures every second; ``/_rooms/admin/rooms``, the
rooms this node knows of, the busiest first; ``/_rooms/admin/room``, one room (connections,
stored keys) and, by POST, the actions on it, each run as an event in the room's own order
(``events.Operator``) and audited; ``/_rooms/admin/nodes``, the nodes.

In cluster mode every node answers for the whole cluster (``ClusterView``): the nodes are
those the database says are alive, each asked over the link to it for its own view
(``/_rooms/admin/node``: its figures, rooms and traffic), and a room's page and actions go to
the node that holds the room.

Who may look: as for ``/_rooms/metrics``, anyone with ``admin_token`` (the page asks for it
and sends it as its first message: a browser cannot put an Authorization header on a
WebSocket, and a token in the URL would end up in logs), or, without a token set, loopback
clients only. A snapshot is built from counters the data path keeps anyway; one costs about
what a scrape of ``/_rooms/metrics`` does, once per second per open page.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from rooms import HTTPError, Request, Response
from rooms._engine import decode, encode, is_valid_close_code, text_error

from .frames import encode_message
from .gate import Transport
from .metrics import Histograms, Metrics
from .placement import Owner
from .storage import Size
from .usage import COUNTS, Usage

if TYPE_CHECKING:
    from .activation import Peer
    from .cluster import Cluster
    from .host import Host
    from .outlink import Links

log = logging.getLogger("rooms.admin")

ADMIN_PATH = "/_rooms/admin"
LIVE_PATH = "/_rooms/admin/live"
ROOMS_PATH = "/_rooms/admin/rooms"
ROOM_PATH = "/_rooms/admin/room"
NODES_PATH = "/_rooms/admin/nodes"
NODE_PATH = "/_rooms/admin/node"  # (one node's own view: what the others ask it)
ACTIONS = ("close", "notice", "evict")
_PREVIEW = 200  # characters of a stored value shown
SORTS = {
    "connections": lambda room: room["connections"],
    "traffic": lambda room: room["bytes_in"] + room["bytes_out"],
    "messages": lambda room: room["messages_in"] + room["messages_out"],
    "stored": lambda room: room["stored_bytes"],
}
PAGE = Path(__file__).with_name("static") / "admin.html"
TOKEN_NEEDED = 4401  # (4400-4499: rooms' clients do not reconnect)


def refusal(request: Request, token: str) -> Response | None:
    """Why ``request`` may not see the operator's endpoints (401 without the token when one
    is set, 403 from another host when none is), or None."""
    if not token:
        return remote_refusal(request, token, "read")
    given = (request.header("authorization") or "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        return text_error(401, f"{request.path} needs 'Authorization: Bearer <admin_token>'")
    return None


def remote_refusal(request: Request, token: str, verb: str = "open") -> Response | None:
    """403 for a client on another host when no token is set, or None: the rule of what
    asks for the token later (the page, its live socket) and, without a token, of all."""
    if token or request.client[0] in ("127.0.0.1", "::1"):
        return None
    return text_error(403, f"set admin_token to {verb} {request.path} from another host")


def page(request: Request, token: str) -> Response:
    """The page: to loopback clients, or to anyone when a token is set (it holds no data;
    the live socket asks for the token)."""
    headers = {"content-type": "text/html; charset=utf-8", "cache-control": "no-cache"}
    return remote_refusal(request, token) or Response(200, PAGE.read_bytes(), headers)


Traffic = dict[str, dict[str, int]]
"""``Usage.report``'s per room: what its closed and open connections used, by room label."""
Sizes = Callable[[list[str]], Awaitable[dict[str, Size]]]
"""``Backend.sizes``."""


async def find_rooms(
    rooms: list[dict[str, Any]], traffic: Traffic, request: Request, sizes: Sizes
) -> dict[str, Any]:
    """The rooms (``Host.rooms``: of this node, or of every node) with their traffic and
    what they have stored, filtered by ``?class=`` and ``?q=`` (a part of the name or id),
    the busiest first by ``?sort=`` (connections, traffic, messages or stored bytes), a page
    of ``?limit=`` (at most 200) from ``?offset=``. Stored sizes are read for the page's
    rooms only, or for every room found when sorting by them."""
    by = request.query_param("sort") or "connections"
    limit, offset = request.query_param("limit") or "50", request.query_param("offset") or "0"
    if by not in SORTS or not limit.isdigit() or not offset.isdigit() or not 0 < int(limit) <= 200:
        raise HTTPError(400, f"sort is one of {', '.join(SORTS)}; limit 1 to 200")
    wanted, text = request.query_param("class"), (request.query_param("q") or "").lower()
    found = []
    for room in rooms:
        if wanted and room["room_class"] != wanted:
            continue
        if text and text not in f"{room['name'] or ''} {room['key']}".lower():
            continue
        used = traffic.get(room["label"], {})
        found.append({**room, **{key: used.get(key, 0) for key in COUNTS}})
    if by == "stored":
        await _with_sizes(sizes, found)
    found.sort(key=SORTS[by], reverse=True)
    start = int(offset)
    page = found[start : start + int(limit)]
    if by != "stored":
        await _with_sizes(sizes, page)
    return {"total": len(found), "rooms": page}


async def _with_sizes(sizes: Sizes, rooms: list[dict[str, Any]]) -> None:
    """Add to each room what it has stored: ``stored_keys`` and ``stored_bytes``."""
    stored = await sizes([room["key"] for room in rooms])
    for room in rooms:
        room["stored_keys"], room["stored_bytes"] = stored.get(room["key"], (0, 0))


async def room_details(host: Host, key: str, prefix: str) -> dict[str, Any]:
    """One room for its page: what ``Host.room`` says of it, what it has stored, its
    connections (address, identity, tags, state size, traffic both ways, connected since)
    and up to 100 of its stored keys from ``prefix``, values decoded and cut at 200
    characters."""
    room = host.room(key)
    if room is None:
        raise HTTPError(404, f"no room {key!r} on this node (see {ROOMS_PATH})")
    act = host.known(key)
    peers = [] if act is None else list(act.peers.values())
    rows = await host.backend.list(key, prefix or None, None, None, False, 100)
    stored = [{"key": name, "value": _preview(value)} for name, value in rows]
    await _with_sizes(host.backend.sizes, [room])
    return {**room, "connections": [_connection(peer) for peer in peers], "storage": stored}


def _connection(peer: Peer) -> dict[str, Any]:
    conn, ws = peer.conn, peer.transport
    counts = {name: getattr(ws, name, None) for name in COUNTS}  # (None: through a link)
    return {
        "id": conn.id,
        "client": conn.request.client[0],
        "identity": json.loads(json.dumps(conn.request.identity, default=repr)),
        "tags": sorted(conn.tags),
        "state_bytes": len(encode(conn.state, "connection state")),
        **counts,
        "since": getattr(ws, "started", None),
    }


def _preview(value: bytes) -> str:
    try:
        text = json.dumps(decode(value), default=repr, ensure_ascii=False)
    except Exception:  # (a value written by another version of the app, say)
        text = f"<{len(value)} bytes that do not decode>"
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…"


async def act_on_room(host: Host, usage: Usage, request: Request) -> dict[str, Any]:
    """Run the action a POST to ``ROOM_PATH`` asks for (JSON: ``key``, ``action`` of
    ``ACTIONS`` and its arguments) as an event in the room's mailbox, and leave an audit line
    (who, what, which room and connection) in the log and the usage log."""
    try:
        asked = json.loads(request.body)
        key, action = asked["key"], asked["action"]
    except (ValueError, TypeError, KeyError):
        raise HTTPError(400, 'send JSON: {"key": ROOM_KEY, "action": ..., ...}') from None
    if action not in ACTIONS:
        raise HTTPError(400, f"action must be one of {', '.join(ACTIONS)}")
    args = _action_args(action, asked)
    act = host.known(key)
    if act is None:
        raise HTTPError(404, f"no room {key!r} in memory or hibernated on this node")
    who = request.client[0]
    done = await host.operate(act, action, args)
    log.warning("operator at %s: %s %s on room %s: %s", who, action, args, act.label, done)
    usage.audit({"who": who, "action": action, **args, "room": act.label, "result": done})
    return {"room": act.label, "action": action, "result": done}


def room_key(request: Request) -> str:
    """The room a request to ``ROOM_PATH`` is about: ``?key=``, or a POST's ``key``."""
    if request.method != "POST":
        return request.query_param("key") or ""
    try:
        key = json.loads(request.body)["key"]
    except (ValueError, TypeError, KeyError):
        raise HTTPError(400, 'send JSON: {"key": ROOM_KEY, "action": ..., ...}') from None
    if not isinstance(key, str):
        raise HTTPError(400, "key must be a room's key (NAMESPACE/HEX)")
    return key


def _action_args(action: str, asked: dict[str, Any]) -> dict[str, Any]:
    if action == "close":
        code, reason = asked.get("code", 1000), asked.get("reason", "closed by the operator")
        if not isinstance(code, int) or not is_valid_close_code(code):
            raise HTTPError(400, "code must be a close code (1000-1003, 1007-1014, 3000-4999)")
        if not isinstance(reason, str) or len(reason.encode()) > 123:
            raise HTTPError(400, "reason must be text of at most 123 bytes")
        connection = asked.get("connection")
        if not isinstance(connection, str):
            raise HTTPError(400, "close needs the connection's id")
        return {"connection": connection, "code": code, "reason": reason}
    if action == "notice":
        text = asked.get("text")
        if not isinstance(text, str) or not text:
            raise HTTPError(400, "notice needs its text")
        return {"text": text}
    return {}


NODE_FIGURES = (
    "websockets_open",
    "rooms_in_memory",
    "rooms_hibernated",
    "websocket_upgrades_total",
    "messages_in_total",
    "messages_out_total",
    "cluster_forwarded_websockets",
    "cluster_remote_peers",
)
"""What the nodes table shows of each node (``Metrics`` fields)."""
_ASK_SECONDS = 5.0  # for a node's answer, before the page shows it as unreachable


def node_view(
    node: str, metrics: Metrics, rooms: list[dict[str, Any]] | None, traffic: Traffic
) -> dict[str, Any]:
    """One node's own view (``NODE_PATH``): its figures and, with ``rooms``, its rooms (each
    marked with the node) and the traffic of its clients per room, wherever the room is."""
    counts = metrics.counts()
    view: dict[str, Any] = {"node": node, **{name: counts[name] for name in NODE_FIGURES}}
    if rooms is not None:
        view["rooms"] = [{**room, "node": node} for room in rooms]
        view["traffic"] = traffic
    return view


class ClusterView:
    """The operator's view across a cluster: the live nodes (as the database says), each
    answering for itself (``NODE_PATH``; over the link, or ``own`` for this node), and the
    room pages of rooms held elsewhere asked of their node."""

    def __init__(
        self, cluster: Cluster, links: Links, own: Callable[[Request], Awaitable[Response]]
    ) -> None:
        self.cluster = cluster
        self.links = links
        self.own = own

    @property
    def node(self) -> str:
        """This node's id."""
        return self.cluster.node_id

    async def nodes(self, request: Request) -> dict[str, Any]:
        """Every node the database knows of (``cluster.status``), with each live one's
        figures, or why it did not answer."""
        status = await self.cluster.status()
        views = await self._ask_live(status["nodes"], request, with_rooms=False)
        nodes = [{**row, **views.get(row["node"], {})} for row in status["nodes"]]
        return {**status, "this": self.cluster.node_id, "nodes": nodes}

    async def rooms(self, request: Request, sizes: Sizes) -> dict[str, Any]:
        """``find_rooms`` over the rooms of every live node, with each room's traffic summed
        over the nodes its clients came through."""
        status = await self.cluster.status()
        views = await self._ask_live(status["nodes"], request, with_rooms=True)
        rooms: list[dict[str, Any]] = []
        traffic: Traffic = {}
        for view in views.values():
            rooms += view.get("rooms", [])
            for label, counts in view.get("traffic", {}).items():
                summed = traffic.setdefault(label, dict.fromkeys(COUNTS, 0))
                for key in COUNTS:
                    summed[key] += counts.get(key, 0)
        found = await find_rooms(rooms, traffic, request, sizes)
        unreachable = sorted(node for node, view in views.items() if "error" in view)
        return {**found, "unreachable": unreachable}

    async def forward(self, key: str, request: Request) -> Response | None:
        """Room ``key``'s page or action, answered by the node that holds it; None if no
        other node does."""
        owner = await self.cluster.owner_of(key)
        if owner is None or owner.node_id == self.cluster.node_id:
            return None
        query = f"{request.query_string}&here=1".lstrip("&")
        return await self.links.operator(owner, attrs.evolve(request, query_string=query))

    async def _ask_live(
        self, rows: list[dict[str, Any]], request: Request, with_rooms: bool
    ) -> dict[str, dict[str, Any]]:
        asked = attrs.evolve(
            request, method="GET", path=NODE_PATH, query_string="rooms=1" if with_rooms else ""
        )
        views: dict[str, dict[str, Any]] = {}

        async def ask(node: str, address: str) -> None:
            try:
                with trio.fail_after(_ASK_SECONDS):
                    if node == self.cluster.node_id:
                        answer = await self.own(asked)
                    else:
                        node_only = Owner(node, address, 0)  # (no room: no epoch)
                        answer = await self.links.operator(node_only, asked)
                if answer.status != 200:
                    raise RuntimeError(answer.body.decode(errors="replace"))
                views[node] = json.loads(answer.body)
            except Exception as exc:  # (a node away, or slow: the others are still shown)
                error = "no answer within 5 s" if isinstance(exc, trio.TooSlowError) else exc
                log.warning("admin: node %s at %s did not answer: %s", node, address, error)
                views[node] = {"error": str(error)}

        async with trio.open_nursery() as nursery:
            for row in rows:
                if row["status"] == "alive":
                    nursery.start_soon(ask, row["node"], row["address"])
        return views


class Quantiles:
    """p50 and p99 of what a cumulative histogram saw since the last call (the upper bound of
    the bucket each falls in, in ms), across all its labels."""

    def __init__(self, histograms: Histograms) -> None:
        self.histograms = histograms
        self.before: list[int] = []

    def since_last(self) -> dict[str, float | None]:
        counts = self.histograms.merged().counts
        fresh = [now - then for now, then in zip(counts, self.before or counts, strict=True)]
        self.before = counts
        return {"p50": self._at(fresh, 0.5), "p99": self._at(fresh, 0.99)}

    def _at(self, counts: list[int], share: float) -> float | None:
        total = sum(counts)
        if not total:
            return None
        seen = 0
        for bound, count in zip((*self.histograms.bounds, float("inf")), counts, strict=True):
            seen += count
            if seen >= share * total:
                return bound * 1000
        return None  # (not reached)


@attrs.frozen
class LiveAdmin:
    """The ``Upgrade`` target of ``/_rooms/admin/live``."""


class AdminFeed:
    """The ``Target`` of a live admin WebSocket: waits for the token as the first message
    (any, when no token is set: the upgrade was loopback-only), then writes one JSON snapshot
    a second until the page goes: ``figures()`` (the counts, the usage totals), the time,
    and the event and commit times of that second."""

    def __init__(
        self,
        ws: Transport,
        token: str,
        metrics: Metrics,
        figures: Callable[[], dict[str, Any]],
    ) -> None:
        self.ws = ws
        self.token = token
        self.figures = figures
        self.events = Quantiles(metrics.event_seconds)
        self.commits = Quantiles(metrics.commit_seconds)
        self.allowed = trio.Event()
        self.update_ms: float | None = None

    @property
    def label(self) -> str:
        return "live admin page"

    route, room = LIVE_PATH, None

    def usage(self) -> dict[str, Any]:
        return {"route": LIVE_PATH, "room": None, "connection": "admin", "client_ip": ""}

    async def deliver(self, message: str | bytes) -> None:
        if self.allowed.is_set():
            return  # (the page says nothing after its token)
        given = message.encode() if isinstance(message, str) else b""
        if self.token and not hmac.compare_digest(given, self.token.encode()):
            log.warning("live admin page: a wrong admin token; closed")
            self.ws.close(TOKEN_NEEDED, "admin_token needed: give it on the page")
            return
        self.allowed.set()

    def end(self, code: int, reason: str, send_close: bool = False) -> None:
        if send_close:
            self.ws.close(code, reason)

    def snapshot(self) -> dict[str, Any]:
        return {
            "time": time.time(),
            **self.figures(),
            "event_ms": self.events.since_last(),
            "commit_ms": self.commits.since_last(),
            "update_ms": self.update_ms,
        }

    async def run(self) -> None:
        """Push a snapshot every second, once the token is in (until the connection's
        nursery is cancelled as it closes). Each says what the one before cost to build,
        encode and queue (``update_ms``: time the event loop did nothing else)."""
        await self.allowed.wait()
        while True:
            started = time.perf_counter()
            self.ws.write(encode_message(json.dumps(self.snapshot())))
            self.update_ms = round((time.perf_counter() - started) * 1000, 3)
            await trio.sleep(1.0)
