//! The stand-in bundle of coordinator tests: a component and one `onnx`
//! model `m`, whose blob digests are of fixed bytes (so the pool can be told
//! every blob is present), signed by the test's publisher.

use std::collections::BTreeMap;
use tidepool_proto::manifest::{AuthoredManifest, BlobRef, LockedManifest, SignedManifest};
use tidepool_proto::{Digest, SecretKey};

/// The component blob every stand-in bundle names.
pub fn component() -> BlobRef {
    BlobRef {
        sha256: Digest::of(b"component"),
        size: 9,
    }
}

/// A signed stand-in bundle called `name` (version 1.0.0), with `extra`
/// manifest text (top-level keys or tables) before its models table, locked
/// at `now_unix`.
pub fn signed(publisher: &SecretKey, name: &str, extra: &str, now_unix: u64) -> SignedManifest {
    signed_with_model(publisher, name, extra, "", now_unix)
}

/// [`signed`], with `model_extra` lines in the model's table (`engine = ...`).
pub fn signed_with_model(
    publisher: &SecretKey,
    name: &str,
    extra: &str,
    model_extra: &str,
    now_unix: u64,
) -> SignedManifest {
    let authored = AuthoredManifest::parse(&format!(
        "name = \"{name}\"\nversion = \"1.0.0\"\ncomponent = \"{name}.wasm\"\n{extra}\
         [models.m]\nencoding = \"onnx\"\nsource = \"m.onnx\"\nsha256 = \"{}\"\n{model_extra}",
        Digest::of(b"model").hex()
    ))
    .expect("the stand-in manifest parses");
    let models = BTreeMap::from([(
        "m".to_owned(),
        BlobRef {
            sha256: Digest::of(b"model"),
            size: 5,
        },
    )]);
    LockedManifest::lock(
        &authored,
        component(),
        &models,
        publisher.public(),
        now_unix,
    )
    .expect("the stand-in manifest locks")
    .sign(publisher)
    .expect("the stand-in manifest signs")
}
