"""Real engines for integration tests: a Docker engine started here with networking off, and its tiny image.

A component missing on a developer's machine skips these tests with the reason; in CI (CI=true) it fails them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for

IMAGE = "nexus-busybox:test"
BUSYBOX_APPLETS = ("sh", "echo", "sleep", "cat", "ls", "true", "false", "kill")


def require(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must have it: .ci/run installs it)")
        pytest.skip(reason)


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
