"""Bad rows fail with a reason in the row; the daemon never stops and good rows around them complete."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NEXUS_JOBD, Daemon, Db, wait_for

# (what is wrong, columns of the row, words the error must contain)
BAD_ROWS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown tool", {"tool": "powershell", "command": "dir"}, "unknown tool 'powershell'"),
    ("tool of the wrong type (TEXT affinity stores '7')", {"tool": 7, "command": "true"}, "unknown tool '7'"),
    ("tool is a blob", {"tool": b"\xffbash", "command": "true"}, "tool must be text, got blob"),
    ("empty command", {"command": ""}, "command is empty"),
    ("blank command", {"command": "   \n\t"}, "command is empty"),
    ("command is a blob", {"command": b"\xff\xfe echo"}, "command must be text, got blob"),
    ("command has a NUL byte", {"command": "echo a\x00b"}, "NUL byte"),
    ("command too long for one argument", {"command": "echo " + "x" * 200_000}, "longer than"),
    ("env is not JSON", {"command": "true", "env": "{nope"}, "env is not valid JSON"),
    ("env is a JSON list", {"command": "true", "env": '["A=1"]'}, "env must be a JSON object"),
    ("env value is an object", {"command": "true", "env": '{"A": {"b": 1}}'}, "env['A'] must be a string"),
    ("env name has '='", {"command": "true", "env": '{"A=B": "1"}'}, "invalid variable name"),
    ("cwd does not exist", {"command": "true", "cwd": "/no/such/dir"}, "working directory '/no/such/dir' does not"),
    ("cwd is a file", {"command": "true", "cwd": "/etc/hostname"}, "not a directory"),
    ("git args do not split", {"tool": "git", "command": "log 'unterminated"}, "cannot be split"),
    ("git with no args", {"tool": "git", "command": "git"}, "no git arguments"),
    ("priority is text", {"command": "true", "priority": "urgent"}, "priority must be an integer"),
    ("unknown node", {"command": "true", "node_id": "ghost"}, "unknown node"),
    ("node_id of the wrong type", {"command": "true", "node_id": 12}, "unknown node"),
]


def test_200_bad_rows_each_fail_with_a_reason_and_good_rows_complete(daemon: Daemon, db: Db) -> None:
    expected: dict[str, str] = {}
    good: list[str] = []
    kinds = itertools.cycle(BAD_ROWS)
    db.conn.execute("BEGIN")
    for i in range(200):
        _, columns, reason = next(kinds)
        columns = dict(columns)
        command = columns.pop("command")
        expected[db.insert(command, **columns)] = reason
        if i % 4 == 0:
            good.append(db.insert(f"echo good {i}"))
    db.conn.execute("COMMIT")
    for job_id, reason in expected.items():
        row = db.wait_status(job_id)
        assert row["status"] == "failed", (reason, row)
        assert reason in (row["error"] or ""), (reason, row["error"])
        assert row["completed_at"] is not None and row["duration"] is not None
    for job_id in good:
        row = db.wait_status(job_id)
        assert row["status"] == "completed" and row["stdout"].startswith("good"), row
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert not daemon.events("job.internal_error")


def test_invalid_config_stops_startup_naming_file_key_and_fix(db_path: Path,
                                                              daemon_factory: Callable[..., Daemon]) -> None:
    cases = {
        "[daemon]\nmax_concurrent = 'eight'\n": ("[daemon] max_concurrent", "expected an integer from 1 to 10000"),
        "[daemon]\nflush_intervl_ms = 100\n": ("unknown key 'flush_intervl_ms'", "did you mean 'flush_interval_ms'"),
        "[daemon\nmax_concurrent = 2\n": ("not valid TOML", "line 1"),
        "[daemon]\nlog_level = 'loud'\n": ("[daemon] log_level", "one of debug, info, warning, error"),
    }
    for text, fragments in cases.items():
        daemon = daemon_factory(config=text).start(wait_ready=False)
        assert daemon.proc is not None
        assert daemon.proc.wait(15) == 2
        log = daemon.log()
        assert str(daemon.config_path) in log, log
        for fragment in fragments:
            assert fragment in log, (fragment, log)


def test_daemon_survives_rows_deleted_or_edited_while_running(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    wait = f"while [ ! -e {gate} ]; do sleep 0.02; done; echo done"
    deleted, edited = db.insert(wait), db.insert(wait)
    wait_for(lambda: db.job(deleted)["status"] == "executing" and db.job(edited)["status"] == "executing",
             message="both running")
    db.conn.execute("DELETE FROM jobs WHERE id = ?", (deleted,))
    db.conn.execute("UPDATE jobs SET status = 'queued', worker_id = 'someone-else' WHERE id = ?", (edited,))
    gate.touch()
    wait_for(lambda: len(daemon.events("job.claim_lost")) >= 1, message="claim loss noticed")
    after = db.insert("echo still alive")
    assert db.wait_status(after)["stdout"] == "still alive\n"


def test_db_check_reports_a_missing_table(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    subprocess.run(["sqlite3", str(path), "CREATE TABLE other (x);"], check=True)
    result = subprocess.run([*NEXUS_JOBD, "--db", str(path), "db", "check"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "table 'jobs' is missing" in result.stdout
    subprocess.run([*NEXUS_JOBD, "--db", str(path), "db", "migrate"], check=True, capture_output=True)
    result = subprocess.run([*NEXUS_JOBD, "--db", str(path), "db", "check"], capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, f"{path}: ok")


def test_a_database_others_can_write_is_refused_unless_allowed(db: Db, daemon_factory: Callable[..., Daemon]
                                                               ) -> None:
    db.path.chmod(0o666)
    refused = daemon_factory().start(wait_ready=False)
    assert refused.proc is not None and refused.proc.wait(15) == 2
    assert "writable by others (mode 0666)" in refused.log() and "allow_shared_database" in refused.log()
    allowed = daemon_factory(config="[database]\nallow_shared_database = true\n").start()
    assert allowed.events("db.shared")
    assert db.wait_status(db.insert("echo ok"))["stdout"] == "ok\n"


def test_jobs_get_only_the_allowlisted_environment(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    env = {"API_TOKEN": "s3cret", "LC_ALL": "C.UTF-8", "DEPLOY_KEY": "k"}
    daemon_factory(env=env).start()
    row = db.wait_status(db.insert("echo ${API_TOKEN-unset} ${DEPLOY_KEY-unset} $LC_ALL; command -v bash"))
    assert row["stdout"].splitlines()[0] == "unset unset C.UTF-8"  # the daemon's secrets stay out; LC_* passes
    assert row["stdout"].splitlines()[1].endswith("/bash")  # PATH passes


def test_the_environment_allowlist_is_configurable(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config='[daemon]\njob_env_allowlist = ["PATH", "DEPLOY_*"]\ndefault_cwd = "/"\n',
                   env={"DEPLOY_KEY": "k", "HOME": "/nowhere-in-jobs"}).start()
    row = db.wait_status(db.insert("echo $DEPLOY_KEY ${HOME-unset}", cwd="/"))
    assert row["stdout"] == "k unset\n"


def test_a_row_requeued_while_running_is_tracked_per_attempt(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    gate, marker = tmp_path / "gate", tmp_path / "first"
    job_id = db.insert(f"if mkdir {marker} 2>/dev/null; then while [ ! -e {gate} ]; do sleep 0.02; done; "
                       "echo first; else echo second; sleep 1009; fi")
    wait_for(lambda: marker.exists(), message="attempt 1 running")
    db.conn.execute("UPDATE jobs SET status = 'queued' WHERE id = ?", (job_id,))  # another program re-queues it
    wait_for(lambda: db.job(job_id)["stdout"] == "second\n", timeout=30, message="attempt 2 running beside 1")
    gate.touch()
    wait_for(lambda: daemon.events("job.claim_lost"), timeout=30, message="attempt 1 ended, its claim lost")
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (job_id,))
    # Attempt 1's end must not have made the daemon forget attempt 2: the cancel reaches it.
    row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, timeout=30, message="recorded")
    assert (row["status"], row["attempt"]) == ("cancelled", 2)


@pytest.mark.backends("sqlite", "postgres")
def test_an_attempt_out_of_range_fails_that_row_alone_and_never_runs_it(daemon: Daemon, db: Db,
                                                                       tmp_path: Path) -> None:
    """`attempt` counts the daemon's claims from 0: a negative one would get around max_attempts (-2 ran three
    times with max_attempts 1), and one at the column's top overflows `attempt + 1` in the claim (PostgreSQL's
    integer: the claim of that node's whole queue failed, again and again; SQLite's turned it into a float)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    top = 2**63 - 1 if db.target == str(db.path) else 2**31 - 1
    bad = {attempt: db.insert(f"touch {marks}/{attempt}", attempt=attempt, max_attempts=1)
           for attempt in (-2, -1, top)}
    good = db.insert("echo good")
    assert db.wait_status(good)["stdout"] == "good\n"
    for attempt, job_id in bad.items():
        row = db.wait_status(job_id)
        assert (row["status"], row["attempt"], row["exit_code"]) == ("failed", attempt, None), row
        assert "attempt must be a whole number from 0 to 2147483646" in row["error"] and str(attempt) in row["error"]
    assert list(marks.iterdir()) == []
    assert daemon.proc is not None and daemon.proc.poll() is None and not daemon.events("dispatch.db_error")


