//! Verification: re-executions of sampled results on other nodes, the
//! decision when executions disagree, strikes and quarantine, canaries and
//! challenges. The pure parts (policy, standing, the audit draw, comparing
//! outcomes) are in [`crate::verify`].

use super::fit::can_run;
use super::lease_table::Lease;
use super::nodes::Node;
use super::queues::Queued;
use super::{refusal, Coordinator, PoolEvent};
use crate::store::{
    Acceptance, CanarySource, JobCounts, JobKind, NewCanary, ResultRow, Store, StoreError, Verified,
};
use crate::verify::{agree, audit_draw, Standing, VerifyPolicy};
use std::time::Instant;
use tidepool_proto::manifest::{Determinism, Sampling};
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{
    Canary, ChallengeState, Challenged, ErrorCode, JobId, LeaseId, Outcome, TaskId,
};
use tidepool_proto::{Digest, PublicKey};

/// How much more likely a trusted node is to be chosen for a check than a
/// fresh one (one with a record of `decide_after` confirmations weighs
/// `1 + decide_after`).
pub const TRUSTED_WEIGHT: f64 = 1000.0;

/// How many other nodes with room a node is compared with for each waiting
/// check when it asks for work (see `check_rivals`).
pub const MAX_RIVALS: usize = 256;

/// A re-execution may take this many times `max_attempts` attempts.
pub const CHECK_ATTEMPTS_FACTOR: u32 = 4;

/// The window of `challenges_per_hour`.
const CHALLENGE_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// Most executions of one task (the original and its re-executions) before
/// a disagreement is left `disputed`.
pub const MAX_EXECUTIONS: usize = 5;

/// A re-execution not yet decided.
#[derive(Debug, Clone)]
pub(super) struct Check {
    /// The task whose result it checks.
    pub(super) target: TaskId,
    /// The bundle both run.
    pub(super) bundle: Digest,
    /// Nodes that already ran the target (never given it again).
    pub(super) exclude: Vec<PublicKey>,
    /// Whether this execution decides between two that disagree (prefers
    /// trusted nodes; an untrusted node only after `decide_after`
    /// confirmed results and no strike).
    pub(super) decider: bool,
    /// Whether only a trusted node may run it: the disagreement was
    /// decided without one, so the result is `disputed` until one does.
    pub(super) trusted_only: bool,
    /// The engines the checked result's receipt names: under `exact` only
    /// a node with every one of them may run the check (bit-identical
    /// outputs need the same engine, version and settings). Empty: any.
    pub(super) engines: Vec<String>,
    /// Whether it is a decoy (`decoys.rs`): its replayed transcript is
    /// corrupted on purpose and it audits the verifier, not the target.
    pub(super) decoy: bool,
}

impl<S: Store> Coordinator<S> {
    /// A node's standing (a new node's if never judged).
    pub(super) fn standing_of(&self, key: &PublicKey) -> Standing {
        self.standing
            .get(key)
            .copied()
            .unwrap_or_else(|| Standing::new(&self.cfg.verify, key))
    }

    /// Change a node's standing and save it.
    pub(super) fn update_standing(
        &mut self,
        key: &PublicKey,
        f: impl FnOnce(&mut Standing, &VerifyPolicy),
    ) -> Result<Standing, StoreError> {
        let mut st = self.standing_of(key);
        f(&mut st, &self.cfg.verify);
        self.store.put_standing(key, &st)?;
        self.standing.insert(*key, st);
        Ok(st)
    }

    /// The nodes that could be chosen for a check instead of `key`, each
    /// with its weight (computed once per lease request, and only while a
    /// check waits): at most [`MAX_RIVALS`] of the nodes with room, taken
    /// in the order of a set seeded at random by this process (so no node
    /// can place itself among them), which keeps each node's chance of a
    /// check in proportion to its weight while the cost of a lease stays
    /// the same with 100,000 nodes as with 100.
    pub(super) fn check_rivals(&self, key: &PublicKey) -> Vec<(PublicKey, f64)> {
        if self.checks.is_empty() {
            return Vec::new();
        }
        self.nodes
            .with_room()
            .filter(|(k, n)| *k != key && !n.draining && !self.quarantine.contains_key(k))
            .take(MAX_RIVALS)
            .map(|(k, _)| (*k, self.check_weight(k)))
            .collect()
    }

