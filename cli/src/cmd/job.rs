//! `tidepool job submit|status|results|cancel|forget|challenge`.

use super::common::{runtime, PoolArgs};
use anyhow::Context;
use base64::Engine as _;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidepool_client::bundle::BundleFile;
use tidepool_proto::wire::Outcome;
use tidepool_proto::Digest;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Submit a batch: one task per line of a JSONL file; waits with a progress bar.
    Submit {
        /// The bundle: a signed bundle file, or its digest (sha256:...).
        bundle: String,
        /// Inputs, one JSON value per line.
        #[arg(long)]
        inputs: PathBuf,
        /// Idempotency key (default: digest of bundle and inputs): resubmitting returns the same job.
        #[arg(long)]
        submit_key: Option<String>,
        /// Return after the pool has stored the job, without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Higher is served first (the pool caps what a client may ask for).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i8,
        /// Input bytes per message (smaller on a slow link: less to send
        /// again after an interruption); at most 8 MiB.
        #[arg(long, default_value_t = tidepool_client::SUBMIT_CHUNK_BYTES,
              value_parser = clap::value_parser!(usize))]
        chunk_bytes: usize,
        #[command(flatten)]
        pool: PoolArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A job's progress.
    Status {
        /// Job id.
        job: tidepool_proto::wire::JobId,
        #[command(flatten)]
        pool: PoolArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A job's results in input order: a table, or JSON lines with --json.
    Results {
        /// Job id.
        job: tidepool_proto::wire::JobId,
        #[command(flatten)]
        pool: PoolArgs,
        /// One JSON object per line (outputs that are JSON are embedded, others base64).
        #[arg(long)]
        json: bool,
        /// Also write each done result with its receipt, bundle manifest,
        /// input and transcript to DIR/job-<job>-<index>.json, for `tidepool replay`.
        #[arg(long, value_name = "DIR")]
        export: Option<std::path::PathBuf>,
        /// Write every result as a JSON line to FILE, in input order, as
        /// they are settled, until the job is finished (with a progress
        /// bar). Run again after an interruption, it resumes after the last
        /// complete line. Memory: one page.
        #[arg(long, value_name = "FILE", conflicts_with = "export")]
        out: Option<PathBuf>,
        /// Print results as JSON lines to stdout as they are settled, in
        /// input order, until the job is finished.
        #[arg(long, conflicts_with_all = ["export", "out"])]
        follow: bool,
    },
    /// Stop a job: its waiting tasks are dropped and its running ones
    /// stopped on their nodes (within a heartbeat).
    Cancel {
        /// Job id.
        job: tidepool_proto::wire::JobId,
        #[command(flatten)]
        pool: PoolArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tell the pool you have a finished job's results: it may remove
    /// its inputs and outputs at its next collection (receipts stay).
    Forget {
        /// Job id.
        job: tidepool_proto::wire::JobId,
        #[command(flatten)]
        pool: PoolArgs,
    },
    /// Dispute a result: the pool re-executes the task on another node.
    Challenge(super::challenge::Args),
}

pub fn bundle_digest(s: &str) -> anyhow::Result<Digest> {
    if let Ok(d) = Digest::parse(s) {
        return Ok(d);
    }
    let path = PathBuf::from(s);
    let b = BundleFile::read(&path)?;
    b.signed()
        .map(|m| m.digest())
        .with_context(|| format!("{s}: bundle is not signed"))
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Submit {
            bundle,
            inputs,
            submit_key,
            no_wait,
            priority,
            chunk_bytes,
            pool,
            json,
        } => {
            anyhow::ensure!(
                (1024..=tidepool_client::SUBMIT_CHUNK_BYTES).contains(&chunk_bytes),
                "--chunk-bytes must be between 1024 and {}",
                tidepool_client::SUBMIT_CHUNK_BYTES
            );
            let digest = bundle_digest(&bundle)?;
            // First pass: every line is JSON; count them and make the
            // default key. Nothing is held: the file may be any size.
            let mut count: u64 = 0;
            let mut keyed = tidepool_proto::digest::Hasher::default();
            keyed.update(&digest.0);
            for line in jsonl_inputs(&inputs)? {
                keyed.update(&Digest::of(&line?).0);
                count += 1;
            }
            anyhow::ensure!(count > 0, "{}: no inputs", inputs.display());
            let key = submit_key.unwrap_or_else(|| keyed.finish().hex());
            runtime()?.block_on(async {
                let client = pool.connect().await?;
                // Second pass: sent in chunks as it is read; a run after a
                // lost connection sends only what the pool lacks.
                let bar = upload_bar(count, json)?;
                let lines = jsonl_inputs(&inputs)?.map(|l| {
                    l.map_err(|e| tidepool_client::ClientError::Io {
                        path: inputs.clone(),
                        source: std::io::Error::other(format!("{e:#}")),
                    })
                });
                let (job, tasks) = client
                    .submit_chunked(digest, key, priority, lines, chunk_bytes, |held| {
                        bar.set_position(u64::from(held))
                    })
                    .await?;
                bar.finish_and_clear();
                if !json {
                    eprintln!("job {job}: {tasks} tasks stored by the pool");
                }
                let mut last = client.job_status(job).await?;
                if !no_wait {
                    let bar = indicatif::ProgressBar::new(u64::from(tasks));
                    bar.set_style(indicatif::ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} tasks {msg} [{elapsed}]",
                    )?);
                    loop {
                        last = client.job_status(job).await?;
                        bar.set_position(u64::from(last.done + last.dead));
                        bar.set_message(match &last.waiting {
                            Some(why) => format!("(waiting: {why})"),
                            None => format!("({} running, {} dead)", last.running, last.dead),
                        });
                        if last.finished() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    bar.finish_and_clear();
                }
                if json {
                    println!("{}", serde_json::to_string(&last)?);
                } else {
                    println!("{job}");
                    if !no_wait {
                        eprintln!("job {job}: {} done, {} dead-lettered", last.done, last.dead);
                    }
                }
                client.close().await;
                anyhow::Ok(())
            })?;
        }
        Command::Challenge(a) => super::challenge::main(a)?,
        Command::Forget { job, pool } => {
            pool.call(|c| async move { Ok(c.forget_job(job).await?) })?;
            eprintln!("job {job}: the pool may remove its inputs and outputs");
        }
        Command::Cancel { job, pool, json } => {
            let (waiting, running) = pool.call(|c| async move { Ok(c.cancel_job(job).await?) })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"job": job, "waiting": waiting, "running": running})
                );
            } else {
                println!("job {job}: cancelled {waiting} waiting and {running} running tasks");
            }
        }
        Command::Status { job, pool, json } => {
            let s = pool.call(|c| async move { Ok(c.job_status(job).await?) })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "job {}: {} — {}/{} done ({} from the result cache), {} running, {} dead-lettered",
                    s.job, s.bundle_name, s.done, s.tasks, s.cached, s.running, s.dead
                );
                if let Some(why) = &s.waiting {
                    println!("  waiting: {why}");
                }
            }
        }
        Command::Results {
            job,
            pool,
            out: Some(path),
            ..
        } => {
            let from = resume_point(&path)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let mut sink = std::io::BufWriter::new(file);
            let written = pool.call(|c| async move {
                let total = c.job_status(job).await?.tasks;
                let bar = indicatif::ProgressBar::new(u64::from(total));
                bar.set_style(indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} results written [{elapsed}]",
                )?);
                bar.set_position(u64::from(from));
                let n = stream_results(&c, job, from, &mut sink, &bar).await?;
                bar.finish_and_clear();
                Ok(n)
            })?;
            eprintln!(
                "job {job}: {} results in {} ({written} written now)",
                from + written,
                path.display()
            );
        }
        Command::Results {
            job,
            pool,
            follow: true,
            ..
        } => {
            pool.call(|c| async move {
                let mut out = std::io::stdout().lock();
                stream_results(&c, job, 0, &mut out, &indicatif::ProgressBar::hidden()).await?;
                Ok(())
            })?;
        }
        Command::Results {
            job,
            pool,
            json,
            export,
            ..
        } => {
            let records = pool.call(|c| async move {
                let records = c.job_results(job).await?;
                if let Some(dir) = &export {
                    export_replays(&c, job, &records, dir).await?;
                }
                Ok(records)
            })?;
            let mut out = std::io::stdout().lock();
            if !json {
                let _ = writeln!(
                    out,
                    "{:>6} {:>7} {:<7} {:>3} {:<9} {:<10} result",
                    "index", "task", "state", "try", "node", "checked"
                );
                for r in records {
                    let result = match &r.outcome {
                        Some(Outcome::Output(b)) => {
                            let text = String::from_utf8_lossy(&b.0);
                            let mut t: String = text.chars().take(60).collect();
                            if text.chars().count() > 60 {
                                t.push('…');
                            }
                            format!("{} bytes: {t}", b.0.len())
                        }
                        Some(Outcome::JobError { code, message }) => {
                            format!("job error {code}: {message}")
                        }
                        Some(Outcome::Failed { reason }) => format!("failed: {reason}"),
                        None => r.reasons.last().cloned().unwrap_or_default(),
                    };
                    let node = r.node.map(|k| k.short()).unwrap_or_default();
                    let result = match r.cached_from {
                        Some(t) => format!("{result} (cached: result of task {t})"),
                        None => result,
                    };
                    if writeln!(
                        out,
                        "{:>6} {:>7} {:<7} {:>3} {:<9} {:<10} {result}",
                        r.index, r.task, r.state, r.attempts, node, r.verification
                    )
                    .is_err()
                    {
                        break;
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            for r in records {
                let line = record_json(r);
                // A closed pipe (`| head`) ends the listing quietly.
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Write every done result of `job` as a replay file in `dir`.
async fn export_replays(
    c: &tidepool_client::PoolClient,
    job: tidepool_proto::wire::JobId,
    records: &[tidepool_proto::wire::TaskRecord],
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let done: Vec<u32> = records
        .iter()
        .filter(|r| r.state == tidepool_proto::wire::TaskState::Done)
        .map(|r| r.index)
        .collect();
    let bar = indicatif::ProgressBar::new(done.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("exporting [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    for index in done {
        let r = c
            .replayable(job, index)
            .await
            .with_context(|| format!("job {job} input {index}"))?;
        let path = dir.join(format!("job-{}-{index}.json", job.0));
        let text = serde_json::to_vec_pretty(&tidepool_proto::replay::ReplayFile::new(&r))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The inputs of a JSONL file, read lazily: each non-blank line, checked
/// to be JSON (an error names the file and line).
fn jsonl_inputs(
    path: &std::path::Path,
) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Vec<u8>>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let path = path.to_owned();
    Ok(std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter_map(move |(i, line)| {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    return Some(Err(anyhow::Error::new(e).context(format!(
                        "{}: line {}",
                        path.display(),
                        i + 1
                    ))))
                }
            };
            if line.trim().is_empty() {
                return None;
            }
            let max = tidepool_proto::wire::MAX_ITEM_BYTES;
            if line.len() > max {
                return Some(Err(anyhow::anyhow!(
                    "{}: line {} is {} bytes, over the largest input a task may take ({max} bytes)",
                    path.display(),
                    i + 1,
                    line.len()
                )));
            }
            Some(
                serde_json::from_str::<serde_json::Value>(&line)
                    .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))
                    .map(|_| line.into_bytes()),
            )
        }))
}

/// The upload's progress bar (hidden for `--json`).
fn upload_bar(inputs: u64, json: bool) -> anyhow::Result<indicatif::ProgressBar> {
    if json {
        return Ok(indicatif::ProgressBar::hidden());
    }
    let bar = indicatif::ProgressBar::new(inputs);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} inputs sent [{elapsed}]",
    )?);
    Ok(bar)
}

