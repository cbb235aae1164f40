//! Wire messages between nodes, clients and a pool, and their framing.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! MessagePack (rmp-serde, named fields). Frames larger than
//! [`MAX_FRAME_BYTES`] are refused before any allocation. Each QUIC stream
//! carries one [`Request`] from the connecting side and one or more
//! [`Response`]s from the pool (several only for blob chunks). The protocol
//! version is exchanged in the hello, the first request of a connection.
//!
//! Byte buffers are encoded as MessagePack `bin`, not arrays of integers.

use crate::manifest::{bytes_field, SignedManifest};
use crate::receipt::SignedReceipt;
use crate::{Digest, PublicKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The protocol version this build speaks. 2: grants carry the task
/// identity and task ids on the wire are opaque; hellos list engines.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest frame accepted or sent: a maximal task output (16 MiB) plus room
/// for its receipt.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;
/// Largest input or output of one task (16 MiB): what one frame carries
/// alone with its envelope, so that every item travels in some request or
/// answer, whatever else is batched with it (ADR 0015). A manifest's
/// `max_output_kib` is capped at the same; the pool refuses a larger input
/// at submission, the client before sending it.
pub const MAX_ITEM_BYTES: usize = 16 * 1024 * 1024;
/// Longest task identity a node runs ([`TaskGrant::identity`]; the pool's
/// are 32 hex digits).
pub const MAX_IDENTITY_BYTES: usize = 128;
/// Size of a blob chunk in a fetch or an upload.
pub const BLOB_CHUNK_BYTES: usize = 1024 * 1024;

/// Declares an id newtype over an integer: serialised as the bare number
/// (so stored rows and wire bytes are unchanged), printed as the number.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($int:ty)) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $int);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }
    };
}

id_type!(
    /// A pool task id (unique within a pool, never reused).
    TaskId(u64)
);
id_type!(
    /// A job id (unique within a pool).
    JobId(u64)
);

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for a node.
    Queued,
    /// Under lease on a node.
    Leased,
    /// Has its result.
    Done,
    /// Dead-lettered after too many failed attempts.
    Dead,
}

impl TaskState {
    /// `queued`, `leased`, `done` or `dead`.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Leased => "leased",
            TaskState::Done => "done",
            TaskState::Dead => "dead",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a challenge of a result stands. Serialised (and stored) as the
/// sentence a user reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChallengeState {
    /// Re-executions are under way.
    #[serde(rename = "pending")]
    Pending,
    /// An independent re-execution agreed with the result.
    #[serde(rename = "rejected: an independent re-execution agreed with the result")]
    Rejected,
    /// The result was wrong and was replaced.
    #[serde(rename = "upheld: the result was wrong and was replaced")]
    Upheld,
    /// No two executions agreed.
    #[serde(rename = "undecided: the executions disagree")]
    Undecided,
}

impl ChallengeState {
    /// Every state, for parsing.
    const ALL: [ChallengeState; 4] = [
        ChallengeState::Pending,
        ChallengeState::Rejected,
        ChallengeState::Upheld,
        ChallengeState::Undecided,
    ];

    /// The sentence for this state (also its serialised and stored form).
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeState::Pending => "pending",
            ChallengeState::Rejected => {
                "rejected: an independent re-execution agreed with the result"
            }
            ChallengeState::Upheld => "upheld: the result was wrong and was replaced",
            ChallengeState::Undecided => "undecided: the executions disagree",
        }
    }

    /// The state [`as_str`](Self::as_str) gave `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for ChallengeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt at one task: the fencing token. A result is accepted only for
/// the current attempt of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId {
    /// The task.
    pub task: TaskId,
    /// Its attempt number, starting at 1.
    pub attempt: u32,
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} attempt {}", self.task, self.attempt)
    }
}

/// Bytes that serialise as MessagePack `bin`.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(#[serde(with = "bytes_field")] pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

