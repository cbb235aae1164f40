//! Drives [`Sequence`]s over one llama.cpp context: each step gathers the
//! tokens every live sequence needs into one batch, decodes it once, and
//! hands each sequence the rows of logits it asked for.
//!
//! Two ways to use it:
//! - **alone** ([`generate_alone`]): a task's own context with one sequence,
//!   made for one generation and freed after it (bit-for-bit what one
//!   generation on this build and machine gives; used for every task whose
//!   tier compares bytes, and for all tasks when batching is off);
//! - **shared** ([`Batcher`]): one context per model and node with up to
//!   `batch` sequences, on a thread of its own, which `llm`-tier tasks join
//!   and leave between steps (continuous batching, ADR 0020). Each slot
//!   keeps the KV cache of its last generation, and a new generation starts
//!   from the longest prefix of its prompt held by any slot (few-shot
//!   prompts share most of their tokens), so only the rest is evaluated.
//!
//! Each step is at most [`N_BATCH`] tokens: one for every generating
//! sequence first, then prompt chunks, shortest remainder first, so a long
//! prompt delays the others' next tokens by at most a step. A sequence whose
//! task's deadline has passed is dropped before the next step.
//!
//! It never records transcripts or meters tasks (each task's own thread
//! does, from the [`Outcome`]), and never reads guest memory.

use super::sequence::{Flow, Outcome, Request, Sequence};
use super::{backend, err, N_BATCH, N_CTX};
use llama_cpp_2::context::kv_cache::KvCacheConversionError;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;
use wasmtime_wasi_nn::backend::BackendError;

/// A generation's answer, sent back to the task's thread.
pub(super) type Answer = Result<Outcome, BackendError>;

/// The parameters of a context with `seqs` sequences of [`N_CTX`] tokens
/// each, driven by `threads` threads.
fn params(seqs: u32, threads: u32) -> LlamaContextParams {
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(N_CTX * seqs))
        .with_n_batch(N_BATCH)
        .with_n_ubatch(N_BATCH)
        .with_n_seq_max(seqs)
        // One cache of seqs × N_CTX cells for all sequences: every
        // generation is refused above N_CTX tokens, so each always has
        // room, and a prompt prefix one sequence holds can be shared by
        // another without copying tensors. (One sequence: llama.cpp's
        // default, as every generation alone has always run.)
        .with_kv_unified(seqs > 1)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32)
        .with_no_perf(true)
}

/// Make a context (one at a time: llama.cpp may write to the model while
/// creating one).
fn new_context<'m>(
    model: &'m LlamaModel,
    new_context: &Mutex<()>,
    seqs: u32,
    threads: u32,
) -> Result<LlamaContext<'m>, BackendError> {
    let backend = backend().map_err(|e| err(e.to_string()))?;
    // A poisoned lock guards nothing but ordering; keep going.
    let _one_at_a_time = new_context.lock().unwrap_or_else(|p| p.into_inner());
    model
        .new_context(backend, params(seqs, threads))
        .map_err(|e| err(format!("cannot create a llama.cpp context: {e}")))
}

/// One sequence's place in a context.
#[derive(Default)]
struct Slot {
    /// The generation using it, and where its answer goes.
    live: Option<(Sequence, Option<mpsc::Sender<Answer>>)>,
    /// Tokens in this slot's KV cache (kept after a generation ends, for the
    /// next one whose prompt starts the same way).
    cached: Vec<LlamaToken>,
}

/// A context and the sequences in it.
struct Driver<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    /// One per sequence id.
    slots: Vec<Slot>,
    /// Reused for every step.
    batch: LlamaBatch<'static>,
}

