"""The notes example (examples/notes) in process: a new note's seed, the size limit, the
document as JSON over plain HTTP, and the "saved" frame a page asks for."""

from __future__ import annotations

import json

import pytest

from examples.notes import app as notes
from rooms.testing import ConnectionClosed, RoomsHarness
from tests.rooms.test_yjs import Editor


async def test_a_new_note_starts_with_its_welcome_and_reads_as_json() -> None:
    async with RoomsHarness(notes.app) as h:
        page = await Editor.open(h, "/yjs/n?acks=1")
        assert str(page.text) == notes.WELCOME
        other = await Editor.open(h, "/yjs/n")  # did not ask
        await page.insert(len(notes.WELCOME), "mine")
        await other.pump()
        assert page.saved >= 1 and other.saved == 0  # (its sync step 2 counts too)
        answer = await h.request("GET", "/yjs/n")
        assert json.loads(answer.body) == {"content": notes.WELCOME + "mine"}


async def test_an_edit_past_the_limit_closes_its_editor_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(notes, "MAX_BYTES", 200)
    async with RoomsHarness(notes.app) as h:
        page = await Editor.open(h)
        await page.insert(0, "x" * 300)
        with pytest.raises(ConnectionClosed) as closed:
            await page.client.receive()
        assert closed.value.code == 1008 and "at most 200 bytes" in closed.value.reason
        assert "x" not in str((await Editor.open(h)).text)  # nobody got the edit
