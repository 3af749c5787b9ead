"""An app: which URL goes to which room class, route function or static folder."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import attrs

from ._http import HTTPError, RouteHandler
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


Route = RoomRoute | FunctionRoute


class App:
    """The routes of a Rooms server.

    >>> app = App()
    >>> app.room("/room/{name}", ChatRoom)           # doctest: +SKIP
    >>> @app.route("/api/room", methods=["POST"])     # doctest: +SKIP
    ... async def create_room(request): ...
    >>> app.static("/", "static")                    # doctest: +SKIP

    Routes are tried in the order they were added; static folders after every route.
    A room route's pattern must contain ``{name}``: the room class's ``resolve`` turns it
    into the room id.
    """

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.statics: list[StaticRoute] = []

    def room(self, pattern: str, room_class: type[Room]) -> None:
        if not (isinstance(room_class, type) and issubclass(room_class, Room)):
            raise TypeError(f"{room_class!r} is not a subclass of rooms.Room")
        if "{name}" not in pattern:
            raise ValueError(f"room route {pattern!r} needs a {{name}} parameter")
        self.routes.append(RoomRoute(pattern, room_class, _compile(pattern)))

    def route(
        self, pattern: str, methods: tuple[str, ...] | list[str] = ("GET",)
    ) -> Callable[[RouteHandler], RouteHandler]:
        """Decorator: ``handler(request) -> Response`` answers ``methods`` on ``pattern``."""

        def register(handler: RouteHandler) -> RouteHandler:
            allowed = frozenset(m.upper() for m in methods)
            if "GET" in allowed:
                allowed |= {"HEAD"}
            self.routes.append(FunctionRoute(pattern, handler, allowed, _compile(pattern)))
            return handler

        return register

    def static(self, prefix: str, directory: str | Path) -> None:
        """Serve the files of ``directory`` below ``prefix`` (``index.html`` for folders)."""
        path = Path(directory).resolve()
        if not path.is_dir():
            raise ValueError(f"static directory {str(path)!r} does not exist")
        self.statics.append(StaticRoute(prefix.rstrip("/") + "/", path))

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
