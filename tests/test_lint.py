"""The code stays ruff- and mypy-clean: checked with the suite, so CI enforces it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import VENV_BIN

ROOT = Path(__file__).parent.parent


def test_ruff_is_clean() -> None:
    result = subprocess.run([str(VENV_BIN / "ruff"), "check", "daemon", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    """The daemon and the benchmarks (strict by pyproject.toml's [tool.mypy], which names the same files)."""
    result = subprocess.run([str(VENV_BIN / "mypy"), "daemon", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
