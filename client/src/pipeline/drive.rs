//! The async shell around [`Run`]: publish each stage's bundle, submit
//! what the run asks for, poll the pool for finished tasks, feed them back,
//! and wait for the pool's checks of the run's results to settle. All the
//! decisions are in [`super::run`]; this file only moves bytes.

use super::manifest::PipelineManifest;
use super::run::{Run, RunError};
use crate::bundle::BundleFileError;
use crate::client::{ClientError, PoolClient};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidepool_proto::wire::{JobId, Outcome, TaskState};
use tidepool_proto::{Digest, SecretKey};

/// Why a pipeline run stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A stage's bundle could not be packed.
    #[error("stage {stage:?}: {source}")]
    Bundle {
        /// The stage.
        stage: String,
        /// Why.
        source: Box<BundleFileError>,
    },
    /// Talking to the pool failed.
    #[error("pool: {0}")]
    Pool(#[from] ClientError),
    /// The run itself cannot go on (e.g. the grouping stage failed).
    #[error(transparent)]
    Run(#[from] RunError),
    /// The pool's checks of the results did not settle in time.
    #[error("{0} results still being checked after {1:?}")]
    Checks(usize, Duration),
}

/// Pack, sign and publish the bundle of every stage; returns their
/// digests in stage order (a bundle used by two stages is published once).
///
/// Signed bundles are kept in `keep` as `STAGE.bundle`: when a fresh pack
/// locks the same content (component, models, limits, params...: all but
/// the issue time) and the kept one is not about to expire, the kept one is
/// published again, so its digest, and with it the pool's result cache for
/// the stage, carries over from run to run.
pub async fn publish_stages(
    client: &PoolClient,
    manifest: &PipelineManifest,
    publisher: &SecretKey,
    keep: &std::path::Path,
) -> Result<Vec<Digest>, PipelineError> {
    let mut done: BTreeMap<std::path::PathBuf, Digest> = BTreeMap::new();
    let mut out = Vec::new();
    for s in &manifest.stages {
        let path = manifest.bundle_path(s);
        if let Some(d) = done.get(&path) {
            out.push(*d);
            continue;
        }
        let bad = |source| PipelineError::Bundle {
            stage: s.name.clone(),
            source: Box::new(source),
        };
        let fresh = crate::bundle::pack(&path, publisher.public()).map_err(bad)?;
        let kept_path = keep.join(format!("{}.bundle", s.name));
        let b = match kept(&kept_path, &fresh, publisher) {
            Some(b) => b,
            None => {
                let mut b = fresh;
                b.sign(publisher).map_err(|source| {
                    bad(BundleFileError::Bundle {
                        path: path.clone(),
                        source,
                    })
                })?;
                std::fs::create_dir_all(keep)
                    .map_err(|source| {
                        bad(BundleFileError::Io {
                            path: keep.to_owned(),
                            source,
                        })
                    })
                    .and_then(|()| b.write(&kept_path).map_err(bad))?;
                b
            }
        };
        let d = client.publish(&b, |_| {}).await?;
        done.insert(path, d);
        out.push(d);
    }
    Ok(out)
}

/// The bundle kept at `path`, if it is signed by `publisher`, locks what
/// `fresh` locks and has a week or more before it expires.
fn kept(
    path: &std::path::Path,
    fresh: &crate::bundle::BundleFile,
    publisher: &SecretKey,
) -> Option<crate::bundle::BundleFile> {
    let old = crate::bundle::BundleFile::read(path).ok()?;
    let signer = old.signature.as_ref()?.0;
    let mut a = old.manifest().ok()?;
    let b = fresh.manifest().ok()?;
    if signer != publisher.public() || a.expires_at < crate::unix_now() + 7 * 86_400 {
        return None;
    }
    a.issued_at = b.issued_at;
    a.expires_at = b.expires_at;
    (a == b && old.files == fresh.files).then_some(old)
}

/// Counts of one stage in one run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StageFigures {
    /// The stage.
    pub name: String,
    /// Distinct inputs submitted.
    pub tasks: usize,
    /// Of them, answered from the pool's result cache.
    pub cached: usize,
    /// Of them, that failed (job error or given up).
    pub failed: usize,
    /// From the stage's first submission to its last result.
    pub seconds: f64,
}

/// What a run did (kept out of the report, which must not change between
/// runs over the same items).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    /// Per stage, in order.
    pub stages: Vec<StageFigures>,
    /// Tasks submitted in all.
    pub tasks: usize,
    /// Answered from the result cache.
    pub cache_hits: usize,
    /// Computed by a node in this run.
    pub computed: usize,
    /// Re-executions the pool ran to check results during the run.
    pub re_executions: u64,
    /// Results of this run the checks confirmed.
    pub verified: usize,
    /// Results of this run the checks found wrong and replaced (a later run
    /// recomputes what used them).
    pub replaced: usize,
    /// Wall time of the run.
    pub seconds: f64,
}

