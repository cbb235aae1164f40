//! Generated text as data that crosses the wire: the transcript a node keeps
//! of every text generation in a task, and the policy a verifier uses to
//! accept someone else's transcript by one teacher-forced pass (ADR 0008).
//!
//! Why a transcript: a job's output (a summary in JSON, say) is computed by
//! the guest from generated text. To check it without generating again, the
//! verifier runs the same guest, and each time the guest asks the model to
//! generate, the host *replays* the producer's tokens instead: one prefill of
//! prompt + claimed tokens, accepting each token the verifier's own model
//! ranks close enough to its best choice ([`AcceptPolicy`]). If every token
//! passes, the guest sees the same text and returns the same bytes; at the
//! first token that does not, the verifier generates the rest itself, so its
//! output differs and the pool's ordinary comparison flags the result.
//!
//! Nothing here runs a model; the host's `ggml` backend does.

use crate::Digest;
use serde::{Deserialize, Serialize};

/// One generation call of a task: which prompt, and the tokens produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Digest of the prompt's token ids (little-endian u32s), so a replay
    /// applies only to the same prompt.
    pub prompt: Digest,
    /// The generated token ids in order, including the end-of-generation
    /// token when generation ended with one.
    pub tokens: Vec<u32>,
}

impl Generation {
    /// Digest of a prompt's token ids.
    pub fn prompt_digest(tokens: &[u32]) -> Digest {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        Digest::of(&bytes)
    }
}

/// Every generation of one task, in call order. Empty for tasks that
/// generate nothing.
pub type Transcript = Vec<Generation>;

/// The digest a receipt commits to: of the transcript's MessagePack bytes.
pub fn transcript_digest(t: &[Generation]) -> Digest {
    // Serialising plain structs of digests and integers cannot fail.
    let bytes = rmp_serde::to_vec(t).unwrap_or_default();
    Digest::of(&bytes)
}

/// How close a claimed token must be to the verifier's own ranking.
///
/// A claimed token is accepted when its logit is at least the verifier's
/// `top_k`-th largest logit minus `margin`. With `top_k = 1` this is "the
/// greedy choice, or within `margin` of it" (greedy decoding; the margin
/// absorbs floating-point differences between machines and between batched
/// and one-at-a-time evaluation); sampled decoding declares the `top_k` it
/// samples from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AcceptPolicy {
    /// Rank the claimed token must reach (1 = greedy).
    pub top_k: u32,
    /// Slack in logits (natural-log probability units at temperature 1).
    pub margin: f32,
}

impl AcceptPolicy {
    /// The default for greedy decoding: the best token, or within 1.0 of
    /// it (honest gaps measured up to 0.34 between thread counts and 0.57
    /// between a batched and an unbatched evaluation, ADR 0020).
    pub const GREEDY: AcceptPolicy = AcceptPolicy {
        top_k: 1,
        margin: 1.0,
    };

    /// Accept every claimed token and end where the claim ends: replaying
    /// under it yields the output a transcript implies, true or not (for
    /// tools and tests that play a lying node; never a manifest's policy).
    pub const FORCE: AcceptPolicy = AcceptPolicy {
        top_k: u32::MAX,
        margin: f32::INFINITY,
    };

    /// Whether this is [`AcceptPolicy::FORCE`].
    pub fn is_force(&self) -> bool {
        self.top_k == u32::MAX
    }

    /// Whether `claimed` is acceptable among `logits` (one row of the
    /// model's output for the position that predicts it). Also returns the
    /// gap: how far below the threshold-free best the claimed token is.
    pub fn accepts(&self, logits: &[f32], claimed: usize) -> (bool, f32) {
        let Some(&c) = logits.get(claimed) else {
            return (false, f32::INFINITY);
        };
        if !c.is_finite() {
            return (false, f32::INFINITY);
        }
        if self.is_force() {
            return (
                true,
                logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) - c,
            );
        }
        let k = self.top_k.max(1) as usize;
        // The k-th largest logit: count how many are strictly above `c`.
        let above = logits.iter().filter(|&&x| x > c).count();
        let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let gap = best - c;
        if above < k {
            return (true, gap);
        }
        // Find the k-th largest value without sorting the whole row.
        let mut top: Vec<f32> = Vec::with_capacity(k + 1);
        for &x in logits {
            if top.len() < k {
                top.push(x);
                top.sort_by(|a, b| b.total_cmp(a));
            } else if x > top[k - 1] {
                top[k - 1] = x;
                top.sort_by(|a, b| b.total_cmp(a));
            }
        }
        let kth = top[k - 1];
        (c >= kth - self.margin, gap)
    }
}

impl Default for AcceptPolicy {
    fn default() -> Self {
        Self::GREEDY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_accepts_the_best_and_near_ties_only() {
        let p = AcceptPolicy::GREEDY;
        let logits = [1.0, 5.0, 4.2, 2.0];
        assert!(p.accepts(&logits, 1).0);
        assert!(p.accepts(&logits, 2).0, "within 1.0 of the best");
        assert!(!p.accepts(&logits, 3).0);
        assert!(!p.accepts(&logits, 0).0);
        assert!(!p.accepts(&logits, 9).0, "out of the vocabulary");
    }

    #[test]
    fn top_k_accepts_ranks_below_k() {
        let p = AcceptPolicy {
            top_k: 2,
            margin: 0.0,
        };
        let logits = [1.0, 5.0, 4.0, 3.0];
        assert!(p.accepts(&logits, 2).0);
        assert!(!p.accepts(&logits, 3).0);
        let nan = [f32::NAN, 1.0];
        assert!(!p.accepts(&nan, 0).0);
    }

    #[test]
    fn transcript_digest_depends_on_tokens() {
        let g = |t: Vec<u32>| Generation {
            prompt: Generation::prompt_digest(&[1, 2]),
            tokens: t,
        };
        assert_ne!(
            transcript_digest(&[g(vec![1])]),
            transcript_digest(&[g(vec![2])])
        );
        assert_eq!(transcript_digest(&[]), transcript_digest(&[]));
    }
}
