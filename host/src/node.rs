//! The node agent: connects to a pool over QUIC, takes tasks under leases,
//! checks each bundle before running anything from it, runs tasks in the
//! sandbox and returns results with signed receipts.
//!
//! The protocol decisions (when to ask for work, renew leases, resend
//! results, finish draining) are made by [`NodeSession`], a state machine
//! without I/O; this module is the tokio shell around it. Sandbox calls are
//! synchronous and run on blocking threads.
//!
//! Before a bundle's first task, the node fetches its signed manifest and
//! refuses it unless: the signer is a publisher the node owner trusts, the
//! signature verifies over the exact bytes, it has not expired, its version
//! is not lower than one seen before from that publisher (remembered in
//! `versions.json` across restarts), and every blob fetched hashes to the
//! digest in the manifest. Nothing from a refused bundle is compiled or
//! instantiated.

use crate::registry::RegistryBuilder;
use crate::sandbox::{JobComponent, Sandbox, SandboxConfig, TaskSpec};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidepool_net::{call, read_frame, write_frame, BlobDir};
use tidepool_proto::manifest::{check_blob, Device, LockedManifest, SignedManifest, VersionBook};
use tidepool_proto::receipt::LeaseReceipt;
use tidepool_proto::session::{NodeEvent, NodeSession};
use tidepool_proto::wire::{
    Bytes, Capabilities, Outcome, Request, Response, TaskGrant, TaskResult, Verdict,
    PROTOCOL_VERSION,
};
use tidepool_proto::{Digest, PublicKey, SecretKey};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

/// A node's configuration (the `[node]` file of `tidepool node run`).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The pool's address.
    pub pool: SocketAddr,
    /// The pool's key (pinned).
    pub pool_key: PublicKey,
    /// This node's key.
    pub key: SecretKey,
    /// Where blobs, the compiled cache and `versions.json` live.
    pub data_dir: PathBuf,
    /// Tasks run at once.
    pub slots: u32,
    /// Leases held beyond `slots`, waiting, so slots never idle during a
    /// round trip to the pool (`None`: as many as `slots`).
    pub queue: Option<u32>,
    /// Memory per task, MiB (bundles asking for more are not sent here).
    pub memory_mib: u32,
    /// Publishers whose bundles this node runs.
    pub publishers: BTreeSet<PublicKey>,
    /// Whether to fetch models from the pool (otherwise only bundles whose
    /// models are already in the blob directory run here).
    pub fetch_models: bool,
    /// The key of whoever runs this node, told to the pool so re-executions
    /// of its results go to other operators' nodes.
    pub operator: Option<PublicKey>,
    /// Hardware class told to the pool (default: [`hardware_class`]).
    pub hardware: Option<String>,
    /// The engine for `onnx` models.
    pub onnx: crate::OnnxEngine,
    /// Threads of each llama.cpp (`ggml`) task context: fixed per node, part
    /// of its deterministic settings.
    pub llm_threads: u32,
    /// The GPU to serve GPU-tier jobs on (`None`: a CPU-only node).
    pub gpu: Option<crate::gpu::GpuChoice>,
    /// Changes outputs before they are signed. Only for adversarial tests
    /// of the pool's verification (a node that lies); the `tidepool` binary
    /// never sets it.
    pub tamper: Option<Arc<dyn Tamper>>,
}

/// An output filter for adversarial tests: the node signs what it returns.
pub trait Tamper: std::fmt::Debug + Send + Sync {
    /// The output to return instead of `output` for the task `lease` with
    /// `input`.
    fn tamper(
        &self,
        lease: tidepool_proto::wire::LeaseId,
        input: &[u8],
        output: Vec<u8>,
    ) -> Vec<u8>;
}

/// This machine's hardware class: architecture, CPU model and core count
/// (`x86_64 AMD EPYC 7B13 ×2`). Re-executions prefer another class.
pub fn hardware_class() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{} {model} ×{cores}", std::env::consts::ARCH)
}

