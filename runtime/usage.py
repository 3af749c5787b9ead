"""Usage accounting: what each WebSocket used, and totals per route and room.

A WebSocket counts as one request (its upgrade). Bytes and messages are counted both ways;
server-to-client bytes are the bandwidth figure. When a connection closes, one JSON-lines
record describes it (to ``settings.usage_log``, if set) and its counts join the totals that
``GET /_rooms/usage`` reports, together with the connections still open.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections import OrderedDict
from typing import IO, Any

from .config import Settings

log = logging.getLogger("rooms.usage")

COUNTS = ("bytes_in", "bytes_out", "messages_in", "messages_out")
_MAX_ROOMS = 10_000  # rooms whose totals are kept (least recently closed go first)


def iso_utc(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 in UTC, to the millisecond ("...Z")."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Usage:
    """The usage log and totals of one server (the log file is closed by ``close``)."""

    def __init__(self, settings: Settings) -> None:
        self._routes: dict[str, dict[str, int]] = {}
        self._rooms: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._log: IO[str] | None = None
        if settings.usage_log:
            self._log = open(settings.usage_log, "a", buffering=1)  # noqa: SIM115 - server-long

    def closed(self, record: dict[str, Any]) -> None:
        """Account for one closed WebSocket (``record`` as built by the edge)."""
        self._add(self._routes.setdefault(record["route"], _zero()), record)
        if record["room"] is not None:  # None: a proxied connection
            room = self._rooms.pop(record["room"], None) or _zero()
            self._add(room, record)
            self._rooms[record["room"]] = room
            if len(self._rooms) > _MAX_ROOMS:
                self._rooms.popitem(last=False)
        if self._log is not None:
            line = {
                **record,
                "start": iso_utc(record["start"]),
                "stop": iso_utc(record["stop"]),
                "duration_s": round(record["stop"] - record["start"], 3),
            }
            try:
                self._log.write(json.dumps(line) + "\n")
            except OSError as exc:
                log.error("cannot write the usage log: %s", exc)

    def report(self, live: list[dict[str, Any]]) -> dict[str, Any]:
        """Totals per route and room, closed connections and ``live`` ones included."""
        routes = {k: dict(v) for k, v in self._routes.items()}
        rooms = {k: dict(v) for k, v in self._rooms.items()}
        for record in live:
            self._add(routes.setdefault(record["route"], _zero()), record, open_=True)
            if record["room"] is not None:
                self._add(rooms.setdefault(record["room"], _zero()), record, open_=True)
        total = _zero()
        for counts in routes.values():
            for key, value in counts.items():
                total[key] += value
        return {"total": total, "routes": routes, "rooms": rooms}

    @staticmethod
    def _add(into: dict[str, int], record: dict[str, Any], open_: bool = False) -> None:
        into["websockets"] += 1
        into["open" if open_ else "closed"] += 1
        for key in COUNTS:
            into[key] += record[key]

    def close(self) -> None:
        """Close the usage log (the server is stopping); totals are still kept after it."""
        if self._log is not None:
            self._log.close()
            self._log = None


def _zero() -> dict[str, int]:
    return dict.fromkeys(("websockets", "open", "closed", *COUNTS), 0)
