"""Shared fixtures: a real SQLite file (or a real PostgreSQL database, for tests that ask for the `postgres`
backend), the real `nexus-jobd` daemon as a subprocess, and polling helpers.

Tests talk to the database the way other programs do: a plain sqlite3 (or psycopg) connection in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
VENV_BIN = Path(sys.executable).parent
NEXUS_JOBD = [str(VENV_BIN / "nexus-jobd")]  # the installed console script, as users run it
FIXTURES = Path(__file__).parent / "fixtures"


def require(condition: bool, reason: str) -> None:
    """A component missing on a developer's machine skips the test with the reason; in CI (CI=true) it fails."""
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must have it: .ci/run installs it)")
        pytest.skip(reason)


def wait_for(predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.01,
             message: str = "condition") -> T:
    """Poll until `predicate` returns something truthy; fail with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def daemon_looked(db: Db) -> None:
    """Return once the running daemon has been through the queue since this call, claims included: for a negative
    check (a row that must stay queued), an event instead of a sleep. A row for a node nobody serves fails in the
    daemon's next pass, before that pass claims; a second one fails in a later pass, after that claim."""
    for _ in range(2):
        row = db.wait_status(db.insert("true", node_id="nobody-serves-this"))
        assert "unknown node" in row["error"], row


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`: init reaps orphaned zombies on its own schedule."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def keeper_pids(db_path: Path | str, host: str | None = None, uid: int | None = None) -> list[int]:
    """The job keeper of this database (at most one per host and user), found by the address on its command line."""
    from daemon.keeper.protocol import address

    wanted = address(str(db_path), host, uid).hex().encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if wanted in cmdline and b"daemon.keeper.server" in cmdline:
                found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def start_keeper(db_path: Path) -> bytes:
    """A job keeper for this database, started as a daemon starts one, with no daemon: its socket's address."""
    from daemon.keeper.client import _BOOT, _ROOT
    from daemon.keeper.protocol import address

    at = address(str(db_path))
    started = subprocess.run([sys.executable, "-I", "-S", "-c", _BOOT, _ROOT, at.hex()], capture_output=True,
                             text=True, timeout=10, check=True)
    assert started.stdout.strip() == "ready", started
    return at


def kill_keeper(db_path: Path | str, host: str | None = None, uid: int | None = None) -> None:
    """What a test's daemons left running under their keeper (detached jobs), and the keeper: killed."""
    for keeper in keeper_pids(db_path, host, uid):
        for child in children(keeper):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(keeper, signal.SIGKILL)


STORE = Path(__file__).parent.parent / "daemon" / "store"
# The job store and its parts: the modules that run the named queries over a backend's driver.
STORE_PARTS = [STORE / name for name in ("jobs.py", "leases.py", "nodes.py", "console.py")]
# A named query as the store and the drivers run it: `.write("claim_jobs", ...)`, `tx.rows("cancel_job", ...)`,
# `.write_count("requeue_orphan" if requeue else "fail_orphan", ...)`, `Q["record_migration"]`.
_QUERY_USE = re.compile(r"""(?:\b(?:read|write|write_count|rows|execute|executemany)\(|Q\[)\s*["']([a-z_]\w*)["']"""
                        r"""(?:\s+if\s+\w+\s+else\s+["']([a-z_]\w*)["'])?""")
_UNBIND = re.compile(r"_unbind\(([^)]*)\)")  # `_unbind("requeue_job", "finish_job", "write_output")`


def named_queries_used(*sources: Path) -> list[str]:
    """The names of the named queries that these modules (or every module in these folders) run."""
    found: set[str] = set()
    for path in (f for source in sources for f in ([source] if source.is_file() else sorted(source.glob("*.py")))):
        text = path.read_text(encoding="utf-8")
        found.update(name for match in _QUERY_USE.finditer(text) for name in match.groups() if name)
        for args in _UNBIND.findall(text):
            found.update(re.findall(r"""["']([a-z_]\w*)["']""", args))
    return sorted(found)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path) -> Iterator[Path]:
    """An 8 MB tmpfs of its own at `mnt` (made here), for a full or a read-only filesystem; unmounted after."""
    require(os.geteuid() == 0 and shutil.which("mount") is not None, "mounting a small tmpfs needs root")
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a CLI call: its own HOME (no user config file is read), and no NEXUS_JOBD_* setting."""
    home.mkdir(parents=True, exist_ok=True)
    return {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_JOBD_")} | {"HOME": str(home)}


def run_cli(args: list[str], home: Path, *, cwd: Path | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    """`nexus-jobd ARGS` exactly as given (no --db added), as a user whose HOME is `home` types it."""
    return subprocess.run([*NEXUS_JOBD, *args], capture_output=True, text=True, timeout=timeout, env=cli_env(home),
                          cwd=cwd)


def cli(db: Db, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`nexus-jobd --db DB ARGS` (HOME: the test's cli-home); with `check`, it must exit 0."""
    result = run_cli(["--db", db.target, *args], db.path.parent / "cli-home", cwd=cwd)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


class Db:
    """Another program's view of the database: plain sqlite3, autocommit, a busy timeout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.conn.row_factory = sqlite3.Row

    def insert(self, command: Any, *, tool: Any = "bash", node_id: Any = "localhost", **extra: Any) -> str:
        """INSERT a queued row as NexusCLI does; `extra` sets the daemon's own columns (cwd, env, priority...)."""
        job_id = extra.pop("id", None) or str(uuid.uuid4())
        if "env" in extra and isinstance(extra["env"], dict):
            extra["env"] = json.dumps(extra["env"])
        created_at = extra.pop("created_at", None) or now_ms()
        columns = ["id", "node_id", "tool", "command", "status", "created_at", *extra]
        values = [job_id, node_id, tool, command, "queued", created_at, *extra.values()]
        placeholders = ", ".join("?" for _ in columns)
        self.conn.execute(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({placeholders})", values)
        return job_id

    @property
    def target(self) -> str:
        """What --db says for this database."""
        return str(self.path)

    def job(self, job_id: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert row is not None, f"job {job_id} not found"
        return dict(row)

    def wait_status(self, job_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
                    timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the row has one of `statuses`; for final ones also until the daemon recorded duration."""

        def check() -> dict[str, Any] | None:
            row = self.job(job_id)
            final = row["status"] in ("completed", "failed", "cancelled")
            if row["status"] in statuses and (not final or row["duration"] is not None):
                return row
            return None

        return wait_for(check, timeout, message=f"job {job_id} to reach {statuses}")

    def close(self) -> None:
        self.conn.close()


class PgConn:
    """psycopg behind sqlite3's calls as the tests make them: `?` placeholders, autocommit, rows by index."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)

    def close(self) -> None:
        self._conn.close()


class PgDb(Db):
    """Another program's view of a PostgreSQL database: what Db does, over psycopg."""

    def __init__(self, url: str, home: Path) -> None:
        self.path = home  # where the file would be: its directory is the test's (HOME, logs)
        self.url = url
        self.pg = PgConn(url)
        self.conn = self.pg  # type: ignore[assignment]

    @property
    def target(self) -> str:
        return self.url

    def job(self, job_id: str) -> dict[str, Any]:
        from psycopg.rows import dict_row

        with self.pg._conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
        assert row is not None, f"job {job_id} not found"
        return dict(row)


@dataclass
class Daemon:
    """A `nexus-jobd run` process, exactly as a user starts it."""

    db_path: Path
    config_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    log_dir: Path | None = None  # default: beside the database
    db_url: str | None = None  # a PostgreSQL database instead of the file (which then only says where HOME is)
    prefix: list[str] = field(default_factory=list)  # run under this (e.g. unshare, as another host)

    def start(self, wait_ready: bool = True) -> Daemon:
        args = [*self.prefix, *NEXUS_JOBD, "--db", self.target, "--log-format", "json"]
        if self.config_path:
            args += ["--config", str(self.config_path)]
        # HOME is the test's directory: no user config file is picked up, and it is the default cwd.
        env = {**os.environ, "HOME": str(self.db_path.parent), **self.env}
        env.pop("NEXUS_JOBD_CONFIG", None)
        log_dir = self.log_dir or self.db_path.parent
        self.log_path = log_dir / f"daemon-{len(list(log_dir.glob('daemon-*.log')))}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([*args, *self.extra_args, "run"], stdout=log, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.db_path.parent)
        log.close()
        if wait_ready:
            wait_for(lambda: self.proc is not None and (self.proc.poll() is not None or
                                                        "dispatch.started" in self.log()),
                     15, message="daemon start-up")
            assert self.proc.poll() is None, f"daemon exited at start-up:\n{self.log()}"
        return self

    @property
    def target(self) -> str:
        return self.db_url or str(self.db_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def stop_now(self) -> None:
        """Two SIGTERMs (the second once the first is seen): stop, and take the jobs' process groups down too."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            wait_for(lambda: self.proc is None or self.proc.poll() is not None or self.events("daemon.stopping"),
                     5, message="daemon.stopping")
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        except (AssertionError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s after SIGTERM:\n{self.log()[-4000:]}") from e


CHECKOUT = Path(__file__).parent.parent
# What a test run may add to the checkout: tools' caches and environments (a directory of one of these names, or
# a .venv* or *.egg-info directory, is not looked into).
TOOL_DIRS = frozenset({".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
                       "node_modules"})


def checkout_files(root: Path) -> set[str]:
    """Every file and directory under `root` (relative paths), but for the tools' own (TOOL_DIRS)."""
    found: set[str] = set()
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not (
            name in TOOL_DIRS or name.startswith(".venv") or name.endswith(".egg-info"))]
        here = Path(directory).relative_to(root)
        found.update(str(here / name) for name in [*subdirectories, *files])
    return found


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_in_the_checkout() -> Iterator[None]:
    """A test writes into its tmp_path, never into the repository (commit d7587c1 committed a SQLite database named
    `None` that a run had left at the top of it): anything new in the checkout after the session fails the run."""
    before = checkout_files(CHECKOUT)
    yield
    left = sorted(checkout_files(CHECKOUT) - before)
    assert not left, (f"the test run left {len(left)} new file(s) in the checkout {CHECKOUT}: {left[:20]}; a test "
                      "must write under its tmp_path (if you created them yourself meanwhile, run again)")


@pytest.fixture(scope="session", autouse=True)
def _no_keeper_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keepers that tests started outside daemon_factory (runit, systemd, CLI tests) and left holding a job: killed
    with what they run when the session ends, so that no test process outlives the suite. Only the keepers of this
    session's databases (found by their addresses): another pytest session may be running beside this one."""
    yield
    for path in tmp_path_factory.getbasetemp().rglob("*.db"):
        kill_keeper(path)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nexuscli.db"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One PostgreSQL server for the session (each test gets a database of its own: pg_database_url)."""
    from tests import pg

    require(pg.bin_dir() is not None, "PostgreSQL server not installed (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require(False, "psycopg not installed (pip install -e '.[postgres]')")
    with pg.running_server() as server:
        yield server


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background by a shell without job control (scripts/test runs 3.13 beside 3.11) has
    SIGINT ignored, and every process it starts inherits that: a CLI the tests Ctrl-C would never stop. The tests
    start their processes as a terminal would, with SIGINT's default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`@pytest.mark.backends("sqlite", "postgres")` (on a module or a test; the test's wins) runs it on each."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", marker.args, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """Which database the `db` and daemon fixtures use: SQLite unless the test is marked `backends`."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db_target(request: pytest.FixtureRequest, backend: str, db_path: Path) -> str:
    """What --db says: the file, or a fresh PostgreSQL database's URL."""
    if backend == "postgres":
        server = request.getfixturevalue("pg_server")
        return str(server.new_database())
    return str(db_path)


@pytest.fixture
def db(db_path: Path, db_target: str) -> Iterator[Db]:
    """The database after the daemon's migrations, opened as another program would."""
    # HOME is the test's directory and no NEXUS_JOBD_* setting leaks in: no user config file is picked up.
    env = {k: v for k, v in os.environ.items() if k not in ("NEXUS_JOBD_CONFIG", "NEXUS_JOBD_DB")}
    subprocess.run([*NEXUS_JOBD, "--db", db_target, "db", "migrate"], check=True, capture_output=True,
                   env={**env, "HOME": str(db_path.parent)})
    handle = PgDb(db_target, db_path) if db_target.startswith("postgresql://") else Db(db_path)
    yield handle
    handle.close()


@pytest.fixture
def daemon_factory(db_path: Path, db_target: str) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    url = db_target if db_target.startswith("postgresql://") else None

    def make(config: str | None = None, **kwargs: Any) -> Daemon:
        config_path = None
        if config is not None:
            config_path = db_path.parent / f"config-{len(started)}.toml"
            config_path.write_text(config)
        kwargs.setdefault("db_url", url)
        daemon = Daemon(db_path, config_path, **kwargs)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop_now()
    kill_keeper(db_target)


@pytest.fixture
def daemon(db: Db, daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A running daemon with the embedded defaults on a fresh database."""
    return daemon_factory().start()


@pytest.fixture
def draining_daemon(db: Db, daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A running daemon that drains its jobs on SIGTERM (on_stop = "drain", the behaviour before the keeper)."""
    return daemon_factory('[daemon]\non_stop = "drain"\n').start()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
