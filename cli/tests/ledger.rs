//! The settlement ledger through the CLI, against the real `tidepool pool
//! serve` process: a node does work over the real protocol, the pool's
//! owner exports the signed statement, the node reads its own, `tidepool
//! ledger verify` passes on both and fails on a tampered row.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use tidepool_client::PoolClient;
use tidepool_proto::ledger::StatementFile;
use tidepool_proto::wire::{Capabilities, Request, Response, PROTOCOL_VERSION};
use tidepool_proto::{Digest, KeyRole, SecretKey};
use tidepool_testkit::fake_node;

fn tidepool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .output()
        .expect("run tidepool")
}

/// Answer every task the pool leases to `key` (output: the input
/// reversed) until it has none left for a while.
async fn work(
    addr: std::net::SocketAddr,
    pool: tidepool_proto::PublicKey,
    key: &SecretKey,
    component: Digest,
) -> Result<usize> {
    let ep = tidepool_net::client(key, pool)?;
    let conn = tidepool_net::connect(&ep, addr).await?;
    let hello = Request::NodeHello {
        protocol: PROTOCOL_VERSION,
        agent: "ledger-test".into(),
        caps: Capabilities {
            slots: 8,
            fetch_models: true,
            ..Capabilities::default()
        },
    };
    anyhow::ensure!(matches!(
        tidepool_net::call::<_, Response>(&conn, &hello).await?,
        Response::Welcome { .. }
    ));
    let mut done = 0;
    let mut idle = 0;
    while idle < 20 {
        let lease = Request::Lease {
            want: 8,
            running: vec![],
        };
        let Response::Leases { grants, .. } = tidepool_net::call(&conn, &lease).await? else {
            anyhow::bail!("no leases answer");
        };
        if grants.is_empty() {
            idle += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        idle = 0;
        let results = grants
            .iter()
            .map(|g| {
                fake_node::answer(
                    key,
                    g,
                    component,
                    fake_node::reversed(&g.input.0),
                    "ledger-test",
                )
            })
            .collect();
        let r: Response = tidepool_net::call(&conn, &Request::Results { results }).await?;
        anyhow::ensure!(matches!(r, Response::Verdicts(_)), "{r:?}");
        done += grants.len();
    }
    conn.close(0u32.into(), b"done");
    Ok(done)
}

fn start_pool(dir: &Path) -> Result<(Child, std::net::SocketAddr)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["pool", "serve", "--config"])
        .arg(dir.join("pool.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn pool")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("pool did not start: {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_and_the_owner_get_statements_that_verify_and_a_tampered_one_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let publisher = SecretKey::from_seed(KeyRole::Publisher, &[61; 32]);
    let pool_key = SecretKey::from_seed(KeyRole::Pool, &[62; 32]);
    let admin = SecretKey::from_seed(KeyRole::Client, &[63; 32]);
    let node = SecretKey::from_seed(KeyRole::Node, &[64; 32]);
    for (name, key) in [
        ("pool.key", &pool_key),
        ("admin.key", &admin),
        ("node.key", &node),
    ] {
        tidepool_tests::cluster::write_key_file(&d.join(name), key)?;
    }
    std::fs::write(
        d.join("pool.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nkey = \"pool.key\"\ndata_dir = \"data\"\n\
             publishers = [\"{}\"]\nadmins = [\"{}\"]\n",
            publisher.public(),
            admin.public()
        ),
    )?;
    let (mut pool, addr) = start_pool(d)?;

    // A bundle never re-executed, with no challenge window: every result
    // is credited once accepted.
    let component = b"\0asm not really: the worker reverses inputs".to_vec();
    std::fs::write(d.join("c.wasm"), &component)?;
    std::fs::write(
        d.join("tidepool.toml"),
        "name = \"rev\"\nversion = \"1.0.0\"\ncomponent = \"c.wasm\"\n\n\
         [verification]\nsampling = \"none\"\nchallenge_window_secs = 0\n",
    )?;
    let mut bundle = tidepool_client::bundle::pack(&d.join("tidepool.toml"), publisher.public())?;
    bundle.sign(&publisher)?;
    let c = PoolClient::connect(addr, &publisher, pool_key.public()).await?;
    let digest = c.publish(&bundle, |_| {}).await?;
    let inputs: Vec<Vec<u8>> = (0..30).map(|i| format!("item {i}").into_bytes()).collect();
    c.submit(digest, inputs, "ledger".into()).await?;
    c.close().await;
    let done = work(addr, pool_key.public(), &node, Digest::of(&component)).await?;
    assert_eq!(done, 30);
    // Results are stamped in whole seconds: let the second they were
    // accepted in pass before the statement is judged.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let a = addr.to_string();
    let pk = pool_key.public().to_string();
    // A verb against the pool, signed in with `key`.
    let keyed = |verb: &[&str], key: &Path, rest: &[&str]| -> Output {
        let key = key.to_str().expect("utf-8 path");
        let mut args = verb.to_vec();
        args.extend([
            "--pool",
            a.as_str(),
            "--pool-key",
            pk.as_str(),
            "--key",
            key,
        ]);
        args.extend(rest);
        tidepool(&args)
    };
    let owner_file = d.join("owner.json");
    let out = keyed(
        &["pool", "ledger", "export"],
        &d.join("admin.key"),
        &["--json", "-o", owner_file.to_str().context("path")?],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owner: StatementFile = serde_json::from_slice(&std::fs::read(&owner_file)?)?;
    let t = &owner.totals[&node.public()];
    assert_eq!((t.credited, t.pending, t.withdrawn), (30, 0, 0), "{t:?}");
    assert_eq!(
        t.metering.bytes_in,
        (0..30)
            .map(|i| format!("item {i}").len() as u64)
            .sum::<u64>()
    );

    let out = tidepool(&[
        "ledger",
        "verify",
        owner_file.to_str().context("path")?,
        "--pool-key",
        &pk,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("checks out") && text.contains("30 rows"),
        "{text}"
    );

    // The node's own statement, with its own key, as CSV and as JSON.
    let nk = d.join("node.key");
    let out = keyed(&["node", "statement"], &nk, &["--csv"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(csv.lines().count(), 31, "{csv}");
    assert!(
        csv.lines().skip(1).all(|l| l.contains(",credited,")),
        "{csv}"
    );
    let node_file = d.join("node.json");
    let out = keyed(
        &["node", "statement"],
        &nk,
        &["--json", "-o", node_file.to_str().context("path")?],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tidepool(&[
        "ledger",
        "verify",
        node_file.to_str().context("path")?,
        "--pool-key",
        &pk,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The node may not read the pool's whole ledger.
    let out = keyed(&["pool", "ledger", "export"], &nk, &[]);
    assert!(!out.status.success());

    // One row changed: verify fails and says which.
    let mut tampered = owner.clone();
    tampered.rows[4].metering.compute_us += 1_000_000;
    let bad = d.join("tampered.json");
    std::fs::write(&bad, serde_json::to_vec_pretty(&tampered)?)?;
    let out = tidepool(&["ledger", "verify", bad.to_str().context("path")?]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("row 5") && err.contains("not what the pool signed"),
        "{err}"
    );
    // Checked against another pool's key, the genuine file fails too.
    let out = tidepool(&[
        "ledger",
        "verify",
        owner_file.to_str().context("path")?,
        "--pool-key",
        &SecretKey::from_seed(KeyRole::Pool, &[9; 32])
            .public()
            .to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));

    pool.kill()?;
    pool.wait()?;
    Ok(())
}