    /// Does `key` run re-execution `check` now? Among `key` and its
    /// `rivals` (connected nodes with room, not draining or quarantined)
    /// that [may run it](Self::eligible_for_check), the pool chooses one —
    /// not whoever asks first — by a draw keyed with its secret and
    /// weighted by standing (a trusted node weighs [`TRUSTED_WEIGHT`],
    /// another `1 + min(confirmed, decide_after)`), so fresh keys made to
    /// take checks rarely get them while nodes with a record are about.
    /// The draw is the same for the same check and node, so asking again
    /// changes nothing. Cost per check: one SHA-256, a multiply-xor per
    /// rival, and the eligibility of the rivals that draw better than `key`.
    pub(super) fn may_check_among(
        &self,
        key: &PublicKey,
        check: &Check,
        rivals: &[(PublicKey, f64)],
    ) -> bool {
        if !self.eligible_for_check(key, check) {
            return false;
        }
        let seed = self.check_seed(check);
        let mine = check_draw(seed, key, self.check_weight(key));
        !rivals
            .iter()
            .any(|(k, w)| check_draw(seed, k, *w) < mine && self.eligible_for_check(k, check))
    }

    /// A node's weight in the choice of checkers.
    fn check_weight(&self, key: &PublicKey) -> f64 {
        if self.cfg.verify.trusted.contains(key) {
            TRUSTED_WEIGHT
        } else {
            let st = self.standing_of(key);
            1.0 + st.confirmed.min(self.cfg.verify.decide_after) as f64
        }
    }

    /// The secret seed of the choice for one round of one check.
    fn check_seed(&self, check: &Check) -> u64 {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        h.update(b"tidepool/check-choice/v1");
        h.update(self.secret);
        h.update(check.target.0.to_be_bytes());
        h.update((check.exclude.len() as u64).to_be_bytes());
        let d = h.finalize();
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }

    /// May `key` run re-execution `check` now? Never a node that ran the
    /// task before, nor one of the same operator; a node of the same
    /// hardware class only if no other suitable node has room; a decider
    /// goes to a trusted node whenever one is connected that may run it.
    pub(super) fn eligible_for_check(&self, key: &PublicKey, check: &Check) -> bool {
        let Some(node) = self.nodes.get(key) else {
            return false;
        };
        let basic = |k: &PublicKey, n: &Node| -> bool {
            if check.exclude.contains(k) {
                return false;
            }
            if let Some(op) = &n.caps.operator {
                if check.exclude.iter().any(|e| {
                    self.nodes
                        .get(e)
                        .is_some_and(|x| x.caps.operator.as_ref() == Some(op))
                }) {
                    return false;
                }
            }
            self.bundles.get(&check.bundle).is_some_and(|b| {
                b.missing.is_empty()
                    && can_run(&n.caps, &b.manifest)
                    && (b.manifest.determinism != Determinism::Exact
                        || check.engines.iter().all(|e| n.caps.engines.contains(e)))
            })
        };
        if !basic(key, node) {
            return false;
        }
        let trusted = &self.cfg.verify.trusted;
        if check.trusted_only && !trusted.contains(key) {
            return false;
        }
        // A fresh key may decide only between a trusted node's execution
        // and another: then any agreeing pair it makes either includes the
        // trusted node (and convicts) or does not (and only disputes).
        let trusted_ran = check.exclude.iter().any(|k| trusted.contains(k));
        if check.decider && !trusted_ran && !self.may_decide(key) {
            return false;
        }
        if check.decider && !trusted.contains(key) {
            // A disagreement waits for a connected trusted node that may
            // run it, even a busy one.
            let other_trusted = trusted.iter().any(|k| {
                k != key
                    && self
                        .nodes
                        .get(k)
                        .is_some_and(|n| n.is_connected() && basic(k, n))
            });
            if other_trusted {
                return false;
            }
        }
        let same_class = |n: &Node| {
            n.caps.hardware.is_some()
                && check.exclude.iter().any(|e| {
                    self.nodes
                        .get(e)
                        .is_some_and(|x| x.caps.hardware == n.caps.hardware)
                })
        };
        if same_class(node) {
            let other_class = self
                .nodes
                .with_room()
                .any(|(k, n)| k != key && basic(k, n) && !same_class(n));
            if other_class {
                return false;
            }
        }
        true
    }

