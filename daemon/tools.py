"""A claimed row -> the argv, working directory and environment to run; a row that cannot run -> BadJob.

bash runs `bash -c -- COMMAND` (a command starting with `-` is a command, not options); git and docker get argv
from shlex and never pass through a shell.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.config import LIMITS
from daemon.errors import BadJob
from daemon.model import ClaimedJob, Command, RawText

# Linux's MAX_ARG_STRLEN: no single argument (bash -c's script included) may be longer, NUL included.
MAX_COMMAND_BYTES = 128 * 1024 - 1
# NexusCLI appends its metadata to a command as one last line: `<command>\n# {"json": ...}`.
_METADATA_LINE = re.compile(r"\n#[ \t]*(\{.*\})[ \t]*\Z")
# What every shell accepts as a variable name: anything else would be an option to `env` or a syntax error on a
# node, and no program can read it back from its environment there.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


REFUSED = "nexus-jobd: this node refused [limits]"


def with_limits(argv: tuple[str, ...], limits: Mapping[str, int]) -> tuple[str, ...]:
    if not limits:
        return argv
    return ("sh", "-c", f"{ulimit_script(limits)}; exec \"$@\"", "nexus-jobd-limits", *argv)


def ulimit_script(limits: Mapping[str, int]) -> str:
    """POSIX sh that sets `limits` (config.LIMITS keys), or exits 125 naming the key the host refused (above
    its hard limit, for a user that may not raise it): the job stops rather than run unlimited."""
    steps = []
    for key, value in limits.items():
        flag, unit = LIMITS[key]
        count = max(1, value // unit)
        if key == "cpu_seconds":
            # SIGXCPU at the soft limit names the reason in the row; the hard limit a second later kills a job
            # that ignores it. Soft first: a hard limit below the current soft one is refused.
            step = f"ulimit -S -t {count} && ulimit -H -t {count + 1}"
        elif key == "processes":
            step = f"{{ ulimit -u {count} 2>/dev/null || ulimit -p {count}; }}"  # dash and mksh say -p
        else:
            step = f"ulimit {flag} {count}"
        steps.append(f"{{ {step} || {{ echo '{REFUSED} {key} = {value}' >&2; exit 125; }}; }}")
    return "; ".join(steps)


def strip_metadata(command: str) -> str:
    """Drop NexusCLI's trailing `# {json}` line, only when it really is a JSON object."""
    match = _METADATA_LINE.search(command)
    if match:
        try:
            if isinstance(json.loads(match.group(1)), dict):
                return command[: match.start()]
        except ValueError:
            pass
    return command


def _text(job: ClaimedJob, column: str, value: Any, *, allow_empty: bool = False) -> str:
    if isinstance(value, RawText):
        raise BadJob(f"{column} is not valid UTF-8 text (byte {value.bad_byte()}: {str(value)!r:.60}); "
                     "store it as UTF-8 text")
    if isinstance(value, bytes):
        raise BadJob(f"{column} must be text, got blob; store it as TEXT (UTF-8)")
    if not isinstance(value, str):
        raise BadJob(f"{column} must be text, got {type(value).__name__} {value!r:.60}")
    if "\x00" in value:
        raise BadJob(f"{column} contains a NUL byte, which no program can receive as an argument")
    if not allow_empty and not value.strip():
        raise BadJob(f"{column} is empty; nothing to run" if column != "cwd" else
                     "cwd is empty: give a directory, or NULL for the default working directory")
    return value


def _env_text(raw: Any) -> str:
    if isinstance(raw, RawText):
        raise BadJob(f"env is not valid UTF-8 text (byte {raw.bad_byte()}); store it as UTF-8 JSON text")
    if not isinstance(raw, str):
        kind = "blob" if isinstance(raw, bytes) else f"{type(raw).__name__} {raw!r:.60}"
        raise BadJob(f"env must be a JSON object in a TEXT column, got {kind}")
    return raw


def parse_env(raw: Any) -> dict[str, str | None]:
    """The row's `env` column: a JSON object of NAME -> string (numbers are converted; null unsets NAME)."""
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(_env_text(raw), parse_constant=_no_constant, parse_float=_finite)
    except ValueError as e:
        raise BadJob(f"env is not valid JSON ({e}); expected an object like {{\"NAME\": \"value\"}}") from e
    if not isinstance(value, dict):
        raise BadJob(f"env must be a JSON object like {{\"NAME\": \"value\"}}, got {type(value).__name__}")
    env: dict[str, str | None] = {}
    for name, item in value.items():
        if not ENV_NAME.fullmatch(name):
            raise BadJob(f"env has an invalid variable name {name!r:.60}: names are letters, digits and _, not "
                         "starting with a digit (like MY_VAR)")
        env[name] = _env_value(name, item)
    return env


def _no_constant(name: str) -> float:
    """NaN and Infinity, which Python's json takes and JSON does not: no program would mean them."""
    raise BadJob(f"env holds {name}, which is no JSON number; give a number or a string")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJob(f"env holds the number {text:.60}, too large for a double (it would be {value}); give it as a "
                     "string")
    return value


