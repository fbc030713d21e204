"""The web labeller in a real browser: `anneal-geo label SESSION --web` driven by key presses.

The server is the real command in a subprocess (so it can be killed with SIGKILL), the
browser is Debian's Chromium driven by Playwright, the session is a real one over the
EuroSAT-MS sample (real SQLite, real training). Answers are checked through a second
sqlite3 connection, so only committed rows count.

Without Chromium or Playwright the tests skip, except under CI (the ``CI`` environment
variable set), where they fail: CI must run them (``.ci/run`` installs Chromium).
Set ``ANNEAL_WRITE_SCREENSHOTS=1`` to refresh the README's screenshot
(``docs/images/web_labeller.png``) from the test that takes it.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from anneal_geo.data.pool import PatchPool
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "images" / "web_labeller.png"
URL = re.compile(r"open (http://127\.0\.0\.1:\d+/) in a browser")
LAUNCH = "import sys\nfrom anneal_geo.cli import main\nsys.argv[0] = 'anneal-geo'\nmain()\n"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WORD = {"y": 1, "ArrowRight": 1, "n": 0, "ArrowLeft": 0, "s": -1}


def chromium() -> str | None:
    """The Chromium executable (Debian's package), or None."""
    for candidate in (
        os.environ.get("ANNEAL_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed")
    executable = chromium()
    if executable is None:
        missing("no Chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.requests = []  # every request any page of the context makes
    ctx.on("request", lambda request: ctx.requests.append(request.url))
    yield ctx
    ctx.close()


def new_session(directory: Path, pool_dir: Path, rounds: int = 1, initial: int = 6) -> Session:
    config = SessionConfig(
        data=str(pool_dir),
        annotator="widget",
        initial=initial,
        budget=4,
        rounds=rounds,
        epochs=5,
        seed=3,
    )
    return Session.create(directory, config, {"pool_dir": str(pool_dir)})


def rows(session_dir: Path) -> list[tuple[int, int, int, int, int | None, str]]:
    """Every stored row, through a second connection: (round, i, j, answer, undoes, who)."""
    with sqlite3.connect(Path(session_dir) / "annotations.sqlite") as db:
        return db.execute(
            "SELECT round, i, j, answer, undoes, annotator FROM answers ORDER BY seq"
        ).fetchall()


def effective(session_dir: Path) -> list[tuple[int, int, int]]:
    """(i, j, answer) of answers not undone, in order."""
    stored = rows(session_dir)
    with sqlite3.connect(Path(session_dir) / "annotations.sqlite") as db:
        undone = {r[0] for r in db.execute("SELECT undoes FROM answers WHERE undoes IS NOT NULL")}
        seqs = [r[0] for r in db.execute("SELECT seq FROM answers ORDER BY seq")]
    return [
        (i, j, a)
        for seq, (_, i, j, a, undoes, _) in zip(seqs, stored, strict=True)
        if undoes is None and seq not in undone
    ]


class WebServer:
    """`anneal-geo label SESSION --web` in a subprocess, its output read in a thread."""

    def __init__(self, session_dir: Path, port: int = 0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                "label",
                str(session_dir),
                "--web",
                "--no-browser",
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {pattern.pattern!r} in:\n" + "\n".join(self.log)
                ) from None
            if line is None:
                raise AssertionError(
                    f"server ended before {pattern.pattern!r}:\n" + "\n".join(self.log)
                )
            self.log.append(line)
            match = pattern.search(line)
            if match:
                return match

    def start(self) -> WebServer:
        self.url = self.wait_for(URL)[1]
        return self

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    def output(self, timeout: float = 60.0) -> str:
        """Everything the process printed, once it has ended."""
        self.proc.wait(timeout=timeout)
        while True:
            try:
                line = self.lines.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.log.append(line)
        return "\n".join(self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def servers() -> Iterator[list[WebServer]]:
    started: list[WebServer] = []
    yield started
    for server in started:
        server.kill()


# -- what the page shows and does -------------------------------------------------------------


def shown(page: Any) -> tuple[int, int]:
    """The pair on screen, as the person sees it (the captions' patch ids)."""
    left = page.get_attribute(".ag-left", "data-patch")
    right = page.get_attribute(".ag-right", "data-patch")
    return int(left), int(right)


def wait_for_pair(page: Any, timeout: float = 60_000) -> tuple[int, int]:
    page.wait_for_function(
        "() => { const s = window.annealLabeller && window.annealLabeller.state;"
        " return s && s.phase === 'answering' && document.querySelector('.ag-left .ag-slot img')"
        " && document.querySelector('.ag-left').dataset.patch == String(s.pair.i); }",
        timeout=timeout,
    )
    return shown(page)


def wait_until_shows(page: Any, pair: tuple[int, int]) -> None:
    page.wait_for_function(
        "([i, j]) => document.querySelector('.ag-left').dataset.patch == String(i)"
        " && document.querySelector('.ag-right').dataset.patch == String(j)",
        arg=list(pair),
        timeout=30_000,
    )


def press(page: Any, key: str) -> dict[str, Any]:
    """Press a key and wait for its acknowledgement to be painted; return its timing."""
    before = page.evaluate("window.annealLabeller.timings.length")
    page.keyboard.press(key)
    page.wait_for_function(
        "n => window.annealLabeller.timings.length > n", arg=before, timeout=60_000
    )
    timing: dict[str, Any] = page.evaluate("window.annealLabeller.timings.at(-1)")
    return timing


def truth(pool: PatchPool, pair: tuple[int, int]) -> str:
    labels = pool.single_labels()
    return "y" if labels[pair[0]] == labels[pair[1]] else "n"


def open_page(context: Any, url: str) -> Any:
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url)
    return page


# -- the tests ---------------------------------------------------------------------------------


def test_key_presses_land_in_sqlite_in_order_with_undo_skip_and_training(
    tmp_path, pool_dir, pool, context, servers
):
    directory = new_session(tmp_path / "eurosat-by-hand", pool_dir).directory
    server = WebServer(directory)
    servers.append(server)
    server.start()
    assert any("labelling" in line and "round 0 of 1" in line for line in server.log)
    page = open_page(context, server.url)

    given: list[tuple[int, int, int]] = []
    for key in ("y", "ArrowLeft", "s", "ArrowRight", "n"):
        pair = wait_for_pair(page)
        timing = press(page, key)
        assert timing["ok"] and timing["shown"]
        given.append((*sorted(pair), WORD[key]))
        # Acknowledged and painted: the row is committed (seen by another connection) and
        # the next pair is on screen.
        assert effective(directory) == given
        assert shown(page) != pair
    assert "saved answer 5" in page.inner_text(".ag-message")
    counters = page.inner_text(".ag-counters")
    assert "round 0 of 1" in counters and "pair 6 of 6" in counters
    assert "5 of 10 pairs answered" in page.inner_text(".ag-budget-text")
    page.wait_for_selector(".ag-left .ag-neighbours:not(.ag-stale) img")
    page.wait_for_selector(".ag-right .ag-neighbours:not(.ag-stale) img")
    page.wait_for_timeout(300)  # the thumbnails decode
    screenshot = tmp_path / "web_labeller.png"
    page.screenshot(path=str(screenshot))

    # Undo with u and with Backspace: the pairs come back, last one first.
    press(page, "u")
    assert shown(page) == given[-1][:2] or tuple(sorted(shown(page))) == given[-1][:2]
    press(page, "Backspace")
    assert tuple(sorted(shown(page))) == given[-2][:2]
    assert effective(directory) == given[:3]
    assert sum(1 for r in rows(directory) if r[4] is not None) == 2
    # Skip it this time; then answer the rest of round 0 from the labels.
    press(page, "s")
    given = [*given[:3], (*given[3][:2], -1)]
    assert effective(directory) == given
    while len(given) < 6:
        pair = wait_for_pair(page)
        key = truth(pool, pair)
        press(page, key)
        given.append((*sorted(pair), WORD[key]))
    # The round trains by itself and the next round's first pair appears.
    page.wait_for_selector(".ag-training:not([hidden])", timeout=10_000)
    assert "Training round 0" in page.inner_text(".ag-training")
    wait_for_pair(page, timeout=120_000)
    assert "round 1 of 1" in page.inner_text(".ag-counters")
    assert len(Session.open(directory).history()) == 1
    assert "round 0: 4 answered, 2 skipped" in page.inner_text(".ag-rounds")
    assert effective(directory) == given
    assert all(r[5] == "web" for r in rows(directory))

    # Band presets and any three bands: the pictures change, the answers do not.
    before = page.get_attribute(".ag-left .ag-slot img", "src")
    page.click(".ag-chip[data-bands=false]")
    page.wait_for_function(
        "() => document.querySelector('.ag-left .ag-slot img').src.includes('bands=false')"
    )
    page.select_option(".ag-custom select[data-channel='0']", "B12")
    page.wait_for_function(
        "() => document.querySelector('.ag-left .ag-slot img').src.includes('B12')"
    )
    assert page.get_attribute(".ag-left .ag-slot img", "src") != before
    page.keyboard.press("?")
    assert "undo the last answer" in page.inner_text(".ag-help")
    page.keyboard.press("Escape")
    assert page.is_hidden(".ag-help")
    assert effective(directory) == given

    # Nothing the page asked for left this machine.
    hosts = {urlsplit(url).hostname for url in context.requests if not url.startswith("data:")}
    assert hosts == {"127.0.0.1"}, hosts
    assert not page.errors
    server.stop()
    assert server.proc.returncode == 0 and "stopped:" in server.output()

    if os.environ.get("ANNEAL_WRITE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT)


def test_reload_and_kill_9_lose_no_answer_and_resume(tmp_path, pool_dir, pool, context, servers):
    directory = new_session(tmp_path / "s", pool_dir, rounds=0, initial=8).directory
    first = WebServer(directory)
    servers.append(first)
    first.start()
    page = open_page(context, first.url)
    given = []
    for _ in range(3):
        pair = wait_for_pair(page)
        key = truth(pool, pair)
        press(page, key)
        given.append((*sorted(pair), WORD[key]))
    showing = shown(page)
    page.reload()
    assert wait_for_pair(page) == showing, "a reload must show the next unanswered pair"
    assert effective(directory) == given

    pair = wait_for_pair(page)
    key = truth(pool, pair)
    press(page, key)
    given.append((*sorted(pair), WORD[key]))
    showing = shown(page)
    first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    assert effective(directory) == given, "an acknowledged answer was lost"
    page.keyboard.press("y")  # the server is gone: the page says so, nothing is stored
    page.wait_for_selector(".ag-offline:not([hidden])", timeout=10_000)
    assert effective(directory) == given

    second = WebServer(directory, port=first.port)  # the page reconnects by itself
    servers.append(second)
    second.start()
    page.wait_for_selector(".ag-offline", state="hidden", timeout=60_000)
    assert wait_for_pair(page) == showing
    while len(given) < 8:
        pair = wait_for_pair(page)
        key = truth(pool, pair)
        press(page, key)
        given.append((*sorted(pair), WORD[key]))
    page.wait_for_selector(".ag-done:not([hidden])", timeout=120_000)
    assert "Session complete" in page.inner_text(".ag-done")
    assert effective(directory) == given
    assert len({(i, j) for i, j, _ in given}) == 8
    assert len(rows(directory)) == 8, "no answer may be stored twice"
    assert len(Session.open(directory).history()) == 1


def test_a_second_tab_or_server_never_stores_an_answer_twice(
    tmp_path, pool_dir, pool, context, servers
):
    directory = new_session(tmp_path / "s", pool_dir).directory
    server = WebServer(directory)
    servers.append(server)
    server.start()

    other = WebServer(directory)  # a second server on the same session: refused (below)
    servers.append(other)

    first = open_page(context, server.url)
    pair = wait_for_pair(first)
    press(first, "y")
    assert len(rows(directory)) == 1

    second = open_page(context, server.url)  # the newest page load answers
    assert wait_for_pair(second) == shown(first)
    first.keyboard.press("y")
    first.wait_for_selector(".ag-elsewhere:not([hidden])", timeout=10_000)
    assert "another tab" in first.inner_text(".ag-elsewhere")
    assert len(rows(directory)) == 1, "the older tab's answer must be refused"

    now = shown(second)
    press(second, "n")
    assert effective(directory)[-1] == (*sorted(now), 0)
    # The first tab takes the session back; the second tab is refused in turn.
    first.click(".ag-elsewhere [data-action=claim]")
    wait_until_shows(first, shown(second))
    assert first.is_hidden(".ag-elsewhere")
    second.keyboard.press("s")
    second.wait_for_selector(".ag-elsewhere:not([hidden])", timeout=10_000)
    press(first, "s")
    stored = rows(directory)
    assert len(stored) == 3
    assert len({(i, j) for _, i, j, _, _, _ in stored}) == 3, "an answer was stored twice"
    assert stored[0][1:3] == tuple(sorted(pair))

    output = other.output(timeout=120)
    assert other.proc.returncode != 0
    assert "already open for writing" in output and "anneal-geo label --web" in output
    assert not URL.search(output)
    assert len(rows(directory)) == 3
    server.stop()
