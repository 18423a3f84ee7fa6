-- Named queries of the PostgreSQL backend: `-- name: NAME` then one statement; `:param` placeholders. Parsed once
-- at import by daemon.store.postgres.queries; run by name by the job store (daemon.store.jobs), which reads the rows
-- by their columns' names: a name (or an AS) here is what it asks for. NOW_MS stands for the database's clock in epoch milliseconds at the
-- start of the statement: every host's daemon writes times by the same clock, whatever its own says.

-- name: fail_unknown_nodes
-- Fail queued rows whose node_id names no node or pool that this daemon (:nodes, both) or another live daemon
-- serves.
UPDATE jobs
   SET status = 'failed', error = :error, duration = 0, started_at = NOW_MS, completed_at = NOW_MS
 WHERE status = 'queued'
   AND NOT (node_id = ANY(:nodes))
   AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w
                    WHERE w.stopped_at IS NULL AND w.nodes::jsonb ? jobs.node_id)
   AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w
                    WHERE w.stopped_at IS NULL AND w.pools IS NOT NULL AND w.pools::jsonb ? jobs.node_id)
RETURNING id, node_id;

-- name: claim_jobs
-- One atomic compare-and-set from queued to executing, highest priority first, then oldest. SKIP LOCKED: rows
-- another daemon is claiming right now are passed over, not waited for, so N daemons never block each other and
-- each row goes to one of them. The pick is a MATERIALIZED CTE: as a subquery of the UPDATE it may be evaluated
-- more than once, and with SKIP LOCKED each pass finds other rows (more than :limit in all). Only while this
-- daemon's lease is live.
WITH picked AS MATERIALIZED (
    SELECT id FROM jobs
     WHERE status = 'queued' AND node_id = :node_id
       AND attempt BETWEEN 0 AND 2147483646  -- attempt + 1 must fit; the others fail_malformed fails
       AND (run_after IS NULL OR run_after <= NOW_MS)
       AND (depends_on IS NULL
            OR EXISTS (SELECT 1 FROM jobs AS d WHERE d.id = jobs.depends_on AND d.status = 'completed'))
       AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
     ORDER BY priority DESC, created_at, id
     LIMIT :limit
       FOR UPDATE OF jobs SKIP LOCKED
)
UPDATE jobs
   SET status = 'executing', worker_id = :worker_id, attempt = attempt + 1, started_at = NOW_MS,
       error = NULL, exit_code = NULL, completed_at = NULL, duration = NULL,
       stdout = NULL, stderr = NULL, stdout_bytes = NULL, stderr_bytes = NULL, pid = NULL, pid_start = NULL,
       ran_on = jobs.node_id, attempt_nodes = jobd_attempt_nodes(jobs.attempt_nodes, jobs.attempt + 1, jobs.node_id)
  FROM picked
 WHERE jobs.id = picked.id AND jobs.status = 'queued'
RETURNING jobs.id, jobs.node_id, jobs.tool, jobs.command, jobs.cwd, jobs.env, jobs.priority, jobs.attempt,
          jobs.started_at, jobs.timeout_ms, jobs.max_attempts, jobs.created_at, jobs.node_id AS asked,
          jobs.id AS seq;
-- RETURNING gives rows in no promised order: the store's claim sorts them as the ORDER BY above (seq: the id).

-- name: pool_has_queued
-- Whether the pool has queued rows at all: a read on the claim index, so that a claim pass over pools with nothing
-- to place takes no write lock (SQLite) and opens no transaction.
SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND node_id = :pool) AS found;

