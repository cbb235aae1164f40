//! The coordinator: bundles, jobs, the task queue, leases and results.
//!
//! It is a state machine in the sans-IO style: every input is a `handle_*`
//! call with the current time, outputs are return values and
//! [`poll_event`](Coordinator::poll_event), and
//! [`poll_timeout`](Coordinator::poll_timeout) says when lease expiries are
//! due. It never touches sockets, clocks or threads. Its only side effect is
//! the [`Store`], which commits before anything is acknowledged.
//!
//! Invariants:
//! - a task is in exactly one of: a bundle queue, `leases`, done, dead;
//! - a lease's attempt number is the task's attempt in the store; results
//!   are accepted only from that attempt and the node that holds it, and the
//!   store's conditional update makes acceptance happen at most once;
//! - an expired lease sends its task back to the front of its queue with the
//!   attempt recorded as failed, or to the dead letters after
//!   `max_attempts` attempts.

use crate::store::{Acceptance, JobCounts, PendingTask, Store, StoreError, StoredBundle};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};
use tidepool_proto::manifest::{LockedManifest, SignedManifest};
use tidepool_proto::receipt::LeaseReceipt;
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{
    Capabilities, ErrorCode, JobId, JobSummary, LeaseId, NodeStatus, Outcome, PoolSummary,
    TaskGrant, TaskId, TaskRecord, TaskResult, Verdict,
};
use tidepool_proto::{Digest, PublicKey};

/// Who may connect as a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Any node key.
    Open,
    /// Only these node keys.
    Allowlist(BTreeSet<PublicKey>),
}

/// The pool owner's policy. Documented defaults in [`PoolConfig::default`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How often nodes renew (must be well under `lease_ttl`).
    pub heartbeat: Duration,
    /// Attempts before a task is dead-lettered.
    pub max_attempts: u32,
    /// How long a node waits before asking again when there is no work.
    pub retry: Duration,
    /// Most tasks granted in one lease request.
    pub max_grant: u32,
    /// Which nodes may connect.
    pub admission: Admission,
    /// Keys whose signed bundles the pool accepts.
    pub publishers: BTreeSet<PublicKey>,
    /// Keys that may submit jobs and read results, besides the publishers.
    pub clients: BTreeSet<PublicKey>,
    /// How long a new connection may take to say hello before it is closed.
    pub hello_timeout: Duration,
}

impl Default for PoolConfig {
    /// Lease 15 s renewed every 3 s, 3 attempts, retry 250 ms, 64 tasks per
    /// grant, open admission, no publishers, 10 s to say hello.
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15),
            heartbeat: Duration::from_secs(3),
            max_attempts: 3,
            retry: Duration::from_millis(250),
            max_grant: 64,
            admission: Admission::Open,
            publishers: BTreeSet::new(),
            clients: BTreeSet::new(),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// Something that happened, for logs and measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// A lease expired; the task is queued again.
    Requeued {
        /// The expired lease.
        lease: LeaseId,
        /// The node that held it.
        node: PublicKey,
        /// When it expired.
        at: Instant,
        /// When the node last renewed it.
        last_renewed: Instant,
    },
    /// A task failed too often and is dead-lettered.
    DeadLettered {
        /// The task.
        task: TaskId,
        /// The last reason.
        reason: String,
    },
    /// A job has no more open tasks.
    JobFinished {
        /// The job.
        job: JobId,
    },
}

/// Errors of client requests, as refusals to send back.
fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
        close: false,
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        refusal(ErrorCode::Internal, e.to_string())
    }
}

/// A published bundle.
#[derive(Debug)]
struct Bundle {
    /// The signed form, served to nodes.
    signed: SignedManifest,
    /// The verified contents.
    manifest: LockedManifest,
    /// Blobs not yet uploaded; tasks wait until this is empty.
    missing: BTreeSet<Digest>,
}

/// A task waiting in a queue.
#[derive(Debug, Clone, Copy)]
struct Queued {
    /// The task.
    task: TaskId,
    /// Its job.
    job: JobId,
    /// Attempts made so far.
    attempts: u32,
}

