//! Bundle admission and blob fetching: a bundle's signed manifest is
//! checked (`tidepool_proto::manifest::admit`) and every blob hashed before
//! anything from it is compiled; refusals are remembered so a bad bundle is
//! not fetched again for every task.

use crate::agent::Ctx;
use crate::caches::{CacheKind, FileKey};
use std::sync::Arc;
use std::time::Duration;
use tidepool_host::registry::RegistryBuilder;
use tidepool_host::sandbox::{JobComponent, Sandbox, SandboxConfig};
use tidepool_net::{call, read_frame, write_frame};
use tidepool_proto::manifest::{check_blob, Device, LockedManifest, SignedManifest};
use tidepool_proto::wire::{Request, Response};
use tidepool_proto::Digest;
use tracing::{info, warn};

/// A bundle ready to run.
pub(crate) struct Prepared {
    /// Verified manifest.
    pub(crate) manifest: LockedManifest,
    /// Its digest.
    pub(crate) digest: Digest,
    /// The sandbox for its limits and models.
    pub(crate) sandbox: Arc<Sandbox>,
    /// The compiled component.
    pub(crate) job: JobComponent,
}

/// Why a bundle could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum PrepareError {
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

impl PrepareError {
    /// The failure kind counted in `status.json` and `/metrics`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PrepareError::Transport(_) => "bundle_fetch",
            PrepareError::Refused(_) => "bundle_refused",
            PrepareError::Local(_) => "bundle_local",
        }
    }
}

/// Refusals remembered at most; past it they are forgotten (and a refused
/// bundle is fetched and refused again on its next task).
const MAX_REMEMBERED_REFUSALS: usize = 1024;

/// What a node's sandboxes share whatever the bundle: the node's settings
/// and its loaded models.
#[derive(Debug, Clone, Default)]
pub struct NodeSandboxes {
    /// Memory per task, MiB (a bundle asking for more gets this).
    pub memory_mib: u32,
    /// Tasks at once.
    pub slots: u32,
    /// The compiled-code cache (`None`: compile every time).
    pub cache_dir: Option<std::path::PathBuf>,
    /// What a task may hold and spend in wasi-nn.
    pub nn: tidepool_host::NnLimits,
    /// Models loaded already, one copy each (`None`: each sandbox loads
    /// its own).
    pub shared: Option<Arc<tidepool_host::SharedModels>>,
}

/// The sandbox a node runs a bundle's tasks in: the manifest's models
/// (each file found by `model_file`) on `engines`, the manifest's limits
/// with memory capped at the node's, its slots, virtual clocks and seeded
/// randomness; models already loaded in the node's shared models are
/// taken from there (a node holds one copy of each). Shared by the agent
/// and `tidepool replay`, so a replay runs a task exactly as a node does.
pub fn bundle_sandbox(
    manifest: &LockedManifest,
    engines: Vec<Arc<dyn tidepool_host::backend::NnEngine>>,
    model_file: &dyn Fn(&tidepool_proto::manifest::BlobRef) -> std::path::PathBuf,
    node: &NodeSandboxes,
) -> Result<Sandbox, String> {
    let NodeSandboxes {
        memory_mib,
        slots,
        cache_dir,
        nn,
        shared,
    } = node.clone();
    let mut reg = RegistryBuilder::new(engines);
    if let Some(s) = shared {
        reg = reg.shared(s);
    }
    for (name, m) in &manifest.models {
        reg.add(
            name,
            &m.encoding,
            &model_file(&m.blob),
            &m.blob.sha256.hex(),
        )
        .map_err(|e| format!("model {name}: {e}"))?;
    }
    let memory = manifest.limits.memory_mib.min(memory_mib.max(16));
    let config = SandboxConfig {
        max_memory_bytes: (memory as usize) << 20,
        timeout: Duration::from_millis(manifest.limits.timeout_ms),
        max_output_bytes: (manifest.limits.max_output_kib as usize) << 10,
        fuel: manifest.limits.fuel,
        deterministic: true,
        max_concurrent: slots,
        cache_dir,
        nn,
        ..SandboxConfig::default()
    };
    Sandbox::new(config, reg.build()).map_err(|e| format!("sandbox: {e:#}"))
}

impl Ctx {
    pub(crate) async fn prepare(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        bundle: Digest,
    ) -> Result<Arc<Prepared>, PrepareError> {
        let mut map = self.prepared.lock().await;
        // A bundle some of whose files were evicted is loaded again: its
        // sandbox goes now (with its models in memory).
        for gone in self
            .caches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_evicted()
        {
            map.remove(&gone);
        }
        if map.values().filter(|r| r.is_err()).count() > MAX_REMEMBERED_REFUSALS {
            map.retain(|_, r| r.is_ok());
        }
        if let Some(p) = map.get(&bundle) {
            if p.is_ok() {
                let now = crate::unix_now();
                let stale = self
                    .caches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .touch(&bundle, now);
                crate::caches::touch_files(&self.data_dir, &stale, now);
            }
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
                crate::unix_now(),
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
        let mut named = vec![("component".to_owned(), CacheKind::Blobs, manifest.component)];
        named.extend(
            manifest
                .models
                .iter()
                .map(|(n, m)| (format!("model {n}"), CacheKind::Models, m.blob)),
        );
        self.room_for(bundle, &manifest.name, &named)?;
        for (what, kind, blob) in &named {
            let dir = match kind {
                CacheKind::Models => &self.models,
                _ => &self.blobs,
            };
            self.fetch_blob(conn, dir, what, blob).await?;
            self.caches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    FileKey::blob(*kind, &blob.sha256),
                    blob.size,
                    crate::unix_now(),
                );
        }
        let component = std::fs::read(self.blobs.path(&manifest.component.sha256))
            .map_err(|e| Local(format!("read component: {e}")))?;
        check_blob("component", &manifest.component, &component)
            .map_err(|e| Refused(e.to_string()))?;
        let ctx = self.clone();
        let m = manifest.clone();
        let prepared = tokio::task::spawn_blocking(move || ctx.load(m, bundle, &component))
            .await
            .map_err(|e| Local(format!("loading bundle panicked: {e}")))?
            .map_err(Local)?;
        self.compiled_for(bundle, &manifest.component.sha256);
        self.telemetry.loaded();
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admitted(bundle, &manifest, crate::unix_now());
        Ok(prepared)
    }

