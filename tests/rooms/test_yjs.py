"""rooms.yjs.DocRoom in process, with pycrdt as the client (the y-websocket protocol); the
real y-websocket client over real sockets is in tests/system/test_yjs.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio.testing
from pycrdt import (
    Doc,
    Text,
    YMessageType,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    handle_sync_message,
)

from rooms import App, Connection
from rooms.testing import ConnectionClosed, FakeClient, RoomsHarness
from rooms.yjs import LOG, SAVED, SNAPSHOT, DocRoom, _awareness


class Notes(DocRoom):
    shape = {"content": Text}
    compact_updates = 10

    async def may_edit(self, conn: Connection) -> bool:
        return conn.request.query_param("read-only") is None

    async def check_update(self, conn: Connection, update: bytes) -> None:
        if len(update) > 2000:
            raise ValueError("edits are limited to 2000 bytes at a time")


def app() -> App:
    application = App()
    application.room("/yjs/{name}", Notes)
    return application


class Editor:
    """A Yjs client of one room: a pycrdt document kept in sync over the fake socket."""

    def __init__(self, h: RoomsHarness, client: FakeClient) -> None:
        self.h, self.client = h, client
        self.doc: Doc[Any] = Doc()
        self.text = self.doc.get("content", type=Text)
        self.awareness: list[bytes] = []
        self.saved = 0  # SAVED frames (for a client that asked: ?acks=1)

    @classmethod
    async def open(cls, h: RoomsHarness, path: str = "/yjs/n") -> Editor:
        editor = cls(h, await h.connect(path))
        await editor.client.send(create_sync_message(editor.doc))
        await editor.pump()
        return editor

    async def pump(self) -> None:
        """Handle everything the room sent (answering its sync step 1)."""
        await self.h.settle()
        for message in self.client.drain():
            assert isinstance(message, bytes)
            if message == SAVED:
                self.saved += 1
            elif message[0] == YMessageType.SYNC:
                reply = handle_sync_message(message[1:], self.doc)
                if reply is not None:
                    await self.client.send(reply)
            else:
                self.awareness.append(message)
        await self.h.settle()

    async def insert(self, at: int, text: str) -> None:
        before = self.doc.get_state()
        self.text.insert(at, text)
        await self.client.send(create_update_message(self.doc.get_update(before)))
        await self.pump()


async def test_two_editors_converge_and_a_third_gets_the_whole_document(tmp_path: Path) -> None:
    async with RoomsHarness(app(), data_dir=tmp_path) as h:
        ada, bob = await Editor.open(h), await Editor.open(h)
        await ada.insert(0, "hello ")
        await bob.insert(0, "world ")
        await ada.pump()
        await bob.pump()
        assert str(ada.text) == str(bob.text) and len(str(ada.text)) == 12
        response = await h.request("GET", "/yjs/n")
        assert json.loads(response.body) == {"content": str(ada.text)}
    async with RoomsHarness(app(), data_dir=tmp_path) as h:  # a restart: from storage
        late = await Editor.open(h)
        assert str(late.text) == str(ada.text)


async def test_the_update_log_is_compacted_into_a_snapshot(tmp_path: Path) -> None:
    async with RoomsHarness(app(), data_dir=tmp_path) as h:
        ada = await Editor.open(h)
        for i in range(25):
            await ada.insert(0, f"{i} ")
    async with RoomsHarness(app(), data_dir=tmp_path) as h:
        reader = await Editor.open(h)
        assert str(reader.text) == str(ada.text)
        keys = await storage_keys(h)
        assert SNAPSHOT in keys and len([k for k in keys if k.startswith(LOG)]) < 10


async def storage_keys(h: RoomsHarness) -> list[str]:
    backend = h._server.backend
    rows = await backend.list(f"Notes/{Notes.resolve('n').hex}", None, None, None, False, None)
    return [key for key, _ in rows]


async def test_read_only_edits_and_refused_ones_reach_nobody() -> None:
    async with RoomsHarness(app()) as h:
        ada = await Editor.open(h)
        viewer = await Editor.open(h, "/yjs/n?read-only=1")
        await viewer.insert(0, "not kept")
        await ada.pump()
        assert str(ada.text) == ""
        await ada.insert(0, "x" * 3000)
        with pytest.raises(ConnectionClosed) as closed:
            await ada.client.receive()
        assert closed.value.code == 1008 and "2000 bytes" in closed.value.reason
        await viewer.pump()
        assert "x" not in str(viewer.text)


async def test_awareness_is_relayed_to_all_and_removed_when_its_client_goes() -> None:
    async with RoomsHarness(app()) as h:
        ada, bob = await Editor.open(h), await Editor.open(h)
        cursor = create_awareness_message(_awareness([(7, (1, '{"user": {"name": "ada"}}'))]))
        await ada.client.send(cursor)
        await ada.pump()
        await bob.pump()
        assert ada.awareness == [cursor] and bob.awareness == [cursor]  # the sender too
        late = await Editor.open(h)
        assert late.awareness and b"ada" in late.awareness[0]
        await ada.client.disconnect()
        await bob.pump()
        assert bob.awareness[-1] == create_awareness_message(_awareness([(7, (2, "null"))]))


async def test_a_text_frame_or_garbage_closes_its_sender_only() -> None:
    async with RoomsHarness(app()) as h:
        ada, bob = await Editor.open(h), await Editor.open(h)
        await ada.client.send("hello")
        with pytest.raises(ConnectionClosed) as closed:
            await ada.client.receive()
        assert closed.value.code == 1003
        mallory = await Editor.open(h)
        await mallory.client.send(b"\x00\x02\x05ab")  # an update that is not one
        with pytest.raises(ConnectionClosed) as closed:
            await mallory.client.receive()
        assert closed.value.code in (1002, 1007)
        await bob.insert(0, "still here")
        assert str(bob.text) == "still here"


async def test_a_document_with_only_awareness_traffic_hibernates_and_wakes_whole(
    clock: trio.testing.MockClock,
) -> None:
    async with RoomsHarness(app()) as h:
        ada, bob = await Editor.open(h), await Editor.open(h)
        await ada.insert(0, "kept")
        for clock_tick in range(1, 13):  # y-websocket renews its awareness every 15 s; faster
            renewal = _awareness([(7, (clock_tick, '{"user": {"name": "ada"}}'))])
            await ada.client.send(create_awareness_message(renewal))
            clock.jump(5)
            await h.settle()
        assert not h.is_active(Notes, "n")  # hibernated all along the renewals
        await bob.pump()
        assert bob.awareness[-1] == create_awareness_message(renewal)  # relayed meanwhile
        await bob.insert(len(bob.text), "!")  # an edit wakes it, from storage
        await ada.pump()
        assert str(ada.text) == "kept!"
