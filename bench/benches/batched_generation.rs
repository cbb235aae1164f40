//! Batched text generation across tasks (issue #20): aggregate generated
//! tokens per second on one node running 1, 2, 4 and 8 summarize tasks at
//! once through the sandbox (guest → wasi-nn → llama.cpp, Gemma 3 270M),
//!
//! - **one at a time**: every generation in a context of its own (what a
//!   node did before), with `llm_threads = max(1, cores / N)` — the best a
//!   node could be set for N tasks on this machine;
//! - **batched**: the node's shared context (`llm_batch = 8`,
//!   `llm_threads = cores`), which decodes every task's generation in one
//!   batch per step and reuses the KV cache of a prompt prefix it holds;
//! - **native ceiling**: llama.cpp called directly on the same prompts, N
//!   sequences per batch, each batch's common prompt prefix evaluated once
//!   and copied to the others (llama.cpp's own batched decoding).
//!
//! Each configuration runs the same items; per-task latency is the median
//! time of one summarize task (two generations). One invocation, side by
//! side, alternating the order of the two sandbox runs.
//!
//! Run: `cargo bench -p tidepool-bench --bench batched_generation -- --bench`
//! (without `--bench`: 4 items, N = 1 and 2, as a smoke test).

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tidepool_bench::summarize_prompts;
use tidepool_host::LlmSettings;
use tidepool_proto::llm::AcceptPolicy;
use tidepool_tests::llm::{input, run, summarize_sandbox_with};
use tidepool_tests::{fortunes, model_path};

/// What one configuration did.
struct Pass {
    wall: Duration,
    generated: usize,
    /// Per task (sandbox) or per batch of generations (native).
    latencies: Vec<Duration>,
}

impl Pass {
    fn rate(&self) -> f64 {
        self.generated as f64 / self.wall.as_secs_f64()
    }
    fn median_latency(&mut self) -> Duration {
        self.latencies.sort();
        self.latencies[self.latencies.len() / 2]
    }
}

/// Every item through the summarize job on `workers` threads at once.
fn sandbox_pass(llm: LlmSettings, items: &[Vec<u8>], workers: usize) -> Pass {
    let (sb, job) = summarize_sandbox_with(None, llm);
    // Load the model and start any shared context outside the timing.
    run(&sb, &job, "warm", &items[0], None, AcceptPolicy::GREEDY);
    let next = AtomicUsize::new(0);
    let generated = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                let t = Instant::now();
                let out = run(
                    &sb,
                    &job,
                    &format!("t{i}"),
                    item,
                    None,
                    AcceptPolicy::GREEDY,
                );
                out.result.expect("a summary");
                let took = t.elapsed();
                let n: usize = out.transcript.iter().map(|g| g.tokens.len()).sum();
                generated.fetch_add(n, Ordering::Relaxed);
                latencies.lock().expect("latencies").push(took);
            });
        }
    });
    Pass {
        wall: t.elapsed(),
        generated: generated.into_inner(),
        latencies: latencies.into_inner().expect("latencies"),
    }
}

fn argmax(l: &[f32]) -> i32 {
    l.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as i32
}

