//! [`Store`] on an SQLite file (WAL): every method that changes state is
//! one savepoint — its own transaction, committed before it returns, or,
//! inside a batch (`begin_batch` … `commit_batch`), part of the batch's one
//! transaction, rolled back alone if it fails.

use super::*;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// [`Store`] on an SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    /// The open database; lives as long as the pool.
    conn: Connection,
}

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
        // 16 MiB of page cache: task rows are read back when leased. Not
        // more: SQLite walks the page cache's hash table at commits, and a
        // pool commits per lease and per result batch; 64 MiB made the
        // coordinator 1.6x slower per task (`bench/benches/scale.rs`,
        // 100,000 tasks: 9,243 vs 15,190 decisions/s at 4 nodes, 8,230 vs
        // 11,609 at 100,000 nodes; 4 MiB was no faster than 16).
        conn.pragma_update(None, "cache_size", -16384)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        super::schema::migrate(&conn)?;
        Ok(Self { conn })
    }
}

/// A task's stored state code (0 queued, 1 leased, 2 done, 3 dead).
fn task_state(s: i64) -> TaskState {
    match s {
        0 => TaskState::Queued,
        1 => TaskState::Leased,
        2 => TaskState::Done,
        _ => TaskState::Dead,
    }
}

/// A stored challenge text (written by `set_challenge`).
fn challenge_col(text: Option<String>) -> Result<Option<ChallengeState>, StoreError> {
    text.map(|t| ChallengeState::parse(&t).ok_or_else(|| corrupt("challenge state", t)))
        .transpose()
}

impl Store for SqliteStore {
    fn begin_batch(&mut self) -> Result<(), StoreError> {
        if self.conn.is_autocommit() {
            self.conn.execute_batch("BEGIN")?;
        }
        Ok(())
    }

