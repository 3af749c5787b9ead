"""Usage accounting (``runtime.usage``): ``iso_utc``, the totals per route and per room that
``Usage.closed`` keeps and ``Usage.report`` gives (open connections included), the
JSON-lines usage log (one line per closed WebSocket, until ``close``), and the analytics per
route and minute (``/_rooms/analytics``)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from examples.echo.app import app as echo_app
from runtime.config import Settings
from runtime.usage import COUNTS, Open, Usage, iso_utc
from tests.support import raw_request, start_server

START = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


def record(
    route: str = "/room/{name}",
    room: str | None = "Chat:0123456789ab ('a')",
    *,
    start: float = START,
    stop: float = START + 12.25,
    bytes_in: int = 10,
    bytes_out: int = 200,
    messages_in: int = 1,
    messages_out: int = 4,
    **extra: Any,
) -> dict[str, Any]:
    """A usage record shaped as ``Edge._usage_record`` builds it."""
    return {
        "start": start,
        "stop": stop,
        "route": route,
        "room": room,
        "connection": "c1",
        "client_ip": "10.0.0.1",
        "close_code": 1000,
        "close_reason": "bye",
        "closed_by": "client",
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "messages_in": messages_in,
        "messages_out": messages_out,
        **extra,
    }


def live(entry: dict[str, Any]) -> Open:
    """An open connection as ``Edge._live_usage`` gives it, for a record's figures."""
    return (entry["route"], entry["room"], *(entry[key] for key in COUNTS))


def proxied(**counts: Any) -> dict[str, Any]:
    return record("/p/{x}", None, upstream="ws://127.0.0.1:9/a", **counts)


def counts(websockets: int, open_: int, closed: int, *values: int) -> dict[str, int]:
    """A totals entry: connections, then bytes_in, bytes_out, messages_in, messages_out."""
    keys = ("bytes_in", "bytes_out", "messages_in", "messages_out")
    connections = {"websockets": websockets, "open": open_, "closed": closed}
    return {**connections, **dict(zip(keys, values, strict=True))}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- iso_utc ---------------------------------------------------------------------------------


def test_iso_utc_gives_milliseconds_and_a_trailing_z() -> None:
    assert iso_utc(0.5) == "1970-01-01T00:00:00.500Z"
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(START) == "2023-11-14T22:13:20.250Z"


def test_iso_utc_truncates_below_the_millisecond() -> None:
    assert iso_utc(0.9999) == "1970-01-01T00:00:00.999Z"


# -- the totals ------------------------------------------------------------------------------


def test_a_fresh_usage_reports_zero_totals() -> None:
    assert Usage(Settings()).report([]) == {
        "total": counts(0, 0, 0, 0, 0, 0, 0),
        "routes": {},
        "rooms": {},
    }


def test_closed_records_add_up_per_route_and_per_room() -> None:
    usage = Usage(Settings())
    usage.closed(record(room="A"))
    usage.closed(record(room="A", bytes_in=1, bytes_out=2, messages_in=3, messages_out=4))
    usage.closed(record(room="B", bytes_in=5, bytes_out=6, messages_in=7, messages_out=8))
    report = usage.report([])
    assert report["routes"] == {"/room/{name}": counts(3, 0, 3, 16, 208, 11, 16)}
    assert report["rooms"] == {
        "A": counts(2, 0, 2, 11, 202, 4, 8),
        "B": counts(1, 0, 1, 5, 6, 7, 8),
    }


def test_records_without_a_room_count_for_their_route_only() -> None:
    usage = Usage(Settings())
    usage.closed(proxied())
    usage.closed(record(room=None))
    report = usage.report([])
    assert report["routes"] == {
        "/p/{x}": counts(1, 0, 1, 10, 200, 1, 4),
        "/room/{name}": counts(1, 0, 1, 10, 200, 1, 4),
    }
    assert report["rooms"] == {}


def test_the_total_sums_the_routes() -> None:
    usage = Usage(Settings())
    usage.closed(record(room="A", bytes_in=1, bytes_out=2, messages_in=3, messages_out=4))
    usage.closed(proxied(bytes_in=10, bytes_out=20, messages_in=30, messages_out=40))
    assert usage.report([])["total"] == counts(2, 0, 2, 11, 22, 33, 44)


def test_open_connections_are_reported_as_open() -> None:
    usage = Usage(Settings())
    usage.closed(record(room="A"))
    report = usage.report([live(record(room="A", bytes_in=1)), live(record(room="C", bytes_in=2))])
    assert report["routes"] == {"/room/{name}": counts(3, 2, 1, 13, 600, 3, 12)}
    assert report["rooms"] == {
        "A": counts(2, 1, 1, 11, 400, 2, 8),
        "C": counts(1, 1, 0, 2, 200, 1, 4),
    }
    assert report["total"] == counts(3, 2, 1, 13, 600, 3, 12)


