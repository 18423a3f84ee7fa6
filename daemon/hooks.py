"""What the parts of the daemon report as they work (metrics listen): one no-op implementation, which the metrics
exporter overrides, so that nothing below the exporter needs to know whether metrics are on."""

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
