//! Scale of the coordinator (issue #18): a million queued tasks and 100,000
//! simulated nodes through the sans-IO coordinator and the real SQLite
//! store, side by side with the same run at 4 nodes.
//!
//! Nothing runs a sandbox: each simulated node answers its grants at once
//! with the honest output (the input reversed) and a receipt signed with its
//! own Ed25519 key, as `tidepool_testkit::fake_node` does for the
//! coordinator's tests. Simulated time moves one second per pass over the
//! nodes, so every node comes back once a second with its results and asks
//! for as much work as it may hold.
//!
//! What is measured is the pool's coordinator thread: the time spent in
//! `handle_lease`, `handle_opened_results` and `handle_timeout` (one
//! thread, so wall time is its CPU time), per scheduling decision (a task
//! granted or a result settled) and per task finished. Opening results
//! (signature checks and hashing, which the real server does on its
//! connection tasks, in parallel) is timed on its own; the nodes' signing
//! is not counted.
//!
//! Run: `cargo bench -p tidepool-bench --bench scale -- --bench` (the full
//! size: 1,000,000 tasks, 4 then 100,000 nodes; `SCALE_TASKS` and
//! `SCALE_NODES=4,100000` change it). Without `--bench` (as in `cargo test
//! --all-targets`) it runs a small smoke size.

use anyhow::{ensure, Context};
use std::time::{Duration, Instant};
use tidepool_pool::coordinator::{open_results, Coordinator, PoolConfig};
use tidepool_pool::store::{Durability, SqliteStore};
use tidepool_proto::wire::{Capabilities, TaskGrant};
use tidepool_proto::{KeyRole, SecretKey};
use tidepool_testkit::{bundle, fake_node};

const NOW_UNIX: u64 = 1_800_000_000;

/// What one run measured.
struct Run {
    nodes: usize,
    tasks: usize,
    /// Submitting every input (open, appends of 10,000, seal).
    submit: Duration,
    /// Every node's hello.
    hellos: Duration,
    /// Time on the coordinator thread from the first lease to the last
    /// result.
    coordinator: Duration,
    /// Opening results (signatures, digests), done off the coordinator
    /// thread by the real server.
    opening: Duration,
    /// Tasks granted (re-executions included).
    granted: u64,
    /// Results settled.
    settled: u64,
    /// Simulated seconds it took.
    sim_secs: u64,
    /// Wall time of the whole run, nodes' signing included.
    wall: Duration,
}

fn caps() -> Capabilities {
    Capabilities {
        encodings: vec!["onnx".into()],
        slots: 4,
        queue: 4,
        fetch_models: true,
        ..Capabilities::default()
    }
}

