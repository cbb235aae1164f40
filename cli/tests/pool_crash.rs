//! The pool process killed with SIGKILL mid-batch, several times, and
//! restarted on the same data directory: no acknowledged submission and no
//! accepted result is lost, none is accepted twice.
//!
//! The pool is the real `tidepool pool serve` process with its SQLite file.
//! The worker is a minimal node written here against the wire protocol, so
//! the test sees every verdict the pool sends (a real node keeps them to
//! itself); its output is the input reversed, with real signed receipts.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidepool_client::PoolClient;
use tidepool_proto::wire::{
    Bytes, Capabilities, Outcome, Request, Response, TaskResult, Verdict, PROTOCOL_VERSION,
};
use tidepool_proto::wire::{JobId, LeaseId, TaskState};
use tidepool_proto::{Digest, KeyRole, SecretKey};
use tidepool_testkit::fake_node;

struct Pool {
    child: Child,
}

fn start_pool(dir: &std::path::Path, port: u16, publisher: &SecretKey) -> Result<Pool> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["pool", "serve", "--key"])
        .arg(dir.join("pool.key"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--publisher",
            &publisher.public().to_string(),
            "--lease-ttl-secs",
            "2",
            "--heartbeat-ms",
            "500",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn pool")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    anyhow::ensure!(
        line.starts_with("listening"),
        "pool did not start: {line:?}"
    );
    Ok(Pool { child })
}

/// What the worker heard back, per task (named by its input: every input
/// of the test is distinct, and task ids on the wire are the pool's opaque
/// names, not the row ids clients see): attempts answered Accepted or
/// Duplicate.
#[derive(Default)]
struct Ledger {
    accepted: BTreeMap<Vec<u8>, BTreeSet<u32>>,
    acknowledged: BTreeMap<Vec<u8>, BTreeSet<u32>>,
}

