//! Result intake: results are opened off the coordinator thread
//! ([`open_results`]: hashes, receipt signatures, serialisation), then
//! checked against the lease they claim and stored at most once.

use super::lease_table::Lease;
use super::{refusal, Coordinator};
use crate::store::{Acceptance, Store};
use std::time::Instant;
use tidepool_proto::receipt::{LeaseReceipt, Receipt};
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::TaskState;
use tidepool_proto::wire::{ErrorCode, LeaseId, Outcome, TaskResult, Verdict};
use tidepool_proto::{Digest, PublicKey};

/// Most bytes of a node's failure reason kept (in the task's record).
const MAX_REASON_BYTES: usize = 1024;

/// A node's failure reason as stored: at most [`MAX_REASON_BYTES`], cut at
/// a character boundary.
fn bounded(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// An accepted result's outcome, signed receipt and transcript, serialised
/// for the store, the engines its receipt names, and its output's length.
type StoredResult = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<String>, u64);

/// What checking a result against its lease found.
#[derive(Debug)]
enum Checked {
    /// The node reports the task failed (the reason).
    Failed(String),
    /// A valid result, ready to store.
    Accept(StoredResult),
}

/// A result prepared for the coordinator: its output hashed, its receipt's
/// signature checked and decoded, and the bytes to store serialised. Built by
/// [`open_results`] on any thread.
#[derive(Debug)]
pub struct Opened {
    /// The node that sent it (whose key the receipt must be signed with).
    key: PublicKey,
    /// Task and attempt.
    lease: LeaseId,
    /// What was found.
    kind: OpenedKind,
}

#[derive(Debug)]
enum OpenedKind {
    /// The node reports the task failed.
    Failed(String),
    /// A result with its receipt checked.
    Checked {
        /// The decoded receipt, or why it was refused.
        receipt: Result<Box<LeaseReceipt>, String>,
        /// Digest of the output (or of the job error's JSON).
        output_digest: Digest,
        /// Bytes of the output (or of the job error's JSON).
        output_len: u64,
        /// Tokens the transcript's generations produced.
        transcript_tokens: u64,
        /// MessagePack of the outcome.
        outcome: Vec<u8>,
        /// MessagePack of the signed receipt.
        receipt_bytes: Vec<u8>,
        /// Digest of the transcript sent (None when empty).
        transcript_digest: Option<Digest>,
        /// MessagePack of the transcript (empty when none).
        transcript: Vec<u8>,
    },
}

/// Hash outputs, check receipt signatures and serialise, for results sent
/// by `key`. Pure and parallel: no coordinator state.
pub fn open_results(key: &PublicKey, results: Vec<TaskResult>) -> Vec<Opened> {
    let mut verified = tidepool_proto::receipt::VerifiedRoots::default();
    results
        .into_iter()
        .map(|r| {
            let kind = match &r.outcome {
                Outcome::Failed { reason } => OpenedKind::Failed(reason.clone()),
                outcome => {
                    let (output_digest, output_len) = match outcome {
                        Outcome::Output(b) => (Digest::of(&b.0), b.0.len() as u64),
                        Outcome::JobError { code, message } => {
                            let json = tidepool_proto::receipt::job_error_json(code, message);
                            (Digest::of(&json), json.len() as u64)
                        }
                        Outcome::Failed { .. } => unreachable!("handled above"),
                    };
                    let receipt = match &r.receipt {
                        None => Err("result without a receipt".to_owned()),
                        Some(signed) => signed
                            .open_cached(key, &mut verified)
                            .map(Box::new)
                            .map_err(|e| e.to_string()),
                    };
                    // Serialising plain data to a Vec cannot fail.
                    OpenedKind::Checked {
                        receipt,
                        output_digest,
                        output_len,
                        transcript_tokens: r.transcript.iter().map(|g| g.tokens.len() as u64).sum(),
                        outcome: rmp_serde::to_vec_named(&r.outcome).expect("outcome serialises"),
                        receipt_bytes: rmp_serde::to_vec_named(&r.receipt)
                            .expect("receipt serialises"),
                        transcript_digest: (!r.transcript.is_empty())
                            .then(|| tidepool_proto::llm::transcript_digest(&r.transcript)),
                        transcript: if r.transcript.is_empty() {
                            Vec::new()
                        } else {
                            rmp_serde::to_vec(&r.transcript).expect("transcript serialises")
                        },
                    }
                }
            };
            Opened {
                key: *key,
                lease: r.lease,
                kind,
            }
        })
        .collect()
}