    /// Count the compiled code of `component` (written by the sandbox when
    /// it compiled it) as a file of `bundle`, and keep the compiled cache
    /// within its budget.
    fn compiled_for(&self, bundle: Digest, component: &Digest) {
        let prefix = format!("{}-", component.hex());
        let now = crate::unix_now();
        let files: Vec<(FileKey, u64)> = std::fs::read_dir(&self.compiled)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let size = e.metadata().ok()?.len();
                (name.starts_with(&prefix) && name.ends_with(".cwasm")).then_some((
                    FileKey {
                        kind: CacheKind::Compiled,
                        name,
                    },
                    size,
                ))
            })
            .collect();
        {
            let mut book = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            for (k, size) in &files {
                book.insert(k.clone(), *size, now);
            }
            book.uses(bundle, files.into_iter().map(|(k, _)| k));
        }
        self.make_room(CacheKind::Compiled, 0);
    }

    /// Register the files `bundle` runs from, refuse it if its files of one
    /// kind are more than that cache's budget, and make room for what is
    /// not held yet.
    fn room_for(
        &self,
        bundle: Digest,
        name: &str,
        named: &[(String, CacheKind, tidepool_proto::manifest::BlobRef)],
    ) -> Result<(), PrepareError> {
        let mut need: std::collections::BTreeMap<CacheKind, (u64, u64)> = Default::default();
        let mut seen = std::collections::HashSet::new();
        for (_, kind, blob) in named {
            if !seen.insert((*kind, blob.sha256)) {
                continue;
            }
            let dir = match kind {
                CacheKind::Models => &self.models,
                _ => &self.blobs,
            };
            let e = need.entry(*kind).or_default();
            e.0 += blob.size;
            e.1 += blob.size.saturating_sub(dir.held(&blob.sha256));
        }
        let budgets = {
            let mut book = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            book.uses(
                bundle,
                named
                    .iter()
                    .map(|(_, kind, blob)| FileKey::blob(*kind, &blob.sha256)),
            );
            book.budgets()
        };
        for (&kind, &(total, incoming)) in &need {
            if total > budgets.of(kind) {
                return Err(PrepareError::Local(format!(
                    "bundle {name} needs {} MiB in the {kind} cache, more than its budget ([caches] {} = {})",
                    total.div_ceil(1 << 20),
                    kind.setting(),
                    budgets.of(kind) >> 20
                )));
            }
            self.make_room(kind, incoming);
        }
        Ok(())
    }

    async fn fetch_blob(
        &self,
        conn: &quinn::Connection,
        blobs: &tidepool_net::BlobDir,
        what: &str,
        blob: &tidepool_proto::manifest::BlobRef,
    ) -> Result<(), PrepareError> {
        use PrepareError::{Local, Refused, Transport};
        let d = blob.sha256;
        while !blobs.has(&d) {
            let offset = blobs.held(&d);
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
                        match blobs.append(&d, blob.size, offset, &data.0) {
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
        // A model pinned to an engine runs only on that engine.
        for (name, m) in &manifest.models {
            let Some(pin) = &m.engine else { continue };
            let mine = engines
                .iter()
                .find(|e| e.encoding().to_string() == m.encoding)
                .map(|e| e.describe())
                .unwrap_or_default();
            if !tidepool_proto::manifest::engine_fits(Some(pin), &mine) {
                return Err(format!(
                    "bundle {} pins model {name} to {pin:?}; this node runs {mine:?}",
                    manifest.name
                ));
            }
        }
        let sandbox = bundle_sandbox(
            &manifest,
            engines,
            &|m| self.models.path(&m.sha256),
            &NodeSandboxes {
                memory_mib: self.memory_mib,
                slots: self.slots,
                cache_dir: Some(self.compiled.clone()),
                nn: self.nn,
                shared: Some(self.shared_models.clone()),
            },
        )?;
        // The file was checked against the manifest's digest just before:
        // a cached compile is used without hashing it again.
        let job = sandbox
            .load_known(manifest.component.sha256, component)
            .map_err(|e| format!("component: {e}"))?;
        Ok(Arc::new(Prepared {
            manifest,
            digest,
            sandbox: Arc::new(sandbox),
            job,
        }))
    }
}
