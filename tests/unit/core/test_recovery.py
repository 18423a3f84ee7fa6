"""daemon.recovery and daemon.lease.Identity on an in-memory store: which daemon is dead and why; its jobs adopted
where they still run (an SSH node, this host's keeper holding the attempt), re-queued or failed by outcome's retry
rule otherwise with the error that says what happened; a keeper that does not answer leaves rows alone; and jobs a
stopped daemon detached are adopted."""

from __future__ import annotations

from typing import Any, cast

import pytest

from daemon import procs
from daemon.errors import SpawnError
from daemon.lease import Identity
from daemon.model import OrphanedJob, Worker
from daemon.recovery import KEEPER_LOST_ERROR, ORPHAN_ERROR, Recovery, unreachable_host_error, why_dead
from daemon.store import Store
from tests.unit.core.fakes import Changed, FakeExecutor, FakeStore, Row

pytestmark = pytest.mark.anyio

TTL_MS = 15_000
ME = Identity("w-me", "host-a", "boot-1", 100, 1)


def worker(worker_id: str = "w-dead", *, host: str = "host-a", boot_id: str | None = "boot-1", pid: int = 200,
           age_ms: int = 60_000) -> Worker:
    """Another daemon as the store reads it: its last heartbeat `age_ms` ago."""
    return Worker(worker_id, host, boot_id, pid, 7, heartbeat_at=1_000_000 - age_ms, now=1_000_000)