    fn commit_batch(&mut self) -> Result<(), StoreError> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let tx = self.conn.savepoint()?;
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
                "SELECT t.id, t.job, j.bundle, t.attempt, t.reasons, t.check_of, t.decoy, t.origin FROM tasks t JOIN jobs j ON j.id = t.job
                 WHERE t.state = 0 ORDER BY t.id",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let b: String = r.get(2)?;
                let reasons: String = r.get(4)?;
                pending.push(PendingTask {
                    task: TaskId(r.get::<_, i64>(0)? as u64),
                    job: JobId(r.get::<_, i64>(1)? as u64),
                    bundle: digest_col(&b)?,
                    attempt: r.get(3)?,
                    reasons: reasons_col(&reasons)?,
                    check_of: r.get::<_, Option<i64>>(5)?.map(|t| TaskId(t as u64)),
                    decoy: r.get::<_, i64>(6)? != 0,
                    origin: r.get::<_, Option<i64>>(7)?.map(|t| TaskId(t as u64)),
                });
            }
        }
        tx.commit()?;
        Ok(Recovered { bundles, pending })
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
        owner: &PublicKey,
        key: &str,
        inputs: &[Vec<u8>],
        now_unix: u64,
    ) -> Result<InsertedJob, StoreError> {
        // Keys are scoped to their owner: one client's key never names
        // another's job (nor a hidden job's `tidepool/...` key).
        let key = format!("{owner}/{key}");
        let tx = self.conn.savepoint()?;
        let existing: Option<i64> = tx
            .query_row("SELECT id FROM jobs WHERE key = ?1", [&key], |r| r.get(0))
            .optional()?;
        if let Some(job) = existing {
            let ids = {
                let mut st = tx.prepare(
                    "SELECT id, cached_from IS NOT NULL FROM tasks WHERE job = ?1 ORDER BY idx",
                )?;
                let ids = st
                    .query_map([job], |r| {
                        Ok(InsertedTask {
                            task: TaskId(r.get::<_, i64>(0)? as u64),
                            cached: r.get::<_, bool>(1)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                ids
            };
            return Ok(InsertedJob {
                job: JobId(job as u64),
                tasks: ids,
                fresh: false,
            });
        }
        tx.execute(
            "INSERT INTO jobs (bundle, key, created_at, owner) VALUES (?1, ?2, ?3, ?4)",
            params![bundle.to_string(), key, now_unix as i64, owner.to_string()],
        )?;
        let job = tx.last_insert_rowid();
        let ids = insert_tasks(&tx, JobId(job as u64), bundle, 0, inputs, now_unix)?;
        tx.commit()?;
        Ok(InsertedJob {
            job: JobId(job as u64),
            tasks: ids,
            fresh: true,
        })
    }

    fn open_job(
        &mut self,
        bundle: &Digest,
        owner: &PublicKey,
        key: &str,
        priority: i8,
        create: bool,
        now_unix: u64,
    ) -> Result<Option<OpenedJob>, StoreError> {
        let key = format!("{owner}/{key}");
        let tx = self.conn.savepoint()?;
        type Row = (i64, String, bool, i8);
        let existing: Option<Row> = tx
            .query_row(
                "SELECT id, bundle, sealed, priority FROM jobs WHERE key = ?1",
                [&key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let opened = if let Some((job, b, sealed, priority)) = existing {
            let have: u32 =
                tx.query_row("SELECT COUNT(*) FROM tasks WHERE job = ?1", [job], |r| {
                    r.get(0)
                })?;
            OpenedJob {
                job: JobId(job as u64),
                bundle: digest_col(&b)?,
                have,
                sealed,
                priority,
                fresh: false,
            }
        } else if !create {
            return Ok(None);
        } else {
            tx.execute(
                "INSERT INTO jobs (bundle, key, created_at, owner, sealed, priority)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                params![
                    bundle.to_string(),
                    key,
                    now_unix as i64,
                    owner.to_string(),
                    priority
                ],
            )?;
            OpenedJob {
                job: JobId(tx.last_insert_rowid() as u64),
                bundle: *bundle,
                have: 0,
                sealed: false,
                priority,
                fresh: true,
            }
        };
        tx.commit()?;
        Ok(Some(opened))
    }

    fn append_inputs(
        &mut self,
        job: JobId,
        bundle: &Digest,
        from: u32,
        inputs: &[Vec<u8>],
        now_unix: u64,
    ) -> Result<Vec<InsertedTask>, StoreError> {
        let tx = self.conn.savepoint()?;
        let ids = insert_tasks(&tx, job, bundle, from, inputs, now_unix)?;
        tx.prepare_cached("UPDATE jobs SET touched_at = ?2 WHERE id = ?1")?
            .execute(params![job.0 as i64, now_unix as i64])?;
        tx.commit()?;
        Ok(ids)
    }

    fn abandoned_jobs(
        &mut self,
        cutoff_unix: u64,
        max_jobs: u32,
    ) -> Result<Vec<JobId>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id FROM jobs WHERE kind = 0 AND sealed = 0
               AND COALESCE(touched_at, created_at) < ?1
             ORDER BY id LIMIT ?2",
        )?;
        let v = st
            .query_map(params![cutoff_unix as i64, max_jobs], |r| {
                r.get::<_, i64>(0)
            })?
            .map(|r| r.map(|id| JobId(id as u64)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    fn input_digests(
        &mut self,
        job: JobId,
        from: u32,
        count: u32,
    ) -> Result<Vec<Digest>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT input_digest FROM tasks WHERE job = ?1 AND idx >= ?2 ORDER BY idx LIMIT ?3",
        )?;
        let v = st
            .query_map(params![job.0 as i64, from, count], |r| {
                r.get::<_, Vec<u8>>(0)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        v.into_iter()
            .map(|d| {
                <[u8; 32]>::try_from(d.as_slice())
                    .map(Digest)
                    .map_err(|_| corrupt("input digest", "not 32 bytes"))
            })
            .collect()
    }

    fn forget_job(&mut self, job: JobId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE jobs SET forgotten = 1 WHERE id = ?1")?
            .execute([job.0 as i64])?;
        Ok(())
    }

    fn purge(
        &mut self,
        cutoff_unix: Option<u64>,
        now_unix: u64,
        max_jobs: u32,
    ) -> Result<Purged, StoreError> {
        let tx = self.conn.savepoint()?;
        let jobs: Vec<i64> = {
            let mut st = tx.prepare_cached(
                "SELECT j.id FROM jobs j
                 WHERE j.kind = 0 AND j.sealed = 1 AND j.purged_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job = j.id AND t.state < 2)
                   AND (j.forgotten = 1 OR (?1 IS NOT NULL AND
                        COALESCE((SELECT MAX(done_at) FROM tasks t WHERE t.job = j.id), j.created_at) < ?1))
                 ORDER BY j.id LIMIT ?2",
            )?;
            let v = st
                .query_map(params![cutoff_unix.map(|c| c as i64), max_jobs], |r| {
                    r.get(0)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            v
        };
        let mut out = Purged::default();
        for job in jobs {
            let (tasks, bytes): (u64, Option<i64>) = tx.query_row(
                "SELECT COUNT(*), SUM(length(input) + IFNULL(length(outcome), 0) + IFNULL(length(transcript), 0))
                 FROM tasks WHERE job = ?1",
                [job],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            tx.execute(
                "UPDATE tasks SET input = x'', outcome = NULL, transcript = NULL WHERE job = ?1",
                [job],
            )?;
            tx.execute(
                "UPDATE jobs SET purged_at = ?2 WHERE id = ?1",
                params![job, now_unix as i64],
            )?;
            out.jobs.push(JobId(job as u64));
            out.tasks += tasks;
            out.bytes += bytes.unwrap_or(0).max(0) as u64;
        }
        tx.commit()?;
        Ok(out)
    }

    fn cancel_job(&mut self, job: JobId, reason: &str) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.execute("UPDATE jobs SET sealed = 1 WHERE id = ?1", [job.0 as i64])?;
        tx.execute(
            "UPDATE tasks SET state = 3, node = NULL, reasons = json_insert(reasons, '$[#]', ?2)
             WHERE job = ?1 AND state < 2",
            params![job.0 as i64, reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn seal_job(&mut self, job: JobId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE jobs SET sealed = 1 WHERE id = ?1")?
            .execute([job.0 as i64])?;
        Ok(())
    }

    fn grant(
        &mut self,
        grants: &[GrantRow],
        max_bytes: u64,
    ) -> Result<Vec<GrantedInput>, StoreError> {
        let tx = self.conn.savepoint()?;
        let mut inputs = Vec::with_capacity(grants.len());
        {
            let mut up = tx.prepare_cached(
                "UPDATE tasks SET state = 1, attempt = ?2, node = ?3 WHERE id = ?1",
            )?;
            let mut get =
                tx.prepare_cached("SELECT input, input_digest FROM tasks WHERE id = ?1")?;
            let mut len = tx.prepare_cached("SELECT length(input) FROM tasks WHERE id = ?1")?;
            let mut bytes = 0u64;
            for GrantRow {
                task,
                attempt,
                node,
            } in grants
            {
                let n: i64 = len.query_row([task.0 as i64], |r| r.get(0))?;
                bytes = bytes.saturating_add(n.max(0) as u64);
                if bytes > max_bytes && !inputs.is_empty() {
                    break;
                }
                up.execute(params![task.0 as i64, attempt, node.to_string()])?;
                let (input, digest): (Vec<u8>, Vec<u8>) =
                    get.query_row([task.0 as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let digest = digest
                    .try_into()
                    .map(Digest)
                    .map_err(|_| corrupt("input digest", "not 32 bytes"))?;
                inputs.push(GrantedInput { input, digest });
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
        let tx = self.conn.savepoint()?;
        let reasons: Option<String> = tx
            .query_row(
                "SELECT reasons FROM tasks WHERE id = ?1 AND attempt = ?2",
                params![task.0 as i64, attempt],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(reasons) = reasons {
            let mut list = reasons_col(&reasons)?;
            list.push(format!("attempt {attempt}: {reason}"));
            let json = serde_json::to_string(&list).map_err(|e| corrupt("reason list", e))?;
            tx.execute(
                "UPDATE tasks SET state = ?3, node = NULL, reasons = ?4 WHERE id = ?1 AND attempt = ?2 AND state = 1",
                params![task.0 as i64, attempt, if dead { 3 } else { 0 }, json],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn accept(&mut self, results: &[Acceptance], now_unix: u64) -> Result<Vec<bool>, StoreError> {
        let tx = self.conn.savepoint()?;
        let mut stored = Vec::with_capacity(results.len());
        {
            let mut st = tx.prepare_cached(
                "UPDATE tasks SET state = 2, outcome = ?4, receipt = ?5, done_at = ?6, transcript = ?7,
                    engines = ?8
                 WHERE id = ?1 AND attempt = ?2 AND node = ?3 AND state = 1",
            )?;
            for a in results {
                let n = st.execute(params![
                    a.task.0 as i64,
                    a.attempt,
                    a.node.to_string(),
                    a.outcome,
                    a.receipt,
                    now_unix as i64,
                    (!a.transcript.is_empty()).then_some(&a.transcript),
                    engines_text(&a.engines)
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
        .query_row(params![task.0 as i64, attempt, node.to_string()], |r| r.get(0))?;
        Ok(n == 1)
    }

    fn job(&mut self, job: JobId) -> Result<Option<(Digest, JobCounts)>, StoreError> {
        let bundle: Option<String> = self
            .conn
            .query_row(
                "SELECT bundle FROM jobs WHERE id = ?1",
                [job.0 as i64],
                |r| r.get(0),
            )
            .optional()?;
        let Some(bundle) = bundle else {
            return Ok(None);
        };
        let mut c = JobCounts::default();
        let mut st = self.conn.prepare_cached(
            "SELECT state, COUNT(*), COUNT(cached_from),
                    COALESCE(SUM(length(input)), 0) + COALESCE(SUM(length(outcome)), 0)
             FROM tasks WHERE job = ?1 GROUP BY state",
        )?;
        let mut rows = st.query([job.0 as i64])?;
        while let Some(r) = rows.next()? {
            let n: u32 = r.get(1)?;
            c.cached += r.get::<_, u32>(2)?;
            c.bytes += r.get::<_, i64>(3)?.max(0) as u64;
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

    fn jobs(&mut self) -> Result<Vec<JobRow>, StoreError> {
        type Row = (i64, Option<String>, bool, i8, bool, bool);
        let ids: Vec<Row> = {
            let mut st = self.conn.prepare(
                "SELECT id, owner, sealed, priority, purged_at IS NOT NULL, forgotten
                 FROM jobs ORDER BY id",
            )?;
            let v = st
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            v
        };
        let mut out = Vec::new();
        for (id, owner, sealed, priority, purged, forgotten) in ids {
            if let Some((bundle, mut counts)) = self.job(JobId(id as u64))? {
                if forgotten {
                    // Removed at the next collection: counts toward no quota.
                    counts.bytes = 0;
                }
                out.push(JobRow {
                    job: JobId(id as u64),
                    bundle,
                    counts,
                    owner: owner
                        .map(|k| PublicKey::parse(&k).map_err(|e| corrupt("job owner", e)))
                        .transpose()?,
                    sealed,
                    priority,
                    purged,
                });
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
        let mut rows = st.query(params![job.0 as i64, from, limit])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let outcome: Option<Vec<u8>> = r.get(4)?;
            let node: Option<String> = r.get(5)?;
            let state: i64 = r.get(2)?;
            let reasons: String = r.get(6)?;
            out.push(TaskRow {
                index: r.get(0)?,
                task: TaskId(r.get::<_, i64>(1)? as u64),
                state: task_state(state),
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
                cached_from: r.get::<_, Option<i64>>(7)?.map(|t| TaskId(t as u64)),
                verified: Verified::from_code(r.get(8)?),
                challenge: challenge_col(r.get(9)?)?,
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

    fn nodes(&mut self) -> Result<Vec<NodeCounters>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT key, completed, expired FROM nodes ORDER BY first_seen")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let k: String = r.get(0)?;
            out.push(NodeCounters {
                key: PublicKey::parse(&k).map_err(|e| corrupt("node key", e))?,
                completed: r.get::<_, i64>(1)? as u64,
                expired: r.get::<_, i64>(2)? as u64,
            });
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
        let tx = self.conn.savepoint()?;
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
        Ok(JobId(id as u64))
    }

    fn job_kinds(&mut self) -> Result<Vec<(JobId, JobKind)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, kind FROM jobs WHERE kind != 0")?;
        let v = st
            .query_map([], |r| {
                Ok((
                    JobId(r.get::<_, i64>(0)? as u64),
                    JobKind::from_code(r.get(1)?),
                ))
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
        let tx = self.conn.savepoint()?;
        let id = {
            let mut ins = tx.prepare_cached(
                "INSERT INTO tasks (job, idx, input, input_digest, check_of)
                 SELECT ?1, (SELECT COALESCE(MAX(idx) + 1, 0) FROM tasks WHERE job = ?1), input, input_digest, id
                 FROM tasks WHERE id = ?2",
            )?;
            if ins.execute(params![job.0 as i64, target.0 as i64])? != 1 {
                return Err(corrupt("task", format!("no task {target} to check")));
            }
            let id = tx.last_insert_rowid();
            tx.prepare_cached("UPDATE tasks SET verified = ?2 WHERE id = ?1")?
                .execute(params![target.0 as i64, mark.code()])?;
            id
        };
        tx.commit()?;
        Ok(TaskId(id as u64))
    }

    fn canary_source(
        &mut self,
        job: JobId,
        index: u32,
    ) -> Result<Option<CanarySource>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT id, verified, input, outcome FROM tasks
                 WHERE job = ?1 AND idx = ?2 AND state = 2 AND cached_from IS NULL",
            )?
            .query_row(params![job.0 as i64, i64::from(index)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })
            .optional()?;
        Ok(row.and_then(|(t, v, input, outcome)| {
            Some(CanarySource {
                task: TaskId(t as u64),
                verified: Verified::from_code(v),
                input,
                outcome: outcome?,
            })
        }))
    }

    fn insert_decoy(&mut self, job: JobId, target: TaskId) -> Result<TaskId, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "INSERT INTO tasks (job, idx, input, input_digest, check_of, decoy)
                 SELECT ?1, (SELECT COALESCE(MAX(idx) + 1, 0) FROM tasks WHERE job = ?1), input, input_digest, id, 1
                 FROM tasks WHERE id = ?2",
            )?
            .execute(params![job.0 as i64, target.0 as i64])?;
        if n != 1 {
            return Err(corrupt(
                "task",
                format!("no task {target} to make a decoy of"),
            ));
        }
        Ok(TaskId(self.conn.last_insert_rowid() as u64))
    }

    fn decoy_targets(
        &mut self,
        bundle: &Digest,
        node: &PublicKey,
        limit: u32,
    ) -> Result<Vec<TaskId>, StoreError> {
        let node = node.to_string();
        let mut st = self.conn.prepare_cached(
            "SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job
             WHERE j.bundle = ?1 AND j.kind = 0 AND t.state = 2 AND t.verified = 2
               AND t.transcript IS NOT NULL AND t.cached_from IS NULL AND t.node != ?2
               AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.check_of = t.id AND c.node = ?2)
             ORDER BY t.id DESC LIMIT ?3",
        )?;
        let rows = st
            .query_map(params![bundle.to_string(), node, i64::from(limit)], |r| {
                r.get::<_, i64>(0)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().map(|t| TaskId(t as u64)).collect())
    }

    fn result(&mut self, task: TaskId) -> Result<Option<ResultRow>, StoreError> {
        let mut st = self.conn.prepare_cached(RESULT_SELECT_BY_ID)?;
        let row = st
            .query_row([task.0 as i64], result_row)
            .optional()?
            .transpose()?;
        Ok(row)
    }

    fn checks_of(&mut self, target: TaskId) -> Result<Vec<ResultRow>, StoreError> {
        let mut st = self.conn.prepare_cached(RESULT_SELECT_CHECKS)?;
        let rows = st
            .query_map([target.0 as i64], result_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    fn set_verified(&mut self, task: TaskId, v: Verified) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE tasks SET verified = ?2 WHERE id = ?1")?
            .execute(params![task.0 as i64, v.code()])?;
        Ok(())
    }

    fn replace_result(
        &mut self,
        target: TaskId,
        from: TaskId,
        decided_by: &[TaskId],
        now_unix: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        let decided: Vec<u64> = decided_by.iter().map(|t| t.0).collect();
        // A list of numbers always serialises.
        let decided = serde_json::to_string(&decided).unwrap_or_default();
        tx.execute(
            "INSERT INTO evidence (task, node, outcome, receipt, transcript, decided_by, at)
             SELECT id, node, outcome, receipt, transcript, ?2, ?3 FROM tasks
             WHERE id = ?1 AND node IS NOT NULL",
            params![target.0 as i64, decided, now_unix as i64],
        )?;
        tx.execute(
            "UPDATE tasks SET (node, outcome, receipt, transcript, engines) =
                (SELECT node, outcome, receipt, transcript, engines FROM tasks WHERE id = ?2), verified = 3
             WHERE id = ?1",
            params![target.0 as i64, from.0 as i64],
        )?;
        // The cache's copies carry the same result.
        tx.execute(
            "UPDATE tasks SET (node, outcome, receipt, transcript, engines) =
                (SELECT node, outcome, receipt, transcript, engines FROM tasks WHERE id = ?1)
             WHERE cached_from = ?1",
            params![target.0 as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn evidence(&mut self, task: TaskId) -> Result<Vec<Evidence>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT task, node, outcome, receipt, decided_by, at FROM evidence
             WHERE task = ?1 ORDER BY id",
        )?;
        let rows = st
            .query_map([task.0 as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(task, node, outcome, receipt, decided, at)| {
                let decided: Vec<u64> =
                    serde_json::from_str(&decided).map_err(|e| corrupt("evidence", e))?;
                Ok(Evidence {
                    task: TaskId(task as u64),
                    node: PublicKey::parse(&node).map_err(|e| corrupt("node key", e))?,
                    outcome,
                    receipt,
                    decided_by: decided.into_iter().map(TaskId).collect(),
                    at: at as u64,
                })
            })
            .collect()
    }

    fn result_counts(
        &mut self,
        job: JobId,
        since: u64,
        until: u64,
        window_closed_before: u64,
    ) -> Result<Vec<ResultCount>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT node, verified, COALESCE(challenge = 'pending', 0), done_at < ?4, COUNT(*)
             FROM tasks
             WHERE job = ?1 AND state = 2 AND cached_from IS NULL AND node IS NOT NULL
               AND done_at >= ?2 AND done_at < ?3
             GROUP BY 1, 2, 3, 4",
        )?;
        let rows = st
            .query_map(
                params![
                    job.0 as i64,
                    since as i64,
                    until as i64,
                    window_closed_before as i64
                ],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, bool>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(node, v, challenged, window_closed, count)| {
                Ok(ResultCount {
                    node: PublicKey::parse(&node).map_err(|e| corrupt("node key", e))?,
                    verified: Verified::from_code(v),
                    challenged,
                    window_closed,
                    count: count as u64,
                })
            })
            .collect()
    }

    fn replaced_counts(
        &mut self,
        since: u64,
        until: u64,
    ) -> Result<Vec<(PublicKey, u64)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT node, COUNT(*) FROM evidence WHERE at >= ?1 AND at < ?2 GROUP BY node",
        )?;
        let rows = st
            .query_map(params![since as i64, until as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(node, n)| {
                Ok((
                    PublicKey::parse(&node).map_err(|e| corrupt("node key", e))?,
                    n as u64,
                ))
            })
            .collect()
    }

    fn replay_row(&mut self, job: JobId, index: u32) -> Result<Option<ReplayRow>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT COALESCE(o.node, t.node), t.input, COALESCE(o.outcome, t.outcome),
                        COALESCE(o.receipt, t.receipt), COALESCE(o.transcript, t.transcript)
                 FROM tasks t LEFT JOIN tasks o ON o.id = t.cached_from
                 WHERE t.job = ?1 AND t.idx = ?2 AND t.state = 2",
            )?
            .query_row(params![job.0 as i64, i64::from(index)], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })
            .optional()?;
        let Some((Some(node), input, Some(outcome), Some(receipt), transcript)) = row else {
            return Ok(None);
        };
        Ok(Some(ReplayRow {
            node: PublicKey::parse(&node).map_err(|e| corrupt("node key", e))?,
            input,
            outcome,
            receipt,
            transcript,
        }))
    }

    fn ledger_results(
        &mut self,
        since: u64,
        until: u64,
        node: Option<&PublicKey>,
        after: Option<(u64, TaskId)>,
        limit: u32,
    ) -> Result<Vec<LedgerResult>, StoreError> {
        let (after_at, after_task) =
            after.map_or((-1i64, -1i64), |(at, t)| (at as i64, t.0 as i64));
        let mut st = self.conn.prepare_cached(
            "SELECT t.id, t.job, t.idx, t.node, t.verified, COALESCE(t.challenge = 'pending', 0),
                    t.done_at, t.receipt
             FROM tasks t JOIN jobs j ON j.id = t.job
             WHERE t.state = 2 AND t.done_at >= ?1 AND t.done_at < ?2
               AND (?3 IS NULL OR t.node = ?3)
               AND (t.done_at, t.id) > (?4, ?5)
               AND t.cached_from IS NULL AND t.node IS NOT NULL AND t.receipt IS NOT NULL
               AND j.kind = 0
             ORDER BY t.done_at, t.id LIMIT ?6",
        )?;
        let rows = st
            .query_map(
                params![
                    since as i64,
                    until as i64,
                    node.map(|k| k.to_string()),
                    after_at,
                    after_task,
                    i64::from(limit)
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, bool>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, Vec<u8>>(7)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(task, job, idx, node, v, challenged, at, receipt)| {
                Ok(LedgerResult {
                    task: TaskId(task as u64),
                    job: JobId(job as u64),
                    index: idx as u32,
                    node: PublicKey::parse(&node).map_err(|e| corrupt("node key", e))?,
                    verified: Verified::from_code(v),
                    challenged,
                    done_at: at as u64,
                    receipt,
                })
            })
            .collect()
    }

    fn ledger_withdrawn(
        &mut self,
        since: u64,
        until: u64,
        node: Option<&PublicKey>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<LedgerWithdrawn>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT e.id, t.job, t.idx, e.node, e.at, e.receipt
             FROM evidence e JOIN tasks t ON t.id = e.task JOIN jobs j ON j.id = t.job
             WHERE e.at >= ?1 AND e.at < ?2 AND (?3 IS NULL OR e.node = ?3) AND e.id > ?4
               AND e.receipt IS NOT NULL AND j.kind = 0
             ORDER BY e.id LIMIT ?5",
        )?;
        let rows = st
            .query_map(
                params![
                    since as i64,
                    until as i64,
                    node.map(|k| k.to_string()),
                    after as i64,
                    i64::from(limit)
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Vec<u8>>(5)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, job, idx, node, at, receipt)| {
                Ok(LedgerWithdrawn {
                    id: id as u64,
                    job: JobId(job as u64),
                    index: idx as u32,
                    node: PublicKey::parse(&node).map_err(|e| corrupt("node key", e))?,
                    at: at as u64,
                    receipt,
                })
            })
            .collect()
    }

    fn transcript(&mut self, task: TaskId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT transcript FROM tasks WHERE id = ?1")?
            .query_row(params![task.0 as i64], |r| r.get::<_, Option<Vec<u8>>>(0))
            .optional()?
            .flatten())
    }

    fn set_challenge(&mut self, task: TaskId, state: ChallengeState) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE tasks SET challenge = ?2 WHERE id = ?1")?
            .execute(params![task.0 as i64, state.as_str()])?;
        Ok(())
    }

    fn recent_to_recheck(
        &mut self,
        node: &PublicKey,
        limit: u32,
    ) -> Result<Vec<(TaskId, JobId)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT t.id, t.job FROM tasks t JOIN jobs j ON j.id = t.job
             WHERE t.node = ?1 AND t.state = 2 AND t.verified IN (0, 2) AND t.cached_from IS NULL AND j.kind = 0
               AND j.purged_at IS NULL
             ORDER BY t.done_at DESC, t.id DESC LIMIT ?2",
        )?;
        let v = st
            .query_map(params![node.to_string(), limit], task_and_job)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    fn confirmed_by(
        &mut self,
        checker: &PublicKey,
        limit: u32,
    ) -> Result<Vec<(TaskId, JobId)>, StoreError> {
        // The checker's finished check rows (index tasks_node_checks), then
        // their targets.
        let mut st = self.conn.prepare_cached(
            "SELECT t.id, t.job FROM tasks c
             JOIN tasks t ON t.id = c.check_of JOIN jobs j ON j.id = t.job
             WHERE c.node = ?1 AND c.state = 2 AND c.check_of IS NOT NULL
               AND t.state = 2 AND t.verified = 2 AND t.cached_from IS NULL AND j.kind = 0
               AND j.purged_at IS NULL
             ORDER BY c.id DESC LIMIT ?2",
        )?;
        let v = st
            .query_map(params![checker.to_string(), limit], task_and_job)?
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

    fn secret(&mut self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO pool_meta (name, value) VALUES ('secret', ?1)")?
            .execute([&fresh[..]])?;
        let v: Vec<u8> = self
            .conn
            .prepare_cached("SELECT value FROM pool_meta WHERE name = 'secret'")?
            .query_row([], |r| r.get(0))?;
        v.try_into()
            .map_err(|v: Vec<u8>| corrupt("pool secret", format!("{} bytes, not 32", v.len())))
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
        items: &[NewCanary],
    ) -> Result<Vec<CanaryId>, StoreError> {
        let tx = self.conn.savepoint()?;
        let mut ids = Vec::with_capacity(items.len());
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO canaries (bundle, input, expect, origin) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let b = bundle.to_string();
            for NewCanary {
                input,
                expect,
                origin,
            } in items
            {
                st.execute(params![b, input, expect, origin.0 as i64])?;
                ids.push(CanaryId(tx.last_insert_rowid()));
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    fn canaries(&mut self) -> Result<Vec<CanaryRow>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, bundle FROM canaries ORDER BY id")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let b: String = r.get(1)?;
            out.push(CanaryRow {
                id: CanaryId(r.get(0)?),
                bundle: digest_col(&b)?,
            });
        }
        Ok(out)
    }

    fn insert_canary_task(
        &mut self,
        job: JobId,
        canary: CanaryId,
    ) -> Result<(TaskId, Option<TaskId>), StoreError> {
        let (input, origin): (Vec<u8>, Option<i64>) = self
            .conn
            .query_row(
                "SELECT input, origin FROM canaries WHERE id = ?1",
                [canary.0],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| corrupt("canary", format!("no canary {}", canary.0)))?;
        let digest = Digest::of(&input);
        self.conn
            .prepare_cached(
                "INSERT INTO tasks (job, idx, input, input_digest, expect, origin)
                 SELECT ?1, (SELECT COALESCE(MAX(idx) + 1, 0) FROM tasks WHERE job = ?1), input, ?3, expect, origin
                 FROM canaries WHERE id = ?2",
            )?
            .execute(params![job.0 as i64, canary.0, digest.0.as_slice()])?;
        Ok((
            TaskId(self.conn.last_insert_rowid() as u64),
            origin.map(|t| TaskId(t as u64)),
        ))
    }
}

const RESULT_SELECT_BY_ID: &str = "SELECT id, job, state, node, outcome, COALESCE(done_at, 0), verified, check_of, expect, cached_from, challenge, idx, engines FROM tasks WHERE id = ?1";
const RESULT_SELECT_CHECKS: &str = "SELECT id, job, state, node, outcome, COALESCE(done_at, 0), verified, check_of, expect, cached_from, challenge, idx, engines FROM tasks WHERE check_of = ?1 AND state = 2 AND decoy = 0 ORDER BY id";

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
        task: TaskId(r.get::<_, i64>(0)? as u64),
        job: JobId(r.get::<_, i64>(1)? as u64),
        done: state == 2,
        node,
        outcome: r.get(4)?,
        done_at: r.get::<_, i64>(5)? as u64,
        verified: Verified::from_code(r.get(6)?),
        check_of: r.get::<_, Option<i64>>(7)?.map(|t| TaskId(t as u64)),
        expect: r.get(8)?,
        cached_from: r.get::<_, Option<i64>>(9)?.map(|t| TaskId(t as u64)),
        challenge: match challenge_col(r.get(10)?) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        },
        index: r.get(11)?,
        engines: match r.get::<_, Option<String>>(12)? {
            None => Vec::new(),
            Some(t) => match serde_json::from_str(&t) {
                Ok(v) => v,
                Err(e) => return Ok(Err(corrupt("engine list", e))),
            },
        },
    }))
}

/// The `engines` column of a list (NULL when empty).
fn engines_text(engines: &[String]) -> Option<String> {
    // A list of strings always serialises.
    (!engines.is_empty()).then(|| serde_json::to_string(engines).unwrap_or_default())
}

/// Store inputs `from..` of `job` as tasks, inside `tx`. An input whose
/// result for `bundle` is already stored is answered from it at once (the
/// result cache): its task is stored done, with the earlier task as
/// provenance. Returns each task and whether it was cached.
fn insert_tasks(
    tx: &rusqlite::Connection,
    job: JobId,
    bundle: &Digest,
    from: u32,
    inputs: &[Vec<u8>],
    now_unix: u64,
) -> Result<Vec<InsertedTask>, StoreError> {
    let job = job.0 as i64;
    let mut ids = Vec::with_capacity(inputs.len());
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO tasks (job, idx, input, input_digest) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut hit = tx.prepare_cached(
            "SELECT t.id, t.attempt, t.node, t.outcome, t.receipt FROM tasks t JOIN jobs j ON j.id = t.job
             WHERE t.input_digest = ?1 AND j.bundle = ?2 AND t.state = 2 AND t.cached_from IS NULL
               AND j.purged_at IS NULL
               AND j.kind = 0 AND t.verified IN (0, 1, 2, 3) LIMIT 1",
        )?;
        let mut cached = tx.prepare_cached(
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
                Some((source, attempt, node, outcome, receipt)) => {
                    cached.execute(params![
                        job,
                        i64::from(from) + i as i64,
                        input,
                        digest.0.as_slice(),
                        attempt,
                        node,
                        outcome,
                        receipt,
                        now_unix as i64,
                        source
                    ])?;
                    ids.push(InsertedTask {
                        task: TaskId(tx.last_insert_rowid() as u64),
                        cached: true,
                    });
                }
                None => {
                    st.execute(params![
                        job,
                        i64::from(from) + i as i64,
                        input,
                        digest.0.as_slice()
                    ])?;
                    ids.push(InsertedTask {
                        task: TaskId(tx.last_insert_rowid() as u64),
                        cached: false,
                    });
                }
            }
        }
    }
    Ok(ids)
}

/// A row of (task id, job id).
fn task_and_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<(TaskId, JobId)> {
    Ok((
        TaskId(r.get::<_, i64>(0)? as u64),
        JobId(r.get::<_, i64>(1)? as u64),
    ))
}
