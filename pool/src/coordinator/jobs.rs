//! Bundles and jobs: publishing signed bundles, blobs arriving, submitting
//! batches (with the result cache), and every job's task counts kept in
//! step with the store.

use super::queues::Queued;
use super::{refusal, Coordinator, PoolEvent};
use crate::store::{InsertedJob, JobCounts, Store, StoredBundle};
use std::collections::BTreeSet;
use tidepool_proto::manifest::{LockedManifest, SignedManifest};
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{ErrorCode, JobId, TaskState};
use tidepool_proto::{Digest, PublicKey};

/// A published bundle.
#[derive(Debug)]
pub(super) struct Bundle {
    /// The signed form, served to nodes.
    pub(super) signed: SignedManifest,
    /// The verified contents.
    pub(super) manifest: LockedManifest,
    /// Blobs not yet uploaded; tasks wait until this is empty.
    pub(super) missing: BTreeSet<Digest>,
}

impl<S: Store> Coordinator<S> {
    /// Keep a job's counts in step: one task moves from `from` to `to`.
    pub(super) fn count(&mut self, job: JobId, from: TaskState, to: TaskState) {
        let Some((_, c)) = self.jobs.get_mut(&job) else {
            return;
        };
        for (state, delta) in [(from, -1i64), (to, 1)] {
            let n = match state {
                TaskState::Queued => &mut c.queued,
                TaskState::Leased => &mut c.leased,
                TaskState::Done => &mut c.done,
                TaskState::Dead => &mut c.dead,
            };
            *n = (i64::from(*n) + delta).max(0) as u32;
        }
        if matches!(to, TaskState::Done | TaskState::Dead)
            && c.queued == 0
            && c.leased == 0
            && !self.kinds.contains_key(&job)
        {
            self.events.push_back(PoolEvent::JobFinished { job });
        }
    }

    /// A signed manifest, for nodes.
    pub fn manifest(&self, bundle: &Digest) -> Option<&SignedManifest> {
        self.bundles.get(bundle).map(|b| &b.signed)
    }

    /// The size a blob must have, if a published bundle names it.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.bundles
            .values()
            .flat_map(|b| b.manifest.blobs())
            .find(|b| b.sha256 == *digest)
            .map(|b| b.size)
    }

    /// The size of a blob `uploader` may upload: one named by a bundle it
    /// published (the pool owner's keys: any). Another publisher's upload in
    /// progress is not a stranger's to append to.
    pub fn upload_size(&self, uploader: &PublicKey, digest: &Digest) -> Option<u64> {
        let admin = self.is_admin(uploader);
        self.bundles
            .values()
            .filter(|b| admin || b.manifest.publisher == *uploader)
            .flat_map(|b| b.manifest.blobs())
            .find(|b| b.sha256 == *digest)
            .map(|b| b.size)
    }

    /// Publish a signed bundle; returns its digest and the blobs to upload.
    pub fn handle_publish(
        &mut self,
        now_unix: u64,
        signed: SignedManifest,
        have_blob: &dyn Fn(&Digest) -> bool,
    ) -> Result<(Digest, Vec<Digest>), Refusal> {
        let manifest = signed
            .verify(&self.cfg.publishers, now_unix)
            .map_err(|e| refusal(ErrorCode::Invalid, e.to_string()))?;
        let digest = signed.digest();
        let missing: BTreeSet<Digest> = manifest
            .blobs()
            .iter()
            .map(|b| b.sha256)
            .filter(|d| !have_blob(d))
            .collect();
        if !self.bundles.contains_key(&digest) {
            let bytes = rmp_serde::to_vec_named(&signed).expect("manifest serialises");
            self.store.put_bundle(
                &StoredBundle {
                    digest,
                    signed: bytes,
                },
                &manifest.name,
                &manifest.version,
            )?;
        }
        let list = missing.iter().copied().collect();
        self.bundles.insert(
            digest,
            Bundle {
                signed,
                manifest,
                missing,
            },
        );
        Ok((digest, list))
    }

    /// A blob is complete and verified on disk.
    pub fn handle_blob_stored(&mut self, digest: &Digest) {
        for b in self.bundles.values_mut() {
            b.missing.remove(digest);
        }
    }

    /// Submit a batch; it is on disk when this returns.
    pub fn handle_submit(
        &mut self,
        now_unix: u64,
        owner: &PublicKey,
        bundle: &Digest,
        key: &str,
        inputs: &[Vec<u8>],
    ) -> Result<(JobId, u32), Refusal> {
        let b = self.bundles.get(bundle).ok_or_else(|| {
            refusal(
                ErrorCode::NotFound,
                format!("no bundle {bundle} is published on this pool"),
            )
        })?;
        if !b.missing.is_empty() {
            return Err(refusal(
                ErrorCode::Invalid,
                format!(
                    "bundle {bundle} still lacks {} blob(s); upload them first",
                    b.missing.len()
                ),
            ));
        }
        if inputs.is_empty() {
            return Err(refusal(
                ErrorCode::Invalid,
                "a job needs at least one input",
            ));
        }
        if key.is_empty() || key.len() > 200 {
            return Err(refusal(
                ErrorCode::Invalid,
                "submission key must be 1-200 characters",
            ));
        }
        let InsertedJob { job, tasks, fresh } = self
            .store
            .insert_job(bundle, owner, key, inputs, now_unix)?;
        if fresh {
            self.owners.insert(job, *owner);
            for t in tasks.iter().filter(|t| !t.cached) {
                self.queues.push_back(
                    *bundle,
                    Queued {
                        task: t.task,
                        job,
                        attempts: 0,
                        failed_on: None,
                    },
                );
            }
            let n = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
            let cached =
                u32::try_from(tasks.iter().filter(|t| t.cached).count()).unwrap_or(u32::MAX);
            let counts = JobCounts {
                tasks: n,
                queued: n - cached,
                done: cached,
                cached,
                ..JobCounts::default()
            };
            self.jobs.insert(job, (*bundle, counts));
            if counts.queued == 0 {
                self.events.push_back(PoolEvent::JobFinished { job });
            }
        }
        Ok((job, u32::try_from(tasks.len()).unwrap_or(u32::MAX)))
    }
}
