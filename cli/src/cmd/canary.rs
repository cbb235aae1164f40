//! `tidepool pool canary`: add known-answer tasks for a bundle, made from
//! a job's results that an independent execution confirmed (`verified` or
//! `replaced`); each runs with its result's task identity.

use super::common::PoolArgs;
use tidepool_proto::wire::{Canary, TaskState};

#[derive(clap::Args)]
pub struct Args {
    /// The bundle: a signed bundle file, or its digest (sha256:...).
    bundle: String,
    /// The job whose confirmed results become canaries.
    #[arg(long)]
    job: tidepool_proto::wire::JobId,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn main(a: Args) -> anyhow::Result<()> {
    let digest = super::job::bundle_digest(&a.bundle)?;
    let job = a.job;
    let (count, used) = a.pool.call(|c| async move {
        let records = c.job_results(job).await?;
        let items: Vec<Canary> = records
            .iter()
            .filter(|r| {
                r.state == TaskState::Done
                    && r.cached_from.is_none()
                    && (r.verification == "verified" || r.verification == "replaced")
            })
            .map(|r| Canary {
                job,
                index: r.index,
            })
            .collect();
        anyhow::ensure!(
            !items.is_empty(),
            "job {job} has no result an independent execution confirmed (of {} results)",
            records.len()
        );
        let used = items.len();
        Ok((c.add_canaries(digest, items).await?, used))
    })?;
    println!("added {used} canaries; the bundle has {count}");
    Ok(())
}
