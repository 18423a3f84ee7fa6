"""`nexus-jobd doctor`: what a set-up lacks, each answer with its fix. On Termux: termux-services and this service,
the Termux:Boot script, the wake lock's commands, battery optimisation and the phantom process killer (as far as an
app can see them); everywhere: whether SQLite's locking holds on the database's filesystem."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon import locking
from daemon.config import Config

OK, MISSING, FAILED, UNKNOWN = "ok", "missing", "failed", "unknown"
SERVICE = "nexus-jobd"
BOOT_MARKERS = ("start-services", "service-daemon", "runsvdir")  # what a boot script that starts termux-services says
PHANTOM_PROPERTY = "persist.sys.fflag.override.settings_enable_monitor_phantom_procs"  # Android 14's developer option
PHANTOM_FIX = ("adb shell device_config put activity_manager max_phantom_processes 2147483647 (from a computer, "
               "or Termux's own adb over wireless debugging), or on Android 14 and later: Settings > Developer "
               "options > Disable child process restrictions (README: Android (Termux), The phantom process "
               "killer)")


@dataclass(frozen=True)
class Finding:
    check: str
    state: str  # ok, missing, failed (something does not work), unknown (an app cannot see it)
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def examine(config: Config, home: Path) -> list[Finding]:
    """Every check that applies here, in the order a user fixes them."""
    findings = _termux(config, home) if config.android.termux else []
    return [*findings, _locking(config)]


def _termux(config: Config, home: Path) -> list[Finding]:
    prefix = Path(config.android.prefix)
    path = config.android.path
    return [_services(prefix, path), _service(prefix), _boot(home), _wake_lock(config, path), _battery(),
            _phantom(path)]


def _services(prefix: Path, path: str) -> Finding:
    if shutil.which("service-daemon", path=path) and (prefix / "var" / "service").is_dir():
        return Finding("termux-services", OK, "installed")
    return Finding("termux-services", MISSING, "runit's service daemon (termux-services) is not installed",
                   "pkg install termux-services, then open a new Termux session (it starts the service daemon)")


def _service(prefix: Path) -> Finding:
    service = prefix / "var" / "service" / SERVICE
    if not os.access(service / "run", os.X_OK):
        return Finding(f"service {SERVICE}", MISSING, f"no executable {service / 'run'}",
                       "copy termux-services/nexus-jobd into $PREFIX/var/service/ (README: termux-services)")
    if (service / "down").exists():
        return Finding(f"service {SERVICE}", MISSING, "installed but not enabled (it has a `down` file)",
                       f"sv-enable {SERVICE}")
    try:
        state = (service / "supervise" / "stat").read_text().partition(",")[0].strip()  # runsv's "run, want down"
    except OSError:
        state = ""
    if state != "run":
        return Finding(f"service {SERVICE}", FAILED, f"enabled, but runit says {state or 'nothing (not supervised)'}",
                       f"sv up {SERVICE}; if it stops again, see $PREFIX/var/log/sv/{SERVICE}/current; if runit "
                       "does not run, open a new Termux session")
    return Finding(f"service {SERVICE}", OK, "enabled and running")


def _boot(home: Path) -> Finding:
    boot = home / ".termux" / "boot"
    scripts = sorted(p for p in boot.iterdir() if p.is_file()) if boot.is_dir() else []
    starting = [p for p in scripts if os.access(p, os.X_OK) and any(m in _text(p) for m in BOOT_MARKERS)]
    not_seen = "whether the Termux:Boot app is installed, and was opened once, cannot be seen from Termux"
    if starting:
        return Finding("Termux:Boot", OK, f"{starting[0]} starts termux-services at boot ({not_seen})")
    return Finding("Termux:Boot", MISSING, f"no executable script in {boot} starts termux-services ({not_seen})",
                   "install the Termux:Boot app, open it once, and copy termux-services/boot/start-services to "
                   "~/.termux/boot/ (chmod +x)")


def _wake_lock(config: Config, path: str) -> Finding:
    setting = f'[android] wake_lock = "{config.android.wake_lock}"'
    if config.android.wake_lock == "never":
        return Finding("wake lock", OK, f"{setting}: the daemon leaves Termux's wake lock to you")
    missing = [c for c in ("termux-wake-lock", "termux-wake-unlock") if shutil.which(c, path=path) is None]
    if missing:
        return Finding("wake lock", MISSING, f"{setting}, but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not on PATH",
                       "pkg install termux-tools")
    return Finding("wake lock", OK, f"{setting}; termux-wake-lock and termux-wake-unlock are there")


def _battery() -> Finding:
    return Finding("battery optimisation", UNKNOWN, "Android does not let Termux read whether it is exempt",
                   "Settings > Apps > Termux > Battery > Unrestricted (\"Don't optimise\"), so that Doze does not "
                   "stop it between the wake lock's turns")


def _phantom(path: str) -> Finding:
    sdk = _getprop("ro.build.version.sdk", path)
    if sdk.isdigit() and int(sdk) < 31:
        return Finding("phantom process killer", OK, f"Android API {sdk}: before Android 12, which brought it")
    if _getprop(PHANTOM_PROPERTY, path) == "false":
        return Finding("phantom process killer", OK, "child process restrictions are disabled")
    return Finding("phantom process killer", UNKNOWN,
                   f"{'Android API ' + sdk + ': ' if sdk else ''}Android 12 and later kill an app's child processes "
                   "beyond 32 of all apps together (max_phantom_processes, which Termux cannot read), or one that "
                   "uses much CPU in the background", PHANTOM_FIX)


def _locking(config: Config) -> Finding:
    name = "SQLite locking"
    if config.db_url is not None:
        return Finding(name, OK, "PostgreSQL: its server does the locking")
    try:
        reason = locking.problem(config.db_path)
    except locking.Unchecked as e:
        return Finding(name, UNKNOWN, str(e), f"create {config.db_path.parent} and run doctor again")
    if reason is not None:
        return Finding(name, FAILED, f"on the filesystem of {config.db_path}: {reason}; the daemon refuses it",
                       "put the database on storage of this system's own (on Termux its home), not on shared "
                       "storage such as /sdcard: [database] path, or --db")
    return Finding(name, OK, f"a second process's lock holds on the filesystem of {config.db_path}")


def _getprop(name: str, path: str) -> str:
    program = shutil.which("getprop", path=path)
    if program is None:
        return ""
    try:
        result = subprocess.run([program, name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip()


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[:65536]
    except OSError:
        return ""
