"""Soak: 100,000 short jobs through one daemon, in batches; after each batch the daemon's open file descriptors and
resident memory. Pass: no growth beyond the stated bounds between the first batch and the last (fds +0, RSS +5 MiB).

The long run of the fault suite: `.venv/bin/python bench/soak.py` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import time

import _harness as h

FD_GROWTH_BOUND = 0
RSS_GROWTH_BOUND_MIB = 5.0


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=h.positive_int, default=100_000, help="jobs in all (default 100000)")
    p.add_argument("--batch", type=h.positive_int, default=10_000, help="jobs per batch (default 10000)")
    h.add_common_args(p)
    return p


def main(args: argparse.Namespace) -> int:
    with h.Workspace(args) as ws:
        db_path = ws.database()
        print(f"soak: {args.jobs} x `true` in batches of {args.batch}")
        print(f"  {h.machine(ws.path)}")
        with h.Daemon(ws, db_path, ws.config(max_concurrent=8)) as daemon:
            db = h.Db(db_path)
            samples = []
            started = time.monotonic()
            for done in range(0, args.jobs, args.batch):
                db.insert(["true"] * min(args.batch, args.jobs - done))
                target = done + min(args.batch, args.jobs - done)

                def finished(target: int = target) -> bool:
                    daemon.check_alive()
                    completed, bad = db.progress()
                    if bad:
                        raise h.BenchError(f"{bad} jobs did not complete:\n{daemon.log_tail()}")
                    return completed >= target

                h.wait_until(finished, 600, 0.05, f"{target} jobs")
                time.sleep(1.0)  # let the flusher and the record loop go idle before sampling
                reading: list[float] = [target]
                for pid in daemon.pids:  # the daemon, then its job keeper
                    reading += [len(os.listdir(f"/proc/{pid}/fd")), h.memory_kib(pid)["VmRSS"] / 1024]
                samples.append((*reading, time.monotonic() - started))
            h.print_table(("jobs done", "daemon fds", "daemon RSS MiB", "keeper fds", "keeper RSS MiB", "seconds"),
                          [(f"{n:.0f}", f"{f:.0f}", f"{r:.1f}", f"{kf:.0f}", f"{kr:.1f}", f"{t:.0f}")
                           for n, f, r, kf, kr, t in samples])
            growth = [("daemon", samples[-1][1] - samples[0][1], samples[-1][2] - samples[0][2]),
                      ("keeper", samples[-1][3] - samples[0][3], samples[-1][4] - samples[0][4])]
            ok = all(fds <= FD_GROWTH_BOUND and rss <= RSS_GROWTH_BOUND_MIB for _, fds, rss in growth)
            h.print_table(("", "growth first -> last batch", "bound", ""), [
                row for who, fds, rss in growth for row in (
                    (f"{who} open fds", f"{fds:+.0f}", f"<= {FD_GROWTH_BOUND}", h.verdict(fds <= FD_GROWTH_BOUND)),
                    (f"{who} RSS MiB", f"{rss:+.1f}", f"<= {RSS_GROWTH_BOUND_MIB}",
                     h.verdict(rss <= RSS_GROWTH_BOUND_MIB)))])
            print(f"  {args.jobs / samples[-1][-1]:.0f} jobs/s over the whole run")
            return 0 if ok else 1


if __name__ == "__main__":
    h.run(main, parse_args())
