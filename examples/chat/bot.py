"""A bot for the example chat, on ``rooms.client``: it joins a room, answers ``!roll`` with
a die roll, and stays: after a server restart it reconnects and resumes after the last
message it saw (the chat's ``after``), so it never answers a command twice or misses one.

    make chat                              # one terminal: the chat on port 8000
    python -m examples.chat.bot lobby      # another: the bot joins the room "lobby"

Then type ``!roll`` in the room's page.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from typing import Any

import trio

import rooms.client


class DiceBot:
    """What the bot knows and says; ``hello`` starts every connection."""

    def __init__(self, name: str = "dicebot", dice: random.Random | None = None) -> None:
        self.name = name
        self.dice = dice or random.Random()
        self.last_seq: int | None = None  # the last message seen: where to resume

    def hello(self) -> str:
        join: dict[str, Any] = {"name": self.name}
        if self.last_seq is not None:
            join["after"] = self.last_seq
        return json.dumps(join)

    def answer(self, frame: dict[str, Any]) -> str | None:
        """The reply to one frame of the chat, if any."""
        if frame.get("ready"):
            # The history that comes with a first join is the past: answer from here on.
            if self.last_seq is None:
                self.last_seq = frame["seq"]
            return None
        seq = frame.get("seq")
        if not isinstance(seq, int) or self.last_seq is None or seq <= self.last_seq:
            return None
        self.last_seq = seq
        if frame.get("name") == self.name or str(frame.get("message", "")).strip() != "!roll":
            return None
        return json.dumps({"message": f"{frame['name']} rolled {self.dice.randint(1, 6)}"})


async def run(base: str, room: str, bot: DiceBot) -> None:
    """Keep ``bot`` in ``room`` of the chat at ``base`` (http:// or ws://) until cancelled."""
    url = base.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
    async with rooms.client.connect(f"{url}/api/room/{room}/websocket", bot.hello) as chat:
        async for message in chat:
            reply = bot.answer(json.loads(message))
            if reply is not None:
                await chat.send(reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("room", help="the room to join, e.g. lobby")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the chat server")
    parser.add_argument("--name", default="dicebot")
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    trio.run(run, args.url, args.room, DiceBot(args.name))


if __name__ == "__main__":
    main()
