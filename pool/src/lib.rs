//! The Tidepool pool: takes signed bundles and batches of inputs, keeps them
//! in a durable store, hands tasks to nodes under leases, and accepts each
//! result once, after checking the node's signed receipt.
//!
//! - [`store`]: the durable state behind a trait; SQLite by default.
//! - [`coordinator`]: the scheduling state machine (sans-IO).
//! - [`server`]: the QUIC shell around the coordinator (`pool serve`).
//! - [`verify`]: verification policy, node standing, output comparison.
//!
//! This crate is the server side only: the client, bundle files and
//! pipelines are `tidepool-client`. It never runs guest code.

pub mod config;
pub mod coordinator;
pub mod server;
pub mod store;
pub mod verify;

pub use coordinator::{Admission, Coordinator, PoolConfig, PoolEvent};
pub use store::{Durability, SqliteStore, Store, StoreError};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