-- name: pool_candidates
-- A pool's queued rows that could start now, in the claim's order, whose tool some member with room can run
-- (:tools); at most :limit. Locked in the claim's transaction (SKIP LOCKED: another daemon placing the same pool
-- passes them over), so those placed are claimed by claim_placed before anyone else can take them.
SELECT id AS seq, tool, ran_on AS last_node FROM jobs
 WHERE status = 'queued' AND node_id = :pool AND tool = ANY(:tools)
   AND attempt BETWEEN 0 AND 2147483646
   AND (run_after IS NULL OR run_after <= NOW_MS)
   AND (depends_on IS NULL
        OR EXISTS (SELECT 1 FROM jobs AS d WHERE d.id = jobs.depends_on AND d.status = 'completed'))
   AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
 ORDER BY priority DESC, created_at, id
 LIMIT :limit
   FOR UPDATE OF jobs SKIP LOCKED;

-- name: claim_placed
-- The rows placement chose (:placed, a JSON object: id -> member) claimed as claim_jobs claims, each on its
-- member: node_id, what the row asked for, stays; ran_on and attempt_nodes say where this attempt runs.
UPDATE jobs
   SET status = 'executing', worker_id = :worker_id, attempt = attempt + 1, started_at = NOW_MS,
       error = NULL, exit_code = NULL, completed_at = NULL, duration = NULL,
       stdout = NULL, stderr = NULL, stdout_bytes = NULL, stderr_bytes = NULL, pid = NULL, pid_start = NULL,
       ran_on = p.node, attempt_nodes = jobd_attempt_nodes(jobs.attempt_nodes, jobs.attempt + 1, p.node)
  FROM jsonb_each_text(CAST(:placed AS jsonb)) AS p(id, node)
 WHERE jobs.id = p.id AND jobs.status = 'queued'
   AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
RETURNING jobs.id, p.node AS node_id, jobs.tool, jobs.command, jobs.cwd, jobs.env, jobs.priority, jobs.attempt,
          jobs.started_at, jobs.timeout_ms, jobs.max_attempts, jobs.created_at, jobs.node_id AS asked,
          jobs.id AS seq;

-- name: fail_toolless_pool_jobs
-- A pool's queued rows whose tool is none of those this daemon's members have (:tools), and none of those of any
-- other live daemon serving the pool (its jobd_workers.pools lists them): no member can ever run them.
UPDATE jobs
   SET status = 'failed', error = :error, duration = 0, started_at = NOW_MS, completed_at = NOW_MS
 WHERE status = 'queued' AND node_id = :pool AND NOT (tool = ANY(:tools))
   AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w
                    WHERE w.stopped_at IS NULL AND w.id != :worker_id AND w.pools IS NOT NULL
                      AND (w.pools::jsonb -> CAST(:pool AS text) -> 'tools') ? jobs.tool)
RETURNING id, tool;