@pytest.mark.backends("sqlite", "postgres")
def test_a_result_the_database_refuses_fails_that_row_alone_and_is_never_retried_for_ever(
        daemon: Daemon, db: Db) -> None:
    """A database that refuses one row's values (here a trigger; a count out of range or a text too big do the
    same): that row ends failed with the refusal as its reason, the rows recorded with it are recorded, and the
    daemon does not retry the refused write for ever."""
    if db.target == str(db.path):
        db.conn.execute("CREATE TRIGGER refuse BEFORE UPDATE ON jobs WHEN NEW.status = 'completed' AND "
                        "substr(NEW.stdout, 1, 6) = 'poison' BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
    else:
        db.conn.execute("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.status = 'completed' AND "
                        "substr(NEW.stdout, 1, 6) = 'poison' THEN RAISE EXCEPTION 'refused by a trigger' "
                        "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
        db.conn.execute("CREATE TRIGGER refuse BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION refuse()")
    db.conn.execute("BEGIN")
    poison = db.insert("echo poison")
    good = [db.insert(f"echo good {i}") for i in range(5)]
    db.conn.execute("COMMIT")
    for i, job_id in enumerate(good):
        row = db.wait_status(job_id)
        assert (row["status"], row["stdout"], row["attempt"]) == ("completed", f"good {i}\n", 1)
    row = db.wait_status(poison)
    assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", 0, 1)
    assert "could not record this attempt's result" in row["error"] and "refused by a trigger" in row["error"]
    assert row["duration"] == row["completed_at"] - row["started_at"]
    assert len(daemon.events("job.result_refused")) == 1 and not daemon.events("db.write_failed")
    assert daemon.proc is not None and daemon.proc.poll() is None
