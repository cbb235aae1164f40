//! Decoy checks: verifiers are audited like producers. An `llm`-tier check
//! hands the verifier the producer's tokens to replay (ADR 0008); a lazy
//! verifier could return them without running the model and "confirm"
//! anything. So with probability `decoy_rate` per `llm` check granted, the
//! node also gets a decoy: a check of a result that is already verified,
//! whose replayed tokens the pool has corrupted at one place (a token
//! swapped for another token of the same transcript, chosen with the
//! pool's secret). On the wire it is a check like any other: the same
//! identity as the result it checks, a transcript to replay.
//!
//! An honest verifier rejects the corrupted token and generates its own
//! from there; one whose answer repeats the corrupted token (or has no
//! such generation) accepted a token its model would not choose, and is
//! struck: the pool knows the answer is wrong, as with a canary, so no
//! trusted node is needed. Decoys never take part in a result's disputes
//! (the store leaves them out of its checks), and their results earn
//! nothing (hidden jobs are not in the ledger).

use super::queues::Queued;
use super::verification::Check;
use super::Coordinator;
use crate::store::{JobKind, Store, StoreError};
use crate::verify::audit_draw;
use sha2::{Digest as _, Sha256};
use std::time::Instant;
use tidepool_proto::llm::Transcript;
use tidepool_proto::manifest::Determinism;
use tidepool_proto::wire::{LeaseId, TaskId};
use tidepool_proto::{Digest, PublicKey};

/// Tokens a decoy corrupts (fewer in a shorter generation). An honest
/// verifier may accept one swapped token when its policy allows a near
/// tie; accepting every one of them is what an echo does.
pub(crate) const CORRUPTED_TOKENS: usize = 3;

/// Where a decoy's transcript was corrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Corruption {
    /// The generation.
    pub(crate) generation: usize,
    /// The tokens' places in it, ascending, and the tokens put there.
    pub(crate) swaps: Vec<(usize, u32)>,
}

/// Draws for the decoy task `task`, from the pool's secret: which
/// generation, which tokens, which replacements.
fn draws(secret: &[u8; 32], task: TaskId) -> [u64; 4] {
    let mut h = Sha256::new();
    h.update(b"tidepool/decoy/v1");
    h.update(secret);
    h.update(task.0.to_be_bytes());
    let d = h.finalize();
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    [word(0), word(1), word(2), word(3)]
}

/// splitmix64: more draws from one.
fn next(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `t` with up to [`CORRUPTED_TOKENS`] tokens of one non-empty generation
/// replaced, chosen by `d`: each by another token value that occurs in `t`
/// (so it is in the model's vocabulary). `None` when no swap exists.
pub(crate) fn corrupt(t: &Transcript, d: [u64; 4]) -> Option<(Transcript, Corruption)> {
    let gens: Vec<usize> = t
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.tokens.is_empty())
        .map(|(i, _)| i)
        .collect();
    let generation = *gens.get((d[0] % gens.len().max(1) as u64) as usize)?;
    let len = t[generation].tokens.len();
    let mut values: Vec<u32> = t.iter().flat_map(|g| g.tokens.iter().copied()).collect();
    values.sort_unstable();
    values.dedup();
    if values.len() < 2 {
        return None;
    }
    // Distinct places: a partial shuffle of 0..len.
    let mut places: Vec<usize> = (0..len).collect();
    let mut x = d[1];
    let k = CORRUPTED_TOKENS.min(len);
    for i in 0..k {
        let j = i + (next(&mut x) % (len - i) as u64) as usize;
        places.swap(i, j);
    }
    let mut chosen: Vec<usize> = places[..k].to_vec();
    chosen.sort_unstable();
    let mut out = t.clone();
    let mut y = d[2] ^ d[3];
    let swaps = chosen
        .into_iter()
        .map(|p| {
            let original = out[generation].tokens[p];
            let others: Vec<u32> = values.iter().copied().filter(|v| *v != original).collect();
            let token = others[(next(&mut y) % others.len() as u64) as usize];
            out[generation].tokens[p] = token;
            (p, token)
        })
        .collect();
    Some((out, Corruption { generation, swaps }))
}

/// Whether a verifier's transcript shows it accepted the corruption: its
/// generation holds every swapped token at its place, or it has no such
/// generation at all.
pub(crate) fn accepted(c: &Corruption, answer: &Transcript) -> bool {
    match answer.get(c.generation) {
        None => true,
        Some(g) => c
            .swaps
            .iter()
            .all(|(p, token)| g.tokens.get(*p) == Some(token)),
    }
}

impl<S: Store> Coordinator<S> {
    fn is_llm(&self, bundle: &Digest) -> bool {
        self.bundles
            .get(bundle)
            .is_some_and(|b| matches!(b.manifest.determinism, Determinism::Llm { .. }))
    }

    /// The transcript a decoy replays: its target's, corrupted.
    pub(super) fn decoy_transcript(&self, task: TaskId, t: Transcript) -> Transcript {
        match corrupt(&t, draws(&self.secret, task)) {
            Some((c, _)) => c,
            None => t,
        }
    }

