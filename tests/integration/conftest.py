"""Real engines for integration tests: a Docker engine started here with networking off, and its tiny image.

A component missing on a developer's machine skips these tests with the reason; in CI (CI=true) it fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
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


SSH_USER = "nexusjobd-t"
# The node's login shell runs the daemon's scripts: Debian's /bin/sh (dash), the strictest POSIX shell a node is
# likely to have (useradd's default there), so nothing bash-only slips in.
LOGIN_SHELL = "/bin/sh"


class Sshd:
    """A real OpenSSH sshd on a free loopback port with its own host key, config and authorized_keys, for a test
    user with a clean home (root's ~/.bashrc here runs pyenv init, which would slow every remote command)."""

    def __init__(self, root: Path, listen: str = "127.0.0.1", netns: str | None = None, user: str = SSH_USER) -> None:
        self.root, self.home, self.listen, self.netns, self.user = root, root / "home", listen, netns, user
        self.host_key, self.client_key = root / "host_key", root / "client_key"
        self.known_hosts, self.log = root / "known_hosts", root / "sshd.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]  # free here; inside a namespace of our own any port is free
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        self._user()
        host_pub = (root / "host_key.pub").read_text().split()
        self.known_hosts.write_text(f"[{listen}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress {listen}\nHostKey {self.host_key}\nPidFile {root / 'sshd.pid'}\n"
            "AuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nStrictModes no\nMaxSessions 100\nMaxStartups 100\nAllowUsers {user}\n"
            "LogLevel VERBOSE\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def _user(self) -> None:
        if subprocess.run(["id", self.user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--home-dir", str(self.home), "--shell", LOGIN_SHELL, self.user], check=True)
        else:  # left from an earlier run: point it at this run's clean home
            subprocess.run(["pkill", "-KILL", "-u", self.user], capture_output=True)
            wait_for(lambda: subprocess.run(["usermod", "--home", str(self.home), "--shell", LOGIN_SHELL, self.user],
                                            capture_output=True).returncode == 0, message=f"usermod {self.user}")
        subprocess.run(["usermod", "-p", "*", self.user], check=True)  # unlocked: sshd without PAM refuses locked
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True)
        (ssh_dir / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        subprocess.run(["chown", "-R", f"{self.user}:", str(self.home)], check=True)
        self.home.chmod(0o755)
        self.root.chmod(0o755)

    def start(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        with self.log.open("ab") as log:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen([*prefix, "/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def listening() -> bool:
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((self.listen, self.port)) == 0

        wait_for(listening, timeout=15, message="sshd listening")

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


@pytest.fixture(scope="session")
def sshd() -> Iterator[Sshd]:
    require(shutil.which("/usr/sbin/sshd") is not None and shutil.which("ssh-keygen") is not None,
            "OpenSSH server not installed (Debian: openssh-server)")
    require(os.geteuid() == 0, "the sshd fixture creates a test user: it needs root")
    root = Path(tempfile.mkdtemp(prefix="njd-sshd-"))
    server = Sshd(root)
    yield server
    server.stop()
    subprocess.run(["pkill", "-KILL", "-u", SSH_USER], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sshd_behind_a_link() -> Iterator[tuple[Sshd, Callable[[bool], None]]]:
    """An sshd in a network namespace of the test's own, reached over a veth pair; the callable takes the link
    down (False) or up again (True)."""
    require(shutil.which("ip") is not None, "iproute2 is not installed (Debian: iproute2)")
    require(os.geteuid() == 0, "network namespaces need root")
    ns, host_if, ns_if = f"njd{os.getpid()}", f"njdh{os.getpid() % 100000}", f"njdn{os.getpid() % 100000}"
    setup = [["ip", "netns", "add", ns], ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
             ["ip", "link", "set", ns_if, "netns", ns], ["ip", "addr", "add", "10.231.7.1/30", "dev", host_if],
             ["ip", "link", "set", host_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", "10.231.7.2/30", "dev", ns_if],
             ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    root = Path(tempfile.mkdtemp(prefix="njd-sshd-ns-"))
    try:
        for command in setup:
            subprocess.run(command, check=True, capture_output=True)
        server = Sshd(root, listen="10.231.7.2", netns=ns, user="nexusjobd-n")
        yield server, lambda up: subprocess.run(["ip", "link", "set", host_if, "up" if up else "down"], check=True)
        server.stop()
        subprocess.run(["pkill", "-KILL", "-u", server.user], capture_output=True)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
