//! The agent's connection loop (hello, leases, results, reconnects with
//! back-off, draining) around `NodeSession`, and the runner of one task.

use crate::bundles::{PrepareError, Prepared};
use crate::caches::{CacheBook, CacheKind, Eviction};
use crate::config::{hardware_class, NodeConfig, Tamper};
use crate::state::{Link, NodeState};
use crate::{NodeError, NodeReport};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidepool_host::sandbox::TaskSpec;
use tidepool_net::{call, BlobDir};
use tidepool_proto::manifest::VersionBook;
use tidepool_proto::receipt::LeaseReceipt;
use tidepool_proto::session::{NodeEvent, NodeSession};
use tidepool_proto::wire::{
    Bytes, Capabilities, Outcome, Request, Response, TaskGrant, TaskResult, Verdict,
    PROTOCOL_VERSION,
};
use tidepool_proto::{Digest, PublicKey, SecretKey};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

/// State shared by the agent's tasks; lives as long as `run`.
pub(crate) struct Ctx {
    /// Node key (signs receipts).
    pub(crate) key: SecretKey,
    /// Trusted publishers.
    pub(crate) publishers: BTreeSet<PublicKey>,
    /// Node memory limit per task.
    pub(crate) memory_mib: u32,
    /// What a task may hold and spend in wasi-nn (`[sandbox]`).
    pub(crate) nn: tidepool_host::NnLimits,
    /// Slots (sizes each sandbox's instance pool).
    pub(crate) slots: u32,
    /// The data directory (caches, `versions.json`, `status.json`).
    pub(crate) data_dir: PathBuf,
    /// Fetched components.
    pub(crate) blobs: BlobDir,
    /// Fetched models.
    pub(crate) models: BlobDir,
    /// Compiled component cache.
    pub(crate) compiled: PathBuf,
    /// The caches' files, budgets and pins (`caches`); every removal is
    /// decided under this lock.
    pub(crate) caches: std::sync::Mutex<CacheBook>,
    /// What `status.json` reports; written by the connection loop.
    pub(crate) state: std::sync::Mutex<NodeState>,
    /// The models loaded on this node, one copy each whatever the number
    /// of bundles that name them (lives as long as the agent).
    pub(crate) shared_models: Arc<tidepool_host::SharedModels>,
    /// Figures only `/metrics` shows.
    pub(crate) telemetry: crate::metrics::Telemetry,
    /// Highest versions seen, persisted at `versions_path`.
    pub(crate) versions: std::sync::Mutex<VersionBook>,
    /// Where `versions` is saved.
    pub(crate) versions_path: PathBuf,
    /// Prepared bundles by digest (and refusals, so a bad bundle is not
    /// fetched again for every task).
    pub(crate) prepared: Mutex<HashMap<Digest, Result<Arc<Prepared>, PrepareError>>>,
    /// One permit per slot: the node holds more leases than slots (its
    /// queue), but runs at most `slots` tasks at once.
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    /// Output filter of adversarial tests (`None` in real nodes).
    pub(crate) tamper: Option<Arc<dyn Tamper>>,
    /// The wasi-nn engines chosen at start (one per encoding).
    pub(crate) engines: Vec<Arc<dyn tidepool_host::backend::NnEngine>>,
    /// The engines of GPU-tier jobs, if the node's GPU started (fixed at
    /// start, like `engines`).
    pub(crate) gpu_engines: Option<tidepool_host::Engines>,
}