impl<S: Store> Coordinator<S> {
    /// Results from a node. Each gets a verdict; accepted ones are on disk
    /// when this returns.
    pub fn handle_results(
        &mut self,
        now: Instant,
        key: &PublicKey,
        results: Vec<TaskResult>,
    ) -> Result<Vec<(LeaseId, Verdict)>, Refusal> {
        self.handle_opened_results(now, key, open_results(key, results))
    }

    /// [`handle_results`](Self::handle_results) for results already opened
    /// with [`open_results`] (the pool's connection tasks do that in parallel,
    /// so signature checks and hashing stay off the coordinator thread).
    pub fn handle_opened_results(
        &mut self,
        now: Instant,
        key: &PublicKey,
        results: Vec<Opened>,
    ) -> Result<Vec<(LeaseId, Verdict)>, Refusal> {
        let mut verdicts: Vec<(LeaseId, Option<Verdict>)> = Vec::with_capacity(results.len());
        let mut batch = Vec::new();
        let mut batch_idx = Vec::new();
        // Each accepted output's length (for telemetry), beside `batch`.
        let mut output_lens = Vec::new();
        for r in results {
            if r.key != *key {
                return Err(refusal(
                    ErrorCode::Protocol,
                    "results opened for another node",
                ));
            }
            // Verdicts name the lease as the node did; the coordinator
            // works in rows.
            let wire = r.lease;
            let id = self.lease_row(wire);
            let Some(lease) = self.leases.current(id, key) else {
                let v = if self.store.done_by(id.task, id.attempt, key)? {
                    Verdict::Duplicate
                } else {
                    Verdict::Stale
                };
                self.telemetry.counters.results_stale += 1;
                verdicts.push((wire, Some(v)));
                continue;
            };
            match self.check_result(&lease, r) {
                Ok(Checked::Accept((outcome, receipt, transcript, engines, output_len))) => {
                    batch_idx.push(verdicts.len());
                    output_lens.push(output_len);
                    verdicts.push((wire, None));
                    batch.push(Acceptance {
                        task: id.task,
                        attempt: id.attempt,
                        node: *key,
                        outcome,
                        receipt,
                        transcript,
                        engines,
                    });
                }
                Ok(Checked::Failed(reason)) => {
                    // A reported failure: the attempt failed, the task goes
                    // to another node, and it counts toward the node's
                    // circuit breaker.
                    self.release(
                        now,
                        id.task,
                        &format!("node {}: {}", key.short(), bounded(&reason)),
                        Some(*key),
                    )?;
                    self.node_finished(now, key, true);
                    self.telemetry.counters.results_failed += 1;
                    verdicts.push((wire, Some(Verdict::Accepted)));
                }
                Err(why) => {
                    self.release(
                        now,
                        id.task,
                        &format!("node {}: refused result: {why}", key.short()),
                        Some(*key),
                    )?;
                    self.node_finished(now, key, true);
                    self.telemetry.counters.results_refused += 1;
                    verdicts.push((wire, Some(Verdict::Refused(why))));
                }
            }
        }
        if !batch.is_empty() {
            let stored = self.store.accept(&batch, self.unix(now))?;
            for (((i, a), ok), output_len) in batch_idx
                .into_iter()
                .zip(&batch)
                .zip(stored)
                .zip(output_lens)
            {
                verdicts[i].1 = Some(if ok {
                    Verdict::Accepted
                } else {
                    self.telemetry.counters.results_stale += 1;
                    Verdict::Stale
                });
                if ok {
                    if let Some(lease) = self.leases.remove(a.task) {
                        self.telemetry.accepted(now, lease.granted, output_len);
                        self.nodes.drop_lease(key, a.task);
                        self.node_finished(now, key, false);
                        self.count(lease.job, TaskState::Leased, TaskState::Done);
                        if let Some((_, c)) = self.jobs.get_mut(&lease.job) {
                            c.bytes += a.outcome.len() as u64;
                        }
                        if let Err(e) = self.after_accept(now, a, &lease) {
                            // The result stands; only its check is lost.
                            tracing::warn!(task = %a.task, "verification step failed: {e}");
                        }
                    }
                }
            }
        }
        Ok(verdicts
            .into_iter()
            .map(|(id, v)| (id, v.unwrap_or(Verdict::Stale)))
            .collect())
    }

