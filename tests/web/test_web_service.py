"""The web process as a service: under termux-services' real runit (runsv starts the project's run script, the login
URL and the JSON log land in svlogd's log, the console answers with the token from its file, `sv down` stops it),
and SIGTERM with streams open (they end, and the process stops at once and cleanly)."""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_termux_service import Runit
from tests.conftest import NEXUS_JOBD, Db, now_ms, require, wait_for
from tests.web.conftest import Web


@pytest.fixture
def runit_web(tmp_path: Path) -> Iterator[Runit]:
    require(all(shutil.which(p) for p in ("runsv", "sv", "svlogd")), "runit is not installed (Debian: runit)")
    home = tmp_path / "home"
    home.mkdir()
    # The daemon's service would have made the database; the console opens only one that exists.
    subprocess.run([*NEXUS_JOBD, "--db", str(home / ".nexuscli" / "nexuscli.db"), "db", "migrate"], check=True,
                   capture_output=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    # The user's config file, where the service reads it: any free port (9480 may be taken on a shared machine).
    (home / ".config" / "nexus-jobd").mkdir(parents=True)
    (home / ".config" / "nexus-jobd" / "config.toml").write_text('[web]\nlisten = "127.0.0.1:0"\n')
    service = Runit(tmp_path, "nexus-jobd-web")
    yield service
    service.close()


def test_the_web_console_under_runsv(runit_web: Runit) -> None:
    runit = runit_web
    found = wait_for(lambda: re.search(r"nexus-jobd web: open (http://127\.0\.0\.1:(\d+)/\?token=(\S+))",
                                       runit.log_text()), timeout=30, message="the login URL in svlogd's log")
    assert runit.daemon_pid() is not None and runit.events("web.started")
    token_file = runit.home / ".config" / "nexus-jobd" / "web-token"
    assert found.group(3) == token_file.read_text().strip() and token_file.stat().st_mode & 0o077 == 0
    conn = http.client.HTTPConnection("127.0.0.1", int(found.group(2)), timeout=10)
    conn.request("GET", "/api/v1/jobs", headers={"Authorization": f"Bearer {found.group(3)}"})
    assert conn.getresponse().status == 200
    conn.close()
    runit.sv("down")
    wait_for(lambda: runit.sv("status").startswith("down:"), timeout=30, message="sv down")
    assert runit.events("web.stopped")


def test_sigterm_ends_open_streams_and_stops_at_once(db: Db, web_factory: Callable[..., Web]) -> None:
    web = web_factory()
    job_id = db.insert("sleep 60", run_after=now_ms() + 600_000)  # stays queued: its stream stays open
    ended = threading.Event()

    def follow() -> None:
        for _ in web.events(f"/api/v1/jobs/{job_id}/stream"):
            pass
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    events = threading.Thread(target=lambda: list(web.events("/api/v1/events")), daemon=True)
    events.start()
    wait_for(lambda: '"web.started"' in web.log(), message="started")
    time.sleep(0.5)  # both streams opened (nothing to wait on from here: they only send what exists)
    stopped_at = time.monotonic()
    web.proc.send_signal(signal.SIGTERM)
    assert web.proc.wait(10) == 0
    assert time.monotonic() - stopped_at < 1.5  # not after uvicorn's 2 s grace
    assert ended.wait(5)
    events.join(5)
    assert '"web.stopped"' in web.log() and "Traceback" not in web.log() and "Exception" not in web.log()
