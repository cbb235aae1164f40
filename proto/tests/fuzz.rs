//! Fuzz targets for everything `proto` decodes from a peer or a file:
//! frames, every wire message (requests and responses, which carry hellos,
//! grants, results, receipts, manifests and records), authored manifests,
//! signed (locked) manifests, signed receipts, and the ledger statement and
//! replay files `tidepool ledger verify` and `tidepool replay` read. Each target takes valid
//! encodings, damages them the way a hostile peer would (or makes up bytes),
//! and checks that decoding never panics, never allocates what a length
//! prefix claims, and never accepts a damaged signed object.
//!
//! `cargo xtask test` runs each for 2048 cases; a long run:
//! `PROPTEST_CASES=200000 cargo test --release -p tidepool-proto --test fuzz`.

use proptest::prelude::*;
use std::collections::BTreeSet;
use tidepool_proto::manifest::{AuthoredManifest, SignedManifest};
use tidepool_proto::receipt::{sign_batch, LeaseReceipt, Receipt, SignedReceipt};
use tidepool_proto::wire::{
    self, Bytes, Canary, Capabilities, FrameDecoder, JobId, LeaseId, Request, Response, TaskGrant,
    TaskId,
};
use tidepool_proto::{Digest, KeyRole, SecretKey};
use tidepool_testkit::fuzz::{assert_bounded_allocations, damaged, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const NOW: u64 = 1_800_000_000;

fn publisher() -> SecretKey {
    SecretKey::from_seed(KeyRole::Publisher, &[3; 32])
}

fn node() -> SecretKey {
    SecretKey::from_seed(KeyRole::Node, &[4; 32])
}

fn manifest() -> SignedManifest {
    tidepool_testkit::bundle::signed(&publisher(), "fuzz", "", NOW)
}

fn grant() -> TaskGrant {
    TaskGrant {
        identity: "t".into(),
        lease: LeaseId {
            task: TaskId(7),
            attempt: 2,
        },
        bundle: Digest::of(b"bundle"),
        input: Bytes(b"{\"texts\":[\"hello\"]}".to_vec()),
        replay: None,
    }
}

fn result() -> wire::TaskResult {
    tidepool_testkit::fake_node::answer(
        &node(),
        &grant(),
        Digest::of(b"component"),
        b"olleh".to_vec(),
        "fuzz",
    )
}

fn requests() -> Vec<Request> {
    let d = Digest::of(b"x");
    vec![
        Request::NodeHello {
            protocol: 1,
            agent: "tidepool-node".into(),
            caps: Capabilities {
                encodings: vec!["onnx".into(), "ggml".into()],
                models: vec![d],
                memory_mib: 1024,
                slots: 2,
                queue: 2,
                ..Capabilities::default()
            },
        },
        Request::ClientHello {
            protocol: 1,
            agent: "tidepool".into(),
        },
        Request::Lease {
            want: 4,
            running: vec![grant().lease],
        },
        Request::Results {
            results: vec![result(), result()],
        },
        Request::Draining,
        Request::FetchManifest { bundle: d },
        Request::FetchBlob {
            digest: d,
            offset: 10,
        },
        Request::Publish {
            manifest: manifest(),
        },
        Request::PutBlob {
            digest: d,
            offset: 0,
            data: Bytes(vec![1; 64]),
        },
        Request::Submit {
            bundle: d,
            inputs: vec![Bytes(b"a".to_vec()), Bytes(b"b".to_vec())],
            key: "k".into(),
        },
        Request::OpenJob {
            bundle: d,
            key: "k".into(),
            priority: 3,
        },
        Request::AppendInputs {
            job: JobId(3),
            from: 2,
            inputs: vec![Bytes(b"c".to_vec())],
        },
        Request::SealJob {
            job: JobId(3),
            total: 3,
        },
        Request::CancelJob { job: JobId(3) },
        Request::ForgetJob { job: JobId(3) },
        Request::Collect,
        Request::JobStatus { job: JobId(3) },
        Request::JobResults {
            job: JobId(3),
            from: 0,
            limit: 100,
        },
        Request::PoolStatus,
        Request::Challenge { task: TaskId(9) },
        Request::AddCanaries {
            bundle: d,
            items: vec![Canary {
                job: JobId(3),
                index: 1,
            }],
        },
        Request::AccountHello {
            protocol: wire::PROTOCOL_VERSION,
            agent: "node owner".into(),
        },
        Request::Ledger {
            query: tidepool_proto::ledger::LedgerQuery {
                since: 0,
                until: 100,
                node: None,
            },
            as_of: Some(50),
            after: Some(tidepool_proto::ledger::LedgerCursor::Result { at: 7, task: 9 }),
            limit: 256,
        },
        Request::Replayable {
            job: JobId(3),
            index: 2,
        },
    ]
}

fn responses() -> Vec<Response> {
    let d = Digest::of(b"y");
    vec![
        Response::Welcome {
            protocol: 1,
            agent: "pool".into(),
            lease_ttl_ms: 30_000,
            heartbeat_ms: 5_000,
        },
        Response::Leases {
            grants: vec![grant(), grant()],
            lost: vec![grant().lease],
            retry_ms: 50,
            standing: Some(wire::NodeStanding {
                reputation: 120,
                sampling: 0.012,
                confirmed: 7,
                strikes: 1,
                quarantined_until: 0,
                banned: false,
            }),
        },
        Response::Verdicts(vec![(grant().lease, wire::Verdict::Accepted)]),
        Response::Manifest(manifest()),
        Response::BlobChunk {
            digest: d,
            offset: 0,
            total: 100,
            data: Bytes(vec![2; 100]),
        },
        Response::Published {
            bundle: d,
            missing: vec![d],
        },
        Response::BlobStored { digest: d, have: 5 },
        Response::Submitted {
            job: JobId(1),
            tasks: 2,
        },
        Response::Records(vec![]),
        Response::Challenged {
            task: TaskId(1),
            job: JobId(2),
            index: 0,
            state: wire::ChallengeState::Pending,
        },
        Response::Canaries { count: 1 },
        Response::LedgerPage(
            tidepool_proto::ledger::LedgerPage {
                pool: SecretKey::from_seed(KeyRole::Pool, &[3; 32]).public(),
                query: tidepool_proto::ledger::LedgerQuery {
                    since: 0,
                    until: 100,
                    node: None,
                },
                as_of: 50,
                after: None,
                rows: vec![],
                next: Some(tidepool_proto::ledger::LedgerCursor::Withdrawn { id: 4 }),
            }
            .sign(&SecretKey::from_seed(KeyRole::Pool, &[3; 32])),
        ),
        Response::Ok,
        Response::Error {
            code: wire::ErrorCode::Protocol,
            message: "no".into(),
        },
    ]
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = requests()
        .iter()
        .map(|r| wire::encode(r).expect("encodes"))
        .collect();
    out.extend(
        responses()
            .iter()
            .map(|r| wire::encode(r).expect("encodes")),
    );
    // Several frames back to back, as a stream carries them.
    out.push(out.concat());
    out
}

fn bodies() -> Vec<Vec<u8>> {
    frame_seeds().into_iter().map(|f| f[4..].to_vec()).collect()
}

proptest! {
    #![proptest_config(tidepool_testkit::fuzz::config())]

    /// A stream of damaged frames, cut at arbitrary points: every frame is
    /// a message, an error, or still incomplete; nothing panics.
    #[test]
    fn frames(bytes in damaged(frame_seeds()), cuts in proptest::collection::vec(1usize..300, 1..8)) {
        for as_request in [true, false] {
            let mut dec = FrameDecoder::new();
            let mut rest = &bytes[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*cut).min(rest.len()));
                rest = tail;
                dec.handle_bytes(chunk);
                loop {
                    let polled = if as_request {
                        dec.poll_frame::<Request>().map(|m| m.is_some())
                    } else {
                        dec.poll_frame::<Response>().map(|m| m.is_some())
                    };
                    match polled {
                        Ok(true) => continue,
                        Ok(false) | Err(_) => break,
                    }
                }
            }
            let _ = dec.handle_end();
        }
        assert_bounded_allocations();
    }

    /// Every request: a damaged body decodes to an error or to a request
    /// that survives a round trip; its kind is read from its head alone.
    #[test]
    fn requests_decode_or_fail(body in damaged(bodies())) {
        let _ = wire::message_name(&body[..body.len().min(wire::NAME_HEAD_BYTES)]);
        if let Ok(r) = wire::decode_body::<Request>(&body) {
            let again = wire::encode(&r).expect("a decoded request encodes");
            prop_assert_eq!(wire::decode_body::<Request>(&again[4..]).expect("round trip"), r);
        }
        assert_bounded_allocations();
    }

    /// Every response, likewise (what a node or client reads from a pool).
    #[test]
    fn responses_decode_or_fail(body in damaged(bodies())) {
        if let Ok(r) = wire::decode_body::<Response>(&body) {
            let again = wire::encode(&r).expect("a decoded response encodes");
            prop_assert_eq!(wire::decode_body::<Response>(&again[4..]).expect("round trip"), r);
        }
        assert_bounded_allocations();
    }

    /// Authored manifests: damaged `tidepool.toml` texts parse or fail with
    /// an error; nothing panics.
    #[test]
    fn authored_manifests(text in damaged(manifest_texts())) {
        let text = String::from_utf8_lossy(&text);
        if let Ok(m) = AuthoredManifest::parse(&text) {
            prop_assert!(!m.name.is_empty());
        }
        assert_bounded_allocations();
    }

    /// Signed (locked) manifests: a damaged one never verifies unless the
    /// signed bytes and signature are exactly the original's.
    #[test]
    fn signed_manifests(bytes in damaged(vec![rmp_serde::to_vec_named(&manifest()).expect("encodes")])) {
        let original = manifest();
        let trusted = BTreeSet::from([publisher().public()]);
        if let Ok(m) = rmp_serde::from_slice::<SignedManifest>(&bytes) {
            if m.verify(&trusted, NOW).is_ok() {
                prop_assert_eq!(&m.manifest, &original.manifest);
                prop_assert_eq!(m.signature, original.signature);
            }
        }
        // The locked bytes alone, damaged, as a node reads them.
        let _ = rmp_serde::from_slice::<tidepool_proto::manifest::LockedManifest>(&bytes);
        assert_bounded_allocations();
    }

    /// Signed receipts: a damaged one never opens unless its body is the
    /// original's; damaged bodies decode or fail.
    #[test]
    fn receipts(bytes in damaged(receipt_seeds())) {
        let originals = receipts_batch();
        if let Ok(r) = rmp_serde::from_slice::<SignedReceipt>(&bytes) {
            if r.open(&node().public()).is_ok() {
                prop_assert!(originals.iter().any(|o| o.body == r.body));
            }
        }
        let _ = rmp_serde::from_slice::<LeaseReceipt>(&bytes);
        let _ = rmp_serde::from_slice::<Receipt>(&bytes);
        assert_bounded_allocations();
    }
}

