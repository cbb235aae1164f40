//! Test helpers shared across the workspace's tests, in one place each:
//!
//! - [`snapshot`]: the runner of snapshot tests (a folder of input files,
//!   each with its `.expected` rendering; `TIDEPOOL_BLESS=1` rewrites them);
//! - [`bundle`]: the signed stand-in bundle coordinator tests publish;
//! - [`fuzz`]: byte mutations of valid encodings and an allocator that
//!   remembers the largest allocation, for the fuzz targets;
//! - [`fake_node`]: what a node sends back for a grant, with a receipt
//!   signed as a real node signs it, for tests that drive the coordinator or
//!   a real pool without running guests.
//!
//! Depends only on `tidepool-proto`, so proto's, the pool's, the client's
//! and the CLI's tests can use it without linking the sandbox. Helpers that
//! need wasmtime, models or real nodes are in `tidepool-tests`.

pub mod bundle;
pub mod fake_node;
pub mod fuzz;
pub mod snapshot;
