"""The daemon's side of the job keeper (server.py): one connection (started, or found again), many jobs over it.

Requests from one turn of the event loop go out in one write; the keeper's frames are dispatched to the job they
name. The keeper must be of this daemon's user (an abstract socket is open to all: another user could bind its
address first). If the connection drops while the keeper lives, the daemon connects again and follows its jobs on.
If the keeper dies under us, every job it held is killed (only a session it started) and lost: its pipes died with
the keeper, and nothing could record the rest of its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import anyio

from daemon import logging as log
from daemon import procs
from daemon.errors import JobLost, SpawnError
from daemon.keeper import protocol as p
from daemon.model import ExitStatus

logger = log.get("keeper")
CONNECT_TRIES = 3
HELLO_TIMEOUT_S = 10.0
MAX_RESUMES = 3  # a job followed again after this many dropped connections is given up: something is wrong
READ_SIZE = 256 * 1024
_ROOT = str(Path(__file__).resolve().parents[2])  # where the `daemon` package is: the keeper imports only it
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from daemon.keeper.server import main; "
         "sys.exit(main(bytes.fromhex(sys.argv[2])))")
OutputCallback = Callable[[bytes], None]  # as executors.base's: where a job's bytes go as they come


class Capture(Protocol):
    """What the client needs of a stream's capture (daemon.output.StreamCapture): the bytes it has had, its cap;
    skipping what the keeper dropped, starting over. (Named by shape, not imported: the client stays below output.)"""

    @property
    def cap(self) -> int: ...

    @property
    def total(self) -> int: ...

    def skip(self, n: int) -> None: ...

    def reset(self) -> None: ...


class Captures(Protocol):
    """A job's two captures (daemon.output.JobOutput)."""

    @property
    def stdout(self) -> Capture: ...

    @property
    def stderr(self) -> Capture: ...


class KeeperLost(JobLost):
    """The keeper died while the job ran: the job's pipes died with it, and the rest of its output is lost."""


class AlreadyStarted(SpawnError):
    """The keeper runs (or ran) this very attempt already: a row that forgot its claim (its file was rewritten by
    another program, or restored from a backup) was claimed again with the same attempt number."""