def test_a_report_without_rooms_has_the_same_routes() -> None:
    usage = Usage(Settings())
    usage.closed(record(room="A"))
    open_ = [live(record(room="A", bytes_in=1)), live(record("/other/{name}", "B"))]
    routes_only = usage.report(open_, rooms=False)
    assert routes_only["rooms"] == {}
    assert routes_only["routes"] == usage.report(open_)["routes"]


def test_an_open_proxied_connection_counts_for_its_route_only() -> None:
    report = Usage(Settings()).report([live(proxied())])
    assert report["routes"] == {"/p/{x}": counts(1, 1, 0, 10, 200, 1, 4)}
    assert report["rooms"] == {}


def test_reporting_open_connections_does_not_change_the_stored_totals() -> None:
    usage = Usage(Settings())
    usage.closed(record(room="A"))
    before = usage.report([])
    usage.report([live(record(room="A")), live(record("/other/{name}", "B")), live(proxied())])
    assert usage.report([]) == before
    assert before["routes"] == {"/room/{name}": counts(1, 0, 1, 10, 200, 1, 4)}


def test_changing_a_report_does_not_change_the_stored_totals() -> None:
    usage = Usage(Settings())
    usage.closed(record(room="A"))
    report = usage.report([])
    report["routes"]["/room/{name}"]["bytes_in"] = 999
    report["rooms"]["A"]["bytes_in"] = 999
    again = usage.report([])
    assert again["routes"]["/room/{name}"]["bytes_in"] == 10
    assert again["rooms"]["A"]["bytes_in"] == 10


def test_only_the_most_recently_closed_rooms_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runtime.usage._MAX_ROOMS", 2)
    usage = Usage(Settings())
    usage.closed(record(room="A"))
    usage.closed(record(room="B"))
    usage.closed(record(room="A"))  # A is now the most recent
    usage.closed(record(room="C"))  # B goes
    report = usage.report([])
    assert list(report["rooms"]) == ["A", "C"]
    assert report["rooms"]["A"]["closed"] == 2
    assert report["routes"]["/room/{name}"]["closed"] == 4  # route totals keep everything


# -- the usage log ---------------------------------------------------------------------------


