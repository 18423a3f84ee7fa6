"""The HTTP API against a real daemon and rows that another program inserts, on SQLite and PostgreSQL: NexusCLI's
request, response and event shapes field by field, streams that follow a job to its end and resume with
Last-Event-ID, and the daemon's own operations (list, filters, paging, retry, nodes, daemons)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from tests.conftest import Daemon, Db, group_members, now_ms, wait_for
from tests.web.conftest import Web

pytestmark = pytest.mark.backends("sqlite", "postgres")

CREATED_KEYS = {"jobId", "nodeId", "tool", "command", "status", "createdAt", "streamEndpoint"}


@pytest.fixture
def running(db: Db, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory().start()


def test_create_answers_as_nexuscli_field_by_field(db: Db, web: Web, running: Daemon) -> None:
    before = now_ms()
    reply = web.request("POST", "/api/v1/jobs", {"command": "echo created"})
    assert reply.status == 201 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == CREATED_KEYS
    job_id = body["jobId"]
    assert body == {"jobId": job_id, "nodeId": "localhost", "tool": "bash", "command": "echo created",
                    "status": "queued", "createdAt": body["createdAt"],
                    "streamEndpoint": f"/api/v1/jobs/{job_id}/stream"}
    assert isinstance(body["createdAt"], int) and before - 5000 <= body["createdAt"] <= now_ms() + 5000
    row = db.wait_status(job_id)
    # NexusCLI's defaults: node localhost, tool bash, timeout 30 s; no conversation or message.
    assert (row["status"], row["stdout"], row["created_at"], row["timeout_ms"]) == (
        "completed", "created\n", body["createdAt"], 30000)
    assert (row["conversation_id"], row["message_id"], row["cwd"]) == (None, None, None)


def test_create_with_nexuscli_fields_and_the_daemons_columns(db: Db, web: Web, running: Daemon) -> None:
    db.conn.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES ('c1', 't', 1, 1)")
    db.conn.execute("INSERT INTO messages (id, conversation_id, role, content, created_at) "
                    "VALUES ('m1', 'c1', 'user', 'hi', 1)")
    first = web.submit("echo first")
    workdir = db.path.parent / "work"
    workdir.mkdir()
    job_id = web.submit("pwd; echo $GREETING", nodeId="localhost", tool="bash", workingDir=str(workdir),
                        timeout=5000, conversationId="c1", messageId="m1", env={"GREETING": "hello"}, priority=7,
                        delay=300, maxAttempts=2, dependsOn=first)
    row = db.wait_status(job_id)
    assert row["stdout"] == f"{workdir}\nhello\n"
    assert (row["timeout_ms"], row["conversation_id"], row["message_id"], row["priority"], row["max_attempts"],
            row["depends_on"]) == (5000, "c1", "m1", 7, 2, first)
    assert row["run_after"] - row["created_at"] == 300 and row["started_at"] >= row["run_after"]
    # timeout: null asks for the daemon's own default (none) instead of NexusCLI's 30 s.
    assert db.job(web.submit("true", timeout=None))["timeout_ms"] is None
    # A conversation that does not exist: the database refuses it, with why.
    reply = web.request("POST", "/api/v1/jobs", {"command": "true", "conversationId": "nope"})
    assert reply.status == 422 and "refused" in reply.json()["error"]


def test_get_answers_the_row_and_delete_cancels_as_nexuscli(db: Db, web: Web, running: Daemon) -> None:
    gate = db.path.parent / "gate"
    job_id = db.insert(f"echo started; while [ ! -e {gate} ]; do sleep 0.05; done")  # another program's row
    pgid = wait_for(lambda: db.job(job_id)["pid"], message="job running")
    reply = web.request("GET", f"/api/v1/jobs/{job_id}")
    assert reply.status == 200
    assert reply.json() == {k: v for k, v in db.job(job_id).items()}  # every column, as stored
    reply = web.request("DELETE", f"/api/v1/jobs/{job_id}")
    assert (reply.status, reply.json()) == (200, {"success": True, "killed": True})
    row = db.wait_status(job_id)
    assert row["status"] == "cancelled" and row["stdout"] == "started\n"
    wait_for(lambda: not group_members(int(pgid)), message="the job's process group gone")
    again = web.request("DELETE", f"/api/v1/jobs/{job_id}")
    assert again.status == 409 and again.json()["success"] is False and "already ended" in again.json()["error"]
    # A queued job: cancelled before anything ran, so nothing was killed.
    queued = db.insert("true", run_after=now_ms() + 600_000)
    assert web.request("DELETE", f"/api/v1/jobs/{queued}").json() == {"success": True, "killed": False}
    missing = web.request("GET", "/api/v1/jobs/no-such-job")
    assert missing.status == 404 and "no job" in missing.json()["error"]


def _stream(web: Web, job_id: str, **kwargs: Any) -> list[tuple[str | None, dict[str, Any]]]:
    return list(web.events(f"/api/v1/jobs/{job_id}/stream", **kwargs))


def _follow(web: Web, job_id: str) -> tuple[list[dict[str, Any]], threading.Thread]:
    """The job's events as they come, in a thread that ends with the stream."""
    got: list[dict[str, Any]] = []

    def read() -> None:
        for _, event in web.events(f"/api/v1/jobs/{job_id}/stream"):
            got.append(event)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return got, reader


