//! llama.cpp as the `ggml` engine (GGUF models), through the `llama-cpp-2`
//! crate, which builds llama.cpp's vendored source with cmake (CPU here; the
//! `cuda` cargo feature builds its CUDA backend where a toolkit exists).
//!
//! Text crosses wasi-nn as bytes (wasi-nn tensors have no strings; the
//! convention is in `wit/README.md` and wrapped by `tidepool_guest::llm`):
//! - input `prompt`: `u8` tensor, the prompt in UTF-8 (special tokens such as
//!   `<start_of_turn>` are parsed; the model's BOS is added);
//! - input `options`: `u8` tensor, JSON [`GenerateOptions`];
//! - outputs `text` (`u8`, the generated text without the end token and
//!   cut before the first stop string) and `info` (`u8`, JSON: prompt and
//!   generated token counts, why generation stopped).
//!
//! The model is loaded once per node and shared by tasks; every `compute`
//! makes its own context (KV cache), freed when it returns. Deterministic
//! settings: a fixed thread count (the node's), a fixed context length and
//! batch size, greedy decoding or sampling seeded from the options, flash
//! attention off. The same build on the same machine gives the same text.
//!
//! Each generation is recorded in the task's [`TaskEnv::llm`] transcript
//! (the receipt commits to it). When the task replays another node's
//! transcript (a check of an `llm`-tier result), `compute` does not generate:
//! it runs one batched pass over prompt + claimed tokens and accepts each
//! claimed token the local model ranks within the job's policy; at the first
//! it does not (or if the claim stops where this model would not), it
//! generates the rest itself (ADR 0008).
//!
//! It never loads models from guest bytes and never touches the network.

use super::{guarded, ModelGraph, NnEngine, ReplayReport, TaskEnv};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use tidepool_proto::llm::Generation;
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, NamedTensor};
use wasmtime_wasi_nn::wit::{GraphEncoding, TensorType};

/// The llama-cpp-2 release this engine is built on (receipts name it).
pub const CRATE_VERSION: &str = "0.1.160";
/// Context length of every task context (prompt + generated tokens).
pub const N_CTX: u32 = 2048;
/// Tokens evaluated per `decode` call.
pub const N_BATCH: u32 = 512;
/// Longest accepted prompt, in bytes (before tokenizing).
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;
/// At most this many stop strings, each at most [`MAX_STOP_BYTES`].
pub const MAX_STOPS: usize = 8;
/// Longest stop string in bytes.
pub const MAX_STOP_BYTES: usize = 64;

/// llama.cpp's process-wide backend: initialised once, never torn down.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The process's llama.cpp backend (llama.cpp allows one per process, so
/// anything else in the process that calls llama.cpp directly, such as a
/// benchmark's native baseline, must take it from here).
///
/// # Errors
/// llama.cpp's initialisation error, the same on every call.
pub fn backend() -> Result<&'static LlamaBackend, crate::EngineError> {
    BACKEND
        .get_or_init(|| {
            // llama.cpp logs every tensor at load: route it to tracing
            // (debug level), never to the node's stderr.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| crate::EngineError::Llama(e.clone()))
}

/// Generation options, the JSON in the `options` tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateOptions {
    /// Most tokens to generate (1..=2048, and prompt + this ≤ the context).
    pub max_tokens: u32,
    /// 0 = greedy; otherwise sample at this temperature (≤ 2).
    #[serde(default)]
    pub temperature: f32,
    /// With sampling: sample among this many best tokens (1..=1000, default 40).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// With sampling: the seed.
    #[serde(default)]
    pub seed: u32,
    /// Stop before the first of these strings (not included in the text).
    #[serde(default)]
    pub stop: Vec<String>,
}