/// A task record as one JSON line: outputs that are JSON embedded, others
/// base64.
fn record_json(r: tidepool_proto::wire::TaskRecord) -> serde_json::Value {
    let mut line = serde_json::json!({
        "index": r.index, "task": r.task, "state": r.state, "attempts": r.attempts,
        "node": r.node.map(|k| k.to_string()),
    });
    match r.outcome {
        Some(Outcome::Output(b)) => match serde_json::from_slice::<serde_json::Value>(&b.0) {
            Ok(v) => line["output"] = v,
            Err(_) => {
                line["output_base64"] = base64::engine::general_purpose::STANDARD
                    .encode(&b.0)
                    .into()
            }
        },
        Some(Outcome::JobError { code, message }) => {
            line["error"] = serde_json::json!({ "code": code, "message": message })
        }
        Some(Outcome::Failed { reason }) => line["failed"] = reason.into(),
        None => {}
    }
    if !r.reasons.is_empty() {
        line["reasons"] = r.reasons.into();
    }
    if let Some(t) = r.cached_from {
        line["cached_from"] = t.0.into();
    }
    if !r.verification.is_empty() {
        line["verification"] = r.verification.into();
    }
    if let Some(c) = r.challenge {
        line["challenge"] = c.as_str().into();
    }
    line
}