    /// May `key` decide a disagreement? A trusted node, or one with
    /// `decide_after` confirmed results and no strike (a fresh key never).
    pub(super) fn may_decide(&self, key: &PublicKey) -> bool {
        if self.cfg.verify.trusted.contains(key) {
            return true;
        }
        let st = self.standing_of(key);
        st.strikes == 0 && st.confirmed >= self.cfg.verify.decide_after
    }

    /// Does a decision by these agreeing executions convict? Only when
    /// one of them ran on a trusted node.
    fn convicts(&self, agreeing: &[Option<PublicKey>]) -> bool {
        agreeing
            .iter()
            .flatten()
            .any(|k| self.cfg.verify.trusted.contains(k))
    }

    /// The hidden job of `kind` for `bundle`.
    pub(super) fn hidden_job(
        &mut self,
        bundle: Digest,
        kind: JobKind,
    ) -> Result<JobId, StoreError> {
        if let Some(&job) = self.hidden.get(&(bundle, kind)) {
            return Ok(job);
        }
        let job = self.store.hidden_job(&bundle, kind)?;
        self.hidden.insert((bundle, kind), job);
        self.kinds.insert(job, kind);
        self.jobs
            .entry(job)
            .or_insert((bundle, JobCounts::default()));
        Ok(job)
    }

    /// What a re-execution of `target` must respect, from the store: the
    /// nodes that ran it already, and whether this execution decides a
    /// disagreement.
    pub(super) fn check_context(
        &mut self,
        target: TaskId,
        bundle: Digest,
        this: TaskId,
    ) -> Result<Check, StoreError> {
        let row = self.store.result(target)?;
        let prior: Vec<ResultRow> = self
            .store
            .checks_of(target)?
            .into_iter()
            .filter(|c| c.task != this)
            .collect();
        let mut exclude: Vec<PublicKey> = row.as_ref().and_then(|r| r.node).into_iter().collect();
        exclude.extend(prior.iter().filter_map(|c| c.node));
        let decider = match (&row, prior.last()) {
            (Some(r), Some(last)) => !self.rows_agree(bundle, r, last),
            _ => false,
        };
        let trusted_only = decider
            && row
                .as_ref()
                .is_some_and(|r| r.verified == Verified::Disputed);
        Ok(Check {
            target,
            bundle,
            exclude,
            decider,
            trusted_only,
            engines: row.map(|r| r.engines).unwrap_or_default(),
            decoy: false,
        })
    }

    /// Do two stored results agree under the bundle's tier?
    pub(super) fn rows_agree(&self, bundle: Digest, a: &ResultRow, b: &ResultRow) -> bool {
        let tier = self
            .bundles
            .get(&bundle)
            .map(|b| b.manifest.determinism.clone())
            .unwrap_or_default();
        match (decode_outcome(&a.outcome), decode_outcome(&b.outcome)) {
            (Some(x), Some(y)) => agree(&tier, &x, &y),
            _ => false,
        }
    }

    /// Queue a re-execution of `target`, marking the target `mark`.
    pub(super) fn spawn_check(
        &mut self,
        target: TaskId,
        bundle: Digest,
        exclude: Vec<PublicKey>,
        decider: bool,
        mark: Verified,
    ) -> Result<TaskId, StoreError> {
        let engines = self
            .store
            .result(target)?
            .map(|r| r.engines)
            .unwrap_or_default();
        let job = self.hidden_job(bundle, JobKind::Check)?;
        let task = self.store.insert_check(job, target, mark)?;
        if let Some((_, c)) = self.jobs.get_mut(&job) {
            c.tasks += 1;
            c.queued += 1;
        }
        self.checks.insert(
            task,
            Check {
                target,
                bundle,
                exclude,
                decider,
                trusted_only: false,
                engines,
                decoy: false,
            },
        );
        let q = Queued {
            task,
            job,
            attempts: 0,
            failed_on: None,
            since: self.latest,
        };
        if decider {
            self.queues.push_check_front(q);
        } else {
            self.queues.push_check_back(q);
        }
        Ok(task)
    }

