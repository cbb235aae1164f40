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

use crate::store::{
    Acceptance, JobCounts, JobKind, PendingTask, ResultRow, Store, StoreError, StoredBundle,
    Verified,
};
use crate::verify::{agree, audit_draw, Standing, VerifyPolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};
use tidepool_proto::manifest::{Device, LockedManifest, SignedManifest};
use tidepool_proto::receipt::LeaseReceipt;
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{
    Canary, Capabilities, ErrorCode, JobId, JobSummary, LeaseId, NodeStatus, Outcome, PoolSummary,
    TaskGrant, TaskId, TaskRecord, TaskResult, Verdict, VerificationStats,
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
    /// Reputation, re-execution, quarantine, canaries.
    pub verify: VerifyPolicy,
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
            verify: VerifyPolicy::default(),
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
    /// A node was caught with a wrong result (by a re-execution or a canary).
    Caught {
        /// The node.
        node: PublicKey,
        /// The task whose result was wrong.
        task: TaskId,
        /// Its strikes now.
        strikes: u32,
        /// Whether it is now banned.
        banned: bool,
    },
    /// A wrong result was replaced by the agreed one.
    Replaced {
        /// The task.
        task: TaskId,
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

/// Where a challenge stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenged {
    /// The task re-executed (the original when a cached copy was named).
    pub target: TaskId,
    /// The named task's job.
    pub job: JobId,
    /// The named task's index in its job.
    pub index: u32,
    /// `pending` (the outcome is written to the task's record).
    pub state: String,
}

/// A re-execution not yet decided.
#[derive(Debug, Clone)]
struct Check {
    /// The task whose result it checks.
    target: TaskId,
    /// The bundle both run.
    bundle: Digest,
    /// Nodes that already ran the target (never given it again).
    exclude: Vec<PublicKey>,
    /// Whether this execution decides between two that disagree (prefers
    /// trusted nodes).
    decider: bool,
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

/// A re-execution may take this many times `max_attempts` attempts.
pub const CHECK_ATTEMPTS_FACTOR: u32 = 4;

/// Most executions of one task (the original and its re-executions) before
/// a disagreement is left `disputed`.
pub const MAX_EXECUTIONS: usize = 5;

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
    /// Each judged node's standing, loaded at start and saved on change.
    standing: HashMap<PublicKey, Standing>,
    /// When a quarantined node may have tasks again (in memory; the store
    /// keeps the Unix time for status and restarts).
    quarantine: HashMap<PublicKey, Instant>,
    /// Kinds of the pool's hidden jobs (absent: a user job).
    kinds: HashMap<JobId, JobKind>,
    /// The hidden job per bundle and kind, created on first use.
    hidden: HashMap<(Digest, JobKind), JobId>,
    /// Re-executions not yet decided, by their own task id.
    checks: HashMap<TaskId, Check>,
    /// Re-executions waiting for a suitable node, oldest first; they go
    /// before ordinary tasks.
    check_queue: VecDeque<Queued>,
    /// Canary ids per bundle.
    canaries: BTreeMap<Digest, Vec<i64>>,
    /// Canaries given to each node (each node gets a canary at most once,
    /// so a repeated input never tells it which task is a test). In memory.
    canaries_given: HashSet<(i64, PublicKey)>,
    /// Lease grants made, numbering the canary draws.
    grants_made: u64,
    /// Key of the audit draw; never leaves the process.
    secret: [u8; 32],
    /// Verification counters since start.
    vstats: VerificationStats,
    /// An `Instant` and the Unix time it stands for, to stamp stored rows
    /// and measure challenge windows and quarantines in wall-clock time;
    /// set by the shell with [`set_clock`](Self::set_clock) (unset: 0).
    clock: Option<(Instant, u64)>,
}

/// An accepted result's outcome, signed receipt and transcript, serialised
/// for the store.
type StoredResult = (Vec<u8>, Vec<u8>, Vec<u8>);

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
        /// Digest of the transcript sent (None when empty).
        transcript_digest: Option<Digest>,
        /// MessagePack of the transcript (empty when none).
        transcript: Vec<u8>,
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
                        transcript_digest: (!r.transcript.is_empty())
                            .then(|| tidepool_proto::llm::transcript_digest(&r.transcript)),
                        transcript: if r.transcript.is_empty() {
                            Vec::new()
                        } else {
                            rmp_serde::to_vec(&r.transcript).expect("transcript serialises")
                        },
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

/// Can a node with `caps` run this bundle? GPU-tier bundles need the
/// node's GPU to have the memory they ask for and a GPU engine for every
/// encoding they load (their re-executions go through here too, so they
/// are checked on GPUs as well).
pub fn can_run(caps: &Capabilities, m: &LockedManifest) -> bool {
    cannot_run(caps, m).is_none()
}

/// Why a node cannot run a bundle: the first unmet need [`cannot_run`]
/// finds. Borrowed from the manifest, so matching allocates nothing; its
/// `Display` is what job authors read in [`JobSummary::waiting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit<'m> {
    /// A GPU-tier bundle and a node without a GPU.
    NoGpu,
    /// The node's GPU has less memory than the bundle asks for.
    GpuMemory {
        /// MiB the node's GPU has.
        has: u32,
        /// MiB the bundle needs.
        needs: u32,
    },
    /// The node's GPU has no engine for this encoding.
    NoGpuEngine(&'m str),
    /// The node runs only other publishers' bundles.
    Publisher,
    /// The node offers less guest memory than the bundle's limit.
    Memory {
        /// MiB the node offers.
        offers: u32,
        /// MiB the bundle's limit asks for.
        needs: u32,
    },
    /// No engine for a model's encoding.
    NoEngine {
        /// The encoding.
        encoding: &'m str,
        /// The model that needs it.
        model: &'m str,
    },
    /// The node neither has the model nor fetches models.
    NoModel(&'m str),
}

impl std::fmt::Display for Unfit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::NoGpu => write!(f, "no GPU"),
            Unfit::GpuMemory { has, needs } => {
                write!(f, "its GPU has {has} MiB, the job needs {needs} MiB")
            }
            Unfit::NoGpuEngine(e) => write!(f, "no GPU engine for {e}"),
            Unfit::Publisher => write!(f, "does not run this publisher's bundles"),
            Unfit::Memory { offers, needs } => {
                write!(
                    f,
                    "offers {offers} MiB of guest memory, the job needs {needs}"
                )
            }
            Unfit::NoEngine { encoding, model } => {
                write!(f, "no engine for {encoding} (model {model})")
            }
            Unfit::NoModel(m) => write!(f, "does not have model {m} and does not fetch models"),
        }
    }
}

