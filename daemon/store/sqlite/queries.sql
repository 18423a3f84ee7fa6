-- Named queries of the SQLite backend: `-- name: NAME` then one statement; `:param` placeholders. Parsed once at
-- import by daemon.store.sqlite.queries; run by name by the job store (daemon.store.jobs), which reads the rows by
-- their columns' names: a name (or an AS) here is what it asks for. NOW_MS stands for SQLite's clock in epoch
-- milliseconds, read inside the statement (the parser expands it), so recorded times are taken when the write
-- happens, not when it was queued behind another program's lock.

-- name: fail_unknown_nodes
-- Fail queued rows whose node_id names no node or pool that this daemon (:nodes, a JSON array of both) or another
-- live daemon on the database serves.
UPDATE jobs
   SET status = 'failed', error = :error, duration = 0,
       started_at = NOW_MS,
       completed_at = NOW_MS
 WHERE status = 'queued'
   AND (node_id IS NULL
        OR (node_id NOT IN (SELECT value FROM json_each(:nodes))
            AND node_id NOT IN (SELECT n.value FROM jobd_workers AS w, json_each(w.nodes) AS n
                                 WHERE w.stopped_at IS NULL AND json_valid(w.nodes))
            AND node_id NOT IN (SELECT p.key FROM jobd_workers AS w, json_each(w.pools) AS p
                                 WHERE w.stopped_at IS NULL AND json_valid(w.pools))))
RETURNING id, node_id;

-- name: fail_malformed
-- Queued rows that can never be claimed as they are: an id that is not text (or NULL), a run_after that is no
-- number, a depends_on that is no text, an attempt that is not a count the claim can go on from (negative: it
-- would get around max_attempts; at the top: attempt + 1 overflows). Found by rowid, since the id itself may be
-- the problem. 2147483646: the same bound as PostgreSQL's, whose attempt is a 32-bit integer.
UPDATE jobs
   SET status = 'failed', duration = 0, started_at = NOW_MS, completed_at = NOW_MS,
       error = CASE
           WHEN typeof(id) != 'text' THEN 'id must be text, got ' || typeof(id)
           WHEN typeof(run_after) NOT IN ('integer', 'real', 'null')
               THEN 'run_after must be epoch milliseconds (a number), got ' || typeof(run_after) || ' '
                    || quote(substr(run_after, 1, 40))
           WHEN typeof(attempt) != 'integer' OR attempt NOT BETWEEN 0 AND 2147483646
               THEN 'attempt must be a whole number from 0 to 2147483646 (how many times the daemon claimed the '
                    || 'job: insert 0, or leave the column out), got ' || quote(substr(attempt, 1, 40))
           ELSE 'depends_on must be the text id of a job, got ' || typeof(depends_on)
       END
 WHERE status = 'queued'
   AND (typeof(id) != 'text' OR typeof(run_after) NOT IN ('integer', 'real', 'null')
        OR typeof(depends_on) NOT IN ('text', 'null')
        OR typeof(attempt) != 'integer' OR attempt NOT BETWEEN 0 AND 2147483646)
RETURNING CASE typeof(id) WHEN 'text' THEN id ELSE quote(id) END AS id, error;  -- an id that is no text: as a literal

-- name: claim_jobs
-- One atomic compare-and-set from queued to executing, highest priority first, then oldest. Only while this
-- daemon's lease is live: a daemon stalled long enough for another to recover it claims nothing on waking. Where
-- the attempt runs is recorded with it (ran_on, attempt_nodes), as for a pool's row (claim_placed).
UPDATE jobs
   SET status = 'executing', worker_id = :worker_id, attempt = attempt + 1,
       started_at = NOW_MS,
       error = NULL, exit_code = NULL, completed_at = NULL, duration = NULL,
       stdout = NULL, stderr = NULL, stdout_bytes = NULL, stderr_bytes = NULL, pid = NULL, pid_start = NULL,
       ran_on = :node_id,
       attempt_nodes = json_set(CASE WHEN json_valid(attempt_nodes) AND json_type(attempt_nodes) = 'object'
                                     THEN attempt_nodes ELSE '{}' END, '$."' || (attempt + 1) || '"', :node_id)
 WHERE id IN (SELECT id FROM jobs
               WHERE status = 'queued' AND node_id = :node_id AND typeof(id) = 'text'
                 AND typeof(attempt) = 'integer' AND attempt BETWEEN 0 AND 2147483646  -- else fail_malformed
                 AND (run_after IS NULL OR run_after <= NOW_MS)
                 AND (depends_on IS NULL
                      OR EXISTS (SELECT 1 FROM jobs AS d WHERE d.id = jobs.depends_on AND d.status = 'completed'))
               ORDER BY priority DESC, created_at, rowid
               LIMIT :limit)
   AND status = 'queued'
   AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
