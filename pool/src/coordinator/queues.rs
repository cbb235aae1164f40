//! The queues: tasks waiting for a node, and the fair share that decides
//! whose go next.
//!
//! A sub-state of the coordinator. User jobs' tasks wait per job; a take
//! serves the highest priority first, and within it the client that has
//! been served least for its weight (each task served adds `1 / weight`
//! to the client's count; a client that comes back after its queue
//! emptied starts level with the least-served waiting client, so idle time
//! earns no credit), and within one client its oldest job first. So a big
//! job cannot starve a small one of another client: with two clients
//! waiting, each gets its weight's share of every node's grants. The
//! re-executions wait in their own queue and go before everything.
//!
//! It only holds and orders tasks; which node may take which task is
//! decided by the caller's predicates. Invariant: no empty job queue is
//! kept, and `len` is the sum of the job queues' lengths.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;
use tidepool_proto::wire::{JobId, TaskId};
use tidepool_proto::{Digest, PublicKey};

/// Most tasks a take looks past in one job's queue (tasks a node may not
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
    /// When it was queued (again): the lease-wait histogram measures from
    /// here. Tasks restored at start count from the start.
    pub(super) since: Instant,
}

/// Who a job's tasks are charged to: its client, or `None` for the pool's
/// own hidden tasks (canaries restored at start).
pub(super) type Share = Option<PublicKey>;

/// What the queues need to know of a job to place its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct JobMeta {
    /// The bundle its tasks run.
    pub(super) bundle: Digest,
    /// Whose share its tasks use.
    pub(super) owner: Share,
    /// Higher goes first; the same for all of a job's tasks.
    pub(super) priority: i8,
}

/// One job's waiting tasks. Lives while it has any.
#[derive(Debug)]
struct JobQueue {
    /// Where its tasks go.
    meta: JobMeta,
    /// Its tasks in order (retries at the front).
    tasks: TaskList,
}

/// A job's waiting tasks in order. Fresh tasks with consecutive ids (a
/// chunk of inputs) are kept as one range, so a job of a million waiting
/// tasks costs a few entries, not a million; retried tasks (which carry
/// attempts and the node they failed on) one entry each.
#[derive(Debug, Default)]
struct TaskList {
    /// The entries, first to serve at the front.
    entries: VecDeque<Entry>,
    /// Tasks in them.
    len: usize,
}

/// An entry of a [`TaskList`].
#[derive(Debug)]
enum Entry {
    /// Fresh tasks `next..end` (no attempt yet).
    Fresh {
        /// The next to serve.
        next: u64,
        /// One past the last.
        end: u64,
        /// When they were queued (tasks queued at another time start
        /// another entry).
        since: Instant,
    },
    /// One task as it was queued.
    One(Queued),
}

impl TaskList {
    fn is_fresh(q: &Queued) -> bool {
        q.attempts == 0 && q.failed_on.is_none()
    }

    fn push_back(&mut self, q: Queued) {
        self.len += 1;
        if Self::is_fresh(&q) {
            if let Some(Entry::Fresh { end, since, .. }) = self.entries.back_mut() {
                if *end == q.task.0 && *since == q.since {
                    *end += 1;
                    return;
                }
            }
            self.entries.push_back(Entry::Fresh {
                next: q.task.0,
                end: q.task.0 + 1,
                since: q.since,
            });
        } else {
            self.entries.push_back(Entry::One(q));
        }
    }

    fn push_front(&mut self, q: Queued) {
        self.len += 1;
        self.entries.push_front(Entry::One(q));
    }

