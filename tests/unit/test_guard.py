"""daemon.store.guard on real SQLite files: what counts as a rewrite by another program, and what does not."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from daemon.store import guard


def _wal_db(path: Path, rows: int = 0) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x TEXT)")
    for _ in range(rows):
        conn.execute("INSERT INTO t VALUES (?)", ("x" * 1000,))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return conn


def test_sqlites_own_vacuum_and_checkpoint_are_not_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "db"
    conn = _wal_db(path, rows=300)
    watch = guard.RewriteGuard(path)
    size = path.stat().st_size
    conn.execute("DELETE FROM t")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert path.stat().st_size < size  # the file shrank, the way SQLite shrinks it
    assert watch.problem() is None
    watch.close()
    conn.close()


def test_a_truncated_or_rolled_back_header_or_replaced_file_is_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "db"
    conn = _wal_db(path, rows=50)
    watch = guard.RewriteGuard(path)
    assert watch.problem() is None

    with open(path, "r+b") as f:  # what sql.js's export leaves: the same file, a rollback-journal header
        f.seek(18)
        f.write(b"\x01\x01")
    assert "rollback journal" in (watch.problem() or "")

    with open(path, "r+b") as f:
        f.truncate(4096)
    assert "shrank" in (watch.problem() or "")

    os.rename(path, tmp_path / "old")
    (tmp_path / "new").write_bytes((tmp_path / "old").read_bytes())
    os.rename(tmp_path / "new", path)
    assert "new inode" in (watch.problem() or "")
    watch.close()
    conn.close()


def test_stale_wal_is_found_only_beside_a_rollback_header(tmp_path: Path) -> None:
    path = tmp_path / "db"
    conn = _wal_db(path)
    guard.no_checkpoint_on_close(conn)
    conn.execute("INSERT INTO t VALUES ('only in the wal')")
    conn.close()
    assert guard.stale_wal(path) is None  # header says WAL: SQLite's own state after a crash, nothing wrong
    with open(path, "r+b") as f:
        f.seek(18)
        f.write(b"\x01\x01")
    problem = guard.stale_wal(path)
    assert problem is not None and "replay" in problem
    Path(f"{path}-wal").write_bytes(b"")
    assert guard.stale_wal(path) is None  # an empty WAL holds nothing to replay
