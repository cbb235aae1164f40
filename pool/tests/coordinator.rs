//! The coordinator on a real SQLite file with simulated time and real
//! signatures: leases, fencing, expiry, dead letters, restarts, receipts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tidepool_pool::coordinator::{Admission, Coordinator, PoolConfig, PoolEvent};
use tidepool_pool::store::{Durability, SqliteStore};
use tidepool_proto::manifest::{AuthoredManifest, BlobRef, LockedManifest};
use tidepool_proto::wire::{
    Bytes, Capabilities, Gpu, LeaseId, Outcome, TaskGrant, TaskResult, TaskState, Verdict,
};
use tidepool_proto::{Digest, KeyRole, SecretKey};
use tidepool_testkit::{bundle, fake_node};

const NOW_UNIX: u64 = 1_800_000_000;

struct World {
    publisher: SecretKey,
    node_a: SecretKey,
    node_b: SecretKey,
    cfg: PoolConfig,
}

/// The client that submits the tests' jobs (and so owns them).
fn submitter() -> tidepool_proto::PublicKey {
    SecretKey::from_seed(KeyRole::Client, &[7; 32]).public()
}

fn world() -> World {
    let publisher = SecretKey::from_seed(KeyRole::Publisher, &[1; 32]);
    let mut cfg = PoolConfig {
        lease_ttl: Duration::from_secs(10),
        max_attempts: 3,
        ..PoolConfig::default()
    };
    cfg.publishers.insert(publisher.public());
    World {
        publisher,
        node_a: SecretKey::from_seed(KeyRole::Node, &[2; 32]),
        node_b: SecretKey::from_seed(KeyRole::Node, &[3; 32]),
        cfg,
    }
}

fn open(path: &Path, cfg: &PoolConfig) -> Coordinator<SqliteStore> {
    let store = SqliteStore::open(path, Durability::Process).expect("open store");
    Coordinator::new(store, cfg.clone(), &|_| true).expect("coordinator")
}

fn caps() -> Capabilities {
    Capabilities {
        encodings: vec!["onnx".into()],
        slots: 4,
        fetch_models: true,
        ..Capabilities::default()
    }
}

/// Publish a bundle with one onnx model; returns its digest and component digest.
fn publish(c: &mut Coordinator<SqliteStore>, w: &World) -> (Digest, Digest) {
    publish_with(c, w, "echo", "")
}

/// [`publish`] under another name, with extra manifest tables.
fn publish_with(
    c: &mut Coordinator<SqliteStore>,
    w: &World,
    name: &str,
    extra: &str,
) -> (Digest, Digest) {
    let signed = bundle::signed(&w.publisher, name, extra, NOW_UNIX);
    let (digest, missing) = c
        .handle_publish(NOW_UNIX, signed, &|_| true)
        .expect("publish");
    assert!(missing.is_empty());
    (digest, bundle::component().sha256)
}

/// What an honest node returns for a grant: the input reversed.
fn honest(key: &SecretKey, g: &TaskGrant, component: Digest) -> TaskResult {
    fake_node::answer(key, g, component, fake_node::reversed(&g.input.0), "test")
}

fn inputs(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("input {i}").into_bytes()).collect()
}

#[test]
fn results_are_accepted_once_and_resends_are_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let t0 = Instant::now();
    let (job, n) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "k1", &inputs(3))
        .expect("submit");
    assert_eq!(n, 3);
    // Same idempotency key: same job, no new tasks.
    assert_eq!(
        c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k1", &inputs(3))
            .expect("resubmit"),
        (job, 3)
    );
    assert_eq!(c.queued(), 3);

    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello");
    let (grants, lost) = c
        .handle_lease(t0, &w.node_a.public(), 10, &[])
        .expect("lease");
    assert_eq!(grants.len(), 3, "capped by nothing but the queue (4 slots)");
    assert!(lost.is_empty());
    assert!(grants.iter().all(|g| g.lease.attempt == 1));

    let results: Vec<_> = grants
        .iter()
        .map(|g| honest(&w.node_a, g, component))
        .collect();
    let v = c
        .handle_results(t0, &w.node_a.public(), results.clone())
        .expect("results");
    assert!(v.iter().all(|(_, v)| *v == Verdict::Accepted), "{v:?}");
    let v = c
        .handle_results(t0, &w.node_a.public(), results)
        .expect("resend");
    assert!(v.iter().all(|(_, v)| *v == Verdict::Duplicate), "{v:?}");

    let s = c.job_status(job).expect("status");
    assert_eq!((s.tasks, s.done, s.dead, s.running), (3, 3, 0, 0));
    assert!(matches!(c.poll_event(), Some(PoolEvent::JobFinished { job: j }) if j == job));
    let recs = c.job_results(job, 0, 100).expect("results");
    assert_eq!(recs.len(), 3);
    for (i, r) in recs.iter().enumerate() {
        let want: Vec<u8> = inputs(3)[i].iter().rev().copied().collect();
        assert_eq!(r.outcome, Some(Outcome::Output(Bytes(want))));
        assert_eq!(r.node, Some(w.node_a.public()));
    }
}

#[test]
fn expired_lease_requeues_with_a_new_attempt_and_fences_the_old_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let t0 = Instant::now();
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(1))
        .expect("submit");
    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello a");
    c.handle_node_hello(t0, w.node_b.public(), caps())
        .expect("hello b");
    let (ga, _) = c
        .handle_lease(t0, &w.node_a.public(), 1, &[])
        .expect("lease a");
    assert_eq!(ga.len(), 1);

    // A renews at 5 s; the lease now ends at 15 s.
    let t5 = t0 + Duration::from_secs(5);
    let (_, lost) = c
        .handle_lease(t5, &w.node_a.public(), 0, &[ga[0].lease])
        .expect("renew");
    assert!(lost.is_empty());
    assert_eq!(c.poll_timeout(), Some(t5 + w.cfg.lease_ttl));
    c.handle_timeout(t0 + Duration::from_secs(12))
        .expect("not yet");
    assert_eq!(c.leased(), 1);

    // A goes silent; at 15 s the task is back in the queue.
    let t15 = t5 + w.cfg.lease_ttl;
    c.handle_timeout(t15).expect("expire");
    assert_eq!((c.leased(), c.queued()), (0, 1));
    match c.poll_event() {
        Some(PoolEvent::Requeued {
            lease,
            node,
            at,
            last_renewed,
        }) => {
            assert_eq!(lease, ga[0].lease);
            assert_eq!(node, w.node_a.public());
            assert_eq!((at, last_renewed), (t15, t5));
        }
        other => panic!("expected a requeue, got {other:?}"),
    }
    // The retry goes to another node: A, asking first, gets nothing while
    // B can run it.
    let (again, _) = c
        .handle_lease(t15, &w.node_a.public(), 1, &[])
        .expect("lease a again");
    assert!(
        again.is_empty(),
        "the expired task went back to A: {again:?}"
    );
    let (gb, _) = c
        .handle_lease(t15, &w.node_b.public(), 1, &[])
        .expect("lease b");
    assert_eq!(
        gb[0].lease,
        LeaseId {
            task: ga[0].lease.task,
            attempt: 2
        }
    );

    // A wakes up: its renewal is refused and its late result is stale.
    let (_, lost) = c
        .handle_lease(t15, &w.node_a.public(), 0, &[ga[0].lease])
        .expect("late renew");
    assert_eq!(lost, vec![ga[0].lease]);
    let v = c
        .handle_results(
            t15,
            &w.node_a.public(),
            vec![honest(&w.node_a, &ga[0], component)],
        )
        .expect("late");
    assert_eq!(v[0].1, Verdict::Stale);
    let v = c
        .handle_results(
            t15,
            &w.node_b.public(),
            vec![honest(&w.node_b, &gb[0], component)],
        )
        .expect("b");
    assert_eq!(v[0].1, Verdict::Accepted);
}