/// What a node can run, sent in its hello.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// wasi-nn encodings with a backend on this node.
    pub encodings: Vec<String>,
    /// Digests of model files already on the node's disk.
    pub models: Vec<Digest>,
    /// Memory the node gives to tasks, MiB (per task).
    pub memory_mib: u32,
    /// How many tasks it runs at once.
    pub slots: u32,
    /// How many more it holds waiting, so that a round trip to the pool
    /// never leaves a slot idle.
    #[serde(default)]
    pub queue: u32,
    /// The GPU the node runs GPU-tier jobs on, if it has one with a
    /// working engine.
    #[serde(default)]
    pub gpu: Option<Gpu>,
    /// Publishers whose bundles the node runs; empty means any the pool has.
    pub publishers: Vec<PublicKey>,
    /// Whether the node's owner fetches models from the pool (otherwise only
    /// tasks whose models are in `models` are sent).
    pub fetch_models: bool,
    /// The key of the person or organisation running the node, when it
    /// says: re-executions go to a node of another operator.
    #[serde(default)]
    pub operator: Option<PublicKey>,
    /// Hardware class (`x86_64 AMD EPYC 7B13, 2 cores`): re-executions
    /// prefer another class, so a fault of one kind of machine shows up.
    #[serde(default)]
    pub hardware: Option<String>,
    /// The node's engines, each as its receipts name it (engine, version,
    /// device and settings: `tract-onnx 0.23.9 (cpu)`): an `exact`-tier
    /// re-execution goes only to a node with every engine the producer's
    /// receipt names, and a bundle that pins an engine only to nodes
    /// that have it.
    #[serde(default)]
    pub engines: Vec<String>,
}

/// What a pool accepts in a node's [`Capabilities`]: every count and
/// string a stranger sends is bounded before the pool keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityLimits {
    /// Most task slots a node may claim.
    pub max_slots: u32,
    /// Most leases a node may hold waiting beyond its slots.
    pub max_queue: u32,
    /// Most entries in each list (encodings, engines, models, publishers,
    /// GPU encodings).
    pub max_list: usize,
    /// Longest string (an encoding, an engine, the hardware class, the
    /// GPU's name), bytes.
    pub max_string: usize,
}

impl Default for CapabilityLimits {
    /// 256 slots, 256 queued, 256 entries per list, 256-byte strings.
    fn default() -> Self {
        Self {
            max_slots: 256,
            max_queue: 256,
            max_list: 256,
            max_string: 256,
        }
    }
}

/// Why a node's capabilities were refused: the field and the bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("capabilities: `{field}` {why}")]
pub struct CapabilityError {
    /// The field (`slots`, `encodings`, `gpu.name`, ...).
    pub field: &'static str,
    /// What is wrong, with the pool's bound.
    pub why: String,
}

impl Capabilities {
    /// Check every count and string against `limits`.
    pub fn check(&self, limits: &CapabilityLimits) -> Result<(), CapabilityError> {
        let bad = |field, why: String| Err(CapabilityError { field, why });
        if self.slots == 0 || self.slots > limits.max_slots {
            return bad(
                "slots",
                format!("= {} is outside 1..={}", self.slots, limits.max_slots),
            );
        }
        if self.queue > limits.max_queue {
            return bad(
                "queue",
                format!("= {} is over {}", self.queue, limits.max_queue),
            );
        }
        let lists: [(&'static str, usize); 4] = [
            ("encodings", self.encodings.len()),
            ("engines", self.engines.len()),
            ("models", self.models.len()),
            ("publishers", self.publishers.len()),
        ];
        for (field, n) in lists {
            if n > limits.max_list {
                return bad(field, format!("has {n} entries, over {}", limits.max_list));
            }
        }
        let strings = self
            .encodings
            .iter()
            .map(|s| ("encodings", s.len()))
            .chain(self.engines.iter().map(|s| ("engines", s.len())))
            .chain(self.hardware.iter().map(|s| ("hardware", s.len())));
        for (field, len) in strings {
            if len > limits.max_string {
                return bad(
                    field,
                    format!("has a {len}-byte string, over {}", limits.max_string),
                );
            }
        }
        if let Some(g) = &self.gpu {
            if g.encodings.len() > limits.max_list {
                return bad(
                    "gpu.encodings",
                    format!(
                        "has {} entries, over {}",
                        g.encodings.len(),
                        limits.max_list
                    ),
                );
            }
            let longest = g
                .encodings
                .iter()
                .map(String::len)
                .chain([g.name.len()])
                .max()
                .unwrap_or(0);
            if longest > limits.max_string {
                return bad(
                    "gpu",
                    format!("has a {longest}-byte string, over {}", limits.max_string),
                );
            }
        }
        Ok(())
    }
}

/// A node's GPU, as it advertises it: the pool sends GPU-tier jobs
/// (`[target] device = "gpu"`) only to nodes with one of these whose memory
/// and engines fit the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Model name as the driver reports it (`NVIDIA L4`).
    pub name: String,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// wasi-nn encodings with a GPU engine on this node (`onnx` through
    /// ONNX Runtime's CUDA provider, `ggml` through llama.cpp built with
    /// `cuda`).
    pub encodings: Vec<String>,
}

