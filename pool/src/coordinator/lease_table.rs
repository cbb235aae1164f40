//! The lease table: every task under lease, with its expiry index.
//!
//! A sub-state of the coordinator. It knows nothing of queues, jobs or the
//! store: it answers what it holds and returns what expired, and the
//! coordinator decides what that means. Invariant: each lease has exactly
//! one entry in the expiry index, at its current expiry.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tidepool_proto::wire::{JobId, LeaseId, TaskId};
use tidepool_proto::{Digest, PublicKey};

/// A task under lease.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    /// Attempt number (fencing token).
    pub(super) attempt: u32,
    /// Holder.
    pub(super) node: PublicKey,
    /// Its job.
    pub(super) job: JobId,
    /// Its bundle.
    pub(super) bundle: Digest,
    /// Digest of its input (receipts must name it).
    pub(super) input: Digest,
    /// Bytes of its input (receipts must meter that many in).
    pub(super) input_len: u64,
    /// The task whose identity this execution has (itself, or the task a
    /// re-execution checks): its receipt must name that identity.
    pub(super) origin: TaskId,
    /// When it expires unless renewed (never after `deadline`).
    pub(super) expires: Instant,
    /// Last renewal (or grant).
    pub(super) renewed: Instant,
    /// When it was granted (the task-latency histogram measures from here).
    pub(super) granted: Instant,
    /// When it ends whatever the node says: the bundle's `timeout_ms` for
    /// each task ahead of it on the node's slots, plus the pool's grace.
    /// Renewals never move it.
    pub(super) deadline: Instant,
}

impl Lease {
    /// Whether it ended at its deadline rather than for want of renewal.
    pub(super) fn at_deadline(&self) -> bool {
        self.expires >= self.deadline
    }
}

/// Leased tasks and when each expires. Lives as long as the coordinator;
/// empty after a restart (the store re-queues what was leased).
#[derive(Debug, Default)]
pub(super) struct LeaseTable {
    /// Each leased task's lease.
    by_task: HashMap<TaskId, Lease>,
    /// (expiry, task) for every lease, soonest first.
    expiry: BTreeSet<(Instant, TaskId)>,
}

impl LeaseTable {
    /// Record a new lease.
    pub(super) fn insert(&mut self, task: TaskId, lease: Lease) {
        if let Some(old) = self.by_task.insert(task, lease) {
            self.expiry.remove(&(old.expires, task));
        }
        self.expiry.insert((lease.expires, task));
    }

    /// End a lease, returning it.
    pub(super) fn remove(&mut self, task: TaskId) -> Option<Lease> {
        let lease = self.by_task.remove(&task)?;
        self.expiry.remove(&(lease.expires, task));
        Some(lease)
    }

    /// The leased tasks of `job` (a scan: at most every node's holdings).
    pub(super) fn of_job(&self, job: JobId) -> Vec<TaskId> {
        self.by_task
            .iter()
            .filter(|(_, l)| l.job == job)
            .map(|(t, _)| *t)
            .collect()
    }

    /// The lease of `task`, if it is leased.
    pub(super) fn get(&self, task: TaskId) -> Option<&Lease> {
        self.by_task.get(&task)
    }

    /// The lease named by `id` if `node` holds it at that attempt.
    pub(super) fn current(&self, id: LeaseId, node: &PublicKey) -> Option<Lease> {
        self.by_task
            .get(&id.task)
            .filter(|l| l.attempt == id.attempt && l.node == *node)
            .copied()
    }

    /// Renew the leases `node` names to `now + ttl` (at most to each one's
    /// deadline); returns those it does not hold (any more).
    pub(super) fn renew(
        &mut self,
        now: Instant,
        ttl: Duration,
        node: &PublicKey,
        running: &[LeaseId],
    ) -> Vec<LeaseId> {
        let mut lost = Vec::new();
        for l in running {
            match self.by_task.get_mut(&l.task) {
                Some(lease) if lease.attempt == l.attempt && lease.node == *node => {
                    self.expiry.remove(&(lease.expires, l.task));
                    lease.expires = (now + ttl).min(lease.deadline);
                    lease.renewed = now;
                    self.expiry.insert((lease.expires, l.task));
                }
                _ => lost.push(*l),
            }
        }
        lost
    }