impl Ctx {
    /// Run one task; returns the result and its receipt body (unsigned).
    /// Setting `cancel` stops it (the pool cancelled or lost its lease).
    async fn run_task(
        self: Arc<Self>,
        conn: quinn::Connection,
        g: TaskGrant,
        cancel: Arc<std::sync::atomic::AtomicBool>,
    ) -> (TaskResult, Option<Vec<u8>>) {
        let started = Instant::now();
        let failed = |kind: &str, reason: String| {
            self.count(|t| t.fail(kind));
            (
                TaskResult {
                    transcript: Default::default(),
                    lease: g.lease,
                    outcome: Outcome::Failed { reason },
                    receipt: None,
                },
                None,
            )
        };
        if let Err(why) = g.check() {
            return failed("bad_grant", why);
        }
        // From here until the task's end its bundle's files stay on disk.
        let _pin = Pin::new(&self, g.bundle);
        let p = match self.prepare(&conn, g.bundle).await {
            Ok(p) => p,
            Err(why) => return failed(why.kind(), why.to_string()),
        };
        let lease = g.lease;
        let input = g.input.0;
        let replay = g.replay;
        let id = g.identity;
        // Only an adversarial test's filter needs the input afterwards.
        let input_copy = self.tamper.as_ref().map(|_| input.clone());
        let p2 = p.clone();
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return failed("stopping", "node is stopping".into());
        };
        let ran = tokio::task::spawn_blocking(move || {
            // The slot stays taken until the task's thread is done with it,
            // past the answer if the task was let go inside an engine call.
            p2.sandbox.run_holding(
                &p2.job,
                TaskSpec {
                    replay: replay.as_deref(),
                    accept: p2.manifest.determinism.accept_policy(),
                    shared_batches: matches!(
                        p2.manifest.determinism,
                        tidepool_proto::manifest::Determinism::Llm { .. }
                    ),
                    id: &id,
                    params: &p2.manifest.params,
                    input: &input,
                },
                Some(cancel),
                permit,
            )
        })
        .await;
        let mut out = match ran {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return failed(crate::metrics::failure_kind(&e), e.to_string()),
            Err(e) => return failed("panic", format!("task panicked: {e}")),
        };
        let now = crate::unix_now();
        let engine_us = out.receipt.metering.compute_us;
        let tokens = out.receipt.metering.tokens_out;
        self.count(|t| {
            t.completed += 1;
            t.engine_us += engine_us;
            t.generated_tokens += tokens;
        });
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ran(&p.digest, now);
        self.telemetry.task_done(started.elapsed());
        if let (Some(t), Some(input), Ok(bytes)) = (&self.tamper, &input_copy, &mut out.result) {
            let changed = t.tamper(lease, input, std::mem::take(bytes));
            out.receipt.output = Digest::of(&changed);
            out.receipt.output_len = changed.len() as u64;
            // A liar that knows what the pool counts keeps its metering true.
            out.receipt.metering.bytes_out = changed.len() as u64;
            *bytes = changed;
        }
        let outcome = match out.result {
            Ok(bytes) => Outcome::Output(Bytes(bytes)),
            Err(f) => Outcome::JobError {
                code: f.code,
                message: f.message,
            },
        };
        // Signed later, with the other results of the batch it is sent in.
        let body = LeaseReceipt {
            lease,
            bundle: p.digest,
            receipt: out.receipt,
        }
        .to_body();
        for r in out.replay.iter().filter(|r| !r.accepted()) {
            tracing::info!(task = %lease.task, report = ?r, "replayed generation not accepted; generated afresh");
        }
        (
            TaskResult {
                transcript: out.transcript,
                lease,
                outcome,
                receipt: None,
            },
            Some(body),
        )
    }
}

/// A task of a bundle in flight: its files stay on disk until this is
/// dropped (at the task's end), then the caches are brought within their
/// budgets again.
struct Pin {
    /// The agent's state.
    ctx: Arc<Ctx>,
    /// The bundle pinned.
    bundle: Digest,
}

