//! The pool's durable state: bundles, jobs, tasks and their results, nodes.
//!
//! [`Store`] is what the coordinator needs from a database; [`SqliteStore`]
//! implements it on an embedded SQLite file (WAL mode). A networked SQL
//! database for larger pools would implement the same trait.
//!
//! Every method that changes state commits before it returns, so whatever
//! the coordinator acknowledges (a submission, an accepted result) survives a
//! crash of the pool process. Blob bytes are not here: they live in a
//! content-addressed directory (`tidepool_net::blobs`).

use crate::verify::Standing;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use tidepool_proto::wire::{JobId, Outcome, TaskId};
use tidepool_proto::{Digest, PublicKey};

/// A storage failure; the request that hit it fails and may be retried.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("pool database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored value does not decode (the file was edited or corrupted).
    #[error("pool database holds a malformed {what}: {why}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it does not decode.
        why: String,
    },
}

/// Durability of commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives a crash of the pool process (SQLite WAL, `synchronous=NORMAL`).
    Process,
    /// Also survives power loss (`synchronous=FULL`: an fsync per commit).
    PowerLoss,
}

/// A task as loaded at start-up: enough to queue it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTask {
    /// The task.
    pub task: TaskId,
    /// Its job.
    pub job: JobId,
    /// The bundle it runs.
    pub bundle: Digest,
    /// The last attempt number handed out (0 if never leased).
    pub attempt: u32,
    /// Reasons of earlier failed attempts.
    pub reasons: Vec<String>,
    /// For a re-execution: the task whose result it checks.
    pub check_of: Option<TaskId>,
}

/// A published bundle as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    /// Bundle digest.
    pub digest: Digest,
    /// The signed manifest (MessagePack of `SignedManifest`).
    pub signed: Vec<u8>,
}

/// A result to store.
#[derive(Debug, Clone)]
pub struct Acceptance {
    /// The task.
    pub task: TaskId,
    /// The attempt that produced it (must be the task's current attempt).
    pub attempt: u32,
    /// The node.
    pub node: PublicKey,
    /// The outcome (MessagePack of `Outcome`).
    pub outcome: Vec<u8>,
    /// The signed receipt (MessagePack of `SignedReceipt`).
    pub receipt: Vec<u8>,
    /// MessagePack of the task's text-generation transcript; empty when it
    /// generated nothing. Kept so an `llm`-tier check can replay it.
    pub transcript: Vec<u8>,
}

/// A stored task row for status and results.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Index in its job.
    pub index: u32,
    /// The task.
    pub task: TaskId,
    /// `queued`, `leased`, `done`, `dead`.
    pub state: &'static str,
    /// The attempt count.
    pub attempts: u32,
    /// The outcome, when done.
    pub outcome: Option<Outcome>,
    /// Node that produced the result.
    pub node: Option<PublicKey>,
    /// Failure reasons.
    pub reasons: Vec<String>,
    /// The earlier task whose result answered this one (result cache).
    pub cached_from: Option<TaskId>,
    /// Verification state of the result.
    pub verified: Verified,
    /// Outcome of a challenge, if one was made.
    pub challenge: Option<String>,
}

/// What the pool knows about a result's correctness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Not re-executed.
    Unverified,
    /// A re-execution is queued or running.
    Checking,
    /// An independent execution agreed.
    Verified,
    /// It was wrong and was replaced by the agreed result.
    Replaced,
    /// Three executions disagreed.
    Disputed,
    /// Its node was later caught cheating: re-checked, and not served from
    /// the result cache until decided.
    Suspect,
}

impl Verified {
    fn code(self) -> i64 {
        match self {
            Self::Unverified => 0,
            Self::Checking => 1,
            Self::Verified => 2,
            Self::Replaced => 3,
            Self::Disputed => 4,
            Self::Suspect => 5,
        }
    }

    fn from_code(c: i64) -> Self {
        match c {
            1 => Self::Checking,
            2 => Self::Verified,
            3 => Self::Replaced,
            4 => Self::Disputed,
            5 => Self::Suspect,
            _ => Self::Unverified,
        }
    }

    /// The name clients see.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unverified => "unverified",
            Self::Checking => "checking",
            Self::Verified => "verified",
            Self::Replaced => "replaced",
            Self::Disputed => "disputed",
            Self::Suspect => "suspect",
        }
    }
}

