"""Lifecycle of the daemon: open and migrate the database, run the dispatcher, talk to the supervisor.

SIGTERM/SIGINT: stop claiming and let running jobs finish (up to shutdown_grace); a second one terminates them at
once. SIGHUP: reload the config file (limits, node settings, log level) without touching running jobs. Signal
handlers only set flags or swap the config; the loop does the work. Under systemd: READY=1 once the database is
ready and the dispatcher runs, STATUS= lines, WATCHDOG=1 from the event loop, STOPPING=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import os
import pwd
import resource
import shlex
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio

from daemon import config as config_module
from daemon import locking, procs, ticks
from daemon import logging as log
from daemon.android.wakelock import WakeLock
from daemon.config import Config, NodeConfig, Overrides
from daemon.dispatch import Dispatcher, Wake, Wakes
from daemon.dispatch.placement import pools_served
from daemon.errors import ConfigError, DatabaseRewritten, JobdError, SpawnError
from daemon.executors.base import Executor, UntrustedNode
from daemon.executors.keeper import KeeperExecutor
from daemon.health import PROBE_OUTPUT_MAX, Health, LocalProbe, NodeRefused, Prober, capabilities_json
from daemon.hooks import Hooks
from daemon.keeper.client import KeeperClient
from daemon.lease import Identity, Lease
from daemon.metrics import Exporter
from daemon.model import STRANDED_FIX, Quarantine, StopReason, stranded
from daemon.notify import Notifier
from daemon.recovery import Recovery
from daemon.store import WORKERS_KEPT_MS, Store, open_store, survive_db_errors
from daemon.tools import REFUSED, ulimit_script

logger = log.get("service")
# The exit status after another program rewrote the database (or left it in a state the daemon must not open):
# the shipped units do not restart on it (systemd RestartPreventExitStatus=, runit's finish script), since a
# restart cannot help until a person fixes the cause. EX_DATAERR from sysexits.h.
EXIT_DATABASE_REWRITTEN = 65
STATUS_INTERVAL_S = 5.0
RETENTION_INTERVAL_S = 3600.0
STRANDED_INTERVAL_S = 300.0  # how often to look for rows no daemon runs (a scan of the jobs table)
STRANDED_LOGGED = 20  # how many of them a log line names
DAY_MS = 86_400_000
OPEN_FILES = 65536  # the soft descriptor limit the daemon raises itself to (at most the hard limit)


def new_worker_id() -> str:
    """Unique per daemon process, and readable: which host and pid hold a claim."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def executors_for(config: Config, metrics: Hooks | None = None) -> dict[str, Executor]:
    """The strategy that runs each node's jobs: this host's keeper (or with `[daemon] keeper = false` the daemon's
    own children) for the local node, a pooled SSH connection for each remote one."""
    executors: dict[str, Executor] = {config.local_node: _local_executor(config)}
    remote = [node for node in config.nodes.values() if node.ssh is not None]
    if remote:
        from daemon.executors import ssh  # asyncssh costs ~18 MB: only when a node needs it

        for node in remote:
            assert node.ssh is not None
            if node.ssh.known_hosts is None:
                logger.warning("ssh.host_key_check_disabled", node=node.id, host=node.ssh.host,
                               reason="insecure_skip_host_key_check = true: anyone on the path can impersonate it")
            executors[node.id] = ssh.SshExecutor(node, metrics, poll_max_s=config.flush_interval_ms / 2000)
    return executors


def _local_executor(config: Config) -> Executor:
    env, cwd, drain_s = config.job_environment, config.default_cwd, config.drain_timeout_ms / 1000
    if config.keeper:
        return KeeperExecutor(KeeperClient(config.db_name, env), base_env=env, default_cwd=cwd, drain_timeout_s=drain_s)
    from daemon.executors.child import ChildExecutor  # 30 KB the default daemon (under a keeper) does without

    return ChildExecutor(base_env=env, default_cwd=cwd, drain_timeout_s=drain_s)


def prober(config: Config, executors: dict[str, Executor]) -> Prober:
    local = LocalProbe()

    async def probe(node: NodeConfig, script: str) -> str:
        if node.ssh is None:
            return await local.text(node)
        if node.docker_host:
            script = f"DOCKER_HOST={shlex.quote(node.docker_host)}; export DOCKER_HOST\n{script}"
        try:
            return await executors[node.id].run(script, timeout_s=max(5.0, config.heartbeat_interval_ms / 1000),
                                                limit=PROBE_OUTPUT_MAX)
        except UntrustedNode as e:
            raise NodeRefused(str(e)) from e

    return probe


