"""The vocabulary every part of the daemon speaks: rows and claims as frozen values, results, exit statuses, commands,
and the enums of statuses, node states and stop reasons. It imports nothing of the daemon but its errors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from daemon.errors import shorten


def now_ms() -> int:
    """The time as the contract writes it: Unix epoch milliseconds."""
    return time.time_ns() // 1_000_000


MAX_ERROR_CHARS = 2000  # an error quoting a row's value (a 5 MB `tool`) keeps its start and its end


class RawText(bytes):
    """TEXT that another program stored and that is not valid UTF-8 (e.g. `CAST(X'6a6f62ff' AS TEXT)`), kept as
    its bytes: one value for every text column the daemon reads. A row holding one fails with the reason (never
    the daemon); bound back as a parameter it is a BLOB, which `CAST(:id AS TEXT)` in a query turns back into the
    stored TEXT, so the row can still be found; printed, it shows its bad bytes as \\x escapes."""

    def __str__(self) -> str:
        return self.decode("utf-8", "backslashreplace")

    def bad_byte(self) -> int:
        try:
            self.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start
        return -1


class JobStatus(StrEnum):
    QUEUED = "queued"
    EXECUTING = "executing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


STRANDED_FIX = ("if no other program runs them: `nexus-jobd cancel ID` ends one, `nexus-jobd retry ID` queues it "
                  "again")


def stranded(row: Mapping[str, Any]) -> str:
    """A row no daemon runs or finishes (Store.stranded_jobs), and why, for a person: `id (status 'Queued', which
    no daemon runs)`."""
    status, worker = row.get("status"), row.get("worker_id")
    if status != JobStatus.EXECUTING:
        why = f"status {'NULL' if status is None else repr(status)}, which no daemon runs"
    elif worker is None:
        why = "executing, but held by no daemon: worker_id NULL"
    else:
        why = f"executing, but held by {worker!r}, no daemon of this database"
    return f"{row.get('id')} ({why})"


@dataclass(frozen=True)
class ClaimedJob:
    """A row this daemon just moved to `executing`. Fields are as stored: another program may have written
    any type into any column, so they are validated (daemon.tools) before anything runs."""

    id: str
    node_id: Any
    tool: Any
    command: Any
    cwd: Any
    env: Any
    priority: Any
    attempt: int
    started_at: int
    timeout_ms: Any
    max_attempts: Any
    created_at: Any = None  # as the enqueuer wrote it: the metrics' pickup latency is started_at - created_at
    asked: Any = None  # the row's node_id, what it asked for: node_id above is where it runs (a pool's member)

    @property
    def pool(self) -> str | None:
        """The pool the row named, when it ran on one of its members rather than on the node it named."""
        return str(self.asked) if self.asked is not None and self.asked != self.node_id else None


@dataclass(frozen=True)
class PoolRow:
    """A pool's queued row as placement sees it: `seq` names it to the claim; `last_node` is where its previous
    attempt ran (None if none did)."""

    seq: Any
    tool: Any
    last_node: Any = None


@dataclass(frozen=True)
class Claim:
    """Whose claim a write must match: the compare-and-set part of every write to a running job."""

    job_id: str
    worker_id: str
    attempt: int


@dataclass(frozen=True)
class OutputSnapshot:
    """The row's view of both streams; None leaves a stream's column as it is."""

    stdout: str | None
    stderr: str | None
    stdout_bytes: int
    stderr_bytes: int


@dataclass(frozen=True)
class ProcessRef:
    """A job's process group on the daemon's host; `start` (clock ticks after boot) tells a reused pid apart."""

    pid: int
    start: int | None


@dataclass(frozen=True)
class JobResult:
    status: JobStatus
    exit_code: int | None
    error: str | None  # cut to MAX_ERROR_CHARS
    output: OutputSnapshot
    requeue: bool = False  # try again: back to queued instead of `status`
    run_after: int | None = None  # with requeue: not before this epoch ms
    uncount: bool = False  # with requeue: nothing ran (its node did not answer): the claim is not an attempt
    node_retry_at: int | None = None  # with uncount: epoch ms when that node is worth trying again
    # time.monotonic() when the attempt ended: the row's completed_at is then, however late the write lands
    ended_monotonic: float | None = None
    killed_outside: bool = False  # a local job died by a SIGKILL nexus-jobd did not send (the metrics count them)

    def late_ms(self) -> int:
        """How long ago the attempt ended, in ms: what a write landing now takes off the database's clock."""
        if self.ended_monotonic is None:
            return 0
        return max(0, round((time.monotonic() - self.ended_monotonic) * 1000))

    def __post_init__(self) -> None:
        if self.error is not None and len(self.error) > MAX_ERROR_CHARS:
            object.__setattr__(self, "error", shorten(self.error, MAX_ERROR_CHARS))


