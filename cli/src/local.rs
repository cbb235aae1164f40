//! An embedded network for `tidepool demo`: a pool (SQLite file in a
//! directory) and local nodes in this process, talking over loopback QUIC
//! with keys generated on first use and kept in the directory, so a
//! second demo in the same directory meets the same pool and its cache.
//!
//! Glue only: the pool, the nodes and the pipeline runner are the same
//! library code `tidepool pool serve`, `tidepool node run` and
//! `tidepool pipeline run` use.

use anyhow::Context;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tidepool_node::{NodeConfig, NodeError, NodeReport};
use tidepool_pool::server::{serve, RunningPool, ServeConfig};
use tidepool_pool::{Durability, PoolConfig};
use tidepool_proto::{KeyRole, SecretKey};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The keys of the embedded network (lives as long as the demo).
pub struct Keys {
    /// Signs the bundles and submits the batches.
    pub publisher: SecretKey,
    /// The pool's identity.
    pub pool: SecretKey,
    /// One per node.
    pub nodes: Vec<SecretKey>,
}

/// Read the key in `dir/NAME.key`, or generate and write it.
fn key(dir: &Path, name: &str, role: KeyRole) -> anyhow::Result<SecretKey> {
    let path = dir.join(format!("{name}.key"));
    if path.exists() {
        return crate::cmd::common::read_key(&path);
    }
    let key = SecretKey::generate(role, &ring::rand::SystemRandom::new())
        .with_context(|| format!("cannot generate the {name} key"))?;
    crate::cmd::common::write_key(&path, &key, false)?;
    Ok(key)
}

impl Keys {
    /// The keys kept in `dir` (throwaway keys made on first use).
    pub fn in_dir(dir: &Path, nodes: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            publisher: key(dir, "publisher", KeyRole::Publisher)?,
            pool: key(dir, "pool", KeyRole::Pool)?,
            nodes: (0..nodes)
                .map(|i| key(dir, &format!("node-{i}"), KeyRole::Node))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// A node agent in this process: the sender that starts its drain, and
/// its task.
type LocalNode = (
    oneshot::Sender<()>,
    JoinHandle<Result<NodeReport, NodeError>>,
);

/// A running embedded network.
pub struct Network {
    /// The pool (stopped by [`Network::stop`]).
    pub pool: RunningPool,
    /// Node agents, each with the sender that starts its drain.
    nodes: Vec<LocalNode>,
}

impl Network {
    /// Start the pool in `dir/pool` and `nodes` nodes (`dir/node-N`), each
    /// with `slots` task slots and these text generation settings. The
    /// nodes are the pool owner's own: listed as trusted, so their results
    /// are sampled at the floor from the start instead of all re-executed —
    /// unless `check_all`, which re-executes every result on the other node
    /// (the nodes never earn standing).
    pub async fn start(
        dir: &Path,
        keys: &Keys,
        slots: u32,
        llm: tidepool_host::LlmSettings,
        check_all: bool,
    ) -> anyhow::Result<Self> {
        let mut policy = PoolConfig::default();
        policy.publishers.insert(keys.publisher.public());
        if check_all {
            policy.verify.step = 0;
        } else {
            policy
                .verify
                .trusted
                .extend(keys.nodes.iter().map(SecretKey::public));
        }
        let pool = serve(ServeConfig {
            listen: "127.0.0.1:0".parse()?,
            key: keys.pool.clone(),
            data_dir: dir.join("pool"),
            pool: policy,
            durability: Durability::Process,
            http: None,
        })
        .await
        .context("cannot start the embedded pool")?;
        let nodes = keys
            .nodes
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let cfg = NodeConfig {
                    pool: pool.addr,
                    pool_key: keys.pool.public(),
                    key: k.clone(),
                    data_dir: dir.join(format!("node-{i}")),
                    slots,
                    queue: None,
                    memory_mib: 1024,
                    publishers: BTreeSet::from([keys.publisher.public()]),
                    fetch_models: true,
                    operator: None,
                    hardware: None,
                    onnx: tidepool_host::OnnxEngine::Tract,
                    llm_threads: llm.threads,
                    llm_batch: llm.batch,
                    gpu: None,
                    nn: tidepool_host::NnLimits::default(),
                    budgets: tidepool_node::caches::Budgets::default(),
                    metrics: None,
                    tamper: None,
                };
                let (tx, rx) = oneshot::channel::<()>();
                let task = tokio::spawn(tidepool_node::run(cfg, async move {
                    let _ = rx.await;
                }));
                (tx, task)
            })
            .collect();
        Ok(Self { pool, nodes })
    }

    /// Drain every node, then stop the pool.
    pub async fn stop(self) -> anyhow::Result<Vec<NodeReport>> {
        let mut reports = Vec::new();
        for (tx, task) in self.nodes {
            let _ = tx.send(());
            reports.push(task.await.context("node task")??);
        }
        self.pool.shutdown().await;
        Ok(reports)
    }
}

/// A fresh directory under the system's temporary directory, kept after
/// the demo so its report can be read.
pub fn fresh_dir() -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("tidepool-demo-{stamp}"))
}
