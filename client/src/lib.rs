//! A client of a Tidepool pool: everything on the author's and the pool
//! owner's side of the wire that is not the server.
//!
//! - [`bundle`]: bundle files: pack a `tidepool.toml` into a locked manifest,
//!   sign it, verify it.
//! - [`PoolClient`]: publish bundles, submit batches, read status and
//!   results, challenge results and add canaries, over QUIC.
//! - [`pipeline`]: pipelines of stages over a batch of items, run as jobs
//!   through a [`PoolClient`] (ADR 0009).
//!
//! It never runs guest code and never holds pool state: what the pool
//! answered is all it knows.

pub mod bundle;
mod client;
pub mod pipeline;

pub use client::{check_input_size, ClientError, PoolClient, SUBMIT_CHUNK_BYTES};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
