"""TEXT that is not valid UTF-8, in any column the daemon reads: the row fails with the reason, the daemon and the
jobs around it go on, the CLI shows and finds the row, and a restart leaves nothing stuck (issue 15, item 1)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Daemon, Db, cli

BAD = "CAST(X'6a6f62ff' AS TEXT)"  # 'job' and a byte no UTF-8 text holds, stored as TEXT


def insert_raw(db: Db, *, id_sql: str, **columns: str) -> None:
    db.conn.text_factory = lambda raw: raw.decode("utf-8", "backslashreplace")  # this test's own reads
    values = {"node_id": "'localhost'", "tool": "'bash'", "command": "'echo hi'", **columns}
    names = ", ".join(["id", *values, "status", "created_at"])
    db.conn.execute(f"INSERT INTO jobs ({names}) VALUES ({id_sql}, {', '.join(values.values())}, 'queued', 1)")


@pytest.mark.parametrize(("column", "reason"), [
    ("tool", "tool is not valid UTF-8 text (byte 3"),
    ("command", "command is not valid UTF-8 text (byte 3"),
    ("cwd", "cwd is not valid UTF-8 text (byte 3"),
    ("env", "env is not valid UTF-8 text (byte 3"),
    ("node_id", "unknown node"),
    ("depends_on", "is no job"),
])
def test_a_column_that_is_not_utf8_fails_its_row(daemon: Daemon, db: Db, column: str, reason: str) -> None:
    insert_raw(db, id_sql=f"'bad-{column}'", **{column: BAD})
    row = db.wait_status(f"bad-{column}")
    assert row["status"] == "failed" and reason in row["error"], row
    assert db.wait_status(db.insert("echo after"))["stdout"] == "after\n"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_an_id_that_is_not_utf8_fails_alone_and_stays_findable(daemon: Daemon, db: Db,
                                                                daemon_factory: object) -> None:
    running = db.insert("echo started; sleep 0.5; echo done")
    insert_raw(db, id_sql=BAD)
    child = db.insert("echo child", depends_on=bytes.fromhex("6a6f62ff").decode("latin-1"))
    db.conn.execute("UPDATE jobs SET depends_on = CAST(X'6a6f62ff' AS TEXT) WHERE id = ?", (child,))

    assert db.wait_status(running)["stdout"] == "started\ndone\n"
    bad = db.conn.execute(f"SELECT status, error, duration FROM jobs WHERE id = {BAD}").fetchone()
    assert bad["status"] == "failed" and "id is not valid UTF-8 text (byte 3" in bad["error"]
    assert bad["duration"] is not None
    assert "ended failed" in db.wait_status(child)["error"]  # its dependents fail too, instead of waiting
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert not daemon.events("job.internal_error")

    # The CLI shows it readably and finds it by a prefix of what it shows.
    assert "job\\xff" in cli(db, "ps").stdout
    listed = json.loads(cli(db, "ps", "--json").stdout)
    assert "job\\xff" in [r["id"] for r in listed]
    shown = cli(db, "show", "--json", "job")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "failed"

    # A restart finds nothing of it left executing.
    daemon.stop()
    again = daemon_factory().start()  # type: ignore[operator]
    assert db.conn.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'executing')").fetchone()[0] == 0
    again.stop()
