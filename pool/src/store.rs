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
"#;

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
        // Files from before the result cache lack its column.
        let has: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('tasks') WHERE name = 'cached_from'",
            [],
            |r| r.get(0),
        )?;
        if has == 0 {
            conn.execute_batch("ALTER TABLE tasks ADD COLUMN cached_from INTEGER")?;
        }
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
                "SELECT t.id, t.job, j.bundle, t.attempt, t.reasons FROM tasks t JOIN jobs j ON j.id = t.job
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
                 WHERE t.input_digest = ?1 AND j.bundle = ?2 AND t.state = 2 AND t.cached_from IS NULL LIMIT 1",
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
                "UPDATE tasks SET state = 2, outcome = ?4, receipt = ?5, done_at = ?6
                 WHERE id = ?1 AND attempt = ?2 AND node = ?3 AND state = 1",
            )?;
            for a in results {
                let n = st.execute(params![
                    a.task as i64,
                    a.attempt,
                    a.node.to_string(),
                    a.outcome,
                    a.receipt,
                    now_unix as i64
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
            "SELECT idx, id, state, attempt, outcome, node, reasons, cached_from FROM tasks
             WHERE job = ?1 AND idx >= ?2 ORDER BY idx LIMIT ?3",
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
}