/// Why a job exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Submitted by a client.
    User,
    /// The pool's re-executions of one bundle's results (hidden).
    Check,
    /// The pool's known-answer tasks for one bundle (hidden).
    Canary,
}

impl JobKind {
    fn code(self) -> i64 {
        match self {
            Self::User => 0,
            Self::Check => 1,
            Self::Canary => 2,
        }
    }

    fn from_code(c: i64) -> Self {
        match c {
            1 => Self::Check,
            2 => Self::Canary,
            _ => Self::User,
        }
    }
}

/// A finished (or pending) task's result and its verification facts.
#[derive(Debug, Clone)]
pub struct ResultRow {
    /// The task.
    pub task: TaskId,
    /// Its job.
    pub job: JobId,
    /// `done` or not.
    pub done: bool,
    /// Node that produced the stored result.
    pub node: Option<PublicKey>,
    /// MessagePack of the outcome.
    pub outcome: Option<Vec<u8>>,
    /// Unix time it was stored.
    pub done_at: u64,
    /// Verification state.
    pub verified: Verified,
    /// For a re-execution: the task it checks.
    pub check_of: Option<TaskId>,
    /// For a canary: MessagePack of the expected outcome.
    pub expect: Option<Vec<u8>>,
    /// The task whose result the cache copied into this one.
    pub cached_from: Option<TaskId>,
    /// A challenge's state, if one was made.
    pub challenge: Option<String>,
    /// Index in its job.
    pub index: u32,
}

/// Counts of one job's tasks by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Tasks in total.
    pub tasks: u32,
    /// Queued.
    pub queued: u32,
    /// Leased.
    pub leased: u32,
    /// Done.
    pub done: u32,
    /// Dead-lettered.
    pub dead: u32,
    /// Done without compute: answered from the result cache.
    pub cached: u32,
}

/// A stored job: its id, each task with whether the result cache answered
/// it, and whether the job is new (`false`: the key was used before).
pub type InsertedJob = (JobId, Vec<(TaskId, bool)>, bool);

/// What the coordinator needs from a database.
pub trait Store: Send {
    /// Turn every leased task back to queued (its lease died with the
    /// previous process) and return the bundles, the tasks to queue, and the
    /// next free job id.
    fn recover(&mut self) -> Result<(Vec<StoredBundle>, Vec<PendingTask>), StoreError>;
    /// Store a published bundle (idempotent).
    fn put_bundle(&mut self, b: &StoredBundle, name: &str, version: &str)
        -> Result<(), StoreError>;
    /// Store a job and its tasks in one transaction. If `key` was used before,
    /// nothing is stored and the earlier job is returned with `false`.
    /// An input whose result for this bundle is already stored is answered
    /// from it at once (the result cache): its task is stored done, with the
    /// earlier task as provenance. Returns each task and whether it was cached.
    fn insert_job(
        &mut self,
        bundle: &Digest,
        key: &str,
        inputs: &[Vec<u8>],
        now_unix: u64,
    ) -> Result<InsertedJob, StoreError>;
    /// Record leases (task, new attempt, node) and return each task's input
    /// and its digest.
    fn grant(
        &mut self,
        grants: &[(TaskId, u32, PublicKey)],
    ) -> Result<Vec<(Vec<u8>, Digest)>, StoreError>;
    /// A failed or expired attempt: back to the queue with its reason, or dead
    /// when `dead` is set.
    fn release(
        &mut self,
        task: TaskId,
        attempt: u32,
        reason: &str,
        dead: bool,
    ) -> Result<(), StoreError>;
    /// Store results; each is stored only if its task is still leased at that
    /// attempt (and its node credited). Returns, per result, whether it was stored.
    fn accept(&mut self, results: &[Acceptance], now_unix: u64) -> Result<Vec<bool>, StoreError>;
    /// Is this task done by this attempt and node (a resent result)?
    fn done_by(&mut self, task: TaskId, attempt: u32, node: &PublicKey)
        -> Result<bool, StoreError>;
    /// A job's bundle and task counts.
    fn job(&mut self, job: JobId) -> Result<Option<(Digest, JobCounts)>, StoreError>;
    /// All jobs, newest last.
    fn jobs(&mut self) -> Result<Vec<(JobId, Digest, JobCounts)>, StoreError>;
    /// A job's tasks from index `from`.
    fn tasks(&mut self, job: JobId, from: u32, limit: u32) -> Result<Vec<TaskRow>, StoreError>;
    /// Add to a node's counters, creating it on first sight.
    fn node_seen(
        &mut self,
        node: &PublicKey,
        completed: u64,
        expired: u64,
        now_unix: u64,
    ) -> Result<(), StoreError>;
    /// Every node's counters: (key, completed, expired).
    fn nodes(&mut self) -> Result<Vec<(PublicKey, u64, u64)>, StoreError>;