-- name: fail_claimed_row
-- A row claim_jobs just took that cannot even be named. Never here (PostgreSQL's TEXT is always valid UTF-8): the
-- store asks any backend that returns a row whose id it cannot read.
UPDATE jobs
   SET status = 'failed', error = :error, completed_at = NOW_MS, duration = NOW_MS - started_at
 WHERE id = :seq AND worker_id = :worker_id AND status = 'executing' AND duration IS NULL;

-- name: fail_malformed
-- Queued rows that can never be claimed as they are (the column types refuse the rest of what SQLite lets another
-- program store): an attempt that is negative (it would get around max_attempts) or at the top of its type
-- (attempt + 1 would overflow, and fail the claim of the node's whole queue).
UPDATE jobs
   SET status = 'failed', duration = 0, started_at = NOW_MS, completed_at = NOW_MS,
       error = 'attempt must be a whole number from 0 to 2147483646 (how many times the daemon claimed the job: '
               || 'insert 0, or leave the column out), got ' || attempt
 WHERE status = 'queued' AND attempt NOT BETWEEN 0 AND 2147483646
RETURNING id, error;

-- name: write_output
-- Live output of a running job; a NULL stream parameter keeps that column as it is.
UPDATE jobs
   SET stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       pid = COALESCE(:pid, pid), pid_start = COALESCE(:pid_start, pid_start)
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status IN ('executing', 'cancelled')
   AND duration IS NULL;

-- name: finish_job
-- The terminal write: compare-and-set on our claim; a row another program cancelled stays cancelled. completed_at
-- is when the attempt ended (:late_ms before this write: a database that could not be reached for a while does not
-- lengthen the job), by the database's clock, and never before started_at.
UPDATE jobs
   SET status = CASE status WHEN 'cancelled' THEN 'cancelled' ELSE :status END,
       exit_code = :exit_code, error = :error,
       stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       completed_at = GREATEST(started_at, NOW_MS - :late_ms::bigint),
       duration = GREATEST(started_at, NOW_MS - :late_ms::bigint) - started_at
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status IN ('executing', 'cancelled')
   AND duration IS NULL;

-- name: unfinished_claims
-- Which of the claims (:ids with :attempts) finish_job will take: read first, in the same transaction, FOR UPDATE
-- so that nothing can change them in between.
SELECT j.id FROM jobs AS j JOIN unnest(:ids::text[], :attempts::int[]) AS c(id, attempt)
    ON j.id = c.id AND j.attempt = c.attempt
 WHERE j.worker_id = :worker_id AND j.status IN ('executing', 'cancelled') AND j.duration IS NULL
   FOR UPDATE OF j;

-- name: finished_claims
-- The status and duration finish_job or requeue_job left on the rows of the claims (by id: a requeue that does not
-- count the attempt took it back; the caller keeps only the rows unfinished_claims found ours).
SELECT j.id, j.status, j.duration FROM jobs AS j WHERE j.id = ANY(:ids::text[]);

-- name: requeue_job
-- A failed attempt of a job that may try again: back to queued (not before :run_after). :uncount (0 or 1) takes
-- the attempt back when nothing ran (its node did not answer): the next claim is the same attempt again.
UPDATE jobs
   SET status = 'queued', run_after = :run_after, exit_code = :exit_code, error = :error,
       attempt = attempt - :uncount,
       stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       started_at = NULL, completed_at = NULL, duration = NULL, worker_id = NULL, pid = NULL, pid_start = NULL
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status = 'executing' AND duration IS NULL;

-- name: fail_blocked_dependencies
-- Queued rows that can never start: the job they depend on ended another way than completed, is no job, or is
-- the row itself.
UPDATE jobs
   SET status = 'failed', duration = 0, started_at = NOW_MS, completed_at = NOW_MS,
       error = 'depends_on ' || quote_literal(depends_on) || ' ' || CASE
           WHEN depends_on = id
               THEN 'is this job itself: a job cannot wait for its own end; set depends_on to another job''s id, or NULL'
           ELSE COALESCE('ended ' || (SELECT d.status FROM jobs AS d WHERE d.id = jobs.depends_on), 'is no job')
                || '; this job runs only after that job completed'
       END
 WHERE status = 'queued' AND depends_on IS NOT NULL
   AND (depends_on = id
        OR NOT EXISTS (SELECT 1 FROM jobs AS d WHERE d.id = jobs.depends_on)
        OR EXISTS (SELECT 1 FROM jobs AS d WHERE d.id = jobs.depends_on AND d.status IN ('failed', 'cancelled')))
RETURNING id, depends_on;

-- name: queued_dependencies
SELECT id, depends_on FROM jobs WHERE status = 'queued' AND depends_on IS NOT NULL AND depends_on != id;

-- name: fail_in_cycle
UPDATE jobs
   SET status = 'failed', duration = 0, started_at = NOW_MS, completed_at = NOW_MS, error = :error
 WHERE id = :id AND status = 'queued'
RETURNING id, depends_on;

-- name: has_dependents
SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND depends_on IS NOT NULL) AS dependents;

-- name: next_run_after
SELECT min(run_after) AS run_after FROM jobs WHERE status = 'queued' AND run_after > NOW_MS;

-- name: retry_job
-- A finished job, or a row no daemon runs (stranded_jobs), queued again; attempts used up: one more.
UPDATE jobs
   SET status = 'queued', run_after = NULL, exit_code = NULL, error = NULL, started_at = NULL,
       completed_at = NULL, duration = NULL, worker_id = NULL, pid = NULL, pid_start = NULL,
       max_attempts = CASE WHEN max_attempts <= attempt THEN LEAST(attempt + 1, 1000) ELSE max_attempts END
 WHERE id = :id
   AND ((status IN ('completed', 'failed', 'cancelled') AND (duration IS NOT NULL OR worker_id IS NULL))
        OR status IS NULL OR status NOT IN ('queued', 'executing', 'completed', 'failed', 'cancelled')
        OR (status = 'executing' AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w WHERE w.id = jobs.worker_id)))