    /// After a result is stored: sample it for a re-execution, decide a
    /// re-execution, or judge a canary.
    pub(super) fn after_accept(
        &mut self,
        now: Instant,
        a: &Acceptance,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        match self.kinds.get(&lease.job).copied().unwrap_or(JobKind::User) {
            JobKind::User => {
                let Some(b) = self.bundles.get(&lease.bundle) else {
                    return Ok(());
                };
                let rate = match b.manifest.verification.sampling {
                    Sampling::Always => 1.0,
                    Sampling::None => 0.0,
                    Sampling::Reputation => self.standing_of(&a.node).sampling_rate(),
                };
                let draw = audit_draw(
                    &self.secret,
                    LeaseId {
                        task: a.task,
                        attempt: a.attempt,
                    },
                    &a.node,
                );
                if draw < rate {
                    self.spawn_check(
                        a.task,
                        lease.bundle,
                        vec![a.node],
                        false,
                        Verified::Checking,
                    )?;
                }
            }
            JobKind::Check => {
                if let Some(check) = self.checks.remove(&a.task) {
                    self.vstats.executed += 1;
                    if check.decoy {
                        self.judge_decoy(now, a, &check)?;
                    } else {
                        self.decide(now, a, check)?;
                    }
                }
            }
            JobKind::Canary => {
                self.canary_origins.remove(&a.task);
                let Some(row) = self.store.result(a.task)? else {
                    return Ok(());
                };
                let tier = self
                    .bundles
                    .get(&lease.bundle)
                    .map(|b| b.manifest.determinism.clone())
                    .unwrap_or_default();
                let expect = decode_outcome(&row.expect);
                let got = decode_outcome(&Some(a.outcome.clone()));
                self.vstats.canaries += 1;
                match (expect, got) {
                    (Some(e), Some(g)) if agree(&tier, &e, &g) => {
                        self.update_standing(&a.node, Standing::confirm)?;
                        self.vstats.confirmed += 1;
                    }
                    _ => {
                        self.vstats.mismatches += 1;
                        self.strike(now, &a.node, a.task)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A re-execution finished: compare, and when it decides, penalise the
    /// liar and keep the agreed result.
    pub(super) fn decide(
        &mut self,
        now: Instant,
        a: &Acceptance,
        check: Check,
    ) -> Result<(), StoreError> {
        let Some(target) = self.store.result(check.target)? else {
            return Ok(());
        };
        let Some(original) = target.node else {
            return Ok(());
        };
        let exact = self
            .bundles
            .get(&check.bundle)
            .is_some_and(|b| b.manifest.determinism == Determinism::Exact);
        if exact && a.engines != target.engines {
            // Bytes from another engine say nothing under `exact` (the
            // grant rule prevents it; a node whose hello lied about its
            // engines gets here): no mismatch, no strike; run it again on
            // a node with the producer's engines.
            tracing::warn!(
                task = %check.target,
                node = %a.node.short(),
                "an exact-tier check ran on other engines ({:?}, the result's are {:?}); run again",
                a.engines,
                target.engines
            );
            let mut exclude = check.exclude.clone();
            exclude.push(a.node);
            let mark = while_checked(target.verified);
            self.spawn_check(check.target, check.bundle, exclude, check.decider, mark)?;
            return Ok(());
        }
        let mine = ResultRow {
            task: a.task,
            node: Some(a.node),
            outcome: Some(a.outcome.clone()),
            engines: a.engines.clone(),
            ..target.clone()
        };
        // Earlier re-executions of this result in this dispute: those since
        // the last one that agreed with the stored result (earlier rounds
        // were decided already).
        let mut prior: Vec<ResultRow> = self
            .store
            .checks_of(check.target)?
            .into_iter()
            .filter(|c| c.task != a.task)
            .collect();
        if let Some(i) = prior
            .iter()
            .rposition(|c| self.rows_agree(check.bundle, &target, c))
        {
            prior.drain(..=i);
        }
        let challenged = target.challenge == Some(ChallengeState::Pending);
        let verdict: ChallengeState;
        if self.rows_agree(check.bundle, &target, &mine) {
            // The stored result stands. A decider also convicts the
            // executions of this dispute that disagreed with it, when the
            // agreeing pair includes a trusted node.
            if check.decider && self.convicts(&[target.node, Some(a.node)]) {
                let liars: Vec<PublicKey> = prior
                    .iter()
                    .filter(|c| !self.rows_agree(check.bundle, &target, c))
                    .filter_map(|c| c.node)
                    .collect();
                for liar in liars {
                    self.strike(now, &liar, check.target)?;
                }
            }
            // A challenge is the submitter's choice, not the pool's draw: a
            // submitter could pump a node's reputation with challenges of
            // results it knows are right, so those confirm nothing.
            if !challenged {
                self.update_standing(&original, Standing::confirm)?;
            }
            self.vstats.confirmed += 1;
            self.store.set_verified(check.target, Verified::Verified)?;
            verdict = ChallengeState::Rejected;
        } else if check.decider && {
            let agreeing: Vec<&ResultRow> = prior
                .iter()
                .filter(|c| self.rows_agree(check.bundle, c, &mine))
                .collect();
            !agreeing.is_empty()
                && !agreeing
                    .iter()
                    .any(|c| self.convicts(&[c.node, Some(a.node)]))
        } {
            // Two executions agree against the stored result, but neither
            // ran on a trusted node: fresh keys could be colluding to frame
            // the producer. Nobody is struck and nothing is replaced; the
            // result is `disputed` (never served from the cache) until a
            // trusted node decides.
            self.store.set_verified(check.target, Verified::Disputed)?;
            self.events
                .push_back(PoolEvent::Disputed { task: check.target });
            let decides_later =
                !self.cfg.verify.trusted.is_empty() && 1 + prior.len() + 1 < MAX_EXECUTIONS;
            if decides_later {
                let mut exclude = check.exclude.clone();
                exclude.push(a.node);
                let task = self.spawn_check(
                    check.target,
                    check.bundle,
                    exclude,
                    true,
                    Verified::Disputed,
                )?;
                if let Some(c) = self.checks.get_mut(&task) {
                    c.trusted_only = true;
                }
            }
            // A challenge stays pending while a trusted node is to decide.
            if challenged && !decides_later {
                self.store
                    .set_challenge(check.target, ChallengeState::Undecided)?;
            }
            return Ok(());
        } else if let Some(second) = prior
            .iter()
            .rev()
            .find(|c| check.decider && self.rows_agree(check.bundle, c, &mine))
            .cloned()
        {
            // Two independent executions agree against the stored result:
            // replace it with the agreed one and penalise its node.
            let now_unix = self.unix(now);
            self.store
                .replace_result(check.target, a.task, &[second.task, a.task], now_unix)?;
            self.vstats.replaced += 1;
            self.events
                .push_back(PoolEvent::Replaced { task: check.target });
            if let Some(n) = second.node {
                self.update_standing(&n, Standing::confirm)?;
            }
            self.strike(now, &original, check.target)?;
            verdict = ChallengeState::Upheld;
        } else if 1 + prior.len() + 1 < MAX_EXECUTIONS {
            // Nothing agrees yet: one more execution, on yet another node.
            if !check.decider {
                self.vstats.mismatches += 1;
            }
            let mut exclude = check.exclude.clone();
            exclude.push(a.node);
            let mark = while_checked(target.verified);
            self.spawn_check(check.target, check.bundle, exclude, true, mark)?;
            return Ok(());
        } else {
            self.store.set_verified(check.target, Verified::Disputed)?;
            verdict = ChallengeState::Undecided;
        }
        if challenged {
            self.store.set_challenge(check.target, verdict)?;
        }
        Ok(())
    }

    /// A node was caught: strike, quarantine, maybe ban; re-check its most
    /// recent unverified results (not served from the cache meanwhile).
    pub(super) fn strike(
        &mut self,
        now: Instant,
        node: &PublicKey,
        task: TaskId,
    ) -> Result<(), StoreError> {
        let now_unix = self.unix(now);
        let st = self.update_standing(node, |s, p| s.strike(p, now_unix))?;
        self.quarantine
            .insert(*node, now + self.cfg.verify.quarantine);
        self.events.push_back(PoolEvent::Caught {
            node: *node,
            task,
            strikes: st.strikes,
            banned: st.banned,
        });
        if st.banned {
            // Refused from now on: what it holds goes to other nodes now.
            let held: Vec<TaskId> = self
                .nodes
                .get(node)
                .map(|n| n.leases.iter().copied().collect())
                .unwrap_or_default();
            for t in held {
                self.release(
                    now,
                    t,
                    &format!("node {} was banned", node.short()),
                    Some(*node),
                )?;
            }
        }
        let recent = self
            .store
            .recent_to_recheck(node, self.cfg.verify.lookback)?;
        for (t, job) in recent {
            let Some(&(bundle, _)) = self.jobs.get(&job) else {
                continue;
            };
            self.spawn_check(t, bundle, vec![*node], false, Verified::Suspect)?;
        }
        // What it confirmed as a checker stands on its word alone unless a
        // trusted node agreed too: re-check those on a third node.
        let confirmed = self.store.confirmed_by(node, self.cfg.verify.lookback)?;
        for (t, job) in confirmed {
            let Some(&(bundle, _)) = self.jobs.get(&job) else {
                continue;
            };
            let Some(target) = self.store.result(t)? else {
                continue;
            };
            let Some(producer) = target.node else {
                continue;
            };
            let agreeing: Vec<Option<PublicKey>> = self
                .store
                .checks_of(t)?
                .into_iter()
                .filter(|c| self.rows_agree(bundle, &target, c))
                .map(|c| c.node)
                .collect();
            if !agreeing.contains(&Some(*node)) || self.convicts(&agreeing) {
                continue;
            }
            self.spawn_check(t, bundle, vec![producer, *node], false, Verified::Suspect)?;
        }
        Ok(())
    }

    /// With probability `canary_rate`, add a canary of one of the granted
    /// bundles that this node has not had, at a random place in the grant.
    pub(super) fn maybe_add_canary(
        &mut self,
        key: &PublicKey,
        picked: &mut Vec<(Queued, Digest)>,
    ) -> Result<(), StoreError> {
        let rate = self.cfg.verify.canary_rate;
        if rate <= 0.0 || self.canaries.is_empty() {
            return Ok(());
        }
        self.grants_made += 1;
        let draw = |n: u64, salt: u32| {
            audit_draw(
                &self.secret,
                LeaseId {
                    task: TaskId(n),
                    attempt: u32::MAX - salt,
                },
                key,
            )
        };
        if draw(self.grants_made, 0) >= rate {
            return Ok(());
        }
        let place = draw(self.grants_made, 1);
        let choice = picked.iter().find_map(|(_, b)| {
            self.canaries.get(b).and_then(|ids| {
                ids.iter()
                    .find(|id| !self.canaries_given.contains(&(**id, *key)))
                    .map(|id| (*id, *b))
            })
        });
        let Some((canary, bundle)) = choice else {
            return Ok(());
        };
        let job = self.hidden_job(bundle, JobKind::Canary)?;
        let (task, origin) = self.store.insert_canary_task(job, canary)?;
        if let Some(origin) = origin {
            self.canary_origins.insert(task, origin);
        }
        self.canaries_given.insert((canary, *key));
        self.insert_hidden_task(picked, task, job, bundle, place);
        Ok(())
    }

    /// A hidden task (canary, decoy) just made for this grant: counted in
    /// its job and put at `place` (a draw in [0, 1)) among the picked tasks,
    /// so its position says nothing.
    pub(super) fn insert_hidden_task(
        &mut self,
        picked: &mut Vec<(Queued, Digest)>,
        task: TaskId,
        job: JobId,
        bundle: Digest,
        place: f64,
    ) {
        if let Some((_, c)) = self.jobs.get_mut(&job) {
            c.tasks += 1;
            c.queued += 1;
        }
        let at = ((place * (picked.len() + 1) as f64) as usize).min(picked.len());
        let q = Queued {
            task,
            job,
            attempts: 0,
            failed_on: None,
            since: self.latest,
        };
        picked.insert(at, (q, bundle));
    }

    /// A client disputes a result: only of its own jobs (the pool owner's
    /// keys: any), and at most `challenges_per_hour` an hour (each costs the
    /// pool re-executions). Then as [`handle_challenge`](Self::handle_challenge).
    pub fn handle_client_challenge(
        &mut self,
        now: Instant,
        client: &PublicKey,
        task: TaskId,
    ) -> Result<Challenged, Refusal> {
        let not_found = || refusal(ErrorCode::NotFound, format!("no task {task}"));
        let row = self.store.result(task)?.ok_or_else(not_found)?;
        if !self.sees(client, row.job) {
            return Err(not_found());
        }
        let limit = self.cfg.challenges_per_hour as usize;
        let admin = self.is_admin(client);
        let times = self.challenge_times.entry(*client).or_default();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= CHALLENGE_WINDOW)
        {
            times.pop_front();
        }
        if !admin && times.len() >= limit {
            return Err(refusal(
                ErrorCode::Busy,
                format!(
                    "{limit} challenges in the last hour is this pool's limit per client (challenges_per_hour); try again later"
                ),
            ));
        }
        let answer = self.handle_challenge(now, task)?;
        if let Some(times) = self.challenge_times.get_mut(client) {
            times.push_back(now);
        }
        Ok(answer)
    }

    /// The submitter disputes a result: re-execute it on another node.
    /// Returns the task checked (a cached copy's original), the named
    /// task's job and index, and the state.
    pub fn handle_challenge(&mut self, now: Instant, task: TaskId) -> Result<Challenged, Refusal> {
        let now_unix = self.unix(now);
        let row = self
            .store
            .result(task)?
            .ok_or_else(|| refusal(ErrorCode::NotFound, format!("no task {task}")))?;
        if self.kinds.contains_key(&row.job) {
            return Err(refusal(ErrorCode::NotFound, format!("no task {task}")));
        }
        if self.purged.contains(&row.job) {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("task {task}'s input was removed by the pool's retention"),
            ));
        }
        if !row.done {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("task {task} has no result to challenge yet"),
            ));
        }
        let named = (row.job, row.index);
        let row = match row.cached_from {
            Some(from) => self.store.result(from)?.ok_or_else(|| {
                refusal(
                    ErrorCode::NotFound,
                    format!("no task {from} (cache source)"),
                )
            })?,
            None => row,
        };
        let target = row.task;
        let Some(&(bundle, _)) = self.jobs.get(&row.job) else {
            return Err(refusal(
                ErrorCode::NotFound,
                format!("no job of task {task}"),
            ));
        };
        let window = self
            .bundles
            .get(&bundle)
            .map_or(0, |b| b.manifest.verification.challenge_window_secs);
        if now_unix > row.done_at.saturating_add(window) {
            return Err(refusal(
                ErrorCode::Invalid,
                format!(
                    "the challenge window of task {target} closed {} s after its result",
                    window
                ),
            ));
        }
        let answer = Challenged {
            target,
            job: named.0,
            index: named.1,
            state: ChallengeState::Pending,
        };
        if self.checks.values().any(|c| c.target == target) {
            self.store.set_challenge(target, ChallengeState::Pending)?;
            return Ok(answer);
        }
        // Any node but the one that produced the result.
        let exclude: Vec<PublicKey> = row.node.into_iter().collect();
        let mark = while_checked(row.verified);
        self.store.set_challenge(target, ChallengeState::Pending)?;
        self.spawn_check(target, bundle, exclude, false, mark)?;
        Ok(answer)
    }

