"""Which answer a request gets (``runtime.router.Router.route``), in process through
``runtime.local.LocalServer``: the operator's endpoints and who may read them, the browser
client, function routes, room routes (plain and upgrade), proxied routes, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from rooms import App, HTTPError, Request, Response, Room, RoomId
from rooms._engine import ProxyRoute
from runtime.config import Settings
from runtime.local import LocalServer
from runtime.router import Router

CLIENT_JS = Path(__file__).resolve().parents[2] / "runtime" / "static" / "client.js"
LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("10.0.0.1", 50000)


class Hello(Room):
    async def on_request(self, request: Request) -> Response:
        return Response.text(f"hello {self.name} via {request.route} {request.method}", 201)


class Silent(Room):
    """The default ``on_request``."""


class Picky(Room):
    @classmethod
    def resolve(cls, name: str) -> RoomId:
        if not name.startswith("ok-"):
            raise HTTPError(400, "room names start with ok-")
        return RoomId.from_name(name)


def app() -> App:
    application = App()
    application.room("/hello/{name}", Hello)
    application.room("/silent/{name}", Silent)
    application.room("/picky/{name}", Picky)
    application.proxy("/p/{x}", "ws://127.0.0.1:9/{x}")

    @application.route("/api/post", methods=["POST"])
    async def post_only(request: Request) -> Response:
        return Response.text("posted")

    @application.route("/api/get")
    async def get_only(request: Request) -> Response:
        return Response.json({"path": request.path, "route": request.route})

    @application.route("/api/item/{id}")
    async def item(request: Request) -> Response:
        return Response.json(request.path_params)

    @application.route("/api/wrong")
    async def wrong(request: Request) -> Any:
        return "not a response"

    @application.route("/api/teapot")
    async def teapot(request: Request) -> Response:
        raise HTTPError(418, "I'm a teapot", {"x-brew": "tea"})

    @application.route("/api/bug")
    async def bug(request: Request) -> Response:
        raise ZeroDivisionError

    return application


@asynccontextmanager
async def router(**settings: Any) -> AsyncIterator[Router]:
    async with LocalServer(app(), Settings(data_dir=":memory:", **settings)) as server:
        yield server.edge.router


def request(
    path: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    client: tuple[str, int] = LOOPBACK,
) -> Request:
    return Request(method, path, headers=headers or [], client=client)


async def answer(
    routes: Router,
    path: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    client: tuple[str, int] = LOOPBACK,
) -> Response:
    """The response to a plain request."""
    routed = await routes.route(request(path, method, headers, client), upgrade=False)
    assert isinstance(routed, Response)
    return routed


# -- /_rooms/metrics and /_rooms/usage ---------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
async def test_metrics_are_readable_from_loopback_without_a_token(address: str) -> None:
    async with router() as routes:
        response = await answer(routes, "/_rooms/metrics", client=(address, 1))
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.body.decode()
    assert "# TYPE rooms_websockets_open gauge" in text
    assert "\nrooms_websockets_open 0.0\n" in text


async def test_usage_is_readable_from_loopback_without_a_token() -> None:
    async with router() as routes:
        response = await answer(routes, "/_rooms/usage")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    report = json.loads(response.body)
    assert report["routes"] == {} and report["rooms"] == {}
    assert report["total"]["websockets"] == 0


@pytest.mark.parametrize("path", ["/_rooms/metrics", "/_rooms/usage", "/_rooms/analytics"])
async def test_admin_endpoints_are_403_from_another_host_without_admin_token(path: str) -> None:
    async with router() as routes:
        response = await answer(routes, path, client=REMOTE)
    assert response.status == 403
    assert response.body.decode() == f"set admin_token to read {path} from another host\n"


@pytest.mark.parametrize("path", ["/_rooms/metrics", "/_rooms/usage", "/_rooms/analytics"])
@pytest.mark.parametrize(
    "headers",
    [[], [("authorization", "Bearer nope")], [("authorization", "s3cret")]],
    ids=["none", "wrong", "not-bearer"],
)
async def test_with_admin_token_the_endpoints_need_it_even_from_loopback(
    path: str, headers: list[tuple[str, str]]
) -> None:
    async with router(admin_token="s3cret") as routes:
        response = await answer(routes, path, headers=headers)
    assert response.status == 401
    assert "Authorization: Bearer <admin_token>" in response.body.decode()


async def test_with_the_right_bearer_token_metrics_are_readable_from_anywhere() -> None:
    async with router(admin_token="s3cret") as routes:
        auth = [("Authorization", "Bearer s3cret")]
        metrics = await answer(routes, "/_rooms/metrics", headers=auth, client=REMOTE)
        usage = await answer(routes, "/_rooms/usage", headers=auth, client=REMOTE)
    assert metrics.status == 200
    assert "rooms_websockets_open 0.0" in metrics.body.decode()
    assert usage.status == 200
    assert json.loads(usage.body)["routes"] == {}


async def test_admin_endpoints_are_not_upgrades() -> None:
    async with router() as routes:
        routed = await routes.route(request("/_rooms/metrics"), upgrade=True)
    assert isinstance(routed, Response) and routed.status == 200


# -- /_rooms/client.js -----------------------------------------------------------------------


async def test_client_js_is_served_with_an_etag() -> None:
    async with router() as routes:
        response = await answer(routes, "/_rooms/client.js")
    assert response.status == 200
    assert response.body == CLIENT_JS.read_bytes()
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    etag = response.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) == 18


async def test_client_js_is_304_for_a_matching_if_none_match() -> None:
    async with router() as routes:
        etag = (await answer(routes, "/_rooms/client.js")).headers["etag"]
        again = await answer(routes, "/_rooms/client.js", headers=[("If-None-Match", etag)])
        other = await answer(routes, "/_rooms/client.js", headers=[("If-None-Match", '"x"')])
    assert again.status == 304
    assert again.body == b""
    assert again.headers["etag"] == etag
    assert other.status == 200
    assert other.body == CLIENT_JS.read_bytes()


async def test_client_js_answers_head() -> None:
    async with router() as routes:
        response = await answer(routes, "/_rooms/client.js", method="HEAD")
    assert response.status == 200


async def test_client_js_is_405_for_post() -> None:
    async with router() as routes:
        response = await answer(routes, "/_rooms/client.js", method="POST")
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


# -- function routes ---------------------------------------------------------------------------


async def test_a_function_route_answers_with_its_response() -> None:
    async with router() as routes:
        response = await answer(routes, "/api/get")
        item = await answer(routes, "/api/item/a%20b")
    assert response.status == 200
    assert json.loads(response.body) == {"path": "/api/get", "route": "/api/get"}
    assert json.loads(item.body) == {"id": "a b"}


async def test_a_function_route_is_405_with_allow_for_a_method_it_does_not_take() -> None:
    async with router() as routes:
        get = await answer(routes, "/api/post")
        post = await answer(routes, "/api/get", method="POST")
    assert get.status == 405
    assert get.headers["allow"] == "POST"
    assert get.body == b"method GET not allowed"
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"


async def test_a_route_returning_something_else_than_a_response_is_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with router() as routes:
        response = await answer(routes, "/api/wrong")
    assert response.status == 500
    assert response.body == b"internal server error\n"
    assert "not a rooms.Response" in caplog.text


async def test_an_http_error_raised_by_a_route_is_its_status_and_reason() -> None:
    async with router() as routes:
        response = await answer(routes, "/api/teapot")
    assert response.status == 418
    assert response.body == b"I'm a teapot"
    assert response.headers["x-brew"] == "tea"


async def test_any_other_exception_raised_by_a_route_is_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with router() as routes:
        response = await answer(routes, "/api/bug")
    assert response.status == 500
    assert "GET /api/bug: the handler raised; answered 500" in caplog.text


async def test_an_unknown_path_is_404() -> None:
    async with router() as routes:
        get = await answer(routes, "/nowhere")
        post = await answer(routes, "/nowhere", method="POST")
        upgrade = await routes.route(request("/nowhere"), upgrade=True)
    assert get.status == 404
    assert get.body == b"not found\n"
    assert post.status == 404
    assert isinstance(upgrade, Response) and upgrade.status == 404


async def test_a_path_parameter_that_is_not_utf8_is_400() -> None:
    async with router() as routes:
        response = await answer(routes, "/api/item/%ff")
    assert response.status == 400
    assert response.body == b"path parameter 'id' is not valid UTF-8"


# -- room routes -------------------------------------------------------------------------------


async def test_a_plain_request_to_a_room_route_runs_the_rooms_on_request() -> None:
    async with router() as routes:
        response = await answer(routes, "/hello/lobby", method="PUT")
    assert response.status == 201
    assert response.body == b"hello lobby via /hello/{name} PUT"


async def test_a_room_without_on_request_answers_426() -> None:
    async with router() as routes:
        response = await answer(routes, "/silent/lobby")
    assert response.status == 426
    assert response.headers["upgrade"] == "websocket"


async def test_an_upgrade_to_a_room_route_returns_the_room_class_and_id() -> None:
    async with router() as routes:
        upgrade = request("/hello/lobby")
        routed = await routes.route(upgrade, upgrade=True)
    assert routed == (Hello, RoomId.from_name("lobby"))
    assert upgrade.route == "/hello/{name}"
    assert upgrade.path_params == {"name": "lobby"}


async def test_an_upgrade_naming_a_room_id_joins_that_id() -> None:
    room_id = RoomId.unique()
    async with router() as routes:
        routed = await routes.route(request(f"/hello/{room_id}"), upgrade=True)
    assert routed == (Hello, room_id)


async def test_an_upgrade_does_not_wake_the_room() -> None:
    async with LocalServer(app(), Settings(data_dir=":memory:")) as server:
        await server.edge.router.route(request("/hello/lobby"), upgrade=True)
        assert not server.in_memory(Hello, "lobby")
        assert server.metrics.room_activations_total == 0


@pytest.mark.parametrize("upgrade", [False, True])
async def test_a_room_name_the_default_resolve_refuses_is_400(upgrade: bool) -> None:
    async with router() as routes:
        routed = await routes.route(request("/hello/" + "x" * 65), upgrade=upgrade)
    assert isinstance(routed, Response)
    assert routed.status == 400
    assert routed.body == b"room name must be 1 to 64 characters"


@pytest.mark.parametrize("upgrade", [False, True])
async def test_a_room_name_a_custom_resolve_refuses_is_its_answer(upgrade: bool) -> None:
    async with router() as routes:
        refused = await routes.route(request("/picky/lobby"), upgrade=upgrade)
        accepted = await routes.route(request("/picky/ok-lobby"), upgrade=True)
    assert isinstance(refused, Response)
    assert refused.status == 400
    assert refused.body == b"room names start with ok-"
    assert accepted == (Picky, RoomId.from_name("ok-lobby"))


# -- proxied routes --------------------------------------------------------------------------


async def test_a_plain_request_to_a_proxied_route_is_426() -> None:
    async with router() as routes:
        response = await answer(routes, "/p/a")
    assert response.status == 426
    assert response.headers["upgrade"] == "websocket"


async def test_an_upgrade_to_a_proxied_route_returns_the_route() -> None:
    async with router() as routes:
        upgrade = request("/p/a")
        routed = await routes.route(upgrade, upgrade=True)
        assert routed is routes.app.routes[3]
    assert isinstance(routed, ProxyRoute)
    assert routed.upstream == "ws://127.0.0.1:9/{x}"
    assert upgrade.route == "/p/{x}"
    assert upgrade.path_params == {"x": "a"}


# -- static files ------------------------------------------------------------------------------


async def test_a_static_file_is_served_for_get_and_not_for_post(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text("<p>hi</p>")
    application = app()
    application.static("/", tmp_path)
    async with LocalServer(application, Settings(data_dir=":memory:")) as server:
        get = await answer(server.edge.router, "/page.html")
        post = await answer(server.edge.router, "/page.html", method="POST")
        index = await answer(server.edge.router, "/")
    assert get.status == 200
    assert get.body == b"<p>hi</p>"
    assert get.headers["content-type"] == "text/html; charset=utf-8"
    assert post.status == 404
    assert index.status == 404  # (no index.html)
