"""The shell lines the SSH executor sends, run here by a real dash (the strictest `sh` a node is likely to have)
against real process groups: the kill must reach the job's group and never a stranger that got its id later; the
detached job's spools are read by offset, exactly, and whatever a hostile node leaves there fails the job with a
reason."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.executors import spool
from daemon.executors.spool import kill_script
from daemon.executors.ssh import in_sh
from daemon.model import Command
from tests.conftest import require, wait_for

BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    require(shutil.which("dash") is not None, "dash not installed")
    (tmp_path / ".cache" / "nexus-jobd" / "jobs" / "f").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def group() -> Iterator[subprocess.Popen[bytes]]:
    """A process group of its own, like the job's on a node."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _dash(script: str, home: Path) -> None:
    subprocess.run(["dash", "-c", script], env={"HOME": str(home), "PATH": os.defpath}, check=True, timeout=10)


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _record(home: Path, line: str) -> Path:
    pid_file = home / ".cache" / "nexus-jobd" / "jobs" / "f" / "pid"
    pid_file.write_text(line + " 1 1\n")  # the wrapper's pid and start time follow
    return pid_file


def test_the_recorded_group_is_killed_and_its_file_removed(home: Path, group: subprocess.Popen[bytes]) -> None:
    pid_file = _record(home, f"{group.pid} {_start_time(group.pid)} {BOOT_ID}")
    _dash(kill_script("f", signal.SIGTERM), home)
    wait_for(lambda: not _alive(group), message="group killed")
    assert pid_file.exists()  # TERM: kept (the job may still write its status); the final KILL removes it all
    _dash(kill_script("f", signal.SIGKILL, remove=True), home)
    assert not pid_file.parent.exists()


@pytest.mark.parametrize("stale", ["another start time", "another boot"])
def test_a_stale_pid_file_never_kills_whoever_has_the_id_now(home: Path, group: subprocess.Popen[bytes],
                                                             stale: str) -> None:
    started, boot = _start_time(group.pid), BOOT_ID
    if stale == "another start time":
        started = str(int(started) - 1)
    else:
        boot = "00000000-0000-0000-0000-000000000000"
    _record(home, f"{group.pid} {started} {boot}")
    _dash(kill_script("f", signal.SIGKILL), home)
    assert _alive(group)


