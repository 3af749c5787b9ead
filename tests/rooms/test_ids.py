"""Room ids (``rooms._ids``) and how a room class resolves a name into one (``Room.resolve``)."""

from __future__ import annotations

import re

import pytest

from rooms import HTTPError, Room, RoomId, is_room_id

HEX64 = re.compile(r"[0-9a-f]{64}")

# ---------------------------------------------------------------------------------------
# RoomId


def test_from_name_is_deterministic_lowercase_hex() -> None:
    lobby = RoomId.from_name("lobby")
    assert HEX64.fullmatch(lobby.hex)
    assert lobby == RoomId.from_name("lobby")
    assert lobby.hex == RoomId.from_name("lobby").hex
    assert lobby.name == "lobby"
    # A pinned value: ids must never change between versions, or rooms lose their data.
    assert RoomId.from_name("x").hex == (
        "edfcd26973c46099e76170df9665507a6a3ff3704b7d31b0ea293201a9031b43"
    )


def test_different_names_give_different_ids() -> None:
    names = ["lobby", "Lobby", "lobby ", " lobby", "lobb", "", "é", "e\u0301", "\U0010ffff"]
    ids = {RoomId.from_name(n).hex for n in names}
    assert len(ids) == len(names)
    assert all(HEX64.fullmatch(i) for i in ids)


def test_unique_ids_are_distinct_hex_without_a_name() -> None:
    ids = [RoomId.unique() for _ in range(200)]
    assert len({i.hex for i in ids}) == 200
    assert all(HEX64.fullmatch(i.hex) and is_room_id(i.hex) for i in ids)
    assert all(i.name is None for i in ids)


@pytest.mark.parametrize(
    "bad",
    [
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "0123456789ABCDEF" * 4,
        "g" * 64,
        "a" * 63 + "-",
        " " + "a" * 63,
        "a" * 64 + "\n",
        "",
    ],
)
def test_from_string_refuses_anything_but_64_lowercase_hex(bad: str) -> None:
    with pytest.raises(ValueError, match="exactly 64 lowercase hex characters") as refused:
        RoomId.from_string(bad)
    assert repr(bad) in str(refused.value)  # the message shows the input
    assert not is_room_id(bad)


def test_from_string_shortens_a_huge_input_in_its_message() -> None:
    with pytest.raises(ValueError) as refused:
        RoomId.from_string("z" * 100_000)
    assert len(str(refused.value)) < 300


def test_from_string_parses_and_the_name_is_not_part_of_equality() -> None:
    lobby = RoomId.from_name("lobby")
    parsed = RoomId.from_string(lobby.hex)
    assert parsed.hex == lobby.hex and parsed.name is None
    assert parsed == lobby
    assert hash(parsed) == hash(lobby)
    assert {lobby: 1}[parsed] == 1
    assert RoomId(lobby.hex, "some other name") == lobby
    assert lobby != RoomId.from_name("lobby2")


def test_str_is_the_hex() -> None:
    lobby = RoomId.from_name("lobby")
    assert str(lobby) == lobby.hex
    assert f"{lobby}" == lobby.hex
    unique = RoomId.unique()
    assert str(unique) == unique.hex
    assert RoomId.from_string(str(unique)) == unique


# ---------------------------------------------------------------------------------------
# Room.resolve


def test_default_resolve_takes_a_64_hex_string_as_an_id() -> None:
    hex_id = RoomId.unique().hex
    resolved = Room.resolve(hex_id)
    assert resolved == RoomId.from_string(hex_id)
    assert resolved.name is None  # not hashed: a private room is addressed as is


@pytest.mark.parametrize("name", ["l", "lobby", "x" * 64, "A" * 64, "with space", "é 日本"])
def test_default_resolve_derives_an_id_from_a_name(name: str) -> None:
    resolved = Room.resolve(name)
    assert resolved == RoomId.from_name(name)
    assert resolved.name == name


@pytest.mark.parametrize(
    "bad", ["", "x" * 65, "tab\there", "new\nline", "nul\x00", "del\x7f", "\u2028"]
)
def test_default_resolve_refuses_bad_names_with_400(bad: str) -> None:
    with pytest.raises(HTTPError) as refused:
        Room.resolve(bad)
    assert refused.value.status == 400


def test_resolve_follows_max_name_length() -> None:
    class Short(Room):
        max_name_length = 8

    assert Short.resolve("x" * 8).name == "x" * 8
    with pytest.raises(HTTPError, match="1 to 8 characters"):
        Short.resolve("x" * 9)
    hex_id = RoomId.unique().hex
    assert Short.resolve(hex_id) == RoomId.from_string(hex_id)  # ids are not names
