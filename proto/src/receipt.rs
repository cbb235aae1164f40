//! What a node reports about one task it ran: enough to re-execute the task
//! elsewhere and compare, and to account for what it cost.

use crate::keys::{PublicKey, SecretKey, Signature, RECEIPT_TAG};
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

impl Receipt {
    /// A receipt for `output` made from `input` without a sandbox (test
    /// workers, simulations): no models, no metering, deterministic.
    pub fn plain(
        task_id: String,
        component: Digest,
        input: &[u8],
        output: &[u8],
        runtime: &str,
    ) -> Self {
        Self {
            task_id,
            component,
            input: Digest::of(input),
            output: Digest::of(output),
            ok: true,
            output_len: output.len() as u64,
            wall_time_us: 0,
            fuel: None,
            deterministic: true,
            models: BTreeMap::new(),
            runtime: runtime.to_owned(),
        }
    }
}

/// A receipt for a task run for a pool: the receipt plus which lease and
/// bundle it answers. A node signs these exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReceipt {
    /// Task and attempt.
    pub lease: crate::wire::LeaseId,
    /// The bundle that ran.
    pub bundle: Digest,
    /// What the sandbox recorded.
    pub receipt: Receipt,
}

/// A [`LeaseReceipt`] serialised and signed by the node that ran the task.
/// The signature commits the node to the output digest before the pool
/// decides whether to re-execute it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// MessagePack of the [`LeaseReceipt`].
    #[serde(with = "crate::manifest::bytes_field")]
    pub body: Vec<u8>,
    /// The node's key.
    pub node: PublicKey,
    /// Signature over [`RECEIPT_TAG`] and `body`.
    pub signature: Signature,
}

/// Why a receipt is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// Signed by another key than the connection's.
    #[error("receipt signed by {signer}, but the result came from {peer}")]
    WrongSigner {
        /// Who signed.
        signer: PublicKey,
        /// Who sent it.
        peer: PublicKey,
    },
    /// Signature does not verify.
    #[error("receipt signature does not verify")]
    BadSignature,
    /// Not a receipt.
    #[error("malformed receipt: {0}")]
    Malformed(String),
}

impl LeaseReceipt {
    /// Serialise and sign.
    pub fn sign(&self, key: &SecretKey) -> SignedReceipt {
        // Plain data to a Vec: cannot fail.
        let body = rmp_serde::to_vec_named(self).expect("receipt serialises");
        let signature = key.sign(RECEIPT_TAG, &body);
        SignedReceipt {
            body,
            node: key.public(),
            signature,
        }
    }
}

impl SignedReceipt {
    /// Check the signature (by `peer`) and decode.
    pub fn open(&self, peer: &PublicKey) -> Result<LeaseReceipt, ReceiptError> {
        if self.node != *peer {
            return Err(ReceiptError::WrongSigner {
                signer: self.node,
                peer: *peer,
            });
        }
        self.node
            .verify(RECEIPT_TAG, &self.body, &self.signature)
            .map_err(|_| ReceiptError::BadSignature)?;
        rmp_serde::from_slice(&self.body).map_err(|e| ReceiptError::Malformed(e.to_string()))
    }
}

/// The bytes a receipt digests for a job error: `{"code":…,"message":…}`
/// as compact JSON, so nodes and pools agree on them.
pub fn job_error_json(code: &str, message: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct E<'a> {
        code: &'a str,
        message: &'a str,
    }
    // Two strings to JSON in memory: cannot fail.
    serde_json::to_vec(&E { code, message }).expect("job error serialises")
}

/// Digest of [`job_error_json`].
pub fn job_error_digest(code: &str, message: &str) -> Digest {
    Digest::of(&job_error_json(code, message))
}