async def _heartbeats(config: Config, store: Store, health: Health, dispatcher: Dispatcher, wakes: Wakes) -> None:
    """Probe every node each heartbeat_interval and write the `nodes` table; the first round at once."""
    await store.upsert_nodes([(n.id, n.ssh.host if n.ssh else socket.gethostname(), None)
                              for n in config.nodes.values()])
    announced = bool(config.pools)  # registered with the lease: kept current, and cleared once none is left
    while True:
        results = await health.probe_all()
        beats = {node_id: (status, capabilities_json(caps)) for node_id, (status, caps) in results.items()}
        async with survive_db_errors("node heartbeats", dispatcher.hooks.db_write_error):
            for node_id in await store.node_heartbeats(beats, served=dispatcher.config.node_ids):
                logger.info("node.unserved", node=node_id, status="offline")
            if dispatcher.config.pools or announced:  # what its members have now, for other daemons
                await store.set_worker_pools(dispatcher.worker_id,
                                             pools_served(dispatcher.config, health.capabilities_of))
                announced = bool(dispatcher.config.pools)
        wakes.add(Wake.NODES_CHANGED)  # after a heartbeat: claim for a node, or fail what can no longer run there
        await ticks.sleep_until_next(dispatcher.config.heartbeat_interval_ms / 1000)


def _check_host(config: Config) -> None:
    """What the config asks of this host: a working directory, a private database, limits it can set."""
    if not config.default_cwd.is_dir():
        raise ConfigError(
            f"[daemon] default_cwd = {str(config.default_cwd)!r} (in {config.settings_file}) is not a directory; "
            "create it or set default_cwd to an existing directory (jobs without a cwd run there)"
        )
    check_database_access(config)
    _check_local_limits(config)


def _check_local_limits(config: Config) -> None:
    """The local node's [limits], tried once by the same `sh` that sets them for every job: a value this host
    refuses stops start-up (or a reload) with the reason, rather than fail each job with exit 125."""
    limits = config.nodes[config.local_node].limits
    if not limits:
        return
    sh = shutil.which("sh", path=config.job_environment.get("PATH", os.defpath))
    if sh is None:
        raise ConfigError(f"{config.source}: [nodes.{config.local_node}.limits] needs `sh` on the jobs' PATH "
                          "to set them; install it or remove the limits")
    try:
        result = subprocess.run([sh, "-c", ulimit_script(limits) + "; exit 0"], capture_output=True, text=True,
                                env=config.job_environment, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{config.source}: [nodes.{config.local_node}.limits] could not be tried with {sh}: "
                          f"{e}") from e
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        refused = next((line.removeprefix(REFUSED).strip() for line in lines if line.startswith(REFUSED)), "")
        shell_says = next((line for line in lines if not line.startswith(REFUSED)), "refused")
        raise ConfigError(f"{config.source}: [nodes.{config.local_node}.limits] {refused} cannot be set on this "
                          f"host ({shell_says}); lower it to what `ulimit -Ha` allows this user, or run as a user "
                          "that may raise it")


def check_database_access(config: Config) -> None:
    """Writing the database means running commands as this daemon's user: refuse one that others can write, where
    it is or where a link to it leads. (A PostgreSQL database is guarded by its server's roles and grants.)"""
    if config.db_url is None:
        resolved = Path(os.path.realpath(config.db_path))
        for path in dict.fromkeys((config.db_path.parent, resolved, resolved.parent)):
            _check_not_shared(config, path, resolved)


def check_database_locking(config: Config) -> None:
    """SQLite's locking must hold where the file is: a filesystem that grants a lock one process holds to another
    too (Android's shared storage, some network filesystems) lets two writers corrupt the database. Tried with a
    real lock from a second process (daemon.locking); refused with the reason."""
    if config.db_url is not None:
        return
    try:
        reason = locking.problem(config.db_path)
    except locking.Unchecked as e:
        logger.warning("db.locking_unchecked", db=config.db_name, reason=str(e))
        return
    if reason is not None:
        raise ConfigError(
            f"{config.db_path}: SQLite's locking does not hold on this filesystem: {reason}. Two programs writing "
            "the database (NexusCLI and this daemon, or two commands) would corrupt it. Put it on storage of this "
            "system's own (on Termux its home: ~/.nexuscli/nexuscli.db), not on shared storage such as /sdcard or a "
            f"network filesystem: set [database] path in {config.settings_file}, or --db")


