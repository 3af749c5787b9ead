"""Fuzz target: the messages of a cluster's node links (``runtime.link``).

The input is one binary link message, read as each side reads it: by a room's node (the
kinds in ``TO_OWNER``) and by a client's node (``TO_EDGE``). The documented error is
``LinkError`` (the link is dropped with 1002), from ``unpack``'s check of each kind's items
and from ``request_from_wire`` for the request an ATTACH or REQUEST carries. A message that
passes is a list whose first item is an int kind of that side.
"""

from __future__ import annotations

from runtime.link import (
    ATTACH,
    REQUEST,
    TO_EDGE,
    TO_OWNER,
    LinkError,
    request_from_wire,
    unpack,
)


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")  # a text frame is refused whatever it says
    for kinds in (TO_OWNER, TO_EDGE):
        for message in (data, text):
            try:
                items = unpack(message, kinds)
                if items[0] in (ATTACH, REQUEST):
                    request_from_wire(items[5], None)
            except LinkError as exc:
                if exc.code != 1002 or not exc.reason:
                    raise AssertionError(f"LinkError {exc.code} {exc.reason!r}") from exc
                continue
            if not isinstance(message, bytes):
                raise AssertionError("a text link message was accepted")
            if type(items[0]) is not int or items[0] not in kinds:
                raise AssertionError(f"accepted {items!r} on a link that reads {set(kinds)}")
