//! `tidepool demo`: embed a corpus of real short texts (Debian's
//! `fortunes-min` by default) with the embed job in the node sandbox, and
//! print the most similar pairs.
//!
//! (The pool-based multi-stage pipeline replaces this once the pool exists.)

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use tidepool_host::local::{registry_from_args, ModelArg};
use tidepool_host::{Sandbox, SandboxConfig, TaskSpec};

#[derive(clap::Args)]
pub struct Args {
    /// A corpus: a fortune file (items separated by lines of "%") or one text per line.
    #[arg(long, default_value = "/usr/share/games/fortunes/fortunes")]
    corpus: PathBuf,
    /// How many items to embed.
    #[arg(long, default_value_t = 200)]
    items: usize,
    /// Texts per task.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// How many pairs to show.
    #[arg(long, default_value_t = 8)]
    top: usize,
    /// Where the built jobs are (default: $TIDEPOOL_JOBS_DIR or ./target/jobs).
    #[arg(long)]
    jobs_dir: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
struct Embeddings {
    vectors: Vec<Vec<f32>>,
}

pub fn main(a: Args) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.corpus)
        .with_context(|| format!("cannot read corpus {}", a.corpus.display()))?;
    let items = split_corpus(&text, a.items);
    if items.is_empty() {
        bail!("corpus {} has no items", a.corpus.display());
    }
    let jobs = a
        .jobs_dir
        .or_else(|| std::env::var_os("TIDEPOOL_JOBS_DIR").map(PathBuf::from))
        .unwrap_or_else(|| "target/jobs".into());
    let wasm = jobs.join("embed.wasm");
    let bytes = std::fs::read(&wasm).with_context(|| {
        format!(
            "cannot read {} (build it with `cargo xtask build-jobs`)",
            wasm.display()
        )
    })?;
    let registry = registry_from_args(
        &[ModelArg {
            name: "minilm-l3".into(),
            path: None,
            sha256: None,
        }],
        &tidepool_host::models::models_dir(),
    )?;
    let sandbox = Sandbox::new(SandboxConfig::default(), registry)?;
    let t0 = Instant::now();
    let job = sandbox.load(&bytes)?;
    let load = t0.elapsed();
    let t1 = Instant::now();
    let mut vectors = Vec::with_capacity(items.len());
    let params = BTreeMap::new();
    for (i, chunk) in items.chunks(a.batch.max(1)).enumerate() {
        let input = serde_json::to_vec(&serde_json::json!({ "texts": chunk }))?;
        let id = format!("demo-{i}");
        let out = sandbox.run(
            &job,
            TaskSpec {
                replay: None,
                accept: Default::default(),
                id: &id,
                params: &params,
                input: &input,
            },
        )?;
        let bytes = out
            .result
            .map_err(|f| anyhow::anyhow!("task {id}: job error ({}): {}", f.code, f.message))?;
        let e: Embeddings = serde_json::from_slice(&bytes)
            .with_context(|| format!("task {id}: output is not embeddings"))?;
        vectors.extend(e.vectors);
        eprint!("\rembedded {}/{} items", vectors.len(), items.len());
    }
    eprintln!();
    let compute = t1.elapsed();
    let mut pairs = Vec::new();
    for i in 0..vectors.len() {
        for j in i + 1..vectors.len() {
            pairs.push((dot(&vectors[i], &vectors[j]), i, j));
        }
    }
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    println!(
        "Most similar pairs among {} texts from {}:\n",
        items.len(),
        a.corpus.display()
    );
    for (s, i, j) in pairs.iter().take(a.top) {
        println!(
            "{s:.3}  {}\n       {}\n",
            one_line(&items[*i]),
            one_line(&items[*j])
        );
    }
    println!(
        "component load {:.1} ms (compiled once, then cached); {} tasks of up to {} texts in {:.2} s ({:.1} ms per text)",
        load.as_secs_f64() * 1e3,
        items.len().div_ceil(a.batch.max(1)),
        a.batch,
        compute.as_secs_f64(),
        compute.as_secs_f64() * 1e3 / items.len() as f64
    );
    Ok(ExitCode::SUCCESS)
}

/// Fortune files separate items with lines holding only "%"; other files hold one item per line.
fn split_corpus(text: &str, max: usize) -> Vec<String> {
    let items: Vec<String> = if text.lines().any(|l| l == "%") {
        text.split("\n%\n").map(|s| s.trim().to_owned()).collect()
    } else {
        text.lines().map(|s| s.trim().to_owned()).collect()
    };
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .take(max)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn one_line(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 100 {
        flat.chars().take(99).collect::<String>() + "…"
    } else {
        flat
    }
}
