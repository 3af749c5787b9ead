"""Coin rush: a real-time multiplayer game on a shared board (``make game`` serves it).

Players move on a 32 x 20 board and pick up coins; the room runs the game loop at 20 ticks a
second with a timer, keeps each player in ``conn.state`` (position, heading, score), tells
players from watchers with tags, keeps the best scores in storage, and sets an alarm when
the last player leaves: an abandoned game is closed and its board cleared after
``GAME_ABANDON_SECONDS`` (300). A board with nobody playing hibernates like any room.

A board has ``GAME_MAX_PLAYERS`` (4) seats (``max_clients``, held by the edge): a connection
that finds one free takes it and may play, the others watch (unlimited). The lobby
(``Boards``, a ``rooms.Lobby``) lists the public boards and fills them: ``POST
/api/quickplay`` puts a player on the fullest open board (or a new one) with a seat ticket,
``POST /api/boards`` makes a private board (never listed: share its link), ``GET
/api/boards`` lists the open ones.

Protocol (JSON text frames) on ``/game/<name>`` (``?ticket=`` from the lobby, if any):

- client: ``{"join": "alice"}`` to play (with a seat; watchers just connect); then
  ``{"go": "up"}`` (``down``, ``left``, ``right``, ``stop``).
- server: ``{"hello": {"you": ID, "width": W, "height": H, "best": [[name, score], ...],
  "seated": bool, "max_players": N}}`` on connect; ``{"state": {"tick": N, "players":
  [{"id", "name", "x", "y", "score", "color"}], "coins": [[x, y], ...]}}`` on every tick
  where something changed; ``{"error": "..."}`` for a bad frame (or a join without a seat);
  ``{"closed": "abandoned"}`` before the room closes its watchers' connections when the game
  was abandoned.

HTTP: ``GET /api/boards`` (``[{"name", "players", "max_players"}]``, the fullest first);
``POST /api/quickplay`` and ``POST /api/boards`` with ``{"name": NAME}`` (the player's; a
private board for the latter) answer ``{"board": NAME, "url": WS_URL, "path": PATH}``: open
the WebSocket at ``url`` (its ``?ticket=`` is good once, for 15 s), then send ``{"join"}``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from rooms import App, Connection, HTTPError, Listed, Lobby, Request, Response, Room, Timer

WIDTH, HEIGHT = 32, 20
TICK = 0.05  # 20 ticks a second
STEP_TICKS = 3  # a player moves one cell every 3 ticks (6.7 cells a second)
COINS = 5
COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"]
MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0), "stop": (0, 0)}
ABANDON_SECONDS = float(os.environ.get("GAME_ABANDON_SECONDS", "300"))
MAX_PLAYERS = int(os.environ.get("GAME_MAX_PLAYERS", "4"))
LOBBY = "boards"


class GameRoom(Room):
    """One board. Its loop runs only while someone plays."""

    auto_reply = ("ping", "pong")
    max_clients = MAX_PLAYERS
    when_full = "watch"

    async def on_start(self) -> None:
        self.listing = Listed(self, Boards, LOBBY)
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
        seats = {"seated": conn.seated, "max_players": MAX_PLAYERS}
        conn.send(json.dumps({"hello": {**hello, **seats}}))
        if self.tick_count:
            conn.send(json.dumps({"state": self.snapshot()}))
        await self.listing.update()

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
        await self.listing.update()
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
        if not conn.seated:
            raise ValueError(f"this board is full ({MAX_PLAYERS} players): you are watching")
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

    async def tick(self) -> None:
        self.tick_count += 1
        if self.tick_count % int(self.listing.refresh_every / TICK) == 0:
            await self.listing.update()  # (listed while someone plays)
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


class Boards(Lobby):
    """The boards' lobby: lists the open ones, fills the fullest first."""

    room_class = GameRoom


app = App()
app.room("/game/{name}", GameRoom)
app.room("/api/lobby/{name}", Boards)  # (reached by stub from the routes below)


@app.route("/api/boards", methods=["GET", "POST"])
async def boards(request: Request) -> Response:
    """GET: the open boards; POST ``{"name"}``: a new private board, and a seat in it."""
    lobby = request.stub(Boards, LOBBY)
    if request.method == "GET":
        listed = await lobby.rooms(limit=100)
        keys = ("name", "players", "max_players")
        return Response.json([{key: board[key] for key in keys} for board in listed])
    return seat(request, await lobby.create({"name": player_name(request)}))


@app.route("/api/quickplay", methods=["POST"])
async def quickplay(request: Request) -> Response:
    """A seat on the fullest open board, or on a new one."""
    lobby = request.stub(Boards, LOBBY)
    return seat(request, await lobby.join_or_create({"name": player_name(request)}))


def player_name(request: Request) -> str:
    body = request.json() if request.body else {}
    name = body.get("name", "player") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise HTTPError(400, 'send JSON: {"name": YOUR_NAME}')
    return name.strip()[:20]


def seat(request: Request, given: dict[str, Any]) -> Response:
    """The lobby's seat as the page uses it: the board, and where to open its WebSocket."""
    path = f"/game/{given['room']}?ticket={given['ticket']}"
    scheme = "wss" if request.header("x-forwarded-proto") == "https" else "ws"
    host = request.header("host") or "127.0.0.1:8001"
    return Response.json({"board": given["room"], "path": path, "url": f"{scheme}://{host}{path}"})


app.static("/", Path(__file__).parent / "static")
