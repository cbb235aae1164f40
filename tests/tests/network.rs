//! The pool and its nodes over real QUIC on loopback, with a real SQLite
//! file, real signatures, and the real embed job on the real model.

use anyhow::Result;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidepool_pool::PoolEvent;
use tidepool_proto::wire::Outcome;
use tidepool_tests::cluster::*;
use tidepool_tests::*;

/// What `tidepool run` gives for each input: the same component and model
/// in a local sandbox.
fn local_outputs(inputs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let sb = sandbox(test_config());
    let job = sb.load(&guest("embed")).expect("load embed");
    inputs
        .iter()
        .map(|i| run(&sb, &job, "local", i).expect("run").result.expect("embed ok"))
        .collect()
}

fn outputs(records: &[tidepool_proto::wire::TaskRecord]) -> Vec<Vec<u8>> {
    records
        .iter()
        .map(|r| match &r.outcome {
            Some(Outcome::Output(b)) => b.0.clone(),
            other => panic!("task {} has no output: {other:?} ({:?})", r.index, r.reasons),
        })
        .collect()
}

/// The headline: three nodes finish >= 1,000 embed tasks and every
/// result equals a local run of the same input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: 1,000 real embeddings twice (run by `cargo xtask test`)"]
async fn three_nodes_finish_a_thousand_embed_tasks_equal_to_local_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(1);
    let pool = start_pool(&dir.path().join("pool"), &keys, test_pool_config(&keys), "127.0.0.1:0".parse()?).await?;
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let texts = corpus(1000)?;
    let inputs = embed_inputs(&texts);
    let (job, n) = client.submit(digest, inputs.clone(), "batch-1".into()).await?;
    assert_eq!(n as usize, inputs.len());
    let nodes: Vec<_> = (0..3).map(|i| start_node(node_config(dir.path(), &keys, i, pool.addr))).collect();
    let summary = wait_job(&client, job, Duration::from_secs(600)).await?;
    assert_eq!((summary.done, summary.dead), (n, 0), "{summary:?}");
    let records = client.job_results(job).await?;
    assert_eq!(records.len(), 1000);
    let want = tokio::task::spawn_blocking(move || local_outputs(&inputs)).await?;
    let got = outputs(&records);
    let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} results differ from local runs");
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *per_node.entry(r.node.expect("node").short()).or_default() += 1;
    }
    eprintln!("tasks per node: {per_node:?}");
    assert_eq!(per_node.len(), 3, "all three nodes took part: {per_node:?}");
    for n in nodes {
        let report = n.drain().await?;
        assert_eq!(report.rejected, 0, "{report:?}");
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A node vanishes mid-batch: its leases expire, the tasks are queued again
/// and the other node finishes them with the same results.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_leases_are_requeued_and_finished_by_the_others() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(2);
    let cfg = test_pool_config(&keys);
    let ttl = cfg.lease_ttl;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let mut events = pool.events();
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let inputs = embed_inputs(&fortunes(60)?);
    let (job, n) = client.submit(digest, inputs.clone(), "batch".into()).await?;

    let victim = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    let victim_key = victim.key;
    // Let the victim take leases and finish a few tasks.
    let start = Instant::now();
    loop {
        let s = client.job_status(job).await?;
        if s.done >= 4 && s.running > 0 {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(120), "victim never got going: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill();
    let killed_at = Instant::now();
    let survivor = start_node(node_config(dir.path(), &keys, 1, pool.addr));

    // Every lease the victim held is requeued within the TTL (plus slack).
    let mut requeued = Vec::new();
    let summary = loop {
        while let Ok(ev) = events.try_recv() {
            if let PoolEvent::Requeued { node, .. } = ev {
                assert_eq!(node, victim_key, "only the killed node loses leases");
                requeued.push(killed_at.elapsed());
            }
        }
        let s = client.job_status(job).await?;
        if s.done + s.dead == s.tasks {
            break s;
        }
        anyhow::ensure!(killed_at.elapsed() < Duration::from_secs(300), "not finished: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((summary.done, summary.dead), (n, 0));
    assert!(!requeued.is_empty(), "the victim held leases when killed");
    let worst = requeued.iter().max().copied().unwrap_or_default();
    eprintln!("kill -> requeue: {} leases, {:?} .. {:?} (lease TTL {ttl:?})", requeued.len(), requeued.iter().min(), worst);
    assert!(worst <= ttl + Duration::from_secs(2), "requeue took {worst:?}, TTL is {ttl:?}");

    let records = client.job_results(job).await?;
    let want = tokio::task::spawn_blocking(move || local_outputs(&inputs)).await?;
    assert_eq!(outputs(&records), want);
    assert!(records.iter().any(|r| r.attempts >= 2), "some task ran a second attempt");
    survivor.drain().await?;
    client.close().await;
    pool.shutdown().await;
    Ok(())
}