RETURNING id, node_id, tool, command, cwd, env, priority, attempt, started_at, timeout_ms, max_attempts,
          created_at, node_id AS asked, rowid AS seq;
-- RETURNING gives rows in no promised order: the store's claim sorts them as the ORDER BY above (seq: the rowid).

-- name: pool_has_queued
-- Whether the pool has queued rows at all: a read on the claim index, so that a claim pass over pools with nothing
-- to place takes no write lock (SQLite) and opens no transaction.
SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND node_id = :pool) AS found;

-- name: pool_candidates
-- A pool's queued rows that could start now, in the claim's order, whose tool some member with room can run
-- (:tools, a JSON array); at most :limit. Read inside the claim's transaction (BEGIN IMMEDIATE: no other writer
-- until it commits), so the rows placed are claimed by claim_placed before any other daemon sees them.
SELECT rowid AS seq, tool, ran_on AS last_node FROM jobs
 WHERE status = 'queued' AND node_id = :pool AND typeof(id) = 'text'
   AND typeof(attempt) = 'integer' AND attempt BETWEEN 0 AND 2147483646
   AND tool IN (SELECT value FROM json_each(:tools))
   AND (run_after IS NULL OR run_after <= NOW_MS)
   AND (depends_on IS NULL
        OR EXISTS (SELECT 1 FROM jobs AS d WHERE d.id = jobs.depends_on AND d.status = 'completed'))
   AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
 ORDER BY priority DESC, created_at, rowid
 LIMIT :limit;

-- name: claim_placed
-- The rows placement chose (:placed, a JSON object: seq -> member) claimed as claim_jobs claims, each on its
-- member: node_id, what the row asked for, stays; ran_on and attempt_nodes say where this attempt runs.
UPDATE jobs
   SET status = 'executing', worker_id = :worker_id, attempt = attempt + 1,
       started_at = NOW_MS,
       error = NULL, exit_code = NULL, completed_at = NULL, duration = NULL,
       stdout = NULL, stderr = NULL, stdout_bytes = NULL, stderr_bytes = NULL, pid = NULL, pid_start = NULL,
       ran_on = json_extract(:placed, '$."' || rowid || '"'),
       attempt_nodes = json_set(CASE WHEN json_valid(attempt_nodes) AND json_type(attempt_nodes) = 'object'
                                     THEN attempt_nodes ELSE '{}' END, '$."' || (attempt + 1) || '"',
                                json_extract(:placed, '$."' || rowid || '"'))
 WHERE rowid IN (SELECT CAST(key AS INTEGER) FROM json_each(:placed)) AND status = 'queued'
   AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
RETURNING id, ran_on AS node_id, tool, command, cwd, env, priority, attempt, started_at, timeout_ms, max_attempts,
          created_at, node_id AS asked, rowid AS seq;

-- name: fail_toolless_pool_jobs
-- A pool's queued rows whose tool is none of those this daemon's members have (:tools, a JSON array), and none of
-- those of any other live daemon serving the pool (its jobd_workers.pools lists them): no member can ever run them.
UPDATE jobs
   SET status = 'failed', error = :error, duration = 0, started_at = NOW_MS, completed_at = NOW_MS
 WHERE status = 'queued' AND node_id = :pool AND tool NOT IN (SELECT value FROM json_each(:tools))
   AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w, json_each(w.pools) AS p, json_each(p.value, '$.tools') AS t
                    WHERE w.stopped_at IS NULL AND w.id != :worker_id AND json_valid(w.pools)
                      AND p.key = :pool AND t.value = jobs.tool)
RETURNING id, tool;

-- name: fail_claimed_row
-- A row claim_jobs just took that cannot even be named (its id is not valid UTF-8): failed by its seq, the rowid.
UPDATE jobs
   SET status = 'failed', error = :error, completed_at = NOW_MS, duration = NOW_MS - started_at
 WHERE rowid = :seq AND worker_id = :worker_id AND status = 'executing' AND duration IS NULL;

