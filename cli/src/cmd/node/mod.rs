//! `tidepool node`: run a node (`run`), see it (`status`), collect its
//! caches (`gc`), and read what it earned (`statement`).

mod gc;
mod run;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_node::NodeFile;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Connect to a pool and run its tasks (SIGTERM drains: finish, return, exit).
    Run(run::RunArgs),
    /// What this node is doing, from its own records: pool, connection,
    /// standing and strikes as the pool last told them, tasks, caches,
    /// bundles (works whether the node runs or not).
    Status(status::Args),
    /// Bring the node's disk caches within their budgets now, least
    /// recently used first (only while the node is stopped; a running node
    /// does this by itself).
    Gc(gc::Args),
    /// This node's results in a period and what they earned, signed by the
    /// pool (read with the node's key; takes no work).
    Statement(super::ledger::StatementArgs),
}

/// Which node: its configuration file and data directory.
#[derive(clap::Args)]
pub struct NodeDir {
    /// The node's node.toml (default: none, every setting at its default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Its data directory (overrides the file; default:
    /// ~/.local/share/tidepool/node).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl NodeDir {
    /// The file's settings with the data directory overridden.
    fn read(&self) -> anyhow::Result<NodeFile> {
        let mut f = match &self.config {
            Some(p) => NodeFile::read(p)?,
            None => NodeFile::default(),
        };
        if let Some(d) = &self.data_dir {
            f.data_dir = d.clone();
        }
        Ok(f)
    }
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Run(a) => run::main(a),
        Command::Status(a) => status::main(a),
        Command::Gc(a) => gc::main(a),
        Command::Statement(a) => super::ledger::statement(a),
    }
}

/// `n` bytes for a person.
fn bytes(n: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if n < 1 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else if n < 1 << 30 {
        format!("{:.1} MiB", n as f64 / MIB)
    } else {
        format!("{:.2} GiB", n as f64 / MIB / 1024.0)
    }
}

/// How long ago Unix time `t` was, for a person.
fn ago(t: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(t);
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}
