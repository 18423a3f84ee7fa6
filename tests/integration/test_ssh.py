"""Jobs on an SSH node: a real OpenSSH sshd on loopback, the real daemon, real remote processes."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.executors import spool
from tests.conftest import NEXUS_JOBD, Daemon, Db, daemon_looked, require, wait_for
from tests.integration.conftest import Sshd

FAST = "[daemon]\nheartbeat_interval_ms = 200\nkill_grace_ms = 500\n"


def _node(db: Db, node: str = "box") -> dict[str, object]:
    row = db.conn.execute("SELECT * FROM nodes WHERE id = ?", (node,)).fetchone()
    return dict(row) if row else {}


def test_a_job_on_an_ssh_node_streams_both_outputs_and_records_the_exit_code(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config()).start()
    job_id = db.insert("echo out; echo err >&2; echo $GREETING in $(pwd); exit 3", node_id="box",
                       env={"GREETING": "hi there"}, cwd="/tmp")
    row = db.wait_status(job_id, timeout=30)
    assert (row["status"], row["exit_code"]) == ("failed", 3)
    assert (row["stdout"], row["stderr"]) == ("out\nhi there in /tmp\n", "err\n")
    git = db.wait_status(db.insert("git --version", tool="git", node_id="box"), timeout=30)
    assert (git["status"], git["stdout"].split()[:2]) == ("completed", ["git", "version"])
    quoted = db.wait_status(db.insert("rev-parse --sq-quote 'a;b $HOME' \"c d\"", tool="git", node_id="box"))
    assert quoted["stdout"].strip() == "'a;b $HOME' 'c d'"  # the remote shell passed the arguments untouched
    node = wait_for(lambda: (n := _node(db)).get("status") == "online" and n, message="node online")
    caps = json.loads(str(node["capabilities"]))
    assert caps["tools"]["bash"].startswith("GNU bash") and caps["os"] == "Linux" and caps["cpus"] >= 1
    assert caps["rtt_ms"] > 0 and isinstance(caps["load"], list) and caps["mem_total_kb"] > 0


def test_200_jobs_run_over_one_connection(sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    before = sshd.accepted()
    daemon_factory(config=FAST + sshd.node_config(max_concurrent=16)).start()
    db.conn.execute("BEGIN")
    jobs = [db.insert(f"echo {i}", node_id="box") for i in range(200)]
    db.conn.execute("COMMIT")
    for i, job_id in enumerate(jobs):
        assert db.wait_status(job_id, timeout=60)["stdout"] == f"{i}\n"
    assert sshd.accepted() - before == 1


def test_an_unknown_host_key_is_refused(sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon],
                                        tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    other = (sshd.root / "client_key.pub").read_text().split()  # some other key than the host's
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    config = FAST + sshd.node_config().replace(str(sshd.known_hosts), str(wrong))
    daemon_factory(config=config).start()
    node = wait_for(lambda: (n := _node(db)).get("status") == "error" and n, timeout=20, message="node error")
    assert "host key" in json.loads(str(node["capabilities"]))["error"]
    row = db.wait_status(db.insert("echo never", node_id="box"), timeout=20)
    assert row["status"] == "failed" and "node box is in error" in row["error"] and "host key" in row["error"]


def test_a_node_goes_offline_after_missed_probes_and_its_jobs_wait(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config(offline_after=3, keepalive_interval_ms=300)).start()
    wait_for(lambda: _node(db).get("status") == "online", timeout=20, message="online")
    sshd.stop()
    try:
        node = wait_for(lambda: (n := _node(db)).get("status") == "offline" and n, timeout=20, message="offline")
        assert json.loads(str(node["capabilities"]))["missed_probes"] >= 3  # one missed probe is not enough
        job_id = db.insert("echo back", node_id="box")
        daemon_looked(db)
        row = db.job(job_id)
        assert (row["status"], row["started_at"], row["error"]) == ("queued", None, None)  # it waits, unclaimed
    finally:
        sshd.start()
    wait_for(lambda: _node(db).get("status") == "online", timeout=30, message="online again")
    assert db.wait_status(job_id, timeout=30)["stdout"] == "back\n"


def test_cancel_and_timeout_leave_no_remote_process(sshd: Sshd, db: Db,
                                                    daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config()).start()
    cancelled = db.insert("echo up; sleep 1001 & sleep 1002; wait", node_id="box")
    wait_for(lambda: db.job(cancelled)["stdout"] == "up\n", timeout=30, message="running remotely")
    assert sshd.remote_pgrep("sleep 100[12]")
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (cancelled,))
    wait_for(lambda: not sshd.remote_pgrep("sleep 100[12]"), timeout=10, message="remote group killed")
    row = wait_for(lambda: (r := db.job(cancelled))["duration"] is not None and r, timeout=20, message="recorded")
    assert row["status"] == "cancelled"

    timed = db.insert("trap '' TERM; sleep 1003 & sleep 1004; wait", node_id="box", timeout_ms=1000)
    row = db.wait_status(timed, timeout=30)
    assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", 124, 1)
    wait_for(lambda: not sshd.remote_pgrep("sleep 100[34]"), timeout=10, message="remote group killed")


def test_nodes_command_and_a_removed_node_going_offline(sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon],
                                                        tmp_path: Path) -> None:
    db.conn.execute("INSERT INTO nodes (id, hostname, status, created_at) VALUES ('retired', 'old-box', 'online', 1)")
    daemon = daemon_factory(config=FAST + sshd.node_config())
    daemon.start()
    wait_for(lambda: _node(db).get("status") == "online", timeout=20, message="online")
    assert wait_for(lambda: _node(db, "retired").get("status") == "offline", message="retired node offline")
    db.insert("sleep 30", node_id="box")
    cli = [*NEXUS_JOBD, "--db", str(db.path), "--config", str(daemon.config_path)]
    listing = wait_for(lambda: (rows := {r["id"]: r for r in json.loads(subprocess.run(
        [*cli, "nodes", "--json"], capture_output=True, text=True, check=True).stdout)})["box"]["running"] == 1
        and rows, message="nodes --json")
    assert listing["box"]["status"] == "online" and "bash" in listing["box"]["capabilities"]["tools"]
    assert listing["localhost"]["status"] == "online" and listing["box"]["heartbeat_age_s"] < 5
    table = subprocess.run([*cli, "nodes"], capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["NODE", "STATUS", "HEARTBEAT"]
    check = subprocess.run([*cli, "nodes", "check", "box"], capture_output=True, text=True)
    assert check.returncode == 0 and json.loads(check.stdout)["capabilities"]["os"] == "Linux"
    bad = tmp_path / "bad.toml"
    bad.write_text(sshd.node_config().replace(f"port = {sshd.port}", "port = 1"))  # nothing listens there
    refused = subprocess.run([*NEXUS_JOBD, "--config", str(bad), "nodes", "check", "box"], capture_output=True,
                             text=True)
    assert refused.returncode == 1 and "node box is not usable" in refused.stderr


def test_node_limits_hold_on_an_ssh_node_from_the_jobs_first_instruction(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    limits = "[nodes.box.limits]\ncpu_seconds = 1\nfile_size_bytes = 4096\nopen_files = 64\n"
    daemon_factory(config=FAST + sshd.node_config() + limits).start()
    # Reads the limits from the job's own process: the bytes configured, whatever shell set them.
    seen = db.wait_status(db.insert("cat /proc/self/limits", node_id="box"), timeout=30)
    rows = {line[:26].strip(): line[26:].split()[:2] for line in seen["stdout"].splitlines()[1:]}
    assert (rows["Max cpu time"], rows["Max file size"], rows["Max open files"]) == (["1", "2"], ["4096"] * 2,
                                                                                    ["64"] * 2)
    spinner = db.wait_status(db.insert("while :; do :; done", node_id="box"), timeout=30)
    assert (spinner["status"], spinner["exit_code"]) == ("failed", 128 + 24)  # SIGXCPU after 1 s of CPU
    writer = db.wait_status(db.insert("head -c 100000 /dev/zero > /tmp/nexus-jobd-limit-$$; echo $?; "
                                      "stat -c %s /tmp/nexus-jobd-limit-$$; rm /tmp/nexus-jobd-limit-$$",
                                      node_id="box"), timeout=30)
    assert writer["stdout"] == f"{128 + 25}\n4096\n"  # SIGXFSZ: the file may not grow past 4096 bytes


def test_an_ssh_node_that_refuses_its_limits_is_in_error_and_its_jobs_fail_with_the_reason(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    limits = "[nodes.box.limits]\nopen_files = 2147483647\n"  # the most the config takes; above any fs.nr_open
    daemon_factory(config=FAST + sshd.node_config() + limits).start()
    node = wait_for(lambda: (n := _node(db)).get("status") == "error" and n, timeout=20, message="node error")
    assert "refuses its [nodes.box.limits]" in json.loads(str(node["capabilities"]))["error"]
    row = db.wait_status(db.insert("echo never", node_id="box"), timeout=20)
    assert (row["status"], row["stdout"]) == ("failed", None)
    assert "refuses its [nodes.box.limits]" in row["error"] and "ulimit -Ha" in row["error"]
    assert "open_files = 2147483647" in row["error"]  # which key


# `user` left out of [nodes.X]: the daemon logs in as its own user (the name of its effective uid), as ssh(1) does.
# asyncssh used to be handed username=None and failed with "'NoneType' object is not iterable".
def _without_user(node_config: str) -> str:
    lines = [line for line in node_config.splitlines() if not line.startswith("user = ")]
    assert len(lines) == len(node_config.splitlines()) - 1
    return "\n".join(lines) + "\n"


def test_a_node_without_user_is_refused_by_sshd_as_the_daemons_user(sshd: Sshd, tmp_path: Path) -> None:
    """The shared sshd lets in only its test user: the daemon's own user (root here) gets to sshd, which says no,
    and the error names who tried (no TypeError from the SSH library)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert me != sshd.user
    config = tmp_path / "no-user.toml"
    config.write_text(_without_user(sshd.node_config()))
    result = subprocess.run([*NEXUS_JOBD, "--config", str(config), "nodes", "check", "box"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert f"cannot connect to node box as {me}@{sshd.listen}:{sshd.port}: " in result.stderr, result.stderr
    assert "Permission denied" in result.stderr and "NoneType" not in result.stderr


@pytest.fixture
def sshd_for_me() -> Iterator[tuple[str, int, Path, Path]]:
    """A throwaway sshd on loopback that lets in this process's own user with a key of the test's (its
    authorized_keys file lives in the test's directory: the user's own ~/.ssh is not touched). PAM on, as a
    stock sshd has it: without PAM, sshd refuses an account whose password is locked, root's in a container."""
    require(shutil.which("/usr/sbin/sshd") is not None, "OpenSSH server not installed (Debian: openssh-server)")
    require(os.geteuid() == 0, "sshd can switch to the logged-in user only as root")
    me = pwd.getpwuid(os.geteuid()).pw_name
    root = Path(tempfile.mkdtemp(prefix="njd-sshd-me-"))
    try:
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        host_pub = (root / "host_key.pub").read_text().split()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        (root / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\nUsePAM yes\nStrictModes no\nAllowUsers {me}\n"
            "PermitRootLogin prohibit-password\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        with (root / "sshd.log").open("wb") as log:
            proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def listening() -> bool:
                with socket.socket() as s:
                    return proc.poll() is None and s.connect_ex(("127.0.0.1", port)) == 0

            wait_for(lambda: listening() or proc.poll() is not None, timeout=15, message="sshd listening")
            assert proc.poll() is None, (root / "sshd.log").read_text()
            yield me, port, root / "client_key", root / "known_hosts"
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_node_without_user_logs_in_as_the_daemons_user(sshd_for_me: tuple[str, int, Path, Path],
                                                         tmp_path: Path) -> None:
    me, port, key, known_hosts = sshd_for_me
    config = tmp_path / "no-user.toml"
    config.write_text(f'[nodes.self]\nhost = "127.0.0.1"\nport = {port}\nkey = "{key}"\n'
                      f'known_hosts = "{known_hosts}"\n')
    result = subprocess.run([*NEXUS_JOBD, "--config", str(config), "nodes", "check", "self"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "online"
    log = (key.parent / "sshd.log").read_text()
    assert f"Accepted publickey for {me} from 127.0.0.1" in log, log


def test_a_job_for_a_node_that_does_not_answer_waits_for_it_and_is_not_an_attempt(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """A blip (a phone changing networks, sshd restarting) before any probe noticed: the job could not be started,
    so it waits for the node, whatever its max_attempts, and the claim is not counted as a run of the command."""
    daemon = daemon_factory(config="[daemon]\nheartbeat_interval_ms = 600000\n" + sshd.node_config()).start()
    first = db.insert("echo linked", node_id="box")
    assert db.wait_status(first, timeout=30)["stdout"] == "linked\n"
    sshd.stop()
    try:
        job_id = db.insert("echo back", node_id="box", max_attempts=1)
        requeued = wait_for(lambda: [e for e in daemon.events("job.requeued") if e["job_id"] == job_id],
                            timeout=20, message="the job back in the queue")[0]
        assert "not started yet" in requeued["error"]
        row = db.job(job_id)
        assert (row["status"], row["attempt"], row["started_at"]) == ("queued", 0, None), row
        assert "it waits for the node" in row["error"]
    finally:
        sshd.start()
    row = db.wait_status(job_id, timeout=60)
    assert (row["status"], row["stdout"], row["attempt"], row["error"]) == ("completed", "back\n", 1, None)
    assert not [e for e in daemon.events("job.finished") if e["job_id"] == job_id and e["status"] == "failed"]


@pytest.mark.parametrize("default_cwd", ["home", "~/work", "absolute"])
def test_a_remote_job_without_cwd_runs_in_the_nodes_default_and_what_it_writes_outlives_its_spool(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon], default_cwd: str) -> None:
    """Without a cwd, a job runs in the node user's home (or its node's default_cwd), never in its spool: what it
    writes there stays after the row is final and the spool is removed."""
    directory = {"home": sshd.home, "~/work": sshd.home / "work", "absolute": sshd.root / "elsewhere"}[default_cwd]
    directory.mkdir(exist_ok=True)
    shutil.chown(directory, sshd.user)
    setting = {"home": {}, "~/work": {"default_cwd": "~/work"}, "absolute": {"default_cwd": str(directory)}}
    daemon_factory(config=FAST + sshd.node_config(**setting[default_cwd])).start()
    name = f"result-{uuid.uuid4().hex[:8]}.txt"
    job_id = db.insert(f"echo important > {name}; pwd", node_id="box")
    row = db.wait_status(job_id, timeout=30)
    assert (row["status"], row["stdout"]) == ("completed", f"{directory}\n"), row
    spool_dir = sshd.home / ".cache" / "nexus-jobd" / "jobs" / spool.dir_name(f"{job_id}:1")
    wait_for(lambda: not spool_dir.exists(), timeout=20, message="the spool removed")
    assert (directory / name).read_text() == "important\n"
    # A relative cwd is taken from the same directory; one that starts with '-' is a directory, never an option.
    (directory / "-L").mkdir(exist_ok=True)
    relative = db.wait_status(db.insert("pwd", node_id="box", cwd="-L"), timeout=30)
    assert (relative["status"], relative["stdout"]) == ("completed", f"{directory}/-L\n")
    for cwd in ("-", "-P", "--", "no-such-dir"):
        missing = db.wait_status(db.insert("pwd", node_id="box", cwd=cwd), timeout=30)
        assert (missing["status"], missing["exit_code"], missing["stdout"]) == ("failed", 127, ""), (cwd, missing)
        assert f"./{cwd}" in missing["stderr"]  # the shell's reason names the directory


def test_a_missing_node_default_cwd_fails_the_job_with_127(sshd: Sshd, db: Db,
                                                           daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config(default_cwd="~/no-such-directory")).start()
    row = db.wait_status(db.insert("pwd", node_id="box"), timeout=30)
    assert (row["status"], row["exit_code"], row["stdout"]) == ("failed", 127, "")
    assert "no-such-directory" in row["stderr"]


def _command_lines() -> list[bytes]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes())
            except OSError:
                continue
    return found


def test_a_remote_jobs_environment_is_in_no_command_line_on_the_node(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """Every user of a node may read every process's command line (`ps`): the row's variables never go there,
    and the job still sees each of them exactly (an unset one unset)."""
    daemon_factory(config=FAST + sshd.node_config()).start()
    secret, go = f"s3cret-{uuid.uuid4().hex}", sshd.home / f"go-{uuid.uuid4().hex[:8]}"
    awkward = "two\nlines 'quoted' \"$HOME\" `x` \\ end"
    job_id = db.insert(f'echo "token=$API_TOKEN"; while [ ! -e {go} ]; do sleep 0.05; done; printf %s "$AWKWARD"; '
                       'echo; echo "${SSH_CONNECTION-unset}"', node_id="box",
                       env={"API_TOKEN": secret, "AWKWARD": awkward, "SSH_CONNECTION": None})
    wait_for(lambda: db.job(job_id)["stdout"] == f"token={secret}\n", timeout=30, message="running remotely")
    leaks = [line for line in _command_lines() if secret.encode() in line]
    go.touch()
    assert leaks == []
    row = db.wait_status(job_id, timeout=30)
    assert (row["status"], row["stdout"]) == ("completed", f"token={secret}\n{awkward}\nunset\n")


def test_a_command_that_starts_with_a_dash_is_a_command_locally_and_remotely(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config()).start()
    for node in ("localhost", "box"):
        row = db.wait_status(db.insert("-x 2>/dev/null; echo ran", node_id=node), timeout=30)
        assert (row["status"], row["stdout"]) == ("completed", "ran\n"), (node, row)


@pytest.mark.anyio
async def test_the_variables_of_a_docker_command_run_for_a_job_are_in_no_command_line_either(
        sshd: Sshd, tmp_path: Path) -> None:
    """`docker stop` and `docker ps` run on the node with the job's variables (DOCKER_HOST and the row's env)."""
    from daemon.config import Overrides, load
    from daemon.executors.ssh import SshExecutor
    from daemon.model import Command

    config_file = tmp_path / "node.toml"
    config_file.write_text(sshd.node_config())
    executor = SshExecutor(load(Overrides(config_path=str(config_file)), environ={}).nodes["box"])
    secret = f"s3cret-{uuid.uuid4().hex}"
    try:
        task = asyncio.create_task(executor.output(
            Command(argv=("sh", "-c", 'sleep 1; printf %s "$TOKEN"'), cwd=None, env={"TOKEN": secret}), 30))
        seen = []
        while not task.done():
            seen += [line for line in _command_lines() if b"sleep 1" in line]
            await asyncio.sleep(0.02)
        assert await task == secret
    finally:
        await executor.aclose()
    assert seen and not [line for line in seen if secret.encode() in line]
