"""The `nexus-jobd` command as users type it."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NEXUS_JOBD, Daemon, Db, cli, cli_env, run_cli, wait_for

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
