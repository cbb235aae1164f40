//! Helpers for the LLM tests: the summarize job on Gemma 3 270M in a real
//! sandbox, runs that replay a claimed transcript, and the lies a cheating
//! node could tell about generated text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tidepool_host::local::{registry_with, ModelArg};
use tidepool_host::{JobComponent, Sandbox, SandboxConfig, TaskOutput, TaskSpec};
use tidepool_proto::llm::{AcceptPolicy, Generation};

/// The summarize job's model name.
pub const MODEL: &str = "gemma3-270m";

/// A sandbox with Gemma 3 270M under `MODEL` (from `file`, or the
/// catalogue's verified file), `threads` per generation, and the summarize
/// job loaded.
pub fn summarize_sandbox(file: Option<(&Path, &str)>, threads: u32) -> (Sandbox, JobComponent) {
    summarize_sandbox_with(file, tidepool_host::LlmSettings::alone(threads))
}

/// [`summarize_sandbox`] with these llama.cpp settings (batching among
/// them), and room for 16 tasks at once.
pub fn summarize_sandbox_with(
    file: Option<(&Path, &str)>,
    llm: tidepool_host::LlmSettings,
) -> (Sandbox, JobComponent) {
    let arg = match file {
        Some((p, sha)) => ModelArg {
            name: MODEL.into(),
            path: Some(p.to_owned()),
            sha256: Some(sha.to_owned()),
        },
        None => {
            crate::model_path(MODEL);
            ModelArg {
                name: MODEL.into(),
                path: None,
                sha256: None,
            }
        }
    };
    let reg = registry_with(&[arg], &tidepool_host::models::models_dir(), llm)
        .expect("gemma3-270m must be fetched: run `cargo xtask fetch-models`");
    let sb = Sandbox::new(
        SandboxConfig {
            timeout: std::time::Duration::from_secs(300),
            cache_dir: None,
            max_concurrent: 16,
            ..SandboxConfig::default()
        },
        reg,
    )
    .expect("sandbox");
    let job = sb
        .load(&crate::guest("summarize"))
        .expect("summarize loads");
    (sb, job)
}

/// The summarize input for a text.
pub fn input(text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "text": text })).expect("json")
}

/// Run one task, replaying `claim` under `accept` if given.
pub fn run(
    sb: &Sandbox,
    job: &JobComponent,
    id: &str,
    input: &[u8],
    claim: Option<&[Generation]>,
    accept: AcceptPolicy,
) -> TaskOutput {
    sb.run(
        job,
        TaskSpec {
            id,
            params: &BTreeMap::new(),
            input,
            replay: claim,
            accept,
            // The summarize job is `llm`-tier: its generations may share a
            // batch wherever the engine batches.
            shared_batches: true,
        },
    )
    .expect("the task runs")
}

/// Replaying under this gives the output a claimed transcript implies
/// (what a liar reports along with it).
pub const FORCE: AcceptPolicy = AcceptPolicy::FORCE;

/// A "different model": a copy of the GGUF with the lowest bit of every
/// `stride`-th byte of its tensor data flipped (one quantisation step, or
/// the last mantissa bit of a scale). Same tokenizer and architecture,
/// different weights: what a node running a cheaper quantisation looks
/// like. Returns the path and its sha256.
pub fn perturbed_model(dir: &Path, stride: usize) -> (PathBuf, String) {
    let src = crate::model_path(MODEL);
    let mut bytes = std::fs::read(&src).expect("read gguf");
    // The header, metadata and 262k-token vocabulary sit in the first few
    // MB; everything after 16 MiB is tensor data.
    let start = 16 << 20;
    for i in (start..bytes.len()).step_by(stride) {
        bytes[i] ^= 1;
    }
    let out = dir.join("gemma-perturbed.gguf");
    std::fs::write(&out, &bytes).expect("write gguf");
    let sha = tidepool_host::models::sha256_file(&out).expect("hash");
    (out, sha)
}

/// The lies a node can tell about a generation, applied to an honest
/// transcript (`seed` picks the random parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// Every token replaced by a random one.
    RandomTokens,
    /// The second half of each generation dropped (with its end token).
    Truncate,
    /// One token in the middle of each generation replaced by `other`'s.
    Edit,
}

/// Apply `lie` to `honest`; `donor` supplies real tokens for edits.
pub fn lie(lie: Lie, honest: &[Generation], donor: &[Generation], seed: u64) -> Vec<Generation> {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let donor_tokens: Vec<u32> = donor.iter().flat_map(|g| g.tokens.clone()).collect();
    honest
        .iter()
        .map(|g| {
            let mut tokens = g.tokens.clone();
            match lie {
                Lie::RandomTokens => {
                    for t in &mut tokens {
                        // Gemma 3's vocabulary has 262,144 entries; skip the specials.
                        *t = 1000 + (next() % 250_000) as u32;
                    }
                }
                Lie::Truncate => tokens.truncate(tokens.len() / 2),
                Lie::Edit => {
                    if !tokens.is_empty() {
                        let i = tokens.len() / 2;
                        let mut pick = tokens[i];
                        for _ in 0..64 {
                            if donor_tokens.is_empty() {
                                break;
                            }
                            pick = donor_tokens[(next() as usize) % donor_tokens.len()];
                            if pick != tokens[i] && pick > 10 {
                                break;
                            }
                        }
                        if pick == tokens[i] {
                            pick = tokens[i] + 1;
                        }
                        tokens[i] = pick;
                    }
                }
            }
            Generation {
                prompt: g.prompt,
                tokens,
            }
        })
        .collect()
}

/// One task for [`run_all`]: id, input, claim to replay, policy.
pub type Job<'a> = (String, Vec<u8>, Option<&'a [Generation]>, AcceptPolicy);

/// Run every task on `workers` threads at once (so a batching engine
/// decodes their generations together); outputs in the tasks' order.
pub fn run_all(
    sb: &Sandbox,
    job: &JobComponent,
    tasks: &[Job<'_>],
    workers: usize,
) -> Vec<TaskOutput> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outs: Vec<std::sync::Mutex<Option<TaskOutput>>> =
        tasks.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((id, input, claim, policy)) = tasks.get(i) else {
                    return;
                };
                let out = run(sb, job, id, input, *claim, *policy);
                *outs[i].lock().expect("output slot") = Some(out);
            });
        }
    });
    outs.into_iter()
        .map(|o| {
            o.into_inner()
                .expect("output slot")
                .expect("every task ran")
        })
        .collect()
}

/// Tasks a replay test runs: `TIDEPOOL_LLM_RUNS`, or `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("TIDEPOOL_LLM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `TIDEPOOL_LLM_LIES=0` replays honest claims only (for measuring the
/// false-reject rate over a few hundred tasks at a fifth of the cost).
pub fn lies() -> bool {
    std::env::var("TIDEPOOL_LLM_LIES").map_or(true, |v| v != "0")
}
