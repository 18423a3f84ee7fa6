-- The daemon's own columns on `jobs`: all nullable or defaulted, so a plain INSERT of the base columns works.
-- An ADD COLUMN whose column already exists is skipped by the runner, which makes this file idempotent.
ALTER TABLE jobs ADD COLUMN error TEXT;             -- why the daemon failed the job, beyond an exit code
ALTER TABLE jobs ADD COLUMN cwd TEXT;               -- working directory; NULL = the configured default
ALTER TABLE jobs ADD COLUMN env TEXT;               -- JSON object of extra environment variables
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;  -- higher runs first
ALTER TABLE jobs ADD COLUMN stdout_bytes INTEGER;   -- bytes the job wrote to stdout (the row may hold fewer)
ALTER TABLE jobs ADD COLUMN stderr_bytes INTEGER;
ALTER TABLE jobs ADD COLUMN worker_id TEXT;         -- the daemon instance that claimed the job
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;   -- bumped at each claim
CREATE INDEX IF NOT EXISTS jobd_jobs_claim ON jobs(status, node_id, priority DESC, created_at);
