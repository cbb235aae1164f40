//! Pipelines: stages of signed bundles over a batch of text items, run on
//! the pool as batch jobs (issue #6).
//!
//! - [`manifest`]: the authored `pipeline.toml` and its checks.
//! - [`feed`]: items from a JSONL feed, a folder of text files or fortune
//!   files, with malformed items rejected (never dropped silently).
//! - [`run`]: the run as a state machine (sans-IO): which inputs to submit
//!   next, what a finished task means for its items, the report.
//! - [`drive`]: the thin async shell that publishes the stages' bundles,
//!   submits through a [`crate::client::PoolClient`] and polls results.
//! - [`report`]: the digest a run writes (JSON and Markdown).
//!
//! A pipeline never runs guest code itself and keeps no state of its own
//! between runs: the pool's result cache is what makes a second run over
//! the same items compute nothing.

pub mod drive;
pub mod feed;
pub mod manifest;
pub mod report;
pub mod run;

pub use drive::{publish_stages, run_pipeline, Figures, PipelineError, Progress, StageFigures};
pub use feed::{read_feed, Item, Rejected};
pub use manifest::{ManifestError, Over, PipelineManifest, StageManifest};
pub use report::Report;
pub use run::Run;
