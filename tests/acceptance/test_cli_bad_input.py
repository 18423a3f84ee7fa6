"""The `nexus-jobd` command given what a new user gives it: another program's database, a read-only file, bad
numbers, no daemon. Every answer is one line that says what to do, with the right exit code; never a traceback,
never a hang."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, NEXUS_JOBD, Daemon, Db, cli, cli_env, mounted_tmpfs, now_ms, require, run_cli

# Every command, as a user with a database that is not the contract's would try it (X: a job id prefix).
EVERY_COMMAND = [["ps"], ["ps", "--json"], ["status"], ["submit", "--", "true"], ["show", "x"], ["logs", "x"],
                 ["nodes"], ["backup", "BACKUP"], ["cancel", "x"], ["retry", "x"], ["prune", "--older-than", "1d"],
                 ["run"], ["db", "migrate"], ["db", "check"]]


def run_on(path: Path, command: list[str], home: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    command = [str(home / "backup.db") if word == "BACKUP" else word for word in command]
    try:
        return run_cli(["--db", str(path), *command], home, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`nexus-jobd {' '.join(command)}` hung for {timeout}s: {e.stderr!r}") from None


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one line a command stopped with; `run`'s (a JSON log event, not on a TTY) as the others say it."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    if len(lines) == 1 and lines[0].startswith('{"'):
        event = json.loads(lines[0])
        assert (event["event"], event["exit_code"]) == ("daemon.refused", code), event
        return f"nexus-jobd: {event['message']}"
    assert len(lines) == 1 and lines[0].startswith("nexus-jobd"), result.stderr
    return lines[0]


@pytest.mark.parametrize(("schema", "words"), [
    ("CREATE TABLE jobs (id INTEGER PRIMARY KEY, foo TEXT);",
     "table 'jobs' lacks the contract's columns conversation_id, message_id, node_id, tool, command, status"),
    ("CREATE TABLE t (id TEXT, node_id TEXT, tool TEXT, command TEXT, status TEXT, created_at INTEGER);"
     "CREATE VIEW jobs AS SELECT * FROM t;", "'jobs' is a view, not a table"),
], ids=["foreign-table", "view"])
def test_a_database_that_is_not_the_contracts_is_refused_by_every_command(tmp_path: Path, schema: str,
                                                                          words: str) -> None:
    """Before: a traceback, then most commands hung for ever; a view gave `views may not be indexed`."""
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.executescript(schema)
    conn.close()
    before = path.read_bytes()
    for command in EVERY_COMMAND:
        line = one_line_error(run_on(path, command, tmp_path / "home"))
        assert f"{path}: not a usable database: {words}" in line, (command, line)
        assert "--db" in line, line  # what to do: the wrong file was given
    assert path.read_bytes() == before  # not even switched to WAL
    assert not (tmp_path / "home" / "backup.db").exists()


def test_a_migration_that_fails_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """The root cause of the hang: migrate raised before the CLI closed the store, and aiosqlite's thread (no
    daemon thread) kept the process alive after the traceback. A daemon's table that is not what the daemon
    made (here, a jobd_migrations without its columns) fails the migration itself."""
    path = tmp_path / "odd.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE jobd_migrations (x);")
    conn.close()
    for command in EVERY_COMMAND:
        line = one_line_error(run_on(path, command, tmp_path / "home"))
        assert str(path) in line and "no such column: name" in line, (command, line)


def stderr_lines(proc: subprocess.Popen[str], *, stdout: bool = False) -> queue.Queue[str]:
    """The lines of the process's stderr (or stdout), as they come."""
    stream = proc.stdout if stdout else proc.stderr
    assert stream is not None
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def next_line(lines: queue.Queue[str], timeout: float) -> str | None:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return None


