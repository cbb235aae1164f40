//! Run a pipeline on a pool with a progress bar per stage and write its
//! digest (`report.json`, `report.md`): what `tidepool demo` and
//! `tidepool pipeline run` share.

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidepool_client::pipeline::{self, Figures, Item, PipelineManifest, Rejected, Report, Run};
use tidepool_client::PoolClient;
use tidepool_proto::SecretKey;

/// What a run produced.
pub struct Outcome {
    /// The digest.
    pub report: Report,
    /// The figures.
    pub figures: Figures,
    /// Where `report.json` and `report.md` are.
    pub json: PathBuf,
    /// The Markdown report.
    pub markdown: PathBuf,
}

/// Publish the stages (signed bundles kept in `out/bundles`, so the next
/// run reuses them and the pool's result cache), run the pipeline over the
/// items, write the report into `out`. Progress bars go to stderr unless
/// `quiet`.
#[allow(clippy::too_many_arguments)] // each is a separate, named input of the run
pub async fn run(
    client: &PoolClient,
    manifest: &PipelineManifest,
    publisher: &SecretKey,
    items: Vec<Item>,
    rejected: Vec<Rejected>,
    run_id: &str,
    out: &Path,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    let bundles =
        pipeline::publish_stages(client, manifest, publisher, &out.join("bundles")).await?;
    let mut run = Run::new(manifest, &bundles, run_id, items, rejected)?;
    let bars = MultiProgress::new();
    if quiet {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let stage_bars: Vec<ProgressBar> = run
        .stage_names()
        .iter()
        .map(|n| {
            let b = bars.add(ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_prefix(n.to_string());
            b
        })
        .collect();
    let mut show = |run: &Run| {
        for (i, b) in stage_bars.iter().enumerate() {
            let (done, total) = run.progress(i);
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let figures =
        pipeline::run_pipeline(client, &mut run, Duration::from_millis(200), &mut show).await?;
    for b in &stage_bars {
        b.finish();
    }
    let report = run.report();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json = out.join("report.json");
    let markdown = out.join("report.md");
    std::fs::write(&json, report.to_json())
        .with_context(|| format!("cannot write {}", json.display()))?;
    std::fs::write(&markdown, report.to_markdown())
        .with_context(|| format!("cannot write {}", markdown.display()))?;
    Ok(Outcome {
        report,
        figures,
        json,
        markdown,
    })
}

/// The figures for people.
pub fn print_figures(o: &Outcome) {
    let r = &o.report;
    let f = &o.figures;
    println!(
        "{} items: {} groups ({} of near-duplicates), {} rejected",
        r.items,
        r.groups.len(),
        r.duplicate_groups(),
        r.rejected.len()
    );
    println!(
        "{} tasks: {} computed, {} from the result cache; {} re-executions to check results ({} confirmed, {} replaced)",
        f.tasks, f.computed, f.cache_hits, f.re_executions, f.verified, f.replaced
    );
    let busy: f64 = f.stages.iter().map(|s| s.seconds).sum::<f64>().max(1e-9);
    for s in &f.stages {
        println!(
            "  {:>10}: {} tasks ({} cached, {} failed), {:.1} s ({:.0}% of stage time)",
            s.name,
            s.tasks,
            s.cached,
            s.failed,
            s.seconds,
            100.0 * s.seconds / busy
        );
    }
    println!("{:.1} s in all", f.seconds);
    println!("report: {}", o.markdown.display());
    println!("        {}", o.json.display());
}

/// The figures for scripts.
pub fn figures_json(o: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "items": o.report.items,
        "groups": o.report.groups.len(),
        "duplicate_groups": o.report.duplicate_groups(),
        "rejected": o.report.rejected.len(),
        "figures": o.figures,
        "report": o.json,
        "markdown": o.markdown,
    })
}
