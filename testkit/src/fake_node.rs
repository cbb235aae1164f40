//! What a node sends back for a grant, without running anything: the
//! output a test chooses, with a plain receipt (`Receipt::plain`) for the
//! grant's lease and bundle, signed with the node's key as a real node
//! signs it. Honest or lying is the caller's choice of output.

use tidepool_proto::receipt::{LeaseReceipt, Receipt};
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
    let receipt = Receipt::plain(
        grant.lease.task.to_string(),
        component,
        &grant.input.0,
        &output,
        runtime,
    );
    TaskResult {
        transcript: Default::default(),
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