    /// The hidden job of `kind` for a bundle, created on first use.
    fn hidden_job(&mut self, bundle: &Digest, kind: JobKind) -> Result<JobId, StoreError>;
    /// Every job's kind (jobs not listed are user jobs).
    fn job_kinds(&mut self) -> Result<Vec<(JobId, JobKind)>, StoreError>;
    /// Queue a re-execution of `target` in `job` (a copy of its input with
    /// `check_of` set) and set the target's state to `mark`; one transaction.
    fn insert_check(
        &mut self,
        job: JobId,
        target: TaskId,
        mark: Verified,
    ) -> Result<TaskId, StoreError>;
    /// A task's result and verification facts.
    fn result(&mut self, task: TaskId) -> Result<Option<ResultRow>, StoreError>;
    /// A task's stored transcript (MessagePack), if it has one.
    fn transcript(&mut self, task: TaskId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Finished re-executions of `target`, oldest first.
    fn checks_of(&mut self, target: TaskId) -> Result<Vec<ResultRow>, StoreError>;
    /// Set a result's verification state.
    fn set_verified(&mut self, task: TaskId, v: Verified) -> Result<(), StoreError>;
    /// Replace `target`'s result by `from`'s (node, outcome, receipt), mark it
    /// replaced, and update the cache's copies of it; one transaction.
    fn replace_result(&mut self, target: TaskId, from: TaskId) -> Result<(), StoreError>;
    /// Record a challenge's state.
    fn set_challenge(&mut self, task: TaskId, text: &str) -> Result<(), StoreError>;
    /// A node's most recent results of user jobs that were never checked,
    /// newest first, with their jobs.
    fn unverified_recent(
        &mut self,
        node: &PublicKey,
        limit: u32,
    ) -> Result<Vec<(TaskId, JobId)>, StoreError>;
    /// Every node's verification standing (nodes never judged are absent).
    fn standings(&mut self) -> Result<Vec<(PublicKey, Standing)>, StoreError>;
    /// Save a node's standing.
    fn put_standing(&mut self, node: &PublicKey, s: &Standing) -> Result<(), StoreError>;
    /// Add canaries (input, MessagePack of the expected outcome) for a
    /// bundle; returns their ids.
    fn add_canaries(
        &mut self,
        bundle: &Digest,
        items: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<Vec<i64>, StoreError>;
    /// Every canary: (id, bundle).
    fn canaries(&mut self) -> Result<Vec<(i64, Digest)>, StoreError>;
    /// Make a task of canary `canary` in `job`.
    fn insert_canary_task(&mut self, job: JobId, canary: i64) -> Result<TaskId, StoreError>;
}

/// [`Store`] on an SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    /// The open database; lives as long as the pool.
    conn: Connection,
}

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
];

fn corrupt(what: &'static str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        why: why.to_string(),
    }
}

fn digest_col(s: &str) -> Result<Digest, StoreError> {
    Digest::parse(s).map_err(|e| corrupt("digest", e))
}

fn reasons_col(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt("reason list", e))
}

impl SqliteStore {
    /// Open (or create) the database file.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn, durability)
    }

    /// A database in memory (tests of the coordinator).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?, Durability::Process)
    }

    fn init(conn: Connection, durability: Durability) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match durability {
                Durability::Process => "NORMAL",
                Durability::PowerLoss => "FULL",
            },
        )?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // 64 MiB of page cache: task rows are read back when leased.
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS tasks_check ON tasks(check_of) WHERE check_of IS NOT NULL;
             CREATE INDEX IF NOT EXISTS tasks_node_done ON tasks(node, state, verified);",
        )?;
        Ok(Self { conn })
    }
}

