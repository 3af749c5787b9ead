"""The chat page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against ``rooms serve examples.chat.app:app`` run as a process.

Two pages join one room, chat and see each other in the roster; a reload shows the history;
the server is restarted and both pages reconnect on their own, and every page then shows every
line exactly once, in order. A screenshot is kept in ``artifacts/chat.png``. Two pages on
two cluster nodes (on the test's PostgreSQL) chat in one room (``artifacts/cluster.png``).
The example game: a player's key press moves its square on another page
(``artifacts/game.png``).

Without chromium the test is skipped with the reason, except under
``ROOMS_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs it), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support import REPO, free_port, server, wait_for_port_sync

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "artifacts"
LINES = """els => els.map(e => [
    Number(e.dataset.seq), e.querySelector('.who').textContent, e.querySelector('.text').textContent
])"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = os.environ.get("ROOMS_CHROMIUM") or shutil.which("chromium")
    if path is None:
        reason = "no chromium on PATH (apt-get install chromium, or set ROOMS_CHROMIUM)"
        if os.environ.get("ROOMS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def chat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every page is 127.0.0.1, so one rate limiter counts them all: give it room.
    monkeypatch.setenv("CHAT_BURST_SECONDS", "1000")


def open_chat(browser: Browser, port: int, who: str, room: str) -> Page:
    page = browser.new_context(viewport={"width": 900, "height": 560}).new_page()
    page.goto(f"http://127.0.0.1:{port}/#{room}")
    join(page, who)
    return page


def join(page: Page, who: str) -> None:
    page.fill("[data-testid=name-input]", who)
    page.click("[data-testid=name-submit]")
    connected(page)


def connected(page: Page, timeout: float = 20_000) -> None:
    page.wait_for_selector("[data-testid=status][data-state=connected]", timeout=timeout)


def say(page: Page, text: str) -> None:
    page.fill("[data-testid=chat-input]", text)
    page.press("[data-testid=chat-input]", "Enter")


def lines(page: Page) -> list[Any]:
    """Each message line as [seq, who, text], top to bottom."""
    found: list[Any] = page.eval_on_selector_all("[data-testid=messages] .message", LINES)
    return found


def wait_for_lines(page: Page, count: int) -> list[Any]:
    page.wait_for_function(
        f"document.querySelectorAll('[data-testid=messages] .message').length >= {count}",
        timeout=20_000,
    )
    return lines(page)


def missing_requests(page: Page) -> list[str]:
    """Record the URLs the page asks for that answer 404 (the list fills as it loads)."""
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    return missing


def roster(page: Page) -> list[str]:
    names: list[str] = page.eval_on_selector_all(
        "[data-testid=roster] .member", "els => els.map(e => e.firstChild.textContent)"
    )
    return names


def test_two_pages_chat_reload_and_survive_a_server_restart(
    browser: Browser, chat_env: None, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with server("examples.chat.app:app", REPO, data) as (proc, port):
        wait_for_port_sync(port, proc)
        ada = open_chat(browser, port, "Ada", "browser-test")
        grace = open_chat(browser, port, "Grace", "browser-test")
        ada.wait_for_function("document.querySelectorAll('.member').length === 2")
        assert roster(ada) == roster(grace) == ["Ada", "Grace"]

        say(ada, "Hello <b>Grace</b>!")  # markup must arrive as text
        assert wait_for_lines(grace, 1) == [[1, "Ada", "Hello <b>Grace</b>!"]]
        assert grace.locator("[data-testid=messages] b").count() == 0
        say(grace, "Hi Ada, this line was on disk before you saw it.")
        wait_for_lines(ada, 2)

        grace.reload()  # the history comes back; the name is remembered
        assert grace.input_value("[data-testid=name-input]") == "Grace"
        grace.click("[data-testid=name-submit]")
        connected(grace)
        expected = lines(ada)
        assert wait_for_lines(grace, 2) == expected
        port_kept = port

    # The server goes away; Ada types meanwhile (queued), then it comes back on the same port.
    ada.wait_for_selector("[data-testid=status]:not([data-state=connected])", timeout=10_000)
    say(ada, "Typed while the server was down.")
    with server("examples.chat.app:app", REPO, data, port=port_kept) as (proc, port):
        wait_for_port_sync(port, proc)
        connected(ada)
        connected(grace)
        say(grace, "Back after the restart.")
        final_ada = wait_for_lines(ada, 4)
        final_grace = wait_for_lines(grace, 4)
        assert final_ada == final_grace
        assert [seq for seq, _, _ in final_ada] == [1, 2, 3, 4]  # none lost, none twice
        assert final_ada[:2] == expected
        # the queued line went out right after Ada's rejoin, before Grace spoke
        assert final_ada[2:] == [
            [3, "Ada", "Typed while the server was down."],
            [4, "Grace", "Back after the restart."],
        ]
        ada.wait_for_function("document.querySelectorAll('.member').length === 2")
        ARTIFACTS.mkdir(exist_ok=True)
        ada.screenshot(path=str(ARTIFACTS / "chat.png"))


@contextmanager
def two_chat_nodes(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The chat served by two cluster nodes (processes) on ``pg_dsn``: their ports."""
    cluster = ("--cluster", pg_dsn)
    with (
        server("examples.chat.app:app", REPO, tmp_path / "a", *cluster) as (proc_a, port_a),
        server("examples.chat.app:app", REPO, tmp_path / "b", *cluster) as (proc_b, port_b),
    ):
        wait_for_port_sync(port_a, proc_a)
        wait_for_port_sync(port_b, proc_b)
        yield port_a, port_b


def test_two_pages_on_two_cluster_nodes_chat_in_one_room(
    browser: Browser, chat_env: None, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat in cluster mode: each page served by its own node process, one room (on
    whichever node the first page reached), one history."""
    monkeypatch.setenv("ROOMS_CLUSTER_TOKEN", "browser-test")
    with two_chat_nodes(pg_dsn, tmp_path) as (port_a, port_b):
        ada = open_chat(browser, port_a, "Ada", "across-nodes")
        grace = open_chat(browser, port_b, "Grace", "across-nodes")
        ada.wait_for_function("document.querySelectorAll('.member').length === 2")
        assert roster(ada) == roster(grace) == ["Ada", "Grace"]
        say(ada, f"Hello from the node on port {port_a}.")
        say(grace, f"And hello from the node on port {port_b}.")
        final_ada, final_grace = wait_for_lines(ada, 2), wait_for_lines(grace, 2)
        assert final_ada == final_grace
        assert final_ada == [
            [1, "Ada", f"Hello from the node on port {port_a}."],
            [2, "Grace", f"And hello from the node on port {port_b}."],
        ]
        ARTIFACTS.mkdir(exist_ok=True)
        grace.screenshot(path=str(ARTIFACTS / "cluster.png"))


def test_the_other_page_sees_who_is_typing_and_one_line_per_name_across_tabs(
    browser: Browser, chat_env: None, tmp_path: Path
) -> None:
    """Presence in the chat page: Grace types (without sending) and Ada's page shows "Grace is
    typing…" until she sends the line; a second tab of Ada's adds no roster line on Grace's
    page. Screenshot: artifacts/chat-typing.png."""
    with server("examples.chat.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        ada = open_chat(browser, port, "Ada", "typing-room")
        grace = open_chat(browser, port, "Grace", "typing-room")
        ada.wait_for_function("document.querySelectorAll('.member').length === 2")
        grace.fill("[data-testid=chat-input]", "")
        grace.type("[data-testid=chat-input]", "on my w")
        ada.wait_for_selector("[data-testid=typing]:has-text('Grace is typing…')", timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        ada.screenshot(path=str(ARTIFACTS / "chat-typing.png"))
        grace.type("[data-testid=chat-input]", "ay")
        grace.press("[data-testid=chat-input]", "Enter")
        wait_for_lines(ada, 1)
        ada.wait_for_function(
            "document.querySelector('[data-testid=typing]').textContent === ''", timeout=10_000
        )
        second_tab = open_chat(browser, port, "Ada", "typing-room")
        second_tab.wait_for_function("document.querySelectorAll('.member').length === 2")
        grace.wait_for_timeout(500)
        assert roster(grace) == ["Ada", "Grace"]


def test_the_page_fits_a_phone(browser: Browser, chat_env: None, tmp_path: Path) -> None:
    with server("examples.chat.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        page = browser.new_context(viewport={"width": 360, "height": 640}).new_page()
        page.goto(f"http://127.0.0.1:{port}/#phone")
        join(page, "Phone")
        say(page, "A long line " * 20)
        wait_for_lines(page, 1)
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 360, f"the page scrolls sideways: {width} px"
        assert page.is_visible("[data-testid=chat-input]")
        assert page.is_visible("[data-testid=roster]")


def test_a_private_room_link_brings_a_second_page_in(
    browser: Browser, chat_env: None, tmp_path: Path
) -> None:
    with server("examples.chat.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        page = browser.new_context(viewport={"width": 900, "height": 560}).new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("[data-testid=name-input]", "Host")
        page.click("[data-testid=name-submit]")
        page.click("[data-testid=private-room]")
        connected(page)
        link = page.input_value("[data-testid=share-link]")
        assert len(link.rsplit("#", 1)[1]) == 64
        guest = browser.new_context().new_page()
        guest.goto(link)
        join(guest, "Guest")
        say(guest, "Found it.")
        assert wait_for_lines(page, 1)[0][1:] == ["Guest", "Found it."]


ROOM_SOCKET_RULES = """async (port) => {
  const until = (socket, state) => new Promise((resolve) => {
    if (socket.state === state) return resolve();
    socket.addEventListener("statechange", (e) => { if (e.detail.state === state) resolve(); });
  });
  const results = {};

  // A close that says retrying is pointless (1009, name too long) ends it for good.
  const refused = new RoomSocket("/api/room/rules/websocket", {
    hello: () => JSON.stringify({ name: "n".repeat(33) }),
  });
  const states = [];
  refused.addEventListener("statechange", (e) => states.push(e.detail.state));
  await until(refused, "closed");
  results.refusedStates = states;

  // Nobody listening: it keeps retrying with delays under the cap, and queues at most 100.
  const lonely = new RoomSocket(`ws://127.0.0.1:${port}/nothing`, { minDelay: 10, maxDelay: 40 });
  const delays = [];
  lonely.addEventListener("statechange", (e) => {
    if (e.detail.state === "waiting") delays.push(e.detail.retryIn);
  });
  const accepted = [];
  for (let i = 0; i < 105; i++) accepted.push(lonely.send("m" + i));
  while (delays.length < 6) await new Promise((r) => setTimeout(r, 20));
  lonely.close();
  results.maxDelay = Math.max(...delays);
  results.accepted = accepted.filter(Boolean).length;
  results.queuedAfterClose = lonely.queued;
  results.lonelyState = lonely.state;

  // Connected: hello first, then what was queued, then live sends; the heartbeat reply
  // is not dispatched.
  const got = [];
  const live = new RoomSocket("/api/room/rules/websocket", {
    hello: () => JSON.stringify({ name: "rules" }),
    heartbeat: { message: "ping", reply: "pong", interval: 50, timeout: 1000 },
  });
  live.send(JSON.stringify({ message: "queued before open" }));
  live.addEventListener("message", (e) => got.push(e.data));
  await until(live, "open");
  live.send(JSON.stringify({ message: "sent when open" }));
  const chat = () =>
    got.filter((m) => m.startsWith("{")).map(JSON.parse).filter((m) => "message" in m);
  while (chat().length < 2) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 300));  // several heartbeats
  results.live = chat().map((m) => m.message);
  results.pongDispatched = got.some((m) => m === "pong");
  results.liveState = live.state;
  live.close();
  return results;
}"""


def test_room_socket_rules(browser: Browser, chat_env: None, tmp_path: Path) -> None:
    with server("examples.chat.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        page = browser.new_context().new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        nobody = free_port()
        results = page.evaluate(ROOM_SOCKET_RULES, nobody)
    assert results["refusedStates"] == ["connecting", "open", "closed"]
    assert results["maxDelay"] < 40
    assert results["accepted"] == 100  # the bound; the rest refused, not silently dropped
    assert results["queuedAfterClose"] == 0 and results["lonelyState"] == "closed"
    assert results["live"] == ["queued before open", "sent when open"]
    assert results["pongDispatched"] is False
    assert results["liveState"] == "open"


# -- the example game --------------------------------------------------------------------------

PLAYERS = "els => els.map(e => [e.dataset.name, Number(e.dataset.x), Number(e.dataset.y)])"


def positions(page: Page) -> dict[str, tuple[int, int]]:
    found: list[Any] = page.eval_on_selector_all("#players li", PLAYERS)
    return {name: (x, y) for name, x, y in found}


def test_the_game_moves_a_player_on_every_page(browser: Browser, tmp_path: Path) -> None:
    with server("examples.game.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        pages, missing = [], []
        for _ in range(2):
            page = browser.new_context(viewport={"width": 900, "height": 560}).new_page()
            missing.append(missing_requests(page))
            page.goto(f"http://127.0.0.1:{port}/#browser-test")
            pages.append(page)
        player, watcher = pages
        player.fill("#name", "Ada <b>")
        player.press("#name", "Enter")  # joined from the keyboard: focus is still in the field
        watcher.wait_for_function(
            "[...document.querySelectorAll('#players li')].some(e => e.dataset.name)",
            timeout=20_000,
        )
        x0, y0 = positions(watcher)["Ada <b>"]
        key = "ArrowLeft" if x0 > 16 else "ArrowRight"
        player.keyboard.press(key)
        target = x0 - 3 if key == "ArrowLeft" else x0 + 3
        # 20 ticks a second, a step every 3: three steps take under a second.
        moved = "<=" if key == "ArrowLeft" else ">="
        watcher.wait_for_function(
            f"""(() => {{
                const me = [...document.querySelectorAll('#players li')]
                    .find(e => e.dataset.name === 'Ada <b>');
                return me && Number(me.dataset.x) {moved} {target};
            }})()""",
            timeout=20_000,
        )
        assert positions(watcher)["Ada <b>"][1] == y0  # moved along its row only
        assert positions(player).keys() == positions(watcher).keys()
        assert watcher.locator("#players b").count() == 0  # the name is text, not markup
        ticks = int(watcher.eval_on_selector("#board", "e => e.dataset.tick"))
        assert ticks > 0
        assert missing == [[], []]
        assert player.locator("link[rel=icon]").count() == 1  # no /favicon.ico 404
        ARTIFACTS.mkdir(exist_ok=True)
        player.screenshot(path=str(ARTIFACTS / "game.png"))


def test_quick_play_from_the_lobby_puts_two_pages_on_one_board(
    browser: Browser, tmp_path: Path
) -> None:
    """The game's lobby page: two pages press Quick play and land on the same board (the
    fullest open one), both playing; the lobby lists it with its two players. Screenshot:
    artifacts/game-lobby.png."""
    with server("examples.game.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        pages = []
        for name in ("Ada", "Grace"):
            page = browser.new_context(viewport={"width": 900, "height": 560}).new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#lobby-name", name)
            page.click("[data-testid=quickplay]")
            page.wait_for_function("location.hash.length > 1", timeout=10_000)
            pages.append(page)
        ada, grace = pages
        assert ada.evaluate("location.hash") == grace.evaluate("location.hash")
        for page in pages:
            page.wait_for_function(
                "document.querySelectorAll('#players li').length === 2", timeout=20_000
            )
        assert sorted(positions(ada)) == ["Ada", "Grace"]
        lobby = browser.new_context(viewport={"width": 900, "height": 400}).new_page()
        lobby.goto(f"http://127.0.0.1:{port}/")
        lobby.wait_for_selector("[data-testid=board-row] >> text=2 / 4", timeout=10_000)
        lobby.fill("#lobby-name", "Host")
        lobby.click("[data-testid=private]")
        lobby.wait_for_selector("[data-testid=share] >> text=Share this link", timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        lobby.screenshot(path=str(ARTIFACTS / "game-lobby.png"))
        assert lobby.locator("[data-testid=board-row]").count() == 1  # the private one: not listed


def test_two_pages_write_one_note_and_see_each_others_cursor(
    browser: Browser, tmp_path: Path
) -> None:
    """The notes example (a rooms.yjs.DocRoom): two pages type into one document at once and
    each sees the other's text and named cursor, the status says "saved", and a reload shows
    the document. Screenshot: artifacts/notes.png."""
    with server("examples.notes.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        pages = []
        for who in ("Ada", "Grace"):
            context = browser.new_context(viewport={"width": 900, "height": 500})
            context.add_init_script(f"localStorage.setItem('notes-name', '{who}')")
            page = context.new_page()
            missing = missing_requests(page)
            page.goto(f"http://127.0.0.1:{port}/#shared-note")
            page.wait_for_selector(".cm-content:has-text('Welcome to a new note')")
            pages.append(page)
        ada, grace = pages
        lines = {ada: "Ada writes here. ", grace: "Grace writes there. "}
        for page in pages:
            page.click(".cm-content")
            page.keyboard.press("Control+End")
        for i in range(max(map(len, lines.values()))):  # at once: a key each, in turn
            for page, line in lines.items():
                if i < len(line):
                    page.keyboard.type(line[i])
        for page in pages:
            page.wait_for_function(
                "['Ada writes here.', 'Grace writes there.'].every(t => "
                "document.querySelector('.cm-content').textContent.includes(t))",
                timeout=10_000,
            )
            page.wait_for_selector("[data-testid=status][data-state=saved]", timeout=10_000)
        ada.wait_for_selector(".cm-ySelectionInfo:has-text('Grace')", state="attached")
        assert "Grace" in (ada.text_content("[data-testid=people]") or "")
        ARTIFACTS.mkdir(exist_ok=True)
        ada.screenshot(path=str(ARTIFACTS / "notes.png"))
        text = ada.evaluate("window.notes.text.toString()")
        assert "Ada writes here." in text and "Grace writes there." in text
        grace.reload()
        grace.wait_for_function(f"window.notes.text.toString() === {text!r}", timeout=10_000)
        assert missing == []


def test_the_chat_page_loads_without_a_404(browser: Browser, tmp_path: Path) -> None:
    with server("examples.chat.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        page = browser.new_context().new_page()
        missing = missing_requests(page)
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        page.wait_for_selector("[data-testid=name-input]")
        assert missing == []
        # A page without an icon makes a (headed) browser ask for /favicon.ico: a 404 per load.
        assert page.locator("link[rel=icon]").count() == 1


def test_the_admin_page_of_one_cluster_node_shows_every_node_and_acts_on_their_rooms(
    browser: Browser, chat_env: None, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cluster mode: the admin page of node A lists both nodes (alive, with their figures)
    and the rooms of both, each with its node; the room held by node B opens from A's page
    and a notice sent from it reaches the chat page on B. Screenshot:
    artifacts/admin-cluster.png."""
    monkeypatch.setenv("ROOMS_CLUSTER_TOKEN", "browser-test")
    with two_chat_nodes(pg_dsn, tmp_path) as (port_a, port_b):
        ada = open_chat(browser, port_a, "Ada", "north")  # north is held by A
        grace = open_chat(browser, port_b, "Grace", "south")  # south by B
        say(ada, "Up north.")
        say(grace, "Down south.")
        admin = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
        admin.goto(f"http://127.0.0.1:{port_a}/_rooms/admin")
        admin.wait_for_selector("[data-testid=status][data-state=live]", timeout=10_000)
        admin.wait_for_function(
            "[...document.querySelectorAll('[data-testid=node-row]')]"
            ".filter(r => r.cells[2].textContent === 'alive').length === 2",
            timeout=10_000,
        )
        assert f"127.0.0.1:{port_b}" in (admin.text_content("[data-testid=nodes-table]") or "")
        admin.fill("[data-testid=rooms-class]", "ChatRoom")
        row = "[data-testid=room-row]"
        admin.wait_for_function(
            f"document.querySelectorAll('{row}').length === 2"
            f" && new Set([...document.querySelectorAll('{row}')].map(r => r.cells[1]"
            ".textContent)).size === 2",
            timeout=10_000,
        )
        assert admin.is_visible(f"{row} td.node")  # the node column, in cluster mode
        admin.click(f"{row} >> text=south")
        admin.wait_for_selector("[data-testid=connection-close]", timeout=10_000)
        assert "on node" in (admin.text_content("#room-title") or "")
        admin.fill("[data-testid=notice-text]", "maintenance at noon")
        admin.click("[data-testid=notice-send]")
        result = "[data-testid=room-result]"
        admin.wait_for_selector(f"{result}:has-text('notice sent to 1 connections')")
        grace.wait_for_selector(".notice:has-text('The operator says: maintenance at noon')")
        for i in range(8):  # (traffic in the screenshot)
            say(ada if i % 2 else grace, f"line {i}")
            admin.wait_for_timeout(250)
        ARTIFACTS.mkdir(exist_ok=True)
        admin.screenshot(path=str(ARTIFACTS / "admin-cluster.png"), full_page=True)


def test_the_live_admin_page_moves_with_the_traffic(
    browser: Browser, chat_env: None, tmp_path: Path
) -> None:
    """/_rooms/admin from loopback: a chat page joins and talks, and the page's tiles (open
    WebSockets, messages in per second, bandwidth out) and their charts follow, pushed once
    a second; its rooms table finds the chat's room, whose page sends a notice and closes
    the chat page's connection (4000, counted). Screenshot: artifacts/admin.png."""
    with server("examples.chat.app:app", REPO, tmp_path / "data") as (proc, port):
        wait_for_port_sync(port, proc)
        admin = browser.new_context(viewport={"width": 1100, "height": 640}).new_page()
        admin.goto(f"http://127.0.0.1:{port}/_rooms/admin")
        admin.wait_for_selector("[data-testid=status][data-state=live]", timeout=10_000)
        ada = open_chat(browser, port, "ada", "busy")
        for i in range(12):
            say(ada, f"line {i}")
            admin.wait_for_timeout(250)
        admin.wait_for_function(
            "Number(document.querySelector('[data-testid=chart-messages_in]').dataset.points) >= 3",
            timeout=10_000,
        )
        tiles = {
            name: admin.text_content(f"[data-testid=tile-{name}]") or ""
            for name in ("websockets", "messages_in", "bytes_out")
        }
        assert tiles["websockets"].startswith("2"), tiles  # the chat page and the admin page
        assert any(ch.isdigit() and ch != "0" for ch in tiles["bytes_out"]), tiles
        rates = admin.eval_on_selector_all(
            "[data-testid=chart-messages_in]", "els => els.map(e => e.dataset.points)"
        )
        assert int(rates[0]) >= 3
        # The rooms table (asked for every 5 s): the chat's room "busy", live, one client.
        admin.fill("[data-testid=rooms-class]", "ChatRoom")
        row = "[data-testid=room-row]"
        admin.wait_for_function(
            f"[...document.querySelectorAll('{row}')].some(r => r.cells[0].textContent"
            " === 'busy' && r.cells[3].textContent === 'live' && r.cells[4].textContent === '1')",
            timeout=10_000,
        )
        # One room: its connection, a notice to its clients, then closing that connection.
        admin.click(f"{row} >> text=busy")
        admin.wait_for_selector("[data-testid=connection-close]", timeout=10_000)
        admin.fill("[data-testid=notice-text]", "maintenance at noon")
        admin.click("[data-testid=notice-send]")
        result = "[data-testid=room-result]"
        admin.wait_for_selector(f"{result}:has-text('notice sent to 1 connections')")
        for i in range(8):  # (traffic in the screenshot)
            say(ada, f"more {i}")
            admin.wait_for_timeout(250)
        ARTIFACTS.mkdir(exist_ok=True)
        admin.screenshot(path=str(ARTIFACTS / "admin.png"), full_page=True)
        admin.click("[data-testid=connection-close]")
        admin.wait_for_selector(f"{result}:has-text('closed with 4000')", timeout=10_000)
        admin.wait_for_function(  # the page counts that close, with its code
            "document.querySelector('[data-testid=tile-closes]').parentElement"
            ".querySelector('.note').textContent.includes('4000: 1')",
            timeout=10_000,
        )
