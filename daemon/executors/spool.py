"""The node's side of a detached SSH job, as POSIX sh: start it with its output in spool files, read the spools by
byte offset, and the frames the reader answers with.

Each attempt has a private directory `$HOME/.cache/nexus-jobd/jobs/<name>` (0700, files 0600) holding `out` and
`err` (the job's streams), `pid` (its process group, as the kill script reads it, and the wrapper's pid) and `rc`
(its exit status, written when it ends). Nothing needs more than sh and coreutils/busybox; `fallocate` (util-linux)
is used, where present, to give back the disk space of what no reader will ask for again (see _reader_loop).
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from daemon.model import Command
from daemon.output import HEAD_SHARE
from daemon.tools import with_limits

JOBS_DIR = "$HOME/.cache/nexus-jobd/jobs"
PUNCH_STEP = 1024 * 1024  # give spool space back in steps of at least this much: one fork per step
MAX_HEADER = 4096  # a frame header longer than this is a node speaking another protocol
# No spool holds more (8 PiB): a count a node sends past it is a lie, and the byte totals, which the row records,
# stay far inside the 64-bit integers of SQLite and PostgreSQL.
MAX_SPOOL_BYTES = 2**53

# The leader's start time (field 22 of /proc/PID/stat; the shell's name has no spaces) and the node's boot id tell
# a reused pid apart. On a node without /proc both are "-" and the checks pass as before.
_STARTED = "$(cut -d' ' -f22 /proc/{pid}/stat 2>/dev/null)"
_BOOT_ID = "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
# The same with builtins only (no fork: the fast path pays for every process it starts). `st PID` sets t (start
# time) and z (state: Z for a zombie); after ") " the fields start at the third, so the 22nd is the 20th.
_ST_FN = ('st() { t=; z=; l=; read -r l 2>/dev/null < "/proc/$1/stat" || return 0; l=${l##*") "}; set -- $l; '
          'z=$1; t=${20}; }; ')


def dir_name(key: str) -> str:
    """The directory of one attempt (`key` is "<job id>:<attempt>"): found again from the row alone."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def job_dir(name: str) -> str:
    return f"{JOBS_DIR}/{name}"


def kill_script(name: str, signum: int, *, remove: bool = False) -> str:
    """Signal the recorded group: only in the same boot, and only if its leader is gone (the group id stays
    reserved while members live) or is still the same process. `kill -N -PGID`: dash refuses `kill -N -- -PGID`.
    `remove`: the directory goes too (the job's row is final)."""
    same_leader = f'{{ [ ! -e "/proc/$p" ] || {{ t={_STARTED.format(pid="$p")}; [ "$s" = "${{t:--}}" ]; }}; }}'
    d = job_dir(name)
    script = (f'f="{d}/pid"; if [ -s "$f" ]; then read -r p s b rest < "$f"; c={_BOOT_ID}; '
              f'[ "$b" = "${{c:--}}" ] && {same_leader} && kill -{int(signum)} -"$p" 2>/dev/null; fi; ')
    return script + (f'rm -rf "{d}"; true' if remove else "true")


def remove_script(*names: str) -> str:
    """Remove the directories of attempts whose rows are final (names are hex: nothing to quote)."""
    return "rm -rf " + " ".join(f'"{job_dir(name)}"' for name in names) + " 2>/dev/null"


def env_message(env: Mapping[str, str | None]) -> bytes:
    """The job's variables as they travel: over the channel's stdin, never in a command line (every user of the
    node may read those, `ps`). The count of lines, then sh lines that set or unset each one (names are
    `[A-Za-z_][A-Za-z0-9_]*`, tools.parse_env: only values need quoting); READ_ENV takes them."""
    lines = "".join(f"unset {name}\n" if value is None else f"export {name}={shlex.quote(value)}\n"
                    for name, value in env.items())
    return f"{lines.count(chr(10))}\n{lines}".encode()


# Before anything else: the variables into `E` (a shell variable: in no file, no command line, no environment),
# byte by byte as `read` takes a pipe, so not one byte of the requests that follow is consumed. Whatever does not
# arrive whole (a dropped link) starts nothing.
READ_ENV = ('n=; read -r n || exit 0; case $n in ""|*[!0-9]*) echo "X the variables did not arrive"; exit 0;; esac; '
            'E=; while [ "$n" -gt 0 ] && IFS= read -r l; do E="$E$l\n"; n=$((n - 1)); done; [ "$n" = 0 ] || exit 0; ')


def with_env(argv: tuple[str, ...]) -> str:
    """Run argv with the variables READ_ENV took, in a subshell: the caller's shell keeps its own."""
    return f'( eval "$E"; exec {shlex.join(argv)} )'


