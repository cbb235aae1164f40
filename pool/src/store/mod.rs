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
//!
//! - this file: the [`Store`] trait and the rows it passes (named structs);
//! - `schema`: the SQLite schema and its migrations, applied at open;
//! - `sqlite`: [`SqliteStore`], the trait on an SQLite file.

use crate::verify::Standing;
use tidepool_proto::wire::{ChallengeState, JobId, Outcome, TaskId, TaskState};
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
    /// Whether that re-execution is a decoy.
    pub decoy: bool,
    /// For a canary: the task whose identity it runs with.
    pub origin: Option<TaskId>,
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
    /// The engine identities the receipt names (sorted, no repeats).
    pub engines: Vec<String>,
}

/// A stored task row for status and results.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Index in its job.
    pub index: u32,
    /// The task.
    pub task: TaskId,
    /// `queued`, `leased`, `done`, `dead`.
    pub state: TaskState,
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
    pub challenge: Option<ChallengeState>,
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
    pub challenge: Option<ChallengeState>,
    /// Index in its job.
    pub index: u32,
    /// The engine identities its receipt names (sorted; empty: none or
    /// not done).
    pub engines: Vec<String>,
}

/// A replaced result as it was: who produced it, what it said, its signed
/// receipt, and the executions that agreed against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The task whose result it was.
    pub task: TaskId,
    /// The node that produced it.
    pub node: PublicKey,
    /// MessagePack of its outcome.
    pub outcome: Option<Vec<u8>>,
    /// Its signed receipt (MessagePack of `SignedReceipt`).
    pub receipt: Option<Vec<u8>>,
    /// The re-executions (check tasks) whose agreeing outcomes replaced it.
    pub decided_by: Vec<TaskId>,
    /// Unix time it was replaced.
    pub at: u64,
}

/// One accepted result of a user job, as the ledger lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerResult {
    /// Its task row (the ledger's cursor).
    pub task: TaskId,
    /// Its job.
    pub job: JobId,
    /// Its input index.
    pub index: u32,
    /// The node whose result it is now.
    pub node: PublicKey,
    /// Its verification state.
    pub verified: Verified,
    /// Whether a challenge of it is pending.
    pub challenged: bool,
    /// When it was accepted (Unix seconds).
    pub done_at: u64,
    /// Its signed receipt (MessagePack of `SignedReceipt`).
    pub receipt: Vec<u8>,
}

/// A done result a canary may be made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanarySource {
    /// Its task (whose identity the canary runs with).
    pub task: TaskId,
    /// Whether an independent execution confirmed it.
    pub verified: Verified,
    /// Its input.
    pub input: Vec<u8>,
    /// MessagePack of its outcome.
    pub outcome: Vec<u8>,
}

/// A done task's result with what it needs to be run again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRow {
    /// The node whose result it is.
    pub node: PublicKey,
    /// The input.
    pub input: Vec<u8>,
    /// MessagePack of the outcome.
    pub outcome: Vec<u8>,
    /// MessagePack of the signed receipt.
    pub receipt: Vec<u8>,
    /// MessagePack of the transcript (None: none).
    pub transcript: Option<Vec<u8>>,
}

/// One replaced result, as the ledger lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerWithdrawn {
    /// The evidence record (the ledger's cursor).
    pub id: u64,
    /// Its job.
    pub job: JobId,
    /// Its input index.
    pub index: u32,
    /// The node that had produced it.
    pub node: PublicKey,
    /// When it was replaced (Unix seconds).
    pub at: u64,
    /// Its signed receipt (MessagePack of `SignedReceipt`).
    pub receipt: Vec<u8>,
}

/// How many of one job's results a node has in one standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultCount {
    /// The node whose result it is now.
    pub node: PublicKey,
    /// Its verification state.
    pub verified: Verified,
    /// Whether a challenge of it is pending.
    pub challenged: bool,
    /// Whether it was stored before the challenge window's cut-off.
    pub window_closed: bool,
    /// How many.
    pub count: u64,
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
    /// Bytes of its inputs and outputs the pool holds (0 once retention
    /// removed them): what the `stored_bytes` quotas count.
    pub bytes: u64,
}

