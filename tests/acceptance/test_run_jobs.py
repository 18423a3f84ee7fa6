"""The user's story: another program inserts rows, the real daemon runs them and fills in the row."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, Daemon, Db, wait_for

# The contract holds on either database: each test runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.backends("sqlite", "postgres")


@pytest.mark.backends("sqlite")  # about the SQLite file itself
def test_row_inserted_by_another_process_runs_to_completion(daemon: Daemon, db: Db) -> None:
    script = (
        f"import sqlite3, time, uuid; c = sqlite3.connect({str(db.path)!r}, isolation_level=None, timeout=10); "
        "i = str(uuid.uuid4()); c.execute(\"INSERT INTO jobs (id, conversation_id, message_id, node_id, tool, "
        "command, status, created_at) VALUES (?,?,?,?,?,?,'queued',?)\", "
        "(i, None, None, 'localhost', 'bash', 'echo out; echo err >&2', int(time.time()*1000))); print(i)"
    )
    job_id = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.strip()
    row = db.wait_status(job_id)
    assert row["status"] == "completed"
    assert row["exit_code"] == 0
    assert (row["stdout"], row["stderr"]) == ("out\n", "err\n")
    assert row["stdout_bytes"] == 4 and row["stderr_bytes"] == 4
    assert row["created_at"] <= row["started_at"] <= row["completed_at"]
    assert row["duration"] == row["completed_at"] - row["started_at"]
    assert row["error"] is None


def test_output_of_a_running_job_is_visible_in_the_row(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job_id = db.insert(f"echo first; echo warn >&2; while [ ! -e {gate} ]; do sleep 0.02; done; echo second")
    row = wait_for(lambda: (r := db.job(job_id))["stdout"] == "first\n" and r["stderr"] == "warn\n" and r,
                   message="live output in the row")
    assert row["status"] == "executing"
    gate.touch()
    row = db.wait_status(job_id)
    assert (row["status"], row["stdout"], row["stderr"]) == ("completed", "first\nsecond\n", "warn\n")


def test_utf8_character_split_across_two_writes_stays_whole(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job_id = db.insert(f"printf 'caf\\xc3'; while [ ! -e {gate} ]; do sleep 0.02; done; printf '\\xa9!\\xff'")
    # While only the first byte of 'é' is written, the row shows what is whole and holds the byte back.
    wait_for(lambda: db.job(job_id)["stdout_bytes"] == 4, message="first write flushed")
    assert db.job(job_id)["stdout"] == "caf"
    gate.touch()
    row = db.wait_status(job_id)
    assert row["stdout"] == "café!\ufffd"  # the invalid byte 0xff becomes U+FFFD
    assert row["stdout_bytes"] == 7


def test_20_mib_of_output_keeps_head_and_tail_with_one_marker(daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo BEGIN; yes 0123456789abcdef | head -c 20971520; echo; echo END")
    row = db.wait_status(job_id, timeout=60)
    # What the job wrote: 20 MiB of `yes` cut in the middle of a line (20971520 = 17 * 1233618 + 14), then the
    # newline of `echo` and END. The row, by the README's rule for the default 4 MiB cap: its first quarter, one
    # marker, its last three quarters (all ASCII: no character is cut at the edges).
    written = "BEGIN\n" + ("0123456789abcdef\n" * 1233619)[:20971520] + "\nEND\n"
    cap = 4 * 1024 * 1024
    marker = f"\n[nexus-jobd: {len(written) - cap} bytes of stdout omitted; {len(written)} bytes in all]\n"
    assert (row["status"], row["stdout_bytes"]) == ("completed", len(written))
    assert row["stdout"] == written[: cap // 4] + marker + written[-(cap - cap // 4):]
    assert row["stdout"].endswith("0123456789abcdef\n0123456789abcd\nEND\n")


def test_exit_codes_and_statuses(daemon: Daemon, db: Db) -> None:
    ok = db.insert("exit 0")
    failing = db.insert("echo partial; exit 3")
    killed = db.insert("kill -KILL $$")
    missing = db.insert("--version", tool="git", env={"PATH": "/nonexistent"})
    rows = {name: db.wait_status(job) for name, job in
            {"ok": ok, "failing": failing, "killed": killed, "missing": missing}.items()}
    assert (rows["ok"]["status"], rows["ok"]["exit_code"]) == ("completed", 0)
    assert (rows["failing"]["status"], rows["failing"]["exit_code"], rows["failing"]["stdout"]) == (
        "failed", 3, "partial\n")
    assert (rows["killed"]["status"], rows["killed"]["exit_code"]) == ("failed", 137)
    assert "signal 9 (SIGKILL)" in rows["killed"]["error"]
    assert (rows["missing"]["status"], rows["missing"]["exit_code"]) == ("failed", 127)
    assert {name: row["attempt"] for name, row in rows.items()} == dict.fromkeys(rows, 1)  # max_attempts 1: no retry
    assert "'git' was not found on PATH" in rows["missing"]["error"]


def test_job_runs_in_its_own_process_group_with_stdin_closed(daemon: Daemon, db: Db) -> None:
    job_id = db.insert('read -r line; echo "read=$?"; ps -o pgid= -p $$ | tr -d " "; echo $$')
    row = db.wait_status(job_id)
    read_status, pgid, pid = row["stdout"].split()
    assert read_status == "read=1"  # EOF at once from /dev/null, no hang
    assert pgid == pid


def test_cwd_env_and_default_cwd(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    in_dir = db.insert("pwd; echo $GREETING $COUNT; echo ${HOME-unset}",
                       cwd=str(work), env={"GREETING": "hello world", "COUNT": 3, "HOME": None})
    default = db.insert("pwd")
    assert db.wait_status(in_dir)["stdout"] == f"{work}\nhello world 3\nunset\n"
    assert db.wait_status(default)["stdout"] == f"{tmp_path}\n"  # the daemon's HOME in these tests


def test_git_and_docker_argv_never_go_through_a_shell(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    # The tool name repeated is accepted; `;` and `$HOME` reach git as literal arguments.
    status = db.insert("git status --porcelain", tool="git", cwd=str(repo))
    literal = db.insert("rev-parse --sq-quote 'no;such $HOME' \"two words\"", tool="git", cwd=str(repo))
    # NexusCLI's trailing metadata line is not part of the command.
    with_meta = db.insert('--version\n# {"conversationId": "c1", "messageId": "m1"}', tool="git")
    assert (db.wait_status(status)["status"], db.job(status)["stdout"]) == ("completed", "")
    row = db.wait_status(literal)
    assert (row["status"], row["stdout"].strip()) == ("completed", "'no;such $HOME' 'two words'")
    row = db.wait_status(with_meta)
    assert (row["status"], row["stdout"].split()[:2]) == ("completed", ["git", "version"])


def test_unknown_node_fails_at_once_listing_the_configured_nodes(daemon: Daemon, db: Db) -> None:
    job_id = db.insert("true", node_id="pi-in-the-closet")
    row = db.wait_status(job_id)
    assert row["status"] == "failed"
    assert "unknown node" in row["error"] and "localhost" in row["error"]
    assert row["started_at"] is not None and row["duration"] == 0


@pytest.mark.backends("sqlite")  # about the SQLite file itself
def test_nexuscli_database_keeps_working_for_both_programs(db_path: Path, daemon_factory: Callable[..., Daemon]
                                                          ) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.executescript((FIXTURES / "nexuscli_schema.sql").read_text())
    migrations_before = conn.execute("SELECT * FROM _migrations ORDER BY id").fetchall()
    tables_before = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    daemon_factory().start()
    db = Db(db_path)
    # NexusCLI's own INSERT, verbatim.
    db.conn.execute("INSERT INTO jobs (id, conversation_id, message_id, node_id, tool, command, status, created_at) "
                    "VALUES (?,?,?,?,?,?,'queued',?)", ("j1", None, None, "localhost", "bash", "echo via nexus", 1))
    row = db.wait_status("j1")
    assert (row["status"], row["stdout"]) == ("completed", "via nexus\n")
    # NexusCLI's tables, constraints and migration history are as they were.
    assert [tuple(r) for r in db.conn.execute("SELECT * FROM _migrations ORDER BY id")] == migrations_before
    tables_after = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables_after - tables_before == {"jobd_migrations", "jobd_workers"}  # only tables of our own
    try:
        db.conn.execute("UPDATE jobs SET status='running' WHERE id='j1'")
        raise AssertionError("the CHECK constraint on jobs.status is gone")
    except sqlite3.IntegrityError:
        pass
    # And NexusCLI's cancel of a queued row keeps it from starting.
    db.conn.execute("BEGIN")
    db.conn.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                    "VALUES ('j2', 'localhost', 'bash', 'echo never', 'queued', 2)")
    db.conn.execute("UPDATE jobs SET status = ?, completed_at = ? WHERE id = ?", ("cancelled", 3, "j2"))
    db.conn.execute("COMMIT")
    db.wait_status(db.insert("true"))  # a later row ran, so the daemon saw the cancelled one
    assert (db.job("j2")["status"], db.job("j2")["started_at"]) == ("cancelled", None)
    db.close()


def test_logs_are_json_lines_with_one_event_per_state_change(daemon: Daemon, db: Db) -> None:
    job_id = db.insert("exit 4")
    db.wait_status(job_id)
    wait_for(lambda: daemon.events("job.finished"), message="job.finished logged")
    claimed = [e for e in daemon.events("job.claimed") if e["job_id"] == job_id]
    finished = [e for e in daemon.events("job.finished") if e["job_id"] == job_id]
    assert len(claimed) == 1 and len(finished) == 1
    assert {k: finished[0][k] for k in ("node", "tool", "exit_code", "status")} == {
        "node": "localhost", "tool": "bash", "exit_code": 4, "status": "failed"}
    assert isinstance(finished[0]["duration_ms"], int)
    for line in daemon.log().splitlines():
        json.loads(line)  # every line is JSON when stderr is not a TTY


@pytest.mark.backends("sqlite")  # about the SQLite file itself
def test_database_file_is_private(daemon: Daemon, db: Db) -> None:
    assert os.stat(db.path).st_mode & 0o777 == 0o600


def test_embedded_default_needs_no_config_and_no_flags(tmp_path: Path) -> None:
    """`nexus-jobd run` alone: ~/.nexuscli/nexuscli.db (created private) and the local node `localhost`."""
    from tests.conftest import NEXUS_JOBD

    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_JOBD")} | {"HOME": str(tmp_path)}
    proc = subprocess.Popen([*NEXUS_JOBD, "run"], env=env, stderr=subprocess.DEVNULL)
    try:
        db_file = tmp_path / ".nexuscli" / "nexuscli.db"

        def migrated() -> bool:
            if not db_file.exists():
                return False
            with contextlib.closing(sqlite3.connect(db_file)) as conn:
                return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobd_migrations'").fetchone())

        wait_for(migrated, message="database created")
        assert os.stat(db_file.parent).st_mode & 0o777 == 0o700
        assert os.stat(db_file).st_mode & 0o777 == 0o600
        db = Db(db_file)
        row = db.wait_status(db.insert("echo default"))
        assert (row["status"], row["stdout"]) == ("completed", "default\n")
        db.close()
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def processes_with(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == wanted:
                found.append(int(entry.name))
    return found


RECIPE = "setsid -f sh -c 'exec {} >/dev/null 2>&1 </dev/null'"  # the README's way to outlive the job


@pytest.mark.backends("sqlite")  # about the local node's process groups, whatever the database
def test_the_readmes_way_to_outlive_the_job_survives_the_group_kill(daemon: Daemon, db: Db) -> None:
    """Before, the README advised `setsid -f CMD >/dev/null 2>&1`, which the group kill at the job's end could
    take: the job's pipes were closed, so nothing held the kill back until setsid had moved CMD out of the group."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert RECIPE.format("myserver") in readme  # what is tested here is what the README says
    marks = [str(3_000_000 + os.getpid() * 100 + i) for i in range(10)]
    try:
        for mark in marks:
            row = db.wait_status(db.insert(RECIPE.format(f"sleep {mark}")))
            assert row["status"] == "completed", row
            assert row["duration"] < 1500, row["duration"]  # it waited for the pipes, not for drain_timeout_ms
            assert processes_with(["sleep", mark]), f"attempt {marks.index(mark) + 1}: killed with the job's group"
    finally:
        for mark in marks:
            for pid in processes_with(["sleep", mark]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
