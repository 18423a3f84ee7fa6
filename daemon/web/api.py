"""The HTTP API: NexusCLI's job routes field for field (POST /api/v1/jobs, GET and DELETE /api/v1/jobs/ID, the
SSE stream), and what the CLI does (list, retry, nodes, daemons), the console's live events and its charts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from daemon.errors import JobdError
from daemon.store import JobStatus, RawText, Store
from daemon.web import submit, views
from daemon.web.feeds import KEEPALIVE_S, events_for
from daemon.web.follow import Cursor
from daemon.web.hub import Hub, ListQuery
from daemon.web.submit import BadRequest

MAX_BODY_BYTES = 1024 * 1024
MAX_LIMIT = 500
STATUSES = tuple(s.value for s in JobStatus)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def json_response(value: Any, status: int = 200) -> Response:
    return Response(views.dumps(value), status, media_type="application/json", headers={"cache-control": "no-store"})


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


async def read_json(request: Request) -> Any:
    """The body as JSON: at most MAX_BODY_BYTES, sent as application/json (a form cannot send that cross-site)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest(f"send the body as JSON with Content-Type: application/json (got {kind or 'none'!r})", 415)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes", 413)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None


async def _job_id(store: Store, request: Request) -> str | RawText:
    """The path's job id (or a unique prefix of one); 404 if there is none."""
    return await _resolve(store, request.path_params["job_id"])


async def _resolve(store: Store, given: str) -> str | RawText:
    if "\0" in given:
        raise BadRequest("a job id cannot hold a NUL character")
    try:
        return await store.resolve_id(given)
    except JobdError as e:  # none, or more than one with that prefix
        raise BadRequest(str(e), 404 if str(e).startswith("no job") else 400) from None


def _query(request: Request) -> ListQuery:
    params = request.query_params
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {status[:40]!r}")
    limit_text = params.get("limit", "50")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit_text[:40]!r}")
    text = params.get("q") or None
    for name, value in (("node", params.get("node")), ("q", text)):
        if value is not None and "\0" in value:
            raise BadRequest(f"{name} cannot hold a NUL character")
    return ListQuery(status=status, node_id=params.get("node") or None, text=text, limit=int(limit_text))


# -- NexusCLI's routes ------------------------------------------------------------------------------------------


async def create_job(request: Request) -> Response:
    """POST /api/v1/jobs: 201 {jobId, nodeId, tool, command, status, createdAt, streamEndpoint}."""
    job = submit.parse(await read_json(request))
    store = _hub(request).store
    depends_on = await _resolve(store, job.depends_on) if job.depends_on is not None else None
    job_id = await store.insert_job(node_id=job.node_id, tool=job.tool, command=job.command, cwd=job.cwd,
                                    env=job.env, priority=job.priority, timeout_ms=job.timeout_ms,
                                    max_attempts=job.max_attempts, delay_ms=job.delay_ms, depends_on=depends_on,
                                    conversation_id=job.conversation_id, message_id=job.message_id)
    row = await store.get_job(job_id) or {}
    return json_response({"jobId": job_id, "nodeId": job.node_id, "tool": job.tool, "command": job.command,
                          "status": "queued", "createdAt": row.get("created_at"),
                          "streamEndpoint": f"/api/v1/jobs/{job_id}/stream"}, 201)


async def get_job(request: Request) -> Response:
    """GET /api/v1/jobs/ID: the row, every column, as NexusCLI answers it."""
    store = _hub(request).store
    row = await store.get_job(await _job_id(store, request))
    if row is None:
        raise BadRequest("Job not found", 404)
    return json_response(row)


async def cancel_job(request: Request) -> Response:
    """DELETE /api/v1/jobs/ID: {success, killed}; killed: a running process is being stopped by its daemon."""
    store = _hub(request).store
    job_id = await _job_id(store, request)
    before = await store.get_job(job_id)
    if not await store.cancel([job_id]):
        status = (await store.get_job(job_id) or {}).get("status")
        return json_response({"success": False, "killed": False, "status": status,
                              "error": f"the job has already ended ({status}): nothing to cancel"}, 409)
    return json_response({"success": True, "killed": (before or {}).get("status") == "executing"})


async def stream_job(request: Request) -> Response:
    """GET /api/v1/jobs/ID/stream: Server-Sent Events from the job's first byte (or Last-Event-ID) to its end."""
    hub = _hub(request)
    job_id = await _job_id(hub.store, request)
    last = request.headers.get("last-event-id")
    try:
        start = Cursor.parse(last) if last else Cursor()
    except ValueError as e:
        raise BadRequest(str(e)) from None

    async def body() -> AsyncIterator[bytes]:
        async with hub.follow(job_id) as feed:
            async for data in events_for(hub.store, feed, start):
                yield data

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


# -- the daemon's own -------------------------------------------------------------------------------------------


async def list_jobs(request: Request) -> Response:
    """GET /api/v1/jobs?status=&node=&q=&limit=&before=: newest first, without output; `next` pages on."""
    before_text = request.query_params.get("before")
    try:
        before = views.parse_page_cursor(before_text) if before_text else None
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return json_response(await _hub(request).jobs(_query(request), before))


async def retry_job(request: Request) -> Response:
    """POST /api/v1/jobs/ID/retry: a finished job queued again as a new attempt."""
    store = _hub(request).store
    job_id = await _job_id(store, request)
    if not await store.retry(job_id):
        status = (await store.get_job(job_id) or {}).get("status")
        return json_response({"success": False, "status": status, "error": f"the job has not ended ({status}): "
                              "only completed, failed or cancelled jobs can be retried"}, 409)
    return json_response({"success": True, "jobId": job_id, "status": "queued"})


async def nodes(request: Request) -> Response:
    return json_response(await _hub(request).node_list())


async def daemons(request: Request) -> Response:
    return json_response({"daemons": (await _hub(request).node_list())["daemons"]})


async def stats(request: Request) -> Response:
    text = request.query_params.get("hours", "6")
    if not text.isdigit() or not 1 <= int(text) <= 168:
        raise BadRequest(f"hours must be an integer from 1 to 168, got {text[:40]!r}")
    return json_response(await _hub(request).stats(int(text)))


async def console_events(request: Request) -> Response:
    """GET /api/v1/events?status=&node=&q=&limit=: the console's live view, as SSE: `jobs` (the first page of the
    list and the counts) and `nodes` (nodes and daemons), each sent again whenever it changes."""
    hub, query = _hub(request), _query(request)

    async def body() -> AsyncIterator[bytes]:
        async with hub.watch_list(query) as jobs, hub.watch_nodes() as node_list:
            sent: dict[int, bytes | None] = {}
            while not hub.stopping:
                for snapshot in (jobs, node_list):
                    if snapshot.data is not None and sent.get(id(snapshot)) is not snapshot.data:
                        sent[id(snapshot)] = snapshot.data
                        yield b"data: " + snapshot.data + b"\n\n"
                if not await hub.console_changed.wait(KEEPALIVE_S):
                    yield b": keep-alive\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
