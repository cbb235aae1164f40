//! Verification on real parts: nodes on loopback QUIC running the real
//! embed job on the real model, some of them lying (`tidepool_tests::adversary`),
//! the pool re-executing, replacing and penalising; challenges; and a long
//! run of honest nodes that must raise no false alarm.

use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tidepool_client::PoolClient;
use tidepool_pool::verify::VerifyPolicy;
use tidepool_pool::PoolEvent;
use tidepool_proto::ledger::{LedgerQuery, RowState};
use tidepool_proto::wire::ChallengeState;
use tidepool_proto::wire::PoolSummary;
use tidepool_proto::PublicKey;
use tidepool_tests::adversary::{Adversary, Lie, OtherModel};
use tidepool_tests::cluster::*;
use tidepool_tests::*;

/// Wait until no re-execution is pending.
async fn settle(client: &PoolClient, timeout: Duration) -> Result<PoolSummary> {
    let start = std::time::Instant::now();
    loop {
        let s = client.pool_status().await?;
        if s.verification.pending == 0 && s.queued == 0 && s.leased == 0 {
            return Ok(s);
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "checks still pending after {timeout:?}: {:?}",
            s.verification
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn policy(seed: u8) -> VerifyPolicy {
    VerifyPolicy {
        secret: Some([seed; 32]),
        canary_rate: 0.0,
        ..VerifyPolicy::default()
    }
}

/// Four kinds of liar among two trusted honest nodes, all new (so every
/// result is re-executed): each liar is caught, every wrong result is
/// replaced by the honest one, and no honest node is blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lying_nodes_are_caught_and_every_wrong_result_replaced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(21);
    let mut cfg = test_pool_config(&keys);
    cfg.verify = policy(21);
    // Reputation held at its start (10000): every result of every node is
    // re-executed, so each lie is caught (the sampling rule itself is
    // measured in pool/tests/verification.rs).
    cfg.verify.step = 0;
    cfg.verify.trusted = [keys.node(0).public(), keys.node(1).public()].into();
    cfg.verify.trusted_reputation = tidepool_pool::verify::FULL;
    // The publisher is the pool's owner here: it exports the ledger.
    cfg.admins.insert(keys.publisher.public());
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let mut events = pool.events();
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let inputs = embed_inputs(&corpus(80)?);
    let (job, _) = client.submit(digest, inputs.clone(), "lies".into()).await?;

    let lies = [
        Lie::AlwaysWrong,
        Lie::WrongWithP(0.5),
        Lie::Replay,
        Lie::Truncate,
    ];
    let mut nodes = Vec::new();
    let mut liar_keys: BTreeMap<PublicKey, String> = BTreeMap::new();
    for (i, lie) in lies.iter().enumerate() {
        let i = 2 + i as u8;
        let mut c = node_config(dir.path(), &keys, i, pool.addr);
        c.tamper = Some(Arc::new(Adversary::new(*lie, u64::from(i))));
        liar_keys.insert(c.key.public(), format!("{lie:?}"));
        nodes.push(start_node(c));
    }
    // A fifth liar runs another model (all-MiniLM-L6-v2) than the bundle's.
    let mut c = node_config(dir.path(), &keys, 6, pool.addr);
    c.tamper = Some(Arc::new(
        tokio::task::spawn_blocking(OtherModel::load).await??,
    ));
    liar_keys.insert(c.key.public(), "OtherModel".into());
    nodes.push(start_node(c));
    for i in 0..2 {
        nodes.push(start_node(node_config(dir.path(), &keys, i, pool.addr)));
    }
    wait_job(&client, job, Duration::from_secs(300)).await?;
    let status = settle(&client, Duration::from_secs(300)).await?;

    // Every result is the honest one.
    let want = tokio::task::spawn_blocking({
        let inputs = inputs.clone();
        move || local_embed_outputs(&inputs)
    })
    .await?;
    let records = client.job_results(job).await?;
    let wrong: Vec<String> = records
        .iter()
        .zip(&want)
        .filter(|(r, w)| record_output(r) != **w)
        .map(|(r, _)| {
            format!(
                "task {} by {:?}: {} {:?}",
                r.task,
                r.node.and_then(|k| liar_keys.get(&k)),
                r.verification,
                r.challenge
            )
        })
        .collect();
    assert!(wrong.is_empty(), "wrong results left: {wrong:#?}");
    // A result carrying a liar's key (one of its honest moments, e.g. the
    // coin of `WrongWithP`) stands only where another execution agreed.
    // (Every result is re-executed here; none may be left unchecked.)
    for r in &records {
        assert!(
            !liar_keys.contains_key(&r.node.expect("node"))
                || r.verification == "verified"
                || r.verification == "replaced",
            "a liar's result stands unchecked: {r:?}"
        );
    }
    // Each liar caught, honest nodes never.
    let mut caught: BTreeMap<PublicKey, u32> = BTreeMap::new();
    while let Ok(e) = events.try_recv() {
        if let PoolEvent::Caught { node, .. } = e {
            *caught.entry(node).or_default() += 1;
        }
    }
    for n in &status.nodes {
        match liar_keys.get(&n.key) {
            Some(lie) => {
                assert!(n.strikes >= 1, "{lie} not caught: {n:?}");
                eprintln!(
                    "{lie}: {} strike(s), {} result(s) accepted, reputation {}",
                    n.strikes, n.completed, n.reputation
                );
            }
            None => {
                assert_eq!(n.strikes, 0, "honest node blamed: {n:?}");
                assert!(!caught.contains_key(&n.key));
            }
        }
    }
    assert!(
        status.verification.replaced >= 1,
        "{:?}",
        status.verification
    );
    eprintln!("verification: {:?}", status.verification);

    // The ledger of the run, as the pool's owner exports it.
    let query = LedgerQuery {
        since: 0,
        until: u64::MAX,
        node: None,
    };
    let statement = client.ledger(query.clone(), |_| {}).await?;
    let checked = statement.verify(Some(&keys.pool.public()))?;
    // Every task's standing result is one row; every row of a liar that
    // stands is a right answer, and its wrong ones are withdrawn.
    let standing = checked
        .rows
        .iter()
        .filter(|r| r.state != RowState::Withdrawn)
        .count();
    assert_eq!(standing, inputs.len(), "one standing result per task");
    for r in &checked.rows {
        let body = r.receipt.open(&r.node)?;
        let right = tidepool_proto::Digest::of(&want[r.index as usize]);
        match r.state {
            RowState::Withdrawn => {
                assert!(
                    liar_keys.contains_key(&r.node),
                    "honest result withdrawn: {r:?}"
                );
                assert_ne!(body.receipt.output, right, "a right result withdrawn");
            }
            _ => assert_eq!(body.receipt.output, right, "a wrong result earns: {r:?}"),
        }
    }
    for (node, t) in &checked.totals {
        eprintln!(
            "ledger {}: {t:?}",
            liar_keys.get(node).map_or("honest", String::as_str)
        );
        if !liar_keys.contains_key(node) {
            assert_eq!(t.withdrawn, 0, "honest node lost credit: {t:?}");
        }
    }
    let withdrawn: u64 = checked.totals.values().map(|t| t.withdrawn).sum();
    assert!(withdrawn >= 1, "{:?}", checked.totals);
    // Credited work is metered: the engine ran for each credited result.
    for t in checked.totals.values().filter(|t| t.credited > 0) {
        assert!(
            t.metering.computes as u64 >= t.credited && t.metering.compute_us > 0,
            "{t:?}"
        );
    }
    // A row changed after signing does not check out.
    let mut tampered = statement.clone();
    let row = tampered
        .rows
        .iter_mut()
        .find(|r| r.state == RowState::Withdrawn)
        .expect("a withdrawn row");
    row.state = RowState::Credited;
    let e = tampered.verify(None).expect_err("tampered row");
    assert!(e.to_string().contains("not what the pool signed"), "{e}");

    // A liar reads its own statement with its own key: the same totals.
    let (liar, _) = liar_keys.iter().next().expect("a liar");
    let liar_key = (2..7)
        .map(|i| keys.node(i))
        .find(|k| k.public() == *liar)
        .expect("liar key");
    let own = PoolClient::connect_account(pool.addr, &liar_key, keys.pool.public()).await?;
    let mine = own
        .ledger(
            LedgerQuery {
                node: Some(*liar),
                ..query.clone()
            },
            |_| {},
        )
        .await?;
    mine.verify(Some(&keys.pool.public()))?;
    assert_eq!(mine.totals.get(liar), checked.totals.get(liar));
    // ... and nobody else's, nor can it do anything else on that connection.
    let e = own
        .ledger(query.clone(), |_| {})
        .await
        .expect_err("another node's rows");
    assert!(e.to_string().contains("only the pool's admins"), "{e}");
    let e = own
        .pool_status()
        .await
        .expect_err("status on an account connection");
    assert!(e.to_string().contains("not allowed"), "{e}");
    own.close().await;

    for n in nodes {
        n.kill();
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A deterministic job whose output is its task id, its hash seed and its
/// virtual clocks (`env-probe`), tier `exact`, every result re-executed, on
/// three honest nodes over QUIC: every re-execution sees the original's
/// identity and confirms it — no mismatch, no strike. (Before task
/// identities, 20 of 20 re-executions disagreed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn honest_re_executions_of_a_seeded_job_all_confirm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(27);
    let mut cfg = test_pool_config(&keys);
    cfg.verify = policy(27);
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let bundle = guest_bundle(
        &dir.path().join("author"),
        &keys,
        "env-probe",
        "[determinism]\ntier = \"exact\"\n\n[verification]\nsampling = \"always\"\n",
    )?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let inputs: Vec<Vec<u8>> = (0..20).map(|i| format!("probe {i}").into_bytes()).collect();
    let (job, _) = client.submit(digest, inputs, "probe".into()).await?;
    let nodes: Vec<TestNode> = (0..3)
        .map(|i| start_node(node_config(dir.path(), &keys, i, pool.addr)))
        .collect();
    wait_job(&client, job, Duration::from_secs(120)).await?;
    let status = settle(&client, Duration::from_secs(120)).await?;
    let v = &status.verification;
    assert_eq!(
        (v.executed, v.confirmed, v.mismatches, v.replaced),
        (20, 20, 0, 0),
        "{v:?}"
    );
    assert!(
        status.nodes.iter().all(|n| n.strikes == 0),
        "{:?}",
        status.nodes
    );
    let records = client.job_results(job).await?;
    let mut identities = std::collections::BTreeSet::new();
    for r in &records {
        assert_eq!(r.verification, "verified", "{r:?}");
        let out: serde_json::Value = serde_json::from_slice(&record_output(r))?;
        let task = out["task"].as_str().unwrap_or_default().to_owned();
        assert_eq!(task.len(), 32, "an opaque identity, not a row id: {out}");
        assert_ne!(out["hash"], serde_json::Value::Null, "{out}");
        identities.insert(task);
    }
    assert_eq!(identities.len(), 20, "one identity per task");
    for n in nodes {
        n.kill();
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// Two, then three, colluding fresh keys that tell the same lie, against
/// an honest fresh node, over QUIC, with the pool's two trusted nodes not
/// yet connected: the honest node is never struck or banned and none of
/// its results is replaced (they wait, `checking` or `disputed`); once the
/// trusted nodes connect they decide, every one of the honest node's
/// results is `verified`, the colluders that checked against it are
/// struck, and their own lies — some confirmed by each other while no
/// node with a record was about — are re-checked when they are struck and
/// end replaced (or `disputed`, never confirmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn colluding_fresh_keys_cannot_frame_an_honest_node() -> Result<()> {
    for colluders in [2u8, 3] {
        let dir = tempfile::tempdir()?;
        let keys = Keys::new(40 + colluders);
        let mut cfg = test_pool_config(&keys);
        cfg.verify = policy(40 + colluders);
        cfg.verify.trusted = [keys.node(0).public(), keys.node(8).public()].into();
        let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
        let mut events = pool.events();
        let bundle = guest_bundle(&dir.path().join("author"), &keys, "env-probe", "")?;
        let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
        let inputs: Vec<Vec<u8>> = (0..24).map(|i| format!("input {i}").into_bytes()).collect();
        let (job, _) = client.submit(digest, inputs, "framed".into()).await?;
        let victim = keys.node(1).public();
        let mut nodes = vec![start_node(node_config(dir.path(), &keys, 1, pool.addr))];
        for i in 0..colluders {
            let mut c = node_config(dir.path(), &keys, 2 + i, pool.addr);
            // The same seed: the same lie.
            c.tamper = Some(Arc::new(Adversary::new(Lie::AlwaysWrong, 7)));
            nodes.push(start_node(c));
        }
        wait_job(&client, job, Duration::from_secs(120)).await?;
        // The colluders take the checks of the honest node's results; the
        // decisions wait for a node that may decide.
        let start = std::time::Instant::now();
        let mut last = None;
        loop {
            let s = client.pool_status().await?;
            // Settled: nothing leased, checks waiting, and nothing moved
            // for half a second (nodes ask every 50 ms).
            let now = (s.queued, s.verification.executed);
            if s.leased == 0 && !s.checks_waiting.is_empty() && last == Some(now) {
                break;
            }
            last = Some(now);
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "checks did not settle: {:?} {:?}",
                s.verification,
                s.checks_waiting
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let before = client.job_results(job).await?;
        let victims: Vec<_> = before
            .iter()
            .filter(|r| r.node == Some(victim))
            .cloned()
            .collect();
        anyhow::ensure!(!victims.is_empty(), "the honest node ran nothing");
        let status = client.pool_status().await?;
        let v = status
            .nodes
            .iter()
            .find(|n| n.key == victim)
            .expect("victim");
        assert_eq!((v.strikes, v.banned), (0, false), "{colluders}: {v:?}");
        for r in &victims {
            assert!(
                r.verification == "checking" || r.verification == "disputed",
                "{colluders}: {r:?}"
            );
        }
        // The trusted nodes connect and decide.
        for i in [0, 8] {
            nodes.push(start_node(node_config(dir.path(), &keys, i, pool.addr)));
        }
        let status = settle(&client, Duration::from_secs(120)).await?;
        let v = status
            .nodes
            .iter()
            .find(|n| n.key == victim)
            .expect("victim");
        assert_eq!((v.strikes, v.banned), (0, false), "{colluders}: {v:?}");
        let after = client.job_results(job).await?;
        for r in &victims {
            let now = &after[r.index as usize];
            assert_eq!(now.node, Some(victim), "{colluders}: replaced: {now:?}");
            assert_eq!(now.outcome, r.outcome, "{colluders}");
            assert_eq!(now.verification, "verified", "{colluders}: {now:?}");
        }
        // The colluders' own results (always lies): none stands confirmed.
        let colluder_keys: Vec<PublicKey> =
            (0..colluders).map(|i| keys.node(2 + i).public()).collect();
        for r in &after {
            if r.node.is_some_and(|k| colluder_keys.contains(&k)) {
                assert!(
                    r.verification == "disputed" || r.verification == "checking",
                    "{colluders}: a colluder's lie stands: {r:?}"
                );
            }
        }
        let mut caught = std::collections::BTreeSet::new();
        while let Ok(e) = events.try_recv() {
            if let PoolEvent::Caught { node, .. } = e {
                caught.insert(node);
            }
        }
        assert!(!caught.contains(&victim));
        assert!(!caught.is_empty(), "{colluders}: no colluder was struck");
        eprintln!(
            "{colluders} colluders: {} of their keys struck; {:?}",
            caught.len(),
            status.verification
        );
        for n in nodes {
            n.kill();
        }
        client.close().await;
        pool.shutdown().await;
    }
    Ok(())
}

/// The submitter challenges a wrong result (replaced) and a right one (left).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn challenges_replace_a_wrong_result_and_leave_a_right_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(22);
    let mut cfg = test_pool_config(&keys);
    cfg.verify = VerifyPolicy {
        initial_reputation: 0, // as if long trusted: results are rarely checked
        // The honest nodes are the pool owner's: a strike needs one of them.
        trusted: [keys.node(1).public(), keys.node(2).public()].into(),
        ..policy(22)
    };
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let inputs = embed_inputs(&corpus(12)?);
    let want = tokio::task::spawn_blocking({
        let inputs = inputs.clone();
        move || local_embed_outputs(&inputs)
    })
    .await?;
    // Two jobs: the liar alone answers the first, then it stops and two
    // honest nodes answer the second, so each side surely answers some
    // tasks (one job shared by all three raced: the liar could answer every
    // task before the honest nodes had connected).
    let (first, second) = inputs.split_at(6);
    let (job, _) = client.submit(digest, first.to_vec(), "c".into()).await?;
    let mut liar_cfg = node_config(dir.path(), &keys, 0, pool.addr);
    liar_cfg.tamper = Some(Arc::new(Adversary::new(Lie::AlwaysWrong, 1)));
    let liar_key = liar_cfg.key.public();
    let liar = start_node(liar_cfg);
    wait_job(&client, job, Duration::from_secs(120)).await?;
    liar.drain().await?;
    let (job2, _) = client.submit(digest, second.to_vec(), "c2".into()).await?;
    let honest: Vec<_> = (1..3)
        .map(|i| start_node(node_config(dir.path(), &keys, i, pool.addr)))
        .collect();
    wait_job(&client, job2, Duration::from_secs(120)).await?;
    let bad = client
        .job_results(job)
        .await?
        .into_iter()
        .find(|r| r.node == Some(liar_key))
        .expect("the liar answered a task");
    let good = client
        .job_results(job2)
        .await?
        .into_iter()
        .find(|r| r.node.is_some() && r.node != Some(liar_key))
        .expect("an honest answer");
    let (bad_want, good_want) = (&want[bad.index as usize], &want[6 + good.index as usize]);
    assert_ne!(&record_output(&bad), bad_want, "the liar lied");

    for (r, want, expect) in [
        (&bad, bad_want, ChallengeState::Upheld),
        (&good, good_want, ChallengeState::Rejected),
    ] {
        let c = client.challenge(r.task).await?;
        assert_eq!(c.state, ChallengeState::Pending);
        let start = std::time::Instant::now();
        let rec = loop {
            let rec = client.task_record(c.job, c.index).await?;
            if rec.challenge != Some(ChallengeState::Pending) {
                break rec;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "undecided: {rec:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(rec.challenge, Some(expect), "{rec:?}");
        assert_eq!(&record_output(&rec), want, "task {}", r.task);
        if r.task == good.task {
            assert_eq!(rec.node, good.node, "a right result is left as it was");
            assert_eq!(rec.verification, "verified");
        } else {
            assert_ne!(rec.node, Some(liar_key));
            assert_eq!(rec.verification, "replaced");
        }
    }
    let status = client.pool_status().await?;
    let l = status
        .nodes
        .iter()
        .find(|n| n.key == liar_key)
        .expect("liar");
    assert!(l.strikes >= 1 && l.quarantined_until > 0, "{l:?}");
    for n in honest {
        n.kill();
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// No false positives: >= 10,000 distinct real texts on three honest nodes,
/// every node new (checked at first on every result, then less and less).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: 10,000 real embeddings plus their re-executions (run by `cargo xtask test`)"]
async fn ten_thousand_honest_tasks_raise_no_false_alarm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(23);
    let mut cfg = test_pool_config(&keys);
    cfg.verify = policy(23);
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let mut events = pool.events();
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let inputs = embed_inputs(&many_texts(10_000)?);
    let (job, n) = client.submit(digest, inputs, "honest".into()).await?;
    assert_eq!(n, 10_000);
    let nodes: Vec<_> = (0..3)
        .map(|i| start_node(node_config(dir.path(), &keys, i, pool.addr)))
        .collect();
    let summary = wait_job(&client, job, Duration::from_secs(1800)).await?;
    assert_eq!((summary.done, summary.dead), (n, 0));
    let status = settle(&client, Duration::from_secs(600)).await?;
    let v = status.verification;
    eprintln!("verification over {n} honest tasks: {v:?}");
    for node in &status.nodes {
        eprintln!(
            "node {}: {} results, {} confirmed, reputation {}, sampling {:.2}%",
            node.key.short(),
            node.completed,
            node.confirmed,
            node.reputation,
            node.sampling * 100.0
        );
        assert_eq!(node.strikes, 0, "false positive: {node:?}");
    }
    assert_eq!(v.mismatches, 0, "{v:?}");
    assert_eq!(v.replaced, 0, "{v:?}");
    assert!(v.confirmed >= 3 * 180, "{v:?}");
    while let Ok(e) = events.try_recv() {
        assert!(!matches!(e, PoolEvent::Caught { .. }), "{e:?}");
    }
    let records = client.job_results(job).await?;
    assert!(records
        .iter()
        .all(|r| r.verification == "verified" || r.verification == "unverified"));
    for n in nodes {
        n.drain().await?;
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}
