//! `tidepool node status`: the node's own view of itself, read from its
//! data directory (`status.json`, the lock, the caches on disk).

use super::{ago, bytes, NodeDir};
use std::process::ExitCode;
use tidepool_node::state::{Link, Tally};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    node: NodeDir,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> anyhow::Result<ExitCode> {
    let f = a.node.read()?;
    let budgets = f.caches.budgets()?;
    let v = tidepool_node::state::status(&f.data_dir, budgets)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(s) = &v.state else {
        println!(
            "no node has run from {} yet (tidepool node run --data-dir, or data_dir in node.toml)",
            v.data_dir.display()
        );
        print_caches(&v.caches);
        return Ok(ExitCode::SUCCESS);
    };
    println!("node      {}", s.node);
    println!("pool      {} ({})", s.pool, s.pool_key);
    let link = match s.link {
        Link::Connecting => "connecting",
        Link::Connected => "connected",
        Link::Draining => "draining",
        Link::Stopped => "stopped",
    };
    if v.running {
        println!(
            "process   running (pid {}, started {}); {link} since {}; report {}",
            s.pid,
            ago(s.started_at),
            ago(s.link_since),
            ago(s.updated_at)
        );
    } else {
        println!("process   not running (last report {})", ago(s.updated_at));
    }
    if let Some(e) = &s.last_error {
        println!("          last connection error: {e}");
    }
    match &s.standing {
        Some(st) => {
            let mut line = format!(
                "standing  reputation {} ({:.2} % of results re-executed), {} confirmed, {} strike(s)",
                st.reputation,
                st.sampling * 100.0,
                st.confirmed,
                st.strikes
            );
            if st.banned {
                line.push_str(", BANNED");
            } else if st.quarantined_until > s.standing_at {
                line.push_str(&format!(
                    ", quarantined for {} s more",
                    st.quarantined_until - s.standing_at
                ));
            }
            println!("{line} (told {})", ago(s.standing_at));
        }
        None => println!("standing  not told yet (the pool says it with its leases)"),
    }
    let tally = |t: &Tally| {
        let mut line = format!(
            "{} completed, {} failed, {} accepted, {} rejected; engines {:.1} s",
            t.completed,
            t.failed,
            t.accepted,
            t.rejected,
            t.engine_us as f64 / 1e6
        );
        if !t.failures.is_empty() {
            let kinds: Vec<String> = t.failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
            line.push_str(&format!(" (failed: {})", kinds.join(", ")));
        }
        line
    };
    println!("tasks     since start: {}", tally(&s.since_start));
    println!("          in all:      {}", tally(&s.total));
    print_caches(&v.caches);
    if s.bundles.is_empty() {
        println!("bundles   none admitted");
    }
    for (i, b) in s.bundles.iter().enumerate() {
        println!(
            "{}{} {}  {}  by {}  {} task(s), last {}",
            if i == 0 { "bundles   " } else { "          " },
            b.name,
            b.version,
            b.digest,
            b.publisher,
            b.tasks,
            ago(b.last_used)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_caches(caches: &[tidepool_node::caches::CacheUse]) {
    for (i, c) in caches.iter().enumerate() {
        println!(
            "{}{:<9} {:>5} file(s) {:>10} of {}",
            if i == 0 { "caches    " } else { "          " },
            c.cache.name(),
            c.files,
            bytes(c.bytes),
            bytes(c.budget)
        );
    }
}