/// A statement file of two pages signed by the pool, over the fuzz
/// node's receipts (what `tidepool ledger verify` reads from disk).
fn statement() -> tidepool_proto::ledger::StatementFile {
    use tidepool_proto::ledger::*;
    let pool = SecretKey::from_seed(KeyRole::Pool, &[3; 32]);
    let rows: Vec<LedgerRow> = receipts_batch()
        .into_iter()
        .enumerate()
        .map(|(i, receipt)| LedgerRow {
            node: node().public(),
            job: JobId(1),
            index: i as u32,
            state: if i == 2 {
                RowState::Withdrawn
            } else {
                RowState::Credited
            },
            at: 10 + i as u64,
            receipt,
        })
        .collect();
    let query = LedgerQuery {
        since: 0,
        until: 100,
        node: None,
    };
    let cut = LedgerCursor::Result { at: 11, task: 1 };
    let pages = [
        LedgerPage {
            pool: pool.public(),
            query: query.clone(),
            as_of: 50,
            after: None,
            rows: rows[..2].to_vec(),
            next: Some(cut),
        },
        LedgerPage {
            pool: pool.public(),
            query,
            as_of: 50,
            after: Some(cut),
            rows: rows[2..].to_vec(),
            next: None,
        },
    ]
    .map(|p| p.sign(&pool));
    StatementFile::from_pages(&pool.public(), &pages).expect("a statement")
}

