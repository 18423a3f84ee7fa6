"""Start-up chores: what attempts that no longer run left behind where they ran, killed and let go."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import anyio

from daemon import logging as log
from daemon.executors.base import Executor
from daemon.store import Store

logger = log.get("dispatch")
SWEEP_DELAY_S = 10.0  # the leftover spools on each node are swept once, this long after start-up


async def kill_orphans(store: Store, executors: Mapping[str, Executor]) -> None:
    """Before claiming anything: what an executor still holds of attempts whose rows are final or back in the queue
    is killed and let go. On a database other hosts share, another host's daemon recovered them while this host was
    away; on any database, a daemon that died between recording a row and telling the keeper left the keeper
    holding a finished job (it would stay for ever)."""
    for node_id, executor in executors.items():
        try:
            killed = await executor.kill_orphans(partial(store.finished_attempts, node_id))
        except Exception as e:  # the keeper cannot start, or the database is away: jobs still run; say so
            logger.error("dispatch.orphans_unchecked", node=node_id, error=str(e) or type(e).__name__)
            continue
        for key in killed:
            logger.warning("job.orphan_killed", attempt=key,
                           reason="its row is final or back in the queue: this attempt no longer runs here")


async def sweep(store: Store, executors: Mapping[str, Executor]) -> None:
    """Once, a while after start-up: directories on each remote node whose attempt is no longer running (its row
    is final or gone, its daemon could not remove them) are removed, their processes killed."""
    await anyio.sleep(SWEEP_DELAY_S)
    for node_id, executor in executors.items():
        try:
            await executor.sweep(partial(store.finished_attempts, node_id))
        except Exception as e:  # a chore: whatever goes wrong, the next start tries again
            logger.warning("ssh.sweep_failed", node=node_id, error=str(e) or type(e).__name__)
