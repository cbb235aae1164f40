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

/// What one task used, measured by the host that ran it (never by the
/// guest). The pool checks what it can recompute (bytes against the input
/// and output, tokens out against the transcript) and the ledger totals
/// them per node. Zero for tasks run without a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metering {
    /// Bytes of the task's input.
    pub bytes_in: u64,
    /// Bytes of what the task returned (its output, or its error as JSON).
    pub bytes_out: u64,
    /// wasi-nn `compute` calls that reached an engine.
    pub computes: u32,
    /// Time engines spent in those calls, microseconds (measured around
    /// each compute on the host; informational, not deterministic).
    pub compute_us: u64,
    /// Tensor bytes the task passed to engines.
    pub tensor_bytes_in: u64,
    /// Tensor bytes engines returned to the task.
    pub tensor_bytes_out: u64,
    /// Prompt tokens of the task's text generations.
    pub tokens_in: u64,
    /// Tokens the task's text generations produced (the transcript's
    /// tokens, so a pool can recount them).
    pub tokens_out: u64,
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
    /// Digest of the task's text-generation transcript
    /// ([`crate::llm::transcript_digest`]), when it generated text.
    #[serde(default)]
    pub transcript: Option<Digest>,
    /// What the task used.
    #[serde(default)]
    pub metering: Metering,
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
            transcript: None,
            metering: Metering {
                bytes_in: input.len() as u64,
                bytes_out: output.len() as u64,
                ..Metering::default()
            },
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
///
/// Nodes sign receipts in batches: the signature covers the root of a
/// Merkle tree over the batch's receipt bodies, and each receipt carries
/// its path to that root, so every receipt can still be checked on its own
/// (for re-execution or a challenge) while a batch of N costs one
/// signature, not N. Leaves are `sha256(0x00 ‖ body)`, inner nodes
/// `sha256(0x01 ‖ left ‖ right)`; an odd last node moves up unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// MessagePack of the [`LeaseReceipt`].
    #[serde(with = "crate::manifest::bytes_field")]
    pub body: Vec<u8>,
    /// The node's key.
    pub node: PublicKey,
    /// Signature over [`RECEIPT_TAG`], the batch's root and its size.
    pub signature: Signature,
    /// Where this receipt sits in its batch.
    pub proof: BatchProof,
}

/// A receipt's place in a signed batch: its index, the batch size, and the
/// sibling hashes from its leaf up to the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchProof {
    /// Index of the receipt in the batch.
    pub index: u32,
    /// Receipts in the batch.
    pub count: u32,
    /// Sibling hashes, leaf level first (levels where the node had no
    /// sibling are skipped).
    pub path: Vec<Digest>,
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
    /// The batch proof does not fit its index and count.
    #[error("receipt batch proof is malformed")]
    BadProof,
    /// Not a receipt.
    #[error("malformed receipt: {0}")]
    Malformed(String),
}

fn leaf_hash(body: &[u8]) -> Digest {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update([0u8]);
    h.update(body);
    Digest(h.finalize().into())
}

fn node_hash(l: &Digest, r: &Digest) -> Digest {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update([1u8]);
    h.update(l.0);
    h.update(r.0);
    Digest(h.finalize().into())
}

fn signed_message(root: &Digest, count: u32) -> [u8; 36] {
    let mut m = [0u8; 36];
    m[..32].copy_from_slice(&root.0);
    m[32..].copy_from_slice(&count.to_be_bytes());
    m
}

/// Sign a batch of receipt bodies with one signature; returns one signed
/// receipt per body, in order.
pub fn sign_batch(key: &SecretKey, bodies: Vec<Vec<u8>>) -> Vec<SignedReceipt> {
    let count = u32::try_from(bodies.len()).expect("fewer than 2^32 receipts in a batch");
    if bodies.is_empty() {
        return Vec::new();
    }
    let mut levels: Vec<Vec<Digest>> = vec![bodies.iter().map(|b| leaf_hash(b)).collect()];
    while levels.last().map_or(0, Vec::len) > 1 {
        let prev = levels.last().expect("non-empty");
        let next = prev
            .chunks(2)
            .map(|pair| {
                if pair.len() == 2 {
                    node_hash(&pair[0], &pair[1])
                } else {
                    pair[0]
                }
            })
            .collect();
        levels.push(next);
    }
    let root = levels.last().expect("non-empty")[0];
    let signature = key.sign(RECEIPT_TAG, &signed_message(&root, count));
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let mut path = Vec::new();
            let mut idx = i;
            for level in &levels[..levels.len() - 1] {
                let sibling = idx ^ 1;
                if sibling < level.len() {
                    path.push(level[sibling]);
                }
                idx /= 2;
            }
            SignedReceipt {
                body,
                node: key.public(),
                signature,
                proof: BatchProof {
                    index: i as u32,
                    count,
                    path,
                },
            }
        })
        .collect()
}

