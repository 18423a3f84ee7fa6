// NexusCLI 0.10's database driver (lib/server/db/drivers/sql-js.js), reduced to what touches the file: read it
// whole into sql.js, run statements in memory, and write the whole database back with fs.writeFileSync after each
// statement. Usage: node sqljs_writer.js DB_PATH JOB_ID [COMMAND]  -- inserts a queued job as NexusCLI's runner does.
'use strict';
const fs = require('fs');
const initSqlJs = require('sql.js');

async function main() {
  const [dbPath, jobId, command = 'echo from-sqljs'] = process.argv.slice(2);
  const SQL = await initSqlJs();
  const db = new SQL.Database(fs.readFileSync(dbPath));
  const save = () => fs.writeFileSync(dbPath, Buffer.from(db.export()));
  // initSchema() on every start (the jobs table and one of NexusCLI's own, abridged).
  db.run(`CREATE TABLE IF NOT EXISTS jobs (
      id TEXT PRIMARY KEY, conversation_id TEXT, message_id TEXT, node_id TEXT NOT NULL, tool TEXT NOT NULL,
      command TEXT NOT NULL,
      status TEXT NOT NULL CHECK(status IN ('queued', 'executing', 'completed', 'failed', 'cancelled')),
      exit_code INTEGER, stdout TEXT, stderr TEXT, duration INTEGER, created_at INTEGER NOT NULL,
      started_at INTEGER, completed_at INTEGER);
    CREATE TABLE IF NOT EXISTS api_keys (provider TEXT PRIMARY KEY, api_key TEXT NOT NULL,
      created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);`);
  save();
  const stmt = db.prepare('INSERT INTO jobs (id, conversation_id, message_id, node_id, tool, command, status, '
                          + 'created_at) VALUES (?, ?, ?, ?, ?, ?, \'queued\', ?)');
  stmt.bind([jobId, null, null, 'localhost', 'bash', command, Date.now()]);
  stmt.step();
  stmt.reset();
  save();
  db.close();
}

main().catch((e) => { console.error(e); process.exit(1); });
