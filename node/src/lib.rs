//! The node agent (`tidepool node run`): connects to a pool over QUIC, takes
//! tasks under leases, checks each bundle before running anything from it,
//! runs tasks in the sandbox (`tidepool-host`) and returns results with
//! signed receipts.
//!
//! The protocol decisions (when to ask for work, renew leases, resend
//! results, finish draining) are made by
//! [`NodeSession`](tidepool_proto::session::NodeSession), a state machine
//! without I/O; this crate is the tokio shell around it. Sandbox calls are
//! synchronous and run on blocking threads. It never decides anything the
//! pool decides (who checks what, verdicts) and never runs a bundle it has
//! not admitted.
//!
//! - [`config`]: `node.toml` and the agent's settings.
//! - `bundles` (private): bundle admission and blob fetching. Before a
//!   bundle's first task, the node fetches its signed manifest and refuses
//!   it unless: the signer is a publisher the node owner trusts, the
//!   signature verifies over the exact bytes, it has not expired, its
//!   version is not lower than one seen before from that publisher
//!   (remembered in `versions.json` across restarts), and every blob fetched
//!   hashes to the digest in the manifest. Nothing from a refused bundle is
//!   compiled or instantiated.
//! - `agent` (private): the connection loop and the per-task runner.
//! - [`caches`]: the disk caches (`blobs/`, `models/`, `compiled/`) kept
//!   within their budgets, least recently used first, never a file of a
//!   bundle with a task in flight.
//! - [`state`]: `status.json` (what `tidepool node status` shows) and the
//!   data directory's lock; `tidepool node gc`.
//! - `metrics` (private): the optional `[metrics]` listener.

mod agent;
mod bundles;
pub use bundles::{bundle_sandbox, NodeSandboxes};
pub mod caches;
pub mod config;
mod metrics;
pub mod replay;
pub mod state;

pub use agent::run;
pub use config::{hardware_class, GpuFile, MetricsConfig, NodeConfig, NodeFile, Tamper};

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
    /// Tokens its text generations produced (or accepted, replaying).
    pub generated_tokens: u64,
}

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration.
    #[error("node configuration: {0}")]
    Config(String),
    /// An engine or the GPU could not start.
    #[error("node configuration: {0}")]
    Engine(#[from] tidepool_host::EngineError),
    /// Local storage failed.
    #[error(transparent)]
    Blobs(#[from] tidepool_net::BlobError),
    /// Network set-up failed.
    #[error(transparent)]
    Net(#[from] tidepool_net::NetError),
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