/// A task under lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Attempt number (fencing token).
    attempt: u32,
    /// Holder.
    node: PublicKey,
    /// Its job.
    job: JobId,
    /// Its bundle.
    bundle: Digest,
    /// Digest of its input (receipts must name it).
    input: Digest,
    /// When it expires unless renewed.
    expires: Instant,
    /// Last renewal (or grant).
    renewed: Instant,
}

/// A node as seen since this process started.
#[derive(Debug)]
struct Node {
    /// What it said it can run (latest hello).
    caps: Capabilities,
    /// Live connections from this key (a node may reconnect before the old
    /// connection is noticed dead).
    connections: u32,
    /// When it was first seen by this process.
    first_seen: Instant,
    /// Time connected before the current connection.
    connected_total: Duration,
    /// Start of the current connection.
    connected_since: Option<Instant>,
    /// Tasks it holds.
    leases: BTreeSet<TaskId>,
}

/// Where a task is, for the in-memory job counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    Queued,
    Leased,
    Done,
    Dead,
}

/// How much better another node's uptime must be for it to be preferred.
pub const UPTIME_MARGIN: f64 = 0.1;

impl Node {
    /// Share of the time since first seen that the node was connected.
    fn uptime(&self, now: Instant) -> f64 {
        let up = self.connected_total
            + self
                .connected_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let seen = now.saturating_duration_since(self.first_seen);
        if seen.is_zero() {
            return 1.0;
        }
        (up.as_secs_f64() / seen.as_secs_f64()).min(1.0)
    }
}

/// The coordinator. Lives as long as the pool process; rebuilt from the
/// store at start.
#[derive(Debug)]
pub struct Coordinator<S: Store> {
    /// Durable state.
    store: S,
    /// Policy.
    cfg: PoolConfig,
    /// Published bundles by digest.
    bundles: HashMap<Digest, Bundle>,
    /// Queued tasks per bundle, in order.
    queues: BTreeMap<Digest, VecDeque<Queued>>,
    /// Leased tasks.
    leases: HashMap<TaskId, Lease>,
    /// Lease expiry order: (expires, task).
    expiry: BTreeSet<(Instant, TaskId)>,
    /// Every job's bundle and task counts by state, kept in step with the
    /// store (loaded once at start) so status queries cost no database work.
    jobs: BTreeMap<JobId, (Digest, JobCounts)>,
    /// Nodes seen since start.
    nodes: HashMap<PublicKey, Node>,
    /// Events not yet polled.
    events: VecDeque<PoolEvent>,
}

/// An accepted result's outcome and signed receipt, serialised for the store.
type StoredResult = (Vec<u8>, Vec<u8>);

/// What checking a result against its lease found.
#[derive(Debug)]
enum Checked {
    /// The node reports the task failed (the reason).
    Failed(String),
    /// A valid result, ready to store.
    Accept(StoredResult),
}

/// A result prepared for the coordinator: its output hashed, its receipt's
/// signature checked and decoded, and the bytes to store serialised. Built by
/// [`open_results`] on any thread.
#[derive(Debug)]
pub struct Opened {
    /// The node that sent it (whose key the receipt must be signed with).
    key: PublicKey,
    /// Task and attempt.
    lease: LeaseId,
    /// What was found.
    kind: OpenedKind,
}

#[derive(Debug)]
enum OpenedKind {
    /// The node reports the task failed.
    Failed(String),
    /// A result with its receipt checked.
    Checked {
        /// The decoded receipt, or why it was refused.
        receipt: Result<Box<LeaseReceipt>, String>,
        /// Digest of the output (or of the job error's JSON).
        output_digest: Digest,
        /// MessagePack of the outcome.
        outcome: Vec<u8>,
        /// MessagePack of the signed receipt.
        receipt_bytes: Vec<u8>,
    },
}