@dataclass(frozen=True)
class Worker:
    """A daemon process registered on the database, as another daemon sees it."""

    id: str
    host: str
    boot_id: str | None
    pid: int
    pid_start: int | None
    heartbeat_at: int
    now: int  # the database clock when read


@dataclass(frozen=True)
class OrphanedJob:
    id: str
    attempt: int
    max_attempts: Any
    pid: int | None
    pid_start: int | None
    node_id: Any


@dataclass(frozen=True)
class AdoptedJob:
    """A running job this daemon took over from a dead or detached one: the row as claimed, and what it recorded
    (its output and true byte counts, where reading goes on; `cancelled` if cancelled meanwhile)."""

    job: ClaimedJob
    cancelled: bool
    stdout: str | None
    stderr: str | None
    stdout_bytes: int
    stderr_bytes: int


class StopReason(StrEnum):
    """Why the daemon ends a job it runs (the job's own end needs no reason)."""

    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease lost"


class NodeStatus(StrEnum):
    """A node as this daemon sees it. The `nodes` table knows only online, offline and error (NexusCLI's CHECK):
    `table_value` says which of those each one is written as."""

    PENDING = "pending"  # not probed yet
    ONLINE = "online"
    SUSPECT = "suspect"  # a job found it unreachable: no claims until its back-off passes or a probe reaches it
    OFFLINE = "offline"
    ERROR = "error"

    @property
    def table_value(self) -> str:
        return {"suspect": "online", "pending": "offline"}.get(self.value, self.value)


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: `code` follows the shell (128+N when killed by signal N). Where the executor knows them:
    the last signal nexus-jobd sent the job's group while it ran (the daemon's, or the keeper's for any daemon),
    and the CPU seconds its main process used; together they tell a SIGKILL of ours, or of a cpu_seconds limit,
    from a stranger's."""

    code: int
    signal: int | None = None
    signalled: int | None = None
    cpu_s: float | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Popen's convention (negative = killed by that signal) -> the shell's."""
        if returncode < 0:
            return cls(128 - returncode, -returncode)
        return cls(returncode)


@dataclass(frozen=True)
class Command:
    """What an executor runs: argv[0] is a program name looked up on PATH by the executor."""

    argv: tuple[str, ...]
    cwd: str | None  # None: the node's default working directory
    env: Mapping[str, str | None]  # None as a value unsets the variable
    # `docker run/create`: the labels its container carries, to stop it by (the job's and the attempt's: two
    # attempts of a row another program re-queued mid-run may have containers at once). Empty: none.
    container_labels: tuple[str, ...] = ()
    key: str = ""  # "<job id>:<attempt>": names what the attempt leaves on a node (its remote pid file)
    limits: Mapping[str, int] = field(default_factory=dict)  # config.LIMITS keys -> value, set as it starts
    # An SSH node's [nodes.X] default_cwd: where a job without cwd starts (a relative cwd is taken from there);
    # None: the node user's home.
    default_cwd: str | None = None

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` (the daemon's job environment) with this command's variables set or unset."""
        env = dict(base)
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


@dataclass(frozen=True)
class Quarantine:
    """What the daemon did when it found the file rewritten: where its WAL went, which jobs' latest writes were
    only in that WAL (so the file as it is now does not have them), and where it reported and keeps results."""

    reason: str
    message: str  # what a user reads: what was seen, the likely cause, the fix
    set_aside: list[Path]
    unrecorded: list[str]
    report: Path
    results: Path
    kept: bool = True  # the report and the results recorded only in that WAL are written beside the file
