//! A node's disk caches under a small budget (issue #19), on a real pool
//! and a real node over QUIC with real models: more bundles than fit
//! evict the least recently used model, a running task's model is never
//! removed even when it is the oldest, an evicted bundle is fetched and
//! checked again when it is needed, and the node keeps serving throughout.
//! The node's `/metrics` and `status.json` say what happened.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidepool_client::PoolClient;
use tidepool_node::caches::Budgets;
use tidepool_proto::wire::JobId;
use tidepool_proto::Digest;
use tidepool_tests::cluster::{
    embed_inputs, http_get, minilm_bundle_from, node_config, start_node, start_test_pool, wait_job,
    Keys,
};
use tidepool_tests::model_path;

/// A copy of the MiniLM model that differs in its bytes, not its meaning:
/// an unknown protobuf field (number 1000, one byte `n`) appended to the
/// ModelProto, which ONNX readers skip. Returns its path and sha256.
fn model_variant(dir: &Path, n: u8) -> Result<(PathBuf, String)> {
    let path = dir.join(format!("minilm-variant-{n}.onnx"));
    std::fs::copy(model_path("minilm-l3"), &path)?;
    let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
    // Tag (1000 << 3 | 2) as a varint, length 1, the byte.
    f.write_all(&[0xC2, 0x3E, 0x01, n])?;
    drop(f);
    let hex = tidepool_host::models::sha256_file(&path)?;
    Ok((path, hex))
}

/// Publish `job` (a guest) with model variant `n` as its own bundle.
async fn publish_variant(
    client: &PoolClient,
    dir: &Path,
    keys: &Keys,
    job: &str,
    n: u8,
) -> Result<(Digest, String)> {
    let (model, sha) = model_variant(dir, n)?;
    let b = minilm_bundle_from(
        &dir.join(format!("bundle-{job}-{n}")),
        keys,
        (&format!("{job}-{n}"), job),
        "1.0.0",
        256,
        (&model, &sha),
        "",
    )?;
    Ok((client.publish(&b, |_| {}).await?, sha))
}

async fn embed_job(client: &PoolClient, bundle: Digest, text: &str) -> Result<JobId> {
    let inputs = embed_inputs(&[text.to_owned()]);
    Ok(client.submit(bundle, inputs, text.to_owned()).await?.0)
}

async fn finish(client: &PoolClient, job: JobId) -> Result<()> {
    let s = wait_job(client, job, Duration::from_secs(120)).await?;
    if s.done != 1 || s.dead != 0 {
        let records = client.job_results(job).await?;
        anyhow::bail!("job {job}: {s:?}: {records:?}");
    }
    Ok(())
}

/// The token of the test nodes' metrics listener.
const TOKEN: &str = "node-metrics-token-for-the-test";

/// Turn on `cfg`'s metrics listener on a free loopback port; its address.
fn with_metrics(cfg: &mut tidepool_node::NodeConfig) -> Result<std::net::SocketAddr> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    cfg.metrics = Some(tidepool_node::MetricsConfig {
        listen: addr,
        token: TOKEN.into(),
        max_connections: 4,
    });
    Ok(addr)
}

