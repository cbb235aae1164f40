//! Queues and leases: granting tasks to a node (re-executions first, then
//! bundle queues oldest first), renewals, releases back to the queue or to
//! the dead letters.

use super::fit::can_run;
use super::lease_table::Lease;
use super::nodes::UPTIME_MARGIN;
use super::queues::{self, Queued};
use super::verification::CHECK_ATTEMPTS_FACTOR;
use super::{refusal, Coordinator, PoolEvent};
use crate::store::{GrantRow, GrantedInput, Store, StoreError, Verified};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::TaskState;
use tidepool_proto::wire::{ErrorCode, LeaseId, TaskGrant, TaskId};
use tidepool_proto::{Digest, PublicKey};

impl<S: Store> Coordinator<S> {
    /// A node asks for `want` tasks and renews `running`. Returns new grants
    /// and the leases it named that are not its own any more. Lease ids in
    /// and out are the node's names of tasks (`names.rs`), never row ids.
    pub fn handle_lease(
        &mut self,
        now: Instant,
        key: &PublicKey,
        want: u32,
        running: &[LeaseId],
    ) -> Result<(Vec<TaskGrant>, Vec<LeaseId>), Refusal> {
        let running: Vec<LeaseId> = running.iter().map(|l| self.lease_row(*l)).collect();
        let (mut grants, mut lost) = self.grant(now, key, want, &running)?;
        for g in &mut grants {
            g.lease = self.lease_wire(g.lease);
        }
        for l in &mut lost {
            *l = self.lease_wire(*l);
        }
        Ok((grants, lost))
    }

    /// A lease id as a node names it.
    pub(super) fn lease_wire(&self, l: LeaseId) -> LeaseId {
        LeaseId {
            task: self.names.wire(l.task),
            attempt: l.attempt,
        }
    }

    /// The lease a node's id names, by row.
    pub(super) fn lease_row(&self, l: LeaseId) -> LeaseId {
        LeaseId {
            task: self.names.row(l.task),
            attempt: l.attempt,
        }
    }

    /// The row a task id from a node names (for tests and tools that hold
    /// a grant and want the pool's record of it).
    pub fn task_of_wire(&self, wire: TaskId) -> TaskId {
        self.names.row(wire)
    }

