"""daemon.dispatch.claims: Claimer and Slots on an in-memory store: the global and per-node limits, the backlog that
says a freed slot is worth a claim, node health, and each job started before the next node's room is counted."""

from __future__ import annotations

from typing import cast

import pytest

from daemon.dispatch.claims import Claimer, Slots
from daemon.model import ClaimedJob
from daemon.store import DbUnavailable, Store
from tests.unit.core.fakes import WORKER_ID, Changed, FakeNodes, FakeStore, config

pytestmark = pytest.mark.anyio


class Started:
    """The dispatcher's `start`: takes the job's slot at once, as Dispatcher._track does."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.jobs: list[ClaimedJob] = []

    def __call__(self, job: ClaimedJob) -> None:
        self.jobs.append(job)
        self.slots.take(str(job.node_id))


def claimer(store: FakeStore, slots: Slots, nodes: FakeNodes | None = None) -> tuple[Claimer, Started]:
    started = Started(slots)
    return Claimer(cast(Store, store), nodes or FakeNodes(), slots, WORKER_ID, started), started


def queue(store: FakeStore, node: str, count: int) -> None:
    for i in range(count):
        store.insert(f"{node}-{i}", node_id=node)


async def test_each_node_gets_at_most_its_own_limit() -> None:
    settings = config(nodes={"a": 2, "b": 3}, max_concurrent=10)
    store = FakeStore(Changed())
    queue(store, "a", 5)
    queue(store, "b", 5)
    slots = Slots(settings)
    claims, started = claimer(store, slots)
    await claims.claim(settings)
    assert store.called("claim") == [("a", 2), ("b", 3)]
    assert (slots.used, slots.per_node) == (5, {"a": 2, "b": 3})
    assert [job.id for job in started.jobs] == ["a-0", "a-1", "b-0", "b-1", "b-2"]
    assert all(job.attempt == 1 and store.rows[job.id].worker_id == WORKER_ID for job in started.jobs)


async def test_the_global_limit_counts_jobs_started_for_the_nodes_before() -> None:
    """start() takes each job's slot before the next node's room is counted: node b gets what a left, not 3."""
    settings = config(nodes={"a": 2, "b": 3}, max_concurrent=3)
    store = FakeStore(Changed())
    queue(store, "a", 5)
    queue(store, "b", 5)
    slots = Slots(settings)
    claims, started = claimer(store, slots)
    await claims.claim(settings)
    assert store.called("claim") == [("a", 2), ("b", 1)]
    assert slots.used == 3 and len(started.jobs) == 3


async def test_slots_already_taken_are_counted_and_a_full_node_is_not_asked() -> None:
    settings = config(nodes={"a": 2, "b": 3}, max_concurrent=4)
    store = FakeStore(Changed())
    queue(store, "a", 5)
    queue(store, "b", 5)
    slots = Slots(settings)
    slots.take("a")
    slots.take("a")
    slots.take("b")
    claims, _ = claimer(store, slots)
    await claims.claim(settings)
    assert store.called("claim") == [("b", 1)]  # a is full; b: 3 - 1 for itself, 4 - 3 in all
    assert slots.backlog == {"a", "b"}


async def test_the_backlog_names_the_nodes_a_limit_cut_short() -> None:
    settings = config(nodes={"a": 2, "b": 3}, max_concurrent=10)
    store = FakeStore(Changed())
    queue(store, "a", 2)  # exactly a's room: there may be more behind it
    queue(store, "b", 1)  # fewer than b's room: b's queue is empty now
    slots = Slots(settings)
    slots.backlog.add("b")
    claims, _ = claimer(store, slots)
    await claims.claim(settings)
    assert slots.backlog == {"a"}
    assert slots.give_back("a") is True  # rows were held back: a freed slot is worth a claim
    await claims.claim(settings)
    assert store.called("claim")[-2:] == [("a", 1), ("b", 2)]
    assert slots.backlog == set()
    assert slots.give_back("b") is False


async def test_a_node_health_holds_back_is_not_claimed_for() -> None:
    settings = config(nodes={"a": 2, "b": 2}, max_concurrent=10)
    store = FakeStore(Changed())
    queue(store, "a", 3)
    queue(store, "b", 3)
    slots = Slots(settings)
    claims, started = claimer(store, slots, FakeNodes(closed={"a"}))
    await claims.claim(settings)
    assert store.called("claim") == [("b", 2)]
    assert {job.node_id for job in started.jobs} == {"b"}
    assert "a" not in slots.backlog and all(row.status == "queued" for row in store.rows.values() if row.node_id == "a")


async def test_a_database_error_propagates_and_claims_no_further_node() -> None:
    settings = config(nodes={"a": 2, "b": 2}, max_concurrent=10)
    store = FakeStore(Changed())
    queue(store, "a", 1)
    queue(store, "b", 1)
    store.fail("claim", DbUnavailable("connection refused"))
    slots = Slots(settings)
    claims, started = claimer(store, slots)
    with pytest.raises(DbUnavailable):
        await claims.claim(settings)
    assert store.called("claim") == [("a", 2)] and started.jobs == [] and slots.used == 0


def test_slots_count_per_node_and_learn_new_nodes() -> None:
    slots = Slots(config(nodes={"a": 1}))
    slots.take("a")
    slots.reconfigure(config(nodes={"a": 1, "b": 1}))
    assert slots.per_node == {"a": 1, "b": 0}
    slots.give_back("a")
    assert (slots.used, slots.per_node["a"]) == (0, 0)
