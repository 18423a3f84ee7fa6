"""Another program rewriting the database outside SQLite's locking: the real sql.js, driven as NexusCLI 0.10's driver
does it (read the file whole, run the statement in memory, writeFileSync the whole database back), and `mv`.

The daemon notices at once, stops touching the file (no write, no checkpoint, none on close either), sets its WAL
aside, lets running jobs finish with their results kept beside the file, and exits 65, which the units do not
restart. A daemon started again on the dangerous state (a rollback header next to a WAL with frames) refuses it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NEXUS_JOBD, Daemon, Db, cli, keeper_pids, kill_keeper, require, wait_for

NODE_DIR = Path(__file__).parent.parent / "nodejs"
EXIT_REWRITTEN = 65


def sqljs_insert(db_path: Path, job_id: str, command: str = "echo from-sqljs") -> float:
    """NexusCLI 0.10 queues a job: returns the time its last whole-file write ended."""
    require(shutil.which("node") is not None and (NODE_DIR / "node_modules" / "sql.js").is_dir(),
            "Node.js and sql.js are not installed (scripts/install-test-deps installs them)")
    result = subprocess.run(["node", str(NODE_DIR / "sqljs_writer.js"), str(db_path), job_id, command],
                            timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return time.time()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def integrity(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Read-only, without the daemon's WAL (which it set aside): what any program now finds in the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return check, conn.execute("SELECT id, status FROM jobs ORDER BY id").fetchall()
    finally:
        conn.close()


def event_time(event: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_a_sqljs_rewrite_is_noticed_and_the_file_is_left_as_it_wrote_it(daemon: Daemon, db: Db) -> None:
    running = db.insert("echo started; sleep 1.5; echo done")
    wait_for(lambda: "started" in (db.job(running)["stdout"] or ""), message="the job to run")
    db.close()  # our test connection must not be the one that keeps SQLite's view of the file alive

    written_at = sqljs_insert(db.path, "from-nexuscli-0.10")
    after_rewrite = digest(db.path)

    rewritten = wait_for(lambda: daemon.events("db.rewritten"), timeout=5, message="db.rewritten")[0]
    assert event_time(rewritten) - written_at < 1.0, "noticed within a second of the rewrite"
    message = str(rewritten["message"])
    assert "rewritten by another program outside SQLite's locking" in message
    assert "sql.js" in message and "better-sqlite3" in message
    assert rewritten["running"] == [running]

    assert daemon.proc is not None
    assert daemon.proc.wait(30) == EXIT_REWRITTEN
    # Nothing of the daemon's reached the file: byte for byte what sql.js wrote, whole, with its row.
    assert digest(db.path) == after_rewrite
    check, rows = integrity(db.path)
    assert check == "ok"
    assert ("from-nexuscli-0.10", "queued") in rows
    # Its WAL is set aside (no program can replay it onto the new file), and the running job's result is kept.
    assert not Path(f"{db.path}-wal").exists()
    assert [Path(p).exists() for p in rewritten["wal_set_aside"]] == [True, True]  # type: ignore[union-attr]
    results = [json.loads(line) for line in Path(str(rewritten["results"])).read_text().splitlines()]
    assert [(r["id"], r["exit_code"], r["stdout"]) for r in results] == [(running, 0, "started\ndone\n")]
    assert daemon.events("job.unrecorded")[0]["job_id"] == running
    assert os.stat(str(rewritten["results"])).st_mode & 0o077 == 0
    # `nexus-jobd status` says it too, where a user looks first.
    status = subprocess.run([*NEXUS_JOBD, "--db", str(db.path), "status"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "HOME": str(db.path.parent)})
    assert status.returncode == 0, status.stderr
    assert "rewritten by another program outside SQLite's locking" in status.stdout
    assert running in status.stdout and str(rewritten["results"]) in status.stdout


def _kill9_with_frames_in_the_wal(daemon: Daemon, db: Db) -> None:
    """A daemon dies with its last writes only in the WAL (it checkpoints only past 1000 frames)."""
    job_id = db.insert("echo in-the-wal")
    db.wait_status(job_id)
    db.close()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    assert os.path.getsize(f"{db.path}-wal") > 32


def no_wal_frames(db_path: Path) -> bool:
    """Nothing beside the file that SQLite would replay onto it: no -wal, or an empty one."""
    wal = Path(f"{db_path}-wal")
    return not wal.exists() or wal.stat().st_size == 0


def test_a_stale_wal_is_set_aside_at_start_up_and_a_nexuscli_file_is_refused_until_taken_over(
        daemon: Daemon, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """A daemon killed before it saw the rewrite leaves its WAL beside a file sql.js rewrote: whatever opens the
    file next would replay it. The next daemon (or command) sets it aside before anything opens the file; the
    daemon then refuses a file NexusCLI's sql.js keeps (sqljs_writer makes NexusCLI's api_keys table), until the
    user takes it over."""
    _kill9_with_frames_in_the_wal(daemon, db)
    sqljs_insert(db.path, "queued-by-sqljs")
    before = digest(db.path)

    again = daemon_factory().start(wait_ready=False)
    assert again.proc is not None
    assert again.proc.wait(15) == EXIT_REWRITTEN  # refused at once: no restart loop under the units either
    set_aside = again.events("db.stale_wal_set_aside")[0]
    assert "replay" in set_aside["message"]
    assert [Path(p).exists() for p in set_aside["wal_set_aside"]] == [True, True]
    assert not Path(f"{db.path}-wal").exists()
    refused = again.events("db.refused")[0]
    assert "NexusCLI's database" in refused["message"] and "db take-over" in refused["message"]
    assert digest(db.path) == before
    assert integrity(db.path)[0] == "ok"

    # Reading commands read the file as the other program left it, and write nothing beside it.
    ps = cli(db, "ps", check=False)
    assert ps.returncode == 0 and "queued" in ps.stdout, ps.stderr
    submit = cli(db, "submit", "--", "echo refused", check=False)
    assert submit.returncode == EXIT_REWRITTEN and "db take-over" in submit.stderr
    assert digest(db.path) == before and no_wal_frames(db.path)

    # The way out the message gives, once NexusCLI no longer writes the file: take it over.
    taken = cli(db, "db", "take-over", check=False)
    assert taken.returncode == 0 and "taken over" in taken.stdout, taken.stderr
    third = daemon_factory().start()
    fresh = Db(db.path)
    try:
        assert fresh.wait_status("queued-by-sqljs")["stdout"] == "from-sqljs\n"
    finally:
        fresh.close()
    third.stop()


def test_a_file_replaced_with_mv_is_noticed(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    copy = sqlite3.connect(other)
    db.conn.backup(copy)  # another, valid database file, in rollback mode
    copy.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                 "VALUES ('in-the-new-file', 'localhost', 'bash', 'true', 'completed', 1)")
    copy.commit()
    copy.close()
    db.close()
    os.rename(other, db.path)
    moved_in = digest(db.path)

    event = wait_for(lambda: daemon.events("db.rewritten"), timeout=5, message="db.rewritten")[0]
    assert "new inode" in str(event["reason"])
    assert daemon.proc is not None and daemon.proc.wait(30) == EXIT_REWRITTEN
    assert digest(db.path) == moved_in
    check, rows = integrity(db.path)
    assert check == "ok" and ("in-the-new-file", "completed") in rows


def test_other_programs_closing_never_checkpoint_under_the_daemon(daemon: Daemon, db: Db) -> None:
    """The daemon keeps SQLite's locks: its own checks never open and close the database files (closing any
    descriptor drops a process's POSIX locks), so another program's close cannot take the WAL away under it."""
    job_id = db.insert("echo kept")
    db.wait_status(job_id)
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("SELECT count(*) FROM jobs").fetchone()
    other.close()
    db.close()
    assert Path(f"{db.path}-wal").exists(), "the last-connection checkpoint ran: the daemon lost its locks"


def test_no_checkpoint_on_close_holds_on_this_python(tmp_path: Path) -> None:
    """The setting that keeps a closing connection from writing the WAL into the main file, on the Python this
    suite runs under (3.11 reaches SQLite's handle through ctypes, 3.12+ has setconfig), against a control."""
    from daemon.store import guard

    results = {}
    for protect in (False, True):
        path = tmp_path / f"db-{protect}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x)")
        if protect:
            guard.no_checkpoint_on_close(conn)
        before = digest(path)
        conn.execute("INSERT INTO t VALUES (1)")
        conn.close()
        results[protect] = digest(path) == before
    assert results == {False: False, True: True}


