"""The `nexus-jobd` command as users type it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NEXUS_JOBD, Daemon, Db, wait_for


def cli(db: Db, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*NEXUS_JOBD, "--db", str(db.path), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


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


def test_logs_follow_ends_when_the_job_ends(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job_id = db.insert(f"echo before; while [ ! -e {gate} ]; do sleep 0.02; done; echo after")
    wait_for(lambda: db.job(job_id)["stdout"] == "before\n", message="first line")
    follower = subprocess.Popen([*NEXUS_JOBD, "--db", str(db.path), "logs", "-f", job_id], stdout=subprocess.PIPE,
                                text=True)
    assert follower.stdout is not None
    assert follower.stdout.readline() == "before\n"
    gate.touch()
    assert follower.stdout.read() == "after\n"
    assert follower.wait(10) == 0


def test_logs_follow_across_the_output_cap(db: Db, daemon_factory: object, tmp_path: Path) -> None:
    from collections.abc import Callable

    assert callable(daemon_factory)
    make: Callable[..., Daemon] = daemon_factory
    make(config="[daemon]\noutput_cap_bytes = 4096\n").start()
    result = cli(db, "submit", "--follow", "--", "for i in $(seq 1 3000); do echo line$i; done")
    assert result.stdout.startswith("line1\nline2\n")
    assert result.stdout.endswith("line2999\nline3000\n")


def test_prefix_must_be_unique(daemon: Daemon, db: Db) -> None:
    db.insert("true", id="abc-1")
    db.insert("true", id="abc-2")
    result = cli(db, "show", "abc", check=False)
    assert result.returncode == 1 and "more than one job" in result.stderr
    result = cli(db, "show", "zzz", check=False)
    assert result.returncode == 1 and "no job with an id starting with 'zzz'" in result.stderr


@pytest.mark.parametrize(
    "command", [[], ["run"], ["submit"], ["ps"], ["show"], ["logs"], ["cancel"], ["retry"], ["db"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = subprocess.run([*NEXUS_JOBD, *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: nexus-jobd")


def test_db_migrate_is_idempotent(db: Db) -> None:
    assert cli(db, "db", "migrate").stdout.strip() == f"{db.path}: up to date"
