//! One copy of each model per node (issue #20): the resident memory of a
//! process that registers the same model for one bundle, for three bundles
//! each with its own copy (as nodes did before), and for three bundles
//! sharing it (`SharedModels`, as nodes do now). Each configuration runs in
//! a child process of its own, so memory freed by one never flatters
//! another; they run side by side in one invocation.
//!
//! Run: `cargo bench -p tidepool-bench --bench shared_models` (the models
//! fetched by `cargo xtask test`). Without `--bench` it measures MiniLM
//! only; with it, Gemma 3 270M on llama.cpp as well.

use std::sync::Arc;
use tidepool_bench::proc_status_mib;
use tidepool_host::backend::NnEngine;
use tidepool_host::{RegistryBuilder, SharedModels};

/// Register `model` for `bundles` registries (shared or each its own) and
/// print the process's resident MiB before and after.
fn child(model: &str, bundles: usize, shared: bool) -> anyhow::Result<()> {
    let entry = tidepool_host::models::catalog_entry(model)?;
    let path = tidepool_host::models::path_in(&tidepool_host::models::models_dir(), entry);
    let encoding = entry.encoding.unwrap_or("onnx");
    let engine: Arc<dyn NnEngine> = match encoding {
        "ggml" => Arc::new(tidepool_host::backend::llama::LlamaEngine::new(1)?),
        _ => Arc::new(tidepool_host::TractEngine),
    };
    let cache = Arc::new(SharedModels::default());
    let before = proc_status_mib(None, "VmRSS");
    let mut held = Vec::new();
    for i in 0..bundles {
        let mut b = RegistryBuilder::new(vec![engine.clone()]);
        if shared {
            b = b.shared(cache.clone());
        }
        b.add(&format!("m{i}"), encoding, &path, entry.sha256)?;
        held.push(b.build());
    }
    let after = proc_status_mib(None, "VmRSS");
    println!("{before} {after}");
    drop(held);
    Ok(())
}

fn run(model: &str, bundles: usize, shared: bool) -> anyhow::Result<(u64, u64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .env("SHARED_MODELS_CHILD", format!("{model} {bundles} {shared}"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "child: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => anyhow::bail!("child said {text:?}"),
    }
}

fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var("SHARED_MODELS_CHILD") {
        let v: Vec<&str> = spec.split(' ').collect();
        return child(v[0], v[1].parse()?, v[2] == "true");
    }
    let full = std::env::args().any(|a| a == "--bench");
    let models: &[&str] = if full {
        &["minilm-l3", "gemma3-270m"]
    } else {
        &["minilm-l3"]
    };
    println!("| model | 1 bundle | 3 bundles, a copy each (before) | 3 bundles, shared (now) | shared vs a copy each |");
    println!("|---|---|---|---|---|");
    for model in models {
        let (b1, a1) = run(model, 1, true)?;
        let (b3, a3) = run(model, 3, false)?;
        let (bs, as_) = run(model, 3, true)?;
        let (one, three, shared) = (a1 - b1, a3 - b3, as_ - bs);
        println!(
            "| {model} | +{one} MiB | +{three} MiB | +{shared} MiB | {:.2}x |",
            shared as f64 / three.max(1) as f64
        );
        // A shared model costs what one bundle costs, within a few MiB of
        // registry bookkeeping; each own copy costs it again.
        anyhow::ensure!(
            shared <= one + 8,
            "{model}: shared {shared} MiB vs one {one} MiB"
        );
    }
    Ok(())
}