/// Length of the common prefix of two token lists.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<'m> Driver<'m> {
    fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>, seqs: usize) -> Self {
        Self {
            model,
            ctx,
            slots: (0..seqs).map(|_| Slot::default()).collect(),
            batch: LlamaBatch::new(N_BATCH as usize, 1),
        }
    }

    fn has_room(&self) -> bool {
        self.slots.iter().any(|s| s.live.is_none())
    }

    fn is_idle(&self) -> bool {
        self.slots.iter().all(|s| s.live.is_none())
    }

    /// Tokens slot `i` holds in the KV cache now.
    fn held(&self, i: usize) -> &[LlamaToken] {
        match &self.slots[i].live {
            Some((seq, _)) => &seq.wanted()[..seq.kv_len()],
            None => &self.slots[i].cached,
        }
    }

    /// Place a new generation in a free slot, reusing the longest prefix of
    /// its tokens held anywhere in the cache: its own slot's, or copied
    /// from another slot (in a unified cache a copy only tags the cells).
    /// The caller checked there is room.
    fn admit(
        &mut self,
        request: Request,
        answer: Option<mpsc::Sender<Answer>>,
    ) -> Result<(), (BackendError, Option<mpsc::Sender<Answer>>)> {
        let mut seq = Sequence::new(request, self.model.n_vocab() as u32);
        let free = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live.is_none())
            .map(|(i, s)| (i, common_prefix(&s.cached, seq.wanted())))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)));
        let Some((i, own)) = free else {
            return Err((err("no free sequence slot".into()), answer));
        };
        let elsewhere = (0..self.slots.len())
            .filter(|&j| j != i)
            .map(|j| (j, common_prefix(self.held(j), seq.wanted())))
            .max_by_key(|&(j, n)| (n, std::cmp::Reverse(j)));
        let kv = |e: KvCacheConversionError| err(format!("kv cache: {e}"));
        let placed = match elsewhere {
            Some((j, n)) if n > own => {
                let keep = seq.reuse(n);
                let from = self.held(j)[..keep].to_vec();
                self.ctx
                    .clear_kv_cache_seq(Some(i as u32), None, None)
                    .map_err(kv)
                    .and_then(|_| {
                        self.ctx
                            .copy_kv_cache_seq(j as i32, i as i32, None, Some(keep as u32))
                            .map_err(kv)
                    })
                    .map(|()| from)
            }
            _ => {
                let keep = seq.reuse(own);
                let mut from = std::mem::take(&mut self.slots[i].cached);
                from.truncate(keep);
                self.ctx
                    .clear_kv_cache_seq(Some(i as u32), Some(keep as u32), None)
                    .map_err(kv)
                    .map(|_| from)
            }
        };
        match placed {
            Ok(cached) => {
                self.slots[i].cached = cached;
                self.slots[i].live = Some((seq, answer));
                Ok(())
            }
            Err(e) => Err((e, answer)),
        }
    }

    /// Drop generations whose task's deadline has passed, answering them.
    fn expire(&mut self, now: Instant) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let late = matches!(&slot.live, Some((s, _)) if now >= s.deadline());
            if late {
                if let Some((seq, answer)) = slot.live.take() {
                    slot.cached = Vec::new();
                    let _ = self.ctx.clear_kv_cache_seq(Some(i as u32), None, None);
                    drop(seq);
                    if let Some(a) = answer {
                        let _ = a.send(Err(err(
                            "task deadline exceeded before the next token".into()
                        )));
                    }
                }
            }
        }
    }

    /// One batch over every live sequence; finished ones are answered (or,
    /// alone, returned). An `Err` is a failure of the context itself: every
    /// live sequence gets it.
    fn step(&mut self) -> Result<Vec<Outcome>, BackendError> {
        self.batch.clear();
        // (slot, first position, tokens) added this step.
        let mut taken: Vec<(usize, usize, usize)> = Vec::new();
        let mut room = N_BATCH as usize;
        // Generating sequences first (one token each), then prompts.
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].live.is_some())
            .collect();
        order.sort_by_key(|&i| {
            self.slots[i]
                .live
                .as_ref()
                .map_or(usize::MAX, |(s, _)| s.unfed().len())
        });
        for i in order {
            if room == 0 {
                break;
            }
            let Some((seq, _)) = &self.slots[i].live else {
                continue;
            };
            let start = seq.kv_len();
            let tokens = &seq.unfed()[..seq.unfed().len().min(room)];
            for (k, &t) in tokens.iter().enumerate() {
                self.batch
                    .add(
                        t,
                        (start + k) as i32,
                        &[i as i32],
                        seq.wants_logits(start + k),
                    )
                    .map_err(|e| err(format!("batch: {e}")))?;
            }
            room -= tokens.len();
            taken.push((i, start, tokens.len()));
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| err(format!("llama.cpp decode failed: {e}")))?;
        let mut done = Vec::new();
        let mut row = 0i32;
        for (i, start, n) in taken {
            let Some((seq, _)) = &mut self.slots[i].live else {
                continue;
            };
            let mut cut = false;
            for q in start..start + n {
                let idx = row + (q - start) as i32;
                if cut || !seq.wants_logits(q) {
                    continue;
                }
                if seq.handle_logits(self.model, q, self.ctx.get_logits_ith(idx)) == Flow::Cut {
                    cut = true;
                }
            }
            row += n as i32;
            let settled = seq.settle(self.model, n, cut);
            if cut {
                let keep = seq.kv_len() as u32;
                self.ctx
                    .clear_kv_cache_seq(Some(i as u32), Some(keep), None)
                    .map_err(|e| err(format!("kv cache: {e}")))?;
            }
            match settled {
                Ok(None) => {}
                Ok(Some(outcome)) => {
                    let slot = &mut self.slots[i];
                    if let Some((seq, answer)) = slot.live.take() {
                        slot.cached = seq.wanted()[..seq.kv_len()].to_vec();
                        match answer {
                            Some(a) => {
                                let _ = a.send(Ok(outcome));
                            }
                            None => done.push(outcome),
                        }
                    }
                }
                Err(why) => {
                    let slot = &mut self.slots[i];
                    slot.cached = Vec::new();
                    let _ = self.ctx.clear_kv_cache_seq(Some(i as u32), None, None);
                    if let Some((_, Some(a))) = slot.live.take() {
                        let _ = a.send(Err(err(why)));
                    } else {
                        return Err(err(why));
                    }
                }
            }
        }
        Ok(done)
    }

    /// Answer every live sequence with `e` and forget every cache.
    fn fail_all(&mut self, e: &BackendError) {
        for slot in &mut self.slots {
            slot.cached = Vec::new();
            if let Some((_, Some(a))) = slot.live.take() {
                let _ = a.send(Err(err(format!("{e:#}"))));
            }
        }
        let _ = self.ctx.clear_kv_cache_seq(None, None, None);
    }
}