/// Hash outputs, check receipt signatures and serialise, for results sent
/// by `key`. Pure and parallel: no coordinator state.
pub fn open_results(key: &PublicKey, results: Vec<TaskResult>) -> Vec<Opened> {
    let mut verified = tidepool_proto::receipt::VerifiedRoots::default();
    results
        .into_iter()
        .map(|r| {
            let kind = match &r.outcome {
                Outcome::Failed { reason } => OpenedKind::Failed(reason.clone()),
                outcome => {
                    let output_digest = match outcome {
                        Outcome::Output(b) => Digest::of(&b.0),
                        Outcome::JobError { code, message } => {
                            tidepool_proto::receipt::job_error_digest(code, message)
                        }
                        Outcome::Failed { .. } => unreachable!("handled above"),
                    };
                    let receipt = match &r.receipt {
                        None => Err("result without a receipt".to_owned()),
                        Some(signed) => signed
                            .open_cached(key, &mut verified)
                            .map(Box::new)
                            .map_err(|e| e.to_string()),
                    };
                    // Serialising plain data to a Vec cannot fail.
                    OpenedKind::Checked {
                        receipt,
                        output_digest,
                        outcome: rmp_serde::to_vec_named(&r.outcome).expect("outcome serialises"),
                        receipt_bytes: rmp_serde::to_vec_named(&r.receipt)
                            .expect("receipt serialises"),
                    }
                }
            };
            Opened {
                key: *key,
                lease: r.lease,
                kind,
            }
        })
        .collect()
}

/// Can a node with `caps` run this bundle?
pub fn can_run(caps: &Capabilities, m: &LockedManifest) -> bool {
    (caps.publishers.is_empty() || caps.publishers.contains(&m.publisher))
        && (caps.memory_mib == 0 || caps.memory_mib >= m.limits.memory_mib)
        && m.models.values().all(|model| {
            caps.encodings.contains(&model.encoding)
                && (caps.fetch_models || caps.models.contains(&model.blob.sha256))
        })
}

impl<S: Store> Coordinator<S> {
    /// Rebuild from the store: leased tasks go back to their queues (their
    /// leases died with the previous process; the attempt numbers stay, so
    /// late results from before the restart are refused as stale).
    pub fn new(
        mut store: S,
        cfg: PoolConfig,
        have_blob: &dyn Fn(&Digest) -> bool,
    ) -> Result<Self, StoreError> {
        let (stored, pending) = store.recover()?;
        let mut me = Self {
            store,
            cfg,
            bundles: HashMap::new(),
            queues: BTreeMap::new(),
            leases: HashMap::new(),
            expiry: BTreeSet::new(),
            jobs: BTreeMap::new(),
            nodes: HashMap::new(),
            events: VecDeque::new(),
        };
        for b in stored {
            let signed: SignedManifest =
                rmp_serde::from_slice(&b.signed).map_err(|e| StoreError::Corrupt {
                    what: "signed manifest",
                    why: e.to_string(),
                })?;
            let manifest: LockedManifest =
                rmp_serde::from_slice(&signed.manifest).map_err(|e| StoreError::Corrupt {
                    what: "locked manifest",
                    why: e.to_string(),
                })?;
            let missing = manifest
                .blobs()
                .iter()
                .map(|b| b.sha256)
                .filter(|d| !have_blob(d))
                .collect();
            me.bundles.insert(
                b.digest,
                Bundle {
                    signed,
                    manifest,
                    missing,
                },
            );
        }
        me.jobs = me
            .store
            .jobs()?
            .into_iter()
            .map(|(j, b, c)| (j, (b, c)))
            .collect();
        for PendingTask {
            task,
            job,
            bundle,
            attempt,
            ..
        } in pending
        {
            me.queues.entry(bundle).or_default().push_back(Queued {
                task,
                job,
                attempts: attempt,
            });
        }
        Ok(me)
    }

    /// The policy.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// May this key connect as a node?
    pub fn admits_node(&self, key: &PublicKey) -> bool {
        match &self.cfg.admission {
            Admission::Open => true,
            Admission::Allowlist(keys) => keys.contains(key),
        }
    }