def test_stream_events_field_by_field(db: Db, web: Web, running: Daemon) -> None:
    gate = db.path.parent / "gate"
    job_id = db.insert(f"echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two; echo bad >&2; exit 3")
    wait_for(lambda: db.job(job_id)["stdout"], message="first output")
    events, reader = _follow(web, job_id)
    wait_for(lambda: len(events) >= 2, message="status and first output")
    gate.touch()
    opened = time.monotonic()
    reader.join(30)
    # Pushed by the store's change source (inotify; LISTEN on PostgreSQL), not the 5 s safety tick.
    assert time.monotonic() - opened < 3.0
    status = events[0]
    assert set(status) == {"type", "category", "nodeId", "message", "icon", "timestamp", "attempt"}
    assert (status["type"], status["category"], status["nodeId"], status["message"]) == (
        "status", "executing", "localhost", "Executing on localhost...")
    datetime.fromisoformat(status["timestamp"])
    chunks = [e for e in events if e["type"] == "output_chunk"]
    assert all(set(e) == {"type", "stream", "text", "isIncremental"} and e["isIncremental"] is True for e in chunks)
    assert "".join(e["text"] for e in chunks if e["stream"] == "stdout") == "one\ntwo\n"
    assert "".join(e["text"] for e in chunks if e["stream"] == "stderr") == "bad\n"
    row = db.job(job_id)
    assert events[-2:] == [{"type": "response_done", "exitCode": 3, "duration": row["duration"]}, {"type": "done"}]
    # A finished job's stream: its output from the start, then the end, at once.
    late = [e for _, e in _stream(web, job_id)]
    assert [(e["stream"], e["text"]) for e in late[:2]] == [("stdout", "one\ntwo\n"), ("stderr", "bad\n")]
    assert late[2:] == events[-2:]


def test_stream_of_a_failure_with_an_error_and_of_a_cancelled_job(db: Db, web: Web, running: Daemon) -> None:
    failed = web.submit("sleep 5", timeout=200)
    events = [e for _, e in _stream(web, failed)]
    assert events[-3:] == [{"type": "response_done", "exitCode": 124, "duration": db.job(failed)["duration"]},
                           {"type": "error", "error": db.job(failed)["error"]}, {"type": "done"}]
    job_id = web.submit("echo going; sleep 30")
    wait_for(lambda: db.job(job_id)["stdout"], message="output")
    got, reader = _follow(web, job_id)
    wait_for(lambda: got, message="first event")
    assert web.request("DELETE", f"/api/v1/jobs/{job_id}").json()["killed"] is True
    reader.join(30)
    cancelled = [e for e in got if e["type"] == "status" and e["category"] == "cancelled"]
    assert cancelled and cancelled[0]["message"] == "Job cancelled" and got[-1] == {"type": "done"}
    assert not [e for e in got if e["type"] in ("response_done", "error")]


def test_a_stream_resumes_with_last_event_id_without_gaps_or_repeats(db: Db, web: Web, running: Daemon) -> None:
    gate = db.path.parent / "gate"
    job_id = web.submit(f"for i in $(seq 1 40); do echo line $i; echo err $i >&2; sleep 0.02; done; "
                        f"while [ ! -e {gate} ]; do sleep 0.05; done; seq 41 60")
    texts: dict[str, str] = {"stdout": "", "stderr": ""}
    last_id = None
    for event_id, event in web.events(f"/api/v1/jobs/{job_id}/stream"):  # the first connection drops midway
        if event["type"] == "output_chunk":
            texts[event["stream"]] += event["text"]
        last_id = event_id
        if "line 10" in texts["stdout"]:
            break
    assert last_id is not None
    gate.touch()
    for _, event in web.events(f"/api/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": last_id}):
        if event["type"] == "output_chunk":
            texts[event["stream"]] += event["text"]
    row = db.job(job_id)
    assert (texts["stdout"], texts["stderr"]) == (row["stdout"], row["stderr"])
    assert row["stdout"].count("line 25\n") == 1 and row["stdout"].endswith("60\n")


