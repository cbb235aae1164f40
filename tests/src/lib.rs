//! Shared helpers for the end-to-end tests: where the built guests and the
//! verified models are, a sandbox over the real models, and real texts.
//!
//! Guests are built by `cargo xtask build-jobs`; a missing one is a test
//! failure that says so, never a skip.

use anyhow::{Context, Result};

pub mod adversary;
pub mod cluster;
pub mod llm;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tidepool_host::local::{registry_from_args, ModelArg};
use tidepool_host::{ModelRegistry, Sandbox, SandboxConfig, TaskError, TaskOutput, TaskSpec};

/// Every guest program `cargo xtask build-jobs` builds. `guest()` refuses any
/// other name, and `every_guest_is_known` checks this list against `jobs/`.
pub const GUESTS: &[&str] = &[
    "embed",
    "dedupe",
    "summarize",
    "echo",
    "env-probe",
    "spin",
    "membomb",
    "big-output",
    "nn-probe",
    "nn-abuse",
    "trap-mid-inference",
    "other-world",
];

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Where built components are: `$TIDEPOOL_JOBS_DIR` or `<root>/target/jobs`.
pub fn jobs_dir() -> PathBuf {
    std::env::var_os("TIDEPOOL_JOBS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/jobs"))
}

/// The bytes of a built guest component.
pub fn guest(name: &str) -> Vec<u8> {
    assert!(
        GUESTS.contains(&name),
        "unknown guest fixture {name:?}; known: {GUESTS:?}"
    );
    let p = jobs_dir().join(format!("{name}.wasm"));
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "guest {} not built ({e}): run `cargo xtask build-jobs`",
            p.display()
        )
    })
}

/// A model file path from the verified models directory (fetched by xtask).
pub fn model_path(name: &str) -> PathBuf {
    let e = tidepool_host::models::catalog_entry(name).expect("catalogue entry");
    let p = tidepool_host::models::path_in(&tidepool_host::models::models_dir(), e);
    tidepool_host::models::verify_file(&p, e.sha256)
        .unwrap_or_else(|err| panic!("{err} (run `cargo xtask fetch-models`)"));
    p
}

/// The real embedding model, verified and loaded.
pub fn minilm_registry() -> ModelRegistry {
    registry_from_args(
        &[ModelArg {
            name: "minilm-l3".into(),
            path: None,
            sha256: None,
        }],
        &tidepool_host::models::models_dir(),
    )
    .expect("minilm-l3 must be fetched: run `cargo xtask fetch-models`")
}

/// A sandbox with test-sized limits and no disk cache.
pub fn sandbox(config: SandboxConfig) -> Sandbox {
    Sandbox::new(config, minilm_registry()).expect("sandbox")
}

/// Test-sized defaults: 5 s, 128 MiB, no disk cache.
pub fn test_config() -> SandboxConfig {
    SandboxConfig {
        timeout: std::time::Duration::from_secs(5),
        max_memory_bytes: 128 << 20,
        cache_dir: None,
        ..SandboxConfig::default()
    }
}

/// Run one task with no parameters.
pub fn run(
    sb: &Sandbox,
    job: &tidepool_host::JobComponent,
    id: &str,
    input: &[u8],
) -> Result<TaskOutput, TaskError> {
    sb.run(
        job,
        TaskSpec {
            replay: None,
            accept: Default::default(),
            shared_batches: false,
            id,
            params: &BTreeMap::new(),
            input,
        },
    )
}

/// Real short texts nobody here wrote: Debian's fortunes-min corpus.
pub fn fortunes(n: usize) -> Result<Vec<String>> {
    let path = "/usr/share/games/fortunes/fortunes";
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{path} (installed by `cargo xtask setup`)"))?;
    Ok(text
        .split("\n%\n")
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .take(n)
        .collect())
}

/// At least `n` distinct real texts: every item of the fortunes,
/// literature and riddles files, then their single lines, in file order.
pub fn corpus(n: usize) -> Result<Vec<String>> {
    let dir = "/usr/share/games/fortunes";
    let mut items = Vec::new();
    for f in ["fortunes", "literature", "riddles"] {
        let path = format!("{dir}/{f}");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{path} (installed by `cargo xtask setup`)"))?;
        items.extend(
            text.split("\n%\n")
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
        );
    }
    let mut seen: std::collections::BTreeSet<String> = items.iter().cloned().collect();
    let lines: Vec<String> = items
        .iter()
        .flat_map(|i| i.lines().map(|l| l.trim().to_owned()).collect::<Vec<_>>())
        .filter(|l| l.len() >= 12)
        .collect();
    for l in lines {
        if items.len() >= n {
            break;
        }
        if seen.insert(l.clone()) {
            items.push(l);
        }
    }
    anyhow::ensure!(
        items.len() >= n,
        "only {} distinct texts in {dir}",
        items.len()
    );
    items.truncate(n);
    Ok(items)
}

/// `n` distinct real texts for large runs: the whole [`corpus`], then
/// pairs of its items joined by a space (the fortunes files hold ~2,200
/// distinct texts; the result cache would answer repeats without compute).
pub fn many_texts(n: usize) -> Result<Vec<String>> {
    let base = corpus(2000)?;
    let mut out: Vec<String> = base.iter().take(n).cloned().collect();
    let mut k = 1;
    while out.len() < n {
        for (i, t) in base.iter().enumerate() {
            if out.len() >= n {
                break;
            }
            out.push(format!("{t} {}", base[(i + k) % base.len()]));
        }
        k += 1;
    }
    Ok(out)
}

/// Embedding output of the embed job.
#[derive(Debug, serde::Deserialize)]
pub struct Embeddings {
    /// Vector length.
    pub dim: usize,
    /// One vector per input text.
    pub vectors: Vec<Vec<f32>>,
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// The independent native path for one text: token ids → a tract model
/// (run by `run`) → the output at index `pooled` → L2-normalised. Shared by
/// the embed tests and the benchmark's baseline.
pub fn native_embedding(
    run: impl Fn(
        tract_onnx::prelude::TVec<tract_onnx::prelude::TValue>,
    ) -> tract_onnx::prelude::TractResult<
        tract_onnx::prelude::TVec<tract_onnx::prelude::TValue>,
    >,
    pooled: usize,
    ids: &[u32],
) -> Vec<f32> {
    use tract_onnx::prelude::*;
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let n = ids.len();
    let ids = Tensor::from_shape(&[1, n], &ids).expect("ids");
    let mask = Tensor::from_shape(&[1, n], &vec![1i64; n]).expect("mask");
    let out = run(tvec!(ids.into_tvalue(), mask.into_tvalue())).expect("run");
    let v: Vec<f32> = out[pooled]
        .to_plain_array_view::<f32>()
        .expect("f32")
        .iter()
        .copied()
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// This process's resident memory, bytes (Linux `/proc/self/status`).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}