    /// May this key act as a client (publish, submit, read)?
    pub fn admits_client(&self, key: &PublicKey) -> bool {
        self.cfg.publishers.contains(key) || self.cfg.clients.contains(key)
    }

    /// A node said hello.
    pub fn handle_node_hello(
        &mut self,
        now: Instant,
        key: PublicKey,
        caps: Capabilities,
    ) -> Result<(), Refusal> {
        if !self.admits_node(&key) {
            return Err(Refusal {
                code: ErrorCode::Forbidden,
                message: format!("node {key} is not on this pool's allowlist"),
                close: true,
            });
        }
        let n = self.nodes.entry(key).or_insert_with(|| Node {
            caps: Capabilities::default(),
            connections: 0,
            first_seen: now,
            connected_total: Duration::ZERO,
            connected_since: None,
            leases: BTreeSet::new(),
        });
        n.caps = caps;
        n.connections += 1;
        n.connected_since.get_or_insert(now);
        self.store.node_seen(&key, 0, 0, unix_now_hint(now))?;
        Ok(())
    }

    /// A node's connection closed. Its leases stay until they expire: a
    /// node that reconnects in time keeps them.
    pub fn handle_node_gone(&mut self, now: Instant, key: &PublicKey) {
        if let Some(n) = self.nodes.get_mut(key) {
            n.connections = n.connections.saturating_sub(1);
            if n.connections == 0 {
                if let Some(since) = n.connected_since.take() {
                    n.connected_total += now.saturating_duration_since(since);
                }
            }
        }
    }