-- name: write_output
-- Live output of a running job; a NULL stream parameter keeps that column as it is.
UPDATE jobs
   SET stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       pid = COALESCE(:pid, pid), pid_start = COALESCE(:pid_start, pid_start)
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status IN ('executing', 'cancelled')
   AND duration IS NULL;  -- set by finish_job: a late flush never overwrites a cancelled row's final output

-- name: finish_job
-- The terminal write: compare-and-set on our claim; a row another program cancelled stays cancelled. completed_at
-- is when the attempt ended (:late_ms before this write: a database that could not be written for a while, a full
-- disk, does not lengthen the job), by the database's clock, and never before started_at.
UPDATE jobs
   SET status = CASE status WHEN 'cancelled' THEN 'cancelled' ELSE :status END,
       exit_code = :exit_code, error = :error,
       stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       completed_at = max(started_at, NOW_MS - :late_ms),
       duration = max(started_at, NOW_MS - :late_ms) - started_at
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
-- The status and duration finish_job or requeue_job left on the rows of :claims (by id: a requeue that does not
-- count the attempt took it back; the caller keeps only the rows unfinished_claims found ours), and what a result
-- kept beside the file would need: started_at and completed_at.
SELECT j.id, j.status, j.duration, j.started_at, j.completed_at
  FROM jobs AS j JOIN json_each(:claims) AS c ON j.id = json_extract(c.value, '$[0]');

-- name: requeue_job
-- A failed attempt of a job that may try again: back to queued (not before :run_after), its output kept until the
-- next attempt starts. A row another program cancelled meanwhile is not touched (finish_job records it).
-- started_at is cleared with completed_at and duration: a row cancelled while it waits is then final by the
-- README's rule (cancelled with started_at NULL), like a row cancelled before its first attempt. :uncount (0 or 1)
-- takes the attempt back when nothing ran (its node did not answer): the next claim is the same attempt again.
UPDATE jobs
   SET status = 'queued', run_after = :run_after, exit_code = :exit_code, error = :error,
       attempt = attempt - :uncount,
       stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       started_at = NULL, completed_at = NULL, duration = NULL, worker_id = NULL, pid = NULL, pid_start = NULL
 WHERE id = :id AND worker_id = :worker_id AND attempt = :attempt AND status = 'executing' AND duration IS NULL;

-- name: fail_blocked_dependencies
-- Queued rows that can never start because the job they depend on ended another way than completed, does not
-- exist, or is the row itself.
UPDATE jobs
   SET status = 'failed', duration = 0, started_at = NOW_MS, completed_at = NOW_MS,
       error = 'depends_on ' || quote(depends_on) || ' ' || CASE
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
-- The dependency graph of the queue (each row depends on one job at most): the store's fail_dependency_cycles walks
-- it.
SELECT id, depends_on FROM jobs
 WHERE status = 'queued' AND typeof(id) = 'text' AND typeof(depends_on) = 'text'
   AND depends_on != id;  -- a row that depends on itself fails in fail_blocked_dependencies, with its own words

-- name: fail_in_cycle
-- One member of a dependency cycle, with the cycle in :error.
UPDATE jobs
   SET status = 'failed', duration = 0, started_at = NOW_MS, completed_at = NOW_MS, error = :error
 WHERE id = :id AND status = 'queued'
RETURNING id, depends_on;

-- name: has_dependents
SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND depends_on IS NOT NULL) AS dependents;

-- name: next_run_after
-- When the earliest row waiting for its run_after becomes due (NULL: none waits).
SELECT min(run_after) AS run_after FROM jobs
 WHERE status = 'queued' AND typeof(run_after) IN ('integer', 'real') AND run_after > NOW_MS;

-- name: retry_job
-- `nexus-jobd retry`: a finished job back to queued as a new attempt (the claim clears the old output); so is a
-- row no daemon runs (stranded_jobs). Attempts used up: one more (max_attempts 3 -> 4: it runs as 4 of 4).
UPDATE jobs
   SET status = 'queued', run_after = NULL, exit_code = NULL, error = NULL, started_at = NULL,
       completed_at = NULL, duration = NULL, worker_id = NULL, pid = NULL, pid_start = NULL,
       max_attempts = CASE WHEN typeof(attempt) = 'integer' AND typeof(max_attempts) = 'integer'
                                AND max_attempts <= attempt THEN min(attempt + 1, 1000)
                           ELSE max_attempts END
 WHERE id = CAST(:id AS TEXT)
   AND ((status IN ('completed', 'failed', 'cancelled')
         AND (duration IS NOT NULL OR worker_id IS NULL))  -- a cancelled job whose process is being stopped waits
        OR status IS NULL OR status NOT IN ('queued', 'executing', 'completed', 'failed', 'cancelled')
        OR (status = 'executing' AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w WHERE w.id = jobs.worker_id)))
