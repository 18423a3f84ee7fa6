"""docker jobs against a real Docker engine: exit codes, separate streams, cancel and timeout stop the container,
and an engine that does not answer fails the job at once."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon, Db, require, wait_for
from tests.integration.conftest import IMAGE, Sshd, docker_ps

# TCP on 127.0.0.1:PORT -> the engine's unix socket, run inside the SSH node's network namespace: an engine that
# only the node can reach at that address (the daemon's own 127.0.0.1:PORT has nothing).
FORWARDER = """
import asyncio, sys

async def pipe(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()

async def handle(reader, writer):
    engine_reader, engine_writer = await asyncio.open_unix_connection(sys.argv[2])
    await asyncio.gather(pipe(reader, engine_writer), pipe(engine_reader, writer), return_exceptions=True)
    writer.close()
    engine_writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


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
    wait_for(lambda: docker_ps(docker_engine, "-a", "--filter", label) == [], timeout=30,
             message="container stopped, and removed by --rm")
    print(f"docker cancel to container gone: {time.monotonic() - cancelled_at:.2f}s")


def test_timeout_of_a_docker_run_job_stops_its_container(
        docker_engine: str, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=_config(docker_engine, grace_ms=500)).start()
    job_id = db.insert(f"docker run --network none {IMAGE} sleep 1000", tool="docker", timeout_ms=1500)
    row = db.wait_status(job_id, timeout=60)
    assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", 124, 1)
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


def test_docker_jobs_on_an_ssh_node_use_that_nodes_engine_and_cancel_stops_the_container_there(
        docker_engine: str, sshd_behind_a_link: tuple[Sshd, Callable[[bool], None]], db: Db,
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    server, _link = sshd_behind_a_link
    assert server.netns is not None
    (tmp_path / "forward.py").write_text(FORWARDER)
    forwarder = subprocess.Popen(["ip", "netns", "exec", server.netns, sys.executable, str(tmp_path / "forward.py"),
                                  "2375", docker_engine.removeprefix("unix://")],
                                 stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert forwarder.stdout is not None and forwarder.stdout.readline() == b"ready\n"
        config = "[daemon]\nkill_grace_ms = 1000\n" + server.node_config("far", docker_host="tcp://127.0.0.1:2375")
        daemon_factory(config=config).start()
        ok = db.wait_status(db.insert(f"run --rm --network none {IMAGE} echo far", tool="docker", node_id="far"),
                            timeout=60)
        assert (ok["status"], ok["stdout"], ok["error"]) == ("completed", "far\n", None)
        job_id = db.insert(f"run --rm --network none {IMAGE} sh -c 'echo up; sleep 1000'", tool="docker",
                           node_id="far")
        wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=60, message="container running")
        label = f"label=nexus-jobd.job={job_id}"
        assert len(docker_ps(docker_engine, "--filter", label)) == 1
        db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (job_id,))
        row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, timeout=30, message="recorded")
        assert row["status"] == "cancelled"
        # `docker stop` ran on the node, through its engine address: the container is gone, not just its client
        wait_for(lambda: docker_ps(docker_engine, "-a", "--filter", label) == [], timeout=30,
                 message="container stopped on the node's engine")
    finally:
        os.killpg(forwarder.pid, signal.SIGKILL)
        forwarder.wait()


class _HeldEngine:
    """A fake engine on a unix socket: it answers /_ping only once released, and keeps every request it got."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(8)
        self.requests: list[bytes] = []
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = conn.recv(4096)
            self.requests.append(request)
            if request.startswith(b"GET /_ping"):
                self.release.wait(30)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK")


def test_a_docker_job_cancelled_while_its_engine_is_checked_never_starts(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    require(shutil.which("docker") is not None, "the docker CLI is not installed (Debian: docker.io)")
    engine = _HeldEngine(tmp_path / "engine.sock")
    try:
        daemon = daemon_factory(config=_config(f"unix://{tmp_path}/engine.sock")).start()
        job_id = db.insert("version", tool="docker")
        # Two pings held: the node probe's and the job's (in either order), so the job is claimed and waiting for
        # its engine when it is cancelled, not still queued.
        wait_for(lambda: db.job(job_id)["status"] == "executing" and
                 sum(r.startswith(b"GET /_ping") for r in engine.requests) >= 2, timeout=30,
                 message="the job claimed and its engine pinged")
        db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (job_id,))
        wait_for(lambda: daemon.events("job.cancel_requested"), timeout=30, message="the cancel noticed")
        engine.release.set()  # the engine answers now: the job must still not start
        row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, timeout=30, message="recorded")
        assert (row["status"], row["exit_code"]) == ("cancelled", None)  # no process ran, not even to be killed
        # The daemon's own pings only (the job's, the node probe's): the docker CLI never connected.
        assert engine.requests and not any(b"Docker-Client" in request for request in engine.requests)
    finally:
        engine.release.set()
        engine.server.close()
