//! `tidepool run`: one task, locally, in the node's sandbox.
//!
//! Exit codes: 0 the job returned an output; 1 bad arguments, models or
//! component; 2 the task was stopped (limit or trap); 3 the job returned an error.

use anyhow::Context;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidepool_host::local::{registry_with, ModelArg};
use tidepool_host::{Sandbox, SandboxConfig, TaskSpec};

#[derive(clap::Args)]
pub struct Args {
    /// The job component (.wasm).
    component: PathBuf,
    /// A model the job may load: NAME (from the models directory), NAME=PATH or NAME=PATH@SHA256.
    #[arg(long = "model", value_name = "NAME[=PATH[@SHA256]]")]
    models: Vec<ModelArg>,
    /// The input: a file, or - for stdin (default: empty input).
    #[arg(long, value_name = "FILE|-")]
    input: Option<String>,
    /// A job parameter, KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// The task id (seeds randomness in deterministic mode).
    #[arg(long, default_value = "local-0")]
    task_id: String,
    /// Time limit per task, seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Memory limit, MiB.
    #[arg(long, default_value_t = 512)]
    max_memory_mib: usize,
    /// Output limit, MiB.
    #[arg(long, default_value_t = 16)]
    max_output_mib: usize,
    /// Meter fuel with this budget (deterministic cost accounting).
    #[arg(long)]
    fuel: Option<u64>,
    /// Threads per text-generation (llama.cpp) call.
    #[arg(long, default_value_t = tidepool_host::DEFAULT_LLM_THREADS)]
    llm_threads: u32,
    /// Print a JSON document with the output and the receipt.
    #[arg(long)]
    json: bool,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

pub fn main(a: Args) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&a.component)
        .with_context(|| format!("cannot read component {}", a.component.display()))?;
    let input = match a.input.as_deref() {
        None => Vec::new(),
        Some("-") => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .context("cannot read stdin")?;
            v
        }
        Some(f) => std::fs::read(f).with_context(|| format!("cannot read input {f}"))?,
    };
    let registry = registry_with(
        &a.models,
        &tidepool_host::models::models_dir(),
        tidepool_host::LlmSettings::alone(a.llm_threads.clamp(1, 256)),
    )?;
    let config = SandboxConfig {
        timeout: Duration::from_secs_f64(a.timeout),
        max_memory_bytes: a.max_memory_mib << 20,
        max_output_bytes: a.max_output_mib << 20,
        fuel: a.fuel,
        max_concurrent: 1,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(config, registry)?;
    let job = sandbox
        .load(&bytes)
        .with_context(|| format!("{}", a.component.display()))?;
    let params: BTreeMap<String, String> = a.params.into_iter().collect();
    let out = match sandbox.run(
        &job,
        TaskSpec {
            shared_batches: false,
            replay: None,
            accept: Default::default(),
            id: &a.task_id,
            params: &params,
            input: &input,
        },
    ) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tidepool: task failed: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if a.json {
        let (output, error) = match &out.result {
            Ok(b) => (Some(String::from_utf8_lossy(b).into_owned()), None),
            Err(f) => (None, Some(f)),
        };
        let doc = serde_json::json!({ "output": output, "error": error, "receipt": out.receipt });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        match &out.result {
            Ok(b) => {
                std::io::stdout().write_all(b)?;
                if !b.ends_with(b"\n") && std::str::from_utf8(b).is_ok() {
                    println!();
                }
                eprintln!(
                    "ok: {} bytes, {} ms, output {}",
                    b.len(),
                    out.receipt.wall_time_us as f64 / 1000.0,
                    out.receipt.output
                );
            }
            Err(f) => eprintln!("job error ({}): {}", f.code, f.message),
        }
    }
    Ok(if out.result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