RETURNING id, attempt, max_attempts;

-- name: register_worker
INSERT INTO jobd_workers (id, host, boot_id, pid, pid_start, started_at, heartbeat_at, nodes, pools)
VALUES (:id, :host, :boot_id, :pid, :pid_start, NOW_MS, NOW_MS, :nodes, :pools);

-- name: worker_pools
-- The pools this daemon serves, their members and the tools those have (JSON): kept current with its nodes'
-- heartbeats, for other daemons' decision that no member anywhere can run a row.
UPDATE jobd_workers SET pools = :pools WHERE id = :id AND pools IS NOT :pools;

-- name: live_worker_pools
-- The pools each live daemon serves (its JSON: pool -> {members, tools}), for `nodes` and `status`.
SELECT id, pools FROM jobd_workers WHERE stopped_at IS NULL AND pools IS NOT NULL ORDER BY started_at, id;

-- name: heartbeat
-- Renew this daemon's lease on all its running jobs at once; no row back means another daemon declared it dead.
UPDATE jobd_workers SET heartbeat_at = NOW_MS WHERE id = :id AND stopped_at IS NULL RETURNING id;

-- name: other_workers
SELECT id, host, boot_id, pid, pid_start, heartbeat_at, NOW_MS AS now FROM jobd_workers
 WHERE stopped_at IS NULL AND id != :id;

-- name: stop_worker
-- Only one daemon wins this: the one that then recovers the stopped daemon's jobs.
UPDATE jobd_workers SET stopped_at = NOW_MS, stop_reason = :reason WHERE id = :id AND stopped_at IS NULL
RETURNING id;

-- name: orphaned_jobs
SELECT id, attempt, max_attempts, pid, pid_start, COALESCE(ran_on, node_id) AS node_id FROM jobs
 WHERE worker_id = :worker_id AND status IN ('executing', 'cancelled') AND duration IS NULL;

-- name: fail_orphan
-- A job whose daemon died: it ends failed (or stays cancelled), its output up to the last flush kept.
UPDATE jobs
   SET status = CASE status WHEN 'cancelled' THEN 'cancelled' ELSE 'failed' END, error = :error,
       completed_at = NOW_MS, duration = NOW_MS - started_at
 WHERE id = CAST(:id AS TEXT) AND worker_id = :worker_id AND attempt = :attempt
   AND status IN ('executing', 'cancelled') AND duration IS NULL;

-- name: adopt_job
-- A dead (or detached) daemon's remote job moves to :worker_id for the same attempt: a compare-and-set on the old
-- claim, so of two daemons adopting it one wins, and only while the adopter's own lease is live. Returns what
-- running it again needs, and the output recorded so far (reading goes on from its byte counts).
UPDATE jobs
   SET worker_id = :worker_id
 WHERE id = CAST(:id AS TEXT) AND worker_id = :old_worker_id AND attempt = :attempt
   AND status IN ('executing', 'cancelled') AND duration IS NULL
   AND EXISTS (SELECT 1 FROM jobd_workers WHERE id = :worker_id AND stopped_at IS NULL)
RETURNING id, COALESCE(ran_on, node_id) AS node_id, tool, command, cwd, env, priority, attempt, started_at,
          timeout_ms, max_attempts, created_at, node_id AS asked, status, stdout, stderr, stdout_bytes, stderr_bytes;

-- name: detached_jobs
-- Unfinished jobs on the nodes in :nodes (a JSON array) whose daemon stopped without ending them: it detached
-- them on SIGTERM (on_stop = "detach"), for the next daemon to adopt.
SELECT j.worker_id, w.host, w.boot_id, j.id, j.attempt, j.max_attempts, j.pid, j.pid_start,
       COALESCE(j.ran_on, j.node_id) AS node_id
  FROM jobs AS j JOIN jobd_workers AS w ON w.id = j.worker_id
 WHERE j.status IN ('executing', 'cancelled') AND j.duration IS NULL
   AND COALESCE(j.ran_on, j.node_id) IN (SELECT value FROM json_each(:nodes)) AND w.stopped_at IS NOT NULL;

