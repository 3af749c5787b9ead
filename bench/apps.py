"""The chat's data path for the benchmark, without the JSON: every message a client sends is
stored under the room's next sequence number, then broadcast to everyone in the room; the
output gate holds the broadcast until the write is durable (group commit across rooms).

Same routes as ``examples.echo``: ``/room/<name>`` (stored, then broadcast) and
``/echo/<x>`` (stored, then echoed).
"""

from __future__ import annotations

from rooms import App, Connection, Room


class StoredRoom(Room):
    async def on_start(self) -> None:
        self.seq: int = await self.storage.get("seq", 0)

    def store(self, message: str | bytes) -> None:
        self.seq += 1
        self.storage.put_many({f"msg:{self.seq:012d}": message, "seq": self.seq})


class StoredBroadcast(StoredRoom):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        self.store(message)
        self.broadcast(message)


class StoredEcho(StoredRoom):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        self.store(message)
        conn.send(message)


app = App()
app.room("/room/{name}", StoredBroadcast)
app.room("/echo/{name}", StoredEcho)
