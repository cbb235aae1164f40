//! The aggregator pipeline (issue #6): items per second through the whole
//! pipeline (embed → dedupe → summarize and tag) on a pool with two local
//! nodes over loopback QUIC, and where the time goes; beside it, the same
//! jobs on the same items called one after another in one in-process
//! sandbox (no pool, no network, no checks), pass for pass.
//!
//! Nodes are in steady state (trusted: 0.01% of results re-executed; the
//! cost of checking new nodes is in `benches/verification.rs`). Each pass
//! uses a fresh pool, so nothing comes from the result cache.
//!
//! Run: `cargo xtask bench` (or `cargo bench -p tidepool-bench --bench
//! pipeline -- --bench`). Without `--bench` it runs one small pass as a
//! smoke test.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tidepool_client::pipeline::feed::sort_key;
use tidepool_client::pipeline::{
    publish_stages, read_feed, run_pipeline, Figures, Item, PipelineManifest, Run,
};
use tidepool_client::PoolClient;
use tidepool_host::TaskSpec;
use tidepool_proto::llm::AcceptPolicy;
use tidepool_tests::cluster::*;
use tidepool_tests::{guest, llm, root, sandbox, test_config};

fn items(n: usize) -> anyhow::Result<Vec<Item>> {
    let dir = Path::new("/usr/share/games/fortunes");
    let (mut items, _) = read_feed(&[dir.join("linux"), dir.join("linuxcookie")], 4096)?;
    items.sort_by_cached_key(|i| sort_key(&i.text));
    items.truncate(n);
    Ok(items)
}

/// One run on a fresh pool with two nodes; returns (wall time, figures).
async fn on_pool(items: Vec<Item>, pass: u8) -> anyhow::Result<(Duration, Figures, usize)> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(120 + pass);
    let mut cfg = test_pool_config(&keys);
    cfg.lease_ttl = Duration::from_secs(60);
    cfg.heartbeat = Duration::from_secs(5);
    cfg.verify.initial_reputation = 0;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let nodes: Vec<TestNode> = (0..2u8)
        .map(|i| {
            let mut c = node_config(dir.path(), &keys, i, pool.addr);
            c.slots = 1;
            start_node(c)
        })
        .collect();
    let manifest = PipelineManifest::load(&root().join("jobs/aggregator/pipeline.toml"))?;
    let client = PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public()).await?;
    let bundles = publish_stages(
        &client,
        &manifest,
        &keys.publisher,
        &dir.path().join("bundles"),
    )
    .await?;
    let start = Instant::now();
    let mut run = Run::new(&manifest, &bundles, "bench", items, Vec::new())?;
    let figures = run_pipeline(&client, &mut run, Duration::from_millis(50), &mut |_| {}).await?;
    let wall = start.elapsed();
    let groups = run.report().groups.len();
    client.close().await;
    for n in nodes {
        n.drain().await?;
    }
    pool.shutdown().await;
    Ok((wall, figures, groups))
}

/// The same jobs serially in this process; returns (wall, per-stage time).
fn in_process(items: &[Item]) -> anyhow::Result<(Duration, [Duration; 3], usize)> {
    let sb = sandbox(test_config());
    let embed = sb.load(&guest("embed"))?;
    let dedupe = sb.load(&guest("dedupe"))?;
    let (lsb, summarize) = llm::summarize_sandbox(None, 1);
    let params = BTreeMap::new();
    let task =
        |job: &tidepool_host::JobComponent, id: &str, input: &[u8]| -> anyhow::Result<Vec<u8>> {
            let out = sb.run(
                job,
                TaskSpec {
                    shared_batches: false,
                    id,
                    params: &params,
                    input,
                    replay: None,
                    accept: AcceptPolicy::GREEDY,
                },
            )?;
            out.result
                .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))
        };
    let start = Instant::now();
    let mut vectors = Vec::new();
    for it in items {
        let out = task(
            &embed,
            &it.id,
            &serde_json::to_vec(&serde_json::json!({ "text": it.text }))?,
        )?;
        let mut v: serde_json::Value = serde_json::from_slice(&out)?;
        v["id"] = serde_json::Value::String(it.id.clone());
        vectors.push(v);
    }
    let t_embed = start.elapsed();
    let input = serde_json::json!({ "options": { "threshold": 0.9 }, "items": vectors });
    let out = task(&dedupe, "dedupe", &serde_json::to_vec(&input)?)?;
    let t_dedupe = start.elapsed() - t_embed;
    let groups: serde_json::Value = serde_json::from_slice(&out)?;
    let groups = groups["groups"].as_array().cloned().unwrap_or_default();
    for g in &groups {
        let first = g["members"][0].as_str().unwrap_or_default();
        let text = &items.iter().find(|i| i.id == first).expect("member").text;
        llm::run(
            &lsb,
            &summarize,
            first,
            &llm::input(text),
            None,
            AcceptPolicy::GREEDY,
        )
        .result
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
    }
    let wall = start.elapsed();
    Ok((
        wall,
        [t_embed, t_dedupe, wall - t_embed - t_dedupe],
        groups.len(),
    ))
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (passes, n) = if full { (3, 24) } else { (1, 4) };
    let items = items(n)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut ratios = Vec::new();
    let mut last = None;
    for pass in 0..passes {
        // Alternate which side goes first.
        let (pool_side, local) = if pass % 2 == 0 {
            let p = rt.block_on(on_pool(items.clone(), pass as u8))?;
            (p, in_process(&items)?)
        } else {
            let l = in_process(&items)?;
            (rt.block_on(on_pool(items.clone(), pass as u8))?, l)
        };
        assert_eq!(pool_side.2, local.2, "both sides find the same groups");
        ratios.push(local.0.as_secs_f64() / pool_side.0.as_secs_f64());
        last = Some((pool_side, local));
    }
    ratios.sort_by(f64::total_cmp);
    let Some(((wall, figures, groups), (lwall, lstages, _))) = last else {
        return Ok(());
    };
    let busy: f64 = figures
        .stages
        .iter()
        .map(|s| s.seconds)
        .sum::<f64>()
        .max(1e-9);
    println!(
        "aggregator over {} items ({groups} groups): pool + 2 nodes {:.2} items/s ({:.1} s); one in-process sandbox {:.2} items/s ({:.1} s); speed-up, median of {passes} passes: {:.2}x (range {:.2}-{:.2})",
        items.len(),
        items.len() as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        items.len() as f64 / lwall.as_secs_f64(),
        lwall.as_secs_f64(),
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
    );
    for (s, l) in figures.stages.iter().zip(lstages) {
        println!(
            "  {:>10}: pool {} tasks, {:.1} s ({:.0}% of stage time); in-process {:.1} s ({:.0}%)",
            s.name,
            s.tasks,
            s.seconds,
            100.0 * s.seconds / busy,
            l.as_secs_f64(),
            100.0 * l.as_secs_f64() / lwall.as_secs_f64()
        );
    }
    println!(
        "  re-executions during the pool runs: {}",
        figures.re_executions
    );
    Ok(())
}