/// A request, the first frame on a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// First request of a node's connection.
    NodeHello {
        /// Protocol version.
        protocol: u32,
        /// Software and version (`tidepool 0.1.0`).
        agent: String,
        /// What it can run.
        caps: Capabilities,
    },
    /// First request of a client's connection (publishing, submitting, status).
    ClientHello {
        /// Protocol version.
        protocol: u32,
        /// Software and version.
        agent: String,
    },
    /// First request of a node owner's connection that only reads the
    /// node's account (its ledger rows) and takes no work; signed in with
    /// the node's key.
    AccountHello {
        /// Protocol version.
        protocol: u32,
        /// Software and version.
        agent: String,
    },
    /// A node asks for up to `want` tasks and renews the leases it holds
    /// (the heartbeat).
    Lease {
        /// Free slots.
        want: u32,
        /// Leases the node is still working on.
        running: Vec<LeaseId>,
    },
    /// A node returns finished tasks.
    Results {
        /// One per finished task.
        results: Vec<TaskResult>,
    },
    /// A node stops taking tasks (it finishes and returns what it holds).
    Draining,
    /// Fetch a signed manifest by bundle digest.
    FetchManifest {
        /// Bundle digest.
        bundle: Digest,
    },
    /// Fetch a blob from `offset`; the pool answers with chunks until the end.
    FetchBlob {
        /// Blob digest.
        digest: Digest,
        /// Where to resume.
        offset: u64,
    },
    /// A client publishes a signed bundle; the pool answers with the blobs it lacks.
    Publish {
        /// The bundle.
        manifest: SignedManifest,
    },
    /// A client uploads a chunk of a blob named by a published manifest.
    PutBlob {
        /// Blob digest.
        digest: Digest,
        /// Offset of this chunk.
        offset: u64,
        /// The chunk.
        data: Bytes,
    },
    /// Submit a batch of inputs for a published bundle.
    Submit {
        /// Bundle digest.
        bundle: Digest,
        /// One input per task.
        inputs: Vec<Bytes>,
        /// The client's idempotency key: submitting the same key twice
        /// returns the first job.
        key: String,
    },
    /// Open a job to be filled in chunks ([`AppendInputs`](Self::AppendInputs)
    /// then [`SealJob`](Self::SealJob)), or find the one `key` opened
    /// before: the answer says how many inputs the pool holds, so a client
    /// that lost its connection resumes from there. Tasks are queued as
    /// their chunks arrive.
    OpenJob {
        /// Bundle digest.
        bundle: Digest,
        /// The client's idempotency key (as for `Submit`).
        key: String,
        /// Higher is served first (0: normal; the pool caps what a client
        /// may ask for). Ignored when the key names an existing job.
        #[serde(default)]
        priority: i8,
    },
    /// Inputs `from..from + inputs.len()` of an open job. Idempotent: inputs
    /// the pool holds already are compared (by digest) and skipped, so a
    /// chunk may be sent again; a chunk that starts past what the pool holds
    /// is refused (nothing may be skipped).
    AppendInputs {
        /// The job.
        job: JobId,
        /// Index of the first input in this chunk.
        from: u32,
        /// The inputs, one per task.
        inputs: Vec<Bytes>,
    },
    /// No more inputs: the job holds exactly `total` and finishes when its
    /// tasks do. Idempotent.
    SealJob {
        /// The job.
        job: JobId,
        /// The number of inputs the client sent (a check: the pool refuses
        /// to seal a job holding another number).
        total: u32,
    },
    /// Stop a job: no more inputs, its waiting tasks dead-lettered, its
    /// running ones stopped on their nodes (within a heartbeat).
    CancelJob {
        /// The job.
        job: JobId,
    },
    /// The client has a finished job's results: the pool may remove its
    /// inputs and outputs at its next collection (receipts stay).
    ForgetJob {
        /// The job.
        job: JobId,
    },
    /// The pool owner asks the pool to collect now what its retention
    /// allows (admins only).
    Collect,
    /// A job's progress.
    JobStatus {
        /// The job.
        job: JobId,
    },
    /// A job's results, in input order, from index `from`.
    JobResults {
        /// The job.
        job: JobId,
        /// First input index.
        from: u32,
        /// At most this many.
        limit: u32,
    },
    /// One accepted result with everything needed to run it again (its
    /// bundle's signed manifest, input, outcome, receipt, transcript).
    Replayable {
        /// The job.
        job: JobId,
        /// The input's index.
        index: u32,
    },
    /// The pool's nodes, queue and dead letters.
    PoolStatus,
    /// The submitter disputes a result: the pool re-executes the task on
    /// another node (within the bundle's challenge window).
    Challenge {
        /// The task whose result is disputed.
        task: TaskId,
    },
    /// The pool owner adds known-answer tasks for a bundle, made from its
    /// verified results; they are handed out among ordinary tasks and a
    /// wrong answer counts as a mismatch.
    AddCanaries {
        /// The bundle they run.
        bundle: Digest,
        /// Inputs with their known outcomes.
        items: Vec<Canary>,
    },
    /// A page of the settlement ledger, signed by the pool. A node reads
    /// only its own results; the pool's admins read anyone's.
    Ledger {
        /// Period and node.
        query: crate::ledger::LedgerQuery,
        /// The time the first page was judged at (`None` on the first page).
        as_of: Option<u64>,
        /// Where the previous page ended (`None` on the first page).
        after: Option<crate::ledger::LedgerCursor>,
        /// At most this many rows (capped at
        /// [`MAX_PAGE_ROWS`](crate::ledger::MAX_PAGE_ROWS)).
        limit: u32,
    },
}