/// A stored job: its id, each task with whether the result cache answered
/// it, and whether the job is new (`false`: the key was used before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertedJob {
    /// The job (the earlier one when the key was used before).
    pub job: JobId,
    /// Its tasks in input order.
    pub tasks: Vec<InsertedTask>,
    /// Whether this call created the job.
    pub fresh: bool,
}

/// What one [`Store::purge`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    /// The jobs purged.
    pub jobs: Vec<JobId>,
    /// Their tasks.
    pub tasks: u64,
    /// Bytes of inputs, outputs and transcripts removed.
    pub bytes: u64,
}

/// A job opened for chunked submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedJob {
    /// The job.
    pub job: JobId,
    /// The bundle it runs (the earlier job's, when the key was used before).
    pub bundle: Digest,
    /// Inputs stored so far.
    pub have: u32,
    /// Whether it takes no more inputs.
    pub sealed: bool,
    /// Its priority (the earlier job's, when the key was used before).
    pub priority: i8,
    /// Whether this call created it.
    pub fresh: bool,
}

/// One task of an [`InsertedJob`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsertedTask {
    /// The task.
    pub task: TaskId,
    /// Whether the result cache answered it (stored done).
    pub cached: bool,
}

/// What a restarted pool reloads: published bundles and the tasks to queue.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every published bundle.
    pub bundles: Vec<StoredBundle>,
    /// Every task not done or dead (leased ones turned back to queued).
    pub pending: Vec<PendingTask>,
}

/// A lease to record: the task, its new attempt number, its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRow {
    /// The task.
    pub task: TaskId,
    /// The new attempt number (fencing token).
    pub attempt: u32,
    /// The node that holds it.
    pub node: PublicKey,
}

/// A granted task's input, as the node receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedInput {
    /// The input bytes.
    pub input: Vec<u8>,
    /// Their digest (the receipt must name it).
    pub digest: Digest,
}

/// A job as the coordinator keeps it in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRow {
    /// The job.
    pub job: JobId,
    /// Its bundle.
    pub bundle: Digest,
    /// Its tasks by state.
    pub counts: JobCounts,
    /// The client that submitted it (`None`: a hidden job of the pool's, or
    /// a job stored before jobs had owners: only admins see those).
    pub owner: Option<PublicKey>,
    /// Whether it takes no more inputs.
    pub sealed: bool,
    /// Higher is served first.
    pub priority: i8,
    /// Whether retention removed its inputs and outputs.
    pub purged: bool,
}

/// A node's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeCounters {
    /// The node.
    pub key: PublicKey,
    /// Results it returned that were stored.
    pub completed: u64,
    /// Leases that expired on it.
    pub expired: u64,
}

/// A canary to store: its input and the MessagePack of the expected outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCanary {
    /// The input.
    pub input: Vec<u8>,
    /// MessagePack of the expected [`Outcome`].
    pub expect: Vec<u8>,
    /// The verified task it is made from (whose identity it runs with).
    pub origin: TaskId,
}

/// A stored canary's id (pool-internal: never on the wire, so a node cannot
/// tell a canary's task from any other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CanaryId(pub i64);

/// A stored canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryRow {
    /// Its id.
    pub id: CanaryId,
    /// The bundle it tests.
    pub bundle: Digest,
}

