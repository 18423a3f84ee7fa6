"""Rows as the API shows them: JSON-ready dicts (text that is not UTF-8 escaped), nodes with their health from
their heartbeat's age, daemons with whether their lease is alive."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

SUSPECT_AFTER_BEATS = 3  # a node whose last heartbeat is older than this many heartbeat intervals is `suspect`


def _default(value: Any) -> Any:
    if isinstance(value, bytes):  # RawText: TEXT another program stored that is not UTF-8
        return value.decode("utf-8", "backslashreplace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, default=_default, separators=(",", ":")).encode()


def capabilities(text: Any) -> dict[str, Any]:
    """A node's capabilities column (JSON a daemon wrote); what another program put there is shown as an error."""
    try:
        caps = json.loads(text) if text else {}
    except (ValueError, TypeError):
        return {"error": "capabilities are not JSON"}
    return caps if isinstance(caps, dict) else {"error": "capabilities are not a JSON object"}


def node(row: dict[str, Any], heartbeat_interval_ms: int) -> dict[str, Any]:
    """online / suspect (online, but no heartbeat for SUSPECT_AFTER_BEATS intervals) / offline / error."""
    beat, now = row.get("last_heartbeat"), row.get("now")
    age = now - beat if isinstance(beat, int) and isinstance(now, int) else None
    status = row.get("status")
    if status == "online" and (age is None or age > SUSPECT_AFTER_BEATS * heartbeat_interval_ms):
        status = "suspect"
    caps = capabilities(row.get("capabilities"))
    return {"id": row.get("id"), "hostname": row.get("hostname"), "ipAddress": row.get("ip_address"),
            "status": status, "statusInTable": row.get("status"), "lastHeartbeat": beat, "heartbeatAgeMs": age,
            "capabilities": caps, "error": caps.get("error"), "running": row.get("running"),
            "queued": row.get("queued")}


def daemon(row: dict[str, Any], lease_ttl_ms: int) -> dict[str, Any]:
    if row.get("stopped_at") is not None:
        state = "stopped"
    elif row["now"] - row["heartbeat_at"] > lease_ttl_ms:
        state = "not answering"
    else:
        state = "alive"
    return {"id": row["id"], "host": row["host"], "pid": row["pid"], "startedAt": row["started_at"],
            "heartbeatAt": row["heartbeat_at"], "heartbeatAgeMs": row["now"] - row["heartbeat_at"],
            "stoppedAt": row["stopped_at"], "stopReason": row["stop_reason"], "running": row["running"],
            "state": state}


def page_cursor(rows: Sequence[dict[str, Any]], limit: int) -> str | None:
    """The `before` of the next page: the last row's created_at and id, when the page is full."""
    if len(rows) < limit or not rows:
        return None
    last = rows[-1]
    if not isinstance(last.get("created_at"), int) or not isinstance(last.get("id"), str):
        return None
    return f"{last['created_at']}.{last['id']}"


def parse_page_cursor(text: str) -> tuple[int, str]:
    created, sep, job_id = text.partition(".")
    if not sep or not created.isdigit() or not job_id:
        raise ValueError(f"before={text[:80]!r} is not a page cursor: use the `next` of the previous page")
    return int(created), job_id