def test_systemd_hears_it_on_the_status_line(db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    from tests.acceptance.test_service import NotifySocket

    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = daemon_factory(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}).start()
        wait_for(lambda: receiver.with_field("READY=1"), message="READY=1")
        db.close()
        sqljs_insert(db.path, "from-sqljs")
        assert daemon.proc is not None and daemon.proc.wait(30) == EXIT_REWRITTEN
        lines = [m for _, m in receiver.collect() if "STATUS=" in m]
        assert any("was rewritten by another program outside SQLite's locking" in m for m in lines), lines
        assert "STOPPING=1" in lines[-1]
    finally:
        receiver.sock.close()


def test_runit_does_not_restart_it(tmp_path: Path) -> None:
    """termux-services: the project's `finish` script takes the service down on exit 65, where runsv would
    otherwise start the daemon again at once, on the same rewritten file."""
    from tests.acceptance.test_termux_service import Runit

    require(all(shutil.which(p) for p in ("runsv", "sv", "svlogd")), "runit is not installed (Debian: runit)")
    runit = Runit(tmp_path)
    try:
        pid = wait_for(runit.daemon_pid, timeout=20, message="runsv to start the daemon")
        wait_for(lambda: runit.events("dispatch.started"), timeout=20, message="daemon ready")
        sqljs_insert(runit.db_path, "from-sqljs")
        # Down and no longer wanted up: runsv will not start it again. Without finish, sv says ", want up" while
        # runsv waits to restart it, and then it runs again.
        status = wait_for(lambda: (st := runit.sv("status")).startswith("down:") and "want up" not in st and st,
                          timeout=30, message="the service down and not wanted up")
        assert "normally up" in status, status  # finish's doing, not a person's `sv down` before
        assert runit.events("db.rewritten")
        assert runit.events("daemon.stopped")[-1]["exit_code"] == EXIT_REWRITTEN
        assert runit.daemon_pid() is None and pid > 0
    finally:
        runit.close()