    /// A node asks for `want` tasks and renews `running`. Returns new grants
    /// and the leases it named that are not its own any more.
    pub fn handle_lease(
        &mut self,
        now: Instant,
        key: &PublicKey,
        want: u32,
        running: &[LeaseId],
    ) -> Result<(Vec<TaskGrant>, Vec<LeaseId>), Refusal> {
        let mut lost = Vec::new();
        for l in running {
            match self.leases.get_mut(&l.task) {
                Some(lease) if lease.attempt == l.attempt && lease.node == *key => {
                    self.expiry.remove(&(lease.expires, l.task));
                    lease.expires = now + self.cfg.lease_ttl;
                    lease.renewed = now;
                    self.expiry.insert((lease.expires, l.task));
                }
                _ => lost.push(*l),
            }
        }
        let Some(node) = self.nodes.get(key) else {
            return Err(refusal(ErrorCode::Protocol, "lease request before hello"));
        };
        let held = u32::try_from(node.leases.len()).unwrap_or(u32::MAX);
        let room = (node.caps.slots.max(1) + node.caps.queue).saturating_sub(held);
        let mut want = want.min(room).min(self.cfg.max_grant) as usize;
        // Prefer nodes with a better uptime record: while a connected node
        // that stays up clearly more has free slots, a flakier node gets a
        // quarter of what it asks for (at least one task).
        let mine = node.uptime(now);
        let better_has_room = self.nodes.iter().any(|(k, n)| {
            k != key
                && n.connections > 0
                && n.leases.len() < (n.caps.slots + n.caps.queue) as usize
                && n.uptime(now) > mine + UPTIME_MARGIN
        });
        if better_has_room {
            want = want.div_ceil(4);
        }
        if want == 0 {
            return Ok((Vec::new(), lost));
        }
        // Pick from the queues of bundles this node can run, oldest bundle first.
        let mut picked: Vec<(Queued, Digest)> = Vec::new();
        for (digest, queue) in self.queues.iter_mut() {
            if picked.len() == want {
                break;
            }
            let Some(b) = self.bundles.get(digest) else {
                continue;
            };
            if !b.missing.is_empty() || !can_run(&node.caps, &b.manifest) {
                continue;
            }
            while picked.len() < want {
                let Some(q) = queue.pop_front() else { break };
                picked.push((q, *digest));
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        if picked.is_empty() {
            return Ok((Vec::new(), lost));
        }
        let rows: Vec<_> = picked
            .iter()
            .map(|(q, _)| (q.task, q.attempts + 1, *key))
            .collect();
        let inputs = match self.store.grant(&rows) {
            Ok(i) => i,
            Err(e) => {
                // Nothing was granted: put the tasks back where they were.
                for (q, d) in picked.into_iter().rev() {
                    self.queues.entry(d).or_default().push_front(q);
                }
                return Err(e.into());
            }
        };
        let mut grants = Vec::with_capacity(picked.len());
        let node = self.nodes.get_mut(key).expect("checked above");
        for ((q, bundle), (input, input_digest)) in picked.into_iter().zip(inputs) {
            let lease = Lease {
                attempt: q.attempts + 1,
                node: *key,
                job: q.job,
                bundle,
                input: input_digest,
                expires: now + self.cfg.lease_ttl,
                renewed: now,
            };
            self.expiry.insert((lease.expires, q.task));
            self.leases.insert(q.task, lease);
            node.leases.insert(q.task);
            grants.push(TaskGrant {
                lease: LeaseId {
                    task: q.task,
                    attempt: lease.attempt,
                },
                bundle,
                input: tidepool_proto::wire::Bytes(input),
            });
        }
        for g in &grants {
            let job = self.leases[&g.lease.task].job;
            self.count(job, TaskState::Queued, TaskState::Leased);
        }
        Ok((grants, lost))
    }

    /// End a lease: back to the queue (front) or to the dead letters.
    fn release(&mut self, task: TaskId, reason: &str) -> Result<(), StoreError> {
        let Some(lease) = self.leases.remove(&task) else {
            return Ok(());
        };
        self.expiry.remove(&(lease.expires, task));
        if let Some(n) = self.nodes.get_mut(&lease.node) {
            n.leases.remove(&task);
        }
        let dead = lease.attempt >= self.cfg.max_attempts;
        self.store.release(task, lease.attempt, reason, dead)?;
        if dead {
            self.events.push_back(PoolEvent::DeadLettered {
                task,
                reason: reason.to_owned(),
            });
            self.count(lease.job, TaskState::Leased, TaskState::Dead);
        } else {
            self.count(lease.job, TaskState::Leased, TaskState::Queued);
            self.queues
                .entry(lease.bundle)
                .or_default()
                .push_front(Queued {
                    task,
                    job: lease.job,
                    attempts: lease.attempt,
                });
        }
        Ok(())
    }

    /// Keep a job's counts in step: one task moves from `from` to `to`.
    fn count(&mut self, job: JobId, from: TaskState, to: TaskState) {
        let Some((_, c)) = self.jobs.get_mut(&job) else {
            return;
        };
        for (state, delta) in [(from, -1i64), (to, 1)] {
            let n = match state {
                TaskState::Queued => &mut c.queued,
                TaskState::Leased => &mut c.leased,
                TaskState::Done => &mut c.done,
                TaskState::Dead => &mut c.dead,
            };
            *n = (i64::from(*n) + delta).max(0) as u32;
        }
        if matches!(to, TaskState::Done | TaskState::Dead) && c.queued == 0 && c.leased == 0 {
            self.events.push_back(PoolEvent::JobFinished { job });
        }
    }

    /// Results from a node. Each gets a verdict; accepted ones are on disk
    /// when this returns.
    pub fn handle_results(
        &mut self,
        now: Instant,
        key: &PublicKey,
        results: Vec<TaskResult>,
    ) -> Result<Vec<(LeaseId, Verdict)>, Refusal> {
        self.handle_opened_results(now, key, open_results(key, results))
    }

    /// [`handle_results`](Self::handle_results) for results already opened
    /// with [`open_results`] (the pool's connection tasks do that in parallel,
    /// so signature checks and hashing stay off the coordinator thread).
    pub fn handle_opened_results(
        &mut self,
        now: Instant,
        key: &PublicKey,
        results: Vec<Opened>,
    ) -> Result<Vec<(LeaseId, Verdict)>, Refusal> {
        let mut verdicts: Vec<(LeaseId, Option<Verdict>)> = Vec::with_capacity(results.len());
        let mut batch = Vec::new();
        let mut batch_idx = Vec::new();
        for r in results {
            if r.key != *key {
                return Err(refusal(
                    ErrorCode::Protocol,
                    "results opened for another node",
                ));
            }
            let id = r.lease;
            let current = matches!(self.leases.get(&id.task), Some(l) if l.attempt == id.attempt && l.node == *key);
            if !current {
                let v = if self.store.done_by(id.task, id.attempt, key)? {
                    Verdict::Duplicate
                } else {
                    Verdict::Stale
                };
                verdicts.push((id, Some(v)));
                continue;
            }
            let lease = self.leases[&id.task];
            match self.check_result(&lease, r) {
                Ok(Checked::Accept((outcome, receipt))) => {
                    batch_idx.push(verdicts.len());
                    verdicts.push((id, None));
                    batch.push(Acceptance {
                        task: id.task,
                        attempt: id.attempt,
                        node: *key,
                        outcome,
                        receipt,
                    });
                }
                Ok(Checked::Failed(reason)) => {
                    // A reported failure: the attempt failed.
                    self.release(id.task, &format!("node {}: {reason}", key.short()))?;
                    verdicts.push((id, Some(Verdict::Accepted)));
                }
                Err(why) => {
                    self.release(
                        id.task,
                        &format!("node {}: refused result: {why}", key.short()),
                    )?;
                    verdicts.push((id, Some(Verdict::Refused(why))));
                }
            }
        }
        if !batch.is_empty() {
            let stored = self.store.accept(&batch, unix_now_hint(now))?;
            for ((i, a), ok) in batch_idx.into_iter().zip(&batch).zip(stored) {
                verdicts[i].1 = Some(if ok {
                    Verdict::Accepted
                } else {
                    Verdict::Stale
                });
                if ok {
                    if let Some(lease) = self.leases.remove(&a.task) {
                        self.expiry.remove(&(lease.expires, a.task));
                        if let Some(n) = self.nodes.get_mut(key) {
                            n.leases.remove(&a.task);
                        }
                        self.count(lease.job, TaskState::Leased, TaskState::Done);
                    }
                }
            }
        }
        Ok(verdicts
            .into_iter()
            .map(|(id, v)| (id, v.unwrap_or(Verdict::Stale)))
            .collect())
    }

    /// Check a result against its lease; `Ok(None)` for a reported failure.
    /// Check an opened result against its lease.
    fn check_result(&self, lease: &Lease, r: Opened) -> Result<Checked, String> {
        let (rc, output_digest, outcome, receipt) = match r.kind {
            OpenedKind::Failed(reason) => return Ok(Checked::Failed(reason)),
            OpenedKind::Checked {
                receipt,
                output_digest,
                outcome,
                receipt_bytes,
            } => (receipt?, output_digest, outcome, receipt_bytes),
        };
        if rc.lease != r.lease {
            return Err(format!(
                "receipt is for {}, result for {}",
                rc.lease, r.lease
            ));
        }
        if rc.bundle != lease.bundle {
            return Err(format!(
                "receipt names bundle {}, the task runs {}",
                rc.bundle, lease.bundle
            ));
        }
        if rc.receipt.input != lease.input {
            return Err(format!(
                "receipt's input digest {} is not the task's",
                rc.receipt.input
            ));
        }
        if rc.receipt.output != output_digest {
            return Err(format!(
                "receipt's output digest {} does not match the output ({output_digest})",
                rc.receipt.output
            ));
        }
        if let Some(b) = self.bundles.get(&lease.bundle) {
            if rc.receipt.component != b.manifest.component.sha256 {
                return Err(format!(
                    "receipt's component {} is not the bundle's",
                    rc.receipt.component
                ));
            }
        }
        Ok(Checked::Accept((outcome, receipt)))
    }

    /// When the next lease expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiry.first().map(|(t, _)| *t)
    }

    /// Expire the leases due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), StoreError> {
        while let Some(&(at, task)) = self.expiry.first() {
            if at > now {
                break;
            }
            let Some(lease) = self.leases.get(&task).copied() else {
                self.expiry.pop_first();
                continue;
            };
            let held = lease.expires.saturating_duration_since(lease.renewed);
            let reason = format!(
                "lease expired on node {} ({} ms without renewal)",
                lease.node.short(),
                held.as_millis()
            );
            self.release(task, &reason)?;
            self.store
                .node_seen(&lease.node, 0, 1, unix_now_hint(now))?;
            self.events.push_back(PoolEvent::Requeued {
                lease: LeaseId {
                    task,
                    attempt: lease.attempt,
                },
                node: lease.node,
                at,
                last_renewed: lease.renewed,
            });
        }
        Ok(())
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PoolEvent> {
        self.events.pop_front()
    }

    /// A signed manifest, for nodes.
    pub fn manifest(&self, bundle: &Digest) -> Option<&SignedManifest> {
        self.bundles.get(bundle).map(|b| &b.signed)
    }

    /// The size a blob must have, if a published bundle names it.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.bundles
            .values()
            .flat_map(|b| b.manifest.blobs())
            .find(|b| b.sha256 == *digest)
            .map(|b| b.size)
    }