#[test]
fn failing_tasks_are_dead_lettered_with_every_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, _) = publish(&mut c, &w);
    let mut t = Instant::now();
    let (job, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(1))
        .expect("submit");
    c.handle_node_hello(t, w.node_a.public(), caps())
        .expect("hello");
    for attempt in 1..=3 {
        let (g, _) = c
            .handle_lease(t, &w.node_a.public(), 1, &[])
            .expect("lease");
        assert_eq!(g[0].lease.attempt, attempt);
        if attempt == 2 {
            t += w.cfg.lease_ttl;
            c.handle_timeout(t).expect("expire");
        } else {
            let failed = TaskResult {
                transcript: Default::default(),
                lease: g[0].lease,
                outcome: Outcome::Failed {
                    reason: format!("out of memory #{attempt}"),
                },
                receipt: None,
            };
            c.handle_results(t, &w.node_a.public(), vec![failed])
                .expect("failed");
        }
    }
    assert_eq!(c.queued(), 0);
    let (g, _) = c
        .handle_lease(t, &w.node_a.public(), 1, &[])
        .expect("nothing left");
    assert!(g.is_empty());
    let rec = &c.job_results(job, 0, 10).expect("records")[0];
    assert_eq!(rec.state, TaskState::Dead);
    assert_eq!(rec.reasons.len(), 3, "{:?}", rec.reasons);
    assert!(rec.reasons[0].contains("out of memory #1"));
    assert!(rec.reasons[1].contains("lease expired"));
    assert!(rec.reasons[2].contains("out of memory #3"));
    assert_eq!(c.job_status(job).expect("status").dead, 1);
}

#[test]
fn bad_receipts_are_refused_and_the_task_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let t = Instant::now();
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(4))
        .expect("submit");
    c.handle_node_hello(t, w.node_a.public(), caps())
        .expect("hello");
    let (g, _) = c
        .handle_lease(t, &w.node_a.public(), 4, &[])
        .expect("lease");
    let mut bad = Vec::new();
    // Output altered after signing.
    let mut r = honest(&w.node_a, &g[0], component);
    r.outcome = Outcome::Output(Bytes(b"forged".to_vec()));
    bad.push(r);
    // Signed by another key.
    bad.push(honest(&w.node_b, &g[1], component));
    // No receipt.
    let mut r = honest(&w.node_a, &g[2], component);
    r.receipt = None;
    bad.push(r);
    // Receipt of another task.
    let mut r = honest(&w.node_a, &g[3], component);
    r.receipt = honest(&w.node_a, &g[0], component).receipt;
    bad.push(r);
    let v = c
        .handle_results(t, &w.node_a.public(), bad)
        .expect("results");
    let reasons: Vec<String> = v
        .iter()
        .map(|(_, v)| match v {
            Verdict::Refused(why) => why.clone(),
            other => panic!("expected a refusal, got {other:?}"),
        })
        .collect();
    assert!(reasons[0].contains("output digest"), "{}", reasons[0]);
    assert!(reasons[1].contains("signed by"), "{}", reasons[1]);
    assert!(reasons[2].contains("without a receipt"), "{}", reasons[2]);
    assert!(reasons[3].contains("receipt is for"), "{}", reasons[3]);
    assert_eq!(c.queued(), 4, "all four go back to the queue");
}

#[test]
fn restart_keeps_submissions_and_results_and_refuses_old_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("pool.db");
    let w = world();
    let t = Instant::now();
    let (job, component, leased) = {
        let mut c = open(&db, &w.cfg);
        let (bundle, component) = publish(&mut c, &w);
        let (job, _) = c
            .handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(5))
            .expect("submit");
        c.handle_node_hello(t, w.node_a.public(), caps())
            .expect("hello");
        let (g, _) = c
            .handle_lease(t, &w.node_a.public(), 3, &[])
            .expect("lease");
        let v = c
            .handle_results(
                t,
                &w.node_a.public(),
                vec![honest(&w.node_a, &g[0], component)],
            )
            .expect("r");
        assert_eq!(v[0].1, Verdict::Accepted);
        (job, component, g)
        // dropped without any shutdown: like a crash after the last commit
    };
    let mut c = open(&db, &w.cfg);
    let s = c.job_status(job).expect("status");
    assert_eq!((s.tasks, s.done), (5, 1));
    assert_eq!(
        c.queued(),
        4,
        "the two leased tasks are queued again with the two never leased"
    );
    c.handle_node_hello(t, w.node_a.public(), caps())
        .expect("hello");
    let v = c
        .handle_results(
            t,
            &w.node_a.public(),
            vec![honest(&w.node_a, &leased[1], component)],
        )
        .expect("late");
    assert_eq!(
        v[0].1,
        Verdict::Stale,
        "a result of an attempt from before the restart"
    );
    let v = c
        .handle_results(
            t,
            &w.node_a.public(),
            vec![honest(&w.node_a, &leased[0], component)],
        )
        .expect("dup");
    assert_eq!(v[0].1, Verdict::Duplicate);
    let (g, _) = c
        .handle_lease(t, &w.node_a.public(), 4, &[])
        .expect("lease");
    let attempts: BTreeSet<u32> = g.iter().map(|g| g.lease.attempt).collect();
    assert_eq!(
        attempts,
        BTreeSet::from([1, 2]),
        "re-leased tasks get attempt 2"
    );
    let v = c.handle_results(
        t,
        &w.node_a.public(),
        g.iter().map(|g| honest(&w.node_a, g, component)).collect(),
    );
    assert!(v
        .expect("results")
        .iter()
        .all(|(_, v)| *v == Verdict::Accepted));
    assert_eq!(c.job_status(job).expect("status").done, 5);
}

#[test]
fn scheduling_matches_capabilities_and_admission() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = world();
    w.cfg.admission = Admission::Allowlist(BTreeSet::from([w.node_a.public()]));
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, _) = publish(&mut c, &w);
    let t = Instant::now();
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(2))
        .expect("submit");
    let refused = c
        .handle_node_hello(t, w.node_b.public(), caps())
        .expect_err("not on the allowlist");
    assert!(
        refused.close && refused.message.contains("allowlist"),
        "{refused:?}"
    );

    let ggml_only = Capabilities {
        encodings: vec!["ggml".into()],
        ..caps()
    };
    c.handle_node_hello(t, w.node_a.public(), ggml_only)
        .expect("hello");
    assert!(
        c.handle_lease(t, &w.node_a.public(), 2, &[])
            .expect("lease")
            .0
            .is_empty(),
        "no onnx backend"
    );

    let small = Capabilities {
        memory_mib: 64,
        ..caps()
    };
    c.handle_node_hello(t, w.node_a.public(), small)
        .expect("hello");
    assert!(
        c.handle_lease(t, &w.node_a.public(), 2, &[])
            .expect("lease")
            .0
            .is_empty(),
        "512 MiB tasks"
    );

    let no_fetch = Capabilities {
        fetch_models: false,
        ..caps()
    };
    c.handle_node_hello(t, w.node_a.public(), no_fetch)
        .expect("hello");
    assert!(
        c.handle_lease(t, &w.node_a.public(), 2, &[])
            .expect("lease")
            .0
            .is_empty(),
        "model not on disk"
    );

    let one_slot = Capabilities {
        slots: 1,
        models: vec![Digest::of(b"model")],
        fetch_models: false,
        ..caps()
    };
    c.handle_node_hello(t, w.node_a.public(), one_slot)
        .expect("hello");
    assert_eq!(
        c.handle_lease(t, &w.node_a.public(), 5, &[])
            .expect("lease")
            .0
            .len(),
        1,
        "one slot"
    );
}

#[test]
fn publishing_refuses_unknown_signers_and_submitting_needs_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let store = SqliteStore::open(&dir.path().join("pool.db"), Durability::Process).expect("store");
    let mut c = Coordinator::new(store, w.cfg.clone(), &|_| false).expect("coordinator");
    let stranger = SecretKey::from_seed(KeyRole::Publisher, &[9; 32]);
    let a = AuthoredManifest::parse("name = \"x\"\nversion = \"1.0.0\"\ncomponent = \"x.wasm\"\n")
        .expect("parse");
    let blob = BlobRef {
        sha256: Digest::of(b"x"),
        size: 1,
    };
    let m = LockedManifest::lock(&a, blob, &BTreeMap::new(), stranger.public(), NOW_UNIX)
        .expect("lock");
    let err = c
        .handle_publish(NOW_UNIX, m.sign(&stranger).expect("sign"), &|_| false)
        .expect_err("stranger");
    assert!(
        err.message.contains("not a trusted publisher"),
        "{}",
        err.message
    );

    let m = LockedManifest::lock(&a, blob, &BTreeMap::new(), w.publisher.public(), NOW_UNIX)
        .expect("lock");
    let (digest, missing) = c
        .handle_publish(NOW_UNIX, m.sign(&w.publisher).expect("sign"), &|_| false)
        .expect("ok");
    assert_eq!(missing, vec![blob.sha256]);
    let err = c
        .handle_submit(NOW_UNIX, &submitter(), &digest, "k", &inputs(1))
        .expect_err("blob missing");
    assert!(err.message.contains("lacks 1 blob"), "{}", err.message);
    c.handle_blob_stored(&blob.sha256);
    c.handle_submit(NOW_UNIX, &submitter(), &digest, "k", &inputs(1))
        .expect("now it can run");
}

