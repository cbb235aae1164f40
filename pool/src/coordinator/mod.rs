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

//!
//! The state is split by concern, one file each; each sub-state's methods
//! work on the coordinator's fields of that concern:
//! - `nodes`: nodes seen, their connections, uptime and held tasks;
//! - `queues` (sub-state `Queues`): waiting tasks per bundle, re-executions
//!   first;
//! - `lease_table` (sub-state `LeaseTable`): leased tasks and their expiry
//!   index;
//! - `leases`: grants (what a node gets from the queues), renewals, releases
//!   back to the queues or to the dead letters;
//! - `intake`: results opened off-thread, checked against their lease,
//!   stored at most once;
//! - `verification`: re-executions, decisions, strikes, canaries, challenges;
//! - `jobs`: bundles, blobs, submissions, job counts;
//! - `fit`: which node can run which bundle;
//! - `credit`: what each node's results in a period may be paid for;
//! - `status`: views for `job status`, `job results` and `pool status`;
//! - `names` (sub-state `TaskNames`): the ids nodes see for tasks (a keyed
//!   permutation of row ids) and the identity every execution of one task
//!   sees;
//! - `requests`: one handler per wire request (`handle_request`), so the
//!   server only moves bytes.

mod credit;
mod decoys;
mod fit;
mod intake;
mod jobs;
mod lease_table;
mod leases;
mod ledger;
mod names;
mod nodes;
mod queues;
mod requests;
mod status;
pub mod telemetry;
mod verification;

pub use crate::config::{Admission, PoolConfig};
pub use credit::NodeCredit;
pub use fit::{can_run, cannot_run, Unfit};
pub use intake::{open_results, Opened};
pub use nodes::UPTIME_MARGIN;
pub use requests::{Answer, Incoming};
pub use verification::{CHECK_ATTEMPTS_FACTOR, MAX_EXECUTIONS};

use crate::store::{
    CanaryId, CanaryRow, JobCounts, JobKind, PendingTask, Recovered, Store, StoreError,
};
use crate::verify::Standing;
use jobs::Bundle;
use lease_table::LeaseTable;
use nodes::Nodes;
use queues::{Queued, Queues};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;
use tidepool_proto::manifest::{LockedManifest, SignedManifest};
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{ErrorCode, JobId, LeaseId, TaskId, VerificationStats};
use tidepool_proto::{Digest, PublicKey};
use verification::Check;

