"""Faults with figures: kill -9 at random moments, a database locked by another program, an output bomb, jobs
that misbehave with their descriptors and children. Each prints its figures (run with -s to see them)."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import NEXUS_JOBD, Daemon, Db, group_members, mounted_tmpfs, wait_for


def _rss_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_kill_9_twenty_times_during_a_stream_of_jobs(db: Db, daemon_factory: Callable[..., Daemon],
                                                     tmp_path: Path) -> None:
    """Nothing stuck, nothing run twice, no output written before a flush lost: all must be 0."""
    ledger = tmp_path / "ledger"
    rng = random.Random(7)
    jobs: list[str] = []
    for round_no in range(20):
        daemon = daemon_factory().start()
        db.conn.execute("BEGIN")
        # Each job writes its id first (the side effect to count), prints, and may take a little while.
        jobs += [db.insert(f"echo {round_no}-{i} >> {ledger}; echo out-{round_no}-{i}; "
                           f"sleep 0.0{rng.randint(0, 9)}", max_attempts=1) for i in range(10)]
        db.conn.execute("COMMIT")
        time.sleep(rng.uniform(0.02, 0.3))  # the random moment of the crash is the point here
        assert daemon.proc is not None
        daemon.proc.kill()
        daemon.proc.wait()
    final = daemon_factory().start()
    wait_for(lambda: db.conn.execute("SELECT count(*) FROM jobs WHERE duration IS NULL").fetchone()[0] == 0,
             timeout=60, message="every row final")
    rows = {r["id"]: dict(r) for r in db.conn.execute("SELECT * FROM jobs")}
    runs = Counter(ledger.read_text().split()) if ledger.exists() else Counter()
    stuck = sum(1 for r in rows.values() if r["status"] in ("queued", "executing"))
    twice = sum(1 for n in runs.values() if n > 1)
    # A completed job has its whole output; a recovered one keeps what was flushed (here: all or nothing).
    lost = sum(1 for r in rows.values() if r["status"] == "completed" and not (r["stdout"] or "").startswith("out-"))
    statuses = Counter(r["status"] for r in rows.values())
    print(f"kill -9 x20: {len(jobs)} jobs, {dict(statuses)}; stuck {stuck}, run twice {twice}, output lost {lost}")
    assert (stuck, twice, lost) == (0, 0, 0)
    assert final.proc is not None and final.proc.poll() is None


def test_a_write_lock_held_for_10_s_loses_nothing(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job_id = db.insert(f"echo before; while [ ! -e {gate} ]; do sleep 0.02; done; echo after")
    wait_for(lambda: db.job(job_id)["stdout"] == "before\n", message="first output")
    locker = sqlite3.connect(db.path, isolation_level=None, timeout=30)
    locker.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    locked_at = time.monotonic()
    gate.touch()
    time.sleep(10)  # the fault itself: a lock held for 10 s
    locker.execute("COMMIT")
    locker.close()
    row = db.wait_status(job_id, timeout=30)
    caught_up = time.monotonic() - locked_at - 10
    print(f"write lock 10 s: job recorded {caught_up:.2f}s after the lock was released; "
          f"db.locked warnings: {len(daemon.events('db.locked'))}")
    assert (row["status"], row["stdout"]) == ("completed", "before\nafter\n")
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert db.wait_status(db.insert("echo later"))["stdout"] == "later\n"


def test_an_output_bomb_is_capped_with_bounded_memory_and_others_keep_their_latency(
        daemon: Daemon, db: Db) -> None:
    assert daemon.proc is not None
    db.wait_status(db.insert("true"))  # the daemon as it runs jobs, before the bomb
    before_mib = _rss_hwm_kib(daemon.proc.pid) / 1024
    bomb = db.insert("head -c 1000000000 /dev/zero | tr '\\0' x")
    wait_for(lambda: (db.job(bomb)["stdout_bytes"] or 0) > 50_000_000, timeout=60, message="the bomb going")
    latencies = []
    for _ in range(5):
        row = db.wait_status(db.insert("true"), timeout=30)
        latencies.append(row["started_at"] - row["created_at"])
    row = db.wait_status(bomb, timeout=120)
    hwm_mib = _rss_hwm_kib(daemon.proc.pid) / 1024
    print(f"output bomb: 1 GB in {row['duration'] / 1000:.1f}s, row {len(row['stdout'])} chars, daemon peak RSS "
          f"{hwm_mib:.0f} MiB ({before_mib:.0f} MiB before it); other jobs' pickup during it: {latencies} ms")
    assert row["stdout_bytes"] == 1_000_000_000
    cap = 4 * 1024 * 1024  # the default: the first quarter and the last three quarters, all x
    omitted = 1_000_000_000 - cap
    assert row["stdout"] == ("x" * (cap // 4) + f"\n[nexus-jobd: {omitted} bytes of stdout omitted; 1000000000 "
                             "bytes in all]\n" + "x" * (cap - cap // 4))
    # Measured: 24-25 MiB above the 32 MiB it had before (a stream keeps under 1.75 caps; the row's render and
    # the database's copy of it add a few more); a capture that kept what it dropped would take the gigabyte.
    assert hwm_mib - before_mib < 10 * cap / 2**20
    # Measured 3-30 ms (once 124 ms, the box busy): others are picked up as if the bomb were not there. A reader
    # that held the event loop while the gigabyte streams in would keep them waiting seconds.
    assert max(latencies) < 1000


def test_a_job_that_closes_its_output_early_is_waited_for(daemon: Daemon, db: Db) -> None:
    row = db.wait_status(db.insert("echo bye; exec >&- 2>&-; sleep 1; exit 3"))
    assert (row["status"], row["exit_code"], row["stdout"]) == ("failed", 3, "bye\n")
    assert row["duration"] >= 1000


def test_a_fork_heavy_job_runs_and_leaves_nothing(daemon: Daemon, db: Db) -> None:
    row = db.wait_status(db.insert("for i in $(seq 300); do (echo $i > /dev/null) & done; wait; echo $$"),
                         timeout=60)
    assert row["status"] == "completed"
    assert not group_members(int(row["stdout"].split()[-1]))


def test_many_lock_holders_and_writers_at_once(daemon: Daemon, db: Db) -> None:
    """Other programs writing hard while jobs run: every job still ends, nothing crashes."""
    stop = threading.Event()

    def writer() -> None:
        conn = sqlite3.connect(db.path, isolation_level=None, timeout=30)
        while not stop.is_set():
            conn.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?, 't', 1, 1)",
                         (f"c{time.time_ns()}",))
        conn.close()

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    def insert(command: str) -> str:
        """SQLite's busy handler is not a queue: against three writers in tight loops this one can wait past its
        10 s timeout (seen once in CI). It retries as any client must; the daemon's own writes do the same."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return db.insert(command)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise

    try:
        jobs = [insert(f"echo {i}") for i in range(30)]  # 100 took 70 s for no more coverage: each waits its turn
        for i, job_id in enumerate(jobs):
            assert db.wait_status(job_id, timeout=60)["stdout"] == f"{i}\n"
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_per_node_resource_limits(db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon_factory(config="[nodes.localhost.limits]\ncpu_seconds = 1\nfile_size_bytes = 4096\n").start()
    spinner = db.wait_status(db.insert("while :; do :; done"), timeout=30)
    assert (spinner["status"], spinner["exit_code"]) == ("failed", 128 + 24)  # SIGXCPU after 1 s of CPU
    assert "SIGXCPU" in spinner["error"]
    writer = db.wait_status(db.insert(f"head -c 100000 /dev/zero > {tmp_path}/big; echo $?"))
    assert writer["stdout"] == f"{128 + 25}\n"  # SIGXFSZ: the file may not grow past 4096 bytes
    assert (tmp_path / "big").stat().st_size == 4096


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs holding a migrated database, to fill up; `fill(leave)` leaves `leave` bytes free."""
    with mounted_tmpfs(tmp_path / "small") as mnt:
        subprocess.run([*NEXUS_JOBD, "--db", str(mnt / "nexuscli.db"), "db", "migrate"], check=True,
                       capture_output=True)
        yield mnt


def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)
    return filler


def test_a_full_filesystem_is_survived_and_work_resumes_when_space_returns(small_fs: Path, tmp_path: Path) -> None:
    daemon = Daemon(small_fs / "nexuscli.db", env={"HOME": str(tmp_path)}, log_dir=tmp_path).start()
    try:
        db = Db(small_fs / "nexuscli.db")
        filler = _fill(small_fs, leave=300_000)  # room for the row itself, not for the 3 MB of output
        job_id = db.insert("head -c 3000000 /dev/zero | tr '\\0' y; echo; echo done")
        wait_for(lambda: daemon.events("db.write_failed") or daemon.events("dispatch.db_error"), timeout=30,
                 message="the daemon hitting the full disk")
        assert daemon.proc is not None and daemon.proc.poll() is None  # it survives
        filler.unlink()  # space returns
        row = db.wait_status(job_id, timeout=60)
        assert row["status"] == "completed" and row["stdout"].endswith("done\n")
        assert row["stdout_bytes"] == 3_000_006
        print(f"disk full: {len(daemon.events('db.write_failed'))} failed writes retried, job completed after")
        db.close()
    finally:
        daemon.stop()


def test_heartbeats_on_a_full_disk_skip_a_round_and_never_stop_the_daemon(small_fs: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\nlease_ttl_ms = 1000\nheartbeat_interval_ms = 100\n")
    daemon = Daemon(small_fs / "nexuscli.db", config_path=config, env={"HOME": str(tmp_path)},
                    log_dir=tmp_path).start()
    try:
        filler = _fill(small_fs, leave=0)
        duties = {"lease heartbeat", "node heartbeats"}
        wait_for(lambda: duties <= {e.get("what") for e in daemon.events("db.write_failed")}, timeout=30,
                 message="both heartbeats failing on the full disk")
        assert daemon.proc is not None and daemon.proc.poll() is None
        filler.unlink()
        db = Db(small_fs / "nexuscli.db")
        assert db.wait_status(db.insert("echo still here"), timeout=30)["stdout"] == "still here\n"
        db.close()
    finally:
        daemon.stop()



def test_limits_this_host_refuses_stop_start_up_with_the_key_and_the_fix(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    # The most the config takes, and above any host's fs.nr_open: refused by every host.
    refused = daemon_factory(config="[nodes.localhost.limits]\nopen_files = 2147483647\n").start(wait_ready=False)
    assert refused.proc is not None and refused.proc.wait(15) == 2
    log = refused.log()
    assert str(refused.config_path) in log, log
    assert "[nodes.localhost.limits] open_files = 2147483647 cannot be set on this host" in log, log
    assert "ulimit -Ha" in log