/// Wait until `cond` holds (polled every 50 ms) or fail after `secs`.
async fn until(secs: u64, what: &str, mut cond: impl AsyncFnMut() -> bool) -> Result<()> {
    let start = std::time::Instant::now();
    while !cond().await {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_a_small_model_budget_evicts_the_least_recently_used_but_never_a_running_tasks_files(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(141);
    let pool = start_test_pool(dir.path(), &keys).await?;
    let client = PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public()).await?;

    // Room for two and a half models: a third evicts one.
    let model_size = std::fs::metadata(model_path("minilm-l3"))?.len() + 4;
    let mut cfg = node_config(dir.path(), &keys, 1, pool.addr);
    cfg.budgets = Budgets {
        models: model_size * 5 / 2,
        ..Budgets::default()
    };
    let metrics_addr = with_metrics(&mut cfg)?;
    let data_dir = cfg.data_dir.clone();
    let models_dir = data_dir.join("models");
    let held = |sha: &str| models_dir.join(sha).is_file();
    let node = start_node(cfg);

    // 1. A task that runs until cancelled (the spin guest, whose bundle
    //    also carries model 1): model 1 is the oldest file from now on,
    //    and in use.
    let (spin, sha1) = publish_variant(&client, dir.path(), &keys, "spin", 1).await?;
    let (spin_job, _) = client
        .submit(spin, vec![b"x".to_vec()], "spin".into())
        .await?;
    until(60, "the spin task to start with model 1", async || {
        held(&sha1)
    })
    .await?;
    until(30, "the spin task to be leased", async || {
        client
            .job_status(spin_job)
            .await
            .is_ok_and(|s| s.running == 1)
    })
    .await?;

    // 2. Bundle 2 runs beside it; its model is now the second oldest.
    let (b2, sha2) = publish_variant(&client, dir.path(), &keys, "embed", 2).await?;
    finish(&client, embed_job(&client, b2, "the first text").await?).await?;
    assert!(held(&sha1) && held(&sha2));

    // 3. Bundle 3 needs room. Model 1 is the least recently used but its
    //    task is running: model 2 goes instead.
    let (b3, sha3) = publish_variant(&client, dir.path(), &keys, "embed", 3).await?;
    finish(&client, embed_job(&client, b3, "the second text").await?).await?;
    assert!(held(&sha1), "the running task's model was removed");
    assert!(!held(&sha2), "the least recently used idle model stayed");
    assert!(held(&sha3));
    let status = client.job_status(spin_job).await?;
    assert_eq!(
        status.running, 1,
        "the spin task is still running: {status:?}"
    );

    // 4. The spin task ends (its job cancelled); model 1 is no longer in
    //    use. Bundle 2 is needed again: fetched and checked again, and
    //    model 1, now idle and the oldest, makes room for it.
    client.cancel_job(spin_job).await?;
    until(30, "the node to stop the cancelled task", async || {
        node_metric(
            metrics_addr,
            "tidepool_node_task_failures_total{kind=\"cancelled\"}",
        )
        .await
        .is_some_and(|v| v >= 1.0)
    })
    .await?;
    finish(&client, embed_job(&client, b2, "the third text").await?).await?;
    assert!(!held(&sha1), "model 1 stayed after its task ended");
    assert!(held(&sha2) && held(&sha3));
    let used: u64 = std::fs::read_dir(&models_dir)?
        .map(|e| e.map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)))
        .sum::<std::io::Result<u64>>()?;
    assert!(used <= model_size * 5 / 2, "{used} bytes over the budget");

    // 5. What the node says about it.
    let (code, body) = http_get(metrics_addr, "/metrics", Some(TOKEN)).await?;
    assert_eq!(code, 200, "{body}");
    let metric =
        |name: &str| value(&body, name).with_context(|| format!("no {name} in /metrics:\n{body}"));
    assert_eq!(
        metric("tidepool_node_cache_evictions_total{cache=\"models\"}")?,
        2.0
    );
    assert_eq!(
        metric("tidepool_node_cache_bytes{cache=\"models\"}")?,
        used as f64
    );
    assert_eq!(
        metric("tidepool_node_bundle_loads_total")?,
        4.0,
        "bundle 2 loaded twice"
    );
    assert_eq!(
        metric("tidepool_node_tasks_total{outcome=\"completed\"}")?,
        3.0
    );
    let (code, _) = http_get(metrics_addr, "/metrics", None).await?;
    assert_eq!(code, 401, "metrics without the token");
    let (code, body) = http_get(metrics_addr, "/readyz", None).await?;
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    node.drain().await?;
    let state = tidepool_node::state::read(&data_dir)?.context("status.json")?;
    assert_eq!(state.link, tidepool_node::state::Link::Stopped);
    assert_eq!(state.since_start.completed, 3);
    assert_eq!(state.since_start.failures.get("cancelled"), Some(&1));
    assert!(
        state.standing.is_some(),
        "the pool told the node its standing"
    );
    let names: Vec<&str> = state.bundles.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let view = tidepool_node::state::status(&data_dir, Budgets::default())?;
    assert!(!view.running, "the lock is released when the node stops");
    Ok(())
}

/// One metric's value from the node's `/metrics` (`None` if unreachable
/// or absent).
async fn node_metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics", Some(TOKEN)).await.ok()?;
    value(&body, name)
}

/// The value of the sample `name` (with its labels) in exposition text.
fn value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Issue #20: three bundles that name the same model, run on one node,
/// hold it once: loaded from its file once, one copy in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_bundles_naming_one_model_load_it_once_on_a_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(143);
    let pool = start_test_pool(dir.path(), &keys).await?;
    let client = PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public()).await?;
    let mut cfg = node_config(dir.path(), &keys, 1, pool.addr);
    let metrics_addr = with_metrics(&mut cfg)?;
    let node = start_node(cfg);
    let (model, sha) = model_variant(dir.path(), 7)?;
    for n in 0..3u8 {
        let b = minilm_bundle_from(
            &dir.path().join(format!("shared-{n}")),
            &keys,
            (&format!("embed-shared-{n}"), "embed"),
            "1.0.0",
            256,
            (&model, &sha),
            "",
        )?;
        let digest = client.publish(&b, |_| {}).await?;
        finish(
            &client,
            embed_job(&client, digest, &format!("text {n}")).await?,
        )
        .await?;
    }
    let (code, body) = http_get(metrics_addr, "/metrics", Some(TOKEN)).await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        value(&body, "tidepool_node_bundle_loads_total"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "tidepool_node_model_loads_total"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "tidepool_node_models_held"),
        Some(1.0),
        "{body}"
    );
    node.drain().await?;
    Ok(())
}
