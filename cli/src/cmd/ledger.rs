//! `tidepool ledger verify`, and the statement output shared with
//! `tidepool pool ledger export` and `tidepool node statement`: a table of
//! totals for people, the signed statement as JSON (what `verify` checks),
//! or its rows as CSV.

use super::common::{read_key, runtime, PoolArgs};
use anyhow::Context;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_proto::ledger::{LedgerQuery, NodeTotals, StatementFile};
use tidepool_proto::PublicKey;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check a statement offline: the pool's signature on every page, every
    /// node's receipt, and that rows and totals are what the pool signed.
    Verify {
        /// A statement written by `pool ledger export --json` or `node statement --json`.
        file: PathBuf,
        /// The pool's public key (without it, the key the file names is checked against itself).
        #[arg(long, env = "TIDEPOOL_POOL_KEY")]
        pool_key: Option<PublicKey>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The period and output of an export or statement.
#[derive(clap::Args)]
pub struct PeriodArgs {
    /// From (Unix seconds or YYYY-MM-DD, UTC; inclusive). Default: the beginning.
    #[arg(long, value_parser = parse_time, default_value = "0")]
    pub since: u64,
    /// Until (Unix seconds or YYYY-MM-DD, UTC; exclusive). Default: now.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<u64>,
    /// Write the signed statement as JSON (what `tidepool ledger verify` checks).
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Write the rows as CSV (one per result; not verifiable on its own).
    #[arg(long)]
    pub csv: bool,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

/// `tidepool pool ledger export`: every node's rows (admins), or one node's.
#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub period: PeriodArgs,
    /// Only this node's results.
    #[arg(long)]
    pub node: Option<PublicKey>,
}

/// `tidepool node statement`: this node's own rows, read with its key.
#[derive(clap::Args)]
pub struct StatementArgs {
    /// The pool's address (HOST:PORT).
    #[arg(long, env = "TIDEPOOL_POOL")]
    pub pool: SocketAddr,
    /// The pool's public key (ed25519:...).
    #[arg(long, env = "TIDEPOOL_POOL_KEY")]
    pub pool_key: PublicKey,
    /// This node's key file.
    #[arg(long, env = "TIDEPOOL_KEY")]
    pub key: PathBuf,
    #[command(flatten)]
    pub period: PeriodArgs,
}

/// Unix seconds, or a UTC date `YYYY-MM-DD` (its midnight).
pub fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let bad = || format!("{s:?} is neither Unix seconds nor a date YYYY-MM-DD");
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (y, m, d): (i64, i64, i64) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // Days since 1970-01-01 of a proleptic Gregorian date.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).map_err(|_| bad())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PeriodArgs {
    fn query(&self, node: Option<PublicKey>) -> LedgerQuery {
        LedgerQuery {
            since: self.since,
            until: self.until.unwrap_or_else(|| now_unix() + 1),
            node,
        }
    }

    /// Write `s` as asked: JSON, CSV, or the totals table.
    fn write(&self, s: &StatementFile) -> anyhow::Result<()> {
        let mut text = Vec::new();
        if self.json {
            serde_json::to_writer_pretty(&mut text, s)?;
            text.push(b'\n');
        } else if self.csv {
            write_csv(&mut text, s)?;
        } else {
            write_table(&mut text, s)?;
        }
        match &self.output {
            Some(path) => std::fs::write(path, &text)
                .with_context(|| format!("writing {}", path.display()))?,
            None => std::io::stdout().write_all(&text)?,
        }
        Ok(())
    }
}

fn progress() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar
}

/// `tidepool pool ledger export`.
pub fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let query = a.period.query(a.node);
    let s = a.pool.call(|c| async move {
        let bar = progress();
        let s = c
            .ledger(query, |n| bar.set_message(format!("{n} rows")))
            .await?;
        bar.finish_and_clear();
        Ok(s)
    })?;
    a.period.write(&s)?;
    Ok(ExitCode::SUCCESS)
}

