"""daemon.store.Store: migrations and NexusCLI compatibility on a real SQLite file; the semantics every backend
must share (claim order and limits, leases, compare-and-set finishes, recovery, look-ups) on a real SQLite file
and on a real PostgreSQL server alike."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import DatabaseError, JobdError
from daemon.model import Claim, JobResult, JobStatus, OutputSnapshot
from daemon.store import Store, is_postgres, open_store
from tests.conftest import PgConn

# Every test that uses the `store` fixture runs on each backend (tests/conftest.py `backends`); those that open a
# file of their own (migrations, NexusCLI's schema) are SQLite's alone.
pytestmark = [pytest.mark.anyio, pytest.mark.backends("sqlite", "postgres")]

FIXTURES = Path(__file__).parent.parent / "fixtures"
MIGRATIONS = ["0001_job_columns", "0002_lifecycle", "0003_pools"]
DAEMON_COLUMNS = {"error", "cwd", "env", "priority", "stdout_bytes", "stderr_bytes", "worker_id", "attempt",
                  "timeout_ms", "max_attempts", "run_after", "depends_on", "pid", "pid_start", "ran_on",
                  "attempt_nodes"}
NEXUSCLI_INSERT = ("INSERT INTO jobs (id, conversation_id, message_id, node_id, tool, command, status, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


async def finish(store: Store, claim: Claim, result: JobResult) -> tuple[JobStatus, int] | None:
    """One job through the group-commit path the dispatcher uses."""
    return (await store.finish_many([(claim, result)])).get(claim.job_id)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Other:
    """Another program's connection to the same database: plain sqlite3 (or psycopg), autocommit, `?` placeholders."""

    def __init__(self, target: str) -> None:
        self.postgres = is_postgres(target)
        self.conn: Any = PgConn(target) if self.postgres else sqlite3.connect(target, isolation_level=None, timeout=10)

    def insert(self, job_id: str, *, node_id: str = "localhost", created_at: int | None = None,
               priority: int | None = None, command: str = "echo hi") -> str:
        self.conn.execute(NEXUSCLI_INSERT, (job_id, None, None, node_id, "bash", command, "queued",
                                            created_at if created_at is not None else now_ms()))
        if priority is not None:
            self.conn.execute("UPDATE jobs SET priority = ? WHERE id = ?", (priority, job_id))
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        cur = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
        row = cur.fetchone()
        assert row is not None
        return dict(zip([column[0] for column in cur.description], row, strict=True))

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.conn.execute(sql, params)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "nexuscli.db"


WORKERS = ("w1", "w2", "a", "b")  # the claimants these tests use: a claim needs a live lease


async def register(store: Store, *workers: str) -> None:
    for worker in workers or WORKERS:
        await store.register_worker(worker_id=worker, host="test", boot_id=None, pid=1, pid_start=None,
                                    nodes=["localhost"])


@pytest.fixture
async def store(db_target: str) -> AsyncIterator[Store]:
    """The database `backend` names, migrated, with the WORKERS' leases."""
    store = await open_store(db_target)
    await store.migrate()
    await register(store)
    yield store
    await store.close()


@pytest.fixture
def other(db_target: str, store: Store) -> Iterator[Other]:
    handle = Other(db_target)
    yield handle
    handle.conn.close()


def result(status: JobStatus = JobStatus.COMPLETED, exit_code: int | None = 0, error: str | None = None,
           stdout: str | None = "out\n", stderr: str | None = "err\n") -> JobResult:
    return JobResult(status, exit_code, error, OutputSnapshot(stdout, stderr, 4, 4))


# -- opening and migrating ------------------------------------------------------------------------------------


