"""SSH throughput: N `true` jobs to one SSH node through nexus-jobd (one pooled connection, many channels), against
the baseline measured in the same run: `ssh host true` once per job, as a naive runner would.

The node is a real OpenSSH sshd on loopback started here (the tests' fixture: its own host key, config and test
user), so this needs root and openssh-server. Targets: >= 200 jobs/s and >= 40x ssh-per-job.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _harness as h

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.integration.conftest import Sshd

RATE_TARGET = 200.0
RATIO_TARGET = 40.0


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=h.positive_int, default=1000, help="jobs through the daemon (default 1000)")
    p.add_argument("--ssh-jobs", type=h.positive_int, default=30, help="ssh-per-job runs (default 30)")
    p.add_argument("--max-concurrent", type=h.positive_int, default=20, help="the node's max_concurrent (20)")
    h.add_common_args(p)
    return p


def daemon_rate(ws: h.Workspace, server: Sshd, jobs: int, concurrent: int) -> float:
    db_path = ws.database()
    config = ws.path / "ssh.toml"
    config.write_text(f"[daemon]\nmax_concurrent = {concurrent}\n"
                      + server.node_config(max_concurrent=concurrent))
    with h.Daemon(ws, db_path, config) as daemon:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
        h.wait_until(lambda: conn.execute("SELECT status FROM nodes WHERE id = 'box'").fetchone() == ("online",),
                     30, 0.02, "the SSH node online")
        started = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                         "VALUES (?, 'box', 'bash', 'true', 'queued', ?)",
                         [(str(uuid.uuid4()), h.now_ms()) for _ in range(jobs)])
        conn.execute("COMMIT")

        def done() -> bool:
            daemon.check_alive()
            n = conn.execute("SELECT count(*) FROM jobs WHERE duration IS NOT NULL").fetchone()[0]
            return bool(n == jobs)

        h.wait_until(done, 300, 0.02, f"{jobs} jobs to finish")
        elapsed = time.monotonic() - started
        bad = conn.execute("SELECT count(*) FROM jobs WHERE status != 'completed'").fetchone()[0]
        if bad:
            raise h.BenchError(f"{bad} jobs did not complete:\n{daemon.log_tail()}")
        return jobs / elapsed


def ssh_rate(server: Sshd, runs: int) -> float:
    argv = ["ssh", "-p", str(server.port), "-i", str(server.client_key), "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            f"{server.user}@{server.listen}", "true"]
    started = time.monotonic()
    for _ in range(runs):
        subprocess.run(argv, check=True, capture_output=True)
    return runs / (time.monotonic() - started)


def main(args: argparse.Namespace) -> int:
    if shutil.which("/usr/sbin/sshd") is None:
        raise h.BenchError("openssh-server is not installed")
    root = Path(tempfile.mkdtemp(prefix="njd-bench-sshd-"))
    server = Sshd(root)
    try:
        with h.Workspace(args) as ws:
            print(f"ssh: {args.jobs} x `true` on one SSH node (sshd on loopback), max_concurrent {args.max_concurrent}")
            print(f"  {h.machine(ws.path)}")
            ours = daemon_rate(ws, server, args.jobs, args.max_concurrent)
            naive = ssh_rate(server, args.ssh_jobs)
    finally:
        server.stop()
        subprocess.run(["pkill", "-KILL", "-u", server.user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    ratio = ours / naive
    h.print_table(("", "jobs/s"), [("nexus-jobd, one pooled connection", f"{ours:.0f}"),
                                   ("ssh host true, one per job", f"{naive:.1f}")])
    h.print_table(("", "measured", "target", ""), [
        ("jobs/s", f"{ours:.0f}", f">= {RATE_TARGET:.0f}", h.verdict(ours >= RATE_TARGET)),
        ("vs ssh per job", f"{ratio:.0f}x", f">= {RATIO_TARGET:.0f}x", h.verdict(ratio >= RATIO_TARGET))])
    return 0 if ours >= RATE_TARGET and ratio >= RATIO_TARGET else 1


if __name__ == "__main__":
    h.run(main, parse_args())
