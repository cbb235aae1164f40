//! Cost of verification (issue #4): the same batch of real embedding tasks
//! through a pool and two nodes, three ways, side by side in one run:
//!
//! - `none`: no re-execution (`sampling = "none"`), the baseline;
//! - `steady state`: reputation sampling with every node at r = 0
//!   (0.01% of results re-executed);
//! - `2x redundancy`: every result re-executed (`sampling = "always"`).
//!
//! Compute is counted two ways: executions (tasks the nodes ran, exact) and
//! process CPU time (nodes and pool run in this process). Each mode runs
//! twice, interleaved, on a fresh pool (no result cache across runs).
//!
//! Run: `cargo xtask bench` (or `cargo bench -p tidepool-bench --bench
//! verification`). Without `--bench` it runs a small smoke batch.

use std::time::{Duration, Instant};
use tidepool_bench::cpu_time;
use tidepool_tests::cluster::*;
use tidepool_tests::many_texts;

/// Wait until nothing is queued, leased or waiting for a re-execution.
async fn settle(
    client: &tidepool_client::PoolClient,
) -> anyhow::Result<tidepool_proto::wire::PoolSummary> {
    loop {
        let s = client.pool_status().await?;
        if s.verification.pending == 0 && s.queued == 0 && s.leased == 0 {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Run {
    executions: u64,
    wall: Duration,
    cpu: Duration,
    checks: u64,
}

async fn run(sampling: &str, texts: &[String], seed: u8) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(seed);
    let mut cfg = test_pool_config(&keys);
    cfg.verify.initial_reputation = 0;
    cfg.verify.canary_rate = 0.0;
    cfg.lease_ttl = Duration::from_secs(30);
    cfg.heartbeat = Duration::from_secs(5);
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let (_, bundle) = embed_bundle_with(
        &dir.path().join("author"),
        &keys,
        "1.0.0",
        &format!("[verification]\nsampling = \"{sampling}\"\n"),
    )?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let nodes: Vec<_> = (0..2)
        .map(|i| {
            let mut c = node_config(dir.path(), &keys, i, pool.addr);
            c.slots = 1;
            start_node(c)
        })
        .collect();
    // Warm-up: both nodes fetch and compile the bundle (not counted).
    let warm = embed_inputs(&["warm-up one".to_owned(), "warm-up two".to_owned()]);
    let (job, _) = client.submit(digest, warm, "warm".into()).await?;
    wait_job(&client, job, Duration::from_secs(120)).await?;
    let before = settle(&client).await?;
    let executed_before: u64 = before.nodes.iter().map(|n| n.completed).sum();
    let checks_before = before.verification.executed;

    let cpu0 = cpu_time();
    let start = Instant::now();
    let (job, _) = client
        .submit(digest, embed_inputs(texts), "bench".into())
        .await?;
    wait_job(&client, job, Duration::from_secs(3600)).await?;
    let after = settle(&client).await?;
    let wall = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    let executed: u64 = after.nodes.iter().map(|n| n.completed).sum();
    for n in nodes {
        n.drain().await?;
    }
    client.close().await;
    pool.shutdown().await;
    Ok(Run {
        executions: executed - executed_before,
        wall,
        cpu,
        checks: after.verification.executed - checks_before,
    })
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (n, rounds) = if full { (3000, 2) } else { (40, 1) };
    let texts = many_texts(n)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let modes = [
        ("none", "none"),
        ("steady state (r = 0)", "reputation"),
        ("2x redundancy", "always"),
    ];
    let mut results: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (m, (_, sampling)) in modes.iter().enumerate() {
            let r = rt.block_on(run(sampling, &texts, 120 + round * 3 + m as u8))?;
            eprintln!(
                "round {round} {sampling}: {} executions, {} checks, {:.1} s wall, {:.1} s CPU",
                r.executions,
                r.checks,
                r.wall.as_secs_f64(),
                r.cpu.as_secs_f64()
            );
            results[m].push(r);
        }
    }
    let avg = |rs: &[Run], f: &dyn Fn(&Run) -> f64| rs.iter().map(f).sum::<f64>() / rs.len() as f64;
    let base_exec = avg(&results[0], &|r| r.executions as f64);
    let base_cpu = avg(&results[0], &|r| r.cpu.as_secs_f64());
    let base_wall = avg(&results[0], &|r| r.wall.as_secs_f64());
    println!(
        "| mode | tasks | executions | executions vs none | CPU s | CPU vs none | wall s | wall vs none |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for ((name, _), rs) in modes.iter().zip(&results) {
        let e = avg(rs, &|r| r.executions as f64);
        let c = avg(rs, &|r| r.cpu.as_secs_f64());
        let w = avg(rs, &|r| r.wall.as_secs_f64());
        println!(
            "| {name} | {n} | {e:.1} | {:.4}x | {c:.1} | {:.3}x | {w:.1} | {:.3}x |",
            e / base_exec,
            c / base_cpu,
            w / base_wall
        );
    }
    // The smoke run checks the modes do what they say.
    let exec = |m: usize| results[m][0].executions;
    anyhow::ensure!(exec(0) == n as u64, "none ran {} of {n}", exec(0));
    anyhow::ensure!(exec(2) == 2 * n as u64, "always ran {} for {n}", exec(2));
    Ok(())
}