    /// [`handle_lease`](Self::handle_lease) in row ids.
    fn grant(
        &mut self,
        now: Instant,
        key: &PublicKey,
        want: u32,
        running: &[LeaseId],
    ) -> Result<(Vec<TaskGrant>, Vec<LeaseId>), Refusal> {
        let lost = self.leases.renew(now, self.cfg.lease_ttl, key, running);
        if self.standing.get(key).is_some_and(|s| s.banned) {
            return Err(Refusal {
                code: ErrorCode::Forbidden,
                message: format!("node {key} is banned from this pool"),
                close: true,
            });
        }
        if let Some(&until) = self.quarantine.get(key) {
            if now < until {
                return Ok((Vec::new(), lost));
            }
            self.quarantine.remove(key);
        }
        let Some(node) = self.nodes.get(key) else {
            return Err(refusal(ErrorCode::Protocol, "lease request before hello"));
        };
        // What the node may hold is the pool's decision: its claim, capped
        // by what it has earned (see `Node::allowance`).
        let policy = &self.cfg.leasing;
        let room = node.allowance(policy).saturating_sub(node.leases.len());
        let mut want = (want as usize).min(room).min(self.cfg.max_grant as usize);
        if want == 0 || self.queues.is_empty() {
            // Nothing to give (re-executions included): no comparison with
            // other nodes is needed.
            return Ok((Vec::new(), lost));
        }
        // Prefer nodes with a better uptime record: while a connected node
        // that stays up clearly more has free slots, a flakier node gets a
        // quarter of what it asks for (at least one task).
        let mine = node.uptime(now);
        let better_has_room = self.nodes.steadier_has_room(now, key, mine, UPTIME_MARGIN);
        if better_has_room {
            want = want.div_ceil(4);
        }
        // Re-executions first: the sooner a wrong result is found, the less
        // is built on it.
        // Each waiting check is weighed (against the rivals) only until
        // `want` are found, oldest first. The queues are lent out of `self`
        // for that, so the weighing can read the rest of it.
        let rivals = self.check_rivals(key);
        let mut queues = std::mem::take(&mut self.queues);
        let mine = queues.take_checks(want, |q| {
            self.checks
                .get(&q.task)
                .is_some_and(|c| self.may_check_among(key, c, &rivals))
        });
        self.queues = queues;
        let (checks, bundles, nodes) = (&self.checks, &self.bundles, &self.nodes);
        let mut picked: Vec<(Queued, Digest)> = mine
            .into_iter()
            .filter_map(|q| checks.get(&q.task).map(|c| (q, c.bundle)))
            .collect();
        // Then the queues of bundles this node can run, oldest bundle first.
        let Some(caps) = nodes.get(key).map(|n| &n.caps) else {
            return Ok((Vec::new(), lost)); // checked above
        };
        // A task that failed on this node goes to another one while another
        // connected, unquarantined node can run it (with no other node, it
        // is retried here).
        let quarantine = &self.quarantine;
        let elsewhere: std::cell::RefCell<std::collections::HashMap<Digest, bool>> =
            Default::default();
        let others_can_run = |digest: &Digest| {
            *elsewhere.borrow_mut().entry(*digest).or_insert_with(|| {
                bundles.get(digest).is_some_and(|b| {
                    nodes.iter().any(|(k, n)| {
                        k != key
                            && n.is_connected()
                            && quarantine.get(k).is_none_or(|until| *until <= now)
                            && can_run(&n.caps, &b.manifest)
                    })
                })
            })
        };
        // Each client's room under its running-tasks quota.
        let quotas = &self.cfg.quotas;
        let mut running: HashMap<queues::Share, usize> = HashMap::new();
        if quotas.running_tasks > 0 {
            for (job, (_, c)) in &self.jobs {
                if c.leased > 0 {
                    *running.entry(self.owners.get(job).copied()).or_default() += c.leased as usize;
                }
            }
        }
        // Each publisher's room under its running-tasks quota.
        let publisher_of = |digest: &Digest| bundles.get(digest).map(|b| b.signed.signer);
        let mut publisher_running: HashMap<PublicKey, usize> = HashMap::new();
        if quotas.publisher_running_tasks > 0 {
            for (b, c) in self.jobs.values() {
                if c.leased > 0 {
                    if let Some(p) = publisher_of(b) {
                        *publisher_running.entry(p).or_default() += c.leased as usize;
                    }
                }
            }
        }
        let rest = self.queues.take(
            want - picked.len(),
            |share| share.as_ref().map_or(1.0, |k| quotas.weight(k)),
            |share| match (quotas.running_tasks, share) {
                (0, _) | (_, None) => usize::MAX,
                (quota, Some(_)) => {
                    (quota as usize).saturating_sub(running.get(share).copied().unwrap_or(0))
                }
            },
            |digest| {
                bundles
                    .get(digest)
                    .is_some_and(|b| b.missing.is_empty() && can_run(caps, &b.manifest))
            },
            |q, digest| q.failed_on != Some(*key) || !others_can_run(digest),
            |digest| match quotas.publisher_running_tasks {
                0 => None,
                quota => publisher_of(digest).map(|p| {
                    let running = publisher_running.get(&p).copied().unwrap_or(0);
                    (p, (quota as usize).saturating_sub(running))
                }),
            },
        );
        picked.extend(rest);
        if picked.is_empty() {
            return Ok((Vec::new(), lost));
        }
        self.maybe_add_canary(key, &mut picked)?;
        self.maybe_add_decoys(key, &mut picked)?;
        let rows: Vec<_> = picked
            .iter()
            .map(|(q, _)| GrantRow {
                task: q.task,
                attempt: q.attempts + 1,
                node: *key,
            })
            .collect();
        let inputs = match self.store.grant(&rows, self.cfg.leasing.grant_bytes) {
            Ok(i) => i,
            Err(e) => {
                // Nothing was granted: put the tasks back where they were.
                self.requeue_front(picked);
                return Err(e.into());
            }
        };
        // Past the answer's byte budget: back to the front of their queues,
        // for the next answer.
        let ungranted = picked.split_off(inputs.len().min(picked.len()));
        self.requeue_front(ungranted);
        // A lease's deadline: the bundle's timeout for each task ahead of it
        // on the node's slots (its place in what the node holds), plus the
        // grace. Renewals never move it.
        let slots = self
            .nodes
            .get(key)
            .map_or(1, |n| n.caps.slots.max(1) as usize);
        let held_before = self.nodes.get(key).map_or(0, |n| n.leases.len());
        let mut grants = Vec::with_capacity(picked.len());
        for (
            (q, bundle),
            GrantedInput {
                input,
                digest: input_digest,
            },
        ) in picked.into_iter().zip(inputs)
        {
            let timeout = self.bundles.get(&bundle).map_or(Duration::ZERO, |b| {
                Duration::from_millis(b.manifest.limits.timeout_ms)
            });
            let place = held_before + grants.len();
            let waves = u32::try_from(place / slots + 1).unwrap_or(u32::MAX);
            let deadline = now + timeout.saturating_mul(waves) + self.cfg.leasing.grace;
            let origin = self.origin_of(q.task);
            let lease = Lease {
                origin,
                attempt: q.attempts + 1,
                node: *key,
                job: q.job,
                bundle,
                input: input_digest,
                input_len: input.len() as u64,
                expires: (now + self.cfg.lease_ttl).min(deadline),
                renewed: now,
                granted: now,
                deadline,
            };
            self.telemetry.granted(now, q.since);
            self.leases.insert(q.task, lease);
            self.nodes.hold(key, q.task);
            grants.push(TaskGrant {
                identity: self.names.identity(origin),
                replay: None,
                lease: LeaseId {
                    task: q.task,
                    attempt: lease.attempt,
                },
                bundle,
                input: tidepool_proto::wire::Bytes(input),
            });
        }
        for g in &mut grants {
            let Some(job) = self.leases.get(g.lease.task).map(|l| l.job) else {
                continue; // just inserted above
            };
            self.count(job, TaskState::Queued, TaskState::Leased);
            g.replay = self.replay_for(g.lease.task, &g.bundle)?;
        }
        Ok((grants, lost))
    }

