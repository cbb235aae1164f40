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