    /// The pool owner adds canaries for a bundle; returns how many it has.
    pub fn handle_add_canaries(
        &mut self,
        client: &PublicKey,
        bundle: &Digest,
        items: Vec<Canary>,
    ) -> Result<u32, Refusal> {
        let Some(b) = self.bundles.get(bundle) else {
            return Err(refusal(
                ErrorCode::NotFound,
                format!("no bundle {bundle} is published on this pool"),
            ));
        };
        // A canary's expected answer convicts whoever disagrees with it:
        // only the bundle's own publisher (or the pool owner) may set one.
        if b.manifest.publisher != *client && !self.is_admin(client) {
            return Err(refusal(
                ErrorCode::Forbidden,
                "only the bundle's publisher or the pool owner may add canaries to it",
            ));
        }
        // Only results an independent execution confirmed become known
        // answers: a canary's answer convicts whoever disagrees with it.
        let mut rows: Vec<NewCanary> = Vec::with_capacity(items.len());
        for Canary { job, index } in items {
            let refuse = |why: &str| {
                Err(refusal(
                    ErrorCode::Invalid,
                    format!("job {job} input {index}: {why}"),
                ))
            };
            let of_bundle = self.jobs.get(&job).is_some_and(|(b, _)| b == bundle)
                && !self.kinds.contains_key(&job);
            if !of_bundle {
                return refuse("not a job of this bundle");
            }
            let Some(CanarySource {
                task,
                verified,
                input,
                outcome,
            }) = self.store.canary_source(job, index)?
            else {
                return refuse("no result (or a cached copy)");
            };
            if !matches!(verified, Verified::Verified | Verified::Replaced) {
                return refuse(&format!(
                    "its result is {}, not confirmed by an independent execution",
                    verified.name()
                ));
            }
            rows.push(NewCanary {
                input,
                expect: outcome,
                origin: task,
            });
        }
        let ids = self.store.add_canaries(bundle, &rows)?;
        let list = self.canaries.entry(*bundle).or_default();
        list.extend(ids);
        Ok(u32::try_from(list.len()).unwrap_or(u32::MAX))
    }

