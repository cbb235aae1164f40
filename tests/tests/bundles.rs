//! The bundle rejection matrix: every way a bundle must be refused, each
//! with its own error, and a valid bundle never refused. First at the
//! node's check itself (real keys, real component and model files), then
//! over the network against a pool whose blob store was tampered with.

use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tidepool_client::bundle::BundleFile;
use tidepool_proto::manifest::{
    admit, check_blob, BundleError, LockedManifest, SignedManifest, VersionBook,
};
use tidepool_proto::{Digest, KeyRole, SecretKey};
use tidepool_tests::cluster::*;
use tidepool_tests::*;

const NOW: u64 = 1_900_000_000;

struct Case {
    name: &'static str,
    signed: SignedManifest,
    asked: Digest,
    trusted: BTreeSet<tidepool_proto::PublicKey>,
    book: VersionBook,
    now: u64,
}

fn lock(key: &SecretKey, version: &str, issued: u64) -> LockedManifest {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(40);
    let (_, b) = embed_bundle(dir.path(), &keys, version).expect("pack");
    let mut m = b.manifest().expect("manifest");
    m.publisher = key.public();
    m.issued_at = issued;
    m.expires_at = issued + 86_400;
    m
}

#[test]
fn node_check_refuses_each_bad_bundle_with_its_own_error() {
    let publisher = SecretKey::from_seed(KeyRole::Publisher, &[1; 32]);
    let stranger = SecretKey::from_seed(KeyRole::Publisher, &[2; 32]);
    let trusted = BTreeSet::from([publisher.public()]);
    let good = lock(&publisher, "2.0.0", NOW)
        .sign(&publisher)
        .expect("sign");
    let base = |name, signed: SignedManifest| Case {
        name,
        asked: signed.digest(),
        signed,
        trusted: trusted.clone(),
        book: VersionBook::default(),
        now: NOW + 10,
    };

    let mut cases = vec![base("valid", good.clone())];
    cases.push(base(
        "unknown signer",
        lock(&stranger, "2.0.0", NOW).sign(&stranger).expect("sign"),
    ));
    let mut bad_sig = good.clone();
    bad_sig.signature.0[10] ^= 1;
    cases.push(Case {
        asked: bad_sig.digest(),
        ..base("bad signature", bad_sig)
    });
    // Tampered field: raise the memory limit, keep the old signature.
    let mut m = lock(&publisher, "2.0.0", NOW);
    m.limits.memory_mib = 16_000;
    let tampered = SignedManifest {
        manifest: m.to_bytes(),
        ..good.clone()
    };
    cases.push(base("tampered field", tampered));
    // Signed by a trusted key but naming another publisher.
    let mut m = lock(&publisher, "2.0.0", NOW);
    m.publisher = stranger.public();
    let bytes = m.to_bytes();
    let forged = SignedManifest {
        signature: publisher.sign(tidepool_proto::keys::MANIFEST_TAG, &bytes),
        manifest: bytes,
        signer: publisher.public(),
    };
    cases.push(base("publisher mismatch", forged));
    cases.push(Case {
        now: NOW + 86_400,
        ..base("expired", good.clone())
    });
    cases.push(base(
        "issued in the future",
        lock(&publisher, "2.0.0", NOW + 100_000)
            .sign(&publisher)
            .expect("sign"),
    ));
    let mut book = VersionBook::default();
    book.admit(&lock(&publisher, "2.1.0", NOW))
        .expect("seen 2.1.0");
    cases.push(Case {
        book,
        ..base("rollback", good.clone())
    });
    cases.push(Case {
        asked: Digest::of(b"another bundle"),
        ..base("not the bundle asked for", good.clone())
    });
    let mut garbage = good.clone();
    garbage.manifest = b"\x93not a manifest".to_vec();
    garbage.signature = publisher.sign(tidepool_proto::keys::MANIFEST_TAG, &garbage.manifest);
    cases.push(Case {
        asked: garbage.digest(),
        ..base("malformed", garbage)
    });

    let mut messages = BTreeMap::new();
    for mut c in cases {
        let r = admit(&c.asked, &c.signed, &c.trusted, &mut c.book, c.now);
        let kind = match &r {
            Ok(_) => "ok",
            Err(BundleError::UnknownSigner(_)) => "unknown signer",
            Err(BundleError::BadSignature(_)) => "bad signature",
            Err(BundleError::PublisherMismatch { .. }) => "publisher mismatch",
            Err(BundleError::Expired { .. }) => "expired",
            Err(BundleError::NotYetValid { .. }) => "issued in the future",
            Err(BundleError::Rollback { .. }) => "rollback",
            Err(BundleError::WrongBundle { .. }) => "not the bundle asked for",
            Err(BundleError::Malformed(_)) => "malformed",
            Err(BundleError::BlobMismatch { .. }) => "blob mismatch",
        };
        let expected = match c.name {
            "valid" => "ok",
            "tampered field" => "bad signature",
            other => other,
        };
        assert_eq!(kind, expected, "case {:?}: {r:?}", c.name);
        if let Err(e) = r {
            messages.insert(c.name, e.to_string());
        }
    }
    for (case, msg) in &messages {
        eprintln!("{case:>26}: {msg}");
    }
    // Every refusal explains itself differently, except that a tampered
    // field is (rightly) reported as a signature that does not verify.
    assert_eq!(messages["tampered field"], messages["bad signature"]);
    let distinct: BTreeSet<_> = messages.values().collect();
    assert_eq!(distinct.len(), messages.len() - 1);

    // Blobs: the real component and model, and one flipped byte in each.
    let m = lock(&publisher, "2.0.0", NOW);
    let component = guest("embed");
    check_blob("component", &m.component, &component).expect("real component matches");
    let mut bad = component.clone();
    bad[component.len() / 2] ^= 1;
    let e = check_blob("component", &m.component, &bad).expect_err("flipped byte");
    assert!(
        e.to_string()
            .starts_with("component does not match the signed manifest"),
        "{e}"
    );
    let model = std::fs::read(model_path("minilm-l3")).expect("model");
    check_blob("model minilm-l3", &m.models["minilm-l3"].blob, &model).expect("real model matches");
    let mut bad = model;
    bad[1000] ^= 0x80;
    assert!(check_blob("model minilm-l3", &m.models["minilm-l3"].blob, &bad).is_err());
}