    /// When the next lease expires.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.expiry.first().map(|(t, _)| *t)
    }

    /// The lease that expires first, if it is due by `now` (left in the
    /// table: the coordinator ends it).
    pub(super) fn due(&self, now: Instant) -> Option<(TaskId, Lease)> {
        let &(at, task) = self.expiry.first()?;
        if at > now {
            return None;
        }
        self.by_task.get(&task).map(|l| (task, *l))
    }

    /// Tasks under lease.
    pub(super) fn len(&self) -> usize {
        self.by_task.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::{KeyRole, SecretKey};

    fn lease(node: PublicKey, attempt: u32, expires: Instant) -> Lease {
        Lease {
            attempt,
            node,
            job: JobId(1),
            bundle: Digest::of(b"b"),
            input: Digest::of(b"i"),
            input_len: 1,
            origin: TaskId(1),
            expires,
            renewed: expires,
            granted: expires,
            deadline: expires + Duration::from_secs(3600),
        }
    }

    #[test]
    fn renewals_move_expiry_and_only_the_holder_at_its_attempt_renews() {
        let t0 = Instant::now();
        let a = SecretKey::from_seed(KeyRole::Node, &[1; 32]).public();
        let b = SecretKey::from_seed(KeyRole::Node, &[2; 32]).public();
        let mut t = LeaseTable::default();
        t.insert(TaskId(1), lease(a, 1, t0 + Duration::from_secs(1)));
        t.insert(TaskId(2), lease(a, 1, t0 + Duration::from_secs(2)));
        let id = |task, attempt| LeaseId {
            task: TaskId(task),
            attempt,
        };
        // Another node, a stale attempt and an unknown task are lost.
        assert_eq!(
            t.renew(t0, Duration::from_secs(5), &b, &[id(1, 1)]),
            vec![id(1, 1)]
        );
        assert_eq!(
            t.renew(t0, Duration::from_secs(5), &a, &[id(1, 2), id(9, 1)]),
            vec![id(1, 2), id(9, 1)]
        );
        assert!(t
            .renew(t0, Duration::from_secs(5), &a, &[id(1, 1)])
            .is_empty());
        // Task 2 is now due first; task 1 moved to t0 + 5 s.
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(2)));
        assert!(t.due(t0 + Duration::from_secs(1)).is_none());
        let (task, _) = t.due(t0 + Duration::from_secs(3)).expect("due");
        assert_eq!(task, TaskId(2));
        t.remove(task);
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(5)));
        assert!(t.current(id(1, 1), &a).is_some() && t.current(id(1, 1), &b).is_none());
        assert!(t.remove(TaskId(1)).is_some());
        assert_eq!((t.len(), t.next_expiry()), (0, None));
    }

    #[test]
    fn renewals_never_move_a_lease_past_its_deadline() {
        let t0 = Instant::now();
        let a = SecretKey::from_seed(KeyRole::Node, &[1; 32]).public();
        let mut t = LeaseTable::default();
        let mut l = lease(a, 1, t0 + Duration::from_secs(5));
        l.deadline = t0 + Duration::from_secs(12);
        t.insert(TaskId(1), l);
        let id = [LeaseId {
            task: TaskId(1),
            attempt: 1,
        }];
        let ttl = Duration::from_secs(5);
        for s in [4, 8, 11] {
            assert!(t
                .renew(t0 + Duration::from_secs(s), ttl, &a, &id)
                .is_empty());
        }
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(12)));
        let (_, due) = t
            .due(t0 + Duration::from_secs(12))
            .expect("due at the deadline");
        assert!(due.at_deadline());
    }
}
