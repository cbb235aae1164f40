//! wasi-nn backends: the engines that run a verified model for a task.
//!
//! One file per engine, each behind a cargo feature (tract, pure Rust and
//! bit-exact on CPU, is always built). An engine turns a model file into a
//! [`ModelGraph`] once per host; every task then gets its own
//! [`TaskGraph`] view of it, which carries the task's budget (deadline), so
//! a shared model is never loaded twice and a slow task cannot outlive its
//! deadline inside a host call.
//!
//! What the guest sees is kept apart from what ends a task: engine failures
//! become wasi-nn errors (`runtime-error` with a message, or `timeout`),
//! never traps; panics inside an engine are caught and reported the same way.

/// The WITX methods of an execution context (`set-input`, `get-output`),
/// refused the same way by every context: tasks pass named tensors to
/// `compute`, which returns named tensors.
macro_rules! refuse_witx {
    () => {
        fn set_input(
            &mut self,
            _id: wasmtime_wasi_nn::backend::Id,
            _tensor: &wasmtime_wasi_nn::Tensor,
        ) -> Result<(), wasmtime_wasi_nn::backend::BackendError> {
            Err($crate::backend::witx_set_input())
        }
        fn get_output(
            &mut self,
            _id: wasmtime_wasi_nn::backend::Id,
        ) -> Result<wasmtime_wasi_nn::Tensor, wasmtime_wasi_nn::backend::BackendError> {
            Err($crate::backend::witx_get_output())
        }
    };
}

pub mod budget;
#[cfg(feature = "llama")]
pub mod llama;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub mod shapes;
pub mod tract;

use std::sync::{Arc, Mutex};
use std::time::Instant;
use tidepool_proto::llm::{AcceptPolicy, Generation, Transcript};
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendGraph, BackendInner, NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding};
use wasmtime_wasi_nn::{ExecutionContext, Graph};

/// What a task may spend inside the backend.
#[derive(Debug, Clone, Copy)]
pub struct TaskBudget {
    /// After this instant, no new inference starts for the task.
    pub deadline: Instant,
}

impl TaskBudget {
    /// Fail with a clear message if the deadline has passed.
    pub fn check(&self, what: &str) -> Result<(), BackendError> {
        if Instant::now() >= self.deadline {
            return Err(BackendError::BackendAccess(wasmtime::format_err!(
                "task deadline exceeded before {what}"
            )));
        }
        Ok(())
    }
}

/// What one task brings to every engine call: its budget and its text
/// generation record. Cloned into each execution context the task creates;
/// lives as long as the task.
#[derive(Debug, Clone)]
pub struct TaskEnv {
    /// When the task must stop.
    pub budget: TaskBudget,
    /// The task's generations (recorded) and the claim it replays, if any.
    pub llm: Arc<LlmTask>,
    /// What the task holds in wasi-nn, against its limits.
    pub nn: Arc<budget::NnUsage>,
}

/// A task's text generations: what it produced, and for a check, the
/// producer's transcript to replay instead of generating (ADR 0008).
#[derive(Debug, Default)]
pub struct LlmTask {
    /// The producer's transcript (checks only), fixed for the task.
    replay: Option<Transcript>,
    /// How close a replayed token must be to this node's choice.
    pub policy: AcceptPolicy,
    /// Whether the task's generations may be decoded in one batch with other
    /// tasks' (only for a tier whose check tolerates last-bit differences:
    /// `llm`; ADR 0020). Fixed for the task.
    pub shared_batches: bool,
    /// What happened so far: generations made, replay reports.
    state: Mutex<LlmState>,
}

#[derive(Debug, Default)]
struct LlmState {
    /// Generations of this task, in call order.
    recorded: Transcript,
    /// One report per generation that had a claim to replay.
    reports: Vec<ReplayReport>,
}

/// What replaying one claimed generation found (for the node's log, tests
/// and benchmarks; the pool judges by the task's output).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplayReport {
    /// Claimed tokens checked.
    pub checked: u32,
    /// Index of the first rejected claimed token.
    pub rejected_at: Option<u32>,
    /// Claimed tokens after the point where generation ends.
    pub extra_tokens: u32,
    /// The claim stopped before generation would have.
    pub truncated: bool,
    /// The claim has no generation for this prompt (generated afresh).
    pub missing: bool,
    /// Largest gap (best logit − claimed logit) among accepted or checked tokens.
    pub max_gap: f32,
}

impl ReplayReport {
    /// Whether the claim was accepted as it stands.
    pub fn accepted(&self) -> bool {
        self.rejected_at.is_none() && self.extra_tokens == 0 && !self.truncated && !self.missing
    }
}

impl LlmTask {
    /// A task that generates (and records) on its own.
    pub fn new() -> Self {
        Self::default()
    }

    /// A task that replays `claim` under `policy`.
    pub fn replaying(claim: Option<Transcript>, policy: AcceptPolicy) -> Self {
        Self {
            replay: claim,
            policy,
            shared_batches: false,
            state: Mutex::default(),
        }
    }

