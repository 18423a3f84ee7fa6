"""Node pools: a row naming a pool runs on one of its members, placed at claim time. Three real sshd instances on
loopback are three nodes (each its own port, host key and user: `id -un` says where a job really ran), on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Db, cli, now_ms, wait_for
from tests.integration.conftest import Sshd
from tests.integration.test_metrics import scrape, value

NAMES = ("n1", "n2", "n3")
FAST = "[daemon]\nheartbeat_interval_ms = 200\nkill_grace_ms = 500\nretry_backoff_ms = 0\n"


@pytest.fixture(scope="module")
def members() -> Iterator[dict[str, Sshd]]:
    """Three SSH nodes by name; a test that stops one starts it again."""
    roots, servers = [], {}
    try:
        for name in NAMES:
            roots.append(Path(tempfile.mkdtemp(prefix=f"njd-pool-{name}-")))
            servers[name] = Sshd(roots[-1])
        yield servers
    finally:
        for server in servers.values():
            server.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def up(members: dict[str, Sshd]) -> Iterator[dict[str, Sshd]]:
    """The three nodes, each running at the start and again at the end of the test."""
    for server in members.values():
        if server.proc is None or server.proc.poll() is not None:
            server.start()
    yield members
    for server in members.values():
        if server.proc is None or server.proc.poll() is not None:
            server.start()


@pytest.fixture
def port() -> int:
    """A loopback port that was free a moment ago, for the metrics."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free: int = s.getsockname()[1]
    return free


def config(servers: dict[str, Sshd], pools: str, names: tuple[str, ...] = NAMES, **node: Any) -> str:
    """FAST, the nodes `names` (each with `node`'s settings, a callable of the name for one of its own), `pools`."""
    text = FAST
    for name in names:
        extra = {k: v(name) if callable(v) else v for k, v in node.items()}
        text += servers[name].node_config(name, **{k: v for k, v in extra.items() if v is not None})
    return text + pools


def user_of(servers: dict[str, Sshd]) -> dict[str, str]:
    return {server.user: name for name, server in servers.items()}


def wait_online(db: Db, names: tuple[str, ...], timeout: float = 20) -> None:
    def online() -> bool:
        rows = db.conn.execute("SELECT id, status FROM nodes").fetchall()
        return all((name, "online") in [tuple(r) for r in rows] for name in names)

    wait_for(online, timeout, message=f"{', '.join(names)} online")


def insert_many(db: Db, count: int, command: str, node_id: str = "build", **extra: Any) -> list[str]:
    db.conn.execute("BEGIN")
    jobs = [db.insert(command, node_id=node_id, **extra) for _ in range(count)]
    db.conn.execute("COMMIT")
    return jobs


def where_ran(db: Db, jobs: list[str], servers: dict[str, Sshd], timeout: float = 30) -> list[dict[str, Any]]:
    """Each job's final row, checked: the pool it asked for kept, and ran_on the node whose user ran it."""
    rows = [db.wait_status(job_id, timeout=timeout) for job_id in jobs]
    users = user_of(servers)
    for row in rows:
        assert row["status"] == "completed", row
        assert row["node_id"] == "build" and users[row["stdout"].split()[-1]] == row["ran_on"], row
    return rows


