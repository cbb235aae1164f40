//! The pool and its nodes over real QUIC on loopback, with a real SQLite
//! file, real signatures, and the real embed job on the real model.

use anyhow::Result;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidepool_pool::PoolEvent;
use tidepool_tests::cluster::*;
use tidepool_tests::*;

/// The headline: three nodes finish >= 1,000 embed tasks and every
/// result equals a local run of the same input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: 1,000 real embeddings twice (run by `cargo xtask test`)"]
async fn three_nodes_finish_a_thousand_embed_tasks_equal_to_local_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(1);
    let pool = start_pool(
        &dir.path().join("pool"),
        &keys,
        test_pool_config(&keys),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let texts = corpus(1000)?;
    let inputs = embed_inputs(&texts);
    let (job, n) = client
        .submit(digest, inputs.clone(), "batch-1".into())
        .await?;
    assert_eq!(n as usize, inputs.len());
    let nodes: Vec<_> = (0..3)
        .map(|i| start_node(node_config(dir.path(), &keys, i, pool.addr)))
        .collect();
    let summary = wait_job(&client, job, Duration::from_secs(600)).await?;
    assert_eq!((summary.done, summary.dead), (n, 0), "{summary:?}");
    let records = client.job_results(job).await?;
    assert_eq!(records.len(), 1000);
    let want = tokio::task::spawn_blocking(move || local_embed_outputs(&inputs)).await?;
    let got = record_outputs(&records);
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
    let (job, n) = client
        .submit(digest, inputs.clone(), "batch".into())
        .await?;

    let victim = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    let victim_key = victim.key;
    // Let the victim take leases and finish a few tasks.
    let start = Instant::now();
    loop {
        let s = client.job_status(job).await?;
        if s.done >= 4 && s.running > 0 {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "victim never got going: {s:?}"
        );
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
        if s.finished() {
            break s;
        }
        anyhow::ensure!(
            killed_at.elapsed() < Duration::from_secs(300),
            "not finished: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((summary.done, summary.dead), (n, 0));
    assert!(!requeued.is_empty(), "the victim held leases when killed");
    let worst = requeued.iter().max().copied().unwrap_or_default();
    eprintln!(
        "kill -> requeue: {} leases, {:?} .. {:?} (lease TTL {ttl:?})",
        requeued.len(),
        requeued.iter().min(),
        worst
    );
    assert!(
        worst <= ttl + Duration::from_secs(2),
        "requeue took {worst:?}, TTL is {ttl:?}"
    );

    let records = client.job_results(job).await?;
    let want = tokio::task::spawn_blocking(move || local_embed_outputs(&inputs)).await?;
    assert_eq!(record_outputs(&records), want);
    assert!(
        records.iter().any(|r| r.attempts >= 2),
        "some task ran a second attempt"
    );
    survivor.drain().await?;
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// Garbage datagrams, garbage and oversized frames, requests before the
/// hello, silent connections and a wrong pinned key: each such peer gets its
/// connection closed (or never connects) and the pool goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_closed_and_the_pool_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(3);
    let mut cfg = test_pool_config(&keys);
    cfg.hello_timeout = Duration::from_millis(500);
    let pool = start_pool(dir.path(), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let good = tidepool_client::PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public())
        .await?;

    // Not QUIC at all.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    for i in 0..50u8 {
        udp.send_to(&[i; 1200], pool.addr)?;
    }

    let stranger = tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Client, &[77; 32]);
    let ep = tidepool_net::client(&stranger, keys.pool.public())?;
    let raw = |bytes: Vec<u8>| {
        let ep = ep.clone();
        let addr = pool.addr;
        async move {
            let conn = tidepool_net::connect(&ep, addr).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&bytes).await?;
            let _ = send.finish();
            let answer: Option<tidepool_proto::wire::Response> =
                tidepool_net::read_frame(&mut recv).await.ok().flatten();
            anyhow::Ok((closed_reason(&conn).await, answer))
        }
    };
    let mut garbage = 9u32.to_be_bytes().to_vec();
    garbage.extend([0xc1; 9]);
    let (reason, answer) = raw(garbage).await?;
    assert!(reason.contains("malformed frame"), "{reason}");
    assert!(
        matches!(answer, Some(tidepool_proto::wire::Response::Error { .. })),
        "{answer:?}"
    );

    let (reason, _) = raw(u32::MAX.to_be_bytes().to_vec()).await?;
    assert!(reason.contains("over the limit"), "{reason}");

    let (reason, _) = raw(tidepool_proto::wire::encode(
        &tidepool_proto::wire::Request::PoolStatus,
    )?)
    .await?;
    assert!(reason.contains("before hello"), "{reason}");

    // Half-open: connected, never says anything.
    let silent = tidepool_net::connect(&ep, pool.addr).await?;
    let reason = closed_reason(&silent).await;
    assert!(reason.contains("no hello"), "{reason}");

    // A hello with a future protocol version.
    let conn = tidepool_net::connect(&ep, pool.addr).await?;
    let r: tidepool_proto::wire::Response = tidepool_net::call(
        &conn,
        &tidepool_proto::wire::Request::ClientHello {
            protocol: 99,
            agent: "future".into(),
        },
    )
    .await?;
    assert!(
        format!("{r:?}").contains("protocol version 99 is not supported"),
        "{r:?}"
    );

    // A client that pins another key never gets through the handshake.
    let wrong = tidepool_net::client(&stranger, stranger.public())?;
    let err = tidepool_net::connect(&wrong, pool.addr)
        .await
        .expect_err("wrong pool key");
    assert!(err.to_string().contains("not the expected"), "{err}");

    // A key the pool does not know may not act as a client.
    let err = tidepool_client::PoolClient::connect(pool.addr, &stranger, keys.pool.public())
        .await
        .expect_err("unknown client");
    assert!(err.to_string().contains("may not use this pool"), "{err}");

    // Meanwhile the good client was served all along.
    let s = good.pool_status().await?;
    assert_eq!(s.jobs.len(), 0);
    good.close().await;
    pool.shutdown().await;
    Ok(())
}

