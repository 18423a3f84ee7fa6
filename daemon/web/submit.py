"""A job submitted over HTTP: NexusCLI's body ({command, tool, nodeId, workingDir, timeout, conversationId,
messageId}) and the daemon's own columns, checked field by field; a bad one is refused with the field's name."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from daemon.config import TOOLS
from daemon.tools import ENV_NAME, MAX_ATTEMPTS, MAX_COMMAND_BYTES, MAX_TIMEOUT_MS

NEXUSCLI_TIMEOUT_MS = 30000  # NexusCLI's default `timeout`; null asks for the daemon's own default instead
INT64 = 2**63 - 1
FIELDS = ("command", "tool", "nodeId", "workingDir", "timeout", "conversationId", "messageId", "env", "priority",
          "delay", "runAfter", "maxAttempts", "dependsOn")


class BadRequest(ValueError):
    """What is wrong with a request, in words for its sender (a 4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Submission:
    command: str
    tool: str
    node_id: str
    cwd: str | None
    timeout_ms: int | None
    conversation_id: str | None
    message_id: str | None
    env: dict[str, str] | None
    priority: int
    delay_ms: int | None
    max_attempts: int
    depends_on: str | None


def _text(body: dict[str, Any], key: str, default: str | None = None, *, required: bool = False) -> str | None:
    value = body.get(key, default)
    if value is None:
        if required:
            raise BadRequest(f"{key} is required" if key != "command" else "Command is required")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise BadRequest(f"{key} contains a NUL character (\\u0000), which no command, path or id can hold")
    if required and not value.strip():
        raise BadRequest("Command is required" if key == "command" else f"{key} must not be empty")
    return value


def _integer(body: dict[str, Any], key: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{key} must be an integer from {low} to {high}, got {str(value)[:40]!r}")
    return value


def _env(body: dict[str, Any]) -> dict[str, str] | None:
    env = body.get("env")
    if env is None:
        return None
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise BadRequest("env must be an object of strings, e.g. {\"NAME\": \"value\"}")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise BadRequest(f"env: {name[:40]!r} is not a variable name (letters, digits and _, not first a digit)")
        if "\0" in value:
            raise BadRequest(f"env: {name} contains a NUL character")
    return env or None


def _delay(body: dict[str, Any]) -> int | None:
    delay = _integer(body, "delay", 0, MAX_TIMEOUT_MS, None)
    run_after = _integer(body, "runAfter", 0, INT64, None)
    if delay is not None and run_after is not None:
        raise BadRequest("give delay (ms from now) or runAfter (epoch ms), not both")
    if run_after is not None:
        delay = max(0, run_after - time.time_ns() // 1_000_000)
    return delay or None


def parse(body: Any) -> Submission:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object, e.g. {\"command\": \"echo hi\"}")
    if unknown := sorted(set(body) - set(FIELDS)):
        raise BadRequest(f"unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}")
    command = _text(body, "command", required=True)
    assert command is not None
    if len(command.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
        raise BadRequest(f"command is longer than {MAX_COMMAND_BYTES} bytes", 413)
    tool = _text(body, "tool", "bash")
    if tool not in TOOLS:
        raise BadRequest(f"tool must be one of {', '.join(TOOLS)}, got {str(tool)[:40]!r}")
    node_id = _text(body, "nodeId", "localhost")
    if not node_id:
        raise BadRequest("nodeId must not be empty")
    return Submission(
        command=command, tool=str(tool), node_id=node_id, cwd=_text(body, "workingDir") or None,
        timeout_ms=_integer(body, "timeout", 1, MAX_TIMEOUT_MS, NEXUSCLI_TIMEOUT_MS) if body.get("timeout", 0)
        is not None else None,
        conversation_id=_text(body, "conversationId") or None, message_id=_text(body, "messageId") or None,
        env=_env(body), priority=_integer(body, "priority", -INT64 - 1, INT64, 0) or 0, delay_ms=_delay(body),
        max_attempts=_integer(body, "maxAttempts", 1, MAX_ATTEMPTS, 1) or 1,
        depends_on=_text(body, "dependsOn") or None)
