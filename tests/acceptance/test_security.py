"""What the daemon defends against (README: Reliability and security): another local user posing as the job
keeper, a row that could take every running job down, jobs reading their parents' secrets.

A real second user (`nobody`), real keepers, the real daemon; a fake keeper is a real process on the real address.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.keeper import protocol as p
from tests.conftest import (
    NEXUS_JOBD,
    Daemon,
    Db,
    cli,
    cli_env,
    group_members,
    keeper_pids,
    kill_keeper,
    require,
    start_keeper,
    wait_for,
)

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
SECRET = "hunter2-do-not-leak"

# Binds the keeper's address, answers HELLO as a keeper would, and prints (hex) every byte a daemon sends it.
SQUATTER = r"""
import os, select, socket, struct, sys
listener = socket.socket(socket.AF_UNIX)
listener.bind(bytes.fromhex(sys.argv[1]))
listener.listen(8)
print("listening", flush=True)
conns = []
while True:
    ready, _, _ = select.select([listener, *conns], [], [])
    for s in ready:
        if s is listener:
            conns.append(listener.accept()[0])
            continue
        data = s.recv(1 << 20)
        if not data:
            conns.remove(s)
            continue
        print(data.hex(), flush=True)
        hello = b"1\0%d" % os.getpid()
        s.sendall(struct.pack("!BII", 1, 0, len(hello)) + hello)
"""

# A keeper of the daemon's own user that answers the first SPAWN with STARTED <argv[2]> and then goes away.
FAKE_KEEPER = r"""
import os, socket, struct, sys
listener = socket.socket(socket.AF_UNIX)
listener.bind(bytes.fromhex(sys.argv[1]))
listener.listen(8)
print("listening", flush=True)
conn, _ = listener.accept()
buf = b""
while True:
    data = conn.recv(1 << 20)
    if not data:
        sys.exit(0)
    buf += data
    while len(buf) >= 9:
        kind, handle, size = struct.unpack("!BII", buf[:9])
        if len(buf) < 9 + size:
            break
        buf = buf[9 + size:]
        if kind == 1:
            hello = b"1\0%d" % os.getpid()
            conn.sendall(struct.pack("!BII", 1, 0, len(hello)) + hello)
        elif kind == 2:
            conn.sendall(struct.pack("!BII", 11, handle, len(sys.argv[2])) + sys.argv[2].encode())
            listener.close()
            conn.close()
            sys.exit(0)