/// Write `job`'s records from index `from` to `sink` as JSON lines, in
/// input order, each once it is settled (done or dead), until the job is
/// finished; flushes after each page. Returns how many were written.
async fn stream_results(
    c: &tidepool_client::PoolClient,
    job: tidepool_proto::wire::JobId,
    from: u32,
    sink: &mut dyn Write,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<u32> {
    use tidepool_proto::wire::TaskState;
    let mut next = from;
    loop {
        let page = c.results_page(job, next).await?;
        let before = next;
        for r in page {
            if r.index != next || !matches!(r.state, TaskState::Done | TaskState::Dead) {
                break;
            }
            writeln!(sink, "{}", record_json(r))?;
            next += 1;
        }
        sink.flush()?;
        bar.set_position(u64::from(next));
        if next == before {
            let s = c.job_status(job).await?;
            bar.set_length(u64::from(s.tasks));
            if s.finished() && next >= s.tasks {
                return Ok(next - from);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Where writing results to `path` resumes: after its last complete line
/// (a partial last line, from an interrupted run, is cut off). Each line
/// must be the record of the index it stands at.
fn resume_point(path: &std::path::Path) -> anyhow::Result<u32> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut count: u32 = 0;
    for (i, line) in bytes[..complete].split(|b| *b == b'\n').enumerate() {
        if i as u64 == u64::from(count) && line.is_empty() {
            break; // the split after the last newline
        }
        let v: serde_json::Value = serde_json::from_slice(line)
            .with_context(|| format!("{}: line {} is not a result", path.display(), i + 1))?;
        anyhow::ensure!(
            v["index"] == serde_json::json!(count),
            "{}: line {} is not the result of input {count}; not a file this job wrote",
            path.display(),
            i + 1
        );
        count += 1;
    }
    if complete < bytes.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.set_len(complete as u64)
            .with_context(|| format!("cannot cut the partial line of {}", path.display()))?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line larger than a task may take is refused with its file and
    /// line when the batch is read (before anything is sent).
    #[test]
    fn a_line_over_the_largest_item_is_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("batch.jsonl");
        let big = format!("\"{}\"", "x".repeat(tidepool_proto::wire::MAX_ITEM_BYTES));
        std::fs::write(&path, format!("{{\"a\": 1}}\n\n{big}\n"))?;
        let read: Vec<_> = jsonl_inputs(&path)?.collect();
        assert_eq!(read.len(), 2);
        assert!(
            matches!(&read[0], Ok(l) if l == b"{\"a\": 1}"),
            "{:?}",
            read[0]
        );
        let err = read[1].as_ref().expect_err("refused").to_string();
        assert!(
            err.contains("batch.jsonl: line 3 is 16777218 bytes, over the largest"),
            "{err}"
        );
        Ok(())
    }
}
