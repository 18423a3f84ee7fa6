"""Local jobs outlive the daemon: they run under the host's job keeper, and the next daemon takes them over.

Real processes only: the daemon is killed with SIGKILL or stopped with SIGTERM, the keeper is killed, and the
rows are read as another program reads them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon, Db, group_members, keeper_pids, wait_for

# Counts its runs in a file, prints numbered lines slowly, ends with a status of its own.
SLOW = 'echo run >> "$HOME/runs"; for i in $(seq 1 40); do echo "out $i"; echo "err $i" >&2; sleep 0.05; done; exit 7'
EXPECTED_OUT = "".join(f"out {i}\n" for i in range(1, 41))
EXPECTED_ERR = "".join(f"err {i}\n" for i in range(1, 41))


def _runs(db: Db) -> int:
    path = db.path.parent / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _started(db: Db, job_id: str) -> dict[str, object]:
    return wait_for(lambda: (row := db.job(job_id))["status"] == "executing" and row["pid"] and row,
                    message=f"{job_id} running with its pid recorded")


def test_kill_9_of_the_daemon_mid_job_then_a_restart_records_it_exactly_once(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory().start()
    job_id = db.insert(SLOW)
    _started(db, job_id)
    wait_for(lambda: "out 5" in (db.job(job_id)["stdout"] or ""), message="some output flushed")
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    second = daemon_factory().start()
    row = db.wait_status(job_id, timeout=20)
    assert (row["status"], row["exit_code"], row["error"]) == ("failed", 7, None)
    assert (row["stdout"], row["stderr"]) == (EXPECTED_OUT, EXPECTED_ERR)
    assert (row["stdout_bytes"], row["stderr_bytes"]) == (len(EXPECTED_OUT), len(EXPECTED_ERR))
    assert (row["attempt"], _runs(db)) == (1, 1)
    assert second.events("job.reattached")[0]["job_id"] == job_id


def test_sigterm_leaves_within_5_s_the_job_goes_on_and_the_next_daemon_records_it(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory().start()
    job_id = db.insert(SLOW)
    row = _started(db, job_id)
    t0 = time.monotonic()
    assert first.stop(timeout=5) == 0
    assert time.monotonic() - t0 < 5
    assert group_members(int(str(row["pid"])))  # still running, with nobody reading it
    assert db.job(job_id)["status"] == "executing"
    daemon_factory().start()
    row = db.wait_status(job_id, timeout=20)
    assert (row["exit_code"], row["stdout"], row["stderr"], _runs(db)) == (7, EXPECTED_OUT, EXPECTED_ERR, 1)


def test_a_job_that_ends_while_no_daemon_runs_is_collected(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory().start()
    marker = db.path.parent / "ended"
    job_id = db.insert(f'sleep 0.5; echo bye; echo oops >&2; touch "{marker}"; exit 3')
    row = _started(db, job_id)
    first.stop(timeout=5)
    wait_for(marker.exists, message="the job's end while no daemon runs")
    wait_for(lambda: not group_members(int(str(row["pid"]))), message="its process gone")
    assert keeper_pids(db.path)  # the keeper holds its status for the next daemon
    daemon_factory().start()
    row = db.wait_status(job_id)
    assert (row["status"], row["exit_code"], row["stdout"], row["stderr"]) == ("failed", 3, "bye\n", "oops\n")


def test_a_chatty_job_runs_at_full_speed_while_no_daemon_reads_and_its_row_keeps_head_tail_and_totals(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    config = "[daemon]\noutput_cap_bytes = 65536\n"
    first = daemon_factory(config).start()
    marker = tmp_path / "written"
    # 100 MB of stdout: a pipe nobody read would stop it at 64 KiB.
    job_id = db.insert(f'sleep 1; head -c 100000000 /dev/zero | tr "\\0" x; echo; echo end >&2; touch "{marker}"')
    _started(db, job_id)
    first.stop(timeout=5)
    wait_for(marker.exists, timeout=60, message="100 MB written with no daemon running")
    daemon_factory(config).start()
    row = db.wait_status(job_id, timeout=30)
    assert (row["status"], row["stdout_bytes"], row["stderr"]) == ("completed", 100_000_001, "end\n")
    stdout = str(row["stdout"])
    assert stdout.startswith("x" * 16384) and stdout.endswith("x" * 1000 + "\n")
    assert "bytes of stdout omitted; 100000001 bytes in all]" in stdout


def test_a_killed_keeper_takes_its_jobs_down_and_their_rows_say_so(db: Db, daemon: Daemon) -> None:
    job_id = db.insert("sleep 60", max_attempts=1)
    row = _started(db, job_id)
    (keeper,) = keeper_pids(db.path)
    os.kill(keeper, signal.SIGKILL)
    row = db.wait_status(job_id)
    assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", None, 1)
    assert f"the job keeper (pid {keeper}) stopped while the job was running" in row["error"]
    assert "its process group was killed" in row["error"]
    wait_for(lambda: not group_members(int(str(row["pid"]))), message="the job killed")
    # A new keeper runs the next job.
    row = db.wait_status(db.insert("echo again"))
    assert (row["status"], row["stdout"]) == ("completed", "again\n")
    assert keeper_pids(db.path) and keeper_pids(db.path) != [keeper]


def test_daemon_and_keeper_killed_together_the_next_daemon_kills_the_job_and_requeues_it(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory().start()
    job_id = db.insert('echo run >> "$HOME/runs"; sleep 60', max_attempts=2)
    row = _started(db, job_id)
    pgid = int(str(row["pid"]))
    (keeper,) = keeper_pids(db.path)
    assert first.proc is not None
    first.proc.kill()
    os.kill(keeper, signal.SIGKILL)
    first.proc.wait()
    assert group_members(pgid)  # orphaned, still running
    second = daemon_factory().start()
    wait_for(lambda: not group_members(pgid), message="the orphaned job killed")
    recovered = wait_for(lambda: second.events("job.recovered"), message="job.recovered")
    assert recovered[0]["outcome"] == "requeued" and "job keeper" in recovered[0]["error"]
    wait_for(lambda: db.job(job_id)["attempt"] == 2 and _runs(db) == 2, message="the second attempt running")
    assert db.job(job_id)["status"] == "executing"


def test_on_stop_drain_keeps_todays_behaviour(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory('[daemon]\non_stop = "drain"\n').start()
    job_id = db.insert("sleep 0.5; echo done")
    _started(db, job_id)
    assert daemon.stop(timeout=10) == 0
    row = db.job(job_id)
    assert (row["status"], row["stdout"]) == ("completed", "done\n")
    wait_for(lambda: not keeper_pids(db.path), message="the idle keeper leaving")


def test_keeper_false_runs_jobs_as_the_daemons_children(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("[daemon]\nkeeper = false\n").start()
    row = db.wait_status(db.insert("echo $PPID"))
    assert daemon.proc is not None and row["stdout"] == f"{daemon.proc.pid}\n"
    assert not keeper_pids(db.path)


def test_output_past_the_cap_is_exact_after_a_kill_9(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """Two-byte characters written in odd-sized pieces past the cap: the row of the daemon that takes over is
    what one daemon reading every byte would have written (no character lost at the seam)."""
    config = "[daemon]\noutput_cap_bytes = 1024\nflush_interval_ms = 50\n"
    first = daemon_factory(config).start()
    piece = "ééééééé"
    job_id = db.insert(f'for i in $(seq 1 150); do printf "%s" "{piece}"; printf x; sleep 0.01; done; exit 3')
    wait_for(lambda: (db.job(job_id)["stdout_bytes"] or 0) > 1500, message="output past the cap flushed")
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    daemon_factory(config).start()
    row = db.wait_status(job_id, timeout=20)
    unit = piece + "x"  # 15 bytes: seven 2-byte characters, then one of 1 byte; 150 of them, 2250 bytes
    # The README's rule, worked out by hand for a 1024-byte cap: the first quarter (256 bytes) less a character
    # cut at its end (17 units are 255 bytes; byte 256 starts an "é"), then the last three quarters (768 bytes:
    # 51 units and the "éx" ending the unit before); 2250 - 255 - 768 = 1227 bytes omitted.
    expected = unit * 17 + "\n[nexus-jobd: 1227 bytes of stdout omitted; 2250 bytes in all]\n" + "éx" + unit * 51
    assert (row["exit_code"], row["stdout_bytes"], row["attempt"]) == (3, 150 * 15, 1)
    assert row["stdout"] == expected
