"""Fuzz target: the example chat's handling of client frames (``examples/chat/app.py``), its
room driven through ``rooms.testing`` as a test would.

The input is the frames one client sends, one per line (at most ``MAX_FRAMES``): a line that
is UTF-8 is a text frame, any other a binary one. Documented: every frame is answered with a
JSON object (an ``{"error": ...}`` for what is not the protocol), ``ping`` with ``pong``, and
the only close is 1009 for a name over 32 characters; ``on_message`` never raises. A hook that
raised is reported by the harness's engine in its log (and the client closed with 1011): the
target re-raises that exception, so the finding's traceback is the hook's own.
"""

from __future__ import annotations

import json
import logging

import trio

from examples.chat import app as chat
from rooms.testing import RoomsHarness

MAX_FRAMES = 8
ROOM = "/api/room/fuzz/websocket"
NAME_TOO_LONG = json.dumps({"error": "Name too long."})


class HookRaised(Exception):
    """A room hook raised (the engine logged it and closed the client with 1011)."""


class _Raised(logging.Handler):
    """Keeps what the engine logged with an exception: a hook that raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def one_input(data: bytes) -> None:
    frames: list[str | bytes] = []
    for line in data.split(b"\n")[:MAX_FRAMES]:
        try:
            frames.append(line.decode())
        except UnicodeDecodeError:
            frames.append(line)
    raised = _Raised()
    engine_log = logging.getLogger("rooms.host")
    engine_log.addHandler(raised)
    try:
        received, close_code = trio.run(_talk, frames)
    finally:
        engine_log.removeHandler(raised)
    for record in raised.records:
        assert record.exc_info is not None
        raise HookRaised(record.getMessage()) from record.exc_info[1]
    check(frames, received, close_code)


async def _talk(frames: list[str | bytes]) -> tuple[list[str | bytes], int | None]:
    async with RoomsHarness(chat.app) as rooms:
        client = await rooms.connect(ROOM)
        for frame in frames:
            if client.closed:
                break
            await client.send(frame)
            await rooms.settle()
        return client.received, client.close_code


def check(frames: list[str | bytes], received: list[str | bytes], close_code: int | None) -> None:
    """Every answer is a JSON object (or ``pong``); the only close is a name too long."""
    if frames and not received and close_code is None:
        raise AssertionError(f"{frames[0]!r} got no answer")
    for message in received:
        if message == "pong":
            continue
        if not isinstance(message, str) or not isinstance(json.loads(message), dict):
            raise AssertionError(f"the chat answered {message!r}")
    if close_code is not None and (close_code != 1009 or received[-1:] != [NAME_TOO_LONG]):
        raise AssertionError(f"closed with {close_code} after {received[-1:]!r}")
