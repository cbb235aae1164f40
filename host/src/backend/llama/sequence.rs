//! One text generation as a state machine over a llama.cpp context: which
//! tokens it still needs evaluated, and what it does with each row of
//! logits it asked for. It never calls `decode` itself (the
//! [`super::driver`] does), so a generation runs the same way alone in a
//! task's own context or beside other tasks' generations in a shared batch.
//!
//! A generation first evaluates its *forced* tokens: the prompt, and for a
//! replay (a check of an `llm`-tier result, ADR 0008) the claimed tokens,
//! each judged by the task's policy against the row that predicts it. At the
//! first claimed token refused (or where the model's generation would end,
//! or at the end of the claim) the forced part stops, the KV cache is cut
//! back to the accepted prefix, and the generation continues one token per
//! step, chosen greedily or by the task's seeded sampler.
//!
//! It never touches the task's transcript or budget (the task's own thread
//! records the outcome), never sees another sequence, and never blocks.

use super::{Finish, GenerateOptions, MAX_STOP_BYTES};
use crate::backend::ReplayReport;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::time::Instant;
use tidepool_proto::llm::AcceptPolicy;

/// What a task asks of the engine: one generation.
#[derive(Debug)]
pub(super) struct Request {
    /// The prompt's tokens (with BOS); never empty.
    pub prompt: Vec<LlamaToken>,
    /// The validated options.
    pub options: GenerateOptions,
    /// For a replay: the claimed tokens (at most `max_tokens`).
    pub claim: Option<Vec<LlamaToken>>,
    /// How close a claimed token must be.
    pub policy: AcceptPolicy,
    /// The task's deadline: no step is taken for it after this.
    pub deadline: Instant,
}

/// What a generation produced.
#[derive(Debug)]
pub(super) struct Outcome {
    /// Every token generated or accepted (with the end token, if any).
    pub tokens: Vec<LlamaToken>,
    /// Their text, cut before the first stop string.
    pub text: Vec<u8>,
    /// Why it ended.
    pub finish: Finish,
    /// For a replay: what the claim was found to be.
    pub report: Option<ReplayReport>,
}

/// Where a generation stands while tokens are appended.
struct Progress {
    /// Tokens generated (or accepted from a replay) so far.
    tokens: Vec<LlamaToken>,
    /// Their text so far.
    text: Vec<u8>,
    /// Set once generation has ended.
    finish: Option<Finish>,
    /// Length of `text` to return (cut before a stop string).
    keep: usize,
}