#[test]
fn nodes_with_better_uptime_are_preferred() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(40))
        .expect("submit");
    let t0 = Instant::now();
    let eight = Capabilities { slots: 8, ..caps() };
    c.handle_node_hello(t0, w.node_a.public(), eight.clone())
        .expect("a");
    c.handle_node_hello(t0, w.node_b.public(), eight.clone())
        .expect("b");
    // B delivers a result (a node that never did is forgotten when it
    // goes), then is away half the time.
    let (g, _) = c
        .handle_lease(t0, &w.node_b.public(), 1, &[])
        .expect("b's first lease");
    c.handle_results(
        t0,
        &w.node_b.public(),
        vec![honest(&w.node_b, &g[0], component)],
    )
    .expect("b's result");
    c.handle_node_gone(t0 + Duration::from_secs(10), &w.node_b.public());
    let t20 = t0 + Duration::from_secs(20);
    c.handle_node_hello(t20, w.node_b.public(), eight)
        .expect("b again");
    let (gb, _) = c
        .handle_lease(t20, &w.node_b.public(), 8, &[])
        .expect("b lease");
    assert_eq!(
        gb.len(),
        2,
        "the flaky node gets a quarter while the steady one has room"
    );
    let (ga, _) = c
        .handle_lease(t20, &w.node_a.public(), 8, &[])
        .expect("a lease");
    assert_eq!(ga.len(), 8);
    // The steady node is full now: the flaky one gets what it asks for.
    let (gb, _) = c
        .handle_lease(t20, &w.node_b.public(), 6, &[])
        .expect("b lease");
    assert_eq!(gb.len(), 6);
    let s = c.pool_status(t20).expect("status");
    let b = s
        .nodes
        .iter()
        .find(|n| n.key == w.node_b.public())
        .expect("b");
    assert!((b.uptime - 0.5).abs() < 0.01, "{}", b.uptime);
}

/// A node that claims `u32::MAX` slots and queue (the sum overflowed and
/// panicked the coordinator thread) is refused at hello by default; with
/// the bounds lifted it gets what a fresh node has earned (the pool's
/// `start_leases`, not its claim), and the coordinator keeps serving
/// others.
#[test]
fn a_node_claiming_every_slot_there_is_gets_what_it_earned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let greedy = Capabilities {
        slots: u32::MAX,
        queue: u32::MAX,
        ..caps()
    };
    let mut c = open(&dir.path().join("default.db"), &w.cfg);
    let r = c
        .handle_node_hello(Instant::now(), w.node_a.public(), greedy.clone())
        .expect_err("refused at hello");
    assert!(r.close && r.message.contains("`slots`"), "{r:?}");
    let mut cfg = w.cfg.clone();
    cfg.capabilities.max_slots = u32::MAX;
    cfg.capabilities.max_queue = u32::MAX;
    let mut c = open(&dir.path().join("pool.db"), &cfg);
    let (bundle, _) = publish(&mut c, &w);
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(300))
        .expect("submit");
    let t0 = Instant::now();
    c.handle_node_hello(t0, w.node_a.public(), greedy)
        .expect("hello");
    let (g, _) = c
        .handle_lease(t0, &w.node_a.public(), u32::MAX, &[])
        .expect("lease");
    assert_eq!(g.len(), w.cfg.leasing.start_leases as usize);
    c.handle_node_hello(t0, w.node_b.public(), caps())
        .expect("b");
    let (g, _) = c
        .handle_lease(t0, &w.node_b.public(), 4, &[])
        .expect("b lease");
    assert_eq!(g.len(), 4, "the pool still serves other nodes");
    c.pool_status(t0).expect("status");
}

#[test]
fn repeated_inputs_are_answered_from_the_result_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let t = Instant::now();
    let (a, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "a", &inputs(3))
        .expect("submit a");
    c.handle_node_hello(t, w.node_a.public(), caps())
        .expect("hello");
    let (g, _) = c
        .handle_lease(t, &w.node_a.public(), 4, &[])
        .expect("lease");
    c.handle_results(
        t,
        &w.node_a.public(),
        g.iter().map(|g| honest(&w.node_a, g, component)).collect(),
    )
    .expect("results");
    let first = c.job_results(a, 0, 10).expect("a results");
    while c.poll_event().is_some() {}

    // Two inputs seen before, one new.
    let mut again = inputs(2);
    again.push(b"something new".to_vec());
    let (b, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "b", &again)
        .expect("submit b");
    let s = c.job_status(b).expect("status");
    assert_eq!((s.tasks, s.done, s.cached), (3, 2, 2));
    let recs = c.job_results(b, 0, 10).expect("b results");
    for i in 0..2 {
        assert_eq!(
            recs[i].outcome, first[i].outcome,
            "same bytes as the original"
        );
        assert_eq!(recs[i].cached_from, Some(first[i].task), "provenance");
        assert_eq!(recs[i].node, Some(w.node_a.public()));
    }
    assert_eq!(recs[2].state, TaskState::Queued);
    let (g, _) = c
        .handle_lease(t, &w.node_a.public(), 4, &[])
        .expect("lease");
    assert_eq!(g.len(), 1, "only the new input is computed");
    assert_eq!(g[0].input.0, b"something new");

    // Entirely cached: finished at once, no task queued.
    let (whole, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "c", &inputs(3))
        .expect("submit c");
    assert!(matches!(c.poll_event(), Some(PoolEvent::JobFinished { job }) if job == whole));
    assert_eq!(c.job_status(whole).expect("status").cached, 3);

    // The cache survives a restart, and is per bundle.
    drop(c);
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    assert_eq!(c.job_status(b).expect("status").cached, 2);
    let (d, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "d", &inputs(1))
        .expect("submit d");
    assert_eq!(c.job_status(d).expect("status").cached, 1);
}

#[test]
fn a_database_from_before_the_result_cache_is_upgraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("pool.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch(
            "CREATE TABLE tasks (id INTEGER PRIMARY KEY, job INTEGER NOT NULL, idx INTEGER NOT NULL,
             input BLOB NOT NULL, input_digest BLOB NOT NULL, state INTEGER NOT NULL DEFAULT 0,
             attempt INTEGER NOT NULL DEFAULT 0, node TEXT, outcome BLOB, receipt BLOB,
             reasons TEXT NOT NULL DEFAULT '[]', done_at INTEGER);",
        )
        .expect("old schema");
    }
    let w = world();
    let mut c = open(&db, &w.cfg);
    let (bundle, _) = publish(&mut c, &w);
    let (job, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(2))
        .expect("submit");
    assert_eq!(
        c.job_results(job, 0, 10).expect("results")[0].cached_from,
        None
    );
}

/// Publish a GPU-tier bundle (one onnx model, every result re-executed).
fn publish_gpu(c: &mut Coordinator<SqliteStore>, w: &World, gpu_memory_mib: u32) -> Digest {
    let extra = format!(
        "[determinism]\ntier = \"tolerance\"\ncosine = \"0.999\"\n\
         [verification]\nsampling = \"always\"\n\
         [target]\ndevice = \"gpu\"\ngpu_memory_mib = {gpu_memory_mib}\n"
    );
    publish_with(c, w, "embed-gpu", &extra).0
}

fn with_gpu(memory_mib: u32, encodings: &[&str]) -> Capabilities {
    Capabilities {
        gpu: Some(Gpu {
            name: "NVIDIA L4".into(),
            memory_mib,
            encodings: encodings.iter().map(|e| e.to_string()).collect(),
        }),
        ..caps()
    }
}