/// What a node did, reported when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    /// Tasks run to a result (output or job error).
    pub completed: u64,
    /// Tasks that failed on this node (sandbox limits, refused bundles).
    pub failed: u64,
    /// Results the pool accepted.
    pub accepted: u64,
    /// Results the pool refused or found stale.
    pub rejected: u64,
    /// Connections made.
    pub connections: u64,
}

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration.
    #[error("node configuration: {0}")]
    Config(String),
    /// Local storage failed.
    #[error(transparent)]
    Blobs(#[from] tidepool_net::BlobError),
    /// Network set-up failed.
    #[error(transparent)]
    Net(#[from] tidepool_net::NetError),
}

/// A bundle ready to run.
struct Prepared {
    /// Verified manifest.
    manifest: LockedManifest,
    /// Its digest.
    digest: Digest,
    /// The sandbox for its limits and models.
    sandbox: Arc<Sandbox>,
    /// The compiled component.
    job: JobComponent,
}

/// Why a bundle could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
enum PrepareError {
    /// The pool could not be reached or answered wrongly: retried with the
    /// next task of the bundle.
    #[error("{0}")]
    Transport(String),
    /// The bundle failed a check (signer, signature, validity, rollback, a
    /// blob's digest): remembered, never retried.
    #[error("bundle refused: {0}")]
    Refused(String),
    /// This node failed (disk, sandbox, engine): remembered.
    #[error("{0}")]
    Local(String),
}

/// State shared by the agent's tasks; lives as long as `run`.
struct Ctx {
    /// Node key (signs receipts).
    key: SecretKey,
    /// Trusted publishers.
    publishers: BTreeSet<PublicKey>,
    /// Node memory limit per task.
    memory_mib: u32,
    /// Slots (sizes each sandbox's instance pool).
    slots: u32,
    /// Blob cache.
    blobs: BlobDir,
    /// Compiled component cache.
    compiled: PathBuf,
    /// Highest versions seen, persisted at `versions_path`.
    versions: std::sync::Mutex<VersionBook>,
    /// Where `versions` is saved.
    versions_path: PathBuf,
    /// Prepared bundles by digest (and refusals, so a bad bundle is not
    /// fetched again for every task).
    prepared: Mutex<HashMap<Digest, Result<Arc<Prepared>, PrepareError>>>,
    /// One permit per slot: the node holds more leases than slots (its
    /// queue), but runs at most `slots` tasks at once.
    permits: Arc<tokio::sync::Semaphore>,
    /// Output filter of adversarial tests (`None` in real nodes).
    tamper: Option<Arc<dyn Tamper>>,
    /// The wasi-nn engines chosen at start (one per encoding).
    engines: Vec<Arc<dyn crate::backend::NnEngine>>,
    /// The engines of GPU-tier jobs, if the node's GPU started (fixed at
    /// start, like `engines`).
    gpu_engines: Option<crate::Engines>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Ctx {
    async fn prepare(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        bundle: Digest,
    ) -> Result<Arc<Prepared>, PrepareError> {
        let mut map = self.prepared.lock().await;
        if let Some(p) = map.get(&bundle) {
            return p.clone();
        }
        let result = self.prepare_uncached(conn, bundle).await;
        match &result {
            Ok(_) => info!(%bundle, "bundle verified and loaded"),
            Err(e @ PrepareError::Transport(_)) => {
                warn!(%bundle, "{e}; will retry with the next task")
            }
            Err(e) => warn!(%bundle, "{e}"),
        }
        // Transport failures are retried on the next task; refusals are remembered.
        if !matches!(result, Err(PrepareError::Transport(_))) {
            map.insert(bundle, result.clone());
        }
        result
    }

    async fn prepare_uncached(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        bundle: Digest,
    ) -> Result<Arc<Prepared>, PrepareError> {
        use PrepareError::{Local, Refused, Transport};
        let signed: SignedManifest = match call(conn, &Request::FetchManifest { bundle }).await {
            Ok(Response::Manifest(m)) => m,
            Ok(other) => {
                return Err(Transport(format!(
                    "fetch manifest: unexpected answer {other:?}"
                )))
            }
            Err(e) => return Err(Transport(format!("fetch manifest: {e}"))),
        };
        let manifest = {
            let mut book = self.versions.lock().unwrap_or_else(|p| p.into_inner());
            let (manifest, changed) = tidepool_proto::manifest::admit(
                &bundle,
                &signed,
                &self.publishers,
                &mut book,
                unix_now(),
            )
            .map_err(|e| Refused(e.to_string()))?;
            if changed {
                let json = serde_json::to_vec_pretty(&*book).expect("version book serialises");
                let tmp = self.versions_path.with_extension("json.tmp");
                std::fs::write(&tmp, json)
                    .and_then(|()| std::fs::rename(&tmp, &self.versions_path))
                    .map_err(|e| {
                        Local(format!("cannot save {}: {e}", self.versions_path.display()))
                    })?;
            }
            manifest
        };
        let mut named = vec![("component".to_owned(), manifest.component)];
        named.extend(
            manifest
                .models
                .iter()
                .map(|(n, m)| (format!("model {n}"), m.blob)),
        );
        for (what, blob) in &named {
            self.fetch_blob(conn, what, blob).await?;
        }
        let component = std::fs::read(self.blobs.path(&manifest.component.sha256))
            .map_err(|e| Local(format!("read component: {e}")))?;
        check_blob("component", &manifest.component, &component)
            .map_err(|e| Refused(e.to_string()))?;
        let ctx = self.clone();
        let m = manifest.clone();
        tokio::task::spawn_blocking(move || ctx.load(m, bundle, &component))
            .await
            .map_err(|e| Local(format!("loading bundle panicked: {e}")))?
            .map_err(Local)
    }

    async fn fetch_blob(
        &self,
        conn: &quinn::Connection,
        what: &str,
        blob: &tidepool_proto::manifest::BlobRef,
    ) -> Result<(), PrepareError> {
        use PrepareError::{Local, Refused, Transport};
        let d = blob.sha256;
        while !self.blobs.has(&d) {
            let offset = self.blobs.held(&d);
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| Transport(format!("fetch {what}: {e}")))?;
            write_frame(&mut send, &Request::FetchBlob { digest: d, offset })
                .await
                .map_err(|e| Transport(format!("fetch {what}: {e}")))?;
            let _ = send.finish();
            loop {
                match read_frame::<Response>(&mut recv).await {
                    Ok(Some(Response::BlobChunk {
                        offset,
                        total,
                        data,
                        ..
                    })) => {
                        if total != blob.size {
                            return Err(Refused(format!(
                                "{what} is {total} bytes on the pool, the manifest says {}",
                                blob.size
                            )));
                        }
                        match self.blobs.append(&d, blob.size, offset, &data.0) {
                            Ok(true) => break,
                            Ok(false) => {}
                            Err(tidepool_net::BlobError::Mismatch { expected, actual }) => {
                                return Err(Refused(format!(
                                    "{what} does not match the signed manifest: expected {expected}, got {actual}"
                                )))
                            }
                            Err(e) => return Err(Local(format!("store {what}: {e}"))),
                        }
                    }
                    Ok(Some(Response::Error { message, .. })) => {
                        return Err(Transport(format!("fetch {what}: {message}")))
                    }
                    Ok(Some(other)) => {
                        return Err(Transport(format!("fetch {what}: unexpected {other:?}")))
                    }
                    // Stream ended or broke: loop resumes from what is held.
                    Ok(None) => break,
                    Err(e) => return Err(Transport(format!("fetch {what}: {e}"))),
                }
            }
        }
        Ok(())
    }

    fn load(
        &self,
        manifest: LockedManifest,
        digest: Digest,
        component: &[u8],
    ) -> Result<Arc<Prepared>, String> {
        let engines = match manifest.target.device {
            Device::Cpu => self.engines.clone(),
            // The pool sends GPU-tier tasks only to nodes that advertise a
            // GPU; a node without one refuses rather than run them on a CPU.
            Device::Gpu => self.gpu_engines.clone().ok_or_else(|| {
                format!(
                    "bundle {} is GPU-tier and this node has no GPU",
                    manifest.name
                )
            })?,
        };
        let mut reg = RegistryBuilder::new(engines);
        for (name, m) in &manifest.models {
            reg.add(
                name,
                &m.encoding,
                &self.blobs.path(&m.blob.sha256),
                &m.blob.sha256.hex(),
            )
            .map_err(|e| format!("model {name}: {e}"))?;
        }
        let memory = manifest.limits.memory_mib.min(self.memory_mib.max(16));
        let config = SandboxConfig {
            max_memory_bytes: (memory as usize) << 20,
            timeout: Duration::from_millis(manifest.limits.timeout_ms),
            max_output_bytes: (manifest.limits.max_output_kib as usize) << 10,
            fuel: manifest.limits.fuel,
            deterministic: true,
            max_concurrent: self.slots,
            cache_dir: Some(self.compiled.clone()),
            ..SandboxConfig::default()
        };
        let sandbox = Sandbox::new(config, reg.build()).map_err(|e| format!("sandbox: {e:#}"))?;
        let job = sandbox
            .load(component)
            .map_err(|e| format!("component: {e}"))?;
        Ok(Arc::new(Prepared {
            manifest,
            digest,
            sandbox: Arc::new(sandbox),
            job,
        }))
    }

    /// Run one task; returns the result and its receipt body (unsigned).
    async fn run_task(
        self: Arc<Self>,
        conn: quinn::Connection,
        g: TaskGrant,
    ) -> (TaskResult, Option<Vec<u8>>) {
        let failed = |reason: String| {
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
        let p = match self.prepare(&conn, g.bundle).await {
            Ok(p) => p,
            Err(why) => return failed(why.to_string()),
        };
        let lease = g.lease;
        let input = g.input.0;
        let replay = g.replay;
        // Only an adversarial test's filter needs the input afterwards.
        let input_copy = self.tamper.as_ref().map(|_| input.clone());
        let p2 = p.clone();
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return failed("node is stopping".into());
        };
        let ran = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let id = lease.task.to_string();
            p2.sandbox.run(
                &p2.job,
                TaskSpec {
                    replay: replay.as_deref(),
                    accept: p2.manifest.determinism.accept_policy(),
                    id: &id,
                    params: &p2.manifest.params,
                    input: &input,
                },
            )
        })
        .await;
        let mut out = match ran {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return failed(e.to_string()),
            Err(e) => return failed(format!("task panicked: {e}")),
        };
        if let (Some(t), Some(input), Ok(bytes)) = (&self.tamper, &input_copy, &mut out.result) {
            let changed = t.tamper(lease, input, std::mem::take(bytes));
            out.receipt.output = Digest::of(&changed);
            out.receipt.output_len = changed.len() as u64;
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
    let blobs = BlobDir::open(cfg.data_dir.join("blobs"))?;
    let (engines, fell_back) =
        crate::engines(&cfg.onnx, cfg.llm_threads).map_err(NodeError::Config)?;
    if let Some(why) = fell_back {
        warn!("{why}");
    }
    for e in &engines {
        info!(encoding = %e.encoding(), engine = e.describe(), "wasi-nn engine");
    }
    let gpu = match &cfg.gpu {
        None => None,
        Some(choice) => {
            let (supply, notes) =
                crate::gpu::start(choice, cfg.llm_threads).map_err(NodeError::Config)?;
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
        slots: cfg.slots,
        blobs,
        compiled: cfg.data_dir.join("compiled"),
        versions: std::sync::Mutex::new(versions),
        versions_path,
        prepared: Mutex::new(HashMap::new()),
        permits: Arc::new(tokio::sync::Semaphore::new(cfg.slots.max(1) as usize)),
        tamper: cfg.tamper.clone(),
        engines: engines.clone(),
        gpu_engines: gpu.as_ref().map(|g| g.engines.clone()),
    });
    let endpoint = tidepool_net::client(&cfg.key, cfg.pool_key)?;
    // Hold as many leases again as there are slots, waiting, so a slot
    // never idles during a round trip to the pool.
    let queue = cfg.queue.unwrap_or(cfg.slots).clamp(0, 4096);
    let mut session = NodeSession::new(cfg.slots.max(1) + queue, Instant::now());
    let mut report = NodeReport::default();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(TaskResult, Option<Vec<u8>>)>();
    // Receipt bodies of finished tasks until the pool has answered for them.
    let mut bodies: HashMap<tidepool_proto::wire::LeaseId, Vec<u8>> = HashMap::new();
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
    };
    'connect: loop {
        if draining && session.is_drained() {
            break;
        }
        let conn = match tidepool_net::connect(&endpoint, cfg.pool).await {
            Ok(c) => c,
            Err(e) => {
                warn!("{e}; retrying in {} ms", backoff.as_millis());
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
                return Err(NodeError::Config(format!(
                    "the pool refused this node: {message}"
                )));
            }
            Ok(other) => {
                warn!("unexpected answer to hello: {other:?}");
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(e) => {
                warn!("hello failed: {e}");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        generation += 1;
        report.connections += 1;
        info!(pool = %cfg.pool, "connected");
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
                        tokio::spawn(async move {
                            let r = ctx.run_task(conn, g).await;
                            let _ = tx.send(r);
                        });
                    }
                    NodeEvent::Cancel(l) => {
                        bodies.remove(&l);
                        info!(lease = %l, "lease lost; its result will be dropped");
                    }
                }
            }
            if draining && session.is_drained() {
                let _ = call::<_, Response>(&conn, &Request::Draining).await;
                conn.close(0u32.into(), b"drained");
                break 'connect;
            }
            let wake = session
                .poll_timeout()
                .unwrap_or(now + Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                Some((r, body)) = done_rx.recv() => {
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
                        (Pending::Lease, Ok(Response::Leases { grants, lost, retry_ms })) => {
                            session.handle_leases(now, grants, lost, Duration::from_millis(retry_ms));
                        }
                        (Pending::Results, Ok(Response::Verdicts(v))) => {
                            for (lease, verdict) in v {
                                bodies.remove(&lease);
                                match verdict {
                                    Verdict::Accepted | Verdict::Duplicate => report.accepted += 1,
                                    Verdict::Stale => { report.rejected += 1; debug!(%lease, "stale result") }
                                    Verdict::Refused(why) => { report.rejected += 1; warn!(%lease, "result refused: {why}") }
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
                            session.handle_disconnect();
                            conn.close(0u32.into(), b"reconnecting");
                            continue 'connect;
                        }
                    }
                }
                _ = &mut drain, if !draining => {
                    info!("draining: finishing held tasks");
                    draining = true;
                    session.handle_drain(Instant::now());
                }
                _ = conn.closed() => {
                    warn!("connection to the pool lost; reconnecting");
                    session.handle_disconnect();
                    continue 'connect;
                }
            }
        }
    }
    endpoint.wait_idle().await;
    Ok(report)
}