fn compiled_entries(node_dir: &std::path::Path) -> usize {
    std::fs::read_dir(node_dir.join("compiled"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A pool whose stored component or model bytes were altered: the node
/// refuses the bundle, compiles nothing, and the task is dead-lettered with
/// the reason. Then the same node refuses an older version after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_refuse_tampered_blobs_and_rollbacks_across_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(50);
    let pool_dir = dir.path().join("pool");
    // Every attempt fails here by design (a corrupt blob): the circuit
    // breaker, which would cut the only node off before the last attempts,
    // is not what this test is about.
    let mut cfg = test_pool_config(&keys);
    cfg.leasing.breaker_failures = cfg.leasing.breaker_window;
    let pool = start_pool(&pool_dir, &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let inputs = embed_inputs(&fortunes(2)?);

    for (what, version) in [("component", "1.0.1"), ("model minilm-l3", "1.0.2")] {
        let (_, b) = embed_bundle(
            &dir.path().join(format!("author-{version}")),
            &keys,
            version,
        )?;
        let m = b.manifest()?;
        let (client, digest) = publish(pool.addr, &keys, &b).await?;
        let blob = if what == "component" {
            m.component.sha256
        } else {
            m.models["minilm-l3"].blob.sha256
        };
        let path = pool_dir.join("blobs").join(blob.hex());
        let original = std::fs::read(&path)?;
        let mut bytes = original.clone();
        let i = bytes.len() / 3;
        bytes[i] ^= 0x01;
        std::fs::write(&path, &bytes)?;

        let node_dir = dir.path().join(format!("node-tamper-{version}"));
        // A node key per round: the first round's failures count toward
        // its node's breaker (the pool cannot tell a corrupt blob from a
        // broken node).
        let i = if what == "component" { 7 } else { 9 };
        let mut cfg = node_config(dir.path(), &keys, i, pool.addr);
        cfg.data_dir = node_dir.clone();
        let node = start_node(cfg);
        let (job, _) = client
            .submit(digest, inputs.clone(), format!("tampered-{version}"))
            .await?;
        let s = wait_job(&client, job, Duration::from_secs(60)).await?;
        assert_eq!((s.done, s.dead), (0, 2), "{what}: {s:?}");
        for r in client.job_results(job).await? {
            assert_eq!(r.reasons.len(), 3, "{:?}", r.reasons);
            for reason in &r.reasons {
                assert!(
                    reason.contains(&format!("{what} does not match the signed manifest")),
                    "{what}: {reason}"
                );
            }
        }
        assert_eq!(
            compiled_entries(&node_dir),
            0,
            "nothing compiled from a refused bundle"
        );
        node.drain().await?;
        client.close().await;
        // Blobs are shared by digest across bundles: put the real bytes back.
        std::fs::write(&path, &original)?;
    }

    // A node sees 1.1.0, restarts, then is offered 1.0.9: refused.
    let node_dir = dir.path().join("node-rollback");
    let cfg = {
        let mut c = node_config(dir.path(), &keys, 8, pool.addr);
        c.data_dir = node_dir.clone();
        c
    };
    let (_, newer) = embed_bundle(&dir.path().join("author-1.1.0"), &keys, "1.1.0")?;
    let (client, d_new) = publish(pool.addr, &keys, &newer).await?;
    let node = start_node(cfg.clone());
    let (job, _) = client.submit(d_new, inputs.clone(), "newer".into()).await?;
    assert_eq!(
        wait_job(&client, job, Duration::from_secs(120)).await?.done,
        2
    );
    node.drain().await?;
    assert!(
        compiled_entries(&node_dir) > 0,
        "the valid bundle was compiled and ran"
    );

    let (_, older) = embed_bundle(&dir.path().join("author-1.0.9"), &keys, "1.0.9")?;
    let (_, d_old) = publish(pool.addr, &keys, &older).await?;
    let node = start_node(cfg);
    let (job, _) = client.submit(d_old, inputs.clone(), "older".into()).await?;
    let s = wait_job(&client, job, Duration::from_secs(60)).await?;
    assert_eq!((s.done, s.dead), (0, 2));
    let reasons = &client.job_results(job).await?[0].reasons;
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("older than version 1.1.0")),
        "{reasons:?}"
    );
    node.drain().await?;
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A bundle file whose component changed on disk after packing fails
/// `bundle verify`, naming the file.
#[test]
fn bundle_file_verify_notices_a_changed_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(60);
    let wasm = dir.path().join("embed.wasm");
    std::fs::write(&wasm, guest("embed"))?;
    std::fs::write(
        dir.path().join("tidepool.toml"),
        "name = \"embed\"\nversion = \"1.0.0\"\ncomponent = \"embed.wasm\"\n",
    )?;
    let mut b =
        tidepool_client::bundle::pack(&dir.path().join("tidepool.toml"), keys.publisher.public())?;
    b.sign(&keys.publisher)?;
    let path = dir.path().join("x.bundle");
    b.write(&path)?;
    let trusted = BTreeSet::from([keys.publisher.public()]);
    BundleFile::read(&path)?.verify(&path, &trusted)?;
    let mut bytes = std::fs::read(&wasm)?;
    bytes.push(0);
    std::fs::write(&wasm, bytes)?;
    let err = BundleFile::read(&path)?
        .verify(&path, &trusted)
        .expect_err("changed");
    assert!(
        err.to_string().contains("component") && err.to_string().contains("embed.wasm"),
        "{err}"
    );
    Ok(())
}