    /// Publish a signed bundle; returns its digest and the blobs to upload.
    pub fn handle_publish(
        &mut self,
        now_unix: u64,
        signed: SignedManifest,
        have_blob: &dyn Fn(&Digest) -> bool,
    ) -> Result<(Digest, Vec<Digest>), Refusal> {
        let manifest = signed
            .verify(&self.cfg.publishers, now_unix)
            .map_err(|e| refusal(ErrorCode::Invalid, e.to_string()))?;
        let digest = signed.digest();
        let missing: BTreeSet<Digest> = manifest
            .blobs()
            .iter()
            .map(|b| b.sha256)
            .filter(|d| !have_blob(d))
            .collect();
        if !self.bundles.contains_key(&digest) {
            let bytes = rmp_serde::to_vec_named(&signed).expect("manifest serialises");
            self.store.put_bundle(
                &StoredBundle {
                    digest,
                    signed: bytes,
                },
                &manifest.name,
                &manifest.version,
            )?;
        }
        let list = missing.iter().copied().collect();
        self.bundles.insert(
            digest,
            Bundle {
                signed,
                manifest,
                missing,
            },
        );
        Ok((digest, list))
    }

    /// A blob is complete and verified on disk.
    pub fn handle_blob_stored(&mut self, digest: &Digest) {
        for b in self.bundles.values_mut() {
            b.missing.remove(digest);
        }
    }

