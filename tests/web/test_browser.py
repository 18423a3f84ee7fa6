"""The console in a real browser: Debian's headless Chromium driven by Playwright (never `playwright install`).
Log in with the token URL, a row another program inserts appears within 1 s, a running job's output appears live,
cancel from the page kills the job's process tree, a phone's viewport needs no horizontal scrolling, hostile text
renders as text, a cross-site form post is refused, and the browser console stays free of errors. Screenshots of
each page are saved with the test (and into docs/ with UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Db, group_members, require, wait_for
from tests.web.conftest import Web

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
DOCS = Path(__file__).parent.parent.parent / "docs"
HOSTILE = '<script>window.pwned=1</script>"><img src=x onerror="window.pwned=2">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(os.path.exists(CHROMIUM), "chromium is not installed (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        # Playwright gives each launch a fresh profile (its own --user-data-dir) and adds --no-sandbox for root.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


class Console:
    """One browser page on the console, with what its console and network said."""

    def __init__(self, browser: Any, web: Web, shots: Path, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.web, self.shots = web, shots
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def login(self) -> None:
        self.page.goto(self.web.url)
        self.page.wait_for_selector("#job-list > *", state="attached")
        assert self.page.url == f"http://{self.web.host}/#/jobs"  # the token is gone from the address bar

    def shot(self, name: str) -> None:
        self.shots.mkdir(exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            DOCS.mkdir(exist_ok=True)
            shutil.copy(path, DOCS / f"console-{name}.png")

    def wait_text(self, selector: str, text: str, longer_than: int = -1) -> str:
        """Poll the element's text from here: the console's CSP forbids the eval that wait_for_function needs."""
        def check() -> str | None:
            found = self.page.text_content(selector) if self.page.query_selector(selector) else None
            return found if found is not None and text in found and len(found) > longer_than else None

        return wait_for(check, 15, interval=0.05, message=f"{text!r} in {selector}")

    def overflow(self) -> int:
        width: int = self.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        return width


@pytest.fixture
def console(browser: Any, web: Web, tmp_path: Path) -> Iterator[Callable[..., Console]]:
    opened: list[Console] = []

    def make(**context: Any) -> Console:
        opened.append(Console(browser, web, tmp_path / "screenshots", **context))
        return opened[-1]

    yield make
    for c in opened:
        c.context.close()


@pytest.fixture
def running(db: Db, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory().start()


def test_live_list_live_output_and_cancel_in_a_browser(db: Db, web: Web, running: Daemon,
                                                       console: Callable[..., Console]) -> None:
    for i in range(6):
        db.wait_status(db.insert(f"echo warm-up {i}; exit {i % 3}"))
    c = console(viewport={"width": 1280, "height": 800})
    c.login()
    cookie = next(k for k in c.context.cookies() if k["name"] == "nexus_jobd_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert c.page.evaluate("document.cookie") == ""  # HttpOnly: the page's scripts cannot read it

    # Another program inserts a row: the list shows it within a second, without a reload.
    gate = db.path.parent / "gate"
    inserted = time.monotonic()
    job_id = db.insert(f"sleep 300 & sleep 300 & i=0; while [ ! -e {gate} ]; do echo tick $i; printf '\\033[32mgreen"
                       f"\\033[0m\\n' >&2; i=$((i+1)); sleep 0.2; done")
    c.page.wait_for_selector(f'a[data-job="{job_id}"]', timeout=5000)
    assert time.monotonic() - inserted < 1.0
    c.shot("jobs")

    # Its page: the output arrives as the job writes it, stdout and stderr apart, ANSI colours rendered.
    c.page.click(f'a[data-job="{job_id}"]')
    seen = c.wait_text("#stdout", "tick 3")
    c.wait_text("#stdout", "tick", longer_than=len(seen))  # still live
    assert "green" in (c.page.text_content("#stderr") or "") and c.page.query_selector("#stderr .fg-32")
    assert "\x1b" not in (c.page.text_content("#stderr") or "")
    c.shot("job")

    # Cancel from the page: the daemon kills the whole process tree (the shell and its two sleeps).
    pgid = int(db.job(job_id)["pid"])
    assert len(group_members(pgid)) >= 3
    c.page.click("#cancel")
    c.page.wait_for_selector(".job-head .badge.s-cancelled")
    wait_for(lambda: not group_members(pgid), message="the job's process tree killed")
    assert db.wait_status(job_id)["status"] == "cancelled"

    for page, selector in (("nodes", ".node"), ("charts", "#chart-finished svg"), ("submit", "form.submit")):
        c.page.click(f'nav a[data-nav="{page}"]')
        c.page.wait_for_selector(selector)
        c.shot(page)
        assert "[object" not in (c.page.text_content("main") or ""), page  # every value shown as itself
        if page == "nodes":
            node = c.page.text_content(".node") or ""
            assert "localhost" in node and "heartbeat" in node and "bash" in node and "online" in node
    assert c.errors == []


def test_submit_from_the_page_and_follow_it(db: Db, web: Web, running: Daemon, console: Callable[..., Console]) -> None:
    c = console(viewport={"width": 1280, "height": 800})
    c.login()
    c.page.click('nav a[data-nav="submit"]')
    c.page.fill("textarea[name=command]", "echo submitted from the browser; echo $WHO")
    c.page.fill("textarea[name=env]", "WHO=chromium")
    c.page.click("form.submit button[type=submit]")
    c.wait_text("#stdout", "chromium")
    c.page.wait_for_selector(".job-head .badge.s-completed")
    assert c.errors == []


def test_a_phone_sized_screen_needs_no_horizontal_scrolling(db: Db, web: Web, running: Daemon,
                                                            console: Callable[..., Console]) -> None:
    long_word = "x" * 300
    job_id = db.insert(f"echo {long_word}; echo a long line of output that a phone has to wrap somewhere sensible",
                       cwd="/tmp")
    db.wait_status(job_id)
    for i in range(4):
        db.wait_status(db.insert(f"echo phone {i} {long_word}; exit {i % 2}"))
    c = console(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2)
    c.login()
    assert c.overflow() <= 0
    c.shot("phone-jobs")
    c.page.goto(f"http://{web.host}/#/job/{job_id}")
    c.wait_text("#stdout", "sensible")
    c.page.wait_for_selector(".job-head .badge.s-completed")
    assert c.overflow() <= 0
    c.shot("phone-job")
    for page, selector in (("nodes", ".node"), ("charts", "#chart-finished svg"), ("submit", "form.submit")):
        c.page.click(f'nav a[data-nav="{page}"]')
        c.page.wait_for_selector(selector)
        assert c.overflow() <= 0, page
    assert c.errors == []


def test_hostile_command_and_output_render_as_text(db: Db, web: Web, running: Daemon,
                                                   console: Callable[..., Console]) -> None:
    job_id = db.insert(f"cat <<'EOF'\n{HOSTILE}\nEOF\n# {HOSTILE}")
    db.wait_status(job_id)
    c = console(viewport={"width": 1280, "height": 800})
    c.login()
    c.page.wait_for_selector(f'a[data-job="{job_id}"]')
    assert HOSTILE in (c.page.text_content(f'a[data-job="{job_id}"]') or "")
    c.page.click(f'a[data-job="{job_id}"]')
    c.wait_text("#stdout", "onerror")
    assert (c.page.text_content("#stdout") or "").strip() == HOSTILE
    assert HOSTILE in (c.page.text_content("pre.command") or "")
    assert c.page.evaluate("window.pwned") is None
    assert c.page.query_selector_all("main img, main script") == []
    assert c.errors == []


class _Attacker(http.server.BaseHTTPRequestHandler):
    """Another local origin (another port on 127.0.0.1: the same site) serving a page that posts to the console."""

    target = ""

    def do_GET(self) -> None:
        page = (f'<!doctype html><form id=f method=post enctype="text/plain" action="{self.target}/api/v1/jobs">'
                '<input name=\'{"command":"touch /tmp/nexus-jobd-csrf","x":"\' value=\'"}\'></form>'
                "<script>document.getElementById('f').submit()</script>").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_cross_site_form_post_is_refused(db: Db, web: Web, console: Callable[..., Console]) -> None:
    c = console()
    c.login()  # the browser holds the session cookie, and sends it to 127.0.0.1 from any port (the same site)
    _Attacker.target = f"http://{web.host}"
    server = http.server.HTTPServer(("127.0.0.1", 0), _Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with c.page.expect_response(lambda r: r.url.endswith("/api/v1/jobs") and r.request.method == "POST") as answer:
            c.page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        assert answer.value.status == 403
        assert "cross-site" in (answer.value.text() or "")
    finally:
        server.shutdown()
    assert db.conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
