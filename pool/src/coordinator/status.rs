//! Status views: a job's progress and why it waits, its records, and the
//! pool's summary (nodes, standing, queues, verification counters).

use super::fit::cannot_run;
use super::refusal;
use super::Coordinator;
use crate::store::{JobCounts, NodeCounters, Store};
use std::collections::BTreeMap;
use std::time::Instant;
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{
    ErrorCode, JobId, JobSummary, NodeStanding, NodeStatus, PoolSummary, TaskRecord, TaskState,
    VerificationStats,
};
use tidepool_proto::Digest;
use tidepool_proto::PublicKey;

/// Most output bytes in one page of job results (a record larger than
/// this comes alone): pages stay well inside the 16 MiB frame.
pub const RECORDS_PAGE_BYTES: usize = 8 * 1024 * 1024;

impl<S: Store> Coordinator<S> {
    pub(super) fn summary(&self, job: JobId, bundle: Digest, c: JobCounts) -> JobSummary {
        let bundle_name = self
            .bundles
            .get(&bundle)
            .map(|b| format!("{} {}", b.manifest.name, b.manifest.version))
            .unwrap_or_default();
        JobSummary {
            job,
            bundle,
            bundle_name,
            tasks: c.tasks,
            done: c.done,
            dead: c.dead,
            running: c.leased,
            cached: c.cached,
            waiting: self.waiting(&bundle, &c),
            open: self.open.contains(&job),
            purged: self.purged.contains(&job),
        }
    }

    /// Why a job's queued tasks cannot be leased now, if nothing connected
    /// could take them: the bundle's files are still arriving, no node is
    /// connected, or each connected node lacks something (grouped by
    /// reason). `None` while some connected node could run them (they may
    /// still queue behind other work).
    pub(super) fn waiting(&self, bundle: &Digest, c: &JobCounts) -> Option<String> {
        if c.queued == 0 {
            return None;
        }
        let b = self.bundles.get(bundle)?;
        if !b.missing.is_empty() {
            return Some(format!(
                "the pool does not have {} of the bundle's files yet",
                b.missing.len()
            ));
        }
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for (_, n) in self.nodes.iter().filter(|(_, n)| n.is_connected()) {
            // A node that can run it: nothing to explain (`?` returns None).
            *reasons
                .entry(cannot_run(&n.caps, &b.manifest)?.to_string())
                .or_default() += 1;
        }
        if reasons.is_empty() {
            return Some("no node is connected".into());
        }
        let why: Vec<String> = reasons
            .iter()
            .map(|(r, k)| match k {
                1 => format!("1 node: {r}"),
                k => format!("{k} nodes: {r}"),
            })
            .collect();
        Some(format!("no connected node can run it ({})", why.join("; ")))
    }

    /// Why queued re-executions wait: those no connected node may run,
    /// grouped by reason.
    fn checks_waiting(&self) -> Vec<String> {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for (task, check) in &self.checks {
            if self.leases.get(*task).is_some()
                || self
                    .nodes
                    .iter()
                    .any(|(k, n)| n.is_connected() && self.eligible_for_check(k, check))
            {
                continue;
            }
            let exact = self.bundles.get(&check.bundle).is_some_and(|b| {
                b.manifest.determinism == tidepool_proto::manifest::Determinism::Exact
            });
            let trusted_ran = check
                .exclude
                .iter()
                .any(|k| self.cfg.verify.trusted.contains(k));
            let why = if check.trusted_only {
                "wait for a trusted node to decide (two untrusted executions disagree with the result)".to_owned()
            } else if check.decider && !trusted_ran {
                format!(
                    "wait for a node that may decide (trusted, or {} confirmed results and no strike)",
                    self.cfg.verify.decide_after
                )
            } else if exact && !check.engines.is_empty() {
                format!(
                    "wait for a node with engines: {} (an exact-tier check runs only on the engines that produced the result)",
                    check.engines.join(", ")
                )
            } else {
                "wait for a connected node that did not run the task and can run its bundle".into()
            };
            *reasons.entry(why).or_default() += 1;
        }
        reasons
            .into_iter()
            .map(|(why, n)| match n {
                1 => format!("1 check: {why}"),
                n => format!("{n} checks: {why}"),
            })
            .collect()
    }

    /// A job's progress.
    pub fn job_status(&mut self, job: JobId) -> Result<JobSummary, Refusal> {
        let (bundle, c) = *self
            .jobs
            .get(&job)
            .ok_or_else(|| refusal(ErrorCode::NotFound, format!("no job {job}")))?;
        Ok(self.summary(job, bundle, c))
    }

    /// Input `index` of `job` with everything needed to run it again.
    pub fn replayable(
        &mut self,
        job: JobId,
        index: u32,
    ) -> Result<tidepool_proto::replay::Replayable, Refusal> {
        let not_done = || {
            refusal(
                ErrorCode::NotFound,
                format!("job {job} has no result for input {index}"),
            )
        };
        if self.purged.contains(&job) {
            return Err(refusal(
                ErrorCode::NotFound,
                format!("job {job}'s inputs and outputs were removed by the pool's retention"),
            ));
        }
        let (bundle, _) = self.jobs.get(&job).ok_or_else(not_done)?;
        let manifest = self
            .bundles
            .get(bundle)
            .map(|b| b.signed.clone())
            .ok_or_else(not_done)?;
        let row = self.store.replay_row(job, index)?.ok_or_else(not_done)?;
        let corrupt = |what: &str, e: rmp_serde::decode::Error| {
            refusal(
                ErrorCode::Internal,
                format!("stored {what} of job {job} input {index}: {e}"),
            )
        };
        Ok(tidepool_proto::replay::Replayable {
            job,
            index,
            node: row.node,
            manifest,
            input: tidepool_proto::wire::Bytes(row.input),
            outcome: rmp_serde::from_slice(&row.outcome).map_err(|e| corrupt("outcome", e))?,
            receipt: rmp_serde::from_slice(&row.receipt).map_err(|e| corrupt("receipt", e))?,
            transcript: match row.transcript {
                Some(t) => rmp_serde::from_slice(&t).map_err(|e| corrupt("transcript", e))?,
                None => Vec::new(),
            },
        })
    }

