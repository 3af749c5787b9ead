"""Notes: a collaborative editor on a Yjs document room (``make notes`` serves it on 8002).

- ``GET /``: the page (``static/index.html``): CodeMirror bound to the document's Y.Text
  ``content`` (``static/editor.js``, built from ``web/``), the others' names and cursors, a
  shareable link (the document's name is the URL's ``#hash``), and whether your edits are
  saved.
- ``/yjs/<name>``: the document's WebSocket, for any y-websocket client
  (``new WebsocketProvider("ws://HOST/yjs", name, doc)``); ``GET /yjs/<name>`` (plain HTTP):
  the document as JSON, ``{"content": TEXT}``.

Every edit is stored before anyone else sees it, so an edit another page has shown survives
``kill -9``. A new document starts with a line of help. ``NOTES_MAX_BYTES`` (100000) bounds
a document's text: an edit past it closes its editor with 1008 and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pycrdt import Doc, Text

from rooms import App, Connection
from rooms.yjs import DocRoom

MAX_BYTES = int(os.environ.get("NOTES_MAX_BYTES", "100000"))
WELCOME = "Welcome to a new note. Share this page's link to write together.\n"


class Note(DocRoom):
    shape = {"content": Text}

    async def seed(self, doc: Doc[Any]) -> None:
        doc.get("content", type=Text).insert(0, WELCOME)

    async def check_update(self, conn: Connection, update: bytes) -> None:
        # On a copy: an update applied to a CRDT cannot be taken back.
        trial: Doc[Any] = Doc()
        trial.apply_update(self.doc.get_update())
        trial.apply_update(update)
        if len(str(trial.get("content", type=Text)).encode()) > MAX_BYTES:
            raise ValueError(f"a note holds at most {MAX_BYTES} bytes of text")


app = App()
app.room("/yjs/{name}", Note)
app.static("/", Path(__file__).parent / "static")
