//! `tidepool pool canary`: add known-answer tasks for a bundle from a job
//! whose results the pool owner trusts (e.g. one run on the owner's nodes).

use super::common::PoolArgs;
use anyhow::Context;
use std::io::BufRead;
use std::path::PathBuf;
use tidepool_proto::wire::{Bytes, Canary, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// The bundle: a signed bundle file, or its digest (sha256:...).
    bundle: String,
    /// The JSONL inputs that job was submitted with.
    #[arg(long)]
    inputs: PathBuf,
    /// The job whose results are the known answers (input line i ↔ task i).
    #[arg(long)]
    job: tidepool_proto::wire::JobId,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn main(a: Args) -> anyhow::Result<()> {
    let digest = super::job::bundle_digest(&a.bundle)?;
    let file = std::fs::File::open(&a.inputs)
        .with_context(|| format!("cannot read {}", a.inputs.display()))?;
    let lines: Vec<Vec<u8>> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read {}", a.inputs.display()))?
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .map(String::into_bytes)
        .collect();
    let job = a.job;
    let (count, used) = a.pool.call(|c| async move {
        let records = c.job_results(job).await?;
        anyhow::ensure!(
            records.len() == lines.len(),
            "job {job} has {} tasks but the inputs file has {} lines",
            records.len(),
            lines.len()
        );
        let items: Vec<Canary> = records
            .into_iter()
            .zip(lines)
            .filter_map(|(r, input)| match r.outcome {
                Some(o @ (Outcome::Output(_) | Outcome::JobError { .. })) => Some(Canary {
                    input: Bytes(input),
                    expect: o,
                }),
                _ => None,
            })
            .collect();
        anyhow::ensure!(!items.is_empty(), "job {job} has no finished results");
        let used = items.len();
        Ok((c.add_canaries(digest, items).await?, used))
    })?;
    println!("added {used} canaries; the bundle has {count}");
    Ok(())
}