RETURNING id, attempt, max_attempts;

-- name: register_worker
INSERT INTO jobd_workers (id, host, boot_id, pid, pid_start, started_at, heartbeat_at, nodes, pools)
VALUES (:id, :host, :boot_id, :pid, :pid_start, NOW_MS, NOW_MS, :nodes, :pools);

-- name: worker_pools
UPDATE jobd_workers SET pools = :pools WHERE id = :id AND pools IS DISTINCT FROM :pools;

-- name: live_worker_pools
-- The pools each live daemon serves (its JSON: pool -> {members, tools}), for `nodes` and `status`.
SELECT id, pools FROM jobd_workers WHERE stopped_at IS NULL AND pools IS NOT NULL ORDER BY started_at, id;

-- name: heartbeat
UPDATE jobd_workers SET heartbeat_at = NOW_MS WHERE id = :id AND stopped_at IS NULL RETURNING id;

-- name: other_workers
SELECT id, host, boot_id, pid, pid_start, heartbeat_at, NOW_MS AS now FROM jobd_workers
 WHERE stopped_at IS NULL AND id != :id;

-- name: stop_worker
UPDATE jobd_workers SET stopped_at = NOW_MS, stop_reason = :reason WHERE id = :id AND stopped_at IS NULL
RETURNING id;

-- name: orphaned_jobs
SELECT id, attempt, max_attempts, pid, pid_start, COALESCE(ran_on, node_id) AS node_id FROM jobs
 WHERE worker_id = :worker_id AND status IN ('executing', 'cancelled') AND duration IS NULL;

-- name: fail_orphan
UPDATE jobs
   SET status = CASE status WHEN 'cancelled' THEN 'cancelled' ELSE 'failed' END, error = :error,
       completed_at = NOW_MS, duration = NOW_MS - started_at
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt
   AND status IN ('executing', 'cancelled') AND duration IS NULL;

-- name: requeue_orphan
UPDATE jobs
   SET status = 'queued', error = :error, started_at = NULL, completed_at = NULL, duration = NULL, worker_id = NULL,
       pid = NULL, pid_start = NULL
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status = 'executing' AND duration IS NULL;

-- name: adopt_job
UPDATE jobs
   SET worker_id = :worker_id
 WHERE id = :id AND worker_id = :old_worker_id AND attempt = :attempt
   AND status IN ('executing', 'cancelled') AND duration IS NULL
   AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
RETURNING id, COALESCE(ran_on, node_id) AS node_id, tool, command, cwd, env, priority, attempt, started_at,
          timeout_ms, max_attempts, created_at, node_id AS asked, status, stdout, stderr, stdout_bytes, stderr_bytes;

-- name: detached_jobs
SELECT j.worker_id, w.host, w.boot_id, j.id, j.attempt, j.max_attempts, j.pid, j.pid_start,
       COALESCE(j.ran_on, j.node_id) AS node_id
  FROM jobs AS j JOIN jobd_workers AS w ON w.id = j.worker_id
 WHERE j.status IN ('executing', 'cancelled') AND j.duration IS NULL
   AND COALESCE(j.ran_on, j.node_id) = ANY(:nodes) AND w.stopped_at IS NOT NULL;

