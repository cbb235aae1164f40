//! What a stranger and a node can make the pool hold in memory (issue #16),
//! against the real `tidepool pool serve` process on loopback QUIC: hello
//! bombs (16 MiB frames before the hello) and half-sent frames (many streams
//! each announcing a 16 MiB results frame and sending half of it, never the
//! rest). The pool process's resident memory grows by less than a stated
//! bound; without the budgets the half-sent frames alone pinned 8 MiB per
//! stream (here 8 connections × 64 streams: 4 GiB).

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tidepool_proto::wire::{Capabilities, Request, Response, PROTOCOL_VERSION};
use tidepool_proto::{KeyRole, SecretKey};

/// Resident memory of process `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

const MIB: u64 = 1024 * 1024;

/// Growth allowed: the test pool's budgets (48 MiB of requests in total,
/// 17 MiB of unread bytes per connection × 8 connections: 184 MiB) and
/// slack for the connections themselves.
const BOUND: u64 = 256 * MIB;

/// Open `streams` streams on `conn`, each sending a frame that announces
/// `announce` bytes with body `head` and then `send` bytes of zeros, never
/// finishing. Returns when every write has finished or given up.
async fn half_send(
    conn: quinn::Connection,
    streams: usize,
    announce: u32,
    head: &'static [u8],
    zeros: Arc<Vec<u8>>,
) {
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let conn = conn.clone();
        let zeros = zeros.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(Ok((mut send, _recv))) =
                tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await
            else {
                return None; // past the stream limit: never opened
            };
            let _ = send.write_all(&announce.to_be_bytes()).await;
            let _ = send.write_all(head).await;
            let _ = tokio::time::timeout(Duration::from_secs(3), send.write_all(&zeros)).await;
            Some((send, _recv))
        }));
    }
    for t in tasks {
        // Keep the streams open (unfinished) until the connection closes.
        if let Ok(Some(s)) = t.await {
            std::mem::forget(s);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_bombs_and_half_sent_frames_leave_the_pool_within_its_budgets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pool_key = SecretKey::from_seed(KeyRole::Pool, &[73; 32]);
    let publisher = SecretKey::from_seed(KeyRole::Publisher, &[72; 32]);
    let key_path = dir.path().join("pool.key");
    std::fs::write(&key_path, pool_key.to_text())?;
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(
        dir.path().join("pool.toml"),
        format!(
            "listen = \"127.0.0.1:{port}\"\nkey = \"pool.key\"\ndata_dir = \"pool-data\"\n\
             publishers = [\"{}\"]\n\n[limits]\n\
             buffered_bytes_per_connection = {}\nbuffered_bytes_total = {}\n",
            publisher.public(),
            17 * MIB,
            48 * MIB
        ),
    )?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["pool", "serve", "--config"])
        .arg(dir.path().join("pool.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn pool")?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    anyhow::ensure!(
        line.starts_with("listening"),
        "pool did not start: {line:?}"
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let result = attack(addr, &pool_key, &publisher, pid).await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn attack(
    addr: std::net::SocketAddr,
    pool_key: &SecretKey,
    publisher: &SecretKey,
    pid: u32,
) -> Result<()> {
    let client = tidepool_client::PoolClient::connect(addr, publisher, pool_key.public()).await?;
    client.pool_status().await?;
    let zeros = Arc::new(vec![0u8; 8 * MIB as usize]);
    let before = rss(pid);

    // Hello bombs: 16 strangers, 8 streams each, 16 MiB frames before any
    // hello. Refused from the length prefix.
    let mut bombs = Vec::new();
    for i in 0..16u8 {
        let key = SecretKey::from_seed(KeyRole::Node, &[i.wrapping_add(150); 32]);
        let ep = tidepool_net::client(&key, pool_key.public())?;
        let conn = tidepool_net::connect(&ep, addr).await?;
        half_send(
            conn.clone(),
            8,
            16 << 20,
            b"\x81\xa9NodeHello",
            zeros.clone(),
        )
        .await;
        bombs.push((ep, conn));
    }
    let after_bombs = rss(pid);

    // Half-sent frames from an admitted node: 8 connections (the per-key
    // limit), 64 streams each, each announcing a 16 MiB results frame and
    // sending 8 MiB of it.
    let node = SecretKey::from_seed(KeyRole::Node, &[170; 32]);
    let ep = tidepool_net::client(&node, pool_key.public())?;
    let mut conns = Vec::new();
    for _ in 0..8 {
        let conn = tidepool_net::connect(&ep, addr).await?;
        let r: Response = tidepool_net::call(
            &conn,
            &Request::NodeHello {
                protocol: PROTOCOL_VERSION,
                agent: "hostile".into(),
                caps: Capabilities {
                    slots: 1,
                    ..Capabilities::default()
                },
            },
        )
        .await?;
        assert!(matches!(r, Response::Welcome { .. }), "{r:?}");
        conns.push(conn);
    }
    let sends: Vec<_> = conns
        .iter()
        .map(|c| half_send(c.clone(), 64, 16 << 20, b"\x81\xa7Results", zeros.clone()))
        .collect();
    futures_join_all(sends).await;
    let during = rss(pid);
    let grew = |x: u64| x.saturating_sub(before) / MIB;
    eprintln!(
        "pool RSS before {} MiB; +{} MiB after the hello bombs; +{} MiB with half-sent frames",
        before / MIB,
        grew(after_bombs),
        grew(during)
    );
    assert!(
        after_bombs.saturating_sub(before) < BOUND && during.saturating_sub(before) < BOUND,
        "pool memory grew {} MiB after the hello bombs and {} MiB with half-sent frames \
         (bound {} MiB)",
        grew(after_bombs),
        grew(during),
        BOUND / MIB
    );
    // The pool still serves, and says what it refused.
    let s = client.pool_status().await?;
    assert!(
        s.refusals.get("oversized frame") >= Some(&1),
        "{:?}",
        s.refusals
    );
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    client.close().await;
    Ok(())
}

/// Await every future (the tests crate has no `futures` dependency).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(fs: Vec<F>) {
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}
