"""The example chat: the wire protocol of Cloudflare's workers-chat-demo, on Rooms.

- ``GET /``: the chat page (``static/index.html``, using the runtime's ``/_rooms/client.js``).
- ``POST /api/room``: a new private room id (64 hex characters).
- ``GET /api/room/<name>/websocket``: join the room ``<name>`` (a public name of at most
  32 characters, or a private room id).
- ``GET /api/room/<name>/history?before=SEQ&limit=N``: stored messages as JSON pages.

Protocol: the client's first frame is ``{"name": NAME}``; it then receives ``{"joined": N}``
for every member already there, the last 100 messages, ``{"joined": NAME}`` (broadcast) and
``{"ready": true, "seq": LATEST}``. ``{"message": TEXT}`` is stored, then broadcast as
``{"name", "message", "timestamp", "seq"}``. A leaving member is announced as ``{"quit": NAME}``.

Beyond the demo: every message is stored before anyone sees it (the output gate holds the
broadcast until the write is durable) and carries a per-room sequence number ``seq``. A client
that reconnects sends ``{"name": NAME, "after": SEQ}`` (the last seq it saw) and receives
exactly the messages after it instead of the last 100. The text message ``ping`` is answered
``pong`` by the server (the page's heartbeat).

A message may carry an id of the client's choosing, ``{"message": TEXT, "id": ID}`` (at most
64 characters), then kept with it: the same id sent again (a client resending what it is not
sure was stored, after a drop) is not stored twice; the sender alone gets the stored message
back, as its acknowledgement. Ids are remembered for the room's last ``DEDUP_WINDOW`` (1000)
messages. The page sends one with each line and resends the lines it saw no echo of.

Presence, for clients that ask with ``"presence": true`` in their first frame (others see the
demo's protocol unchanged): the roster is one entry per name, however many tabs carry it
(``{"joined": NAME}`` once, ``{"quit": NAME}`` when its last tab has been gone for
``CHAT_PRESENCE_GRACE_SECONDS``, 5: a reload neither leaves nor joins), and
``{"typing": true}`` / ``false`` from one is relayed to the others as ``{"typing": {"name":
NAME, "typing": BOOL}}``, never stored (a message sent clears it).

Configuration (environment variables, read at start):

- ``CHAT_SECONDS_PER_MESSAGE`` (5) and ``CHAT_BURST_SECONDS`` (20): the rate limit per client
  IP, as in the demo: one message per interval, with a burst allowance.
- ``CHAT_RETENTION_MESSAGES`` (10000) and ``CHAT_RETENTION_DAYS`` (0): messages kept per room,
  by count and by age; 0 keeps everything.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rooms import (
    App,
    Connection,
    HTTPError,
    Presence,
    Request,
    Response,
    Room,
    RoomId,
    is_room_id,
)

MAX_NAME = 32
MAX_MESSAGE = 256
HISTORY = 100  # messages sent to a client that joins without "after"
MAX_REPLAY = 1000  # messages sent to a resuming client; more missed: a "missed" frame first
MAX_PAGE = 1000  # messages in one history page
DEDUP_WINDOW = 1000  # messages whose ids a room remembers (a resend is not stored twice)
MAX_ID = 64
RATE_LIMITED = "Your IP is being rate-limited, please try again later."


def _setting(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {raw!r}")
    return value


class RateLimiter(Room):
    """One per client IP, shared by every chat room: one message per ``seconds_per_action``,
    with a burst allowance of ``grace`` seconds (the demo's policy)."""

    namespace = "limiter"
    seconds_per_action = _setting("CHAT_SECONDS_PER_MESSAGE", 5.0)
    grace = _setting("CHAT_BURST_SECONDS", 20.0)

    async def on_start(self) -> None:
        self.next_allowed = 0.0

    async def check(self) -> float:
        """Count one action; return how many seconds the caller must still wait (0: go)."""
        now = time.time()
        self.next_allowed = max(now, self.next_allowed) + self.seconds_per_action
        return max(0.0, self.next_allowed - now - self.grace)


class ChatRoom(Room):
    namespace = "chat"
    auto_reply = ("ping", "pong")  # the page's heartbeat, answered without waking the room
    # Every client starts with its join ({"name": ...}): one that says nothing is not one.
    first_message_timeout = _setting("CHAT_FIRST_MESSAGE_SECONDS", 30.0)
    retention_messages = int(_setting("CHAT_RETENTION_MESSAGES", 10_000))
    retention_seconds = _setting("CHAT_RETENTION_DAYS", 0) * 86400
    presence_grace = _setting("CHAT_PRESENCE_GRACE_SECONDS", 5.0)

    @classmethod
    def resolve(cls, name: str) -> RoomId:
        if is_room_id(name):
            return RoomId.from_string(name)
        if len(name) > MAX_NAME:
            raise HTTPError(404, "Name too long")
        return RoomId.from_name(name)

    async def on_request(self, request: Request) -> Response:
        if not request.path.endswith("/history"):
            return Response.text("expected websocket", 400)
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "history is read with GET", {"allow": "GET, HEAD"})
        before = min(_int_param(request, "before", self.seq + 1), self.seq + 1)
        limit = min(_int_param(request, "limit", HISTORY), MAX_PAGE)
        page = await self.storage.list(
            prefix="msg:", end=_key(before), reverse=True, limit=limit + 1
        )
        messages = list(page.values())[:limit]
        messages.reverse()
        body = {"messages": messages, "more": len(page) > limit}
        return Response.json(body, headers={"access-control-allow-origin": "*"})

    async def on_start(self) -> None:
        self.seq: int = await self.storage.get("seq", 0)
        self.last_timestamp: int = await self.storage.get("last_timestamp", 0)
        self.presence = Presence(self, self._member_left, self.presence_grace)
        recent = await self.storage.list(prefix="msg:", reverse=True, limit=DEDUP_WINDOW)
        self.ids = {m["id"]: m for m in reversed(recent.values()) if "id" in m}  # oldest first
        await self._trim(everything=True)

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.state = {"name": None, "ip": request.client[0]}

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        data = _parse(message)
        if isinstance(data, str):
            conn.send(json.dumps({"error": data}))
        elif conn.state["name"] is None:
            await self._join(conn, data)
        elif "typing" in data and "message" not in data:
            self._typing(conn, data["typing"] is True)
        else:
            await self._chat(conn, data)

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        name = conn.state["name"] if conn.state else None
        if name is not None:
            self.broadcast(json.dumps({"quit": name}), tag="classic")  # (the demo's, at once)
            self.presence.leave(conn)

    async def _member_left(self, name: str) -> None:
        """A name's last tab has been gone for the grace period."""
        self.broadcast(json.dumps({"quit": name}), tag="presence")

    def _typing(self, conn: Connection, typing: bool) -> None:
        name = conn.state["name"]
        if self.presence.update(conn, typing=typing):
            frame = json.dumps({"typing": {"name": name, "typing": typing}})
            self.broadcast(frame, exclude=[conn], tag="presence")

    async def _join(self, conn: Connection, data: dict[str, Any]) -> None:
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            conn.send(json.dumps({"error": 'Send your name first: {"name": "..."}.'}))
            return
        if len(name) > MAX_NAME:
            conn.send(json.dumps({"error": "Name too long."}))
            conn.close(1009, "Name too long.")
            return
        after = data.get("after")
        if after is not None and (type(after) is not int or after < 0):
            conn.send(json.dumps({"error": '"after" must be the last seq you saw (0 or more).'}))
            return
        aware = data.get("presence") is True
        if aware:  # one roster line per name, and who is typing
            for member, state in self.presence.members().items():
                conn.send(json.dumps({"joined": member}))
                if state.get("typing"):
                    conn.send(json.dumps({"typing": {"name": member, "typing": True}}))
        else:  # the demo's: one line per connection
            for other in self.connections("ready"):
                conn.send(json.dumps({"joined": other.state["name"]}))
        await self._send_history(conn, after)
        conn.state = {**conn.state, "name": name}
        conn.tags.update(("ready", "presence" if aware else "classic"))
        self.broadcast(json.dumps({"joined": name}), tag="classic")
        if self.presence.join(conn, name):  # (a name already here is in the roster sent)
            self.broadcast(json.dumps({"joined": name}), tag="presence")
        # "seq" lets a client notice that the room's history is not the one it remembers.
        conn.send(json.dumps({"ready": True, "seq": self.seq}))

    async def _send_history(self, conn: Connection, after: int | None) -> None:
        """The last HISTORY messages; or, for a resuming client, every message after
        ``after`` (announcing first, if more than MAX_REPLAY were missed, what it must fetch
        from the history endpoint to have no gap)."""
        if after is None:
            history = await self.storage.list(prefix="msg:", reverse=True, limit=HISTORY)
        else:
            history = await self.storage.list(
                prefix="msg:", start=_key(after + 1), reverse=True, limit=MAX_REPLAY
            )
            oldest = min((m["seq"] for m in history.values()), default=self.seq + 1)
            if len(history) == MAX_REPLAY and oldest > after + 1:
                conn.send(json.dumps({"missed": {"after": after, "before": oldest}}))
        for stored in reversed(history.values()):
            conn.send(json.dumps(stored))

    async def _chat(self, conn: Connection, data: dict[str, Any]) -> None:
        text = data.get("message")
        if not isinstance(text, str):
            conn.send(json.dumps({"error": 'Expected {"message": "..."}.'}))
            return
        if len(text) > MAX_MESSAGE:
            conn.send(json.dumps({"error": "Message too long."}))
            return
        message_id = data.get("id")
        if message_id is not None and (not isinstance(message_id, str) or len(message_id) > MAX_ID):
            conn.send(json.dumps({"error": f'"id" must be text of at most {MAX_ID} characters.'}))
            return
        if message_id in self.ids:  # sent again: stored already, once
            conn.send(json.dumps(self.ids[message_id]))
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
        if message_id is not None:
            entry["id"] = message_id
            self.ids[message_id] = entry
            if len(self.ids) > DEDUP_WINDOW:
                del self.ids[next(iter(self.ids))]
        self.storage.put(_key(self.seq), entry)
        self.storage.put_many({"seq": self.seq, "last_timestamp": self.last_timestamp})
        await self._trim()
        # Held by the output gate until the write above is durable: nobody sees a message
        # that could still be lost.
        self.broadcast(json.dumps(entry), tag="ready")
        if "presence" in conn.tags:
            self._typing(conn, False)  # a line sent: no longer typing

    async def _trim(self, everything: bool = False) -> None:
        """Apply the retention settings: drop what is past the count or the age. After each
        message one key or a few suffice; at start, a whole backlog (the settings may have
        been lowered since the last run)."""
        batch = 1000 if everything else 8
        if self.retention_messages and self.seq > self.retention_messages:
            cutoff = _key(self.seq - self.retention_messages + 1)
            for key in await self.storage.list(prefix="msg:", end=cutoff, limit=batch):
                self.storage.delete(key)
        if self.retention_seconds:
            oldest_allowed = (time.time() - self.retention_seconds) * 1000
            for key, stored in (await self.storage.list(prefix="msg:", limit=batch)).items():
                if stored["timestamp"] >= oldest_allowed:
                    break
                self.storage.delete(key)


def _key(seq: int) -> str:
    return f"msg:{seq:012d}"


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_param(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise HTTPError(400, f"{name} must be a positive whole number, got {raw!r}")
    return int(raw)


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
    if "\\u" in message and not _is_unicode(data):
        return "Malformed message: text must be valid Unicode (no lone surrogate escapes)."
    return data


def _is_unicode(data: dict[str, Any]) -> bool:
    """Whether every string in ``data`` can be encoded (JSON's "\\ud800" escape makes a lone
    surrogate, which no storage or client can take)."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


app = App()
app.room("/api/room/{name}/websocket", ChatRoom)
app.room("/api/room/{name}/history", ChatRoom)


@app.route("/api/room", methods=["POST", "OPTIONS"])
async def create_private_room(request: Request) -> Response:
    cors = {"access-control-allow-origin": "*"}
    if request.method == "OPTIONS":
        return Response(204, b"", {**cors, "access-control-allow-methods": "POST"})
    return Response.text(RoomId.unique().hex, headers=cors)


app.static("/", Path(__file__).parent / "static")
