//! `tidepool node run`: run a node until SIGTERM, then drain.

use crate::cmd::common::{armed_stop_signal, notify_systemd, read_key, runtime};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_node::{run, NodeFile};
use tidepool_proto::PublicKey;

#[derive(clap::Args)]
pub struct RunArgs {
    /// A node.toml (see the documented defaults in `tidepool_node::NodeFile`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The pool's address (overrides the file).
    #[arg(long)]
    pool: Option<SocketAddr>,
    /// The pool's public key (overrides the file).
    #[arg(long)]
    pool_key: Option<PublicKey>,
    /// This node's key file (overrides the file).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Data directory (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A publisher whose bundles may run here (repeatable; adds to the file's).
    #[arg(long = "publisher")]
    publishers: Vec<PublicKey>,
    /// Tasks at once (overrides the file).
    #[arg(long)]
    slots: Option<u32>,
    /// Leases held waiting beyond the slots (overrides the file; default = slots).
    #[arg(long)]
    queue: Option<u32>,
    /// Memory per task in MiB (overrides the file).
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Engine for onnx models: `tract` (default) or `onnxruntime` (overrides the file).
    #[arg(long)]
    onnx_engine: Option<String>,
    /// ONNX Runtime shared library (default: the fetched `onnxruntime-lib`).
    #[arg(long)]
    onnxruntime_lib: Option<std::path::PathBuf>,
    /// Run tract when ONNX Runtime cannot be used, instead of refusing to start.
    #[arg(long)]
    onnxruntime_fallback: bool,
    /// Threads per llama.cpp (text generation) context (overrides the file).
    #[arg(long)]
    llm_threads: Option<u32>,
    /// Generations of llm-tier tasks decoded together per model, 1..=64
    /// (1 = each alone; overrides the file).
    #[arg(long)]
    llm_batch: Option<u32>,
    /// Serve GPU-tier jobs on this CUDA device (turns on the file's [gpu]).
    #[arg(long)]
    gpu: Option<u32>,
    /// With --gpu: run CPU-only if no GPU engine starts, instead of refusing to start.
    #[arg(long)]
    gpu_fallback: bool,
}

pub fn main(a: RunArgs) -> anyhow::Result<ExitCode> {
    let mut f = match &a.config {
        Some(p) => NodeFile::read(p)?,
        None => NodeFile::default(),
    };
    f.pool = a.pool.or(f.pool);
    f.pool_key = a.pool_key.or(f.pool_key);
    f.key = a.key.unwrap_or(f.key);
    f.data_dir = a.data_dir.unwrap_or(f.data_dir);
    f.publishers.extend(a.publishers);
    f.slots = a.slots.or(f.slots);
    f.queue = a.queue.or(f.queue);
    f.memory_mib = a.memory_mib.unwrap_or(f.memory_mib);
    f.onnx_engine = a.onnx_engine.unwrap_or(f.onnx_engine);
    f.onnxruntime_lib = a.onnxruntime_lib.or(f.onnxruntime_lib);
    f.onnxruntime_fallback |= a.onnxruntime_fallback;
    f.llm_threads = a.llm_threads.unwrap_or(f.llm_threads);
    f.llm_batch = a.llm_batch.unwrap_or(f.llm_batch);
    if let Some(device) = a.gpu {
        f.gpu.enabled = true;
        f.gpu.device = device;
    }
    f.gpu.fallback |= a.gpu_fallback;
    let key = read_key(&f.key)?;
    let cfg = f.into_config(key)?;
    eprintln!(
        "node {} → pool {} ({} slots)",
        cfg.key.public(),
        cfg.pool,
        cfg.slots
    );
    let report = runtime()?.block_on(async {
        let signal = armed_stop_signal();
        let stop = async {
            signal.await;
            notify_systemd("STOPPING=1\nSTATUS=draining: finishing held tasks");
        };
        let node = run(cfg, stop);
        // Ready as soon as the node runs (it connects and reconnects by
        // itself; a pool that is down is not the node's failure).
        notify_systemd("READY=1");
        node.await
    })?;
    eprintln!(
        "drained: {} completed, {} failed, {} accepted, {} rejected, {} connection(s)",
        report.completed, report.failed, report.accepted, report.rejected, report.connections
    );
    Ok(ExitCode::SUCCESS)
}
