"""Plain HTTP values: the request a room or route sees, and the response it returns."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import attrs

if TYPE_CHECKING:
    from ._ids import RoomId
    from ._room import Room, Stub


class HTTPError(Exception):
    """Raise from a route, ``on_request``, ``Room.resolve`` or ``on_before_connect`` to
    answer with a status and text.

    ``raise HTTPError(404, "Name too long")`` gives a 404 whose body is ``Name too long``
    (``text/plain``). ``headers`` are added to that response, e.g. ``{"retry-after": "5"}``.
    ``status``, ``reason`` and ``headers`` are kept as attributes.
    """

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or {}


StubFactory = Callable[["type[Room]", "str | RoomId"], "Stub"]


@attrs.define(slots=True, eq=False)
class Request:
    """An HTTP request: plain, or the upgrade request of a WebSocket connection.

    ``headers`` keep their order and repeats; ``header(name)`` looks one up, case-insensitively.
    ``client`` is the client's address (host, port): the socket peer, or the client a
    trusted proxy names. ``identity`` is what the room class's ``on_before_connect``
    returned for an upgrade (None otherwise).
    """

    method: str
    """The HTTP method as sent: ``GET``, ``POST``... (methods are case-sensitive)."""
    path: str
    """The target's path as sent, still percent-encoded, without the query string."""
    query_string: str = ""
    """What follows ``?`` in the target (empty if nothing); parsed by ``query``."""
    headers: list[tuple[str, str]] = attrs.field(factory=list)
    """Every header as (name, value), in the order sent, repeats included."""
    body: bytes = b""
    """The request body, read whole (at most ``max_body_bytes``; a larger one gets 413)."""
    client: tuple[str, int] = ("127.0.0.1", 0)
    """The client's (host, port): the socket peer, or the client named in
    ``X-Forwarded-For`` by an address in ``trusted_proxies``."""
    path_params: dict[str, str] = attrs.field(factory=dict)
    """The route pattern's ``{parameters}``, percent-decoded: ``/room/{name}`` matched by
    ``/room/caf%C3%A9`` gives ``{"name": "café"}``."""
    identity: Any = None
    """What the room class's (or proxied route's) ``on_before_connect`` returned for this
    upgrade; None for a plain request."""
    route: str = ""
    """The pattern of the route that matched, e.g. ``/room/{name}``."""
    _stub_factory: StubFactory | None = attrs.field(default=None, repr=False)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of the first header called ``name`` (case-insensitive), or ``default``.
        A header sent more than once: read all of them in ``headers``."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return default

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string parsed: each name with the list of its values, in order
        (``?a=1&a=2&b=`` gives ``{"a": ["1", "2"], "b": [""]}``). Parsed on each access."""
        return parse_qs(self.query_string, keep_blank_values=True)

    def query_param(self, name: str, default: str | None = None) -> str | None:
        """The first value of the query parameter ``name``, or ``default`` when it is absent
        (``?token=`` gives ``""``, not the default)."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON; a malformed body raises HTTPError(400)."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None

    def stub(self, room_class: type[Room], room: str | RoomId) -> Stub:
        """A stub to call methods of a room from a plain route (see ``Room.stub``)."""
        if self._stub_factory is None:
            raise RuntimeError("this request is not attached to a running server")
        return self._stub_factory(room_class, room)


def _body(body: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    raise TypeError(
        f"a Response body is bytes or str, not {type(body).__name__}; "
        "for JSON use Response.json(value)"
    )


def _status(_: Any, __: Any, status: int) -> None:
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise TypeError(f"a Response status is an int from 100 to 599, not {status!r}")


def _headers(headers: Mapping[str, str | int]) -> dict[str, str]:
    checked = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, (str, int)):
            raise TypeError(
                f"Response header {name!r}: {value!r}; names are str, values str or int"
            )
        checked[name] = str(value)
    return checked


@attrs.define(slots=True)
class Response:
    """An HTTP response. Build one directly or with ``text``/``json``/``html``.

    ``body`` is bytes, or a str sent as UTF-8 (give a ``content-type`` header, or use
    ``text``/``html``, which set one). Header values may be str or int. A wrong type raises
    TypeError here, where it was made, not when the response is sent."""

    status: int = attrs.field(default=200, validator=_status)
    """The status code, an int from 100 to 599."""
    body: bytes = attrs.field(default=b"", converter=_body)
    """The body as bytes (a str given here was encoded as UTF-8)."""
    headers: dict[str, str] = attrs.field(factory=dict, converter=_headers)
    """Header names and values (int values were turned into str). The server adds
    ``content-length`` itself."""

    @classmethod
    def text(cls, text: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """``text`` as a UTF-8 ``text/plain`` response; a ``content-type`` in ``headers``
        replaces that one."""
        hdrs = {"content-type": "text/plain; charset=utf-8", **(headers or {})}
        return cls(status, text.encode(), hdrs)

    @classmethod
    def html(cls, html: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """``html`` as a UTF-8 ``text/html`` response; a ``content-type`` in ``headers``
        replaces that one."""
        hdrs = {"content-type": "text/html; charset=utf-8", **(headers or {})}
        return cls(status, html.encode(), hdrs)

    @classmethod
    def json(cls, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """``value`` encoded with ``json.dumps`` (compact: no spaces after separators) as an
        ``application/json`` response; a value ``json.dumps`` refuses raises here, not when
        the response is sent."""
        hdrs = {"content-type": "application/json", **(headers or {})}
        return cls(status, json.dumps(value, separators=(",", ":")).encode(), hdrs)


RouteHandler = Callable[[Request], Awaitable[Response]]


def error_response(error: HTTPError) -> Response:
    """The answer an ``HTTPError`` stands for: its status, reason (as text) and headers."""
    return Response.text(error.reason, error.status, error.headers)


def text_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A one-line plain-text error answer, as the engine gives its own refusals."""
    return Response.text(message + "\n", status, headers)


def upgrade_required() -> Response:
    """426: a URL that takes WebSocket connections was asked a plain HTTP request."""
    return Response.text("this endpoint expects a WebSocket upgrade", 426, {"upgrade": "websocket"})
