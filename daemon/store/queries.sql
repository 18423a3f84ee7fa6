-- Named queries: `-- name: NAME` then one statement. Parsed once at import by daemon.store.queries.
-- Times the daemon records are read from SQLite's clock inside the statement, in epoch milliseconds, so they
-- are taken when the write happens, not when it was queued behind another program's lock.

-- name: fail_unknown_nodes
-- Fail queued rows whose node_id names no configured node; :nodes is a JSON array of node ids.
UPDATE jobs
   SET status = 'failed', error = :error, duration = 0,
       started_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
       completed_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
 WHERE status = 'queued'
   AND (node_id IS NULL OR node_id NOT IN (SELECT value FROM json_each(:nodes)))
RETURNING id, node_id;

-- name: claim_jobs
-- One atomic compare-and-set from queued to executing, highest priority first, then oldest.
UPDATE jobs
   SET status = 'executing', worker_id = :worker_id, attempt = attempt + 1,
       started_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
       error = NULL, exit_code = NULL, completed_at = NULL, duration = NULL,
       stdout = NULL, stderr = NULL, stdout_bytes = NULL, stderr_bytes = NULL
 WHERE id IN (SELECT id FROM jobs
               WHERE status = 'queued' AND node_id = :node_id
               ORDER BY priority DESC, created_at, rowid
               LIMIT :limit)
   AND status = 'queued'
RETURNING id, node_id, tool, command, cwd, env, priority, attempt, started_at, created_at, rowid;
-- RETURNING gives rows in no promised order: Store.claim sorts them as the ORDER BY above.

-- name: write_output
-- Live output of a running job; a NULL stream parameter keeps that column as it is.
UPDATE jobs
   SET stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status IN ('executing', 'cancelled')
   AND duration IS NULL;  -- set by finish_job: a late flush never overwrites a cancelled row's final output

-- name: finish_job
-- The terminal write: compare-and-set on our claim; a row another program cancelled stays cancelled.
UPDATE jobs
   SET status = CASE status WHEN 'cancelled' THEN 'cancelled' ELSE :status END,
       exit_code = :exit_code, error = :error,
       stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       completed_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
       duration = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - started_at
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status IN ('executing', 'cancelled')
   AND duration IS NULL;

-- name: unfinished_claims
-- Which of :claims (a JSON array of [id, attempt]) finish_job will take: the same predicate, read first in the
-- same transaction, so nothing can change in between.
SELECT j.id
  FROM jobs AS j JOIN json_each(:claims) AS c
    ON j.id = json_extract(c.value, '$[0]') AND j.attempt = json_extract(c.value, '$[1]')
 WHERE j.worker_id = :worker_id AND j.status IN ('executing', 'cancelled') AND j.duration IS NULL;

-- name: finished_claims
-- The status and duration finish_job left on the rows of :claims.
SELECT j.id, j.status, j.duration
  FROM jobs AS j JOIN json_each(:claims) AS c
    ON j.id = json_extract(c.value, '$[0]') AND j.attempt = json_extract(c.value, '$[1]')
 WHERE j.worker_id = :worker_id;

-- name: cancelled_among
-- Which of our running jobs (:ids, a JSON array) another program has cancelled.
SELECT id FROM jobs
 WHERE status = 'cancelled' AND worker_id = :worker_id AND id IN (SELECT value FROM json_each(:ids));

-- name: cancel_jobs
-- What `nexus-jobd cancel` does: exactly NexusCLI's cancel, limited to jobs that have not ended.
UPDATE jobs SET status = 'cancelled', completed_at = :now
 WHERE id IN (SELECT value FROM json_each(:ids)) AND status IN ('queued', 'executing')
RETURNING id;

-- name: insert_job
INSERT INTO jobs (id, node_id, tool, command, status, created_at, cwd, env, priority)
VALUES (:id, :node_id, :tool, :command, 'queued', :now, :cwd, :env, :priority);

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: find_job_ids
-- Ids starting with :prefix (a unique prefix names a job); LIKE would treat _ and % in ids as wildcards.
SELECT id FROM jobs WHERE substr(id, 1, length(:prefix)) = :prefix LIMIT 2;

-- name: list_jobs
-- Everything but the output itself, which can be megabytes a row.
SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
       priority, attempt, worker_id, stdout_bytes, stderr_bytes
  FROM jobs
 WHERE (:status IS NULL OR status = :status) AND (:node_id IS NULL OR node_id = :node_id)
 ORDER BY created_at DESC, rowid DESC
 LIMIT :limit;

-- name: data_version
PRAGMA data_version;

-- name: applied_migrations
SELECT name FROM jobd_migrations;

-- name: record_migration
INSERT INTO jobd_migrations (name, applied_at) VALUES (:name, :now);
