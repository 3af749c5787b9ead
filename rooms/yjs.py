"""Collaborative documents: Yjs rooms that the standard ``y-websocket`` client talks to.

    pip install 'trio-rooms[yjs]'      # pycrdt, the Python bindings of Yrs

    class Notes(DocRoom):
        shape = {"content": Text}      # the document's root types, for GET and hooks

    app.room("/yjs/{name}", Notes)     # new WebsocketProvider("ws://host/yjs", name, doc)

The room speaks the y-websocket protocol (binary frames: sync step 1 and 2, updates,
awareness). Every update is stored before it is relayed to anyone: the room's output gate
holds the relay until the write is durable, so an edit another client has seen survives
``kill -9`` (y-partyserver debounces saves by seconds; pycrdt-websocket writes after it
relays). The update log is merged into one snapshot once it passes ``compact_updates``
updates or ``compact_bytes`` bytes, in the same event, so a wake-up reads a bounded amount;
the document is loaded from storage on start, so a hibernated room, a restarted server or
another node (cluster mode) serves the same document. Awareness (cursors, names) is relayed
by the server to every connection, the sender's included (its echo keeps the client's 30 s
silence timer fed), without waking the room (``Room.relay_prefix``): clients renew it every 15 s,
and a document nobody edits still hibernates. It is never stored; each connection's last one
is kept with the connection (``conn.relayed``), sent to newcomers, and removed for the others
when the connection closes. A client that
connects with ``?acks=1`` also gets a one-byte frame, ``SAVED`` (4), once each of its updates
is stored: a page can show "saved" (y-websocket's provider takes a handler for it in
``provider.messageHandlers[4]``; other clients never get it).

Hooks: ``may_edit`` (read-only members: their updates are dropped), ``check_update`` (refuse
one: raise ``ValueError`` and the connection is closed 1008 with the reason), ``on_change``
(after an update is applied: keep a derived value), ``seed`` (a new document's first
content), ``as_json`` (what ``GET`` on the room answers).
"""

from __future__ import annotations

from typing import Any, ClassVar

try:
    from pycrdt import (
        Array,
        Decoder,
        Doc,
        Map,
        Text,
        YMessageType,
        YSyncMessageType,
        create_awareness_message,
        create_sync_message,
        create_update_message,
        handle_sync_message,
        merge_updates,
        read_message,
        write_var_uint,
    )
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("rooms.yjs needs pycrdt: pip install 'trio-rooms[yjs]'") from exc

from ._http import Request, Response
from ._room import Connection, Room

SNAPSHOT = "yjs:snapshot"
LOG = "yjs:u:"  # + a 12-digit sequence number: the updates since the snapshot
_AWARENESS_QUERY = 3
SAVED = bytes([4])
"""Sent to a client that asked (``?acks=1``) once its updates so far are stored."""

Root = type[Text] | type[Map[Any]] | type[Array[Any]]