impl LeaseReceipt {
    /// Serialise (the body that is signed).
    pub fn to_body(&self) -> Vec<u8> {
        // Plain data to a Vec: cannot fail.
        rmp_serde::to_vec_named(self).expect("receipt serialises")
    }

    /// Serialise and sign on its own (a batch of one).
    pub fn sign(&self, key: &SecretKey) -> SignedReceipt {
        sign_batch(key, vec![self.to_body()])
            .pop()
            .expect("one receipt")
    }
}

impl SignedReceipt {
    /// The root of the batch this receipt claims to belong to.
    pub fn root(&self) -> Result<Digest, ReceiptError> {
        let BatchProof { index, count, path } = &self.proof;
        if *count == 0 || index >= count {
            return Err(ReceiptError::BadProof);
        }
        let mut h = leaf_hash(&self.body);
        let (mut idx, mut width) = (*index as usize, *count as usize);
        let mut siblings = path.iter();
        while width > 1 {
            let sibling = idx ^ 1;
            if sibling < width {
                let s = siblings.next().ok_or(ReceiptError::BadProof)?;
                h = if idx % 2 == 0 {
                    node_hash(&h, s)
                } else {
                    node_hash(s, &h)
                };
            }
            idx /= 2;
            width = width.div_ceil(2);
        }
        if siblings.next().is_some() {
            return Err(ReceiptError::BadProof);
        }
        Ok(h)
    }

    /// Check the signature (by `peer`) and decode.
    pub fn open(&self, peer: &PublicKey) -> Result<LeaseReceipt, ReceiptError> {
        self.open_cached(peer, &mut VerifiedRoots::default())
    }

    /// [`open`](Self::open), verifying each batch signature once: receipts of
    /// one batch share a root, and `cache` remembers roots already verified.
    pub fn open_cached(
        &self,
        peer: &PublicKey,
        cache: &mut VerifiedRoots,
    ) -> Result<LeaseReceipt, ReceiptError> {
        if self.node != *peer {
            return Err(ReceiptError::WrongSigner {
                signer: self.node,
                peer: *peer,
            });
        }
        let root = self.root()?;
        let key = (root, self.proof.count, self.signature.0);
        if !cache.0.contains(&key) {
            self.node
                .verify(
                    RECEIPT_TAG,
                    &signed_message(&root, self.proof.count),
                    &self.signature,
                )
                .map_err(|_| ReceiptError::BadSignature)?;
            cache.0.insert(key);
        }
        rmp_serde::from_slice(&self.body).map_err(|e| ReceiptError::Malformed(e.to_string()))
    }
}

/// Batch roots whose signatures were verified (for one peer, one request).
#[derive(Debug, Default)]
pub struct VerifiedRoots(std::collections::HashSet<(Digest, u32, [u8; 64])>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyRole;

    #[test]
    fn every_receipt_of_a_batch_verifies_alone_and_tampering_fails() {
        let key = SecretKey::from_seed(KeyRole::Node, &[9; 32]);
        for n in [1usize, 2, 3, 5, 8, 13] {
            let bodies: Vec<Vec<u8>> = (0..n)
                .map(|i| format!("receipt {i}").into_bytes())
                .collect();
            let signed = sign_batch(&key, bodies.clone());
            let roots: std::collections::BTreeSet<_> =
                signed.iter().map(|s| s.root().expect("root")).collect();
            assert_eq!(roots.len(), 1, "one root per batch of {n}");
            for (i, s) in signed.iter().enumerate() {
                assert_eq!(s.body, bodies[i]);
                key.public()
                    .verify(
                        RECEIPT_TAG,
                        &signed_message(&s.root().expect("root"), n as u32),
                        &s.signature,
                    )
                    .expect("signature");
                let mut t = s.clone();
                t.body.push(b'!');
                assert!(
                    t.open(&key.public()).is_err(),
                    "altered body in batch of {n}"
                );
                if n > 1 {
                    let mut t = s.clone();
                    t.proof.index = (t.proof.index + 1) % n as u32;
                    assert!(
                        t.open(&key.public()).is_err(),
                        "moved receipt in batch of {n}"
                    );
                    let mut t = s.clone();
                    t.proof.path.pop();
                    assert!(t.open(&key.public()).is_err(), "short path in batch of {n}");
                }
            }
        }
        let other = SecretKey::from_seed(KeyRole::Node, &[10; 32]);
        let s = &sign_batch(&key, vec![b"x".to_vec()])[0];
        assert!(matches!(
            s.open(&other.public()),
            Err(ReceiptError::WrongSigner { .. })
        ));
    }
}
