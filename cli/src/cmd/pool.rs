//! `tidepool pool serve|status`.

use super::common::{read_key, runtime, stop_signal, PoolArgs};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_pool::config::PoolFile;
use tidepool_pool::server::{serve, ServeConfig};
use tidepool_proto::PublicKey;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Run a pool: the QUIC server and its SQLite store.
    Serve(ServeArgs),
    /// Nodes, queue depth, dead letters and jobs.
    Status {
        #[command(flatten)]
        pool: PoolArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A pool.toml (see the documented defaults in `tidepool_pool::config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address (overrides the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Pool key file (overrides the file).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Data directory (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A trusted publisher key (repeatable; adds to the file's).
    #[arg(long = "publisher")]
    publishers: Vec<PublicKey>,
    /// A node allowed to connect (repeatable; none means any node).
    #[arg(long = "allow-node")]
    nodes: Vec<PublicKey>,
    /// Lease length in seconds (overrides the file).
    #[arg(long)]
    lease_ttl_secs: Option<u64>,
    /// Heartbeat period in ms (overrides the file).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
}

fn serve_main(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut f = match &a.config {
        Some(p) => PoolFile::read(p)?,
        None => PoolFile::default(),
    };
    f.listen = a.listen.unwrap_or(f.listen);
    f.key = a.key.unwrap_or(f.key);
    f.data_dir = a.data_dir.unwrap_or(f.data_dir);
    f.publishers.extend(a.publishers);
    f.nodes.extend(a.nodes);
    f.lease_ttl_secs = a.lease_ttl_secs.unwrap_or(f.lease_ttl_secs);
    f.heartbeat_ms = a.heartbeat_ms.unwrap_or(f.heartbeat_ms);
    f.validate().map_err(anyhow::Error::msg)?;
    let cfg = ServeConfig {
        listen: f.listen,
        key: read_key(&f.key)?,
        data_dir: f.data_dir.clone(),
        pool: f.policy(),
        durability: f.durability().map_err(anyhow::Error::msg)?,
    };
    runtime()?.block_on(async {
        let pool = serve(cfg).await?;
        // One line on stdout for scripts: address and key.
        println!("listening {} {}", pool.addr, pool.key);
        use std::io::Write;
        std::io::stdout().flush()?;
        stop_signal().await;
        eprintln!("stopping");
        pool.shutdown().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Serve(a) => serve_main(a),
        Command::Status { pool, json } => {
            let s = pool.call(|c| async move { Ok(c.pool_status().await?) })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "queue: {} queued, {} running, {} done, {} dead-lettered",
                    s.queued, s.leased, s.done, s.dead
                );
                println!(
                    "{:<10} {:<9} {:>7} {:>8} {:>10} {:>8}",
                    "node", "state", "uptime", "running", "completed", "expired"
                );
                for n in &s.nodes {
                    println!(
                        "{:<10} {:<9} {:>6.1}% {:>4}/{:<3} {:>10} {:>8}",
                        n.key.short(),
                        if n.connected { "connected" } else { "gone" },
                        n.uptime * 100.0,
                        n.running,
                        n.slots,
                        n.completed,
                        n.expired
                    );
                }
                for j in &s.jobs {
                    println!(
                        "job {}: {} — {}/{} done, {} running, {} dead",
                        j.job, j.bundle_name, j.done, j.tasks, j.running, j.dead
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