@pytest.mark.backends("sqlite", "postgres")
def test_a_plain_insert_naming_a_pool_runs_on_its_members_in_balance_and_the_row_says_where(
        up: dict[str, Sshd], db: Db, daemon_factory: Callable[..., Daemon], port: int) -> None:
    pools = f'[pools.build]\nmembers = ["n1", "n2", "n3"]\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    daemon = daemon_factory(config=config(up, pools, max_concurrent=2)).start()
    wait_online(db, NAMES)
    jobs = insert_many(db, 6, "sleep 0.4; id -un")
    rows = where_ran(db, jobs, up)
    assert Counter(row["ran_on"] for row in rows) == {"n1": 2, "n2": 2, "n3": 2}  # least loaded first
    assert all(json.loads(row["attempt_nodes"]) == {"1": row["ran_on"]} for row in rows)
    found = scrape(port)  # the metrics' node is where each job ran
    assert [value(found, "nexus_jobd_jobs_finished_total", node=n, tool="bash", status="completed")
            for n in NAMES] == [2.0, 2.0, 2.0], found
    claimed = daemon.events("job.claimed")
    assert {(e["node"], e.get("pool")) for e in claimed} == {(n, "build") for n in NAMES}
    named = db.wait_status(db.insert("id -un", node_id="n2"))  # a named node's row says where it ran, too
    assert (named["ran_on"], json.loads(named["attempt_nodes"])) == ("n2", {"1": "n2"})
    listed = cli(db, "ps").stdout
    assert all(f"build→{row['ran_on']}" in listed for row in rows) and " n2 " in listed, listed
    shown = cli(db, "show", jobs[0]).stdout
    assert f"ran_on: {rows[0]['ran_on']}" in shown and "node_id: build" in shown, shown
    nodes = cli(db, "nodes").stdout.splitlines()
    pool_line = next(line for line in nodes if line.startswith("build "))
    assert pool_line.split()[1:3] == ["0", "1"], nodes  # nothing queued, one daemon
    assert all(f"{n} online 0 " in pool_line for n in NAMES), pool_line  # members, states, running, load
    status = json.loads(cli(db, "status", "--json").stdout)
    assert [(p["id"], [m["id"] for m in p["members"]]) for p in status["pools"]] == [("build", list(NAMES))]
    assert all(m["status"] == "online" and isinstance(m["load"], float) for m in status["pools"][0]["members"])


