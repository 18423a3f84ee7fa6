"""The Docker engine as jobs see it: is it answering, and stopping the containers a job started.

Killing a `docker run` client leaves its container running, so cancel and timeout stop the container itself,
found by the label the daemon gave it (see tools.label_container).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import ByteStream

from daemon import logging as log

logger = log.get("docker")
DEFAULT_HOST = "unix:///var/run/docker.sock"
PING_CACHE_S = 2.0


class EngineProbe:
    """`GET /_ping` on the engine's socket; an answer is remembered for a moment, a failure is not."""

    def __init__(self) -> None:
        self._ok_until: dict[str, float] = {}

    async def error(self, docker_host: str | None) -> str | None:
        host = docker_host or DEFAULT_HOST
        if self._ok_until.get(host, 0.0) > time.monotonic():
            return None
        problem = await _ping(host)
        if problem is None:
            self._ok_until[host] = time.monotonic() + PING_CACHE_S
        return problem


async def _ping(host: str) -> str | None:
    try:
        with anyio.fail_after(2):
            stream: ByteStream
            if host.startswith("unix://"):
                stream = await anyio.connect_unix(host.removeprefix("unix://"))
            elif host.startswith("tcp://"):
                address, _, port = host.removeprefix("tcp://").rpartition(":")
                stream = await anyio.connect_tcp(address, int(port))
            else:
                return None  # ssh:// and others: let the docker CLI speak for itself
            async with stream:
                await stream.send(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                reply = await stream.receive(256)
    except (OSError, TimeoutError, ValueError) as e:
        return f"the Docker engine at {host} does not answer ({e}); start it or fix docker_host"
    status_line = reply.split(b"\r\n", 1)[0]
    if not status_line.startswith(b"HTTP/1.") or b" 200 " not in status_line + b" ":
        return f"the Docker engine at {host} answered {status_line!r} to /_ping"
    return None


# Runs the docker CLI with these arguments on the job's node, with the job's DOCKER_HOST; its stdout.
DockerCli = Callable[[list[str]], Awaitable[str]]


def _carrying(labels: Sequence[str]) -> list[str]:
    return [arg for label in labels for arg in ("--filter", f"label={label}")]  # docker ANDs label filters


async def stop_containers(labels: Sequence[str], docker: DockerCli, grace_s: float) -> list[str]:
    """`docker stop` (TERM, then KILL after the grace) every container carrying all `labels`; their ids."""
    ids = (await docker(["ps", "-aq", *_carrying(labels)])).split()
    if ids:
        await docker(["stop", "-t", str(max(0, round(grace_s))), *ids])
        logger.info("docker.stopped", labels=list(labels), containers=ids)
    return ids


# Not `exited` or `dead`: a stopped container stays for `docker logs`, as one whose client ended on its own would.
_LEFT_RUNNING = [arg for status in ("created", "running", "paused", "restarting")
                 for arg in ("--filter", f"status={status}")]


async def remove_leftovers(labels: Sequence[str], docker: DockerCli) -> None:
    """After the job ended: a container of it that still runs, or was created but not yet started when its
    client was killed (it would start later, unowned), goes too."""
    ids = (await docker(["ps", "-aq", *_carrying(labels), *_LEFT_RUNNING])).split()
    if ids:
        await docker(["rm", "-f", *ids])
        logger.warning("docker.removed_leftovers", labels=list(labels), containers=ids)