class KeeperProcess:
    """A job the keeper runs for us (the executors.base.Process interface)."""

    detachable = True  # it runs on without this daemon: the next one attaches

    def __init__(self, client: KeeperClient, key: str, output: Captures, on_stdout: OutputCallback,
                 on_stderr: OutputCallback, *, spawned: bool) -> None:
        self._client = client
        self.handle = 0  # the client's name for it on the current connection, set when it is asked for
        self.key = key
        self._output = output
        self._on = (on_stdout, on_stderr)
        self._spawned = spawned  # started by this daemon's SPAWN (not found again by ATTACH)
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[int] = loop.create_future()
        self._exit: asyncio.Future[ExitStatus] = loop.create_future()
        self._pid: int | None = None
        self._unsent_signal: int | None = None  # asked while the connection was down: sent once it is back
        self._signalled: int | None = None  # the last signal this daemon sent it (a keeper before EXIT's SENT)
        self.resumed = 0  # how many times it was followed again over a new connection

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exited(self) -> bool:
        return self._exit.done()

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    def signal_group(self, signum: int) -> None:
        if self._exit.done():
            return
        self._signalled = signum
        if self._client.connected:
            self._client.send(p.frame(p.SIGNAL, self.handle, b"%d" % signum))
        else:
            self._unsent_signal = signum

    def forget(self, *, remove: bool) -> None:
        self._client.forget(self, remove=remove)

    def resume(self, handle: int) -> None:
        """Follow the job again over a new connection (the old one dropped, the keeper lives): the keeper sends
        what this daemon has not had yet, by the byte counts of its capture."""
        self.handle = handle
        self.resumed += 1
        offsets = (self._output.stdout.total, self._output.stderr.total)
        self._client.send(p.frame(p.ATTACH, handle, p.pack(self.key, *offsets)))
        if self._unsent_signal is not None:
            self._client.send(p.frame(p.SIGNAL, handle, b"%d" % self._unsent_signal))
            self._unsent_signal = None

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
            pid = int(payload)
            if pid <= 1:  # 0 is the group of whoever signals it, 1 init's: no job's
                raise p.ProtocolError(f"a job started as pid {pid}")
            self._pid = pid
            if not self.started.done():
                self.started.set_result(pid)
        elif kind == p.EXIT:
            if not self._exit.done():
                self._exit.set_result(self._exit_status([int(n) for n in payload.split()]))
        elif kind == p.TAKEN:  # another daemon adopted it (ours had lost its lease): ours no longer follows it
            if not self._exit.done():
                self._exit.set_exception(JobLost("another daemon took the job over"))
        elif kind in (p.FAILED, p.UNKNOWN):
            self._refused(kind, p.text(payload))

    def _exit_status(self, fields: list[int]) -> ExitStatus:
        """EXIT's CODE SIGNAL [SENT CPU_MS]: the keeper saw every daemon's signals; an older one says only what
        this daemon sent."""
        code, signum = fields[0], fields[1] or None
        if len(fields) < 4:
            return ExitStatus(code, signum, signalled=self._signalled)
        return ExitStatus(code, signum, signalled=fields[2] or None, cpu_s=fields[3] / 1000)

    def _refused(self, kind: int, error: str) -> None:
        if not self.started.done():  # a spawn the keeper never had (the connection dropped) could not start
            failed = kind == p.FAILED or self._spawned
            self.started.set_exception(JobLost(error) if not failed else
                                       AlreadyStarted(error) if error.endswith(p.STARTED_ALREADY) else
                                       SpawnError(error))
        elif kind == p.UNKNOWN and not self._exit.done():  # followed again, but the keeper holds it no more
            self._exit.set_exception(JobLost(error))

    def left(self, reason: str) -> None:
        """This daemon leaves the job to the keeper (it stops): whoever still waits learns it, nothing is killed."""
        for future in (self.started, self._exit):
            if not future.done():
                future.set_exception(JobLost(reason))
                future.exception()  # retrieved: a job nobody waits for any more must not warn

    def lost(self, reason: str, keeper_started: int | None) -> None:
        """The keeper is gone: what is left of the job is killed, and the job is lost. Only a session the keeper
        started (group and session id the pid, not older than the keeper) is killed: a pid is never signalled
        on a peer's word alone. Its start time is read only now (reading /proc/PID/stat of a process in execve
        waits for the exec: 0.14 ms a job, measured)."""
        killed = (self._pid is not None and not self._exit.done()
                  and procs.kill_session_group(self._pid, keeper_started))
        error = f"{reason}{'; its process group was killed' if killed else ''}"
        if not self.started.done():
            self.started.set_exception(SpawnError(error))
        if not self._exit.done():
            self._exit.set_exception(KeeperLost(error))
            self._exit.exception()  # retrieved: a job nobody waits for any more must not warn