-- name: attempts_on_node
-- Every row of node :node_id with its latest attempt and whether that attempt may still run: a sweep of the
-- node's spools removes only what this database's own finished attempts left. A pool's row counts on every
-- member an attempt of it ran on (ran_on is only the latest).
SELECT id, attempt, status IN ('executing', 'cancelled') AND duration IS NULL AS running FROM jobs
 WHERE (node_id = :node_id OR ran_on = :node_id
        OR (json_valid(attempt_nodes) AND EXISTS (SELECT 1 FROM json_each(attempt_nodes) WHERE value = :node_id)))
   AND typeof(id) = 'text' AND attempt > 0;

-- name: requeue_orphan
UPDATE jobs
   SET status = 'queued', error = :error, started_at = NULL, completed_at = NULL, duration = NULL, worker_id = NULL,
       pid = NULL, pid_start = NULL
 WHERE id = CAST(:id AS TEXT) AND worker_id = :worker_id AND attempt = :attempt AND status = 'executing'
   AND duration IS NULL;

-- name: workers
SELECT w.id, w.host, w.pid, w.started_at, w.heartbeat_at, w.stopped_at, w.stop_reason, NOW_MS AS now,
       (SELECT count(*) FROM jobs WHERE worker_id = w.id AND status = 'executing') AS running
  FROM jobd_workers AS w ORDER BY w.started_at DESC;

-- name: cancelled_among
-- Which of our running jobs (:ids, a JSON array) another program has cancelled, and in which attempt.
SELECT id, attempt FROM jobs
 WHERE status = 'cancelled' AND worker_id = :worker_id AND id IN (SELECT value FROM json_each(:ids));

-- name: cancel_job
-- What `nexus-jobd cancel` does: exactly NexusCLI's cancel, limited to a job that has not ended; a row no daemon
-- runs (stranded_jobs) has not ended either. Held by no daemon, a started one is final at once: nobody else will
-- record its end.
UPDATE jobs SET status = 'cancelled', completed_at = NOW_MS,
       duration = CASE WHEN status = 'queued' OR EXISTS (SELECT 1 FROM jobd_workers AS w WHERE w.id = jobs.worker_id)
                       THEN duration
                       WHEN typeof(started_at) = 'integer' THEN max(0, NOW_MS - started_at) END
 WHERE id = CAST(:id AS TEXT) AND (status IS NULL OR status NOT IN ('completed', 'failed', 'cancelled'))
RETURNING id;

-- name: insert_job
INSERT INTO jobs (id, node_id, tool, command, status, created_at, cwd, env, priority, timeout_ms, max_attempts,
                  run_after, depends_on, conversation_id, message_id)
VALUES (:id, :node_id, :tool, :command, 'queued', NOW_MS, :cwd, :env, :priority, :timeout_ms, :max_attempts,
        NOW_MS + :delay_ms, CAST(:depends_on AS TEXT),  -- CAST: a RawText id (bound as a BLOB) back to its TEXT
        :conversation_id, :message_id);

-- name: get_job
-- CAST: an id read back as RawText (not valid UTF-8) is bound as a BLOB; this makes it the stored TEXT again.
SELECT * FROM jobs WHERE id = CAST(:id AS TEXT);

-- name: find_job_ids
-- Ids starting with :prefix (a unique prefix names a job); LIKE would treat _ and % in ids as wildcards.
SELECT id FROM jobs WHERE substr(id, 1, length(:prefix)) = :prefix LIMIT 2;

-- name: list_jobs
-- Everything but the output itself, which can be megabytes a row.
SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
       priority, attempt, max_attempts, run_after, depends_on, timeout_ms, worker_id, stdout_bytes, stderr_bytes,
       ran_on
  FROM jobs
 WHERE (:status IS NULL OR status = :status) AND (:node_id IS NULL OR node_id = :node_id OR ran_on = :node_id)
 ORDER BY typeof(created_at) IN ('integer', 'real') DESC,  -- a row with no time ('yesterday') last, not on top
          created_at DESC, rowid DESC
 LIMIT :limit;

-- name: job_counts
-- For STATUS= lines and `nexus-jobd status`: what waits, and what ended lately.
SELECT (SELECT count(*) FROM jobs WHERE status = 'queued') AS queued,
       (SELECT count(*) FROM jobs WHERE status = 'executing') AS executing,
       (SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')
                                    AND completed_at >= NOW_MS - 60000) AS finished_last_minute,
       (SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')
                                    AND completed_at >= NOW_MS - 3600000) AS finished_last_hour;

