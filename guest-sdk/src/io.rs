//! Decoding inputs and encoding outputs, with errors that say what was wrong.

use crate::JobError;
use serde::{de::DeserializeOwned, Serialize};

/// Parse the task's input as JSON into `T`; a parse failure is `invalid-input`
/// and names the line and column.
pub fn from_json<T: DeserializeOwned>(input: &[u8]) -> Result<T, JobError> {
    serde_json::from_slice(input)
        .map_err(|e| JobError::invalid_input(format!("input is not valid JSON for this job: {e}")))
}

/// Encode an output as compact JSON.
pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, JobError> {
    serde_json::to_vec(value)
        .map_err(|e| JobError::internal(format!("cannot encode output as JSON: {e}")))
}

/// Parse the task's input as MessagePack into `T`.
pub fn from_msgpack<T: DeserializeOwned>(input: &[u8]) -> Result<T, JobError> {
    rmp_serde::from_slice(input).map_err(|e| {
        JobError::invalid_input(format!("input is not valid MessagePack for this job: {e}"))
    })
}

/// Encode an output as MessagePack (struct fields by name).
pub fn to_msgpack<T: Serialize>(value: &T) -> Result<Vec<u8>, JobError> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| JobError::internal(format!("cannot encode output as MessagePack: {e}")))
}