fn state_name(s: i64) -> &'static str {
    match s {
        0 => "queued",
        1 => "leased",
        2 => "done",
        _ => "dead",
    }
}

impl Store for SqliteStore {
    fn recover(&mut self) -> Result<(Vec<StoredBundle>, Vec<PendingTask>), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("UPDATE tasks SET state = 0 WHERE state = 1", [])?;
        let mut bundles = Vec::new();
        {
            let mut st = tx.prepare("SELECT digest, signed FROM bundles")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let d: String = r.get(0)?;
                bundles.push(StoredBundle {
                    digest: digest_col(&d)?,
                    signed: r.get(1)?,
                });
            }
        }
        let mut pending = Vec::new();
        {
            let mut st = tx.prepare(
                "SELECT t.id, t.job, j.bundle, t.attempt, t.reasons, t.check_of FROM tasks t JOIN jobs j ON j.id = t.job
                 WHERE t.state = 0 ORDER BY t.id",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let b: String = r.get(2)?;
                let reasons: String = r.get(4)?;
                pending.push(PendingTask {
                    task: r.get::<_, i64>(0)? as TaskId,
                    job: r.get::<_, i64>(1)? as JobId,
                    bundle: digest_col(&b)?,
                    attempt: r.get(3)?,
                    reasons: reasons_col(&reasons)?,
                    check_of: r.get::<_, Option<i64>>(5)?.map(|t| t as TaskId),
                });
            }
        }
        tx.commit()?;
        Ok((bundles, pending))
    }

    fn put_bundle(
        &mut self,
        b: &StoredBundle,
        name: &str,
        version: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO bundles (digest, name, version, signed) VALUES (?1, ?2, ?3, ?4)",
            params![b.digest.to_string(), name, version, b.signed],
        )?;
        Ok(())
    }

    fn insert_job(
        &mut self,
        bundle: &Digest,
        key: &str,
        inputs: &[Vec<u8>],
        now_unix: u64,
    ) -> Result<InsertedJob, StoreError> {
        let tx = self.conn.transaction()?;
        let existing: Option<i64> = tx
            .query_row("SELECT id FROM jobs WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        if let Some(job) = existing {
            let ids = {
                let mut st = tx.prepare(
                    "SELECT id, cached_from IS NOT NULL FROM tasks WHERE job = ?1 ORDER BY idx",
                )?;
                let ids = st
                    .query_map([job], |r| {
                        Ok((r.get::<_, i64>(0)? as TaskId, r.get::<_, bool>(1)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                ids
            };
            return Ok((job as JobId, ids, false));
        }
        tx.execute(
            "INSERT INTO jobs (bundle, key, created_at) VALUES (?1, ?2, ?3)",
            params![bundle.to_string(), key, now_unix as i64],
        )?;
        let job = tx.last_insert_rowid();
        let mut ids = Vec::with_capacity(inputs.len());
        {
            let mut st = tx.prepare(
                "INSERT INTO tasks (job, idx, input, input_digest) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut hit = tx.prepare(
                "SELECT t.id, t.attempt, t.node, t.outcome, t.receipt FROM tasks t JOIN jobs j ON j.id = t.job
                 WHERE t.input_digest = ?1 AND j.bundle = ?2 AND t.state = 2 AND t.cached_from IS NULL
                   AND j.kind = 0 AND t.verified IN (0, 1, 2, 3) LIMIT 1",
            )?;
            let mut cached = tx.prepare(
                "INSERT INTO tasks (job, idx, input, input_digest, state, attempt, node, outcome, receipt, done_at, cached_from)
                 VALUES (?1, ?2, ?3, ?4, 2, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let bundle_text = bundle.to_string();
            for (i, input) in inputs.iter().enumerate() {
                let digest = Digest::of(input);
                type Hit = (i64, u32, Option<String>, Option<Vec<u8>>, Option<Vec<u8>>);
                let earlier: Option<Hit> = hit
                    .query_row(params![digest.0.as_slice(), bundle_text], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()?;
                match earlier {
                    Some((from, attempt, node, outcome, receipt)) => {
                        cached.execute(params![
                            job,
                            i as i64,
                            input,
                            digest.0.as_slice(),
                            attempt,
                            node,
                            outcome,
                            receipt,
                            now_unix as i64,
                            from
                        ])?;
                        ids.push((tx.last_insert_rowid() as TaskId, true));
                    }
                    None => {
                        st.execute(params![job, i as i64, input, digest.0.as_slice()])?;
                        ids.push((tx.last_insert_rowid() as TaskId, false));
                    }
                }
            }
        }
        tx.commit()?;
        Ok((job as JobId, ids, true))
    }

    fn grant(
        &mut self,
        grants: &[(TaskId, u32, PublicKey)],
    ) -> Result<Vec<(Vec<u8>, Digest)>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut inputs = Vec::with_capacity(grants.len());
        {
            let mut up = tx.prepare_cached(
                "UPDATE tasks SET state = 1, attempt = ?2, node = ?3 WHERE id = ?1",
            )?;
            let mut get =
                tx.prepare_cached("SELECT input, input_digest FROM tasks WHERE id = ?1")?;
            for (task, attempt, node) in grants {
                up.execute(params![*task as i64, attempt, node.to_string()])?;
                let (input, digest): (Vec<u8>, Vec<u8>) =
                    get.query_row([*task as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let digest = digest
                    .try_into()
                    .map(Digest)
                    .map_err(|_| corrupt("input digest", "not 32 bytes"))?;
                inputs.push((input, digest));
            }
        }
        tx.commit()?;
        Ok(inputs)
    }

    fn release(
        &mut self,
        task: TaskId,
        attempt: u32,
        reason: &str,
        dead: bool,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let reasons: Option<String> = tx
            .query_row(
                "SELECT reasons FROM tasks WHERE id = ?1 AND attempt = ?2",
                params![task as i64, attempt],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(reasons) = reasons {
            let mut list = reasons_col(&reasons)?;
            list.push(format!("attempt {attempt}: {reason}"));
            let json = serde_json::to_string(&list).map_err(|e| corrupt("reason list", e))?;
            tx.execute(
                "UPDATE tasks SET state = ?3, node = NULL, reasons = ?4 WHERE id = ?1 AND attempt = ?2 AND state = 1",
                params![task as i64, attempt, if dead { 3 } else { 0 }, json],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn accept(&mut self, results: &[Acceptance], now_unix: u64) -> Result<Vec<bool>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut stored = Vec::with_capacity(results.len());
        {
            let mut st = tx.prepare_cached(
                "UPDATE tasks SET state = 2, outcome = ?4, receipt = ?5, done_at = ?6, transcript = ?7
                 WHERE id = ?1 AND attempt = ?2 AND node = ?3 AND state = 1",
            )?;
            for a in results {
                let n = st.execute(params![
                    a.task as i64,
                    a.attempt,
                    a.node.to_string(),
                    a.outcome,
                    a.receipt,
                    now_unix as i64,
                    (!a.transcript.is_empty()).then_some(&a.transcript)
                ])?;
                stored.push(n == 1);
            }
            // Credit each node for what was stored, in the same transaction.
            let mut per_node: std::collections::BTreeMap<&PublicKey, i64> =
                std::collections::BTreeMap::new();
            for (a, ok) in results.iter().zip(&stored) {
                if *ok {
                    *per_node.entry(&a.node).or_default() += 1;
                }
            }
            let mut credit = tx.prepare_cached(
                "INSERT INTO nodes (key, first_seen, last_seen, completed) VALUES (?1, ?2, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET last_seen = ?2, completed = completed + ?3",
            )?;
            for (node, n) in per_node {
                credit.execute(params![node.to_string(), now_unix as i64, n])?;
            }
        }
        tx.commit()?;
        Ok(stored)
    }

    fn done_by(
        &mut self,
        task: TaskId,
        attempt: u32,
        node: &PublicKey,
    ) -> Result<bool, StoreError> {
        let n: i64 = self.conn.prepare_cached(
            "SELECT COUNT(*) FROM tasks WHERE id = ?1 AND attempt = ?2 AND node = ?3 AND state = 2",
        )?
        .query_row(params![task as i64, attempt, node.to_string()], |r| r.get(0))?;
        Ok(n == 1)
    }

    fn job(&mut self, job: JobId) -> Result<Option<(Digest, JobCounts)>, StoreError> {
        let bundle: Option<String> = self
            .conn
            .query_row("SELECT bundle FROM jobs WHERE id = ?1", [job as i64], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(bundle) = bundle else {
            return Ok(None);
        };
        let mut c = JobCounts::default();
        let mut st = self.conn.prepare_cached(
            "SELECT state, COUNT(*), COUNT(cached_from) FROM tasks WHERE job = ?1 GROUP BY state",
        )?;
        let mut rows = st.query([job as i64])?;
        while let Some(r) = rows.next()? {
            let n: u32 = r.get(1)?;
            c.cached += r.get::<_, u32>(2)?;
            c.tasks += n;
            match r.get::<_, i64>(0)? {
                0 => c.queued = n,
                1 => c.leased = n,
                2 => c.done = n,
                _ => c.dead = n,
            }
        }
        Ok(Some((digest_col(&bundle)?, c)))
    }

    fn jobs(&mut self) -> Result<Vec<(JobId, Digest, JobCounts)>, StoreError> {
        let ids: Vec<i64> = {
            let mut st = self.conn.prepare("SELECT id FROM jobs ORDER BY id")?;
            let v = st
                .query_map([], |r| r.get(0))?
                .collect::<Result<Vec<_>, _>>()?;
            v
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some((b, c)) = self.job(id as JobId)? {
                out.push((id as JobId, b, c));
            }
        }
        Ok(out)
    }

    fn tasks(&mut self, job: JobId, from: u32, limit: u32) -> Result<Vec<TaskRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT t.idx, t.id, t.state, t.attempt, t.outcome, t.node, t.reasons, t.cached_from,
                    COALESCE(s.verified, t.verified), COALESCE(s.challenge, t.challenge)
             FROM tasks t LEFT JOIN tasks s ON s.id = t.cached_from
             WHERE t.job = ?1 AND t.idx >= ?2 ORDER BY t.idx LIMIT ?3",
        )?;
        let mut rows = st.query(params![job as i64, from, limit])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let outcome: Option<Vec<u8>> = r.get(4)?;
            let node: Option<String> = r.get(5)?;
            let state: i64 = r.get(2)?;
            let reasons: String = r.get(6)?;
            out.push(TaskRow {
                index: r.get(0)?,
                task: r.get::<_, i64>(1)? as TaskId,
                state: state_name(state),
                attempts: r.get(3)?,
                outcome: outcome
                    .map(|o| rmp_serde::from_slice(&o).map_err(|e| corrupt("outcome", e)))
                    .transpose()?,
                node: if state >= 1 {
                    node.map(|n| PublicKey::parse(&n).map_err(|e| corrupt("node key", e)))
                        .transpose()?
                } else {
                    None
                },
                reasons: reasons_col(&reasons)?,
                cached_from: r.get::<_, Option<i64>>(7)?.map(|t| t as TaskId),
                verified: Verified::from_code(r.get(8)?),
                challenge: r.get(9)?,
            });
        }
        Ok(out)
    }

    fn node_seen(
        &mut self,
        node: &PublicKey,
        completed: u64,
        expired: u64,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        self.conn.prepare_cached(
            "INSERT INTO nodes (key, first_seen, last_seen, completed, expired) VALUES (?1, ?2, ?2, ?3, ?4)
             ON CONFLICT(key) DO UPDATE SET last_seen = ?2, completed = completed + ?3, expired = expired + ?4",
        )?
        .execute(params![node.to_string(), now_unix as i64, completed as i64, expired as i64])?;
        Ok(())
    }

    fn nodes(&mut self) -> Result<Vec<(PublicKey, u64, u64)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT key, completed, expired FROM nodes ORDER BY first_seen")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let k: String = r.get(0)?;
            out.push((
                PublicKey::parse(&k).map_err(|e| corrupt("node key", e))?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ));
        }
        Ok(out)
    }

    fn hidden_job(&mut self, bundle: &Digest, kind: JobKind) -> Result<JobId, StoreError> {
        let key = format!(
            "tidepool/{}/{bundle}",
            match kind {
                JobKind::User => "user",
                JobKind::Check => "check",
                JobKind::Canary => "canary",
            }
        );
        let tx = self.conn.transaction()?;
        let id: Option<i64> = tx
            .query_row("SELECT id FROM jobs WHERE key = ?1", [&key], |r| r.get(0))
            .optional()?;
        let id = match id {
            Some(id) => id,
            None => {
                tx.execute(
                    "INSERT INTO jobs (bundle, key, created_at, kind) VALUES (?1, ?2, 0, ?3)",
                    params![bundle.to_string(), key, kind.code()],
                )?;
                tx.last_insert_rowid()
            }
        };
        tx.commit()?;
        Ok(id as JobId)
    }

    fn job_kinds(&mut self) -> Result<Vec<(JobId, JobKind)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, kind FROM jobs WHERE kind != 0")?;
        let v = st
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as JobId, JobKind::from_code(r.get(1)?)))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    fn insert_check(
        &mut self,
        job: JobId,
        target: TaskId,
        mark: Verified,
    ) -> Result<TaskId, StoreError> {
        let tx = self.conn.transaction()?;
        let id = {
            let mut ins = tx.prepare_cached(
                "INSERT INTO tasks (job, idx, input, input_digest, check_of)
                 SELECT ?1, (SELECT COALESCE(MAX(idx) + 1, 0) FROM tasks WHERE job = ?1), input, input_digest, id
                 FROM tasks WHERE id = ?2",
            )?;
            if ins.execute(params![job as i64, target as i64])? != 1 {
                return Err(corrupt("task", format!("no task {target} to check")));
            }
            let id = tx.last_insert_rowid();
            tx.prepare_cached("UPDATE tasks SET verified = ?2 WHERE id = ?1")?
                .execute(params![target as i64, mark.code()])?;
            id
        };
        tx.commit()?;
        Ok(id as TaskId)
    }

    fn result(&mut self, task: TaskId) -> Result<Option<ResultRow>, StoreError> {
        let mut st = self.conn.prepare_cached(RESULT_SELECT_BY_ID)?;
        let row = st
            .query_row([task as i64], result_row)
            .optional()?
            .transpose()?;
        Ok(row)
    }

    fn checks_of(&mut self, target: TaskId) -> Result<Vec<ResultRow>, StoreError> {
        let mut st = self.conn.prepare_cached(RESULT_SELECT_CHECKS)?;
        let rows = st
            .query_map([target as i64], result_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    fn set_verified(&mut self, task: TaskId, v: Verified) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE tasks SET verified = ?2 WHERE id = ?1")?
            .execute(params![task as i64, v.code()])?;
        Ok(())
    }

    fn replace_result(&mut self, target: TaskId, from: TaskId) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE tasks SET (node, outcome, receipt, transcript) =
                (SELECT node, outcome, receipt, transcript FROM tasks WHERE id = ?2), verified = 3
             WHERE id = ?1",
            params![target as i64, from as i64],
        )?;
        // The cache's copies carry the same result.
        tx.execute(
            "UPDATE tasks SET (node, outcome, receipt, transcript) =
                (SELECT node, outcome, receipt, transcript FROM tasks WHERE id = ?1)
             WHERE cached_from = ?1",
            params![target as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn transcript(&mut self, task: TaskId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT transcript FROM tasks WHERE id = ?1")?
            .query_row(params![task as i64], |r| r.get::<_, Option<Vec<u8>>>(0))
            .optional()?
            .flatten())
    }

    fn set_challenge(&mut self, task: TaskId, text: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE tasks SET challenge = ?2 WHERE id = ?1")?
            .execute(params![task as i64, text])?;
        Ok(())
    }

    fn unverified_recent(
        &mut self,
        node: &PublicKey,
        limit: u32,
    ) -> Result<Vec<(TaskId, JobId)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT t.id, t.job FROM tasks t JOIN jobs j ON j.id = t.job
             WHERE t.node = ?1 AND t.state = 2 AND t.verified = 0 AND t.cached_from IS NULL AND j.kind = 0
             ORDER BY t.id DESC LIMIT ?2",
        )?;
        let v = st
            .query_map(params![node.to_string(), limit], |r| {
                Ok((r.get::<_, i64>(0)? as TaskId, r.get::<_, i64>(1)? as JobId))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    fn standings(&mut self) -> Result<Vec<(PublicKey, Standing)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT key, reputation, strikes, confirmed, quarantined_until, banned FROM nodes
             WHERE reputation IS NOT NULL",
        )?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let k: String = r.get(0)?;
            out.push((
                PublicKey::parse(&k).map_err(|e| corrupt("node key", e))?,
                Standing {
                    reputation: r.get(1)?,
                    strikes: r.get(2)?,
                    confirmed: r.get::<_, i64>(3)? as u64,
                    quarantined_until: r.get::<_, i64>(4)? as u64,
                    banned: r.get(5)?,
                },
            ));
        }
        Ok(out)
    }

    fn put_standing(&mut self, node: &PublicKey, s: &Standing) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO nodes (key, first_seen, last_seen, reputation, strikes, confirmed, quarantined_until, banned)
                 VALUES (?1, 0, 0, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(key) DO UPDATE SET reputation = ?2, strikes = ?3, confirmed = ?4,
                    quarantined_until = ?5, banned = ?6",
            )?
            .execute(params![
                node.to_string(),
                s.reputation,
                s.strikes,
                s.confirmed as i64,
                s.quarantined_until as i64,
                s.banned
            ])?;
        Ok(())
    }

    fn add_canaries(
        &mut self,
        bundle: &Digest,
        items: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<Vec<i64>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut ids = Vec::with_capacity(items.len());
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO canaries (bundle, input, expect) VALUES (?1, ?2, ?3)",
            )?;
            let b = bundle.to_string();
            for (input, expect) in items {
                st.execute(params![b, input, expect])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    fn canaries(&mut self) -> Result<Vec<(i64, Digest)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, bundle FROM canaries ORDER BY id")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let b: String = r.get(1)?;
            out.push((r.get(0)?, digest_col(&b)?));
        }
        Ok(out)
    }

    fn insert_canary_task(&mut self, job: JobId, canary: i64) -> Result<TaskId, StoreError> {
        let input: Vec<u8> = self
            .conn
            .query_row("SELECT input FROM canaries WHERE id = ?1", [canary], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| corrupt("canary", format!("no canary {canary}")))?;
        let digest = Digest::of(&input);
        self.conn
            .prepare_cached(
                "INSERT INTO tasks (job, idx, input, input_digest, expect)
                 SELECT ?1, (SELECT COALESCE(MAX(idx) + 1, 0) FROM tasks WHERE job = ?1), input, ?3, expect
                 FROM canaries WHERE id = ?2",
            )?
            .execute(params![job as i64, canary, digest.0.as_slice()])?;
        Ok(self.conn.last_insert_rowid() as TaskId)
    }
}

const RESULT_SELECT_BY_ID: &str = "SELECT id, job, state, node, outcome, COALESCE(done_at, 0), verified, check_of, expect, cached_from, challenge, idx FROM tasks WHERE id = ?1";
const RESULT_SELECT_CHECKS: &str = "SELECT id, job, state, node, outcome, COALESCE(done_at, 0), verified, check_of, expect, cached_from, challenge, idx FROM tasks WHERE check_of = ?1 AND state = 2 ORDER BY id";

/// Read a row selected by [`RESULT_SELECT_BY_ID`] or [`RESULT_SELECT_CHECKS`].
fn result_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<ResultRow, StoreError>> {
    let node: Option<String> = r.get(3)?;
    let state: i64 = r.get(2)?;
    let node = match node
        .filter(|_| state >= 1)
        .map(|n| PublicKey::parse(&n).map_err(|e| corrupt("node key", e)))
        .transpose()
    {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(ResultRow {
        task: r.get::<_, i64>(0)? as TaskId,
        job: r.get::<_, i64>(1)? as JobId,
        done: state == 2,
        node,
        outcome: r.get(4)?,
        done_at: r.get::<_, i64>(5)? as u64,
        verified: Verified::from_code(r.get(6)?),
        check_of: r.get::<_, Option<i64>>(7)?.map(|t| t as TaskId),
        expect: r.get(8)?,
        cached_from: r.get::<_, Option<i64>>(9)?.map(|t| t as TaskId),
        challenge: r.get(10)?,
        index: r.get(11)?,
    }))
}