    /// For each `llm` check in a grant to `key`, with probability
    /// `decoy_rate`, add a decoy at a random place in the grant.
    pub(super) fn maybe_add_decoys(
        &mut self,
        key: &PublicKey,
        picked: &mut Vec<(Queued, Digest)>,
    ) -> Result<(), StoreError> {
        let rate = self.cfg.verify.decoy_rate;
        if rate <= 0.0 {
            return Ok(());
        }
        let llm_checks: Vec<Digest> = picked
            .iter()
            .filter(|(q, b)| self.checks.get(&q.task).is_some_and(|c| !c.decoy) && self.is_llm(b))
            .map(|(_, b)| *b)
            .collect();
        for bundle in llm_checks {
            self.grants_made += 1;
            let draw = |salt: u32| {
                audit_draw(
                    &self.secret,
                    LeaseId {
                        task: TaskId(self.grants_made),
                        attempt: u32::MAX - salt,
                    },
                    key,
                )
            };
            if draw(2) >= rate {
                continue;
            }
            let (pick, place) = (draw(3), draw(4));
            let targets = self.store.decoy_targets(&bundle, key, 64)?;
            let Some(&target) = targets.get((pick * targets.len() as f64) as usize) else {
                continue;
            };
            let row = self.store.result(target)?;
            let job = self.hidden_job(bundle, JobKind::Check)?;
            let task = self.store.insert_decoy(job, target)?;
            self.checks.insert(
                task,
                Check {
                    target,
                    bundle,
                    exclude: row.as_ref().and_then(|r| r.node).into_iter().collect(),
                    decider: false,
                    trusted_only: false,
                    engines: row.map(|r| r.engines).unwrap_or_default(),
                    decoy: true,
                },
            );
            self.insert_hidden_task(picked, task, job, bundle, place);
        }
        Ok(())
    }

    /// A decoy was answered: strike the verifier if it accepted the
    /// corrupted token.
    pub(super) fn judge_decoy(
        &mut self,
        now: Instant,
        a: &crate::store::Acceptance,
        check: &Check,
    ) -> Result<(), StoreError> {
        let Some(bytes) = self.store.transcript(check.target)? else {
            return Ok(());
        };
        let Ok(t) = rmp_serde::from_slice::<Transcript>(&bytes) else {
            return Ok(());
        };
        let Some((_, c)) = corrupt(&t, draws(&self.secret, a.task)) else {
            return Ok(()); // nothing could be corrupted: it was a plain re-check
        };
        let answer: Transcript = if a.transcript.is_empty() {
            Vec::new()
        } else {
            rmp_serde::from_slice(&a.transcript).unwrap_or_default()
        };
        self.vstats.decoys += 1;
        if accepted(&c, &answer) {
            self.vstats.decoys_accepted += 1;
            tracing::warn!(
                node = %a.node.short(),
                task = %check.target,
                "a verifier accepted a decoy's corrupted token"
            );
            self.strike(now, &a.node, check.target)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::llm::Generation;

    fn gen(tokens: &[u32]) -> Generation {
        Generation {
            prompt: Digest::of(b"p"),
            tokens: tokens.to_vec(),
        }
    }

    #[test]
    fn tokens_are_swapped_for_others_of_the_transcript_and_only_an_echo_accepts_them() {
        let t = vec![gen(&[]), gen(&[5, 6, 7, 8, 6, 5]), gen(&[9])];
        for seed in 0..200u64 {
            let d = [seed, seed.wrapping_mul(31), seed.wrapping_mul(97), seed ^ 7];
            let (bad, c) = corrupt(&t, d).expect("a swap exists");
            assert_ne!(c.generation, 0, "empty generations are never chosen");
            let want = CORRUPTED_TOKENS.min(t[c.generation].tokens.len());
            assert_eq!(c.swaps.len(), want);
            for (p, token) in &c.swaps {
                assert_ne!(*token, t[c.generation].tokens[*p]);
                assert!([5, 6, 7, 8, 9].contains(token));
            }
            let diff: usize = t
                .iter()
                .zip(&bad)
                .map(|(a, b)| {
                    a.tokens
                        .iter()
                        .zip(&b.tokens)
                        .filter(|(x, y)| x != y)
                        .count()
                })
                .sum();
            assert_eq!(diff, want, "exactly the swapped tokens differ");
            // An echo accepts it; the honest answer (the original) does not,
            // nor one that took only the first swapped token; an answer
            // without the generation counts as accepting.
            assert!(accepted(&c, &bad));
            assert!(!accepted(&c, &t));
            if c.swaps.len() > 1 {
                let mut one = t.clone();
                let (p, token) = c.swaps[0];
                one[c.generation].tokens[p] = token;
                assert!(!accepted(&c, &one));
            }
            assert!(accepted(&c, &Vec::new()));
        }
        // Nothing to swap with: no decoy.
        assert_eq!(corrupt(&vec![gen(&[4, 4, 4])], [1, 2, 3, 4]), None);
        assert_eq!(corrupt(&vec![gen(&[])], [1, 2, 3, 4]), None);
    }
}
