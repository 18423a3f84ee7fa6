"""The web console under termux-services' real runit: runsv starts the project's run script, the login URL and
the JSON log land in svlogd's log, the console answers with the token from its file, and `sv down` stops it."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_termux_service import Runit
from tests.conftest import NEXUS_JOBD, require, wait_for


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
