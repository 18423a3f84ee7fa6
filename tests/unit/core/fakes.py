"""Fakes of what the core talks to, for unit tests that start no process and no database server: an in-memory store
with the semantics the core relies on (claims by priority then age, compare-and-set finishes, orphans), an executor
whose processes end when the test says, and a node-health gate. Every change to a fake wakes `Changed.until`, so a
test waits for a state, never for a time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio

from daemon.config import Config, NodeConfig
from daemon.dispatch import Dispatcher, Wake, Wakes
from daemon.errors import DatabaseRewritten, JobLost
from daemon.executors.base import OutputCallback
from daemon.hooks import Hooks
from daemon.model import (
    AdoptedJob,
    Claim,
    ClaimedJob,
    Command,
    ExitStatus,
    JobResult,
    JobStatus,
    NodeStatus,
    OrphanedJob,
    OutputSnapshot,
    ProcessRef,
    Quarantine,
    Worker,
    now_ms,
)
from daemon.output import JobOutput
from daemon.store import DbRejected, DbUnavailable, Store

T = TypeVar("T")
WORKER_ID = "w-me"
WORKER = {"worker_id": WORKER_ID, "host": "test-host", "boot_id": "boot-1", "pid": 4242, "pid_start": 1}


class Changed:
    """What a test waits on: every fake calls `notify` when its state changes. A short poll backs the event up for
    conditions on the core's own state (a dict it pops after the store's call returns)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, predicate: Callable[[], T | None], within_s: float = 5.0, what: str = "condition") -> T:
        """What `predicate` returns once it is truthy; AssertionError naming `what` after `within_s`."""
        try:
            with anyio.fail_after(within_s):
                while not (value := predicate()):
                    self._event.clear()
                    with anyio.move_on_after(0.01):
                        await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}") from None
        return value


def config(*, nodes: Mapping[str, int] | None = None, **settings: Any) -> Config:
    """Settings for a test: nodes by id -> max_concurrent (local ones), no keeper, no database file."""
    nodes = nodes or {"localhost": 8}
    settings.setdefault("keeper", False)
    settings.setdefault("on_stop", "drain")
    settings.setdefault("shutdown_grace_ms", 0)
    return Config(source="test", db_path=Path("/nonexistent/test.db"),
                  nodes={node: NodeConfig(id=node, max_concurrent=limit) for node, limit in nodes.items()},
                  **settings)


# -- the store ----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """A row of `jobs` as far as the core's calls can tell."""

    id: str
    node_id: str = "localhost"
    command: str = "true"
    tool: str = "bash"
    priority: int = 0
    max_attempts: Any = 1
    timeout_ms: Any = None
    depends_on: str | None = None
    status: str = "queued"
    attempt: int = 0
    worker_id: str | None = None
    run_after: int | None = None
    created_at: int = 0
    started_at: int | None = None
    duration: int | None = None
    exit_code: int | None = None
    error: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    pid: int | None = None
    pid_start: int | None = None

    def orphan(self) -> OrphanedJob:
        return OrphanedJob(self.id, self.attempt, self.max_attempts, self.pid, self.pid_start, self.node_id)

    def claimed(self) -> ClaimedJob:
        assert self.started_at is not None
        return ClaimedJob(self.id, self.node_id, self.tool, self.command, None, None, self.priority, self.attempt,
                          self.started_at, self.timeout_ms, self.max_attempts, self.created_at)


