"""Structured logs via structlog: JSON lines when stderr is not a TTY (journald, svlogd), console on a TTY."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

from daemon.errors import shorten

MAX_VALUE_CHARS = 1000  # a logged value longer than this (a row's 5 MB `tool`) keeps its start and its end


class _LossyStream:
    """stderr, but a log line that cannot be written (a full disk, a closed pipe) is dropped, never raised: a
    daemon must not stop running jobs because its log cannot take a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog once for the process; `fmt` is auto | json | console."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            _cap_values,  # before the traceback is added: that one is kept whole
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _LossyStream(sys.stderr))),
        cache_logger_on_first_use=False,
    )
    _bound.clear()  # loggers bound under the old configuration (a SIGHUP may change the level)
    warnings.showwarning = _show_warning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """A library's warning (a deprecation, say) as one log event: printed as Python prints it, its lines of text
    would break a JSON log."""
    get("python").warning("python.warning", category=category.__name__, message=str(message),
                          where=f"{filename}:{lineno}")


_second: list[Any] = [-1, ""]  # the last whole second stamped, and its text


def _timestamp(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """ISO 8601 in UTC to the microsecond, as structlog's TimeStamper(fmt="iso", utc=True) writes it, with the
    date and time formatted once a second: two events per job, and datetime's formatting cost 2 us each."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    event["timestamp"] = f"{_second[1]}.{int((now - second) * 1_000_000):06d}Z"
    return event


_SCALARS = frozenset({int, float, bool, type(None)})


def _cap_values(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        cls = value.__class__
        if cls is str:  # most values, then numbers and None: by class, not isinstance (7 us an event, then 2)
            if len(value) > MAX_VALUE_CHARS:
                event[key] = shorten(value, MAX_VALUE_CHARS)
        elif cls not in _SCALARS:
            event[key] = _capped(value)
    return event


def _capped(value: Any) -> Any:
    if isinstance(value, str):
        return shorten(value, MAX_VALUE_CHARS)
    if isinstance(value, dict):
        return {_capped(k): _capped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_capped(v) for v in value]
    return value


_bound: dict[str, Any] = {}  # component -> its bound logger, under the current configuration


class _Component:
    """structlog's lazy proxy binds a new logger at every call (a tenth of the daemon's time per job went to
    logging, a quarter of it to that); this one binds once per configuration."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, method: str) -> Any:
        logger = _bound.get(self._name)
        if logger is None:
            logger = _bound[self._name] = structlog.get_logger().bind(component=self._name)
        return getattr(logger, method)


def get(name: str) -> Any:
    """A logger tagged with the component that emits the events."""
    return _Component(name)