#[test]
fn gpu_tier_tasks_and_their_checks_go_only_to_gpus_that_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (cpu_bundle, _) = publish(&mut c, &w);
    let gpu_bundle = publish_gpu(&mut c, &w, 8192);
    let (gpu_job, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &gpu_bundle, "gpu", &inputs(3))
        .expect("submit gpu");
    c.handle_submit(NOW_UNIX, &submitter(), &cpu_bundle, "cpu", &inputs(2))
        .expect("submit cpu");
    let t = Instant::now();
    let hello = |c: &mut Coordinator<SqliteStore>, key: &SecretKey, caps: Capabilities| {
        c.handle_node_hello(t, key.public(), caps).expect("hello");
    };
    let lease = |c: &mut Coordinator<SqliteStore>, key: &SecretKey, caps: Capabilities| {
        hello(c, key, caps);
        let (grants, _) = c.handle_lease(t, &key.public(), 10, &[]).expect("lease");
        grants
    };
    // What the job's author is told while its tasks wait.
    let waiting = |c: &mut Coordinator<SqliteStore>| c.job_status(gpu_job).expect("status").waiting;
    assert_eq!(waiting(&mut c).as_deref(), Some("no node is connected"));

    // A CPU node gets the CPU job's tasks, never the GPU job's.
    let g = lease(&mut c, &w.node_b, caps());
    assert_eq!(g.len(), 2);
    assert!(g.iter().all(|g| g.bundle == cpu_bundle), "{g:?}");
    assert_eq!(
        waiting(&mut c).as_deref(),
        Some("no connected node can run it (1 node: no GPU)")
    );

    // GPUs that are too small, or lack an onnx GPU engine, get nothing.
    let gpu_node = SecretKey::from_seed(KeyRole::Node, &[7; 32]);
    assert!(lease(&mut c, &gpu_node, with_gpu(4096, &["onnx"])).is_empty());
    assert_eq!(
        waiting(&mut c).as_deref(),
        Some(
            "no connected node can run it (1 node: its GPU has 4096 MiB, the job needs 8192 MiB; \
             1 node: no GPU)"
        )
    );
    assert!(lease(&mut c, &gpu_node, with_gpu(24576, &["ggml"])).is_empty());
    let why = waiting(&mut c).unwrap_or_default();
    assert!(why.contains("1 node: no GPU engine for onnx"), "{why}");

    // Once a node that fits is connected, nothing is said: the tasks are
    // only queued. It gets them all.
    hello(&mut c, &gpu_node, with_gpu(24576, &["onnx", "ggml"]));
    assert_eq!(waiting(&mut c), None);
    let g = lease(&mut c, &gpu_node, with_gpu(24576, &["onnx", "ggml"]));
    assert_eq!(g.len(), 3);
    assert!(g.iter().all(|g| g.bundle == gpu_bundle), "{g:?}");
    let results: Vec<_> = g
        .iter()
        .map(|g| honest(&gpu_node, g, Digest::of(b"component")))
        .collect();
    c.handle_results(t, &gpu_node.public(), results)
        .expect("results");

    // Every result is re-executed (sampling = "always"): the checks are
    // GPU-tier too, so the CPU node gets none of them and a second GPU
    // node gets all three.
    assert!(lease(&mut c, &w.node_b, caps()).is_empty());
    let second = SecretKey::from_seed(KeyRole::Node, &[8; 32]);
    let checks = lease(&mut c, &second, with_gpu(16384, &["onnx"]));
    assert_eq!(checks.len(), 3, "{checks:?}");
    assert!(checks.iter().all(|g| g.bundle == gpu_bundle));
}

fn failed(g: &TaskGrant) -> TaskResult {
    TaskResult {
        transcript: Default::default(),
        lease: g.lease,
        outcome: Outcome::Failed {
            reason: "it always fails".into(),
        },
        receipt: None,
    }
}

/// A node claiming 256 slots and 256 queued leases holds what the pool lets
/// a fresh node hold, and renewing forever does not keep a lease past its
/// deadline (the bundle's timeout per task ahead of it plus the grace):
/// its tasks go back to the queue and an honest node finishes them.
#[test]
fn a_hoarding_node_holds_what_it_earned_and_no_lease_outlives_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = world();
    w.cfg.leasing.start_leases = 4;
    w.cfg.leasing.grace = Duration::from_secs(5);
    w.cfg.verify.initial_reputation = 0;
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish_with(&mut c, &w, "slow", "[limits]\ntimeout_ms = 2000\n");
    let (job, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(20))
        .expect("submit");
    let t0 = Instant::now();
    let hoarder = w.node_a.public();
    let greedy = Capabilities {
        slots: 256,
        queue: 256,
        ..caps()
    };
    c.handle_node_hello(t0, hoarder, greedy).expect("hello");
    let (held, _) = c.handle_lease(t0, &hoarder, 10_000, &[]).expect("lease");
    assert_eq!(
        held.len(),
        4,
        "a fresh node holds start_leases, not its claim"
    );
    let ids: Vec<LeaseId> = held.iter().map(|g| g.lease).collect();
    let (more, lost) = c.handle_lease(t0, &hoarder, 10_000, &ids).expect("renew");
    assert!(more.is_empty() && lost.is_empty());
    // Renewed every 3 s: the leases still end at 2 s + 5 s grace.
    for s in [3, 6] {
        let t = t0 + Duration::from_secs(s);
        c.handle_timeout(t).expect("timeouts");
        let (_, lost) = c.handle_lease(t, &hoarder, 0, &ids).expect("renew");
        assert!(lost.is_empty(), "still held at {s} s");
    }
    let t7 = t0 + Duration::from_secs(7);
    c.handle_timeout(t7).expect("deadline");
    let (_, lost) = c.handle_lease(t7, &hoarder, 0, &ids).expect("renew");
    assert_eq!(lost, ids, "every lease ended at its deadline");
    let recs = c.job_results(job, 0, 20).expect("records");
    let ended: Vec<_> = recs.iter().filter(|r| !r.reasons.is_empty()).collect();
    assert_eq!(ended.len(), 4);
    assert!(
        ended.iter().all(|r| r.reasons[0].contains("deadline")),
        "{:?}",
        ended[0].reasons
    );
    // An honest node finishes everything (the hoarder's four included),
    // earning a larger allowance as it delivers.
    let honest_key = w.node_b.public();
    c.handle_node_hello(t7, honest_key, Capabilities { slots: 8, ..caps() })
        .expect("honest hello");
    let mut grants_seen = Vec::new();
    for _ in 0..20 {
        let (g, _) = c.handle_lease(t7, &honest_key, 8, &[]).expect("lease");
        if g.is_empty() {
            break;
        }
        grants_seen.push(g.len());
        let results = g.iter().map(|g| honest(&w.node_b, g, component)).collect();
        c.handle_results(t7, &honest_key, results).expect("results");
    }
    assert_eq!(
        grants_seen[0], 4,
        "the honest node starts at start_leases too"
    );
    assert!(
        grants_seen.contains(&8),
        "and is let hold its claim once it delivered: {grants_seen:?}"
    );
    assert_eq!(c.job_status(job).expect("status").done, 20);
}

/// Leases further back on a node's slots get later deadlines: a node with
/// one slot holding four leases has until 1, 2, 3 and 4 timeouts (plus the
/// grace) for them.
#[test]
fn a_lease_waiting_behind_others_on_a_node_gets_their_time_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = world();
    w.cfg.leasing.grace = Duration::from_secs(1);
    w.cfg.lease_ttl = Duration::from_secs(60);
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, _) = publish_with(&mut c, &w, "slow", "[limits]\ntimeout_ms = 10000\n");
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(4))
        .expect("submit");
    let t0 = Instant::now();
    let one_slot = Capabilities {
        slots: 1,
        queue: 3,
        ..caps()
    };
    c.handle_node_hello(t0, w.node_a.public(), one_slot)
        .expect("hello");
    let (g, _) = c
        .handle_lease(t0, &w.node_a.public(), 4, &[])
        .expect("lease");
    assert_eq!(g.len(), 4);
    let mut ended = Vec::new();
    for s in [11, 21, 31, 41] {
        c.handle_timeout(t0 + Duration::from_secs(s))
            .expect("timeouts");
        ended.push(c.pool_status(t0).expect("status").leased);
    }
    assert_eq!(ended, vec![3, 2, 1, 0]);
}