    /// The first task (of `job`: fresh entries do not store it).
    fn pop_front(&mut self, job: JobId) -> Option<Queued> {
        let q = match self.entries.front_mut()? {
            Entry::Fresh { next, end, since } => {
                let (task, since) = (*next, *since);
                *next += 1;
                if *next == *end {
                    self.entries.pop_front();
                }
                Queued {
                    task: TaskId(task),
                    job,
                    attempts: 0,
                    failed_on: None,
                    since,
                }
            }
            Entry::One(_) => match self.entries.pop_front() {
                Some(Entry::One(q)) => q,
                _ => return None, // matched One above
            },
        };
        self.len -= 1;
        Some(q)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries held (memory: about 64 bytes each).
    fn entries(&self) -> usize {
        self.entries.len()
    }
}

/// One client's place in the fair share. Lives as long as the queues (a
/// few numbers per client that ever had waiting tasks).
#[derive(Debug, Default)]
struct Client {
    /// Tasks served, each counted as `1 / weight`.
    served: f64,
    /// Tasks of its jobs waiting.
    queued: usize,
}

/// Waiting tasks. Lives as long as the coordinator; rebuilt from the store
/// at start.
#[derive(Debug, Default)]
pub(super) struct Queues {
    /// Tasks of user jobs per job, oldest job (lowest id) first.
    jobs: BTreeMap<JobId, JobQueue>,
    /// The fair share's count per client.
    clients: HashMap<Share, Client>,
    /// Re-executions waiting for a suitable node, oldest first (deciders
    /// are put at the front).
    checks: VecDeque<Queued>,
    /// Tasks in `jobs`.
    len: usize,
}

impl Queues {
    /// Queue a task of a job last.
    pub(super) fn push_back(&mut self, meta: JobMeta, q: Queued) {
        self.place(meta, q.job).push_back(q);
    }

    /// Queue a task of a job first (a retry keeps its place).
    pub(super) fn push_front(&mut self, meta: JobMeta, q: Queued) {
        self.place(meta, q.job).push_front(q);
    }

    /// The queue a new task of `meta`'s job goes into, counted.
    fn place(&mut self, meta: JobMeta, job: JobId) -> &mut TaskList {
        self.len += 1;
        let idle = self.clients.get(&meta.owner).is_none_or(|c| c.queued == 0);
        // Back from idle: level with the least served waiting client (a
        // scan of the clients, only when one comes back).
        let level = idle
            .then(|| {
                self.clients
                    .iter()
                    .filter(|(s, c)| c.queued > 0 && **s != meta.owner)
                    .map(|(_, c)| c.served)
                    .reduce(f64::min)
            })
            .flatten();
        let client = self.clients.entry(meta.owner).or_default();
        if let Some(level) = level {
            client.served = client.served.max(level);
        }
        client.queued += 1;
        let JobQueue { tasks, .. } = self.jobs.entry(job).or_insert_with(|| JobQueue {
            meta,
            tasks: TaskList::default(),
        });
        tasks
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

    /// Take up to `want` tasks of jobs whose bundle `runs` allows, in fair
    /// order (see the module docs), skipping tasks that `may_take` refuses
    /// (they keep their places; at most [`SCAN_PAST`] are looked past per
    /// job). `weight` gives a client's share (> 0); `room` how many more
    /// of its tasks a client may have running (its quota); `group` a
    /// bundle's group (its publisher) and how many more tasks of that
    /// group may run (`None`: no limit).
    pub(super) fn take(
        &mut self,
        want: usize,
        weight: impl Fn(&Share) -> f64,
        room: impl Fn(&Share) -> usize,
        runs: impl Fn(&Digest) -> bool,
        may_take: impl Fn(&Queued, &Digest) -> bool,
        group: impl Fn(&Digest) -> Option<(PublicKey, usize)>,
    ) -> Vec<(Queued, Digest)> {
        let mut taken = Vec::new();
        // Tasks given per group (a bundle's publisher) in this call.
        let mut grouped: HashMap<PublicKey, usize> = HashMap::new();
        // The jobs this node may serve, oldest first.
        let mut live: Vec<(JobId, JobMeta)> = self
            .jobs
            .iter()
            .filter(|(_, j)| runs(&j.meta.bundle))
            .map(|(id, j)| (*id, j.meta))
            .collect();
        let mut skipped: HashMap<JobId, Vec<Queued>> = HashMap::new();
        let mut granted: HashMap<Share, usize> = HashMap::new();
        while taken.len() < want {
            let Some(top) = live.iter().map(|(_, m)| m.priority).max() else {
                break;
            };
            // The least served client at this priority; ties to the lower key.
            let pick = live
                .iter()
                .filter(|(_, m)| m.priority == top)
                .map(|(_, m)| m.owner)
                .min_by(|a, b| {
                    let served = |s: &Share| self.clients.get(s).map_or(0.0, |c| c.served);
                    served(a).total_cmp(&served(b)).then(a.cmp(b))
                });
            let Some(owner) = pick else { break };
            let given = granted.get(&owner).copied().unwrap_or(0);
            if given >= room(&owner) {
                live.retain(|(_, m)| m.owner != owner);
                continue;
            }
            // Its oldest job at this priority (live is in job order).
            let Some(at) = live
                .iter()
                .position(|(_, m)| m.priority == top && m.owner == owner)
            else {
                break;
            };
            let (job, meta) = live[at];
            let limit = group(&meta.bundle);
            if let Some((g, room)) = &limit {
                if grouped.get(g).copied().unwrap_or(0) >= *room {
                    // Its group is full: none of its jobs this time.
                    live.retain(|(_, m)| group(&m.bundle).map(|x| x.0) != Some(*g));
                    continue;
                }
            }
            let passed = skipped.entry(job).or_default();
            let mut got = None;
            if let Some(queue) = self.jobs.get_mut(&job) {
                while passed.len() < SCAN_PAST {
                    let Some(q) = queue.tasks.pop_front(job) else {
                        break;
                    };
                    if may_take(&q, &meta.bundle) {
                        got = Some(q);
                        break;
                    }
                    passed.push(q);
                }
            }
            match got {
                Some(q) => {
                    taken.push((q, meta.bundle));
                    *granted.entry(owner).or_default() += 1;
                    if let Some((g, _)) = limit {
                        *grouped.entry(g).or_default() += 1;
                    }
                    self.len -= 1;
                    if let Some(c) = self.clients.get_mut(&owner) {
                        c.served += 1.0 / weight(&owner).max(f64::MIN_POSITIVE);
                        c.queued = c.queued.saturating_sub(1);
                    }
                }
                None => {
                    live.remove(at);
                }
            }
        }
        // Tasks looked past go back first, in their order.
        for (job, passed) in skipped {
            if let Some(queue) = self.jobs.get_mut(&job) {
                for q in passed.into_iter().rev() {
                    queue.tasks.push_front(q);
                }
            }
        }
        self.jobs.retain(|_, j| !j.tasks.is_empty());
        taken
    }

    /// Tasks of user jobs waiting.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Nothing waits: no task of a user job, no re-execution.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0 && self.checks.is_empty()
    }