def test_list_filters_and_pages_and_retry(db: Db, web: Web, running: Daemon) -> None:
    ids = [db.insert(f"echo job-{i} {'NEEDLE' if i % 3 == 0 else ''}", created_at=now_ms() + i) for i in range(12)]
    for job_id in ids:
        db.wait_status(job_id)
    failing = db.insert("exit 7", created_at=now_ms() + 100)
    db.wait_status(failing)
    listed = web.request("GET", "/api/v1/jobs?limit=5").json()
    assert set(listed) == {"jobs", "next", "counts"} and len(listed["jobs"]) == 5
    assert listed["jobs"][0]["id"] == failing and "stdout" not in listed["jobs"][0]
    assert set(listed["counts"]) == {"queued", "executing", "finished_last_minute", "finished_last_hour"}
    seen = []
    page = listed
    while True:
        seen += [job["id"] for job in page["jobs"]]
        if page["next"] is None:
            break
        page = web.request("GET", f"/api/v1/jobs?limit=5&before={page['next']}").json()
    assert seen == [failing, *reversed(ids)]  # every row once, newest first
    found = web.request("GET", "/api/v1/jobs?q=needle&status=completed&node=localhost").json()["jobs"]
    assert [j["id"] for j in found] == [ids[i] for i in (9, 6, 3, 0)]
    assert [j["id"] for j in web.request("GET", "/api/v1/jobs?status=failed").json()["jobs"]] == [failing]
    assert web.request("GET", f"/api/v1/jobs?q={failing[:8]}").json()["jobs"][0]["id"] == failing  # id prefix
    assert web.request("GET", "/api/v1/jobs?node=elsewhere").json()["jobs"] == []
    # Retry: a finished job runs again as attempt 2; one that has not ended cannot be retried.
    reply = web.request("POST", f"/api/v1/jobs/{failing}/retry")
    assert (reply.status, reply.json()) == (200, {"success": True, "jobId": failing, "status": "queued"})
    wait_for(lambda: db.job(failing)["attempt"] == 2, message="the second attempt")
    assert db.wait_status(failing)["status"] == "failed"
    busy = web.submit("sleep 30")
    wait_for(lambda: db.job(busy)["status"] == "executing", message="running")
    reply = web.request("POST", f"/api/v1/jobs/{busy}/retry")
    assert reply.status == 409 and "has not ended" in reply.json()["error"]


def test_nodes_and_daemons(db: Db, web: Web, running: Daemon) -> None:
    # The daemon writes its node row first (offline until probed), then its first heartbeat: wait for that one.
    nodes = wait_for(lambda: (n := web.request("GET", "/api/v1/nodes").json())["nodes"]
                     and n["nodes"][0]["lastHeartbeat"] is not None and n, message="a node's first heartbeat")
    node = nodes["nodes"][0]
    assert (node["id"], node["status"]) == ("localhost", "online")
    assert "bash" in node["capabilities"]["tools"] and isinstance(node["heartbeatAgeMs"], int)
    assert {"running", "queued", "lastHeartbeat", "hostname", "error"} <= set(node)
    daemons = web.request("GET", "/api/v1/daemons").json()["daemons"]
    assert [d["state"] for d in daemons] == ["alive"] and daemons[0]["pid"] == running.proc.pid  # type: ignore[union-attr]


def test_console_events_follow_rows_that_another_program_inserts(db: Db, web: Web, running: Daemon) -> None:
    seen: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()

    def read() -> None:
        for _, event in web.events("/api/v1/events?limit=10"):
            seen.append((time.monotonic(), event))
            if stop.is_set():
                return

    threading.Thread(target=read, daemon=True).start()
    wait_for(lambda: any(e["type"] == "jobs" for _, e in seen), message="the first jobs snapshot")
    wait_for(lambda: any(e["type"] == "nodes" for _, e in seen), message="the nodes snapshot")
    inserted_at = time.monotonic()
    job_id = db.insert("echo from another program")

    def shown(status: str) -> float | None:
        for at, e in seen:
            if e["type"] == "jobs" and any(j["id"] == job_id and j["status"] == status for j in e["jobs"]):
                return at
        return None

    appeared = wait_for(lambda: shown("queued") or shown("executing") or shown("completed"), message="the row")
    assert appeared - inserted_at < 1.0
    wait_for(lambda: shown("completed"), message="the row completed")
    stop.set()


def test_a_stream_shows_where_the_output_cap_cut_the_middle(db: Db, daemon_factory: Callable[..., Daemon],
                                                            web: Web) -> None:
    daemon_factory("[daemon]\noutput_cap_bytes = 1024\n").start()
    written = "".join(f"{i:04d}\n" for i in range(1000))  # 5000 bytes: head 256, tail 768, the middle cut
    job_id = web.submit("seq -f %04g 0 999")
    row = db.wait_status(job_id)
    assert row["stdout_bytes"] == 5000 and "omitted" in row["stdout"]
    text = "".join(e["text"] for _, e in _stream(web, job_id) if e["type"] == "output_chunk")
    assert text == written[:256] + "\n[nexus-jobd: 3976 bytes of stdout not shown]\n" + written[-768:]
