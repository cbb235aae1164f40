//! A result with everything needed to run it again: the signed bundle
//! manifest, the input, the outcome, the node's signed receipt and, for
//! text generation, the transcript. The pool hands one out
//! (`Request::Replayable`), `tidepool job results --export` writes it as a
//! file, and `tidepool replay` re-runs it in the node sandbox.
//!
//! [`Replayable::check`] holds the parts to each other (the manifest's
//! signature, the receipt's, and the receipt against bundle, input,
//! outcome and transcript) so a replay says which part of a file does not
//! fit before it runs anything. This module never does I/O.

use crate::llm::Transcript;
use crate::manifest::{LockedManifest, SignedManifest, SCHEMA};
use crate::receipt::LeaseReceipt;
use crate::wire::{Bytes, JobId, Outcome};
use crate::{Digest, PublicKey, SignedReceipt};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The file format's name and version, first field of a replay file.
pub const REPLAY_FORMAT: &str = "tidepool-replay/1";

/// One accepted result, replayable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replayable {
    /// Its job.
    pub job: JobId,
    /// Its input's index in the job.
    pub index: u32,
    /// The node whose result it is.
    pub node: PublicKey,
    /// The bundle it ran, as its publisher signed it.
    pub manifest: SignedManifest,
    /// The input.
    pub input: Bytes,
    /// What the node returned (an output or a job error).
    pub outcome: Outcome,
    /// The node's signed receipt.
    pub receipt: SignedReceipt,
    /// The task's text generations (empty when it generated none).
    #[serde(default)]
    pub transcript: Transcript,
}

/// Why a replayable result does not hold together. Each says which part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Not a replay file.
    #[error("not a tidepool replay file: {0}")]
    Malformed(String),
    /// The parts do not fit each other.
    #[error("{0}")]
    Mismatch(String),
}

impl Replayable {
    /// Check the manifest's signature (by its own publisher; whether that
    /// publisher is trusted is the reader's call, and an expired bundle
    /// still replays), the receipt's signature by the node, and that the
    /// receipt names this bundle, input and transcript. Returns the
    /// manifest and the receipt.
    pub fn check(&self) -> Result<(LockedManifest, LeaseReceipt), ReplayError> {
        let bad = |s: String| Err(ReplayError::Mismatch(s));
        let m = &self.manifest;
        if m.signer
            .verify(crate::keys::MANIFEST_TAG, &m.manifest, &m.signature)
            .is_err()
        {
            return bad(format!(
                "the bundle's signature by {} does not verify",
                m.signer
            ));
        }
        let locked: LockedManifest = rmp_serde::from_slice(&m.manifest)
            .map_err(|e| ReplayError::Malformed(format!("bundle manifest: {e}")))?;
        if locked.schema != SCHEMA || locked.publisher != m.signer {
            return bad("the bundle manifest is of another schema or publisher".into());
        }
        let lr = self
            .receipt
            .open(&self.node)
            .map_err(|e| ReplayError::Mismatch(format!("receipt: {e}")))?;
        let r = &lr.receipt;
        if lr.bundle != m.digest() {
            return bad(format!(
                "the receipt ran bundle {}, the file's is {}",
                lr.bundle,
                m.digest()
            ));
        }
        if r.input != Digest::of(&self.input.0) {
            return bad("the input is not the one the receipt names".into());
        }
        // The output is not held to the receipt here: a replay runs anyway
        // and says whether the recorded output is the one the node signed
        // ([`signed_output`](Self::signed_output)).
        outcome_digest(&self.outcome)?;
        let transcript =
            (!self.transcript.is_empty()).then(|| crate::llm::transcript_digest(&self.transcript));
        if r.transcript != transcript {
            return bad("the transcript is not the one the receipt names".into());
        }
        Ok((locked, lr))
    }
}

impl Replayable {
    /// Whether the recorded outcome is the one the node signed in `lr`.
    pub fn signed_output(&self, lr: &LeaseReceipt) -> bool {
        outcome_digest(&self.outcome).is_ok_and(|d| d == lr.receipt.output)
    }
}