-- name: attempts_on_node
-- A pool's row counts on every member an attempt of it ran on (ran_on is only the latest); the LIKE may find more
-- rows than ran there, which only lists attempts that left nothing on this node.
SELECT id, attempt, status IN ('executing', 'cancelled') AND duration IS NULL AS running FROM jobs
 WHERE (node_id = :node_id OR ran_on = :node_id OR attempt_nodes LIKE '%"' || :node_id || '"%') AND attempt > 0;

-- name: workers
SELECT w.id, w.host, w.pid, w.started_at, w.heartbeat_at, w.stopped_at, w.stop_reason, NOW_MS AS now,
       (SELECT count(*) FROM jobs WHERE worker_id = w.id AND status = 'executing')::int AS running
  FROM jobd_workers AS w ORDER BY w.started_at DESC;

-- name: cancelled_among
SELECT id, attempt FROM jobs WHERE status = 'cancelled' AND worker_id = :worker_id AND id = ANY(:ids);

-- name: cancel_job
-- A job that has not ended (a row no daemon runs included); held by no daemon, a started one is final at once.
UPDATE jobs SET status = 'cancelled', completed_at = NOW_MS,
       duration = CASE WHEN status = 'queued' OR EXISTS (SELECT 1 FROM jobd_workers AS w WHERE w.id = jobs.worker_id)
                       THEN duration
                       ELSE GREATEST(0, NOW_MS - started_at) END
 WHERE id = :id AND (status IS NULL OR status NOT IN ('completed', 'failed', 'cancelled'))
RETURNING id;

-- name: insert_job
INSERT INTO jobs (id, node_id, tool, command, status, created_at, cwd, env, priority, timeout_ms, max_attempts,
                  run_after, depends_on, conversation_id, message_id)
VALUES (:id, :node_id, :tool, :command, 'queued', NOW_MS, :cwd, :env, :priority, :timeout_ms, :max_attempts,
        NOW_MS + :delay_ms, :depends_on, :conversation_id, :message_id);  -- the database's clock, as every
                                                                         -- time the daemon writes

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: find_job_ids
-- Ids starting with :prefix; LIKE would treat _ and % in ids as wildcards.
SELECT id FROM jobs WHERE left(id, length(:prefix)) = :prefix LIMIT 2;

-- name: list_jobs
SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
       priority, attempt, max_attempts, run_after, depends_on, timeout_ms, worker_id, stdout_bytes, stderr_bytes,
       ran_on
  FROM jobs
 WHERE (:status::text IS NULL OR status = :status)
   AND (:node_id::text IS NULL OR node_id = :node_id OR ran_on = :node_id)
 ORDER BY created_at DESC, id DESC
 LIMIT :limit;

-- name: job_counts
SELECT (SELECT count(*) FROM jobs WHERE status = 'queued')::int AS queued,
       (SELECT count(*) FROM jobs WHERE status = 'executing')::int AS executing,
       (SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')
                                    AND completed_at >= NOW_MS - 60000)::int AS finished_last_minute,
       (SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')
                                    AND completed_at >= NOW_MS - 3600000)::int AS finished_last_hour;

-- name: prune_jobs
DELETE FROM jobs
 WHERE status = ANY(:statuses) AND completed_at < NOW_MS - :older_than_ms
   AND status IN ('completed', 'failed', 'cancelled')
   AND NOT EXISTS (SELECT 1 FROM jobs AS q WHERE q.status = 'queued' AND q.depends_on = jobs.id);

-- name: upsert_node
INSERT INTO nodes (id, hostname, ip_address, status, capabilities, last_heartbeat, created_at)
VALUES (:id, :hostname, :ip_address, 'offline', NULL, NULL, NOW_MS)
ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, ip_address = excluded.ip_address;

-- name: node_heartbeat
UPDATE nodes SET status = :status, capabilities = :capabilities, last_heartbeat = NOW_MS WHERE id = :id;

-- name: unserved_nodes_offline
UPDATE nodes SET status = 'offline'
 WHERE status != 'offline'
   AND NOT (id = ANY(:nodes))
   AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w WHERE w.stopped_at IS NULL AND w.nodes::jsonb ? nodes.id)
