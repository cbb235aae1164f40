//! Which leases each node key holds, as the network shell saw them granted
//! and renewed, so results naming any other lease are answered here
//! (`Stale`, or `Duplicate` for a resend of one just accepted) and never
//! reach the coordinator thread: a node cannot make the coordinator work
//! for tasks it was never given.
//!
//! It only mirrors grants, losses and verdicts that passed through this
//! process; the coordinator's lease table stays the authority (a result
//! let through here is still checked there). After a pool restart a node
//! resends results for leases granted before it, some of them accepted
//! just before the crash: the coordinator alone knows, so each key may
//! send that many results for leases unknown here (`cap`, more than the
//! pool lets a node hold) through to it once per process; past that they
//! are answered here.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use tidepool_proto::wire::{LeaseId, TaskGrant, TaskResult, Verdict};
use tidepool_proto::PublicKey;

/// Accepted leases remembered per key, so a resend after a lost answer is
/// told `Duplicate` without asking the coordinator.
const ACCEPTED_KEPT: usize = 256;

/// One key's leases.
#[derive(Debug, Default)]
struct Held {
    /// Granted and not yet judged or reported lost (oldest task first).
    leases: BTreeSet<LeaseId>,
    /// Recently accepted, newest last (at most [`ACCEPTED_KEPT`]).
    accepted: VecDeque<LeaseId>,
    /// Results for leases unknown here already let through to the
    /// coordinator (at most the cap, for the life of the process).
    unknown_passed: usize,
}

impl Held {
    /// Whether nothing about the key needs remembering.
    fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.accepted.is_empty() && self.unknown_passed == 0
    }
}

/// Leases per node key. Lives as long as the server; a key's entry goes
/// when it holds nothing.
#[derive(Debug)]
pub(super) struct HeldLeases {
    /// The leases, by node key.
    by_key: Mutex<HashMap<PublicKey, Held>>,
    /// Most leases remembered per key (the oldest are forgotten past it),
    /// and most results for unknown leases a key may send through to the
    /// coordinator. Well above what the pool lets a node hold.
    cap: usize,
}

impl HeldLeases {
    /// Remember at most `cap` leases per key.
    pub(super) fn new(cap: usize) -> Self {
        Self {
            by_key: Mutex::new(HashMap::new()),
            cap: cap.max(1),
        }
    }

    /// A lease answer to `key`: `grants` are now held, `lost` are not.
    pub(super) fn granted(&self, key: &PublicKey, grants: &[TaskGrant], lost: &[LeaseId]) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.entry(*key).or_default();
        for l in lost {
            held.leases.remove(l);
        }
        for g in grants {
            held.leases.insert(g.lease);
        }
        while held.leases.len() > self.cap {
            held.leases.pop_first();
        }
        if held.is_empty() {
            map.remove(key);
        }
    }

    /// Split `key`'s results into those for the coordinator (leases it
    /// holds, and unknown ones within the key's allowance) and verdicts
    /// answered here.
    pub(super) fn sort(
        &self,
        key: &PublicKey,
        results: Vec<TaskResult>,
    ) -> (Vec<TaskResult>, Vec<(LeaseId, Verdict)>) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.entry(*key).or_default();
        let mut pass = Vec::with_capacity(results.len());
        let mut here = Vec::new();
        for r in results {
            if held.leases.contains(&r.lease) {
                pass.push(r);
            } else if held.accepted.contains(&r.lease) {
                here.push((r.lease, Verdict::Duplicate));
            } else if held.unknown_passed < self.cap {
                // Perhaps granted (even accepted) before a restart: ask.
                held.unknown_passed += 1;
                pass.push(r);
            } else {
                here.push((r.lease, Verdict::Stale));
            }
        }
        if held.is_empty() {
            map.remove(key);
        }
        (pass, here)
    }

    /// The coordinator judged `key`'s results: judged leases are no longer
    /// held; accepted ones are remembered for resends.
    pub(super) fn judged(&self, key: &PublicKey, verdicts: &[(LeaseId, Verdict)]) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let Some(held) = map.get_mut(key) else {
            return;
        };
        for (l, v) in verdicts {
            held.leases.remove(l);
            if matches!(v, Verdict::Accepted) {
                held.accepted.push_back(*l);
                if held.accepted.len() > ACCEPTED_KEPT {
                    held.accepted.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::wire::{Bytes, Outcome, TaskId};
    use tidepool_proto::{Digest, KeyRole, SecretKey};

    fn grant(task: u64) -> TaskGrant {
        TaskGrant {
            identity: "t".into(),
            replay: None,
            lease: id(task),
            bundle: Digest::of(b"b"),
            input: Bytes(vec![]),
        }
    }

    fn id(task: u64) -> LeaseId {
        LeaseId {
            task: TaskId(task),
            attempt: 1,
        }
    }

    fn result(task: u64) -> TaskResult {
        TaskResult {
            transcript: Default::default(),
            lease: id(task),
            outcome: Outcome::Output(Bytes(vec![])),
            receipt: None,
        }
    }

    #[test]
    fn only_results_for_held_leases_pass_and_resends_of_accepted_ones_are_duplicates() {
        let a = SecretKey::from_seed(KeyRole::Node, &[1; 32]).public();
        let b = SecretKey::from_seed(KeyRole::Node, &[2; 32]).public();
        let h = HeldLeases::new(3);
        // Results for leases unknown here (granted before a restart) reach
        // the coordinator, three per key for the life of the process.
        let (pass, here) = h.sort(&a, vec![result(7), result(8), result(9), result(10)]);
        assert_eq!(pass.len(), 3);
        assert_eq!(here, vec![(id(10), Verdict::Stale)]);
        h.granted(&a, &[grant(1), grant(2)], &[]);
        let (pass, here) = h.sort(&a, vec![result(1), result(9)]);
        assert_eq!(pass.len(), 1);
        assert_eq!(here, vec![(id(9), Verdict::Stale)]);
        // Another key has its own allowance, then holds nothing.
        let (pass, _) = h.sort(&b, vec![result(1); 3]);
        assert_eq!(pass.len(), 3);
        let (pass, _) = h.sort(&b, vec![result(1)]);
        assert!(pass.is_empty());
        h.judged(&a, &[(id(1), Verdict::Accepted)]);
        let (pass, here) = h.sort(&a, vec![result(1)]);
        assert!(pass.is_empty());
        assert_eq!(here, vec![(id(1), Verdict::Duplicate)]);
        // Lost leases go; past the cap the oldest are forgotten.
        h.granted(&a, &[grant(3), grant(4), grant(5)], &[id(2)]);
        let (pass, _) = h.sort(&a, vec![result(2), result(3), result(4), result(5)]);
        let passed: Vec<u64> = pass.iter().map(|r| r.lease.task.0).collect();
        assert_eq!(passed, vec![3, 4, 5]);
        h.granted(&a, &[grant(6)], &[]);
        let (pass, _) = h.sort(&a, vec![result(3)]);
        assert!(
            pass.is_empty(),
            "the oldest lease was forgotten past the cap"
        );
    }
}
