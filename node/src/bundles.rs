//! Bundle admission and blob fetching: a bundle's signed manifest is
//! checked (`tidepool_proto::manifest::admit`) and every blob hashed before
//! anything from it is compiled; refusals are remembered so a bad bundle is
//! not fetched again for every task.

use crate::agent::Ctx;
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

/// The sandbox a node runs a bundle's tasks in: the manifest's models
/// (each file found by `model_file`) on `engines`, the manifest's limits
/// with memory capped at `memory_mib`, `slots` tasks at once, virtual
/// clocks and seeded randomness. Shared by the agent and `tidepool replay`,
/// so a replay runs a task exactly as a node does.
pub fn bundle_sandbox(
    manifest: &LockedManifest,
    engines: Vec<Arc<dyn tidepool_host::backend::NnEngine>>,
    model_file: &dyn Fn(&tidepool_proto::manifest::BlobRef) -> std::path::PathBuf,
    memory_mib: u32,
    slots: u32,
    cache_dir: Option<std::path::PathBuf>,
    nn: tidepool_host::NnLimits,
) -> Result<Sandbox, String> {
    let mut reg = RegistryBuilder::new(engines);
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
            &|m| self.blobs.path(&m.sha256),
            self.memory_mib,
            self.slots,
            Some(self.compiled.clone()),
            self.nn,
        )?;
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
}