impl Pin {
    fn new(ctx: &Arc<Ctx>, bundle: Digest) -> Self {
        ctx.caches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pin(bundle);
        Self {
            ctx: ctx.clone(),
            bundle,
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let evictions = {
            let mut book = self.ctx.caches.lock().unwrap_or_else(|p| p.into_inner());
            book.unpin(&self.bundle);
            if book.pinned_bundle(&self.bundle) {
                return;
            }
            book.evict_all()
        };
        for e in &evictions {
            self.ctx.deleted(e);
        }
    }
}

/// How often the loop writes `status.json` while something changed.
const STATE_EVERY: Duration = Duration::from_secs(1);

impl Ctx {
    /// The connection changed: say so in `status.json` now.
    fn note_link(&self, link: Link, error: Option<String>) {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.link(link, crate::unix_now());
            if error.is_some() || link == Link::Connected {
                state.last_error = error;
            }
        }
        self.telemetry
            .set_connected(matches!(link, Link::Connected | Link::Draining));
        self.save_state(true);
    }

    /// Write `status.json` if `force`, or if [`STATE_EVERY`] passed since
    /// the last write. A failure is logged, never fatal.
    fn save_state(&self, force: bool) {
        if !force && !self.telemetry.state_due(STATE_EVERY) {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        state.updated_at = crate::unix_now();
        if let Err(e) = crate::state::write(&self.data_dir, &state) {
            warn!(dir = %self.data_dir.display(), "cannot write the node's status: {e}");
        }
    }

    /// Count in both of the state's tallies.
    pub(crate) fn count(&self, f: impl Fn(&mut crate::state::Tally)) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count(f);
    }

    /// Delete what the book evicted (under its lock or not: the book has
    /// already forgotten the files, so nothing picks them again).
    pub(crate) fn deleted(&self, e: &Eviction) {
        if e.remove.is_empty() {
            return;
        }
        let freed = crate::caches::delete(&self.data_dir, e);
        let kind = e.remove[0].0.kind;
        info!(cache = %kind, files = e.remove.len(), freed, "evicted least recently used files");
    }

    /// Make room for `incoming` bytes in `kind`.
    pub(crate) fn make_room(&self, kind: CacheKind, incoming: u64) {
        let e = self
            .caches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .evict(kind, incoming);
        self.deleted(&e);
        if e.short > 0 {
            warn!(cache = %kind, over = e.short, "cache over its budget while the bundles in flight use its files; evicted when they finish");
        }
    }
}

/// Sign the receipts of a batch of results with one signature (each result
/// whose body is known and that has no receipt yet).
fn sign_results(
    key: &SecretKey,
    results: &mut [TaskResult],
    bodies: &HashMap<tidepool_proto::wire::LeaseId, Vec<u8>>,
) {
    let idx: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].receipt.is_none() && bodies.contains_key(&results[i].lease))
        .collect();
    let batch: Vec<Vec<u8>> = idx
        .iter()
        .map(|&i| bodies[&results[i].lease].clone())
        .collect();
    for (i, signed) in idx
        .into_iter()
        .zip(tidepool_proto::receipt::sign_batch(key, batch))
    {
        results[i].receipt = Some(signed);
    }
}

/// Which request a response answers.
#[derive(Debug)]
enum Pending {
    Lease,
    Results,
}