def node_dir(path: str | None) -> str:
    """A directory on the node as a shell word: None and `~/...` under its user's home; a relative one (a row's
    cwd) from the current directory, as `./...`: `cd -`, `cd -L` are options, and CDPATH would be searched."""
    if path is None or path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path if path.startswith("/") else f"./{path}")


def start_script(command: Command, name: str, cap: int) -> str:
    """Take the variables (env_message), create the directory (only once: a second start of the same attempt is
    refused, so it never runs twice), start the job in the background with its output in the spools, record where
    it runs, then read (reader_loop).

    The job starts in its node's default directory (the user's home unless [nodes.X] default_cwd says), then its
    row's cwd: never in the spool, which goes with the row. The wrapper subshell catches TERM/INT/HUP (a caught
    signal is reset to the default in the job, an ignored one would not be) so that it outlives a TERM of the
    group and records 128+N; after a KILL there is no status and the reader says the job is gone. The status is
    one short write of "N\\n": readers take an empty or unterminated file for "not yet" (an mv would cost a process
    per job). Then the wrapper pokes the start channel's stderr (fd 4, closed for the job itself), so the daemon
    asks at once instead of polling for the end of a short job: "E N" when both spools are empty (status N, and
    nothing to read: no round trip at all), an empty line otherwise. Over a dropped channel that write fails,
    after the status is safe.
    """
    cd = f"cd {node_dir(command.default_cwd)}" + (f" && cd {node_dir(command.cwd)}" if command.cwd else "")
    run = with_env(with_limits(command.argv, command.limits))
    wrapper = (f'( trap : TERM INT HUP; {{ {cd}; }} 2>>"$d/err" || {{ echo 127 > "$d/rc"; echo >&4; exit; }}; '
               f'{run} </dev/null >>"$d/out" 2>>"$d/err" 4>&-; r=$?; echo $r > "$d/rc"; '
               'if [ -s "$d/out" ] || [ -s "$d/err" ]; then echo >&4; else echo "E $r" >&4; fi '
               ') 4>&2 </dev/null >/dev/null 2>&1 & w=$!; ')
    return (READ_ENV + f'umask 077; J="{JOBS_DIR}"; d="$J/{name}"; '
            'mkdir "$d" 2>/dev/null || { mkdir -p "$J" 2>/dev/null && mkdir "$d" 2>/dev/null; } || '
            '{ echo "X the job directory $d exists already or cannot be created: the attempt is not started '
            'twice"; exit 0; }; cd "$d" || exit 0; : > out; : > err; '
            + wrapper + _ST_FN
            + 'st $$; s=${t:--}; st $w; ws=${t:--}; b=; read -r b 2>/dev/null < /proc/sys/kernel/random/boot_id; '
            'echo "$$ $s ${b:--} $w $ws" > pid; ' + _reader_loop(cap))


def reader_script(name: str, cap: int) -> str:
    """Attach to a started attempt again (after a dropped link or by another daemon)."""
    return (f'd="{job_dir(name)}"; cd "$d" 2>/dev/null || {{ echo "X the job directory $d is gone from the node"; '
            'exit 0; }; ' + _ST_FN
            + 'p=; s=; b=; w=; ws=; read -r p s b w ws 2>/dev/null < pid; c=; '
            'read -r c 2>/dev/null < /proc/sys/kernel/random/boot_id; [ "$b" = "${c:--}" ] || w=; '
            + _reader_loop(cap))