/// A replay file of one of the fuzz node's results.
fn replay_file() -> tidepool_proto::replay::ReplayFile {
    let g = grant();
    let r = tidepool_testkit::fake_node::answer(&node(), &g, Digest::of(b"c"), vec![1], "fuzz");
    tidepool_proto::replay::ReplayFile::new(&tidepool_proto::replay::Replayable {
        job: JobId(1),
        index: 0,
        node: node().public(),
        manifest: manifest(),
        input: g.input,
        outcome: r.outcome,
        receipt: r.receipt.expect("signed"),
        transcript: vec![],
    })
}

proptest! {
    #![proptest_config(tidepool_testkit::fuzz::config())]

    /// Statement files from disk: a damaged one fails to parse or to
    /// verify, unless it says exactly what the pool signed.
    #[test]
    fn statement_files(text in damaged(vec![serde_json::to_vec(&statement()).expect("json")])) {
        let original = statement();
        if let Ok(f) = serde_json::from_slice::<tidepool_proto::ledger::StatementFile>(&text) {
            if let Ok(checked) = f.verify(None) {
                prop_assert_eq!(checked.totals, original.totals);
                prop_assert_eq!(f.rows, original.rows);
            }
        }
        assert_bounded_allocations();
    }

    /// Replay files from disk: a damaged one fails to parse or its parts
    /// do not check, unless its signed parts are the original's.
    #[test]
    fn replay_files(text in damaged(vec![serde_json::to_vec(&replay_file()).expect("json")])) {
        let original = replay_file();
        if let Ok(f) = serde_json::from_slice::<tidepool_proto::replay::ReplayFile>(&text) {
            if let Ok(r) = f.replayable() {
                if r.check().is_ok() {
                    prop_assert_eq!(f.receipt, original.receipt);
                    prop_assert_eq!(f.manifest, original.manifest);
                }
            }
        }
        assert_bounded_allocations();
    }
}

fn manifest_texts() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests");
    let mut texts: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("tests/manifests")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    texts.sort();
    texts
}

fn receipts_batch() -> Vec<SignedReceipt> {
    let bodies = (0..3u64)
        .map(|i| {
            let mut g = grant();
            g.lease.task = TaskId(i);
            let r = tidepool_testkit::fake_node::answer(
                &node(),
                &g,
                Digest::of(b"c"),
                vec![i as u8],
                "fuzz",
            );
            r.receipt.expect("signed").body
        })
        .collect();
    sign_batch(&node(), bodies)
}

fn receipt_seeds() -> Vec<Vec<u8>> {
    let batch = receipts_batch();
    let mut seeds: Vec<Vec<u8>> = batch
        .iter()
        .map(|r| rmp_serde::to_vec_named(r).expect("encodes"))
        .collect();
    seeds.extend(batch.iter().map(|r| r.body.clone()));
    seeds
}