RETURNING id;

-- name: fail_node_jobs
UPDATE jobs
   SET status = 'failed', error = :error, duration = 0, started_at = NOW_MS, completed_at = NOW_MS
 WHERE status = 'queued' AND node_id = :node_id AND (:before::bigint IS NULL OR created_at < :before)
RETURNING id;

-- name: nodes_overview
SELECT n.id, n.hostname, n.ip_address, n.status, n.capabilities, n.last_heartbeat, NOW_MS AS now,
       (SELECT count(*) FROM jobs WHERE (ran_on = n.id OR (ran_on IS NULL AND node_id = n.id))
                                    AND status = 'executing')::int AS running,
       (SELECT count(*) FROM jobs WHERE node_id = n.id AND status = 'queued')::int AS queued
  FROM nodes AS n ORDER BY n.id;

-- name: applied_migrations
SELECT name FROM jobd_migrations;

-- name: record_migration
INSERT INTO jobd_migrations (name, applied_at) VALUES (:name, NOW_MS) ON CONFLICT (name) DO NOTHING;

-- name: migration_lock
-- Two daemons starting at once: one migrates, the other waits and then finds nothing to do.
SELECT pg_advisory_xact_lock(7468206542);

-- name: table_columns
SELECT table_name::text, column_name::text FROM information_schema.columns
 WHERE table_schema = current_schema() AND table_name = ANY(:tables);

-- name: table_kinds
SELECT table_name::text, table_type::text FROM information_schema.tables
 WHERE table_schema = current_schema() AND table_name = ANY(:tables);

-- name: live_daemons_serving
SELECT count(*)::int AS daemons FROM jobd_workers AS w
 WHERE w.stopped_at IS NULL AND w.heartbeat_at >= NOW_MS - :ttl_ms AND w.nodes::jsonb ? :node_id;

-- name: queue_by_node
-- Queued rows per node or pool they ask for, executing rows per node they run on.
SELECT CASE WHEN status = 'executing' THEN COALESCE(ran_on, node_id) ELSE node_id END AS node_id, status,
       count(*)::int AS jobs
  FROM jobs WHERE status IN ('queued', 'executing') GROUP BY 1, status;

-- name: heartbeat_ages
SELECT id, NOW_MS - last_heartbeat AS age_ms FROM nodes WHERE last_heartbeat IS NOT NULL;

-- name: stranded_jobs
-- Rows no daemon of this database will run or finish: `executing` under no daemon registered here (worker_id NULL
-- or unknown), or a status none of the contract's (on a table made without its CHECK constraint).
SELECT id, status, worker_id, count(*) OVER () AS total FROM jobs
 WHERE status IS NULL OR status NOT IN ('queued', 'executing', 'completed', 'failed', 'cancelled')
    OR (status = 'executing' AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w WHERE w.id = jobs.worker_id))
 ORDER BY created_at, id
 LIMIT :limit;

-- name: prune_workers
-- Records of daemons that stopped more than :older_than_ms ago; never one of the :keep that started last, nor one
-- that still holds an unfinished job.
DELETE FROM jobd_workers
 WHERE stopped_at IS NOT NULL AND stopped_at < NOW_MS - :older_than_ms
   AND id NOT IN (SELECT worker_id FROM jobs
                   WHERE status IN ('executing', 'cancelled') AND duration IS NULL AND worker_id IS NOT NULL)
   AND id NOT IN (SELECT id FROM jobd_workers ORDER BY started_at DESC LIMIT :keep);

-- the web console's side (daemon.web) -------------------------------------------------------------------------

