"""The document room of tests/system/test_yjs.py: a rooms.yjs.DocRoom at /yjs/{name}."""

from __future__ import annotations

from pycrdt import Text

from rooms import App
from rooms.yjs import DocRoom


class Notes(DocRoom):
    shape = {"content": Text}
    compact_updates = 50


app = App()
app.room("/yjs/{name}", Notes)
