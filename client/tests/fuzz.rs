//! Fuzz target for bundle files (`tidepool bundle` writes them, `tidepool
//! pool publish` and `tidepool bundle verify` read them): damaged files read
//! as a bundle or fail with an error naming the file, never panic, never
//! allocate what a length claims, and never verify unless the signed bytes
//! are exactly the original's.
//!
//! A long run: `PROPTEST_CASES=200000 cargo test --release -p tidepool-client --test fuzz`.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use tidepool_client::bundle::BundleFile;
use tidepool_proto::{Digest, KeyRole, SecretKey};
use tidepool_testkit::fuzz::{assert_bounded_allocations, damaged, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const NOW: u64 = 1_800_000_000;

fn publisher() -> SecretKey {
    SecretKey::from_seed(KeyRole::Publisher, &[5; 32])
}

fn bundle() -> BundleFile {
    let signed = tidepool_testkit::bundle::signed(&publisher(), "fuzz", "", NOW);
    BundleFile {
        locked: signed.manifest,
        signature: Some((signed.signer, signed.signature)),
        files: BTreeMap::from([(Digest::of(b"model"), "m.onnx".into())]),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("seed.bundle");
    bundle().write(&path).expect("write");
    vec![std::fs::read(&path).expect("read")]
}

proptest! {
    #![proptest_config(tidepool_testkit::fuzz::config())]

    #[test]
    fn bundle_files(bytes in damaged(seeds())) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("damaged.bundle");
        std::fs::write(&path, &bytes).expect("write");
        match BundleFile::read(&path) {
            Ok(b) => {
                let _ = b.manifest();
                if let Some(signed) = b.signed() {
                    let trusted = BTreeSet::from([publisher().public()]);
                    if signed.verify(&trusted, NOW).is_ok() {
                        prop_assert_eq!(&b.locked, &bundle().locked);
                    }
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("damaged.bundle"), "{}", e),
        }
        assert_bounded_allocations();
    }
}
