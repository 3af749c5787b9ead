"""An app for the cluster tests: rooms that say which node they ran on (``ROOMS_TEST_NODE``,
the node's port), call each other, set alarms, answer plain HTTP and hibernate."""

from __future__ import annotations

import os

from rooms import App, CallCycleError, Connection, Request, Response, Room

NODE = os.environ.get("ROOMS_TEST_NODE", "?")


class Counter(Room):
    """Counts the POSTs to it (and the calls of ``add``), durably."""

    async def on_request(self, request: Request) -> Response:
        if request.method == "POST":
            return Response.json(await self.add(1))
        return Response.json({"n": await self.storage.get("n", 0), "node": NODE})

    async def add(self, k: int) -> dict[str, object]:
        n = await self.storage.get("n", 0) + k
        self.storage.put("n", n)
        return {"n": n, "node": NODE}


class Ring(Room):
    """``hop(path)`` calls the next room of ``path`` with the rest: the nodes it went through."""

    async def hop(self, path: list[str]) -> list[str]:
        if not path:
            return [NODE]
        return [NODE, *await self.stub(Ring, path[0]).hop(path[1:])]


class Timer(Room):
    """POST ?in=SECONDS sets the alarm; GET says where it was set and where it fired."""

    async def on_request(self, request: Request) -> Response:
        if request.method == "POST":
            self.set_alarm(self.now() + float(request.query_param("in") or "1"))
            self.storage.put("set_on", NODE)
            return Response.json({"node": NODE})
        stored = await self.storage.get_many(["set_on", "fired_on", "fired"])
        return Response.json(stored)

    async def on_alarm(self, retry: int) -> None:
        self.storage.put_many({"fired_on": NODE, "fired": await self.storage.get("fired", 0) + 1})


class Lounge(Room):
    """Hibernates when idle for 0.3 s; keeps each member's name in ``conn.state`` and a tag,
    and answers ``ping`` without waking up."""

    hibernate_after = 0.3
    auto_reply = ("ping", "pong")

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.state = {"name": request.query_param("name")}
        conn.tags.add("member")

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        self.broadcast(f"{conn.state['name']}: {message!s} (on {NODE})", tag="member")


app = App()
app.room("/counter/{name}", Counter)
app.room("/lounge/{name}", Lounge)
app.room("/timer/{name}", Timer)
app.room("/ring/{name}", Ring)


@app.route("/add/{name}", methods=["POST"])
async def add(request: Request) -> Response:
    return Response.json(await request.stub(Counter, request.path_params["name"]).add(1))


@app.route("/hop/{name}")
async def hop(request: Request) -> Response:
    path = [p for p in (request.query_param("path") or "").split(",") if p]
    try:
        nodes = await request.stub(Ring, request.path_params["name"]).hop(path)
    except CallCycleError as exc:
        return Response.json({"cycle": str(exc)}, status=409)
    return Response.json({"nodes": nodes, "here": NODE})


@app.route("/node")
async def node(request: Request) -> Response:
    return Response.json({"node": NODE})