# -- never lose a result, never run a job twice, whatever the rewrite interrupts --------------------------------------

def _runs(marks: Path) -> int:
    return len(list(marks.iterdir()))


def _queued_in_the_file(db: Db, *commands: str) -> list[str]:
    """Rows queued while no daemon runs, copied into the main file: what a NexusCLI that reads the file now sees."""
    ids = [db.insert(command) for command in commands]
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return ids


def _take_over_and_restart(db: Db, daemon_factory: Callable[..., Daemon]) -> tuple[Daemon, Db]:
    cli(db, "db", "take-over")
    return daemon_factory().start(), Db(db.path)


def test_a_rewrite_during_start_up_is_reported_and_leaves_the_file_as_it_was_written(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """The rewrite lands while the daemon starts (here: while its migration waits for a lock): the same report,
    event and exit status as a rewrite found later, and nothing of the daemon's beside the file."""
    db.conn.execute("BEGIN IMMEDIATE")  # the daemon's first write waits behind this lock
    daemon = daemon_factory("[database]\nbusy_timeout_ms = 50\n").start(wait_ready=False)
    wait_for(lambda: daemon.events("db.locked"), message="the daemon waiting for the lock")
    sqljs_insert(db.path, "from-sqljs")
    after = digest(db.path)
    db.conn.execute("ROLLBACK")
    db.close()
    assert daemon.proc is not None and daemon.proc.wait(30) == EXIT_REWRITTEN
    event = daemon.events("db.rewritten")[0]
    report = json.loads(Path(str(event["report"])).read_text())
    assert report["message"] == event["message"] and "rewritten by another program" in report["message"]
    assert daemon.events("daemon.stopped")[0]["exit_code"] == EXIT_REWRITTEN and not daemon.events("dispatch.started")
    assert digest(db.path) == after and no_wal_frames(db.path)
    check, rows = integrity(db.path)
    assert check == "ok" and ("from-sqljs", "queued") in rows


def test_reading_commands_after_exit_65_leave_the_file_as_it_was_written(daemon: Daemon, db: Db,
                                                                        tmp_path: Path) -> None:
    db.close()
    sqljs_insert(db.path, "from-sqljs")
    assert daemon.proc is not None and daemon.proc.wait(30) == EXIT_REWRITTEN
    after = digest(db.path)
    for args in (["status"], ["ps"], ["show", "from-sqljs"], ["logs", "from-sqljs"], ["nodes"],
                 ["backup", str(tmp_path / "copy.db")], ["db", "check"]):
        result = cli(db, *args, check=False)
        assert result.returncode == 0, (args, result.stderr)
        assert digest(db.path) == after and no_wal_frames(db.path), args
    assert integrity(db.path)[0] == "ok"
    assert "from-sqljs" in cli(db, "ps", check=False).stdout


@pytest.mark.parametrize("keeper", ["alive", "killed"])
def test_a_job_that_ends_after_a_rewrite_is_recorded_by_the_next_daemon_and_runs_once(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path, keeper: str) -> None:
    """NexusCLI's copy has the job queued (its claim was only in the WAL): the next daemon on the taken-over file
    records the end the last one kept beside it, whether the keeper still runs or the host rebooted."""
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    [job_id] = _queued_in_the_file(db, f"touch {marks}/$$; echo started; while [ ! -e {gate} ]; do sleep 0.02; "
                                       "done; echo done")
    daemon = daemon_factory().start()
    wait_for(lambda: db.job(job_id)["stdout"] == "started\n", message="the job to run")
    db.close()
    sqljs_insert(db.path, "from-sqljs")
    wait_for(lambda: daemon.events("db.rewritten"), timeout=5, message="db.rewritten")
    gate.touch()
    assert daemon.proc is not None and daemon.proc.wait(30) == EXIT_REWRITTEN
    assert daemon.events("job.unrecorded")[0]["job_id"] == job_id
    wait_for(lambda: not keeper_pids(db.path), timeout=10, message="the keeper to let go of the kept result")
    if keeper == "killed":
        kill_keeper(db.path)
    assert integrity(db.path)[0] == "ok"

    again, fresh = _take_over_and_restart(db, daemon_factory)
    try:
        row = fresh.wait_status(job_id)
        assert (row["status"], row["exit_code"], row["attempt"], row["stdout"]) == (
            "completed", 0, 1, "started\ndone\n")
        assert row["duration"] == row["completed_at"] - row["started_at"] and row["duration"] > 0
        assert fresh.wait_status("from-sqljs")["stdout"] == "from-sqljs\n"
    finally:
        fresh.close()
    assert _runs(marks) == 1
    [applied] = again.events("db.rewrite_applied")
    assert (applied["job_id"], applied["action"]) == (job_id, "recorded completed")
    assert json.loads(Path(str(applied["report"])).read_text())["applied_at"] is not None


@pytest.mark.parametrize("keeper", ["alive", "killed"])
def test_a_job_still_running_when_the_daemon_stops_after_a_rewrite_is_followed_again_and_runs_once(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path, keeper: str) -> None:
    """SIGTERM while a job runs on after a rewrite: it is left to the keeper, and the next daemon claims it again as
    it was, under its old daemon, for recovery: adopted from the keeper, or (the host rebooted) failed with the
    reason, never run again."""
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    [job_id] = _queued_in_the_file(db, f"touch {marks}/$$; echo started; while [ ! -e {gate} ]; do sleep 0.02; "
                                       "done; echo done")
    daemon = daemon_factory().start()
    wait_for(lambda: db.job(job_id)["stdout"] == "started\n", message="the job to run")
    db.close()
    sqljs_insert(db.path, "from-sqljs")
    wait_for(lambda: daemon.events("db.rewritten"), timeout=5, message="db.rewritten")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == EXIT_REWRITTEN
    if keeper == "killed":
        kill_keeper(db.path)

    again, fresh = _take_over_and_restart(db, daemon_factory)
    try:
        if keeper == "alive":
            wait_for(lambda: again.events("job.reattached"), timeout=20, message="the job followed again")
            gate.touch()
            row = fresh.wait_status(job_id)
            assert (row["status"], row["attempt"], row["stdout"]) == ("completed", 1, "started\ndone\n")
        else:
            row = fresh.wait_status(job_id)
            assert (row["status"], row["attempt"]) == ("failed", 1)
            assert "job keeper that ran it is gone" in row["error"]
    finally:
        fresh.close()
    gate.touch()
    assert _runs(marks) == 1


def test_a_daemon_killed_before_it_saw_the_rewrite_loses_no_result_and_runs_nothing_twice(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """kill -9 while one job has ended (its end only in the WAL) and another runs, then sql.js rewrites the file:
    the keeper holds both until the file has them, and the next daemon, claiming each again as the same attempt,
    follows what the keeper holds instead of starting it a second time."""
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    ended, running = _queued_in_the_file(
        db, f"touch {marks}/a$$; echo quick", f"touch {marks}/b$$; echo started; while [ ! -e {gate} ]; do "
                                              "sleep 0.02; done; echo done")
    daemon = daemon_factory().start()
    assert db.wait_status(ended)["stdout"] == "quick\n"
    wait_for(lambda: db.job(running)["stdout"] == "started\n", message="the second job to run")
    db.close()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    sqljs_insert(db.path, "from-sqljs")  # NexusCLI's copy: both rows queued, as the main file had them

    again, fresh = _take_over_and_restart(db, daemon_factory)
    try:
        row = fresh.wait_status(ended)
        assert (row["status"], row["attempt"], row["stdout"]) == ("completed", 1, "quick\n")
        wait_for(lambda: fresh.job(running)["status"] == "executing", message="the second job followed again")
        gate.touch()
        row = fresh.wait_status(running)
        assert (row["status"], row["attempt"], row["stdout"]) == ("completed", 1, "started\ndone\n")
    finally:
        fresh.close()
    assert _runs(marks) == 2
    assert len(again.events("job.already_started")) == 2
    assert integrity(db.path)[0] == "ok"


def test_nexuscli_s_own_file_at_the_default_path_gets_one_clear_message_and_stays_untouched(tmp_path: Path) -> None:
    """A NexusCLI user (every published release writes its database with sql.js, in rollback-journal mode) who runs
    the daemon with no options: refused before anything is written, with the two ways out."""
    from tests.conftest import FIXTURES

    home = tmp_path / "home"
    path = home / ".nexuscli" / "nexuscli.db"
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript((FIXTURES / "nexuscli_schema.sql").read_text())
    conn.execute("PRAGMA journal_mode = DELETE")  # as sql.js writes it
    conn.close()
    path.parent.chmod(0o700)
    path.chmod(0o600)
    before = digest(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_JOBD_")} | {"HOME": str(home)}
    run = subprocess.run([*NEXUS_JOBD, "--log-format", "json", "run"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert run.returncode == EXIT_REWRITTEN
    events = [json.loads(line) for line in run.stdout.splitlines() + run.stderr.splitlines() if line.startswith("{")]
    refused = [e for e in events if e["event"] == "db.refused"]
    assert len(refused) == 1 and "api_keys" in refused[0]["message"] and "db take-over" in refused[0]["message"]
    assert "database of its own" in refused[0]["message"]
    assert digest(path) == before and sorted(p.name for p in path.parent.iterdir()) == ["nexuscli.db"]


def test_commands_that_write_leave_no_wal_behind(db: Db) -> None:
    """Once the last connection is gone, nothing beside the file could be replayed onto it by a later rewrite."""
    db.close()
    job_id = cli(db, "submit", "--", "true", check=False).stdout.strip()
    assert no_wal_frames(db.path)
    for args in (["cancel", job_id], ["retry", job_id], ["prune", "--older-than", "1d"], ["db", "migrate"]):
        result = cli(db, *args, check=False)
        assert result.returncode in (0, 1), (args, result.stderr)
        assert no_wal_frames(db.path), args


def test_a_daemon_that_finds_its_file_replaced_leaves_the_new_files_wal_to_whoever_opened_it(
        daemon: Daemon, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """The file is deleted (its WAL with it) and made again, and a second daemon opens it, all before the first
    notices (here: stopped meanwhile). The first must set aside only its own WAL: the `-wal` and `-shm` now at the
    path are the second's, live, and moving them lost every write the second made after (seen: its queue stalled
    with 500 rows, inserted through a WAL it no longer read)."""
    assert daemon.proc is not None
    db.close()
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        for name in (db.path, Path(f"{db.path}-wal"), Path(f"{db.path}-shm")):
            name.unlink(missing_ok=True)
        subprocess.run([*NEXUS_JOBD, "--db", str(db.path), "db", "migrate"], check=True, capture_output=True)
        second = daemon_factory().start()
        fresh = Db(db.path)
        assert fresh.wait_status(fresh.insert("echo before"))["stdout"] == "before\n"
        held = {name: os.stat(name).st_ino for name in (f"{db.path}-wal", f"{db.path}-shm")}
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    event = wait_for(lambda: daemon.events("db.rewritten"), timeout=10, message="db.rewritten")[0]
    assert daemon.proc.wait(30) == EXIT_REWRITTEN
    report = json.loads(Path(str(event["report"])).read_text())
    assert report["wal_set_aside"] == []  # its own WAL went with the deleted file; the one there is not its own
    assert {name: os.stat(name).st_ino for name in held} == held
    assert fresh.wait_status(fresh.insert("echo after"))["stdout"] == "after\n"  # the second daemon runs on
    assert second.proc is not None and second.proc.poll() is None
    fresh.close()
    assert integrity(db.path)[0] == "ok"