impl GenerateOptions {
    fn validate(&self) -> Result<(), String> {
        if self.max_tokens == 0 || self.max_tokens > N_CTX {
            return Err(format!(
                "options.max_tokens {} is outside 1..={N_CTX}",
                self.max_tokens
            ));
        }
        if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
            return Err(format!(
                "options.temperature {} is outside 0..=2",
                self.temperature
            ));
        }
        if let Some(k) = self.top_k {
            if !(1..=1000).contains(&k) {
                return Err(format!("options.top_k {k} is outside 1..=1000"));
            }
        }
        if self.stop.len() > MAX_STOPS {
            return Err(format!(
                "options.stop has {} strings; at most {MAX_STOPS}",
                self.stop.len()
            ));
        }
        for s in &self.stop {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(format!(
                    "options.stop entry {s:?} must be 1..={MAX_STOP_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }
}

/// Why generation ended (in the `info` output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// The model produced an end-of-generation token.
    Eog,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// The `info` output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateInfo {
    /// Tokens in the prompt (with BOS).
    pub prompt_tokens: u32,
    /// Tokens generated (with the end token, if any).
    pub generated_tokens: u32,
    /// Why it stopped.
    pub finish: Finish,
}

/// The llama.cpp engine for `ggml`.
#[derive(Debug, Clone)]
pub struct LlamaEngine {
    /// Threads per task context (fixed: part of the deterministic settings).
    threads: u32,
    /// The GPU every layer is offloaded to, or none (CPU only, even in a
    /// build with `cuda`). Fixed at start.
    gpu: Option<LlamaGpu>,
}

/// A GPU as llama.cpp sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaGpu {
    /// llama.cpp's device index (`LlamaModelParams::with_devices`).
    index: usize,
    /// Backend and device name (`CUDA0`).
    pub name: String,
    /// The model the driver reports (`NVIDIA L4`).
    pub description: String,
    /// Total memory, MiB.
    pub memory_mib: u32,
}

/// The GPUs llama.cpp can use in this build (none without `cuda`).
pub fn gpus() -> Result<Vec<LlamaGpu>, crate::EngineError> {
    use llama_cpp_2::LlamaBackendDeviceType as T;
    backend()?;
    Ok(llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| matches!(d.device_type, T::Gpu | T::IntegratedGpu))
        .map(|d| LlamaGpu {
            index: d.index,
            name: d.name,
            description: d.description,
            memory_mib: u32::try_from(d.memory_total >> 20).unwrap_or(u32::MAX),
        })
        .collect())
}

impl LlamaEngine {
    /// An engine whose contexts use `threads` threads (at least 1), on the
    /// CPU.
    pub fn new(threads: u32) -> Result<Self, crate::EngineError> {
        backend()?;
        Ok(Self {
            threads: threads.max(1),
            gpu: None,
        })
    }

    /// An engine that offloads every layer to the `ordinal`-th GPU llama.cpp
    /// sees (threads still drive the CPU side of each step).
    pub fn gpu(threads: u32, ordinal: u32) -> Result<Self, crate::EngineError> {
        let all = gpus()?;
        let Some(gpu) = all.get(ordinal as usize).cloned() else {
            let why = if cfg!(feature = "cuda") {
                format!("llama.cpp sees {} GPU(s), so there is no GPU {ordinal} (is the NVIDIA driver loaded?)", all.len())
            } else {
                "this build of llama.cpp has no GPU backend (build the node with `--features cuda`, see docs/gpu-nodes.md)".to_owned()
            };
            return Err(crate::EngineError::Llama(why));
        };
        Ok(Self {
            threads: threads.max(1),
            gpu: Some(gpu),
        })
    }

    /// The GPU it runs on, if any.
    pub fn gpu_device(&self) -> Option<&LlamaGpu> {
        self.gpu.as_ref()
    }
}

impl NnEngine for LlamaEngine {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Ggml
    }
    fn describe(&self) -> String {
        let device = match &self.gpu {
            Some(g) => format!("{} {}", g.name, g.description),
            None => "cpu".to_owned(),
        };
        format!(
            "llama.cpp (llama-cpp-2 {CRATE_VERSION}, {device}, {} threads)",
            self.threads
        )
    }
    fn load(&self, path: &Path) -> anyhow::Result<Arc<dyn ModelGraph>> {
        let backend = backend().map_err(anyhow::Error::msg)?;
        let params = match &self.gpu {
            // Every layer on the GPU (llama.cpp caps the count at the model's).
            Some(g) => LlamaModelParams::default()
                .with_n_gpu_layers(999)
                .with_devices(&[g.index])
                .map_err(|e| anyhow::anyhow!("llama.cpp GPU {}: {e}", g.name))?,
            // A `cuda` build would offload by default: CPU engines say no.
            None => LlamaModelParams::default().with_n_gpu_layers(0),
        };
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| anyhow::anyhow!("llama.cpp cannot load {}: {e}", path.display()))?;
        Ok(Arc::new(LlamaGraph {
            model: Arc::new(model),
            threads: self.threads,
            new_context: Arc::new(Mutex::new(())),
        }))
    }
}