@pytest.mark.backends("sqlite", "postgres")
def test_follow_without_a_live_daemon_says_so_and_ctrl_c_says_how_to_cancel(db: Db, tmp_path: Path) -> None:
    """Before: `submit --follow` with no daemon waited in silence for ever."""
    # A daemon that is alive for the lease (heartbeat now) and serves localhost: nothing to say.
    db.conn.execute("INSERT INTO jobd_workers (id, host, pid, started_at, heartbeat_at, nodes) "
                    "VALUES ('w1', 'h', 1, ?, ?, '[\"localhost\"]')", (now_ms(), now_ms()))
    follower = subprocess.Popen([*NEXUS_JOBD, "--db", db.target, "submit", "-f", "--", "echo", "hi"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env(tmp_path / "home"))
    try:
        lines = stderr_lines(follower)
        job_id = next_line(lines, 10)
        assert job_id is not None and db.job(job_id)["status"] == "queued"
        # Each turn, the follower prints what the row's output gained, then (the first time at once) looks for a
        # live daemon. Output the test writes into the row shows the turns: the second line, a turn after a look.
        out = stderr_lines(follower, stdout=True)
        for text in ("tick 1\n", "tick 1\ntick 2\n"):
            db.conn.execute("UPDATE jobs SET stdout = ?, stdout_bytes = ? WHERE id = ?", (text, len(text), job_id))
            assert next_line(out, 10) == text.splitlines()[-1]
        assert next_line(lines, 0.5) is None  # it looked, found a live daemon serving the node, and only waits
        # That daemon stops answering: its lease (15 s by default) runs out.
        db.conn.execute("UPDATE jobd_workers SET heartbeat_at = ?", (now_ms() - 60_000,))
        warning = next_line(lines, 5)
        assert warning == (f"nexus-jobd: no live daemon serves node 'localhost' on {db.target}: job {job_id} stays "
                           "queued until one does (start one with `nexus-jobd run`; `nexus-jobd status` lists the "
                           "daemons)")
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 130
        said = next_line(lines, 5)
        assert said is not None and f"job {job_id} was left queued" in said, said
        assert f"`nexus-jobd cancel {job_id}`" in said, said
        assert db.job(job_id)["status"] == "queued"
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


@pytest.mark.backends("sqlite", "postgres")
def test_no_daemon_at_all_is_said_at_once(db: Db, tmp_path: Path) -> None:
    follower = subprocess.Popen([*NEXUS_JOBD, "--db", db.target, "submit", "--node", "localhost", "-f", "--",
                                 "true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env(tmp_path / "home"))
    try:
        lines = stderr_lines(follower)
        assert next_line(lines, 10) is not None  # the id
        warning = next_line(lines, 5)
        assert warning is not None and "no live daemon serves node 'localhost'" in warning
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 130


# (arguments after `nexus-jobd --db DB`, words the error must contain)
USAGE_ERRORS = [
    (["submit", "--timeout", "nan", "--", "true"], "argument --timeout: 'nan' is not a finite number"),
    (["submit", "--timeout", "inf", "--", "true"], "argument --timeout: 'inf' is not a finite number"),
    (["submit", "--timeout", "1e20", "--", "true"], "'1e20' is out of range; expected seconds from 0.001 to 31622400"),
    (["submit", "--timeout", "-1", "--", "true"], "'-1' is out of range"),
    (["submit", "--timeout", "0.0001", "--", "true"], "'0.0001' is out of range"),
    (["submit", "--timeout", "abc", "--", "true"], "'abc' is not a number"),
    (["submit", "--delay", "nan", "--", "true"], "argument --delay: 'nan' is not a finite number"),
    (["submit", "--delay", "inf", "--", "true"], "argument --delay: 'inf' is not a finite number"),
    (["submit", "--delay", "1e30", "--", "true"], "'1e30' is out of range; expected seconds from 0 to 31622400"),
    (["submit", "--delay", "-1e3", "--", "true"], "'-1e3' is out of range"),
    (["submit", "--priority", "99999999999999999999", "--", "true"],
     "expected an integer from -9223372036854775808 to 9223372036854775807"),
    (["submit", "--priority", "high", "--", "true"], "'high' is not an integer"),
    (["submit", "--max-attempts", "0", "--", "true"], "'0' is out of range: expected an integer from 1 to 1000"),
    (["submit", "--max-attempts", "1001", "--", "true"], "'1001' is out of range: expected an integer from 1 to 1000"),
    (["submit", "--depends-on", "", "--", "true"], "argument --depends-on: an empty job id"),
    (["submit", "--node", "", "--", "true"], "argument --node: an empty node id"),
    (["submit", "--cwd", "", "--", "true"], "argument --cwd: an empty directory"),
    (["submit", "--env", "BAD", "--", "true"], "argument --env: 'BAD': expected NAME=VALUE"),
    (["submit", "--env", "=x", "--", "true"], "argument --env: '=x': expected NAME=VALUE"),
    (["submit"], "nothing to run: give the command after --"),
    (["submit", "--", " "], "nothing to run"),
    (["ps", "--limit", "99999999999999999999"], "argument --limit: '99999999999999999999' is out of range"),
    (["ps", "--limit", "0"], "argument --limit: '0' is out of range"),
    (["prune", "--older-than", "99999999999999999999d"], "at most 36500d"),
    (["prune", "--older-than", "-5d"], "'-5d': an age cannot be negative"),
    (["prune", "--older-than", "5"], "'5': expected a number and a unit"),
    (["show", ""], "argument id: an empty job id"),
    (["cancel", ""], "argument ID: an empty job id"),
    (["nodes", "check"], "nodes check: which node?"),
    (["--db", "", "ps"], "argument --db: an empty path"),
    (["ps", "--db", ""], "argument --db: an empty path"),
    (["ps", "--config", ""], "argument --config: an empty path"),
]


@pytest.mark.parametrize(("args", "words"), USAGE_ERRORS, ids=[" ".join(a) or "-" for a, _ in USAGE_ERRORS])
def test_bad_values_are_usage_errors_that_say_what_is_expected(db: Db, tmp_path: Path, args: list[str],
                                                               words: str) -> None:
    """Before: tracebacks (nan, inf, numbers past SQLite's INTEGER), values the daemon then failed (a negative or
    sub-millisecond timeout, 0 or 1001 attempts), a silent default (an empty --depends-on, --node or --db), exit 1
    for usage errors, and argparse's "expected one argument" for -5d."""
    result = run_cli(["--db", db.target, *args], tmp_path / "home")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("usage: nexus-jobd"), result.stderr
    assert words in result.stderr, result.stderr
    assert db.conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


@pytest.mark.backends("sqlite", "postgres")
def test_values_at_the_bounds_are_taken(db: Db) -> None:
    first = cli(db, "submit", "--timeout", "0.001", "--max-attempts", "1000", "--priority", str(2**63 - 1),
                "--delay", "31622400", "--", "true").stdout.strip()
    row = db.job(first)
    assert (row["timeout_ms"], row["max_attempts"], row["priority"]) == (1, 1000, 2**63 - 1)
    assert row["run_after"] >= row["created_at"] + 31622400 * 1000
    second = cli(db, "submit", "--timeout", "31622400", "--max-attempts", "1", "--priority", str(-(2**63)),
                 "--delay", "0", "--depends-on", first[:8], "--", "true").stdout.strip()
    row = db.job(second)
    assert (row["timeout_ms"], row["max_attempts"], row["priority"]) == (31622400 * 1000, 1, -(2**63))
    assert (row["run_after"], row["depends_on"]) == (None, first)
    assert cli(db, "prune", "--older-than", "36500d").stdout.startswith("deleted 0 ")
    assert cli(db, "ps", "--limit", str(2**63 - 1), "--json").returncode == 0


NOT_UTF8_ID = "CAST(X'6a6f62ff' AS TEXT)"  # 'job' then a byte that is no UTF-8, stored as TEXT


def test_an_id_that_is_not_utf8_is_shown_readably(db: Db) -> None:
    """Before: `ps` showed b'job\\xf, `ps --json` crashed, `show` raised AssertionError. No daemon runs: the row
    stays as another program wrote it."""
    db.conn.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                    f"VALUES ({NOT_UTF8_ID}, 'localhost', 'bash', 'echo hi', 'queued', 0)")
    table = cli(db, "ps").stdout.splitlines()
    assert any(line.split()[:2] == ["job\\xff", "queued"] for line in table[1:]), table
    listed = json.loads(cli(db, "ps", "--json").stdout)
    assert [row["id"] for row in listed] == ["job\\xff"]
    shown = cli(db, "show", "job").stdout
    assert "            id: job\\xff\n" in shown and "   command: echo hi\n" in shown, shown
    assert json.loads(cli(db, "show", "--json", "job").stdout)["id"] == "job\\xff"
    assert cli(db, "cancel", "job").stdout == "job\\xff: cancelled\n"
    assert db.conn.execute("SELECT status FROM jobs").fetchone()[0] == "cancelled"


# -- a database this user may not write ----------------------------------------------------------------

def _as_nobody_prefix() -> list[str]:
    """The command prefix that runs the rest as user nobody. Where this Python lives under a directory nobody may
    not enter (pyenv under /root, mode 0700), the command runs in a mount namespace of its own where that
    directory is an empty tmpfs with just this interpreter's tree bind-mounted back in: nobody then runs exactly
    this Python, and nothing else of that directory is visible."""
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(sys.base_prefix).resolve()
    closed = next((d for d in reversed(base.parents) if d != Path("/") and not d.stat().st_mode & 0o001), None)
    if closed is None:
        return setpriv
    script = ('mount --make-rprivate / && t=$(mktemp -d) && mount --bind "$1" "$t" && '
              'mount -t tmpfs -o mode=0755 tmpfs "$2" && mkdir -p "$1" && mount --bind "$t" "$1" && shift 2 && '
              f'exec {" ".join(setpriv)} "$@"')
    return ["unshare", "-m", "sh", "-c", script, "sh", str(base), str(closed)]


NOBODY = _as_nobody_prefix()
READERS = [["ps"], ["ps", "--json"], ["show", "abc"], ["logs", "abc"], ["status"], ["nodes"], ["db", "check"],
           ["backup", "BACKUP"]]
WRITERS = [["submit", "--", "true"], ["cancel", "abc"], ["retry", "abc"], ["prune", "--older-than", "1d"],
           ["db", "migrate"]]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory user nobody can enter (pytest's tmp_path is private to root); nobody may write only `out/`."""
    require(os.geteuid() == 0, "running the CLI as another user needs root")
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to run the CLI as user nobody")
    probe = subprocess.run([*NOBODY, *NEXUS_JOBD, "--version"], capture_output=True, text=True)
    require(probe.returncode == 0, f"user nobody cannot run {NEXUS_JOBD[0]}: {probe.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="nexus-jobd-ro-"))
    try:
        path.chmod(0o755)
        (path / "out").mkdir(mode=0o777)
        (path / "out").chmod(0o777)
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(path: Path, command: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    command = [str(home / "out" / "backup.db") if word == "BACKUP" else word for word in command]
    return subprocess.run([*NOBODY, *NEXUS_JOBD, "--db", str(path), *command], capture_output=True, text=True,
                          timeout=60, env=cli_env(home / "out"), cwd=home)


def make_database(path: Path, tmp_path: Path, *, migrated: bool = True) -> None:
    """A database as the daemon leaves it when it is not running: WAL mode in its header, no -wal/-shm beside it."""
    if migrated:
        run_cli(["--db", str(path), "db", "migrate"], tmp_path / "home").check_returncode()
    conn = sqlite3.connect(path, isolation_level=None)
    if not migrated:
        conn.executescript((FIXTURES / "nexuscli_schema.sql").read_text())
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("INSERT INTO jobs (id, node_id, tool, command, status, exit_code, stdout, stderr, duration, "
                 "created_at, started_at, completed_at) "
                 "VALUES ('abc-1', 'localhost', 'bash', 'echo hi', 'completed', 0, 'hi\n', '', 5, 1, 1, 6)")
    conn.close()  # the last connection: the WAL goes into the file, -wal and -shm are removed
    assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()


def check_readers_work(path: Path, home: Path) -> None:
    for command in READERS:
        result = as_nobody(path, command, home)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
    assert "abc-1" in as_nobody(path, ["ps"], home).stdout
    assert json.loads(as_nobody(path, ["show", "--json", "abc"], home).stdout)["stdout"] == "hi\n"
    assert as_nobody(path, ["logs", "abc"], home).stdout == "hi\n"
    assert as_nobody(path, ["db", "check"], home).stdout == f"{path}: ok (read-only for this user)\n"
    backup = sqlite3.connect(home / "out" / "backup.db")
    assert backup.execute("SELECT id FROM jobs").fetchall() == [("abc-1",)]
    backup.close()


def test_a_read_only_file_can_be_read_and_writers_say_it_is_a_permissions_problem(shared_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """Before: every command, `ps` included, said "not a usable SQLite database: attempt to write a readonly
    database". Here the file is 0444 and its directory is root's: nobody may only read."""
    path = shared_dir / "jobs.db"
    make_database(path, tmp_path)
    path.chmod(0o444)
    before = path.read_bytes()
    check_readers_work(path, shared_dir)
    for command in WRITERS:
        line = one_line_error(as_nobody(path, command, shared_dir))
        assert line == (f"nexus-jobd: {path}: a permissions problem: user nobody (uid 65534) may not write {path} "
                        "(owned by root, mode 0444). Run nexus-jobd as root (e.g. `sudo -u root nexus-jobd ...`), "
                        "or give this user write access (chown/chmod); commands that only read (ps, show, logs, "
                        "status, nodes, backup, db check) need only read access to the file"), command
    assert path.read_bytes() == before


def test_a_directory_this_user_may_not_write_is_a_permissions_problem_too(shared_dir: Path, tmp_path: Path) -> None:
    """nobody owns the file and may write it, but SQLite cannot create the -wal and -shm beside it."""
    path = shared_dir / "jobs.db"
    make_database(path, tmp_path)
    os.chown(path, 65534, 65534)
    check_readers_work(path, shared_dir)
    line = one_line_error(as_nobody(path, ["submit", "--", "true"], shared_dir))
    assert (f"user nobody (uid 65534) may not write the directory {shared_dir} (owned by root, mode 0755), where "
            "SQLite creates jobs.db-wal and jobs.db-shm beside the database. Give this user write access there") in line


def test_reading_creates_no_file_that_the_owner_could_not_write(shared_dir: Path, tmp_path: Path) -> None:
    """In a directory anyone may write, SQLite's read-only mode would leave a -wal and -shm owned by the reader
    beside a WAL-mode file that has no -wal: the file is read as it stands instead. Before: the migration failed
    on the read-only file and the command hung."""
    shared = shared_dir / "shared"
    shared.mkdir()
    path = shared / "jobs.db"
    make_database(path, tmp_path)  # first: `db migrate` creates no database in a directory anyone may write
    shared.chmod(0o777)
    path.chmod(0o444)
    check_readers_work(path, shared_dir)
    assert sorted(p.name for p in shared.iterdir()) == ["jobs.db"]
    assert "permissions problem" in one_line_error(as_nobody(path, ["submit", "--", "true"], shared_dir))


def test_a_reader_sees_what_a_running_writer_committed(shared_dir: Path, tmp_path: Path) -> None:
    """With a -wal beside the file (its owner has it open), the read goes through SQLite's read-only mode and so
    sees commits that are still only in that WAL."""
    path = shared_dir / "jobs.db"
    make_database(path, tmp_path)
    path.chmod(0o644)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")  # the new row stays in the WAL
        writer.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                       "VALUES ('new-1', 'localhost', 'bash', 'true', 'queued', 2)")
        assert Path(f"{path}-wal").stat().st_size > 0
        listed = as_nobody(path, ["ps", "--json"], shared_dir)
        assert listed.returncode == 0, listed.stderr
        assert [row["id"] for row in json.loads(listed.stdout)] == ["new-1", "abc-1"]
    finally:
        writer.close()


def test_a_read_only_file_without_the_daemons_columns_says_to_migrate(shared_dir: Path, tmp_path: Path) -> None:
    path = shared_dir / "nexuscli.db"
    make_database(path, tmp_path, migrated=False)
    path.chmod(0o444)
    for command in (["ps"], ["show", "abc"], ["status"]):
        line = one_line_error(as_nobody(path, command, shared_dir))
        assert (f"{path}: opened read-only, since user nobody (uid 65534) may not write {path}" in line
                and "the daemon's migrations 0001_job_columns, 0002_lifecycle, 0003_pools are not applied" in line
                and "run `nexus-jobd db migrate` (or start the daemon) once as a user who may write it" in line), line


def test_a_file_this_user_may_not_read_says_so(shared_dir: Path, tmp_path: Path) -> None:
    path = shared_dir / "jobs.db"
    make_database(path, tmp_path)
    path.chmod(0o600)
    line = one_line_error(as_nobody(path, ["ps"], shared_dir))
    assert f"a permissions problem: user nobody (uid 65534) may not read {path} (owned by root, mode 0600)" in line


def test_a_directory_given_as_the_database_is_one_line_that_says_so(tmp_path: Path) -> None:
    """Before: an IsADirectoryError traceback from `ps`, `run` and `db migrate`."""
    directory = tmp_path / "data"
    directory.mkdir()
    for command in EVERY_COMMAND:
        line = one_line_error(run_on(directory, command, tmp_path / "home"))
        assert line.endswith(f"{directory} is a directory, not a database file; give the file's path, e.g. "
                             f"{directory / 'nexuscli.db'}"), (command, line)
    assert list(directory.iterdir()) == []


@pytest.fixture
def read_only_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding a migrated database (as the daemon leaves it), then mounted read-only."""
    with mounted_tmpfs(tmp_path / "ro") as mnt:
        make_database(mnt / "jobs.db", tmp_path)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt


def test_a_read_only_filesystem_is_named_as_such(read_only_fs: Path, tmp_path: Path) -> None:
    """Before: "a permissions problem ... Give this user write access there (chmod/chown)", and `db check` said
    "ok (read-only for this user)", though no chmod can help (here even root may not write)."""
    path = read_only_fs / "jobs.db"
    home = tmp_path / "home"
    for command in READERS:
        command = [str(tmp_path / "backup.db") if word == "BACKUP" else word for word in command]
        result = run_cli(["--db", str(path), *command], home)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
    check = run_cli(["--db", str(path), "db", "check"], home).stdout
    assert check == f"{path}: ok (read-only: the filesystem at {read_only_fs} is mounted read-only)\n"
    for command in [*WRITERS, ["run"]]:
        line = one_line_error(run_cli(["--db", str(path), *command], home))
        assert line == (f"nexus-jobd: {path}: the filesystem at {read_only_fs} is mounted read-only, so nothing can "
                        f"write the database. Mount it read-write (mount -o remount,rw {read_only_fs}) or move the "
                        "database to a writable filesystem; commands that only read (ps, show, logs, status, nodes, "
                        "backup, db check) work as it is"), (command, line)
    new = read_only_fs / "new.db"  # nothing can create it there either
    for command in (["db", "migrate"], ["run"]):
        line = one_line_error(run_cli(["--db", str(new), *command], home))
        assert line.startswith(f"nexus-jobd: {new}: the filesystem at {read_only_fs} is mounted read-only"), line


def test_an_ssh_node_leaves_the_json_log_json(tmp_path: Path) -> None:
    """Before: with any SSH node configured, every `run` and `nodes check` printed ten lines of
    `CryptographyDeprecationWarning: DSA is deprecated` on stderr, in the middle of the JSON log."""
    config = tmp_path / "config.toml"
    config.write_text('[nodes.pi]\nhost = "127.0.0.1"\nport = 1\ninsecure_skip_host_key_check = true\n')
    result = run_cli(["--config", str(config), "--db", str(tmp_path / "x.db"), "--log-format", "json",
                      "nodes", "check", "pi"], tmp_path / "home")
    assert result.returncode == 1, result.stderr
    *log_lines, last = result.stderr.strip().splitlines()
    assert last.startswith("nexus-jobd: node pi is not usable: cannot connect to node pi"), last
    assert [json.loads(line)["event"] for line in log_lines] == ["ssh.host_key_check_disabled"], log_lines


@pytest.mark.backends("sqlite", "postgres")
def test_follow_of_a_job_for_an_unknown_node_says_only_that_it_failed(daemon: Daemon, db: Db) -> None:
    """Before: "no live daemon serves node 'mars' ...: job X stays queued until one does", then at once "failed:
    unknown node": the live daemon on the database fails such a row; it never waits."""
    result = cli(db, "submit", "-f", "--node", "mars", "--", "true", check=False)
    job_id, *said = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert said == [f"nexus-jobd: job {job_id} failed: unknown node: no daemon on this database serves it (this one "
                    "serves localhost); set node_id to a configured node"], said


@pytest.mark.parametrize("log_format", [["--log-format", "json"], []], ids=["json", "auto-not-a-tty"])
def test_a_daemon_that_refuses_to_start_says_why_in_its_json_log(tmp_path: Path, log_format: list[str]) -> None:
    """Before: a bad config or database stopped `run` with a line of plain text in the middle of a JSON log
    (journald, svlogd); only the file a whole-file writer keeps was logged as an event (db.refused)."""
    bad_config = tmp_path / "config.toml"
    bad_config.write_text("[daemon]\nmax_concurent = 2\n")
    directory = tmp_path / "dir"
    directory.mkdir()
    for args, code, words in ((["--config", str(bad_config), "--db", str(tmp_path / "x.db")], 2,
                               "configuration error: " + str(bad_config) + ": [daemon] unknown key 'max_concurent'"),
                              (["--db", str(directory)], 1, f"{directory} is a directory, not a database file")):
        result = run_cli([*args, *log_format, "run"], tmp_path / "home")
        assert result.returncode == code, result.stderr
        (line,) = result.stderr.splitlines()
        event = json.loads(line)
        assert (event["event"], event["level"], event["exit_code"]) == ("daemon.refused", "error", code), event
        assert event["message"].startswith(words), event
        # The CLI's other commands say it as one line of text, as before.
        assert one_line_error(run_cli([*args, *log_format, "ps"], tmp_path / "home"), code).startswith(
            f"nexus-jobd: {words}")


def test_db_migrate_refuses_a_world_writable_directory_as_run_does(tmp_path: Path) -> None:
    """Before: `db migrate` created the database in a directory anyone may write, which `run` then refused, saying
    "mode 0o777" of a 1777 (sticky) directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / "jobs.db"
    for command in (["db", "migrate"], ["run"]):
        line = one_line_error(run_cli(["--db", str(path), *command], tmp_path / "home"), 2)
        assert line.startswith(f"nexus-jobd: configuration error: {shared}: the directory is writable by others "
                               f"(mode 1777); anyone who can write the database can run commands"), line
        assert f"Put the database in a directory of this user's own (mode 700), not in {shared}" in line, line
    assert list(shared.iterdir()) == []