class DocRoom(Room):
    """A Yjs document (see the module's docstring). Class settings: ``shape`` (root name ->
    ``Text``, ``Map`` or ``Array``), ``compact_updates`` (200) and ``compact_bytes``
    (256 KiB) and ``max_update_bytes`` (1 MiB: a larger update closes its sender with 1009)."""

    shape: ClassVar[dict[str, Root]] = {}
    compact_updates: ClassVar[int] = 200
    compact_bytes: ClassVar[int] = 256 * 1024
    max_update_bytes: ClassVar[int] = 1024 * 1024
    relay_prefix = bytes([YMessageType.AWARENESS])  # (relayed by the server: see the module)

    # -- hooks -------------------------------------------------------------------------

    async def may_edit(self, conn: Connection) -> bool:
        """Whether ``conn``'s updates are applied (False: read-only, they are dropped)."""
        return True

    async def check_update(self, conn: Connection, update: bytes) -> None:
        """Raise ValueError to refuse ``update`` from ``conn`` (it is closed with 1008)."""

    async def on_change(self, update: bytes) -> None:
        """``update`` was applied to ``self.doc`` (and is being stored)."""

    async def seed(self, doc: Doc[Any]) -> None:
        """Fill a new document (nothing stored yet) before its first client sees it."""

    def as_json(self) -> Any:
        """What ``GET`` on the room answers: each root of ``shape`` as plain data."""
        return {name: self.doc.get(name, type=kind).to_py() for name, kind in self.shape.items()}

    # -- the room ------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.doc: Doc[Any] = Doc()
        snapshot: bytes | None = await self.storage.get(SNAPSHOT)
        log: dict[str, bytes] = await self.storage.list(prefix=LOG)
        stored = [u for u in (snapshot, *log.values()) if u]
        if stored:
            self.doc.apply_update(merge_updates(*stored))
        self._log = list(log)
        self._log_bytes = sum(len(update) for update in log.values())
        self._seq = int(self._log[-1][len(LOG) :]) if self._log else 0
        for name, kind in self.shape.items():
            self.doc.get(name, type=kind)
        if not stored:
            await self.seed(self.doc)
            if self.doc.get_state() != Doc().get_state():
                self.storage.put(SNAPSHOT, self.doc.get_update())

    async def on_connect(self, conn: Connection, request: Request) -> None:
        conn.send(create_sync_message(self.doc))
        self._send_awareness(conn)

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if isinstance(message, str) or not message:
            conn.close(1003, "a Yjs document speaks binary y-websocket frames")
        elif message[0] == YMessageType.SYNC:
            await self._sync(conn, message)
        elif message[0] == _AWARENESS_QUERY:
            self._send_awareness(conn)

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        try:
            entries = _parse_awareness(read_message(conn.relayed[1:])) if conn.relayed else []
        except Exception:  # (a frame it relayed that does not decode: nothing to remove)
            entries = []
        gone = [
            (client, (clock + 1, "null")) for client, clock, state in entries if state != "null"
        ]
        if gone:  # (as y-protocols' removal: a later clock, a null state)
            self.broadcast(create_awareness_message(_awareness(gone)), exclude=[conn])

    def _send_awareness(self, conn: Connection) -> None:
        """Everyone's awareness (the last each connection relayed) to ``conn``."""
        for other in self.connections():
            if other is not conn and other.relayed is not None:
                conn.send(other.relayed)

    async def on_request(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response.text("a document is read with GET", 405, {"allow": "GET, HEAD"})
        return Response.json(self.as_json())

    # -- sync and updates ----------------------------------------------------------------

    async def _sync(self, conn: Connection, message: bytes) -> None:
        if len(message) < 2 or message[1] not in (t.value for t in YSyncMessageType):
            conn.close(1002, "a sync message of an unknown kind")
            return
        if message[1] == YSyncMessageType.SYNC_STEP1:
            reply = handle_sync_message(message[1:], self.doc)
            if reply is not None:
                conn.send(reply)
            return
        try:
            update = read_message(message[2:])
        except Exception:  # (a truncated frame)
            conn.close(1002, "a sync message that does not decode")
            return
        if len(update) > self.max_update_bytes:
            conn.close(1009, f"an update over {self.max_update_bytes} bytes")
            return
        if not await self.may_edit(conn):
            return  # read-only: the client keeps its edit, nobody else sees it
        try:
            await self.check_update(conn, update)
        except ValueError as exc:
            conn.close(1008, str(exc)[:120])
            return
        await self._apply(conn, update)

    async def _apply(self, conn: Connection, update: bytes) -> None:
        before = self.doc.get_state()
        try:
            self.doc.apply_update(update)
        except Exception:
            conn.close(1007, "an update that is not a Yjs update")
            return
        if self.doc.get_state() != before:
            change = self.doc.get_update(before)
            self._store(change)
            await self.on_change(change)
            # Held by the output gate until the write is durable: nobody sees an edit that
            # could still be lost.
            self.broadcast(create_update_message(change), exclude=[conn])
        if conn.request.query_param("acks") == "1":
            conn.send(SAVED)  # (behind the same gate: once what it sent is stored)

    def _store(self, change: bytes) -> None:
        self._seq += 1
        key = f"{LOG}{self._seq:012d}"
        self.storage.put(key, change)
        self._log.append(key)
        self._log_bytes += len(change)
        if len(self._log) >= self.compact_updates or self._log_bytes >= self.compact_bytes:
            self.storage.put(SNAPSHOT, self.doc.get_update())  # (with the deletes: atomic)
            for old in self._log:
                self.storage.delete(old)
            self._log, self._log_bytes = [], 0


def _parse_awareness(update: bytes) -> list[tuple[int, int, str]]:
    """An awareness update: (client id, clock, state JSON) for each client in it."""
    decoder = Decoder(update)
    count = decoder.read_var_uint()
    entries = []
    for _ in range(count):
        client, clock = decoder.read_var_uint(), decoder.read_var_uint()
        entries.append((client, clock, decoder.read_var_string()))
    return entries


def _awareness(entries: Any) -> bytes:
    """An awareness update of ``(client, (clock, state JSON))`` pairs."""
    pairs = list(entries)
    out = bytearray(write_var_uint(len(pairs)))
    for client, (clock, state) in pairs:
        data = state.encode()
        out += write_var_uint(client) + write_var_uint(clock) + write_var_uint(len(data)) + data
    return bytes(out)


__all__ = ["DocRoom"]
