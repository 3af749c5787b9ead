"""Coin rush: a real-time multiplayer game on a shared board (``make game`` serves it).

Players move on a 32 x 20 board and pick up coins; the room runs the game loop at 20 ticks a
second with a timer, keeps each player in ``conn.state`` (position, heading, score), tells
players from watchers with tags, keeps the best scores in storage, and sets an alarm when
the last player leaves: an abandoned game is closed and its board cleared after
``GAME_ABANDON_SECONDS`` (300). A board with nobody playing hibernates like any room.

Protocol (JSON text frames) on ``/game/<name>``:

- client: ``{"join": "alice"}`` to play (watchers just connect); then ``{"go": "up"}``
  (``down``, ``left``, ``right``, ``stop``).
- server: ``{"hello": {"you": ID, "width": W, "height": H, "best": [[name, score], ...]}}``
  on connect; ``{"state": {"tick": N, "players": [{"id", "name", "x", "y", "score",
  "color"}], "coins": [[x, y], ...]}}`` on every tick where something changed;
  ``{"error": "..."}`` for a bad frame; ``{"closed": "abandoned"}`` before the room closes
  its watchers' connections when the game was abandoned.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from rooms import App, Connection, Request, Room, Timer

WIDTH, HEIGHT = 32, 20
TICK = 0.05  # 20 ticks a second
STEP_TICKS = 3  # a player moves one cell every 3 ticks (6.7 cells a second)
COINS = 5
COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"]
MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0), "stop": (0, 0)}
ABANDON_SECONDS = float(os.environ.get("GAME_ABANDON_SECONDS", "300"))


class GameRoom(Room):
    """One board. Its loop runs only while someone plays."""

    auto_reply = ("ping", "pong")

    async def on_start(self) -> None:
        self.loop: Timer | None = None
        self.tick_count = 0
        self.changed = True
        self.coins: set[tuple[int, int]] = set()
        self.best: dict[str, int] = await self.storage.get("best", {})
        # After a restart or hibernation, players already connected keep playing.
        if self.connections("player"):
            self.start_loop()

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.tags.add("watcher")
        best = sorted(self.best.items(), key=lambda kv: -kv[1])[:5]
        hello = {"you": conn.id, "width": WIDTH, "height": HEIGHT, "best": best}
        conn.send(json.dumps({"hello": hello}))
        if self.tick_count:
            conn.send(json.dumps({"state": self.snapshot()}))

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
            if not isinstance(frame, dict):
                raise ValueError("expected a JSON object")
            if "join" in frame:
                self.join(conn, str(frame["join"])[:20].strip() or "player")
            elif frame.get("go") in MOVES and "player" in conn.tags:
                conn.state = {**conn.state, "heading": frame["go"]}
            else:
                raise ValueError('send {"join": NAME}, then {"go": "up"} (down, left, right, stop)')
        except ValueError as exc:
            conn.send(json.dumps({"error": str(exc)}))

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        if "player" not in conn.tags:
            return
        self.changed = True
        if not self.connections("player"):  # the last player left
            if self.loop is not None:
                self.loop.cancel()
                self.loop = None
            self.set_alarm(self.now() + ABANDON_SECONDS)

    async def on_alarm(self, retry_count: int) -> None:
        if self.connections("player"):
            return  # someone came back
        self.storage.delete_all()  # the board's best scores go with it
        self.broadcast(json.dumps({"closed": "abandoned"}))
        for conn in self.connections():
            conn.close(1000, "game closed: abandoned")

    # -- the game ----------------------------------------------------------------------------

    def join(self, conn: Connection, name: str) -> None:
        if "player" in conn.tags:
            return
        taken = {(c.state["x"], c.state["y"]) for c in self.connections("player")}
        x, y = self.free_cell(taken)
        color = COLORS[len(self.connections("player")) % len(COLORS)]
        conn.state = {"name": name, "x": x, "y": y, "heading": "stop", "score": 0, "color": color}
        conn.tags.discard("watcher")
        conn.tags.add("player")
        self.delete_alarm()
        self.start_loop()
        self.changed = True

    def start_loop(self) -> None:
        if self.loop is None:
            self.loop = self.every(TICK, self.tick)

    def tick(self) -> None:
        self.tick_count += 1
        while len(self.coins) < COINS:
            self.coins.add(self.free_cell(self.coins))
            self.changed = True
        if self.tick_count % STEP_TICKS == 0:
            for conn in self.connections("player"):
                self.step(conn)
        if self.changed:
            self.changed = False
            self.broadcast(json.dumps({"state": self.snapshot()}))

    def step(self, conn: Connection) -> None:
        player = conn.state
        dx, dy = MOVES[player["heading"]]
        if not (dx or dy):
            return
        x = min(WIDTH - 1, max(0, player["x"] + dx))
        y = min(HEIGHT - 1, max(0, player["y"] + dy))
        score = player["score"]
        if (x, y) in self.coins:
            self.coins.discard((x, y))
            score += 1
            if score > self.best.get(player["name"], 0):
                self.best[player["name"]] = score
                self.storage.put("best", self.best)
        conn.state = {**player, "x": x, "y": y, "score": score}
        self.changed = True

    def snapshot(self) -> dict[str, Any]:
        players = [
            {"id": c.id, **{k: c.state[k] for k in ("name", "x", "y", "score", "color")}}
            for c in self.connections("player")
        ]
        return {"tick": self.tick_count, "players": players, "coins": sorted(self.coins)}

    @staticmethod
    def free_cell(taken: set[tuple[int, int]]) -> tuple[int, int]:
        while True:
            cell = (random.randrange(WIDTH), random.randrange(HEIGHT))
            if cell not in taken:
                return cell


app = App()
app.room("/game/{name}", GameRoom)
app.static("/", Path(__file__).parent / "static")