/// The digest a receipt gives an outcome: of the output, or of the job
/// error as JSON.
pub fn outcome_digest(o: &Outcome) -> Result<Digest, ReplayError> {
    match o {
        Outcome::Output(b) => Ok(Digest::of(&b.0)),
        Outcome::JobError { code, message } => Ok(crate::receipt::job_error_digest(code, message)),
        Outcome::Failed { .. } => Err(ReplayError::Malformed(
            "a failed task has no result to replay".into(),
        )),
    }
}

/// A job error as a file shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobErrorText {
    /// The error's code.
    pub code: String,
    /// Its message.
    pub message: String,
}

/// A [`Replayable`] as written to a file: binary parts as base64, the
/// rest readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayFile {
    /// [`REPLAY_FORMAT`].
    pub format: String,
    /// Its job.
    pub job: u64,
    /// Its input index.
    pub index: u32,
    /// The node whose result it is.
    pub node: PublicKey,
    /// The bundle's digest (for people; the manifest is what counts).
    pub bundle: String,
    /// Base64 of the input.
    pub input: String,
    /// Base64 of the output, if the job returned one.
    pub output: Option<String>,
    /// The job's error, if it returned one.
    pub job_error: Option<JobErrorText>,
    /// Base64 of the signed receipt (MessagePack).
    pub receipt: String,
    /// Base64 of the signed manifest (MessagePack).
    pub manifest: String,
    /// Base64 of the transcript (MessagePack; empty when none).
    pub transcript: String,
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>, ReplayError> {
    STANDARD
        .decode(s)
        .map_err(|e| ReplayError::Malformed(format!("{what} is not base64: {e}")))
}

fn unpack<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, ReplayError> {
    rmp_serde::from_slice(&b64(what, s)?)
        .map_err(|e| ReplayError::Malformed(format!("{what}: {e}")))
}

impl ReplayFile {
    /// The file form of `r`.
    pub fn new(r: &Replayable) -> Self {
        let (output, job_error) = match &r.outcome {
            Outcome::Output(b) => (Some(STANDARD.encode(&b.0)), None),
            Outcome::JobError { code, message } => (
                None,
                Some(JobErrorText {
                    code: code.clone(),
                    message: message.clone(),
                }),
            ),
            Outcome::Failed { reason } => (
                None,
                Some(JobErrorText {
                    code: "failed".into(),
                    message: reason.clone(),
                }),
            ),
        };
        Self {
            format: REPLAY_FORMAT.into(),
            job: r.job.0,
            index: r.index,
            node: r.node,
            bundle: r.manifest.digest().to_string(),
            input: STANDARD.encode(&r.input.0),
            output,
            job_error,
            receipt: pack(&r.receipt),
            manifest: pack(&r.manifest),
            transcript: if r.transcript.is_empty() {
                String::new()
            } else {
                pack(&r.transcript)
            },
        }
    }

    /// Back to a [`Replayable`] (not yet checked: see [`Replayable::check`]).
    pub fn replayable(&self) -> Result<Replayable, ReplayError> {
        if self.format != REPLAY_FORMAT {
            return Err(ReplayError::Malformed(format!(
                "format {:?}, expected {REPLAY_FORMAT:?}",
                self.format
            )));
        }
        let outcome = match (&self.output, &self.job_error) {
            (Some(o), None) => Outcome::Output(Bytes(b64("output", o)?)),
            (None, Some(e)) => Outcome::JobError {
                code: e.code.clone(),
                message: e.message.clone(),
            },
            _ => {
                return Err(ReplayError::Malformed(
                    "exactly one of output and job_error must be set".into(),
                ))
            }
        };
        Ok(Replayable {
            job: JobId(self.job),
            index: self.index,
            node: self.node,
            manifest: unpack("manifest", &self.manifest)?,
            input: Bytes(b64("input", &self.input)?),
            outcome,
            receipt: unpack("receipt", &self.receipt)?,
            transcript: if self.transcript.is_empty() {
                Vec::new()
            } else {
                unpack("transcript", &self.transcript)?
            },
        })
    }
}

/// Base64 of the MessagePack of a part a file holds.
fn pack<T: Serialize>(v: &T) -> String {
    // Plain data (keys, digests, byte strings) serialises without fail.
    STANDARD.encode(rmp_serde::to_vec_named(v).expect("serialises"))
}