-- name: find_jobs
-- The console's job list: newest first, filtered by status, node and a text (in the command or the error, any case,
-- or the start of the id), after the page that ended at (:before_created, :before_id). Without the output.
SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
       priority, attempt, max_attempts, run_after, depends_on, timeout_ms, worker_id, stdout_bytes, stderr_bytes, cwd,
       conversation_id, message_id
  FROM jobs
 WHERE (:status::text IS NULL OR status = :status) AND (:node_id::text IS NULL OR node_id = :node_id)
   AND (:text::text IS NULL OR strpos(lower(command), lower(:text)) > 0
        OR strpos(lower(error), lower(:text)) > 0 OR left(id, length(:text)) = :text)
   AND (:before_created::bigint IS NULL OR (created_at, id) < (:before_created, :before_id::text))
 ORDER BY created_at DESC, id DESC
 LIMIT :limit;

-- name: job_output_since
-- A followed job: the row without its output and, per stream, its length in bytes, a chunk from a column offset or
-- from a stream position counted back from the end, and the bytes around the cap's marker: as the SQLite query.
WITH j AS MATERIALIZED (
    SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
           attempt, max_attempts, worker_id, stdout_bytes, stderr_bytes,
           convert_to(stdout, 'UTF8') AS out_b, convert_to(stderr, 'UTF8') AS err_b,
           CASE WHEN :stdout_hint::int >= 0 THEN 0
                ELSE strpos(left(stdout, length(stdout) / :head_share::int + 256),
                            ' bytes of stdout omitted; ' || stdout_bytes || ' bytes in all]' || chr(10)) END AS out_p,
           CASE WHEN :stderr_hint::int >= 0 THEN 0
                ELSE strpos(left(stderr, length(stderr) / :head_share::int + 256),
                            ' bytes of stderr omitted; ' || stderr_bytes || ' bytes in all]' || chr(10)) END AS err_p,
           stdout, stderr
      FROM jobs WHERE id = :id),
m AS MATERIALIZED (
    SELECT j.*,
           CASE WHEN :stdout_hint::int >= 0 THEN :stdout_hint::int
                WHEN out_p > 0 THEN greatest(0, octet_length(left(stdout, out_p - 1)) - :room::int)
                ELSE -1 END AS out_at,
           CASE WHEN :stderr_hint::int >= 0 THEN :stderr_hint::int
                WHEN err_p > 0 THEN greatest(0, octet_length(left(stderr, err_p - 1)) - :room::int)
                ELSE -1 END AS err_at,
           CASE WHEN :stdout_from::int >= 0 THEN :stdout_from::int
                ELSE greatest(0, (octet_length(out_b) - (stdout_bytes + :stdout_from::int))::int) END AS out_from,
           CASE WHEN :stderr_from::int >= 0 THEN :stderr_from::int
                ELSE greatest(0, (octet_length(err_b) - (stderr_bytes + :stderr_from::int))::int) END AS err_from
      FROM j)
SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
       attempt, max_attempts, worker_id, stdout_bytes, stderr_bytes,
       octet_length(out_b) AS stdout_length, octet_length(err_b) AS stderr_length,
       out_at AS stdout_around_at, err_at AS stderr_around_at,
       CASE WHEN out_at >= 0 THEN substring(out_b FROM out_at::int + 1 FOR :room::int + 160) END AS stdout_around,
       CASE WHEN err_at >= 0 THEN substring(err_b FROM err_at::int + 1 FOR :room::int + 160) END AS stderr_around,
       out_from AS stdout_start, err_from AS stderr_start,
       substring(out_b FROM out_from::int + 1 FOR :max::int) AS stdout_chunk,
       substring(err_b FROM err_from::int + 1 FOR :max::int) AS stderr_chunk
  FROM m;

-- name: job_state
-- What tells a followed job's row has changed, without reading its output.
SELECT status, attempt, stdout_bytes, stderr_bytes, duration, worker_id, exit_code FROM jobs WHERE id = :id;

-- name: job_timings
-- The console's charts: when each recent job was queued, started and ended.
SELECT created_at, run_after, started_at, completed_at, status FROM jobs
 WHERE created_at >= :since OR completed_at >= :since OR status IN ('queued', 'executing')
 ORDER BY created_at DESC
 LIMIT :limit;