async def test_a_new_database_is_private(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "jobs.db"
    store = await open_store(path)
    try:
        await store.migrate()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            if side.exists():
                assert stat.S_IMODE(side.stat().st_mode) == 0o600, side.name
    finally:
        await store.close()


async def test_migrate_is_idempotent(path: Path) -> None:
    store = await open_store(path)
    try:
        assert await store.migrate() == MIGRATIONS
        assert await store.migrate() == []
        assert await store.check() == []
    finally:
        await store.close()
    reopened = await open_store(path)
    try:
        assert await reopened.migrate() == []
    finally:
        await reopened.close()
    conn = sqlite3.connect(path)
    assert [row[0] for row in conn.execute("SELECT name FROM jobd_migrations")] == MIGRATIONS
    conn.close()


async def test_concurrent_migrations_apply_once(path: Path) -> None:
    first, second = await open_store(path), await open_store(path)
    try:
        results = await asyncio.gather(first.migrate(), second.migrate())
        assert sorted(results) == [[], MIGRATIONS]
        assert await first.check() == []
    finally:
        await first.close()
        await second.close()


@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not SQLite" * 100)
    return path


async def test_a_file_that_is_not_a_database_is_refused(garbage: Path) -> None:
    with pytest.raises(DatabaseError, match="not a usable SQLite database"):
        await open_store(garbage)


async def test_check_reports_missing_tables_on_an_empty_database(path: Path) -> None:
    store = await open_store(path)
    try:
        problems = await store.check()
        for table in ("conversations", "messages", "jobs", "nodes"):
            assert any(f"table {table!r} is missing" in p for p in problems), problems
        assert any("migrations table is missing" in p for p in problems), problems
    finally:
        await store.close()


async def test_check_reports_a_table_dropped_after_migrate(store: Store, other: Other) -> None:
    assert await store.check() == []
    other.conn.execute("DROP TABLE nodes")
    problems = await store.check()
    assert problems == ["table 'nodes' is missing (run `nexus-jobd db migrate`)"]


async def test_open_without_create_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobdError, match="no such database"):
        await open_store(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def schema_objects(conn: sqlite3.Connection) -> set[tuple[Any, ...]]:
    return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


async def test_migrate_on_a_nexuscli_database(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript((FIXTURES / "nexuscli_schema.sql").read_text())
    conn.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES ('c1', 'chat', 1, 2)")
    conn.execute("INSERT INTO messages (id, conversation_id, role, content, created_at) "
                 "VALUES ('m1', 'c1', 'user', 'hi', 3)")
    conn.execute(NEXUSCLI_INSERT, ("old", "c1", "m1", "localhost", "bash", "echo old", "completed", 4))
    before_objects = {o for o in schema_objects(conn) if o[:2] != ("table", "jobs")}
    before_migrations = conn.execute("SELECT * FROM _migrations ORDER BY id").fetchall()
    before_jobs_columns = conn.execute("PRAGMA table_info(jobs)").fetchall()
    before_jobs_keys = conn.execute("PRAGMA foreign_key_list(jobs)").fetchall()
    before_data = {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("conversations", "messages", "users")}
    conn.close()

    store = await open_store(path)
    try:
        assert await store.migrate() == MIGRATIONS
        assert await store.check() == []
        assert await store.migrate() == []
    finally:
        await store.close()

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        after = schema_objects(conn)
        assert before_objects <= after, "an existing table or index was changed"
        added = {o[1] for o in after - before_objects if o[:2] != ("table", "jobs")}
        assert added == {"jobd_migrations", "sqlite_autoindex_jobd_migrations_1", "jobd_jobs_claim",
                         "jobd_workers", "sqlite_autoindex_jobd_workers_1", "jobd_jobs_worker"}
        jobs_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
        assert "CHECK(status IN ('queued', 'executing', 'completed', 'failed', 'cancelled'))" in jobs_sql
        columns = conn.execute("PRAGMA table_info(jobs)").fetchall()
        assert columns[: len(before_jobs_columns)] == before_jobs_columns, "a base column of jobs was changed"
        assert {c[1] for c in columns[len(before_jobs_columns):]} == DAEMON_COLUMNS
        assert conn.execute("PRAGMA foreign_key_list(jobs)").fetchall() == before_jobs_keys
        assert conn.execute("SELECT * FROM _migrations ORDER BY id").fetchall() == before_migrations
        assert {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in before_data} == before_data

        # NexusCLI's own INSERT of the base columns still works; the daemon's columns take their defaults.
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(NEXUSCLI_INSERT, ("new", "c1", "m1", "localhost", "bash", "echo new", "queued", now_ms()))
        row = conn.execute("SELECT priority, attempt, worker_id, error FROM jobs WHERE id = 'new'").fetchone()
        assert row == (0, 0, None, None)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            conn.execute(NEXUSCLI_INSERT, ("bad", None, None, "localhost", "bash", "x", "running", now_ms()))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            conn.execute("UPDATE jobs SET status = 'done' WHERE id = 'new'")
    finally:
        conn.close()

    store = await open_store(path)
    try:
        await register(store, "w1")
        claimed = await store.claim("localhost", 10, "w1")
        assert [(job.id, job.attempt, job.priority) for job in claimed] == [("new", 1, 0)]
    finally:
        await store.close()


# -- claiming -------------------------------------------------------------------------------------------------


def insert_mixed(other: Other) -> list[str]:
    """Rows in insertion order; returns their ids in the order they must be claimed."""
    other.insert("p0-old", priority=0, created_at=1000)
    other.insert("p5-new", priority=5, created_at=3000)
    other.insert("p5-old", priority=5, created_at=2000)
    other.insert("p1", priority=1, created_at=500)
    other.insert("p5-tie-b", priority=5, created_at=2500)
    other.insert("p5-tie-a", priority=5, created_at=2500)
    other.insert("neg", priority=-1, created_at=1)
    # Same time: SQLite claims the one inserted first (rowid); PostgreSQL has no insertion order, so by id.
    ties = ["p5-tie-a", "p5-tie-b"] if other.postgres else ["p5-tie-b", "p5-tie-a"]
    return ["p5-old", *ties, "p5-new", "p1", "p0-old", "neg"]


async def test_claim_takes_rows_by_priority_then_age(store: Store, other: Other) -> None:
    expected = insert_mixed(other)
    order = []
    for _ in expected:
        claimed = await store.claim("localhost", 1, "w1")
        assert len(claimed) == 1
        order.append(claimed[0].id)
    assert order == expected
    assert await store.claim("localhost", 1, "w1") == []


async def test_claim_respects_the_limit(store: Store, other: Other) -> None:
    expected = insert_mixed(other)
    first = await store.claim("localhost", 3, "w1")
    assert {job.id for job in first} == set(expected[:3])
    second = await store.claim("localhost", 3, "w1")
    assert {job.id for job in second} == set(expected[3:6])
    assert {job.id for job in await store.claim("localhost", 3, "w1")} == set(expected[6:])


async def test_claim_returns_the_batch_in_claim_order(store: Store, other: Other) -> None:
    # The dispatcher starts a claimed batch in list order, so the list should be highest priority first.
    expected = insert_mixed(other)
    assert [job.id for job in await store.claim("localhost", len(expected), "w1")] == expected


async def test_claim_only_takes_queued_rows_of_its_node(store: Store, other: Other) -> None:
    other.insert("here")
    other.insert("there", node_id="phone")
    other.insert("done")
    other.conn.execute("UPDATE jobs SET status = 'cancelled' WHERE id = 'done'")
    claimed = await store.claim("localhost", 10, "w1")
    assert [job.id for job in claimed] == ["here"]
    assert other.job("there")["status"] == "queued"
    assert other.job("done")["status"] == "cancelled"


async def test_claim_takes_a_dependent_row_only_once_its_dependency_completed(store: Store, other: Other) -> None:
    """The claim itself checks, not only the step before it that fails blocked rows: a dependency may end failed
    between the two (on this daemon or another)."""
    for status in ("queued", "executing", "failed", "cancelled", "completed"):
        other.insert(f"dep-{status}")
        other.conn.execute("UPDATE jobs SET status = ? WHERE id = ?", (status, f"dep-{status}"))
        other.insert(f"after-{status}")
        other.conn.execute("UPDATE jobs SET depends_on = ? WHERE id = ?", (f"dep-{status}", f"after-{status}"))
    other.insert("after-nothing")
    other.conn.execute("UPDATE jobs SET depends_on = 'no-such-job' WHERE id = 'after-nothing'")
    assert {job.id for job in await store.claim("localhost", 20, "w1")} == {"dep-queued", "after-completed"}


async def test_claim_takes_no_row_whose_attempt_is_out_of_range(store: Store, other: Other) -> None:
    """The claim itself leaves them to fail_malformed, not only the step before it: a claim woken by a freed slot
    or a NOTIFY comes without that step. A negative attempt would get around max_attempts; at the top, attempt + 1
    overflows."""
    for attempt in (-2, -1, 2147483647):
        other.insert(f"attempt{attempt}")
        other.conn.execute("UPDATE jobs SET attempt = ? WHERE id = ?", (attempt, f"attempt{attempt}"))
    other.insert("good")
    assert [job.id for job in await store.claim("localhost", 10, "w1")] == ["good"]
    assert [other.job(f"attempt{a}")["status"] for a in (-2, -1, 2147483647)] == ["queued"] * 3


async def test_claim_marks_the_row_as_ours(store: Store, other: Other) -> None:
    other.insert("j1", command="echo one")
    other.conn.execute("UPDATE jobs SET cwd = '/srv', env = '{\"A\": \"1\"}' WHERE id = 'j1'")
    before = now_ms()
    (job,) = await store.claim("localhost", 5, "w1")
    after = now_ms()
    assert (job.id, job.node_id, job.tool, job.command, job.cwd, job.env, job.priority, job.attempt) == (
        "j1", "localhost", "bash", "echo one", "/srv", '{"A": "1"}', 0, 1)
    assert before - 5 <= job.started_at <= after + 5
    row = other.job("j1")
    assert (row["status"], row["worker_id"], row["attempt"], row["started_at"]) == (
        "executing", "w1", 1, job.started_at)


async def test_a_requeued_row_is_claimed_afresh(store: Store, other: Other) -> None:
    other.insert("j1")
    (first,) = await store.claim("localhost", 1, "w1")
    await finish(store, Claim("j1", "w1", first.attempt), result(JobStatus.FAILED, 1, "boom"))
    other.conn.execute("UPDATE jobs SET status = 'queued' WHERE id = 'j1'")
    (second,) = await store.claim("localhost", 1, "w2")
    assert second.attempt == 2
    row = other.job("j1")
    assert (row["worker_id"], row["exit_code"], row["error"], row["stdout"], row["duration"]) == (
        "w2", None, None, None, None)


async def test_a_daemon_whose_lease_was_taken_claims_nothing(store: Store, other: Other) -> None:
    other.insert("j1")
    assert await store.stop_worker("w1", "declared dead: test")  # what another daemon's recovery does
    assert await store.claim("localhost", 1, "w1") == []
    assert other.job("j1")["status"] == "queued"
    assert [job.id for job in await store.claim("localhost", 1, "w2")] == ["j1"]


async def test_a_lease_is_taken_once_and_its_holder_hears_of_it(store: Store) -> None:
    assert await store.heartbeat("w1")
    assert sorted(w.id for w in await store.other_workers("w2")) == ["a", "b", "w1"]
    assert await store.stop_worker("w1", "declared dead: test")
    assert not await store.stop_worker("w1", "declared dead: by another")  # one daemon recovers its jobs
    assert not await store.heartbeat("w1")  # the stalled daemon learns it at its next heartbeat
    assert sorted(w.id for w in await store.other_workers("w2")) == ["a", "b"]
    assert await store.heartbeat("w2")


async def test_a_dead_daemons_jobs_are_resolved_once_each_on_its_claim(store: Store, other: Other) -> None:
    other.insert("j1", created_at=1)
    other.insert("j2", created_at=2)
    assert [job.id for job in await store.claim("localhost", 2, "w1")] == ["j1", "j2"]
    await store.write_outputs([(Claim("j2", "w1", 1), OutputSnapshot("so far\n", None, 7, 0), None)])
    assert await store.stop_worker("w1", "declared dead: test")
    orphans = {job.id: job for job in await store.orphaned_jobs("w1")}
    assert sorted(orphans) == ["j1", "j2"] and orphans["j1"].attempt == 1
    stale = dataclasses.replace(orphans["j1"], attempt=0)
    assert not await store.resolve_orphan("w1", stale, requeue=True, error="stale")  # another attempt's
    assert not await store.resolve_orphan("w2", orphans["j1"], requeue=True, error="not ours")
    assert await store.resolve_orphan("w1", orphans["j1"], requeue=True, error="its daemon died")
    assert not await store.resolve_orphan("w1", orphans["j1"], requeue=True, error="twice")
    row = other.job("j1")
    assert (row["status"], row["error"], row["worker_id"], row["started_at"], row["attempt"]) == (
        "queued", "its daemon died", None, None, 1)
    assert await store.resolve_orphan("w1", orphans["j2"], requeue=False, error="its daemon died")
    assert not await store.resolve_orphan("w1", orphans["j2"], requeue=False, error="twice")
    row = other.job("j2")
    assert (row["status"], row["error"], row["stdout"], row["attempt"]) == ("failed", "its daemon died", "so far\n", 1)
    assert row["duration"] == row["completed_at"] - row["started_at"]
    assert await store.orphaned_jobs("w1") == []
    assert [(job.id, job.attempt) for job in await store.claim("localhost", 5, "w2")] == [("j1", 2)]


async def test_concurrent_claims_from_two_connections_are_disjoint(db_target: str, store: Store,
                                                                   other: Other) -> None:
    ids = {other.insert(f"job-{i:03d}", created_at=i) for i in range(120)}
    second = await open_store(db_target)
    try:
        claimed: dict[str, list[str]] = {"a": [], "b": []}
        while True:
            batches = await asyncio.gather(*(s.claim("localhost", 7, w) for _ in range(3)
                                             for s, w in ((store, "a"), (second, "b"))))
            if not any(batches):
                break
            for index, batch in enumerate(batches):
                claimed["a" if index % 2 == 0 else "b"].extend(job.id for job in batch)
    finally:
        await second.close()
    everything = claimed["a"] + claimed["b"]
    assert len(everything) == len(set(everything)), "a row was claimed twice"
    assert set(everything) == ids
    assert claimed["a"] and claimed["b"], "both connections should have won some claims"
    for worker, job_ids in claimed.items():
        rows = other.rows(f"SELECT DISTINCT worker_id, attempt FROM jobs WHERE id IN ({','.join('?' * len(job_ids))})",
                          *job_ids)
        assert rows == [(worker, 1)]


# -- finishing ------------------------------------------------------------------------------------------------


async def claim_one(store: Store, other: Other, job_id: str = "j1") -> Claim:
    other.insert(job_id)
    (job,) = await store.claim("localhost", 1, "w1")
    return Claim(job.id, "w1", job.attempt)


async def test_finish_records_the_result(store: Store, other: Other) -> None:
    claim = await claim_one(store, other)
    finished = await finish(store, claim, result(JobStatus.COMPLETED, 0))
    row = other.job("j1")
    assert finished == (JobStatus.COMPLETED, row["duration"])
    assert (row["status"], row["exit_code"], row["error"], row["stdout"], row["stderr"]) == (
        "completed", 0, None, "out\n", "err\n")
    assert (row["stdout_bytes"], row["stderr_bytes"]) == (4, 4)
    assert row["duration"] is not None and row["duration"] >= 0
    assert row["duration"] == row["completed_at"] - row["started_at"]


async def test_finish_keeps_cancelled_and_still_records_the_end(store: Store, other: Other) -> None:
    claim = await claim_one(store, other)
    other.conn.execute("UPDATE jobs SET status = ?, completed_at = ? WHERE id = ?", ("cancelled", now_ms(), "j1"))
    finished = await finish(store, claim, result(JobStatus.FAILED, 143, "killed by SIGTERM", stdout="partial\n"))
    row = other.job("j1")
    assert finished == (JobStatus.CANCELLED, row["duration"])
    assert (row["status"], row["exit_code"], row["error"], row["stdout"]) == (
        "cancelled", 143, "killed by SIGTERM", "partial\n")
    assert row["duration"] is not None and row["duration"] == row["completed_at"] - row["started_at"]


@pytest.mark.parametrize(("worker_id", "attempt_delta"), [("someone-else", 0), ("w1", 1), ("w1", -1)])
async def test_finish_with_a_claim_that_is_not_ours_changes_nothing(store: Store, other: Other, worker_id: str,
                                                                     attempt_delta: int) -> None:
    claim = await claim_one(store, other)
    before = other.job("j1")
    wrong = Claim(claim.job_id, worker_id, claim.attempt + attempt_delta)
    assert await finish(store, wrong, result(JobStatus.COMPLETED, 0)) is None
    assert other.job("j1") == before


async def test_finish_twice_is_refused(store: Store, other: Other) -> None:
    claim = await claim_one(store, other)
    finished = await finish(store, claim, result(JobStatus.FAILED, 2))
    before = other.job("j1")
    assert finished == (JobStatus.FAILED, before["duration"])
    assert await finish(store, claim, result(JobStatus.COMPLETED, 0)) is None
    assert other.job("j1") == before


async def test_output_flush_follows_the_claim_and_never_lands_after_finish(store: Store, other: Other) -> None:
    claim = await claim_one(store, other)
    await store.write_outputs([(claim, OutputSnapshot("live", None, 4, 0), None)])
    await store.write_outputs([(claim, OutputSnapshot(None, "e", 4, 1), None)])
    row = other.job("j1")
    assert (row["stdout"], row["stderr"], row["stdout_bytes"], row["stderr_bytes"]) == ("live", "e", 4, 1)
    await store.write_outputs([(Claim("j1", "w2", claim.attempt), OutputSnapshot("intruder", None, 8, 1), None)])
    assert other.job("j1")["stdout"] == "live"
    await finish(store, claim, result(stdout="final"))
    await store.write_outputs([(claim, OutputSnapshot("late", None, 9, 1), None)])
    assert other.job("j1")["stdout"] == "final"


# -- nodes, cancels, look-ups ---------------------------------------------------------------------------------


async def test_fail_unknown_nodes(store: Store, other: Other) -> None:
    other.insert("home")
    other.insert("mars-queued", node_id="mars")
    other.insert("venus", node_id="venus")
    other.insert("mars-running", node_id="mars")
    other.conn.execute("UPDATE jobs SET status = 'executing' WHERE id = 'mars-running'")
    failed = await store.fail_unknown_nodes(["localhost", "phone"])
    assert sorted(failed) == [("mars-queued", "mars"), ("venus", "venus")]
    for job_id in ("mars-queued", "venus"):
        row = other.job(job_id)
        assert row["status"] == "failed"
        assert "localhost, phone" in row["error"]
        assert "unknown node" in row["error"]
        assert row["duration"] == 0
        assert row["started_at"] is not None and row["completed_at"] == row["started_at"]
    assert other.job("home")["status"] == "queued"
    assert other.job("mars-running")["status"] == "executing"
    assert await store.fail_unknown_nodes(["localhost", "phone"]) == []


async def test_cancel_and_cancelled_among(store: Store, other: Other) -> None:
    claim = await claim_one(store, other, "run")
    other.insert("wait")
    other.insert("over")
    other.conn.execute("UPDATE jobs SET status = 'completed' WHERE id = 'over'")
    assert sorted(await store.cancel(["run", "wait", "over", "missing"])) == ["run", "wait"]
    assert other.job("over")["status"] == "completed"
    assert await store.cancelled_among(["run", "wait"], claim.worker_id) == [("run", 1)]
    assert await store.cancelled_among(["run"], "someone-else") == []


async def test_insert_job_and_reads(store: Store, other: Other) -> None:
    job_id = await store.insert_job(node_id="localhost", tool="git", command="status", cwd="/srv",
                                    env={"A": "1"}, priority=3)
    row = await store.get_job(job_id)
    assert row is not None
    assert (row["status"], row["tool"], row["command"], row["cwd"], row["env"], row["priority"]) == (
        "queued", "git", "status", "/srv", '{"A": "1"}', 3)
    assert await store.get_job("nope") is None
    listed = await store.list_jobs(status="queued", node_id=None, limit=10)
    assert [r["id"] for r in listed] == [job_id]
    assert "stdout" not in listed[0]
    assert await store.list_jobs(status="failed", node_id=None, limit=10) == []


async def test_resolve_id(store: Store, other: Other) -> None:
    for job_id in ("abc-1", "abc-2", "a_c", "xyz", "ab"):
        other.insert(job_id)
    assert await store.resolve_id("xy") == "xyz"
    assert await store.resolve_id("abc-1") == "abc-1"
    assert await store.resolve_id("ab") == "ab"  # a full id wins over being a prefix of others
    assert await store.resolve_id("a_") == "a_c"  # '_' is not a wildcard
    with pytest.raises(JobdError, match="'abc' names more than one job"):
        await store.resolve_id("abc")
    with pytest.raises(JobdError, match="no job with an id starting with 'zz'"):
        await store.resolve_id("zz")
    with pytest.raises(JobdError, match="no job"):
        await store.resolve_id("%")


async def test_a_dead_daemons_remote_job_is_adopted_by_one_daemon_only(store: Store, other: Other) -> None:
    other.insert("j1", node_id="box")
    other.conn.execute("UPDATE jobs SET timeout_ms = 60000 WHERE id = 'j1'")
    (job,) = await store.claim("box", 1, "w1")
    await store.write_outputs([(Claim("j1", "w1", 1), OutputSnapshot("so far\n", "", 7, 0), None)])
    assert await store.stop_worker("w1", "declared dead: test")
    (orphan,) = await store.orphaned_jobs("w1")
    (detached,) = await store.detached_jobs(["box"])  # stopped, still executing: adoptable
    assert (detached[0], detached[3]) == ("w1", orphan)
    adopted = await store.adopt("w1", orphan, "w2")
    assert adopted is not None and not adopted.cancelled
    assert (adopted.job.id, adopted.job.attempt, adopted.job.started_at, adopted.job.timeout_ms) == (
        "j1", 1, job.started_at, 60000)
    assert (adopted.stdout, adopted.stdout_bytes, adopted.stderr_bytes) == ("so far\n", 7, 0)
    assert await store.adopt("w1", orphan, "a") is None  # the claim moved: one owner at a time
    row = other.job("j1")
    assert (row["status"], row["worker_id"], row["attempt"]) == ("executing", "w2", 1)
    assert await store.detached_jobs(["box"]) == []
    # The old claim can no longer write; the new one records the end.
    assert await finish(store, Claim("j1", "w1", 1), result()) is None
    assert (await finish(store, Claim("j1", "w2", 1), result()) or (None,))[0] == JobStatus.COMPLETED


async def test_a_stopped_daemon_adopts_nothing_and_a_cancelled_row_is_adopted_as_cancelled(
        store: Store, other: Other) -> None:
    other.insert("j1", node_id="box")
    await store.claim("box", 1, "w1")
    await store.cancel(["j1"])
    assert await store.stop_worker("w1", "detached 1 remote jobs for the next daemon")
    (orphan,) = await store.orphaned_jobs("w1")
    assert await store.stop_worker("b", "declared dead: test")
    assert await store.adopt("w1", orphan, "b") is None  # its own lease is gone: it may not take jobs
    adopted = await store.adopt("w1", orphan, "a")
    assert adopted is not None and adopted.cancelled
    assert other.job("j1")["status"] == "cancelled"


def test_dependency_cycles_are_found_in_one_walk_whatever_the_shape() -> None:
    """Each row depends on one job at most: one walk finds every cycle, and a long queue costs linear time (the
    recursive SQL it replaced took 24 s on a chain of 1,000 rows, with the write lock held)."""
    from daemon.store.jobs import cycles as find_cycles

    chain = {f"c{i}": f"c{i + 1}" for i in range(20_000)}  # into a job not queued: no cycle
    ring = {f"r{i}": f"r{(i + 1) % 5_000}" for i in range(5_000)}
    tail_into_loop = {"t0": "t1", "t1": "l0", "l0": "l1", "l1": "l0"}  # t0, t1 lead into a cycle, not on it
    cycles = find_cycles(chain | ring | tail_into_loop | {"self": "self"})
    assert sorted(map(sorted, cycles)) == sorted([sorted(ring), ["l0", "l1"], ["self"]])
    assert next(c for c in cycles if "r0" in c)[:3] == ["r0", "r1", "r2"]  # in the order of the edges


async def test_a_row_that_depends_on_itself_is_told_so(store: Store, other: Other) -> None:
    """Before: "depends_on 'x' is this job itself; this job runs only after that job completed"."""
    other.insert("selfish")
    other.conn.execute("UPDATE jobs SET depends_on = id WHERE id = 'selfish'")
    assert await store.fail_blocked_dependencies() == [("selfish", "selfish")]
    assert other.job("selfish")["error"] == ("depends_on 'selfish' is this job itself: a job cannot wait for its own "
                                             "end; set depends_on to another job's id, or NULL")


@pytest.mark.backends("sqlite")
async def test_a_malformed_row_is_named_by_its_id_as_is(store: Store, other: Other) -> None:
    """Before: the log's job_id for a BLOB run_after was the SQL literal "'ra-blob'"; only an id that is no text
    is shown as one (X'...')."""
    other.insert("ra-blob")
    other.conn.execute("UPDATE jobs SET run_after = X'00' WHERE id = 'ra-blob'")
    other.conn.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                       "VALUES (X'6869', 'localhost', 'bash', 'true', 'queued', 0)")
    assert sorted(await store.fail_malformed()) == [
        ("X'6869'", "id must be text, got blob"),
        ("ra-blob", "run_after must be epoch milliseconds (a number), got blob X'00'")]


# -- rows no daemon runs (README: Rows no daemon runs) ----------------------------------------------------------

def strand(other: Other, job_id: str, *, status: str | None = "executing", worker_id: str | None = None,
           started_at: int | None = None) -> str:
    """A row as a typo or another program leaves it: a status no daemon runs, or `executing` under no daemon."""
    other.insert(job_id)
    other.conn.execute("UPDATE jobs SET status = ?, worker_id = ?, started_at = ? WHERE id = ?",
                       (status, worker_id, started_at, job_id))
    return job_id


async def test_rows_no_daemon_runs_are_listed(store: Store, other: Other) -> None:
    strand(other, "exec-null")
    strand(other, "exec-ghost", worker_id="gone:1:x", started_at=5)
    await claim_one(store, other, "held")  # executing under a registered daemon: not stranded
    other.insert("waiting")
    total, rows = await store.stranded_jobs(limit=1)
    assert total == 2 and len(rows) == 1
    total, rows = await store.stranded_jobs(limit=10)
    assert sorted((r["id"], r["status"], r["worker_id"]) for r in rows) == [
        ("exec-ghost", "executing", "gone:1:x"), ("exec-null", "executing", None)]


LOOSE_JOBS = ("CREATE TABLE jobs (id TEXT PRIMARY KEY, conversation_id TEXT, message_id TEXT, node_id TEXT, "
              "tool TEXT, command TEXT, status TEXT, exit_code INTEGER, stdout TEXT, stderr TEXT, duration INTEGER, "
              "created_at INTEGER, started_at INTEGER, completed_at INTEGER)")


@pytest.fixture
async def loose(path: Path) -> AsyncIterator[tuple[Store, Other]]:
    """A database whose `jobs` was made without the contract's CHECK and NOT NULL constraints (by hand, or by
    another program): a typo in `status` is stored as typed."""
    conn = sqlite3.connect(path)
    conn.execute(LOOSE_JOBS)
    conn.close()
    store = await open_store(path)
    await store.migrate()
    await register(store)
    other = Other(str(path))
    yield store, other
    other.conn.close()
    await store.close()


async def test_a_status_no_daemon_runs_is_listed(loose: tuple[Store, Other]) -> None:
    store, other = loose
    for job_id, status in (("typo-1", "Queued"), ("typo-2", "queued "), ("typo-3", "running"), ("typo-4", None)):
        strand(other, job_id, status=status)
    total, rows = await store.stranded_jobs(limit=10)
    assert total == 4 and [r["status"] for r in rows] == ["Queued", "queued ", "running", None]


async def test_cancel_and_retry_take_rows_no_daemon_runs_and_prune_leaves_them(store: Store, other: Other) -> None:
    """Before: `cancel` said "already finished" of a row `retry` said "has not ended" of: neither ran."""
    for job_id in ("a", "b"):
        strand(other, job_id, started_at=now_ms() - 1000)
    assert await store.cancel(["a"]) == ["a"]
    row = other.job("a")
    assert row["status"] == "cancelled" and row["duration"] is not None  # final: no daemon will record its end
    other.conn.execute("UPDATE jobs SET completed_at = completed_at - 10 WHERE id = 'a'")  # ended 10 ms ago
    assert await store.prune(older_than_ms=5, statuses=["cancelled"]) == 1  # once ended, it goes like any other
    assert await store.prune(older_than_ms=0, statuses=["completed", "failed", "cancelled"]) == 0  # "b" stays
    assert await store.retry("b")
    assert (other.job("b")["status"], other.job("b")["worker_id"], other.job("b")["started_at"]) == (
        "queued", None, None)
    held = await claim_one(store, other, "held")
    assert not await store.retry(held.job_id)  # running under a live daemon: not retried
    assert await store.cancel([held.job_id]) == [held.job_id]
    assert other.job("held")["duration"] is None  # that daemon records its end


async def test_a_status_typo_is_cancelled_or_retried(loose: tuple[Store, Other]) -> None:
    store, other = loose
    strand(other, "x", status="Queued")
    strand(other, "y", status=None)
    assert await store.cancel(["x"]) == ["x"] and other.job("x")["status"] == "cancelled"
    assert await store.retry("y") and other.job("y")["status"] == "queued"


async def test_stopped_daemons_are_forgotten_but_what_recovery_needs(store: Store, other: Other) -> None:
    """Before: jobd_workers kept every daemon that ever started, and `status` listed them all."""
    old = now_ms() - 30 * 86_400_000
    await register(store, "holder", *(f"old-{i}" for i in range(5)), "recent")
    for i in range(5):
        other.conn.execute("UPDATE jobd_workers SET started_at = ?, stopped_at = ? WHERE id = ?",
                           (old + i, old + i + 1, f"old-{i}"))
    other.conn.execute("UPDATE jobd_workers SET started_at = ?, stopped_at = ? WHERE id = 'holder'", (old - 9, old))
    other.conn.execute("UPDATE jobd_workers SET stopped_at = ? WHERE id = 'recent'", (now_ms(),))
    strand(other, "detached", worker_id="holder", started_at=old)  # recovery adopts or settles it by its daemon
    # Kept: the live ones, one stopped lately, one that holds a job, and the latest started (old-4 the sixth).
    assert await store.prune_workers(older_than_ms=7 * 86_400_000, keep=len(WORKERS) + 2) == 4
    assert {w["id"] for w in await store.workers()} == {*WORKERS, "holder", "recent", "old-4"}
    assert await store.prune_workers(older_than_ms=7 * 86_400_000, keep=0) == 1
    assert {w["id"] for w in await store.workers()} == {*WORKERS, "holder", "recent"}