def test_each_closed_record_is_one_json_line(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    usage = Usage(Settings(usage_log=str(log)))
    usage.closed(record(room="A"))
    usage.closed(proxied(stop=START + 0.0004))
    usage.close()
    first, second = lines(log)
    assert first == {
        **record(room="A"),
        "start": "2023-11-14T22:13:20.250Z",
        "stop": "2023-11-14T22:13:32.500Z",
        "duration_s": 12.25,
    }
    assert second["route"] == "/p/{x}"
    assert second["room"] is None
    assert second["upstream"] == "ws://127.0.0.1:9/a"
    assert second["duration_s"] == 0.0  # rounded to the millisecond


def test_a_line_is_written_when_the_connection_closes(tmp_path: Path) -> None:
    """Line-buffered: each record is in the file at once, not at ``close``."""
    log = tmp_path / "usage.jsonl"
    usage = Usage(Settings(usage_log=str(log)))
    assert log.read_text() == ""
    usage.closed(record())
    assert len(lines(log)) == 1
    usage.close()


def test_the_log_is_appended_to(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    log.write_text('{"earlier": true}\n')
    usage = Usage(Settings(usage_log=str(log)))
    usage.closed(record())
    usage.close()
    earlier, added = lines(log)
    assert earlier == {"earlier": True}
    assert added["connection"] == "c1"


def test_open_connections_are_not_logged(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    usage = Usage(Settings(usage_log=str(log)))
    usage.report([live(record())])
    usage.close()
    assert log.read_text() == ""


def test_without_usage_log_no_file_is_written(tmp_path: Path) -> None:
    usage = Usage(Settings(data_dir=str(tmp_path)))
    usage.closed(record())
    usage.close()
    assert list(tmp_path.iterdir()) == []
    assert usage.report([])["total"]["closed"] == 1


def test_after_close_the_log_is_not_written_or_reopened(tmp_path: Path) -> None:
    """The file stays closed: a record closed afterwards still counts in the totals and adds
    no line (a connection ending during shutdown does not fail)."""
    log = tmp_path / "usage.jsonl"
    usage = Usage(Settings(usage_log=str(log)))
    usage.closed(record(room="A"))
    usage.close()
    usage.close()  # twice is harmless
    content = log.read_text()
    usage.closed(record(room="B"))
    assert log.read_text() == content
    assert len(lines(log)) == 1
    assert usage.report([])["total"]["closed"] == 2


def test_an_unwritable_log_is_reported_and_the_totals_still_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "usage.jsonl"
    usage = Usage(Settings(usage_log=str(log)))
    file = usage._log
    assert file is not None

    def full_disk(text: str) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file, "write", full_disk)
    usage.closed(record(room="A"))
    monkeypatch.undo()
    usage.close()
    assert "cannot write the usage log" in caplog.text
    assert usage.report([])["rooms"]["A"]["closed"] == 1
    assert log.read_text() == ""


def test_a_usage_log_that_cannot_be_opened_raises_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Usage(Settings(usage_log=str(tmp_path / "missing" / "usage.jsonl")))


# -- analytics -------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_analytics_count_upgrades_when_made_and_usage_when_closed_per_minute() -> None:
    clock = Clock(START)
    usage = Usage(Settings(), clock)
    usage.opened("/room/{name}")
    usage.opened("/room/{name}")
    clock.now += 60  # the next minute: one of them closes, after 12.25 s, with 1000
    usage.closed(record(bytes_out=500))
    report = usage.analytics.report(3600, {"/room/{name}": "Chat"})
    [first, second] = report["minutes"]
    assert (first["minute"], first["websockets"], first["closed"]) == (
        "2023-11-14T22:13:00.000Z",
        2,
        0,
    )
    assert (second["websockets"], second["closed"], second["bytes_out"]) == (0, 1, 500)
    assert second["close_codes"] == {"1000": 1}
    assert second["duration_s_at_most"]["1.0"] == 0
    assert second["duration_s_at_most"]["60.0"] == 1  # 12.25 s: at most 60 (and above)
    totals = report["routes"]["/room/{name}"]
    assert (totals["room_class"], totals["websockets"], totals["closed"]) == ("Chat", 2, 1)
    assert report["room_classes"]["Chat"]["bytes_out"] == 500


def test_analytics_keep_a_day_and_answer_for_the_window_asked() -> None:
    clock = Clock(START)
    usage = Usage(Settings(), clock)
    for _ in range(3 * 24 * 60):  # three days, one upgrade a minute
        usage.opened("/room/{name}")
        clock.now += 60
    clock.now -= 60
    assert len(usage.analytics.rows(86400)) == 24 * 60
    assert len(usage.analytics.rows(3600)) == 60
    assert usage.analytics.report(600, {})["routes"]["/room/{name}"]["websockets"] == 10


def test_analytics_as_csv_one_row_per_minute_and_route() -> None:
    clock = Clock(START)
    usage = Usage(Settings(), clock)
    usage.opened("/a/{name}")
    usage.closed(record("/b/{name}", close_code=1006))
    rows = list(csv.reader(io.StringIO(usage.analytics.csv(3600))))
    header = rows[0]
    assert header[:3] == ["minute", "route", "websockets"] and header[-1] == "close_codes"
    by_route = {row[1]: dict(zip(header, row, strict=True)) for row in rows[1:]}
    assert by_route["/a/{name}"]["websockets"] == "1"
    assert by_route["/b/{name}"]["closed"] == "1"
    assert by_route["/b/{name}"]["close_codes"] == "1006=1"
    assert by_route["/b/{name}"]["duration_le_+Inf"] == "1"


async def test_the_analytics_endpoint_over_a_real_server(
    nursery: trio.Nursery, settings: Settings
) -> None:
    port = await start_server(nursery, echo_app, settings)
    for _ in range(2):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/echo/analytics") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
    await trio.sleep(0.1)  # (the server's side of the closes)

    async def get(query: str) -> tuple[int, bytes]:
        request = f"GET /_rooms/analytics{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        answer = await raw_request(port, request, 0.5)
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    status, body = await get("")
    assert status == 200
    report = json.loads(body)
    echo = report["routes"]["/echo/{name}"]
    assert (echo["room_class"], echo["websockets"], echo["closed"]) == ("EchoRoom", 2, 2)
    assert echo["messages_in"] == 2 and echo["close_codes"] == {"1000": 2}
    status, body = await get("?format=csv&window=600")
    assert status == 200 and body.startswith(b"minute,route,websockets,closed,")
    status, body = await get("?format=jsonl")
    assert status == 200 and json.loads(body.splitlines()[0])["route"] == "/echo/{name}"
    assert (await get("?window=5"))[0] == 400
    assert (await get("?format=xml"))[0] == 400