-- name: prune_jobs
-- Finished jobs that ended more than :older_than_ms ago, of the statuses in :statuses (a JSON array).
DELETE FROM jobs
 WHERE status IN (SELECT value FROM json_each(:statuses)) AND completed_at < NOW_MS - :older_than_ms
   AND status IN ('completed', 'failed', 'cancelled')
   AND NOT EXISTS (SELECT 1 FROM jobs AS q WHERE q.status = 'queued' AND q.depends_on = jobs.id);
-- A row a queued row depends on stays: deleting it would fail that row ("depends_on ... is no job").

-- name: upsert_node
-- A configured node: created if new (status offline until its first probe), its address kept current.
INSERT INTO nodes (id, hostname, ip_address, status, capabilities, last_heartbeat, created_at)
VALUES (:id, :hostname, :ip_address, 'offline', NULL, NULL, NOW_MS)
ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, ip_address = excluded.ip_address;

-- name: node_heartbeat
UPDATE nodes SET status = :status, capabilities = :capabilities, last_heartbeat = NOW_MS WHERE id = :id;

-- name: unserved_nodes_offline
-- Nodes no live daemon serves any more (removed from every config) are marked offline, never deleted.
UPDATE nodes SET status = 'offline'
 WHERE status != 'offline'
   AND id NOT IN (SELECT value FROM json_each(:nodes))
   AND id NOT IN (SELECT n.value FROM jobd_workers AS w, json_each(w.nodes) AS n
                   WHERE w.stopped_at IS NULL AND json_valid(w.nodes))
RETURNING id;

-- name: fail_node_jobs
-- Queued rows of a node that cannot take jobs: all of them (:before NULL), or those queued before :before.
UPDATE jobs
   SET status = 'failed', error = :error, duration = 0, started_at = NOW_MS, completed_at = NOW_MS
 WHERE status = 'queued' AND node_id = :node_id AND (:before IS NULL OR created_at < :before)
RETURNING id;

-- name: nodes_overview
SELECT n.id, n.hostname, n.ip_address, n.status, n.capabilities, n.last_heartbeat, NOW_MS AS now,
       (SELECT count(*) FROM jobs WHERE (ran_on = n.id OR (ran_on IS NULL AND node_id = n.id))
                                    AND status = 'executing') AS running,
       (SELECT count(*) FROM jobs WHERE node_id = n.id AND status = 'queued') AS queued
  FROM nodes AS n ORDER BY n.id;

-- name: data_version
PRAGMA data_version;

-- name: applied_migrations
SELECT name FROM jobd_migrations;

-- name: record_migration
INSERT INTO jobd_migrations (name, applied_at) VALUES (:name, :now);

-- name: schema_objects
-- What each name in the schema is (table, view, index, trigger): opening refuses a `jobs` that is no table.
SELECT name, type FROM sqlite_master;

-- name: live_daemons_serving
-- Daemons alive now (not stopped, heartbeat within :ttl_ms) that serve node :node_id (in their JSON `nodes`).
SELECT count(*) AS daemons FROM jobd_workers AS w
 WHERE w.stopped_at IS NULL AND w.heartbeat_at >= NOW_MS - :ttl_ms
   AND EXISTS (SELECT 1 FROM json_each(CASE WHEN json_valid(w.nodes) THEN w.nodes ELSE '[]' END)
                WHERE value = :node_id);

-- name: queue_by_node
-- The metrics' queue gauges, read only when someone scrapes: queued rows per node or pool they ask for, executing
-- rows per node they run on (the claim index).
SELECT CASE WHEN status = 'executing' THEN COALESCE(ran_on, node_id) ELSE node_id END AS node_id, status,
       count(*) AS jobs
  FROM jobs WHERE status IN ('queued', 'executing') GROUP BY 1, status;

-- name: heartbeat_ages
-- The metrics' node_heartbeat_age_seconds: ms since each node's last heartbeat, by the clock that wrote it.
SELECT id, NOW_MS - last_heartbeat AS age_ms FROM nodes WHERE last_heartbeat IS NOT NULL;

