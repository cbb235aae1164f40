//! The SQLite schema and its migrations: tables created if missing, columns
//! added since the first release added to older files, indexes. Applied at
//! every open, idempotent.

use rusqlite::Connection;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS bundles (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    signed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    bundle TEXT NOT NULL REFERENCES bundles(digest),
    key TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
-- state: 0 queued, 1 leased, 2 done, 3 dead
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    job INTEGER NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    input BLOB NOT NULL,
    input_digest BLOB NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    node TEXT,
    outcome BLOB,
    receipt BLOB,
    reasons TEXT NOT NULL DEFAULT '[]',
    done_at INTEGER,
    cached_from INTEGER
);
CREATE INDEX IF NOT EXISTS tasks_input ON tasks(input_digest);
CREATE INDEX IF NOT EXISTS tasks_job ON tasks(job, idx);
CREATE INDEX IF NOT EXISTS tasks_job_state ON tasks(job, state);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(state) WHERE state < 2;
CREATE TABLE IF NOT EXISTS nodes (
    key TEXT PRIMARY KEY,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0
);
-- The pool's own values that must outlive a process (the secret that
-- names tasks to nodes and draws audits).
CREATE TABLE IF NOT EXISTS pool_meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- A result that was replaced, kept as it was (the node's signed receipt
-- is the evidence), with the executions that agreed against it.
CREATE TABLE IF NOT EXISTS evidence (
    id INTEGER PRIMARY KEY,
    task INTEGER NOT NULL REFERENCES tasks(id),
    node TEXT NOT NULL,
    outcome BLOB,
    receipt BLOB,
    transcript BLOB,
    decided_by TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS evidence_task ON evidence(task);
CREATE INDEX IF NOT EXISTS evidence_node ON evidence(node);
CREATE TABLE IF NOT EXISTS canaries (
    id INTEGER PRIMARY KEY,
    bundle TEXT NOT NULL REFERENCES bundles(digest),
    input BLOB NOT NULL,
    expect BLOB NOT NULL
);
"#;

/// Columns added after the first release: (table, column, declaration).
/// Files made before them get them at open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("tasks", "cached_from", "INTEGER"),
    ("jobs", "kind", "INTEGER NOT NULL DEFAULT 0"),
    // The task a re-execution checks.
    ("tasks", "check_of", "INTEGER"),
    // Verified::code.
    ("tasks", "verified", "INTEGER NOT NULL DEFAULT 0"),
    // A canary task's expected outcome.
    ("tasks", "expect", "BLOB"),
    ("tasks", "challenge", "TEXT"),
    // NULL: never judged (the policy's initial reputation applies).
    ("nodes", "reputation", "INTEGER"),
    ("nodes", "strikes", "INTEGER NOT NULL DEFAULT 0"),
    ("nodes", "confirmed", "INTEGER NOT NULL DEFAULT 0"),
    ("nodes", "quarantined_until", "INTEGER NOT NULL DEFAULT 0"),
    ("nodes", "banned", "INTEGER NOT NULL DEFAULT 0"),
    // MessagePack of an llm task's transcript (NULL: none).
    ("tasks", "transcript", "BLOB"),
    // The client key that submitted a job (NULL: hidden, or stored before
    // owners; jobs.key is then `<owner>/<client's key>`).
    ("jobs", "owner", "TEXT"),
    // The engines the result's receipt names (JSON list of engine
    // identities; NULL: none), so an `exact` check goes to a node with
    // the same ones.
    ("tasks", "engines", "TEXT"),
    // 1: a decoy check (its replayed transcript corrupted on purpose);
    // never one of the target's checks in a dispute.
    ("tasks", "decoy", "INTEGER NOT NULL DEFAULT 0"),
    // The verified task a canary was made from; a canary task runs with
    // its identity.
    ("canaries", "origin", "INTEGER"),
    ("tasks", "origin", "INTEGER"),
    // 0: opened for chunked submission and still taking inputs.
    ("jobs", "sealed", "INTEGER NOT NULL DEFAULT 1"),
    // Higher is served first.
    ("jobs", "priority", "INTEGER NOT NULL DEFAULT 0"),
    // 1: its client said it has the results (`job forget`): collected next.
    ("jobs", "forgotten", "INTEGER NOT NULL DEFAULT 0"),
    // When retention removed its inputs and outputs (NULL: not yet).
    ("jobs", "purged_at", "INTEGER"),
    // When its last chunk of inputs arrived (NULL: none since it was
    // created): an unsealed job untouched for `keep_days` is abandoned.
    ("jobs", "touched_at", "INTEGER"),
];

/// Bring a database file to the current schema.
pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    for (table, column, decl) in ADDED_COLUMNS {
        let has: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get(0),
        )?;
        if has == 0 {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    // Indexes on `tasks` cost every grant and every accepted result a
    // write each: only done rows (`state = 2`) are indexed by node and
    // time, and check rows by their checker. A full (node, state, verified)
    // index made the pool benchmark's store 1.6x slower per task; files
    // that have it lose it here.
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS tasks_check ON tasks(check_of) WHERE check_of IS NOT NULL;
         DROP INDEX IF EXISTS tasks_node_done;
         CREATE INDEX IF NOT EXISTS tasks_node_checks ON tasks(node, id)
             WHERE check_of IS NOT NULL AND state = 2;
         CREATE INDEX IF NOT EXISTS tasks_done_at ON tasks(done_at, id) WHERE state = 2;
         CREATE INDEX IF NOT EXISTS tasks_node_done_at ON tasks(node, done_at, id) WHERE state = 2;",
    )
}
