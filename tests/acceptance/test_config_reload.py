"""SIGHUP with the real daemon: a file that no longer loads is logged as config.reload_failed and the daemon runs on
with the config it has; a reload that changes the limit applies it to the running local node at once."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, Db, wait_for
from tests.unit.test_config import LATIN1


def test_sighup_with_a_bad_file_logs_reload_failed_and_the_daemon_runs_on(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(config="[daemon]\nmax_concurrent = 2\n").start()
    assert daemon.config_path is not None and daemon.proc is not None
    bad = [
        (LATIN1, "not UTF-8 text: byte 0xe9 at offset 12 (line 2, column 4)"),
        (b"[daemon]\nmax_concurrent = 99999999999999999999\n", "expected an integer from 1 to 10000"),
        (b"[database]\nretention_days = 9999999999999999999\n", "expected an integer from 0 to 36500"),
        (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
        (b'[database]\npath = "/tmp/x\\u0000.db"\n', "without NUL characters"),
    ]
    for count, (content, detail) in enumerate(bad, 1):
        daemon.config_path.write_bytes(content)
        daemon.proc.send_signal(signal.SIGHUP)
        failed = wait_for(lambda n=count: len(events := daemon.events("config.reload_failed")) >= n and events,
                          message=f"config.reload_failed for {detail!r}")
        assert str(daemon.config_path) in failed[-1]["error"] and detail in failed[-1]["error"], failed[-1]
        assert "exception" not in failed[-1]  # a ConfigError, not a bug caught by the last resort
    assert not daemon.events("config.reloaded")
    assert "Traceback" not in daemon.log()
    row = db.wait_status(db.insert("echo still here"))
    assert (row["status"], row["stdout"]) == ("completed", "still here\n")
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("also", [
    'local_node = "phone"\n',  # needs a restart; the running local node takes the new max_concurrent now
    '[nodes.far]\nhost = "127.0.0.1"\nport = 9\ninsecure_skip_host_key_check = true\n',  # a new node: the same
], ids=["with-local_node", "with-a-new-node"])
def test_a_reload_applies_the_new_limit_to_the_running_local_node(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path, also: str) -> None:
    """The local node's limit defaults to [daemon] max_concurrent: it must follow it on the reload that changes
    it, even when the same reload changes something that needs a restart (it used to keep the old limit)."""
    daemon = daemon_factory(config="[daemon]\nmax_concurrent = 1\n").start()
    assert daemon.config_path is not None and daemon.proc is not None
    gate = tmp_path / "gate"
    wait = f"while [ ! -e {gate} ]; do sleep 0.02; done; echo done"
    first = db.insert(wait)
    db.wait_status(first, ("executing",))
    second = db.insert(wait)
    daemon.config_path.write_text("[daemon]\nmax_concurrent = 2\n" + also)
    daemon.proc.send_signal(signal.SIGHUP)
    reloaded = wait_for(lambda: daemon.events("config.reloaded"), message="config.reloaded")[0]
    assert reloaded["changed"]["max_concurrent"] == "2"
    assert reloaded["needs_restart"] == (["local_node"] if "local_node" in also else ["nodes"])
    assert db.wait_status(second, ("executing",))["status"] == "executing"
    gate.touch()
    for job_id in (first, second):
        assert db.wait_status(job_id)["stdout"] == "done\n"
