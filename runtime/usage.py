"""Usage accounting: what each WebSocket used, totals per route and room, and traffic
analytics per route and minute over the last day.

A WebSocket counts as one request (its upgrade). Bytes and messages are counted both ways;
server-to-client bytes are the bandwidth figure. When a connection closes, one JSON-lines
record describes it (to ``settings.usage_log``, if set) and its counts join the totals that
``GET /_rooms/usage`` reports, together with the connections still open, and the minute it
closed in (``GET /_rooms/analytics``).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import IO, Any

from .config import Settings
from .metrics import DURATIONS, Histogram

log = logging.getLogger("rooms.usage")

COUNTS = ("bytes_in", "bytes_out", "messages_in", "messages_out")
Open = tuple[str, str | None, int, int, int, int]
"""An open WebSocket as ``Usage.report`` counts it: its route and room, then ``COUNTS``."""
_MAX_ROOMS = 10_000  # rooms whose totals are kept (least recently closed go first)


def iso_utc(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 in UTC, to the millisecond ("...Z")."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Usage:
    """The usage log, totals and analytics of one server (the log file is closed by
    ``close``)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.analytics = Analytics(clock)
        self._routes: dict[str, dict[str, int]] = {}
        self._rooms: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._log: IO[str] | None = None
        if settings.usage_log:
            self._log = open(settings.usage_log, "a", buffering=1)  # noqa: SIM115 - server-long

    def opened(self, route: str) -> None:
        """A WebSocket was upgraded on ``route``: one request, in this minute."""
        self.analytics.minute(route).websockets += 1

    def closed(self, record: dict[str, Any]) -> None:
        """Account for one closed WebSocket (``record`` as built by the edge)."""
        self.analytics.closed(record)
        self._add(self._routes.setdefault(record["route"], _zero()), record)
        if record["room"] is not None:  # None: a proxied connection
            room = self._rooms.pop(record["room"], None) or _zero()
            self._add(room, record)
            self._rooms[record["room"]] = room
            if len(self._rooms) > _MAX_ROOMS:
                self._rooms.popitem(last=False)
        self._write(
            {
                **record,
                "start": iso_utc(record["start"]),
                "stop": iso_utc(record["stop"]),
                "duration_s": round(record["stop"] - record["start"], 3),
            }
        )

    def audit(self, line: dict[str, Any]) -> None:
        """An operator's action, as a line of its own in the usage log (``"audit"``)."""
        self._write({"audit": line, "time": iso_utc(time.time())})

    def _write(self, line: dict[str, Any]) -> None:
        if self._log is not None:
            try:
                self._log.write(json.dumps(line) + "\n")
            except OSError as exc:
                log.error("cannot write the usage log: %s", exc)

    def report(self, live: Iterable[Open], rooms: bool = True) -> dict[str, Any]:
        """Totals per route and (unless ``rooms`` is False) per room, closed connections
        and the ``live`` ones included. (Once a second per admin page, over every open
        connection: tuples and a loop, no record per connection.)"""
        per_route = {k: dict(v) for k, v in self._routes.items()}
        per_room = {k: dict(v) for k, v in self._rooms.items()} if rooms else {}
        for route, room, *used in live:
            _add_open(per_route.get(route) or per_route.setdefault(route, _zero()), used)
            if rooms and room is not None:
                _add_open(per_room.get(room) or per_room.setdefault(room, _zero()), used)
        total = _zero()
        for counts in per_route.values():
            for key, value in counts.items():
                total[key] += value
        return {"total": total, "routes": per_route, "rooms": per_room}

    @staticmethod
    def _add(into: dict[str, int], record: dict[str, Any]) -> None:
        into["websockets"] += 1
        into["closed"] += 1
        for key in COUNTS:
            into[key] += record[key]

    def close(self) -> None:
        """Close the usage log (the server is stopping); totals are still kept after it."""
        if self._log is not None:
            self._log.close()
            self._log = None


ANALYTICS_DAY = 24 * 60
"""Minutes of analytics kept."""
ANALYTICS_FIELDS = ("websockets", "closed", *COUNTS)


