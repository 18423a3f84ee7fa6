"""The daemon's side of the job keeper (daemon/keeper): one connection (started, or found again), many jobs over it.

Requests from one turn of the event loop go out in one write; the keeper's frames are dispatched to the job they
name. If the keeper dies under us, every job it held is killed (pid and start time checked) and lost: its pipes
died with the keeper, and nothing could record the rest of its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import anyio

from daemon import logging as log
from daemon import procs
from daemon.executors.base import ExitStatus, JobLost, OutputCallback, SpawnError
from daemon.keeper import protocol as p
from daemon.output import JobOutput

logger = log.get("keeper")
CONNECT_TRIES = 3
HELLO_TIMEOUT_S = 10.0
READ_SIZE = 256 * 1024
_ROOT = str(Path(__file__).resolve().parents[2])  # where the `daemon` package is: the keeper imports only it
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from daemon.keeper.server import main; "
         "sys.exit(main(bytes.fromhex(sys.argv[2])))")


class KeeperLost(JobLost):
    pass


class AlreadyStarted(SpawnError):
    """The keeper runs (or ran) this very attempt already: a row that forgot its claim (its file was rewritten by
    another program, or restored from a backup) was claimed again with the same attempt number."""


class KeeperProcess:
    """A job the keeper runs for us (the executors.base.Process interface)."""

    detachable = True  # it runs on without this daemon: the next one attaches

    def __init__(self, client: KeeperClient, handle: int, output: JobOutput, on_stdout: OutputCallback,
                 on_stderr: OutputCallback) -> None:
        self._client = client
        self.handle = handle
        self._output = output
        self._on = (on_stdout, on_stderr)
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[int] = loop.create_future()
        self._exit: asyncio.Future[ExitStatus] = loop.create_future()
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exited(self) -> bool:
        return self._exit.done()

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    def signal_group(self, signum: int) -> None:
        if not self._exit.done():
            self._client.send(p.frame(p.SIGNAL, self.handle, b"%d" % signum))

    def forget(self, *, remove: bool) -> None:
        self._client.forget(self, remove=remove)

    # -- frames from the keeper ---------------------------------------------------------------------------------

    def on_frame(self, kind: int, payload: bytes) -> None:
        if kind == p.DATA_OUT:
            self._on[0](payload)
        elif kind == p.DATA_ERR:
            self._on[1](payload)
        elif kind == p.SKIP:
            stream, n = (int(f) for f in p.unpack(payload))
            (self._output.stdout if stream == 1 else self._output.stderr).skip(n)
            self._on[0 if stream == 1 else 1](b"")
        else:
            self._on_state(kind, payload)

    def _on_state(self, kind: int, payload: bytes) -> None:
        if kind == p.STARTED:
            self._pid = int(payload)
            if not self.started.done():
                self.started.set_result(self._pid)
        elif kind == p.EXIT:
            code, signum = (int(n) for n in payload.split())
            if not self._exit.done():
                self._exit.set_result(ExitStatus(code, signum or None))
        elif kind == p.TAKEN:  # another daemon adopted it (ours had lost its lease): ours no longer follows it
            if not self._exit.done():
                self._exit.set_exception(JobLost("another daemon took the job over"))
        elif kind in (p.FAILED, p.UNKNOWN):
            error = p.text(payload)
            if not self.started.done():
                self.started.set_exception(JobLost(error) if kind == p.UNKNOWN else
                                           AlreadyStarted(error) if error.endswith(p.STARTED_ALREADY) else
                                           SpawnError(error))

    def left(self, reason: str) -> None:
        """This daemon leaves the job to the keeper (it stops): whoever still waits learns it, nothing is killed."""
        for future in (self.started, self._exit):
            if not future.done():
                future.set_exception(JobLost(reason))
                future.exception()  # retrieved: a job nobody waits for any more must not warn

    def lost(self, reason: str) -> None:
        """The keeper is gone: what is left of the job is killed, and the job is lost. Its start time is read only
        now (reading /proc/PID/stat of a process in execve waits for the exec: 0.14 ms a job, measured), so a
        leader is trusted to be the job's: the keeper died this moment, and init reaps its orphans as they end,
        but a pid is not reused within that time."""
        killed = self._pid is not None and not self._exit.done() and procs.kill_group(self._pid, None)
        error = f"{reason}{'; its process group was killed' if killed else ''}"
        if not self.started.done():
            self.started.set_exception(SpawnError(error))
        if not self._exit.done():
            self._exit.set_exception(KeeperLost(error))
            self._exit.exception()  # retrieved: a job nobody waits for any more must not warn


class KeeperClient:
    def __init__(self, database: str) -> None:
        self._address = p.address(database)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting = anyio.Lock()
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._flush_scheduled = False
        self._writing = False
        self._jobs: dict[int, KeeperProcess] = {}
        self._next_handle = 1
        self._hello: asyncio.Future[list[str]] | None = None
        self._queries: dict[int, asyncio.Future[list[str]]] = {}
        self.keeper_pid: int | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- connecting -----------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Find the keeper of this host and database, or start one; raises SpawnError if neither works."""
        async with self._connecting:
            if self._sock is not None:
                return
            problem = "it did not answer"
            for _ in range(CONNECT_TRIES):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, self._address)
                except (ConnectionRefusedError, FileNotFoundError):
                    sock.close()
                    problem = await anyio.to_thread.run_sync(self._start_keeper)
                    continue
                except OSError as e:
                    sock.close()
                    problem = str(e)
                    continue
                if await self._greet(sock):
                    return
                problem = "it closed the connection at once (it was leaving)"
            raise SpawnError(f"cannot reach or start the job keeper: {problem}")

    def _start_keeper(self) -> str:
        """Run a keeper (it binds the address, says `ready` and leaves us: a second fork); the reason if it failed."""
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT, _ROOT, self._address.hex()],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
                                    close_fds=True)
        except OSError as e:
            return f"cannot run {sys.executable}: {e}"
        assert proc.stdout is not None
        with proc.stdout:
            line = proc.stdout.readline().decode(errors="replace").strip()
        proc.wait()
        if line in ("ready", "busy"):
            if line == "ready":
                logger.info("keeper.started")
            return "it started but did not answer"
        return line.removeprefix("error ") or f"it exited with status {proc.returncode}"

    async def _greet(self, sock: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        self._loop, self._sock = loop, sock
        self._inbuf.clear()
        self._hello = loop.create_future()
        loop.add_reader(sock, self._on_readable)
        self.send(p.frame(p.HELLO, 0, p.pack(p.VERSION)))
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._hello), HELLO_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            self._disconnect("the job keeper did not answer")
            return False
        self.keeper_pid = int(hello[1])
        logger.info("keeper.connected", keeper_pid=self.keeper_pid, jobs=len(hello) - 2)
        return True

    async def holds(self, keys: list[str]) -> set[str]:
        """Which of these attempts the keeper holds (running, or ended and not yet recorded); no key: all it holds."""
        await self.connect()
        assert self._loop is not None
        handle = self._handle()
        future: asyncio.Future[list[str]] = self._loop.create_future()
        self._queries[handle] = future
        self.send(p.frame(p.HOLDS, handle, p.pack(*keys)))
        try:
            with anyio.fail_after(HELLO_TIMEOUT_S):
                return set(await future)
        except TimeoutError as e:
            raise SpawnError(f"the job keeper (pid {self.keeper_pid}) did not answer within {HELLO_TIMEOUT_S:g} s"
                             ) from e
        finally:
            self._queries.pop(handle, None)

    # -- jobs ---------------------------------------------------------------------------------------------------

    async def spawn(self, key: str, argv: list[str], env: dict[str, str], cwd: str, output: JobOutput,
                    on_stdout: OutputCallback, on_stderr: OutputCallback, drain_s: float) -> KeeperProcess:
        if self._sock is None:
            await self.connect()
        variables = [f"{name}={value}" for name, value in env.items()]
        if p.has_nul(key, cwd, *argv, *variables):
            raise SpawnError("an argument, a variable or the working directory holds a NUL byte: no program can "
                             "be given one")
        process = self._new(output, on_stdout, on_stderr)
        self.send(p.frame(p.SPAWN, process.handle,
                          p.pack(key, output.stdout.cap, drain_s, cwd, len(argv), *argv, *variables)))
        try:
            await process.started
        except BaseException:
            self._jobs.pop(process.handle, None)
            raise
        return process

    async def attach(self, key: str, output: JobOutput, on_stdout: OutputCallback,
                     on_stderr: OutputCallback) -> KeeperProcess:
        """Follow again an attempt the keeper holds; JobLost if it holds none. `output` starts over from the first
        byte, whatever a row said: the keeper holds the head and the tail the row keeps, so reading them again is
        exact, where going on from a row's byte count would not be past the cap (a character split at the row's
        last flush was held back from its text but counted in its total)."""
        await self.connect()
        output.stdout.reset()
        output.stderr.reset()
        process = self._new(output, on_stdout, on_stderr)
        self.send(p.frame(p.ATTACH, process.handle, p.pack(key, 0, 0)))
        try:
            await process.started
        except BaseException:
            self._jobs.pop(process.handle, None)
            raise
        return process

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle = handle + 1 if handle < 0xFFFFFFFF else 1
        return handle

    def _new(self, output: JobOutput, on_stdout: OutputCallback, on_stderr: OutputCallback) -> KeeperProcess:
        handle = self._handle()
        process = KeeperProcess(self, handle, output, on_stdout, on_stderr)
        self._jobs[handle] = process
        return process

    def forget(self, process: KeeperProcess, *, remove: bool) -> None:
        if self._jobs.pop(process.handle, None) is not None and self._sock is not None:
            self.send(p.frame(p.FORGET, process.handle, b"1" if remove else b"0"))

    # -- the socket -----------------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._sock is None or self._loop is None:
            return
        self._outbuf += data
        if not self._flush_scheduled and not self._writing:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)  # what this turn of the loop asks goes out in one write

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._sock is None or self._loop is None:
            return
        try:
            sent = self._sock.send(self._outbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._disconnect("the connection to the job keeper broke")
            return
        del self._outbuf[:sent]
        if self._outbuf and not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock, self._on_writable)
        elif not self._outbuf and self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock)

    def _on_writable(self) -> None:
        self._flush()

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect(f"the job keeper (pid {self.keeper_pid}) stopped while the job was running")
            return
        self._inbuf += data
        try:
            for kind, handle, payload in p.split(self._inbuf):
                self._dispatch(kind, handle, payload)
        except (p.ProtocolError, ValueError, KeyError, TypeError) as e:
            self._disconnect(f"the job keeper sent what this daemon does not understand: {e}")

    def _dispatch(self, kind: int, handle: int, payload: bytes) -> None:
        if kind == p.HELLO:
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(p.unpack(payload))
            return
        if (query := self._queries.get(handle)) is not None:
            if not query.done():  # its answer, or FAILED: the keeper refused the request
                if kind == p.HOLDS:
                    query.set_result(p.unpack(payload))
                else:
                    query.set_exception(SpawnError(p.text(payload)))
            return
        process = self._jobs.get(handle)
        if process is not None:
            process.on_frame(kind, payload)

    def _disconnect(self, reason: str) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(sock)
        if self._writing:
            self._loop.remove_writer(sock)
            self._writing = False
        sock.close()
        self._outbuf.clear()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(ConnectionError(reason))
        for query in self._queries.values():
            if not query.done():
                query.set_exception(SpawnError(reason))
        jobs, self._jobs = self._jobs, {}
        if jobs:
            logger.error("keeper.lost", keeper_pid=self.keeper_pid, jobs=len(jobs), reason=reason)
        for process in jobs.values():
            process.lost(reason)

    def close(self) -> None:
        """Leave the keeper: the jobs it holds for us run on (a stopping daemon that detached them). Our last
        FORGETs get a second at most: a keeper stopped with SIGSTOP must not hold the daemon's exit."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(sock)
        if self._writing:
            self._loop.remove_writer(sock)
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(self._outbuf)
        sock.close()
        reason = "this daemon is stopping"
        for query in self._queries.values():
            if not query.done():
                query.set_exception(SpawnError(reason))
        jobs, self._jobs = self._jobs, {}
        for process in jobs.values():  # nobody waits for them any more (detached); resolve them all the same
            process.left(reason)

