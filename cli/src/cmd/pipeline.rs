//! `tidepool pipeline`: check a pipeline file, or run it on a pool over a
//! feed of items (once, or every so often; items already processed are
//! answered from the pool's result cache).

use super::common::{read_key, runtime, PoolArgs};
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidepool_client::pipeline::{read_feed, PipelineManifest};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check a pipeline file and print its stages.
    Check {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Run a pipeline on a pool and write its report.
    Run(RunArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Items: fortune files, `*.jsonl` feeds or folders of text files.
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// Where to write report.json and report.md.
    #[arg(long, default_value = "report")]
    out: PathBuf,
    /// Run again every DURATION (`90s`, `10m`, `1h`) over the same inputs,
    /// until stopped; only new items are computed.
    #[arg(long, value_parser = parse_duration)]
    every: Option<Duration>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Check { pipeline } => {
            let m = PipelineManifest::load(&pipeline)?;
            println!("pipeline {}: {} stages", m.name, m.stages.len());
            for s in &m.stages {
                println!(
                    "  {:<12} over {:<6} {}{}",
                    s.name,
                    tidepool_client::pipeline::manifest::over_name(s.over),
                    m.bundle_path(s).display(),
                    s.from
                        .as_ref()
                        .map(|f| format!(" (from {f})"))
                        .unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => run(a),
    }
}

fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let manifest = PipelineManifest::load(&a.pipeline)?;
    let key = read_key(&a.pool.key)?;
    runtime()?.block_on(async {
        let client = a.pool.connect().await?;
        loop {
            let (items, rejected) = read_feed(&a.inputs, manifest.max_item_bytes)?;
            let outcome = crate::runner::run(
                &client,
                &manifest,
                &key,
                items,
                rejected,
                &run_id(),
                &a.out,
                a.json,
            )
            .await
            .context("pipeline run")?;
            if a.json {
                println!("{}", crate::runner::figures_json(&outcome));
            } else {
                crate::runner::print_figures(&outcome);
            }
            let Some(every) = a.every else { break };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = super::common::stop_signal() => break,
            }
        }
        client.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// A run id unique per run (submission keys are idempotent per run).
pub fn run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", t.as_secs(), t.subsec_nanos())
}

/// `90s`, `10m`, `1h` (or plain seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit must be s, m or h")),
    };
    if secs == 0 {
        return Err("the interval must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}
