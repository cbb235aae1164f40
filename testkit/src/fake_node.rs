//! What a node sends back for a grant, without running anything: the
//! output a test chooses, with a plain receipt (`Receipt::plain`) for the
//! grant's lease and bundle, signed with the node's key as a real node
//! signs it. Honest or lying is the caller's choice of output.

use tidepool_proto::receipt::{LeaseReceipt, ModelUse, Receipt};
use tidepool_proto::wire::{Bytes, Outcome, TaskGrant, TaskResult};
use tidepool_proto::{Digest, SecretKey};

/// The stand-in job's honest output: the input reversed.
pub fn reversed(input: &[u8]) -> Vec<u8> {
    input.iter().rev().copied().collect()
}

/// The result `key`'s node returns for `grant`: `output`, with a receipt
/// naming `component` and the `runtime`, signed by `key`.
pub fn answer(
    key: &SecretKey,
    grant: &TaskGrant,
    component: Digest,
    output: Vec<u8>,
    runtime: &str,
) -> TaskResult {
    answer_on(key, grant, component, output, runtime, None)
}

/// [`answer`], with a receipt that says the stand-in bundle's model `m`
/// ran on `engine` (when given).
pub fn answer_on(
    key: &SecretKey,
    grant: &TaskGrant,
    component: Digest,
    output: Vec<u8>,
    runtime: &str,
    engine: Option<&str>,
) -> TaskResult {
    let mut receipt = Receipt::plain(
        grant.identity.clone(),
        component,
        &grant.input.0,
        &output,
        runtime,
    );
    if let Some(engine) = engine {
        receipt.models.insert(
            "m".into(),
            ModelUse {
                sha256: Digest::of(b"model"),
                engine: engine.into(),
            },
        );
    }
    signed(key, grant, receipt, output, Default::default())
}

/// The result for `grant`: `output` and `transcript`, with `receipt` for
/// the grant's lease and bundle signed by `key`.
fn signed(
    key: &SecretKey,
    grant: &TaskGrant,
    receipt: Receipt,
    output: Vec<u8>,
    transcript: tidepool_proto::llm::Transcript,
) -> TaskResult {
    TaskResult {
        transcript,
        lease: grant.lease,
        outcome: Outcome::Output(Bytes(output)),
        receipt: Some(
            LeaseReceipt {
                lease: grant.lease,
                bundle: grant.bundle,
                receipt,
            }
            .sign(key),
        ),
    }
}

/// [`answer`] for a task that generated text: the receipt commits to
/// `transcript` (its digest, its tokens metered out) and the result
/// carries it.
pub fn answer_generated(
    key: &SecretKey,
    grant: &TaskGrant,
    component: Digest,
    output: Vec<u8>,
    transcript: tidepool_proto::llm::Transcript,
) -> TaskResult {
    let mut receipt = Receipt::plain(
        grant.identity.clone(),
        component,
        &grant.input.0,
        &output,
        "sim",
    );
    receipt.transcript = Some(tidepool_proto::llm::transcript_digest(&transcript));
    receipt.metering.tokens_out = transcript.iter().map(|g| g.tokens.len() as u64).sum();
    signed(key, grant, receipt, output, transcript)
}
