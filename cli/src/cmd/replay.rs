//! `tidepool replay`: run an accepted result again in the node sandbox and
//! say whether it reproduces (bit for bit, within tolerance, or by the llm
//! replay check) and where it differs.
//!
//! Exit codes: 0 it reproduces; 1 it could not be replayed (bad file,
//! component or model); 2 it does not reproduce.

use anyhow::Context;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_node::replay::{replay, ReplayConfig, Reproduced};
use tidepool_proto::replay::ReplayFile;

#[derive(clap::Args)]
pub struct Args {
    /// A result written by `tidepool job results --export DIR`.
    file: PathBuf,
    /// The bundle's component (.wasm); its digest must be the bundle's.
    #[arg(long)]
    component: PathBuf,
    /// A model file by the bundle's name for it, NAME=PATH (default: the
    /// catalogue model with the bundle's digest, from the models directory).
    #[arg(long = "model", value_name = "NAME=PATH", value_parser = parse_model)]
    models: Vec<(String, PathBuf)>,
    /// Engine for onnx models: `tract` (default) or `onnxruntime`.
    #[arg(long, default_value = "tract")]
    onnx_engine: String,
    /// Threads per text generation.
    #[arg(long, default_value_t = tidepool_host::DEFAULT_LLM_THREADS)]
    llm_threads: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_model(s: &str) -> Result<(String, PathBuf), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
        .ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))
}

pub fn main(a: Args) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let file: ReplayFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a replay file", a.file.display()))?;
    let r = file
        .replayable()
        .with_context(|| a.file.display().to_string())?;
    let component = std::fs::read(&a.component)
        .with_context(|| format!("cannot read component {}", a.component.display()))?;
    let models_dir = tidepool_host::models::models_dir();
    let onnx = match a.onnx_engine.as_str() {
        "tract" => tidepool_host::OnnxEngine::Tract,
        "onnxruntime" => tidepool_host::OnnxEngine::OnnxRuntime {
            library: tidepool_host::models::path_in(
                &models_dir,
                tidepool_host::models::catalog_entry("onnxruntime-lib")?,
            ),
            fallback: false,
        },
        other => anyhow::bail!("--onnx-engine {other:?} is not tract or onnxruntime"),
    };
    let cfg = ReplayConfig {
        models_dir,
        models: a.models.into_iter().collect::<BTreeMap<_, _>>(),
        onnx,
        llm_threads: a.llm_threads.clamp(1, 256),
        memory_mib: 4096,
    };
    let report =
        replay(&r, &component, &cfg).with_context(|| format!("replaying {}", a.file.display()))?;
    let (verdict, detail) = match &report.reproduced {
        Reproduced::Identical => ("identical", "bit for bit".to_owned()),
        Reproduced::WithinTolerance { difference } => (
            "within-tolerance",
            format!("within the bundle's tolerance ({difference})"),
        ),
        Reproduced::AcceptedByLlmCheck { tokens } => (
            "accepted-by-llm-check",
            format!("the llm replay check accepted all {tokens} recorded tokens"),
        ),
        Reproduced::Differs { difference } => ("differs", format!("differs: {difference}")),
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "file": a.file,
                "job": file.job,
                "index": file.index,
                "bundle": report.bundle,
                "tier": report.tier,
                "verdict": verdict,
                "detail": detail,
                "recorded_is_signed": report.recorded_is_signed,
                "local_is_signed": report.local_is_signed,
                "original": report.original,
                "local": report.local,
            })
        );
    } else {
        println!(
            "job {} input {} ({}, tier {}): {detail}",
            file.job, file.index, report.bundle, report.tier
        );
        if !report.recorded_is_signed {
            println!(
                "  the recorded output is not the one node {} signed; this run's output {} its receipt",
                file.node.short(),
                if report.local_is_signed { "matches" } else { "does not match" }
            );
        }
        let engines = |r: &tidepool_proto::Receipt| {
            let mut e: Vec<&str> = r.models.values().map(|m| m.engine.as_str()).collect();
            e.dedup();
            e.join(", ")
        };
        if !report.original.models.is_empty() {
            println!(
                "  node ran on {}; this run on {}",
                engines(&report.original),
                engines(&report.local)
            );
        }
    }
    Ok(if report.reproduced.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