@pytest.mark.backends("sqlite", "postgres")
def test_placement_skips_an_offline_a_full_and_a_toolless_member(
        up: dict[str, Sshd], db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """n1 may run bash only; n2 is down; n3 has one slot, taken by a job of its own: a git row waits, then runs on
    n3 once that slot is free. A pool whose only member cannot run git fails such a row with the reason."""
    up["n2"].stop()
    gate = up["n3"].root / "gate"  # where n3's user can look (the test's tmp_path is root's alone)
    gate.unlink(missing_ok=True)
    daemon_factory(config=config(
        up, '[pools.build]\nmembers = ["n1", "n2", "n3"]\n[pools.bashonly]\nmembers = ["n1"]\n',
        max_concurrent=lambda n: 1 if n == "n3" else 4, tools=lambda n: ["bash"] if n == "n1" else None,
        offline_after=1)).start()
    wait_online(db, ("n1", "n3"))
    blocker = db.insert(f"while [ ! -e {gate} ]; do sleep 0.05; done", node_id="n3")
    db.wait_status(blocker, ("executing",))
    git = db.insert("--version", tool="git", node_id="build")
    failed = db.wait_status(db.insert("--version", tool="git", node_id="bashonly"))
    assert failed["status"] == "failed" and failed["ran_on"] is None, failed
    assert "no member of pool bashonly (n1) has this job's tool (they have: bash)" in failed["error"], failed
    bash = where_ran(db, insert_many(db, 4, "id -un"), up)
    assert {row["ran_on"] for row in bash} == {"n1"}  # n2 offline, n3 full
    assert db.job(git)["status"] == "queued"  # no member able now: it waits
    gate.touch()
    row = db.wait_status(git, timeout=20)
    assert (row["status"], row["ran_on"], row["node_id"]) == ("completed", "n3", "build"), row
    assert row["stdout"].startswith("git version")


@pytest.mark.backends("sqlite", "postgres")
def test_a_member_killed_mid_burst_gets_no_new_rows_and_the_burst_completes_on_the_others(
        up: dict[str, Sshd], db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """n3's jobs end at once, so it has free slots when it dies: only its state keeps rows off it."""
    daemon = daemon_factory(config=config(up, '[pools.build]\nmembers = ["n1", "n2", "n3"]\n', offline_after=1,
                                          keepalive_interval_ms=300,
                                          max_concurrent=lambda n: 4 if n == "n3" else 2)).start()
    wait_online(db, NAMES)
    jobs = insert_many(db, 40, f'[ "$(id -un)" = {up["n3"].user} ] || sleep 0.4; id -un', max_attempts=3)
    wait_for(lambda: sum(db.job(j)["status"] == "completed" for j in jobs) >= 6, 20, message="burst under way")
    up["n3"].stop()
    killed_at = now_ms()
    running_there = {j for j in jobs if (r := db.job(j))["status"] == "executing" and r["ran_on"] == "n3"}

    def settled() -> list[dict[str, Any]] | None:
        rows = [db.job(j) for j in jobs if j not in running_there]
        return rows if all(r["status"] == "completed" and r["duration"] is not None for r in rows) else None

    rows = wait_for(settled, 40, message="the burst completes on n1 and n2")
    # Found down by the first start it refused (or a missed probe), n3 takes nothing more: no claim there later
    # than a heartbeat and a second after its death, though the burst went on for seconds.
    late = [e for e in daemon.events("job.claimed") if e["node"] == "n3" and
            datetime.fromisoformat(e["timestamp"]).timestamp() * 1000 > killed_at + 1200]
    assert not late, late
    assert max(r["started_at"] for r in rows) > killed_at + 1200  # it did go on
    refused = {e["job_id"]: e for e in daemon.events("job.requeued")}  # placed on n3 as it died: at once elsewhere
    for row in rows:
        if row["id"] in refused:
            requeued_ms = datetime.fromisoformat(refused[row["id"]]["timestamp"]).timestamp() * 1000
            assert row["ran_on"] != "n3" and row["started_at"] - requeued_ms < 400, (row, refused[row["id"]])
    for row in rows:  # an attempt placed on n3 as it died (it did not answer) moved to another member
        nodes = json.loads(row["attempt_nodes"])
        assert nodes[str(row["attempt"])] == row["ran_on"], row
    assert {r["ran_on"] for r in rows} >= {"n1", "n2"}
    up["n3"].start()  # its own jobs follow the reattach rules: collected once it answers again
    for job_id in running_there:
        assert db.wait_status(job_id, timeout=30)["status"] == "completed"


@pytest.mark.backends("sqlite", "postgres")
def test_a_retried_pool_job_moves_to_another_member(
        up: dict[str, Sshd], db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """n2 is busier (a job of its own), so n1 is the least loaded for both attempts: the retry still goes to n2,
    the member that did not just fail it."""
    gate = up["n2"].root / "gate"
    gate.unlink(missing_ok=True)
    daemon_factory(config=config(up, '[pools.build]\nmembers = ["n1", "n2"]\n', ("n1", "n2"))).start()
    wait_online(db, ("n1", "n2"))
    blocker = db.insert(f"while [ ! -e {gate} ]; do sleep 0.05; done", node_id="n2")
    db.wait_status(blocker, ("executing",))
    try:
        row = db.wait_status(db.insert("id -un; exit 1", node_id="build", max_attempts=2), timeout=20)
    finally:
        gate.touch()
    assert (row["status"], row["attempt"], row["node_id"]) == ("failed", 2, "build"), row
    assert json.loads(row["attempt_nodes"]) == {"1": "n1", "2": "n2"} and row["ran_on"] == "n2", row
    assert user_of(up)[row["stdout"].split()[-1]] == "n2", row


@pytest.mark.backends("sqlite", "postgres")
def test_two_daemons_serving_overlapping_pools_run_each_row_once(
        up: dict[str, Sshd], db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    one = daemon_factory(config=config(up, '[pools.build]\nmembers = ["n1", "n2"]\n', ("n1", "n2"),
                                       max_concurrent=2)).start()
    two = daemon_factory(config=config(up, '[pools.build]\nmembers = ["n2", "n3"]\n', ("n2", "n3"),
                                       max_concurrent=2)).start()
    wait_online(db, NAMES)
    jobs = insert_many(db, 24, "sleep 0.2; id -un")
    rows = where_ran(db, jobs, up, timeout=40)
    assert all(row["attempt"] == 1 for row in rows)  # claimed once, by one daemon
    serves = {e["worker_id"]: nodes for d, nodes in ((one, {"n1", "n2"}), (two, {"n2", "n3"}))
              for e in d.events("dispatch.started")}
    for row in rows:
        assert row["ran_on"] in serves[row["worker_id"]], row  # each placed only on nodes it serves
    assert {row["worker_id"] for row in rows} == set(serves)  # both took rows
    assert len(one.events("job.claimed")) + len(two.events("job.claimed")) == len(jobs)


@pytest.mark.backends("sqlite", "postgres")
def test_a_tool_no_member_here_has_waits_for_another_daemons_member_that_has_it(
        up: dict[str, Sshd], db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """One daemon's member of `build` may run bash only; another daemon's member (busy now) may run git: a git row
    is not failed by the first, and runs on the second's member once it has room."""
    gate = up["n2"].root / "gate"
    gate.unlink(missing_ok=True)
    daemon_factory(config=config(up, '[pools.build]\nmembers = ["n2"]\n', ("n2",), max_concurrent=1)).start()
    wait_online(db, ("n2",))
    wait_for(lambda: "git" in str([tuple(r) for r in db.conn.execute("SELECT pools FROM jobd_workers").fetchall()]),
             message="the first daemon's pools listing git")  # before its probe too: a member may have any tool
    blocker = db.insert(f"while [ ! -e {gate} ]; do sleep 0.05; done", node_id="n2")
    db.wait_status(blocker, ("executing",))
    daemon_factory(config=config(up, '[pools.build]\nmembers = ["n1"]\n', ("n1",), tools=["bash"])).start()
    wait_online(db, ("n1",))
    git = db.insert("--version", tool="git", node_id="build")
    bash = where_ran(db, insert_many(db, 1, "id -un"), up)  # a pass of the second daemon after the git row's insert
    try:
        assert bash[0]["ran_on"] == "n1" and db.job(git)["status"] == "queued", db.job(git)
    finally:
        gate.touch()
    row = db.wait_status(git, timeout=20)
    assert (row["status"], row["ran_on"]) == ("completed", "n2"), row


def test_pool_config_errors_are_refused_at_start_and_on_sighup(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    clash = daemon_factory(config='[nodes.localhost]\n[pools.localhost]\nmembers = ["localhost"]\n')
    clash.start(wait_ready=False)
    assert clash.proc is not None and clash.proc.wait(15) != 0
    assert "[pools.localhost]: 'localhost' is already a node's name" in clash.log(), clash.log()
    good = '[nodes.localhost]\nlabels = ["cpu"]\n[pools.build]\nlabels = ["cpu"]\n'
    daemon = daemon_factory(config=good).start()
    assert daemon.config_path is not None and daemon.proc is not None
    for bad, reason in (('[pools.build]\nmembers = []\n', "an empty pool could run nothing"),
                        ('[pools.build]\nlabels = ["gpu"]\n', "no node has the label 'gpu'")):
        daemon.config_path.write_text('[nodes.localhost]\nlabels = ["cpu"]\n' + bad)
        seen = len(daemon.events("config.reload_failed"))
        daemon.proc.send_signal(signal.SIGHUP)
        failure = wait_for(lambda n=seen: daemon.events("config.reload_failed")[n:], message="reload refused")[0]
        assert reason in failure["error"] and str(daemon.config_path) in failure["error"], failure
    row = db.wait_status(db.insert("echo kept", node_id="build"))  # the pool of the config it kept still runs
    assert (row["status"], row["ran_on"], row["stdout"]) == ("completed", "localhost", "kept\n")
    followed = cli(db, "submit", "-f", "--node", "build", "--", "sleep 1.2; echo followed")  # as a user does
    assert followed.stdout == "followed\n" and "no live daemon serves" not in followed.stderr, followed.stderr
    unknown = db.wait_status(db.insert("true", node_id="biuld"))
    assert unknown["error"] == ("unknown node: no daemon on this database serves it (this one serves localhost; "
                                "pools: build); set node_id to a configured node or pool"), unknown
