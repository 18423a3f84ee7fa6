"""The suite's own rules: a test run leaves nothing in the checkout (tests/conftest.py: what it sees, and what it
lets be), and the unit layer starts no process (tests/unit/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CHECKOUT, checkout_files


def test_new_files_and_directories_are_seen_and_tools_own_are_not(tmp_path: Path) -> None:
    for path in ["daemon/model.py", ".venv/bin/python", ".venv-3.13/bin/python", ".git/HEAD",
                 "daemon/__pycache__/model.pyc", "nexus_jobd.egg-info/PKG-INFO", ".hypothesis/examples/x",
                 "tests/nodejs/node_modules/sql.js/x.js", ".mypy_cache/x", ".ruff_cache/x", ".pytest_cache/x"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    before = checkout_files(tmp_path)
    assert before == {"daemon", "daemon/model.py", "tests", "tests/nodejs"}
    (tmp_path / "None").write_bytes(b"SQLite format 3\\0")
    (tmp_path / "None-wal").write_bytes(b"")
    (tmp_path / "tests" / "nodejs" / "jobs.db").write_bytes(b"")  # ignored by .gitignore, seen all the same
    (tmp_path / "empty").mkdir()
    assert checkout_files(tmp_path) - before == {"None", "None-wal", "tests/nodejs/jobs.db", "empty"}


def test_the_check_looks_at_this_checkout() -> None:
    assert (CHECKOUT / "pyproject.toml").is_file() and "daemon/dispatch/dispatcher.py" in checkout_files(CHECKOUT)


def test_a_unit_test_that_starts_a_process_fails_and_says_where_it_belongs() -> None:
    for start in (lambda: subprocess.run(["true"], check=False), lambda: os.system("true"),
                  lambda: asyncio.run(asyncio.create_subprocess_exec("true"))):
        with pytest.raises(AssertionError, match=r"tests/unit starts no process.*move this test to tests/integration"):
            start()