impl Request {
    /// The request's name, for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::NodeHello { .. } => "NodeHello",
            Request::ClientHello { .. } => "ClientHello",
            Request::AccountHello { .. } => "AccountHello",
            Request::Lease { .. } => "Lease",
            Request::Results { .. } => "Results",
            Request::Draining => "Draining",
            Request::FetchManifest { .. } => "FetchManifest",
            Request::FetchBlob { .. } => "FetchBlob",
            Request::Publish { .. } => "Publish",
            Request::PutBlob { .. } => "PutBlob",
            Request::Submit { .. } => "Submit",
            Request::OpenJob { .. } => "OpenJob",
            Request::AppendInputs { .. } => "AppendInputs",
            Request::SealJob { .. } => "SealJob",
            Request::CancelJob { .. } => "CancelJob",
            Request::ForgetJob { .. } => "ForgetJob",
            Request::Collect => "Collect",
            Request::JobStatus { .. } => "JobStatus",
            Request::JobResults { .. } => "JobResults",
            Request::Replayable { .. } => "Replayable",
            Request::PoolStatus => "PoolStatus",
            Request::Challenge { .. } => "Challenge",
            Request::AddCanaries { .. } => "AddCanaries",
            Request::Ledger { .. } => "Ledger",
        }
    }
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
    /// Where it stands (the outcome is written to the task's record).
    pub state: ChallengeState,
}

/// A known-answer task made from a verified result: its input and outcome
/// become a task that runs with that result's identity (so a job that
/// reads its task id or seeds gives the same bytes), handed out like any
/// other task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// A job of the bundle.
    pub job: JobId,
    /// The index of a result in it that an independent execution confirmed.
    pub index: u32,
}

/// A task given to a node under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskGrant {
    /// Task and attempt. The task id is the pool's name for this execution:
    /// opaque, unordered, different for every execution.
    pub lease: LeaseId,
    /// The task's identity: what the job sees as its task id (and the seed
    /// of its virtual randomness), and what the receipt names. The same for
    /// every execution of one task — the original, a re-execution, a
    /// decider, a challenge — so a deterministic job gives the same bytes
    /// on every honest node. Opaque (the pool derives it from a secret).
    pub identity: String,
    /// Bundle to run (fetch its manifest and blobs if unknown).
    pub bundle: Digest,
    /// The input bytes.
    pub input: Bytes,
    /// For a check of an `llm`-tier result: the producer's transcript, to be
    /// replayed by one teacher-forced pass instead of generating again.
    #[serde(default)]
    pub replay: Option<crate::llm::Transcript>,
}

impl TaskGrant {
    /// Check what a node takes from the pool before it costs anything: the
    /// identity (which the guest reads and the receipt names) is at most
    /// [`MAX_IDENTITY_BYTES`] of printable ASCII.
    pub fn check(&self) -> Result<(), String> {
        if self.identity.is_empty() || self.identity.len() > MAX_IDENTITY_BYTES {
            return Err(format!(
                "the grant's task identity is {} bytes (1..={MAX_IDENTITY_BYTES})",
                self.identity.len()
            ));
        }
        if !self.identity.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the grant's task identity is not printable ASCII".into());
        }
        Ok(())
    }
}

impl TaskResult {
    /// About how many bytes it takes on the wire: its output (or error),
    /// its transcript's tokens, and a receipt's worth.
    pub fn approx_bytes(&self) -> usize {
        let outcome = match &self.outcome {
            Outcome::Output(b) => b.0.len(),
            Outcome::JobError { code, message } => code.len() + message.len(),
            Outcome::Failed { reason } => reason.len(),
        };
        let tokens: usize = self
            .transcript
            .iter()
            .map(|g| g.tokens.len() * 5 + 40)
            .sum();
        outcome + tokens + 2048
    }
}

