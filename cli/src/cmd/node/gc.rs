//! `tidepool node gc`: bring a stopped node's caches within budgets.

use super::{bytes, NodeDir};
use std::process::ExitCode;
use tidepool_node::caches::Budgets;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    node: NodeDir,
    /// Budget of fetched components, MiB (default: the file's [caches]).
    #[arg(long)]
    blobs_mib: Option<u64>,
    /// Budget of fetched models, MiB (default: the file's [caches]).
    #[arg(long)]
    models_mib: Option<u64>,
    /// Budget of compiled components, MiB (default: the file's [caches]).
    #[arg(long)]
    compiled_mib: Option<u64>,
    /// Empty every cache (they fill again as tasks need them).
    #[arg(long, conflicts_with_all = ["blobs_mib", "models_mib", "compiled_mib"])]
    all: bool,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> anyhow::Result<ExitCode> {
    let f = a.node.read()?;
    let file = f.caches.budgets()?;
    let budgets = if a.all {
        Budgets {
            blobs: 0,
            models: 0,
            compiled: 0,
        }
    } else {
        Budgets {
            blobs: a.blobs_mib.map_or(file.blobs, |m| m << 20),
            models: a.models_mib.map_or(file.models, |m| m << 20),
            compiled: a.compiled_mib.map_or(file.compiled, |m| m << 20),
        }
    };
    let r = tidepool_node::state::gc(&f.data_dir, budgets, a.dry_run)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let removed: u64 = r.removed.values().sum();
    println!(
        "{} {removed} file(s), {} {}",
        if a.dry_run { "would remove" } else { "removed" },
        bytes(r.freed),
        if a.dry_run { "would be freed" } else { "freed" }
    );
    for c in &r.caches {
        println!(
            "  {:<9} {:>5} file(s) {:>10} of {}",
            c.cache.name(),
            c.files,
            bytes(c.bytes),
            bytes(c.budget)
        );
    }
    Ok(ExitCode::SUCCESS)
}
