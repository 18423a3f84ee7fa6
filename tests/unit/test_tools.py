"""daemon.tools: a claimed row -> argv/cwd/env, NexusCLI's metadata line, and BadJob for rows that cannot run."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.config import TOOLS
from daemon.errors import BadJob
from daemon.model import ClaimedJob, Command, RawText
from daemon.tools import MAX_COMMAND_BYTES, RunPolicy, build, parse_env, policy, strip_metadata, with_limits


def job(command: Any, tool: Any = "bash", *, cwd: Any = None, env: Any = None, priority: Any = 0,
        timeout_ms: Any = None, max_attempts: Any = 1) -> ClaimedJob:
    return ClaimedJob(id="job-1", node_id="localhost", tool=tool, command=command, cwd=cwd, env=env,
                      priority=priority, attempt=1, started_at=1_700_000_000_000, timeout_ms=timeout_ms,
                      max_attempts=max_attempts)


NO_PROMPTS = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": None, "SSH_ASKPASS": None}


def argv(command: Any, tool: Any = "bash") -> tuple[str, ...]:
    return build(job(command, tool), TOOLS).argv


# -- argv -----------------------------------------------------------------------------------------------------


def test_bash_runs_the_command_as_one_script() -> None:
    script = "echo 'a b' | tr a-z A-Z; exit 3"
    expected = Command(argv=("bash", "-c", "--", script), cwd=None, env=NO_PROMPTS, key="job-1:1")
    assert build(job(script), TOOLS) == expected


def test_bash_keeps_a_multiline_script_whole() -> None:
    script = "set -e\nfor i in 1 2; do echo $i; done\n"
    assert argv(script) == ("bash", "-c", "--", script)


@pytest.mark.parametrize("tool", ["git", "docker"])
def test_git_and_docker_get_argv_from_shlex(tool: str) -> None:
    assert argv("log --oneline -n 3", tool) == (tool, "log", "--oneline", "-n", "3")


@pytest.mark.parametrize("tool", ["git", "docker"])
def test_a_leading_tool_name_is_dropped(tool: str) -> None:
    assert argv(f"{tool} status", tool) == argv("status", tool) == (tool, "status")


def test_quoted_arguments_are_kept_whole() -> None:
    assert argv('commit -m "fix: a; b | c"', "git") == ("git", "commit", "-m", "fix: a; b | c")
    assert argv("run --rm alpine sh -c 'echo a && echo b'", "docker") == (
        "docker", "run", "--label", "nexus-jobd.job=job-1", "--label", "nexus-jobd.attempt=1", "--rm", "alpine",
        "sh", "-c", "echo a && echo b")


def test_git_and_docker_never_go_through_a_shell() -> None:
    # Shell syntax is passed on as literal arguments: nothing is expanded, chained or redirected.
    assert argv("status; rm -rf / && echo $HOME > out", "git") == (
        "git", "status;", "rm", "-rf", "/", "&&", "echo", "$HOME", ">", "out")
    assert "bash" not in argv("ps -a", "docker")


def test_cwd_and_env_are_passed_on() -> None:
    command = build(job("pwd", cwd="/srv/app", env='{"A": "1", "B": null}'), TOOLS)
    assert command.cwd == "/srv/app"
    assert command.env == {**NO_PROMPTS, "A": "1", "B": None}


def test_the_row_env_wins_over_the_defaults_and_docker_host_is_set() -> None:
    command = build(job("pwd", env='{"GIT_TERMINAL_PROMPT": "1"}'), TOOLS, docker_host="unix:///d.sock")
    assert command.env == {**NO_PROMPTS, "GIT_TERMINAL_PROMPT": "1", "DOCKER_HOST": "unix:///d.sock"}


@pytest.mark.parametrize(("command", "expected"), [
    ("run --rm img true", ("docker", "run", "--label", "L", "--rm", "img", "true")),
    ("--context ci -H unix:///x container create img", ("docker", "--context", "ci", "-H", "unix:///x",
                                                        "container", "create", "--label", "L", "img")),
    ("ps -a", ("docker", "ps", "-a")),
    ("image ls", ("docker", "image", "ls")),
])
def test_docker_run_and_create_get_the_job_label(command: str, expected: tuple[str, ...]) -> None:
    from daemon.tools import label_container

    assert label_container(("docker", *command.split()), "L") == expected
    if "L" in expected:
        at = expected.index("L")
        assert label_container(("docker", *command.split()), "L", "M") == (
            *expected[: at + 1], "--label", "M", *expected[at + 1:])


def test_only_containers_started_by_the_job_are_labelled() -> None:
    assert build(job("run img true", "docker"), TOOLS).container_labels == ("nexus-jobd.job=job-1",
                                                                            "nexus-jobd.attempt=1")
    assert build(job("ps -a", "docker"), TOOLS).container_labels == ()


def test_a_blob_is_refused_even_when_its_bytes_are_valid_utf8() -> None:
    """Decided (issue 15): text columns hold TEXT; a BLOB fails the row like a BLOB id always did."""
    with pytest.raises(BadJob, match=r"command must be text, got blob"):
        argv("echo é".encode())


# -- NexusCLI's metadata line ---------------------------------------------------------------------------------


def test_metadata_line_is_stripped() -> None:
    assert strip_metadata('echo hi\n# {"conversation":"x"}') == "echo hi"
    assert strip_metadata('echo hi\n#{"a": {"b": [1, 2]}}  ') == "echo hi"
    assert argv('echo hi\n# {"conversation":"x"}') == ("bash", "-c", "--", "echo hi")
    assert argv('status\n# {"conversation":"x"}', "git") == ("git", "status")


@pytest.mark.parametrize("command", [
    "echo hi\n# not json",
    "echo '#{'",
    "echo hi # {\"a\": 1}",              # not on a line of its own
    "echo hi\n# [1, 2]",                 # JSON, but not an object
    "echo hi\n# {\"a\": 1} trailing",    # more after the object
    "echo hi\n# {broken: json}",
    "# {\"a\": 1}\necho hi",             # not the last line
])
def test_other_comment_lines_are_kept(command: str) -> None:
    assert strip_metadata(command) == command
    assert argv(command) == ("bash", "-c", "--", command)


def test_a_command_that_is_only_metadata_is_empty() -> None:
    with pytest.raises(BadJob, match="command is empty"):
        build(job('\n# {"conversation": "x"}'), TOOLS)


# -- rows that cannot run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "message"), [
    (job("ls", "python"), r"unknown tool 'python'; node 'localhost' runs: bash, git, docker"),
    (job("ls", "Bash"), r"unknown tool 'Bash'"),
    (job("ls", None), r"tool must be text, got NoneType"),
    (job("ls", ""), r"tool is empty"),
    (job(""), r"command is empty"),
    (job(" \n\t "), r"command is empty"),
    (job("echo a\x00b"), r"command contains a NUL byte"),
    (job(42), r"command must be text, got int 42"),
    (job(None), r"command must be text, got NoneType"),
    (job(b"echo \xff\xfe"), r"command must be text, got blob"),
    (job(RawText(b"echo \xff\xfe")), r"command is not valid UTF-8 text \(byte 5: 'echo \\\\xff\\\\xfe'\)"),
    (job("ls", RawText(b"ba\xffsh")), r"tool is not valid UTF-8 text \(byte 2"),
    (job("commit -m 'unbalanced", "git"), r"command cannot be split into git arguments: No closing quotation"),
    (job('run "alpine', "docker"), r"command cannot be split into docker arguments"),
    (job("git", "git"), r"command has no git arguments"),
    (job("  docker  ", "docker"), r"command has no docker arguments"),
    (job("ls", priority="5"), r"priority must be an integer, got '5'"),
    (job("ls", priority=1.5), r"priority must be an integer, got 1.5"),
    (job("ls", priority=None), r"priority must be an integer, got None"),
    (job("ls", cwd=7), r"cwd must be text, got int"),
    (job("ls", cwd="/tmp\x00x"), r"cwd contains a NUL byte"),
    (job("ls", env="{nope"), r"env is not valid JSON"),
])
def test_rows_that_cannot_run_raise_badjob_naming_the_problem(row: ClaimedJob, message: str) -> None:
    with pytest.raises(BadJob, match=message):
        build(row, TOOLS)


def test_a_tool_the_node_does_not_run_is_rejected() -> None:
    assert argv("status", "git") == ("git", "status")
    with pytest.raises(BadJob, match=r"unknown tool 'git'; node 'localhost' runs: bash$"):
        build(job("status", "git"), ("bash",))


def test_command_length_limit_is_the_longest_single_argument() -> None:
    assert argv("x" * MAX_COMMAND_BYTES) == ("bash", "-c", "--", "x" * MAX_COMMAND_BYTES)
    with pytest.raises(BadJob, match=rf"command is longer than {MAX_COMMAND_BYTES} bytes"):
        build(job("x" * (MAX_COMMAND_BYTES + 1)), TOOLS)


def test_command_length_is_counted_in_utf8_bytes() -> None:
    chars = MAX_COMMAND_BYTES // 2 + 1  # fewer characters than the limit, more bytes
    assert chars < MAX_COMMAND_BYTES < len(("é" * chars).encode())
    with pytest.raises(BadJob, match="command is longer than"):
        build(job("é" * chars), TOOLS)


def test_metadata_does_not_count_towards_the_length_limit() -> None:
    command = "x" * MAX_COMMAND_BYTES + '\n# {"conversation": "x"}'
    assert argv(command) == ("bash", "-c", "--", "x" * MAX_COMMAND_BYTES)


# -- env ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, ""])
def test_no_env_is_an_empty_mapping(raw: Any) -> None:
    assert parse_env(raw) == {}


def test_env_values_strings_numbers_and_null() -> None:
    raw = '{"S": "text", "EMPTY": "", "I": 42, "NEG": -1, "F": 1.5, "UNSET": null, "_lower_9": "spaces ok"}'
    assert parse_env(raw) == {"S": "text", "EMPTY": "", "I": "42", "NEG": "-1", "F": "1.5", "UNSET": None,
                              "_lower_9": "spaces ok"}


def test_env_as_a_blob_or_as_text_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(BadJob, match=r"env must be a JSON object in a TEXT column, got blob"):
        parse_env(b'{"A": "\xc3\xa9"}')
    with pytest.raises(BadJob, match=r"env is not valid UTF-8 text \(byte 7\)"):
        parse_env(RawText(b'{"A": "\xff"}'))


@pytest.mark.parametrize(("raw", "message"), [
    ("not json", r"env is not valid JSON"),
    ('{"A": 1', r"env is not valid JSON"),
    ('["A", "B"]', r"env must be a JSON object .*got list"),
    ('"A=1"', r"env must be a JSON object .*got str"),
    ("null", r"env must be a JSON object .*got NoneType"),
    (42, r"env must be a JSON object in a TEXT column, got int 42"),
    ('{"": "x"}', r"env has an invalid variable name ''"),
    ('{"A=B": "x"}', r"env has an invalid variable name 'A=B'"),
    ('{"A\\u0000": "x"}', r"env has an invalid variable name 'A\\x00'"),
    # Names a shell can set and a program can read: one starting with '-' was an option to `env` on a node.
    ('{"-i": "x"}', r"env has an invalid variable name '-i': names are letters, digits and _"),
    ('{"-u": "PATH"}', r"env has an invalid variable name '-u'"),
    ('{"A B": "x"}', r"env has an invalid variable name 'A B'"),
    ('{"A-B": "x"}', r"env has an invalid variable name 'A-B'"),
    ('{"1X": "x"}', r"env has an invalid variable name '1X'"),
    ('{"\\u00c9T\\u00c9": "x"}', r"env has an invalid variable name 'ÉTÉ'"),
    ('{"A": "\\ud800"}', r"env\['A'\] holds a lone UTF-16 surrogate"),
    ('{"A": {"nested": 1}}', r"env\['A'\] must be a string, a number or null"),
    ('{"A": [1]}', r"env\['A'\] must be a string, a number or null"),
    ('{"A": true}', r"env\['A'\] must be a string, a number or null, got JSON true"),
    ('{"A": [false, null]}', r"env\['A'\] must be a string, a number or null, got JSON \[false, null\]"),
    ('{"A": NaN}', r"env holds NaN, which is no JSON number; give a number or a string"),
    ('{"A": -Infinity}', r"env holds -Infinity, which is no JSON number"),
    ('{"A": 1e400}', r"env holds the number 1e400, too large for a double \(it would be inf\)"),
    ('{"A": -1E+999}', r"env holds the number -1E\+999"),
    ('{"A": "x\\u0000y"}', r"env\['A'\] must be a string, a number or null"),
])
def test_bad_env_raises_badjob(raw: Any, message: str) -> None:
    with pytest.raises(BadJob, match=message):
        parse_env(raw)
    with pytest.raises(BadJob, match=message):
        build(job("ls", env=raw), TOOLS)


def test_policy_takes_the_row_then_the_default() -> None:
    assert policy(job("true"), None) == RunPolicy(None, 1)
    assert policy(job("true"), 5000) == RunPolicy(5000, 1)
    assert policy(job("true", timeout_ms=250, max_attempts=3), 5000) == RunPolicy(250, 3)


@pytest.mark.parametrize(("columns", "message"), [
    ({"timeout_ms": 0}, "timeout_ms must be NULL or an integer from 1"),
    ({"timeout_ms": -5}, "timeout_ms must be NULL or an integer from 1"),
    ({"timeout_ms": "soon"}, "timeout_ms must be NULL or an integer from 1"),
    ({"timeout_ms": 10**15}, "timeout_ms must be NULL or an integer from 1"),
    ({"max_attempts": 0}, "max_attempts must be an integer from 1 to 1000"),
    ({"max_attempts": "3"}, "max_attempts must be an integer from 1 to 1000"),
    ({"max_attempts": 10**6}, "max_attempts must be an integer from 1 to 1000"),
])
def test_policy_rejects_absurd_values(columns: dict[str, Any], message: str) -> None:
    with pytest.raises(BadJob, match=message):
        policy(job("true", **columns), None)


# -- resource limits ------------------------------------------------------------------------------------------

def test_no_limits_no_wrapper() -> None:
    assert with_limits(("bash", "-c", "true"), {}) == ("bash", "-c", "true")



def test_an_empty_cwd_says_what_to_give() -> None:
    """Before: "cwd is empty; nothing to run", though the command was there to run."""
    with pytest.raises(BadJob, match=r"^cwd is empty: give a directory, or NULL for the default working "
                                     r"directory$"):
        build(job("true", cwd=" "), TOOLS)