/// How a task ended on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The job returned bytes.
    Output(Bytes),
    /// The job returned an error (`code: message`): a result like any other.
    JobError {
        /// Error code (`invalid-input`, `model`, `internal`).
        code: String,
        /// Message.
        message: String,
    },
    /// The sandbox stopped the task (deadline, memory, trap...) or the node
    /// could not run it (bad bundle, missing model). Not a result: the pool
    /// retries elsewhere and dead-letters after too many failures.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A finished task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Task and attempt.
    pub lease: LeaseId,
    /// What happened.
    pub outcome: Outcome,
    /// The node's signed receipt (absent for `Failed`).
    pub receipt: Option<SignedReceipt>,
    /// The task's text generations (its receipt commits to their digest);
    /// empty when it generated nothing.
    #[serde(default)]
    pub transcript: crate::llm::Transcript,
}

/// The pool's verdict on one result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Stored; will not be asked again.
    Accepted,
    /// Already accepted from this attempt (a resend after a lost ack).
    Duplicate,
    /// Not the current attempt, or the task is finished: discard it.
    Stale,
    /// Refused (bad receipt, signature, digest): the reason.
    Refused(String),
}

/// Summary of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Job id.
    pub job: JobId,
    /// Bundle it runs.
    pub bundle: Digest,
    /// Bundle name and version.
    pub bundle_name: String,
    /// Tasks in total.
    pub tasks: u32,
    /// Tasks with an accepted result.
    pub done: u32,
    /// Tasks given up after too many attempts.
    pub dead: u32,
    /// Tasks currently leased.
    pub running: u32,
    /// Tasks answered from the result cache, without compute.
    #[serde(default)]
    pub cached: u32,
    /// Why queued tasks are not being leased, when no connected node can
    /// take them (e.g. a GPU job and no node with a GPU that fits); `None`
    /// when some node could.
    #[serde(default)]
    pub waiting: Option<String>,
    /// Still taking inputs (opened, not sealed): not finished even when
    /// every task so far is.
    #[serde(default)]
    pub open: bool,
    /// Retention removed its inputs and outputs (receipts stay).
    #[serde(default)]
    pub purged: bool,
}

impl JobSummary {
    /// Sealed, and every task done or dead-lettered.
    pub fn finished(&self) -> bool {
        !self.open && self.done + self.dead >= self.tasks
    }
}

/// One task's result as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Index of the input in the submission.
    pub index: u32,
    /// Task id.
    pub task: TaskId,
    /// Where the task is.
    pub state: TaskState,
    /// The outcome, when done.
    pub outcome: Option<Outcome>,
    /// The node that produced it.
    pub node: Option<PublicKey>,
    /// Attempts so far.
    pub attempts: u32,
    /// Why it was dead-lettered, one reason per failed attempt.
    pub reasons: Vec<String>,
    /// When answered from the result cache: the earlier task whose result
    /// this is (its node and receipt are that task's).
    #[serde(default)]
    pub cached_from: Option<TaskId>,
    /// Whether the result was checked: `unverified`, `checking`,
    /// `verified` (an independent execution agreed), `replaced` (the first
    /// result was wrong and was replaced by the agreed one) or `disputed`
    /// (three executions disagreed). Empty until done.
    #[serde(default)]
    pub verification: String,
    /// The outcome of a challenge, if one was made.
    #[serde(default)]
    pub challenge: Option<ChallengeState>,
}

/// One node as the pool sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's key.
    pub key: PublicKey,
    /// Connected now.
    pub connected: bool,
    /// Share of time connected since first seen (0..=1).
    pub uptime: f64,
    /// Tasks leased to it now.
    pub running: u32,
    /// Its slots.
    pub slots: u32,
    /// Results accepted from it.
    pub completed: u64,
    /// Leases it let expire.
    pub expired: u64,
    /// Reputation in [0, 10000]; higher is checked more.
    #[serde(default)]
    pub reputation: u32,
    /// Share of its results re-executed: max(1, reputation) / 10000.
    #[serde(default)]
    pub sampling: f64,
    /// Results confirmed by re-execution or canaries.
    #[serde(default)]
    pub confirmed: u64,
    /// Times caught with a wrong result.
    #[serde(default)]
    pub strikes: u32,
    /// Unix time until which it gets no tasks (0: not quarantined).
    #[serde(default)]
    pub quarantined_until: u64,
    /// Refused for good after too many strikes.
    #[serde(default)]
    pub banned: bool,
    /// A pool-owned node (preferred to decide disagreements).
    #[serde(default)]
    pub trusted: bool,
    /// The GPU it advertised on its last hello, if any.
    #[serde(default)]
    pub gpu: Option<Gpu>,
}