/// The node's configuration file (`tidepool node run --config node.toml`).
///
/// Every field is optional except what identifies the pool; defaults:
///
/// ```toml
/// pool = "127.0.0.1:7070"       # the pool's UDP address (required in practice)
/// pool_key = "ed25519:..."      # the pool's public key (required)
/// key = "node.key"              # this node's key (tidepool keygen --role node)
/// data_dir = "node-data"        # blobs/, compiled/, versions.json
/// slots = 2                     # tasks at once (default: available cores)
/// queue = 2                     # leases held waiting beyond slots (default: = slots)
/// memory_mib = 1024             # memory per task
/// publishers = []               # publishers whose bundles run here (required)
/// fetch_models = true           # fetch models from the pool
/// operator = "ed25519:..."      # who runs this node (optional): checks go to other operators
/// hardware = "..."              # hardware class (default: detected, e.g. "x86_64 <CPU> ×2")
/// onnx_engine = "tract"         # or "onnxruntime" (faster; results differ from tract in the last bits)
/// onnxruntime_lib = "..."       # default: the catalogue's onnxruntime-lib in the models directory
/// onnxruntime_fallback = false  # true: run tract if ONNX Runtime cannot be used; false: refuse to start
/// llm_threads = 1               # threads per llama.cpp task (fixed; default 1)
///
/// [gpu]                         # optional: serve GPU-tier jobs (docs/gpu-nodes.md)
/// enabled = true
/// device = 0                    # CUDA device index
/// name = "NVIDIA L4"            # default: detected (llama.cpp, else nvidia-smi)
/// memory_mib = 23034            # default: detected
/// onnxruntime_lib = "..."       # default: the catalogue's onnxruntime-gpu-lib
/// fallback = false              # true: run CPU-only if no GPU engine starts; false: refuse to start
/// ```
///
/// Relative paths are relative to the file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Pool address.
    pub pool: Option<SocketAddr>,
    /// Pool key.
    pub pool_key: Option<PublicKey>,
    /// Key file.
    #[serde(default = "node_default_key")]
    pub key: PathBuf,
    /// Data directory.
    #[serde(default = "node_default_data")]
    pub data_dir: PathBuf,
    /// Slots.
    pub slots: Option<u32>,
    /// Leases held waiting beyond the slots (default: as many as slots).
    pub queue: Option<u32>,
    /// Memory per task, MiB.
    #[serde(default = "node_default_memory")]
    pub memory_mib: u32,
    /// Trusted publishers.
    #[serde(default)]
    pub publishers: BTreeSet<PublicKey>,
    /// Fetch models from the pool.
    #[serde(default = "node_default_fetch")]
    pub fetch_models: bool,
    /// Operator key (optional).
    pub operator: Option<PublicKey>,
    /// Hardware class (default: detected).
    pub hardware: Option<String>,
    /// `tract` (default) or `onnxruntime`.
    #[serde(default = "node_default_onnx")]
    pub onnx_engine: String,
    /// The ONNX Runtime library (default: the fetched catalogue file).
    pub onnxruntime_lib: Option<PathBuf>,
    /// Run tract if ONNX Runtime cannot be used (default: refuse to start).
    #[serde(default)]
    pub onnxruntime_fallback: bool,
    /// Threads per llama.cpp task context.
    #[serde(default = "node_default_llm_threads")]
    pub llm_threads: u32,
    /// The GPU (`[gpu]`), if any.
    #[serde(default)]
    pub gpu: GpuFile,
}

