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
//! The model is loaded once per node and shared by tasks. A generation runs
//! either in a context of its own, made for the call and freed when it
//! returns (bit-for-bit the same on the same build and machine), or — for
//! tasks of the `llm` tier when the node batches (`llm_batch` > 1) — in the
//! model's shared context beside other tasks' generations, which decodes
//! them in one batch per step ([`driver`], ADR 0020). Deterministic
//! settings: a fixed thread count (the node's), a fixed context length per
//! sequence and batch size, greedy decoding or sampling seeded from the
//! options, flash attention left to llama.cpp's CPU default.
//!
//! Each generation is recorded in the task's [`TaskEnv::llm`] transcript
//! (the receipt commits to it). When the task replays another node's
//! transcript (a check of an `llm`-tier result), `compute` does not generate:
//! it evaluates prompt + claimed tokens in batched passes and accepts each
//! claimed token the local model ranks within the job's policy; at the first
//! it does not (or if the claim stops where this model would not), it
//! generates the rest itself (ADR 0008, [`sequence`]).
//!
//! It never loads models from guest bytes and never touches the network.

mod driver;
mod sequence;

use super::{guarded, ModelGraph, NnEngine, TaskEnv};
use driver::Batcher;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use sequence::Request;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use tidepool_proto::llm::Generation;
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, NamedTensor};
use wasmtime_wasi_nn::wit::{GraphEncoding, TensorType};

/// The llama-cpp-2 release this engine is built on (receipts name it).
pub const CRATE_VERSION: &str = "0.1.160";
/// Context length of every generation (prompt + generated tokens).
pub const N_CTX: u32 = 2048;
/// Most generations a shared context decodes together (`llm_batch`).
pub const MAX_BATCH: u32 = crate::MAX_LLM_BATCH;
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
    /// Threads per context (fixed: part of the deterministic settings).
    threads: u32,
    /// Generations of `llm`-tier tasks decoded together in a model's shared
    /// context; 1: every generation has a context of its own.
    batch: u32,
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
            batch: 1,
            gpu: None,
        })
    }

    /// Decode the generations of up to `batch` `llm`-tier tasks together in
    /// one shared context per model (1 = off; at most [`MAX_BATCH`]).
    #[must_use]
    pub fn with_batch(mut self, batch: u32) -> Self {
        self.batch = batch.clamp(1, MAX_BATCH);
        self
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
            batch: 1,
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
        let batch = if self.batch > 1 {
            format!(", llm-tier batches of {}", self.batch)
        } else {
            String::new()
        };
        format!(
            "llama.cpp (llama-cpp-2 {CRATE_VERSION}, {device}, {} threads{batch})",
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
            batch: self.batch,
            new_context: Arc::new(Mutex::new(())),
            batcher: OnceLock::new(),
        }))
    }
}

/// A loaded GGUF model, shared by every task on the node.
struct LlamaGraph {
    /// The weights (live as long as the node's registry holds the model).
    model: Arc<LlamaModel>,
    /// Threads per context.
    threads: u32,
    /// Sequences in the shared context (1: none is made).
    batch: u32,
    /// Contexts are created one at a time: llama.cpp may write to the model
    /// while creating one (see `LlamaModel::new_context`).
    new_context: Arc<Mutex<()>>,
    /// The shared context's thread, started by the first `llm`-tier
    /// generation (or why it could not start); ends when the model is
    /// dropped and no task holds it.
    batcher: OnceLock<Result<Batcher, String>>,
}

impl ModelGraph for LlamaGraph {
    fn context(&self, env: &TaskEnv) -> Result<Box<dyn BackendExecutionContext>, BackendError> {
        let shared = if self.batch > 1 && env.llm.shared_batches {
            let b = self.batcher.get_or_init(|| {
                Batcher::start(
                    self.model.clone(),
                    self.new_context.clone(),
                    self.batch,
                    self.threads,
                )
                .map_err(|e| format!("cannot start the shared llama.cpp context's thread: {e}"))
            });
            Some(b.clone().map_err(err)?)
        } else {
            None
        };
        Ok(Box::new(LlamaTask {
            model: self.model.clone(),
            threads: self.threads,
            new_context: self.new_context.clone(),
            shared,
            env: env.clone(),
        }))
    }
}

/// One task's execution context (the KV cache itself lives in the call's
/// own context or in the shared one, never here).
struct LlamaTask {
    /// The weights.
    model: Arc<LlamaModel>,
    /// Threads of the call's own context.
    threads: u32,
    /// Held while creating a context.
    new_context: Arc<Mutex<()>>,
    /// The model's shared context, for a task whose generations may share a
    /// batch; `None`: each generation gets a context of its own.
    shared: Option<Batcher>,
    /// The task's budget and transcript.
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
        let (text, info) = guarded("generate", || self.generate(prompt, options))?;
        let info = serde_json::to_vec(&info).map_err(|e| err(e.to_string()))?;
        Ok(Some(vec![bytes_out("text", text), bytes_out("info", info)]))
    }
}

impl LlamaTask {
    /// Tokenize, check the context, find the claim to replay, generate
    /// (alone or in the shared batch) and record the generation.
    fn generate(
        &self,
        prompt: &str,
        options: GenerateOptions,
    ) -> Result<(Vec<u8>, GenerateInfo), BackendError> {
        let prompt_tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
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
        let claim = self.env.llm.next_replay(prompt_digest).map(|c| {
            c.iter()
                .take(options.max_tokens as usize)
                .map(|&t| LlamaToken(t as i32))
                .collect()
        });
        let p = prompt_tokens.len();
        let request = Request {
            prompt: prompt_tokens,
            options,
            claim,
            policy: self.env.llm.policy,
            deadline: self.env.budget.deadline,
        };
        let outcome = match &self.shared {
            Some(batcher) => batcher.generate(request)?,
            None => driver::generate_alone(&self.model, &self.new_context, self.threads, request)?,
        };
        if let Some(report) = outcome.report {
            self.env.llm.report(report);
        }
        self.env.llm.record(Generation {
            prompt: prompt_digest,
            tokens: outcome.tokens.iter().map(|t| t.0 as u32).collect(),
        });
        self.env.nn.generated(p as u64, outcome.tokens.len() as u64);
        let info = GenerateInfo {
            prompt_tokens: p as u32,
            generated_tokens: outcome.tokens.len() as u32,
            finish: outcome.finish,
        };
        Ok((outcome.text, info))
    }
}