/// A node's standing with its pool, as the pool tells the node itself with
/// every answer to `Lease` (a handful of numbers: it costs the pool one
/// lookup).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NodeStanding {
    /// Reputation in [0, 10000]; higher is checked more.
    pub reputation: u32,
    /// Share of its results re-executed: max(1, reputation) / 10000.
    pub sampling: f64,
    /// Results confirmed by re-execution or canaries.
    pub confirmed: u64,
    /// Times caught with a wrong result.
    pub strikes: u32,
    /// Unix time until which it gets no tasks (0: not quarantined).
    pub quarantined_until: u64,
    /// Refused for good after too many strikes.
    pub banned: bool,
}

/// The whole pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSummary {
    /// Nodes ever seen.
    pub nodes: Vec<NodeStatus>,
    /// Tasks waiting.
    pub queued: u64,
    /// Tasks leased.
    pub leased: u64,
    /// Tasks done.
    pub done: u64,
    /// Tasks dead-lettered.
    pub dead: u64,
    /// Jobs.
    pub jobs: Vec<JobSummary>,
    /// What verification did since the pool started.
    #[serde(default)]
    pub verification: VerificationStats,
    /// Re-executions that no connected node may run now, grouped by why
    /// (`2 exact-tier checks wait for a node with engines: ...`).
    #[serde(default)]
    pub checks_waiting: Vec<String>,
    /// What the pool refused since it started, by kind (`oversized frame`,
    /// `connections per IP`, `Challenge: Busy`, ...): how a pool owner sees
    /// an attack.
    #[serde(default)]
    pub refusals: std::collections::BTreeMap<String, u64>,
}

/// Counters of the pool's verification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationStats {
    /// Re-executions queued or running.
    pub pending: u64,
    /// Re-executions finished (including tie-breaks and challenges).
    pub executed: u64,
    /// Results confirmed.
    pub confirmed: u64,
    /// Disagreements found.
    pub mismatches: u64,
    /// Results replaced by the agreed one.
    pub replaced: u64,
    /// Canaries answered (right or wrong).
    pub canaries: u64,
    /// Decoy checks answered (an honest verifier rejects each).
    #[serde(default)]
    pub decoys: u64,
    /// Of those, decoys a verifier accepted (each one a strike).
    #[serde(default)]
    pub decoys_accepted: u64,
}

/// Error codes a pool returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is not valid in this state (e.g. no hello yet).
    Protocol,
    /// The protocol version is not supported.
    Version,
    /// The peer is not admitted (allowlist) or not allowed this request.
    Forbidden,
    /// Unknown job, bundle or blob.
    NotFound,
    /// A bundle, blob or input was refused.
    Invalid,
    /// The pool failed (storage error); retry later.
    Internal,
    /// Over a rate or budget of the pool's (challenges per hour, ...);
    /// retry later.
    Busy,
}

/// A response frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to a hello.
    Welcome {
        /// Protocol version.
        protocol: u32,
        /// Software and version.
        agent: String,
        /// How long a lease lasts without renewal, ms.
        lease_ttl_ms: u64,
        /// How often a node should renew, ms.
        heartbeat_ms: u64,
    },
    /// Answer to `Lease`.
    Leases {
        /// New tasks.
        grants: Vec<TaskGrant>,
        /// Leases the node named that are no longer its own: stop them.
        lost: Vec<LeaseId>,
        /// When no task was granted: wait this long before asking again, ms.
        retry_ms: u64,
        /// The asking node's standing as the pool holds it now (what
        /// `tidepool node status` shows its owner). `None` from pools
        /// before it.
        #[serde(default)]
        standing: Option<NodeStanding>,
    },
    /// Answer to `Results`, one verdict per result in order.
    Verdicts(Vec<(LeaseId, Verdict)>),
    /// Answer to `FetchManifest`.
    Manifest(SignedManifest),
    /// Part of a blob; chunks follow until `offset + data.len() == total`.
    BlobChunk {
        /// Blob digest.
        digest: Digest,
        /// Offset of this chunk.
        offset: u64,
        /// Blob size.
        total: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Answer to `Publish`: the blobs the pool still needs.
    Published {
        /// Bundle digest.
        bundle: Digest,
        /// Blobs to upload with `PutBlob`.
        missing: Vec<Digest>,
    },
    /// Answer to `PutBlob`: bytes of the blob held so far (complete when equal
    /// to its size, and verified).
    BlobStored {
        /// Blob digest.
        digest: Digest,
        /// Bytes held.
        have: u64,
    },
    /// Answer to `Submit`.
    Submitted {
        /// The job.
        job: JobId,
        /// Its tasks.
        tasks: u32,
    },
    /// Answer to `OpenJob`.
    JobOpened {
        /// The job.
        job: JobId,
        /// Inputs the pool holds (resume from here).
        have: u32,
        /// Whether it was sealed already.
        sealed: bool,
    },
    /// Answer to `AppendInputs`.
    Appended {
        /// The job.
        job: JobId,
        /// Inputs the pool holds now.
        have: u32,
    },
    /// Answer to `CancelJob`.
    Cancelled {
        /// The job.
        job: JobId,
        /// Waiting tasks dead-lettered.
        waiting: u32,
        /// Running tasks whose nodes are told to stop.
        running: u32,
    },
    /// Answer to `Collect`.
    Collected {
        /// Jobs whose inputs and outputs were removed.
        jobs: u32,
        /// Their tasks.
        tasks: u64,
        /// Bytes removed.
        bytes: u64,
    },
    /// Answer to `JobStatus`.
    Job(JobSummary),
    /// Answer to `JobResults`.
    Records(Vec<TaskRecord>),
    /// Answer to `Replayable` (boxed: it holds a manifest and a receipt).
    Replayable(Box<crate::replay::Replayable>),
    /// Answer to `PoolStatus`.
    Pool(PoolSummary),
    /// Answer to `Challenge`: where the check stands.
    Challenged {
        /// The task checked (the original when a cached copy was named).
        task: TaskId,
        /// The job of the task named in the challenge (its record shows the
        /// outcome).
        job: JobId,
        /// That task's index in its job.
        index: u32,
        /// `pending`, or the outcome if it was already decided.
        state: ChallengeState,
    },
    /// Answer to `AddCanaries`: how many the bundle has now.
    Canaries {
        /// Canaries stored for the bundle.
        count: u32,
    },
    /// Answer to `Ledger`: one signed page.
    LedgerPage(crate::ledger::SignedPage),
    /// Plain success (`Draining`).
    Ok,
    /// The request failed.
    Error {
        /// Kind.
        code: ErrorCode,
        /// What and where.
        message: String,
    },
}

