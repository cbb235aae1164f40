//! Connections (issue #18): what holding many idle nodes costs the pool. A
//! real pool (this benchmark's own binary, run again as a child process so
//! that its CPU time is its own) on loopback QUIC, and N nodes connected
//! from this process, each with its own key and its own endpoint, speaking
//! the real protocol: a hello, then a lease request (the heartbeat) every
//! `heartbeat_ms` the pool's welcome asks for, spread over the interval. No
//! work is queued, so every heartbeat is answered with no grant: this is
//! the pool's cost of keeping nodes, not of running tasks.
//!
//! The pool runs with its defaults (open admission, 3 s heartbeat, the
//! per-IP connection limit of 64), so the nodes bind to 127.0.0.2,
//! 127.0.0.3, ... 50 to an address, as nodes behind many addresses do.
//!
//! Reported side by side: 10 nodes and 1,000 nodes, the pool's CPU over a
//! measured window (after every node has said hello and a warm-up), as a
//! share of one core and per heartbeat, and its resident memory.
//!
//! Run: `cargo bench -p tidepool-bench --bench connections -- --bench`
//! (`CONNS_NODES=10,1000` and `CONNS_SECS=60` change it). Without
//! `--bench` (as in `cargo test --all-targets`) it runs 10 and 60 nodes
//! over 4 s.

use anyhow::{bail, ensure, Context};
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidepool_proto::wire::{Capabilities, Request, Response, PROTOCOL_VERSION};
use tidepool_proto::{KeyRole, SecretKey};
use tidepool_tests::cluster::{start_pool, Keys};

/// Set in the child: the directory its pool keeps its data in.
const CHILD: &str = "TIDEPOOL_CONNS_POOL_DIR";
/// Nodes per loopback address (the pool's default per-IP limit is 64).
const PER_ADDRESS: usize = 50;

/// The child: a pool with its default settings (any node admitted), its
/// address on stdout, until stdin closes.
fn child(dir: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let keys = Keys::new(70);
        let mut cfg = tidepool_pool::PoolConfig::default();
        cfg.publishers.insert(keys.publisher.public());
        let pool = start_pool(dir.as_ref(), &keys, cfg, "127.0.0.1:0".parse()?).await?;
        println!("{}", pool.addr);
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await?;
        pool.shutdown().await;
        anyhow::Ok(())
    })
}

/// CPU time (user + system) and resident memory of process `pid`.
fn usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu = Duration::from_millis((ticks(11) + ticks(12)) * 10);
    (cpu, tidepool_bench::proc_status_mib(Some(pid), "VmRSS"))
}

/// What one run measured.
struct Run {
    nodes: usize,
    heartbeats_per_sec: f64,
    cpu_share: f64,
    cpu_per_heartbeat: Duration,
    rss_mib: u64,
    failures: u64,
}

/// One node: hello, then a heartbeat every interval (starting at its
/// place in the interval), until `stop`.
async fn node(
    i: usize,
    n: usize,
    pool: SocketAddr,
    pool_key: tidepool_proto::PublicKey,
    heartbeats: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    ready: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut seed = [0x5c; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    seed[8..16].copy_from_slice(&(n as u64).to_le_bytes());
    let key = SecretKey::from_seed(KeyRole::Node, &seed);
    let host = Ipv4Addr::new(127, 0, 0, 2 + (i / PER_ADDRESS) as u8);
    let ep = tidepool_net::client_bound(&key, pool_key, SocketAddr::new(IpAddr::V4(host), 0))?;
    let conn = tidepool_net::connect(&ep, pool).await?;
    let hello = Request::NodeHello {
        protocol: PROTOCOL_VERSION,
        agent: "bench".into(),
        caps: Capabilities {
            encodings: vec!["onnx".into()],
            slots: 4,
            fetch_models: true,
            ..Capabilities::default()
        },
    };
    let every = match tidepool_net::call::<_, Response>(&conn, &hello).await? {
        Response::Welcome { heartbeat_ms, .. } => Duration::from_millis(heartbeat_ms.max(100)),
        other => bail!("hello answered with {other:?}"),
    };
    ready.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(every.mul_f64(i as f64 / n as f64)).await;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let beat = Request::Lease {
            want: 4,
            running: Vec::new(),
        };
        match tidepool_net::call::<_, Response>(&conn, &beat).await {
            Ok(Response::Leases { .. }) => heartbeats.fetch_add(1, Ordering::Relaxed),
            _ => failures.fetch_add(1, Ordering::Relaxed),
        };
    }
}

async fn run(exe: &std::path::Path, n: usize, window: Duration) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let mut pool = Command::new(exe)
        .env(CHILD, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the pool process")?;
    let mut line = String::new();
    std::io::BufReader::new(pool.stdout.take().context("the pool's stdout")?)
        .read_line(&mut line)?;
    let addr: SocketAddr = line.trim().parse().context("the pool's address")?;
    let pool_key = Keys::new(70).pool.public();

    let (heartbeats, failures, ready) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (h, f, r) = (heartbeats.clone(), failures.clone(), ready.clone());
        tasks.spawn(async move {
            if let Err(e) = node(i, n, addr, pool_key, h, f.clone(), r).await {
                eprintln!("node {i}: {e:#}");
                f.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while (ready.load(Ordering::Relaxed) as usize) < n {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} nodes said hello in 2 minutes ({} failed)",
            ready.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A full heartbeat interval (3 s by default) and then some, so that
    // every node beats at its own pace before the window opens.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, _) = usage(pool.id());
    let (beats0, fails0) = (
        heartbeats.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    let t = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let secs = t.elapsed().as_secs_f64();
    let (cpu1, rss_mib) = usage(pool.id());
    let beats = heartbeats.load(Ordering::Relaxed) - beats0;
    let failed = failures.load(Ordering::Relaxed) - fails0;
    tasks.abort_all();
    drop(pool.stdin.take());
    let _ = pool.wait();
    let cpu = cpu1.saturating_sub(cpu0);
    Ok(Run {
        nodes: n,
        heartbeats_per_sec: beats as f64 / secs,
        cpu_share: cpu.as_secs_f64() / secs,
        cpu_per_heartbeat: cpu / beats.max(1) as u32,
        rss_mib,
        failures: failed,
    })
}

fn main() -> anyhow::Result<()> {
    if let Ok(dir) = std::env::var(CHILD) {
        return child(&dir);
    }
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str| std::env::var(k).ok();
    let sizes = tidepool_bench::sizes_from_env("CONNS_NODES", &[10, 1000], &[10, 60])?;
    let window = Duration::from_secs(match env("CONNS_SECS") {
        Some(v) => v.parse().context("CONNS_SECS")?,
        None if full => 60,
        None => 4,
    });
    let exe = std::env::current_exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("| nodes connected | heartbeats/s | pool CPU, share of one core | pool CPU per heartbeat | pool RSS | failed heartbeats |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let r = rt.block_on(run(&exe, n, window))?;
        println!(
            "| {} | {:.0} | {:.1}% | {:.0} µs | {} MiB | {} |",
            r.nodes,
            r.heartbeats_per_sec,
            r.cpu_share * 100.0,
            r.cpu_per_heartbeat.as_secs_f64() * 1e6,
            r.rss_mib,
            r.failures
        );
        ensure!(r.failures == 0, "{} heartbeats failed", r.failures);
    }
    Ok(())
}
