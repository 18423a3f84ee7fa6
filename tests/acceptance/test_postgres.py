"""Several hosts, one PostgreSQL queue: wake-ups by LISTEN/NOTIFY, start-up errors in one line, daemons on two hosts
(UTS namespaces: each its own host name, so its own worker identity and job keeper), kill -9 of one, and a link to
the server cut mid-job and restored.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NEXUS_JOBD, Daemon, Db, kill_keeper, require, wait_for
from tests.pg import Server, SocketProxy

pytestmark = pytest.mark.backends("postgres")
IDLE_POLL = "[daemon]\npoll_interval_ms = 60000\n"  # a safety poll this slow: only a notification can wake it


def as_host(name: str) -> list[str]:
    """Run the daemon as host `name`: a UTS namespace with its own host name (same kernel, same boot)."""
    return ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', name]


@pytest.fixture
def hosts(db: Db) -> Iterator[list[str]]:
    require(shutil.which("unshare") is not None and os.geteuid() == 0,
            "two hosts need unshare --uts (util-linux) and root")
    names = ["hosta", "hostb"]
    yield names
    for name in names:
        kill_keeper(db.target, name)


def psql(db: Db, sql: str) -> str:
    """Another program, in another process: psql, as a web app's worker would connect."""
    return subprocess.run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", db.target, "-c", sql], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_row_inserted_by_psql_runs_at_once_woken_by_notify(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=IDLE_POLL).start()
    started = time.monotonic()
    psql(db, "INSERT INTO jobs (id, node_id, tool, command, status, created_at) VALUES "
             "('j1', 'localhost', 'bash', 'echo out; echo err >&2', 'queued', "
             "(extract(epoch from now()) * 1000)::bigint)")
    row = db.wait_status("j1", timeout=10)
    assert time.monotonic() - started < 5  # the safety poll is 60 s: LISTEN woke it
    assert (row["status"], row["exit_code"], row["stdout"], row["stderr"]) == ("completed", 0, "out\n", "err\n")
    assert row["duration"] == row["completed_at"] - row["started_at"]


def test_a_cancel_by_plain_update_kills_the_job_at_once(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=IDLE_POLL).start()
    job_id = db.insert("echo started; sleep 1000")
    wait_for(lambda: db.job(job_id)["stdout"] == "started\n", message="running")
    started = time.monotonic()
    psql(db, f"UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = '{job_id}'")
    row = db.wait_status(job_id, timeout=10)
    assert time.monotonic() - started < 5
    assert (row["status"], row["exit_code"], row["stdout"]) == ("cancelled", 128 + signal.SIGTERM, "started\n")


@pytest.mark.backends("sqlite", "postgres")
def test_bad_rows_fail_with_a_reason(daemon: Daemon, db: Db, backend: str) -> None:
    bad = {db.insert("x", tool="perl"): "tool", db.insert("echo", node_id="nowhere"): "unknown node",
           db.insert("echo", env="{not json"): "env", db.insert("echo", cwd="/nonexistent/dir"): "/nonexistent/dir"}
    good = db.insert("printf 'a\\0b'")  # a NUL: PostgreSQL's TEXT cannot hold it, the rest of the output stays
    for job_id, reason in bad.items():
        row = db.wait_status(job_id)
        assert row["status"] == "failed" and reason in (row["error"] or ""), row
    row = db.wait_status(good)
    nul = "\ufffd" if backend == "postgres" else "\0"
    assert (row["status"], row["stdout"], row["stdout_bytes"]) == ("completed", f"a{nul}b", 3)


def test_start_up_errors_are_one_line_naming_what_to_fix(pg_server: Server, tmp_path: Path) -> None:
    pg_server.psql("DROP DATABASE IF EXISTS pw_db")
    pg_server.psql("DROP ROLE IF EXISTS pwuser; CREATE ROLE pwuser LOGIN PASSWORD 'right'")
    pg_server.psql("CREATE DATABASE pw_db OWNER pwuser")
    hba = pg_server.socket_dir / "data" / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("local all pwuser scram-sha-256\n" + original)  # the first match wins: a password for pwuser
    pg_server.psql("SELECT pg_reload_conf()")
    url = pg_server.url("postgres")
    cases = {
        url.replace("user=postgres", "user=pwuser"): "PGPASSWORD",  # no password given: where to put it
        url.replace("/postgres?", "/nosuchdb?"): "does not exist",
        f"postgresql:///postgres?host={tmp_path}&port=1": "check that the server runs",
        "postgresql://[oops": "not valid libpq syntax",
    }
    env = {**os.environ, "HOME": str(tmp_path), "PGPASSWORD": ""}
    try:
        for bad, says in cases.items():
            result = subprocess.run([*NEXUS_JOBD, "--db", bad, "run"], capture_output=True, text=True, env=env,
                                    timeout=30)
            assert result.returncode != 0
            assert "Traceback" not in result.stderr and says in result.stderr, (bad, result.stderr)
        refused = subprocess.run([*NEXUS_JOBD, "--db", url.replace("user=postgres", "user=pwuser"), "ps"],
                                 capture_output=True, text=True, env={**env, "PGPASSWORD": "wrong"}, timeout=30)
        assert refused.returncode == 1 and "refused the password" in refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr
        # The password from libpq's usual place is used: a database of that user's own is migrated.
        own = pg_server.url("pw_db").replace("user=postgres", "user=pwuser")
        allowed = subprocess.run([*NEXUS_JOBD, "--db", own, "db", "migrate"], capture_output=True, text=True,
                                 env={**env, "PGPASSWORD": "right"}, timeout=30)
        assert (allowed.returncode, allowed.stderr) == (0, ""), allowed.stderr
        assert "0001_job_columns" in allowed.stdout, allowed.stdout
    finally:
        hba.write_text(original)
        pg_server.psql("SELECT pg_reload_conf()")