@pytest.fixture
def alive(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Pids of this host taken to be alive; is_alive reads nothing from /proc."""
    pids: set[int] = set()
    monkeypatch.setattr(procs, "is_alive", lambda pid, started: pid in pids)
    return pids


@pytest.fixture
def killed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """Process groups recovery would kill: recorded, nothing is signalled."""
    groups: list[tuple[int, int | None]] = []

    def kill_group(pgid: int, started: int | None) -> bool:
        groups.append((pgid, started))
        return True

    monkeypatch.setattr(procs, "kill_group", kill_group)
    return groups


class Scene:
    """A Recovery on a FakeStore, with a local node (keeper or not) and an SSH node `far`."""

    def __init__(self, *, keeper: bool = True) -> None:
        self.changed = Changed()
        self.store = FakeStore(self.changed)
        self.local = FakeExecutor(self.changed, reattach=keeper)
        self.far = FakeExecutor(self.changed, reattach=True)
        self.adopted: list[tuple[str, str]] = []
        self.requeued = 0
        self.recovery = Recovery(cast(Store, self.store), ME, ttl_ms=TTL_MS,
                                 executors={"localhost": self.local, "far": self.far}, local_node="localhost",
                                 adopt=self.adopt, on_requeued=self.on_requeued)

    async def adopt(self, old_worker_id: str, job: OrphanedJob) -> bool:
        self.adopted.append((old_worker_id, job.id))
        return True

    def on_requeued(self) -> None:
        self.requeued += 1

    def job(self, job_id: str, *, of: str = "w-dead", node: str = "localhost", attempt: int = 1,
            max_attempts: Any = 1, pid: int | None = None) -> Row:
        row = self.store.insert(job_id, node_id=node, max_attempts=max_attempts)
        row.status, row.worker_id, row.attempt, row.started_at, row.pid, row.pid_start = (
            "executing", of, attempt, 1000, pid, 9 if pid else None)
        return row

    def resolved(self) -> dict[str, tuple[bool, str]]:
        return {job.id: (requeue, error) for _, job, requeue, error in self.store.called("resolve_orphan")}


async def test_a_dead_daemons_local_job_its_keeper_holds_is_adopted(alive: set[int], killed: list[Any]) -> None:
    scene = Scene()
    scene.store.workers = [worker()]
    scene.job("a")
    scene.local.held = {"a:1"}
    await scene.recovery.recover()
    assert scene.store.stopped == {"w-dead": "declared dead: its process 200 is gone"}
    assert scene.adopted == [("w-dead", "a")] and scene.resolved() == {} and killed == []
    assert scene.local.holds_asked == [["a:1"]]


async def test_a_local_job_the_keeper_lost_is_requeued_or_failed_by_the_retry_rule(alive: set[int],
                                                                                  killed: list[Any]) -> None:
    scene = Scene()
    scene.store.workers = [worker()]
    scene.job("again", attempt=1, max_attempts=2, pid=501)
    scene.job("last", attempt=2, max_attempts=2, pid=502)
    scene.job("odd", attempt=1, max_attempts="3")  # no whole number: no retry
    await scene.recovery.recover()
    assert scene.resolved() == {"again": (True, KEEPER_LOST_ERROR), "last": (False, KEEPER_LOST_ERROR),
                                "odd": (False, KEEPER_LOST_ERROR)}
    assert [scene.store.rows[i].status for i in ("again", "last", "odd")] == ["queued", "failed", "failed"]
    assert scene.requeued == 1 and scene.adopted == []
    assert killed == [(501, 9), (502, 9)]  # what is left of them on this host and boot


async def test_without_a_keeper_a_dead_daemons_local_jobs_are_orphans(alive: set[int], killed: list[Any]) -> None:
    scene = Scene(keeper=False)
    scene.store.workers = [worker()]
    scene.job("a", max_attempts=2, pid=501)
    await scene.recovery.recover()
    assert scene.resolved() == {"a": (True, ORPHAN_ERROR)} and scene.requeued == 1
    assert scene.local.holds_asked == [] and killed == [(501, 9)]


async def test_a_dead_daemon_of_another_host_its_local_jobs_cannot_be_reached_its_remote_ones_are_adopted(
        alive: set[int], killed: list[Any]) -> None:
    scene = Scene()
    scene.store.workers = [worker(host="host-b", boot_id="boot-9")]
    scene.job("there", pid=501)  # ran on host-b's localhost: out of our reach
    scene.job("remote", node="far")
    await scene.recovery.recover()
    assert scene.store.stopped["w-dead"].startswith("declared dead: its lease expired 60.0s")
    assert scene.resolved() == {"there": (False, unreachable_host_error("host-b"))}
    assert unreachable_host_error("host-b") == "daemon on host host-b stopped answering"
    assert scene.adopted == [("w-dead", "remote")]
    assert scene.local.holds_asked == [] and killed == []  # its pids mean nothing here


async def test_a_keeper_that_does_not_answer_leaves_local_rows_alone(alive: set[int], killed: list[Any],
                                                                     logs: list[dict[str, Any]]) -> None:
    scene = Scene()
    scene.store.workers = [worker()]
    scene.local.held = SpawnError("the keeper did not answer")
    local = scene.job("local", max_attempts=2, pid=501)
    scene.job("remote", node="far")
    await scene.recovery.recover()
    assert scene.resolved() == {} and killed == []
    assert (local.status, local.worker_id) == ("executing", "w-dead")  # asked again at the next round
    assert scene.adopted == [("w-dead", "remote")]
    assert [e["jobs"] for e in logs if e["event"] == "lease.keeper_unreachable"] == [1]


async def test_only_the_daemon_that_stops_a_dead_one_recovers_its_jobs(alive: set[int], killed: list[Any]) -> None:
    scene = Scene()
    scene.store.workers = [worker()]
    scene.store.stopped["w-dead"] = "declared dead by another daemon first"
    scene.job("a", max_attempts=2)
    await scene.recovery.recover()
    assert scene.store.called("orphaned_jobs") == [] and scene.resolved() == {} and scene.adopted == []


async def test_a_live_daemon_is_left_alone(alive: set[int], killed: list[Any]) -> None:
    alive.add(200)
    scene = Scene()
    scene.store.workers = [worker(age_ms=1000), worker("w-far", host="host-b", boot_id="boot-9", age_ms=TTL_MS)]
    scene.job("a")
    await scene.recovery.recover()
    assert scene.store.called("stop_worker") == [] and scene.resolved() == {} and scene.adopted == []


async def test_detached_jobs_are_adopted_where_they_still_run(alive: set[int], killed: list[Any]) -> None:
    scene = Scene()
    jobs = {name: scene.job(name, of="w-gone", node=node, pid=pid).orphan() for name, node, pid in
            [("remote", "far", None), ("held", "localhost", None), ("gone", "localhost", 501),
             ("elsewhere", "localhost", 502)]}
    here, there = ("w-gone", "host-a", "boot-1"), ("w-gone", "host-b", "boot-9")
    scene.store.detached = [(*here, jobs["remote"]), (*here, jobs["held"]), (*here, jobs["gone"]),
                            (*there, jobs["elsewhere"])]
    scene.local.held = {"held:1"}
    await scene.recovery.recover()
    assert scene.store.called("detached_jobs") == [("localhost", "far")]
    assert scene.adopted == [("w-gone", "remote"), ("w-gone", "held")]
    # detached on this host, but its keeper is gone: nothing runs it any more; another host's keeper may hold its own
    assert scene.resolved() == {"gone": (False, KEEPER_LOST_ERROR)} and killed == [(501, 9)]
    assert scene.store.rows["elsewhere"].status == "executing"


async def test_detached_local_jobs_wait_while_the_keeper_does_not_answer(alive: set[int], killed: list[Any]) -> None:
    scene = Scene()
    local = scene.job("local", of="w-gone").orphan()
    remote = scene.job("remote", of="w-gone", node="far").orphan()
    scene.store.detached = [("w-gone", "host-a", "boot-1", local), ("w-gone", "host-a", "boot-1", remote)]
    scene.local.held = SpawnError("no fd free")
    await scene.recovery.recover()
    assert scene.adopted == [("w-gone", "remote")] and scene.resolved() == {} and killed == []


async def test_without_a_node_that_can_reattach_nothing_detached_is_looked_for(alive: set[int]) -> None:
    scene = Scene(keeper=False)
    scene.recovery = Recovery(cast(Store, scene.store), ME, ttl_ms=TTL_MS, executors={"localhost": scene.local},
                              local_node="localhost", adopt=scene.adopt, on_requeued=scene.on_requeued)
    await scene.recovery.recover()
    assert scene.store.called("detached_jobs") == []


# -- why_dead and Identity --------------------------------------------------------------------------------------


def test_a_daemon_of_this_host_from_another_boot_is_dead(alive: set[int]) -> None:
    alive.add(200)
    assert why_dead(ME, worker(boot_id="boot-0", age_ms=0), TTL_MS) == "its host rebooted"


@pytest.mark.parametrize(("mine", "theirs"), [(None, "boot-0"), ("boot-1", None)])
def test_an_unknown_boot_is_no_reboot(alive: set[int], mine: str | None, theirs: str | None) -> None:
    me = Identity("w-me", "host-a", mine, 100, 1)
    assert why_dead(me, worker(boot_id=theirs, age_ms=0), TTL_MS) is None


def test_a_daemon_of_this_boot_whose_process_is_gone_is_dead(alive: set[int]) -> None:
    assert why_dead(ME, worker(age_ms=0), TTL_MS) == "its process 200 is gone"
    alive.add(200)
    assert why_dead(ME, worker(age_ms=0), TTL_MS) is None


def test_a_lease_expires_a_ttl_after_the_last_heartbeat(alive: set[int]) -> None:
    alive.add(200)
    assert why_dead(ME, worker(age_ms=TTL_MS), TTL_MS) is None
    assert why_dead(ME, worker(age_ms=TTL_MS + 1), TTL_MS) == "its lease expired 15.0s after its last heartbeat"


def test_another_hosts_pids_are_never_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def is_alive(pid: int, started: int | None) -> bool:
        raise AssertionError("another host's pid looked up here")

    monkeypatch.setattr(procs, "is_alive", is_alive)
    assert why_dead(ME, worker(host="host-b", age_ms=0), TTL_MS) is None


@pytest.mark.parametrize(("host", "boot_id", "same"), [("host-a", "boot-1", True), ("host-a", "boot-2", False),
                                                       ("host-b", "boot-1", False), ("host-a", None, False)])
def test_same_boot_needs_the_same_host_and_a_known_equal_boot(host: str, boot_id: str | None, same: bool) -> None:
    assert ME.same_boot(worker(host=host, boot_id=boot_id)) is same
    assert Identity("w", "host-a", None, 1, None).same_boot(worker(boot_id=None)) is False