    /// The transcript a check of an `llm`-tier result replays: the checked
    /// result's own (so the verifier runs one teacher-forced pass instead of
    /// generating). `None` for other tasks and tiers, or when the result
    /// generated nothing.
    /// Put picked tasks back at the front of their queues (re-executions
    /// into the queue of checks), in their order.
    fn requeue_front(&mut self, picked: Vec<(Queued, Digest)>) {
        for (q, d) in picked.into_iter().rev() {
            if self.checks.contains_key(&q.task) {
                self.queues.push_check_front(q);
            } else {
                let meta = self.job_meta(q.job, d);
                self.queues.push_front(meta, q);
            }
        }
    }

    /// The task whose identity `task` runs with: the result a check
    /// checks, the verified result a canary was made from, or itself.
    pub(super) fn origin_of(&self, task: TaskId) -> TaskId {
        self.checks
            .get(&task)
            .map(|c| c.target)
            .or_else(|| self.canary_origins.get(&task).copied())
            .unwrap_or(task)
    }

    pub(super) fn replay_for(
        &mut self,
        task: TaskId,
        bundle: &Digest,
    ) -> Result<Option<tidepool_proto::llm::Transcript>, StoreError> {
        let Some(check) = self.checks.get(&task) else {
            return Ok(None);
        };
        let llm = self.bundles.get(bundle).is_some_and(|b| {
            matches!(
                b.manifest.determinism,
                tidepool_proto::manifest::Determinism::Llm { .. }
            )
        });
        if !llm {
            return Ok(None);
        }
        let (target, decoy) = (check.target, check.decoy);
        let Some(bytes) = self.store.transcript(target)? else {
            return Ok(None);
        };
        match rmp_serde::from_slice(&bytes) {
            Ok(t) if decoy => Ok(Some(self.decoy_transcript(task, t))),
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                // Stored by this pool after checking its digest: should not
                // happen; the check then generates afresh.
                tracing::warn!(task = %target, "stored transcript unreadable: {e}");
                Ok(None)
            }
        }
    }

    /// End a lease: back to the queue (front) or to the dead letters.
    /// `failed_on`: the node the attempt failed on, which the task avoids
    /// next while another node can run it.
    pub(super) fn release(
        &mut self,
        now: Instant,
        task: TaskId,
        reason: &str,
        failed_on: Option<PublicKey>,
    ) -> Result<(), StoreError> {
        let Some(lease) = self.leases.remove(task) else {
            return Ok(());
        };
        self.nodes.drop_lease(&lease.node, task);
        self.forget_if_idle(&lease.node);
        let is_check = self.checks.contains_key(&task);
        // A re-execution is the pool's own work: it is retried longer (its
        // nodes may be liars that get banned mid-task).
        let limit = if is_check {
            self.cfg.max_attempts.max(1) * CHECK_ATTEMPTS_FACTOR
        } else {
            self.cfg.max_attempts
        };
        let dead = lease.attempt >= limit;
        self.store.release(task, lease.attempt, reason, dead)?;
        if let Some(check) = self.checks.get(&task) {
            if dead {
                // Nobody could run the check: the result stays as it was.
                let target = check.target;
                self.checks.remove(&task);
                if let Some(row) = self.store.result(target)? {
                    if row.verified == Verified::Checking {
                        self.store.set_verified(target, Verified::Unverified)?;
                    }
                }
                self.count(lease.job, TaskState::Leased, TaskState::Dead);
            } else {
                self.count(lease.job, TaskState::Leased, TaskState::Queued);
                self.queues.push_check_front(Queued {
                    task,
                    job: lease.job,
                    attempts: lease.attempt,
                    failed_on,
                    since: now,
                });
            }
            return Ok(());
        }
        if dead {
            self.telemetry.counters.dead_lettered += 1;
            self.events.push_back(PoolEvent::DeadLettered {
                task,
                reason: reason.to_owned(),
            });
            self.count(lease.job, TaskState::Leased, TaskState::Dead);
        } else {
            self.count(lease.job, TaskState::Leased, TaskState::Queued);
            let meta = self.job_meta(lease.job, lease.bundle);
            self.queues.push_front(
                meta,
                Queued {
                    task,
                    job: lease.job,
                    attempts: lease.attempt,
                    failed_on,
                    since: now,
                },
            );
        }
        Ok(())
    }
}
