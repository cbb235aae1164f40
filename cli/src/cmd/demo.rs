//! `tidepool demo`: the aggregator pipeline (embed → dedupe → summarize and
//! tag) over real short texts, on an embedded pool with two local nodes
//! over loopback QUIC. Prints the figures and where the report is.

use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_client::pipeline::{read_feed, PipelineManifest};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the pool's database, the nodes, the keys and the
    /// report, kept afterwards; running the demo again in the same
    /// directory reuses the pool's result cache. Default: a new one under
    /// the temporary directory, of which only the report is kept.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Items: fortune files (items between lines of "%"), `*.jsonl` feeds
    /// ({"id", "text"} per line) or folders of text files.
    #[arg(long = "input", default_values = ["/usr/share/games/fortunes/linux", "/usr/share/games/fortunes/linuxcookie"])]
    inputs: Vec<PathBuf>,
    /// Take this many items, in alphabetical order (near-duplicates sort
    /// together, so a small sample still meets the corpus's repeats);
    /// 0 takes every item.
    #[arg(long, default_value_t = 60)]
    items: usize,
    /// The pipeline.
    #[arg(long, default_value = "jobs/aggregator/pipeline.toml")]
    pipeline: PathBuf,
    /// Local nodes.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Task slots on each node.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Threads of each node's text generation context.
    #[arg(long, default_value_t = tidepool_host::DEFAULT_LLM_THREADS)]
    llm_threads: u32,
    /// Generations each node decodes together (1 = each alone).
    #[arg(long, default_value_t = 4)]
    llm_batch: u32,
    /// Re-execute every result on the other node to check it (the nodes
    /// are otherwise the pool owner's own, trusted from the start).
    #[arg(long)]
    check_all: bool,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> anyhow::Result<ExitCode> {
    let manifest = PipelineManifest::load(&a.pipeline)?;
    let (mut items, rejected) = read_feed(&a.inputs, manifest.max_item_bytes)?;
    if a.items > 0 {
        items.sort_by_cached_key(|i| tidepool_client::pipeline::feed::sort_key(&i.text));
        items.truncate(a.items);
    }
    let fresh = a.dir.is_none();
    let dir = a.dir.unwrap_or_else(crate::local::fresh_dir);
    let keys = crate::local::Keys::in_dir(&dir.join("keys"), a.nodes)?;
    if !a.json {
        println!(
            "demo in {}: {} items, pool and {} nodes on loopback QUIC",
            dir.display(),
            items.len() + rejected.len(),
            a.nodes
        );
    }
    let outcome = crate::cmd::common::runtime()?.block_on(async {
        let llm = tidepool_host::LlmSettings {
            threads: a.llm_threads.clamp(1, 256),
            batch: a.llm_batch.clamp(1, tidepool_host::MAX_LLM_BATCH),
        };
        let net = crate::local::Network::start(&dir, &keys, a.slots.clamp(1, 64), llm, a.check_all)
            .await?;
        let client = tidepool_client::PoolClient::connect(
            net.pool.addr,
            &keys.publisher,
            keys.pool.public(),
        )
        .await
        .context("cannot connect to the embedded pool")?;
        let run_id = crate::cmd::pipeline::run_id();
        let out = crate::runner::run(
            &client,
            &manifest,
            &keys.publisher,
            items,
            rejected,
            &run_id,
            &dir.join("report"),
            a.json,
        )
        .await;
        client.close().await;
        let nodes = net.stop().await?;
        out.map(|o| (o, nodes))
    })?;
    let (outcome, nodes) = outcome;
    if fresh {
        // A directory of its own is never used again: keep the report, not
        // the pool's and nodes' copies of the models (about 1 GB).
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name() != "report" {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let seconds = outcome.figures.seconds.max(1e-9);
    if a.json {
        let mut v = crate::runner::figures_json(&outcome);
        v["items_per_second"] = serde_json::json!(outcome.report.items as f64 / seconds);
        v["nodes"] = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "completed": n.completed,
                    "generated_tokens": n.generated_tokens,
                    "tokens_per_second": n.generated_tokens as f64 / seconds,
                })
            })
            .collect();
        println!("{v}");
    } else {
        crate::runner::print_figures(&outcome);
        println!(
            "{:.2} items/s through the whole pipeline",
            outcome.report.items as f64 / seconds
        );
        for (i, n) in nodes.iter().enumerate() {
            println!(
                "  node {i}: {} tasks, {} tokens generated ({:.1} tokens/s)",
                n.completed,
                n.generated_tokens,
                n.generated_tokens as f64 / seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
