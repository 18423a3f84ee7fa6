-- Lifecycle: timeouts, retries, scheduling, dependencies, and the leases that make crash recovery possible.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS timeout_ms BIGINT;                 -- NULL: the configured default
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS max_attempts INTEGER NOT NULL DEFAULT 1;  -- 1 = no retry
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS run_after BIGINT;                  -- epoch ms: do not start before
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS depends_on TEXT;                   -- a job id that must complete first
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS pid INTEGER;                       -- the job's process group, on the
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS pid_start BIGINT;                  -- worker's host, and its start time

-- One row per daemon process: the lease on its running jobs is its heartbeat.
CREATE TABLE IF NOT EXISTS jobd_workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    boot_id TEXT,
    pid INTEGER NOT NULL,
    pid_start BIGINT,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    stopped_at BIGINT,
    stop_reason TEXT,
    nodes TEXT                 -- JSON array of the node ids it serves
);
CREATE INDEX IF NOT EXISTS jobd_jobs_worker ON jobs(worker_id, status);
