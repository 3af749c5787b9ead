"""The chat bot (``examples/chat/bot.py``, on ``rooms.client``) against the real chat on a
socket: it answers a command, ignores the history it joins with, and after a server restart
resumes after the last message it saw, answering the next command once and no old one again."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import trio

import rooms.client
from examples.chat import app as chat
from examples.chat.bot import DiceBot, run
from rooms.testing import Settings
from tests.support import free_port, server_on


async def next_chat_line(room: rooms.client.RoomClient) -> dict[str, Any]:
    """The next stored message (a frame with a seq)."""
    with trio.fail_after(10):
        while True:
            frame = json.loads(await room.receive())
            if "seq" in frame and "message" in frame:
                return dict(frame)


async def say(port: int, text: str, lines: int = 2) -> list[dict[str, Any]]:
    """Join as Ada once the bot is in the room (``lines`` 2) or not (1), say ``text``, and
    return the next ``lines`` lines (hers, then the bot's)."""
    url = f"ws://127.0.0.1:{port}/api/room/dice/websocket"
    hello = json.dumps({"name": "Ada"})
    with trio.fail_after(10):
        while True:
            async with rooms.client.connect(url, lambda: hello) as ada:
                members = set()
                while "ready" not in (frame := json.loads(await ada.receive())):
                    members.add(frame.get("joined"))
                if lines == 1 or "dicebot" in members:
                    await ada.send(json.dumps({"message": text}))
                    return [await next_chat_line(ada) for _ in range(lines)]
            await trio.sleep(0.05)  # the bot is not in yet


@pytest.fixture
def roomy_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat.RateLimiter, "grace", 1000.0)  # one address for Ada and the bot


async def test_the_bot_answers_once_across_a_restart(
    settings: Settings, roomy_limits: None
) -> None:
    port = free_port()
    bot = DiceBot(dice=random.Random(7))
    async with trio.open_nursery() as nursery:
        async with server_on(port, settings, chat.app):
            before = await say(port, "!roll", lines=1)  # history by the time the bot joins
            nursery.start_soon(run, f"http://127.0.0.1:{port}", "dice", bot)
            _, reply = await say(port, "!roll")
        assert before[0]["message"] == "!roll"
        assert reply["name"] == "dicebot" and reply["message"].startswith("Ada rolled ")
        seen = bot.last_seq
        assert seen is not None and seen == reply["seq"]

        async with server_on(port, settings, chat.app):  # restarted, same data
            ada_again, reply_again = await say(port, "!roll")
            assert ada_again["seq"] == seen + 1  # nothing was repeated in between
            assert reply_again["seq"] == seen + 2
            assert reply_again["message"].startswith("Ada rolled ")
            history = await trio_history(port)
        nursery.cancel_scope.cancel()
    bot_lines = [line for line in history if line["name"] == "dicebot"]
    assert len(bot_lines) == 2  # one answer per command, none for the history it joined with


async def trio_history(port: int) -> list[dict[str, Any]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET /api/room/dice/history?limit=100 HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"
        )
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    page = json.loads(raw.partition(b"\r\n\r\n")[2])
    return list(page["messages"] if isinstance(page, dict) else page)


def test_the_bot_ignores_its_own_lines_and_other_text() -> None:
    bot = DiceBot()
    assert bot.answer({"ready": True, "seq": 5}) is None
    assert bot.hello() == '{"name": "dicebot", "after": 5}'
    assert bot.answer({"name": "Ada", "message": "!roll", "seq": 4}) is None  # old
    assert bot.answer({"name": "dicebot", "message": "!roll", "seq": 6}) is None  # its own
    assert bot.answer({"name": "Ada", "message": "hi", "seq": 7}) is None
    assert bot.answer({"name": "Ada", "message": " !roll ", "seq": 8}) is not None
