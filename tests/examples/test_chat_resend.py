"""The chat's message ids: a message sent again with its id (a client that could not know
whether it was stored, after a drop) is stored once, and the sender alone gets it back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from examples.chat import app as chat
from rooms.testing import ConnectionClosed, FakeClient, RoomsHarness
from runtime.storage import StorageError


@pytest.fixture(autouse=True)
def no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat.RateLimiter, "grace", 1e9)  # (every test client is one address)


async def joined(h: RoomsHarness, name: str, after: int = 0) -> FakeClient:
    client = await h.connect("/api/room/r/websocket")
    await client.send(json.dumps({"name": name, "after": after}))
    while "ready" not in json.loads(await client.receive()):
        pass
    return client


async def chat_frames(h: RoomsHarness, client: FakeClient) -> list[dict[str, Any]]:
    await h.settle()
    frames = [json.loads(text) for text in client.drain()]
    return [frame for frame in frames if "message" in frame]


async def test_a_message_resent_with_its_id_is_stored_once() -> None:
    async with RoomsHarness(chat.app) as h:
        ada, bob = await joined(h, "ada"), await joined(h, "bob")
        await ada.send(json.dumps({"message": "hi", "id": "ada-1"}))
        [first] = await chat_frames(h, bob)
        assert (first["message"], first["id"], first["seq"]) == ("hi", "ada-1", 1)
        await chat_frames(h, ada)
        await ada.send(json.dumps({"message": "hi", "id": "ada-1"}))  # again
        assert await chat_frames(h, ada) == [first]  # its acknowledgement, to it alone
        assert await chat_frames(h, bob) == []
        await ada.send(json.dumps({"message": "hi"}))  # no id: a message like any other
        assert [m["seq"] for m in await chat_frames(h, bob)] == [2]
        await ada.send(json.dumps({"message": "x", "id": "y" * 65}))
        await h.settle()
        assert "at most 64" in json.loads(ada.drain()[-1])["error"]


async def test_a_resend_after_a_commit_of_unknown_outcome_is_not_stored_twice() -> None:
    """The commit was made, but the room heard it failed (a connection lost at COMMIT): the
    room restarts from storage and closes its clients with 1011; the client resends on its
    next connection, and the line is in the history once."""
    async with RoomsHarness(chat.app) as h:
        ada = await joined(h, "ada")
        backend = h._server.backend
        real = backend.commit
        lied: list[bool] = []

        def commit_then_say_it_failed(*args: Any, **kwargs: Any) -> Any:
            writes, done = args[1], args[3]
            if any(key.startswith("msg:") for key in writes) and not lied:
                lied.append(True)
                args = (*args[:3], lambda error: done(StorageError("outcome unknown")), *args[4:])
            return real(*args, **kwargs)

        backend.commit = commit_then_say_it_failed  # type: ignore[method-assign]
        await ada.send(json.dumps({"message": "only once", "id": "ada-7"}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ada.receive()
        assert closed.value.code == 1011
        again = await joined(h, "ada")
        await again.send(json.dumps({"message": "only once", "id": "ada-7"}))  # resent
        [ack] = await chat_frames(h, again)
        assert (ack["message"], ack["seq"]) == ("only once", 1)
        history = json.loads((await h.request("GET", "/api/room/r/history")).body)
        assert [m["message"] for m in history["messages"]] == ["only once"]
