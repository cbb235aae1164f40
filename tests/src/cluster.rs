//! A pool and nodes on loopback QUIC, in this process: real SQLite file,
//! real keys, real bundles of real guests and models.

use crate::{jobs_dir, model_path};
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidepool_client::bundle::BundleFile;
use tidepool_client::PoolClient;
use tidepool_node::{NodeConfig, NodeReport};
use tidepool_pool::server::{serve, RunningPool, ServeConfig};
use tidepool_pool::{Durability, PoolConfig};
use tidepool_proto::{Digest, KeyRole, PublicKey, SecretKey};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Keys of a test network, fixed per seed so runs are repeatable.
#[derive(Debug)]
pub struct Keys {
    /// Signs bundles; also the client that submits.
    pub publisher: SecretKey,
    /// The pool.
    pub pool: SecretKey,
}

impl Keys {
    /// Keys derived from `seed`.
    pub fn new(seed: u8) -> Self {
        Self {
            publisher: SecretKey::from_seed(KeyRole::Publisher, &[seed; 32]),
            pool: SecretKey::from_seed(KeyRole::Pool, &[seed.wrapping_add(1); 32]),
        }
    }

    /// A node key.
    pub fn node(&self, i: u8) -> SecretKey {
        SecretKey::from_seed(KeyRole::Node, &[i.wrapping_add(100); 32])
    }
}

/// Test pool policy: short leases so expiry is seen quickly.
pub fn test_pool_config(keys: &Keys) -> PoolConfig {
    let mut cfg = PoolConfig {
        lease_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(500),
        retry: Duration::from_millis(50),
        ..PoolConfig::default()
    };
    cfg.publishers.insert(keys.publisher.public());
    cfg
}

/// Start a pool in `dir/pool` with [`test_pool_config`] on a free
/// loopback port.
pub async fn start_test_pool(dir: &Path, keys: &Keys) -> Result<RunningPool> {
    start_pool(
        &dir.join("pool"),
        keys,
        test_pool_config(keys),
        "127.0.0.1:0".parse()?,
    )
    .await
}

/// Start a pool in `dir`.
pub async fn start_pool(
    dir: &Path,
    keys: &Keys,
    cfg: PoolConfig,
    listen: SocketAddr,
) -> Result<RunningPool> {
    Ok(serve(ServeConfig {
        listen,
        key: keys.pool.clone(),
        data_dir: dir.to_owned(),
        pool: cfg,
        durability: Durability::Process,
        http: None,
    })
    .await?)
}

/// Start a pool in `dir` with its HTTP listener on a free loopback port
/// (status page, `/metrics`, health), behind `token`.
pub async fn start_pool_with_http(
    dir: &Path,
    keys: &Keys,
    cfg: PoolConfig,
    token: &str,
) -> Result<RunningPool> {
    Ok(serve(ServeConfig {
        listen: "127.0.0.1:0".parse()?,
        key: keys.pool.clone(),
        data_dir: dir.to_owned(),
        pool: cfg,
        durability: Durability::Process,
        http: Some(tidepool_pool::server::http::HttpConfig {
            listen: "127.0.0.1:0".parse()?,
            token: token.to_owned(),
            max_connections: 8,
        }),
    })
    .await?)
}

/// One HTTP/1.1 GET on a fresh connection: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of head in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// A node running in this process, stopped by [`TestNode::drain`] or killed
/// by [`TestNode::kill`].
#[derive(Debug)]
pub struct TestNode {
    /// The node's key.
    pub key: PublicKey,
    /// Resolving it starts draining.
    drain: Option<oneshot::Sender<()>>,
    /// The agent.
    task: JoinHandle<Result<NodeReport, tidepool_node::NodeError>>,
}

impl TestNode {
    /// Drain and wait for the report.
    pub async fn drain(mut self) -> Result<NodeReport> {
        if let Some(d) = self.drain.take() {
            let _ = d.send(());
        }
        Ok(self.task.await??)
    }

    /// Stop at once, without telling the pool anything (like SIGKILL: held
    /// leases are simply never renewed).
    pub fn kill(self) {
        self.task.abort();
    }
}