/// What the coordinator needs from a database.
pub trait Store: Send {
    /// Start a batch: what the following calls change is committed
    /// together by [`commit_batch`](Store::commit_batch) (one transaction
    /// for many requests). Each call's own changes still stand or fall
    /// together. Stores without batches commit each call (the default).
    fn begin_batch(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Commit the batch begun by [`begin_batch`](Store::begin_batch). If it
    /// fails, nothing of the batch is stored.
    fn commit_batch(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Turn every leased task back to queued (its lease died with the
    /// previous process) and return the bundles, the tasks to queue, and the
    /// next free job id.
    fn recover(&mut self) -> Result<Recovered, StoreError>;
    /// The pool's secret (32 bytes), made and stored on first use: it keys
    /// the audit draw and the names tasks have on the wire, and must be the
    /// same after a restart (a check made before sees the same identity).
    fn secret(&mut self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError>;
    /// Store a published bundle (idempotent).
    fn put_bundle(&mut self, b: &StoredBundle, name: &str, version: &str)
        -> Result<(), StoreError>;
    /// Store a job of `owner` and its tasks in one transaction. Keys are
    /// scoped to their owner. If `owner` used `key` before,
    /// nothing is stored and the earlier job is returned with `false`.
    /// An input whose result for this bundle is already stored is answered
    /// from it at once (the result cache): its task is stored done, with the
    /// earlier task as provenance. Returns each task and whether it was cached.
    /// Find the job `owner` opened (or submitted) with `key` before: its
    /// bundle, how many inputs it holds, and whether it is sealed; or, if
    /// there is none and `create`, open one to be filled in chunks (stored
    /// unsealed). `None`: none, and not created.
    fn open_job(
        &mut self,
        bundle: &Digest,
        owner: &PublicKey,
        key: &str,
        priority: i8,
        create: bool,
        now_unix: u64,
    ) -> Result<Option<OpenedJob>, StoreError>;
    /// Store inputs `from..` of an open job as tasks, in one transaction,
    /// with the result cache as in [`insert_job`](Self::insert_job). The
    /// caller has checked that the job holds exactly `from` inputs.
    fn append_inputs(
        &mut self,
        job: JobId,
        bundle: &Digest,
        from: u32,
        inputs: &[Vec<u8>],
        now_unix: u64,
    ) -> Result<Vec<InsertedTask>, StoreError>;
    /// The digests of up to `count` inputs of `job` from index `from`.
    fn input_digests(
        &mut self,
        job: JobId,
        from: u32,
        count: u32,
    ) -> Result<Vec<Digest>, StoreError>;
    /// Mark a job sealed: it takes no more inputs.
    fn seal_job(&mut self, job: JobId) -> Result<(), StoreError>;
    /// Its client has the results: the job is collected at the next
    /// [`purge`](Self::purge).
    fn forget_job(&mut self, job: JobId) -> Result<(), StoreError>;
    /// Remove the inputs, outputs and transcripts (receipts stay, for the
    /// ledger) of up to `max_jobs` finished user jobs whose last result is
    /// older than `cutoff_unix` (`None`: none by age) or whose client
    /// forgot them; each is marked purged at `now_unix` and no longer
    /// serves the result cache. One transaction.
    fn purge(
        &mut self,
        cutoff_unix: Option<u64>,
        now_unix: u64,
        max_jobs: u32,
    ) -> Result<Purged, StoreError>;
    /// Cancel a job: sealed, and every task not done or dead dead-lettered
    /// with `reason`, in one transaction.
    fn cancel_job(&mut self, job: JobId, reason: &str) -> Result<(), StoreError>;
    /// Unsealed user jobs that took no input since `cutoff_unix` (at most
    /// `max_jobs`, oldest first): abandoned by their clients.
    fn abandoned_jobs(&mut self, cutoff_unix: u64, max_jobs: u32)
        -> Result<Vec<JobId>, StoreError>;
    fn insert_job(
        &mut self,
        bundle: &Digest,
        owner: &PublicKey,
        key: &str,
        inputs: &[Vec<u8>],
        now_unix: u64,
    ) -> Result<InsertedJob, StoreError>;
    /// Record leases (task, new attempt, node) and return each task's input
    /// and its digest, in order, for as many of `grants` as fit in
    /// `max_bytes` of input (always the first): the rest are not recorded.
    fn grant(
        &mut self,
        grants: &[GrantRow],
        max_bytes: u64,
    ) -> Result<Vec<GrantedInput>, StoreError>;
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
    fn jobs(&mut self) -> Result<Vec<JobRow>, StoreError>;
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
    /// Every node's counters.
    fn nodes(&mut self) -> Result<Vec<NodeCounters>, StoreError>;

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
    /// Replace `target`'s result with re-execution `from`'s (and its cached
    /// copies'), keeping the replaced result, its receipt and the executions
    /// that agreed against it (`decided_by`) as evidence, in one
    /// transaction.
    fn replace_result(
        &mut self,
        target: TaskId,
        from: TaskId,
        decided_by: &[TaskId],
        now_unix: u64,
    ) -> Result<(), StoreError>;
    /// The evidence kept for `task`'s replaced results, oldest first.
    fn evidence(&mut self, task: TaskId) -> Result<Vec<Evidence>, StoreError>;
    /// One job's results stored in `[since, until)` (Unix seconds), counted
    /// per node and standing (cached copies are not results).
    fn result_counts(
        &mut self,
        job: JobId,
        since: u64,
        until: u64,
        window_closed_before: u64,
    ) -> Result<Vec<ResultCount>, StoreError>;
    /// Results replaced in `[since, until)`, counted per node that had
    /// produced them.
    fn replaced_counts(
        &mut self,
        since: u64,
        until: u64,
    ) -> Result<Vec<(PublicKey, u64)>, StoreError>;
    /// Accepted results of user jobs (not cached copies) in `[since,
    /// until)`, of `node` if given, ordered by acceptance time then task,
    /// after `after` (a `(done_at, task)` pair), at most `limit`.
    fn ledger_results(
        &mut self,
        since: u64,
        until: u64,
        node: Option<&PublicKey>,
        after: Option<(u64, TaskId)>,
        limit: u32,
    ) -> Result<Vec<LedgerResult>, StoreError>;
    /// Results of user jobs replaced in `[since, until)`, of `node` if
    /// given, by evidence record after `after`, at most `limit`.
    fn ledger_withdrawn(
        &mut self,
        since: u64,
        until: u64,
        node: Option<&PublicKey>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<LedgerWithdrawn>, StoreError>;
    /// Input `index` of `job` if done and not a cached copy: its task,
    /// verification state, input and outcome (what a canary is made from).
    fn canary_source(&mut self, job: JobId, index: u32)
        -> Result<Option<CanarySource>, StoreError>;
    /// Add a decoy check of `target` to the hidden job `job` (the target's
    /// verification state is left as it is).
    fn insert_decoy(&mut self, job: JobId, target: TaskId) -> Result<TaskId, StoreError>;
    /// Up to `limit` recent verified results of user jobs of `bundle` with
    /// a transcript, produced by another node than `node` and never checked
    /// by it: what a decoy for `node` may be made from.
    fn decoy_targets(
        &mut self,
        bundle: &Digest,
        node: &PublicKey,
        limit: u32,
    ) -> Result<Vec<TaskId>, StoreError>;
    /// Input `index` of `job`, if done: its result, receipt and
    /// transcript (a cached result's are those of the task it copies).
    fn replay_row(&mut self, job: JobId, index: u32) -> Result<Option<ReplayRow>, StoreError>;
    /// Record a challenge's state.
    fn set_challenge(&mut self, task: TaskId, state: ChallengeState) -> Result<(), StoreError>;
    /// A node's most recent results of user jobs that were never checked
    /// or were confirmed (a confirmation may have come from a colluding
    /// key), newest first, with their jobs: what is re-checked when the
    /// node is caught.
    fn recent_to_recheck(
        &mut self,
        node: &PublicKey,
        limit: u32,
    ) -> Result<Vec<(TaskId, JobId)>, StoreError>;
    /// The most recent results of user jobs that stand `verified` and that
    /// `checker` re-executed, newest check first, with their jobs: a caught
    /// node's confirmations are worth nothing, so these are re-checked too.
    fn confirmed_by(
        &mut self,
        checker: &PublicKey,
        limit: u32,
    ) -> Result<Vec<(TaskId, JobId)>, StoreError>;
    /// Every node's verification standing (nodes never judged are absent).
    fn standings(&mut self) -> Result<Vec<(PublicKey, Standing)>, StoreError>;
    /// Save a node's standing.
    fn put_standing(&mut self, node: &PublicKey, s: &Standing) -> Result<(), StoreError>;
    /// Add canaries for a bundle; returns their ids.
    fn add_canaries(
        &mut self,
        bundle: &Digest,
        items: &[NewCanary],
    ) -> Result<Vec<CanaryId>, StoreError>;
    /// Every canary.
    fn canaries(&mut self) -> Result<Vec<CanaryRow>, StoreError>;
    /// Make a task of canary `canary` in `job`.
    fn insert_canary_task(
        &mut self,
        job: JobId,
        canary: CanaryId,
    ) -> Result<(TaskId, Option<TaskId>), StoreError>;
}

mod schema;
mod sqlite;

pub use sqlite::SqliteStore;
