"""The keeper process: spawn local jobs, be their parent (a child subreaper), read their pipes, keep their exit
status until a daemon has recorded it. One thread, one selector; standard library only (it runs with -I -S).

A job never waits for a daemon: its pipes are read at once into a capped head and tail (Spool), whoever is
connected, and sent to the daemon that owns the job as fast as its socket takes them. The keeper leaves when no
daemon is connected and it holds no job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import time

from daemon.keeper import protocol as p

# typing costs the keeper 1.7 MiB of RSS; annotations are strings here (PEP 563), so only type checkers need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any

READ_SIZE = 256 * 1024
SEND_BACKLOG = 1024 * 1024  # stop taking output off the spools for a daemon whose socket holds this much
IDLE_EXIT_S = 2.0  # no daemon connected and no job held for this long: the keeper leaves
BIG_OUTPUT_BYTES = 1024 * 1024  # as output.BIG_OUTPUT_BYTES and MMAP_THRESHOLD_BYTES
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NAME = 15
_PR_SET_DUMPABLE = 4
_M_MMAP_THRESHOLD = -3
# Signals meant for the daemon (a terminal's, a service manager's, a stray `kill -USR1`) whose default action would
# kill the keeper and every job it holds: ignored.
_IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# Python ignores SIGPIPE and SIGXFSZ, the keeper the above: a job starts with the defaults.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, *_IGNORED_SIGNALS)


class Spool:
    """One stream of one job: the first `cap` + 1 bytes and (lazily trimmed) the last `cap - cap//4`."""

    def __init__(self, cap: int) -> None:
        self.head_len = cap + 1
        self.tail_cap = cap - cap // p.HEAD_SHARE
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_len - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    def next_piece(self, offset: int) -> tuple[bytes, int]:
        """What to send a reader that has `offset` bytes: (bytes, 0), or (b"", n) to skip n bytes to the tail."""
        if offset < len(self.head):
            return bytes(self.head[offset: offset + p.DATA_CHUNK]), 0
        tail_start = self.total - len(self.tail)
        if offset < tail_start:
            return b"", tail_start - offset
        at = offset - tail_start
        return bytes(self.tail[at: at + p.DATA_CHUNK]), 0


class Job:
    def __init__(self, key: str, pid: int, cap: int, fds: tuple[int, int], drain_s: float) -> None:
        self.key = key
        self.pid = pid
        self.spools = (Spool(cap), Spool(cap))
        self.fds: dict[int, int] = {fds[0]: 0, fds[1]: 1}  # pipe fd -> stream index
        self.drain_s = drain_s
        self.status: tuple[int, int | None] | None = None  # (code as the shell says it, signal)
        self.signalled = 0  # the last signal sent to its group while it ran (for a daemon, or by the keeper itself)
        self.cpu_ms = 0  # its main process's CPU time, known once reaped
        self.drain_deadline: float | None = None
        self.done = False  # status known and output all read
        self.owner: Conn | None = None
        self.handle = 0  # the owner's name for it
        self.sent = [0, 0]
        self.exit_sent = False
        self.removed = False  # its row is final: it goes as soon as it has ended
        # Spawned by subprocess (no POSIX_SPAWN_SETSID): kept, and its returncode set when we reap it, so that
        # subprocess never waits for it itself (a Popen dropped unreaped goes to subprocess._active, whose
        # clean-up at the next Popen would reap our jobs' exits before we see them).
        self.popen: subprocess.Popen[bytes] | None = None


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = p.Frames()
        self.outbuf = bytearray()
        self.jobs: dict[int, Job] = {}  # by handle
        self.hello = False
        self.exit_who = False  # the daemon reads EXIT's SENT and CPU_MS


class Keeper:
    def __init__(self, listener: socket.socket) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = listener
        self.jobs: dict[str, Job] = {}
        self.by_pid: dict[int, Job] = {}
        self.conns: set[Conn] = set()
        self.dirty: set[Job] = set()  # output or status to send
        self.draining: set[Job] = set()
        self.uid = os.getuid()
        self.can_setsid = True
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        rsig, self.wsig = socket.socketpair()
        rsig.setblocking(False)
        self.wsig.setblocking(False)
        self.rsig = rsig
        signal.set_wakeup_fd(self.wsig.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(rsig, selectors.EVENT_READ, self._reap)

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        idle_since = time.monotonic()
        while True:
            now = time.monotonic()
            if self.conns or self.jobs:
                idle_since = now
            elif now - idle_since >= IDLE_EXIT_S:
                return
            deadlines = [drain.drain_deadline or now for drain in self.draining]
            if not (self.conns or self.jobs):
                deadlines.append(idle_since + IDLE_EXIT_S)
            self._turn(max(0.0, min(deadlines) - now) if deadlines else None)

    def _turn(self, timeout: float | None) -> None:
        """One turn of the loop. Its own function: a job left in a local variable of run() (the last key's
        callback, the last job pumped) would keep a finished job's buffers (up to 2.5x the cap per stream) alive
        while the keeper sleeps."""
        self._handle(self.sel.select(timeout))
        self._end_drains()
        for job in list(self.dirty):
            self._pump(job)
        for conn in list(self.conns):
            self._flush(conn)

    @staticmethod
    def _handle(events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            try:
                key.data(key.fileobj, mask)
            except Exception as e:  # a bug must not take the running jobs down with the keeper: say it, go on
                # Not the traceback module: it costs a MiB, and importing it needs a free fd (EMFILE is likely).
                where = e.__traceback__
                while where is not None and where.tb_next is not None:
                    where = where.tb_next
                line = f" (line {where.tb_lineno} of {where.tb_frame.f_code.co_name})" if where else ""
                _log(f"internal error, the keeper goes on: {e!r}{line}")

    # -- daemons ----------------------------------------------------------------------------------------------

    def _accept(self, _obj: Any, _mask: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE: the daemon's connect waits in the backlog; jobs go on
                _log(f"cannot accept a daemon's connection: {e}")
                return
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != self.uid:  # an abstract socket is open to every user: serve only ours
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock)
            self.conns.add(conn)
            self.sel.register(sock, selectors.EVENT_READ, lambda _o, m, c=conn: self._on_conn(c, m))

    def _on_conn(self, conn: Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        for kind, handle, payload in conn.frames.feed(data):
            try:
                if payload is None:  # its bytes were dropped as they came: only this request fails
                    raise p.ProtocolError(f"a request bigger than {p.MAX_PAYLOAD} bytes")
                self._request(conn, kind, handle, payload)
            except (p.ProtocolError, ValueError, KeyError, TypeError, IndexError, OSError) as e:  # that one fails
                _log(f"a request of kind {kind} refused: {e!r}")
                self._send(conn, p.frame(p.FAILED, handle, f"the job keeper refused the request: {e!r}".encode()))

    def _drop(self, conn: Conn) -> None:
        """The daemon stopped (or died): its jobs run on, owned by nobody until the next daemon attaches."""
        for job in conn.jobs.values():
            if job.owner is conn:
                job.owner = None
        conn.jobs.clear()
        self.conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()

    def _request(self, conn: Conn, kind: int, handle: int, payload: bytes) -> None:
        if kind == p.HELLO:
            conn.hello = True
            conn.exit_who = p.EXIT_WHO in p.unpack(payload)[1:]
            self._send(conn, p.frame(p.HELLO, 0, p.pack(p.VERSION, os.getpid(), *sorted(self.jobs))))
            return
        if not conn.hello:
            raise p.ProtocolError("no HELLO first")
        if kind in (p.SIGNAL, p.FORGET):
            self._about_job(conn, kind, handle, int(payload))
            return
        fields = p.unpack(payload)
        if kind == p.SPAWN:
            self._spawn(conn, handle, fields)
        elif kind == p.ATTACH:
            self._attach(conn, handle, fields[0], [int(fields[1]), int(fields[2])])
        elif kind == p.HOLDS:
            held = sorted(self.jobs) if not fields else [k for k in fields if k in self.jobs]  # none named: all
            self._send(conn, p.frame(p.HOLDS, handle, p.pack(*held)))
        else:
            raise p.ProtocolError(f"a frame of kind {kind}")

    def _about_job(self, conn: Conn, kind: int, handle: int, value: int) -> None:
        job = conn.jobs.get(handle)
        if job is None or job.owner is not conn:
            return
        if kind == p.SIGNAL:
            self._signal(job, value)
            return
        del conn.jobs[handle]
        job.owner = None
        if value:
            self._remove(job)

    def _send(self, conn: Conn, data: bytes) -> None:
        conn.outbuf += data

    def _flush(self, conn: Conn) -> None:
        if conn not in self.conns:
            return
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(conn)
                return
            del conn.outbuf[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        if self.sel.get_key(conn.sock).events != events:
            self.sel.modify(conn.sock, events, self.sel.get_key(conn.sock).data)
        if len(conn.outbuf) < SEND_BACKLOG:  # room again: jobs held back for this daemon go on
            for job in conn.jobs.values():
                if job.owner is conn and not job.exit_sent:
                    self.dirty.add(job)

    # -- jobs ---------------------------------------------------------------------------------------------------

    def _spawn(self, conn: Conn, handle: int, fields: list[str]) -> None:
        key, cap, drain_s, cwd, argc = fields[0], int(fields[1]), float(fields[2]), fields[3], int(fields[4])
        if key in self.jobs:
            self._send(conn, p.frame(p.FAILED, handle, f"attempt {key} {p.STARTED_ALREADY}".encode()))
            return
        argv = fields[5:5 + argc]
        env = dict(entry.split("=", 1) for entry in fields[5 + argc:])
        fds: list[int] = []
        try:
            fds += os.pipe()
            fds += os.pipe()  # out_r, out_w, err_r, err_w
            pid, popen = self._start(argv, env, cwd, fds[1], fds[3])
        except (OSError, ValueError) as e:  # EMFILE, a failed exec; ValueError: a NUL byte in an argument
            for fd in fds:
                os.close(fd)
            self._send(conn, p.frame(p.FAILED, handle, _spawn_error(argv[0], cwd, e).encode()))
            return
        os.close(fds[1])
        os.close(fds[3])
        out_r, err_r = fds[0], fds[2]
        job = Job(key, pid, cap, (out_r, err_r), drain_s)
        job.popen = popen
        self.jobs[key] = job
        self.by_pid[pid] = job
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, lambda fd_, _m, j=job: self._read(j, fd_))
        job.owner, job.handle = conn, handle
        conn.jobs[handle] = job
        self._send(conn, p.frame(p.STARTED, handle, b"%d" % pid))

    def _start(self, argv: list[str], env: dict[str, str], cwd: str, out_w: int, err_w: int
               ) -> tuple[int, subprocess.Popen[bytes] | None]:
        """posix_spawn (a vfork: its cost does not grow with this process), in the job's directory: this thread is
        the only one, so it changes directory for the spawn and comes back."""
        os.chdir(cwd)
        try:
            if self.can_setsid:
                try:
                    return os.posix_spawn(argv[0], argv, env, setsid=True, setsigdef=_RESET_SIGNALS,
                                          file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                                        (os.POSIX_SPAWN_DUP2, out_w, 1),
                                                        (os.POSIX_SPAWN_DUP2, err_w, 2)]), None
                except NotImplementedError:  # a C library without POSIX_SPAWN_SETSID
                    self.can_setsid = False
            import subprocess  # only where posix_spawn cannot start a session

            popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                     start_new_session=True, preexec_fn=_default_signals)
            return popen.pid, popen
        finally:
            os.chdir("/")

    def _read(self, job: Job, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            job.spools[job.fds[fd]].feed(data)
            self.dirty.add(job)
        else:
            self._close_pipe(job, fd)

    def _close_pipe(self, job: Job, fd: int) -> None:
        self.sel.unregister(fd)
        os.close(fd)
        del job.fds[fd]
        if not job.fds and job.status is not None:
            self._finish(job)

    def _reap(self, _obj: Any, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.rsig.recv(4096):
                pass
        while True:
            try:
                pid, wait_status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.by_pid.pop(pid, None)
            if job is None:
                continue  # a job's child that was orphaned to us (we are the subreaper): reaped, nothing more
            job.cpu_ms = round((usage.ru_utime + usage.ru_stime) * 1000)
            if os.WIFSIGNALED(wait_status):
                sig = os.WTERMSIG(wait_status)
                job.status = (128 + sig, sig)
            else:
                job.status = (os.waitstatus_to_exitcode(wait_status), None)
            if job.popen is not None:
                job.popen.returncode = job.status[0]
            if not job.fds:
                self._finish(job)
            else:  # children left in its group may hold the pipes: they get drain_s to finish writing
                job.drain_deadline = time.monotonic() + job.drain_s
                self.draining.add(job)

    def _end_drains(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.draining if (j.drain_deadline or 0.0) <= now]:
            self._kill_group(job)
            for fd in list(job.fds):  # what is still in the pipes, without waiting
                with contextlib.suppress(OSError):
                    while data := os.read(fd, READ_SIZE):
                        job.spools[job.fds[fd]].feed(data)
                self._close_pipe(job, fd)

    def _finish(self, job: Job) -> None:
        """Status known, output all read. The job ends with its main process: nothing it left in its group
        outlives it unrecorded. (The leader is reaped already; its group id is not reused while a member lives.)"""
        self.draining.discard(job)
        self._kill_group(job)
        job.done = True
        if job.removed:
            self.jobs.pop(job.key, None)
        else:
            self.dirty.add(job)

    def _kill_group(self, job: Job) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, signal.SIGKILL)

    def _signal(self, job: Job, signum: int) -> None:
        if job.done:
            return
        if job.status is None:  # still running: its end may be this signal's
            job.signalled = signum
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, signum)

    def _attach(self, conn: Conn, handle: int, key: str, offsets: list[int]) -> None:
        job = self.jobs.get(key)
        if job is None:
            self._send(conn, p.frame(p.UNKNOWN, handle, f"the job keeper holds no attempt {key}".encode()))
            return
        if job.owner is not None and job.owner is not conn:  # taken over: the old owner hears no more of it
            job.owner.jobs.pop(job.handle, None)
            self._send(job.owner, p.frame(p.TAKEN, job.handle))
        job.owner, job.handle = conn, handle
        job.sent = [int(offsets[0]), int(offsets[1])]
        job.exit_sent = False
        conn.jobs[handle] = job
        self._send(conn, p.frame(p.STARTED, handle, b"%d" % job.pid))
        self.dirty.add(job)

    def _pump(self, job: Job) -> None:
        """Send the owner what it does not have yet, as far as its socket takes it; then the exit status."""
        conn = job.owner
        if conn is None:
            self.dirty.discard(job)
            return
        for stream, spool in enumerate(job.spools):
            while job.sent[stream] < spool.total and len(conn.outbuf) < SEND_BACKLOG:
                data, skip = spool.next_piece(job.sent[stream])
                if skip:
                    self._send(conn, p.frame(p.SKIP, job.handle, p.pack(stream + 1, skip)))
                    job.sent[stream] += skip
                else:
                    self._send(conn, p.frame(p.DATA_OUT if stream == 0 else p.DATA_ERR, job.handle, data))
                    job.sent[stream] += len(data)
        if any(job.sent[s] < job.spools[s].total for s in (0, 1)):
            return  # held back: the owner's socket is full; _flush puts it back
        self.dirty.discard(job)
        if job.done and not job.exit_sent:
            assert job.status is not None
            who = b" %d %d" % (job.signalled, job.cpu_ms) if conn.exit_who else b""
            self._send(conn, p.frame(p.EXIT, job.handle, b"%d %d%s" % (job.status[0], job.status[1] or 0, who)))
            job.exit_sent = True

    def _remove(self, job: Job) -> None:
        if not job.done:  # the row is final while it runs (a daemon gave up on it): it is stopped, then goes
            job.removed = True
            if job.status is None:
                job.signalled = signal.SIGKILL
            self._kill_group(job)
            return
        self.jobs.pop(job.key, None)
        if sum(spool.total for spool in job.spools) >= BIG_OUTPUT_BYTES:
            _libc_call("malloc_trim", 0)  # its buffers are free: give the heap's free pages back


def _default_signals() -> None:
    """In the child, before exec (subprocess restores only SIGPIPE and SIGXFSZ): this process has one thread."""
    for signum in _RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def _spawn_error(program: str, cwd: str, e: OSError | ValueError) -> str:
    if not isinstance(e, OSError):
        return f"cannot start {program!r}: {e}"
    if e.filename == cwd and e.errno == errno.EACCES:
        return f"permission denied entering working directory {cwd!r}"
    if e.filename == cwd or (e.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.isdir(cwd)):
        return f"working directory {cwd!r} does not exist or is not a directory"
    if e.errno == errno.ENOENT:
        return f"{program!r} cannot be found any more; install it or fix PATH"
    if e.errno == errno.EACCES:
        return f"permission denied starting {program!r} in {cwd!r}: {e.strerror}"
    return f"cannot start {program!r}: {e.strerror or e}"


def _log(message: str) -> None:
    """To syslog (the journal, under systemd): not to the stderr of the daemon that started the keeper, which the
    keeper does not keep (a pipe held open by it would never see EOF: a log reader, a caller's capture)."""
    with contextlib.suppress(Exception):
        import syslog  # only when there is something to say

        syslog.openlog(f"nexus-jobd-keeper[{os.getpid()}]", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, message)


def _libc_call(name: str, *args: int | bytes) -> None:
    """A C library function where there is one (glibc, bionic, musl differ): nothing where there is none."""
    with contextlib.suppress(OSError, AttributeError):
        getattr(ctypes.CDLL(None), name)(*args)


def main(address: bytes) -> int:
    """Bind the keeper's socket (only one keeper can), tell the daemon that started us on stdout, and serve. The
    daemon waits for that line; the keeper then leaves its parent (a second fork), so that no daemon has it as a
    child to reap or to take down."""
    # Jobs are our children, of our user: not dumpable, so that none reads our memory (every job's environment
    # and output pass through it) or /proc/PID/environ. Each job's exec makes it dumpable again.
    _libc_call("prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
    except OSError as e:
        print("busy" if e.errno == errno.EADDRINUSE else f"error cannot bind the keeper's socket: {e}", flush=True)
        return 0 if e.errno == errno.EADDRINUSE else 1
    listener.listen(64)
    if os.fork():
        print("ready", flush=True)
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _libc_call("prctl", _PR_SET_NAME, b"nexus-jobd-keep", 0, 0, 0)  # what ps -o comm and pgrep see
    _libc_call("prctl", _PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # a job's orphaned children come to us: we reap them
    # As the daemon does (output.map_big_blocks_apart): big buffers get mappings of their own, given back when
    # freed, instead of glibc raising its threshold and carving them out of a heap that small blocks then pin.
    _libc_call("mallopt", _M_MMAP_THRESHOLD, BIG_OUTPUT_BYTES)
    for signum in _IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    os.chdir("/")
    Keeper(listener).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(bytes.fromhex(sys.argv[1])))