def _check_not_shared(config: Config, path: Path, database: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return  # created private (0600 in 0700) on first use
    shared = st.st_mode & 0o022  # a world-writable /tmp too: others could plant the -wal file there
    foreign = st.st_uid != os.getuid()
    if not (shared or foreign):
        return
    what = f"owned by uid {st.st_uid}" if foreign else f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if config.allow_shared_database:
        logger.warning("db.shared", path=str(path), problem=what,
                       reason="allow_shared_database = true: whoever can write it can run commands here")
        return
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "database"
    via = f" (--db {config.db_path} leads to {database})" if database != config.db_path.absolute() else ""
    if kind == "directory" and shared and st.st_mode & stat.S_ISVTX:  # a shared /tmp: no chmod makes it private
        fix = f"Put the database in a directory of this user's own (mode 700), not in {path}"
    else:
        fix = f"Fix it (chown to this user; chmod {'700' if kind == 'directory' else '600'} {path})"
    raise ConfigError(
        f"{path}: the {kind} is {what}{via}; anyone who can write the database can run commands as this daemon's "
        f"user. {fix} or set [database] allow_shared_database = true in {config.settings_file} to accept the risk"
    )


def _warn_if_readable(config: Config) -> None:
    """Reading the database means reading every job's environment and output: a file others can read is warned
    about, not refused: the mode of an existing file is its creator's choice (NexusCLI may make it 0644; a reader
    of another user's may be meant), and readers cannot run commands. SQLite gives -wal and -shm the file's mode."""
    if config.db_url is not None:
        return
    database = Path(os.path.realpath(config.db_path))
    readable = []
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        with contextlib.suppress(OSError):
            st = path.stat()
            if st.st_mode & 0o004 or (st.st_mode & 0o040 and not _private_group(st.st_gid)):
                readable.append(f"{path} (mode {stat.S_IMODE(st.st_mode):04o})")
    if readable:
        logger.warning("db.readable", files=readable, risk="other users can read every job's environment "
                       "(tokens) and output", fix=f"chmod 600 {database}*  (new -wal and -shm files take its mode)")


def _private_group(gid: int) -> bool:
    """The user's own group (named as the user, as most distributions make one per user), which no one else is in."""
    try:
        group = grp.getgrgid(gid)
        return group.gr_name == pwd.getpwuid(os.getuid()).pw_name and not group.gr_mem
    except KeyError:
        return False


async def serve(config: Config, overrides: Overrides | None = None, *, install_signals: bool = True) -> int:
    """Run until stopped; returns the process exit code (0 after a clean drain, 1 after losing the lease)."""
    _raise_open_files_limit()
    _check_host(config)
    check_database_locking(config)
    # Jobs run as our user (with keeper = false, as our children): none may read our environment (the secrets
    # jobs do not get) from /proc/PID/environ, nor our memory. Same-user debuggers (py-spy) then need root.
    procs.make_undumpable()
    try:
        store = await open_store(config.db_target, busy_timeout_ms=config.busy_timeout_ms, daemon=True)
    except DatabaseRewritten as e:  # refused before anything was written to it
        logger.error("db.refused", db=config.db_name, message=str(e), exit_code=EXIT_DATABASE_REWRITTEN)
        return EXIT_DATABASE_REWRITTEN
    notifier = Notifier(config.notify_socket, config.watchdog_usec)
    exporter: Exporter | None = None
    try:
        exporter = await _exporter(config)  # [metrics] listen is bound now: a port in use stops start-up (exit 2)
        return await _run(config, overrides or Overrides(), store, notifier, install_signals, exporter)
    finally:
        if exporter is not None:
            await exporter.aclose()
        notifier.close()
        await store.close()


def _raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one, as systemd's defaults (1024 soft, 524288 hard) intend
    for a program that needs more: every job's pipes, every metrics connection. Not past OPEN_FILES: jobs inherit
    it, and some programs close every descriptor up to it (a container's hard limit may be 2^30)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as e:
        logger.warning("daemon.open_files_limit", soft=soft, hard=hard, error=str(e))


async def _exporter(config: Config) -> Exporter | None:
    """[metrics] set: the exporter, its port bound and its textfile's directory checked. Not set: None, and
    prometheus_client is never imported."""
    if not config.metrics.enabled:
        return None
    try:
        return await Exporter.open(config)
    except ImportError as e:
        raise ConfigError(f"{config.settings_file}: [metrics] needs the prometheus-client package ({e}); install "
                          "it into nexus-jobd's environment (pip install prometheus-client)") from e


async def _run(config: Config, overrides: Overrides, store: Store, notifier: Notifier, install_signals: bool,
               exporter: Exporter | None = None) -> int:
    stop = asyncio.Event()
    lost = asyncio.Event()

    def on_lease_lost() -> None:  # another daemon took our jobs: stop them and exit loudly
        lost.set()
        stop.set()
        dispatcher.stop_all(StopReason.LEASE_LOST)

    def on_rewritten(_: Quarantine) -> None:
        notifier.send(STATUS=f"stopped claiming: {config.db_name} was rewritten by another program outside "
                             f"SQLite's locking (sql.js?); {len(dispatcher.running)} running jobs finish, results "
                             "beside it; see the log")

    metrics = exporter or Hooks()
    me = Identity.of_this_process(new_worker_id())
    wakes = Wakes()
    executors = executors_for(config, metrics)
    health = Health(config, prober(config, executors), changed=lambda: wakes.add(Wake.NODES_CHANGED))
    wake_lock = WakeLock(config.android, config.settings_file)
    dispatcher = Dispatcher(config, store, executors, health, wakes, dataclasses.asdict(me), hooks=metrics,
                            activity=wake_lock, on_rewritten=on_rewritten)
    recovery = Recovery(store, me, ttl_ms=config.lease_ttl_ms, executors=executors, local_node=config.local_node,
                        adopt=dispatcher.adopt, on_requeued=lambda: wakes.add(Wake.REQUEUED))
    lease = Lease(store, me, ttl_ms=config.lease_ttl_ms, nodes=config.node_ids, on_lost=on_lease_lost,
                  pools=pools_served(config, lambda _: {}),
                  on_beat=recovery.recover, on_db_error=metrics.db_write_error)
    try:
        try:
            await _start_up(store, lease)
            _warn_if_readable(config)  # once it is known to be our database
        except DatabaseRewritten:  # a rewrite that landed while starting: as one found later, with no job run
            await dispatcher.leave_rewritten()
            return _stopped_rewritten(config, notifier, dispatcher)
        if install_signals:
            _install_signals(stop, dispatcher, notifier, _Reloader(config, overrides, dispatcher))
        logger.info("daemon.started", db=config.db_name, config=config.source, pid=os.getpid(),
                    worker_id=dispatcher.worker_id, systemd=notifier.enabled)
        await _serve_until_stopped(_Parts(config, store, notifier, exporter, executors, health, dispatcher, lease,
                                          wakes, wake_lock), stop)
    finally:
        for executor in executors.values():
            await executor.aclose()
        await wake_lock.stop(jobs_left=dispatcher.detached)
    if lost.is_set():
        logger.error("daemon.stopped", worker_id=dispatcher.worker_id, reason="lease lost")
        return 1
    if dispatcher.quarantine is not None:
        return _stopped_rewritten(config, notifier, dispatcher)
    detached = dispatcher.detached
    await lease.release(f"detached {detached} running jobs for the next daemon" if detached else "clean shutdown")
    logger.info("daemon.stopped", worker_id=dispatcher.worker_id, detached=detached)
    return 0


async def _start_up(store: Store, lease: Lease) -> None:
    """The database as the daemon needs it: its tables and columns; what a daemon kept beside the file when
    another program rewrote it, applied; then this daemon registered, which also recovers the jobs of daemons that
    died (our own previous run included): their remote and keeper jobs are adopted by the dispatcher, which starts
    following them when it runs."""
    await store.migrate()
    for action in await store.apply_set_aside():
        logger.warning("db.rewrite_applied", **action)
    await lease.register()
    async with survive_db_errors("forgetting stopped daemons"):
        if forgotten := await store.prune_workers():
            logger.info("db.workers_pruned", deleted=forgotten, stopped_days_ago=WORKERS_KEPT_MS // DAY_MS)


def _stopped_rewritten(config: Config, notifier: Notifier, dispatcher: Dispatcher) -> int:
    notifier.send(STOPPING=1, STATUS=f"stopped: {config.db_name} was rewritten by another program outside "
                                     "SQLite's locking; see the log or `nexus-jobd status`")
    logger.error("daemon.stopped", worker_id=dispatcher.worker_id, exit_code=EXIT_DATABASE_REWRITTEN,
                 reason="the database was rewritten by another program; not restarting until it is fixed")
    return EXIT_DATABASE_REWRITTEN


@dataclasses.dataclass(frozen=True)
class _Parts:
    """The running daemon's collaborators, made once by _run."""

    config: Config
    store: Store
    notifier: Notifier
    exporter: Exporter | None
    executors: dict[str, Executor]
    health: Health
    dispatcher: Dispatcher
    lease: Lease
    wakes: Wakes
    wake_lock: WakeLock


async def _serve_until_stopped(p: _Parts, stop: asyncio.Event) -> None:
    """The dispatcher's loop, and beside it what keeps the daemon alive and known: the lease, the supervisor's
    watchdog and status, retention, node heartbeats, the keeper, the metrics, the wake lock."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(p.lease.run)
        tg.start_soon(_watchdog, p.notifier)
        tg.start_soon(_status, p.notifier, p.store, p.dispatcher)
        tg.start_soon(_retention, p.store, p.dispatcher)
        tg.start_soon(_report_stranded, p.store, p.dispatcher)
        tg.start_soon(_heartbeats, p.config, p.store, p.health, p.dispatcher, p.wakes)
        tg.start_soon(_keeper_ready, p.executors[p.config.local_node])
        tg.start_soon(p.wake_lock.run)
        if p.exporter is not None:
            await tg.start(p.exporter.run, p.store, p.health)  # answering before READY and dispatch.started
        await p.dispatcher.run(stop, on_ready=lambda: p.notifier.send(READY=1, STATUS="ready"))
        tg.cancel_scope.cancel()


async def _keeper_ready(executor: Executor) -> None:
    """Find or start this host's job keeper now, not when the first local job waits for it."""
    try:
        await executor.ready()
    except SpawnError as e:  # each local job will fail with the reason until it can start
        logger.error("keeper.unavailable", error=str(e))


async def _watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop itself: if the loop wedges, the pings stop and systemd restarts us."""
    if notifier.watchdog_interval_s is None:
        return
    while True:
        notifier.send(WATCHDOG=1)
        await anyio.sleep(notifier.watchdog_interval_s)


async def _status(notifier: Notifier, store: Store, dispatcher: Dispatcher) -> None:
    if not notifier.enabled:
        return
    while True:
        await ticks.sleep_until_next(STATUS_INTERVAL_S)
        if store.unwritable is not None:
            continue  # the dispatcher set the line that says so
        async with survive_db_errors("status", dispatcher.hooks.db_write_error):
            counts = await store.job_counts()
            notifier.send(STATUS=f"{len(dispatcher.running)} running, {counts['queued']} queued, "
                                 f"{counts['finished_last_hour']} finished in the last hour")


async def _retention(store: Store, dispatcher: Dispatcher) -> None:
    """[database] retention_days: finished jobs older than that are deleted, hourly (0 keeps everything)."""
    while True:
        days = dispatcher.config.retention_days
        if days:
            async with survive_db_errors("retention", dispatcher.hooks.db_write_error):
                deleted = await store.prune(older_than_ms=days * DAY_MS,
                                            statuses=("completed", "failed", "cancelled"))
                if deleted:
                    logger.info("db.pruned", deleted=deleted, older_than_days=days)
        await ticks.sleep_until_next(RETENTION_INTERVAL_S)


async def _report_stranded(store: Store, dispatcher: Dispatcher) -> None:
    """Rows no daemon runs or finishes (a status typo, an `executing` row under no daemon) would wait for ever
    unseen: logged at start-up, then again only when what there is changes."""
    said: tuple[int, list[object]] | None = None
    while True:
        async with survive_db_errors("looking for rows no daemon runs", dispatcher.hooks.db_write_error):
            total, rows = await store.stranded_jobs(limit=STRANDED_LOGGED)
            if total and (total, [r["id"] for r in rows]) != said:
                logger.warning("db.stranded_jobs", count=total, jobs=[stranded(r) for r in rows],
                               fix=STRANDED_FIX)
            said = (total, [r["id"] for r in rows])
        await ticks.sleep_until_next(STRANDED_INTERVAL_S)


class _Reloader:
    """SIGHUP: read the config again; apply what can change live, log what changed, keep the old on error.

    A bad file never stops the daemon: whatever reading it raises is logged as config.reload_failed.
    """

    RESTART_ONLY = ("db_path", "db_url", "busy_timeout_ms", "local_node", "default_cwd", "job_environment", "metrics",
                    "android")

    def __init__(self, config: Config, overrides: Overrides, dispatcher: Dispatcher) -> None:
        self.config, self._overrides, self._dispatcher = config, overrides, dispatcher

    def __call__(self) -> None:
        try:
            new = self._load()
        except JobdError as e:
            logger.error("config.reload_failed", error=str(e), kept=self.config.source)
            return
        except Exception as e:  # a bug shown by a bad file: say so, keep the config, keep running
            logger.error("config.reload_failed", error=f"{type(e).__name__}: {e}", kept=self.config.source,
                         exc_info=True)
            return
        self._apply(new)

    def _load(self) -> Config:
        """The file as a restart would read it (so a reload accepts nothing a restart would refuse), with the
        nodes seen from the local node this process keeps until then."""
        new = config_module.load(self._overrides)
        _check_host(new)
        local = self.config.local_node
        if new.local_node != local:
            # The nodes (and which of them is local, and the limits they take from [daemon] max_concurrent)
            # depend on the local node: read them for the one that keeps running, not the one a restart brings.
            try:
                nodes = config_module.load(self._overrides, local_node=local).nodes
            except ConfigError:
                nodes = self.config.nodes  # they make sense only with the new local node: all at the restart
            new = dataclasses.replace(new, nodes=nodes)
            _check_local_limits(dataclasses.replace(new, local_node=local))
        return new

    def _apply(self, new: Config) -> None:
        kept = {name: getattr(self.config, name) for name in self.RESTART_ONLY
                if getattr(new, name) != getattr(self.config, name)}
        nodes = self._live_nodes(new)
        if nodes != new.nodes:
            kept["nodes"] = nodes
        new = dataclasses.replace(new, **kept, notify_socket=self.config.notify_socket,
                                  watchdog_usec=self.config.watchdog_usec)
        changed = {f.name: str(getattr(new, f.name)) for f in dataclasses.fields(new)
                   if getattr(new, f.name) != getattr(self.config, f.name)}
        log.configure(new.log_level, new.log_format)
        self._dispatcher.reload(new)
        self.config = new
        logger.info("config.reloaded", source=new.source, changed=changed,
                    needs_restart=sorted(k for k in kept if k != "job_environment"))

    def _live_nodes(self, new: Config) -> dict[str, NodeConfig]:
        """The running nodes with their new settings: a node keeps its old ones only where applying them needs
        a restart (added, removed or re-addressed: its executor and connection are made at start-up)."""
        return {node_id: new.nodes[node_id] if node_id in new.nodes and new.nodes[node_id].ssh == old.ssh else old
                for node_id, old in self.config.nodes.items()}


def _install_signals(stop: asyncio.Event, dispatcher: Dispatcher, notifier: Notifier,
                     reload: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()

    def on_stop(signum: int) -> None:
        if not stop.is_set():
            logger.info("daemon.stopping", signal=signal.Signals(signum).name, running=len(dispatcher.running))
            notifier.send(STOPPING=1, STATUS=f"stopping: draining {len(dispatcher.running)} running jobs")
            stop.set()
            dispatcher.wake()
        else:
            logger.warning("daemon.stopping_now", signal=signal.Signals(signum).name,
                           running=len(dispatcher.running))
            dispatcher.stop_all(StopReason.SHUTDOWN)

    def ignored(signum: int) -> None:
        logger.warning("daemon.signal_ignored", signal=signal.Signals(signum).name,
                       reason="nexus-jobd gives it no meaning (SIGTERM stops it, SIGHUP reloads its config)")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, reload)
    # Their default action kills the process: a stray `kill -USR1` (log rotation scripts send it) must not take the
    # daemon down with its lease held. A handler, not SIG_IGN: an ignored signal would stay ignored in the jobs.
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(signum, ignored, signum)
