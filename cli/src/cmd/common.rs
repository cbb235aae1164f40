//! Helpers shared by verbs: key files, pool connection arguments, the runtime.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidepool_client::PoolClient;
use tidepool_proto::{PublicKey, SecretKey};

/// Read a key file written by `tidepool keygen`. On Unix a key file that
/// its group or others may read is refused: a secret key another local user
/// can read is not secret.
pub fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "no key file at {} (make one with `tidepool keygen --role ROLE -o {}`, or pass --key)",
                path.display(),
                path.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read key file {}", path.display()))
            }
        };
        let mode = meta.permissions().mode();
        anyhow::ensure!(
            mode & 0o077 == 0,
            "key file {} may be read by other users (mode {:03o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    SecretKey::from_text(&text).with_context(|| format!("key file {}", path.display()))
}

/// Write `key` to `path`, readable by its owner only (mode 0600 on Unix,
/// also when an existing file is overwritten). Without `overwrite`, an
/// existing file is an error.
pub fn write_key(path: &Path, key: &SecretKey, overwrite: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| {
        format!(
            "cannot create {} (use --force to overwrite)",
            path.display()
        )
    })?;
    // An existing file keeps its mode through `open`: set it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", path.display()))?;
    }
    f.write_all(key.to_text().as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tidepool_proto::KeyRole;

    #[test]
    fn key_files_are_private_and_readable_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        let key = SecretKey::from_seed(KeyRole::Node, &[3; 32]);
        // An existing world-readable file overwritten becomes private.
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(
            write_key(&path, &key, false).is_err(),
            "no overwrite without force"
        );
        write_key(&path, &key, true).expect("overwrite");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_key(&path).expect("read").public(), key.public());
        // A key others may read is refused, with the fix in the message.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = read_key(&path).expect_err("group-readable").to_string();
        assert!(err.contains("chmod 600") && err.contains("640"), "{err}");
    }
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
/// [`stop_signal`] with its handlers installed now rather than when first
/// polled: a service that says it is ready must already handle SIGTERM.
/// Call it inside the runtime.
pub fn armed_stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

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

/// Tell systemd (a `Type=notify` unit) how the service stands: `READY=1`
/// once it serves, `STOPPING=1` when it starts to stop. Does nothing
/// outside systemd (no `NOTIFY_SOCKET`); a failure to tell is only logged.
pub fn notify_systemd(state: &str) {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let path = path.to_string_lossy().into_owned();
        // '@' names a socket in the abstract namespace.
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        };
        let sent = addr.and_then(|a| {
            let s = UnixDatagram::unbound()?;
            s.send_to_addr(state.as_bytes(), &a)
        });
        if let Err(e) = sent {
            eprintln!("tidepool: cannot notify systemd at {path}: {e}");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = state;
}
