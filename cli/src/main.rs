//! `tidepool`: the command line for job authors, node owners and pool owners.
//!
//! Each verb lives in its own file under `cmd/` and is a few lines calling a
//! library function. Human output by default, `--json` for scripts.
//! Errors print as one line, `tidepool: error: ...`, with a non-zero exit.

mod cmd;
mod local;
mod runner;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Exit code of a usage error (an unknown flag, a missing argument): the
/// BSD `EX_USAGE`, apart from every code a verb returns.
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tidepool",
    version,
    about = "A WebAssembly-sandboxed runtime for batch AI inference on edge machines",
    after_help = "Exit codes:\n  0   success\n  1   error (bad input, a file or model missing, the pool refused or unreachable)\n  2   `run`: the task was stopped (a limit or a trap); `replay`: the result did not reproduce\n  3   `run`: the job returned an error\n  64  usage error (unknown flag or verb, missing argument)"
)]
struct Cli {
    /// Log lines as text (default) or JSON objects, one per line (also
    /// TIDEPOOL_LOG_FORMAT); TIDEPOOL_LOG sets the filter.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TIDEPOOL_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line (tracing-subscriber's format), for log
    /// collectors.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one task of a job component locally, in the same sandbox nodes use.
    Run(cmd::run::Args),
    /// Fetch, verify and list model files.
    #[command(subcommand)]
    Models(cmd::models::Command),
    /// The aggregator pipeline on real texts, on an embedded pool with local nodes.
    Demo(cmd::demo::Args),
    /// Write a new Ed25519 key (publisher, pool, node or client).
    Keygen(cmd::keygen::Args),
    /// Pack, sign, verify and publish job bundles.
    #[command(subcommand)]
    Bundle(cmd::bundle::Command),
    /// Run a pool, show its status, export its ledger.
    #[command(subcommand)]
    Pool(cmd::pool::Command),
    /// Run a node, or read what it earned.
    #[command(subcommand)]
    Node(cmd::node::Command),
    /// Submit batches and read their results.
    #[command(subcommand)]
    Job(cmd::job::Command),
    /// Check and run pipelines of stages over a feed of items.
    #[command(subcommand)]
    Pipeline(cmd::pipeline::Command),
    /// Run an exported result again in the node sandbox: does it reproduce?
    Replay(cmd::replay::Args),
    /// Check settlement statements offline.
    #[command(subcommand)]
    Ledger(cmd::ledger::Command),
    /// Print a shell completion script (e.g. `tidepool completions bash > /etc/bash_completion.d/tidepool`).
    Completions(cmd::completions::CompletionsArgs),
    /// Write man pages generated from this CLI (`cargo xtask man`).
    #[command(hide = true)]
    Man(cmd::completions::ManArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print and succeed; anything else is a
            // usage error with a code of its own.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEPOOL_LOG")
        // llama.cpp warns about model quirks at every load; not the user's concern.
        // wasmtime-wasi-nn logs every wasi-nn error a guest causes, unbounded;
        // the host logs the reasons itself, a bounded number per task.
        .unwrap_or_else(|_| "warn,llama-cpp-2=error,wasmtime_wasi_nn=off".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Run(a) => cmd::run::main(a),
        Command::Models(c) => cmd::models::main(c),
        Command::Demo(a) => cmd::demo::main(a),
        Command::Keygen(a) => cmd::keygen::main(a),
        Command::Bundle(c) => cmd::bundle::main(c),
        Command::Pool(c) => cmd::pool::main(c),
        Command::Node(c) => cmd::node::main(c),
        Command::Job(c) => cmd::job::main(c),
        Command::Pipeline(c) => cmd::pipeline::main(c),
        Command::Ledger(c) => cmd::ledger::main(c),
        Command::Replay(a) => cmd::replay::main(a),
        Command::Completions(a) => cmd::completions::completions::<Cli>(a),
        Command::Man(a) => cmd::completions::man::<Cli>(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the layers below put in their messages.
            let msg = format!("{e:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("tidepool: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
