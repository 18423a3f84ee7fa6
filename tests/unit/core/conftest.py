"""Fixtures of the core's unit tests: the log events a test caused, and the recorder's and the dispatcher's back-off
sleeps recorded and taken at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import structlog

from daemon import logging as log
from daemon.dispatch import dispatcher, recorder

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A hang fails in seconds, not at the suite's 300 s: each of these tests takes milliseconds."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.timeout(30))


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """The events logged during the test (the daemon's loggers are bound once: they are bound again here)."""
    monkeypatch.setattr(log, "_bound", {})
    with structlog.testing.capture_logs() as captured:
        yield captured
    log._bound.clear()


class Sleeps:
    """The recorder's sleeps, recorded and taken at once (a yield to the loop); `during[d]` runs at a sleep of d."""

    def __init__(self) -> None:
        self.taken: list[float] = []
        self.during: dict[float, Callable[[], object]] = {}

    async def sleep(self, delay: float) -> None:
        self.taken.append(delay)
        if (hook := self.during.pop(delay, None)) is not None:
            hook()
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Sleeps:
    fake = Sleeps()
    monkeypatch.setattr(recorder, "anyio", SimpleNamespace(sleep=fake.sleep, CancelScope=anyio.CancelScope))
    return fake


@pytest.fixture
def loop_sleeps(monkeypatch: pytest.MonkeyPatch) -> Sleeps:
    """The dispatcher loop's back-off after a database error, recorded and taken at once."""
    fake = Sleeps()
    monkeypatch.setattr(dispatcher, "anyio", SimpleNamespace(sleep=fake.sleep,
                                                              create_task_group=anyio.create_task_group))
    return fake
