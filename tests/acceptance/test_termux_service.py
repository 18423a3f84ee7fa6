"""The termux-services unit under real runit: runsv starts the project's run script, svlogd keeps JSON lines, and
after kill -9, `sv restart` or `sv down` and `sv up` the next daemon takes the running job over from the keeper."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, Db, group_members, require, wait_for

ROOT = Path(__file__).parent.parent.parent
SERVICES = ROOT / "termux-services"
TERMUX_SHEBANG = "#!/data/data/com.termux/files/usr/bin/sh\n"


def _install(src: Path, dest: Path) -> None:
    """The project's script, with the one change a non-Termux host needs: its Termux shebang points at /bin/sh."""
    text = src.read_text()
    assert text.startswith(TERMUX_SHEBANG)
    dest.write_text("#!/bin/sh\n" + text[len(TERMUX_SHEBANG):])
    dest.chmod(0o755)


class Runit:
    """runsv running one of the project's termux-services (`name`), under a $PREFIX and $HOME of the test's."""

    def __init__(self, tmp: Path, name: str = "nexus-jobd") -> None:
        self.prefix, self.home, self.name = tmp / "usr", tmp / "home", name
        self.logdir = self.prefix / "var" / "log"
        self.service = self.prefix / "var" / "service" / name
        (self.service / "log").mkdir(parents=True)
        (self.prefix / "bin").mkdir(parents=True)
        self.home.mkdir(exist_ok=True)
        (self.prefix / "bin" / "nexus-jobd").symlink_to(VENV_BIN / "nexus-jobd")  # pip's $PREFIX/bin script
        for script in ("run", "finish", "log/run"):
            if (SERVICES / name / script).exists():
                _install(SERVICES / name / script, self.service / script)
        self.env = {"PREFIX": str(self.prefix), "HOME": str(self.home), "LOGDIR": str(self.logdir),
                    "PATH": f"{self.prefix / 'bin'}:/usr/bin:/bin:/usr/sbin:/sbin"}
        self.runsv = subprocess.Popen(["runsv", str(self.service)], env=self.env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.db_path = self.home / ".nexuscli" / "nexuscli.db"

    def sv(self, *args: str) -> str:
        return subprocess.run(["sv", *args, str(self.service)], env=self.env, capture_output=True, text=True,
                              timeout=60).stdout

    def daemon_pid(self) -> int | None:
        status = self.sv("status")
        if status.startswith("run:"):
            return int(status.split("(pid ")[1].split(")")[0])
        return None

    def log_text(self) -> str:
        current = self.logdir / "sv" / self.name / "current"
        return current.read_text() if current.exists() else ""

    def log_lines(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_text().splitlines():
            _stamp, _, payload = line.partition(" ")  # svlogd -tt: "2026-11-26_10:00:00.12345 {json}"
            if payload.startswith("{"):  # the web process also prints its login URL, as a line of text
                events.append(json.loads(payload))
        return events

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.log_lines() if e.get("event") == name]

    def close(self) -> None:
        subprocess.run(["sv", "exit", str(self.service), str(self.service / "log")], env=self.env,
                       capture_output=True, timeout=60)
        try:
            self.runsv.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.runsv.pid, signal.SIGKILL)
            self.runsv.wait()


@pytest.fixture
def runit(tmp_path: Path) -> Iterator[Runit]:
    require(all(shutil.which(p) for p in ("runsv", "sv", "svlogd")), "runit is not installed (Debian: runit)")
    service = Runit(tmp_path)
    yield service
    service.close()


def test_termux_service_under_runsv(runit: Runit) -> None:
    first_pid = wait_for(runit.daemon_pid, timeout=20, message="runsv to start the daemon")
    wait_for(lambda: runit.events("dispatch.started"), timeout=20, message="daemon ready (svlogd log)")
    db = Db(runit.db_path)
    try:
        assert db.wait_status(db.insert("echo from runit"))["stdout"] == "from runit\n"
        # svlogd stored the daemon's JSON lines as they are, behind its timestamp.
        wait_for(lambda: runit.events("job.finished"), message="job.finished in the svlogd log")

        # kill -9: runsv restarts the daemon, and the new one takes the running job over from the keeper; so does
        # the daemon after `sv restart`. The job runs on, once, and ends recorded in full.
        gate = runit.home / "gate"
        job_id = db.insert(f'echo started; while [ ! -e "{gate}" ]; do sleep 0.05; done; echo finished')
        pgid = wait_for(lambda: db.job(job_id)["pid"], message="job running")
        os.kill(first_pid, signal.SIGKILL)
        second_pid = wait_for(lambda: (p := runit.daemon_pid()) != first_pid and p, timeout=20,
                              message="runsv to restart the daemon")
        wait_for(lambda: runit.events("job.reattached"), timeout=20, message="the job taken over after kill -9")
        runit.sv("restart")
        third_pid = wait_for(lambda: (p := runit.daemon_pid()) not in (None, second_pid) and p, timeout=20,
                             message="sv restart")
        wait_for(lambda: len(runit.events("job.reattached")) == 2, timeout=20,
                 message="the job taken over after sv restart")
        assert group_members(int(pgid)) and db.job(job_id)["status"] == "executing"
        gate.touch()
        row = db.wait_status(job_id, timeout=20)
        assert (row["status"], row["stdout"], row["attempt"]) == ("completed", "started\nfinished\n", 1)
        second_pid = third_pid

        # sv down with a job running: SIGTERM, the daemon leaves at once (on_stop = "detach", the default) and
        # runsv keeps it down; the job runs on under the keeper, and `sv up` starts a daemon that records it.
        gate.unlink()
        job_id = db.insert(f'echo started; while [ ! -e "{gate}" ]; do sleep 0.05; done; echo finished')
        pgid = wait_for(lambda: db.job(job_id)["pid"], message="job running")
        runit.sv("down")
        wait_for(lambda: runit.sv("status").startswith("down:"), timeout=40, message="sv down")
        stopped = [e for e in runit.events("daemon.stopped") if str(second_pid) in str(e.get("worker_id"))]
        assert stopped and stopped[0]["detached"] == 1, runit.log_lines()[-5:]
        assert group_members(int(pgid)) and db.job(job_id)["status"] == "executing"
        runit.sv("up")
        wait_for(lambda: len(runit.events("job.reattached")) == 3, timeout=20, message="the job taken over after sv up")
        gate.touch()
        row = db.wait_status(job_id, timeout=20)
        assert (row["status"], row["stdout"], row["attempt"]) == ("completed", "started\nfinished\n", 1)
    finally:
        db.close()
