//! Tidepool's data that crosses a trust boundary: keys and signatures,
//! manifests (authored, locked, signed), receipts, wire messages and their
//! framing, and the session logic of a node as a state machine.
//!
//! This crate never does I/O (no files, sockets, clocks or threads): time is
//! passed in, bytes are passed in and out. So every type here can be built,
//! serialised and checked anywhere, including in tests with no runtime.

pub mod compare;
pub mod digest;
pub mod keys;
pub mod ledger;
pub mod llm;
pub mod manifest;
pub mod receipt;
pub mod replay;
pub mod session;
pub mod wire;

pub use digest::Digest;
pub use keys::{KeyRole, PublicKey, SecretKey, Signature};
pub use receipt::{LeaseReceipt, ModelUse, Receipt, SignedReceipt};
