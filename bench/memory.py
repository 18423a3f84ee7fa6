"""Memory: resident set (VmRSS) of the idle daemon with no SSH nodes configured, and of its job keeper, after
start-up, after 500 jobs, and after a job that wrote 20 MB (its row capped at output_cap_bytes, 4 MiB by default):
right when its row is recorded, and idle a few seconds later, when what its output took must have been given back.

Baselines in the same run, idle Python processes that import: only asyncio and sqlite3; those and the daemon's
libraries (aiosqlite, anyio, structlog); those and the daemon's own modules (without running anything); asyncio,
sqlite3 and asyncssh (which the daemon must not import while no SSH node is configured).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass

import _harness as h

TARGET_MIB = 30.0  # the daemon
TOGETHER_TARGET_MIB = 40.0  # the daemon and its job keeper
SETTLE_S = 1.0
BIG_SETTLE_S = 3.0  # after the big job's row is recorded
DEFAULT_CAP = 4 * 1024 * 1024  # output_cap_bytes when the config does not set it
IDLE = """
import asyncio
async def main():
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""
BASELINES = {
    "python: asyncio, sqlite3": "import asyncio, sqlite3",
    "python: + aiosqlite, anyio, structlog": "import asyncio, sqlite3, aiosqlite, anyio, structlog",
    "python: + the daemon's modules, not run": "import asyncio, sqlite3, daemon.cli, daemon.service",
    "python: + asyncssh": "import asyncio, sqlite3, asyncssh",
}
# What importing asyncssh maps into a process (libssl/libcrypto are not on the list: asyncio maps them itself).
SSH_LIBRARIES = ("/asyncssh/", "/cryptography/", "/_cffi_backend", "/bcrypt/", "/nacl/")


@dataclass
class Sample:
    name: str
    kib: dict[str, int]
    ssh: set[str]  # SSH libraries mapped into the process

    @classmethod
    def of(cls, name: str, pid: int) -> Sample:
        ssh = {path for path in h.mapped_files(pid) if any(lib in path for lib in SSH_LIBRARIES)}
        return cls(name, h.memory_kib(pid), ssh)

    def mib(self, key: str = "VmRSS") -> float:
        return self.kib.get(key, 0) / 1024


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=h.positive_int, default=500,
                   help="jobs to run between the two readings (default 500)")
    p.add_argument("--big-megabytes", type=h.positive_int, default=20,
                   help="what the big job writes to stdout, in MB of 10^6 bytes (default 20)")
    h.add_common_args(p)
    return p


def run_daemon(ws: h.Workspace, jobs: int, big_bytes: int) -> tuple[list[Sample], list[Sample]]:
    """Readings of the daemon and of its job keeper: [0] start-up, [1] after `jobs` jobs, [2] after twice as many,
    [3] right when the big job's row is recorded, [4] idle BIG_SETTLE_S later."""
    db = ws.database("jobd")
    samples: list[Sample] = []
    keeper: list[Sample] = []

    def read(when: str) -> None:
        samples.append(Sample.of(f"nexus-jobd, {when}", daemon.pid))
        keeper.append(Sample.of(f"its keeper, {when}", daemon.keeper_pid))

    with h.Daemon(ws, db) as daemon, h.Db(db) as conn:  # no config file: built-in defaults, the local node only
        time.sleep(SETTLE_S)
        read("idle after start-up")
        for n in (1, 2):
            conn.insert(["true"] * jobs)
            conn.wait_completed(n * jobs, timeout=60 + jobs / 20, daemon=daemon)
            time.sleep(SETTLE_S)
            read(f"idle after {n * jobs} jobs")
        [job_id] = conn.insert([f"yes | head -c {big_bytes}"])
        conn.wait_completed(2 * jobs + 1, timeout=60 + big_bytes / 1e6, interval=0.005, daemon=daemon)
        mb = big_bytes / 1e6
        read(f"{mb:g} MB job just recorded")
        time.sleep(BIG_SETTLE_S)
        read(f"idle {BIG_SETTLE_S:.0f} s after the {mb:g} MB job")
        check_capped(conn, job_id, big_bytes)
    return samples, keeper


