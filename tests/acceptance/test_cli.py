"""The `nexus-jobd` command as users type it."""

from __future__ import annotations

import itertools
import json
import re
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NEXUS_JOBD, Daemon, Db, cli, cli_env, now_ms, run_cli, wait_for

# The contract holds on either database: each test runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.backends("sqlite", "postgres")


def test_submit_prints_the_id_and_the_row_has_every_option(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    result = cli(db, "submit", "--cwd", str(tmp_path), "--env", "A=1", "--env", "B=two words", "--priority", "3",
                 "--", "pwd; echo $A $B")
    job_id = result.stdout.strip()
    row = db.wait_status(job_id)
    assert (row["stdout"], row["priority"], row["node_id"], row["tool"]) == (
        f"{tmp_path}\n1 two words\n", 3, "localhost", "bash")


def test_submit_follow_streams_output_and_exits_with_the_job_code(daemon: Daemon, db: Db) -> None:
    result = cli(db, "submit", "--follow", "--", "echo one; sleep 0.3; echo two >&2; exit 5", check=False)
    assert result.returncode == 5
    assert result.stdout == "one\n"
    lines = result.stderr.splitlines()
    assert "two" in lines
    assert db.job(lines[0])["exit_code"] == 5  # the id goes to stderr when following


def test_submit_git_tool(daemon: Daemon, db: Db) -> None:
    result = cli(db, "submit", "--follow", "--tool", "git", "--", "--version")
    assert result.stdout.startswith("git version")


def test_ps_show_and_logs(daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo to-out; echo to-err >&2; exit 2")
    db.wait_status(job_id)
    table = cli(db, "ps").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "STATUS", "NODE", "TOOL"]
    assert any(line.startswith(job_id[:8]) and " failed " in line for line in table[1:])
    listed = json.loads(cli(db, "ps", "--json", "--status", "failed", "--limit", "5").stdout)
    assert [r["id"] for r in listed] == [job_id] and listed[0]["exit_code"] == 2
    assert json.loads(cli(db, "ps", "--json", "--status", "completed").stdout) == []
    shown = json.loads(cli(db, "show", "--json", job_id[:6]).stdout)
    assert (shown["id"], shown["stdout"], shown["stderr"]) == (job_id, "to-out\n", "to-err\n")
    assert "exit_code: 2" in cli(db, "show", job_id).stdout
    logs = cli(db, "logs", job_id[:6])
    assert (logs.stdout, logs.stderr) == ("to-out\n", "to-err\n")


@pytest.mark.timeout(60)  # it blocks on the pipes of the processes it starts: a hang fails here
def test_logs_follow_ends_when_the_job_ends(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job_id = db.insert(f"echo before; while [ ! -e {gate} ]; do sleep 0.02; done; echo after")
    wait_for(lambda: db.job(job_id)["stdout"] == "before\n", message="first line")
    follower = subprocess.Popen([*NEXUS_JOBD, "--db", db.target, "logs", "-f", job_id], stdout=subprocess.PIPE,
                                text=True, env=cli_env(tmp_path / "cli-home"))
    assert follower.stdout is not None
    assert follower.stdout.readline() == "before\n"
    gate.touch()
    assert follower.stdout.read() == "after\n"
    assert follower.wait(10) == 0


def test_logs_follow_across_the_output_cap(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """What a follower prints is the stream, byte for byte, but where it fell behind the cap: there one line says
    how many bytes it did not show. Nothing shown twice, nothing left out unsaid, in order to the last byte."""
    daemon_factory(config="[daemon]\noutput_cap_bytes = 4096\n").start()
    result = cli(db, "submit", "--follow", "--", "for i in $(seq 1 3000); do echo line$i; done")
    written = "".join(f"line{i}\n" for i in range(1, 3001))
    pieces = re.split(r"\n\[nexus-jobd: (\d+) bytes not shown\]\n", result.stdout)
    position = 0
    for shown, skipped in itertools.zip_longest(pieces[::2], pieces[1::2], fillvalue="0"):
        assert written[position:position + len(shown)] == shown, (position, shown[:40])
        position += len(shown) + int(skipped)
    assert position == len(written)
    assert result.stdout.startswith("line1\nline2\n") and result.stdout.endswith("line2999\nline3000\n")


def test_prefix_must_be_unique(daemon: Daemon, db: Db) -> None:
    db.insert("true", id="abc-1")
    db.insert("true", id="abc-2")
    result = cli(db, "show", "abc", check=False)
    assert result.returncode == 1 and "more than one job" in result.stderr
    result = cli(db, "show", "zzz", check=False)
    assert result.returncode == 1 and "no job with an id starting with 'zzz'" in result.stderr


@pytest.mark.parametrize(
    "command", [[], ["run"], ["submit"], ["ps"], ["show"], ["logs"], ["cancel"], ["retry"], ["db"]])
def test_help_on_every_command(command: list[str], tmp_path: Path) -> None:
    result = run_cli([*command, "--help"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: nexus-jobd")


def test_db_migrate_is_idempotent(db: Db) -> None:
    assert cli(db, "db", "migrate").stdout.strip() == f"{db.target}: up to date"


@pytest.mark.timeout(60)  # it blocks on the pipes of the processes it starts: a hang fails here
def test_global_options_before_or_after_the_command(db: Db, tmp_path: Path) -> None:
    """`--db`, `--config`, `--log-level`, `--log-format` where users type them: after the command too. After
    `submit ... --` every word is the job's, options included."""
    home = tmp_path / "cli-home"
    config = tmp_path / "jobd.toml"
    config.write_text("[daemon]\n")
    daemon = subprocess.Popen([*NEXUS_JOBD, "run", "--db", db.target, "--log-format", "json", "--log-level",
                               "info", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=cli_env(home), cwd=tmp_path)
    try:
        assert daemon.stdout is not None
        for line in daemon.stdout:  # the log is JSON, as asked after the command
            if json.loads(line).get("event") == "dispatch.started":
                break
        result = run_cli(["submit", "--db", db.target, "--follow", "--", "echo", "--db", "elsewhere", "--json"], home)
        assert (result.returncode, result.stdout) == (0, "--db elsewhere --json\n"), result.stderr
        listed = run_cli(["ps", "--db", db.target, "--json"], home)
        assert listed.returncode == 0, listed.stderr
        assert [row["command"] for row in json.loads(listed.stdout)] == ["echo --db elsewhere --json"]
        # Given both before and after the command, the one after it wins.
        again = run_cli(["--db", str(tmp_path / "missing.db"), "ps", "--db", db.target, "--json"], home)
        assert again.returncode == 0 and json.loads(again.stdout)[0]["status"] == "completed", again.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)


def test_a_relative_cwd_is_resolved_from_the_callers_directory(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    caller = tmp_path / "caller"
    (caller / "sub").mkdir(parents=True)
    assert cli(db, "submit", "--cwd", ".", "-f", "--", "pwd", cwd=caller).stdout == f"{caller}\n"
    assert cli(db, "submit", "--cwd", "sub", "-f", "--", "pwd", cwd=caller).stdout == f"{caller / 'sub'}\n"
    job_id = cli(db, "submit", "--cwd", "sub/..", "--", "true", cwd=caller).stdout.strip()
    assert db.job(job_id)["cwd"] == str(caller)  # stored absolute: any daemon finds the same directory


def test_submit_follow_shows_every_attempt_of_a_fast_retried_job(db: Db, daemon_factory: object) -> None:
    """Each attempt's output once, under its own marker, whatever state the row was in at each look (a fast
    attempt is often over before the first look): never the first attempt's output alone."""
    assert callable(daemon_factory)
    daemon_factory(config="[daemon]\nretry_backoff_ms = 400\n").start()
    result = cli(db, "submit", "-f", "--max-attempts", "3", "--", "echo try $(date +%s%N); exit 5", check=False)
    assert result.returncode == 5, result.stderr
    tries = result.stdout.splitlines()
    assert len(tries) == 3 and len(set(tries)) == 3 and all(t.startswith("try ") for t in tries), result.stdout
    assert "[nexus-jobd: attempt 2]" in result.stderr and "[nexus-jobd: attempt 3]" in result.stderr
    job_id = result.stderr.splitlines()[0]
    assert cli(db, "logs", job_id).stdout == tries[-1] + "\n"
    assert db.job(job_id)["attempt"] == 3


def test_show_says_when_a_time_is_still_to_come(db: Db) -> None:
    """Before: a run_after an hour ahead was shown as "(0s ago)"."""
    created = now_ms()
    job_id = db.insert("true", created_at=created, run_after=created + 3_600_000)
    shown = cli(db, "show", job_id).stdout
    assert re.search(r"\n     run_after: \d+  \(in 59m \d+s\)\n", shown), shown
    assert re.search(r"\n    created_at: \d+  \(\d+s ago\)\n", shown), shown


def ps_ids(db: Db) -> list[str]:
    return [line.split()[0] for line in cli(db, "ps").stdout.splitlines()[1:]]


def test_the_ps_id_column_tells_every_listed_job_apart(db: Db) -> None:
    """Before: `tenk-09999` and `tenk-09998` were both shown as `tenk-099`, which names neither."""
    db.insert("true", id="tenk-09998", created_at=now_ms() - 2)
    db.insert("true", id="tenk-09999", created_at=now_ms() - 1)
    other = db.insert("true")
    assert ps_ids(db) == [other[:8], "tenk-09999", "tenk-09998"]
    for shown in ps_ids(db):
        assert cli(db, "show", "--json", shown).returncode == 0  # each works as the prefix it is shown as


def test_retry_of_a_job_whose_attempts_are_used_up_allows_one_more(db: Db) -> None:
    """Before: the retried job ran as attempt 4 of max_attempts 3 (`ps` showed TRY 4/3)."""
    job_id = db.insert("false", max_attempts=3)
    db.conn.execute("UPDATE jobs SET status = 'failed', attempt = 3, exit_code = 1, started_at = 1, completed_at = 2, "
                    "duration = 1 WHERE id = ?", (job_id,))
    assert cli(db, "retry", job_id).stdout == f"{job_id}: queued again (attempt 4 of 4)\n"
    assert (db.job(job_id)["attempt"], db.job(job_id)["max_attempts"]) == (3, 4)
    spare = db.insert("false", max_attempts=3)  # attempts left: max_attempts stays
    db.conn.execute("UPDATE jobs SET status = 'completed', attempt = 1, exit_code = 0, started_at = 1, "
                    "completed_at = 2, duration = 1 WHERE id = ?", (spare,))
    assert cli(db, "retry", spare).stdout == f"{spare}: queued again (attempt 2 of 3)\n"
    assert db.job(spare)["max_attempts"] == 3


@pytest.mark.backends("sqlite")
def test_ps_shows_a_null_id_as_null_and_a_row_without_a_time_last(db: Db) -> None:
    """Before: a NULL id printed as `None`, and a row with `created_at = 'yesterday'` (TEXT sorts above every
    number in SQLite) stayed at the top of `ps` for ever."""
    db.conn.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                    "VALUES (NULL, 'localhost', 'bash', 'true', 'queued', 1)")
    db.insert("true", id="whenever", created_at="yesterday")
    newest = db.insert("true")
    assert ps_ids(db) == [newest[:8], "NULL", "whenever"]


def test_nodes_list_with_an_id_shows_that_node(db: Db) -> None:
    """Before: `nodes list ID` ignored the id and listed every node."""
    for node in ("pi", "phone"):
        db.conn.execute("INSERT INTO nodes (id, hostname, status, created_at) VALUES (?, ?, 'online', 1)",
                        (node, f"{node}.lan"))
    assert [row["id"] for row in json.loads(cli(db, "nodes", "list", "pi", "--json").stdout)] == ["pi"]
    assert [line.split()[0] for line in cli(db, "nodes", "list", "phone").stdout.splitlines()] == ["NODE", "phone"]
    missing = cli(db, "nodes", "list", "mars", check=False)
    assert missing.returncode == 1 and missing.stderr == (
        "nexus-jobd: no node 'mars' in the nodes table; it has: phone, pi\n"), missing.stderr


def test_rows_no_daemon_runs_are_reported_and_cancel_retry_prune_agree(db: Db, daemon_factory: Callable[..., Daemon],
                                                                       backend: str) -> None:
    """Before: a row inserted as `executing` by hand (no worker_id) stayed for ever with no word: `db check` said
    ok, `status` did not count it, `cancel` said "already finished" while `retry` said "has not ended"."""
    stuck, ghost = db.insert("true"), db.insert("true")
    db.conn.execute("UPDATE jobs SET status = 'executing', started_at = ? WHERE id = ?", (now_ms() - 1000, stuck))
    db.conn.execute("UPDATE jobs SET status = 'executing', worker_id = 'gone:1:x' WHERE id = ?", (ghost,))
    check = cli(db, "db", "check", check=False)
    assert check.returncode == 1, check.stdout
    assert (f"{db.target}: 2 rows no daemon runs or finishes: {stuck} (executing, but held by no daemon: worker_id "
            f"NULL), {ghost} (executing, but held by 'gone:1:x', no daemon of this database); if no other program "
            "runs them: `nexus-jobd cancel ID` ends one, `nexus-jobd retry ID` queues it again") in check.stdout
    assert "2 rows no daemon runs or finishes" in cli(db, "status").stdout
    assert json.loads(cli(db, "status", "--json").stdout)["jobs"]["stranded"] == 2
    daemon = daemon_factory().start()
    (event,) = wait_for(lambda: daemon.events("db.stranded_jobs"), message="db.stranded_jobs")
    assert (event["level"], event["count"], len(event["jobs"])) == ("warning", 2, 2), event
    assert db.job(stuck)["status"] == "executing"  # reported, never touched: another program may run it
    assert cli(db, "cancel", stuck).stdout == f"{stuck}: cancelled\n"
    assert db.job(stuck)["duration"] is not None  # final: no daemon will record its end
    assert "left 1 rows no daemon runs or finishes" in cli(db, "prune", "--older-than", "0s").stdout
    assert cli(db, "retry", ghost).stdout == f"{ghost}: queued again (attempt 1 of 1)\n"
    assert db.wait_status(ghost)["status"] == "completed"  # queued again, the daemon runs it
    assert cli(db, "db", "check").stdout == f"{db.target}: ok\n"


@pytest.mark.backends("sqlite")  # PostgreSQL's `jobs` has the CHECK constraint: no such row can exist there
def test_status_typos_are_reported_too(tmp_path: Path, backend: str) -> None:
    """On a `jobs` made without the contract's CHECK constraints, a typo in `status` is stored as typed."""
    path = tmp_path / "loose.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, conversation_id TEXT, message_id TEXT, node_id TEXT, "
                  "tool TEXT, command TEXT, status TEXT, exit_code INTEGER, stdout TEXT, stderr TEXT, "
                  "duration INTEGER, created_at INTEGER, started_at INTEGER, completed_at INTEGER)")
    conn.executemany("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                     "VALUES (?, 'localhost', 'bash', 'true', ?, 1)", [("typo-1", "Queued"), ("typo-2", None)])
    conn.commit()
    conn.close()
    home = tmp_path / "home"
    run_cli(["--db", str(path), "db", "migrate"], home).check_returncode()
    check = run_cli(["--db", str(path), "db", "check"], home)
    assert check.returncode == 1 and ("2 rows no daemon runs or finishes: typo-1 (status 'Queued', which no daemon "
                                      "runs), typo-2 (status NULL, which no daemon runs)") in check.stdout
    assert run_cli(["--db", str(path), "cancel", "typo-1"], home).stdout == "typo-1: cancelled\n"
    assert run_cli(["--db", str(path), "retry", "typo-2"], home).stdout == "typo-2: queued again (attempt 1 of 1)\n"
    assert run_cli(["--db", str(path), "db", "check"], home).returncode == 0


def test_stopped_daemons_are_forgotten_at_start_up_and_by_prune(db: Db, daemon_factory: Callable[..., Daemon]
                                                                ) -> None:
    """Before: jobd_workers kept every daemon that ever started; `status` listed them all."""
    long_ago = now_ms() - 30 * 86_400_000

    def stopped_daemons(count: int, start: int) -> None:
        for i in range(start, start + count):
            db.conn.execute("INSERT INTO jobd_workers (id, host, pid, started_at, heartbeat_at, stopped_at, "
                            "stop_reason, nodes) VALUES (?, 'h', 1, ?, ?, ?, 'clean shutdown', '[]')",
                            (f"old:{i}", long_ago + i, long_ago + i, long_ago + i))

    stopped_daemons(25, 0)
    daemon = daemon_factory().start()
    (event,) = wait_for(lambda: daemon.events("db.workers_pruned"), message="db.workers_pruned")
    assert event["deleted"] == 6  # the 20 that started last stay, this daemon among them
    assert db.conn.execute("SELECT count(*) FROM jobd_workers").fetchone()[0] == 20
    stopped_daemons(3, 100)  # three more, started after the rest: the rest are out of the last 20
    assert "forgot 3 daemons that stopped more than 7 days ago" in cli(db, "prune", "--older-than", "1d").stdout
    assert db.conn.execute("SELECT count(*) FROM jobd_workers").fetchone()[0] == 20


def test_help_says_a_database_may_be_a_postgresql_url(tmp_path: Path) -> None:
    """Before: "Run jobs queued in the SQLite `jobs` table" and "--db DB  database file"."""
    shown = " ".join(subprocess.run([*NEXUS_JOBD, "--help"], capture_output=True, text=True, check=True,
                                    env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
                                    ).stdout.split())
    assert "--db PATH|URL" in shown and "postgresql://" in shown, shown
    assert "SQLite `jobs` table" not in shown, shown