/// `[gpu]` in `node.toml`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuFile {
    /// Serve GPU-tier jobs.
    #[serde(default)]
    pub enabled: bool,
    /// CUDA device index.
    #[serde(default)]
    pub device: u32,
    /// The card's model (default: detected).
    pub name: Option<String>,
    /// Its memory, MiB (default: detected).
    pub memory_mib: Option<u32>,
    /// The GPU build of ONNX Runtime (default: the fetched catalogue file).
    pub onnxruntime_lib: Option<PathBuf>,
    /// Run CPU-only if no GPU engine starts (default: refuse to start).
    #[serde(default)]
    pub fallback: bool,
}

/// Where the catalogue file `name` lives once fetched.
fn catalogue_path(name: &str) -> Result<PathBuf, NodeError> {
    let entry = crate::models::catalog_entry(name).map_err(|e| NodeError::Config(e.to_string()))?;
    Ok(crate::models::path_in(&crate::models::models_dir(), entry))
}

fn node_default_llm_threads() -> u32 {
    crate::DEFAULT_LLM_THREADS
}

fn node_default_onnx() -> String {
    "tract".into()
}

fn node_default_key() -> PathBuf {
    "node.key".into()
}
fn node_default_data() -> PathBuf {
    "node-data".into()
}
fn node_default_memory() -> u32 {
    1024
}
fn node_default_fetch() -> bool {
    true
}

