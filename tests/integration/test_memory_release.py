"""What a big job's output leaves behind once its row is recorded: no buffers still referenced by the dispatcher, no
copy of the text kept by SQLite, no heap pages pinned by big blocks (in a fresh interpreter). Checked by object
counts, SQLite's own allocation counter and /proc/self/maps, not by RSS (which bench/memory.py measures)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from daemon import config as config_module
from daemon import service
from daemon.dispatch import Dispatcher, Wake, Wakes
from daemon.health import Health
from daemon.lease import Identity, Lease
from daemon.model import Claim, JobResult, JobStatus, OutputSnapshot
from daemon.output import BIG_OUTPUT_BYTES, JobOutput, map_big_blocks_apart
from daemon.runner import RunningJob
from daemon.store import Store, open_store
from tests.conftest import require

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
INSERT = ("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
          "VALUES (?, 'localhost', 'bash', ?, 'queued', ?)")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sqlite_memory_used() -> int:
    """Bytes SQLite has allocated in this process (every connection): its own counter, exact and not noisy."""
    import _sqlite3

    lib = ctypes.CDLL(_sqlite3.__file__)  # resolves through to the libsqlite3 it links
    memory_used = getattr(lib, "sqlite3_memory_used", None)
    require(memory_used is not None, "this Python's SQLite does not export sqlite3_memory_used")
    memory_used.restype = ctypes.c_int64
    used = int(memory_used())
    require(used > 0, "this SQLite does not count its memory (SQLITE_DEFAULT_MEMSTATUS=0)")
    return used


def insert(path: Path, command: str) -> str:
    job_id = str(uuid.uuid4())
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        conn.execute(INSERT, (job_id, command, now_ms()))
    finally:
        conn.close()
    return job_id


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(tmp_path / "jobs.db")
    await store.migrate()
    await store.register_worker(worker_id="w1", host="test", boot_id=None, pid=1, pid_start=None,
                                nodes=["localhost"])
    yield store
    await store.close()


async def claimed(store: Store, tmp_path: Path) -> Claim:
    job_id = insert(tmp_path / "jobs.db", "true")
    [job] = await store.claim("localhost", 1, "w1")
    assert job.id == job_id
    return Claim(job_id, "w1", job.attempt)


def result(text: str) -> JobResult:
    return JobResult(JobStatus.COMPLETED, 0, None, OutputSnapshot(text, "", len(text), 0))


async def test_finishing_a_big_output_leaves_no_copy_of_it_in_sqlite(store: Store, tmp_path: Path) -> None:
    claim = await claimed(store, tmp_path)
    await store.idle()
    before = sqlite_memory_used()
    big = "x" * (4 * MIB)
    await store.write_outputs([(claim, OutputSnapshot(big, None, len(big), 0), None)])  # a live flush
    await store.finish_many([(claim, result(big + "y"))])
    assert sqlite_memory_used() - before > MIB  # the page cache (2 MiB by default) holds the row's pages
    await store.idle()
    # Without the NULL bindings, the flush's and the finish's statements each keep their 4 MiB copy.
    assert sqlite_memory_used() - before < MIB // 2


async def test_finishing_small_outputs_runs_no_extra_statement(store: Store, tmp_path: Path) -> None:
    """The NULL bindings cost nothing per small job: they run only after an output of _BIG_TEXT or more."""
    statements: list[str] = []  # the end of each statement SQLite ran, its parameters expanded
    await store._driver._conn.set_trace_callback(lambda sql: statements.append(sql[-300:]))
    claim = await claimed(store, tmp_path)
    statements.clear()
    await store.finish_many([(claim, result("hello\n" * 1000))])
    assert statements and not [s for s in statements if "id = NULL" in s]

    claim = await claimed(store, tmp_path)
    statements.clear()
    await store.finish_many([(claim, result("x" * MIB))])
    assert len([s for s in statements if "id = NULL" in s]) == 3  # requeue_job, finish_job, write_output


def live(kind: type) -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, kind)]


async def wait_for(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    with anyio.fail_after(within_s):
        while True:
            if predicate():
                return
            await anyio.sleep(0.02)


async def nothing() -> None:
    pass


async def test_a_recorded_big_job_leaves_no_buffers_referenced(tmp_path: Path) -> None:
    """The dispatcher in this process: once the row of a job that wrote 3 MB is final, no RunningJob, JobOutput or
    JobResult is left (the record loop used to keep its last batch alive until the next one came)."""
    db = tmp_path / "jobs.db"
    settings = tmp_path / "config.toml"
    settings.write_text(f'[database]\npath = "{db}"\n[daemon]\nflush_interval_ms = 50\n')
    config = config_module.load(config_module.Overrides(config_path=str(settings)))
    store = await open_store(db, daemon=True)
    await store.migrate()
    me = Identity.of_this_process("memory-test")
    lease = Lease(store, me, ttl_ms=config.lease_ttl_ms, nodes=config.node_ids, on_lost=lambda: None,
                  on_beat=nothing, on_db_error=lambda: None)
    await lease.register()
    executors = service.executors_for(config)
    wakes = Wakes()
    health = Health(config, service.prober(config, executors), changed=lambda: wakes.add(Wake.NODES_CHANGED))
    dispatcher = Dispatcher(config, store, executors, health, wakes, dataclasses.asdict(me))
    stop = asyncio.Event()
    assert not live(RunningJob)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.run, stop)
            size = 3 * BIG_OUTPUT_BYTES
            job_id = insert(db, f"head -c {size} /dev/zero | tr '\\0' x")

            def final() -> bool:
                with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
                    row = conn.execute("SELECT status, stdout_bytes FROM jobs WHERE id = ?", (job_id,)).fetchone()
                return bool(row == ("completed", size))

            await wait_for(final, within_s=30)
            await wait_for(lambda: not dispatcher.running)
            await wait_for(lambda: not live(RunningJob) and not live(JobOutput) and not live(JobResult))
            stop.set()
    finally:
        for executor in executors.values():
            await executor.aclose()
        await store.close()


BLOCK_PLACEMENT = """
import ctypes, sys
from daemon.output import map_big_blocks_apart
if sys.argv[1] == "fixed":
    assert map_big_blocks_apart()

def mapping(address):
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else "anonymous"
    return "unmapped"

bigger = bytearray(8 << 20)
del bigger  # glibc raises its threshold past 8 MiB here, unless it is fixed
block = bytearray(2 << 20)
address = ctypes.addressof((ctypes.c_char * len(block)).from_buffer(block))
print(mapping(address))
del block
print(mapping(address))
"""


def test_big_blocks_get_mappings_of_their_own_after_a_bigger_one_was_freed() -> None:
    """In a fresh process (an old heap may hold a free chunk big enough, which malloc reuses whatever the
    threshold). Without the fix glibc raises its mmap threshold when the 8 MiB block is freed and carves the next
    2 MiB block out of the heap (run BLOCK_PLACEMENT with "default" to see `[heap]`, still mapped after the free);
    with the threshold fixed, that block gets a mapping of its own, which free() unmaps."""
    glibc = getattr(ctypes.CDLL(None), "malloc_trim", None) is not None
    if not glibc:
        assert map_big_blocks_apart() is False
    require(glibc, "not glibc: no mmap threshold to fix")
    done = subprocess.run([sys.executable, "-c", BLOCK_PLACEMENT, "fixed"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["anonymous", "unmapped"]