/// Progress callback argument: the run, to read per-stage progress from.
pub type Progress<'a> = &'a mut dyn FnMut(&Run);

/// How long the run waits for the pool's checks of its results.
const CHECK_WAIT: Duration = Duration::from_secs(900);

/// Drive `run` to the end on the pool behind `client`, polling every
/// `poll`; calls `progress` after each round. Returns the figures; the
/// report is `run.report()`.
pub async fn run_pipeline(
    client: &PoolClient,
    run: &mut Run,
    poll: Duration,
    progress: Progress<'_>,
) -> Result<Figures, PipelineError> {
    let start = Instant::now();
    let executed_before = client.pool_status().await?.verification.executed;
    let mut figures = Figures {
        stages: run
            .stage_names()
            .into_iter()
            .map(|n| StageFigures {
                name: n.to_owned(),
                ..StageFigures::default()
            })
            .collect(),
        ..Figures::default()
    };
    // Per stage: when it started and last finished something.
    let mut spans: Vec<Option<(Instant, Instant)>> = vec![None; figures.stages.len()];
    // Submitted jobs with unsettled inputs: (submission, stage, job, settled flags).
    let mut open: Vec<(usize, usize, JobId, Vec<bool>)> = Vec::new();
    let mut jobs = Vec::new();
    loop {
        while let Some(sub) = run.poll_submit() {
            let n = sub.inputs.len();
            let (job, _) = client.submit(sub.bundle, sub.inputs, sub.key).await?;
            figures.stages[sub.stage].tasks += n;
            let now = Instant::now();
            spans[sub.stage].get_or_insert((now, now));
            open.push((sub.id, sub.stage, job, vec![false; n]));
            jobs.push(job);
        }
        if run.is_done() {
            break;
        }
        for (sub, stage, job, settled) in &mut open {
            let status = client.job_status(*job).await?;
            let finished = (status.done + status.dead) as usize;
            if finished == settled.iter().filter(|s| **s).count() {
                continue;
            }
            for r in client.job_results(*job).await? {
                let i = r.index as usize;
                if i >= settled.len()
                    || settled[i]
                    || !matches!(r.state, TaskState::Done | TaskState::Dead)
                {
                    continue;
                }
                settled[i] = true;
                let st = &mut figures.stages[*stage];
                if r.cached_from.is_some() {
                    st.cached += 1;
                }
                let outcome = match r.outcome {
                    Some(Outcome::Output(b)) => Ok(b.0),
                    Some(Outcome::JobError { code, message }) => Err(format!("{code}: {message}")),
                    _ => Err(format!(
                        "the pool gave up on the task: {}",
                        r.reasons.join("; ")
                    )),
                };
                if outcome.is_err() {
                    st.failed += 1;
                }
                if let Some(span) = &mut spans[*stage] {
                    span.1 = Instant::now();
                }
                run.handle_result(*sub, r.index, outcome);
            }
        }
        open.retain(|(_, _, _, s)| !s.iter().all(|x| *x));
        progress(run);
        if let Some(e) = run.error() {
            return Err(e.clone().into());
        }
        tokio::time::sleep(poll).await;
    }
    if let Some(e) = run.error() {
        return Err(e.clone().into());
    }
    progress(run);
    // Wait until the pool has settled its checks of this run's results.
    let wait = Instant::now();
    loop {
        let mut checking = 0;
        figures.verified = 0;
        figures.replaced = 0;
        for job in &jobs {
            for r in client.job_results(*job).await? {
                match r.verification.as_str() {
                    "checking" => checking += 1,
                    "verified" => figures.verified += 1,
                    "replaced" => figures.replaced += 1,
                    _ => {}
                }
            }
        }
        if checking == 0 {
            break;
        }
        if wait.elapsed() > CHECK_WAIT {
            return Err(PipelineError::Checks(checking, CHECK_WAIT));
        }
        tokio::time::sleep(poll).await;
    }
    for (st, span) in figures.stages.iter_mut().zip(&spans) {
        st.seconds = span.map_or(0.0, |(a, b)| (b - a).as_secs_f64());
    }
    figures.tasks = figures.stages.iter().map(|s| s.tasks).sum();
    figures.cache_hits = figures.stages.iter().map(|s| s.cached).sum();
    figures.computed = figures.tasks - figures.cache_hits;
    figures.re_executions = client
        .pool_status()
        .await?
        .verification
        .executed
        .saturating_sub(executed_before);
    figures.seconds = start.elapsed().as_secs_f64();
    Ok(figures)
}
