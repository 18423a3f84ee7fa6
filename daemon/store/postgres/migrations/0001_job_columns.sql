-- The daemon's own columns on `jobs`: all nullable or defaulted, so a plain INSERT of the base columns works.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS error TEXT;            -- why the daemon failed the job
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cwd TEXT;              -- working directory; NULL = the default
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS env TEXT;              -- JSON object of extra environment variables
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS priority BIGINT NOT NULL DEFAULT 0;   -- higher first; 64 bits as SQLite
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS stdout_bytes BIGINT;   -- bytes the job wrote (the row may hold fewer)
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS stderr_bytes BIGINT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS worker_id TEXT;        -- the daemon instance that claimed the job
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS attempt INTEGER NOT NULL DEFAULT 0;  -- bumped at each claim
CREATE INDEX IF NOT EXISTS jobd_jobs_claim ON jobs(status, node_id, priority DESC, created_at);
