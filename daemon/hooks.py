"""What the parts of the daemon report as they work: to the metrics (Hooks, which the exporter overrides) and to the
wake lock (Activity); no-op implementations, so that nothing below them needs to know whether either is on."""

from __future__ import annotations

from daemon.model import ClaimedJob


class Hooks:
    """What the dispatcher, the lease and the SSH executors report as they work. This one records nothing: the
    daemon without [metrics]."""

    def job_claimed(self, job: ClaimedJob) -> None:
        """A row moved to `executing`."""

    def job_finished(self, node: str, tool: str, status: str, duration_ms: int | None) -> None:
        """The final write of a job this daemon ran took, with the row's status and duration."""

    def db_write_error(self) -> None:
        """A `db.write_failed` or `dispatch.db_error` was logged."""

    def ssh_reconnected(self, node: str) -> None:
        """The pooled connection to an SSH node was opened again, after the first time."""

    def job_killed_outside(self, node: str) -> None:
        """A local job died by a SIGKILL that nothing of nexus-jobd sent (Android's phantom process killer, the OOM
        killer, a person's kill -9)."""


class Activity:
    """Told when the dispatcher gets its first running job and when its last one has ended: what the wake lock
    follows. This one does nothing (off Termux, or [android] wake_lock = "never")."""

    def busy(self) -> None:
        """A job started while none ran."""

    def idle(self) -> None:
        """The last running job ended."""
