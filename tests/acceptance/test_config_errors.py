"""A configuration the daemon cannot use stops `nexus-jobd run` at start-up with exit 2 and one message naming the
file and what to fix, never a traceback (what is said is tested in tests/unit/test_config.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import NEXUS_JOBD
from tests.unit.test_config import LATIN1, write


def test_a_huge_number_stops_the_daemon_at_start_up_with_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    home.mkdir()
    for setting in ("[daemon]\nmax_concurrent = 99999999999999999999\n",
                    "[database]\nretention_days = 9999999999999999999\n"):
        path = write(tmp_path, setting, "huge.toml")
        result = subprocess.run([*NEXUS_JOBD, "--config", str(path), "--db", str(tmp_path / "jobs.db"), "run"],
                                capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(home)},
                                cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"{path}: [" in result.stderr and "expected an integer from" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_config_file_that_is_not_utf8_stops_start_up_with_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    home.mkdir()
    path = tmp_path / "latin1.toml"
    path.write_bytes(LATIN1)
    result = subprocess.run([*NEXUS_JOBD, "--config", str(path), "--db", str(tmp_path / "jobs.db"), "run"],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(home)},
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"configuration error: {path}: not UTF-8 text: byte 0xe9 at offset 12" in result.stderr
    assert "Traceback" not in result.stderr
