//! Bundles and jobs: publishing signed bundles, blobs arriving, submitting
//! batches (with the result cache), and every job's task counts kept in
//! step with the store.

use super::queues::Queued;
use super::{refusal, Coordinator, PoolEvent};
use crate::store::{InsertedJob, InsertedTask, JobCounts, Store, StoredBundle};
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
            && !self.open.contains(&job)
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

    /// Submit a batch in one message; it is on disk when this returns.
    pub fn handle_submit(
        &mut self,
        now_unix: u64,
        owner: &PublicKey,
        bundle: &Digest,
        key: &str,
        inputs: &[Vec<u8>],
    ) -> Result<(JobId, u32), Refusal> {
        self.submittable(bundle, key)?;
        items_fit(0, inputs)?;
        let bytes = inputs.iter().map(|i| i.len() as u64).sum();
        self.within_quotas(owner, bundle, inputs.len(), bytes)?;
        if inputs.is_empty() {
            return Err(refusal(
                ErrorCode::Invalid,
                "a job needs at least one input",
            ));
        }
        let InsertedJob { job, tasks, fresh } = self
            .store
            .insert_job(bundle, owner, key, inputs, now_unix)?;
        if fresh {
            self.owners.insert(job, *owner);
            self.jobs.insert(job, (*bundle, JobCounts::default()));
            self.queue_inserted(job, *bundle, &tasks, bytes);
        }
        Ok((job, u32::try_from(tasks.len()).unwrap_or(u32::MAX)))
    }

    /// Open a job to be filled in chunks, or find the one `owner` opened
    /// (or submitted) with `key`: `(job, inputs held, sealed)`. A client
    /// may have `quotas.open_jobs` open at once and ask for a priority up
    /// to `quotas.max_priority` (admins: any).
    pub fn handle_open_job(
        &mut self,
        now_unix: u64,
        owner: &PublicKey,
        bundle: &Digest,
        key: &str,
        priority: i8,
    ) -> Result<(JobId, u32, bool), Refusal> {
        self.submittable(bundle, key)?;
        let q = &self.cfg.quotas;
        if priority > q.max_priority && !self.is_admin(owner) {
            return Err(refusal(
                ErrorCode::Forbidden,
                format!(
                    "priority {priority} is over this pool's limit for clients ({})",
                    q.max_priority
                ),
            ));
        }
        let open = self
            .open
            .iter()
            .filter(|j| self.owners.get(j) == Some(owner))
            .count();
        // At the quota, only a job it opened before may be named.
        let create = open < q.open_jobs as usize;
        let quota = q.open_jobs;
        let Some(o) = self
            .store
            .open_job(bundle, owner, key, priority, create, now_unix)?
        else {
            return Err(refusal(
                ErrorCode::Busy,
                format!("client has {open} jobs open, this pool's quota (quotas.open_jobs = {quota}); seal one first"),
            ));
        };
        if o.bundle != *bundle {
            return Err(refusal(
                ErrorCode::Invalid,
                format!(
                    "key {key:?} names job {} of bundle {}, not {bundle}",
                    o.job, o.bundle
                ),
            ));
        }
        if o.fresh {
            self.owners.insert(o.job, *owner);
            self.open.insert(o.job);
            if priority != 0 {
                self.priorities.insert(o.job, priority);
            }
            self.jobs.insert(o.job, (*bundle, JobCounts::default()));
        }
        Ok((o.job, o.have, o.sealed))
    }

    /// Inputs `from..` of an open job of `owner`: those held already are
    /// compared by digest and skipped (a chunk sent again changes nothing),
    /// the rest stored and queued. Returns the inputs held now.
    pub fn handle_append_inputs(
        &mut self,
        now_unix: u64,
        owner: &PublicKey,
        job: JobId,
        from: u32,
        inputs: &[Vec<u8>],
    ) -> Result<u32, Refusal> {
        let (bundle, have) = self.open_job_of(owner, job)?;
        items_fit(from, inputs)?;
        let fresh = &inputs[(have.saturating_sub(from) as usize).min(inputs.len())..];
        self.within_quotas(
            owner,
            &bundle,
            fresh.len(),
            fresh.iter().map(|i| i.len() as u64).sum(),
        )?;
        let end = u64::from(from) + inputs.len() as u64;
        if end > u64::from(MAX_JOB_TASKS) {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("a job holds at most {MAX_JOB_TASKS} inputs; this chunk ends at {end}"),
            ));
        }
        if from > have {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("job {job} holds {have} inputs; a chunk from {from} would leave a gap"),
            ));
        }
        // The part the pool holds already must be the same inputs.
        let overlap = (have - from).min(u32::try_from(inputs.len()).unwrap_or(u32::MAX));
        if overlap > 0 {
            let held = self.store.input_digests(job, from, overlap)?;
            for (i, (h, input)) in held.iter().zip(inputs).enumerate() {
                if *h != Digest::of(input) {
                    return Err(refusal(
                        ErrorCode::Invalid,
                        format!(
                            "input {} of job {job} differs from the one the pool holds",
                            u64::from(from) + i as u64
                        ),
                    ));
                }
            }
        }
        let new = &inputs[overlap as usize..];
        if new.is_empty() {
            return Ok(have);
        }
        let tasks = self
            .store
            .append_inputs(job, &bundle, have, new, now_unix)?;
        let bytes = new.iter().map(|i| i.len() as u64).sum();
        self.queue_inserted(job, bundle, &tasks, bytes);
        Ok(have + u32::try_from(tasks.len()).unwrap_or(u32::MAX))
    }

    /// Seal an open job of `owner` holding exactly `total` inputs; it
    /// finishes when its tasks do. Sealing a sealed job is a no-op.
    pub fn handle_seal_job(
        &mut self,
        owner: &PublicKey,
        job: JobId,
        total: u32,
    ) -> Result<u32, Refusal> {
        let (_, counts) = self.user_job(owner, job)?;
        if counts.tasks != total {
            return Err(refusal(
                ErrorCode::Invalid,
                format!(
                    "job {job} holds {} inputs, not {total}: send the rest before sealing",
                    counts.tasks
                ),
            ));
        }
        if total == 0 {
            return Err(refusal(
                ErrorCode::Invalid,
                "a job needs at least one input",
            ));
        }
        if self.open.remove(&job) {
            self.store.seal_job(job)?;
            if counts.queued == 0 && counts.leased == 0 {
                self.events.push_back(PoolEvent::JobFinished { job });
            }
        }
        Ok(total)
    }

    /// Cancel `owner`'s job: it takes no more inputs, its waiting tasks are
    /// dead-lettered and its leases end at once — a node hears that a
    /// lease is gone at its next renewal (within a heartbeat) and stops the
    /// task. Returns `(waiting, running)` tasks cancelled; a finished job
    /// cancels nothing.
    pub fn handle_cancel_job(
        &mut self,
        owner: &PublicKey,
        job: JobId,
    ) -> Result<(u32, u32), Refusal> {
        let (_, counts) = self.user_job(owner, job)?;
        let was_open = self.open.contains(&job);
        if counts.queued == 0 && counts.leased == 0 && !was_open {
            return Ok((0, 0));
        }
        Ok(self.end_job(job, &format!("cancelled by {}", owner.short()))?)
    }

    /// Seal `job` and dead-letter what of it is waiting or running (with
    /// `reason`), at once: its leases end in the pool and nodes learn it at
    /// their next renewal. Returns (waiting, running) ended.
    pub(super) fn end_job(
        &mut self,
        job: JobId,
        reason: &str,
    ) -> Result<(u32, u32), crate::store::StoreError> {
        self.store.cancel_job(job, reason)?;
        self.open.remove(&job);
        let waiting = self.queues.remove_job(job);
        let leased = self.leases.of_job(job);
        for &task in &leased {
            if let Some(lease) = self.leases.remove(task) {
                self.nodes.drop_lease(&lease.node, task);
                self.forget_if_idle(&lease.node);
            }
        }
        if let Some((_, c)) = self.jobs.get_mut(&job) {
            c.dead += c.queued + c.leased;
            c.queued = 0;
            c.leased = 0;
        }
        self.events.push_back(PoolEvent::JobFinished { job });
        Ok((
            u32::try_from(waiting).unwrap_or(u32::MAX),
            u32::try_from(leased.len()).unwrap_or(u32::MAX),
        ))
    }

    /// `owner` has `job`'s results: the pool may remove its inputs and
    /// outputs at the next collection. Only a finished job.
    pub fn handle_forget_job(&mut self, owner: &PublicKey, job: JobId) -> Result<(), Refusal> {
        let (_, counts) = self.user_job(owner, job)?;
        if self.open.contains(&job) || counts.queued + counts.leased > 0 {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("job {job} is not finished; cancel it first"),
            ));
        }
        self.store.forget_job(job)?;
        // Its bytes no longer count toward quotas: the next collection
        // removes them.
        if let Some((_, c)) = self.jobs.get_mut(&job) {
            c.bytes = 0;
        }
        Ok(())
    }

    /// The bundle and counts of a user job `owner` may act on (its own, or
    /// any for an admin); hidden jobs and others' are not found.
    fn user_job(&self, owner: &PublicKey, job: JobId) -> Result<(Digest, JobCounts), Refusal> {
        self.jobs
            .get(&job)
            .filter(|_| self.sees(owner, job) && !self.kinds.contains_key(&job))
            .copied()
            .ok_or_else(|| refusal(ErrorCode::NotFound, format!("no job {job}")))
    }

    /// The bundle and inputs held of `owner`'s open job `job`.
    fn open_job_of(&self, owner: &PublicKey, job: JobId) -> Result<(Digest, u32), Refusal> {
        let (bundle, counts) = self.user_job(owner, job)?;
        if !self.open.contains(&job) {
            return Err(refusal(
                ErrorCode::Invalid,
                format!("job {job} is sealed: it takes no more inputs"),
            ));
        }
        Ok((bundle, counts.tasks))
    }

    /// May `owner` queue `more` tasks under its `quotas.queued_tasks`?
    fn within_quotas(
        &self,
        owner: &PublicKey,
        bundle: &Digest,
        more: usize,
        more_bytes: u64,
    ) -> Result<(), Refusal> {
        let q = &self.cfg.quotas;
        let queued = self.queues.queued_of(&Some(*owner)) as u64;
        if queued + more as u64 > q.queued_tasks {
            return Err(refusal(
                ErrorCode::Busy,
                format!(
                    "client has {queued} tasks waiting and sends {more} more; this pool's quota \
                     is {} (quotas.queued_tasks): wait for some to finish",
                    q.queued_tasks
                ),
            ));
        }
        let publisher = self.bundles.get(bundle).map(|b| b.signed.signer);
        let (mut client_bytes, mut pub_queued, mut pub_bytes) = (0u64, 0u64, 0u64);
        if q.stored_bytes > 0 || q.publisher_queued_tasks > 0 || q.publisher_stored_bytes > 0 {
            // One pass over the jobs in memory (quotas are checked per
            // submission or chunk, not per task).
            for (job, (b, c)) in &self.jobs {
                if self.owners.get(job) == Some(owner) {
                    client_bytes += c.bytes;
                }
                if publisher.is_some() && self.bundles.get(b).map(|x| x.signed.signer) == publisher
                {
                    pub_queued += u64::from(c.queued);
                    pub_bytes += c.bytes;
                }
            }
        }
        if q.stored_bytes > 0 && client_bytes + more_bytes > q.stored_bytes {
            return Err(refusal(
                ErrorCode::Busy,
                format!(
                    "client's jobs hold {client_bytes} bytes and this sends {more_bytes} more; \
                     this pool's quota is {} (quotas.stored_bytes): forget finished jobs \
                     (`tidepool job forget`)",
                    q.stored_bytes
                ),
            ));
        }
        if let Some(p) = publisher {
            if q.publisher_queued_tasks > 0 && pub_queued + more as u64 > q.publisher_queued_tasks {
                return Err(refusal(
                    ErrorCode::Busy,
                    format!(
                        "jobs of publisher {p}'s bundles have {pub_queued} tasks waiting and this \
                         sends {more} more; this pool's quota is {} \
                         (quotas.publisher_queued_tasks)",
                        q.publisher_queued_tasks
                    ),
                ));
            }
            if q.publisher_stored_bytes > 0 && pub_bytes + more_bytes > q.publisher_stored_bytes {
                return Err(refusal(
                    ErrorCode::Busy,
                    format!(
                        "jobs of publisher {p}'s bundles hold {pub_bytes} bytes and this sends \
                         {more_bytes} more; this pool's quota is {} \
                         (quotas.publisher_stored_bytes)",
                        q.publisher_stored_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// May a job of `bundle` be submitted with `key`?
    fn submittable(&self, bundle: &Digest, key: &str) -> Result<(), Refusal> {
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
        if key.is_empty() || key.len() > 200 {
            return Err(refusal(
                ErrorCode::Invalid,
                "submission key must be 1-200 characters",
            ));
        }
        Ok(())
    }

    /// Queue tasks just stored for `job` (those the cache answered are
    /// done) and count them; a sealed job with nothing left is finished.
    fn queue_inserted(
        &mut self,
        job: JobId,
        bundle: Digest,
        tasks: &[InsertedTask],
        input_bytes: u64,
    ) {
        let since = self.latest;
        for t in tasks.iter().filter(|t| !t.cached) {
            let meta = self.job_meta(job, bundle);
            self.queues.push_back(
                meta,
                Queued {
                    task: t.task,
                    job,
                    attempts: 0,
                    failed_on: None,
                    since,
                },
            );
        }
        let n = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
        let cached = u32::try_from(tasks.iter().filter(|t| t.cached).count()).unwrap_or(u32::MAX);
        self.telemetry.counters.submitted += u64::from(n);
        self.telemetry.counters.cache_hits += u64::from(cached);
        let Some((_, c)) = self.jobs.get_mut(&job) else {
            return;
        };
        c.tasks += n;
        c.bytes += input_bytes;
        c.queued += n - cached;
        c.done += cached;
        c.cached += cached;
        if c.queued == 0 && c.leased == 0 && !self.open.contains(&job) {
            self.events.push_back(PoolEvent::JobFinished { job });
        }
    }
}

/// Most inputs one job may hold (task indexes are `u32` on the wire).
pub const MAX_JOB_TASKS: u32 = u32::MAX - 1;

/// Refuse inputs larger than a task may take
/// ([`MAX_ITEM_BYTES`](tidepool_proto::wire::MAX_ITEM_BYTES)): they could
/// not travel in a lease answer. `from`: the first one's place in its job.
fn items_fit(from: u32, inputs: &[Vec<u8>]) -> Result<(), Refusal> {
    let max = tidepool_proto::wire::MAX_ITEM_BYTES;
    match inputs.iter().position(|i| i.len() > max) {
        Some(k) => Err(refusal(
            ErrorCode::Invalid,
            format!(
                "input {} is {} bytes, over the largest a task may take ({max} bytes)",
                u64::from(from) + k as u64,
                inputs[k].len()
            ),
        )),
        None => Ok(()),
    }
}