/// In allowlist mode an unknown node is refused with a clear error; a
/// listed node is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_refuses_unknown_nodes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(4);
    let mut cfg = test_pool_config(&keys);
    cfg.admission = tidepool_pool::Admission::Allowlist([keys.node(0).public()].into());
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let err = tidepool_node::run(
        node_config(dir.path(), &keys, 1, pool.addr),
        std::future::pending(),
    )
    .await
    .expect_err("not on the allowlist");
    assert!(
        err.to_string().contains("is not on this pool's allowlist"),
        "{err}"
    );
    let admitted = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = admitted.drain().await?;
    assert_eq!(report.connections, 1);
    pool.shutdown().await;
    Ok(())
}

/// Arbitrary bytes (empty, binary, large) go through pool, node and guest
/// and come back unchanged, in input order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trips_arbitrary_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(5);
    let pool = start_pool(
        &dir.path().join("pool"),
        &keys,
        test_pool_config(&keys),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0xff; 1000],
        (0..=255u8).collect(),
        vec![7; 3 << 20],
    ];
    inputs.extend((0..40u32).map(|i| i.to_le_bytes().repeat(i as usize)));
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    let (job, _) = client.submit(digest, inputs.clone(), "echo".into()).await?;
    wait_job(&client, job, Duration::from_secs(60)).await?;
    assert_eq!(record_outputs(&client.job_results(job).await?), inputs);
    node.drain().await?;
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// The pool stops and comes back on the same address and data directory:
/// the node reconnects by itself and the batch finishes with the right results.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_reconnect_after_a_pool_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(6);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let pool_dir = dir.path().join("pool");
    let pool = start_pool(&pool_dir, &keys, test_pool_config(&keys), addr).await?;
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(addr, &keys, &bundle).await?;
    let inputs = embed_inputs(&fortunes(40)?);
    let (job, _) = client
        .submit(digest, inputs.clone(), "restart".into())
        .await?;
    let node = start_node(node_config(dir.path(), &keys, 0, addr));
    loop {
        if client.job_status(job).await?.done >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    pool.shutdown().await;
    // Shutdown releases the socket: the same address binds again at once.
    let pool = start_pool(&pool_dir, &keys, test_pool_config(&keys), addr).await?;
    let client =
        tidepool_client::PoolClient::connect(addr, &keys.publisher, keys.pool.public()).await?;
    let s = wait_job(&client, job, Duration::from_secs(120)).await?;
    assert_eq!((s.done, s.dead), (40, 0));
    let want = tokio::task::spawn_blocking(move || local_embed_outputs(&inputs)).await?;
    assert_eq!(record_outputs(&client.job_results(job).await?), want);
    let report = node.drain().await?;
    assert!(report.connections >= 2, "{report:?}");
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A repeated (bundle, input) is answered from the pool's result cache: the
/// same bytes as the original, with its provenance, while no node is connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_return_the_original_bytes_without_any_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(7);
    let pool = start_pool(
        &dir.path().join("pool"),
        &keys,
        test_pool_config(&keys),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let (_, bundle) = embed_bundle(&dir.path().join("author"), &keys, "1.0.0")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let inputs = embed_inputs(&fortunes(6)?);
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    let (first, _) = client
        .submit(digest, inputs.clone(), "first".into())
        .await?;
    wait_job(&client, first, Duration::from_secs(120)).await?;
    let report = node.drain().await?;
    assert_eq!(report.completed, 6);
    let original = client.job_results(first).await?;

    // No node connected now.
    let (second, _) = client
        .submit(digest, inputs.clone(), "second".into())
        .await?;
    let s = client.job_status(second).await?;
    assert_eq!((s.done, s.cached), (6, 6), "{s:?}");
    let cached = client.job_results(second).await?;
    assert_eq!(record_outputs(&cached), record_outputs(&original));
    for (c, o) in cached.iter().zip(&original) {
        assert_eq!(c.cached_from, Some(o.task));
    }
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A batch larger than one frame (4,000 inputs of 5 KB: 20 MB) goes in
/// chunks over QUIC. The first client fails part-way (its input source
/// breaks after 1,500 inputs) and its connection closes; a second
/// connection with the same key finds the job holding what arrived,
/// sends only the rest, and seals it. Nodes run it meanwhile; every
/// result comes back exactly once, in order, equal to its input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_larger_than_a_frame_is_sent_in_chunks_and_resumed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(7);
    let pool = start_test_pool(dir.path(), &keys).await?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let inputs: Vec<Vec<u8>> = (0..4000u32)
        .map(|i| {
            let mut line = format!("{{\"n\":{i},\"text\":\"").into_bytes();
            line.resize(5000 - 2, b'a' + (i % 26) as u8);
            line.extend_from_slice(b"\"}");
            line
        })
        .collect();
    let total: usize = inputs.iter().map(Vec::len).sum();
    assert!(total > tidepool_proto::wire::MAX_FRAME_BYTES, "{total}");
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    // The source breaks after 1,500 inputs (chunks of 1 MiB: 209 inputs).
    let broken = inputs
        .iter()
        .take(1500)
        .cloned()
        .map(Ok)
        .chain(std::iter::once(Err(
            tidepool_client::ClientError::Unexpected("the input file went away".into()),
        )));
    let mut held = Vec::new();
    let err = client
        .submit_chunked(digest, "big".into(), 0, broken, 1 << 20, |h| held.push(h))
        .await
        .expect_err("the source broke");
    assert!(err.to_string().contains("went away"), "{err}");
    let reached = *held.last().expect("progress");
    assert!(reached > 0 && reached < 1500, "{held:?}");
    client.close().await;

    let client =
        tidepool_client::PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public())
            .await?;
    let mut resumed = Vec::new();
    let (job, n) = client
        .submit_chunked(
            digest,
            "big".into(),
            0,
            inputs.iter().cloned().map(Ok),
            1 << 20,
            |h| resumed.push(h),
        )
        .await?;
    assert_eq!(n, 4000);
    assert_eq!(
        resumed.first(),
        Some(&reached),
        "resumed where the pool stopped"
    );
    // The same batch again: the same job, nothing sent.
    let again = client
        .submit_chunked(
            digest,
            "big".into(),
            0,
            inputs.iter().cloned().map(Ok),
            1 << 20,
            |_| {},
        )
        .await?;
    assert_eq!(again, (job, 4000));
    let s = wait_job(&client, job, Duration::from_secs(300)).await?;
    assert_eq!((s.done, s.dead, s.open), (4000, 0, false), "{s:?}");
    let records = client.job_results(job).await?;
    assert_eq!(records.len(), 4000);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.index as usize, i);
    }
    assert!(
        record_outputs(&records) == inputs,
        "every output equals its input"
    );
    node.drain().await?;
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// Fair share over QUIC with real nodes: one client submits 100,000 echo
/// tasks, another 100 a second later. The small job finishes after about
/// its own size of the big job's tasks (plus what the nodes already held),
/// not after the big job; then the big job is still mostly waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_job_finishes_beside_a_big_one_of_another_client() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(9);
    // Not the publisher's seed (a key is its seed, whatever its role).
    let small_key =
        tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Client, &[77; 32]);
    let mut cfg = test_pool_config(&keys);
    cfg.clients.insert(small_key.public());
    let max_leases = cfg.leasing.max_leases;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (big_client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let big_inputs: Vec<Vec<u8>> = (0..100_000u32)
        .map(|i| format!("big {i}").into_bytes())
        .collect();
    let (big, _) = big_client.submit(digest, big_inputs, "big".into()).await?;
    let nodes: Vec<_> = (0..2)
        .map(|i| start_node(node_config(dir.path(), &keys, i, pool.addr)))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let small_client =
        tidepool_client::PoolClient::connect(pool.addr, &small_key, keys.pool.public()).await?;
    let small_inputs: Vec<Vec<u8>> = (0..100u32)
        .map(|i| format!("small {i}").into_bytes())
        .collect();
    let before = big_client.job_status(big).await?.done;
    let (small, _) = small_client
        .submit(digest, small_inputs.clone(), "small".into())
        .await?;
    let s = wait_job(&small_client, small, Duration::from_secs(120)).await?;
    let after = big_client.job_status(big).await?;
    assert_eq!((s.done, s.dead), (100, 0), "{s:?}");
    let between = after.done - before;
    // Fair share: about 100 of the big job's tasks beside the small job's
    // 100, plus the leases the two nodes held when it arrived.
    let bound = 100 + 2 * max_leases + 100;
    eprintln!("big job tasks done while the small job's 100 ran: {between} (bound {bound})");
    assert!(
        between <= bound,
        "{between} > {bound}: the small job waited behind the big one"
    );
    assert!(after.done < 50_000, "{after:?}");
    assert_eq!(
        record_outputs(&small_client.job_results(small).await?),
        small_inputs
    );
    for n in nodes {
        n.kill();
    }
    small_client.close().await;
    big_client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// `job cancel` over QUIC: a job of endless tasks (10 min each) fills the
/// node's two slots; cancelled, its tasks are dead-lettered at once, the
/// node hears it at its next renewal and stops them, and an echo job
/// submitted next finishes on the same node long before the endless tasks'
/// deadline — the slots were freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_job_frees_its_nodes_slots() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(11);
    let pool = start_test_pool(dir.path(), &keys).await?;
    let spin = guest_bundle_timed(&dir.path().join("spin"), &keys, "spin", 600_000, "")?;
    let echo = echo_bundle(&dir.path().join("echo"), &keys)?;
    let (client, spin_digest) = publish(pool.addr, &keys, &spin).await?;
    let echo_digest = client.publish(&echo, |_| {}).await?;
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    let (job, _) = client
        .submit(
            spin_digest,
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()],
            "spin".into(),
        )
        .await?;
    let start = Instant::now();
    while client.job_status(job).await?.running < 2 {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(120), "never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (waiting, running) = client.cancel_job(job).await?;
    // The node may hold one waiting behind its slots.
    assert!(
        waiting + running == 3 && running >= 2,
        "{waiting} {running}"
    );
    let s = client.job_status(job).await?;
    assert_eq!((s.dead, s.running, s.done), (3, 0, 0), "{s:?}");
    let inputs: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 10]).collect();
    let (next, _) = client
        .submit(echo_digest, inputs.clone(), "after".into())
        .await?;
    // Well before the endless tasks' 10-minute deadline.
    let s = wait_job(&client, next, Duration::from_secs(120)).await?;
    assert_eq!((s.done, s.dead), (6, 0), "{s:?}");
    assert_eq!(record_outputs(&client.job_results(next).await?), inputs);
    for r in client.job_results(job).await? {
        assert!(
            r.reasons.iter().any(|x| x.contains("cancelled by")),
            "{r:?}"
        );
    }
    let report = node.drain().await?;
    eprintln!("{report:?}");
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// Inputs and outputs of 10 MiB each, over QUIC on the echo job, beside a
/// job of 200 tiny tasks: the big inputs go in chunks of their own, a
/// lease answer carries one of them at a time, and the node that holds
/// several 10 MiB outputs sends them in requests under the frame limit —
/// both jobs finish with no dead letter and every output equals its input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_megabyte_inputs_and_outputs_finish_beside_tiny_tasks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(12);
    let pool = start_test_pool(dir.path(), &keys).await?;
    let bundle = guest_bundle_timed(&dir.path().join("author"), &keys, "echo", 60_000, "")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let big: Vec<Vec<u8>> = (0..4u8)
        .map(|i| {
            (0..10 << 20)
                .map(|j: u32| (j as u8) ^ i.wrapping_mul(37))
                .collect()
        })
        .collect();
    let tiny: Vec<Vec<u8>> = (0..200u32)
        .map(|i| format!("tiny {i}").into_bytes())
        .collect();
    let (big_job, _) = client.submit(digest, big.clone(), "big".into()).await?;
    let (tiny_job, _) = client.submit(digest, tiny.clone(), "tiny".into()).await?;
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    for (job, want) in [(big_job, &big), (tiny_job, &tiny)] {
        let s = wait_job(&client, job, Duration::from_secs(300)).await?;
        assert_eq!((s.done, s.dead), (want.len() as u32, 0), "{s:?}");
        assert!(
            record_outputs(&client.job_results(job).await?) == *want,
            "outputs equal inputs"
        );
    }
    let report = node.drain().await?;
    assert_eq!((report.failed, report.rejected), (0, 0), "{report:?}");
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// The largest item the limits allow (issue #18): an input of 16 MiB on
/// the echo job, whose output is then the manifest's largest
/// (`max_output_kib = 16384`), goes through chunked submission, a lease
/// answer and a results request, each within the frame limit. An input
/// that could not fit any frame is refused before anything is sent, with
/// its place and size named, and the pool holds no job for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_largest_item_the_limits_allow_finishes_and_a_larger_one_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(13);
    let pool = start_test_pool(dir.path(), &keys).await?;
    let bundle = guest_bundle_timed(&dir.path().join("author"), &keys, "echo", 60_000, "")?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
    let largest: Vec<u8> = (0..16u32 << 20).map(|j| (j % 251) as u8).collect();
    let (job, _) = client
        .submit(digest, vec![largest.clone()], "largest".into())
        .await?;
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    let s = wait_job(&client, job, Duration::from_secs(300)).await?;
    assert_eq!((s.done, s.dead), (1, 0), "{s:?}");
    assert!(
        record_outputs(&client.job_results(job).await?) == vec![largest],
        "the output equals the input"
    );

    let over: Vec<u8> = vec![7; (16 << 20) + (64 << 10)];
    let err = client
        .submit(digest, vec![b"small".to_vec(), over], "over".into())
        .await
        .expect_err("an input over every frame is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("input 1") && msg.contains("16842752"),
        "the refusal names the input and its size: {msg}"
    );
    let status = client.pool_status().await?;
    assert_eq!(status.jobs.len(), 1, "nothing was kept of the refused job");
    let report = node.drain().await?;
    assert_eq!((report.failed, report.rejected), (0, 0), "{report:?}");
    client.close().await;
    pool.shutdown().await;
    Ok(())
}