/// A node that reports `Failed` for everything: each failed task goes to
/// the honest node next, the failing node's circuit breaker trips after
/// `breaker_failures` (it gets nothing while cut off), and every task ends
/// done — none dead-lettered.
#[test]
fn a_failing_node_is_cut_off_and_its_tasks_finish_on_an_honest_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = world();
    w.cfg.verify.initial_reputation = 0;
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let (job, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(30))
        .expect("submit");
    let t = Instant::now();
    let (bad, good) = (w.node_a.public(), w.node_b.public());
    c.handle_node_hello(t, bad, caps()).expect("bad hello");
    c.handle_node_hello(t, good, caps()).expect("good hello");
    let mut failed_on_bad = BTreeSet::new();
    let mut bad_grants = 0;
    let mut cut_off = false;
    for _ in 0..100 {
        let (g, _) = c.handle_lease(t, &bad, 4, &[]).expect("bad lease");
        for grant in &g {
            assert!(
                !failed_on_bad.contains(&grant.lease.task),
                "a task that failed on a node is not given back to it while another can run it"
            );
            failed_on_bad.insert(grant.lease.task);
        }
        bad_grants += g.len();
        let results = g.iter().map(failed).collect();
        c.handle_results(t, &bad, results).expect("failures");
        while let Some(ev) = c.poll_event() {
            if let PoolEvent::CutOff { node, failures, .. } = ev {
                assert_eq!(node, bad);
                assert!(failures >= w.cfg.leasing.breaker_failures, "{failures}");
                cut_off = true;
            }
        }
        let (g, _) = c.handle_lease(t, &good, 4, &[]).expect("good lease");
        let results: Vec<_> = g.iter().map(|g| honest(&w.node_b, g, component)).collect();
        if results.is_empty() && cut_off {
            break;
        }
        c.handle_results(t, &good, results).expect("results");
    }
    assert!(cut_off, "the failing node's breaker tripped");
    assert!(
        bad_grants < 2 * w.cfg.leasing.breaker_failures as usize,
        "cut off after a handful of failures, not the whole queue: {bad_grants}"
    );
    let (g, _) = c.handle_lease(t, &bad, 4, &[]).expect("cut off");
    assert!(g.is_empty(), "a cut-off node gets nothing");
    let s = c.job_status(job).expect("status");
    assert_eq!((s.done, s.dead), (30, 0));
    let recs = c.job_results(job, 0, 30).expect("records");
    assert!(recs.iter().all(|r| r.node == Some(good)));
}

/// Fresh keys that say hello and go, delivering nothing, leave nothing in
/// memory; a node that delivered keeps its record across a reconnect.
#[test]
fn nodes_that_go_without_delivering_anything_are_forgotten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "k", &inputs(2))
        .expect("submit");
    let t = Instant::now();
    for i in 0..500u32 {
        let mut seed = [9u8; 32];
        seed[..4].copy_from_slice(&i.to_le_bytes());
        let k = SecretKey::from_seed(KeyRole::Node, &seed).public();
        c.handle_node_hello(t, k, caps()).expect("hello");
        c.handle_node_gone(t, &k);
    }
    assert_eq!(c.nodes_in_memory(), 0);
    // A node that leases and goes keeps its entry while it holds the lease;
    // when the lease ends it is forgotten.
    let a = w.node_a.public();
    c.handle_node_hello(t, a, caps()).expect("a");
    let (g, _) = c.handle_lease(t, &a, 1, &[]).expect("lease");
    c.handle_node_gone(t, &a);
    assert_eq!(c.nodes_in_memory(), 1);
    c.handle_timeout(t + w.cfg.lease_ttl).expect("expire");
    assert_eq!(c.nodes_in_memory(), 0);
    // One that delivered is remembered.
    let b = w.node_b.public();
    c.handle_node_hello(t, b, caps()).expect("b");
    let (g2, _) = c.handle_lease(t, &b, 1, &[]).expect("lease");
    assert_eq!(g.len() + g2.len(), 2);
    c.handle_results(t, &b, vec![honest(&w.node_b, &g2[0], component)])
        .expect("result");
    c.handle_node_gone(t, &b);
    assert_eq!(c.nodes_in_memory(), 1);
}

/// A lease answer carries at most `leasing.grant_bytes` of inputs (and
/// always one task, whatever its size): a batch of large inputs is spread
/// over several answers that each fit a frame, in queue order, and every
/// task is granted exactly once.
#[test]
fn lease_answers_stay_within_their_byte_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = world();
    w.cfg.leasing.grant_bytes = 1024;
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, _) = publish(&mut c, &w);
    let sizes = [300usize, 300, 300, 300, 5000, 300, 300];
    let inputs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| vec![i as u8; *n])
        .collect();
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "big", &inputs)
        .expect("submit");
    let t0 = Instant::now();
    let mut big_caps = caps();
    big_caps.slots = 64;
    c.handle_node_hello(t0, w.node_a.public(), big_caps)
        .expect("hello");
    let mut answers: Vec<Vec<usize>> = Vec::new();
    let mut running = Vec::new();
    for _ in 0..10 {
        let (grants, _) = c
            .handle_lease(t0, &w.node_a.public(), 64, &running)
            .expect("lease");
        if grants.is_empty() {
            break;
        }
        running.extend(grants.iter().map(|g| g.lease));
        answers.push(grants.iter().map(|g| g.input.0.len()).collect());
    }
    assert_eq!(
        answers,
        vec![vec![300, 300, 300], vec![300], vec![5000], vec![300, 300]],
        "each answer within 1024 bytes, the 5000-byte input alone"
    );
    assert_eq!(c.leased(), sizes.len());
}

/// A page of job results holds at most `RECORDS_PAGE_BYTES` of outputs
/// (a larger one alone): reading from where the last page stopped until a
/// page is empty gives every result once, in order.
#[test]
fn result_pages_stay_within_their_byte_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let mib = 1 << 20;
    let sizes = [3 * mib, 3 * mib, 3 * mib, 10 * mib, 1, 1];
    let inputs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| vec![i as u8; *n])
        .collect();
    let (job, _) = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "pages", &inputs)
        .expect("submit");
    let t0 = Instant::now();
    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello");
    while c.queued() > 0 {
        let (grants, _) = c
            .handle_lease(t0, &w.node_a.public(), 4, &[])
            .expect("lease");
        let results = grants
            .iter()
            .map(|g| honest(&w.node_a, g, component))
            .collect();
        c.handle_results(t0, &w.node_a.public(), results)
            .expect("results");
    }
    let mut pages = Vec::new();
    let mut got = Vec::new();
    loop {
        let page = c.job_results(job, got.len() as u32, 1000).expect("page");
        if page.is_empty() {
            break;
        }
        pages.push(page.len());
        got.extend(page);
    }
    assert_eq!(
        pages,
        vec![2, 1, 1, 2],
        "8 MiB a page, the 10 MiB output alone"
    );
    let indexes: Vec<u32> = got.iter().map(|r| r.index).collect();
    assert_eq!(indexes, (0..6).collect::<Vec<u32>>());
}

