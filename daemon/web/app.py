"""The web process's ASGI application: the Guard in front, the API's routes, the console's page and assets, and
errors as JSON with a reason (a bad request is a 4xx, never a 500 or a traceback)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from daemon import logging as log
from daemon.errors import DatabaseRewritten, JobdError
from daemon.store import DbError, DbRejected
from daemon.web import api
from daemon.web.auth import Guard
from daemon.web.hub import Hub
from daemon.web.submit import BadRequest

STATIC = Path(__file__).parent / "static"
logger = log.get("web")


async def _console(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return api.json_response({"error": str(exc)}, exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, exc.detail)
    return api.json_response({"error": f"{reason}: {request.method} {request.url.path}"}, exc.status_code)


async def _database_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, DbRejected):  # the values of one write (a conversationId that is no conversation, ...)
        return api.json_response({"error": f"the database refused the job: {exc}"}, 422)
    unavailable = isinstance(exc, (*DbError, DatabaseRewritten))
    if unavailable:
        logger.warning("web.database_error", path=request.url.path, error=str(exc))
    return api.json_response({"error": str(exc)}, 503 if unavailable else 400)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("web.internal_error", path=request.url.path, method=request.method)
    return api.json_response({"error": "internal error (the web process's log has the details)"}, 500)


def routes() -> list[Route | Mount]:
    return [
        Route("/", _console),
        Route("/api/v1/jobs", api.list_jobs, methods=["GET"]),
        Route("/api/v1/jobs", api.create_job, methods=["POST"]),
        Route("/api/v1/jobs/{job_id:path}/stream", api.stream_job, methods=["GET"]),
        Route("/api/v1/jobs/{job_id:path}/retry", api.retry_job, methods=["POST"]),
        Route("/api/v1/jobs/{job_id:path}", api.get_job, methods=["GET"]),
        Route("/api/v1/jobs/{job_id:path}", api.cancel_job, methods=["DELETE"]),
        Route("/api/v1/nodes", api.nodes, methods=["GET"]),
        Route("/api/v1/daemons", api.daemons, methods=["GET"]),
        Route("/api/v1/stats", api.stats, methods=["GET"]),
        Route("/api/v1/events", api.console_events, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def build(hub: Hub, *, token: str, allowed_hosts: frozenset[str]) -> Guard:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(hub.run(), name="web hub")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    handlers = {BadRequest: _bad_request, HTTPException: _http_error, JobdError: _database_error,
                **dict.fromkeys(DbError, _database_error), Exception: _internal_error}
    app = Starlette(routes=routes(), lifespan=lifespan, exception_handlers=handlers)
    app.state.hub = hub
    return Guard(app, token=token, allowed_hosts=allowed_hosts)
