//! The summarize job through a real pool (QUIC on loopback, SQLite, signed
//! receipts with transcripts): every result re-executed under the `llm`
//! tier, so honest nodes confirm each other by replay (one on 1 thread, one
//! on 2) and a node that reports other summaries is caught.

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tidepool_pool::verify::VerifyPolicy;
use tidepool_tests::adversary::{Adversary, Lie};
use tidepool_tests::cluster::*;
use tidepool_tests::*;

/// Wait until no check is pending and nothing is queued or running.
async fn settle_checks(
    client: &tidepool_client::PoolClient,
) -> Result<tidepool_proto::wire::PoolSummary> {
    let start = std::time::Instant::now();
    loop {
        let s = client.pool_status().await?;
        if s.verification.pending == 0 && s.queued == 0 && s.leased == 0 {
            return Ok(s);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "checks pending: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn summaries_through_the_pool_are_checked_by_replay() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(51);
    let mut cfg = test_pool_config(&keys);
    cfg.verify = VerifyPolicy {
        secret: Some([5; 32]),
        canary_rate: 0.0,
        trusted: [keys.node(0).public()].into(),
        // Every llm check comes with a decoy (once verified results exist):
        // real verifiers replaying corrupted tokens must reject them.
        decoy_rate: 1.0,
        ..VerifyPolicy::default()
    };
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let bundle = summarize_bundle(
        &dir.path().join("author"),
        &keys,
        "[verification]\nsampling = \"always\"\n",
    )?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let texts = fortunes(6)?;
    let inputs: Vec<Vec<u8>> = texts.iter().map(|t| llm::input(t)).collect();
    let (job, _) = client
        .submit(digest, inputs.clone(), "summaries".into())
        .await?;

    let mut nodes = Vec::new();
    let mut honest = node_config(dir.path(), &keys, 0, pool.addr);
    honest.slots = 1;
    nodes.push(start_node(honest));
    let mut other = node_config(dir.path(), &keys, 1, pool.addr);
    other.slots = 1;
    other.llm_threads = 2;
    nodes.push(start_node(other));
    // A third honest node: a verifier gets decoys made from results it
    // neither produced nor checked (with two, each checked all the other's).
    let mut third = node_config(dir.path(), &keys, 3, pool.addr);
    third.slots = 1;
    nodes.push(start_node(third));
    let mut liar = node_config(dir.path(), &keys, 2, pool.addr);
    liar.slots = 1;
    liar.tamper = Some(Arc::new(Adversary::new(Lie::AlwaysWrong, 9)));
    let liar_key = liar.key.public();
    nodes.push(start_node(liar));

    let summary = wait_job(&client, job, Duration::from_secs(600)).await?;
    let first = client.task_record(job, 0).await?;
    assert_eq!(summary.dead, 0, "{summary:?}: {:?}", first.reasons);
    // A second batch once results are verified: its checks come with
    // decoys made from them.
    settle_checks(&client).await?;
    let more: Vec<Vec<u8>> = fortunes(9)?[6..].iter().map(|t| llm::input(t)).collect();
    let (job2, _) = client.submit(digest, more, "more".into()).await?;
    wait_job(&client, job2, Duration::from_secs(600)).await?;
    let status = settle_checks(&client).await?;
    eprintln!("{:?}", status.verification);
    for n in &status.nodes {
        eprintln!(
            "node {}: {} results, {} confirmed, {} strikes",
            n.key.short(),
            n.completed,
            n.confirmed,
            n.strikes
        );
        if n.key == liar_key {
            if n.completed > 0 {
                assert!(n.strikes >= 1, "the liar is caught: {n:?}");
            }
        } else {
            assert_eq!(n.strikes, 0, "honest nodes are never blamed: {n:?}");
        }
    }
    assert!(
        status.verification.executed >= 6,
        "{:?}",
        status.verification
    );
    // Decoys were answered, by real models, and none was accepted.
    assert!(status.verification.decoys >= 1, "{:?}", status.verification);
    assert_eq!(
        status.verification.decoys_accepted, 0,
        "{:?}",
        status.verification
    );

    // Every result, after checks, is what a local run gives.
    let (sb, local) = llm::summarize_sandbox(None, 1);
    for (i, input) in inputs.iter().enumerate() {
        let r = client.task_record(job, i as u32).await?;
        let want = llm::run(&sb, &local, "local", input, None, Default::default())
            .result
            .expect("local summary");
        assert_eq!(record_output(&r), want, "task {}", r.index);
    }
    for n in nodes {
        n.kill();
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}
