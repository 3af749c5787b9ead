"""The README's complete room: a durable counter per room name.

rooms serve examples.counter.app:app --port 8003   (8000 is make chat's)
rooms connect ws://127.0.0.1:8003/counter/lobby -x hi -x hi -w 1
"""

from rooms import App, Connection, Request, Room


class Counter(Room):
    async def on_start(self) -> None:
        # Runs after every activation, before the event that caused it.
        self.count = await self.storage.get("count", 0)

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.send(str(self.count))

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        self.count += 1
        self.storage.put("count", self.count)  # committed when this handler returns
        self.broadcast(str(self.count))  # held until that commit is durable


app = App()
app.room("/counter/{name}", Counter)  # ws://127.0.0.1:8003/counter/<name>
