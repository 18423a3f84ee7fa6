"""What a fresh interpreter loads with the daemon: nothing it does not need (asyncssh only for an SSH node,
prometheus_client only with [metrics])."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_daemon_does_not_import_asyncssh() -> None:
    """asyncssh costs ~18 MB of RSS: only a config with an SSH node may load it."""
    code = "import sys, daemon.cli, daemon.service, daemon.dispatch; print('asyncssh' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_without_metrics_prometheus_client_is_never_imported() -> None:
    # Everything `nexus-jobd run` imports, and an SSH node's executor: none of it pulls prometheus_client in.
    code = ("import sys, daemon.cli, daemon.service, daemon.dispatch, daemon.metrics, daemon.executors.ssh; "
            "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