    /// Check an opened result against its lease: a reported failure, a
    /// result to store, or why it is refused (sent back to the node).
    fn check_result(&self, lease: &Lease, r: Opened) -> Result<Checked, String> {
        let (rc, output_digest, outcome, receipt, transcript_digest, transcript, measured) =
            match r.kind {
                OpenedKind::Failed(reason) => return Ok(Checked::Failed(reason)),
                OpenedKind::Checked {
                    receipt,
                    output_digest,
                    output_len,
                    transcript_tokens,
                    outcome,
                    receipt_bytes,
                    transcript_digest,
                    transcript,
                } => (
                    receipt?,
                    output_digest,
                    outcome,
                    receipt_bytes,
                    transcript_digest,
                    transcript,
                    Measured {
                        input_len: lease.input_len,
                        output_len,
                        transcript_tokens,
                    },
                ),
            };
        if rc.lease != r.lease {
            return Err(format!(
                "receipt is for {}, result for {}",
                rc.lease, r.lease
            ));
        }
        if rc.bundle != lease.bundle {
            return Err(format!(
                "receipt names bundle {}, the task runs {}",
                rc.bundle, lease.bundle
            ));
        }
        let identity = self.names.identity(lease.origin);
        if rc.receipt.task_id != identity {
            return Err(format!(
                "receipt names task identity {:?}, the task's is {identity}",
                bounded(&rc.receipt.task_id)
            ));
        }
        if rc.receipt.input != lease.input {
            return Err(format!(
                "receipt's input digest {} is not the task's",
                rc.receipt.input
            ));
        }
        if rc.receipt.output != output_digest {
            return Err(format!(
                "receipt's output digest {} does not match the output ({output_digest})",
                rc.receipt.output
            ));
        }
        if rc.receipt.transcript != transcript_digest {
            return Err(format!(
                "receipt's transcript digest {:?} does not match the transcript sent ({:?})",
                rc.receipt.transcript.map(|d| d.to_string()),
                transcript_digest.map(|d| d.to_string())
            ));
        }
        if let Some(b) = self.bundles.get(&lease.bundle) {
            if rc.receipt.component != b.manifest.component.sha256 {
                return Err(format!(
                    "receipt's component {} is not the bundle's",
                    rc.receipt.component
                ));
            }
            receipt_fits_manifest(&rc.receipt, &b.manifest)?;
            metering_fits(&rc.receipt, &measured, b.manifest.limits.timeout_ms)?;
        }
        let mut engines: Vec<String> = rc
            .receipt
            .models
            .values()
            .map(|m| m.engine.clone())
            .collect();
        engines.sort();
        engines.dedup();
        Ok(Checked::Accept((
            outcome,
            receipt,
            transcript,
            engines,
            measured.output_len,
        )))
    }
}

/// What the pool measured itself about a result, to hold its receipt's
/// metering against.
struct Measured {
    /// Bytes of the task's input.
    input_len: u64,
    /// Bytes of the output (or of the job error's JSON).
    output_len: u64,
    /// Tokens in the transcript's generations.
    transcript_tokens: u64,
}

/// Does a receipt's metering agree with what the pool can count itself?
/// Bytes in and out are the input's and the output's, tokens out are the
/// transcript's, and neither the call nor its engine time exceeds the
/// bundle's timeout (the host ends a task at its timeout). What the pool
/// cannot count (compute time within that bound, prompt tokens, tensor
/// bytes) is the node's signed word, and a re-execution of the task
/// measures it again.
fn metering_fits(r: &Receipt, seen: &Measured, timeout_ms: u64) -> Result<(), String> {
    let m = &r.metering;
    let counted = [
        ("bytes in", m.bytes_in, seen.input_len),
        ("bytes out", m.bytes_out, seen.output_len),
        ("output length", r.output_len, seen.output_len),
        ("tokens out", m.tokens_out, seen.transcript_tokens),
    ];
    for (what, claimed, real) in counted {
        if claimed != real {
            return Err(format!(
                "receipt meters {claimed} {what}, the result has {real}"
            ));
        }
    }
    let limit_us = timeout_ms.saturating_mul(1000);
    if r.wall_time_us > limit_us || m.compute_us > r.wall_time_us {
        return Err(format!(
            "receipt meters {} µs of compute in a {} µs call; the bundle's timeout is {limit_us} µs",
            m.compute_us, r.wall_time_us
        ));
    }
    Ok(())
}

/// Longest engine identity a receipt may name, bytes.
pub const MAX_ENGINE_BYTES: usize = 256;