/// Something that happened, for logs and measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// A lease expired; the task is queued again.
    Requeued {
        /// The expired lease, as the node names it (so it matches the
        /// node's log).
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
    /// Retention removed the inputs and outputs of finished jobs.
    Collected {
        /// Jobs purged.
        jobs: usize,
        /// Bytes removed.
        bytes: u64,
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
    /// Two untrusted executions agreed against a result: it is
    /// `disputed` (nobody struck, nothing replaced) until a trusted node
    /// decides.
    Disputed {
        /// The task.
        task: TaskId,
    },
    /// A wrong result was replaced by the agreed one.
    Replaced {
        /// The task.
        task: TaskId,
    },
    /// A node's circuit breaker tripped: too many of its latest tasks
    /// failed, so it gets no tasks for a while (no strike: failing is not
    /// lying, but its failures must not empty the queue).
    CutOff {
        /// The node.
        node: PublicKey,
        /// Failures in its window.
        failures: u32,
        /// When it may have tasks again.
        until: Instant,
    },
}

/// Errors of client requests, as refusals to send back.
pub(crate) fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
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
    /// Waiting tasks: per bundle, and re-executions first (sub-state,
    /// `queues.rs`).
    queues: Queues,
    /// Leased tasks and their expiry index (sub-state, `lease_table.rs`).
    leases: LeaseTable,
    /// Every job's bundle and task counts by state, kept in step with the
    /// store (loaded once at start) so status queries cost no database work.
    jobs: BTreeMap<JobId, (Digest, JobCounts)>,
    /// The client that submitted each user job (hidden jobs have none).
    /// Loaded at start, added to on submission.
    owners: HashMap<JobId, PublicKey>,
    /// User jobs opened for chunked submission and not yet sealed: they
    /// take inputs and are not finished while here. Loaded at start, left
    /// on seal.
    open: HashSet<JobId>,
    /// User jobs' priorities other than 0 (higher is served first).
    /// Loaded at start, added to when a job is opened.
    priorities: HashMap<JobId, i8>,
    /// User jobs whose inputs and outputs retention removed. Loaded at
    /// start, added to by each collection.
    purged: HashSet<JobId>,
    /// When retention next collects (set at the first timeout).
    next_gc: Option<Instant>,
    /// When each client's recent challenges were made (at most
    /// `challenges_per_hour` each, within the last hour).
    challenge_times: HashMap<PublicKey, VecDeque<Instant>>,
    /// Nodes seen since start (sub-state, `nodes.rs`).
    nodes: Nodes,
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
    /// Canary tasks not yet answered, and the verified task each was made
    /// from (whose identity it runs with). Restored from the store.
    canary_origins: HashMap<TaskId, TaskId>,
    /// Canary ids per bundle.
    canaries: BTreeMap<Digest, Vec<CanaryId>>,
    /// Canaries given to each node (each node gets a canary at most once,
    /// so a repeated input never tells it which task is a test). In memory.
    canaries_given: HashSet<(CanaryId, PublicKey)>,
    /// Lease grants made, numbering the canary draws.
    grants_made: u64,
    /// Key of the audit draw; never leaves the process (kept in the store
    /// unless the configuration sets one).
    secret: [u8; 32],
    /// The names of tasks on the wire and their identities, keyed by the
    /// secret (sub-state, `names.rs`).
    names: names::TaskNames,
    /// Verification counters since start.
    vstats: VerificationStats,
    /// An `Instant` and the Unix time it stands for, to stamp stored rows
    /// and measure challenge windows and quarantines in wall-clock time;
    /// set by the shell with [`set_clock`](Self::set_clock) (unset: 0).
    clock: Option<(Instant, u64)>,
    /// The pool's key, to sign ledger pages with; set by the shell with
    /// [`set_signer`](Self::set_signer) (unset: ledger requests are
    /// refused). Lives as long as the coordinator.
    signer: Option<tidepool_proto::SecretKey>,
    /// The latest `now` any input brought (never goes back): the time of
    /// work queued by calls that carry only Unix time (submissions).
    latest: Instant,
    /// Counters and histograms since start, for `/metrics` and the status
    /// page (sub-state, `telemetry.rs`).
    telemetry: telemetry::Telemetry,
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
        let Recovered {
            bundles: stored,
            pending,
        } = store.recover()?;
        let born = Instant::now();
        let mut me = Self {
            nodes: Nodes::new(cfg.leasing.clone()),
            store,
            cfg,
            bundles: HashMap::new(),
            queues: Queues::default(),
            leases: LeaseTable::default(),
            jobs: BTreeMap::new(),
            owners: HashMap::new(),
            open: HashSet::new(),
            priorities: HashMap::new(),
            purged: HashSet::new(),
            next_gc: None,
            challenge_times: HashMap::new(),
            events: VecDeque::new(),
            standing: HashMap::new(),
            quarantine: HashMap::new(),
            kinds: HashMap::new(),
            hidden: HashMap::new(),
            checks: HashMap::new(),
            canaries: BTreeMap::new(),
            canary_origins: HashMap::new(),
            canaries_given: HashSet::new(),
            grants_made: 0,
            secret: [0; 32],
            names: names::TaskNames::new([0; 32]),
            vstats: VerificationStats::default(),
            clock: None,
            signer: None,
            // The only reading of the clock inside the coordinator: where
            // its measurements start (every decision still takes `now`).
            latest: born,
            telemetry: telemetry::Telemetry::new(born),
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
                // The stored one if there is one: task identities and
                // wire names must survive a restart.
                me.store.secret(s)?
            }
        };
        me.names = names::TaskNames::new(me.secret);
        me.standing = me.store.standings()?.into_iter().collect();
        me.kinds = me.store.job_kinds()?.into_iter().collect();
        for CanaryRow { id, bundle } in me.store.canaries()? {
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
        for r in me.store.jobs()? {
            if let Some(owner) = r.owner {
                me.owners.insert(r.job, owner);
            }
            if !r.sealed {
                me.open.insert(r.job);
            }
            if r.priority != 0 {
                me.priorities.insert(r.job, r.priority);
            }
            if r.purged {
                me.purged.insert(r.job);
            }
            me.jobs.insert(r.job, (r.bundle, r.counts));
        }
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
            decoy,
            origin,
            ..
        } in pending
        {
            let q = Queued {
                task,
                job,
                attempts: attempt,
                failed_on: None,
                since: me.latest,
            };
            match check_of {
                Some(target) => {
                    let mut check = me.check_context(target, bundle, task)?;
                    if decoy {
                        check.decoy = true;
                        check.decider = false;
                        check.trusted_only = false;
                    }
                    me.checks.insert(task, check);
                    me.queues.push_check_back(q);
                }
                None => {
                    if let Some(origin) = origin {
                        me.canary_origins.insert(task, origin);
                    }
                    let meta = me.job_meta(job, bundle);
                    me.queues.push_back(meta, q)
                }
            }
        }
        Ok(me)
    }

    /// Tie `Instant`s to wall-clock time: `now` is `unix_secs` seconds
    /// after the Unix epoch. The server calls it once at start; tests pick
    /// any time.
    pub fn set_clock(&mut self, now: Instant, unix_secs: u64) {
        self.clock = Some((now, unix_secs));
        self.latest = self.latest.max(now);
    }

    /// Sign ledger pages with `key` (the pool's own key).
    pub fn set_signer(&mut self, key: tidepool_proto::SecretKey) {
        self.signer = Some(key);
    }

    /// Unix seconds at `now` (0 when no clock was set).
    pub(super) fn unix(&self, now: Instant) -> u64 {
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
        self.cfg.publishers.contains(key)
            || self.cfg.clients.contains(key)
            || self.cfg.admins.contains(key)
    }

    /// Is `key` one of the pool owner's keys?
    pub fn is_admin(&self, key: &PublicKey) -> bool {
        self.cfg.admins.contains(key)
    }

    /// May `key` see `job`: its owner, or an admin. Hidden jobs have no
    /// owner, so only admins see them.
    pub fn sees(&self, key: &PublicKey, job: JobId) -> bool {
        self.is_admin(key) || self.owners.get(&job) == Some(key)
    }

    /// Where `job`'s tasks (of `bundle`) go in the queues.
    fn job_meta(&self, job: JobId, bundle: Digest) -> queues::JobMeta {
        queues::JobMeta {
            bundle,
            owner: self.owners.get(&job).copied(),
            priority: self.priorities.get(&job).copied().unwrap_or(0),
        }
    }

    /// When the next lease expires or retention collects.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.leases.next_expiry(), self.next_gc) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Remove the inputs and outputs of finished jobs past retention (or
    /// forgotten by their clients), at most 1,000 jobs per call.
    pub fn handle_gc(&mut self, now: Instant) -> Result<crate::store::Purged, StoreError> {
        let now_unix = self.unix(now);
        let cutoff = self
            .cfg
            .retention
            .keep
            .map(|k| now_unix.saturating_sub(k.as_secs()));
        // An unsealed job that took no input for as long as results are
        // kept was abandoned by its client: ended, then collected below.
        if let Some(cutoff) = cutoff {
            for job in self.store.abandoned_jobs(cutoff, 1000)? {
                self.end_job(
                    job,
                    "abandoned: no input and no seal for retention.keep_days",
                )?;
            }
        }
        let purged = self.store.purge(cutoff, now_unix, 1000)?;
        self.purged.extend(purged.jobs.iter().copied());
        for job in &purged.jobs {
            if let Some((_, c)) = self.jobs.get_mut(job) {
                c.bytes = 0;
            }
        }
        if !purged.jobs.is_empty() {
            self.events.push_back(PoolEvent::Collected {
                jobs: purged.jobs.len(),
                bytes: purged.bytes,
            });
        }
        Ok(purged)
    }

    /// Start a batch of requests whose changes the store commits together
    /// ([`Store::begin_batch`]). The caller holds every answer until
    /// [`commit_batch`](Self::commit_batch) returns: nothing is said to a
    /// peer before it is stored.
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        self.store.begin_batch()
    }

    /// Commit the batch. If this fails the store holds none of the batch
    /// while this coordinator's memory holds all of it: the caller must
    /// stop the coordinator (a restart recovers from the store) and send
    /// none of the held answers.
    pub fn commit_batch(&mut self) -> Result<(), StoreError> {
        self.store.commit_batch()
    }

    /// Expire the leases due by `now`; collect when retention is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), StoreError> {
        self.latest = self.latest.max(now);
        let every = self.cfg.retention.every;
        let due = *self.next_gc.get_or_insert(now + every);
        if now >= due {
            self.next_gc = Some(now + every);
            self.handle_gc(now)?;
        }
        while let Some((task, lease)) = self.leases.due(now) {
            let held = lease.expires.saturating_duration_since(lease.renewed);
            let reason = if lease.at_deadline() {
                format!(
                    "lease on node {} reached its deadline (the bundle's timeout for each task \
                     ahead of it, plus {} ms grace), renewed or not",
                    lease.node.short(),
                    self.cfg.leasing.grace.as_millis()
                )
            } else {
                format!(
                    "lease expired on node {} ({} ms without renewal)",
                    lease.node.short(),
                    held.as_millis()
                )
            };
            self.telemetry.counters.leases_expired += 1;
            self.release(now, task, &reason, Some(lease.node))?;
            self.store.node_seen(&lease.node, 0, 1, self.unix(now))?;
            self.events.push_back(PoolEvent::Requeued {
                lease: self.lease_wire(LeaseId {
                    task,
                    attempt: lease.attempt,
                }),
                node: lease.node,
                at: lease.expires,
                last_renewed: lease.renewed,
            });
        }
        Ok(())
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PoolEvent> {
        self.events.pop_front()
    }
}