def check_capped(conn: h.Db, job_id: str, big_bytes: int) -> None:
    """The big job's row holds what the daemon's default cap keeps (head, marker, tail), and counts every byte."""
    stored, written = conn.conn.execute("SELECT length(CAST(stdout AS BLOB)), stdout_bytes FROM jobs WHERE id = ?",
                                        (job_id,)).fetchone()
    capped = big_bytes > DEFAULT_CAP
    if written != big_bytes or not (DEFAULT_CAP <= stored <= DEFAULT_CAP + 200 if capped else stored == big_bytes):
        expected = f"the default cap ({DEFAULT_CAP} bytes) and a marker line" if capped else "all"
        raise h.BenchError(f"the big job's row holds {stored} bytes of stdout and counts {written} written; expected "
                           f"{expected} of {big_bytes}")


def run_baseline(ws: h.Workspace, name: str, imports: str) -> Sample:
    with h.Proc([h.PYTHON, "-c", imports + "\n" + IDLE], stdout=subprocess.PIPE, cwd=ws.path) as proc:
        assert proc.popen.stdout is not None
        if proc.popen.stdout.readline() != b"ready\n":
            raise h.BenchError(f"`{imports}` failed in {h.PYTHON}")
        time.sleep(SETTLE_S)
        return Sample.of(name, proc.pid)


def report(daemon: list[Sample], keeper: list[Sample], baselines: list[Sample], jobs: int) -> bool:
    bare = baselines[0]
    print()
    h.print_table(("", "VmRSS MiB", "RssAnon", "RssFile", "VmHWM", "/ bare python"), [
        (s.name, f"{s.mib():.1f}", f"{s.mib('RssAnon'):.1f}", f"{s.mib('RssFile'):.1f}", f"{s.mib('VmHWM'):.1f}",
         f"{s.mib() / bare.mib():.2f}x") for s in (*daemon, *keeper, *baselines)])
    ssh, with_ssh = daemon[-1].ssh, baselines[-1]
    print(f"\n  importing asyncssh costs {with_ssh.mib() - bare.mib():.1f} MiB of RSS in an idle process, and maps "
          f"{len(with_ssh.ssh)} of its libraries (e.g. {min(with_ssh.ssh, default='-')});")
    print(f"  the daemon maps {'these: ' + ', '.join(sorted(ssh)) if ssh else 'none of them'}")
    grown = daemon[2].mib() - daemon[1].mib()
    print(f"  growth from {jobs} to {2 * jobs} jobs: {grown:+.1f} MiB")
    print(f"  the big job, against the reading before it: {daemon[3].mib() - daemon[2].mib():+.1f} MiB when its row "
          f"is recorded (peak {daemon[3].mib('VmHWM'):.1f} MiB), {daemon[4].mib() - daemon[2].mib():+.1f} MiB "
          f"{BIG_SETTLE_S:.0f} s later")
    checked = (0, 1, 4)
    rows = [(daemon[i].name, daemon[i].mib(), TARGET_MIB) for i in checked]
    rows += [(f"{daemon[i].name} + its keeper", daemon[i].mib() + keeper[i].mib(), TOGETHER_TARGET_MIB)
             for i in checked]
    print()
    h.print_table(("", "VmRSS", "target", ""), [
        (name, f"{mib:.1f} MiB", f"<= {target:.0f} MiB", h.verdict(mib <= target)) for name, mib, target in rows])
    return all(mib <= target for _, mib, target in rows)


def main(args: argparse.Namespace) -> int:
    with h.Workspace(args) as ws:
        print(f"memory: RSS of the idle daemon (no SSH nodes) after start-up and after {args.jobs} jobs, "
              f"read {SETTLE_S:.0f} s after each step, then after a job that wrote {args.big_megabytes} MB "
              f"(1 MiB = 1024 KiB, as /proc reports)")
        print(f"  {h.machine(ws.path)}")
        daemon, keeper = run_daemon(ws, args.jobs, args.big_megabytes * 1_000_000)
        baselines = [run_baseline(ws, name, imports) for name, imports in BASELINES.items()]
        return 0 if report(daemon, keeper, baselines, args.jobs) else 1


if __name__ == "__main__":
    h.run(main, parse_args())