class KeeperClient:
    def __init__(self, database: str, environment: Mapping[str, str]) -> None:
        self._address = p.address(database)
        self._environment = dict(environment)  # the keeper's: what every job sees anyway, none of the daemon's own
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting = anyio.Lock()
        self._frames = p.Frames()
        self._outbuf = bytearray()
        self._flush_scheduled = False
        self._writing = False
        self._jobs: dict[int, KeeperProcess] = {}
        self._next_handle = 1
        self._hello: asyncio.Future[list[str]] | None = None
        self._queries: dict[int, asyncio.Future[list[str]]] = {}
        self._resuming: asyncio.Task[None] | None = None  # connecting again to follow the jobs on
        self._impostor: tuple[int, int] | None = None  # (uid, pid) last found on the address: said once
        self.keeper_pid: int | None = None
        self._keeper_started: int | None = None  # its start time: tells it from a reuse of its pid

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def name(self) -> str:
        """The keeper's address as `ss -x` and /proc/net/unix show it."""
        return "@" + self._address[1:].decode()

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
                self._refuse_impostor(sock)
                if await self._greet(sock):
                    return
                problem = "it closed the connection at once (it was leaving)"
            raise SpawnError(f"cannot reach or start the job keeper: {problem}")

    def _refuse_impostor(self, sock: socket.socket) -> None:
        """The listener must be of our user: anyone can bind an abstract address, and whoever holds the keeper's
        would get every job's command and environment and could report any result. SpawnError if it is not."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid == os.getuid():
            return
        sock.close()
        if self._impostor != (uid, pid):
            self._impostor = (uid, pid)
            logger.error("keeper.impostor", uid=uid, pid=pid, address=self.name,
                         action="no job is sent to it; local jobs fail until it is gone")
        raise SpawnError(
            f"another user (uid {uid}, pid {pid}) holds the job keeper's address {self.name}: it is not this "
            f"daemon's keeper, so no job is sent to it. Stop that process (as root: kill {pid}) and find out why "
            "that user took the address; once it is free, this daemon starts its own keeper")

    def _start_keeper(self) -> str:
        """Run a keeper (it binds the address, says `ready` and leaves us: a second fork); the reason if it failed.
        It gets the jobs' environment, not the daemon's: every job is its child and may read its environ."""
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT, _ROOT, self._address.hex()],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
                                    close_fds=True, env=self._environment)
        except OSError as e:
            return f"cannot run {sys.executable}: {e}"
        assert proc.stdout is not None
        with proc.stdout:
            line = proc.stdout.readline().decode(errors="replace").strip()
        proc.wait()
        if line == "ready":
            logger.info("keeper.started")
            return "it started but did not answer"
        if line == "busy":  # bound, but nobody accepts: not a keeper (`ss -xlp` names the process, as root)
            return f"its address {self.name} is taken by a process that does not accept connections (ss -xlp)"
        return line.removeprefix("error ") or f"it exited with status {proc.returncode}"

    async def _greet(self, sock: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        self._loop, self._sock = loop, sock
        self._frames.clear()
        self._hello = loop.create_future()
        loop.add_reader(sock, self._on_readable)
        self.send(p.frame(p.HELLO, 0, p.pack(p.VERSION, p.EXIT_WHO)))
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._hello), HELLO_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            self._disconnect("the job keeper did not answer")
            return False
        self.keeper_pid = int(hello[1])
        self._keeper_started = procs.start_time(self.keeper_pid)
        self._impostor = None
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

    async def spawn(self, key: str, argv: list[str], env: dict[str, str], cwd: str, output: Captures,
                    on_stdout: OutputCallback, on_stderr: OutputCallback, drain_s: float) -> KeeperProcess:
        if self._sock is None:
            await self.connect()
        variables = [f"{name}={value}" for name, value in env.items()]
        if p.has_nul(key, cwd, *argv, *variables):
            raise SpawnError("an argument, a variable or the working directory holds a NUL byte: no program can "
                             "be given one")
        payload = p.pack(key, output.stdout.cap, drain_s, cwd, len(argv), *argv, *variables)
        return await self._request(p.SPAWN, payload, KeeperProcess(self, key, output, on_stdout, on_stderr,
                                                                   spawned=True))

    async def attach(self, key: str, output: Captures, on_stdout: OutputCallback,
                     on_stderr: OutputCallback) -> KeeperProcess:
        """Follow again an attempt the keeper holds; JobLost if it holds none. `output` starts over from the first
        byte, whatever a row said: the keeper holds the head and the tail the row keeps, so reading them again is
        exact, where going on from a row's byte count would not be past the cap (a character split at the row's
        last flush was held back from its text but counted in its total)."""
        await self.connect()
        output.stdout.reset()
        output.stderr.reset()
        process = KeeperProcess(self, key, output, on_stdout, on_stderr, spawned=False)
        return await self._request(p.ATTACH, p.pack(key, 0, 0), process)

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle = handle + 1 if handle < 0xFFFFFFFF else 1
        return handle

    async def _request(self, kind: int, payload: bytes, process: KeeperProcess) -> KeeperProcess:
        """Send a SPAWN or an ATTACH for `process` under a new handle; it is followed once the keeper says it
        started (an error, or this daemon giving up waiting, lets go of it)."""
        process.handle = handle = self._handle()
        self._jobs[handle] = process
        self.send(p.frame(kind, handle, payload))
        try:
            await process.started
        except BaseException:
            self._jobs.pop(handle, None)
            raise
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
            self._disconnect(None)
            return
        try:
            for kind, handle, payload in self._frames.feed(data):
                if payload is None:
                    raise p.ProtocolError(f"a frame bigger than {p.MAX_PAYLOAD} bytes")
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

    def _disconnect(self, reason: str | None) -> None:
        """The connection is gone (None: the keeper closed it). If the keeper still runs, connect again and follow
        its jobs on; if it died, they die too."""
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
                query.set_exception(SpawnError(reason or "the job keeper closed the connection"))
        if not self._jobs or self._resuming is not None:
            return  # nothing to follow, or already connecting again for them
        gone = reason or f"the job keeper (pid {self.keeper_pid}) stopped while the job was running"
        if self._keeper_runs():  # it may be exiting still: connecting again tells
            logger.warning("keeper.disconnected", keeper_pid=self.keeper_pid, jobs=len(self._jobs),
                           reason=reason or "it closed the connection", action="connecting again; its jobs run on")
            self._resuming = self._loop.create_task(self._resume(gone, set(self._jobs)))
        else:
            self._lose(gone, self._keeper_started, set(self._jobs))

    def _keeper_runs(self) -> bool:
        found = procs.stat(self.keeper_pid) if self.keeper_pid is not None else None
        return found is not None and found.state != "Z" and found.start_time == self._keeper_started

    async def _resume(self, gone: str, handles: set[int]) -> None:
        """Connect again to the keeper that still runs and follow the jobs of `handles` on; if it is gone
        meanwhile (or cannot be reached), they are lost (`gone` says why)."""
        keeper = (self.keeper_pid, self._keeper_started)
        try:
            await self.connect()
        except SpawnError as e:
            if self._keeper_runs():
                gone = f"the connection to the job keeper (pid {keeper[0]}) dropped; connecting again failed: {e}"
        finally:
            self._resuming = None
        if not self.connected or (self.keeper_pid, self._keeper_started) != keeper:  # a new keeper holds none
            self._lose(gone, keeper[1], handles)
            return
        handles &= set(self._jobs)  # not those let go of meanwhile
        worn = {handle for handle in handles if self._jobs[handle].resumed >= MAX_RESUMES}
        if worn:
            self._lose(f"the connection to the job keeper (pid {keeper[0]}) dropped {MAX_RESUMES + 1} times: this "
                       "daemon gave up following the job", keeper[1], worn)
        for handle in handles - worn:
            process = self._jobs.pop(handle)
            self._jobs[new := self._handle()] = process
            process.resume(new)
        logger.info("keeper.reconnected", keeper_pid=self.keeper_pid, jobs=len(handles - worn))

    def _lose(self, reason: str, keeper_started: int | None, handles: set[int]) -> None:
        jobs = [self._jobs.pop(handle) for handle in handles if handle in self._jobs]
        logger.error("keeper.lost", keeper_pid=self.keeper_pid, jobs=len(jobs), reason=reason)
        for process in jobs:
            process.lost(reason, keeper_started)

    def close(self) -> None:
        """Leave the keeper: the jobs it holds for us run on (a stopping daemon that detached them). Our last
        FORGETs get a second at most: a keeper stopped with SIGSTOP must not hold the daemon's exit."""
        if self._resuming is not None:
            self._resuming.cancel()
        sock, self._sock = self._sock, None
        if sock is not None:
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