    /// Submit a batch; it is on disk when this returns.
    pub fn handle_submit(
        &mut self,
        now_unix: u64,
        bundle: &Digest,
        key: &str,
        inputs: &[Vec<u8>],
    ) -> Result<(JobId, u32), Refusal> {
        let b = self.bundles.get(bundle).ok_or_else(|| {
            refusal(
                ErrorCode::NotFound,
                format!("no bundle {bundle} is published on this pool"),
            )
        })?;
        if !b.missing.is_empty() {
            return Err(refusal(
                ErrorCode::Invalid,
                format!(
                    "bundle {bundle} still lacks {} blob(s); upload them first",
                    b.missing.len()
                ),
            ));
        }
        if inputs.is_empty() {
            return Err(refusal(
                ErrorCode::Invalid,
                "a job needs at least one input",
            ));
        }
        if key.is_empty() || key.len() > 200 {
            return Err(refusal(
                ErrorCode::Invalid,
                "submission key must be 1-200 characters",
            ));
        }
        let (job, tasks, fresh) = self.store.insert_job(bundle, key, inputs, now_unix)?;
        if fresh {
            let q = self.queues.entry(*bundle).or_default();
            for &(task, _) in tasks.iter().filter(|(_, cached)| !cached) {
                q.push_back(Queued {
                    task,
                    job,
                    attempts: 0,
                });
            }
            let n = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
            let cached =
                u32::try_from(tasks.iter().filter(|(_, c)| *c).count()).unwrap_or(u32::MAX);
            let counts = JobCounts {
                tasks: n,
                queued: n - cached,
                done: cached,
                cached,
                ..JobCounts::default()
            };
            self.jobs.insert(job, (*bundle, counts));
            if counts.queued == 0 {
                self.events.push_back(PoolEvent::JobFinished { job });
            }
        }
        Ok((job, u32::try_from(tasks.len()).unwrap_or(u32::MAX)))
    }

