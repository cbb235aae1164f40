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

#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub mod tract;

use std::sync::Arc;
use std::time::Instant;
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
    fn context(&self, budget: TaskBudget)
        -> Result<Box<dyn BackendExecutionContext>, BackendError>;
}

/// A task's handle on a shared model: the model plus the task's budget.
pub struct TaskGraph {
    /// The shared model (lives as long as the host's registry).
    pub model: Arc<dyn ModelGraph>,
    /// The task's budget, copied into every context it creates.
    pub budget: TaskBudget,
}

impl std::fmt::Debug for TaskGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskGraph")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl BackendGraph for TaskGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        self.budget.check("init-execution-context")?;
        Ok(self.model.context(self.budget)?.into())
    }
}

impl From<TaskGraph> for Graph {
    fn from(g: TaskGraph) -> Self {
        Graph::from(Box::new(g) as Box<dyn BackendGraph>)
    }
}

fn engine_err(msg: String) -> BackendError {
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