-- name: apply_kept_result
-- At start-up, the end of an attempt that a daemon could only keep beside the file (another program had rewritten
-- it): recorded unless the row has moved on since (a later attempt, or this one already final). :status is the
-- row's status to be (queued again for a retry, or final); a cancelled row stays cancelled.
UPDATE jobs
   SET status = CASE WHEN status = 'cancelled' AND :status != 'queued' THEN 'cancelled' ELSE :status END,
       attempt = :attempt, worker_id = CASE WHEN :status = 'queued' THEN NULL ELSE :worker_id END,
       exit_code = :exit_code, error = :error,
       stdout = COALESCE(:stdout, stdout), stderr = COALESCE(:stderr, stderr),
       stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
       started_at = :started_at, completed_at = :ended_at, duration = :ended_at - :started_at,
       run_after = :run_after, pid = NULL, pid_start = NULL
 WHERE id = :id AND duration IS NULL AND typeof(attempt) = 'integer'
   AND (attempt < :attempt OR (attempt = :attempt AND status IN ('queued', 'executing', 'cancelled')))
RETURNING id, status;

-- name: restore_claim
-- At start-up, an attempt that was running when its daemon found the file rewritten, and whose end nobody kept:
-- claimed again as it was, under that daemon (restore_worker), so that recovery adopts it if it still runs (the
-- keeper, the node's spool) or settles it as any dead daemon's job. Never a row that moved on since.
UPDATE jobs
   SET status = 'executing', attempt = :attempt, worker_id = :worker_id, started_at = :started_at,
       completed_at = NULL, duration = NULL, pid = :pid, pid_start = :pid_start
 WHERE id = :id AND status = 'queued' AND typeof(attempt) = 'integer' AND attempt < :attempt
RETURNING id;

-- name: restore_worker
-- The daemon those attempts ran under, as a dead one: its lease long expired, so the next recovery settles it.
INSERT INTO jobd_workers (id, host, boot_id, pid, pid_start, started_at, heartbeat_at, nodes)
VALUES (:id, :host, :boot_id, :pid, :pid_start, :started_at, 0, '[]')
ON CONFLICT (id) DO UPDATE SET stopped_at = NULL, stop_reason = NULL, heartbeat_at = 0;

-- name: stranded_jobs
-- Rows no daemon of this database will run or finish: a status none of the contract's ('Queued', 'queued ',
-- 'running', NULL: a typo on a table without NexusCLI's CHECK constraints), or `executing` under no daemon
-- registered here (worker_id NULL or unknown). The first :limit, and how many in all.
SELECT id, status, worker_id, count(*) OVER () AS total FROM jobs
 WHERE status IS NULL OR status NOT IN ('queued', 'executing', 'completed', 'failed', 'cancelled')
    OR (status = 'executing' AND NOT EXISTS (SELECT 1 FROM jobd_workers AS w WHERE w.id = jobs.worker_id))
 ORDER BY rowid
 LIMIT :limit;

-- name: prune_workers
-- Records of daemons that stopped more than :older_than_ms ago; never one of the :keep that started last, nor one
-- that still holds an unfinished job (recovery adopts or settles those by their daemon's record).
DELETE FROM jobd_workers
 WHERE stopped_at IS NOT NULL AND stopped_at < NOW_MS - :older_than_ms
   AND id NOT IN (SELECT worker_id FROM jobs
                   WHERE status IN ('executing', 'cancelled') AND duration IS NULL AND worker_id IS NOT NULL)
   AND id NOT IN (SELECT id FROM jobd_workers ORDER BY started_at DESC LIMIT :keep);

-- the web console's side (daemon.web) -------------------------------------------------------------------------

-- name: find_jobs
-- The console's job list: newest first, filtered by status, node and a text (in the command or the error, any case
-- as far as SQLite's lower() goes, or the start of the id), after the page that ended at (:before_created,
-- :before_id). Everything but the output itself, which can be megabytes a row.
SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
       priority, attempt, max_attempts, run_after, depends_on, timeout_ms, worker_id, stdout_bytes, stderr_bytes, cwd,
       conversation_id, message_id
  FROM jobs
 WHERE (:status IS NULL OR status = :status) AND (:node_id IS NULL OR node_id = :node_id)
   AND (:text IS NULL OR instr(lower(command), lower(:text)) > 0 OR instr(lower(error), lower(:text)) > 0
        OR substr(id, 1, length(:text)) = :text)
   AND (:before_created IS NULL OR created_at < :before_created
        OR (created_at = :before_created AND id < :before_id))
 ORDER BY created_at DESC, id DESC
 LIMIT :limit;

-- name: job_output_since
-- A followed job: the row without its output and, per stream (STREAM_ below: stdout_, stderr_): `length`, the
-- column's length in bytes; `chunk`, its bytes from `start` on (at most :max): from the column offset
-- :STREAM_from, or where :STREAM_from < 0 from the stream's byte -:STREAM_from counted back from the column's end (a
-- column the cap cut ends where the stream does); `around`, the bytes from `around_at` on, where the cap's marker
-- (daemon.output) is: at :STREAM_hint if >= 0 (where it was), else found by its " bytes of STREAM omitted; TOTAL
-- bytes in all]" with the row's own TOTAL (none: around NULL, around_at -1), in the first 1/:head_share of the
-- column only (the marker follows the head, cap/HEAD_SHARE bytes, and such a column is about the cap). Bytes (BLOB),
-- so offsets stay exact; one statement, so all of it is of one version of the row. Only the positions go through a temporary table (a
-- column there would be written out and read back: slower than reading it again).
WITH m AS MATERIALIZED (
    SELECT CASE WHEN :stdout_hint >= 0 THEN :stdout_hint
                ELSE (SELECT CASE WHEN i > 0 THEN max(0, i - 1 - :room) ELSE -1 END FROM (
                          SELECT instr(substr(CAST(stdout AS BLOB), 1,
                                              length(CAST(stdout AS BLOB)) / :head_share + 256),
                                       CAST(' bytes of stdout omitted; ' || stdout_bytes || ' bytes in all]'
                                            || char(10) AS BLOB)) AS i
                            FROM jobs WHERE id = CAST(:id AS TEXT))) END AS out_at,
           CASE WHEN :stderr_hint >= 0 THEN :stderr_hint
                ELSE (SELECT CASE WHEN i > 0 THEN max(0, i - 1 - :room) ELSE -1 END FROM (
                          SELECT instr(substr(CAST(stderr AS BLOB), 1,
                                              length(CAST(stderr AS BLOB)) / :head_share + 256),
                                       CAST(' bytes of stderr omitted; ' || stderr_bytes || ' bytes in all]'
                                            || char(10) AS BLOB)) AS i
                            FROM jobs WHERE id = CAST(:id AS TEXT))) END AS err_at,
           CASE WHEN :stdout_from >= 0 THEN :stdout_from
                ELSE max(0, length(CAST(stdout AS BLOB)) - (stdout_bytes + :stdout_from)) END AS out_from,
           CASE WHEN :stderr_from >= 0 THEN :stderr_from
                ELSE max(0, length(CAST(stderr AS BLOB)) - (stderr_bytes + :stderr_from)) END AS err_from
      FROM jobs WHERE id = CAST(:id AS TEXT))