    /// The evidence kept for a task's replaced results (the replaced
    /// outcome, its signed receipt, the executions that agreed against it).
    pub fn evidence(&mut self, task: TaskId) -> Result<Vec<crate::store::Evidence>, StoreError> {
        self.store.evidence(task)
    }

    /// A node's standing, for tests and status.
    pub fn node_standing(&self, key: &PublicKey) -> Standing {
        self.standing_of(key)
    }

    /// Re-executions not yet decided.
    pub fn checks_pending(&self) -> usize {
        self.checks.len()
    }
}

/// What a result is marked while a re-execution checks it: a suspect one
/// stays suspect (not served from the cache), any other is `checking`.
fn while_checked(now: Verified) -> Verified {
    if now == Verified::Suspect {
        Verified::Suspect
    } else {
        Verified::Checking
    }
}

/// Decode a stored outcome.
pub(super) fn decode_outcome(bytes: &Option<Vec<u8>>) -> Option<Outcome> {
    bytes.as_ref().and_then(|b| rmp_serde::from_slice(b).ok())
}

/// One node's draw for a check (smallest wins): `-ln(u)/w`, `u` uniform in
/// `(0, 1]` from the check's secret seed mixed with the node's key
/// (splitmix64's finaliser), so the weighted choice is an exponential
/// race no node can predict without the seed.
fn check_draw(seed: u64, key: &PublicKey, weight: f64) -> f64 {
    let mut k = [0u8; 8];
    k.copy_from_slice(&key.0[..8]);
    let mut z = seed ^ u64::from_le_bytes(k);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    -u.ln() / weight
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_draw_is_a_weighted_race() {
        let a = PublicKey([1; 32]);
        let b = PublicKey([2; 32]);
        let n = 20_000u64;
        let wins = |wa: f64, wb: f64| {
            (0..n)
                .filter(|s| {
                    let seed = s.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    check_draw(seed, &a, wa) < check_draw(seed, &b, wb)
                })
                .count() as f64
                / n as f64
        };
        // Equal weights: half each; weight 100 against 1: ~100/101.
        assert!((wins(1.0, 1.0) - 0.5).abs() < 0.02);
        assert!((wins(100.0, 1.0) - 100.0 / 101.0).abs() < 0.01);
        assert!(wins(1.0, 1000.0) < 0.005);
    }
}