async fn worker(
    addr: SocketAddr,
    pool: tidepool_proto::PublicKey,
    key: SecretKey,
    component: Digest,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    unanswered: Arc<std::sync::atomic::AtomicUsize>,
) {
    // A killed pool sends no close: without a bound, a call on its dead
    // connection would wait out the 20 s idle timeout.
    const CALL: Duration = Duration::from_secs(2);
    let ep = tidepool_net::client(&key, pool).expect("endpoint");
    let mut pending: Vec<TaskResult> = Vec::new();
    // The input of each lease answered (lease ids are stable across pool
    // restarts: the pool keeps the secret that names them).
    let mut input_of: BTreeMap<LeaseId, Vec<u8>> = BTreeMap::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok(conn) = tidepool_net::connect(&ep, addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let caps = Capabilities {
            slots: 64,
            fetch_models: true,
            ..Capabilities::default()
        };
        let hello = Request::NodeHello {
            protocol: PROTOCOL_VERSION,
            agent: "crash-test".into(),
            caps,
        };
        if !matches!(
            tokio::time::timeout(CALL, tidepool_net::call::<_, Response>(&conn, &hello)).await,
            Ok(Ok(Response::Welcome { .. }))
        ) {
            continue;
        }
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if !pending.is_empty() {
                match tokio::time::timeout(
                    CALL,
                    tidepool_net::call::<_, Response>(
                        &conn,
                        &Request::Results {
                            results: pending.clone(),
                        },
                    ),
                )
                .await
                {
                    Ok(Ok(Response::Verdicts(v))) => {
                        let mut l = ledger.lock().expect("ledger");
                        for (lease, verdict) in v {
                            let Some(input) = input_of.get(&lease).cloned() else {
                                continue;
                            };
                            match verdict {
                                Verdict::Accepted => {
                                    l.accepted
                                        .entry(input.clone())
                                        .or_default()
                                        .insert(lease.attempt);
                                    l.acknowledged
                                        .entry(input)
                                        .or_default()
                                        .insert(lease.attempt);
                                }
                                Verdict::Duplicate => {
                                    l.acknowledged
                                        .entry(input)
                                        .or_default()
                                        .insert(lease.attempt);
                                }
                                _ => {}
                            }
                        }
                        pending.clear();
                        unanswered.store(0, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => break, // pool gone: keep the results and resend after reconnecting
                }
            }
            match tokio::time::timeout(
                CALL,
                tidepool_net::call::<_, Response>(
                    &conn,
                    &Request::Lease {
                        want: 64,
                        running: vec![],
                    },
                ),
            )
            .await
            {
                Ok(Ok(Response::Leases { grants, .. })) => {
                    if grants.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    for g in grants {
                        input_of.insert(g.lease, g.input.0.clone());
                        pending.push(fake_node::answer(
                            &key,
                            &g,
                            component,
                            fake_node::reversed(&g.input.0),
                            "crash-test",
                        ));
                    }
                    unanswered.store(pending.len(), std::sync::atomic::Ordering::SeqCst);
                }
                _ => break,
            }
        }
    }
}

async fn client(
    addr: SocketAddr,
    publisher: &SecretKey,
    pool: tidepool_proto::PublicKey,
) -> PoolClient {
    loop {
        if let Ok(c) = PoolClient::connect(addr, publisher, pool).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: kills and restarts the pool process (run by `cargo xtask test`)"]
async fn sigkilled_pool_loses_and_duplicates_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let publisher = SecretKey::from_seed(KeyRole::Publisher, &[31; 32]);
    let pool_key = SecretKey::generate(KeyRole::Pool, &ring::rand::SystemRandom::new())?;
    let pool_key_path = dir.path().join("pool.key");
    std::fs::write(&pool_key_path, pool_key.to_text())?;
    // Key files must be private (the CLI refuses others).
    std::fs::set_permissions(
        &pool_key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut pool = start_pool(dir.path(), port, &publisher)?;

    // A bundle whose component the worker never runs. Not re-executed:
    // the ledger names tasks by input, which a re-execution shares with
    // its original (this test is about acceptance, not checks).
    let component = b"\0asm not really: the worker reverses inputs".to_vec();
    std::fs::write(dir.path().join("c.wasm"), &component)?;
    std::fs::write(
        dir.path().join("tidepool.toml"),
        "name = \"rev\"\nversion = \"1.0.0\"\ncomponent = \"c.wasm\"\n\n[verification]\nsampling = \"none\"\n",
    )?;
    let mut bundle =
        tidepool_client::bundle::pack(&dir.path().join("tidepool.toml"), publisher.public())?;
    bundle.sign(&publisher)?;
    let c = client(addr, &publisher, pool_key.public()).await;
    let digest = c.publish(&bundle, |_| {}).await?;
    drop(c);

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Per worker: results it sent (or holds) without a verdict yet.
    let unanswered: Vec<Arc<std::sync::atomic::AtomicUsize>> =
        (0..2).map(|_| Arc::default()).collect();
    let workers: Vec<_> = (0..2u8)
        .map(|i| {
            let key = SecretKey::from_seed(KeyRole::Node, &[40 + i; 32]);
            tokio::spawn(worker(
                addr,
                pool_key.public(),
                key,
                Digest::of(&component),
                ledger.clone(),
                stop.clone(),
                unanswered[usize::from(i)].clone(),
            ))
        })
        .collect();

    // Submitter: 20 jobs of 40 inputs; a submission counts once the pool answered.
    let acked: Arc<Mutex<BTreeMap<String, (JobId, u32)>>> = Arc::default();
    let submitter = {
        let acked = acked.clone();
        let publisher = publisher.clone();
        let pk = pool_key.public();
        tokio::spawn(async move {
            for j in 0..20 {
                let key = format!("job-{j}");
                let inputs: Vec<Vec<u8>> = (0..40)
                    .map(|i| format!("job {j} input {i}").into_bytes())
                    .collect();
                loop {
                    let c = client(addr, &publisher, pk).await;
                    if let Ok((job, n)) = c.submit(digest, inputs.clone(), key.clone()).await {
                        acked.lock().expect("acked").insert(key.clone(), (job, n));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };

    // Kill the pool at uneven intervals while all of that runs.
    let mut kills = 0;
    for wait_ms in [350u64, 700, 450, 900, 500, 650] {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        pool.child.kill()?;
        pool.child.wait()?;
        kills += 1;
        pool = start_pool(dir.path(), port, &publisher)?;
    }
    submitter.await?;

    // Let everything finish on the last pool process.
    let c = client(addr, &publisher, pool_key.public()).await;
    let acked = acked.lock().expect("acked").clone();
    assert_eq!(acked.len(), 20);
    let start = std::time::Instant::now();
    loop {
        let s = c.pool_status().await?;
        if s.queued == 0 && s.leased == 0 {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "not finished: {} queued, {} leased",
            s.queued,
            s.leased
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing is queued or leased: every result is on the pool's disk. A
    // worker may still wait for the verdicts of its last batch (the pool
    // was killed before answering): let it resend and hear them.
    while unanswered
        .iter()
        .any(|u| u.load(std::sync::atomic::Ordering::SeqCst) > 0)
    {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "workers still wait for verdicts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }

    let ledger = std::mem::take(&mut *ledger.lock().expect("ledger"));
    let (mut lost_submissions, mut lost, mut duplicated, mut unexpected, mut wrong, mut tasks) =
        (0, 0, 0, 0, 0, 0);
    let mut retried = 0;
    let status = c.pool_status().await?;
    assert_eq!(
        status.jobs.len(),
        acked.len(),
        "one job per submission key, however often it was retried"
    );
    for (key, (job, n)) in &acked {
        // Re-submitting an acknowledged key returns the same job.
        let inputs: Vec<Vec<u8>> = (0..*n)
            .map(|i| format!("{} input {i}", key.replace('-', " ")).into_bytes())
            .collect();
        if c.submit(digest, inputs.clone(), key.clone()).await? != (*job, *n) {
            lost_submissions += 1;
        }
        let records = c.job_results(*job).await?;
        if records.len() != *n as usize {
            lost_submissions += 1;
        }
        for r in records {
            tasks += 1;
            if r.attempts > 1 {
                retried += 1;
            }
            let input = &inputs[r.index as usize];
            let accepted = ledger.accepted.get(input);
            if accepted.is_some_and(|a| a.len() > 1) {
                duplicated += 1;
            }
            if let Some(a) = accepted {
                if r.state != TaskState::Done || !a.contains(&r.attempts) {
                    lost += 1;
                }
            }
            if r.state == TaskState::Done
                && !ledger
                    .acknowledged
                    .get(input)
                    .is_some_and(|a| a.contains(&r.attempts))
            {
                unexpected += 1;
            }
            let want: Vec<u8> = input.iter().rev().copied().collect();
            if r.outcome != Some(Outcome::Output(Bytes(want))) {
                wrong += 1;
            }
        }
    }
    eprintln!(
        "{kills} SIGKILLs; {} submissions, {tasks} tasks: lost submissions {lost_submissions}, lost results {lost}, \
         duplicated {duplicated}, unexpected {unexpected}, wrong outputs {wrong}; {retried} tasks needed a second attempt",
        acked.len()
    );
    assert_eq!(
        (lost_submissions, lost, duplicated, unexpected, wrong),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(tasks, 800);
    pool.child.kill()?;
    pool.child.wait()?;
    Ok(())
}