def test_backup_points_to_pg_dump(db: Db, tmp_path: Path) -> None:
    result = subprocess.run([*NEXUS_JOBD, "--db", db.target, "backup", str(tmp_path / "copy")], capture_output=True,
                            text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 1 and "pg_dump" in result.stderr and not (tmp_path / "copy").exists()


def _insert_many(db: Db, n: int, command: str, **columns: Any) -> None:
    extra = "".join(f", {k}" for k in columns)
    values = "".join(f", {v!r}" for v in columns.values())
    psql(db, f"INSERT INTO jobs (id, node_id, tool, command, status, created_at{extra}) "
             f"SELECT 'job-' || i, 'localhost', 'bash', replace('{command}', 'ID', 'job-' || i), 'queued', "
             f"(extract(epoch from now()) * 1000)::bigint{values} FROM generate_series(1, {n}) AS i")


@pytest.mark.slow
def test_two_hosts_run_2000_jobs_each_exactly_once(db: Db, daemon_factory: Callable[..., Daemon], hosts: list[str],
                                                    tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for host in hosts:
        daemon_factory(prefix=as_host(host)).start()
    _insert_many(db, 2000, f"echo ID >> {runs}")
    wait_for(lambda: psql(db, "SELECT count(*) FROM jobs WHERE duration IS NOT NULL") == "2000", timeout=240,
             interval=0.5, message="2000 jobs recorded")
    lines = runs.read_text().split()
    assert len(lines) == 2000 and len(set(lines)) == 2000  # each ran, and none twice
    assert psql(db, "SELECT count(*) FROM jobs WHERE status = 'completed' AND attempt = 1") == "2000"
    by_host = dict(line.split("|") for line in psql(
        db, "SELECT split_part(worker_id, ':', 1), count(*) FROM jobs GROUP BY 1").splitlines())
    assert set(by_host) == set(hosts) and all(int(n) >= 100 for n in by_host.values()), by_host


@pytest.mark.slow
def test_kill_9_of_one_host_the_other_recovers_its_jobs(db: Db, daemon_factory: Callable[..., Daemon],
                                                        hosts: list[str]) -> None:
    config = "[daemon]\nlease_ttl_ms = 2000\n"
    a = daemon_factory(config=config, prefix=as_host("hosta")).start()
    retried = db.insert("echo $$; sleep 1000", max_attempts=2)
    failed = db.insert("echo $$; sleep 1000")
    for job_id in (retried, failed):
        wait_for(lambda j=job_id: db.job(j)["stdout"], message="running on host A")
    pids = [int(db.job(j)["stdout"]) for j in (retried, failed)]
    b = daemon_factory(config=config, prefix=as_host("hostb")).start()
    assert a.proc is not None
    a.proc.kill()  # kill -9: its keeper (on "host A") runs the jobs on, but nobody on host B can reach them
    a.proc.wait()
    row = db.wait_status(failed, timeout=20)
    assert (row["status"], row["error"]) == ("failed", "daemon on host hosta stopped answering")
    again = wait_for(lambda: (r := db.job(retried))["attempt"] == 2 and r["status"] == "executing" and r,
                     timeout=20, message="re-queued and run on host B")
    assert again["worker_id"].startswith("hostb:")
    assert any(e.get("error") == "daemon on host hosta stopped answering" for e in b.events("job.recovered"))
    # Host A's daemon comes back: before it claims anything it kills what its keeper still ran of both attempts.
    assert all(_alive(pid) for pid in pids)
    daemon_factory(config=config, prefix=as_host("hosta")).start()
    wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=10, message="orphans killed on host A")
    assert db.job(retried)["worker_id"] == again["worker_id"]  # and wrote nothing over what host B recovered


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.mark.slow
def test_link_cut_for_30_s_mid_job_then_restored_loses_nothing_runs_nothing_twice(
        db: Db, pg_server: Server, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    proxy_dir = tmp_path / "proxy"
    proxy_dir.mkdir()
    proxy = SocketProxy(pg_server, proxy_dir)
    proxy.restore()
    daemon = daemon_factory(config="[daemon]\nlease_ttl_ms = 120000\n", db_url=proxy.url(db.target)).start()
    try:
        _cut_mid_job(db, daemon, proxy, tmp_path)
    finally:
        daemon.stop_now()
        proxy.cut()
        kill_keeper(proxy.url(db.target))


def _cut_mid_job(db: Db, daemon: Daemon, proxy: SocketProxy, tmp_path: Path) -> None:
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    job_id = db.insert(f"echo $$ >> {runs}; echo before; while [ ! -e {gate} ]; do sleep 0.05; done; "
                       "seq 1 20000; echo after >&2", max_attempts=3)
    wait_for(lambda: db.job(job_id)["stdout"] == "before\n", message="running, output flushed")
    proxy.cut()
    gate.touch()  # the job writes its output and ends while the daemon cannot reach the database
    queued_meanwhile = db.insert("echo queued while cut")
    wait_for(lambda: daemon.events("db.connection_lost"), message="the daemon noticed")
    time.sleep(30)  # the cut itself: what the test is about, not a synchronisation
    assert db.job(job_id)["status"] == "executing"
    proxy.restore()
    row = db.wait_status(job_id, timeout=30)
    expected = "\n".join(str(i) for i in range(1, 20001)) + "\n"
    assert (row["status"], row["attempt"], row["stderr"]) == ("completed", 1, "after\n")
    assert row["stdout"] == "before\n" + expected and row["stdout_bytes"] == len(row["stdout"])
    assert len(runs.read_text().split()) == 1  # ran once
    assert db.wait_status(queued_meanwhile, timeout=20)["stdout"] == "queued while cut\n"
    assert daemon.events("db.reconnected")


@pytest.mark.slow
def test_a_stalled_host_comes_back_writes_nothing_and_kills_its_orphan(
        db: Db, daemon_factory: Callable[..., Daemon], hosts: list[str]) -> None:
    config = "[daemon]\nlease_ttl_ms = 1500\n"
    a = daemon_factory(config=config, prefix=as_host("hosta")).start()
    job_id = db.insert("echo $$; sleep 1000", max_attempts=2)
    first = wait_for(lambda: (r := db.job(job_id))["stdout"] and r, message="running on host A")
    pid = int(first["stdout"])
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)  # host A stops answering; its keeper runs the job on
    try:
        daemon_factory(config=config, prefix=as_host("hostb")).start()
        again = wait_for(lambda: (r := db.job(job_id))["attempt"] == 2 and r["status"] == "executing" and r,
                         timeout=20, message="re-queued and run on host B")
        assert _alive(pid)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    # Host A's daemon wakes to a lost lease: it kills its orphan (nobody adopted it) and exits 1, its late writes
    # (output, the orphan's end) landing nowhere: the row is host B's attempt 2.
    assert a.proc.wait(20) == 1
    assert a.events("lease.lost")
    wait_for(lambda: not _alive(pid), timeout=10, message="host A's orphan killed")
    now = db.job(job_id)
    assert (now["attempt"], now["status"], now["worker_id"]) == (2, "executing", again["worker_id"])


def test_a_claim_whose_answer_is_lost_puts_the_rows_back_and_runs_them_once(
        db: Db, pg_server: Server, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """The claim commits on the server, then the connection drops before its answer arrives: without a look at
    what it holds, the daemon would leave the row `executing` under its own live lease, for ever."""
    proxy_dir = tmp_path / "proxy"
    proxy_dir.mkdir()
    proxy = SocketProxy(pg_server, proxy_dir)
    proxy.restore()
    daemon = daemon_factory(db_url=proxy.url(db.target)).start()
    try:
        runs = tmp_path / "runs"
        job_id = str(uuid.uuid4())
        proxy.lose_answer_with = job_id.encode()  # the first answer naming the row: its claim's
        db.insert(f"echo $$ >> {runs}; echo ran", id=job_id)
        row = db.wait_status(job_id, timeout=30)
        assert proxy.answers_lost == 1
        assert (row["status"], row["stdout"], row["attempt"]) == ("completed", "ran\n", 2)
        assert len(runs.read_text().split()) == 1  # the lost claim never started it
        assert any(e.get("job_id") == job_id for e in daemon.events("job.requeued"))
    finally:
        daemon.stop_now()
        proxy.cut()
        kill_keeper(proxy.url(db.target))


@pytest.fixture
def not_postgres() -> Iterator[int]:
    """A server on loopback that answers as a web server would: whatever it is sent, an HTTP error."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_a_server_that_is_not_postgresql_is_named_so(not_postgres: int, tmp_path: Path, sslmode: str) -> None:
    """Before: `received invalid response to SSL negotiation: H; the URL is not valid libpq syntax` for a URL that
    is valid, and says nothing of what is wrong (the port reaches another program)."""
    require(importlib.util.find_spec("psycopg") is not None, "psycopg not installed (pip install -e '.[postgres]')")
    url = f"postgresql://jobd@127.0.0.1:{not_postgres}/jobs?sslmode={sslmode}"
    result = subprocess.run([*NEXUS_JOBD, "--db", url, "ps"], capture_output=True, text=True,
                            env={**os.environ, "HOME": str(tmp_path)}, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "libpq syntax" not in result.stderr, result.stderr
    assert (f"the program answering at 127.0.0.1:{not_postgres} is not a PostgreSQL server: check the URL's host "
            "and port (PostgreSQL's own is 5432)") in result.stderr, result.stderr
