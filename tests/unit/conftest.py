"""The unit layer starts no process and no server: every test here runs in this interpreter, in milliseconds. A
test that needs a real shell, daemon, keeper, sshd or database server belongs in tests/integration or
tests/acceptance; one that tries to start a process here fails and says so."""

from __future__ import annotations

import _posixsubprocess
import os
import subprocess
from typing import NoReturn

import pytest


def _refuse(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("tests/unit starts no process (see tests/unit/conftest.py): move this test to "
                         "tests/integration or tests/acceptance, or use the fakes of tests/unit/core/fakes.py")


@pytest.fixture(autouse=True)
def _no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What every way of starting a process goes through (subprocess, asyncio, multiprocessing, os.system)."""
    monkeypatch.setattr(_posixsubprocess, "fork_exec", _refuse)
    monkeypatch.setattr(subprocess, "_fork_exec", _refuse, raising=False)  # its own reference to fork_exec
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse)
