//! What a node reports about one task it ran: enough to re-execute the task
//! elsewhere and compare, and to account for what it cost.

use crate::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One model a task loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUse {
    /// Digest of the model file the node verified.
    pub sha256: Digest,
    /// The engine that ran it, with version and device (`tract-onnx 0.23.9 (cpu)`).
    pub engine: String,
}

/// The record of one task run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The task's id (also the seed of its randomness in deterministic mode).
    pub task_id: String,
    /// Digest of the component's bytes.
    pub component: Digest,
    /// Digest of the input bytes.
    pub input: Digest,
    /// Digest of the output bytes (or of the job's error, encoded as JSON).
    pub output: Digest,
    /// Whether the job returned an output (`true`) or a job error (`false`).
    pub ok: bool,
    /// Output length in bytes.
    pub output_len: u64,
    /// Wall time of the call, microseconds (informational: not deterministic).
    pub wall_time_us: u64,
    /// Fuel consumed, when the host meters fuel (deterministic).
    pub fuel: Option<u64>,
    /// Whether clocks and randomness were virtual.
    pub deterministic: bool,
    /// Models the task loaded, by name (sorted).
    pub models: BTreeMap<String, ModelUse>,
    /// The runtime that ran it (`tidepool 0.1.0, wasmtime 48.0.8`).
    pub runtime: String,
}