/// A loaded GGUF model, shared by every task on the node.
struct LlamaGraph {
    /// The weights (live as long as the node's registry).
    model: Arc<LlamaModel>,
    /// Threads per context.
    threads: u32,
    /// Contexts are created one at a time: llama.cpp may write to the model
    /// while creating one (see `LlamaModel::new_context`).
    new_context: Arc<Mutex<()>>,
}

impl ModelGraph for LlamaGraph {
    fn context(&self, env: &TaskEnv) -> Result<Box<dyn BackendExecutionContext>, BackendError> {
        Ok(Box::new(LlamaTask {
            model: self.model.clone(),
            threads: self.threads,
            new_context: self.new_context.clone(),
            env: env.clone(),
        }))
    }
}

/// One task's execution context (the KV cache itself lives only inside
/// `compute`).
struct LlamaTask {
    model: Arc<LlamaModel>,
    threads: u32,
    new_context: Arc<Mutex<()>>,
    env: TaskEnv,
}

fn err(msg: String) -> BackendError {
    BackendError::BackendAccess(wasmtime::Error::msg(msg))
}

fn text_tensor(t: &NamedTensor) -> Result<&[u8], BackendError> {
    if t.tensor.ty != TensorType::U8 {
        return Err(err(format!(
            "input {:?} must be a u8 tensor (text as bytes), not {:?}",
            t.name, t.tensor.ty
        )));
    }
    let n: u64 = t.tensor.dimensions.iter().map(|&d| u64::from(d)).product();
    if t.tensor.dimensions.len() != 1 || n != t.tensor.data.len() as u64 {
        return Err(err(format!(
            "input {:?} must be one-dimensional [{}], got dimensions {:?}",
            t.name,
            t.tensor.data.len(),
            t.tensor.dimensions
        )));
    }
    Ok(&t.tensor.data)
}

fn bytes_out(name: &str, data: Vec<u8>) -> NamedTensor {
    NamedTensor {
        name: name.to_owned(),
        tensor: wasmtime_wasi_nn::Tensor {
            dimensions: vec![data.len() as u32],
            ty: TensorType::U8,
            data,
        },
    }
}

impl BackendExecutionContext for LlamaTask {
    refuse_witx!();
    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        self.env.budget.check("compute")?;
        let names = ["prompt".to_owned(), "options".to_owned()];
        let ordered = super::order_inputs(&names, inputs.as_deref())?;
        let prompt = text_tensor(ordered[0])?;
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(err(format!(
                "the prompt is {} bytes; at most {MAX_PROMPT_BYTES}",
                prompt.len()
            )));
        }
        let prompt = std::str::from_utf8(prompt).map_err(|e| {
            err(format!(
                "the prompt is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            ))
        })?;
        let options: GenerateOptions =
            serde_json::from_slice(text_tensor(ordered[1])?).map_err(|e| {
                err(format!(
                    "options are not valid generation options JSON: {e}"
                ))
            })?;
        options.validate().map_err(err)?;
        let run = Run {
            model: &self.model,
            threads: self.threads,
            new_context: &self.new_context,
            env: &self.env,
        };
        let (text, info) = guarded("generate", || run.generate(prompt, &options))?;
        let info = serde_json::to_vec(&info).map_err(|e| err(e.to_string()))?;
        Ok(Some(vec![bytes_out("text", text), bytes_out("info", info)]))
    }
}

/// One generation call.
struct Run<'a> {
    model: &'a LlamaModel,
    threads: u32,
    new_context: &'a Mutex<()>,
    env: &'a TaskEnv,
}

/// Where a generation stands while tokens are appended.
struct Progress<'o> {
    options: &'o GenerateOptions,
    /// Tokens generated (or accepted from a replay) so far.
    tokens: Vec<LlamaToken>,
    /// Their text so far.
    text: Vec<u8>,
    /// Set once generation has ended.
    finish: Option<Finish>,
    /// Length of `text` to return (cut before a stop string).
    keep: usize,
}