def test_a_group_whose_leader_is_gone_is_still_killed(home: Path) -> None:
    """The leader (the job's shell) may die first; the group id stays reserved while members live."""
    leader = subprocess.Popen(["dash", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    assert leader.stdout is not None
    member = int(leader.stdout.readline())
    started = _start_time(leader.pid)
    leader.wait()  # the leader has exited and is reaped; its child lives on in the group
    try:
        assert os.getpgid(member) == leader.pid
        _record(home, f"{leader.pid} {started} {BOOT_ID}")
        _dash(kill_script("f", signal.SIGKILL), home)
        wait_for(lambda: not Path(f"/proc/{member}").exists() or
                 Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 message="the member killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


class Node:
    """The node's side of one reader channel: dash running a start or reader script, driven as the daemon drives
    it (a request line per reply), its frames parsed by the daemon's own parser."""

    def __init__(self, home: Path, script: str, login_shell: tuple[str, ...] = ("dash",),
                 preamble: bytes = b"") -> None:
        # As sshd runs a command: the login shell with -c and the command line; ours is always in_sh(script).
        self.proc = subprocess.Popen([*login_shell, "-c", in_sh(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={"HOME": str(home), "PATH": os.defpath},
                                     start_new_session=True)
        if preamble:  # a start's variables, as the daemon sends them first
            assert self.proc.stdin is not None
            os.write(self.proc.stdin.fileno(), preamble)
        self.out, self.err = bytearray(), bytearray()
        self.skipped = {1: 0, 2: 0}
        self.replies: list[spool.Reply] = []
        self.parser = spool.FrameParser(self._data, self._skip, self.replies.append, max_piece=1 << 30)

    def _data(self, stream: int, data: bytes) -> None:
        (self.out if stream == 1 else self.err).extend(data)

    def _skip(self, stream: int, n: int) -> None:
        self.skipped[stream] += n

    def offsets(self, base: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        return base[0] + len(self.out) + self.skipped[1], base[1] + len(self.err) + self.skipped[2]

    def ask(self, offsets: tuple[int, int]) -> spool.Reply:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        # Straight to the fd, not through the BufferedWriter: a reader that has already answered and exited (the
        # job's directory is gone) closes the pipe, and a buffered write left pending would raise again at GC.
        self.parser.expect()
        with contextlib.suppress(BrokenPipeError):
            os.write(self.proc.stdin.fileno(), f"{offsets[0]} {offsets[1]}\n".encode())
        count = len(self.replies)
        while len(self.replies) == count:
            data = os.read(self.proc.stdout.fileno(), 1 << 20)
            assert data, f"the reader ended: {self.proc.stderr.read() if self.proc.stderr else b''!r}"
            self.parser.feed(data)
        return self.replies[-1]

    def until_end(self, base: tuple[int, int] = (0, 0), timeout: float = 20.0) -> spool.Reply:
        return wait_for(lambda: (r := self.ask(self.offsets(base))).kind != "run" and r, timeout,
                        interval=0.02, message="the job's end")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def _job_dir(home: Path, key: str) -> Path:
    return home / ".cache" / "nexus-jobd" / "jobs" / spool.dir_name(key)


def _start(home: Path, shell: str, key: str = "job:1", cap: int = 100_000, cwd: str | None = None) -> Node:
    command = Command(argv=("sh", "-c", shell), cwd=cwd, env={"X": "y z"}, key=key)
    return Node(home, spool.start_script(command, spool.dir_name(key), cap), preamble=spool.env_message(command.env))


def test_a_started_job_is_read_exactly_with_its_status_and_private_files(home: Path) -> None:
    node = _start(home, 'printf "a\\0b"; echo "$X" >&2; sleep 0.3; head -c 3000 /dev/zero; exit 3', cwd="/tmp")
    end = node.until_end()
    assert (end.kind, spool.parse_status(end.value)) == ("rc", 3)
    assert (bytes(node.out), bytes(node.err)) == (b"a\0b" + b"\0" * 3000, b"y z\n")
    d = _job_dir(home, "job:1")
    assert d.stat().st_mode & 0o777 == 0o700
    # lo, le: where the reader tells the trimmer which offsets it sends from (empty between requests).
    private = dict.fromkeys(("out", "err", "rc", "pid", "lo", "le"), 0o600)
    assert {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()} == private
    pgid, started, boot, wrapper, _ = (d / "pid").read_text().split()
    assert boot == BOOT_ID and int(pgid) == node.proc.pid and started == _start_time(node.proc.pid)
    assert int(wrapper) != node.proc.pid
    node.close()


def test_a_second_start_of_the_same_attempt_is_refused_and_runs_nothing(home: Path) -> None:
    first = _start(home, "echo ran >> $HOME/count")
    assert first.until_end().kind == "rc"
    first.close()
    second = _start(home, "echo ran >> $HOME/count")
    reply = second.ask((0, 0))
    assert reply.kind == "error" and "exists already" in reply.value
    second.close()
    assert (home / "count").read_text() == "ran\n"


def test_a_new_reader_goes_on_from_the_offsets_and_a_quiet_end_pokes_the_start_channel(home: Path) -> None:
    first = _start(home, "echo one; echo two >&2; sleep 0.5; echo three; echo four >&2")
    wait_for(lambda: first.ask(first.offsets()) and first.offsets() == (4, 4), message="the first lines")
    base = first.offsets()
    first.close()  # as a dropped link: the job runs on
    again = Node(home, spool.reader_script(spool.dir_name("job:1"), 100_000))
    end = again.until_end(base)
    assert end.kind == "rc" and (bytes(again.out), bytes(again.err)) == (b"three\n", b"four\n")
    again.close()
    quiet = _start(home, "exit 7", key="job:2")
    assert quiet.proc.stderr is not None
    assert spool.empty_end(quiet.proc.stderr.readline()) == 7  # "E 7": no request needed
    quiet.close()


def test_term_records_128_plus_n_and_kill_leaves_the_job_gone(home: Path) -> None:
    for key, signum, expected in (("job:t", signal.SIGTERM, ("rc", "143")), ("job:k", signal.SIGKILL, ("gone", ""))):
        node = _start(home, "echo up; sleep 300", key=key)
        wait_for(lambda n=node: n.ask(n.offsets()) and n.offsets() == (3, 0), message="running")  # type: ignore[misc]
        node.close()  # the start channel's shell is the group leader: signal as over a separate channel
        _dash(kill_script(spool.dir_name(key), signum), home)
        reader = Node(home, spool.reader_script(spool.dir_name(key), 100_000))
        end = reader.until_end((3, 0))
        assert (end.kind, end.value) == expected
        reader.close()


@pytest.mark.parametrize("damage", ["status", "shrank", "gone", "spools"])
def test_what_a_hostile_node_leaves_is_refused_with_a_reason(home: Path, damage: str) -> None:
    node = _start(home, "echo hello")
    assert node.until_end().kind == "rc"
    node.close()
    d = _job_dir(home, "job:1")
    if damage == "status":
        (d / "rc").write_text("not a number\n")
    elif damage == "shrank":
        (d / "out").write_text("")
    elif damage == "gone":
        shutil.rmtree(d)
    else:
        (d / "err").unlink()
    reader = Node(home, spool.reader_script(spool.dir_name("job:1"), 100_000))
    reply = reader.ask((6, 0))
    reader.close()
    if damage == "status":
        assert reply.kind == "rc" and spool.parse_status(reply.value) is None
    else:
        assert reply.kind == "error"
        why = {"shrank": "fewer than the 6 already read", "gone": "is gone", "spools": "missing"}[damage]
        assert why in reply.value


def test_a_far_behind_reader_sends_head_and_tail_only_and_the_middle_leaves_the_disk(home: Path) -> None:
    node = _start(home, "head -c 20000000 /dev/zero | tr '\\0' x; echo end", cap=1000)
    assert node.until_end().kind == "rc"
    node.close()
    # The daemon keeps the first cap + 1 bytes and the last cap - cap/4: a reader from 0 sends those and skips the
    # rest; the middle is punched out of the file (offsets stay valid), for whichever reader comes next.
    reader = Node(home, spool.reader_script(spool.dir_name("job:1"), 1000))
    reply = reader.until_end()
    assert reply.kind == "rc" and reader.skipped == {1: 20_000_004 - 1001 - 750, 2: 0}
    assert bytes(reader.out) == b"x" * 1001 + b"x" * 746 + b"end\n"
    reader.close()
    again = Node(home, spool.reader_script(spool.dir_name("job:1"), 1000))
    assert again.until_end((20_000_000, 0)).kind == "rc" and bytes(again.out) == b"end\n"
    again.close()
    out = _job_dir(home, "job:1") / "out"
    assert out.stat().st_size == 20_000_004
    require(shutil.which("fallocate") is not None, "fallocate not installed (Debian: util-linux)")
    assert out.stat().st_blocks * 512 < 2 * 1024 * 1024  # the 20 MB are no longer on disk


def test_a_trimmer_keeps_the_spool_near_the_cap_while_no_reader_reads(home: Path) -> None:
    """A read that finds a spool past the cap starts the node's trimmer; the reader then goes (the daemon stopped)
    and the job writes 300 MB more: the trimmer alone keeps the middle off the disk, and a reader that comes back
    goes on from its offsets, exactly."""
    require(shutil.which("fallocate") is not None, "fallocate not installed (Debian: util-linux)")
    gate = home / "gate"
    # The 300 MB in pieces, for 3 s or more: longer than the trimmer's longest pause while the job waits (1 s).
    node = _start(home, f'head -c 20000000 /dev/zero | tr "\\0" x; while [ ! -e {gate} ]; do sleep 0.02; done; '
                        'for i in $(seq 60); do head -c 5000000 /dev/zero | tr "\\0" y; sleep 0.05; done; echo end',
                  cap=1000)
    wait_for(lambda: node.ask(node.offsets()) and node.offsets()[0] == 20_000_000, message="the first 20 MB read")
    d = _job_dir(home, "job:1")
    assert (d / "trim").exists()
    offsets = node.offsets()
    node.close()
    gate.touch()
    wait_for(lambda: (d / "rc").exists(), timeout=60, message="the job's end, 300 MB later, with no reader")
    size, on_disk = (d / "out").stat().st_size, (d / "out").stat().st_blocks * 512
    print(f"300 MB unread: {on_disk / 2**20:.1f} MiB of the spool on disk at the job's end")
    assert size == 320_000_004 and on_disk < 64 * 2**20  # without the trimmer: all 300 MB
    again = Node(home, spool.reader_script(spool.dir_name("job:1"), 1000))
    assert again.until_end(offsets).kind == "rc"
    assert again.skipped == {1: size - offsets[0] - 750, 2: 0} and bytes(again.out) == b"y" * 746 + b"end\n"
    again.close()


@pytest.mark.parametrize("login_shell", [("dash",), ("bash",), ("zsh",), ("busybox", "sh")])
def test_jobs_run_and_are_read_whatever_the_login_shell(home: Path, login_shell: tuple[str, ...]) -> None:
    """sshd hands the command to the user's login shell; zsh, unlike sh, does not split `$words`, which made every
    remote job look gone. Each script runs in the node's sh whatever the login shell."""
    require(shutil.which(login_shell[0]) is not None,
            f"{login_shell[0]} is not installed (scripts/install-test-deps installs it)")
    key = "job:1"
    command = Command(argv=("sh", "-c", "echo hi; sleep 0.3; echo bye"), cwd=None, env={}, key=key)
    node = Node(home, spool.start_script(command, spool.dir_name(key), 1000), login_shell, spool.env_message({}))
    end = node.until_end()
    assert (end.kind, spool.parse_status(end.value), bytes(node.out)) == ("rc", 0, b"hi\nbye\n")
    pgid, started, *_ = (_job_dir(home, key) / "pid").read_text().split()
    assert int(pgid) == node.proc.pid and started != "-"


class Frames:
    """The daemon's parser fed what a hostile node could send, with `asked` requests out."""

    def __init__(self, asked: int = 1, max_piece: int = 1025) -> None:
        self.data: list[tuple[int, bytes]] = []
        self.skips: list[tuple[int, int]] = []
        self.replies: list[spool.Reply] = []
        self.parser = spool.FrameParser(lambda s, d: self.data.append((s, d)), lambda s, n: self.skips.append((s, n)),
                                        self.replies.append, max_piece=max_piece)
        for _ in range(asked):
            self.parser.expect()


@pytest.mark.parametrize(("frames", "why"), [
    (b"K1 18446744073709551616\n", "a count of 18446744073709551616 bytes, more than a spool can hold"),
    (b"K2 9007199254740992\n", "a count of 9007199254740992 bytes, more than a spool can hold"),
    (b"K1 " + b"9" * 4000 + b"\n", "more than a spool can hold"),
    (b"D1 1026\n", "a piece of 1026 bytes, more than a reader sends at once (1025)"),
    (b"D1 99999999999999999999\n", "more than a spool can hold"),
    (b"K1 -5\n", "a frame header that does not parse"),
    (b"D1 \xc2\xb2\n", "a frame header that does not parse"),  # '²' is a digit to str.isdigit()
    (b"Z run\nZ run\n", "an answer nobody asked for ('Z run')"),
    (b"D1 3\nabcZ run\nD1 1\nx", "an answer nobody asked for ('D1 1')"),
    (b"Z run now\n", "an end of reply that does not parse"),
])
def test_counts_and_answers_a_reader_could_not_honestly_send_are_protocol_errors(frames: bytes, why: str) -> None:
    with pytest.raises(spool.ProtocolError, match=re.escape(why)):
        Frames().parser.feed(frames)


def test_the_largest_honest_counts_pass_and_a_refusal_ends_the_conversation() -> None:
    frames = Frames(asked=2)
    frames.parser.feed(b"D1 1025\n" + b"x" * 1025 + b"K1 9007199254740991\nZ run\nZ rc 3\n")
    assert frames.skips == [(1, 2**53 - 1)] and sum(len(d) for _, d in frames.data) == 1025
    assert [(r.kind, r.value) for r in frames.replies] == [("run", ""), ("rc", "3")]
    refused = Frames(asked=0)  # a start refused before any request: the only frame that needs none
    refused.parser.feed(b"X the job directory exists already\n" + b"X again\n" * 1000 + b"Z run\n")
    assert [(r.kind, r.value) for r in refused.replies] == [("error", "the job directory exists already")]


@pytest.mark.parametrize(("text", "status"), [("3", 3), ("255", 255), ("256", None), ("99999999999999999999", None),
                                             ("-1", None), ("\u00b2", None), ("", None)])
def test_a_status_or_poke_is_an_exit_status_or_nothing(text: str, status: int | None) -> None:
    assert spool.parse_status(text) == status
    assert spool.empty_end(f"E {text}\n".encode()) == status
