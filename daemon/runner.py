"""One attempt of one job: validate the row, start the process, enforce timeout and stop requests, and say how it
ended. Dispatch decides what runs when; this module only runs it.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from daemon import docker, outcome, procs, tools
from daemon import logging as log
from daemon.config import Config
from daemon.errors import BadJob, JobLost, NodeUnreachable, SpawnError
from daemon.executors.base import Executor, Process
from daemon.model import AdoptedJob, Claim, ClaimedJob, Command, JobResult, JobStatus, ProcessRef, now_ms
from daemon.output import JobOutput
from daemon.tools import RunPolicy

logger = log.get("runner")
DOCKER_CLI_TIMEOUT_S = 30.0


@dataclass
class RunningJob:
    claim: Claim
    node_id: str  # where it runs
    tool: str
    output: JobOutput
    started_at: int  # the row's, as claimed (epoch ms)
    pool: str | None = None  # the pool the row named, when it runs on one of its members
    stop_reason: str | None = None  # why the daemon is ending it: cancelled, timeout, shutdown, lease lost
    process: Process | None = None  # once started
    command: Command | None = None
    pid_recorded: bool = False  # where it runs is in the row (for crash recovery)
    flush_refused: bool = False  # the database refused its output's values: not flushed again
    holds_slot: bool = True  # until its process ends
    ended: bool = False
    _timers: list[anyio.CancelScope] = field(default_factory=list)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)  # the job's task: cancelled to detach it

    def end_timers(self) -> None:
        """Timers of a job die with its process: no sleeping task outlives the job it was for."""
        self.ended = True
        for scope in self._timers:
            scope.cancel()

    def timer_scope(self) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        if self.ended:
            scope.cancel()
        self._timers.append(scope)
        return scope


class JobRunner:
    def __init__(self, config: Config, executors: Mapping[str, Executor], on_output: Callable[[], None]) -> None:
        self._config = config
        self._executors = executors
        self._on_output = on_output
        self._backoff = outcome.Backoff(config.retry_backoff_ms, config.retry_backoff_max_ms)
        self._docker = docker.EngineProbe()
        self._tg: TaskGroup | None = None

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self._backoff = outcome.Backoff(config.retry_backoff_ms, config.retry_backoff_max_ms)

    def bind(self, tg: TaskGroup) -> None:
        """The task group that owns timers and terminators (the dispatcher's)."""
        self._tg = tg

    def new(self, job: ClaimedJob, worker_id: str) -> RunningJob:
        return RunningJob(Claim(job.id, worker_id, job.attempt), str(job.node_id), str(job.tool),
                          JobOutput(self._config.output_cap_bytes), job.started_at, job.pool)

    def adopted(self, adopted: AdoptedJob, worker_id: str) -> RunningJob:
        """A running job taken over from another daemon: its output goes on from what the row holds."""
        running = self.new(adopted.job, worker_id)
        running.output.reseed(adopted.stdout, adopted.stderr, adopted.stdout_bytes, adopted.stderr_bytes)
        if adopted.cancelled:
            running.stop_reason = "cancelled"
        return running

    async def reattach(self, job: ClaimedJob, running: RunningJob) -> JobResult:
        """Follow an adopted job to its end: cancel and timeout (counted from the row's started_at) as usual."""
        node = self._config.nodes[running.node_id]
        try:
            command: Command | None = tools.build(job, node.tools, allowed_commands=node.allowed_commands,
                                                  docker_host=node.docker_host)
        except BadJob:
            command = None  # the config changed since it started: it runs anyway, and can still be stopped
        try:
            policy = tools.policy(job, self._config.default_timeout_ms)
        except BadJob:
            policy = RunPolicy(None, 1)
        running.command = command
        executor = self._executors[running.node_id]
        try:
            process = await executor.reattach(f"{job.id}:{job.attempt}", self._feeder(running.output.stdout.feed),
                                              self._feeder(running.output.stderr.feed), output=running.output)
        except (SpawnError, JobLost) as e:  # its keeper no longer holds it, or cannot be reached: as a lost job
            return outcome.lost(f"the job could not be followed again: {e}", running.output.snapshot(final=True),
                                attempt=job.attempt, max_attempts=policy.max_attempts)
        timeout_ms = policy.timeout_ms
        left_ms = None if timeout_ms is None else max(1, timeout_ms - (now_ms() - job.started_at))
        self._started(running, process, left_ms)
        return await self._follow(job, running, process, policy)

    async def run(self, job: ClaimedJob, running: RunningJob) -> JobResult:
        """Run one attempt to its end; a malformed row or a failed start is a result too, never an exception."""
        node = self._config.nodes[running.node_id]
        try:
            command = dataclasses.replace(
                tools.build(job, node.tools, allowed_commands=node.allowed_commands, docker_host=node.docker_host),
                limits=node.limits, default_cwd=node.default_cwd)
            policy = tools.policy(job, self._config.default_timeout_ms)
        except BadJob as e:
            return JobResult(JobStatus.FAILED, None, str(e), running.output.snapshot(final=True))
        # The engine answers for a local node here; on an SSH node docker_host is the node's, and its CLI speaks.
        if command.argv[0] == "docker" and node.ssh is None and (problem := await self._docker.error(node.docker_host)):
            return JobResult(JobStatus.FAILED, None, problem, running.output.snapshot(final=True))
        if running.stop_reason is not None:  # cancelled (or the daemon stopping) while the engine was checked
            return outcome.not_started(running.stop_reason, running.output.snapshot(final=True))
        running.command = command
        try:
            process = await self._executors[running.node_id].start(
                command, self._feeder(running.output.stdout.feed), self._feeder(running.output.stderr.feed),
                output=running.output)
        except NodeUnreachable as e:
            return outcome.node_unreachable(str(e), running.output.snapshot(final=True),
                                            retry_at_ms=now_ms() + round(e.retry_in_s * 1000),
                                            pooled=running.pool is not None)
        except SpawnError as e:
            return JobResult(JobStatus.FAILED, 127, str(e), running.output.snapshot(final=True))
        self._started(running, process, policy.timeout_ms)
        return await self._follow(job, running, process, policy)

    async def _follow(self, job: ClaimedJob, running: RunningJob, process: Process,
                      policy: RunPolicy) -> JobResult:
        """Wait for a started job to end and say how it did."""
        try:
            status = await process.wait()
        except JobLost as e:
            running.end_timers()
            return outcome.lost(str(e), running.output.snapshot(final=True), attempt=job.attempt,
                                max_attempts=policy.max_attempts)
        running.end_timers()
        command = running.command
        if running.stop_reason is not None and command is not None and command.container_labels:
            with anyio.move_on_after(15):
                await docker.remove_leftovers(command.container_labels, self._docker_cli(running.node_id, command))
        return outcome.result_for(status, stop_reason=running.stop_reason, timeout_ms=policy.timeout_ms,
                                  output=running.output.snapshot(final=True), attempt=job.attempt,
                                  max_attempts=policy.max_attempts, backoff=self._backoff, now_ms=now_ms(),
                                  kills=self._kills(running.node_id))

    def _kills(self, node_id: str) -> outcome.Kills:
        """A local job's executor saw every signal nexus-jobd sent it: a SIGKILL it did not send is a stranger's."""
        node = self._config.nodes.get(node_id)
        return outcome.Kills(local=node is not None and node.ssh is None, android=self._config.android.termux,
                             cpu_seconds=node.limits.get("cpu_seconds") if node is not None else None)

    def _started(self, running: RunningJob, process: Process, timeout_ms: int | None) -> None:
        running.process = process
        self._on_output()  # the flusher records where it runs, if it still runs by then
        if running.stop_reason is not None:  # asked to stop while it was starting
            self._spawn(self._terminate, running)
        if timeout_ms is not None:
            self._spawn(self._expire, running, timeout_ms)

    @staticmethod
    def process_ref(running: RunningJob) -> ProcessRef | None:
        """Where a running job runs, read when first needed: most short jobs are gone before anyone asks."""
        if running.process is None or running.process.pid is None or not running.holds_slot:
            return None
        return ProcessRef(running.process.pid, procs.start_time(running.process.pid))

    def request_stop(self, running: RunningJob, reason: str) -> None:
        if running.process is not None and running.process.exited:
            return  # it ended on its own: its exit status stands, whatever is asked now
        if running.stop_reason is None:
            running.stop_reason = reason
            if running.process is not None:
                self._spawn(self._terminate, running)

    def _spawn(self, fn: Callable[..., Awaitable[None]], running: RunningJob, *args: object) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._in_timers, fn, running, *args)

    @staticmethod
    async def _in_timers(fn: Callable[..., Awaitable[None]], running: RunningJob, *args: object) -> None:
        with running.timer_scope():
            await fn(running, *args)

    async def _expire(self, running: RunningJob, timeout_ms: int) -> None:
        await anyio.sleep(timeout_ms / 1000)
        logger.warning("job.timed_out", job_id=running.claim.job_id, timeout_ms=timeout_ms)
        self.request_stop(running, "timeout")

    async def _terminate(self, running: RunningJob) -> None:
        """TERM the whole group, KILL it if the job has not ended after the grace period. A container the job
        started is stopped first (TERM, KILL after the same grace): its client's death would not stop it."""
        assert running.process is not None
        labels = running.command.container_labels if running.command else ()
        if labels and running.command is not None:
            grace_s = self._config.kill_grace_ms / 1000
            with anyio.move_on_after(grace_s + 15):  # an engine that hangs must not keep the client alive
                await docker.stop_containers(labels, self._docker_cli(running.node_id, running.command), grace_s)
        running.process.signal_group(signal.SIGTERM)
        await anyio.sleep(self._config.kill_grace_ms / 1000)
        if running.holds_slot:
            logger.warning("job.killed", job_id=running.claim.job_id, reason=running.stop_reason)
            running.process.signal_group(signal.SIGKILL)

    def _docker_cli(self, node_id: str, job: Command) -> docker.DockerCli:
        """The docker CLI on the job's node, with the job's variables (DOCKER_HOST among them)."""
        executor = self._executors[node_id]

        async def run(args: list[str]) -> str:
            return await executor.output(Command(argv=("docker", *args), cwd=None, env=job.env), DOCKER_CLI_TIMEOUT_S)

        return run

    def _feeder(self, feed: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def on_data(data: bytes) -> None:
            feed(data)
            self._on_output()

        return on_data
