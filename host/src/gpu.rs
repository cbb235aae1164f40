//! A node's GPU: which engines run GPU-tier jobs (`[target] device =
//! "gpu"`), and what the node tells the pool about the card.
//!
//! At start, a node with `[gpu] enabled = true` starts every GPU engine its
//! build has, each on the configured device: ONNX Runtime's CUDA provider for
//! `onnx` (from the `onnxruntime-gpu` wheel's library) and llama.cpp with
//! every layer offloaded for `ggml` (builds with `--features cuda`). Each
//! engine starts its device there and then, so a missing driver or CUDA
//! library is a start-up error naming the library, not a failure at the
//! first task. The node advertises the GPU (model, memory, the encodings
//! with a GPU engine) only if at least one engine started; the pool sends
//! GPU-tier tasks nowhere else.
//!
//! The card's model and memory come from the configuration, else from
//! llama.cpp's device list, else from `nvidia-smi`. This module never picks
//! a device by itself beyond the configured index, and never runs a GPU job
//! on the CPU.

use crate::backend::NnEngine;
use crate::{EngineError, Engines};
use std::path::PathBuf;
use std::sync::Arc;
use tidepool_proto::wire::Gpu;

/// What a node owner asked for (`[gpu]` in `node.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuChoice {
    /// CUDA device index.
    pub device: u32,
    /// The card's model, if the owner states it (else detected).
    pub name: Option<String>,
    /// Its memory in MiB, if the owner states it (else detected).
    pub memory_mib: Option<u32>,
    /// The GPU build of ONNX Runtime (`onnxruntime-gpu-lib`).
    pub onnxruntime_lib: PathBuf,
    /// If no GPU engine starts: run as a CPU-only node (with a warning)
    /// rather than refuse to start.
    pub fallback: bool,
}

/// The GPU side of a node that started.
#[derive(Debug, Clone)]
pub struct GpuSupply {
    /// What the node advertises.
    pub info: Gpu,
    /// The engines GPU-tier tasks run on, one per encoding.
    pub engines: Engines,
    /// Encodings whose GPU engine did not start, with the reason (logged).
    pub missing: Vec<String>,
}

/// Start the GPU engines for `choice`. `Ok(None)` means none started and
/// `fallback` is set (the reasons are in the second value, to be logged);
/// without `fallback` that is an error with every reason.
pub fn start(
    choice: &GpuChoice,
    llm_threads: u32,
) -> Result<(Option<GpuSupply>, Vec<String>), EngineError> {
    let mut engines: Engines = Vec::new();
    let mut missing = Vec::new();
    match onnx(choice) {
        Ok(e) => engines.push(e),
        Err(why) => missing.push(format!("onnx: {why}")),
    }
    let mut llama_card = None;
    match ggml(choice, llm_threads) {
        Ok((e, card)) => {
            engines.push(e);
            llama_card = card;
        }
        Err(why) => missing.push(format!("ggml: {why}")),
    }
    if engines.is_empty() {
        let why = format!(
            "no GPU engine could start on device {}: {}",
            choice.device,
            missing.join("; ")
        );
        return if choice.fallback {
            Ok((None, vec![format!("{why}; running as a CPU-only node")]))
        } else {
            Err(EngineError::Gpu(why))
        };
    }
    let (name, memory_mib) = identify(choice, llama_card)?;
    let info = Gpu {
        name,
        memory_mib,
        encodings: engines.iter().map(|e| e.encoding().to_string()).collect(),
    };
    let notes = missing.clone();
    Ok((
        Some(GpuSupply {
            info,
            engines,
            missing,
        }),
        notes,
    ))
}

/// The card's model and memory: configured, else from llama.cpp, else
/// from `nvidia-smi`.
fn identify(
    choice: &GpuChoice,
    llama: Option<(String, u32)>,
) -> Result<(String, u32), EngineError> {
    if let (Some(n), Some(m)) = (&choice.name, choice.memory_mib) {
        return Ok((n.clone(), m));
    }
    let detected = match llama {
        Some(card) => card,
        None => nvidia_smi(choice.device).map_err(|why| {
            EngineError::Gpu(format!(
                "cannot tell GPU {}'s model and memory ({why}); set `name` and `memory_mib` under [gpu]",
                choice.device
            ))
        })?,
    };
    Ok((
        choice.name.clone().unwrap_or(detected.0),
        choice.memory_mib.unwrap_or(detected.1),
    ))
}

