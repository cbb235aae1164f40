//! What one task may hold and spend in wasi-nn, outside its linear memory.
//!
//! A guest's linear memory is bounded by the sandbox; what it asks the host
//! to hold is not, unless counted here. Every tensor a guest creates is
//! copied into host memory; every execution context may hold engine state;
//! every `compute` makes the engine allocate for the shapes the guest chose,
//! and an engine call cannot be interrupted. Per task:
//!
//! - **tensor bytes**: the bytes of the task's live tensors (created by the
//!   guest or returned by `compute`), counted when made and released when
//!   dropped or consumed ([`NnUsage::tensor_created`],
//!   [`NnUsage::tensor_dropped`]);
//! - **execution contexts**: live contexts ([`NnUsage::open_context`]);
//! - **working memory per compute**: the model's estimate for the given
//!   shapes ([`super::shapes::ShapeBudget`]), refused before the engine runs;
//! - **time**: a compute still running at the task's deadline is abandoned:
//!   the task ends with `Deadline` at once and its thread is let go to
//!   finish the compute on its own ([`abandoned_computes`] counts those
//!   still running; see [`crate::task_threads`]).
//!
//! Resources of every kind (tensors, graphs, contexts, errors, streams) are
//! also bounded in number by the task's resource table (`max_resources`).
//! A budget that is hit ends the task with `TaskError::Budget` whatever the
//! guest does next; the guest sees a wasi-nn error (or a trap, for a tensor
//! constructor, which has no error to return) at the call that hit it.
//!
//! Never decides what a task is for or where its result goes.

use super::{engine_err, ModelGraph, TaskEnv};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, NamedTensor};

/// Per-task wasi-nn limits (node settings, `[sandbox]` in `node.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NnLimits {
    /// Bytes of live tensors a task may hold on the host (inputs it made
    /// and outputs it was given).
    pub max_tensor_bytes: u64,
    /// Live execution contexts per task.
    pub max_contexts: u32,
    /// Estimated working memory of one `compute`, bytes.
    pub max_compute_bytes: u64,
    /// Live resources of every kind in a task's table.
    pub max_resources: usize,
}

impl Default for NnLimits {
    fn default() -> Self {
        Self {
            max_tensor_bytes: 256 << 20,
            max_contexts: 16,
            max_compute_bytes: 4 << 30,
            max_resources: 16_384,
        }
    }
}

/// Which budget a task hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetHit {
    /// The budget's name (`tensor bytes`, `execution contexts`, `compute memory`).
    pub what: &'static str,
    /// Its limit.
    pub limit: u64,
    /// What the task asked for when it hit it.
    pub wanted: u64,
}

impl std::fmt::Display for BudgetHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wasi-nn {} budget of {} exceeded (wanted {})",
            self.what, self.limit, self.wanted
        )
    }
}

/// One task's wasi-nn accounting; shared by its store and every context it
/// opens, lives as long as the task.
#[derive(Debug, Default)]
pub struct NnUsage {
    /// The limits (fixed for the task).
    limits: NnLimits,
    /// What is held now, and the first budget hit.
    state: Mutex<UsageState>,
}

#[derive(Debug, Default)]
struct UsageState {
    /// Bytes of the task's live tensors.
    tensor_bytes: u64,
    /// The task's live execution contexts.
    contexts: u32,
    /// The first budget the task hit (it ends the task).
    hit: Option<BudgetHit>,
    /// Node log lines this task's wasi-nn failures have caused.
    logged: u32,
    /// What the task's computes used so far (goes into its receipt).
    metered: tidepool_proto::receipt::Metering,
}

/// Node log lines a task's wasi-nn failures may cause (a guest could
/// otherwise fail a call in a loop and flood the node's log).
pub const MAX_FAILURE_LOG_LINES: u32 = 16;