/// A job sent in chunks: tasks are queued and run as chunks arrive; a
/// chunk sent again changes nothing, one that differs from what the pool
/// holds or leaves a gap is refused; another client cannot append; the job
/// is not finished until sealed with the right count, and a sealed job
/// takes nothing more. After a restart the open job is still open and
/// resumes where it stopped.
#[test]
fn a_job_sent_in_chunks_resumes_and_finishes_only_when_sealed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pool.db");
    let w = world();
    let mut c = open(&path, &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let me = submitter();
    let all = inputs(10);
    let (job, have, sealed) = c
        .handle_open_job(NOW_UNIX, &me, &bundle, "chunks", 0)
        .expect("open");
    assert_eq!((have, sealed), (0, false));
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &me, job, 0, &all[..4])
            .expect("chunk 1"),
        4
    );
    // Sent again (the answer was lost): nothing new.
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &me, job, 0, &all[..4])
            .expect("again"),
        4
    );
    // Overlapping the held part and going on: only the new part is added.
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &me, job, 2, &all[2..6])
            .expect("overlap"),
        6
    );
    let gap = c
        .handle_append_inputs(NOW_UNIX, &me, job, 7, &all[7..8])
        .expect_err("gap");
    assert!(gap.message.contains("gap"), "{}", gap.message);
    let differs = c
        .handle_append_inputs(NOW_UNIX, &me, job, 5, &[b"not input 5".to_vec()])
        .expect_err("differs");
    assert!(
        differs.message.contains("input 5 of job"),
        "{}",
        differs.message
    );
    let stranger = SecretKey::from_seed(KeyRole::Client, &[8; 32]).public();
    assert!(c
        .handle_append_inputs(NOW_UNIX, &stranger, job, 6, &all[6..])
        .is_err());
    // The six held run now, before the rest arrive.
    let t0 = Instant::now();
    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello");
    let (grants, _) = c
        .handle_lease(t0, &w.node_a.public(), 10, &[])
        .expect("lease");
    assert_eq!(grants.len(), 4, "the node's slots");
    let results: Vec<_> = grants
        .iter()
        .map(|g| honest(&w.node_a, g, component))
        .collect();
    c.handle_results(t0, &w.node_a.public(), results)
        .expect("results");
    let (grants, _) = c
        .handle_lease(t0, &w.node_a.public(), 10, &[])
        .expect("lease");
    let results: Vec<_> = grants
        .iter()
        .map(|g| honest(&w.node_a, g, component))
        .collect();
    c.handle_results(t0, &w.node_a.public(), results)
        .expect("results");
    let s = c.job_status(job).expect("status");
    assert_eq!((s.tasks, s.done, s.open), (6, 6, true));
    assert!(
        !s.finished(),
        "every task so far is done, but more may come"
    );
    while let Some(e) = c.poll_event() {
        assert!(!matches!(e, PoolEvent::JobFinished { .. }), "{e:?}");
    }

    // The pool restarts; the client opens the same key and resumes.
    drop(c);
    let mut c = open(&path, &w.cfg);
    assert_eq!(
        c.handle_open_job(NOW_UNIX, &me, &bundle, "chunks", 0)
            .expect("reopen"),
        (job, 6, false)
    );
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &me, job, 6, &all[6..])
            .expect("rest"),
        10
    );
    let short = c.handle_seal_job(&me, job, 9).expect_err("count");
    assert!(
        short.message.contains("holds 10 inputs, not 9"),
        "{}",
        short.message
    );
    assert_eq!(c.handle_seal_job(&me, job, 10).expect("seal"), 10);
    assert_eq!(c.handle_seal_job(&me, job, 10).expect("seal again"), 10);
    let late = c
        .handle_append_inputs(NOW_UNIX, &me, job, 10, &[b"late".to_vec()])
        .expect_err("sealed");
    assert!(late.message.contains("sealed"), "{}", late.message);
    assert_eq!(
        c.handle_open_job(NOW_UNIX, &me, &bundle, "chunks", 0)
            .expect("reopen sealed"),
        (job, 10, true)
    );
    let t1 = Instant::now();
    c.handle_node_hello(t1, w.node_a.public(), caps())
        .expect("hello");
    let (grants, _) = c
        .handle_lease(t1, &w.node_a.public(), 10, &[])
        .expect("lease");
    assert_eq!(grants.len(), 4);
    let results: Vec<_> = grants
        .iter()
        .map(|g| honest(&w.node_a, g, component))
        .collect();
    c.handle_results(t1, &w.node_a.public(), results)
        .expect("results");
    let s = c.job_status(job).expect("status");
    assert!(s.finished() && !s.open && s.done == 10, "{s:?}");
    let mut finished = false;
    while let Some(e) = c.poll_event() {
        finished |= matches!(e, PoolEvent::JobFinished { job: j } if j == job);
    }
    assert!(finished);
    let recs = c.job_results(job, 0, 100).expect("results");
    for (r, input) in recs.iter().zip(&all) {
        assert_eq!(
            r.outcome,
            Some(Outcome::Output(Bytes(fake_node::reversed(input)))),
            "{r:?}"
        );
    }
    assert_eq!(recs.len(), 10);
}

/// Node `key` leases up to `want` tasks and answers them honestly; returns
/// the inputs of the tasks it got, in grant order.
fn work_once(
    c: &mut Coordinator<SqliteStore>,
    now: Instant,
    key: &SecretKey,
    component: Digest,
    want: u32,
) -> Vec<Vec<u8>> {
    let (grants, _) = c
        .handle_lease(now, &key.public(), want, &[])
        .expect("lease");
    let jobs = grants.iter().map(|g| g.input.0.clone()).collect();
    let results: Vec<_> = grants.iter().map(|g| honest(key, g, component)).collect();
    c.handle_results(now, &key.public(), results)
        .expect("results");
    jobs
}

/// Fair share: a client with a big job and another with a small one
/// submitted later share the node — the small one is done after about
/// twice its own size of tasks, not after the big one; with weight 3 the
/// first client gets three tasks in four; a priority job goes first; the
/// running-tasks quota holds a client to its number of leases.
#[test]
fn a_small_job_of_another_client_is_not_starved_by_a_big_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let big_client = submitter();
    let small_client = SecretKey::from_seed(KeyRole::Client, &[8; 32]).public();
    for (weight, quota) in [(1u32, 0u32), (3, 0), (1, 2)] {
        let mut cfg = w.cfg.clone();
        cfg.quotas.weights.insert(big_client, weight);
        cfg.quotas.running_tasks = quota;
        cfg.leasing.start_leases = 64;
        let mut c = open(&dir.path().join(format!("pool-{weight}-{quota}.db")), &cfg);
        let (bundle, component) = publish(&mut c, &w);
        let now = Instant::now();
        c.handle_node_hello(now, w.node_a.public(), caps())
            .expect("hello");
        let (big, _) = c
            .handle_submit(NOW_UNIX, &big_client, &bundle, "big", &inputs(2000))
            .expect("big");
        // The big job has the node to itself for a while.
        for _ in 0..10 {
            work_once(&mut c, now, &w.node_a, component, 4);
        }
        let small_inputs: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("small {i}").into_bytes())
            .collect();
        let (small, _) = c
            .handle_submit(NOW_UNIX, &small_client, &bundle, "small", &small_inputs)
            .expect("small");
        let mut served = Vec::new();
        while c.job_status(small).expect("status").done < 100 {
            let got = work_once(&mut c, now, &w.node_a, component, 4);
            assert!(!got.is_empty(), "work left");
            if quota > 0 {
                let s = c.job_status(big).expect("big");
                assert!(s.running <= quota, "{s:?}");
            }
            served.extend(got);
        }
        let of_big = served.iter().filter(|i| !i.starts_with(b"small")).count();
        let want = 100 * weight as usize;
        assert!(
            of_big.abs_diff(want) <= 4,
            "weight {weight}: {of_big} of the big job's tasks ran while the small job's 100 did"
        );
        let big_done = c.job_status(big).expect("big").done;
        assert!(big_done < 2000 / 2, "{big_done}");
    }
}

/// Per-client quotas: tasks waiting, jobs open, priority; a refused
/// submission stores nothing.
#[test]
fn client_quotas_refuse_what_is_over_them_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut cfg = w.cfg.clone();
    cfg.quotas.queued_tasks = 10;
    cfg.quotas.open_jobs = 2;
    cfg.quotas.max_priority = 1;
    let mut c = open(&dir.path().join("pool.db"), &cfg);
    let (bundle, _) = publish(&mut c, &w);
    let me = submitter();
    c.handle_submit(NOW_UNIX, &me, &bundle, "a", &inputs(8))
        .expect("8 of 10");
    let over = c
        .handle_submit(NOW_UNIX, &me, &bundle, "b", &inputs(3))
        .expect_err("11 of 10");
    assert_eq!(over.code, tidepool_proto::wire::ErrorCode::Busy);
    assert!(
        over.message.contains("quotas.queued_tasks"),
        "{}",
        over.message
    );
    assert_eq!(c.queued(), 8, "nothing of the refused job stored");
    // Chunks count too; a chunk sent again is not counted twice.
    let (job, _, _) = c
        .handle_open_job(NOW_UNIX, &me, &bundle, "c", 1)
        .expect("open");
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &me, job, 0, &inputs(2))
            .expect("2"),
        2
    );
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &me, job, 0, &inputs(2))
            .expect("again"),
        2
    );
    assert!(c
        .handle_append_inputs(NOW_UNIX, &me, job, 2, &inputs(3)[2..])
        .is_err());
    // Jobs open: two; the third is refused, the first can still be named.
    c.handle_open_job(NOW_UNIX, &me, &bundle, "d", 0)
        .expect("second open");
    let third = c
        .handle_open_job(NOW_UNIX, &me, &bundle, "e", 0)
        .expect_err("third");
    assert!(
        third.message.contains("quotas.open_jobs"),
        "{}",
        third.message
    );
    assert_eq!(
        c.handle_open_job(NOW_UNIX, &me, &bundle, "c", 0)
            .expect("named again")
            .0,
        job
    );
    let high = c
        .handle_open_job(NOW_UNIX, &me, &bundle, "f", 2)
        .expect_err("priority");
    assert_eq!(high.code, tidepool_proto::wire::ErrorCode::Forbidden);
}