/// llama.cpp directly: the generations in batches of `n` sequences.
fn native_pass(model: &LlamaModel, prompts: &[(String, usize)], n: usize, threads: u32) -> Pass {
    let backend = tidepool_host::backend::llama::backend().expect("llama.cpp");
    let vocab = model.vocab();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048 * n as u32))
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_seq_max(n as u32)
        .with_kv_unified(true)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32)
        .with_no_perf(true);
    let mut ctx = model.new_context(backend, params).expect("context");
    let mut batch = LlamaBatch::new(512, n as i32);
    let mut generated = 0;
    let mut latencies = Vec::new();
    let t = Instant::now();
    // Summary prompts together, then topic prompts (like prompts batch best).
    let mut order: Vec<&(String, usize)> = prompts.iter().step_by(2).collect();
    order.extend(prompts.iter().skip(1).step_by(2));
    for group in order.chunks(n) {
        let started = Instant::now();
        ctx.clear_kv_cache();
        let toks: Vec<Vec<LlamaToken>> = group
            .iter()
            .map(|(p, _)| vocab.tokenize(p.as_bytes(), true, true))
            .collect();
        // The group's common prefix once, in sequence 0, copied to the rest.
        let common = toks
            .iter()
            .map(|t| t.iter().zip(&toks[0]).take_while(|(a, b)| a == b).count())
            .min()
            .unwrap_or(0)
            .min(toks.iter().map(Vec::len).min().unwrap_or(1) - 1);
        for chunk in toks[0][..common].chunks(512) {
            batch.clear();
            let base = chunk.as_ptr() as usize - toks[0].as_ptr() as usize;
            let base = base / std::mem::size_of::<LlamaToken>();
            for (k, &tk) in chunk.iter().enumerate() {
                batch
                    .add(tk, (base + k) as i32, &[0], false)
                    .expect("batch");
            }
            ctx.decode(&mut batch).expect("decode");
        }
        for s in 1..group.len() {
            ctx.copy_kv_cache_seq(0, s as i32, None, None)
                .expect("copy prefix");
        }
        // Then each remainder; the last row of each chooses its first token.
        let mut next = vec![0i32; group.len()];
        let mut pending: Vec<(usize, usize)> = Vec::new();
        let mut rows: Vec<(usize, i32)> = Vec::new();
        for (s, t) in toks.iter().enumerate() {
            for q in common..t.len() {
                pending.push((s, q));
            }
        }
        for chunk in pending.chunks(512) {
            batch.clear();
            rows.clear();
            for (k, &(s, q)) in chunk.iter().enumerate() {
                let last = q + 1 == toks[s].len();
                batch
                    .add(toks[s][q], q as i32, &[s as i32], last)
                    .expect("batch");
                if last {
                    rows.push((s, k as i32));
                }
            }
            ctx.decode(&mut batch).expect("decode");
            for &(s, k) in &rows {
                next[s] = argmax(ctx.get_logits_ith(k));
            }
        }
        // Decode every live sequence one token per step.
        let mut text: Vec<Vec<u8>> = vec![Vec::new(); group.len()];
        let mut count = vec![0usize; group.len()];
        let mut live: Vec<bool> = vec![true; group.len()];
        loop {
            batch.clear();
            rows.clear();
            for s in 0..group.len() {
                if !live[s] {
                    continue;
                }
                let tk = LlamaToken(next[s]);
                count[s] += 1;
                generated += 1;
                text[s].extend_from_slice(&vocab.token_to_piece(tk, false, None));
                if vocab.is_eog(tk) || text[s].contains(&b'\n') || count[s] >= group[s].1 {
                    live[s] = false;
                    continue;
                }
                let pos = toks[s].len() + count[s] - 1;
                batch.add(tk, pos as i32, &[s as i32], true).expect("batch");
                rows.push((s, batch.n_tokens() - 1));
            }
            if rows.is_empty() {
                break;
            }
            ctx.decode(&mut batch).expect("decode");
            for &(s, k) in &rows {
                next[s] = argmax(ctx.get_logits_ith(k));
            }
        }
        latencies.push(started.elapsed());
    }
    Pass {
        wall: t.elapsed(),
        generated,
        latencies,
    }
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (items, sizes): (usize, &[usize]) = if full {
        (16, &[1, 2, 4, 8])
    } else {
        (4, &[1, 2])
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let texts = fortunes(items)?;
    let inputs: Vec<Vec<u8>> = texts.iter().map(|t| input(t)).collect();
    let prompts: Vec<(String, usize)> = texts.iter().flat_map(|t| summarize_prompts(t)).collect();
    let backend = tidepool_host::backend::llama::backend().map_err(anyhow::Error::msg)?;
    let model = LlamaModel::load_from_file(
        backend,
        model_path("gemma3-270m"),
        &LlamaModelParams::default(),
    )?;
    println!(
        "{items} summarize tasks (two greedy generations each) on Gemma 3 270M, {cores} cores"
    );
    println!(
        "| concurrent tasks | one at a time (threads) | batched | batched ÷ one at a time | native llama.cpp batched (ceiling) | batched ÷ native | task latency, one at a time | task latency, batched |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (k, &n) in sizes.iter().enumerate() {
        let alone_threads = (cores / n as u32).max(1);
        let alone = LlmSettings::alone(alone_threads);
        let batched = LlmSettings {
            threads: cores,
            batch: 8,
        };
        let (mut a, mut b) = if k % 2 == 0 {
            let a = sandbox_pass(alone, &inputs, n);
            (a, sandbox_pass(batched, &inputs, n))
        } else {
            let b = sandbox_pass(batched, &inputs, n);
            (sandbox_pass(alone, &inputs, n), b)
        };
        let c = native_pass(&model, &prompts, n, cores);
        println!(
            "| {n} | {:.1} tok/s ({alone_threads}) | {:.1} tok/s | {:.2}x | {:.1} tok/s | {:.2}x | {:.2} s | {:.2} s |",
            a.rate(),
            b.rate(),
            b.rate() / a.rate(),
            c.rate(),
            b.rate() / c.rate(),
            a.median_latency().as_secs_f64(),
            b.median_latency().as_secs_f64(),
        );
        eprintln!(
            "  generated: one at a time {} in {:.1} s, batched {} in {:.1} s, native {} in {:.1} s",
            a.generated,
            a.wall.as_secs_f64(),
            b.generated,
            b.wall.as_secs_f64(),
            c.generated,
            c.wall.as_secs_f64()
        );
    }
    Ok(())
}