class FakeChanges:
    """The store's change source: `fire` is another program's write (or the safety poll)."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.started = self.closed = False

    @property
    def uses_push(self) -> bool:
        return True

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True


class FakeStore:
    """What the core calls on daemon.store.Store, in memory. `calls` logs every call by name; `fail` queues an
    exception for a method's next call; `refuse` says which results the database refuses (DbRejected)."""

    name = "fake.db"

    def __init__(self, changed: Changed) -> None:
        self.changed = changed
        self.rows: dict[str, Row] = {}
        self.calls: list[tuple[str, Any]] = []
        self._fail: dict[str, list[BaseException]] = {}
        self._order = itertools.count()
        self.refuse: Callable[[Claim, JobResult], str | None] = lambda claim, result: None
        self.refuse_output: Callable[[Claim], str | None] = lambda claim: None
        self.lose_claim_answer = False  # the next claim commits, then its answer is lost (DbUnavailable)
        self.finish_gate: asyncio.Event | None = None  # finish_many waits for it once it has been called
        self.after_finish: Callable[[], None] = lambda: None  # what happens to the store once a finish took
        self.unwritable: str | None = None
        self.settled = True  # writes_settled(); idle() settles them when settle_on_idle
        self.settle_on_idle = True
        self.kept: list[dict[str, Any]] = []
        self.keep_error: Exception | None = None
        self.quarantined: list[dict[str, Any]] = []
        self.workers: list[Worker] = []
        self.stopped: dict[str, str] = {}
        self.detached: list[tuple[str, str, str | None, OrphanedJob]] = []
        self.source: FakeChanges | None = None

    # -- helpers of the tests -----------------------------------------------------------------------------

    def insert(self, job_id: str, **fields: Any) -> Row:
        """Another program queues a row (and, once the daemon listens, its change source says so)."""
        row = self.rows[job_id] = Row(job_id, created_at=next(self._order), **fields)
        self.queue_changed()
        return row

    def cancel(self, job_id: str) -> None:
        self.rows[job_id].status = "cancelled"
        self.queue_changed()

    def queue_changed(self) -> None:
        if self.source is not None and self.source.started:
            self.source.on_change()
        self.changed.notify()

    def fail(self, method: str, *errors: BaseException) -> None:
        self._fail.setdefault(method, []).extend(errors)

    def called(self, method: str) -> list[Any]:
        return [args for name, args in self.calls if name == method]

    def _call(self, method: str, args: Any = None) -> None:
        self.calls.append((method, args))
        self.changed.notify()
        if self._fail.get(method):
            raise self._fail[method].pop(0)

    def _ours(self, claim: Claim) -> Row | None:
        row = self.rows.get(claim.job_id)
        if row is None or row.worker_id != claim.worker_id or row.attempt != claim.attempt:
            return None
        return row if row.status in ("executing", "cancelled") and row.duration is None else None

    # -- noticing, settling, rewrites ---------------------------------------------------------------------

    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> FakeChanges:
        self.source = FakeChanges(on_change)
        return self.source

    def writes_settled(self) -> bool:
        return self.settled

    async def idle(self) -> None:
        self._call("idle")
        if self.settle_on_idle:
            self.settled = True

    async def quarantine(self, *, running: Sequence[Mapping[str, Any]], worker: Mapping[str, Any]) -> Quarantine:
        self._call("quarantine")
        self.quarantined.append({"running": list(running), "worker": dict(worker)})
        return Quarantine(reason=str(self.unwritable), message="rewritten", set_aside=[], unrecorded=[],
                          report=Path("/nonexistent/report.json"), results=Path("/nonexistent/results.jsonl"))

    def keep_results(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._call("keep_results", list(rows))
        if self.keep_error is not None:
            raise self.keep_error
        self.kept.extend(dict(row) for row in rows)

    # -- the daemon's side --------------------------------------------------------------------------------

    async def fail_malformed(self) -> list[tuple[Any, str]]:
        self._call("fail_malformed")
        return []

    async def fail_unknown_nodes(self, node_ids: Sequence[str], pool_ids: Sequence[str] = ()) -> list[tuple[str, Any]]:
        self._call("fail_unknown_nodes", tuple(node_ids))
        return []

    async def claim_pool(self, pool: str, tools: Sequence[str], limit: int, worker_id: str,
                         place: Any) -> list[ClaimedJob]:
        self._call("claim_pool", (pool, limit))
        return []  # placement has its own unit tests (tests/unit/test_placement.py); these fakes name nodes only

    async def fail_toolless_pool_jobs(self, pool: str, tools: Sequence[str], worker_id: str,
                                      error: str) -> list[tuple[str, Any]]:
        self._call("fail_toolless_pool_jobs", pool)
        return []

    async def fail_dependency_cycles(self) -> list[tuple[str, Any]]:
        self._call("fail_dependency_cycles")
        return []

    async def fail_blocked_dependencies(self) -> list[tuple[str, Any]]:
        self._call("fail_blocked_dependencies")
        return []

    async def fail_node_jobs(self, node_id: str, error: str, *, queued_before: int | None = None) -> list[str]:
        self._call("fail_node_jobs", (node_id, error))
        return []

    async def has_dependents(self) -> bool:
        self._call("has_dependents")
        return any(row.status == "queued" and row.depends_on is not None for row in self.rows.values())

    async def next_run_after(self) -> int | None:
        self._call("next_run_after")
        due = [row.run_after for row in self.rows.values() if row.status == "queued" and row.run_after is not None]
        return min(due, default=None)

    def _claimable(self, row: Row, node_id: str) -> bool:
        if row.status != "queued" or row.node_id != node_id:
            return False
        if row.run_after is not None and row.run_after > now_ms():
            return False
        return row.depends_on is None or self.rows[row.depends_on].status == "completed"

    async def claim(self, node_id: str, limit: int, worker_id: str) -> list[ClaimedJob]:
        self._call("claim", (node_id, limit))
        rows = sorted((row for row in self.rows.values() if self._claimable(row, node_id)),
                      key=lambda row: (-row.priority, row.created_at))[:limit]
        for row in rows:
            row.status, row.worker_id, row.attempt, row.started_at = "executing", worker_id, row.attempt + 1, now_ms()
            row.run_after = row.duration = None
        if self.lose_claim_answer:
            self.lose_claim_answer = False
            raise DbUnavailable("server closed the connection unexpectedly")
        return [row.claimed() for row in rows]

    async def write_outputs(self, updates: Iterable[tuple[Claim, OutputSnapshot, ProcessRef | None]]) -> None:
        updates = list(updates)
        self._call("write_outputs", updates)
        for claim, _, _ in updates:
            if (refusal := self.refuse_output(claim)) is not None:
                raise DbRejected(refusal)
        for claim, out, ref in updates:
            if (row := self._ours(claim)) is not None:
                row.stdout = out.stdout if out.stdout is not None else row.stdout
                row.stdout_bytes, row.stderr_bytes = out.stdout_bytes, out.stderr_bytes
                row.pid = ref.pid if ref else row.pid

    async def finish_many(self, items: Sequence[tuple[Claim, JobResult]]) -> dict[str, tuple[JobStatus, int | None]]:
        items = list(items)
        self._call("finish_many", items)
        if self.finish_gate is not None:
            await self.finish_gate.wait()
        if self.unwritable is not None:
            raise DatabaseRewritten(self.unwritable)
        for claim, result in items:
            if (refusal := self.refuse(claim, result)) is not None:
                raise DbRejected(refusal)
        done = {}
        for claim, result in items:
            if (row := self._ours(claim)) is not None:
                done[claim.job_id] = self._finish(row, result)
        self.after_finish()
        self.changed.notify()
        return done

    @staticmethod
    def _finish(row: Row, result: JobResult) -> tuple[JobStatus, int | None]:
        row.exit_code, row.error = result.exit_code, result.error
        row.stdout = result.output.stdout if result.output.stdout is not None else row.stdout
        row.stdout_bytes, row.stderr_bytes = result.output.stdout_bytes, result.output.stderr_bytes
        if result.requeue and row.status == "executing":  # a row cancelled meanwhile stays cancelled
            row.status, row.run_after, row.worker_id, row.started_at = "queued", result.run_after, None, None
            row.attempt -= int(result.uncount)
            return JobStatus.QUEUED, None
        row.status = "cancelled" if row.status == "cancelled" else result.status.value
        row.duration = now_ms() - (row.started_at or 0)
        return JobStatus(row.status), row.duration

    async def cancelled_among(self, job_ids: Iterable[str], worker_id: str) -> list[tuple[str, int]]:
        ids = set(job_ids)
        self._call("cancelled_among", ids)
        return [(row.id, row.attempt) for row in self.rows.values()
                if row.status == "cancelled" and row.worker_id == worker_id and row.id in ids]

    # -- leases and recovery ------------------------------------------------------------------------------

    async def register_worker(self, *, worker_id: str, host: str, boot_id: str | None, pid: int,
                              pid_start: int | None, nodes: Sequence[str], pools: Any = None) -> None:
        self._call("register_worker", (worker_id, host, boot_id, pid, pid_start, tuple(nodes)))

    async def heartbeat(self, worker_id: str) -> bool:
        self._call("heartbeat", worker_id)
        return worker_id not in self.stopped

    async def other_workers(self, worker_id: str) -> list[Worker]:
        self._call("other_workers")
        return [worker for worker in self.workers if worker.id != worker_id]

    async def stop_worker(self, worker_id: str, reason: str) -> bool:
        self._call("stop_worker", (worker_id, reason))
        if worker_id in self.stopped:
            return False
        self.stopped[worker_id] = reason
        return True

    async def orphaned_jobs(self, worker_id: str) -> list[OrphanedJob]:
        self._call("orphaned_jobs", worker_id)
        return [row.orphan() for row in self.rows.values()
                if row.worker_id == worker_id and row.status in ("executing", "cancelled") and row.duration is None]

    async def resolve_orphan(self, worker_id: str, job: OrphanedJob, *, requeue: bool, error: str) -> bool:
        self._call("resolve_orphan", (worker_id, job, requeue, error))
        row = self._ours(Claim(job.id, worker_id, job.attempt))
        if row is None:
            return False
        row.error = error
        if requeue and row.status == "executing":
            row.status, row.worker_id, row.started_at = "queued", None, None
        else:
            row.status = "cancelled" if row.status == "cancelled" else "failed"
            row.duration = 0
        return True

    async def adopt(self, old_worker_id: str, job: OrphanedJob, worker_id: str) -> AdoptedJob | None:
        self._call("adopt", (old_worker_id, job))
        row = self._ours(Claim(job.id, old_worker_id, job.attempt))
        if row is None:
            return None
        row.worker_id = worker_id
        return AdoptedJob(row.claimed(), row.status == "cancelled", row.stdout, row.stderr, row.stdout_bytes,
                          row.stderr_bytes)

    async def detached_jobs(self, node_ids: Sequence[str]) -> list[tuple[str, str, str | None, OrphanedJob]]:
        self._call("detached_jobs", tuple(node_ids))
        return [entry for entry in self.detached if entry[3].node_id in node_ids]

    async def finished_attempts(self, node_id: str) -> list[tuple[str, int]]:
        self._call("finished_attempts", node_id)
        return []


# -- executors ----------------------------------------------------------------------------------------------------

class FakeProcess:
    """A started job that ends when the test says (`end`), or when signalled if `dies_of` holds that signal."""

    def __init__(self, changed: Changed, command: Command | None, key: str, on_stdout: OutputCallback,
                 on_stderr: OutputCallback, *, detachable: bool) -> None:
        self.changed, self.command, self.key = changed, command, key
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        self._detachable = detachable
        self._ended = asyncio.Event()
        self.status: ExitStatus | None = None
        self.lost: str | None = None
        self.signals: list[int] = []
        self.dies_of = {signal.SIGTERM, signal.SIGKILL}
        self.forgotten: list[bool] = []  # each forget()'s `remove`

    @property
    def pid(self) -> int | None:
        return None  # not a process of this host: nothing reads /proc for it

    @property
    def exited(self) -> bool:
        return self.status is not None

    @property
    def detachable(self) -> bool:
        return self._detachable

    def write(self, stdout: bytes = b"", stderr: bytes = b"") -> None:
        self._on_stdout(stdout)
        self._on_stderr(stderr)

    def end(self, status: ExitStatus | int = 0, *, stdout: bytes = b"", stderr: bytes = b"") -> None:
        self.write(stdout, stderr)
        self.status = status if isinstance(status, ExitStatus) else ExitStatus(status)
        self._ended.set()
        self.changed.notify()

    def lose(self, why: str) -> None:
        """The node's connection dropped: no exit status will come."""
        self.lost = why
        self._ended.set()

    async def wait(self) -> ExitStatus:
        await self._ended.wait()
        if self.lost is not None:
            raise JobLost(self.lost)
        assert self.status is not None
        return self.status

    def signal_group(self, signum: int) -> None:
        self.signals.append(signum)
        self.changed.notify()
        if signum in self.dies_of and not self.exited:
            self.end(ExitStatus(128 + signum, signum))

    def forget(self, *, remove: bool) -> None:
        self.forgotten.append(remove)
        self.changed.notify()


class FakeExecutor:
    """Starts FakeProcesses; `start_error` is raised by the next start instead. With `reattach`, its jobs outlive
    the daemon: `held` are the attempt keys it still holds (or an exception: it does not answer)."""

    def __init__(self, changed: Changed, *, reattach: bool = False, detachable: bool = False) -> None:
        self.changed = changed
        self._reattach, self._detachable = reattach, detachable
        self.processes: list[FakeProcess] = []
        self.start_error: BaseException | None = None
        self.held: set[str] | BaseException = set()
        self.holds_asked: list[list[str]] = []

    @property
    def can_reattach(self) -> bool:
        return self._reattach

    def _new(self, command: Command | None, key: str, on_stdout: OutputCallback,
             on_stderr: OutputCallback) -> FakeProcess:
        process = FakeProcess(self.changed, command, key, on_stdout, on_stderr, detachable=self._detachable)
        self.processes.append(process)
        self.changed.notify()
        return process

    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                    output: JobOutput) -> FakeProcess:
        if self.start_error is not None:
            error, self.start_error = self.start_error, None
            raise error
        return self._new(command, command.key, on_stdout, on_stderr)

    async def reattach(self, key: str, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                       output: JobOutput) -> FakeProcess:
        return self._new(None, key, on_stdout, on_stderr)

    async def ready(self) -> None:
        pass

    async def holds(self, keys: list[str]) -> set[str]:
        self.holds_asked.append(list(keys))
        if isinstance(self.held, BaseException):
            raise self.held
        return {key for key in keys if key in self.held}

    async def kill_orphans(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> list[str]:
        await finished_attempts()
        return []

    async def sweep(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> None:
        pass

    async def output(self, command: Command, timeout_s: float) -> str:
        return ""

    async def aclose(self) -> None:
        pass

    def running(self) -> list[FakeProcess]:
        return [process for process in self.processes if not process.exited and process.lost is None]


class FakeNodes:
    """Node health as the dispatcher asks it: every configured node online unless the test closes it."""

    def __init__(self, closed: Iterable[str] = ()) -> None:
        self.closed = set(closed)
        self.unreachable_calls: list[tuple[str, str, float]] = []

    def can_claim(self, node_id: str) -> bool:
        return node_id not in self.closed

    def error_of(self, node_id: str) -> str | None:
        return None

    def status_of(self, node_id: str) -> NodeStatus:
        return NodeStatus.ONLINE

    def unreachable(self, node_id: str, error: str, retry_in_s: float) -> None:
        self.unreachable_calls.append((node_id, error, retry_in_s))


class FakeHooks(Hooks):
    def __init__(self) -> None:
        self.claimed: list[str] = []
        self.finished: list[tuple[str, str]] = []
        self.db_errors = 0

    def job_claimed(self, job: ClaimedJob) -> None:
        self.claimed.append(job.id)

    def job_finished(self, node: str, tool: str, status: str, duration_ms: int | None) -> None:
        self.finished.append((node, status))

    def db_write_error(self) -> None:
        self.db_errors += 1


# -- a dispatcher on the fakes ------------------------------------------------------------------------------------

@dataclass
class Harness:
    """A Dispatcher running on the fakes, in the test's task group."""

    changed: Changed
    store: FakeStore
    executors: dict[str, FakeExecutor]
    nodes: FakeNodes
    hooks: FakeHooks
    wakes: Wakes
    dispatcher: Dispatcher
    stop: asyncio.Event
    done: anyio.Event
    rewritten: list[Quarantine] = field(default_factory=list)

    @property
    def executor(self) -> FakeExecutor:
        return next(iter(self.executors.values()))

    async def started(self, count: int, node: str | None = None) -> list[FakeProcess]:
        """Wait until `count` processes were started (on `node`, or on the first executor)."""
        executor = self.executors[node] if node else self.executor
        return await self.changed.until(lambda: executor.processes if len(executor.processes) >= count else None,
                                        what=f"{count} processes started")

    async def recorded(self, job_id: str) -> Row:
        """Wait until the dispatcher is done with `job_id`: its end written and the job no longer running."""
        row = self.store.rows[job_id]
        await self.changed.until(lambda: row.status != "executing" and not any(
            key[0] == job_id for key in self.dispatcher.running), what=f"{job_id} recorded")
        return row

    async def looked(self, reason: Wake = Wake.SCHEDULE_CHANGED) -> None:
        """Return once the loop has been through a whole pass that took `reason` and whatever else was pending."""
        before = len(self.store.called("next_run_after"))
        self.wakes.add(reason | Wake.SCHEDULE_CHANGED)  # that one's duty ends the pass: next_run_after
        await self.changed.until(lambda: len(self.store.called("next_run_after")) > before, what="a pass of the loop")

    def finishes_of(self, job_id: str) -> list[JobResult]:
        return [result for items in self.store.called("finish_many") for claim, result in items
                if claim.job_id == job_id]


@contextlib.asynccontextmanager
async def dispatching(settings: Config | None = None, *, store: FakeStore | None = None,
                      executors: Mapping[str, FakeExecutor] | None = None,
                      nodes: FakeNodes | None = None) -> AsyncIterator[Harness]:
    """Run a Dispatcher on the fakes for the block; at its end, stop it and wait until run() returned."""
    changed = store.changed if store is not None else Changed()
    store = store or FakeStore(changed)
    settings = settings or config()
    executors = dict(executors or {node: FakeExecutor(changed) for node in settings.nodes})
    harness = Harness(changed, store, executors, nodes or FakeNodes(), FakeHooks(), Wakes(), cast(Dispatcher, None),
                      asyncio.Event(), anyio.Event())
    harness.dispatcher = Dispatcher(settings, cast(Store, store), executors, harness.nodes, harness.wakes, WORKER,
                                    hooks=harness.hooks, on_rewritten=harness.rewritten.append)

    async def run() -> None:
        try:
            await harness.dispatcher.run(harness.stop)
        finally:
            harness.done.set()
            changed.notify()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await changed.until(lambda: store.source is not None and store.source.started, what="the loop")
            try:
                yield harness
            finally:  # a test that failed with a write held open: the recorder's shielded write must end
                if store.finish_gate is not None:
                    store.finish_gate.set()
            harness.stop.set()
            await harness.done.wait()


def result(status: JobStatus = JobStatus.COMPLETED, exit_code: int | None = 0, **kwargs: Any) -> JobResult:
    output = kwargs.pop("output", OutputSnapshot("out", "", 3, 0))
    return JobResult(status, exit_code, kwargs.pop("error", None), output, **kwargs)