/// `job cancel`: the waiting tasks are dead-lettered, the leases end at
/// once (the node is told at its next renewal and its late results are
/// stale), another client's job is untouched, a stranger cannot cancel,
/// and cancelling again cancels nothing.
#[test]
fn a_cancelled_job_stops_its_queued_and_running_tasks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, component) = publish(&mut c, &w);
    let me = submitter();
    let (job, _) = c
        .handle_submit(NOW_UNIX, &me, &bundle, "doomed", &inputs(10))
        .expect("submit");
    let other_client = SecretKey::from_seed(KeyRole::Client, &[9; 32]).public();
    let other_inputs: Vec<Vec<u8>> = (0..3).map(|i| format!("other {i}").into_bytes()).collect();
    let (other, _) = c
        .handle_submit(NOW_UNIX, &other_client, &bundle, "kept", &other_inputs)
        .expect("other");
    let t0 = Instant::now();
    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello");
    let (grants, _) = c
        .handle_lease(t0, &w.node_a.public(), 4, &[])
        .expect("lease");
    assert_eq!(grants.len(), 4);
    let running: Vec<LeaseId> = grants.iter().map(|g| g.lease).collect();
    let stranger = SecretKey::from_seed(KeyRole::Client, &[10; 32]).public();
    assert!(c.handle_cancel_job(&stranger, job).is_err());
    let (waiting, stopped) = c.handle_cancel_job(&me, job).expect("cancel");
    let mine = grants
        .iter()
        .filter(|g| !g.input.0.starts_with(b"other"))
        .count() as u32;
    assert_eq!((waiting, stopped), (10 - mine, mine));
    let s = c.job_status(job).expect("status");
    assert_eq!((s.done, s.dead, s.running), (0, 10, 0), "{s:?}");
    assert!(s.finished());
    // The node renews: the cancelled leases are lost, the other job's kept.
    let (_, lost) = c
        .handle_lease(t0, &w.node_a.public(), 0, &running)
        .expect("renew");
    assert_eq!(lost.len() as u32, mine, "{lost:?}");
    let results: Vec<_> = grants
        .iter()
        .map(|g| honest(&w.node_a, g, component))
        .collect();
    let verdicts = c
        .handle_results(t0, &w.node_a.public(), results)
        .expect("results");
    let stale = verdicts
        .iter()
        .filter(|(_, v)| *v == Verdict::Stale)
        .count() as u32;
    assert_eq!(stale, mine, "{verdicts:?}");
    for r in c.job_results(job, 0, 100).expect("records") {
        assert_eq!(r.state, TaskState::Dead);
        assert!(
            r.reasons.iter().any(|x| x.contains("cancelled by")),
            "{r:?}"
        );
    }
    while !work_once(&mut c, t0, &w.node_a, component, 4).is_empty() {}
    assert_eq!(c.job_status(other).expect("other").done, 3);
    assert_eq!(c.handle_cancel_job(&me, job).expect("again"), (0, 0));
}

/// Retention: a finished job's inputs and outputs are removed once its
/// last result is older than `retention.keep`, or at the next collection
/// once its client forgot it; a job within retention keeps them. A purged
/// job says so, its results no longer answer the cache (the same inputs
/// run again), cannot be replayed or challenged, and its receipts still
/// count in the credits. The pool collects by itself at its timeouts.
#[test]
fn retention_removes_old_and_forgotten_results_and_keeps_receipts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut cfg = w.cfg.clone();
    cfg.retention.keep = Some(Duration::from_secs(30 * 86_400));
    cfg.retention.every = Duration::from_secs(3600);
    let mut c = open(&dir.path().join("pool.db"), &cfg);
    let (bundle, component) = publish(&mut c, &w);
    let me = submitter();
    let t0 = Instant::now();
    let day = Duration::from_secs(86_400);
    c.set_clock(t0, NOW_UNIX);
    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello");
    let batch =
        |tag: &str| -> Vec<Vec<u8>> { (0..3).map(|i| format!("{tag} {i}").into_bytes()).collect() };
    let finish = |c: &mut Coordinator<SqliteStore>, key: &str, at: Instant| {
        let (job, _) = c
            .handle_submit(NOW_UNIX, &me, &bundle, key, &batch(key))
            .expect("submit");
        while !work_once(c, at, &w.node_a, component, 4).is_empty() {}
        assert!(c.job_status(job).expect("status").finished());
        job
    };
    let old = finish(&mut c, "old", t0);
    let forgotten = finish(&mut c, "forgotten", t0);
    let recent = finish(&mut c, "recent", t0 + 20 * day);
    let stranger = SecretKey::from_seed(KeyRole::Client, &[10; 32]).public();
    assert!(c.handle_forget_job(&stranger, forgotten).is_err());
    c.handle_forget_job(&me, forgotten).expect("forget");

    let p = c.handle_gc(t0 + day).expect("gc");
    assert_eq!(p.jobs, vec![forgotten]);
    assert_eq!(p.tasks, 3);
    assert!(p.bytes > 0);
    let p = c.handle_gc(t0 + 31 * day).expect("gc");
    assert_eq!(p.jobs, vec![old], "the recent job is within retention");
    for job in [old, forgotten] {
        let s = c.job_status(job).expect("status");
        assert!(s.purged && s.done == 3, "{s:?}");
        for r in c.job_results(job, 0, 10).expect("records") {
            assert_eq!(r.outcome, None, "{r:?}");
            let err = c
                .handle_challenge(t0 + 31 * day, r.task)
                .expect_err("challenge");
            assert!(err.message.contains("retention"), "{}", err.message);
        }
        let err = c.replayable(job, 0).expect_err("replay");
        assert!(err.message.contains("retention"), "{}", err.message);
    }
    let kept = c.job_results(recent, 0, 10).expect("records");
    assert!(kept.iter().all(|r| r.outcome.is_some()) && !c.job_status(recent).expect("s").purged);
    // The same inputs again: not answered from the purged results.
    let (again, _) = c
        .handle_submit(NOW_UNIX, &me, &bundle, "again", &batch("old"))
        .expect("again");
    assert_eq!(c.job_status(again).expect("again").cached, 0);
    // Receipts stay: the credits still count the purged results.
    let credits = c
        .credits(0, NOW_UNIX + 100 * 86_400, NOW_UNIX + 100 * 86_400)
        .expect("credits");
    assert_eq!(credits[&w.node_a.public()].results, 9, "{credits:?}");
    // By itself: the recent job goes once its time comes.
    c.handle_timeout(t0 + 31 * day).expect("timeout");
    let next = c.poll_timeout().expect("a collection is due");
    assert!(next <= t0 + 31 * day + cfg.retention.every);
    c.handle_timeout(t0 + 51 * day).expect("timeout");
    let mut collected = false;
    while let Some(e) = c.poll_event() {
        collected |= matches!(e, PoolEvent::Collected { jobs: 1, .. });
    }
    assert!(collected);
    assert!(c.job_status(recent).expect("s").purged);
}

/// The pool's memory for waiting tasks grows with chunks and retries, not
/// with tasks: 50,000 inputs sent in 10 chunks wait as at most 10 entries
/// (here one: nothing came between the chunks); tasks whose leases
/// expired come back one entry each.
#[test]
fn waiting_tasks_cost_an_entry_per_chunk_not_per_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, _) = publish(&mut c, &w);
    let me = submitter();
    let (job, _, _) = c
        .handle_open_job(NOW_UNIX, &me, &bundle, "many", 0)
        .expect("open");
    for chunk in 0..10u32 {
        let inputs: Vec<Vec<u8>> = (0..5000)
            .map(|i| format!("many {}", chunk * 5000 + i).into_bytes())
            .collect();
        c.handle_append_inputs(NOW_UNIX, &me, job, chunk * 5000, &inputs)
            .expect("chunk");
    }
    c.handle_seal_job(&me, job, 50_000).expect("seal");
    let entries = c.queue_entries();
    assert_eq!(c.queued(), 50_000);
    // One run per chunk at most (consecutive chunks' ids run on).
    assert!((1..=10).contains(&entries), "{entries}");
    let t0 = Instant::now();
    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello");
    let (grants, _) = c
        .handle_lease(t0, &w.node_a.public(), 4, &[])
        .expect("lease");
    assert_eq!(grants.len(), 4);
    c.handle_timeout(t0 + Duration::from_secs(3600))
        .expect("expire");
    assert_eq!(c.queued(), 50_000);
    assert_eq!(
        c.queue_entries(),
        entries + 4,
        "the four retried, one entry each"
    );
}