class Minute:
    """One route's traffic in one minute: the upgrades made in it, and the connections that
    closed in it with what they used, how long they lasted and how they ended."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "close_codes",
        "closed",
        "durations",
        "messages_in",
        "messages_out",
        "websockets",
    )

    def __init__(self) -> None:
        self.websockets = self.closed = 0
        self.bytes_in = self.bytes_out = self.messages_in = self.messages_out = 0
        self.durations = Histogram(DURATIONS)
        self.close_codes: Counter[int] = Counter()

    def add(self, other: Minute) -> None:
        for field in ANALYTICS_FIELDS:
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.durations.add(other.durations)
        self.close_codes.update(other.close_codes)

    def as_dict(self) -> dict[str, Any]:
        durations = {bound: int(count) for bound, count in self.durations.buckets()}
        codes = {str(code): n for code, n in sorted(self.close_codes.items())}
        counts = {field: getattr(self, field) for field in ANALYTICS_FIELDS}
        return {**counts, "duration_s_at_most": durations, "close_codes": codes}


class Analytics:
    """Traffic per route and minute over the last day (what Cloudflare's traffic analytics
    shows: requests, bandwidth both ways, connection durations from each WebSocket's own
    start and stop, close codes). A connection's usage counts in the minute it closed."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._minutes: deque[tuple[int, dict[str, Minute]]] = deque()

    def minute(self, route: str) -> Minute:
        """The totals of ``route`` in this minute (the latest kept, if the clock went back)."""
        number = int(self._clock() // 60)
        if not self._minutes or self._minutes[-1][0] < number:
            self._minutes.append((number, {}))
            while self._minutes[0][0] <= number - ANALYTICS_DAY:
                self._minutes.popleft()
        routes = self._minutes[-1][1]
        found = routes.get(route)
        if found is None:
            found = routes[route] = Minute()
        return found

    def closed(self, record: dict[str, Any]) -> None:
        minute = self.minute(record["route"])
        minute.closed += 1
        for key in COUNTS:
            setattr(minute, key, getattr(minute, key) + record[key])
        minute.durations.observe(record["stop"] - record["start"])
        minute.close_codes[record["close_code"]] += 1

    def rows(self, seconds: float) -> list[tuple[str, str, Minute]]:
        """(minute as ISO 8601, route, its totals) for the last ``seconds``, oldest first."""
        since = int((self._clock() - seconds) // 60)
        return [
            (iso_utc(number * 60), route, minute)
            for number, routes in self._minutes
            if number > since
            for route, minute in sorted(routes.items())
        ]

    def report(self, seconds: float, classes: dict[str, str]) -> dict[str, Any]:
        """Totals per route and per room class (``classes``: route -> class name) over the
        last ``seconds``, and each minute's."""
        rows = self.rows(seconds)
        per_route: dict[str, Minute] = {}
        per_class: dict[str, Minute] = {}
        for _, route, minute in rows:
            per_route.setdefault(route, Minute()).add(minute)
            per_class.setdefault(classes.get(route, ""), Minute()).add(minute)
        return {
            "window_s": seconds,
            "routes": {
                route: {"room_class": classes.get(route, ""), **m.as_dict()}
                for route, m in per_route.items()
            },
            "room_classes": {name: m.as_dict() for name, m in per_class.items() if name},
            "minutes": [{"minute": at, "route": route, **m.as_dict()} for at, route, m in rows],
        }

    def close_codes(self, seconds: float) -> dict[str, int]:
        """How the connections that closed in the last ``seconds`` ended: count per code."""
        codes: Counter[int] = Counter()
        for _, _, minute in self.rows(seconds):
            codes.update(minute.close_codes)
        return {str(code): n for code, n in codes.most_common()}

    def csv(self, seconds: float) -> str:
        """Each minute and route over the last ``seconds`` as CSV, one column per figure
        (durations as counts at most each bound; close codes as ``code=count;...``)."""
        bounds = [f"duration_le_{bound}" for bound, _ in Histogram(DURATIONS).buckets()]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["minute", "route", *ANALYTICS_FIELDS, *bounds, "close_codes"])
        for at, route, m in self.rows(seconds):
            data = m.as_dict()
            codes = ";".join(f"{code}={n}" for code, n in data["close_codes"].items())
            figures = [data[field] for field in ANALYTICS_FIELDS]
            writer.writerow([at, route, *figures, *data["duration_s_at_most"].values(), codes])
        return out.getvalue()


USAGE_TOTALS = ("websockets", "open", "closed", *COUNTS)
"""The figures of a totals entry of ``Usage.report``."""


def _zero() -> dict[str, int]:
    return dict.fromkeys(USAGE_TOTALS, 0)


def _add_open(into: dict[str, int], counts: list[int]) -> None:
    into["websockets"] += 1
    into["open"] += 1
    for key, value in zip(COUNTS, counts, strict=True):
        into[key] += value