/// Run a node until `drain` resolves and every held task is finished and
/// returned (or the pool is unreachable while draining).
pub async fn run(
    cfg: NodeConfig,
    drain: impl std::future::Future<Output = ()>,
) -> Result<NodeReport, NodeError> {
    if cfg.publishers.is_empty() {
        return Err(NodeError::Config(
            "no trusted publishers: this node would refuse every bundle".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| NodeError::Config(format!("cannot create {}: {e}", cfg.data_dir.display())))?;
    let versions_path = cfg.data_dir.join("versions.json");
    let versions: VersionBook = match std::fs::read(&versions_path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| NodeError::Config(format!("{}: {e}", versions_path.display())))?,
        Err(_) => VersionBook::default(),
    };
    // One process per data directory: two would evict each other's files.
    let _lock = crate::state::lock(&cfg.data_dir).map_err(|e| NodeError::Config(e.to_string()))?;
    let blobs = BlobDir::open(CacheKind::Blobs.dir(&cfg.data_dir))?;
    let models = BlobDir::open(CacheKind::Models.dir(&cfg.data_dir))?;
    let mut book = CacheBook::new(cfg.budgets);
    crate::caches::scan(&mut book, &cfg.data_dir)
        .map_err(|e| NodeError::Config(format!("{}: {e}", cfg.data_dir.display())))?;
    // Whatever a smaller budget or an earlier crash left over goes now.
    for e in book.evict_all() {
        if !e.remove.is_empty() {
            let freed = crate::caches::delete(&cfg.data_dir, &e);
            info!(cache = %e.remove[0].0.kind, files = e.remove.len(), freed, "evicted at start (over budget)");
        }
    }
    // Lifetime totals carry on from the last run's report.
    let total = crate::state::read(&cfg.data_dir)
        .ok()
        .flatten()
        .map(|s| (s.total, s.bundles))
        .unwrap_or_default();
    let state = NodeState {
        node: cfg.key.public().to_string(),
        pool: cfg.pool.to_string(),
        pool_key: cfg.pool_key.to_string(),
        pid: std::process::id(),
        started_at: crate::unix_now(),
        link_since: crate::unix_now(),
        total: total.0,
        bundles: total.1,
        ..NodeState::default()
    };
    let (engines, fell_back) = tidepool_host::engines(
        &cfg.onnx,
        tidepool_host::LlmSettings {
            threads: cfg.llm_threads,
            batch: cfg.llm_batch,
        },
    )?;
    if let Some(why) = fell_back {
        warn!("{why}");
    }
    for e in &engines {
        info!(encoding = %e.encoding(), engine = e.describe(), "wasi-nn engine");
    }
    let gpu = match &cfg.gpu {
        None => None,
        Some(choice) => {
            let (supply, notes) = tidepool_host::gpu::start(choice, cfg.llm_threads)?;
            for n in notes {
                warn!("GPU: {n}");
            }
            if let Some(s) = &supply {
                for e in &s.engines {
                    info!(encoding = %e.encoding(), engine = e.describe(), gpu = %s.info.name, memory_mib = s.info.memory_mib, "GPU engine");
                }
            }
            supply
        }
    };
    let ctx = Arc::new(Ctx {
        key: cfg.key.clone(),
        publishers: cfg.publishers.clone(),
        memory_mib: cfg.memory_mib,
        nn: cfg.nn,
        slots: cfg.slots,
        data_dir: cfg.data_dir.clone(),
        blobs,
        models,
        compiled: CacheKind::Compiled.dir(&cfg.data_dir),
        caches: std::sync::Mutex::new(book),
        state: std::sync::Mutex::new(state),
        telemetry: crate::metrics::Telemetry::default(),
        shared_models: Arc::default(),
        versions: std::sync::Mutex::new(versions),
        versions_path,
        prepared: Mutex::new(HashMap::new()),
        permits: Arc::new(tokio::sync::Semaphore::new(cfg.slots.max(1) as usize)),
        tamper: cfg.tamper.clone(),
        engines: engines.clone(),
        gpu_engines: gpu.as_ref().map(|g| g.engines.clone()),
    });
    let metrics = match &cfg.metrics {
        None => None,
        Some(m) => {
            let (addr, task) = crate::metrics::start(m, ctx.clone())
                .await
                .map_err(|e| NodeError::Config(format!("[metrics] listen {}: {e}", m.listen)))?;
            info!(%addr, "metrics listener");
            Some(task)
        }
    };
    let endpoint = tidepool_net::client(&cfg.key, cfg.pool_key)?;
    // Hold as many leases again as there are slots, waiting, so a slot
    // never idles during a round trip to the pool.
    let queue = cfg.queue.unwrap_or(cfg.slots).clamp(0, 4096);
    let mut session = NodeSession::new(cfg.slots.max(1) + queue, Instant::now());
    let mut report = NodeReport::default();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(TaskResult, Option<Vec<u8>>)>();
    // Receipt bodies of finished tasks until the pool has answered for them.
    let mut bodies: HashMap<tidepool_proto::wire::LeaseId, Vec<u8>> = HashMap::new();
    // The running tasks' stop flags, set when the pool cancels or loses
    // their leases; an entry lives from the grant to the task's end.
    let mut cancels: HashMap<tidepool_proto::wire::LeaseId, Arc<std::sync::atomic::AtomicBool>> =
        HashMap::new();
    let (resp_tx, mut resp_rx) =
        mpsc::unbounded_channel::<(u64, Pending, Result<Response, String>)>();
    let mut generation = 0u64;
    let mut backoff = Duration::from_millis(100);
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    // Read once: the hello is sent again on every reconnection.
    let hardware = cfg.hardware.clone().unwrap_or_else(hardware_class);
    let caps = || Capabilities {
        encodings: engines.iter().map(|e| e.encoding().to_string()).collect(),
        models: Vec::new(),
        memory_mib: cfg.memory_mib,
        slots: cfg.slots,
        queue,
        gpu: gpu.as_ref().map(|g| g.info.clone()),
        publishers: cfg.publishers.iter().copied().collect(),
        fetch_models: cfg.fetch_models,
        operator: cfg.operator,
        hardware: Some(hardware.clone()),
        engines: engines
            .iter()
            .chain(gpu.iter().flat_map(|g| g.engines.iter()))
            .map(|e| e.describe())
            .collect(),
    };
    'connect: loop {
        if draining && session.is_drained() {
            break;
        }
        let conn = match tidepool_net::connect(&endpoint, cfg.pool).await {
            Ok(c) => c,
            Err(e) => {
                warn!("{e}; retrying in {} ms", backoff.as_millis());
                ctx.note_link(Link::Connecting, Some(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut drain, if !draining => { draining = true; session.handle_drain(Instant::now()); }
                }
                if draining && session.running() == 0 {
                    // Nothing held; results not yet sent are lost to this node
                    // but the pool re-runs their tasks when the leases expire.
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let hello = Request::NodeHello {
            protocol: PROTOCOL_VERSION,
            agent: concat!("tidepool ", env!("CARGO_PKG_VERSION")).into(),
            caps: caps(),
        };
        let heartbeat = match call::<_, Response>(&conn, &hello).await {
            Ok(Response::Welcome { heartbeat_ms, .. }) => Duration::from_millis(heartbeat_ms),
            Ok(Response::Error { message, .. }) => {
                let why = format!("the pool refused this node: {message}");
                ctx.note_link(Link::Stopped, Some(why.clone()));
                return Err(NodeError::Config(why));
            }
            Ok(other) => {
                warn!("unexpected answer to hello: {other:?}");
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(e) => {
                warn!("hello failed: {e}");
                ctx.note_link(Link::Connecting, Some(format!("hello failed: {e}")));
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        generation += 1;
        report.connections += 1;
        info!(pool = %cfg.pool, "connected");
        ctx.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connections += 1;
        ctx.note_link(
            if draining {
                Link::Draining
            } else {
                Link::Connected
            },
            None,
        );
        session.handle_welcome(Instant::now(), heartbeat);
        loop {
            let now = Instant::now();
            while let Some(mut req) = session.poll_request(now) {
                if let Request::Results { results } = &mut req {
                    sign_results(&ctx.key, results, &bodies);
                }
                let kind = if matches!(req, Request::Lease { .. }) {
                    Pending::Lease
                } else {
                    Pending::Results
                };
                let (conn, tx, g) = (conn.clone(), resp_tx.clone(), generation);
                tokio::spawn(async move {
                    let r = call::<_, Response>(&conn, &req)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send((g, kind, r));
                });
            }
            while let Some(ev) = session.poll_event() {
                match ev {
                    NodeEvent::Run(g) => {
                        debug!(lease = %g.lease, "running");
                        let (ctx, conn, tx) = (ctx.clone(), conn.clone(), done_tx.clone());
                        let cancel = cancels.entry(g.lease).or_default().clone();
                        tokio::spawn(async move {
                            let r = ctx.run_task(conn, g, cancel).await;
                            let _ = tx.send(r);
                        });
                    }
                    NodeEvent::Cancel(l) => {
                        bodies.remove(&l);
                        if let Some(flag) = cancels.remove(&l) {
                            flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        info!(lease = %l, "lease lost or cancelled; the task is stopped");
                    }
                }
            }
            if draining && session.is_drained() {
                let _ = call::<_, Response>(&conn, &Request::Draining).await;
                conn.close(0u32.into(), b"drained");
                break 'connect;
            }
            ctx.save_state(false);
            let wake = session
                .poll_timeout()
                .unwrap_or(now + Duration::from_secs(1))
                .min(now + STATE_EVERY);
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                Some((r, body)) = done_rx.recv() => {
                    cancels.remove(&r.lease);
                    match r.outcome { Outcome::Failed { .. } => report.failed += 1, _ => report.completed += 1 }
                    if let Some(b) = body {
                        bodies.insert(r.lease, b);
                    }
                    session.handle_task_done(Instant::now(), r);
                }
                Some((g, kind, r)) = resp_rx.recv() => {
                    if g != generation { continue; }
                    let now = Instant::now();
                    match (kind, r) {
                        (Pending::Lease, Ok(Response::Leases { grants, lost, retry_ms, standing })) => {
                            if let Some(st) = standing {
                                let mut state = ctx.state.lock().unwrap_or_else(|p| p.into_inner());
                                state.standing = Some(st);
                                state.standing_at = crate::unix_now();
                            }
                            session.handle_leases(now, grants, lost, Duration::from_millis(retry_ms));
                        }
                        (Pending::Results, Ok(Response::Verdicts(v))) => {
                            for (lease, verdict) in v {
                                bodies.remove(&lease);
                                match verdict {
                                    Verdict::Accepted | Verdict::Duplicate => { report.accepted += 1; ctx.count(|t| t.accepted += 1) }
                                    Verdict::Stale => { report.rejected += 1; ctx.count(|t| t.rejected += 1); debug!(%lease, "stale result") }
                                    Verdict::Refused(why) => { report.rejected += 1; ctx.count(|t| t.rejected += 1); warn!(%lease, "result refused: {why}") }
                                }
                            }
                            session.handle_verdicts(now);
                        }
                        (Pending::Lease, Ok(other)) => {
                            warn!("lease request answered with {other:?}");
                            session.handle_leases(now, Vec::new(), Vec::new(), Duration::from_secs(1));
                        }
                        (Pending::Results, Ok(other)) => {
                            warn!("results answered with {other:?}; resending later");
                            session.handle_request_failed();
                        }
                        (_, Err(e)) => {
                            warn!("request failed: {e}; reconnecting");
                            ctx.note_link(Link::Connecting, Some(format!("request failed: {e}")));
                            session.handle_disconnect();
                            conn.close(0u32.into(), b"reconnecting");
                            continue 'connect;
                        }
                    }
                }
                _ = &mut drain, if !draining => {
                    info!("draining: finishing held tasks");
                    ctx.note_link(Link::Draining, None);
                    draining = true;
                    session.handle_drain(Instant::now());
                }
                _ = conn.closed() => {
                    warn!("connection to the pool lost; reconnecting");
                    ctx.note_link(Link::Connecting, Some("connection to the pool lost".into()));
                    session.handle_disconnect();
                    continue 'connect;
                }
            }
        }
    }
    endpoint.wait_idle().await;
    ctx.note_link(Link::Stopped, None);
    if let Some(task) = metrics {
        task.abort();
    }
    report.generated_tokens = ctx
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .since_start
        .generated_tokens;
    Ok(report)
}
