//! Hostile nodes (issue #16) speaking the real protocol to a real pool on
//! loopback QUIC, beside a real node running the real echo guest: a node
//! that hoards leases, a node that fails everything, a node flooding
//! results for leases it never held, frames past their kind's limit and too
//! many connections. The honest work finishes every time, and `pool
//! status` says what was refused.

use anyhow::{bail, Context as _, Result};
use std::time::Duration;
use tidepool_pool::PoolEvent;
use tidepool_proto::wire::{
    Bytes, Capabilities, LeaseId, Outcome, Request, Response, TaskGrant, TaskId, TaskResult,
    Verdict, PROTOCOL_VERSION,
};
use tidepool_proto::{KeyRole, SecretKey};
use tidepool_tests::cluster::*;

fn hello(slots: u32, queue: u32) -> Request {
    Request::NodeHello {
        protocol: PROTOCOL_VERSION,
        agent: "hostile".into(),
        caps: Capabilities {
            slots,
            queue,
            fetch_models: true,
            ..Capabilities::default()
        },
    }
}

/// A node that speaks the protocol by hand.
struct RawNode {
    conn: quinn::Connection,
    _ep: quinn::Endpoint,
}

impl RawNode {
    async fn connect(keys: &Keys, seed: u8, addr: std::net::SocketAddr) -> Result<Self> {
        let key = SecretKey::from_seed(KeyRole::Node, &[seed; 32]);
        let ep = tidepool_net::client(&key, keys.pool.public())?;
        let conn = tidepool_net::connect(&ep, addr).await?;
        Ok(Self { conn, _ep: ep })
    }

    async fn call(&self, req: &Request) -> Result<Response> {
        Ok(tidepool_net::call(&self.conn, req).await?)
    }

    async fn hello(&self, slots: u32, queue: u32) -> Result<()> {
        match self.call(&hello(slots, queue)).await? {
            Response::Welcome { .. } => Ok(()),
            other => bail!("not welcomed: {other:?}"),
        }
    }

    async fn lease(
        &self,
        want: u32,
        running: &[LeaseId],
    ) -> Result<(Vec<TaskGrant>, Vec<LeaseId>)> {
        match self
            .call(&Request::Lease {
                want,
                running: running.to_vec(),
            })
            .await?
        {
            Response::Leases { grants, lost, .. } => Ok((grants, lost)),
            other => bail!("lease answered {other:?}"),
        }
    }

    async fn results(&self, results: Vec<TaskResult>) -> Result<Vec<(LeaseId, Verdict)>> {
        match self.call(&Request::Results { results }).await? {
            Response::Verdicts(v) => Ok(v),
            other => bail!("results answered {other:?}"),
        }
    }
}

fn failed(lease: LeaseId) -> TaskResult {
    TaskResult {
        transcript: Default::default(),
        lease,
        outcome: Outcome::Failed {
            reason: "it always fails".into(),
        },
        receipt: None,
    }
}

/// A pool with a short lease grace, the echo bundle published, one honest
/// node started.
async fn pool_with_echo(
    seed: u8,
) -> Result<(
    tempfile::TempDir,
    Keys,
    tidepool_pool::server::RunningPool,
    tidepool_client::PoolClient,
    tidepool_proto::Digest,
)> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(seed);
    let mut cfg = test_pool_config(&keys);
    cfg.leasing.grace = Duration::from_secs(1);
    cfg.verify.initial_reputation = 0;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    Ok((dir, keys, pool, client, digest))
}

