"""Shared pieces of the benchmarks: a throw-away workspace, the daemon and the baselines as subprocesses that are
always cleaned up (each in a session of its own, killed as a whole), rows inserted and polled the way other
programs do it, and readers of /proc for CPU time and memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, TypeVar

T = TypeVar("T")

VENV_BIN = Path(sys.executable).parent
PYTHON = sys.executable
NEXUS_JOBD = str(VENV_BIN / "nexus-jobd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """The benchmark could not measure what it should (the daemon did not start, a deadline passed...)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- command line and reporting ---------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tmpdir", help="where to create the throw-away workspace (default: the system temp dir; "
                                         "the file system matters: SQLite fsyncs)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace (databases, daemon logs)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser) -> None:
    """Parse the arguments and run `main`; SIGTERM/SIGHUP unwind like Ctrl-C so every `finally` cleans up.

    Exit status: 0 every target met, 1 a target missed, 2 the benchmark could not run, 130 interrupted.
    """

    def unwind(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    signal.signal(signal.SIGHUP, unwind)
    args = parser.parse_args()
    try:
        code = main(args)
    except BenchError as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception:
        traceback.print_exc()
        code = 2
    sys.exit(code)


def machine(workspace: Path | None = None) -> str:
    """One line about where the figures were measured (a busy machine makes every figure worse)."""
    load = Path("/proc/loadavg").read_text().split()[0]
    parts = [f"{os.cpu_count()} CPUs (load {load})", f"Linux {platform.release()}",
             f"Python {platform.python_version()}", f"SQLite {sqlite3.sqlite_version}"]
    if workspace is not None:
        parts.append(f"workspace on {fs_type(workspace)} ({workspace})")
    return ", ".join(parts)


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Left-aligned first column, the others right-aligned."""
    lines = [list(header), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) if i < len(line) else 0 for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        print("  " + "  ".join(cells).rstrip())


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p100 is the maximum)."""
    if not values:
        raise BenchError("no samples")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def wait_until(predicate: Callable[[], T | None], timeout: float, interval: float, what: str) -> T:
    """Poll `predicate` until it returns something truthy; BenchError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- /proc readers ----------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] is state (field 3), [11] utime (field 14)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


@dataclass(frozen=True)
class Cpu:
    """CPU time a process used so far, in seconds."""

    own: float  # utime + stime of all its threads, clock-tick resolution (/proc/PID/stat)
    children: float  # cutime + cstime: the children it waited for (the jobs)
    own_precise: float  # the same as `own` from the live threads' schedstat, nanosecond resolution

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.own - other.own, self.children - other.children, self.own_precise - other.own_precise)


def main_thread_cpu(pid: int) -> float:
    """utime + stime of the process's main thread alone (the event loop, for the daemon), in seconds."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu(pid: int) -> Cpu:
    fields = _stat_fields(pid)
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    precise = 0
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                precise += int(Path(task.path, "schedstat").read_text().split()[0])
    return Cpu((utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK, precise / 1e9)


def cpu_sum(pids: Iterable[int]) -> Cpu:
    total = Cpu(0.0, 0.0, 0.0)
    for pid in pids:
        c = cpu(pid)
        total = Cpu(total.own + c.own, total.children + c.children, total.own_precise + c.own_precise)
    return total


def keeper_pid(db: Path) -> int | None:
    """The job keeper of database `db`, found by the socket address on its command line."""
    from daemon.keeper.protocol import address

    wanted = address(str(db)).hex().encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in Path(entry.path, "cmdline").read_bytes():
                    return int(entry.name)
    return None


def kill_keeper(db: Path) -> None:
    """The keeper of `db` and the process groups of the jobs it still runs."""
    pid = keeper_pid(db)
    if pid is None:
        return
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(int(entry.name), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def memory_kib(pid: int) -> dict[str, int]:
    """The Vm*/Rss* lines of /proc/PID/status, in KiB (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
            values[name] = int(rest.split()[0])
    return values


def cpu_share(pids: int | Sequence[int], seconds: float) -> tuple[float, float]:
    """Percent of one core `pids` used together over the next `seconds`: (from utime+stime ticks, from schedstat)."""
    group = [pids] if isinstance(pids, int) else list(pids)
    before, started = cpu_sum(group), time.monotonic()
    time.sleep(seconds)
    used, elapsed = cpu_sum(group) - before, time.monotonic() - started
    return used.own / elapsed * 100, used.own_precise / elapsed * 100


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io: rchar/wchar count every read/write syscall's bytes, write_bytes what reached the disk layer."""
    values = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        name, _, value = line.partition(":")
        values[name] = int(value)
    return values


def mapped_files(pid: int) -> set[str]:
    """Files mapped into the process (shared libraries, extension modules)."""
    files = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            files.add(fields[5])
    return files


# -- processes --------------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Runs in the child before exec: if the benchmark itself is SIGKILLed, the kernel kills the child too."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid`; job processes keep it even after their parent is gone."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pids := session_members(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise BenchError(f"processes {pids} of session {sid} survive SIGKILL")
        time.sleep(0.01)


class Proc:
    """A subprocess in a session of its own. Leaving the `with` block kills it and everything it started."""

    def __init__(self, argv: Sequence[str], *, stdout: IO[Any] | int | None = None,
                 stderr: IO[Any] | int | None = None, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                                      cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, graces: Sequence[float] = (3.0,)) -> None:
        """SIGTERM once per grace period while it is still running, then SIGKILL the whole session."""
        try:
            for grace in graces:
                if self.popen.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace)
        finally:
            kill_session(self.pid)
            self.popen.wait()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- workspace and daemon ---------------------------------------------------------------------------------

class Workspace:
    """A temporary directory for databases, configs and logs; removed at the end unless --keep."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="nexus-jobd-bench-", dir=args.tmpdir)).resolve()
        self.keep = bool(args.keep)
        self.env = {**os.environ, "HOME": str(self.path)}  # no user config; the jobs' default cwd
        for name in ("NEXUS_JOBD_CONFIG", "NEXUS_JOBD_DB"):
            self.env.pop(name, None)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.keep or (exc_type is not None and issubclass(exc_type, Exception)):
            print(f"workspace kept: {self.path}", file=sys.stderr)
        else:
            shutil.rmtree(self.path, ignore_errors=True)

    def config(self, name: str = "config.toml", **daemon: int | str) -> Path:
        """A config file with these `[daemon]` keys."""
        path = self.path / name
        lines = ["[daemon]", *(f"{key} = {json.dumps(value)}" for key, value in daemon.items())]
        path.write_text("\n".join(lines) + "\n")
        return path

    def database(self, name: str = "jobs") -> Path:
        """A new database NAME/NAME.db with the schema, made the documented way: `nexus-jobd db migrate`.

        Each database has a directory of its own: the daemon watches that directory with inotify, and the logs
        and other files of the benchmark must not wake it.
        """
        (self.path / name).mkdir(mode=0o700)
        path = self.path / name / f"{name}.db"
        done = subprocess.run([NEXUS_JOBD, "--db", str(path), "db", "migrate"], env=self.env, cwd=self.path,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"`nexus-jobd db migrate` failed ({done.returncode}): {done.stderr.strip()}")
        return path


class Daemon:
    """`nexus-jobd --db DB [--config FILE] run`, its JSON log in the workspace."""

    def __init__(self, ws: Workspace, db: Path, config: Path | None = None, name: str = "daemon") -> None:
        self.ws, self.db, self.config = ws, db, config
        self.log_path = ws.path / f"{name}.log"
        self.proc: Proc | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        argv = [NEXUS_JOBD, "--db", str(self.db), "--log-format", "json"]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        with self.log_path.open("wb") as log:
            self.proc = Proc([*argv, "run"], stdout=log, stderr=subprocess.STDOUT, env=self.ws.env, cwd=self.ws.path)
        wait_until(self._ready, timeout, 0.01, "the daemon's dispatch.started event")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            raise BenchError(f"the daemon exited at start-up with {self.proc.popen.returncode}:\n{self.log_tail()}")
        return "dispatch.started" in self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    found.append(event)
        return found

    def check_alive(self) -> None:
        if self.proc is None or not self.proc.alive():
            raise BenchError(f"the daemon died:\n{self.log_tail()}")

    @property
    def keeper_pid(self) -> int:
        """This daemon's job keeper (it runs the local jobs): waited for, as the daemon starts it in the background."""
        return wait_until(lambda: keeper_pid(self.db), 10, 0.01, "the daemon's job keeper")

    @property
    def pids(self) -> tuple[int, int]:
        """The daemon and its keeper: what running jobs here costs is the sum of both."""
        return self.pid, self.keeper_pid

    def stop(self) -> None:
        """SIGTERM, a second SIGTERM (stop running jobs) 3 s later, then SIGKILL the session; then the keeper and
        whatever it still runs (jobs detached by the stop)."""
        if self.proc is not None:
            self.proc.stop(graces=(3.0, 2.0))
        kill_keeper(self.db)

    def __enter__(self) -> Daemon:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the database, as another program sees it -------------------------------------------------------------

INSERT_JOB = ("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
              "VALUES (?, 'localhost', ?, ?, 'queued', ?)")


class Db:
    """A plain sqlite3 connection in autocommit mode, as NexusCLI (or any program) uses the database."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30)

    def insert(self, commands: Sequence[str], tool: str = "bash") -> list[str]:
        """Queue one row per command, all in one transaction; returns their ids."""
        ids = [str(uuid.uuid4()) for _ in commands]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(INSERT_JOB, [(job_id, tool, command, now_ms())
                                               for job_id, command in zip(ids, commands, strict=True)])
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return ids

    def progress(self) -> tuple[int, int]:
        """(rows completed, rows that ended otherwise): counted on the status index, cheap to poll."""
        done = self.conn.execute("SELECT count(*) FROM jobs WHERE status = 'completed'").fetchone()[0]
        bad = self.conn.execute("SELECT count(*) FROM jobs WHERE status IN ('failed', 'cancelled')").fetchone()[0]
        return int(done), int(bad)

    def incomplete_rows(self) -> int:
        """Completed rows still lacking completed_at or duration (the daemon writes them with the status)."""
        return int(self.conn.execute("SELECT count(*) FROM jobs WHERE status = 'completed' AND "
                                     "(completed_at IS NULL OR duration IS NULL)").fetchone()[0])

    def wait_completed(self, count: int, timeout: float, interval: float = 0.02,
                       daemon: Daemon | None = None) -> None:
        """Poll until `count` rows are completed; a failed row or a dead daemon stops the benchmark."""

        def check() -> bool:
            done, bad = self.progress()
            if bad:
                row = self.conn.execute("SELECT id, status, exit_code, error, stderr FROM jobs "
                                        "WHERE status IN ('failed', 'cancelled') LIMIT 1").fetchone()
                raise BenchError(f"{bad} job(s) did not complete, e.g. {row}")
            if done < count:
                if daemon is not None:
                    daemon.check_alive()
                return False
            return self.incomplete_rows() == 0

        wait_until(check, timeout, interval, f"{count} completed jobs")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Db:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