impl<'o> Progress<'o> {
    fn new(options: &'o GenerateOptions) -> Self {
        Self {
            options,
            tokens: Vec::new(),
            text: Vec::new(),
            finish: None,
            keep: 0,
        }
    }

    /// Append one token; sets `finish` when generation must end after it.
    fn push(&mut self, model: &LlamaModel, token: LlamaToken) {
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
        let hit = self
            .options
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
        if self.tokens.len() >= self.options.max_tokens as usize {
            self.finish = Some(Finish::Length);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Run<'_> {
    fn context(&self) -> Result<LlamaContext<'_>, BackendError> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(N_CTX))
            .with_n_batch(N_BATCH)
            .with_n_ubatch(N_BATCH)
            .with_n_seq_max(1)
            .with_n_threads(self.threads as i32)
            .with_n_threads_batch(self.threads as i32)
            .with_no_perf(true);
        let backend = backend().map_err(|e| err(e.to_string()))?;
        // A poisoned lock guards nothing but ordering; keep going.
        let _one_at_a_time = self.new_context.lock().unwrap_or_else(|p| p.into_inner());
        self.model
            .new_context(backend, params)
            .map_err(|e| err(format!("cannot create a llama.cpp context: {e}")))
    }

    /// Evaluate `tokens` at positions `start..`, asking for logits at the
    /// positions `want` says; calls `seen(position, logits)` for each.
    fn eval(
        &self,
        ctx: &mut LlamaContext<'_>,
        tokens: &[LlamaToken],
        start: usize,
        want: &dyn Fn(usize) -> bool,
        seen: &mut dyn FnMut(usize, &[f32]) -> bool,
    ) -> Result<bool, BackendError> {
        let mut batch = LlamaBatch::new(N_BATCH as usize, 1);
        for (c, chunk) in tokens.chunks(N_BATCH as usize).enumerate() {
            self.env.budget.check("the next batch")?;
            batch.clear();
            let base = start + c * N_BATCH as usize;
            for (i, &t) in chunk.iter().enumerate() {
                batch
                    .add(t, (base + i) as i32, &[0], want(base + i))
                    .map_err(|e| err(format!("batch: {e}")))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| err(format!("llama.cpp decode failed: {e}")))?;
            for i in 0..chunk.len() {
                if want(base + i) && !seen(base + i, ctx.get_logits_ith(i as i32)) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn sampler(&self, options: &GenerateOptions) -> LlamaSampler {
        if options.temperature == 0.0 {
            LlamaSampler::greedy()
        } else {
            LlamaSampler::chain_simple([
                LlamaSampler::top_k(options.top_k.unwrap_or(40) as i32),
                LlamaSampler::temp(options.temperature),
                LlamaSampler::dist(options.seed),
            ])
        }
    }

    fn generate(
        &self,
        prompt: &str,
        options: &GenerateOptions,
    ) -> Result<(Vec<u8>, GenerateInfo), BackendError> {
        let vocab = self.model.vocab();
        let prompt_tokens = vocab.tokenize(prompt.as_bytes(), true, true);
        if prompt_tokens.is_empty() {
            return Err(err("the prompt is empty".into()));
        }
        let need = prompt_tokens.len() + options.max_tokens as usize;
        if need > N_CTX as usize {
            return Err(err(format!(
                "the prompt is {} tokens; with max_tokens {} that exceeds the context of {N_CTX} tokens",
                prompt_tokens.len(),
                options.max_tokens
            )));
        }
        let ids: Vec<u32> = prompt_tokens.iter().map(|t| t.0 as u32).collect();
        let prompt_digest = Generation::prompt_digest(&ids);
        let replay = self.env.llm.next_replay(prompt_digest);
        let mut ctx = self.context()?;
        let p = prompt_tokens.len();
        let mut progress = Progress::new(options);
        let mut sampler = self.sampler(options);
        let greedy = options.temperature == 0.0;
        // The next token to append, once chosen.
        let mut next: Option<LlamaToken> = None;
        match replay {
            Some(claimed) => {
                let policy = self.env.llm.policy;
                let claimed: Vec<LlamaToken> = claimed
                    .iter()
                    .take(options.max_tokens as usize)
                    .map(|&t| LlamaToken(t as i32))
                    .collect();
                let n_vocab = self.model.n_vocab() as u32;
                let mut all = prompt_tokens.clone();
                all.extend(claimed.iter().copied());
                let mut report = ReplayReport::default();
                let mut accepted = 0usize;
                // The row that predicts the first token this model must choose itself.
                let mut pending: Option<Vec<f32>> = None;
                // Logits at position q predict the token at q + 1.
                let want = |q: usize| q + 1 >= p;
                let mut seen = |q: usize, logits: &[f32]| {
                    let j = q + 1 - p;
                    if progress.finish.is_some() {
                        return false;
                    }
                    if j >= claimed.len() {
                        pending = Some(logits.to_vec());
                        return false;
                    }
                    let t = claimed[j];
                    let (ok, gap) = if (t.0 as u32) < n_vocab {
                        policy.accepts(logits, t.0 as usize)
                    } else {
                        (false, f32::INFINITY)
                    };
                    report.checked += 1;
                    if gap.is_finite() {
                        report.max_gap = report.max_gap.max(gap);
                    }
                    if !ok {
                        report.rejected_at = Some(j as u32);
                        pending = Some(logits.to_vec());
                        return false;
                    }
                    progress.push(self.model, t);
                    accepted = j + 1;
                    true
                };
                // `seen` stops the pass at the first rejected token, at the
                // claim's end, or where this model's generation ends.
                self.eval(&mut ctx, &all, 0, &want, &mut seen)?;
                if policy.is_force() && progress.finish.is_none() {
                    // Forced: the claim ends where it says.
                    progress.finish = Some(Finish::Length);
                    progress.keep = progress.text.len();
                }
                if progress.finish.is_some() {
                    // Claimed tokens past the end are not part of a true output.
                    report.extra_tokens = (claimed.len() - accepted) as u32;
                } else if report.rejected_at.is_none() {
                    // Every claimed token accepted, yet generation had not ended.
                    report.truncated = true;
                }
                self.env.llm.report(report);
                // Keep only the prompt and the accepted prefix in the KV cache.
                ctx.clear_kv_cache_seq(Some(0), Some((p + accepted) as u32), None)
                    .map_err(|e| err(format!("kv cache: {e}")))?;
                sampler.accept_many(progress.tokens.iter());
                if let Some(row) = pending {
                    next = Some(pick(&mut sampler, greedy, &row));
                }
            }
            None => {
                self.eval(&mut ctx, &prompt_tokens, 0, &|q| q + 1 == p, &mut |_, l| {
                    next = Some(pick(&mut sampler, greedy, l));
                    true
                })?;
            }
        }
        // Generate until the end, one token at a time.
        while progress.finish.is_none() {
            let t = next
                .take()
                .ok_or_else(|| err("no logits to choose the next token from".into()))?;
            progress.push(self.model, t);
            if progress.finish.is_some() {
                break;
            }
            self.env.budget.check("the next token")?;
            let pos = p + progress.tokens.len() - 1;
            self.eval(&mut ctx, &[t], pos, &|_| true, &mut |_, l| {
                next = Some(pick(&mut sampler, greedy, l));
                true
            })?;
        }
        drop(ctx);
        let finish = progress.finish.unwrap_or(Finish::Length);
        self.env.llm.record(Generation {
            prompt: prompt_digest,
            tokens: progress.tokens.iter().map(|t| t.0 as u32).collect(),
        });
        self.env
            .nn
            .generated(p as u64, progress.tokens.len() as u64);
        let info = GenerateInfo {
            prompt_tokens: p as u32,
            generated_tokens: progress.tokens.len() as u32,
            finish,
        };
        let mut text = progress.text;
        text.truncate(progress.keep);
        Ok((text, info))
    }
}

/// Choose the next token from a row of logits: the best one (greedy), or
/// by the task's seeded sampler chain.
fn pick(sampler: &mut LlamaSampler, greedy: bool, logits: &[f32]) -> LlamaToken {
    if greedy {
        return LlamaToken(argmax(logits) as i32);
    }
    let mut data = llama_cpp_2::token::data_array::LlamaTokenDataArray::from_iter(
        logits.iter().enumerate().map(|(i, &l)| {
            llama_cpp_2::token::data::LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)
        }),
        false,
    );
    data.apply_sampler(sampler);
    let t = data
        .selected_token()
        .unwrap_or_else(|| LlamaToken(argmax(logits) as i32));
    sampler.accept(t);
    t
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
