"""The job store: every operation the daemon, its leases, its nodes and the CLI run on the database, written once
over a backend's driver (daemon.store.driver); the leases' (leases.py), the nodes' (nodes.py) and the console's
(console.py) are parts of it. Every status change is a named compare-and-set query; rows come back
as the frozen values of daemon.model, their fields taken by column name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon import logging as log
from daemon.errors import DatabaseRewritten, JobdError
from daemon.model import (
    Claim,
    ClaimedJob,
    JobResult,
    JobStatus,
    OutputSnapshot,
    PoolRow,
    ProcessRef,
    Quarantine,
    RawText,
)
from daemon.store.base import WORKERS_KEPT, WORKERS_KEPT_MS, ChangeSource, DbError
from daemon.store.console import ConsoleReads
from daemon.store.driver import Driver, Rows, Tx, values
from daemon.store.leases import LeaseRows
from daemon.store.nodes import NodeRows

logger = log.get("store")
_WRITE_FAILED: tuple[type[Exception], ...] = (*DbError, DatabaseRewritten)


class JobStore(LeaseRows, NodeRows, ConsoleReads):
    """The one store the dispatcher, recorder, lease, recovery, health, metrics and CLI talk to, whatever the
    database: the domain here, the dialect in the driver."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        # What the backend found as it opened the database (daemon.store.driver.Driver says what each means).
        self.name, self.path, self.shared_by_hosts = driver.name, driver.path, driver.shared_by_hosts
        self.read_only, self.write_denied, self.read_only_fs = (driver.read_only, driver.write_denied,
                                                                driver.read_only_fs)

    # -- the backend's own: schema, backups, the change source, and a file another program rewrote ------------

    async def close(self) -> None:
        await self._driver.close()

    async def migrate(self) -> list[str]:
        """Create the base schema where missing and apply the daemon's pending migrations; idempotent."""
        return await self._driver.migrate()

    async def check(self) -> list[str]:
        """Problems that would stop the daemon or other programs from using the database; empty when fine."""
        return await self._driver.check()

    async def backup(self, target: Path) -> None:
        await self._driver.backup(target)

    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        """What tells the daemon that the queue may have changed; `poll_s`: the configured safety poll."""
        return self._driver.changes(on_change, poll_s=poll_s)

    @property
    def unwritable(self) -> str | None:
        """Why nothing more may be written to the store (another program rewrote its file), or None."""
        return self._driver.unwritable

    async def quarantine(self, *, running: Sequence[Mapping[str, Any]], worker: Mapping[str, Any]) -> Quarantine:
        return await self._driver.quarantine(running=running, worker=worker)

    def keep_results(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._driver.keep_results(rows)

    async def apply_set_aside(self) -> list[dict[str, Any]]:
        return await self._driver.apply_set_aside()

    def writes_settled(self) -> bool:
        return self._driver.writes_settled()

    async def idle(self) -> None:
        await self._driver.idle()

    # -- the daemon's side ----------------------------------------------------------------------------------

    async def fail_malformed(self) -> list[tuple[Any, str]]:
        """Queued rows no claim can take as they are (an id that is no text, an attempt out of range...): failed
        at once, with why. An id that is no text comes as its SQL literal."""
        rows = await self._driver.write("fail_malformed")
        self._driver.touched(rows.column("id"))
        return rows.tuples("id", "error")

    async def fail_unknown_nodes(self, node_ids: Sequence[str], pool_ids: Sequence[str] = ()) -> list[tuple[str, Any]]:
        """Queued rows for a node or pool that neither this daemon (its nodes and pools) nor another live one
        serves."""
        pools = f"; pools: {', '.join(pool_ids)}" if pool_ids else ""
        error = (f"unknown node: no daemon on this database serves it (this one serves {', '.join(node_ids)}{pools}); "
                 f"set node_id to a configured node{' or pool' if pool_ids else ''}")
        rows = await self._driver.write("fail_unknown_nodes", {"nodes": self._driver.array([*node_ids, *pool_ids]),
                                                               "error": error})
        self._driver.touched(rows.column("id"))
        return rows.tuples("id", "node_id")

    async def claim(self, node_id: str, limit: int, worker_id: str) -> list[ClaimedJob]:
        """Up to `limit` queued rows of the node, now ours, in the claim's order (RETURNING promises none)."""
        rows = await self._driver.write("claim_jobs", {"node_id": node_id, "limit": limit, "worker_id": worker_id})
        return await self._claimed(rows, worker_id)

    async def claim_pool(self, pool: str, tools: Sequence[str], limit: int, worker_id: str,
                         place: Callable[[list[PoolRow]], list[tuple[Any, str]]]) -> list[ClaimedJob]:
        """Up to `limit` queued rows of a pool whose tool is one of `tools`, each claimed on the member `place`
        chose for it (row seq -> member id; a row left out stays queued). One transaction: the rows read are held
        (SQLite's write lock, PostgreSQL's row locks) until those placed are claimed, so each runs once however
        many daemons place on the pool. `place` may be called again if the backend retries the transaction."""

        async def work(tx: Tx) -> Rows | None:
            rows = await tx.rows("pool_candidates", {"pool": pool, "tools": self._driver.array(tools),
                                                     "limit": limit, "worker_id": worker_id})
            placed = place(values(PoolRow, rows)) if rows else []
            if not placed:
                return None
            return await tx.rows("claim_placed", {"placed": json.dumps({str(seq): node for seq, node in placed}),
                                                  "worker_id": worker_id})

        if not (await self._driver.read("pool_has_queued", {"pool": pool})).first("found"):
            return []
        rows = await self._driver.transaction(work)
        return [] if rows is None else await self._claimed(rows, worker_id)

    async def _claimed(self, rows: Rows, worker_id: str) -> list[ClaimedJob]:
        if not rows:
            return []
        job_id = rows.pick("id")
        self._driver.touched(map(job_id, rows))
        if unnamed := [row for row in rows if isinstance(job_id(row), RawText)]:
            await self._fail_unnamed(rows, unnamed, worker_id)
            rows = rows.filter("id", lambda value: not isinstance(value, RawText))
        rows.sort(key=_claim_order(rows))
        return values(ClaimedJob, rows)

    async def _fail_unnamed(self, rows: Rows, unnamed: list[Any], worker_id: str) -> None:
        """A claimed row whose id is not valid UTF-8 (only SQLite can hold one) never becomes a running job: every
        later step names the job by its id, in JSON and in logs. It fails at once, found by its `seq`."""
        job_id, seq = rows.pick("id"), rows.pick("seq")
        try:
            for row in unnamed:
                raw = RawText(job_id(row))
                error = f"id is not valid UTF-8 text (byte {raw.bad_byte()}: {str(raw)!r}); store ids as UTF-8 text"
                await self._driver.write_count("fail_claimed_row", {"seq": seq(row), "worker_id": worker_id,
                                                                    "error": error})
                logger.warning("job.failed", job_id=str(raw), reason=error)
        except _WRITE_FAILED as e:  # the good rows are ours now: they must still run
            logger.error("db.write_failed", what="fail rows with an undecodable id", error=str(e))

    async def write_outputs(self, updates: Iterable[tuple[Claim, OutputSnapshot, ProcessRef | None]]) -> None:
        """Flush live output (and where it runs) of several jobs in one transaction, however many jobs."""
        params = [self._output(claim, out) | {"pid": proc.pid if proc else None,
                                               "pid_start": proc.start if proc else None}
                  for claim, out, proc in updates]
        if not params:
            return
        await self._driver.transaction(lambda tx: tx.executemany("write_output", params))
        self._driver.touched(p["id"] for p in params)

    async def finish_many(self, items: Sequence[tuple[Claim, JobResult]]
                          ) -> dict[str, tuple[JobStatus, int | None]]:
        """Record the end of several jobs in one transaction (a group commit). Returns job id -> (the row's status
        now, duration ms or None if re-queued) for the writes that took; a job missing from it is no longer ours
        (another program deleted or re-queued it) and its row was left untouched."""
        if not items:
            return {}
        params = []
        for claim, result in items:
            p = self._output(claim, result.output)
            p.update(status=result.status.value, exit_code=result.exit_code, error=result.error,
                     run_after=result.run_after, uncount=int(result.uncount))
            params.append(p)
        requeues = [p for p, (_, result) in zip(params, items, strict=True) if result.requeue]
        claims = self._driver.claims([claim for claim, _ in items]) | {"worker_id": items[0][0].worker_id}

        async def work(tx: Tx) -> dict[str, tuple[JobStatus, int | None]]:
            ours = set((await tx.rows("unfinished_claims", claims)).each("id"))
            for p, (_, result) in zip(params, items, strict=True):  # now that the rows' locks are ours
                p["late_ms"] = result.late_ms()
            if requeues:  # first: a requeue that does not take (the row was cancelled) is then finished
                await tx.executemany("requeue_job", requeues)
            await tx.executemany("finish_job", params)
            rows = (await tx.rows("finished_claims", claims)).filter("id", ours.__contains__)
            await self._driver.finished(tx, params, rows)
            return {job_id: (JobStatus(status), duration)
                    for job_id, status, duration in rows.each("id", "status", "duration")}

        finished = await self._driver.transaction(work)
        self._driver.touched(claim.job_id for claim, _ in items)
        return finished

    def _output(self, claim: Claim, out: OutputSnapshot) -> dict[str, Any]:
        stdout, stderr = out.stdout, out.stderr
        if (text := self._driver.text) is not None:
            stdout, stderr = (None if t is None else text(t) for t in (stdout, stderr))
        return {"id": claim.job_id, "worker_id": claim.worker_id, "attempt": claim.attempt, "stdout": stdout,
                "stderr": stderr, "stdout_bytes": out.stdout_bytes, "stderr_bytes": out.stderr_bytes}

    async def fail_blocked_dependencies(self) -> list[tuple[str, Any]]:
        """Fail queued rows whose dependency can no longer complete; repeated so chains fail in one call."""
        failed: list[tuple[str, Any]] = []
        while rows := await self._driver.write("fail_blocked_dependencies"):
            failed += rows.tuples("id", "depends_on")
            self._driver.touched(rows.column("id"))
        return failed

    async def fail_dependency_cycles(self) -> list[tuple[str, Any]]:
        """Fail every queued row on a cycle of depends_on (of any length): none of them can ever start. Each row
        depends on one job at most, so one walk over the queue finds every cycle, in time linear in its size; only
        needed after another program wrote (the daemon never makes a cycle)."""

        async def work(tx: Tx) -> list[tuple[str, Any]]:
            edges = dict((await tx.rows("queued_dependencies")).tuples("id", "depends_on"))
            failed: list[tuple[str, Any]] = []
            for cycle in cycles(edges):
                error = f"dependency cycle: {' -> '.join([*cycle, cycle[0]])}; none of these jobs can ever start"
                for job_id in cycle:
                    rows = await tx.rows("fail_in_cycle", {"id": job_id, "error": error})
                    failed += rows.tuples("id", "depends_on")
            return failed

        failed = await self._driver.transaction(work)
        self._driver.touched(job_id for job_id, _ in failed)
        return failed

    async def fail_toolless_pool_jobs(self, pool: str, tools: Sequence[str], worker_id: str,
                                      error: str) -> list[tuple[str, Any]]:
        """Fail a pool's queued rows whose tool is none of `tools` (those this daemon's members have), unless
        another live daemon serving the pool has a member with it. (id, tool) of each failed."""
        rows = await self._driver.write("fail_toolless_pool_jobs", {"pool": pool, "tools": self._driver.array(tools),
                                                                    "worker_id": worker_id, "error": error})
        self._driver.touched(rows.column("id"))
        return rows.tuples("id", "tool")

    async def has_dependents(self) -> bool:
        return bool((await self._driver.read("has_dependents")).first("dependents"))

    async def next_run_after(self) -> int | None:
        """When the earliest row waiting for its run_after becomes due (epoch ms), or None."""
        at = (await self._driver.read("next_run_after")).first("run_after")
        return None if at is None else math.ceil(at)

    async def cancelled_among(self, job_ids: Iterable[str], worker_id: str) -> list[tuple[str, int]]:
        """Which of our running jobs another program has cancelled, and in which attempt."""
        rows = await self._driver.read("cancelled_among", {"ids": self._driver.array(sorted(set(job_ids))),
                                                           "worker_id": worker_id})
        return rows.tuples("id", "attempt")

    # -- the CLI's side -------------------------------------------------------------------------------------

    async def insert_job(self, *, node_id: str, tool: str, command: str, cwd: str | None = None,
                         env: dict[str, str] | None = None, priority: int = 0, timeout_ms: int | None = None,
                         max_attempts: int = 1, delay_ms: int | None = None,
                         depends_on: str | RawText | None = None, conversation_id: str | None = None,
                         message_id: str | None = None) -> str:
        """Queue a job as other programs do; `delay_ms` after its created_at, both by the database's clock."""
        import uuid  # the CLI's path only: the daemon never creates ids

        job_id = str(uuid.uuid4())
        await self._driver.write("insert_job", {
            "id": job_id, "node_id": node_id, "tool": tool, "command": command, "cwd": cwd, "priority": priority,
            "timeout_ms": timeout_ms, "max_attempts": max_attempts, "delay_ms": delay_ms,
            "depends_on": self._driver.key(depends_on), "env": json.dumps(env) if env else None,
            "conversation_id": conversation_id, "message_id": message_id})
        return job_id

    async def prune(self, *, older_than_ms: int, statuses: Sequence[str]) -> int:
        """Delete finished jobs that ended more than `older_than_ms` ago; how many."""
        return await self._driver.write_count("prune_jobs", {"older_than_ms": older_than_ms,
                                                             "statuses": self._driver.array(statuses)})

    async def retry(self, job_id: str | RawText) -> dict[str, Any] | None:
        """Queue a finished job again: its `attempt` (the last one's) and `max_attempts` as the retry left them, from
        the write itself (a daemon may claim the row before anyone reads it again); None if it has not ended."""
        rows = await self._driver.write("retry_job", {"id": self._driver.key(job_id)})
        return rows.dicts()[0] if rows else None

    async def workers(self) -> list[dict[str, Any]]:
        return (await self._driver.read("workers")).dicts()

    async def cancel(self, job_ids: Sequence[str | RawText]) -> list[str | RawText]:
        """Cancel each job that has not ended, in one transaction; the ids of those cancelled."""

        async def work(tx: Tx) -> list[str | RawText]:
            done: list[str | RawText] = []
            for job_id in job_ids:
                done += (await tx.rows("cancel_job", {"id": self._driver.key(job_id)})).column("id")
            return done

        return await self._driver.transaction(work)

    async def resolve_id(self, prefix: str) -> str | RawText:
        """A full id, or a unique prefix of one."""
        if not prefix:
            raise JobdError("an empty job id names no job")
        if await self.get_job(prefix) is not None:
            return prefix
        found = (await self._driver.read("find_job_ids", {"prefix": prefix})).column("id")
        if not found:
            raise JobdError(f"no job with an id starting with {prefix!r}")
        if len(found) > 1:
            raise JobdError(f"{prefix!r} names more than one job; give more characters of the id")
        job_id: str | RawText = found[0]  # as stored: a RawText id still finds its row (get_job's CAST)
        return job_id

    async def get_job(self, job_id: str | RawText) -> dict[str, Any] | None:
        rows = (await self._driver.read("get_job", {"id": self._driver.key(job_id)})).dicts()
        return rows[0] if rows else None

    async def list_jobs(self, *, status: str | None, node_id: str | None, limit: int) -> list[dict[str, Any]]:
        return (await self._driver.read("list_jobs", {"status": status, "node_id": node_id, "limit": limit})).dicts()

    # -- housekeeping: rows no daemon runs, stopped daemons ---------------------------------------------------

    async def stranded_jobs(self, *, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """Rows no daemon of this database will run or finish: a status none of the contract's (a typo on a table
        without CHECK constraints), or `executing` under no registered daemon. How many, and the first `limit`
        of them (id, status, worker_id). `cancel` ends them and `retry` queues them again."""
        rows = await self._driver.read("stranded_jobs", {"limit": limit})
        listed = [{"id": job_id, "status": status, "worker_id": worker_id}
                  for job_id, status, worker_id in rows.each("id", "status", "worker_id")]
        return int(rows.first("total") or 0), listed

    async def prune_workers(self, *, older_than_ms: int = WORKERS_KEPT_MS, keep: int = WORKERS_KEPT) -> int:
        """Forget daemons that stopped more than `older_than_ms` ago, but the `keep` that started last and any that
        still holds an unfinished job (recovery needs it); how many were forgotten."""
        return await self._driver.write_count("prune_workers", {"older_than_ms": older_than_ms, "keep": keep})


def _claim_order(rows: Rows) -> Callable[[Any], tuple[int, Any, Any]]:
    """The claim's ORDER BY, priority DESC, created_at, then the backend's `seq`; a row whose priority or
    created_at is no integer (a bad row) sorts first, so that it fails fast."""
    pick = rows.pick("priority", "created_at", "seq")

    def order(row: Any) -> tuple[int, Any, Any]:
        priority, created_at, seq = pick(row)
        if not isinstance(priority, int) or not isinstance(created_at, int):
            return (-(2**63), 0, seq)
        return (-priority, created_at, seq)

    return order


def cycles(edges: Mapping[str, str]) -> list[list[str]]:
    """The cycles of a graph in which each node has one edge at most, each in the order of its edges."""
    state: dict[str, int] = {}  # absent: not seen; 1: on the current walk; 2: done
    found = []
    for start in edges:
        walk: list[str] = []
        node: str | None = start
        while node is not None and node in edges and state.get(node) is None:
            state[node] = 1
            walk.append(node)
            node = edges[node]
        if node is not None and state.get(node) == 1:  # the walk came back to itself: a cycle from there
            found.append(walk[walk.index(node):])
        for visited in walk:
            state[visited] = 2
    return found
