//! Pool throughput (issue #3): tasks per second through a pool and four
//! nodes on loopback QUIC, trivial job (echo), with real signatures, real
//! SQLite commits and a fresh sandbox instance per task; beside it, the same
//! trivial job through Celery + Redis and through Ray (issue #18) on the
//! same machine, run in the same benchmark invocation.
//!
//! Run: `cargo xtask bench` (installs redis-server and a venv with Celery
//! and Ray first).
//! Without `--bench` (as in `cargo test --all-targets`) it runs a small smoke
//! batch through the pool only. `BENCH_SLOTS` / `BENCH_QUEUE` change the
//! nodes' slots (default 8) and queued leases (default = slots) to explore;
//! the figures in BENCHMARKS.md use the defaults.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidepool_bench::cpu_time;
use tidepool_tests::cluster::*;

async fn tidepool(n: usize, nodes: u8) -> anyhow::Result<(f64, f64, Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(90);
    let mut cfg = test_pool_config(&keys);
    cfg.max_grant = 256;
    cfg.lease_ttl = Duration::from_secs(30);
    cfg.heartbeat = Duration::from_secs(5);
    // Steady state: nodes long trusted (0.01% of results re-executed; the
    // cost of verification is measured in benches/verification.rs).
    cfg.verify.initial_reputation = 0;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let handles: Vec<_> = (0..nodes)
        .map(|i| {
            let mut c = node_config(dir.path(), &keys, i, pool.addr);
            let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
            c.slots = env("BENCH_SLOTS").unwrap_or(8);
            c.queue = env("BENCH_QUEUE");
            start_node(c)
        })
        .collect();
    // Warm-up: every node fetches and compiles the bundle.
    let (job, _) = client
        .submit(
            digest,
            (0..200).map(|i| format!("warm {i}").into_bytes()).collect(),
            "warm".into(),
        )
        .await?;
    wait_job(&client, job, Duration::from_secs(120)).await?;

    let inputs: Vec<Vec<u8>> = (0..n).map(|i| format!("input {i}").into_bytes()).collect();
    let cpu0 = cpu_time();
    let start = Instant::now();
    let mut jobs = Vec::new();
    for (k, chunk) in inputs.chunks(5000).enumerate() {
        jobs.push(
            client
                .submit(digest, chunk.to_vec(), format!("bench-{k}"))
                .await?
                .0,
        );
    }
    for job in jobs {
        loop {
            let s = client.job_status(job).await?;
            if s.done + s.dead == s.tasks {
                anyhow::ensure!(s.dead == 0, "dead tasks: {s:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);

    // Result cache: one already-computed input submitted again, answered at
    // once; beside it, one new input submitted and waited for (computed).
    let reps = if n > 1000 { 200 } else { 5 };
    let mut hits = Vec::new();
    let mut misses = Vec::new();
    for (i, input) in inputs.iter().enumerate().take(reps) {
        let t = Instant::now();
        let (job, _) = client
            .submit(digest, vec![input.clone()], format!("hit-{i}"))
            .await?;
        let s = client.job_status(job).await?;
        anyhow::ensure!(s.cached == 1, "expected a cache hit: {s:?}");
        hits.push(t.elapsed());
        let t = Instant::now();
        let (job, _) = client
            .submit(
                digest,
                vec![format!("new {i}").into_bytes()],
                format!("miss-{i}"),
            )
            .await?;
        loop {
            let s = client.job_status(job).await?;
            if s.done == 1 {
                break;
            }
        }
        misses.push(t.elapsed());
    }
    hits.sort();
    misses.sort();
    let (hit_p50, miss_p50) = (hits[hits.len() / 2], misses[misses.len() / 2]);
    for h in handles {
        let r = h.drain().await?;
        eprintln!("node: {r:?}");
    }
    client.close().await;
    pool.shutdown().await;
    Ok((
        n as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64,
        hit_p50,
        miss_p50,
    ))
}

/// Celery + Redis baseline: `None` when not set up.
fn celery(n: usize, workers: u8) -> anyhow::Result<Option<f64>> {
    let Some(python) = std::env::var_os("TIDEPOOL_BENCH_PYTHON") else {
        eprintln!(
            "celery baseline skipped: TIDEPOOL_BENCH_PYTHON not set (run `cargo xtask bench`)"
        );
        return Ok(None);
    };
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("celery");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("redis://127.0.0.1:{port}/0");
    let celery_bin = std::path::Path::new(&python).with_file_name("celery");
    let mut worker = Command::new(celery_bin)
        .current_dir(&here)
        .env("BENCH_REDIS", &url)
        .args([
            "-A",
            "tasks",
            "worker",
            "--loglevel=WARNING",
            "--pool=prefork",
        ])
        .arg(format!("--concurrency={workers}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    let out = Command::new(&python)
        .current_dir(&here)
        .env("BENCH_REDIS", &url)
        .arg("client.py")
        .arg(n.to_string())
        .output()?;
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = redis.kill();
    let _ = redis.wait();
    baseline_rate("celery client", n, &out).map(Some)
}

/// Tasks per second from a baseline script's output (`"N seconds"` on
/// stdout), or its failure with its stderr.
fn baseline_rate(what: &str, n: usize, out: &std::process::Output) -> anyhow::Result<f64> {
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(n as f64 / secs)
}

/// Ray baseline (`bench/ray/run.py`: a local Ray with 4 CPUs, no-op tasks):
/// `None` when not set up.
fn ray(n: usize) -> anyhow::Result<Option<f64>> {
    let Some(python) = std::env::var_os("TIDEPOOL_BENCH_PYTHON") else {
        eprintln!("ray baseline skipped: TIDEPOOL_BENCH_PYTHON not set (run `cargo xtask bench`)");
        return Ok(None);
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ray/run.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(n.to_string())
        .output()?;
    baseline_rate("ray baseline", n, &out).map(Some)
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 20_000 } else { 300 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (tp_rate, cpu_us, hit, miss) = rt.block_on(tidepool(n, 4))?;
    let base = if full { celery(n, 4)? } else { None };
    let ray_rate = if full { ray(n)? } else { None };
    println!("| what | measured | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    let what = format!("| {n} echo tasks, pool + 4 nodes on loopback QUIC | {tp_rate:.0} tasks/s, {cpu_us:.0} µs CPU/task");
    for (name, rate) in [
        ("Celery + Redis, 4 prefork workers", base),
        ("Ray, `ray.init(num_cpus=4)`, no-op tasks", ray_rate),
    ] {
        match rate {
            Some(r) => println!("{what} | {name}: {r:.0} tasks/s | {:.1}x |", tp_rate / r),
            None => println!("{what} | {name}: (not run) | |"),
        }
    }
    println!(
        "| repeated (bundle, input), client submit → status, p50 | cache hit: {:.0} µs | new input computed by a node: {:.0} µs | {:.1}x faster |",
        hit.as_secs_f64() * 1e6,
        miss.as_secs_f64() * 1e6,
        miss.as_secs_f64() / hit.as_secs_f64()
    );
    Ok(())
}