def _reader_loop(cap: int) -> str:
    """One reply per request line `O E` (the bytes the daemon has of each stream), until the end of its input
    (the daemon has what it needs, or the link dropped: either way the directory stays until the row is final,
    and the daemon removes it then). The order is what makes it exact: is the wrapper alive, then is there a
    status, then how big are the spools. A status found means everything before it is in the spools, so the reply
    that carries it carries all the output; no status and no wrapper means the job was killed.

    The daemon keeps of each stream its first `cap` + 1 bytes (the head, frozen past the cap) and its last `tail`
    (output.StreamCapture), so that is all a reader ever sends: past the head, a reader far behind skips to the
    tail (`K` frame). What lies between no reader will ask for again, whichever daemon and whatever offsets: it is
    given back to the filesystem (a hole punched, offsets unchanged), so the spool's disk use stays near the cap.
    A job whose spools grow past that gets a trimmer on the node (one per job, a `trim` file says it runs) that
    punches every 20 ms (backing off to 1 s while there is nothing to punch) until the job ends: a fast writer
    outruns any round trip to the daemon, and the spool stays bounded while no daemon reads too.
    """
    head, tail = cap + 1, cap - cap // HEAD_SHARE
    start = (head + 4095) // 4096 * 4096  # holes are punched whole blocks after the head
    alive = ('alive() { [ -n "$w" ] || return 1; if [ -d /proc/self ]; then st "$w"; [ -n "$t" ] && '
             '[ "$t" = "$ws" ] && [ "$z" != Z ]; else kill -0 "$w" 2>/dev/null; fi; }; ')
    piece = ('piece() { n=$(($4 - $3)); [ "$n" -gt 0 ] || return 0; echo "D$1 $n"; '
             'tail -c +$(($3 + 1)) "$2" | head -c "$n"; }; ')
    send = ('send() { [ "$4" -ge "$3" ] || { echo "X the $2 spool in $d holds $4 bytes, fewer than the $3 already '
            f'read: it shrank or was replaced"; return 1; }}; k=$3; if [ "$k" -lt {head} ]; then m=$4; '
            f'[ "$m" -le {head} ] || m={head}; piece $1 $2 "$k" "$m"; k=$m; fi; '
            f'if [ $(($4 - k)) -gt {tail} ]; then echo "K$1 $(($4 - k - {tail}))"; k=$(($4 - {tail})); fi; '
            'piece $1 $2 "$k" "$4"; }; ')
    # `punch FILE SIZE FROM [LIMIT-FILE]`: the trimmer passes the file where a reader that is sending has put the
    # offset it sends from (or nothing, while none sends), and never punches past it: the reader measured the spool
    # before the trimmer's own measure or after it wrote that file, so it never reads a range being punched.
    punch = (f'punch() {{ q=$3; t=$((($2 - {tail}) / 4096 * 4096)); l=; [ -n "$4" ] && [ -s "$4" ] && '
             'read -r l < "$4"; [ -n "$l" ] && [ "$l" -lt "$t" ] 2>/dev/null && t=$((l / 4096 * 4096)); '
             f'if [ $((t - q)) -ge {PUNCH_STEP} ]; then fallocate -p -o "$q" -l $((t - q)) "$1" '
             '2>/dev/null && q=$t; fi; }; ')  # no hole punched (busybox: no -p): q stays, the trimmer backs off
    # The trimmer's pause doubles (0.02 s to 1 s) while there is nothing to punch: a job that wrote much once
    # and then runs quietly costs a few processes a second, not fifty.
    trim = ('trim() { set -C; { : > trim; } 2>/dev/null || { set +C; return 0; }; set +C; '
            '( exec </dev/null >/dev/null 2>&1; tp=$po; te=$pe; y=0.02; while alive && [ ! -s rc ]; do '
            'set -- $(wc -c out err); punch out "$1" "$tp" lo; a1=$q; punch err "$3" "$te" le; a2=$q; '
            'if [ "$a1" != "$tp" ] || [ "$a2" != "$te" ]; then y=0.02; else case $y in 0.02) y=0.05;; '
            '0.05) y=0.1;; 0.1) y=0.2;; 0.2) y=0.5;; *) y=1;; esac; fi; tp=$a1; te=$a2; '
            'sleep $y || sleep 1; done; rm -f trim ) & }; ')
    loop = (f'trap "" TERM INT HUP; po={start}; pe={start}; '
            'while read -r o e; do '
            'case "$o.$e" in *[!0-9.]*|.*|*.) echo "X bad request"; exit 0;; esac; echo "$o" > lo; echo "$e" > le; '
            'a=0; alive && a=1; r=; [ -s rc ] && read -r r < rc; '
            # Empty spools need no `wc` (no process: most short jobs print little, and come here first).
            'if [ "$o.$e" = 0.0 ] && [ -f out ] && [ -f err ] && [ ! -s out ] && [ ! -s err ]; then so=0; se=0; '
            'else set -- $(wc -c out err 2>/dev/null); so=$1; se=$3; [ "$2.$4" = out.err ] || so=; fi; '
            'case "$so.$se" in *[!0-9.]*|.*|*.) echo "X the spool files in $d are missing"; exit 0;; esac; '
            'punch out "$so" "$po"; po=$q; punch err "$se" "$pe"; pe=$q; '
            f'if [ -z "$r" ] && [ ! -e trim ] && {{ [ "$so" -gt {head + tail + PUNCH_STEP} ] || '
            f'[ "$se" -gt {head + tail + PUNCH_STEP} ]; }}; then trim; fi; '
            'send 1 out "$o" "$so" && send 2 err "$e" "$se" || exit 0; : > lo; : > le; '
            'if [ -n "$r" ]; then echo "Z rc $r"; elif [ $a = 0 ]; then echo "Z gone"; else echo "Z run"; fi; '
            'done')
    return alive + piece + send + punch + trim + loop


