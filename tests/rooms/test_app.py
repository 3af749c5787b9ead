"""An app's routes (``rooms._app``): patterns, parameters, order, static files (pure logic)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from rooms import App, HTTPError, Request, Response, Room
from rooms._app import FunctionRoute, RoomRoute

# ---------------------------------------------------------------------------------------
# App routes


class Chat(Room):
    pass


class Other(Room):
    pass


async def handler(request: Request) -> Response:
    return Response.text("hi")


def matched(app: App, path: str) -> tuple[Any, dict[str, str]]:
    found = app.match(path)
    assert found is not None, path
    return found


def test_route_patterns_capture_one_segment() -> None:
    app = App()
    app.room("/room/{name}", Chat)
    app.route("/u/{user}/post/{post_id}")(handler)
    route, params = matched(app, "/room/lobby")
    assert isinstance(route, RoomRoute) and route.room_class is Chat
    assert params == {"name": "lobby"}
    route, params = matched(app, "/u/ann/post/42")
    assert isinstance(route, FunctionRoute) and route.handler is handler
    assert params == {"user": "ann", "post_id": "42"}
    for miss in ["/room", "/room/", "/room/a/b", "/room/lobby/", "/rooms/lobby", "room/lobby"]:
        assert app.match(miss) is None, miss
    assert app.match("/u/ann/post/") is None


def test_pattern_text_is_literal_not_a_regex() -> None:
    app = App()
    app.room("/a.b/{name}", Chat)
    app.route("/x+/{id}")(handler)
    assert app.match("/a.b/n") is not None
    assert app.match("/aXb/n") is None
    assert app.match("/x+/1") is not None
    assert app.match("/xx/1") is None


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("hello%20world", "hello world"),
        ("caf%C3%A9", "café"),
        ("a%2Fb", "a/b"),
        ("a+b", "a+b"),  # in a path '+' is a plus, not a space
        ("100%25", "100%"),
        ("%zz", "%zz"),  # not an escape: kept as it is
    ],
)
def test_parameters_are_percent_decoded(raw: str, decoded: str) -> None:
    app = App()
    app.room("/room/{name}", Chat)
    assert matched(app, f"/room/{raw}")[1] == {"name": decoded}


@pytest.mark.parametrize("raw", ["%ff", "a%C3", "%C3%28", "%ed%a0%80"])
def test_parameters_that_are_not_utf8_are_400(raw: str) -> None:
    app = App()
    app.room("/room/{name}", Chat)
    with pytest.raises(HTTPError) as bad:
        app.match(f"/room/{raw}")
    assert bad.value.status == 400
    assert "'name'" in bad.value.reason


def test_first_matching_route_wins() -> None:
    app = App()
    app.room("/r/{name}", Chat)
    app.room("/r/{name}", Other)
    app.route("/r/{name}")(handler)
    assert matched(app, "/r/x")[0].room_class is Chat

    app = App()
    app.route("/r/special")(handler)
    app.room("/r/{name}", Chat)
    assert isinstance(matched(app, "/r/special")[0], FunctionRoute)
    route, params = matched(app, "/r/other")
    assert isinstance(route, RoomRoute) and params == {"name": "other"}


def test_function_routes_answer_get_and_head_by_default() -> None:
    app = App()
    app.route("/a")(handler)
    app.route("/b", methods=["post", "PUT"])(handler)
    route_a, route_b = app.routes
    assert isinstance(route_a, FunctionRoute) and route_a.methods == {"GET", "HEAD"}
    assert isinstance(route_b, FunctionRoute) and route_b.methods == {"POST", "PUT"}


def test_room_refuses_non_room_classes() -> None:
    app = App()

    class NotARoom:
        pass

    bad: list[Any] = [object, NotARoom, Chat(), "Chat", None]
    for room_class in bad:
        with pytest.raises(TypeError, match=r"not a subclass of rooms\.Room"):
            app.room("/x/{name}", room_class)
    assert app.routes == []


@pytest.mark.parametrize("pattern", ["/x/{id}", "/x/name", "/x/{names}", "/x/{Name}", "/x"])
def test_room_patterns_need_a_name_parameter(pattern: str) -> None:
    app = App()
    with pytest.raises(ValueError, match="name"):
        app.room(pattern, Chat)
    assert app.routes == []


def test_patterns_must_start_with_a_slash() -> None:
    app = App()
    with pytest.raises(ValueError, match="must start with '/'"):
        app.room("room/{name}", Chat)
    with pytest.raises(ValueError, match="must start with '/'"):
        app.route("api")(handler)


# ---------------------------------------------------------------------------------------
# static files


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """tmp/static/{index.html, app.js, sub/page.css, sub/index.html, empty/},
    tmp/static2/leak.txt and tmp/secret beside the folder."""
    static = tmp_path / "static"
    (static / "sub").mkdir(parents=True)
    (static / "empty").mkdir()
    (static / "index.html").write_text("home")
    (static / "app.js").write_text("js")
    (static / "sub" / "page.css").write_text("css")
    (static / "sub" / "index.html").write_text("sub home")
    (tmp_path / "static2").mkdir()
    (tmp_path / "static2" / "leak.txt").write_text("leak")
    (tmp_path / "secret").write_text("secret")
    return static


def test_static_files_and_index_html(site: Path) -> None:
    app = App()
    app.static("/", site)
    assert app.static_file("/") == site / "index.html"
    assert app.static_file("/index.html") == site / "index.html"
    assert app.static_file("/app.js") == site / "app.js"
    assert app.static_file("/sub/page.css") == site / "sub" / "page.css"
    assert app.static_file("/sub/") == site / "sub" / "index.html"
    assert app.static_file("/sub") == site / "sub" / "index.html"
    assert app.static_file("/sub/page%2Ecss") == site / "sub" / "page.css"
    assert app.static_file("/empty/") is None  # a folder without index.html
    assert app.static_file("/missing.txt") is None
    assert app.static_file("/sub/missing.css") is None


def test_static_folder_below_a_prefix(site: Path) -> None:
    app = App()
    app.static("/assets/", site)
    assert app.static_file("/assets/app.js") == site / "app.js"
    assert app.static_file("/assets/") == site / "index.html"
    assert app.static_file("/assets") == site / "index.html"
    assert app.static_file("/app.js") is None
    assert app.static_file("/assetsapp.js") is None
    assert app.static_file("/assets-x/app.js") is None


def test_static_folders_are_tried_in_order(site: Path, tmp_path: Path) -> None:
    app = App()
    app.static("/", site / "sub")
    app.static("/", site)
    assert app.static_file("/") == site / "sub" / "index.html"  # the first folder's
    assert app.static_file("/app.js") == site / "app.js"  # falls through to the second


def test_static_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        App().static("/", tmp_path / "nope")


TRAVERSALS = [
    "/../secret",
    "/%2e%2e/secret",
    "/%2E%2E/secret",
    "/..%2fsecret",
    "/..%2Fsecret",
    "/%2e%2e%2fsecret",
    "/sub/../../secret",
    "/sub/%2e%2e/%2e%2e/secret",
    "/./../secret",
    "/..",
    "/../static2/leak.txt",  # a sibling whose name starts like the folder's
    "/%2e%2e/static2/leak.txt",
]


@pytest.mark.parametrize("attack", TRAVERSALS)
def test_static_paths_never_escape_the_folder(site: Path, attack: str) -> None:
    assert (site.parent / "secret").is_file() and (site.parent / "static2" / "leak.txt").is_file()
    app = App()
    app.static("/", site)
    assert app.static_file(attack) is None


@pytest.mark.parametrize("prefix", ["/", "/assets"])
def test_static_refuses_absolute_paths_and_nul(site: Path, prefix: str) -> None:
    app = App()
    app.static(prefix, site)
    base = prefix.rstrip("/")
    secret = site.parent / "secret"
    for attack in [
        f"{base}/{secret}",  # //tmp/.../secret: an absolute path after the prefix
        f"{base}/%2f{str(secret).lstrip('/')}",
        f"{base}/%2F{str(secret).lstrip('/')}",
        f"{base}//etc/passwd",
        f"{base}/%2fetc/passwd",
        f"{base}/index.html%00",
        f"{base}/index.html%00.png",
        f"{base}/%00",
        f"{base}/%ff",
    ]:
        assert app.static_file(attack) is None, attack
    if base:
        assert app.static_file(f"{base}/../secret") is None
        assert app.static_file(f"{base}/%2e%2e/secret") is None


def test_static_refuses_a_symlink_out_of_the_folder(site: Path) -> None:
    os.symlink(site.parent / "secret", site / "link")
    os.symlink(site.parent, site / "parent")
    app = App()
    app.static("/", site)
    assert app.static_file("/link") is None
    assert app.static_file("/parent/secret") is None


def test_static_a_too_long_name_is_not_found(site: Path) -> None:
    app = App()
    app.static("/", site)
    assert app.static_file("/" + "a" * 300) is None


# ---------------------------------------------------------------------------------------
# mistakes caught where they are made


def test_a_plain_def_route_is_refused_when_it_is_registered() -> None:
    app = App()
    with pytest.raises(TypeError, match=r"route /x: 'stats' must be a coroutine function"):

        @app.route("/x")  # type: ignore[arg-type]
        def stats(request: Request) -> Response:
            return Response.text("no")


def test_a_plain_def_hook_is_refused_when_the_room_is_routed() -> None:
    class Careless(Room):
        def on_message(self, conn: Any, message: str | bytes) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match=r"Careless.on_message must be a coroutine function"):
        App().room("/c/{name}", Careless)


def test_an_async_callable_object_is_a_route_handler() -> None:
    class Handler:
        async def __call__(self, request: Request) -> Response:
            return Response.text("ok")

    App().route("/x")(Handler())


def test_a_response_body_is_bytes_or_str_and_says_so_otherwise() -> None:
    assert Response(200, "héllo").body == "héllo".encode()
    assert Response(200, bytearray(b"ab")).body == b"ab"
    assert Response(200, b"", {"retry-after": 5}).headers == {"retry-after": "5"}
    with pytest.raises(TypeError, match=r"not dict; for JSON use Response.json"):
        Response(200, {"a": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="status is an int from 100 to 599"):
        Response("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="header 'x'"):
        Response(200, b"", {"x": [1]})  # type: ignore[dict-item]
