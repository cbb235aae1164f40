//! The queues: tasks waiting for a node, one queue per bundle (served
//! oldest bundle first) and the re-executions, which go before them.
//!
//! A sub-state of the coordinator. It only holds and hands out tasks in
//! order; which node may take which task is decided by the caller's
//! predicates. Invariant: no empty bundle queue is kept.

use std::collections::{BTreeMap, VecDeque};
use tidepool_proto::wire::{JobId, TaskId};
use tidepool_proto::{Digest, PublicKey};

/// Most tasks a take looks past in one bundle queue (tasks a node may not
/// retry stay where they are), so one lease request costs a bounded scan
/// however long the queue.
const SCAN_PAST: usize = 256;

/// A task waiting in a queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct Queued {
    /// The task.
    pub(super) task: TaskId,
    /// Its job.
    pub(super) job: JobId,
    /// Attempts made so far.
    pub(super) attempts: u32,
    /// The node its last attempt failed on: it is retried elsewhere while
    /// another node can run it. `None` for fresh tasks (and after a restart).
    pub(super) failed_on: Option<PublicKey>,
}

/// Waiting tasks. Lives as long as the coordinator; rebuilt from the store
/// at start.
#[derive(Debug, Default)]
pub(super) struct Queues {
    /// Tasks of user jobs per bundle, in order.
    by_bundle: BTreeMap<Digest, VecDeque<Queued>>,
    /// Re-executions waiting for a suitable node, oldest first (deciders
    /// are put at the front).
    checks: VecDeque<Queued>,
}

impl Queues {
    /// Queue a task of `bundle` last.
    pub(super) fn push_back(&mut self, bundle: Digest, q: Queued) {
        self.by_bundle.entry(bundle).or_default().push_back(q);
    }

    /// Queue a task of `bundle` first (a retry keeps its place).
    pub(super) fn push_front(&mut self, bundle: Digest, q: Queued) {
        self.by_bundle.entry(bundle).or_default().push_front(q);
    }

    /// Queue a re-execution last.
    pub(super) fn push_check_back(&mut self, q: Queued) {
        self.checks.push_back(q);
    }

    /// Queue a re-execution first.
    pub(super) fn push_check_front(&mut self, q: Queued) {
        self.checks.push_front(q);
    }

    /// Take up to `want` re-executions that `may_take` allows, oldest first.
    pub(super) fn take_checks(
        &mut self,
        want: usize,
        may_take: impl Fn(&Queued) -> bool,
    ) -> Vec<Queued> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.checks.len());
        for q in self.checks.drain(..) {
            if taken.len() < want && may_take(&q) {
                taken.push(q);
            } else {
                kept.push_back(q);
            }
        }
        self.checks = kept;
        taken
    }

    /// Take up to `want` tasks from the queues of bundles that `runs`
    /// allows, oldest bundle first, each queue in order, skipping tasks that
    /// `may_take` refuses (they keep their places; at most [`SCAN_PAST`]
    /// are looked past per queue).
    pub(super) fn take(
        &mut self,
        want: usize,
        runs: impl Fn(&Digest) -> bool,
        may_take: impl Fn(&Queued, &Digest) -> bool,
    ) -> Vec<(Queued, Digest)> {
        let mut taken = Vec::new();
        for (digest, queue) in self.by_bundle.iter_mut() {
            if taken.len() == want {
                break;
            }
            if !runs(digest) {
                continue;
            }
            let mut skipped = Vec::new();
            while taken.len() < want && skipped.len() < SCAN_PAST {
                let Some(q) = queue.pop_front() else { break };
                if may_take(&q, digest) {
                    taken.push((q, *digest));
                } else {
                    skipped.push(q);
                }
            }
            for q in skipped.into_iter().rev() {
                queue.push_front(q);
            }
        }
        self.by_bundle.retain(|_, q| !q.is_empty());
        taken
    }

    /// Tasks of user jobs waiting.
    pub(super) fn len(&self) -> usize {
        self.by_bundle.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(task: u64) -> Queued {
        Queued {
            task: TaskId(task),
            job: JobId(1),
            attempts: 0,
            failed_on: None,
        }
    }

    #[test]
    fn bundles_are_served_in_order_and_only_where_allowed() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let mut qs = Queues::default();
        qs.push_back(second, q(3));
        qs.push_back(first, q(1));
        qs.push_back(first, q(2));
        qs.push_front(first, q(0));
        let tasks = |v: Vec<(Queued, Digest)>| v.iter().map(|(q, _)| q.task.0).collect::<Vec<_>>();
        assert_eq!(tasks(qs.take(3, |d| *d == second, |_, _| true)), vec![3]);
        assert_eq!(tasks(qs.take(2, |_| true, |_, _| true)), vec![0, 1]);
        assert_eq!(qs.len(), 1);
        assert_eq!(tasks(qs.take(5, |_| true, |_, _| true)), vec![2]);
        assert_eq!(qs.len(), 0);
    }

    #[test]
    fn checks_are_taken_oldest_first_where_allowed_and_the_rest_keep_their_order() {
        let mut qs = Queues::default();
        for t in 1..=4 {
            qs.push_check_back(q(t));
        }
        qs.push_check_front(q(0));
        let taken: Vec<u64> = qs
            .take_checks(2, |x| x.task.0 % 2 == 1)
            .iter()
            .map(|x| x.task.0)
            .collect();
        assert_eq!(taken, vec![1, 3]);
        let rest: Vec<u64> = qs
            .take_checks(9, |_| true)
            .iter()
            .map(|x| x.task.0)
            .collect();
        assert_eq!(rest, vec![0, 2, 4]);
    }

    #[test]
    fn refused_tasks_keep_their_places_and_the_scan_is_bounded() {
        let d = Digest::of(b"a");
        let mut qs = Queues::default();
        for t in 0..(SCAN_PAST as u64 + 10) {
            qs.push_back(d, q(t));
        }
        // Odd tasks refused: the even ones are taken, the odd ones stay in order.
        let got: Vec<u64> = qs
            .take(3, |_| true, |x, _| x.task.0 % 2 == 0)
            .iter()
            .map(|(x, _)| x.task.0)
            .collect();
        assert_eq!(got, vec![0, 2, 4]);
        let next: Vec<u64> = qs
            .take(2, |_| true, |_, _| true)
            .iter()
            .map(|(x, _)| x.task.0)
            .collect();
        assert_eq!(next, vec![1, 3]);
        // Everything refused: one take looks past at most SCAN_PAST tasks
        // and leaves the queue as it was.
        let before = qs.len();
        assert!(qs.take(1, |_| true, |_, _| false).is_empty());
        assert_eq!(qs.len(), before);
        let first: Vec<u64> = qs
            .take(1, |_| true, |_, _| true)
            .iter()
            .map(|(x, _)| x.task.0)
            .collect();
        assert_eq!(first, vec![5]);
    }
}