/// Ask `nvidia-smi` for device `device`'s model and memory.
pub fn nvidia_smi(device: u32) -> Result<(String, u32), EngineError> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
            "-i",
        ])
        .arg(device.to_string())
        .output()
        .map_err(|e| EngineError::Gpu(format!("nvidia-smi: {e}")))?;
    if !out.status.success() {
        return Err(EngineError::Gpu(format!(
            "nvidia-smi: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

/// Parse one line of `nvidia-smi --query-gpu=name,memory.total
/// --format=csv,noheader,nounits` (`NVIDIA L4, 23034`).
pub fn parse_nvidia_smi(text: &str) -> Result<(String, u32), EngineError> {
    let bad = |why: String| EngineError::Gpu(why);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| bad("nvidia-smi printed nothing".into()))?;
    let (name, mib) = line
        .rsplit_once(',')
        .ok_or_else(|| bad(format!("nvidia-smi printed {line:?}, not \"name, memory\"")))?;
    let mib: u32 = mib.trim().parse().map_err(|_| {
        bad(format!(
            "nvidia-smi printed {line:?}: {:?} is not MiB",
            mib.trim()
        ))
    })?;
    let name = name.trim();
    if name.is_empty() {
        return Err(bad(format!("nvidia-smi printed {line:?}: no model name")));
    }
    Ok((name.to_owned(), mib))
}

#[cfg(feature = "onnxruntime")]
fn onnx(choice: &GpuChoice) -> Result<Arc<dyn NnEngine>, EngineError> {
    crate::backend::onnxruntime::OrtEngine::cuda(&choice.onnxruntime_lib, choice.device)
        .map(|e| Arc::new(e) as Arc<dyn NnEngine>)
        .map_err(|e| EngineError::OnnxRuntime(e.to_string()))
}

#[cfg(not(feature = "onnxruntime"))]
fn onnx(_choice: &GpuChoice) -> Result<Arc<dyn NnEngine>, EngineError> {
    Err(EngineError::OnnxRuntime(
        "this build has no ONNX Runtime engine (cargo feature `onnxruntime`)".into(),
    ))
}

/// A GPU engine and, if it can tell, the card's model and memory (MiB).
type EngineAndCard = (Arc<dyn NnEngine>, Option<(String, u32)>);

/// llama.cpp on the GPU, and the card as llama.cpp describes it.
#[cfg(feature = "llama")]
fn ggml(choice: &GpuChoice, llm_threads: u32) -> Result<EngineAndCard, EngineError> {
    let e = crate::backend::llama::LlamaEngine::gpu(llm_threads, choice.device)?;
    let card = e
        .gpu_device()
        .map(|g| (g.description.clone(), g.memory_mib));
    Ok((Arc::new(e), card))
}

#[cfg(not(feature = "llama"))]
fn ggml(_choice: &GpuChoice, _llm_threads: u32) -> Result<EngineAndCard, EngineError> {
    Err(EngineError::Llama(
        "this build has no llama.cpp engine (cargo feature `llama`)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_parse_and_nonsense_is_refused() {
        assert_eq!(
            parse_nvidia_smi("NVIDIA L4, 23034\n"),
            Ok(("NVIDIA L4".to_owned(), 23034))
        );
        // Names may hold commas; the memory is the last field.
        assert_eq!(
            parse_nvidia_smi("\nNVIDIA RTX A6000, Ada, 49140\n"),
            Ok(("NVIDIA RTX A6000, Ada".to_owned(), 49140))
        );
        for bad in ["", "NVIDIA L4", "NVIDIA L4, [N/A]", ", 1024"] {
            let err = parse_nvidia_smi(bad).expect_err(bad).to_string();
            assert!(err.contains("nvidia-smi"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn stated_name_and_memory_win_over_detection() {
        let choice = GpuChoice {
            device: 0,
            name: Some("NVIDIA L4".into()),
            memory_mib: Some(23034),
            onnxruntime_lib: PathBuf::from("/nonexistent"),
            fallback: false,
        };
        assert_eq!(
            identify(&choice, Some(("other".into(), 1))),
            Ok(("NVIDIA L4".to_owned(), 23034))
        );
        let half = GpuChoice {
            memory_mib: None,
            ..choice
        };
        assert_eq!(
            identify(&half, Some(("CUDA card".into(), 8192))),
            Ok(("NVIDIA L4".to_owned(), 8192))
        );
    }
}