    /// Let (or stop) this task's generations share batches with other tasks'.
    #[must_use]
    pub fn sharing_batches(mut self, shared: bool) -> Self {
        self.shared_batches = shared;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LlmState> {
        // Only pushes happen under the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The claimed tokens for the next generation, if this task replays and
    /// the claim's generation at this index has the same prompt.
    pub fn next_replay(&self, prompt: tidepool_proto::Digest) -> Option<Vec<u32>> {
        let claim = self.replay.as_ref()?;
        let index = self.lock().recorded.len();
        match claim.get(index) {
            Some(g) if g.prompt == prompt => Some(g.tokens.clone()),
            _ => {
                self.report(ReplayReport {
                    missing: true,
                    ..ReplayReport::default()
                });
                None
            }
        }
    }

    /// Note one finished generation.
    pub fn record(&self, g: Generation) {
        self.lock().recorded.push(g);
    }

    /// Note what a replay found.
    pub fn report(&self, r: ReplayReport) {
        self.lock().reports.push(r);
    }

    /// The generations made, in order.
    pub fn transcript(&self) -> Transcript {
        self.lock().recorded.clone()
    }

    /// The replay reports, in order (empty unless the task replayed).
    pub fn reports(&self) -> Vec<ReplayReport> {
        self.lock().reports.clone()
    }
}

/// An inference engine for one wasi-nn encoding.
pub trait NnEngine: Send + Sync + std::fmt::Debug {
    /// The wasi-nn encoding it serves (`onnx`, `ggml`, ...).
    fn encoding(&self) -> GraphEncoding;
    /// Name and version, recorded in receipts (`tract-onnx 0.23.9`).
    fn describe(&self) -> String;
    /// Load a verified model file; called once per model per host.
    fn load(&self, path: &std::path::Path) -> anyhow::Result<Arc<dyn ModelGraph>>;
}

/// A model loaded by an engine, shared by all tasks on the host.
pub trait ModelGraph: Send + Sync {
    /// A fresh execution context for one task.
    fn context(&self, env: &TaskEnv) -> Result<Box<dyn BackendExecutionContext>, BackendError>;
    /// The model's declared input dimensions and working-memory estimate,
    /// checked before every compute (`None`: the engine bounds its memory
    /// itself, as llama.cpp does with its fixed context).
    fn shapes(&self) -> Option<&shapes::ShapeBudget> {
        None
    }
}

/// A task's handle on a shared model: the model plus the task's budget.
pub struct TaskGraph {
    /// The shared model (lives as long as the host's registry).
    pub model: Arc<dyn ModelGraph>,
    /// The task's budget and generation record, shared by every context it creates.
    pub env: TaskEnv,
}

impl std::fmt::Debug for TaskGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskGraph")
            .field("budget", &self.env.budget)
            .finish_non_exhaustive()
    }
}

impl BackendGraph for TaskGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        self.env.budget.check("init-execution-context")?;
        Ok(budget::BudgetedContext::open(self.model.clone(), &self.env)?.into())
    }
}

impl From<TaskGraph> for Graph {
    fn from(g: TaskGraph) -> Self {
        Graph::from(Box::new(g) as Box<dyn BackendGraph>)
    }
}

pub(crate) fn engine_err(msg: String) -> BackendError {
    BackendError::BackendAccess(wasmtime::Error::msg(msg))
}

/// `set-input` (the WITX API) is refused: tasks pass named tensors to
/// `compute`.
pub(crate) fn witx_set_input() -> BackendError {
    engine_err("set-input is the WITX API; pass named tensors to compute".into())
}

/// `get-output` (the WITX API) is refused: `compute` returns named tensors.
pub(crate) fn witx_get_output() -> BackendError {
    engine_err("get-output is the WITX API; compute returns named tensors".into())
}

/// The named inputs of a `compute` call in the model's input order,
/// refusing unknown, repeated and missing names with the model's list.
pub(crate) fn order_inputs<'a>(
    model_inputs: &[String],
    given: Option<&'a [NamedTensor]>,
) -> Result<Vec<&'a NamedTensor>, BackendError> {
    let given = given.ok_or_else(|| engine_err("compute needs named input tensors".into()))?;
    let mut ordered: Vec<Option<&NamedTensor>> = vec![None; model_inputs.len()];
    for nt in given {
        let Some(ix) = model_inputs.iter().position(|n| *n == nt.name) else {
            return Err(engine_err(format!(
                "the model has no input {:?}; its inputs are {:?}",
                nt.name, model_inputs
            )));
        };
        if ordered[ix].is_some() {
            return Err(engine_err(format!("input {:?} given twice", nt.name)));
        }
        ordered[ix] = Some(nt);
    }
    ordered
        .into_iter()
        .enumerate()
        .map(|(ix, t)| {
            t.ok_or_else(|| {
                engine_err(format!(
                    "missing input {:?}; the model needs {:?}",
                    model_inputs[ix], model_inputs
                ))
            })
        })
        .collect()
}

/// The wasi-nn "backend" a task sees for `load` from bytes: it always refuses.
/// Models reach jobs only by name, after the node verified their digests.
pub struct RefuseGuestBytes(pub GraphEncoding);

impl std::fmt::Debug for RefuseGuestBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RefuseGuestBytes({})", self.0)
    }
}

impl BackendInner for RefuseGuestBytes {
    fn encoding(&self) -> GraphEncoding {
        self.0
    }
    fn load(
        &mut self,
        _builders: &[&[u8]],
        _target: ExecutionTarget,
    ) -> Result<Graph, BackendError> {
        Err(BackendError::BackendAccess(wasmtime::format_err!(
            "loading a model from guest-supplied bytes is not allowed; use load-by-name with a model the manifest declares"
        )))
    }
    fn as_dir_loadable(&mut self) -> Option<&mut dyn wasmtime_wasi_nn::backend::BackendFromDir> {
        None
    }
}

/// Run engine code, turning a panic into a backend error (a host panic must
/// never take the node down because of a guest's tensors).
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(BackendError::BackendAccess(wasmtime::format_err!(
                "{what} panicked in the engine: {msg}"
            )))
        }
    }
}