@dataclass(frozen=True)
class Reply:
    """The end of one reply: `run` (still running), `rc` (ended: `value` is the status as written), `gone`
    (no status and no process), `error` (the node's reader refused: `value` says why)."""

    kind: str
    value: str = ""
    data_bytes: int = 0  # output bytes this reply carried
    skipped: bool = False  # it skipped to the tail: the job writes faster than it is read


class ProtocolError(Exception):
    """The node's reader sent something that is not a frame: a hostile or broken node."""


class FrameParser:
    """Frames from the reader: `D<s> N` + N bytes, `K<s> N` (N bytes skipped), `Z ...` (end of a reply), `X why`
    (the reader refuses, and ends). Stream 1 is stdout, 2 stderr.

    Every number is bounded, whatever the node sends: a piece is at most `max_piece` bytes (a reader sends no more
    at once), a skip less than MAX_SPOOL_BYTES; and a reader answers each request (`expect`) once, so nothing
    piles up in the daemon however fast a node talks."""

    def __init__(self, on_data: Callable[[int, bytes], None], on_skip: Callable[[int, int], None],
                 on_reply: Callable[[Reply], None], *, max_piece: int) -> None:
        self._on_data, self._on_skip, self._on_reply = on_data, on_skip, on_reply
        self._max_piece = max_piece
        self._buf = bytearray()
        self._stream = 0
        self._need = 0  # data bytes still to come for self._stream
        self._bytes = 0  # data bytes in the reply so far
        self._skipped = False
        self._asked = 0  # requests not answered yet
        self._ended = False  # the reader refused (X): whatever follows is not read

    def expect(self) -> None:
        """A request went out: one reply may come."""
        self._asked += 1

    def feed(self, data: bytes) -> None:
        """Raises ProtocolError on anything that is not a frame."""
        if self._ended:
            return
        self._buf += data
        while self._buf and not self._ended:
            if self._need:
                chunk = bytes(self._buf[: self._need])
                del self._buf[: len(chunk)]
                self._need -= len(chunk)
                self._bytes += len(chunk)
                self._on_data(self._stream, chunk)
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER:
                    raise ProtocolError("a frame header longer than 4096 bytes")
                return
            line = bytes(self._buf[:end]).decode("utf-8", "replace")
            del self._buf[: end + 1]
            self._header(line)

    def _header(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "X":
            self._ended = True
            self._on_reply(Reply("error", rest))
            return
        if kind not in ("D1", "D2", "K1", "K2", "Z"):
            raise ProtocolError(f"a frame header that does not parse: {line[:80]!r}")
        if not self._asked:
            raise ProtocolError(f"an answer nobody asked for ({line[:40]!r}): a reader answers each request once")
        if kind == "Z":
            self._end_of_reply(line, rest)
            return
        stream, n = int(kind[1]), self._count(line, rest)
        if kind[0] == "D":
            if n > self._max_piece:
                raise ProtocolError(f"a piece of {n} bytes, more than a reader sends at once ({self._max_piece})")
            self._stream, self._need = stream, n
        else:
            self._skipped = True
            self._on_skip(stream, n)

    @staticmethod
    def _count(line: str, rest: str) -> int:
        if not (rest.isascii() and rest.isdigit()):
            raise ProtocolError(f"a frame header that does not parse: {line[:80]!r}")
        if len(rest) > len(str(MAX_SPOOL_BYTES)) or int(rest) >= MAX_SPOOL_BYTES:
            raise ProtocolError(f"a count of {rest[:40]} bytes, more than a spool can hold")
        return int(rest)

    def _end_of_reply(self, line: str, rest: str) -> None:
        what, _, value = rest.partition(" ")
        if what not in ("run", "rc", "gone") or (value and what != "rc"):
            raise ProtocolError(f"an end of reply that does not parse: {line[:80]!r}")
        self._asked -= 1
        self._on_reply(Reply(what, value, self._bytes, self._skipped))
        self._bytes, self._skipped = 0, False


def parse_status(value: str) -> int | None:
    """The exit status the wrapper wrote, or None if the file holds anything else (a hostile node)."""
    if value.isascii() and value.isdigit() and len(value) <= 3 and int(value) <= 255:
        return int(value)
    return None


def empty_end(line: bytes) -> int | None:
    """The status in a start channel's "E N" poke (the job ended, both spools empty), or None."""
    kind, _, value = line.strip().partition(b" ")
    return parse_status(value.decode("ascii", "replace")) if kind == b"E" else None