/// `tidepool node statement`.
pub fn statement(a: StatementArgs) -> anyhow::Result<ExitCode> {
    let key = read_key(&a.key)?;
    let query = a.period.query(Some(key.public()));
    let s = runtime()?.block_on(async {
        let c = tidepool_client::PoolClient::connect_account(a.pool, &key, a.pool_key)
            .await
            .with_context(|| format!("pool at {}", a.pool))?;
        let bar = progress();
        let s = c
            .ledger(query, |n| bar.set_message(format!("{n} rows")))
            .await;
        bar.finish_and_clear();
        c.close().await;
        anyhow::Ok(s?)
    })?;
    a.period.write(&s)?;
    Ok(ExitCode::SUCCESS)
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    let Command::Verify {
        file,
        pool_key,
        json,
    } = c;
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let s: StatementFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a statement file", file.display()))?;
    match s.verify(pool_key.as_ref()) {
        Ok(checked) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "pool": s.pool,
                        "rows": checked.rows.len(),
                        "pages": s.pages.len(),
                        "totals": checked.totals,
                    })
                );
            } else {
                println!(
                    "{}: checks out — {} rows on {} pages signed by pool {}; every receipt \
                     signed by its node; totals add up",
                    file.display(),
                    checked.rows.len(),
                    s.pages.len(),
                    s.pool
                );
                let mut out = Vec::new();
                write_totals(&mut out, &checked.totals)?;
                std::io::stdout().write_all(&out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": e.to_string() })
                );
            } else {
                eprintln!("{}: does not check out: {e}", file.display());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn write_table(out: &mut Vec<u8>, s: &StatementFile) -> std::io::Result<()> {
    writeln!(
        out,
        "statement of pool {} for {}..{} (states as of {}), {} rows",
        s.pool,
        s.since,
        s.until,
        s.as_of,
        s.rows.len()
    )?;
    write_totals(out, &s.totals)
}

fn write_totals(
    out: &mut Vec<u8>,
    totals: &BTreeMap<PublicKey, NodeTotals>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<10} {:>9} {:>8} {:>9} {:>10} {:>12} {:>10} {:>10}",
        "node",
        "credited",
        "pending",
        "disputed",
        "withdrawn",
        "compute ms",
        "tokens in",
        "tokens out"
    )?;
    for (node, t) in totals {
        writeln!(
            out,
            "{:<10} {:>9} {:>8} {:>9} {:>10} {:>12} {:>10} {:>10}",
            node.short(),
            t.credited,
            t.pending,
            t.disputed,
            t.withdrawn,
            t.metering.compute_us / 1000,
            t.metering.tokens_in,
            t.metering.tokens_out
        )?;
    }
    Ok(())
}

fn write_csv(out: &mut Vec<u8>, s: &StatementFile) -> std::io::Result<()> {
    writeln!(
        out,
        "node,job,index,state,at,task,output,bytes_in,bytes_out,computes,compute_us,tensor_bytes_in,tensor_bytes_out,tokens_in,tokens_out"
    )?;
    for r in &s.rows {
        let m = &r.metering;
        // Every field is a key, a number, hex, or a fixed word: no quoting needed.
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.node,
            r.job,
            r.index,
            r.state.as_str(),
            r.at,
            r.task,
            r.output,
            m.bytes_in,
            m.bytes_out,
            m.computes,
            m.compute_us,
            m.tensor_bytes_in,
            m.tensor_bytes_out,
            m.tokens_in,
            m.tokens_out
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_are_unix_seconds_or_utc_dates() {
        assert_eq!(parse_time("17"), Ok(17));
        assert_eq!(parse_time("1970-01-01"), Ok(0));
        assert_eq!(parse_time("2026-12-01"), Ok(1_796_083_200));
        assert_eq!(parse_time("2000-03-01"), Ok(951_868_800));
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