/// One node claims 256 slots and 256 queued leases and renews forever
/// without returning anything; another reports `Failed` for every task.
/// The hoarder holds what a fresh node may (start_leases) and loses its
/// leases at their deadline (the echo bundle's 5 s timeout plus 1 s grace)
/// however often it renews; the failing node is cut off; every task ends
/// done on the honest node, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hoarding_node_and_a_failing_node_neither_freeze_nor_empty_the_queue() -> Result<()> {
    let (dir, keys, pool, client, digest) = pool_with_echo(60).await?;
    let start_leases = tidepool_pool::PoolConfig::default().leasing.start_leases as usize;
    let mut events = pool.events();
    let (job, _) = client
        .submit(
            digest,
            (0..60).map(|i| format!("task {i}").into_bytes()).collect(),
            "hostile".into(),
        )
        .await?;
    let hoarder = RawNode::connect(&keys, 61, pool.addr).await?;
    hoarder.hello(256, 256).await?;
    let (held, _) = hoarder.lease(100_000, &[]).await?;
    assert_eq!(
        held.len(),
        start_leases,
        "a fresh node holds start_leases, not its claim"
    );
    let ids: Vec<LeaseId> = held.iter().map(|g| g.lease).collect();

    let failing = RawNode::connect(&keys, 62, pool.addr).await?;
    failing.hello(4, 0).await?;
    let honest = start_node(node_config(dir.path(), &keys, 1, pool.addr));

    // The failing node fails whatever it gets until it gets nothing; the
    // hoarder renews every half second.
    let failer = tokio::spawn(async move {
        let mut failed_total = 0usize;
        for _ in 0..200 {
            let (g, _) = failing.lease(4, &[]).await?;
            if g.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            failed_total += g.len();
            failing
                .results(g.iter().map(|g| failed(g.lease)).collect())
                .await?;
        }
        anyhow::Ok(failed_total)
    });
    let renewer = tokio::spawn(async move {
        let t0 = std::time::Instant::now();
        loop {
            let (more, lost) = hoarder.lease(100_000, &ids).await?;
            assert!(more.is_empty(), "the hoarder got more than it earned");
            if lost.len() == ids.len() {
                return anyhow::Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the hoarder still holds its leases after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    wait_job(&client, job, Duration::from_secs(120)).await?;
    let held_for = renewer.await??;
    assert!(held_for < Duration::from_secs(12), "{held_for:?}");
    let failed_total = failer.await??;
    let breaker = tidepool_pool::PoolConfig::default()
        .leasing
        .breaker_failures as usize;
    assert!(
        failed_total < 2 * breaker,
        "the failing node was cut off after a handful: {failed_total}"
    );
    let mut cut_off = false;
    while let Ok(ev) = events.try_recv() {
        cut_off |= matches!(ev, PoolEvent::CutOff { .. });
    }
    assert!(cut_off, "a CutOff event");
    let s = client.job_status(job).await?;
    assert_eq!((s.done, s.dead), (60, 0), "{s:?}");
    let records = client.job_results(job).await?;
    assert!(records.iter().all(|r| r.node == Some(honest.key)));
    honest.drain().await?;
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A node floods the pool with results for tasks it never held (this cost
/// one database query each on the coordinator thread, and 16 frames of them
/// stalled the pool long enough for honest renewals to expire). They are
/// answered `Stale` by the network shell; the honest node's leases never
/// expire and its job finishes; `pool status` counts the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_results_flood_never_starves_an_honest_nodes_renewals() -> Result<()> {
    // Frames near the results limit (16 MiB), as in the attack found.
    const ROUNDS: u64 = 8;
    const PER_FRAME: u64 = 200_000;
    let (dir, keys, pool, client, digest) = pool_with_echo(64).await?;
    let mut events = pool.events();
    let flooder = RawNode::connect(&keys, 65, pool.addr).await?;
    flooder.hello(2, 0).await?;
    let flood = tokio::spawn(async move {
        let mut stale = 0usize;
        for round in 0..ROUNDS {
            let results: Vec<TaskResult> = (0..PER_FRAME)
                .map(|i| {
                    let mut r = failed(LeaseId {
                        task: TaskId(round * PER_FRAME + i + 1),
                        attempt: 1,
                    });
                    r.outcome = Outcome::Output(Bytes(vec![0; 16]));
                    r
                })
                .collect();
            let v = flooder.results(results).await?;
            stale += v.iter().filter(|(_, v)| *v == Verdict::Stale).count();
        }
        anyhow::Ok(stale)
    });
    let honest = start_node(node_config(dir.path(), &keys, 1, pool.addr));
    let (job, _) = client
        .submit(
            digest,
            (0..40).map(|i| format!("task {i}").into_bytes()).collect(),
            "during a flood".into(),
        )
        .await?;
    wait_job(&client, job, Duration::from_secs(120)).await?;
    assert_eq!(
        flood.await??,
        (ROUNDS * PER_FRAME) as usize,
        "every flooded result is stale"
    );
    while let Ok(ev) = events.try_recv() {
        if let PoolEvent::Requeued { node, .. } = ev {
            assert_ne!(node, honest.key, "an honest lease expired during the flood");
        }
    }
    let s = client.pool_status().await?;
    assert!(
        s.refusals.get("results for leases not held") >= Some(&1),
        "{:?}",
        s.refusals
    );
    honest.drain().await?;
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// After its hello a node may still not send a 1 MiB lease request (leases
/// are bounded far below results), nor open more connections than
/// `connections_per_key`; both are refused, closed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_their_kinds_limit_and_extra_connections_are_refused() -> Result<()> {
    let (_dir, keys, pool, client, _) = pool_with_echo(68).await?;
    let node = RawNode::connect(&keys, 69, pool.addr).await?;
    node.hello(2, 0).await?;
    let big = Request::Lease {
        want: 1,
        running: vec![
            LeaseId {
                task: TaskId(1),
                attempt: 1
            };
            100_000
        ],
    };
    let r = node.call(&big).await;
    assert!(!matches!(r, Ok(Response::Leases { .. })), "{r:?}");
    let reason = closed_reason(&node.conn).await;
    assert!(reason.contains("over the limit"), "{reason}");

    // The same key again, up to the limit and one more.
    let per_key = tidepool_pool::PoolConfig::default()
        .limits
        .connections_per_key;
    let mut open = Vec::new();
    for _ in 0..per_key {
        let n = RawNode::connect(&keys, 69, pool.addr).await?;
        n.hello(2, 0).await?;
        open.push(n);
    }
    let extra = RawNode::connect(&keys, 69, pool.addr).await?;
    let reason = closed_reason(&extra.conn).await;
    assert!(reason.contains("too many connections"), "{reason}");
    // Closing one makes room again.
    if let Some(n) = open.pop() {
        n.conn.close(0u32.into(), b"bye");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = RawNode::connect(&keys, 69, pool.addr).await?;
    again.hello(2, 0).await?;

    let s = client.pool_status().await?;
    for kind in ["oversized frame", "connections per key"] {
        assert!(s.refusals.get(kind) >= Some(&1), "{kind}: {:?}", s.refusals);
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// Connections from one address are bounded before their handshake costs
/// anything (`connections_per_ip`): strangers with fresh keys on 127.0.0.2
/// get three connections and the fourth is refused, while 127.0.0.3 (another
/// host, as far as the pool can tell) still connects; closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_one_address_are_bounded_before_the_handshake() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(72);
    let mut cfg = test_pool_config(&keys);
    cfg.limits.connections_per_ip = 3;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let from = |host: u8, seed: u8| {
        let key = SecretKey::from_seed(KeyRole::Node, &[seed; 32]);
        tidepool_net::client_bound(&key, keys.pool.public(), ([127, 0, 0, host], 0).into())
    };
    let mut open = Vec::new();
    for seed in 0..3u8 {
        let ep = from(2, 100 + seed)?;
        let conn = tidepool_net::connect(&ep, pool.addr).await?;
        open.push((conn, ep));
    }
    let extra = from(2, 110)?;
    let refused = tidepool_net::connect(&extra, pool.addr).await;
    assert!(
        refused.is_err(),
        "a fourth connection from 127.0.0.2 was accepted"
    );

    let other = from(3, 111)?;
    let conn = tidepool_net::connect(&other, pool.addr)
        .await
        .context("another address is not affected")?;
    let node = RawNode { conn, _ep: other };
    node.hello(1, 0).await?;

    let (conn, _ep) = open.pop().context("three open")?;
    conn.close(0u32.into(), b"bye");
    drop(conn);
    let mut again = Err(anyhow::anyhow!("not tried"));
    for _ in 0..50 {
        // The pool notices the close on its side first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = tidepool_net::connect(&from(2, 112)?, pool.addr)
            .await
            .map_err(Into::into);
        if again.is_ok() {
            break;
        }
    }
    again.context("room again after one closed")?;

    let client =
        tidepool_client::PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public())
            .await?;
    let s = client.pool_status().await?;
    assert!(
        s.refusals.get("connections per IP") >= Some(&1),
        "{:?}",
        s.refusals
    );
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A result accepted just before the pool restarted, resent by its node
/// after: the new process's network shell has never seen that lease, but
/// the node is told `Duplicate` (the coordinator knows it was accepted), not
/// `Stale` — a lie that would tell an honest node its work was thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_resent_after_a_pool_restart_is_a_duplicate_not_stale() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(76);
    let pool_dir = dir.path().join("pool");
    let cfg = || {
        let mut c = test_pool_config(&keys);
        c.verify.initial_reputation = 0;
        c
    };
    let pool = start_pool(&pool_dir, &keys, cfg(), "127.0.0.1:0".parse()?).await?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let component = bundle.manifest()?.component.sha256;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    client
        .submit(digest, vec![b"hello".to_vec()], "restart".into())
        .await?;
    client.close().await;

    let node = RawNode::connect(&keys, 77, pool.addr).await?;
    node.hello(1, 0).await?;
    let (grants, _) = node.lease(1, &[]).await?;
    let grant = grants.first().context("one grant")?;
    let key = SecretKey::from_seed(KeyRole::Node, &[77; 32]);
    let result =
        tidepool_testkit::fake_node::answer(&key, grant, component, grant.input.0.clone(), "t");
    let verdicts = node.results(vec![result.clone()]).await?;
    assert_eq!(verdicts, vec![(grant.lease, Verdict::Accepted)]);
    drop(node);
    pool.shutdown().await;

    let pool = start_pool(&pool_dir, &keys, cfg(), "127.0.0.1:0".parse()?).await?;
    let node = RawNode::connect(&keys, 77, pool.addr).await?;
    node.hello(1, 0).await?;
    let verdicts = node.results(vec![result]).await?;
    assert_eq!(verdicts, vec![(grant.lease, Verdict::Duplicate)]);
    pool.shutdown().await;
    Ok(())
}