/// Does a receipt agree with the bundle it ran? Every model it names is
/// one of the manifest's, with the manifest's digest, run by an engine
/// whose name is bounded; and a bundle of a reproducible tier (`exact`,
/// `tolerance`, `llm`: all of them) ran with virtual clocks and seeded
/// randomness. A receipt that contradicts the manifest is a refused result.
fn receipt_fits_manifest(
    r: &Receipt,
    m: &tidepool_proto::manifest::LockedManifest,
) -> Result<(), String> {
    if !r.deterministic {
        return Err(
            "receipt says the task ran without virtual clocks and seeded randomness; \
             every tier needs them"
                .into(),
        );
    }
    for (name, used) in &r.models {
        let Some(model) = m.models.get(name) else {
            return Err(format!(
                "receipt names model {:?}, which the bundle does not declare",
                bounded(name)
            ));
        };
        if used.sha256 != model.blob.sha256 {
            return Err(format!(
                "receipt says model {name} was {}, the bundle's is {}",
                used.sha256, model.blob.sha256
            ));
        }
        if used.engine.is_empty() || used.engine.len() > MAX_ENGINE_BYTES {
            return Err(format!(
                "receipt's engine for model {name} is {} bytes (1..={MAX_ENGINE_BYTES})",
                used.engine.len()
            ));
        }
        if !tidepool_proto::manifest::engine_fits(model.engine.as_deref(), &used.engine) {
            return Err(format!(
                "receipt says model {name} ran on {:?}; the bundle pins it to {:?}",
                bounded(&used.engine),
                model.engine.as_deref().unwrap_or_default()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::receipt::ModelUse;
    use tidepool_proto::{KeyRole, SecretKey};

    /// The stand-in bundle's locked manifest (one model `m`).
    fn manifest() -> tidepool_proto::manifest::LockedManifest {
        let publisher = SecretKey::from_seed(KeyRole::Publisher, &[1; 32]);
        let signed = tidepool_testkit::bundle::signed(&publisher, "rev", "", 1);
        rmp_serde::from_slice(&signed.manifest).expect("locked manifest")
    }

    #[test]
    fn metering_the_pool_can_count_must_be_true() {
        let r = Receipt::plain("id".into(), Digest::of(b"c"), b"in", b"out", "t");
        let seen = Measured {
            input_len: 2,
            output_len: 3,
            transcript_tokens: 0,
        };
        assert_eq!(metering_fits(&r, &seen, 1000), Ok(()));
        let mut more_in = r.clone();
        more_in.metering.bytes_in = 1 << 40;
        let mut more_out = r.clone();
        more_out.metering.bytes_out = 4;
        let mut tokens = r.clone();
        tokens.metering.tokens_out = 7;
        let mut slow = r.clone();
        slow.wall_time_us = 1_000_001;
        let mut busy = r.clone();
        busy.wall_time_us = 10;
        busy.metering.compute_us = 11;
        let cases = [
            (more_in, "1099511627776 bytes in, the result has 2"),
            (more_out, "4 bytes out, the result has 3"),
            (tokens, "7 tokens out, the result has 0"),
            (slow, "timeout is 1000000"),
            (busy, "11 µs of compute in a 10 µs call"),
        ];
        for (r, why) in cases {
            let e = metering_fits(&r, &seen, 1000).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_receipt_that_contradicts_the_manifest_is_refused() {
        let m = manifest();
        let base = Receipt::plain("id".into(), m.component.sha256, b"i", b"o", "t");
        let with = |name: &str, sha: Digest, engine: &str| {
            let mut r = base.clone();
            r.models.insert(
                name.into(),
                ModelUse {
                    sha256: sha,
                    engine: engine.into(),
                },
            );
            r
        };
        let model = m.models["m"].blob.sha256;
        assert_eq!(receipt_fits_manifest(&base, &m), Ok(()));
        assert_eq!(
            receipt_fits_manifest(&with("m", model, "tract"), &m),
            Ok(())
        );
        let cases = [
            (with("other", model, "tract"), "does not declare"),
            (with("m", Digest::of(b"x"), "tract"), "the bundle's is"),
            (with("m", model, &"e".repeat(MAX_ENGINE_BYTES + 1)), "bytes"),
            (with("m", model, ""), "bytes"),
            (
                Receipt {
                    deterministic: false,
                    ..base.clone()
                },
                "virtual clocks",
            ),
        ];
        for (r, why) in cases {
            let e = receipt_fits_manifest(&r, &m).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }
}
