"""The example chat: the wire protocol of Cloudflare's workers-chat-demo, on Rooms.

- ``GET /``: the chat page (``static/index.html``).
- ``POST /api/room``: a new private room id (64 hex characters).
- ``GET /api/room/<name>/websocket``: join the room ``<name>`` (a public name of at most
  32 characters, or a private room id).

Protocol: the client's first frame is ``{"name": NAME}``; it then receives ``{"joined": N}``
for every member already there, the last 100 messages, ``{"joined": NAME}`` (broadcast) and
``{"ready": true}``. ``{"message": TEXT}`` is stored, then broadcast as
``{"name", "message", "timestamp", "seq"}``. A leaving member is announced as ``{"quit": NAME}``.

Beyond the demo: every message is stored before anyone sees it (the output gate holds the
broadcast until the write is durable) and carries a per-room sequence number ``seq``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rooms import App, Connection, HTTPError, Request, Response, Room, RoomId, is_room_id

MAX_NAME = 32
MAX_MESSAGE = 256
HISTORY = 100
RATE_LIMITED = "Your IP is being rate-limited, please try again later."


class RateLimiter(Room):
    """One per client IP, shared by every chat room: one message per ``seconds_per_action``,
    with a burst allowance of ``grace`` seconds (the demo's policy)."""

    namespace = "limiter"
    seconds_per_action = 5.0
    grace = 20.0

    async def on_start(self) -> None:
        self.next_allowed = 0.0

    async def check(self) -> float:
        """Count one action; return how many seconds the caller must still wait (0: go)."""
        now = time.time()
        self.next_allowed = max(now, self.next_allowed) + self.seconds_per_action
        return max(0.0, self.next_allowed - now - self.grace)


class ChatRoom(Room):
    namespace = "chat"

    @classmethod
    def resolve(cls, name: str) -> RoomId:
        if is_room_id(name):
            return RoomId.from_string(name)
        if len(name) > MAX_NAME:
            raise HTTPError(404, "Name too long")
        return RoomId.from_name(name)

    async def on_request(self, request: Request) -> Response:
        return Response.text("expected websocket", 400)

    async def on_start(self) -> None:
        self.seq: int = await self.storage.get("seq", 0)
        self.last_timestamp: int = await self.storage.get("last_timestamp", 0)

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.state = {"name": None, "ip": request.client[0]}

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        data = _parse(message)
        if isinstance(data, str):
            conn.send(json.dumps({"error": data}))
        elif conn.state["name"] is None:
            await self._join(conn, data)
        else:
            await self._chat(conn, data)

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        name = conn.state["name"] if conn.state else None
        if name is not None:
            self.broadcast(json.dumps({"quit": name}), tag="ready")

    async def _join(self, conn: Connection, data: dict[str, Any]) -> None:
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            conn.send(json.dumps({"error": 'Send your name first: {"name": "..."}.'}))
            return
        if len(name) > MAX_NAME:
            conn.send(json.dumps({"error": "Name too long."}))
            conn.close(1009, "Name too long.")
            return
        for other in self.connections("ready"):
            conn.send(json.dumps({"joined": other.state["name"]}))
        history = await self.storage.list(prefix="msg:", reverse=True, limit=HISTORY)
        for stored in reversed(history.values()):
            conn.send(json.dumps(stored))
        conn.state = {**conn.state, "name": name}
        conn.tags.add("ready")
        self.broadcast(json.dumps({"joined": name}), tag="ready")
        conn.send(json.dumps({"ready": True}))

    async def _chat(self, conn: Connection, data: dict[str, Any]) -> None:
        text = data.get("message")
        if not isinstance(text, str):
            conn.send(json.dumps({"error": 'Expected {"message": "..."}.'}))
            return
        if len(text) > MAX_MESSAGE:
            conn.send(json.dumps({"error": "Message too long."}))
            return
        wait = await self.stub(RateLimiter, conn.state["ip"]).check()
        if wait > 0:
            conn.send(json.dumps({"error": RATE_LIMITED}))
            return
        self.seq += 1
        self.last_timestamp = max(int(time.time() * 1000), self.last_timestamp + 1)
        entry = {
            "name": conn.state["name"],
            "message": text,
            "timestamp": self.last_timestamp,
            "seq": self.seq,
        }
        self.storage.put(f"msg:{self.seq:012d}", entry)
        self.storage.put_many({"seq": self.seq, "last_timestamp": self.last_timestamp})
        # Held by the output gate until the write above is durable: nobody sees a message
        # that could still be lost.
        self.broadcast(json.dumps(entry), tag="ready")


def _parse(message: str | bytes) -> dict[str, Any] | str:
    """The frame as a JSON object, or the error to send back."""
    if isinstance(message, bytes):
        return "Binary frames are not part of this protocol; send JSON text."
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return "Malformed message: expected a JSON object."
    if not isinstance(data, dict):
        return "Malformed message: expected a JSON object."
    return data


app = App()
app.room("/api/room/{name}/websocket", ChatRoom)


@app.route("/api/room", methods=["POST", "OPTIONS"])
async def create_private_room(request: Request) -> Response:
    cors = {"access-control-allow-origin": "*"}
    if request.method == "OPTIONS":
        return Response(204, b"", {**cors, "access-control-allow-methods": "POST"})
    return Response.text(RoomId.unique().hex, headers=cors)


app.static("/", Path(__file__).parent / "static")
