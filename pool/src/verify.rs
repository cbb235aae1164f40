//! Verification policy and its pure parts: node standing (reputation,
//! strikes, quarantine), the audit draw, and how two outcomes are compared
//! under a bundle's determinism tier.
//!
//! The coordinator decides *when* to re-execute; this module says *how
//! often* (`s = max(1, r) / 10000`), *with what randomness* (a keyed hash of
//! the lease the node cannot compute, drawn after its receipt has committed
//! to the output digest) and *whether two results agree*. It never touches
//! the store or the queues.

use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;
use std::time::Duration;
use tidepool_proto::wire::LeaseId;
use tidepool_proto::PublicKey;

/// Reputation scale: a node at `FULL` has every result re-executed.
pub const FULL: u32 = 10_000;

/// The pool owner's verification policy (`[verification]` in `pool.toml`).
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    /// Reputation of a node never seen before (`10000`: every result checked).
    pub initial_reputation: u32,
    /// How much each confirmed result lowers reputation (`50`: ~200
    /// confirmed results take a new node to the floor of 0.01% sampling).
    pub step: u32,
    /// How long a node caught with a wrong result gets no new tasks.
    pub quarantine: Duration,
    /// Strikes after which a node is banned for good (refused at hello).
    pub ban_after: u32,
    /// How many of a caught node's most recent unverified results are
    /// re-checked.
    pub lookback: u32,
    /// Pool-owned nodes, preferred for deciding executions. A strike needs
    /// a decision whose agreeing executions include one of them (or a
    /// canary's known answer): keys anyone can make never convict alone.
    pub trusted: BTreeSet<PublicKey>,
    /// Reputation a trusted node starts at (`0`: its results are sampled at
    /// the floor from its first — the pool owner's own fleet is not
    /// re-executed while it builds standing; `10000`: checked like anyone's).
    pub trusted_reputation: u32,
    /// Confirmed results (with no strike) before an untrusted node may
    /// decide a disagreement at all; below it a node may check, never
    /// decide.
    pub decide_after: u64,
    /// Chance that a lease grant also carries a canary (known-answer task),
    /// when canaries exist that the node has not been given.
    pub canary_rate: f64,
    /// Chance, per `llm`-tier check granted, that the node is also given a
    /// decoy: a check of an already verified result whose replayed tokens
    /// the pool corrupted at one place. An honest verifier rejects the
    /// corrupted token; one that accepts it (a lazy verifier echoing the
    /// claim) is struck. A lazy verifier survives `n` checks with chance
    /// `(1 - decoy_rate)^n`.
    pub decoy_rate: f64,
    /// Secret for the audit draw; `None`: a random one per process. Tests
    /// fix it to make runs reproducible.
    pub secret: Option<[u8; 32]>,
}

impl Default for VerifyPolicy {
    /// New nodes at 10000, −50 per confirmed result, 10 minutes of
    /// quarantine, banned at the 3rd strike, look back 256 results, no
    /// trusted nodes, untrusted deciders after 100 confirmed results,
    /// canaries on 1% of grants, decoys on 5% of llm checks.
    fn default() -> Self {
        Self {
            initial_reputation: FULL,
            step: 50,
            quarantine: Duration::from_secs(600),
            ban_after: 3,
            lookback: 256,
            trusted: BTreeSet::new(),
            trusted_reputation: 0,
            decide_after: 100,
            canary_rate: 0.01,
            decoy_rate: 0.05,
            secret: None,
        }
    }
}

/// A node's verification record; persisted in the store's `nodes` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Reputation in `[0, 10000]`: higher means checked more often.
    pub reputation: u32,
    /// Times caught with a wrong result.
    pub strikes: u32,
    /// Results confirmed by an independent execution or a canary.
    pub confirmed: u64,
    /// Unix time until which the node gets no new tasks (0: none).
    pub quarantined_until: u64,
    /// Refused for good.
    pub banned: bool,
}

impl Standing {
    /// A node seen for the first time: at the policy's initial reputation,
    /// or for a node the pool owner listed as trusted at
    /// `trusted_reputation` (by default 0, the floor: 0.01 % of results
    /// re-executed). A strike still puts it back to full.
    pub fn new(policy: &VerifyPolicy, key: &PublicKey) -> Self {
        let start = if policy.trusted.contains(key) {
            policy.trusted_reputation
        } else {
            policy.initial_reputation
        }
        .min(FULL);
        Self {
            reputation: start,
            strikes: 0,
            confirmed: 0,
            quarantined_until: 0,
            banned: false,
        }
    }