/// Run one generation in a context of its own with `threads` threads.
pub(super) fn generate_alone(
    model: &LlamaModel,
    lock: &Mutex<()>,
    threads: u32,
    request: Request,
) -> Answer {
    let deadline = request.deadline;
    let ctx = new_context(model, lock, 1, threads)?;
    let mut driver = Driver::new(model, ctx, 1);
    driver.admit(request, None).map_err(|(e, _)| e)?;
    loop {
        if Instant::now() >= deadline {
            return Err(err("task deadline exceeded before the next batch".into()));
        }
        if let Some(outcome) = driver.step()?.pop() {
            return Ok(outcome);
        }
    }
}

/// A generation waiting for a shared context.
type Queued = (Request, mpsc::Sender<Answer>);

/// One shared context per model on a thread of its own, running the
/// generations of every `llm`-tier task on the node in one batch. Lives as
/// long as the loaded model: its thread ends when the last handle is
/// dropped and the generations in it have been answered.
#[derive(Clone)]
pub(super) struct Batcher {
    /// Where tasks queue their generations (bounded in practice by the
    /// node's task slots: a task waits for its answer before asking again).
    queue: mpsc::Sender<Queued>,
}

impl Batcher {
    /// Start the thread: a context of `seqs` sequences and `threads` threads.
    pub(super) fn start(
        model: Arc<LlamaModel>,
        new_context_lock: Arc<Mutex<()>>,
        seqs: u32,
        threads: u32,
    ) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::channel::<Queued>();
        std::thread::Builder::new()
            .name("tidepool-llm-batch".into())
            .spawn(move || run(&model, &new_context_lock, seqs, threads, &rx))?;
        Ok(Self { queue })
    }

    /// Queue a generation and wait for its answer (the caller's thread is a
    /// task's compute thread, which its task may let go at the deadline).
    pub(super) fn generate(&self, request: Request) -> Answer {
        let (tx, rx) = mpsc::channel();
        self.queue
            .send((request, tx))
            .map_err(|_| err("the shared llama.cpp context has stopped".into()))?;
        rx.recv()
            .map_err(|_| err("the shared llama.cpp context ended without an answer".into()))?
    }
}

/// The shared context's thread.
fn run(
    model: &LlamaModel,
    lock: &Mutex<()>,
    seqs: u32,
    threads: u32,
    queue: &mpsc::Receiver<Queued>,
) {
    let mut driver = match new_context(model, lock, seqs, threads) {
        Ok(ctx) => Driver::new(model, ctx, seqs as usize),
        Err(e) => {
            tracing::warn!("the shared llama.cpp context cannot be made: {e:#}");
            while let Ok((_, answer)) = queue.recv() {
                let _ = answer.send(Err(err(format!("{e:#}"))));
            }
            return;
        }
    };
    loop {
        if driver.is_idle() {
            // Nothing to do until a task asks; the thread ends with the model.
            match queue.recv() {
                Ok((r, a)) => admit(&mut driver, r, a),
                Err(_) => return,
            }
        }
        while driver.has_room() {
            match queue.try_recv() {
                Ok((r, a)) => admit(&mut driver, r, a),
                Err(_) => break,
            }
        }
        driver.expire(Instant::now());
        if driver.is_idle() {
            continue;
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.step()));
        let failure = match stepped {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => e,
            Err(_) => err("a batch step panicked in the engine".into()),
        };
        tracing::warn!("shared llama.cpp batch failed: {failure:#}");
        driver.fail_all(&failure);
    }
}

fn admit(driver: &mut Driver<'_>, request: Request, answer: mpsc::Sender<Answer>) {
    if Instant::now() >= request.deadline {
        let _ = answer.send(Err(err(
            "task deadline exceeded before the first token".into()
        )));
        return;
    }
    if let Err((e, Some(a))) = driver.admit(request, Some(answer)) {
        let _ = a.send(Err(e));
    }
}
