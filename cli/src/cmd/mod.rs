//! One module per verb.
pub mod bundle;
pub mod canary;
pub mod challenge;
pub mod common;
pub mod completions;
pub mod demo;
pub mod job;
pub mod keygen;
pub mod ledger;
pub mod models;
pub mod node;
pub mod pipeline;
pub mod pool;
pub mod replay;
pub mod run;
