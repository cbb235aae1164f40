//! Tidepool's data that crosses a trust boundary: receipts now; wire
//! messages, manifests and signing as the pool grows.
//!
//! This crate never does I/O (no files, sockets, clocks or threads), so
//! every type here can be built, serialised and checked anywhere, including
//! in tests with no runtime.

pub mod digest;
pub mod receipt;

pub use digest::Digest;
pub use receipt::{ModelUse, Receipt};
