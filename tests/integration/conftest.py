"""Real engines for integration tests: a Docker engine started here with networking off, and its tiny image.

A component missing on a developer's machine skips these tests with the reason; in CI (CI=true) it fails them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require, wait_for

IMAGE = "nexus-busybox:test"
BUSYBOX_APPLETS = ("sh", "echo", "sleep", "cat", "ls", "true", "false", "kill")


def _busybox_rootfs_tar(directory: Path) -> Path:
    """An image made offline: Debian's static busybox and its applets as symlinks."""
    busybox = shutil.which("busybox")
    require(busybox is not None, "busybox-static is not installed")
    assert busybox is not None
    tar_path = directory / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return tar_path


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[str]:
    """DOCKER_HOST of a dockerd of our own: no bridge, no iptables, vfs storage, everything under a temp dir."""
    require(shutil.which("dockerd") is not None and shutil.which("docker") is not None,
            "dockerd/docker not installed (Debian: docker.io)")
    require(os.geteuid() == 0, "dockerd needs root")
    root = Path(tempfile.mkdtemp(prefix="njd-docker-"))  # short: the socket path must fit in 108 bytes
    host = f"unix://{root}/docker.sock"
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
         "--storage-driver=vfs", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "dockerd.pid"), "-H", host],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": host}
    try:
        wait_for(lambda: proc.poll() is not None or subprocess.run(
            ["docker", "version"], env=env, capture_output=True).returncode == 0, timeout=30,
            interval=0.1, message="dockerd to answer")
        assert proc.poll() is None, (root / "dockerd.log").read_text()[-3000:]
        subprocess.run(["docker", "import", str(_busybox_rootfs_tar(root)), IMAGE], env=env, check=True,
                       capture_output=True)
        yield host
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def docker_ps(host: str, *args: str) -> list[str]:
    result = subprocess.run(["docker", "ps", "-q", *args], env={**os.environ, "DOCKER_HOST": host},
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


# Names on the machine (users, network namespaces, links, a subnet) are unique to the test process, so two runs on
# one machine at once do not collide. Each process takes a random token and holds an flock on TEST_RUN_DIR/TOKEN.lock
# until it exits; what it creates is named PREFIX + token + a kind letter + a counter: njdt4f3a9cu0 is a user of
# token 4f3a9c, njdt4f3a9cn1 a network namespace, njdt4f3a9ch2 a link's end on the host (an interface name fits in
# 15 bytes while the counter is below 10000; a user name starts with a letter and is lowercase). A token whose lock
# nobody holds belongs to a run that crashed: the next run removes what it left.
TEST_RUN_DIR = Path("/run/nexus-jobd-tests")
PREFIX = "njdt"
_NAME = re.compile(rf"{PREFIX}([0-9a-f]{{6}})[a-z][0-9]+")
# This project's own test range: each link takes a /30 in it, at random and checked to be unused on this machine.
TEST_NET = ipaddress.IPv4Network("10.231.0.0/16")
OLD_FIXED_SUBNET = ipaddress.IPv4Network("10.231.7.0/30")  # what older versions of this file always took


def _retry_shadow(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """useradd/usermod/userdel, again while another run holds /etc/passwd's lock ("cannot lock ... try again")."""
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode == 0 or "lock" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _has_processes(user: str) -> bool:
    return subprocess.run(["pgrep", "-u", user], capture_output=True).returncode == 0


def remove_user(name: str) -> None:
    """Kill the user's processes, then userdel (also its group); userdel refuses while a process still dies."""
    if not _user_exists(name):
        return
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
    deadline = time.monotonic() + 15
    while (result := _retry_shadow(["userdel", name])).returncode not in (0, 6):  # 6: no such user
        if time.monotonic() > deadline:
            raise AssertionError(f"userdel {name} failed: {result.stderr}")
        time.sleep(0.1)


def _netns_names() -> list[str]:
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list[str]:
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]


def remove_netns(name: str) -> None:
    """The namespace and whatever runs in it (it outlives its name while a process is inside)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _ours_on_this_machine() -> dict[str, list[tuple[str, str]]]:
    """Users, namespaces and links named by some run of this suite, by token."""
    found: dict[str, list[tuple[str, str]]] = {}
    for kind, names in (("user", [p.pw_name for p in pwd.getpwall()]), ("netns", _netns_names()),
                        ("link", _link_names())):
        for name in names:
            if match := _NAME.fullmatch(name):
                found.setdefault(match[1], []).append((kind, name))
    return found


@contextlib.contextmanager
def _if_gone(token: str) -> Iterator[bool]:
    """True (holding its lock meanwhile) when the run of `token` is gone: nobody holds its lock file, or it has
    none (/run is emptied at boot). Runs create their lock file, already locked, before anything else, and remove
    it after everything else."""
    try:
        fd = os.open(TEST_RUN_DIR / f"{token}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False  # a live run
            return
        yield True
    finally:
        os.close(fd)


def _remove_stale() -> None:
    """What runs that are gone left: their namespaces (with what still runs inside), links, and users that run
    nothing (a user something still runs as stays)."""
    found = _ours_on_this_machine()
    for lock in TEST_RUN_DIR.glob("*.lock"):  # after the scan: a run that starts now is in neither
        found.setdefault(lock.stem, [])
    order = ("netns", "link", "user")
    for token, items in found.items():
        with _if_gone(token) as gone:
            if not gone:
                continue
            for kind, name in sorted(items, key=lambda item: order.index(item[0])):
                if kind == "netns":
                    remove_netns(name)
                elif kind == "link":
                    subprocess.run(["ip", "link", "del", name], capture_output=True)
                elif not _has_processes(name):
                    _retry_shadow(["userdel", name])
            with contextlib.suppress(FileNotFoundError):
                (TEST_RUN_DIR / f"{token}.lock").unlink()


class _Run:
    """This process's token, its lock, and a counter for the names it makes."""

    def __init__(self) -> None:
        TEST_RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        _remove_stale()
        taken = set(_ours_on_this_machine())
        while True:
            token = secrets.token_hex(3)
            if token in taken:
                continue
            # Locked before it has its name: a sweeper never sees it unlocked.
            staging = TEST_RUN_DIR / f".{token}.{os.getpid()}"
            self.fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                os.link(staging, TEST_RUN_DIR / f"{token}.lock")
            except FileExistsError:
                os.close(self.fd)
                continue
            finally:
                staging.unlink()
            break
        self.token, self.count = token, itertools.count()
        atexit.register(self.release)

    def name(self, kind: str) -> str:
        return f"{PREFIX}{self.token}{kind}{next(self.count)}"

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (TEST_RUN_DIR / f"{self.token}.lock").unlink()
        os.close(self.fd)


_run: _Run | None = None


def this_run() -> _Run:
    global _run
    if _run is None:
        _run = _Run()
    return _run


# The node's login shell runs the daemon's scripts: Debian's /bin/sh (dash), the strictest POSIX shell a node is
# likely to have (useradd's default there), so nothing bash-only slips in.
LOGIN_SHELL = "/bin/sh"


class Sshd:
    """A real OpenSSH sshd on a free loopback port with its own host key, config and authorized_keys, for a test
    user of its own with a clean home (root's ~/.bashrc here runs pyenv init, which would slow every remote
    command). close() removes the user; so does the end of the process, for callers that only stop()."""

    def __init__(self, root: Path, listen: str = "127.0.0.1", netns: str | None = None, extra_config: str = "") -> None:
        self.root, self.home, self.listen, self.netns = root, root / "home", listen, netns
        self.extra_config = extra_config  # sshd_config lines of the test's own (a ForceCommand)
        self.user = this_run().name("u")
        self.host_key, self.client_key = root / "host_key", root / "client_key"
        self.known_hosts, self.log = root / "known_hosts", root / "sshd.log"
        self.config = root / "sshd_config"
        self.proc: subprocess.Popen[bytes] | None = None
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        atexit.register(remove_user, self.user)
        try:
            self._user()
            for _attempt in range(5):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self.port = s.getsockname()[1]  # free here; inside a namespace of our own any port is free
                self._write_config()
                try:
                    self.start()
                    break
                except PortTaken:  # another process took the port between the probe and sshd's bind
                    continue
            else:
                raise AssertionError(f"sshd found no free port:\n{self.log.read_text(errors='replace')}")
        except BaseException:
            self.close()
            raise

    def _user(self) -> None:
        # '*' leaves the account unlocked (sshd without PAM refuses a locked one) with no password that works.
        result = _retry_shadow(["useradd", "--no-create-home", "--home-dir", str(self.home), "--shell", LOGIN_SHELL,
                                "--password", "*", self.user])
        assert result.returncode == 0, f"useradd {self.user}: {result.stderr}"
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True)
        (ssh_dir / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        subprocess.run(["chown", "-R", f"{self.user}:", str(self.home)], check=True)
        self.home.chmod(0o755)
        self.root.chmod(0o755)

    def _write_config(self) -> None:
        host_pub = (self.root / "host_key.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.listen}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.config.write_text(
            f"Port {self.port}\nListenAddress {self.listen}\nHostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            "AuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nStrictModes no\nMaxSessions 100\nMaxStartups 100\nAllowUsers {self.user}\n"
            "LogLevel VERBOSE\n" + self.extra_config)

    def start(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen([*prefix, "/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.proc

        def new_log() -> str:
            with self.log.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")

        # Its own "Server listening" line, not just a port that answers: it could be another run's sshd.
        wait_for(lambda: proc.poll() is not None or f"Server listening on {self.listen} port {self.port}" in new_log(),
                 timeout=15, message="sshd listening")
        if proc.poll() is not None:
            text = new_log()
            if "Address already in use" in text and not self.netns:
                raise PortTaken(text)
            raise AssertionError(f"sshd exited at start-up:\n{text}")

        def listening() -> bool:
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((self.listen, self.port)) == 0

        wait_for(listening, timeout=15, message="sshd reachable")

    def sshd_processes(self) -> list[int]:
        """The listener's descendants that are sshd itself (each connection's monitor and network processes);
        they call setsid(), so they are not in the listener's process group."""
        assert self.proc is not None
        children: dict[int, list[int]] = {}
        names: dict[int, bytes] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    names[int(entry.name)] = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], list(children.get(self.proc.pid, []))
        while todo:
            pid = todo.pop()
            if b"sshd" in names.get(pid, b""):
                found.append(pid)
                todo += children.get(pid, [])
        return found

    def stop(self) -> None:
        """The listener and every connection it serves: the node is down."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.sshd_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def accepted(self) -> int:
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def node_config(self, node: str = "box", **extra: object) -> str:
        lines = [f"[nodes.{node}]", f'host = "{self.listen}"', f"port = {self.port}", f'user = "{self.user}"',
                 f'key = "{self.client_key}"', f'known_hosts = "{self.known_hosts}"', "max_sessions = 100"]
        lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def remote_pgrep(self, pattern: str) -> list[str]:
        result = subprocess.run(["pgrep", "-u", self.user, "-f", pattern], capture_output=True, text=True)
        return result.stdout.split()

    def close(self) -> None:
        """stop(), then the user and anything still running as it."""
        self.stop()
        remove_user(self.user)


class PortTaken(Exception):
    """sshd could not bind the port it was given."""


class VethLink:
    """A network namespace of our own, reached from this one over a veth pair with a /30 of TEST_NET that nothing
    on this machine uses. remove() takes it all away, whatever part of it exists."""

    def __init__(self) -> None:
        run = this_run()
        self.netns, self.host_if, self.ns_if = run.name("n"), run.name("h"), run.name("p")
        try:
            for command in (["ip", "netns", "add", self.netns],
                            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
                            ["ip", "link", "set", self.ns_if, "netns", self.netns]):
                subprocess.run(command, check=True, capture_output=True)
            self.host_addr, self.ns_addr = self._claim_subnet()
            for command in (["ip", "link", "set", self.host_if, "up"],
                            ["ip", "netns", "exec", self.netns, "ip", "addr", "add", f"{self.ns_addr}/30", "dev",
                             self.ns_if],
                            ["ip", "netns", "exec", self.netns, "ip", "link", "set", self.ns_if, "up"],
                            ["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"]):
                subprocess.run(command, check=True, capture_output=True)
        except BaseException:
            self.remove()
            raise

    def _claim_subnet(self) -> tuple[str, str]:
        """A random /30 that no interface here has an address in, checked again once ours is added: two runs that
        picked the same one at the same moment both see the other and pick again."""
        blocks = list(TEST_NET.subnets(new_prefix=30))
        for _attempt in range(50):
            block = secrets.choice(blocks)
            if block == OLD_FIXED_SUBNET or self._users_of(block):
                continue
            host, peer = str(block[1]), str(block[2])
            subprocess.run(["ip", "addr", "add", f"{host}/30", "dev", self.host_if], check=True, capture_output=True)
            if self._users_of(block) == {self.host_if}:
                return host, peer
            subprocess.run(["ip", "addr", "del", f"{host}/30", "dev", self.host_if], capture_output=True)
            time.sleep(secrets.randbelow(100) / 1000)
        raise AssertionError(f"no free /30 in {TEST_NET} after 50 tries")

    @staticmethod
    def _users_of(block: ipaddress.IPv4Network) -> set[str]:
        """The interfaces here with an IPv4 address in `block`."""
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
        found = set()
        for line in out.splitlines():  # "7: njdt..h0    inet 10.231.3.1/30 brd ... scope global njdt..h0"
            fields = line.split()
            if "inet" in fields:
                interface = ipaddress.ip_interface(fields[fields.index("inet") + 1])
                if interface.network.overlaps(block):
                    found.add(fields[1].split("@")[0])
        return found

    def set_up(self, up: bool) -> None:
        subprocess.run(["ip", "link", "set", self.host_if, "up" if up else "down"], check=True)

    def remove(self) -> None:
        remove_netns(self.netns)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)  # gone with the netns if it was in


@pytest.fixture(scope="session")
def sshd() -> Iterator[Sshd]:
    require(shutil.which("/usr/sbin/sshd") is not None and shutil.which("ssh-keygen") is not None,
            "OpenSSH server not installed (Debian: openssh-server)")
    require(os.geteuid() == 0, "the sshd fixture creates a test user: it needs root")
    root = Path(tempfile.mkdtemp(prefix="njd-sshd-"))
    server: Sshd | None = None
    try:
        server = Sshd(root)
        yield server
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sshd_behind_a_link() -> Iterator[tuple[Sshd, Callable[[bool], None]]]:
    """An sshd in a network namespace of the test's own, reached over a veth pair; the callable takes the link
    down (False) or up again (True)."""
    require(shutil.which("ip") is not None, "iproute2 is not installed (Debian: iproute2)")
    require(os.geteuid() == 0, "network namespaces need root")
    root = Path(tempfile.mkdtemp(prefix="njd-sshd-ns-"))
    link: VethLink | None = None
    server: Sshd | None = None
    try:
        link = VethLink()
        server = Sshd(root, listen=link.ns_addr, netns=link.netns)
        yield server, link.set_up
    finally:
        if server is not None:
            server.close()
        if link is not None:
            link.remove()
        shutil.rmtree(root, ignore_errors=True)
