"""Which answer a request gets: the app's routes, the operator's endpoints, static files.

``Router.route`` turns a request into a response, or, for a WebSocket upgrade, into where
the connection goes: a room (``RoomTarget``) or a proxied route. Plain requests to a room
route become the room's ``on_request`` event. The edge and the test harness both route
through here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mimetypes
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from rooms import App, HTTPError, Request, Response, Room, RoomId
from rooms._engine import (
    FunctionRoute,
    ProxyRoute,
    RoomRoute,
    error_response,
    text_error,
    upgrade_required,
)

from . import admin
from .config import Settings
from .host import Host
from .metrics import CONTENT_TYPE, Metrics
from .outlink import Links
from .placement import ClusterUnavailable
from .usage import Open, Usage

log = logging.getLogger("rooms.edge")

RoomTarget = tuple[type[Room], RoomId]
"""The room an upgrade joins: its class and id."""

_CLIENT_JS = Path(__file__).with_name("static") / "client.js"
_OPERATOR_PATHS = frozenset(
    {
        "/_rooms/metrics",
        "/_rooms/usage",
        "/_rooms/analytics",
        admin.ROOMS_PATH,
        admin.ROOM_PATH,
        admin.NODES_PATH,
        admin.NODE_PATH,
    }
)


class Router:
    """Routes the requests of one server. ``live_usage`` gives what each WebSocket still
    open used so far (for ``/_rooms/usage``); ``links``, in cluster mode, the links to
    the other nodes (the operator's view covers them all)."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        metrics: Metrics,
        host: Host,
        usage: Usage,
        live_usage: Callable[[], Iterable[Open]],
        links: Links | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.host = host
        self.usage = usage
        self._live_usage = live_usage
        self.cluster_view = (
            None if links is None else admin.ClusterView(links.cluster, links, self.operator)
        )

    async def route(self, request: Request, upgrade: bool) -> Response | RoomTarget | ProxyRoute:
        """The response to a request, or for a WebSocket upgrade the room it joins or the
        proxied route that relays it."""
        try:
            if request.path in _OPERATOR_PATHS:
                return await self._admin(request)
            if request.path == admin.ADMIN_PATH:
                return admin.page(request, self.settings.admin_token)
            if request.path == "/_rooms/client.js":
                return _client_js(request)
            matched = self.app.match(request.path)
            if matched is None:
                return await self._static(request)
            route, request.path_params = matched
            request.route = route.pattern
            if isinstance(route, RoomRoute):
                room_id = route.room_class.resolve(request.path_params["name"])
                if upgrade:
                    return route.room_class, room_id
                return await self.host.request(route.room_class, room_id, request)
            if isinstance(route, ProxyRoute):
                return route if upgrade else upgrade_required()
            return await self._function(route, request)
        except HTTPError as exc:
            return error_response(exc)
        except ClusterUnavailable as exc:
            return text_error(503, str(exc))
        except Exception:
            log.exception("%s %s: the handler raised; answered 500", request.method, request.path)
            return text_error(500, "internal server error")

    async def _function(self, route: FunctionRoute, request: Request) -> Response:
        if request.method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            return Response.text(f"method {request.method} not allowed", 405, {"allow": allow})
        response = await route.handler(request)
        if not isinstance(response, Response):
            raise TypeError(f"route {route.pattern} returned {response!r}, not a rooms.Response")
        return response

    async def _static(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return text_error(404, "not found")
        path = self.app.static_file(request.path)
        if path is None:
            return text_error(404, "not found")
        body = await trio.to_thread.run_sync(path.read_bytes)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            kind += "; charset=utf-8"
        return Response(200, body, {"content-type": kind, "cache-control": "no-cache"})

    async def _admin(self, request: Request) -> Response:
        """The operator's endpoints, once the request may see them (``operator``)."""
        refused = admin.refusal(request, self.settings.admin_token)
        return refused or await self.operator(request)

    async def operator(self, request: Request) -> Response:
        """The operator's endpoints, for a client that may see them or (over a link) another
        node's: /_rooms/metrics (Prometheus text), /_rooms/usage (JSON), /_rooms/analytics
        (JSON, CSV or JSON Lines), and the admin page's rooms, nodes, a room and the actions
        on it (``runtime.admin``)."""
        try:
            return await self._operator(request)
        except HTTPError as exc:
            return error_response(exc)

    async def _operator(self, request: Request) -> Response:
        path, host, view = request.path, self.host, self.cluster_view
        if path == "/_rooms/analytics":
            return self._analytics(request)
        if path == admin.ROOM_PATH:
            key = admin.room_key(request)
            if view is not None and request.query_param("here") != "1" and not host.room(key):
                forwarded = await view.forward(key, request)
                if forwarded is not None:
                    return forwarded
            if request.method == "POST":
                return Response.json(await admin.act_on_room(host, self.usage, request))
            details = await admin.room_details(host, key, request.query_param("prefix") or "")
            return Response.json(details if view is None else {**details, "node": view.node})
        if path == admin.ROOMS_PATH and view is not None:
            return Response.json(await view.rooms(request, host.backend.sizes))
        if path == admin.NODES_PATH and view is not None:
            return Response.json(await view.nodes(request))
        usage = self.usage.report(self._live_usage(), rooms=path != "/_rooms/metrics")
        if path == admin.ROOMS_PATH:
            found = await admin.find_rooms(
                host.rooms(), usage["rooms"], request, host.backend.sizes
            )
            return Response.json(found)
        if path in (admin.NODE_PATH, admin.NODES_PATH):
            node = "this server" if view is None else view.node
            rooms = host.rooms() if request.query_param("rooms") == "1" else None
            own = admin.node_view(node, self.metrics, rooms, usage["rooms"])
            return Response.json(own if path == admin.NODE_PATH else {"nodes": [own]})
        if request.path == "/_rooms/usage":
            return Response.json(usage)
        text = self.metrics.prometheus(usage["routes"])
        return Response(200, text, {"content-type": CONTENT_TYPE})

    def _analytics(self, request: Request) -> Response:
        """Traffic per route and room class over ``?window=`` seconds (3600 by default, at
        most a day), as JSON; ``?format=csv`` or ``jsonl``: one row per minute and route."""
        raw = request.query_param("window") or "3600"
        if not raw.isdigit() or not 60 <= int(raw) <= 86400:
            raise HTTPError(400, "window must be a number of seconds from 60 to 86400")
        seconds, kind = int(raw), request.query_param("format") or "json"
        analytics = self.usage.analytics
        if kind == "csv":
            return Response(200, analytics.csv(seconds), {"content-type": "text/csv"})
        report = analytics.report(seconds, self._route_classes())
        if kind == "jsonl":
            lines = "".join(json.dumps(minute) + "\n" for minute in report["minutes"])
            return Response(200, lines, {"content-type": "application/jsonl"})
        if kind != "json":
            raise HTTPError(400, "format must be json, csv or jsonl")
        return Response.json(report)

    def _route_classes(self) -> dict[str, str]:
        """Each route pattern's room class name ("proxy" for a proxied route)."""
        return {
            route.pattern: route.room_class.__name__ if isinstance(route, RoomRoute) else "proxy"
            for route in self.app.routes
            if isinstance(route, (RoomRoute, ProxyRoute))
        }


@functools.cache
def _client_js_file() -> tuple[bytes, str]:
    body = _CLIENT_JS.read_bytes()
    return body, '"' + hashlib.sha1(body).hexdigest()[:16] + '"'


def _client_js(request: Request) -> Response:
    """The browser client (RoomSocket), revalidated by ETag."""
    if request.method not in ("GET", "HEAD"):
        return Response.text("method not allowed", 405, {"allow": "GET, HEAD"})
    body, etag = _client_js_file()
    headers = {"etag": etag, "cache-control": "no-cache"}
    if request.header("if-none-match") == etag:
        return Response(304, b"", headers)
    headers["content-type"] = "text/javascript; charset=utf-8"
    return Response(200, body, headers)
