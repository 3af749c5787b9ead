"""The echo app used by the conformance tests and benchmarks (keep these paths stable).

- ``ws://HOST:PORT/room/<name>``: every text or binary message goes to everyone in the room,
  the sender included.
- ``ws://HOST:PORT/echo/<x>``: every message comes back to its sender only.
"""

from rooms import App, Connection, Room


class BroadcastRoom(Room):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        self.broadcast(message)


class EchoRoom(Room):
    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        conn.send(message)


app = App()
app.room("/room/{name}", BroadcastRoom)
app.room("/echo/{name}", EchoRoom)
