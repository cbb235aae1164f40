//! Whether two outcomes of the same task agree under a bundle's
//! determinism tier: the rule the pool applies to a re-execution and
//! `tidepool replay` applies to a local run, so both judge alike. Pure.

use crate::manifest::Determinism;
use crate::wire::Outcome;

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
pub fn strict_json(bytes: &[u8]) -> Option<serde_json::Value> {
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

/// Where two outcomes first differ, for people: the first differing byte
/// of outputs (and their lengths), or which kinds of outcome they are.
pub fn first_difference(a: &Outcome, b: &Outcome) -> String {
    match (a, b) {
        (Outcome::Output(x), Outcome::Output(y)) => {
            let at = x.0.iter().zip(&y.0).position(|(p, q)| p != q);
            match at {
                Some(i) => format!(
                    "outputs first differ at byte {i} (of {} and {} bytes)",
                    x.0.len(),
                    y.0.len()
                ),
                None => format!(
                    "one output is a prefix of the other ({} and {} bytes)",
                    x.0.len(),
                    y.0.len()
                ),
            }
        }
        (
            Outcome::JobError { code, message },
            Outcome::JobError {
                code: c2,
                message: m2,
            },
        ) => {
            format!("job errors differ: {code}: {message} / {c2}: {m2}")
        }
        (Outcome::Output(_), _) => "one returned an output, the other did not".into(),
        _ => "one returned a job error, the other did not".into(),
    }
}
