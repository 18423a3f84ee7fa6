"""The README and config.example.toml say what the code does: every config key in the example, at its default;
every log event in the README's table, with only fields the code logs; the set-up's packages; --help on URLs."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import config

ROOT = Path(__file__).parent.parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = ROOT / "config.example.toml"
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


# -- config.example.toml -------------------------------------------------------------------------------------

def accepted_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Table -> the keys config.load reads from it (every node's as `nodes.<id>`), found by loading a file that
    takes every branch (a local node with limits, an SSH node with a key file, metrics)."""
    key = tmp_path / "id_test"
    key.write_text("not read here")
    key.chmod(0o600)
    path = tmp_path / "all.toml"
    path.write_text(f'[nodes.localhost.limits]\ncpu_seconds = 1\n[nodes.pi]\nhost = "h"\nkey = "{key}"\n'
                    '[metrics]\nlisten = "127.0.0.1:9479"\n')
    read: dict[str, set[str]] = {}
    get = config._Section.get

    def recording(section: config._Section, name: str) -> object:
        table = re.sub(r"^nodes\.[^.]+", "nodes.<id>", section.prefix)
        read.setdefault(table, set()).add(name)
        return get(section, name)

    monkeypatch.setattr(config._Section, "get", recording)
    config.load(config.Overrides(config_path=str(path)), environ={"HOME": str(tmp_path)})
    read["nodes.<id>"].discard("password")  # read only to refuse it, with the fix
    del read["top level"]
    return read


def example_keys() -> dict[str, set[str]]:
    """Table -> the keys config.example.toml shows, set or commented out (`# key = ...`). A commented-out table
    (`# [metrics]`) holds the commented keys up to the next blank line; a table's subtable shows its key."""
    shown: dict[str, set[str]] = {}
    table = commented = "top level"
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        text = line.removeprefix("#").strip()
        if not line.strip():
            commented = table
        elif match := re.fullmatch(r"\[([\w.]+)\]", text):
            commented = re.sub(r"^nodes\.[^.]+", "nodes.<id>", match.group(1))
            parent, _, key = commented.rpartition(".")
            shown.setdefault(parent or "top level", set()).add(key)
            if not line.startswith("#"):
                table = commented
        elif match := re.match(r"(\w+) = ", text):
            shown.setdefault(commented if line.startswith("#") else table, set()).add(match.group(1))
    return shown


def test_every_key_the_config_takes_is_in_the_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: config.example.toml said it lists every key, and lacked [daemon] keeper."""
    accepted, shown = accepted_keys(tmp_path, monkeypatch), example_keys()
    for table, keys in accepted.items():  # [nodes.<id>]: the local node's and the SSH node's together
        missing = keys - shown.get(table, set())
        assert not missing, f"[{table}] keys missing from config.example.toml: {sorted(missing)}"


def test_the_example_sets_the_built_in_defaults(tmp_path: Path) -> None:
    """It says "every key, set to its built-in default": loading it changes nothing but where the settings came
    from (the local node's limits and the SSH node are commented out)."""
    environ = {"HOME": str(tmp_path)}
    (tmp_path / "home").mkdir()
    from_example = config.load(config.Overrides(config_path=str(EXAMPLE)), environ=environ)
    assert replace(from_example, source=config.NO_FILE) == config.load(environ=environ)


def test_the_example_says_what_on_stop_does_to_local_jobs() -> None:
    """Before: "local jobs always drain"; under the keeper (the default) they detach like remote ones."""
    text = EXAMPLE.read_text(encoding="utf-8")
    on_stop = text[text.rindex("\n\n", 0, text.index("\non_stop = ")):text.index("\non_stop = ")]
    assert "always drain" not in on_stop and "keeper" in on_stop, on_stop


# -- the README's log table ------------------------------------------------------------------------------------

def logged_events() -> dict[str, set[str]]:
    """Every event the daemon logs (`logger.info("job.claimed", job_id=...)`, or an event name chosen just before
    the call) -> the fields its calls pass."""
    events: dict[str, set[str]] = {}
    for path in (ROOT / "daemon").rglob("*.py"):
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            chosen = {target.id: names(node.value) for node in ast.walk(function) if isinstance(node, ast.Assign)
                      for target in node.targets if isinstance(target, ast.Name)}
            for call in ast.walk(function):
                if not (isinstance(call, ast.Call) and call.args and logs(call.func)):
                    continue
                first = call.args[0]
                for event in chosen.get(first.id, []) if isinstance(first, ast.Name) else names(first):
                    fields = events.setdefault(event, set())
                    fields |= {k.arg or "**" for k in call.keywords}  # `**action`: fields not known here
                    if any(k.arg == "exc_info" for k in call.keywords) or getattr(call.func, "attr", "") == \
                            "exception":
                        fields.add("exception")  # structlog's format_exc_info
    return events


def logs(func: ast.expr) -> bool:
    """A logger's method, or a variable holding one (`level = logger.info if ... else logger.warning`)."""
    return (isinstance(func, ast.Attribute) and func.attr in LOG_METHODS) or (
        isinstance(func, ast.Name) and func.id == "level")


def names(value: ast.expr) -> list[str]:
    """The event names an expression can be: a constant `component.event`, or either side of `a if c else b`."""
    if isinstance(value, ast.IfExp):
        return names(value.body) + names(value.orelse)
    if isinstance(value, ast.Constant) and isinstance(value.value, str) and re.fullmatch(r"[a-z_]+\.[a-z_]+",
                                                                                         value.value):
        return [value.value]
    return []


def readme_log_table() -> Iterator[tuple[list[str], list[str]]]:
    """(event names, field names) of each row of the README's table of log events."""
    section = README[README.index("\n## Logs\n"):README.index("\n## Signals and shutdown\n")]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            yield re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([a-z_]+)`", cells[2])


def test_every_logged_event_is_in_the_readmes_table() -> None:
    listed = {name for names, _ in readme_log_table() for name in names}
    missing = sorted(set(logged_events()) - listed)
    assert not missing, f"events the code logs that the README's log table lacks: {missing}"


def test_the_readme_lists_only_fields_the_code_logs() -> None:
    """Before: `dispatch.started` was listed with an `inotify` field; the code logs `push`."""
    events = logged_events()
    wrong = []
    for names, fields in readme_log_table():
        logged = set().union(*(events.get(name, set()) for name in names)) | {"event", "level", "component"}
        if "**" not in logged:
            wrong += [f"{'/'.join(names)}: {field}" for field in fields if field not in logged]
    assert not wrong, f"fields the README's log table lists that no call logs: {wrong}"


# -- set-up ------------------------------------------------------------------------------------------------------

def test_the_readme_names_every_package_the_test_set_up_installs() -> None:
    """Before: zsh, procps, coreutils, util-linux and openssh-client were installed but not named."""
    script = (ROOT / "scripts" / "install-test-deps").read_text(encoding="utf-8")
    packages = re.search(r"PACKAGES=\(([^)]*)\)", script)
    assert packages is not None
    said = README[README.index("**Run the tests.**"):README.index("```sh\nCI=true ./scripts/test")]
    missing = [p for p in packages.group(1).split() if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", said)]
    assert not missing, f"packages scripts/install-test-deps installs that the README's set-up omits: {missing}"