    /// A job's results from index `from`: at most `limit` (and 10,000),
    /// and no more outcome bytes than [`RECORDS_PAGE_BYTES`] (at least one
    /// record, whatever its size), read from the store a few rows at a time
    /// so a page of large outputs never sits in memory whole. A short page
    /// is not the end: the client asks from where it stopped until a page
    /// is empty.
    pub fn job_results(
        &mut self,
        job: JobId,
        from: u32,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, Refusal> {
        if !self.jobs.contains_key(&job) {
            return Err(refusal(ErrorCode::NotFound, format!("no job {job}")));
        }
        let limit = limit.min(10_000) as usize;
        let mut rows = Vec::new();
        let mut bytes = 0usize;
        let mut next = from;
        'pages: while rows.len() < limit {
            let want = (limit - rows.len()).min(64) as u32;
            let chunk = self.store.tasks(job, next, want)?;
            let Some(last) = chunk.last() else { break };
            next = last.index + 1;
            let short = chunk.len() < want as usize;
            for r in chunk {
                let size = match &r.outcome {
                    Some(tidepool_proto::wire::Outcome::Output(b)) => b.0.len(),
                    _ => 0,
                };
                if !rows.is_empty() && bytes + size > RECORDS_PAGE_BYTES {
                    break 'pages;
                }
                bytes += size;
                rows.push(r);
            }
            if short {
                break;
            }
        }
        Ok(rows
            .into_iter()
            .map(|r| TaskRecord {
                index: r.index,
                task: r.task,
                state: r.state.to_owned(),
                outcome: r.outcome,
                node: r.node,
                attempts: r.attempts,
                reasons: r.reasons,
                cached_from: r.cached_from,
                verification: if r.state == TaskState::Done {
                    r.verified.name().to_owned()
                } else {
                    String::new()
                },
                challenge: r.challenge,
            })
            .collect())
    }

    /// A node's standing as it is told it (`Response::Leases`).
    pub(crate) fn told_standing(&self, key: &PublicKey) -> NodeStanding {
        let st = self.standing_of(key);
        NodeStanding {
            reputation: st.reputation,
            sampling: st.sampling_rate(),
            confirmed: st.confirmed,
            strikes: st.strikes,
            quarantined_until: st.quarantined_until,
            banned: st.banned,
        }
    }

    /// Nodes, queue depth, jobs.
    pub fn pool_status(&mut self, now: Instant) -> Result<PoolSummary, Refusal> {
        let counters = self.store.nodes()?;
        let mut nodes = Vec::new();
        for NodeCounters {
            key,
            completed,
            expired,
        } in counters
        {
            let gpu = self.nodes.get(&key).and_then(|n| n.caps.gpu.clone());
            let (connected, uptime, running, slots) = match self.nodes.get(&key) {
                Some(n) => (
                    n.is_connected(),
                    n.uptime(now),
                    n.leases.len() as u32,
                    n.caps.slots,
                ),
                None => (false, 0.0, 0, 0),
            };
            let st = self.standing_of(&key);
            nodes.push(NodeStatus {
                key,
                connected,
                uptime,
                running,
                slots,
                completed,
                expired,
                reputation: st.reputation,
                sampling: st.sampling_rate(),
                confirmed: st.confirmed,
                strikes: st.strikes,
                quarantined_until: st.quarantined_until,
                banned: st.banned,
                trusted: self.cfg.verify.trusted.contains(&key),
                gpu,
            });
        }
        let mut jobs = Vec::new();
        let (mut queued, mut leased, mut done, mut dead) = (0, 0, 0, 0);
        for (&job, &(bundle, c)) in &self.jobs {
            queued += u64::from(c.queued);
            leased += u64::from(c.leased);
            done += u64::from(c.done);
            dead += u64::from(c.dead);
            if !self.kinds.contains_key(&job) {
                jobs.push(self.summary(job, bundle, c));
            }
        }
        Ok(PoolSummary {
            nodes,
            queued,
            leased,
            done,
            dead,
            jobs,
            verification: VerificationStats {
                pending: self.checks.len() as u64,
                ..self.vstats
            },
            checks_waiting: self.checks_waiting(),
            // Filled in by the network shell, which does the refusing.
            refusals: Default::default(),
        })
    }

    /// Tasks waiting in queues (in memory).
    pub fn queued(&self) -> usize {
        self.queues.len()
    }

    /// Entries the queues of user jobs hold in memory: fresh tasks with
    /// consecutive ids (a chunk of inputs) count once, retried tasks once
    /// each. What the pool's memory grows with, not the tasks waiting.
    pub fn queue_entries(&self) -> usize {
        self.queues.entries()
    }

    /// Tasks under lease.
    pub fn leased(&self) -> usize {
        self.leases.len()
    }
}
