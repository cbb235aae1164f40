//! The Tidepool node's side: the sandbox that runs jobs, the wasi-nn engines
//! behind it, the registry of verified models, and model files on disk.
//!
//! Data flows one way through here: component bytes and verified model files
//! go in; outputs and receipts come out. Nothing in this crate talks to the
//! pool (that is the node agent's job, built on top).

pub mod backend;
pub mod cache;
pub mod determinism;
pub mod gpu;
pub mod guest_text;
pub mod local;
pub use tidepool_models as models;
pub mod registry;
pub mod sandbox;
pub mod task_threads;

pub use backend::budget::NnLimits;
pub use backend::tract::TractEngine;
pub use registry::{ModelRegistry, RegistryBuilder, RegistryError, SharedModels};
pub use sandbox::{
    JobComponent, JobFailure, LoadError, Sandbox, SandboxConfig, TaskError, TaskOutput, TaskSpec,
};

use std::sync::Arc;

/// Threads a `ggml` (llama.cpp) task context uses unless configured.
pub const DEFAULT_LLM_THREADS: u32 = 1;

/// Most generations one shared llama.cpp context decodes together.
pub const MAX_LLM_BATCH: u32 = 64;

/// How a node runs text generation (node settings `llm_threads`,
/// `llm_batch`; part of its deterministic settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmSettings {
    /// Threads of every llama.cpp context.
    pub threads: u32,
    /// Generations of `llm`-tier tasks decoded together in one shared
    /// context per model (1: each generation has a context of its own).
    pub batch: u32,
}

impl LlmSettings {
    /// Every generation in a context of its own with `threads` threads.
    pub fn alone(threads: u32) -> Self {
        Self { threads, batch: 1 }
    }
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self::alone(DEFAULT_LLM_THREADS)
    }
}

/// The engines this build has, one per encoding: tract for `onnx`, and
/// llama.cpp for `ggml` (with [`DEFAULT_LLM_THREADS`]) when built with the
/// `llama` feature.
pub fn default_engines() -> Vec<Arc<dyn backend::NnEngine>> {
    let mut e: Engines = vec![Arc::new(TractEngine)];
    add_llama(&mut e, LlmSettings::default());
    e
}

/// Add the llama.cpp engine with these settings (if built).
fn add_llama(engines: &mut Engines, llm: LlmSettings) {
    #[cfg(feature = "llama")]
    match backend::llama::LlamaEngine::new(llm.threads) {
        Ok(l) => engines.push(Arc::new(l.with_batch(llm.batch))),
        Err(e) => tracing::warn!("llama.cpp unavailable: {e}; ggml models cannot run"),
    }
    #[cfg(not(feature = "llama"))]
    let _ = (engines, llm);
}

/// Which engine runs `onnx` models on a node (wasmtime-wasi-nn keeps one
/// backend per encoding, so the node picks one at start).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnnxEngine {
    /// tract: pure Rust, bit-exact on CPU (the default).
    #[default]
    Tract,
    /// ONNX Runtime from this shared library.
    OnnxRuntime {
        /// `libonnxruntime.so.1.31.1` (catalogue entry `onnxruntime-lib`).
        library: std::path::PathBuf,
        /// If the library cannot be used: run tract instead (with a
        /// warning) rather than refuse to start.
        fallback: bool,
    },
}

/// Why an engine (or the GPU behind it) could not start: said once at node
/// start-up, naming what is missing and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// ONNX Runtime's library is missing or unusable.
    #[error("{0}")]
    OnnxRuntime(String),
    /// llama.cpp could not start (or has no such GPU).
    #[error("{0}")]
    Llama(String),
    /// The GPU could not be identified or no GPU engine started.
    #[error("{0}")]
    Gpu(String),
}

/// A node's wasi-nn engines, one per encoding.
pub type Engines = Vec<Arc<dyn backend::NnEngine>>;

/// The engines for a node's choice. A missing or unusable ONNX Runtime is
/// an error that says what and where, or, with `fallback`, tract and the
/// reason (to be logged).
///
/// `llm` says how llama.cpp contexts are made (part of the node's
/// deterministic settings).
pub fn engines(
    choice: &OnnxEngine,
    llm: LlmSettings,
) -> Result<(Engines, Option<String>), EngineError> {
    let tract = || -> Engines { vec![Arc::new(TractEngine)] };
    let (mut e, why) = match choice {
        OnnxEngine::Tract => (tract(), None),
        OnnxEngine::OnnxRuntime { library, fallback } => match onnxruntime(library) {
            Ok(e) => (vec![e], None),
            Err(why) if *fallback => (
                tract(),
                Some(format!("{why}; running onnx models on tract instead")),
            ),
            Err(why) => return Err(why),
        },
    };
    add_llama(&mut e, llm);
    Ok((e, why))
}

#[cfg(feature = "onnxruntime")]
fn onnxruntime(library: &std::path::Path) -> Result<Arc<dyn backend::NnEngine>, EngineError> {
    backend::onnxruntime::OrtEngine::new(library)
        .map(|e| Arc::new(e) as Arc<dyn backend::NnEngine>)
        .map_err(|e| EngineError::OnnxRuntime(e.to_string()))
}

#[cfg(not(feature = "onnxruntime"))]
fn onnxruntime(library: &std::path::Path) -> Result<Arc<dyn backend::NnEngine>, EngineError> {
    Err(EngineError::OnnxRuntime(format!(
        "this build has no ONNX Runtime engine (cargo feature `onnxruntime`); cannot use {}",
        library.display()
    )))
}
