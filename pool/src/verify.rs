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
use tidepool_proto::manifest::Determinism;
use tidepool_proto::wire::{LeaseId, Outcome};
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
    /// Confirmed results (with no strike) before an untrusted node may
    /// decide a disagreement at all; below it a node may check, never
    /// decide.
    pub decide_after: u64,
    /// Chance that a lease grant also carries a canary (known-answer task),
    /// when canaries exist that the node has not been given.
    pub canary_rate: f64,
    /// Secret for the audit draw; `None`: a random one per process. Tests
    /// fix it to make runs reproducible.
    pub secret: Option<[u8; 32]>,
}

impl Default for VerifyPolicy {
    /// New nodes at 10000, −50 per confirmed result, 10 minutes of
    /// quarantine, banned at the 3rd strike, look back 256 results, no
    /// trusted nodes, untrusted deciders after 100 confirmed results,
    /// canaries on 1% of grants.
    fn default() -> Self {
        Self {
            initial_reputation: FULL,
            step: 50,
            quarantine: Duration::from_secs(600),
            ban_after: 3,
            lookback: 256,
            trusted: BTreeSet::new(),
            decide_after: 100,
            canary_rate: 0.01,
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
    /// A node seen for the first time.
    pub fn new(policy: &VerifyPolicy) -> Self {
        Self {
            reputation: policy.initial_reputation.min(FULL),
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

/// Defaults for a `tolerance` tier that sets only `cosine`: every number
/// that is not an element of a vector (a scalar, a one-element array) is
/// still compared, within this absolute difference...
pub const DEFAULT_ABS: f64 = 1e-6;
/// ... or this relative difference.
pub const DEFAULT_REL: f64 = 1e-5;

/// Do two outcomes of the same task agree under `tier`?
///
/// - `exact`: same bytes.
/// - `llm`: same bytes too, but the check that produced the second outcome
///   replayed the first one's transcript (ADR 0008): it equals the claimed
///   output exactly when every claimed token was within the manifest's
///   policy, and is the checker's own generation from the first token that
///   was not.
/// - `tolerance`: job errors must be equal; outputs that are both JSON
///   (strict: a repeated key in an object makes it not JSON) are walked
///   together: same structure, equal strings and booleans, two integers
///   equal, other numbers within `abs` or `rel`; an array of two or more
///   numbers is a vector, its elements within `abs` or `rel` when either is
///   set and the whole within `cosine` when set. With neither `abs` nor
///   `rel` set, numbers outside vectors use [`DEFAULT_ABS`] and
///   [`DEFAULT_REL`], so no number goes uncompared. Outputs that are not
///   JSON but a whole number of little-endian `f32`s are compared as one
///   vector; anything else must be the same bytes.
pub fn agree(tier: &Determinism, a: &Outcome, b: &Outcome) -> bool {
    match (tier, a, b) {
        (Determinism::Tolerance { abs, rel, cosine }, Outcome::Output(x), Outcome::Output(y)) => {
            let t = Tol {
                abs: abs.as_deref().and_then(|v| v.parse().ok()),
                rel: rel.as_deref().and_then(|v| v.parse().ok()),
                cosine: cosine.as_deref().and_then(|v| v.parse().ok()),
            };
            if x.0 == y.0 {
                return true;
            }
            match (strict_json(&x.0), strict_json(&y.0)) {
                (Some(x), Some(y)) => t.json(&x, &y),
                (None, None) if x.0.len() == y.0.len() && x.0.len() % 4 == 0 => {
                    let f = |b: &[u8]| -> Vec<f64> {
                        b.chunks_exact(4)
                            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                            .collect()
                    };
                    t.vector(&f(&x.0), &f(&y.0))
                }
                _ => false,
            }
        }
        _ => a == b,
    }
}

/// Parse JSON, refusing an object with a repeated key (which parsers
/// resolve differently, so two outputs could "agree" while meaning
/// different things). `None`: not strict JSON.
fn strict_json(bytes: &[u8]) -> Option<serde_json::Value> {
    use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};
    use serde_json::Value as V;

    struct Strict(V);
    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(StrictVisitor).map(Strict)
        }
    }
    struct StrictVisitor;
    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = V;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, v: bool) -> Result<V, E> {
            Ok(V::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<V, E> {
            Ok(V::from(v))
        }
        fn visit_u64<E>(self, v: u64) -> Result<V, E> {
            Ok(V::from(v))
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<V, E> {
            serde_json::Number::from_f64(v)
                .map(V::Number)
                .ok_or_else(|| E::custom("not a finite number"))
        }
        fn visit_str<E>(self, v: &str) -> Result<V, E> {
            Ok(V::String(v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<V, E> {
            Ok(V::String(v))
        }
        fn visit_unit<E>(self) -> Result<V, E> {
            Ok(V::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<V, A::Error> {
            let mut v = Vec::new();
            while let Some(Strict(x)) = seq.next_element()? {
                v.push(x);
            }
            Ok(V::Array(v))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<V, A::Error> {
            let mut m = serde_json::Map::new();
            while let Some(k) = map.next_key::<String>()? {
                let Strict(x) = map.next_value()?;
                if m.insert(k, x).is_some() {
                    return Err(A::Error::custom("repeated key"));
                }
            }
            Ok(V::Object(m))
        }
    }
    serde_json::from_slice::<Strict>(bytes).ok().map(|s| s.0)
}

/// Parsed tolerance thresholds.
#[derive(Debug, Clone, Copy)]
struct Tol {
    abs: Option<f64>,
    rel: Option<f64>,
    cosine: Option<f64>,
}

impl Tol {
    /// Two numbers outside a vector: within `abs` or `rel` (their defaults
    /// when neither is set).
    fn scalar(&self, x: f64, y: f64) -> bool {
        let (abs, rel) = match (self.abs, self.rel) {
            (None, None) => (Some(DEFAULT_ABS), Some(DEFAULT_REL)),
            set => set,
        };
        within(abs, rel, x, y)
    }

    /// Two elements of a vector: within `abs` or `rel` when either is set
    /// (with only `cosine` set, the cosine judges the vector).
    fn element(&self, x: f64, y: f64) -> bool {
        if self.abs.is_none() && self.rel.is_none() {
            return x.is_finite() == y.is_finite();
        }
        within(self.abs, self.rel, x, y)
    }

    fn vector(&self, x: &[f64], y: &[f64]) -> bool {
        if x.len() != y.len() {
            return false;
        }
        if x.len() == 1 {
            return self.scalar(x[0], y[0]);
        }
        if !x.iter().zip(y).all(|(a, b)| self.element(*a, *b)) {
            return false;
        }
        match self.cosine {
            None => true,
            Some(min) => {
                let dot: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
                let nx: f64 = x.iter().map(|a| a * a).sum::<f64>().sqrt();
                let ny: f64 = y.iter().map(|b| b * b).sum::<f64>().sqrt();
                if nx == 0.0 || ny == 0.0 {
                    return nx == ny;
                }
                dot / (nx * ny) >= min
            }
        }
    }

    fn json(&self, x: &serde_json::Value, y: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (x, y) {
            (V::Number(a), V::Number(b)) => {
                let int = |n: &serde_json::Number| n.is_i64() || n.is_u64();
                if int(a) && int(b) {
                    return a == b;
                }
                match (a.as_f64(), b.as_f64()) {
                    (Some(a), Some(b)) => self.scalar(a, b),
                    _ => a == b,
                }
            }
            (V::Array(a), V::Array(b)) => {
                if a.len() != b.len() {
                    return false;
                }
                let nums: Option<(Vec<f64>, Vec<f64>)> = a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| Some((p.as_f64()?, q.as_f64()?)))
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.into_iter().unzip());
                match nums {
                    Some((p, q)) if p.len() >= 2 => self.vector(&p, &q),
                    _ => a.iter().zip(b).all(|(p, q)| self.json(p, q)),
                }
            }
            (V::Object(a), V::Object(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(k, v)| b.get(k).is_some_and(|w| self.json(v, w)))
            }
            _ => x == y,
        }
    }
}

/// `|x - y|` within `abs`, or within `rel` of the larger magnitude; a
/// non-finite number equals only itself.
fn within(abs: Option<f64>, rel: Option<f64>, x: f64, y: f64) -> bool {
    if !x.is_finite() || !y.is_finite() {
        return x == y;
    }
    let d = (x - y).abs();
    abs.is_some_and(|a| d <= a) || rel.is_some_and(|r| d <= r * x.abs().max(y.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::wire::{Bytes, TaskId};

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
        let p = VerifyPolicy::default();
        let mut s = Standing::new(&p);
        assert_eq!(s.sampling_rate(), 1.0);
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
