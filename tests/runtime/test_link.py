"""Node links: the room's node groups what it sends to a peer's clients (one SEND per frame
per link, as a broadcast is) without ever reordering one client's frames."""

from __future__ import annotations

from typing import Any

from runtime.frames import FrameParser, encode_message
from runtime.inlink import InLink
from runtime.link import SEND, unpack


class Wire:
    """A link's socket: the SEND messages written to it, decoded."""

    def __init__(self) -> None:
        self.parser = FrameParser(client=True)
        self.sends: list[list[Any]] = []

    def write(self, data: bytes, messages: int = 1) -> None:
        for message in self.parser.feed(data):
            assert isinstance(message, bytes)
            self.sends.append(unpack(message))

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("not closed in these tests")


def frames_of(wire: Wire, conn: int) -> list[bytes]:
    """What the client ``conn`` gets, in order, as the peer writes it."""
    return [
        frame for kind, conns, frame, _ in wire.sends if kind == SEND for c in conns if c == conn
    ]


async def test_a_broadcast_crosses_the_link_once_per_frame() -> None:
    wire = Wire()
    link = InLink(host=None, ws=wire, node_id="peer")  # type: ignore[arg-type]
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
    link = InLink(host=None, ws=wire, node_id="peer")  # type: ignore[arg-type]
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
