//! Snapshot tests of manifest errors: each `tests/manifests/NAME.toml` is
//! parsed and its result (`ok` or the error text) compared with
//! `NAME.expected`. Run with `TIDEPOOL_BLESS=1` to write the expected files
//! after checking the new texts by eye.

use std::path::Path;
use tidepool_proto::manifest::AuthoredManifest;

#[test]
fn manifest_error_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests");
    tidepool_testkit::snapshot::check_dir(&dir, "toml", 10, |_, text| {
        AuthoredManifest::parse(text).map(|_| ())
    });
}