SELECT id, node_id, tool, command, status, exit_code, error, duration, created_at, started_at, completed_at,
       attempt, max_attempts, worker_id, stdout_bytes, stderr_bytes,
       length(CAST(stdout AS BLOB)) AS stdout_length, length(CAST(stderr AS BLOB)) AS stderr_length,
       m.out_at AS stdout_around_at, m.err_at AS stderr_around_at,
       CASE WHEN m.out_at >= 0 THEN substr(CAST(stdout AS BLOB), m.out_at + 1, :room + 160) END AS stdout_around,
       CASE WHEN m.err_at >= 0 THEN substr(CAST(stderr AS BLOB), m.err_at + 1, :room + 160) END AS stderr_around,
       m.out_from AS stdout_start, m.err_from AS stderr_start,
       substr(CAST(stdout AS BLOB), m.out_from + 1, :max) AS stdout_chunk,
       substr(CAST(stderr AS BLOB), m.err_from + 1, :max) AS stderr_chunk
  FROM jobs, m WHERE id = CAST(:id AS TEXT);

-- name: job_state
-- What tells a followed job's row has changed, without reading its output: job_output_since reads that only then.
SELECT status, attempt, stdout_bytes, stderr_bytes, duration, worker_id, exit_code FROM jobs
 WHERE id = CAST(:id AS TEXT);

-- name: job_timings
-- The console's charts: when each recent job was queued, started and ended.
SELECT created_at, run_after, started_at, completed_at, status FROM jobs
 WHERE created_at >= :since OR completed_at >= :since OR status IN ('queued', 'executing')
 ORDER BY created_at DESC
 LIMIT :limit;