impl Progress {
    /// Append one token; sets `finish` when generation must end after it.
    fn push(&mut self, model: &LlamaModel, options: &GenerateOptions, token: LlamaToken) {
        self.tokens.push(token);
        if model.vocab().is_eog(token) {
            self.finish = Some(Finish::Eog);
            self.keep = self.text.len();
            return;
        }
        let before = self.text.len();
        self.text
            .extend_from_slice(&model.vocab().token_to_piece(token, false, None));
        // A stop string may straddle tokens: search from just before this piece.
        let from = before.saturating_sub(MAX_STOP_BYTES);
        let hit = options
            .stop
            .iter()
            .filter_map(|s| find(&self.text[from..], s.as_bytes()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.finish = Some(Finish::Stop);
            self.keep = at;
            return;
        }
        self.keep = self.text.len();
        if self.tokens.len() >= options.max_tokens as usize {
            self.finish = Some(Finish::Length);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What the driver does with the rest of a sequence's tokens in this step
/// after one row of logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Keep reading rows.
    More,
    /// Ignore the sequence's later rows in this step: the KV cache keeps only
    /// the first `keep` positions ([`Sequence::kv_len`]).
    Cut,
}

/// One generation in progress (lives from admission until its outcome is
/// sent; owned by whoever drives the context).
pub(super) struct Sequence {
    /// What was asked.
    request: Request,
    /// Tokens whose KV the sequence needs, in position order: the prompt,
    /// then the claim while forced, then each generated token.
    stream: Vec<LlamaToken>,
    /// `stream[..fed]` is in the KV cache.
    fed: usize,
    /// Whether the prompt (and claim) are still being evaluated.
    forced: bool,
    /// The generation so far.
    progress: Progress,
    /// The task's sampler (greedy decoding does not use it).
    sampler: LlamaSampler,
    /// For a replay: what was found so far.
    report: ReplayReport,
    /// Claimed tokens accepted.
    accepted: usize,
    /// The row of logits that chooses the next token, once it came.
    pending: Option<Vec<f32>>,
    /// The next token, chosen but not yet appended.
    next: Option<LlamaToken>,
    /// The model's vocabulary size (claimed ids at or past it are refused).
    n_vocab: u32,
}

impl Sequence {
    /// A sequence for `request` (nothing evaluated yet).
    pub(super) fn new(request: Request, n_vocab: u32) -> Self {
        let mut stream = request.prompt.clone();
        if let Some(c) = &request.claim {
            // The claim comes from another node: a token outside the
            // vocabulary is never evaluated (llama.cpp would fail the whole
            // batch, every task's generation in it); the row before it
            // refuses it like any other wrong token.
            let valid = c
                .iter()
                .position(|t| t.0 < 0 || t.0 as u32 >= n_vocab)
                .unwrap_or(c.len());
            stream.extend(c[..valid].iter().copied());
        }
        let sampler = if request.options.temperature == 0.0 {
            LlamaSampler::greedy()
        } else {
            LlamaSampler::chain_simple([
                LlamaSampler::top_k(request.options.top_k.unwrap_or(40) as i32),
                LlamaSampler::temp(request.options.temperature),
                LlamaSampler::dist(request.options.seed),
            ])
        };
        Self {
            request,
            stream,
            fed: 0,
            forced: true,
            progress: Progress {
                tokens: Vec::new(),
                text: Vec::new(),
                finish: None,
                keep: 0,
            },
            sampler,
            report: ReplayReport::default(),
            accepted: 0,
            pending: None,
            next: None,
            n_vocab,
        }
    }

    /// The tokens it would like evaluated first, for choosing a slot whose
    /// KV cache already holds a prefix of them.
    pub(super) fn wanted(&self) -> &[LlamaToken] {
        &self.stream
    }

    /// The first `cached` tokens of [`Sequence::wanted`] are already in the
    /// KV cache (from an earlier generation in the same slot). At least the
    /// last prompt token is evaluated again (its row chooses the first
    /// token). Returns the position the cache must be cut back to.
    pub(super) fn reuse(&mut self, cached: usize) -> usize {
        self.fed = cached.min(self.request.prompt.len() - 1);
        self.fed
    }

    /// When the task must stop.
    pub(super) fn deadline(&self) -> Instant {
        self.request.deadline
    }

    /// Positions in the KV cache now.
    pub(super) fn kv_len(&self) -> usize {
        self.fed
    }

    /// Tokens not yet evaluated, from position [`Sequence::kv_len`].
    pub(super) fn unfed(&self) -> &[LlamaToken] {
        &self.stream[self.fed..]
    }

    /// Whether the row of logits at position `q` is needed.
    pub(super) fn wants_logits(&self, q: usize) -> bool {
        let p = self.request.prompt.len();
        if !self.forced {
            return true;
        }
        match self.request.claim {
            // Logits at position q predict the token at q + 1.
            Some(_) => q + 1 >= p,
            None => q + 1 == p,
        }
    }

    /// Take the row of logits at position `q` (evaluated this step).
    pub(super) fn handle_logits(&mut self, model: &LlamaModel, q: usize, logits: &[f32]) -> Flow {
        if !self.forced {
            self.next = Some(self.pick(logits));
            return Flow::More;
        }
        let p = self.request.prompt.len();
        let Some(claim) = &self.request.claim else {
            self.next = Some(self.pick(logits));
            return Flow::More;
        };
        let j = q + 1 - p;
        if self.progress.finish.is_some() {
            return Flow::Cut;
        }
        if j >= claim.len() {
            self.pending = Some(logits.to_vec());
            return Flow::Cut;
        }
        let t = claim[j];
        let (ok, gap) = if (t.0 as u32) < self.n_vocab {
            self.request.policy.accepts(logits, t.0 as usize)
        } else {
            (false, f32::INFINITY)
        };
        self.report.checked += 1;
        if gap.is_finite() {
            self.report.max_gap = self.report.max_gap.max(gap);
        }
        if !ok {
            self.report.rejected_at = Some(j as u32);
            self.pending = Some(logits.to_vec());
            return Flow::Cut;
        }
        self.progress.push(model, &self.request.options, t);
        self.accepted = j + 1;
        Flow::More
    }

    /// This step evaluated `fed` more of its tokens (`cut`: it stopped
    /// reading rows early, and the KV cache must be cut back to
    /// [`Sequence::kv_len`] — returns that length when so). Then appends the
    /// chosen token. `Some(outcome)` once the generation has ended.
    pub(super) fn settle(
        &mut self,
        model: &LlamaModel,
        fed: usize,
        cut: bool,
    ) -> Result<Option<Outcome>, String> {
        if self.forced {
            if cut {
                // Keep only the prompt and the accepted prefix.
                self.fed = self.request.prompt.len() + self.accepted;
                self.stream.truncate(self.fed);
            } else {
                self.fed += fed;
            }
            if self.fed < self.stream.len() {
                return Ok(None);
            }
            self.end_forced();
        } else {
            self.fed += fed;
        }
        if self.progress.finish.is_none() {
            let t = self
                .next
                .take()
                .ok_or("no logits to choose the next token from")?;
            self.progress.push(model, &self.request.options, t);
            if self.progress.finish.is_none() {
                self.stream.push(t);
                return Ok(None);
            }
        }
        Ok(Some(self.outcome()))
    }

    /// The prompt (and claim) are evaluated: judge the claim as a whole and
    /// choose the first token this model generates itself.
    fn end_forced(&mut self) {
        self.forced = false;
        let Some(claim) = &self.request.claim else {
            return;
        };
        let claimed = claim.len();
        if self.request.policy.is_force() && self.progress.finish.is_none() {
            // Forced: the claim ends where it says.
            self.progress.finish = Some(Finish::Length);
            self.progress.keep = self.progress.text.len();
        }
        if self.progress.finish.is_some() {
            // Claimed tokens past the end are not part of a true output.
            self.report.extra_tokens = (claimed - self.accepted) as u32;
        } else if self.report.rejected_at.is_none() {
            // Every claimed token accepted, yet generation had not ended.
            self.report.truncated = true;
        }
        self.sampler.accept_many(self.progress.tokens.iter());
        if let Some(row) = self.pending.take() {
            self.next = Some(self.pick(&row));
        }
    }

    /// Choose the next token from a row of logits: the best one (greedy),
    /// or by the task's seeded sampler chain.
    fn pick(&mut self, logits: &[f32]) -> LlamaToken {
        if self.request.options.temperature == 0.0 {
            return LlamaToken(argmax(logits) as i32);
        }
        let mut data = llama_cpp_2::token::data_array::LlamaTokenDataArray::from_iter(
            logits.iter().enumerate().map(|(i, &l)| {
                llama_cpp_2::token::data::LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)
            }),
            false,
        );
        data.apply_sampler(&mut self.sampler);
        let t = data
            .selected_token()
            .unwrap_or_else(|| LlamaToken(argmax(logits) as i32));
        self.sampler.accept(t);
        t
    }

    fn outcome(&mut self) -> Outcome {
        let mut text = std::mem::take(&mut self.progress.text);
        text.truncate(self.progress.keep);
        Outcome {
            tokens: std::mem::take(&mut self.progress.tokens),
            text,
            finish: self.progress.finish.unwrap_or(Finish::Length),
            report: self.request.claim.as_ref().map(|_| self.report),
        }
    }
}

fn argmax(logits: &[f32]) -> usize {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}