def _env_value(name: str, item: Any) -> str | None:
    if item is None or (isinstance(item, str) and "\x00" not in item and _is_utf8(item)):
        return item
    if isinstance(item, int | float) and not isinstance(item, bool):
        return str(item)
    if isinstance(item, str) and "\x00" not in item:
        raise BadJob(f"env[{name!r}] holds a lone UTF-16 surrogate (a \\ud800-style escape without its pair), "
                     "which no environment can carry; escape whole characters")
    raise BadJob(f"env[{name!r}] must be a string, a number or null, got JSON {json.dumps(item)[:60]}")


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _args(tool: str, command: str) -> tuple[str, ...]:
    try:
        args = shlex.split(command)
    except ValueError as e:
        raise BadJob(f"command cannot be split into {tool} arguments: {e}") from e
    if args and args[0] == tool:
        args = args[1:]  # `git status` means `status`
    if not args:
        raise BadJob(f"command has no {tool} arguments; e.g. `status` for git or `ps -a` for docker")
    return (tool, *args)


def build(job: ClaimedJob, allowed_tools: tuple[str, ...], *, allowed_commands: tuple[re.Pattern[str], ...] = (),
          docker_host: str | None = None) -> Command:
    """Validate a claimed row and turn it into a Command; raises BadJob with the reason for the row."""
    tool = _text(job, "tool", job.tool)
    if tool not in allowed_tools:
        raise BadJob(f"unknown tool {tool!r}; node {job.node_id!r} runs: {', '.join(allowed_tools)}")
    command = strip_metadata(_text(job, "command", job.command))
    if len(command.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
        raise BadJob(
            f"command is longer than {MAX_COMMAND_BYTES} bytes, the most Linux passes as one argument; "
            "put long scripts in a file and run that"
        )
    command = _text(job, "command", command)
    if not isinstance(job.priority, int):
        raise BadJob(f"priority must be an integer, got {job.priority!r:.60}")
    if tool == "bash" and allowed_commands and not any(p.fullmatch(command) for p in allowed_commands):
        raise BadJob(f"command is not allowed on node {job.node_id!r}: it matches none of its allowed_commands")
    cwd = None if job.cwd is None else _text(job, "cwd", job.cwd)
    env = _tool_env(docker_host) | parse_env(job.env)
    key = f"{job.id}:{job.attempt}"
    if tool == "bash":
        return Command(argv=("bash", "-c", "--", command), cwd=cwd, env=env, key=key)
    argv = _args(tool, command)
    if tool == "docker":
        labels = (f"nexus-jobd.job={job.id}", f"nexus-jobd.attempt={job.attempt}")
        labelled = label_container(argv, *labels)
        return Command(argv=labelled, cwd=cwd, env=env, key=key, container_labels=labels if labelled != argv else ())
    return Command(argv=argv, cwd=cwd, env=env, key=key)


def _tool_env(docker_host: str | None) -> dict[str, str | None]:
    """What every job gets unless its row's env says otherwise: no credential prompt can hang a job (git gives
    up instead of asking; no askpass helper pops up), and the node's Docker engine."""
    env: dict[str, str | None] = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": None, "SSH_ASKPASS": None}
    if docker_host is not None:
        env["DOCKER_HOST"] = docker_host
    return env


# docker's global options that take a value as the next argument (`docker --context ci run ...`).
_DOCKER_VALUE_OPTIONS = {"-c", "--context", "--config", "-H", "--host", "-l", "--log-level", "--tlscacert",
                         "--tlscert", "--tlskey"}


def label_container(argv: tuple[str, ...], *labels: str) -> tuple[str, ...]:
    """`docker [global options] [container] run|create ...` gets `--label LABEL` for each label right after the
    subcommand, so the container can be found and stopped: killing the docker client alone leaves it running."""
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _DOCKER_VALUE_OPTIONS else 1
    if i < len(argv) and argv[i] == "container":
        i += 1
    if i < len(argv) and argv[i] in ("run", "create"):
        return (*argv[: i + 1], *(arg for label in labels for arg in ("--label", label)), *argv[i + 1 :])
    return argv


@dataclass(frozen=True)
class RunPolicy:
    """How long one attempt may run and how many attempts the row allows."""

    timeout_ms: int | None
    max_attempts: int


MAX_TIMEOUT_MS = 366 * 24 * 3600 * 1000  # a year: anything longer is a mistake, not a timeout
MAX_ATTEMPTS = 1000


def policy(job: ClaimedJob, default_timeout_ms: int | None) -> RunPolicy:
    """The row's timeout_ms (NULL: the configured default) and max_attempts; raises BadJob when malformed."""
    timeout = job.timeout_ms if job.timeout_ms is not None else default_timeout_ms
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or not 0 < timeout <= MAX_TIMEOUT_MS):
        raise BadJob(f"timeout_ms must be NULL or an integer from 1 to {MAX_TIMEOUT_MS} (a year), got {timeout!r:.60}")
    attempts = job.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_ATTEMPTS:
        raise BadJob(f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS}, got {attempts!r:.60}")
    return RunPolicy(timeout, attempts)
