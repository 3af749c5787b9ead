"""An app: which URL goes to which room class, route function or static folder."""

from __future__ import annotations

import inspect
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs

from ._http import HTTPError, Request, RouteHandler
from ._room import Room

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _compile(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/'")
    regex, pos = "", 0
    for m in _PARAM.finditer(pattern):
        regex += re.escape(pattern[pos : m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
        pos = m.end()
    return re.compile(regex + re.escape(pattern[pos:]))


@attrs.frozen
class RoomRoute:
    """WebSocket upgrades (and plain requests, via ``on_request``) go to a room."""

    pattern: str
    room_class: type[Room]
    regex: re.Pattern[str]


@attrs.frozen
class FunctionRoute:
    """Plain HTTP requests go to an async function."""

    pattern: str
    handler: RouteHandler
    methods: frozenset[str]
    regex: re.Pattern[str]


@attrs.frozen
class StaticRoute:
    """Files under ``directory`` are served below ``prefix``."""

    prefix: str
    directory: Path


@attrs.frozen
class ProxyRoute:
    """WebSocket upgrades relayed to an upstream WebSocket server (see ``App.proxy``)."""

    pattern: str
    upstream: str
    forward_headers: frozenset[str]
    allowed_origins: frozenset[str] | None
    on_before_connect: Callable[[Request], Awaitable[Any]] | None
    ssl_context: ssl.SSLContext | None
    regex: re.Pattern[str]

    def upstream_url(self, params: dict[str, str], query_string: str) -> str:
        """The upstream URL for one request: its path parameters put in, its query kept."""
        url = self.upstream.format_map({k: quote(v, safe="") for k, v in params.items()})
        if query_string:
            url += ("&" if "?" in url else "?") + query_string
        return url


Route = RoomRoute | FunctionRoute | ProxyRoute

_HOOKS = (
    "on_before_connect",
    "on_start",
    "on_connect",
    "on_message",
    "on_close",
    "on_alarm",
    "on_request",
)


def _is_async(function: Any) -> bool:
    """Whether calling ``function`` gives an awaitable (an async def, or an object whose
    ``__call__`` is one)."""
    call = type(function).__call__ if callable(function) else None
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


DEFAULT_FORWARDED_HEADERS = ("authorization", "cookie", "origin", "user-agent")


class App:
    """The routes of a Rooms server: what ``rooms serve MODULE:APP`` serves.

        app = App()
        app.room("/room/{name}", ChatRoom)

        @app.route("/api/room", methods=["POST"])
        async def create_room(request: Request) -> Response: ...

        app.static("/", "static")

    Routes are tried in the order they were added; static folders after every route. A
    pattern is a path whose ``{parameters}`` each match one segment (no ``/``); they reach
    the handler percent-decoded in ``request.path_params``. A room route's pattern must
    contain ``{name}``: the room class's ``resolve`` turns it into the room id. Every server
    also answers ``/_rooms/client.js`` (the browser client), ``/_rooms/metrics`` and
    ``/_rooms/usage``.
    """

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.statics: list[StaticRoute] = []

    def room(self, pattern: str, room_class: type[Room]) -> None:
        """Send WebSocket upgrades (and plain HTTP, to ``on_request``) on ``pattern`` to a
        room of ``room_class``: the one whose id ``room_class.resolve`` makes of the
        ``{name}`` parameter. ``pattern`` must contain ``{name}``; every hook of the class
        must be an ``async def`` (checked here, so a mistake fails at import, not on the
        first connection)."""
        if not (isinstance(room_class, type) and issubclass(room_class, Room)):
            raise TypeError(f"{room_class!r} is not a subclass of rooms.Room")
        for hook in _HOOKS:
            if not _is_async(getattr(room_class, hook)):
                raise TypeError(
                    f"{room_class.__name__}.{hook} must be a coroutine function: "
                    f"'async def {hook}(...)'"
                )
        if "{name}" not in pattern:
            raise ValueError(f"room route {pattern!r} needs a {{name}} parameter")
        self.routes.append(RoomRoute(pattern, room_class, _compile(pattern)))

    def route(
        self, pattern: str, methods: tuple[str, ...] | list[str] = ("GET",)
    ) -> Callable[[RouteHandler], RouteHandler]:
        """Decorator: ``async def handler(request) -> Response`` answers ``methods`` on
        ``pattern`` (``GET`` also answers ``HEAD``); another method gets 405 with ``Allow``.
        The handler may raise ``HTTPError``; any other exception is logged and answered
        500. It reaches rooms through ``request.stub(RoomClass, name)``. It must be an
        ``async def`` (checked here)."""

        def register(handler: RouteHandler) -> RouteHandler:
            if not _is_async(handler):
                raise TypeError(
                    f"route {pattern}: {getattr(handler, '__name__', handler)!r} must be a "
                    "coroutine function ('async def'), called with the request"
                )
            allowed = frozenset(m.upper() for m in methods)
            if "GET" in allowed:
                allowed |= {"HEAD"}
            self.routes.append(FunctionRoute(pattern, handler, allowed, _compile(pattern)))
            return handler

        return register

    def proxy(
        self,
        pattern: str,
        upstream: str,
        *,
        forward_headers: tuple[str, ...] | list[str] = DEFAULT_FORWARDED_HEADERS,
        allowed_origins: tuple[str, ...] | list[str] | None = None,
        on_before_connect: Callable[[Request], Awaitable[Any]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Relay WebSockets on ``pattern`` to the ``ws://`` or ``wss://`` URL ``upstream``:

            app.proxy("/feed/{topic}", "ws://127.0.0.1:9000/feed/{topic}")

        ``upstream`` may use the pattern's parameters; the request's query string is added.
        The upgrade passes the same rules as a room's: ``allowed_origins`` (403),
        ``on_before_connect(request)`` (raise HTTPError to refuse; a ``str`` it returns is sent
        upstream as ``X-Rooms-Identity``), and the per-address limits of the settings. The
        client's ``Sec-WebSocket-Protocol`` offer and the ``forward_headers`` it sent go
        upstream, with ``X-Forwarded-For`` and ``X-Forwarded-Proto``; the upstream's choice
        of subprotocol comes back. An unreachable upstream is a 502 (504 after
        ``upstream_timeout``); an upstream that refuses (status 400 or more) has its status
        and body passed on. ``ssl_context`` verifies a ``wss://`` upstream (default: the
        system's trusted CAs)."""
        if urlsplit(upstream).scheme not in ("ws", "wss"):
            raise ValueError(f"proxy upstream {upstream!r} must be a ws:// or wss:// URL")
        names = set(_PARAM.findall(pattern))
        unknown = set(_PARAM.findall(upstream)) - names
        if unknown:
            raise ValueError(
                f"proxy upstream {upstream!r} uses {sorted(unknown)}, not in {pattern!r}"
            )
        self.routes.append(
            ProxyRoute(
                pattern,
                upstream,
                frozenset(h.lower() for h in forward_headers),
                None if allowed_origins is None else frozenset(allowed_origins),
                on_before_connect,
                ssl_context,
                _compile(pattern),
            )
        )

    def static(self, prefix: str, directory: str | Path) -> None:
        """Serve the files of ``directory`` below ``prefix`` to GET and HEAD requests
        (``index.html`` for a folder), after every route. A path that would leave the folder
        (``..``, encoded slashes, links out of it) is not found. ``directory`` must exist
        (checked here)."""
        path = Path(directory).resolve()
        if not path.is_dir():
            raise ValueError(f"static directory {str(path)!r} does not exist")
        self.statics.append(StaticRoute(prefix.rstrip("/") + "/", path))

    def room_classes(self) -> list[type[Room]]:
        """The room classes of the room routes, each once."""
        return list(dict.fromkeys(r.room_class for r in self.routes if isinstance(r, RoomRoute)))

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        """The first route matching ``path``, with its decoded parameters.

        A parameter that is not valid percent-encoded UTF-8 raises HTTPError(400)."""
        for route in self.routes:
            m = route.regex.fullmatch(path)
            if m:
                params: dict[str, str] = {}
                for key, raw in m.groupdict().items():
                    try:
                        params[key] = unquote(raw, errors="strict")
                    except UnicodeDecodeError:
                        raise HTTPError(400, f"path parameter {key!r} is not valid UTF-8") from None
                return route, params
        return None

    def static_file(self, path: str) -> Path | None:
        """The file a GET of ``path`` serves, if any; never a path outside a static folder."""
        for static in self.statics:
            if not (path + "/").startswith(static.prefix) and path != static.prefix.rstrip("/"):
                continue
            try:
                relative = unquote(path[len(static.prefix) :], errors="strict")
            except UnicodeDecodeError:
                return None
            if "\0" in relative:
                return None
            try:
                candidate = (static.directory / relative).resolve()
                if not candidate.is_relative_to(static.directory):
                    return None
                if candidate.is_dir():
                    candidate = candidate / "index.html"
                if candidate.is_file():
                    return candidate
            except OSError:  # a name too long for the filesystem, a loop of links: not found
                return None
        return None