"""


def _run_script(script: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """The script (standard library only) under this interpreter; as another user (`prefix`), under the system's
    python3: this one may live where only root can read it (pyenv's libpython in /root)."""
    python = sys.executable
    if prefix:
        python = shutil.which("python3", path="/usr/bin:/bin") or ""
        require(bool(python), "no system python3 (Debian: python3) for another user to run")
    proc = subprocess.Popen([*prefix, python, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    return proc


@pytest.fixture
def squatter(db: Db) -> Iterator[subprocess.Popen[str]]:
    """`nobody` holding the keeper's address of this database (as root's daemon computes it) before any daemon."""
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    kill_keeper(db.path)
    proc = _run_script(SQUATTER, p.address(str(db.path)).hex(), prefix=tuple(NOBODY))
    yield proc
    proc.kill()
    proc.wait()


def test_another_users_process_on_the_keepers_address_gets_no_job_and_the_job_fails_saying_who(
        db: Db, daemon_factory: Callable[..., Daemon], squatter: subprocess.Popen[str]) -> None:
    daemon = daemon_factory().start()
    job_id = db.insert("echo ran", env={"TOKEN": SECRET})
    row = db.wait_status(job_id)
    assert (row["status"], row["exit_code"]) == ("failed", 127)
    assert f"uid {pwd.getpwnam('nobody').pw_uid}" in row["error"] and f"pid {squatter.pid}" in row["error"]
    assert "kill" in row["error"]  # what to do
    assert daemon.events("keeper.impostor")
    squatter.kill()
    received, _ = squatter.communicate()
    assert received == ""  # not even a HELLO: nothing of any job, no environment
    # With the address free again, the daemon starts its own keeper.
    row = db.wait_status(db.insert("echo again"))
    assert (row["status"], row["stdout"]) == ("completed", "again\n")


@pytest.mark.parametrize("reported", ["0", "victim"])
def test_a_pid_the_keeper_reports_is_never_signalled_unless_it_is_a_job_of_that_keeper(
        db: Db, daemon_factory: Callable[..., Daemon], reported: str) -> None:
    """STARTED 0 made the daemon SIGKILL its own process group when the keeper went away; any other pid, that
    group. Now a pid of 1 or less is refused, and only the group of a session the keeper started is killed."""
    kill_keeper(db.path)
    victim = subprocess.Popen(["sleep", "60"], process_group=0)  # a group of this user: not a job's session
    try:
        pid = str(victim.pid) if reported == "victim" else reported
        fake = _run_script(FAKE_KEEPER, p.address(str(db.path)).hex(), pid)
        daemon = daemon_factory(prefix=["setsid"]).start()  # its own group: STARTED 0 would kill only it
        row = db.wait_status(db.insert("sleep 30", max_attempts=1))
        fake.wait(10)
        assert row["status"] == "failed" and "killed" not in row["error"], row
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
        assert victim.poll() is None and group_members(victim.pid) == [victim.pid]
    finally:
        victim.kill()
        victim.wait()


# -- one row must not take the other jobs down -----------------------------------------------------------------

@pytest.mark.parametrize(("columns", "reason"), [
    ({"env": {"BIG": "x" * 70_000_000}}, "variable BIG is 70000004 bytes: more than the 131071 bytes"),
    ({"cwd": "/" + "d" * 70_000_000}, "is 70000001 bytes long: more than the 4095 bytes of a path"),
    ({"env": {f"V{i}": "x" * 120_000 for i in range(30)}}, "(ARG_MAX, `getconf ARG_MAX`)"),
], ids=["70 MB variable", "70 MB cwd", "30 variables of 120 kB"])
def test_a_row_too_big_for_any_program_fails_alone_while_a_running_job_goes_on(
        db: Db, daemon: Daemon, tmp_path: Path, columns: dict[str, object], reason: str) -> None:
    go_on = tmp_path / "go-on"
    running = db.insert(f'echo started; while [ ! -e "{go_on}" ]; do sleep 0.05; done; echo survived')
    wait_for(lambda: db.job(running)["stdout"] == "started\n", message="the first job running")
    big = db.insert("echo never", **columns)
    row = db.wait_status(big, timeout=60)
    assert (row["status"], row["exit_code"]) == ("failed", 127) and reason in row["error"], row["error"][:300]
    go_on.touch()
    row = db.wait_status(running)
    assert (row["status"], row["stdout"], row["error"]) == ("completed", "started\nsurvived\n", None)
    assert len(keeper_pids(db.path)) == 1 and not daemon.events("keeper.lost")


def _frames(sock: socket.socket, wanted: int) -> list[tuple[int, int, bytes]]:
    buf = b""
    frames: list[tuple[int, int, bytes]] = []
    while len(frames) < wanted:
        data = sock.recv(1 << 16)
        assert data, f"the keeper closed the connection after {frames}"
        buf += data
        while len(buf) >= p.HEADER.size and len(buf) >= p.HEADER.size + (size := p.HEADER.unpack_from(buf)[2]):
            kind, handle, _ = p.HEADER.unpack_from(buf)
            frames.append((kind, handle, buf[p.HEADER.size:p.HEADER.size + size]))
            buf = buf[p.HEADER.size + size:]
    return frames


def test_the_keeper_refuses_a_request_too_big_for_it_and_serves_the_next_on_the_same_connection(
        tmp_path: Path) -> None:
    database = tmp_path / "keeper.db"
    address = start_keeper(database)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(address)
            sock.sendall(p.frame(p.HELLO, 0, p.pack(p.VERSION)))
            assert _frames(sock, 1)[0][0] == p.HELLO
            size = p.MAX_PAYLOAD + 1
            sock.sendall(p.HEADER.pack(p.SPAWN, 7, size))
            chunk = b"\0" * (1 << 20)
            for at in range(0, size, len(chunk)):
                sock.sendall(chunk[: size - at])
            sock.sendall(p.frame(p.HOLDS, 8))
            (failed, holds) = _frames(sock, 2)
        assert failed[:2] == (p.FAILED, 7) and b"bigger than" in failed[2]
        assert holds == (p.HOLDS, 8, b"")
    finally:
        kill_keeper(database)


# Connects to the keeper's address, says HELLO (argv[2], a whole frame) and prints how the connection ended and
# every byte it got (hex): "closed" when the keeper closed it, "open" when it was still open after 10 s.
PEER = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(bytes.fromhex(sys.argv[1]))
sock.settimeout(10)
got, how = b"", "closed"
try:
    sock.sendall(bytes.fromhex(sys.argv[2]))
    while data := sock.recv(1 << 16):
        got += data
except TimeoutError:
    how = "open"
except (BrokenPipeError, ConnectionResetError):  # closed before (or while) the HELLO went
    pass
print(how, got.hex(), flush=True)
"""


def test_the_keeper_serves_no_process_of_another_user(tmp_path: Path) -> None:
    """The keeper's address is abstract: any user may connect to it. A process of another user gets not a byte
    (no HELLO, which names the attempts held) and its connection closed; the keeper's own user is served."""
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    python = shutil.which("python3", path="/usr/bin:/bin")  # nobody may not reach this venv's (under /root)
    require(python is not None, "no system python3 (Debian: python3) for another user to run")
    assert python is not None
    database = tmp_path / "keeper.db"
    address = start_keeper(database)
    try:
        with socket.socket(socket.AF_UNIX) as own:  # held open: a keeper alone for 2 s leaves
            own.connect(address)
            own.sendall(p.frame(p.HELLO, 0, p.pack(p.VERSION)))
            assert _frames(own, 1)[0][0] == p.HELLO
            hello = p.frame(p.HELLO, 0, p.pack(p.VERSION)).hex()
            done = subprocess.run([*NOBODY, python, "-c", PEER, address.hex(), hello], capture_output=True,
                                  text=True, timeout=30, check=True)
            assert done.stdout.split() == ["closed"]
            own.sendall(p.frame(p.HOLDS, 1))
            assert _frames(own, 1)[0] == (p.HOLDS, 1, b"")  # its own user still served
    finally:
        kill_keeper(database)


def _cut_keeper_connections(keeper: int, address: bytes) -> int:
    """Shut down the daemons' connections from inside the keeper (its sockets taken with pidfd_getfd): what a
    keeper that drops a daemon does, while it lives on with every job."""
    name = "@" + address[1:].decode()
    inodes = {fields[6] for fields in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
              if len(fields) >= 8 and fields[7] == name and fields[5] == "03"}  # 03: connected (accepted)
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    pidfd = os.pidfd_open(keeper)
    cut = 0
    try:
        for fd in os.listdir(f"/proc/{keeper}/fd"):
            with contextlib.suppress(OSError):  # closed since it was listed
                target = os.readlink(f"/proc/{keeper}/fd/{fd}")
            if target.removeprefix("socket:[").rstrip("]") in inodes:
                dup = syscall(438, pidfd, int(fd), 0)  # pidfd_getfd
                assert dup >= 0, os.strerror(ctypes.get_errno())
                with socket.socket(fileno=dup) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                cut += 1
    finally:
        os.close(pidfd)
    return cut


def test_a_connection_the_keeper_drops_is_made_again_and_the_job_goes_on_losing_no_byte(
        db: Db, daemon: Daemon) -> None:
    job_id = db.insert('for i in $(seq 1 40); do echo "out $i"; echo "err $i" >&2; sleep 0.05; done; exit 7')
    wait_for(lambda: "out 5" in (db.job(job_id)["stdout"] or ""), message="some output flushed")
    (keeper,) = keeper_pids(db.path)
    assert _cut_keeper_connections(keeper, p.address(str(db.path))) == 1
    row = db.wait_status(job_id)
    assert (row["status"], row["exit_code"], row["error"]) == ("failed", 7, None)
    assert row["stdout"] == "".join(f"out {i}\n" for i in range(1, 41))
    assert row["stderr"] == "".join(f"err {i}\n" for i in range(1, 41))
    assert daemon.events("keeper.reconnected") and keeper_pids(db.path) == [keeper]


# -- jobs must not read their parents' secrets ------------------------------------------------------------------

@pytest.fixture(scope="session")
def nobodys_python() -> Iterator[str]:
    """An interpreter `nobody` can run, and re-run for its keeper, that imports this daemon: this venv's own, or
    where nobody cannot reach it (pyenv's, under a 0700 /root), a venv of the system's python3 given this one's
    packages."""
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")

    def runs(python: str) -> bool:  # exec'd by a process of nobody's, as the daemon starts its keeper
        probe = "import daemon.cli, aiosqlite, anyio, structlog"
        return subprocess.run([*NOBODY, "sh", "-c", f'exec "$0" -c "{probe}"', python], cwd="/",
                              capture_output=True, check=False).returncode == 0

    if runs(sys.executable):
        yield sys.executable
        return
    system = shutil.which("python3", path=os.defpath)
    require(system is not None, "no python3 in /usr/bin for a daemon of nobody's (apt-get install python3-venv)")
    assert system is not None
    venv = Path(tempfile.mkdtemp(prefix="nexus-jobd-python-"))
    try:
        venv.chmod(0o755)
        subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        (next(venv.glob("lib/python3*/site-packages")) / "nexus-jobd.pth").write_text(
            f"{Path(p.__file__).parents[2]}\n{sysconfig.get_path('purelib')}\n")
        require(runs(str(venv / "bin/python")), f"nobody cannot run {sys.executable} nor a venv of {system}")
        yield str(venv / "bin/python")
    finally:
        shutil.rmtree(venv)


@pytest.fixture
def nobodys_db(nobodys_python: str) -> Iterator[Db]:
    """A database of `nobody`'s in a directory of its own (0700): a daemon of a user without root's right to read
    every process, as a daemon runs in production."""
    home = Path(tempfile.mkdtemp(prefix="nexus-jobd-nobody-"))
    nobody = pwd.getpwnam("nobody")
    path = home / "nexuscli.db"
    try:
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        subprocess.run([*NOBODY, nobodys_python, *NEXUS_JOBD, "--db", str(path), "db", "migrate"], check=True,
                       capture_output=True, env={**os.environ, "HOME": str(home)})
        db = Db(path)
        yield db
        db.close()
    finally:
        kill_keeper(path, uid=nobody.pw_uid)
        shutil.rmtree(home)


@pytest.mark.parametrize("keeper", [True, False], ids=["keeper", "keeper = false"])
def test_a_job_cannot_read_the_daemons_environment_from_proc(nobodys_db: Db, nobodys_python: str,
                                                            keeper: bool) -> None:
    db = nobodys_db
    config = db.path.parent / "config.toml"
    config.write_text(f"[daemon]\nkeeper = {'true' if keeper else 'false'}\n")
    daemon = Daemon(db.path, config, prefix=[*NOBODY, nobodys_python], env={"NEXUS_SECRET": SECRET}).start()
    try:
        assert daemon.proc is not None
        row = db.wait_status(db.insert(f"cat /proc/$PPID/environ; cat /proc/{daemon.proc.pid}/environ; "
                                       "echo; id -un; tr '\\0' '\\n' < /proc/$$/environ"))
        assert SECRET not in row["stdout"] and SECRET not in row["stderr"]
        assert row["stderr"].count("Permission denied") == 2, (row["error"], daemon.log()[-3000:])  # both refused
        assert row["stdout"].startswith("\nnobody\n") and "\nGIT_TERMINAL_PROMPT=0\n" in row["stdout"]  # its own
        assert daemon.events("daemon.started")[0]["pid"] == daemon.proc.pid
    finally:
        daemon.stop_now()


# -- the database file -----------------------------------------------------------------------------------------

def test_a_database_link_into_a_shared_directory_is_refused_and_one_into_a_private_one_makes_a_private_file(
        db_path: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    shared = Path("/tmp")  # sticky and world-writable: another user could plant the file or its -wal first
    require(shared.stat().st_mode & 0o1777 == 0o1777, "/tmp is not a sticky world-writable directory here")
    target = shared / f"nexus-jobd-{uuid.uuid4().hex}.db"
    db_path.symlink_to(target)
    try:
        refused = daemon_factory().start(wait_ready=False)
        assert refused.proc is not None and refused.proc.wait(15) == 2
        log = refused.log()
        assert f"{shared}: the directory is writable by others" in log and f"leads to {target}" in log, log
        assert f"Put the database in a directory of this user's own (mode 700), not in {shared}" in log
        assert not target.exists()
    finally:
        for path in shared.glob(f"{target.name}*"):  # what an unfixed daemon made there, -wal and -shm too
            path.unlink()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    db_path.unlink()
    db_path.symlink_to(private / "jobs.db")
    daemon_factory().start()
    assert stat.S_IMODE((private / "jobs.db").stat().st_mode) == 0o600


def test_a_database_others_can_read_is_named_in_a_warning_with_the_fix(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    db.path.chmod(0o644)  # as NexusCLI may create it
    daemon = daemon_factory().start()
    (warning,) = daemon.events("db.readable")
    assert f"{db.path} (mode 0644)" in warning["files"] and warning["fix"].startswith(f"chmod 600 {db.path}*")
    db.path.chmod(0o600)
    for path in db.path.parent.glob(f"{db.path.name}-*"):
        path.chmod(0o600)
    assert not daemon_factory().start().events("db.readable")


# -- database passwords ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "postgres://u:S3CRET@[::1/db",  # libpq's parse error quotes the whole URL
    "postgres://u:S3%zzCRET@127.0.0.1:1/db",  # ... or the token it could not decode
    "postgresql://u@127.0.0.1:1/db?sslpassword=S3CRET",  # refused: the message names the database
    "postgresql://u@127.0.0.1:1/db?%70assword=S3CRET&sslmode",  # a percent-encoded key is a key to libpq
])
def test_no_database_password_reaches_a_message(url: str, tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    for command in (["ps"], ["run"], ["db", "check"]):
        result = subprocess.run([*NEXUS_JOBD, "--db", url, "--log-format", "json", *command], capture_output=True,
                                text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
        said = result.stdout + result.stderr
        assert result.returncode != 0 and "PostgreSQL" in said, said
        assert "S3" not in said and "CRET" not in said, said


# -- what reaches a terminal or a log ----------------------------------------------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m\r"  # set the window title, clear the screen (C0 and C1), return


def test_control_characters_in_the_database_reach_no_terminal_through_the_cli(db: Db, tmp_path: Path) -> None:
    job_id = db.insert(f"printf '{ESCAPES}'")
    db.conn.execute("UPDATE jobs SET status = 'failed', error = ?, stdout = ?, duration = 1, completed_at = 1, "
                    "node_id = ? WHERE id = ?", (f"node said {ESCAPES}", ESCAPES, f"n{ESCAPES}", job_id))
    db.conn.execute("INSERT INTO nodes (id, hostname, status, capabilities, created_at) VALUES (?, ?, 'error', ?, 1)",
                    (f"n{ESCAPES}", f"h{ESCAPES}", json.dumps({"error": f"probe {ESCAPES}", "tools": [ESCAPES]})))
    db.conn.execute("INSERT INTO jobd_workers (id, host, pid, started_at, heartbeat_at, stopped_at, stop_reason) "
                    "VALUES (?, ?, 1, 1, 1, 1, ?)", (f"w{ESCAPES}", f"h{ESCAPES}", f"gone {ESCAPES}"))

    def shown_by(*args: str) -> str:
        result = cli(db, *args, check=False)
        return result.stdout + result.stderr

    for args in (["ps"], ["show", job_id], ["nodes"], ["status"]):
        shown = shown_by(*args)
        assert not any(c in shown for c in "\x1b\x07\x9b\r"), (args, shown)
        assert "\\x1b]0;pwned\\x07" in shown, (args, shown)  # escaped, not dropped
    assert json.loads(shown_by("ps", "--json"))[0]["error"] == f"node said {ESCAPES}"  # JSON carries the value as is
    raw = subprocess.run([*NEXUS_JOBD, "--db", str(db.path), "logs", job_id], capture_output=True, timeout=30,
                         env=cli_env(tmp_path)).stdout  # bytes: text mode would turn its \r into \n
    assert raw.decode() == ESCAPES  # a job's own output is printed as it wrote it


def test_a_huge_row_value_gives_bounded_log_lines_and_error(db: Db, daemon: Daemon) -> None:
    row = db.wait_status(db.insert("true", tool="x" * 5_000_000))
    assert row["status"] == "failed" and row["error"].startswith("unknown tool 'xxx")
    length = len("unknown tool ''; node 'localhost' runs: bash, git, docker") + 5_000_000
    assert len(row["error"]) < 3000 and f"…({length} chars)…" in row["error"], row["error"]
    assert row["error"].endswith("'; node 'localhost' runs: bash, git, docker")  # the reason kept
    finished = wait_for(lambda: daemon.events("job.finished"), message="job.finished logged")
    assert "…(5000000 chars)…" in finished[0]["tool"]
    assert max(len(line) for line in daemon.log().splitlines()) < 5000


def test_a_10_mb_id_and_a_1_mb_cwd_give_bounded_log_lines_and_errors(db: Db, daemon: Daemon) -> None:
    """Issue 23.13 as found: a 10 MB id gave two 10 MB log lines, a 1 MB cwd a 1 MB `error`."""
    big_id = "i" * 10_000_000
    db.insert("true", id=big_id)
    deep = db.insert("true", cwd="/" + "d" * 1_000_000)
    assert db.wait_status(big_id)["status"] == "completed"
    row = db.wait_status(deep)
    assert (row["status"], row["exit_code"]) == ("failed", 127)
    assert len(row["error"]) <= 2000 and row["error"].endswith("is 1000001 bytes long: more than the 4095 bytes of a "
                                                               "path (PATH_MAX); use a shorter path"), row["error"]
    wait_for(lambda: len(daemon.events("job.finished")) >= 2, message="both finishes logged")
    assert max(len(line) for line in daemon.log().splitlines()) < 5000
    assert any("…(10000000 chars)…" in event["job_id"] for event in daemon.events("job.finished"))