/// Node configuration for tests.
pub fn node_config(dir: &Path, keys: &Keys, i: u8, pool: SocketAddr) -> NodeConfig {
    NodeConfig {
        pool,
        pool_key: keys.pool.public(),
        key: keys.node(i),
        data_dir: dir.join(format!("node-{i}")),
        slots: 2,
        queue: None,
        memory_mib: 512,
        publishers: BTreeSet::from([keys.publisher.public()]),
        fetch_models: true,
        operator: None,
        hardware: None,
        onnx: tidepool_host::OnnxEngine::Tract,
        llm_threads: 1,
        llm_batch: 1,
        gpu: None,
        nn: tidepool_host::NnLimits::default(),
        budgets: tidepool_node::caches::Budgets::default(),
        metrics: None,
        tamper: None,
    }
}

/// Start a node.
pub fn start_node(cfg: NodeConfig) -> TestNode {
    let (tx, rx) = oneshot::channel::<()>();
    let key = cfg.key.public();
    let task = tokio::spawn(tidepool_node::run(cfg, async move {
        let _ = rx.await;
    }));
    TestNode {
        key,
        drain: Some(tx),
        task,
    }
}

/// Write a `tidepool.toml` for the embed job into `dir` and pack it.
pub fn embed_bundle(dir: &Path, keys: &Keys, version: &str) -> Result<(PathBuf, BundleFile)> {
    embed_bundle_with(dir, keys, version, "")
}

/// [`embed_bundle`] with extra manifest tables (e.g. `[verification]`).
pub fn embed_bundle_with(
    dir: &Path,
    keys: &Keys,
    version: &str,
    extra: &str,
) -> Result<(PathBuf, BundleFile)> {
    let b = minilm_bundle(dir, keys, "embed", version, 256, extra)?;
    let path = dir.join(format!("embed-{version}.bundle"));
    b.write(&path)?;
    Ok((path, b))
}

/// Write a `tidepool.toml` for the guest `job` (`target/jobs/<job>.wasm`)
/// with the MiniLM model, `memory_mib` and a 20 s timeout, plus `extra`
/// tables, into `dir`; pack it and sign it as the test publisher.
pub fn minilm_bundle(
    dir: &Path,
    keys: &Keys,
    job: &str,
    version: &str,
    memory_mib: u32,
    extra: &str,
) -> Result<BundleFile> {
    let entry = tidepool_host::models::catalog_entry("minilm-l3")?;
    let model = model_path("minilm-l3");
    minilm_bundle_from(
        dir,
        keys,
        (job, job),
        version,
        memory_mib,
        (&model, entry.sha256),
        extra,
    )
}

/// [`minilm_bundle`] with the model file `model` (its path and sha256 in
/// hex) in place of the catalogue's, and `(name, job)`: the bundle's name
/// and the guest it runs.
pub fn minilm_bundle_from(
    dir: &Path,
    keys: &Keys,
    (name, job): (&str, &str),
    version: &str,
    memory_mib: u32,
    model: (&Path, &str),
    extra: &str,
) -> Result<BundleFile> {
    std::fs::create_dir_all(dir)?;
    let manifest = dir.join("tidepool.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\ncomponent = \"{}\"\n\n[models.minilm-l3]\nencoding = \"onnx\"\nsource = \"{}\"\nsha256 = \"{}\"\n\n[limits]\nmemory_mib = {memory_mib}\ntimeout_ms = 20000\n\n{extra}",
            jobs_dir().join(format!("{job}.wasm")).display(),
            model.0.display(),
            model.1,
        ),
    )?;
    let mut b = tidepool_client::bundle::pack(&manifest, keys.publisher.public())?;
    b.sign(&keys.publisher)?;
    Ok(b)
}

/// Write a `tidepool.toml` for the summarize job (Gemma 3 270M, `llm`
/// tier) with `extra` tables, and pack it.
pub fn summarize_bundle(dir: &Path, keys: &Keys, extra: &str) -> Result<BundleFile> {
    std::fs::create_dir_all(dir)?;
    let manifest = dir.join("tidepool.toml");
    let entry = tidepool_host::models::catalog_entry("gemma3-270m")?;
    std::fs::write(
        &manifest,
        format!(
            "name = \"summarize\"\nversion = \"1.0.0\"\ncomponent = \"{}\"\n\n[models.gemma3-270m]\nencoding = \"ggml\"\nsource = \"{}\"\nsha256 = \"{}\"\n\n[limits]\nmemory_mib = 128\ntimeout_ms = 120000\n\n[determinism]\ntier = \"llm\"\n\n{extra}",
            jobs_dir().join("summarize.wasm").display(),
            model_path("gemma3-270m").display(),
            entry.sha256,
        ),
    )?;
    let mut b = tidepool_client::bundle::pack(&manifest, keys.publisher.public())?;
    b.sign(&keys.publisher)?;
    Ok(b)
}