    fn summary(&self, job: JobId, bundle: Digest, c: JobCounts) -> JobSummary {
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
        }
    }

    /// A job's progress.
    pub fn job_status(&mut self, job: JobId) -> Result<JobSummary, Refusal> {
        let (bundle, c) = *self
            .jobs
            .get(&job)
            .ok_or_else(|| refusal(ErrorCode::NotFound, format!("no job {job}")))?;
        Ok(self.summary(job, bundle, c))
    }

    /// A job's results from index `from`.
    pub fn job_results(
        &mut self,
        job: JobId,
        from: u32,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, Refusal> {
        if !self.jobs.contains_key(&job) {
            return Err(refusal(ErrorCode::NotFound, format!("no job {job}")));
        }
        let rows = self.store.tasks(job, from, limit.min(10_000))?;
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
            })
            .collect())
    }

    /// Nodes, queue depth, jobs.
    pub fn pool_status(&mut self, now: Instant) -> Result<PoolSummary, Refusal> {
        let counters = self.store.nodes()?;
        let mut nodes = Vec::new();
        for (key, completed, expired) in counters {
            let (connected, uptime, running, slots) = match self.nodes.get(&key) {
                Some(n) => {
                    let up = n.connected_total
                        + n.connected_since
                            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
                    let seen = now
                        .saturating_duration_since(n.first_seen)
                        .max(Duration::from_millis(1));
                    (
                        n.connections > 0,
                        (up.as_secs_f64() / seen.as_secs_f64()).min(1.0),
                        n.leases.len() as u32,
                        n.caps.slots,
                    )
                }
                None => (false, 0.0, 0, 0),
            };
            nodes.push(NodeStatus {
                key,
                connected,
                uptime,
                running,
                slots,
                completed,
                expired,
            });
        }
        let mut jobs = Vec::new();
        let (mut queued, mut leased, mut done, mut dead) = (0, 0, 0, 0);
        for (&job, &(bundle, c)) in &self.jobs {
            queued += u64::from(c.queued);
            leased += u64::from(c.leased);
            done += u64::from(c.done);
            dead += u64::from(c.dead);
            jobs.push(self.summary(job, bundle, c));
        }
        Ok(PoolSummary {
            nodes,
            queued,
            leased,
            done,
            dead,
            jobs,
        })
    }

    /// Tasks waiting in queues (in memory).
    pub fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Tasks under lease.
    pub fn leased(&self) -> usize {
        self.leases.len()
    }
}

/// Seconds since the Unix epoch for stored timestamps. The coordinator is
/// given `Instant`s; wall-clock stamps are informational, so the shell sets
/// the base once with [`set_unix_base`].
fn unix_now_hint(now: Instant) -> u64 {
    let base = UNIX_BASE.get().copied();
    match base {
        Some((inst, secs)) => secs + now.saturating_duration_since(inst).as_secs(),
        None => 0,
    }
}

static UNIX_BASE: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();

/// Tie `Instant`s to wall-clock time for stored timestamps (called once by
/// the server at start; tests may leave it unset, stamps are then 0).
pub fn set_unix_base(now: Instant, unix_secs: u64) {
    let _ = UNIX_BASE.set((now, unix_secs));
}