fn run(nodes: usize, tasks: usize) -> anyhow::Result<Run> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let publisher = SecretKey::from_seed(KeyRole::Publisher, &[1; 32]);
    let client = SecretKey::from_seed(KeyRole::Client, &[2; 32]).public();
    let mut cfg = PoolConfig::default();
    cfg.publishers.insert(publisher.public());
    // Steady state, as in the pool benchmark: nodes long trusted (0.01% of
    // results re-executed).
    cfg.verify.initial_reputation = 0;
    let store = SqliteStore::open(&dir.path().join("pool.db"), Durability::Process)?;
    let mut c = Coordinator::new(store, cfg, &|_| true)?;
    let t0 = Instant::now();
    c.set_clock(t0, NOW_UNIX);
    let signed = bundle::signed(&publisher, "echo", "", NOW_UNIX);
    let (digest, _) = c
        .handle_publish(NOW_UNIX, signed, &|_| true)
        .map_err(|r| anyhow::anyhow!("publish: {}", r.message))?;
    let component = bundle::component().sha256;

    let clock = Instant::now();
    let (job, _, _) = c
        .handle_open_job(NOW_UNIX, &client, &digest, "scale", 0)
        .map_err(|r| anyhow::anyhow!("open: {}", r.message))?;
    let mut sent = 0u32;
    while (sent as usize) < tasks {
        let n = (tasks - sent as usize).min(10_000);
        let chunk: Vec<Vec<u8>> = (sent..sent + n as u32)
            .map(|i| format!("item {i:08}").into_bytes())
            .collect();
        sent = c
            .handle_append_inputs(NOW_UNIX, &client, job, sent, &chunk)
            .map_err(|r| anyhow::anyhow!("append: {}", r.message))?;
    }
    c.handle_seal_job(&client, job, sent)
        .map_err(|r| anyhow::anyhow!("seal: {}", r.message))?;
    let submit = clock.elapsed();

    let keys: Vec<SecretKey> = (0..nodes)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seed[31] = 0xa5;
            SecretKey::from_seed(KeyRole::Node, &seed)
        })
        .collect();
    let publics: Vec<_> = keys.iter().map(|k| k.public()).collect();
    let clock = Instant::now();
    for k in &publics {
        c.handle_node_hello(t0, *k, caps())
            .map_err(|r| anyhow::anyhow!("hello: {}", r.message))?;
    }
    let hellos = clock.elapsed();

    let mut held: Vec<Vec<TaskGrant>> = vec![Vec::new(); nodes];
    let (mut coordinator, mut opening) = (Duration::ZERO, Duration::ZERO);
    let (mut granted, mut settled) = (0u64, 0u64);
    let mut sim_secs = 0u64;
    loop {
        sim_secs += 1;
        for (i, key) in keys.iter().enumerate() {
            // The node's place in this simulated second.
            let now = t0
                + Duration::from_secs(sim_secs)
                + Duration::from_micros((i as u64 * 1_000_000) / nodes as u64);
            let results: Vec<_> = held[i]
                .drain(..)
                .map(|g| {
                    let out = fake_node::reversed(&g.input.0);
                    fake_node::answer(key, &g, component, out, "scale")
                })
                .collect();
            let clock = Instant::now();
            let opened = open_results(&publics[i], results);
            opening += clock.elapsed();
            let clock = Instant::now();
            if !opened.is_empty() {
                settled += opened.len() as u64;
                c.handle_opened_results(now, &publics[i], opened)
                    .map_err(|r| anyhow::anyhow!("results: {}", r.message))?;
            }
            let (grants, _) = c
                .handle_lease(now, &publics[i], 8, &[])
                .map_err(|r| anyhow::anyhow!("lease: {}", r.message))?;
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now)?;
            }
            while c.poll_event().is_some() {}
            coordinator += clock.elapsed();
            granted += grants.len() as u64;
            held[i] = grants;
        }
        let s = c
            .job_status(job)
            .map_err(|r| anyhow::anyhow!("status: {}", r.message))?;
        if s.done + s.dead >= s.tasks && c.leased() == 0 {
            ensure!(s.dead == 0, "{} tasks dead-lettered", s.dead);
            break;
        }
        ensure!(
            sim_secs < 100_000,
            "no end in sight: {} of {} done after {sim_secs} simulated seconds",
            s.done,
            s.tasks
        );
    }
    // Every result is on disk, once, in order.
    let last = c
        .job_results(job, tasks as u32 - 1, 1)
        .map_err(|r| anyhow::anyhow!("results page: {}", r.message))?;
    ensure!(last.len() == 1, "the last result is not stored");
    Ok(Run {
        nodes,
        tasks,
        submit,
        hellos,
        coordinator,
        opening,
        granted,
        settled,
        sim_secs,
        wall: started.elapsed(),
    })
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str| std::env::var(k).ok();
    let tasks: usize = match env("SCALE_TASKS") {
        Some(v) => v.parse().context("SCALE_TASKS")?,
        None if full => 1_000_000,
        None => 2_000,
    };
    let sizes = tidepool_bench::sizes_from_env("SCALE_NODES", &[4, 100_000], &[4, 500])?;
    println!("| nodes | tasks | decisions/s (coordinator thread) | µs per task finished | opening results, µs per result (off-thread) | submit | hellos | simulated s | wall | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let r = run(n, tasks)?;
        let decisions = (r.granted + r.settled) as f64;
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} s | {:.1} s | {} | {:.0} s | {} MiB |",
            r.nodes,
            r.tasks,
            decisions / r.coordinator.as_secs_f64(),
            r.coordinator.as_secs_f64() * 1e6 / r.tasks as f64,
            r.opening.as_secs_f64() * 1e6 / r.settled.max(1) as f64,
            r.submit.as_secs_f64(),
            r.hellos.as_secs_f64(),
            r.sim_secs,
            r.wall.as_secs_f64(),
            tidepool_bench::proc_status_mib(None, "VmHWM"),
        );
    }
    Ok(())
}