    /// Take every waiting task of `job` out (a cancelled job); returns how
    /// many there were.
    pub(super) fn remove_job(&mut self, job: JobId) -> usize {
        let Some(j) = self.jobs.remove(&job) else {
            return 0;
        };
        let n = j.tasks.len();
        self.len -= n;
        if let Some(c) = self.clients.get_mut(&j.meta.owner) {
            c.queued = c.queued.saturating_sub(n);
        }
        n
    }

    /// Entries the job queues hold (what their memory grows with: fresh
    /// tasks in runs are one entry per run).
    pub(super) fn entries(&self) -> usize {
        self.jobs.values().map(|j| j.tasks.entries()).sum()
    }

    /// Tasks of `owner`'s jobs waiting.
    pub(super) fn queued_of(&self, owner: &Share) -> usize {
        self.clients.get(owner).map_or(0, |c| c.queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::{KeyRole, SecretKey};

    /// One time for every task the tests queue (fresh ranges merge only
    /// for tasks queued at the same time).
    static T0: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

    fn q(job: u64, task: u64) -> Queued {
        Queued {
            task: TaskId(task),
            job: JobId(job),
            attempts: 0,
            failed_on: None,
            since: *T0,
        }
    }

    fn client(n: u8) -> Share {
        Some(SecretKey::from_seed(KeyRole::Client, &[n; 32]).public())
    }

    fn meta(owner: Share, priority: i8) -> JobMeta {
        JobMeta {
            bundle: Digest::of(b"b"),
            owner,
            priority,
        }
    }

    fn tasks(v: &[(Queued, Digest)]) -> Vec<u64> {
        v.iter().map(|(q, _)| q.task.0).collect()
    }

    fn take(qs: &mut Queues, want: usize) -> Vec<u64> {
        tasks(&qs.take(
            want,
            |_| 1.0,
            |_| usize::MAX,
            |_| true,
            |_, _| true,
            |_| None,
        ))
    }

    #[test]
    fn one_client_oldest_job_first_and_only_runnable_bundles() {
        let mut qs = Queues::default();
        let other = JobMeta {
            bundle: Digest::of(b"other"),
            ..meta(client(1), 0)
        };
        qs.push_back(meta(client(1), 0), q(2, 20));
        qs.push_back(other, q(3, 30));
        qs.push_back(meta(client(1), 0), q(1, 10));
        qs.push_back(meta(client(1), 0), q(1, 11));
        qs.push_front(meta(client(1), 0), q(1, 9));
        let b = Digest::of(b"b");
        let got = qs.take(
            9,
            |_| 1.0,
            |_| usize::MAX,
            |d| *d == b,
            |_, _| true,
            |_| None,
        );
        assert_eq!(tasks(&got), vec![9, 10, 11, 20]);
        assert_eq!(qs.len(), 1);
        assert_eq!(take(&mut qs, 9), vec![30]);
        assert_eq!(qs.len(), 0);
    }

    #[test]
    fn a_hundred_thousand_fresh_tasks_are_one_entry_and_retries_one_each() {
        let mut qs = Queues::default();
        for t in 1..=100_000 {
            qs.push_back(meta(client(1), 0), q(1, t));
        }
        assert_eq!((qs.len(), qs.entries()), (100_000, 1));
        assert_eq!(take(&mut qs, 3), vec![1, 2, 3]);
        let mut retry = q(1, 2);
        retry.attempts = 1;
        qs.push_front(meta(client(1), 0), retry);
        assert_eq!((qs.len(), qs.entries()), (99_998, 2));
        assert_eq!(take(&mut qs, 3), vec![2, 4, 5]);
        // Not consecutive (another job's ids between): a new run.
        qs.push_back(meta(client(1), 0), q(1, 2_000_000));
        assert_eq!(qs.entries(), 2);
        let all = take(&mut qs, 2_000_000);
        assert_eq!(all.len(), 99_996);
        assert_eq!(all.last(), Some(&2_000_000));
        assert_eq!((qs.len(), qs.entries()), (0, 0));
    }

    #[test]
    fn a_big_job_shares_the_nodes_with_a_small_one_of_another_client() {
        let mut qs = Queues::default();
        for t in 0..1000 {
            qs.push_back(meta(client(1), 0), q(1, t));
        }
        assert_eq!(take(&mut qs, 10), (0..10).collect::<Vec<_>>());
        // A second client arrives: it is served at once, alternately.
        for t in 0..4 {
            qs.push_back(meta(client(2), 0), q(2, 5000 + t));
        }
        let got = take(&mut qs, 8);
        assert_eq!(got.iter().filter(|t| **t >= 5000).count(), 4, "{got:?}");
        assert_eq!(
            got[..2].iter().filter(|t| **t >= 5000).count(),
            1,
            "{got:?}"
        );
        assert_eq!(qs.queued_of(&client(2)), 0);
        assert_eq!(qs.queued_of(&client(1)), 986);
    }

    #[test]
    fn weights_set_the_shares_and_idle_time_earns_nothing() {
        let mut qs = Queues::default();
        let (a, b) = (client(1), client(2));
        let weight = |s: &Share| if *s == a { 3.0 } else { 1.0 };
        for t in 0..2000 {
            qs.push_back(meta(a, 0), q(1, t));
        }
        for t in 0..300 {
            qs.push_back(meta(b, 0), q(2, 10_000 + t));
        }
        let got = qs.take(200, weight, |_| usize::MAX, |_| true, |_, _| true, |_| None);
        let of_a = got.iter().filter(|(q, _)| q.job == JobId(1)).count();
        assert!((148..=152).contains(&of_a), "3:1 shares, got {of_a} of 200");
        // b's queue empties; a is served alone for a long while.
        let _ = qs.take(
            1000,
            weight,
            |s| if *s == a { 0 } else { usize::MAX },
            |_| true,
            |_, _| true,
            |_| None,
        );
        assert_eq!(qs.queued_of(&b), 0);
        let _ = qs.take(900, weight, |_| usize::MAX, |_| true, |_, _| true, |_| None);
        // b comes back: 1 in 4 again, not a burst for the time it was away.
        for t in 0..50 {
            qs.push_back(meta(b, 0), q(3, 20_000 + t));
        }
        let got = qs.take(40, weight, |_| usize::MAX, |_| true, |_, _| true, |_| None);
        let of_b = got.iter().filter(|(q, _)| q.job == JobId(3)).count();
        assert!((8..=12).contains(&of_b), "1 in 4 for b, got {of_b} of 40");
    }

    #[test]
    fn a_full_group_holds_its_jobs_back_and_others_are_served() {
        let mut qs = Queues::default();
        let (b1, b2) = (Digest::of(b"one"), Digest::of(b"two"));
        let publisher =
            tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Publisher, &[9; 32])
                .public();
        let m = |job: u64, bundle: Digest| JobMeta {
            bundle,
            ..meta(client(job as u8), 0)
        };
        for t in 0..10 {
            qs.push_back(m(1, b1), q(1, t));
            qs.push_back(m(2, b2), q(2, 100 + t));
        }
        // b1's publisher may have 3 more running; b2 is not limited.
        let got = qs.take(
            10,
            |_| 1.0,
            |_| usize::MAX,
            |_| true,
            |_, _| true,
            |d| (*d == b1).then_some((publisher, 3)),
        );
        let of_b1 = got.iter().filter(|(_, d)| *d == b1).count();
        assert_eq!((of_b1, got.len()), (3, 10), "{:?}", tasks(&got));
    }

    #[test]
    fn priority_goes_first_and_quotas_hold_a_client_back() {
        let mut qs = Queues::default();
        for t in 0..10 {
            qs.push_back(meta(client(1), 0), q(1, t));
        }
        for t in 0..3 {
            qs.push_back(meta(client(2), 5), q(2, 100 + t));
        }
        assert_eq!(take(&mut qs, 4), vec![100, 101, 102, 0]);
        // Client 1 may have 2 more running: the rest wait.
        let got = qs.take(
            9,
            |_| 1.0,
            |s| if *s == client(1) { 2 } else { usize::MAX },
            |_| true,
            |_, _| true,
            |_| None,
        );
        assert_eq!(tasks(&got), vec![1, 2]);
        assert_eq!(qs.len(), 7);
    }

    #[test]
    fn checks_are_taken_oldest_first_where_allowed_and_the_rest_keep_their_order() {
        let mut qs = Queues::default();
        for t in 1..=4 {
            qs.push_check_back(q(1, t));
        }
        qs.push_check_front(q(1, 0));
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
        let mut qs = Queues::default();
        for t in 0..(SCAN_PAST as u64 + 10) {
            qs.push_back(meta(client(1), 0), q(1, t));
        }
        let some = |qs: &mut Queues, want: usize, ok: &dyn Fn(u64) -> bool| {
            tasks(&qs.take(
                want,
                |_| 1.0,
                |_| usize::MAX,
                |_| true,
                |x, _| ok(x.task.0),
                |_| None,
            ))
        };
        // Odd tasks refused: the even ones are taken, the odd ones stay in order.
        assert_eq!(some(&mut qs, 3, &|t| t % 2 == 0), vec![0, 2, 4]);
        assert_eq!(some(&mut qs, 2, &|_| true), vec![1, 3]);
        // Everything refused: one take looks past at most SCAN_PAST tasks
        // and leaves the queue as it was.
        let before = qs.len();
        assert!(some(&mut qs, 1, &|_| false).is_empty());
        assert_eq!(qs.len(), before);
        assert_eq!(some(&mut qs, 1, &|_| true), vec![5]);
    }
}
