"""Room ids, name resolution and routing (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rooms import App, HTTPError, Request, Response, Room, RoomId, is_room_id


def test_room_ids() -> None:
    lobby = RoomId.from_name("lobby")
    assert lobby == RoomId.from_name("lobby") and lobby.name == "lobby"
    assert is_room_id(str(lobby)) and lobby != RoomId.from_name("Lobby")
    unique = {RoomId.unique().hex for _ in range(100)}
    assert len(unique) == 100 and all(is_room_id(u) for u in unique)
    assert RoomId.from_string(lobby.hex) == lobby  # the name is not part of equality
    for bad in ["a" * 63, "A" * 64, "g" * 64, "a" * 65, ""]:
        with pytest.raises(ValueError, match="64 lowercase hex"):
            RoomId.from_string(bad)


def test_default_resolve() -> None:
    hex_id = RoomId.unique().hex
    assert Room.resolve(hex_id) == RoomId.from_string(hex_id)
    assert Room.resolve("lobby") == RoomId.from_name("lobby")
    assert Room.resolve("x" * 64).name == "x" * 64
    for bad in ["", "x" * 65, "tab\there"]:
        with pytest.raises(HTTPError) as refused:
            Room.resolve(bad)
        assert refused.value.status == 400


class Chat(Room):
    pass


def test_routes_match_in_order_and_decode_parameters() -> None:
    app = App()
    app.room("/room/{name}", Chat)

    @app.route("/room/{name}/info")
    async def info(request: Request) -> Response:
        return Response.text("info")

    matched = app.match("/room/hello%20world")
    assert matched is not None and matched[1] == {"name": "hello world"}
    info_match = app.match("/room/x/info")
    assert info_match is not None and info_match[1] == {"name": "x"}
    assert app.match("/room/") is None and app.match("/other") is None
    with pytest.raises(HTTPError) as bad:
        app.match("/room/%ff")
    assert bad.value.status == 400
    with pytest.raises(TypeError):
        app.room("/x/{name}", object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        app.room("/x/{id}", Chat)


def test_static_files_never_escape_their_folder(tmp_path: Path) -> None:
    static = tmp_path / "static"
    (static / "sub").mkdir(parents=True)
    (static / "index.html").write_text("home")
    (static / "sub" / "page.css").write_text("css")
    (tmp_path / "secret").write_text("secret")
    app = App()
    app.static("/", static)
    assert app.static_file("/") == static / "index.html"
    assert app.static_file("/sub/page.css") == static / "sub" / "page.css"
    for attack in [
        "/../secret",
        "/%2e%2e/secret",
        "/..%2fsecret",
        "/sub/../../secret",
        "/%2fetc/passwd",
        "//etc/passwd",
        "/index.html%00",
        "/nope",
    ]:
        assert app.static_file(attack) is None, attack
