"""Node links: what a node accepts on a link (from where, with what token, which messages:
anything else is refused or drops the link), and how the room's node groups what it sends to
a peer's clients (one SEND per frame per link, as a broadcast is) without ever reordering one
client's frames."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from rooms import Request
from runtime.config import Settings
from runtime.frames import FrameParser, encode_message
from runtime.inlink import InLink
from runtime.link import (
    ATTACH,
    CALL,
    ENDED,
    JOINED,
    LINK_PATH,
    MESSAGE,
    PROTOCOL,
    REPLY,
    SEND,
    TO_EDGE,
    TO_OWNER,
    LinkError,
    check_link,
    networks,
    request_from_wire,
    request_to_wire,
    unpack,
)


class Wire:
    """A link's socket: the SEND messages written to it, decoded."""

    def __init__(self) -> None:
        self.parser = FrameParser(client=True)
        self.sends: list[list[Any]] = []

    def write(self, data: bytes, messages: int = 1) -> None:
        for message in self.parser.feed(data):
            assert isinstance(message, bytes)
            self.sends.append(unpack(message, TO_EDGE))

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("not closed in these tests")


def frames_of(wire: Wire, conn: int) -> list[bytes]:
    """What the client ``conn`` gets, in order, as the peer writes it."""
    return [
        frame for kind, conns, frame, _ in wire.sends if kind == SEND for c in conns if c == conn
    ]


async def test_a_broadcast_crosses_the_link_once_per_frame() -> None:
    wire = Wire()
    link = InLink(None, wire, "peer", None)  # type: ignore[arg-type]
    hello = encode_message("hello")
    for conn in (1, 2, 3):
        link.queue_frame(conn, hello, 1)
    link.flush()
    assert wire.sends == [[SEND, [1, 2, 3], hello, 1]]


async def test_a_frame_queued_again_after_another_keeps_each_clients_order() -> None:
    # As in a room whose history is sent to a joining client (2) in the same bytes as the
    # broadcast of its last line, released in the same tick after the next line (106): the
    # grouping of equal frames must not move a frame ahead of one queued before it.
    wire = Wire()
    link = InLink(None, wire, "peer", None)  # type: ignore[arg-type]
    f105, f106 = encode_message("105"), encode_message("106")
    link.queue_frame(1, f105, 1)
    link.queue_frame(1, f106, 1)
    link.queue_frame(2, f106, 1)
    link.queue_frame(2, f105, 1)  # after 106, for client 2: must stay after it
    link.queue_frame(3, f105, 1)
    link.queue_frame(3, f106, 1)
    link.flush()
    assert frames_of(wire, 1) == [f105, f106]
    assert frames_of(wire, 2) == [f106, f105]
    assert frames_of(wire, 3) == [f105, f106]
    assert len(wire.sends) == 4  # 105 [1], 106 [1, 2], 105 [2, 3], 106 [3]


# -- what a node accepts ----------------------------------------------------------------------


def link_request(client: str, token: str | None = "secret") -> Request:
    headers = [("x-rooms-protocol", str(PROTOCOL))]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    return Request("GET", LINK_PATH, "", headers, b"", (client, 40000))


@pytest.mark.parametrize(
    ("client", "token", "status"),
    [
        ("127.0.0.1", "secret", None),
        ("10.1.2.3", "secret", None),
        ("fd00::5", "secret", None),
        ("203.0.113.7", "secret", 403),  # a public address: refused before the token counts
        ("2001:db8::1", "secret", 403),
        ("not an address", "secret", 403),
        ("10.1.2.3", None, 401),
        ("10.1.2.3", "guess", 401),
    ],
)
def test_a_link_is_taken_from_the_cluster_networks_with_the_token_only(
    client: str, token: str | None, status: int | None
) -> None:
    allowed = networks(Settings().cluster_link_networks)
    refused = check_link(link_request(client, token), "secret", allowed)
    assert (refused and refused.status) == status


def test_a_public_network_is_taken_when_it_is_listed() -> None:
    allowed = networks(["203.0.113.0/24"])
    assert check_link(link_request("203.0.113.7"), "secret", allowed) is None
    assert check_link(link_request("127.0.0.1"), "secret", allowed) is not None


GOOD = {
    ATTACH: [ATTACH, 1, "chat", "ab" * 32, "lobby", {}],
    CALL: [CALL, 2, "chat", "ab" * 32, None, "method", b"\x90", ["chat/ab"]],
    MESSAGE: [MESSAGE, 1, "hello"],
    ENDED: [ENDED, 1, 1000, "", False],
    SEND: [SEND, [1, 2], b"\x81\x00", 1],
    REPLY: [REPLY, 2, True, [1, "anything"]],
}


@pytest.mark.parametrize("kind", GOOD)
def test_each_kind_of_link_message_is_checked_item_by_item(kind: int) -> None:
    kinds = TO_OWNER | TO_EDGE
    assert unpack(msgpack.packb(GOOD[kind]), kinds) == GOOD[kind]
    good = GOOD[kind]
    for bad in (good[:-1], [*good, 0], [*good[:2], {}, *good[3:]]):
        with pytest.raises(LinkError):
            unpack(msgpack.packb(bad), kinds)


@pytest.mark.parametrize(
    "data",
    [
        "text",
        b"\xc1",  # not msgpack
        msgpack.packb({"kind": 1}),
        msgpack.packb([]),
        msgpack.packb(["1", 2]),
        msgpack.packb([99, 1]),  # no such kind
        msgpack.packb([SEND, ["1"], b"", 1]),  # clients that are not numbers
        msgpack.packb([CALL, 2, "chat", "ab", None, "m", b"", [1]]),  # a chain of numbers
        msgpack.packb([JOINED, 1]),  # a kind for the other direction
    ],
)
def test_a_message_that_is_not_the_protocol_is_a_link_error(data: str | bytes) -> None:
    with pytest.raises(LinkError):
        unpack(data, TO_OWNER)


@pytest.mark.parametrize(
    "change",
    [
        {"headers": [["a"]]},
        {"headers": [[1, 2]]},
        {"client": ["1.2.3.4"]},
        {"client": ["1.2.3.4", "port"]},
        {"body": "not bytes"},
        {"method": None},
        {"params": []},
    ],
)
def test_a_request_that_is_not_one_is_a_link_error(change: dict[str, Any]) -> None:
    wire = request_to_wire(link_request("10.0.0.1"))
    assert request_from_wire(wire, None).path == LINK_PATH
    with pytest.raises(LinkError):
        request_from_wire({**wire, **change}, None)
    with pytest.raises(LinkError):
        request_from_wire({k: v for k, v in wire.items() if k != "body"}, None)
