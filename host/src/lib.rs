//! The Tidepool node's side: the sandbox that runs jobs, the wasi-nn engines
//! behind it, the registry of verified models, and model files on disk.
//!
//! Data flows one way through here: component bytes and verified model files
//! go in; outputs and receipts come out. Nothing in this crate talks to the
//! pool (that is the node agent's job, built on top).

pub mod backend;
pub mod cache;
pub mod determinism;
pub mod local;
pub mod node;
pub use tidepool_models as models;
pub mod registry;
pub mod sandbox;

pub use backend::tract::TractEngine;
pub use registry::{ModelRegistry, RegistryBuilder, RegistryError};
pub use sandbox::{
    JobComponent, JobFailure, LoadError, Sandbox, SandboxConfig, TaskError, TaskOutput, TaskSpec,
};

use std::sync::Arc;

/// The engines this build has, one per encoding.
pub fn default_engines() -> Vec<Arc<dyn backend::NnEngine>> {
    vec![Arc::new(TractEngine)]
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

/// A node's wasi-nn engines, one per encoding.
pub type Engines = Vec<Arc<dyn backend::NnEngine>>;

/// The engines for a node's choice. A missing or unusable ONNX Runtime is
/// an error that says what and where, or, with `fallback`, tract and the
/// reason (to be logged).
pub fn engines(choice: &OnnxEngine) -> Result<(Engines, Option<String>), String> {
    match choice {
        OnnxEngine::Tract => Ok((default_engines(), None)),
        OnnxEngine::OnnxRuntime { library, fallback } => match onnxruntime(library) {
            Ok(e) => Ok((vec![e], None)),
            Err(why) if *fallback => Ok((
                default_engines(),
                Some(format!("{why}; running onnx models on tract instead")),
            )),
            Err(why) => Err(why),
        },
    }
}

#[cfg(feature = "onnxruntime")]
fn onnxruntime(library: &std::path::Path) -> Result<Arc<dyn backend::NnEngine>, String> {
    backend::onnxruntime::OrtEngine::new(library)
        .map(|e| Arc::new(e) as Arc<dyn backend::NnEngine>)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "onnxruntime"))]
fn onnxruntime(library: &std::path::Path) -> Result<Arc<dyn backend::NnEngine>, String> {
    Err(format!(
        "this build has no ONNX Runtime engine (cargo feature `onnxruntime`); cannot use {}",
        library.display()
    ))
}