/// An input larger than a task may take (it could travel in no lease
/// answer) is refused by place and size, in one message or in a chunk, and
/// nothing of that submission is kept.
#[test]
fn an_input_over_the_largest_item_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut c = open(&dir.path().join("pool.db"), &w.cfg);
    let (bundle, _) = publish(&mut c, &w);
    let max = tidepool_proto::wire::MAX_ITEM_BYTES;
    let inputs = vec![b"ok".to_vec(), vec![1; max + 1]];
    let r = c
        .handle_submit(NOW_UNIX, &submitter(), &bundle, "big", &inputs)
        .expect_err("refused");
    assert!(
        r.message.contains("input 1 is 16777217 bytes"),
        "{}",
        r.message
    );
    assert_eq!(c.queued(), 0);
    let (job, _, _) = c
        .handle_open_job(NOW_UNIX, &submitter(), &bundle, "chunks", 0)
        .expect("open");
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &submitter(), job, 0, &inputs[..1])
            .expect("a small chunk"),
        1
    );
    let r = c
        .handle_append_inputs(NOW_UNIX, &submitter(), job, 1, &inputs[1..])
        .expect_err("refused");
    assert!(
        r.message.contains("input 1 is 16777217 bytes"),
        "{}",
        r.message
    );
    assert_eq!(c.queued(), 1, "the chunk before it stays, nothing of it");
    // The largest allowed is taken.
    assert_eq!(
        c.handle_append_inputs(NOW_UNIX, &submitter(), job, 1, &[vec![2; max]])
            .expect("the largest item"),
        2
    );
}

/// `quotas.stored_bytes`: a client's inputs and accepted outputs count; a
/// submission past it is refused with nothing stored; forgetting a
/// finished job gives its bytes back, and a restart counts the same.
#[test]
fn the_bytes_a_client_stores_are_bounded_and_forgetting_frees_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut cfg = w.cfg.clone();
    cfg.quotas.stored_bytes = 200;
    let path = dir.path().join("pool.db");
    let mut c = open(&path, &cfg);
    let (bundle, component) = publish(&mut c, &w);
    let me = submitter();
    let twenty = |tag: u8| -> Vec<Vec<u8>> { (0..3).map(|i| vec![tag + i; 20]).collect() };
    let (job, _) = c
        .handle_submit(NOW_UNIX, &me, &bundle, "a", &twenty(0))
        .expect("60 bytes of 200");
    let t0 = Instant::now();
    c.handle_node_hello(t0, w.node_a.public(), caps())
        .expect("hello");
    let (grants, _) = c
        .handle_lease(t0, &w.node_a.public(), 3, &[])
        .expect("lease");
    let results = grants
        .iter()
        .map(|g| honest(&w.node_a, g, component))
        .collect();
    c.handle_results(t0, &w.node_a.public(), results)
        .expect("results");
    // 60 bytes in, 60 out (and the outcome's envelope): 80 more passes 200.
    let over = c
        .handle_submit(NOW_UNIX, &me, &bundle, "b", &[vec![9; 80]])
        .expect_err("over the bytes quota");
    assert_eq!(over.code, tidepool_proto::wire::ErrorCode::Busy);
    assert!(
        over.message.contains("quotas.stored_bytes"),
        "{}",
        over.message
    );
    assert_eq!(c.queued(), 0, "nothing of the refused job stored");
    // Another client is not held back by this one's bytes.
    let other = SecretKey::from_seed(KeyRole::Client, &[71; 32]).public();
    c.handle_submit(NOW_UNIX, &other, &bundle, "o", &[vec![9; 80]])
        .expect("another client's own quota");
    drop(c);
    // After a restart the same bytes count.
    let mut c = open(&path, &cfg);
    c.handle_submit(NOW_UNIX, &me, &bundle, "b", &[vec![9; 80]])
        .expect_err("still over after a restart");
    c.handle_forget_job(&me, job).expect("forget");
    c.handle_submit(NOW_UNIX, &me, &bundle, "b", &[vec![9; 80]])
        .expect("a forgotten job's bytes are free");
    drop(c);
    let mut c = open(&path, &cfg);
    c.handle_submit(NOW_UNIX, &me, &bundle, "c", &[vec![8; 100]])
        .expect("forgotten bytes stay free after a restart (80 + 100 of 200)");
}

/// Per-publisher quotas: tasks waiting of all clients' jobs on one
/// publisher's bundles, and tasks running of them.
#[test]
fn publisher_quotas_bound_the_jobs_on_its_bundles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut cfg = w.cfg.clone();
    cfg.quotas.publisher_queued_tasks = 5;
    cfg.quotas.publisher_running_tasks = 2;
    let mut c = open(&dir.path().join("pool.db"), &cfg);
    let (bundle, _) = publish(&mut c, &w);
    let other = SecretKey::from_seed(KeyRole::Client, &[72; 32]).public();
    c.handle_submit(NOW_UNIX, &submitter(), &bundle, "a", &inputs(3))
        .expect("3 of 5");
    let over = c
        .handle_submit(NOW_UNIX, &other, &bundle, "b", &inputs(3))
        .expect_err("6 of 5 for the publisher, whoever submits");
    assert!(
        over.message.contains("quotas.publisher_queued_tasks"),
        "{}",
        over.message
    );
    c.handle_submit(NOW_UNIX, &other, &bundle, "b", &inputs(2))
        .expect("5 of 5");
    let t0 = Instant::now();
    let eight = Capabilities { slots: 8, ..caps() };
    c.handle_node_hello(t0, w.node_a.public(), eight)
        .expect("hello");
    let (grants, _) = c
        .handle_lease(t0, &w.node_a.public(), 8, &[])
        .expect("lease");
    assert_eq!(grants.len(), 2, "the publisher's running quota");
    let (more, _) = c
        .handle_lease(t0, &w.node_a.public(), 8, &[])
        .expect("lease again");
    assert!(more.is_empty(), "still 2 running: {more:?}");
}

/// An unsealed job that took no input for `retention.keep` is abandoned:
/// the collection ends it (its waiting tasks dead-lettered, its leases
/// gone) and removes its inputs; one appended to since is kept open.
#[test]
fn unsealed_jobs_left_for_the_retention_time_are_ended_and_collected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let mut cfg = w.cfg.clone();
    cfg.retention.keep = Some(Duration::from_secs(30 * 86_400));
    let mut c = open(&dir.path().join("pool.db"), &cfg);
    let (bundle, _) = publish(&mut c, &w);
    let me = submitter();
    let t0 = Instant::now();
    let day = 86_400;
    c.set_clock(t0, NOW_UNIX);
    let (left, _, _) = c
        .handle_open_job(NOW_UNIX, &me, &bundle, "left", 0)
        .expect("open");
    c.handle_append_inputs(NOW_UNIX, &me, left, 0, &inputs(3))
        .expect("a chunk");
    let (busy, _, _) = c
        .handle_open_job(NOW_UNIX, &me, &bundle, "busy", 0)
        .expect("open");
    c.handle_append_inputs(NOW_UNIX + 20 * day, &me, busy, 0, &inputs(2))
        .expect("a chunk 20 days later");
    // Within retention: nothing ended.
    let p = c.handle_gc(t0 + Duration::from_secs(29 * day)).expect("gc");
    assert!(p.jobs.is_empty(), "{p:?}");
    assert_eq!(c.queued(), 5);
    let p = c.handle_gc(t0 + Duration::from_secs(31 * day)).expect("gc");
    assert_eq!(p.jobs, vec![left], "the abandoned job is collected");
    let s = c.job_status(left).expect("status");
    assert!(s.finished() && s.purged && s.dead == 3, "{s:?}");
    assert_eq!(c.queued(), 2, "the busy job's tasks still wait");
    let err = c
        .handle_append_inputs(NOW_UNIX + 31 * day, &me, left, 3, &inputs(1))
        .expect_err("an ended job takes no input");
    assert!(err.message.contains("sealed"), "{}", err.message);
    c.handle_append_inputs(NOW_UNIX + 31 * day, &me, busy, 2, &inputs(1))
        .expect("the busy job still takes input");
}
