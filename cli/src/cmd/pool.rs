//! `tidepool pool serve|status|canary|ledger`.

use super::common::{armed_stop_signal, notify_systemd, read_key, runtime, PoolArgs};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_pool::config::PoolFile;
use tidepool_pool::server::http::HttpConfig;
use tidepool_pool::server::{serve, ServeConfig};
use tidepool_proto::PublicKey;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Run a pool: the QUIC server and its SQLite store.
    Serve(ServeArgs),
    /// Add known-answer tasks (canaries) for a bundle from a trusted job's results.
    Canary(super::canary::Args),
    /// The settlement ledger: what each node earned, signed by the pool.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Remove now the inputs and outputs of finished jobs past the pool's
    /// retention or forgotten by their clients (an admin key; the pool also
    /// does this every `retention.gc_every_secs`).
    Gc {
        #[command(flatten)]
        pool: PoolArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Nodes (with reputation, sampling rate, strikes), queue depth, dead letters and jobs.
    Status {
        #[command(flatten)]
        pool: PoolArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
pub enum LedgerCommand {
    /// Every node's results in a period (credited, pending, disputed,
    /// withdrawn) with metering totals and the receipts behind them, signed
    /// by the pool (needs one of the pool's admin keys; a node reads its
    /// own with `tidepool node statement`).
    Export(super::ledger::ExportArgs),
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
    f.validate()?;
    let http = match &f.http {
        Some(h) => Some(HttpConfig {
            listen: h.listen,
            token: h.token(&f.data_dir)?,
            max_connections: h.max_connections,
        }),
        None => None,
    };
    let cfg = ServeConfig {
        listen: f.listen,
        key: read_key(&f.key)?,
        data_dir: f.data_dir.clone(),
        pool: f.policy(),
        durability: f.durability()?,
        http,
    };
    runtime()?.block_on(async {
        let pool = serve(cfg).await?;
        // One line on stdout for scripts: address and key.
        println!("listening {} {}", pool.addr, pool.key);
        if let Some(addr) = pool.http_addr {
            // On stderr: the first line on stdout stays the one scripts read.
            eprintln!("status page: http://{addr}/?token=<the token in [http] token_file, or <data_dir>/http-token>");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        let signal = armed_stop_signal();
        notify_systemd("READY=1");
        signal.await;
        notify_systemd("STOPPING=1");
        eprintln!("stopping");
        pool.shutdown().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Serve(a) => serve_main(a),
        Command::Canary(a) => {
            super::canary::main(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger(LedgerCommand::Export(a)) => super::ledger::export(a),
        Command::Gc { pool, json } => {
            let (jobs, tasks, bytes) = pool.call(|c| async move { Ok(c.collect().await?) })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"jobs": jobs, "tasks": tasks, "bytes": bytes})
                );
            } else {
                println!(
                    "removed the inputs and outputs of {jobs} jobs ({tasks} tasks, {bytes} bytes)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { pool, json } => {
            let s = pool.call(|c| async move { Ok(c.pool_status().await?) })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "queue: {} queued, {} running, {} done, {} dead-lettered",
                    s.queued, s.leased, s.done, s.dead
                );
                let v = &s.verification;
                println!(
                    "verification: {} re-executions run, {} pending; {} confirmed, {} mismatches, {} replaced, {} canaries",
                    v.executed, v.pending, v.confirmed, v.mismatches, v.replaced, v.canaries
                );
                for why in &s.checks_waiting {
                    println!("  waiting: {why}");
                }
                if s.refusals.is_empty() {
                    println!("refused: nothing");
                } else {
                    println!("refused since start:");
                    for (kind, n) in &s.refusals {
                        println!("  {n:>8}  {kind}");
                    }
                }
                println!(
                    "{:<10} {:<11} {:>7} {:>8} {:>10} {:>8} {:>6} {:>8} {:>7}",
                    "node",
                    "state",
                    "uptime",
                    "running",
                    "completed",
                    "expired",
                    "rep",
                    "sampled",
                    "strikes"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                for n in &s.nodes {
                    let state = if n.banned {
                        "banned".to_owned()
                    } else if n.quarantined_until > now {
                        format!("quarantine {}s", n.quarantined_until - now)
                    } else if n.connected {
                        "connected".to_owned()
                    } else {
                        "gone".to_owned()
                    };
                    let gpu = n
                        .gpu
                        .as_ref()
                        .map(|g| {
                            format!(
                                " gpu: {}, {} MiB ({})",
                                g.name,
                                g.memory_mib,
                                g.encodings.join(", ")
                            )
                        })
                        .unwrap_or_default();
                    println!(
                        "{:<10} {:<11} {:>6.1}% {:>4}/{:<3} {:>10} {:>8} {:>6} {:>7.2}% {:>7}{}{gpu}",
                        n.key.short(),
                        state,
                        n.uptime * 100.0,
                        n.running,
                        n.slots,
                        n.completed,
                        n.expired,
                        n.reputation,
                        n.sampling * 100.0,
                        n.strikes,
                        if n.trusted { " trusted" } else { "" }
                    );
                }
                for j in &s.jobs {
                    println!(
                        "job {}: {} — {}/{} done, {} running, {} dead",
                        j.job, j.bundle_name, j.done, j.tasks, j.running, j.dead
                    );
                    if let Some(why) = &j.waiting {
                        println!("  waiting: {why}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