/// Write `key` to `path` as `tidepool keygen` does (private to its owner:
/// the CLI refuses key files others may read).
pub fn write_key_file(path: &Path, key: &SecretKey) -> Result<()> {
    std::fs::write(path, key.to_text())?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

/// Connect as the publisher and publish.
pub async fn publish(
    addr: SocketAddr,
    keys: &Keys,
    bundle: &BundleFile,
) -> Result<(PoolClient, Digest)> {
    let client = PoolClient::connect(addr, &keys.publisher, keys.pool.public())
        .await
        .context("client connect")?;
    let digest = client.publish(bundle, |_| {}).await.context("publish")?;
    Ok((client, digest))
}

/// One embed input per text.
pub fn embed_inputs(texts: &[String]) -> Vec<Vec<u8>> {
    texts
        .iter()
        .map(|t| serde_json::to_vec(&serde_json::json!({ "texts": [t] })).expect("json"))
        .collect()
}

/// Poll a job until it has no open task or `timeout` passes.
pub async fn wait_job(
    client: &PoolClient,
    job: tidepool_proto::wire::JobId,
    timeout: Duration,
) -> Result<tidepool_proto::wire::JobSummary> {
    let start = std::time::Instant::now();
    loop {
        let s = client.job_status(job).await?;
        if s.finished() {
            return Ok(s);
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "job {job} not finished after {timeout:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pack and sign the echo fixture (no models) as bundle `echo`.
pub fn echo_bundle(dir: &Path, keys: &Keys) -> Result<BundleFile> {
    guest_bundle(dir, keys, "echo", "")
}

/// Pack and sign guest `guest` (one that loads no model) as a bundle of
/// the same name, version 1.0.0, 64 MiB and 5 s per task, with `extra`
/// TOML after the limits (`[determinism]`, `[verification]`...).
pub fn guest_bundle(dir: &Path, keys: &Keys, guest: &str, extra: &str) -> Result<BundleFile> {
    guest_bundle_timed(dir, keys, guest, 5000, extra)
}

/// [`guest_bundle`] with `timeout_ms` per task.
pub fn guest_bundle_timed(
    dir: &Path,
    keys: &Keys,
    guest: &str,
    timeout_ms: u64,
    extra: &str,
) -> Result<BundleFile> {
    std::fs::create_dir_all(dir)?;
    let manifest = dir.join("tidepool.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"{guest}\"\nversion = \"1.0.0\"\ncomponent = \"{}\"\n\n[limits]\nmemory_mib = 64\ntimeout_ms = {timeout_ms}\n\n{extra}",
            jobs_dir().join(format!("{guest}.wasm")).display()
        ),
    )?;
    let mut b = tidepool_client::bundle::pack(&manifest, keys.publisher.public())?;
    b.sign(&keys.publisher)?;
    Ok(b)
}

/// What `tidepool run` gives for each input: the embed job and the model in
/// a local sandbox (the reference that pool results must equal).
pub fn local_embed_outputs(inputs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let sb = crate::sandbox(crate::test_config());
    let job = sb.load(&crate::guest("embed")).expect("load embed");
    inputs
        .iter()
        .map(|i| {
            crate::run(&sb, &job, "local", i)
                .expect("run")
                .result
                .expect("embed ok")
        })
        .collect()
}

/// A record's output bytes; panics (with its reasons) if it has none.
pub fn record_output(r: &tidepool_proto::wire::TaskRecord) -> Vec<u8> {
    match &r.outcome {
        Some(tidepool_proto::wire::Outcome::Output(b)) => b.0.clone(),
        other => panic!(
            "task {} has no output: {other:?} ({:?})",
            r.index, r.reasons
        ),
    }
}

/// Every record's output bytes, in order.
pub fn record_outputs(records: &[tidepool_proto::wire::TaskRecord]) -> Vec<Vec<u8>> {
    records.iter().map(record_output).collect()
}

/// The reason the pool closed `conn` with (waiting up to 5 s), or what
/// else happened.
pub async fn closed_reason(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        Ok(other) => format!("{other}"),
        Err(_) => "still open after 5 s".into(),
    }
}