impl NnUsage {
    /// Accounting under `limits`.
    pub fn new(limits: NnLimits) -> Self {
        Self {
            limits,
            state: Mutex::default(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> &NnLimits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UsageState> {
        // Only counters change under the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hit(
        &self,
        state: &mut UsageState,
        what: &'static str,
        limit: u64,
        wanted: u64,
    ) -> BudgetHit {
        let hit = BudgetHit {
            what,
            limit,
            wanted,
        };
        state.hit.get_or_insert_with(|| hit.clone());
        hit
    }

    /// A tensor of `bytes` is about to be held for the task.
    pub fn tensor_created(&self, bytes: u64) -> Result<(), BudgetHit> {
        let mut s = self.lock();
        let wanted = s.tensor_bytes.saturating_add(bytes);
        if wanted > self.limits.max_tensor_bytes {
            return Err(self.hit(&mut s, "tensor bytes", self.limits.max_tensor_bytes, wanted));
        }
        s.tensor_bytes = wanted;
        Ok(())
    }

    /// A tensor of `bytes` is no longer held (dropped, or consumed by `compute`).
    pub fn tensor_dropped(&self, bytes: u64) {
        let mut s = self.lock();
        s.tensor_bytes = s.tensor_bytes.saturating_sub(bytes);
    }

    /// Bytes of live tensors now.
    pub fn tensor_bytes(&self) -> u64 {
        self.lock().tensor_bytes
    }

    /// An execution context is about to be opened.
    pub fn open_context(&self) -> Result<(), BudgetHit> {
        let mut s = self.lock();
        if s.contexts >= self.limits.max_contexts {
            let wanted = u64::from(s.contexts) + 1;
            return Err(self.hit(
                &mut s,
                "execution contexts",
                u64::from(self.limits.max_contexts),
                wanted,
            ));
        }
        s.contexts += 1;
        Ok(())
    }

    fn close_context(&self) {
        let mut s = self.lock();
        s.contexts = s.contexts.saturating_sub(1);
    }

    fn compute_refused(&self, estimate: u64) -> BudgetHit {
        let mut s = self.lock();
        self.hit(
            &mut s,
            "compute memory",
            self.limits.max_compute_bytes,
            estimate,
        )
    }

    /// Whether one more wasi-nn failure of this task may be logged; the
    /// last allowed line says that further ones are dropped.
    pub fn may_log(&self) -> Option<&'static str> {
        let mut s = self.lock();
        if s.logged >= MAX_FAILURE_LOG_LINES {
            return None;
        }
        s.logged += 1;
        Some(if s.logged == MAX_FAILURE_LOG_LINES {
            " (further wasi-nn failures of this task are not logged)"
        } else {
            ""
        })
    }

    /// One compute reached an engine: `bytes_in` tensor bytes went in,
    /// `bytes_out` came back, and the engine took `took`.
    fn computed(&self, bytes_in: u64, bytes_out: u64, took: std::time::Duration) {
        let mut s = self.lock();
        let m = &mut s.metered;
        m.computes = m.computes.saturating_add(1);
        m.compute_us = m
            .compute_us
            .saturating_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        m.tensor_bytes_in = m.tensor_bytes_in.saturating_add(bytes_in);
        m.tensor_bytes_out = m.tensor_bytes_out.saturating_add(bytes_out);
    }

    /// A text generation read `prompt` tokens and produced `generated`.
    pub fn generated(&self, prompt: u64, generated: u64) {
        let mut s = self.lock();
        s.metered.tokens_in = s.metered.tokens_in.saturating_add(prompt);
        s.metered.tokens_out = s.metered.tokens_out.saturating_add(generated);
    }

    /// What the task's computes used (the byte counts of the task's own
    /// input and output are the sandbox's to fill in).
    pub fn metered(&self) -> tidepool_proto::receipt::Metering {
        self.lock().metered.clone()
    }

    /// The first budget the task hit, if any.
    pub fn budget_hit(&self) -> Option<BudgetHit> {
        self.lock().hit.clone()
    }
}

fn tensors_bytes(ts: &[NamedTensor]) -> u64 {
    ts.iter().map(|t| t.tensor.data.len() as u64).sum()
}

pub use crate::task_threads::abandoned_computes;

/// Every execution context a task opens, around the engine's own: checks
/// shapes and budgets before the engine runs, counts what it returns, and
/// lets a compute go at the deadline. Lives as long as the guest's context
/// resource.
pub(crate) struct BudgetedContext {
    /// The engine's context; `None` once the engine panicked in it (its
    /// state is unknown: it is not used again).
    engine: Option<Box<dyn BackendExecutionContext>>,
    /// The model (for its declared shapes); shared, outlives the task.
    model: Arc<dyn ModelGraph>,
    /// The task's deadline, accounting and generation record.
    env: TaskEnv,
}

impl BudgetedContext {
    /// Open a context on `model` for the task `env`, counted against its budget.
    pub(crate) fn open(
        model: Arc<dyn ModelGraph>,
        env: &TaskEnv,
    ) -> Result<Box<dyn BackendExecutionContext>, BackendError> {
        env.nn
            .open_context()
            .map_err(|h| engine_err(h.to_string()))?;
        match model.context(env) {
            Ok(inner) => Ok(Box::new(Self {
                engine: Some(inner),
                model,
                env: env.clone(),
            })),
            Err(e) => {
                env.nn.close_context();
                Err(e)
            }
        }
    }
}

impl Drop for BudgetedContext {
    fn drop(&mut self) {
        self.env.nn.close_context();
    }
}

impl BackendExecutionContext for BudgetedContext {
    refuse_witx!();
    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let r = self.compute_within_budget(inputs);
        if let Err(e) = &r {
            // The guest sees only wasi-nn's top-level text; the reason is the
            // node owner's to read (bounded: the guest can fail in a loop).
            if let Some(more) = self.env.nn.may_log() {
                let reason = crate::guest_text::escape(&format!("{e:#}"), 1024);
                tracing::warn!(target: "tidepool::job", "wasi-nn compute failed: {reason}{more}");
            }
        }
        r
    }
}

impl BudgetedContext {
    fn compute_within_budget(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let nn = &self.env.nn;
        // wasi-nn took the inputs out of the task's table: they are ours now.
        let bytes_in = inputs.as_deref().map_or(0, tensors_bytes);
        nn.tensor_dropped(bytes_in);
        if let (Some(ins), Some(shapes)) = (&inputs, self.model.shapes()) {
            match shapes.check(ins, nn.limits().max_compute_bytes) {
                Ok(_) => {}
                Err(super::shapes::ShapeRefusal::OverBudget { estimate, .. }) => {
                    return Err(engine_err(nn.compute_refused(estimate).to_string()))
                }
                Err(e) => return Err(engine_err(e.to_string())),
            }
        }
        self.env.budget.check("compute")?;
        let Some(engine) = self.engine.as_mut() else {
            return Err(engine_err(
                "this execution context is gone: the engine panicked in it".into(),
            ));
        };
        // On the task's own thread: the sandbox lets the whole task go if it
        // is still here at the deadline (crate::task_threads).
        let started = Instant::now();
        let result =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.compute(inputs)))
            {
                Ok(r) => r,
                Err(_) => {
                    self.engine = None;
                    return Err(engine_err("the engine panicked during compute".into()));
                }
            };
        let took = started.elapsed();
        let outputs = result?;
        let bytes_out = outputs.as_deref().map_or(0, tensors_bytes);
        nn.computed(bytes_in, bytes_out, took);
        if let Err(hit) = nn.tensor_created(bytes_out) {
            return Err(engine_err(hit.to_string()));
        }
        Ok(outputs)
    }
}
