"""What a daemon leaves beside a file another program rewrote: a report of what it found and did, and the results
it could not record. The next daemon on a usable file reads them back, so no result is lost and no job runs twice.

Files, all 0600 beside the database: `<db>.rewritten-<UTC time>.json` (the report, which `nexus-jobd status` prints)
and `<db>.rewritten-<UTC time>.jobs.jsonl` (one JSON object per result, appended and fsynced as jobs end).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REWRITTEN = "rewritten-"


def new_suffix(path: Path) -> str:
    """`rewritten-<UTC time>`, with a counter if two land in the same second: a report is never replaced."""
    base = suffix = _REWRITTEN + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 1
    while report_path(path, suffix).exists() or Path(f"{path}-wal.{suffix}").exists():
        n += 1
        suffix = f"{base}-{n}"
    return suffix


def report_path(path: Path, suffix: str) -> Path:
    return Path(f"{path}.{suffix}.json")


def results_path(path: Path, suffix: str) -> Path:
    return Path(f"{path}.{suffix}.jobs.jsonl")


def write_private(path: Path, text: str, *, append: bool) -> None:
    """Create (0600) or append, and fsync: what it holds may be the only record of a job's end."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        data = text.encode("utf-8", "surrogateescape")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write (or rewrite) a report whole: a temporary file renamed over it, so a reader never sees half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_private(tmp, json.dumps(report, indent=2, default=str) + "\n", append=False)
    os.replace(tmp, path)


def _reports(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The reports beside the database that can be read, oldest first (by when each rewrite was found)."""
    found = []
    for report in path.parent.glob(f"{glob.escape(path.name)}.{_REWRITTEN}*.json"):
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found.append((report, data))
    return sorted(found, key=lambda item: (item[1].get("detected_at") or 0, str(item[0])))


def latest_report(path: Path) -> dict[str, Any] | None:
    """The newest report beside the database file, or None."""
    reports = _reports(path)
    return reports[-1][1] | {"report": str(reports[-1][0])} if reports else None


@dataclass(frozen=True)
class Pending:
    """A report whose results and running jobs no daemon has applied to the file yet."""

    report: Path
    data: dict[str, Any]
    results: list[dict[str, Any]]  # the last result of each attempt, in the order they were kept

    def mark_applied(self, applied: dict[str, Any]) -> None:
        write_report(self.report, self.data | {"applied_at": int(time.time() * 1000), "applied": applied})


def pending(path: Path) -> list[Pending]:
    """Reports not applied yet, oldest first; each with the results its daemon kept (a torn last line, from a
    daemon killed while appending, is skipped: that job's end is then unknown, as if it were still running)."""
    found = []
    for report, data in _reports(path):
        if data.get("applied_at") is not None:
            continue
        results: dict[tuple[str, int], dict[str, Any]] = {}
        with contextlib.suppress(OSError):
            for line in Path(str(data.get("results") or "")).read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("attempt"), int):
                        results[(row["id"], row["attempt"])] = row
        found.append(Pending(report, data, list(results.values())))
    return found