impl Default for NodeFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty file takes every default")
    }
}

impl NodeFile {
    /// Read a node file; relative paths become relative to its directory.
    pub fn read(path: &std::path::Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        let mut f: NodeFile = toml::from_str(&text)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        f.key = base.join(&f.key);
        f.data_dir = base.join(&f.data_dir);
        f.onnxruntime_lib = f.onnxruntime_lib.map(|p| base.join(p));
        f.gpu.onnxruntime_lib = f.gpu.onnxruntime_lib.map(|p| base.join(p));
        Ok(f)
    }

    /// The agent configuration, with the key already read.
    pub fn into_config(self, key: SecretKey) -> Result<NodeConfig, NodeError> {
        let pool = self
            .pool
            .ok_or_else(|| NodeError::Config("no pool address (`pool` / --pool)".into()))?;
        let pool_key = self
            .pool_key
            .ok_or_else(|| NodeError::Config("no pool key (`pool_key` / --pool-key)".into()))?;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let slots = self.slots.unwrap_or(cores);
        if slots == 0 || slots > 1024 {
            return Err(NodeError::Config(format!(
                "slots = {slots} is outside 1..=1024"
            )));
        }
        if self.llm_threads == 0 || self.llm_threads > 256 {
            return Err(NodeError::Config(format!(
                "llm_threads = {} is outside 1..=256",
                self.llm_threads
            )));
        }
        if self.memory_mib < 16 {
            return Err(NodeError::Config(format!(
                "memory_mib = {} is below 16",
                self.memory_mib
            )));
        }
        let gpu = if self.gpu.enabled {
            if self.gpu.memory_mib == Some(0) {
                return Err(NodeError::Config("[gpu] memory_mib = 0".into()));
            }
            Some(crate::gpu::GpuChoice {
                device: self.gpu.device,
                name: self.gpu.name.clone(),
                memory_mib: self.gpu.memory_mib,
                onnxruntime_lib: match &self.gpu.onnxruntime_lib {
                    Some(p) => p.clone(),
                    None => catalogue_path("onnxruntime-gpu-lib")?,
                },
                fallback: self.gpu.fallback,
            })
        } else {
            None
        };
        // One ONNX Runtime per process: on a GPU node the GPU build serves
        // CPU-tier onnx tasks too.
        let cpu_ort_lib = match (&gpu, self.onnxruntime_lib) {
            (Some(g), None) => Some(g.onnxruntime_lib.clone()),
            (Some(g), Some(p)) if p != g.onnxruntime_lib => {
                return Err(NodeError::Config(format!(
                    "onnxruntime_lib = {} but [gpu] onnxruntime_lib = {}: a process loads one ONNX Runtime, and the GPU build runs CPU tasks too (leave onnxruntime_lib out)",
                    p.display(),
                    g.onnxruntime_lib.display()
                )));
            }
            (_, p) => p,
        };
        Ok(NodeConfig {
            pool,
            pool_key,
            key,
            data_dir: self.data_dir,
            slots,
            queue: self.queue,
            memory_mib: self.memory_mib,
            publishers: self.publishers,
            fetch_models: self.fetch_models,
            operator: self.operator,
            hardware: self.hardware,
            onnx: match self.onnx_engine.as_str() {
                "tract" => crate::OnnxEngine::Tract,
                "onnxruntime" => crate::OnnxEngine::OnnxRuntime {
                    library: match cpu_ort_lib {
                        Some(p) => p,
                        None => catalogue_path("onnxruntime-lib")?,
                    },
                    fallback: self.onnxruntime_fallback,
                },
                other => {
                    return Err(NodeError::Config(format!(
                        "onnx_engine = {other:?} is not \"tract\" or \"onnxruntime\""
                    )))
                }
            },
            llm_threads: self.llm_threads,
            gpu,
            tamper: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_defaults_and_required_fields() {
        let d = NodeFile::default();
        assert_eq!(
            (d.memory_mib, d.fetch_models, d.slots, d.queue),
            (1024, true, None, None)
        );
        let key = SecretKey::from_seed(tidepool_proto::KeyRole::Node, &[2; 32]);
        let err = d.clone().into_config(key.clone()).expect_err("no pool");
        assert!(err.to_string().contains("no pool address"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "pool = \"127.0.0.1:7070\"\npool_key = \"{}\"\nslots = 3\nqueue = 0\n",
                key.public()
            ),
        )
        .expect("write");
        let f = NodeFile::read(&path).expect("read");
        assert_eq!(
            f.data_dir,
            dir.path().join("node-data"),
            "relative to the file"
        );
        let cfg = f.into_config(key.clone()).expect("config");
        assert_eq!((cfg.slots, cfg.queue), (3, Some(0)));

        std::fs::write(&path, "slots = \"many\"\n").expect("write");
        let err = NodeFile::read(&path).expect_err("bad type").to_string();
        assert!(err.contains("node.toml") && err.contains("slots"), "{err}");

        // The onnx engine: tract by default, ONNX Runtime with the
        // catalogue's library unless told otherwise, anything else refused.
        let pool = "pool = \"127.0.0.1:7070\"\npool_key = \"ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n";
        let with = |extra: &str| {
            std::fs::write(&path, format!("{pool}{extra}")).expect("write");
            NodeFile::read(&path)
                .expect("read")
                .into_config(key.clone())
        };
        assert_eq!(with("").expect("config").onnx, crate::OnnxEngine::Tract);
        match with("onnx_engine = \"onnxruntime\"\n")
            .expect("config")
            .onnx
        {
            crate::OnnxEngine::OnnxRuntime { library, fallback } => {
                assert!(library.ends_with("libonnxruntime.so.1.31.1"), "{library:?}");
                assert!(!fallback);
            }
            other => panic!("{other:?}"),
        }
        let err = with("onnx_engine = \"tensorrt\"\n").expect_err("unknown engine");
        assert!(err.to_string().contains("\"tensorrt\" is not"), "{err}");
    }
}