    /// Share of results re-executed: `max(1, r) / 10000`.
    pub fn sampling_rate(&self) -> f64 {
        f64::from(self.reputation.max(1)) / f64::from(FULL)
    }

    /// A result of this node was confirmed.
    pub fn confirm(&mut self, policy: &VerifyPolicy) {
        self.reputation = self.reputation.saturating_sub(policy.step);
        self.confirmed += 1;
    }

    /// The node was caught: reputation back to full, a strike, quarantine,
    /// and a ban at `ban_after` strikes.
    pub fn strike(&mut self, policy: &VerifyPolicy, now_unix: u64) {
        self.reputation = FULL;
        self.strikes += 1;
        self.quarantined_until = now_unix + policy.quarantine.as_secs();
        if self.strikes >= policy.ban_after {
            self.banned = true;
        }
    }
}

/// The audit draw for one result: a number in `[0, 1)` from a keyed hash of
/// the lease and node. The node cannot predict it (it lacks `secret`), and
/// the pool draws it only after the signed receipt has committed to the
/// output, so the node cannot choose to be honest only when checked.
pub fn audit_draw(secret: &[u8; 32], lease: LeaseId, node: &PublicKey) -> f64 {
    let mut h = Sha256::new();
    h.update(b"tidepool/audit/v1");
    h.update(secret);
    h.update(lease.task.0.to_be_bytes());
    h.update(lease.attempt.to_be_bytes());
    h.update(node.0);
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    // 53 random bits → a uniformly spaced f64 in [0, 1).
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// How two outcomes are compared lives in `tidepool_proto::compare`, which
/// nodes (`tidepool replay`) share; re-exported here for the pool's callers.
pub use tidepool_proto::compare::{agree, strict_json, DEFAULT_ABS, DEFAULT_REL};

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::manifest::Determinism;
    use tidepool_proto::wire::{Bytes, Outcome, TaskId};

    fn out(s: &str) -> Outcome {
        Outcome::Output(Bytes(s.as_bytes().to_vec()))
    }

    fn tol(abs: Option<&str>, rel: Option<&str>, cosine: Option<&str>) -> Determinism {
        Determinism::Tolerance {
            abs: abs.map(Into::into),
            rel: rel.map(Into::into),
            cosine: cosine.map(Into::into),
        }
    }

    #[test]
    fn exact_needs_the_same_bytes() {
        assert!(agree(&Determinism::Exact, &out("[1.0]"), &out("[1.0]")));
        assert!(!agree(&Determinism::Exact, &out("[1.0]"), &out("[1.00]")));
    }

    #[test]
    fn tolerance_compares_numbers_structure_and_cosine() {
        let t = tol(Some("1e-5"), None, Some("0.9999"));
        let a = out(r#"{"embeddings":[[0.6,0.8]],"model":"m"}"#);
        let near = out(r#"{"embeddings":[[0.600001,0.799999]],"model":"m"}"#);
        let far = out(r#"{"embeddings":[[0.8,0.6]],"model":"m"}"#);
        let renamed = out(r#"{"embeddings":[[0.6,0.8]],"model":"other"}"#);
        let short = out(r#"{"embeddings":[[0.6]],"model":"m"}"#);
        assert!(agree(&t, &a, &near));
        assert!(!agree(&t, &a, &far));
        assert!(!agree(&t, &a, &renamed));
        assert!(!agree(&t, &a, &short));
        // Cosine alone: a scaled vector agrees, a rotated one does not.
        let c = tol(None, None, Some("0.9999"));
        assert!(agree(&c, &out("[3,4]"), &out("[6,8]")));
        assert!(!agree(&c, &out("[3,4]"), &out("[4,3]")));
        // Relative.
        let r = tol(None, Some("0.01"), None);
        assert!(agree(&r, &out("[100]"), &out("[100.5]")));
        assert!(!agree(&r, &out("[100]"), &out("[102]")));
    }

    #[test]
    fn with_only_cosine_every_scalar_is_still_compared() {
        let c = tol(None, None, Some("0.999"));
        // Scalars and one-element vectors: the defaults apply.
        assert!(!agree(
            &c,
            &out(r#"{"score":0.5}"#),
            &out(r#"{"score":0.9}"#)
        ));
        assert!(agree(
            &c,
            &out(r#"{"score":0.5}"#),
            &out(r#"{"score":0.5000001}"#)
        ));
        assert!(!agree(&c, &out("[0.5]"), &out("[-0.5]")));
        assert!(!agree(&c, &out("0.25"), &out("0.75")));
        // Integers are counts and ids: equal or not.
        assert!(!agree(
            &c,
            &out(r#"{"n":1000000}"#),
            &out(r#"{"n":1000001}"#)
        ));
        let loose = tol(Some("10"), None, None);
        assert!(!agree(&loose, &out(r#"{"n":3}"#), &out(r#"{"n":4}"#)));
        assert!(agree(&loose, &out(r#"{"x":3.0}"#), &out(r#"{"x":4.5}"#)));
    }

    #[test]
    fn repeated_keys_are_not_json_so_only_equal_bytes_agree() {
        let t = tol(Some("1"), None, None);
        // Parsed last-wins these would be {"a":2}: they must not agree.
        assert!(!agree(&t, &out(r#"{"a":1,"a":2}"#), &out(r#"{"a":2}"#)));
        assert!(!agree(
            &t,
            &out(r#"{"a":2}"#),
            &out(r#"{"b":{"a":1,"a":2}}"#)
        ));
        assert!(agree(
            &t,
            &out(r#"{"a":1,"a":2}"#),
            &out(r#"{"a":1,"a":2}"#)
        ));
        assert!(strict_json(br#"{"a":{"b":1,"b":1}}"#).is_none());
        assert!(strict_json(br#"[{"a":1},{"a":1}]"#).is_some());
    }

    #[test]
    fn tolerance_reads_raw_f32_vectors() {
        let t = tol(Some("1e-4"), None, None);
        let v =
            |xs: &[f32]| Outcome::Output(Bytes(xs.iter().flat_map(|x| x.to_le_bytes()).collect()));
        assert!(agree(&t, &v(&[0.5, 0.25]), &v(&[0.50001, 0.25])));
        assert!(!agree(&t, &v(&[0.5, 0.25]), &v(&[0.6, 0.25])));
    }

    #[test]
    fn job_errors_must_match_exactly_under_any_tier() {
        let e = |m: &str| Outcome::JobError {
            code: "invalid-input".into(),
            message: m.into(),
        };
        let t = tol(Some("1"), None, None);
        assert!(agree(&t, &e("x"), &e("x")));
        assert!(!agree(&t, &e("x"), &e("y")));
        assert!(!agree(&t, &e("x"), &out("[1]")));
    }

    #[test]
    fn standing_follows_the_policy() {
        let mut p = VerifyPolicy::default();
        let stranger =
            tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Node, &[1; 32]).public();
        let own =
            tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Node, &[2; 32]).public();
        p.trusted.insert(own);
        let mut s = Standing::new(&p, &stranger);
        assert_eq!(s.sampling_rate(), 1.0);
        // The pool owner's own node starts at the floor; a strike still
        // puts it back to every result checked.
        let mut t = Standing::new(&p, &own);
        assert_eq!(t.sampling_rate(), 0.0001);
        t.strike(&p, 1000);
        assert_eq!(t.sampling_rate(), 1.0);
        for _ in 0..200 {
            s.confirm(&p);
        }
        assert_eq!(s.reputation, 0);
        assert_eq!(s.sampling_rate(), 0.0001);
        s.strike(&p, 1000);
        assert_eq!(s.reputation, FULL);
        assert_eq!(s.quarantined_until, 1600);
        assert!(!s.banned);
        s.strike(&p, 2000);
        s.strike(&p, 3000);
        assert!(s.banned, "third strike bans");
    }

    #[test]
    fn audit_draw_is_uniform_and_keyed() {
        let node = PublicKey([7; 32]);
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        let n = 20_000u64;
        let below = (0..n)
            .filter(|&t| {
                audit_draw(
                    &k1,
                    LeaseId {
                        task: TaskId(t),
                        attempt: 1,
                    },
                    &node,
                ) < 0.1
            })
            .count();
        // Binomial(20000, 0.1): sd ≈ 42; allow 5 sd.
        assert!((1790..=2210).contains(&below), "{below}");
        let same = (0..1000u64)
            .filter(|&t| {
                let l = LeaseId {
                    task: TaskId(t),
                    attempt: 1,
                };
                (audit_draw(&k1, l, &node) < 0.5) == (audit_draw(&k2, l, &node) < 0.5)
            })
            .count();
        assert!(
            (400..=600).contains(&same),
            "another secret draws independently: {same}"
        );
    }
}
