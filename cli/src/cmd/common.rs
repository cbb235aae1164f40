//! Helpers shared by verbs: key files, pool connection arguments, the runtime.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidepool_client::PoolClient;
use tidepool_proto::{PublicKey, SecretKey};

/// Read a key file written by `tidepool keygen`.
pub fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    SecretKey::from_text(&text).with_context(|| format!("key file {}", path.display()))
}

/// How to reach a pool as a client.
#[derive(clap::Args, Debug)]
pub struct PoolArgs {
    /// The pool's address (HOST:PORT).
    #[arg(long, env = "TIDEPOOL_POOL")]
    pub pool: SocketAddr,
    /// The pool's public key (ed25519:...).
    #[arg(long, env = "TIDEPOOL_POOL_KEY")]
    pub pool_key: PublicKey,
    /// Your key file (a publisher or client key the pool knows).
    #[arg(long, env = "TIDEPOOL_KEY")]
    pub key: PathBuf,
}

impl PoolArgs {
    /// Connect.
    pub async fn connect(&self) -> anyhow::Result<PoolClient> {
        let key = read_key(&self.key)?;
        PoolClient::connect(self.pool, &key, self.pool_key)
            .await
            .with_context(|| format!("pool at {}", self.pool))
    }
}

impl PoolArgs {
    /// Connect, run `f` with the client, close politely.
    pub fn call<T, Fut>(&self, f: impl FnOnce(Arc<PoolClient>) -> Fut) -> anyhow::Result<T>
    where
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        runtime()?.block_on(async {
            let client = Arc::new(self.connect().await?);
            let out = f(client.clone()).await;
            if let Ok(c) = Arc::try_unwrap(client) {
                c.close().await;
            }
            out
        })
    }
}

/// A multi-threaded tokio runtime for network verbs.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