/// Why a node with `caps` cannot run this bundle (the first reason found),
/// or `None` when it can.
pub fn cannot_run<'m>(caps: &Capabilities, m: &'m LockedManifest) -> Option<Unfit<'m>> {
    if m.target.device == Device::Gpu {
        let Some(g) = caps.gpu.as_ref() else {
            return Some(Unfit::NoGpu);
        };
        if let Some(needs) = m.target.gpu_memory_mib.filter(|&n| g.memory_mib < n) {
            return Some(Unfit::GpuMemory {
                has: g.memory_mib,
                needs,
            });
        }
        if let Some(model) = m
            .models
            .values()
            .find(|x| !g.encodings.contains(&x.encoding))
        {
            return Some(Unfit::NoGpuEngine(&model.encoding));
        }
    }
    if !caps.publishers.is_empty() && !caps.publishers.contains(&m.publisher) {
        return Some(Unfit::Publisher);
    }
    if caps.memory_mib != 0 && caps.memory_mib < m.limits.memory_mib {
        return Some(Unfit::Memory {
            offers: caps.memory_mib,
            needs: m.limits.memory_mib,
        });
    }
    for (name, model) in &m.models {
        if !caps.encodings.contains(&model.encoding) {
            return Some(Unfit::NoEngine {
                encoding: &model.encoding,
                model: name,
            });
        }
        if !caps.fetch_models && !caps.models.contains(&model.blob.sha256) {
            return Some(Unfit::NoModel(name));
        }
    }
    None
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
            standing: HashMap::new(),
            quarantine: HashMap::new(),
            kinds: HashMap::new(),
            hidden: HashMap::new(),
            checks: HashMap::new(),
            check_queue: VecDeque::new(),
            canaries: BTreeMap::new(),
            canaries_given: HashSet::new(),
            grants_made: 0,
            secret: [0; 32],
            vstats: VerificationStats::default(),
            clock: None,
        };
        me.secret = match me.cfg.verify.secret {
            Some(s) => s,
            None => {
                use ring::rand::SecureRandom;
                let mut s = [0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut s)
                    .map_err(|_| StoreError::Corrupt {
                        what: "audit secret",
                        why: "the system random source failed".into(),
                    })?;
                s
            }
        };
        me.standing = me.store.standings()?.into_iter().collect();
        me.kinds = me.store.job_kinds()?.into_iter().collect();
        for (id, bundle) in me.store.canaries()? {
            me.canaries.entry(bundle).or_default().push(id);
        }
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
        for (&job, (bundle, _)) in &me.jobs {
            if let Some(&kind) = me.kinds.get(&job) {
                me.hidden.insert((*bundle, kind), job);
            }
        }
        for PendingTask {
            task,
            job,
            bundle,
            attempt,
            check_of,
            ..
        } in pending
        {
            let q = Queued {
                task,
                job,
                attempts: attempt,
            };
            match check_of {
                Some(target) => {
                    let check = me.check_context(target, bundle, task)?;
                    me.checks.insert(task, check);
                    me.check_queue.push_back(q);
                }
                None => me.queues.entry(bundle).or_default().push_back(q),
            }
        }
        Ok(me)
    }

    /// Tie `Instant`s to wall-clock time: `now` is `unix_secs` seconds
    /// after the Unix epoch. The server calls it once at start; tests pick
    /// any time.
    pub fn set_clock(&mut self, now: Instant, unix_secs: u64) {
        self.clock = Some((now, unix_secs));
    }

    /// Unix seconds at `now` (0 when no clock was set).
    fn unix(&self, now: Instant) -> u64 {
        self.clock.map_or(0, |(at, secs)| {
            secs + now.saturating_duration_since(at).as_secs()
        })
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
        if let Some(st) = self.standing.get(&key) {
            if st.banned {
                return Err(Refusal {
                    code: ErrorCode::Forbidden,
                    message: format!(
                        "node {key} is banned from this pool after {} wrong results",
                        st.strikes
                    ),
                    close: true,
                });
            }
            // Quarantine carried over a restart of the pool.
            let now_unix = self.unix(now);
            if now_unix > 0
                && st.quarantined_until > now_unix
                && !self.quarantine.contains_key(&key)
            {
                self.quarantine.insert(
                    key,
                    now + Duration::from_secs(st.quarantined_until - now_unix),
                );
            }
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
        self.store.node_seen(&key, 0, 0, self.unix(now))?;
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
        if self.standing.get(key).is_some_and(|s| s.banned) {
            return Err(Refusal {
                code: ErrorCode::Forbidden,
                message: format!("node {key} is banned from this pool"),
                close: true,
            });
        }
        if let Some(&until) = self.quarantine.get(key) {
            if now < until {
                return Ok((Vec::new(), lost));
            }
            self.quarantine.remove(key);
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
        // Re-executions first: the sooner a wrong result is found, the less
        // is built on it.
        let mut picked: Vec<(Queued, Digest)> = Vec::new();
        if !self.check_queue.is_empty() {
            let take: Vec<usize> = self
                .check_queue
                .iter()
                .enumerate()
                .filter(|(_, q)| {
                    self.checks
                        .get(&q.task)
                        .is_some_and(|c| self.may_check(key, c))
                })
                .map(|(i, _)| i)
                .take(want)
                .collect();
            for i in take.into_iter().rev() {
                if let Some(q) = self.check_queue.remove(i) {
                    let bundle = self.checks[&q.task].bundle;
                    picked.push((q, bundle));
                }
            }
            picked.reverse();
        }
        let node = &self.nodes[key];
        // Then the queues of bundles this node can run, oldest bundle first.
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
        self.maybe_add_canary(key, &mut picked)?;
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
                replay: None,
                lease: LeaseId {
                    task: q.task,
                    attempt: lease.attempt,
                },
                bundle,
                input: tidepool_proto::wire::Bytes(input),
            });
        }
        for g in &mut grants {
            let job = self.leases[&g.lease.task].job;
            self.count(job, TaskState::Queued, TaskState::Leased);
            g.replay = self.replay_for(g.lease.task, &g.bundle)?;
        }
        Ok((grants, lost))
    }

    /// The transcript a check of an `llm`-tier result replays: the checked
    /// result's own (so the verifier runs one teacher-forced pass instead of
    /// generating). `None` for other tasks and tiers, or when the result
    /// generated nothing.
    fn replay_for(
        &mut self,
        task: TaskId,
        bundle: &Digest,
    ) -> Result<Option<tidepool_proto::llm::Transcript>, StoreError> {
        let Some(check) = self.checks.get(&task) else {
            return Ok(None);
        };
        let llm = self.bundles.get(bundle).is_some_and(|b| {
            matches!(
                b.manifest.determinism,
                tidepool_proto::manifest::Determinism::Llm { .. }
            )
        });
        if !llm {
            return Ok(None);
        }
        let target = check.target;
        let Some(bytes) = self.store.transcript(target)? else {
            return Ok(None);
        };
        match rmp_serde::from_slice(&bytes) {
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                // Stored by this pool after checking its digest: should not
                // happen; the check then generates afresh.
                tracing::warn!(task = target, "stored transcript unreadable: {e}");
                Ok(None)
            }
        }
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
        let is_check = self.checks.contains_key(&task);
        // A re-execution is the pool's own work: it is retried longer (its
        // nodes may be liars that get banned mid-task).
        let limit = if is_check {
            self.cfg.max_attempts.max(1) * CHECK_ATTEMPTS_FACTOR
        } else {
            self.cfg.max_attempts
        };
        let dead = lease.attempt >= limit;
        self.store.release(task, lease.attempt, reason, dead)?;
        if let Some(check) = self.checks.get(&task) {
            if dead {
                // Nobody could run the check: the result stays as it was.
                let target = check.target;
                self.checks.remove(&task);
                if let Some(row) = self.store.result(target)? {
                    if row.verified == Verified::Checking {
                        self.store.set_verified(target, Verified::Unverified)?;
                    }
                }
                self.count(lease.job, TaskState::Leased, TaskState::Dead);
            } else {
                self.count(lease.job, TaskState::Leased, TaskState::Queued);
                self.check_queue.push_front(Queued {
                    task,
                    job: lease.job,
                    attempts: lease.attempt,
                });
            }
            return Ok(());
        }
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
        if matches!(to, TaskState::Done | TaskState::Dead)
            && c.queued == 0
            && c.leased == 0
            && !self.kinds.contains_key(&job)
        {
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
                Ok(Checked::Accept((outcome, receipt, transcript))) => {
                    batch_idx.push(verdicts.len());
                    verdicts.push((id, None));
                    batch.push(Acceptance {
                        task: id.task,
                        attempt: id.attempt,
                        node: *key,
                        outcome,
                        receipt,
                        transcript,
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
            let stored = self.store.accept(&batch, self.unix(now))?;
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
                        if let Err(e) = self.after_accept(now, a, &lease) {
                            // The result stands; only its check is lost.
                            tracing::warn!(task = a.task, "verification step failed: {e}");
                        }
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
        let (rc, output_digest, outcome, receipt, transcript_digest, transcript) = match r.kind {
            OpenedKind::Failed(reason) => return Ok(Checked::Failed(reason)),
            OpenedKind::Checked {
                receipt,
                output_digest,
                outcome,
                receipt_bytes,
                transcript_digest,
                transcript,
            } => (
                receipt?,
                output_digest,
                outcome,
                receipt_bytes,
                transcript_digest,
                transcript,
            ),
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
        if rc.receipt.transcript != transcript_digest {
            return Err(format!(
                "receipt's transcript digest {:?} does not match the transcript sent ({:?})",
                rc.receipt.transcript.map(|d| d.to_string()),
                transcript_digest.map(|d| d.to_string())
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
        Ok(Checked::Accept((outcome, receipt, transcript)))
    }

    // ---- verification ---------------------------------------------------

    /// A node's standing (a new node's if never judged).
    fn standing_of(&self, key: &PublicKey) -> Standing {
        self.standing
            .get(key)
            .copied()
            .unwrap_or_else(|| Standing::new(&self.cfg.verify))
    }

    /// Change a node's standing and save it.
    fn update_standing(
        &mut self,
        key: &PublicKey,
        f: impl FnOnce(&mut Standing, &VerifyPolicy),
    ) -> Result<Standing, StoreError> {
        let mut st = self.standing_of(key);
        f(&mut st, &self.cfg.verify);
        self.store.put_standing(key, &st)?;
        self.standing.insert(*key, st);
        Ok(st)
    }

    /// May `key` run re-execution `check` now? Never a node that ran the
    /// task before, nor one of the same operator; a node of the same
    /// hardware class only if no other suitable node has room; a decider
    /// goes to a trusted node whenever one is connected that may run it.
    fn may_check(&self, key: &PublicKey, check: &Check) -> bool {
        let Some(node) = self.nodes.get(key) else {
            return false;
        };
        let basic = |k: &PublicKey, n: &Node| -> bool {
            if check.exclude.contains(k) {
                return false;
            }
            if let Some(op) = &n.caps.operator {
                if check.exclude.iter().any(|e| {
                    self.nodes
                        .get(e)
                        .is_some_and(|x| x.caps.operator.as_ref() == Some(op))
                }) {
                    return false;
                }
            }
            self.bundles
                .get(&check.bundle)
                .is_some_and(|b| b.missing.is_empty() && can_run(&n.caps, &b.manifest))
        };
        if !basic(key, node) {
            return false;
        }
        let has_room = |n: &Node| {
            n.connections > 0 && n.leases.len() < (n.caps.slots.max(1) + n.caps.queue) as usize
        };
        let trusted = &self.cfg.verify.trusted;
        if check.decider && !trusted.contains(key) {
            // A disagreement waits for a connected trusted node that may
            // run it, even a busy one.
            let other_trusted = self
                .nodes
                .iter()
                .any(|(k, n)| k != key && trusted.contains(k) && n.connections > 0 && basic(k, n));
            if other_trusted {
                return false;
            }
        }
        let same_class = |n: &Node| {
            n.caps.hardware.is_some()
                && check.exclude.iter().any(|e| {
                    self.nodes
                        .get(e)
                        .is_some_and(|x| x.caps.hardware == n.caps.hardware)
                })
        };
        if same_class(node) {
            let other_class = self
                .nodes
                .iter()
                .any(|(k, n)| k != key && has_room(n) && basic(k, n) && !same_class(n));
            if other_class {
                return false;
            }
        }
        true
    }

    /// The hidden job of `kind` for `bundle`.
    fn hidden_job(&mut self, bundle: Digest, kind: JobKind) -> Result<JobId, StoreError> {
        if let Some(&job) = self.hidden.get(&(bundle, kind)) {
            return Ok(job);
        }
        let job = self.store.hidden_job(&bundle, kind)?;
        self.hidden.insert((bundle, kind), job);
        self.kinds.insert(job, kind);
        self.jobs
            .entry(job)
            .or_insert((bundle, JobCounts::default()));
        Ok(job)
    }

    /// What a re-execution of `target` must respect, from the store: the
    /// nodes that ran it already, and whether this execution decides a
    /// disagreement.
    fn check_context(
        &mut self,
        target: TaskId,
        bundle: Digest,
        this: TaskId,
    ) -> Result<Check, StoreError> {
        let row = self.store.result(target)?;
        let prior: Vec<ResultRow> = self
            .store
            .checks_of(target)?
            .into_iter()
            .filter(|c| c.task != this)
            .collect();
        let mut exclude: Vec<PublicKey> = row.as_ref().and_then(|r| r.node).into_iter().collect();
        exclude.extend(prior.iter().filter_map(|c| c.node));
        let decider = match (&row, prior.last()) {
            (Some(r), Some(last)) => !self.rows_agree(bundle, r, last),
            _ => false,
        };
        Ok(Check {
            target,
            bundle,
            exclude,
            decider,
        })
    }

    /// Do two stored results agree under the bundle's tier?
    fn rows_agree(&self, bundle: Digest, a: &ResultRow, b: &ResultRow) -> bool {
        let tier = self
            .bundles
            .get(&bundle)
            .map(|b| b.manifest.determinism.clone())
            .unwrap_or_default();
        match (decode_outcome(&a.outcome), decode_outcome(&b.outcome)) {
            (Some(x), Some(y)) => agree(&tier, &x, &y),
            _ => false,
        }
    }

    /// Queue a re-execution of `target`, marking the target `mark`.
    fn spawn_check(
        &mut self,
        target: TaskId,
        bundle: Digest,
        exclude: Vec<PublicKey>,
        decider: bool,
        mark: Verified,
    ) -> Result<TaskId, StoreError> {
        let job = self.hidden_job(bundle, JobKind::Check)?;
        let task = self.store.insert_check(job, target, mark)?;
        if let Some((_, c)) = self.jobs.get_mut(&job) {
            c.tasks += 1;
            c.queued += 1;
        }
        self.checks.insert(
            task,
            Check {
                target,
                bundle,
                exclude,
                decider,
            },
        );
        let q = Queued {
            task,
            job,
            attempts: 0,
        };
        if decider {
            self.check_queue.push_front(q);
        } else {
            self.check_queue.push_back(q);
        }
        Ok(task)
    }

    /// After a result is stored: sample it for a re-execution, decide a
    /// re-execution, or judge a canary.
    fn after_accept(
        &mut self,
        now: Instant,
        a: &Acceptance,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        match self.kinds.get(&lease.job).copied().unwrap_or(JobKind::User) {
            JobKind::User => {
                let Some(b) = self.bundles.get(&lease.bundle) else {
                    return Ok(());
                };
                let rate = match b.manifest.verification.sampling.as_str() {
                    "always" => 1.0,
                    "none" => 0.0,
                    _ => self.standing_of(&a.node).sampling_rate(),
                };
                let draw = audit_draw(
                    &self.secret,
                    LeaseId {
                        task: a.task,
                        attempt: a.attempt,
                    },
                    &a.node,
                );
                if draw < rate {
                    self.spawn_check(
                        a.task,
                        lease.bundle,
                        vec![a.node],
                        false,
                        Verified::Checking,
                    )?;
                }
            }
            JobKind::Check => {
                if let Some(check) = self.checks.remove(&a.task) {
                    self.vstats.executed += 1;
                    self.decide(now, a, check)?;
                }
            }
            JobKind::Canary => {
                let Some(row) = self.store.result(a.task)? else {
                    return Ok(());
                };
                let tier = self
                    .bundles
                    .get(&lease.bundle)
                    .map(|b| b.manifest.determinism.clone())
                    .unwrap_or_default();
                let expect = decode_outcome(&row.expect);
                let got = decode_outcome(&Some(a.outcome.clone()));
                self.vstats.canaries += 1;
                match (expect, got) {
                    (Some(e), Some(g)) if agree(&tier, &e, &g) => {
                        self.update_standing(&a.node, Standing::confirm)?;
                        self.vstats.confirmed += 1;
                    }
                    _ => {
                        self.vstats.mismatches += 1;
                        self.strike(now, &a.node, a.task)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A re-execution finished: compare, and when it decides, penalise the
    /// liar and keep the agreed result.
    fn decide(&mut self, now: Instant, a: &Acceptance, check: Check) -> Result<(), StoreError> {
        let Some(target) = self.store.result(check.target)? else {
            return Ok(());
        };
        let Some(original) = target.node else {
            return Ok(());
        };
        let mine = ResultRow {
            task: a.task,
            node: Some(a.node),
            outcome: Some(a.outcome.clone()),
            ..target.clone()
        };
        // Earlier re-executions of this result in this dispute: those since
        // the last one that agreed with the stored result (earlier rounds
        // were decided already).
        let mut prior: Vec<ResultRow> = self
            .store
            .checks_of(check.target)?
            .into_iter()
            .filter(|c| c.task != a.task)
            .collect();
        if let Some(i) = prior
            .iter()
            .rposition(|c| self.rows_agree(check.bundle, &target, c))
        {
            prior.drain(..=i);
        }
        let challenged = target.challenge.as_deref() == Some("pending");
        let verdict: &str;
        if self.rows_agree(check.bundle, &target, &mine) {
            // The stored result stands. A decider also convicts the
            // executions of this dispute that disagreed with it.
            if check.decider {
                let liars: Vec<PublicKey> = prior
                    .iter()
                    .filter(|c| !self.rows_agree(check.bundle, &target, c))
                    .filter_map(|c| c.node)
                    .collect();
                for liar in liars {
                    self.strike(now, &liar, check.target)?;
                }
            }
            self.update_standing(&original, Standing::confirm)?;
            self.vstats.confirmed += 1;
            self.store.set_verified(check.target, Verified::Verified)?;
            verdict = "rejected: an independent re-execution agreed with the result";
        } else if let Some(second) = prior
            .iter()
            .rev()
            .find(|c| check.decider && self.rows_agree(check.bundle, c, &mine))
            .cloned()
        {
            // Two independent executions agree against the stored result:
            // replace it with the agreed one and penalise its node.
            self.store.replace_result(check.target, a.task)?;
            self.vstats.replaced += 1;
            self.events
                .push_back(PoolEvent::Replaced { task: check.target });
            if let Some(n) = second.node {
                self.update_standing(&n, Standing::confirm)?;
            }
            self.strike(now, &original, check.target)?;
            verdict = "upheld: the result was wrong and was replaced";
        } else if 1 + prior.len() + 1 < MAX_EXECUTIONS {
            // Nothing agrees yet: one more execution, on yet another node.
            if !check.decider {
                self.vstats.mismatches += 1;
            }
            let mut exclude = check.exclude.clone();
            exclude.push(a.node);
            let mark = if target.verified == Verified::Suspect {
                Verified::Suspect
            } else {
                Verified::Checking
            };
            self.spawn_check(check.target, check.bundle, exclude, true, mark)?;
            return Ok(());
        } else {
            self.store.set_verified(check.target, Verified::Disputed)?;
            verdict = "undecided: the executions disagree";
        }
        if challenged {
            self.store.set_challenge(check.target, verdict)?;
        }
        Ok(())
    }

    /// A node was caught: strike, quarantine, maybe ban; re-check its most
    /// recent unverified results (not served from the cache meanwhile).
    fn strike(&mut self, now: Instant, node: &PublicKey, task: TaskId) -> Result<(), StoreError> {
        let now_unix = self.unix(now);
        let st = self.update_standing(node, |s, p| s.strike(p, now_unix))?;
        self.quarantine
            .insert(*node, now + self.cfg.verify.quarantine);
        self.events.push_back(PoolEvent::Caught {
            node: *node,
            task,
            strikes: st.strikes,
            banned: st.banned,
        });
        if st.banned {
            // Refused from now on: what it holds goes to other nodes now.
            let held: Vec<TaskId> = self
                .nodes
                .get(node)
                .map(|n| n.leases.iter().copied().collect())
                .unwrap_or_default();
            for t in held {
                self.release(t, &format!("node {} was banned", node.short()))?;
            }
        }
        let recent = self
            .store
            .unverified_recent(node, self.cfg.verify.lookback)?;
        for (t, job) in recent {
            let Some(&(bundle, _)) = self.jobs.get(&job) else {
                continue;
            };
            self.spawn_check(t, bundle, vec![*node], false, Verified::Suspect)?;
        }
        Ok(())
    }

    /// With probability `canary_rate`, add a canary of one of the granted
    /// bundles that this node has not had, at a random place in the grant.
    fn maybe_add_canary(
        &mut self,
        key: &PublicKey,
        picked: &mut Vec<(Queued, Digest)>,
    ) -> Result<(), StoreError> {
        let rate = self.cfg.verify.canary_rate;
        if rate <= 0.0 || self.canaries.is_empty() {
            return Ok(());
        }
        self.grants_made += 1;
        let draw = |n: u64, salt: u32| {
            audit_draw(
                &self.secret,
                LeaseId {
                    task: n,
                    attempt: u32::MAX - salt,
                },
                key,
            )
        };
        if draw(self.grants_made, 0) >= rate {
            return Ok(());
        }
        let place = draw(self.grants_made, 1);
        let choice = picked.iter().find_map(|(_, b)| {
            self.canaries.get(b).and_then(|ids| {
                ids.iter()
                    .find(|id| !self.canaries_given.contains(&(**id, *key)))
                    .map(|id| (*id, *b))
            })
        });
        let Some((canary, bundle)) = choice else {
            return Ok(());
        };
        let job = self.hidden_job(bundle, JobKind::Canary)?;
        let task = self.store.insert_canary_task(job, canary)?;
        self.canaries_given.insert((canary, *key));
        if let Some((_, c)) = self.jobs.get_mut(&job) {
            c.tasks += 1;
            c.queued += 1;
        }
        let at = ((place * (picked.len() + 1) as f64) as usize).min(picked.len());
        picked.insert(
            at,
            (
                Queued {
                    task,
                    job,
                    attempts: 0,
                },
                bundle,
            ),
        );
        Ok(())
    }

    /// The submitter disputes a result: re-execute it on another node.
    /// Returns the task checked (a cached copy's original), the named
    /// task's job and index, and the state.
    pub fn handle_challenge(&mut self, now: Instant, task: TaskId) -> Result<Challenged, Refusal> {
        let now_unix = self.unix(now);
        let row = self
            .store
            .result(task)?
            .ok_or_else(|| refusal(ErrorCode::NotFound, format!("no task {task}")))?;
        if self.kinds.contains_key(&row.job) {
            return Err(refusal(ErrorCode::NotFound, format!("no task {task}")));
        }
        if !row.done {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("task {task} has no result to challenge yet"),
            ));
        }
        let named = (row.job, row.index);
        let row = match row.cached_from {
            Some(from) => self.store.result(from)?.ok_or_else(|| {
                refusal(
                    ErrorCode::NotFound,
                    format!("no task {from} (cache source)"),
                )
            })?,
            None => row,
        };
        let target = row.task;
        let Some(&(bundle, _)) = self.jobs.get(&row.job) else {
            return Err(refusal(
                ErrorCode::NotFound,
                format!("no job of task {task}"),
            ));
        };
        let window = self
            .bundles
            .get(&bundle)
            .map_or(0, |b| b.manifest.verification.challenge_window_secs);
        if now_unix > row.done_at.saturating_add(window) {
            return Err(refusal(
                ErrorCode::Invalid,
                format!(
                    "the challenge window of task {target} closed {} s after its result",
                    window
                ),
            ));
        }
        let answer = Challenged {
            target,
            job: named.0,
            index: named.1,
            state: "pending".into(),
        };
        if self.checks.values().any(|c| c.target == target) {
            self.store.set_challenge(target, "pending")?;
            return Ok(answer);
        }
        // Any node but the one that produced the result.
        let exclude: Vec<PublicKey> = row.node.into_iter().collect();
        let mark = if row.verified == Verified::Suspect {
            Verified::Suspect
        } else {
            Verified::Checking
        };
        self.store.set_challenge(target, "pending")?;
        self.spawn_check(target, bundle, exclude, false, mark)?;
        Ok(answer)
    }

    /// The pool owner adds canaries for a bundle; returns how many it has.
    pub fn handle_add_canaries(
        &mut self,
        client: &PublicKey,
        bundle: &Digest,
        items: Vec<Canary>,
    ) -> Result<u32, Refusal> {
        if !self.cfg.publishers.contains(client) {
            return Err(refusal(
                ErrorCode::Forbidden,
                "only a publisher of this pool may add canaries",
            ));
        }
        if !self.bundles.contains_key(bundle) {
            return Err(refusal(
                ErrorCode::NotFound,
                format!("no bundle {bundle} is published on this pool"),
            ));
        }
        if items
            .iter()
            .any(|c| matches!(c.expect, Outcome::Failed { .. }))
        {
            return Err(refusal(
                ErrorCode::Invalid,
                "a canary's expected outcome must be an output or a job error",
            ));
        }
        let rows: Vec<(Vec<u8>, Vec<u8>)> = items
            .into_iter()
            .map(|c| {
                (
                    c.input.0,
                    rmp_serde::to_vec_named(&c.expect).expect("outcome serialises"),
                )
            })
            .collect();
        let ids = self.store.add_canaries(bundle, &rows)?;
        let list = self.canaries.entry(*bundle).or_default();
        list.extend(ids);
        Ok(u32::try_from(list.len()).unwrap_or(u32::MAX))
    }

    /// A node's standing, for tests and status.
    pub fn node_standing(&self, key: &PublicKey) -> Standing {
        self.standing_of(key)
    }

    /// Re-executions not yet decided.
    pub fn checks_pending(&self) -> usize {
        self.checks.len()
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
            self.store.node_seen(&lease.node, 0, 1, self.unix(now))?;
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
            waiting: self.waiting(&bundle, &c),
        }
    }

    /// Why a job's queued tasks cannot be leased now, if nothing connected
    /// could take them: the bundle's files are still arriving, no node is
    /// connected, or each connected node lacks something (grouped by
    /// reason). `None` while some connected node could run them (they may
    /// still queue behind other work).
    fn waiting(&self, bundle: &Digest, c: &JobCounts) -> Option<String> {
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
        for n in self.nodes.values().filter(|n| n.connections > 0) {
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
                verification: if r.state == "done" {
                    r.verified.name().to_owned()
                } else {
                    String::new()
                },
                challenge: r.challenge,
            })
            .collect())
    }

    /// Nodes, queue depth, jobs.
    pub fn pool_status(&mut self, now: Instant) -> Result<PoolSummary, Refusal> {
        let counters = self.store.nodes()?;
        let mut nodes = Vec::new();
        for (key, completed, expired) in counters {
            let gpu = self.nodes.get(&key).and_then(|n| n.caps.gpu.clone());
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
            let st = self
                .standing
                .get(&key)
                .copied()
                .unwrap_or_else(|| Standing::new(&self.cfg.verify));
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

/// Decode a stored outcome.
fn decode_outcome(bytes: &Option<Vec<u8>>) -> Option<Outcome> {
    bytes.as_ref().and_then(|b| rmp_serde::from_slice(b).ok())
}
