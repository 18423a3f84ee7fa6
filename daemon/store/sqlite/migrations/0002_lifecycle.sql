-- Lifecycle: timeouts, retries, scheduling, dependencies, and the leases that make crash recovery possible.
ALTER TABLE jobs ADD COLUMN timeout_ms INTEGER;                      -- NULL: the configured default
ALTER TABLE jobs ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 1; -- 1 = no retry
ALTER TABLE jobs ADD COLUMN run_after INTEGER;                       -- epoch ms: do not start before
ALTER TABLE jobs ADD COLUMN depends_on TEXT;                         -- a job id that must complete first
ALTER TABLE jobs ADD COLUMN pid INTEGER;                             -- the job's process group, on the worker's host
ALTER TABLE jobs ADD COLUMN pid_start INTEGER;                       -- its start time (clock ticks since boot)

-- One row per daemon process: the lease on its running jobs is its heartbeat.
CREATE TABLE IF NOT EXISTS jobd_workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    boot_id TEXT,              -- the host's boot: pids and start times mean something only within one boot
    pid INTEGER NOT NULL,
    pid_start INTEGER,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    stopped_at INTEGER,        -- set on a clean exit, or by the daemon that recovered its jobs
    stop_reason TEXT,
    nodes TEXT                 -- JSON array of the node ids it serves: rows for them are not "unknown"
);
CREATE INDEX IF NOT EXISTS jobd_jobs_worker ON jobs(worker_id, status);