/// Framing errors; any of them closes the stream (and the connection when
/// the peer sent it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    Oversized {
        /// Claimed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes announced.
        want: usize,
    },
}

/// Encode one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    rmp_serde::encode::write_named(&mut out, msg)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    // len <= MAX_FRAME_BYTES < u32::MAX.
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Body bytes [`message_name`] looks at: enough for a one-entry map marker,
/// a string header and the longest message name.
pub const NAME_HEAD_BYTES: usize = 40;

/// The name of the enum variant a frame body holds (`"Lease"`,
/// `"Results"`, ...), read from its first bytes: a MessagePack message is a
/// one-entry map keyed by the variant's name, or the bare name of a unit
/// variant. Lets a server choose a size limit by kind before it reads the
/// rest of the frame. `None` when the head is not shaped like a message.
pub fn message_name(head: &[u8]) -> Option<&str> {
    let rest = match head.first()? {
        0x81 => &head[1..],
        _ => head,
    };
    let (len, from) = match *rest.first()? {
        b @ 0xa0..=0xbf => (usize::from(b & 0x1f), 1),
        0xd9 => (usize::from(*rest.get(1)?), 2),
        _ => return None,
    };
    std::str::from_utf8(rest.get(from..from + len)?).ok()
}

/// Decode the body of a frame (without its length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Splits a byte stream into frames. Holds at most one partial frame.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes received and not yet returned as frames.
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes as they arrive.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The length the next frame announces, if its prefix has arrived;
    /// an oversized announcement is an error at once.
    pub fn next_len(&self) -> Result<Option<usize>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::Oversized {
                len,
                max: MAX_FRAME_BYTES,
            });
        }
        Ok(Some(len))
    }

    /// The next complete frame, decoded.
    pub fn poll_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = self.next_len()? else {
            return Ok(None);
        };
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// The stream ended: an error if a frame was cut off.
    pub fn handle_end(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = self.next_len()?.map_or(4, |l| l + 4);
        Err(FrameError::Truncated {
            have: self.buf.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_identity_is_short_printable_ascii() {
        let grant = |identity: &str| TaskGrant {
            lease: LeaseId {
                task: TaskId(1),
                attempt: 1,
            },
            identity: identity.into(),
            bundle: crate::Digest::of(b"b"),
            input: Bytes(Vec::new()),
            replay: None,
        };
        assert_eq!(grant(&"a".repeat(32)).check(), Ok(()));
        for bad in [
            String::new(),
            "a".repeat(MAX_IDENTITY_BYTES + 1),
            "a\u{1b}[2J".into(),
            "ünïcode".into(),
            "two words".into(),
        ] {
            assert!(grant(&bad).check().is_err(), "{bad:?}");
        }
        // A megabyte identity is refused by its length, before anything else.
        let e = grant(&"x".repeat(1 << 20)).check().expect_err("huge");
        assert!(e.contains("1048576 bytes"), "{e}");
    }

    #[test]
    fn every_request_is_named_from_the_head_of_its_frame() {
        let d = Digest::of(b"x");
        let requests = vec![
            Request::ClientHello {
                protocol: 1,
                agent: "t".into(),
            },
            Request::Lease {
                want: 1,
                running: vec![],
            },
            Request::Results { results: vec![] },
            Request::Draining,
            Request::PoolStatus,
            Request::PutBlob {
                digest: d,
                offset: 0,
                data: Bytes(vec![0; 100]),
            },
            Request::AddCanaries {
                bundle: d,
                items: vec![],
            },
        ];
        for r in requests {
            let frame = encode(&r).expect("encodes");
            let head = &frame[4..(4 + NAME_HEAD_BYTES).min(frame.len())];
            assert_eq!(message_name(head), Some(r.name()));
        }
        assert_eq!(message_name(&[]), None);
        assert_eq!(message_name(&[0x81, 0xd9, 200, b'a']), None);
        assert_eq!(message_name(&[0x92, 1, 2]), None);
    }

    #[test]
    fn capabilities_past_any_bound_are_refused_naming_the_field() {
        let limits = CapabilityLimits::default();
        let ok = Capabilities {
            encodings: vec!["onnx".into()],
            slots: 4,
            queue: 4,
            hardware: Some("x86_64".into()),
            ..Capabilities::default()
        };
        assert_eq!(ok.check(&limits), Ok(()));
        let cases: Vec<(&str, Capabilities)> = vec![
            (
                "slots",
                Capabilities {
                    slots: u32::MAX,
                    ..ok.clone()
                },
            ),
            (
                "slots",
                Capabilities {
                    slots: 0,
                    ..ok.clone()
                },
            ),
            (
                "queue",
                Capabilities {
                    queue: u32::MAX,
                    ..ok.clone()
                },
            ),
            (
                "encodings",
                Capabilities {
                    encodings: vec![String::new(); 100_000],
                    ..ok.clone()
                },
            ),
            (
                "hardware",
                Capabilities {
                    hardware: Some("x".repeat(10_000)),
                    ..ok.clone()
                },
            ),
            (
                "engines",
                Capabilities {
                    engines: vec![String::new(); 100_000],
                    ..ok.clone()
                },
            ),
            (
                "engines",
                Capabilities {
                    engines: vec!["e".repeat(10_000)],
                    ..ok.clone()
                },
            ),
            (
                "gpu",
                Capabilities {
                    gpu: Some(Gpu {
                        name: "n".repeat(1000),
                        memory_mib: 1,
                        encodings: vec![],
                    }),
                    ..ok.clone()
                },
            ),
        ];
        for (field, caps) in cases {
            let e = caps.check(&limits).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let a = Request::Lease {
            want: 3,
            running: vec![LeaseId {
                task: TaskId(9),
                attempt: 2,
            }],
        };
        let b = Request::PutBlob {
            digest: Digest::of(b"x"),
            offset: 5,
            data: Bytes(vec![1, 2, 3]),
        };
        let mut bytes = encode(&a).expect("encode");
        bytes.extend(encode(&b).expect("encode"));
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(3) {
            d.handle_bytes(chunk);
            while let Some(m) = d.poll_frame::<Request>().expect("decode") {
                got.push(m);
            }
        }
        assert_eq!(got, vec![a, b]);
        d.handle_end().expect("clean end");
    }

    #[test]
    fn bytes_are_bin_not_arrays() {
        let f = encode(&Bytes(vec![0xff; 1000])).expect("encode");
        assert!(f.len() < 1010, "{} bytes", f.len());
    }

    #[test]
    fn oversized_garbage_and_truncated_frames_are_errors() {
        let mut d = FrameDecoder::new();
        d.handle_bytes(&u32::MAX.to_be_bytes());
        assert!(matches!(
            d.poll_frame::<Request>(),
            Err(FrameError::Oversized { .. })
        ));

        let mut d = FrameDecoder::new();
        let mut junk = 5u32.to_be_bytes().to_vec();
        junk.extend([0xc1, 0xc1, 0xc1, 0xc1, 0xc1]);
        d.handle_bytes(&junk);
        assert!(matches!(
            d.poll_frame::<Request>(),
            Err(FrameError::Malformed(_))
        ));

        let mut d = FrameDecoder::new();
        d.handle_bytes(&encode(&Request::PoolStatus).expect("encode")[..3]);
        assert!(d.poll_frame::<Request>().expect("partial").is_none());
        assert!(matches!(d.handle_end(), Err(FrameError::Truncated { .. })));
    }
}
