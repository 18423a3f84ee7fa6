"""docker jobs against a real Docker engine: exit codes, separate streams, cancel and timeout stop the container,
and an engine that does not answer fails the job at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon, Db, wait_for
from tests.integration.conftest import IMAGE, docker_ps


def _config(host: str, grace_ms: int = 1000) -> str:
    return f'[daemon]\nkill_grace_ms = {grace_ms}\n[nodes.localhost]\ndocker_host = "{host}"\n'


def test_docker_run_streams_stdout_and_stderr_and_records_the_container_exit_code(
        docker_engine: str, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=_config(docker_engine)).start()
    job_id = db.insert(f"docker run --rm --network none {IMAGE} sh -c 'echo out; echo err >&2; exit 3'",
                       tool="docker")
    row = db.wait_status(job_id, timeout=60)
    assert (row["status"], row["exit_code"], row["stdout"], row["stderr"]) == ("failed", 3, "out\n", "err\n")
    ok = db.wait_status(db.insert(f"run --rm --network none {IMAGE} echo fine", tool="docker"), timeout=60)
    assert (ok["status"], ok["exit_code"], ok["stdout"]) == ("completed", 0, "fine\n")


def test_cancelling_a_docker_run_job_stops_its_container(
        docker_engine: str, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=_config(docker_engine)).start()
    job_id = db.insert(f"docker run --rm --network none {IMAGE} sh -c 'echo up; sleep 1000'", tool="docker")
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=60, message="container running")
    label = f"label=nexus-jobd.job={job_id}"
    assert len(docker_ps(docker_engine, "--filter", label)) == 1
    cancelled_at = time.monotonic()
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (job_id,))
    row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, timeout=30, message="recorded")
    assert row["status"] == "cancelled" and row["stdout"] == "up\n"
    assert docker_ps(docker_engine, "-a", "--filter", label) == []  # stopped, and --rm removed it
    print(f"docker cancel to container gone: {time.monotonic() - cancelled_at:.2f}s")


def test_timeout_of_a_docker_run_job_stops_its_container(
        docker_engine: str, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=_config(docker_engine, grace_ms=500)).start()
    job_id = db.insert(f"docker run --network none {IMAGE} sleep 1000", tool="docker", timeout_ms=1500)
    row = db.wait_status(job_id, timeout=60)
    assert (row["status"], row["exit_code"]) == ("failed", 124)
    label = f"label=nexus-jobd.job={job_id}"
    assert docker_ps(docker_engine, "--filter", label) == []  # no --rm: it may remain, but stopped


def test_an_engine_that_does_not_answer_fails_docker_jobs_at_once(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon_factory(config=_config(f"unix://{tmp_path}/no-engine.sock")).start()
    started = time.monotonic()
    row = db.wait_status(db.insert("ps", tool="docker"))
    assert time.monotonic() - started < 5
    assert row["status"] == "failed" and row["exit_code"] is None
    assert f"the Docker engine at unix://{tmp_path}/no-engine.sock does not answer" in row["error"]


def test_bash_jobs_see_the_node_docker_host(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=_config("unix:///run/elsewhere.sock")).start()
    assert db.wait_status(db.insert("echo $DOCKER_HOST"))["stdout"] == "unix:///run/elsewhere.sock\n"
