//! What nodes call a task: the names the pool gives tasks on the wire, kept
//! apart from the store's row ids.
//!
//! - **Lease names** ([`TaskNames::wire`]): a node never sees a row id. Row
//!   ids are sequential, so a re-execution or canary made after a batch
//!   was submitted would stand out by its number; on the wire each task id
//!   is the row id under a keyed permutation of `u64` (a four-round Feistel
//!   network over SHA-256), so ids are unordered and tell nothing of when
//!   or why a task was made. [`TaskNames::row`] is its inverse.
//! - **Identities** ([`TaskNames::identity`]): what the job sees as its task
//!   id (`task-id` in `wit/job.wit`, the seed of its virtual randomness)
//!   and what its receipt names. Every execution of one task — the
//!   original, its re-executions, a decider, a challenge — gets the
//!   original's identity, so a deterministic job that reads its task id
//!   gives the same bytes everywhere.
//!
//! Both are keyed by the pool's secret, which the store keeps across
//! restarts ([`Store::secret`](crate::store::Store::secret)). This module
//! never touches the store and holds nothing else.

use sha2::{Digest as _, Sha256};
use tidepool_proto::wire::TaskId;

/// The keyed names of tasks; lives as long as the coordinator.
#[derive(Clone)]
pub struct TaskNames {
    /// The pool's secret (never sent anywhere).
    key: [u8; 32],
}

impl std::fmt::Debug for TaskNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskNames(..)")
    }
}

/// Rounds of the Feistel network (four make a pseudorandom permutation).
const ROUNDS: u8 = 4;

impl TaskNames {
    /// Names keyed by `key`.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// The round function: 32 bits of SHA-256 of the key, the round and the half.
    fn f(&self, round: u8, half: u32) -> u32 {
        let mut h = Sha256::new();
        h.update(b"tidepool/task-name/v1");
        h.update(self.key);
        h.update([round]);
        h.update(half.to_be_bytes());
        let d = h.finalize();
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// The id a node sees for row `task`.
    pub fn wire(&self, task: TaskId) -> TaskId {
        let (mut l, mut r) = ((task.0 >> 32) as u32, task.0 as u32);
        for round in 0..ROUNDS {
            (l, r) = (r, l ^ self.f(round, r));
        }
        TaskId((u64::from(l) << 32) | u64::from(r))
    }

    /// The row a node's id names (any `u64` names some row; one the pool
    /// never granted is simply not a lease).
    pub fn row(&self, wire: TaskId) -> TaskId {
        let (mut l, mut r) = ((wire.0 >> 32) as u32, wire.0 as u32);
        for round in (0..ROUNDS).rev() {
            (l, r) = (r ^ self.f(round, l), l);
        }
        TaskId((u64::from(l) << 32) | u64::from(r))
    }

    /// The identity every execution of `origin` sees: 32 hex digits.
    pub fn identity(&self, origin: TaskId) -> String {
        let mut h = Sha256::new();
        h.update(b"tidepool/task-identity/v1");
        h.update(self.key);
        h.update(origin.0.to_be_bytes());
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_a_keyed_permutation() {
        let a = TaskNames::new([1; 32]);
        let b = TaskNames::new([2; 32]);
        let mut seen = std::collections::HashSet::new();
        for t in (1..2000u64).chain([0, u64::MAX, 1 << 63]) {
            let w = a.wire(TaskId(t));
            assert_eq!(a.row(w), TaskId(t), "row(wire(t)) = t for {t}");
            assert!(seen.insert(w), "two rows named {w}");
            assert_ne!(w, b.wire(TaskId(t)), "another key names {t} differently");
        }
        // Consecutive rows get unordered names: about half go down.
        let down = (1..2000u64)
            .filter(|&t| a.wire(TaskId(t + 1)) < a.wire(TaskId(t)))
            .count();
        assert!((800..1200).contains(&down), "{down} of 1999 went down");
    }

    #[test]
    fn identities_are_stable_keyed_and_distinct() {
        let a = TaskNames::new([1; 32]);
        assert_eq!(a.identity(TaskId(5)), a.identity(TaskId(5)));
        assert_eq!(a.identity(TaskId(5)).len(), 32);
        assert_ne!(a.identity(TaskId(5)), a.identity(TaskId(6)));
        assert_ne!(
            a.identity(TaskId(5)),
            TaskNames::new([2; 32]).identity(TaskId(5))
        );
    }
}
