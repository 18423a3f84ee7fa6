"""Memory: resident set (VmRSS) of the idle daemon with no SSH nodes configured, after start-up and after 500 jobs.

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

TARGET_MIB = 30.0
SETTLE_S = 1.0
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
    h.add_common_args(p)
    return p


def run_daemon(ws: h.Workspace, jobs: int) -> list[Sample]:
    db = ws.database("jobd")
    samples = []
    with h.Daemon(ws, db) as daemon, h.Db(db) as conn:  # no config file: built-in defaults, the local node only
        time.sleep(SETTLE_S)
        samples.append(Sample.of("nexus-jobd, idle after start-up", daemon.pid))
        for n in (1, 2):
            conn.insert(["true"] * jobs)
            conn.wait_completed(n * jobs, timeout=60 + jobs / 20, daemon=daemon)
            time.sleep(SETTLE_S)
            samples.append(Sample.of(f"nexus-jobd, idle after {n * jobs} jobs", daemon.pid))
    return samples


def run_baseline(ws: h.Workspace, name: str, imports: str) -> Sample:
    with h.Proc([h.PYTHON, "-c", imports + "\n" + IDLE], stdout=subprocess.PIPE, cwd=ws.path) as proc:
        assert proc.popen.stdout is not None
        if proc.popen.stdout.readline() != b"ready\n":
            raise h.BenchError(f"`{imports}` failed in {h.PYTHON}")
        time.sleep(SETTLE_S)
        return Sample.of(name, proc.pid)


def report(daemon: list[Sample], baselines: list[Sample], jobs: int) -> bool:
    bare = baselines[0]
    print()
    h.print_table(("", "VmRSS MiB", "RssAnon", "RssFile", "VmHWM", "/ bare python"), [
        (s.name, f"{s.mib():.1f}", f"{s.mib('RssAnon'):.1f}", f"{s.mib('RssFile'):.1f}", f"{s.mib('VmHWM'):.1f}",
         f"{s.mib() / bare.mib():.2f}x") for s in (*daemon, *baselines)])
    ssh, with_ssh = daemon[-1].ssh, baselines[-1]
    print(f"\n  importing asyncssh costs {with_ssh.mib() - bare.mib():.1f} MiB of RSS in an idle process, and maps "
          f"{len(with_ssh.ssh)} of its libraries (e.g. {min(with_ssh.ssh, default='-')});")
    print(f"  the daemon maps {'these: ' + ', '.join(sorted(ssh)) if ssh else 'none of them'}")
    grown = daemon[2].mib() - daemon[1].mib()
    print(f"  growth from {jobs} to {2 * jobs} jobs: {grown:+.1f} MiB")
    checked = daemon[:2]
    print()
    h.print_table(("", "VmRSS", "target", ""), [
        (s.name, f"{s.mib():.1f} MiB", f"<= {TARGET_MIB:.0f} MiB", h.verdict(s.mib() <= TARGET_MIB))
        for s in checked])
    return all(s.mib() <= TARGET_MIB for s in checked)


def main(args: argparse.Namespace) -> int:
    with h.Workspace(args) as ws:
        print(f"memory: RSS of the idle daemon (no SSH nodes) after start-up and after {args.jobs} jobs, "
              f"read {SETTLE_S:.0f} s after each step (1 MiB = 1024 KiB, as /proc reports)")
        print(f"  {h.machine(ws.path)}")
        daemon = run_daemon(ws, args.jobs)
        baselines = [run_baseline(ws, name, imports) for name, imports in BASELINES.items()]
        return 0 if report(daemon, baselines, args.jobs) else 1


if __name__ == "__main__":
    h.run(main, parse_args())
