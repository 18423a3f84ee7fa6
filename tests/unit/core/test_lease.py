"""daemon.lease.Lease on an in-memory store: registered, renewed with recovery after each beat, a database error
skipping a round, a lost lease noticed, released at a clean stop."""

from __future__ import annotations

from typing import cast

import anyio
import pytest

from daemon.lease import Identity, Lease
from daemon.store import DbUnavailable, Store
from tests.unit.core.fakes import Changed, FakeStore

pytestmark = pytest.mark.anyio

ME = Identity("w-me", "host-a", "boot-1", 100, 1)


class Counts:
    def __init__(self) -> None:
        self.beats = self.lost = self.db_errors = 0

    async def on_beat(self) -> None:
        self.beats += 1

    def on_lost(self) -> None:
        self.lost += 1

    def on_db_error(self) -> None:
        self.db_errors += 1


def lease(store: FakeStore, counts: Counts) -> Lease:
    return Lease(cast(Store, store), ME, ttl_ms=30, nodes=("localhost", "far"), on_lost=counts.on_lost,
                 on_beat=counts.on_beat, on_db_error=counts.on_db_error)


async def test_register_says_who_and_which_nodes_then_recovers() -> None:
    store, counts = FakeStore(Changed()), Counts()
    await lease(store, counts).register()
    assert store.called("register_worker") == [("w-me", "host-a", "boot-1", 100, 1, ("localhost", "far"))]
    assert counts.beats == 1


async def test_beats_go_on_through_a_database_error_and_stop_once_the_lease_is_lost() -> None:
    changed = Changed()
    store, counts = FakeStore(changed), Counts()
    store.fail("heartbeat", DbUnavailable("connection refused"))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lease(store, counts).run)
            await changed.until(lambda: counts.beats >= 2, what="two renewals")
            store.stopped["w-me"] = "declared dead: its lease expired"  # another daemon declared us dead
            await changed.until(lambda: counts.lost, what="the lost lease noticed")
    assert counts.db_errors == 1 and counts.lost == 1
    assert counts.beats == len(store.called("heartbeat")) - 2  # not after the failed one, nor the lost one


async def test_release_marks_this_daemon_stopped_and_survives_a_database_error() -> None:
    store, counts = FakeStore(Changed()), Counts()
    await lease(store, counts).release()
    assert store.stopped == {"w-me": "clean shutdown"}
    store.fail("stop_worker", DbUnavailable("disk I/O error"))
    await lease(store, counts).release("again")
    assert counts.db_errors == 1
