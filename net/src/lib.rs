//! QUIC transport for Tidepool: endpoints whose TLS identities are pinned to
//! Ed25519 keys, framed request/response streams, and the content-addressed
//! blob directory that pools serve from and nodes cache into.
//!
//! This crate moves bytes and checks identities; it knows nothing about
//! scheduling or jobs (those are in `tidepool-pool` and `tidepool-host`).

pub mod blobs;
pub mod endpoint;
pub mod frames;
pub mod http;
pub mod tls;

pub use blobs::{BlobDir, BlobError};
pub use endpoint::{
    client, client_bound, connect, peer_key, server, server_with, NetError, ServerLimits,
};
pub use frames::{
    call, read_frame, read_frame_head, read_frame_within, write_frame, FrameHead, StreamError,
};
