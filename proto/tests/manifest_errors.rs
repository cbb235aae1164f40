//! Snapshot tests of manifest errors: each `tests/manifests/NAME.toml` is
//! parsed and its result (`ok` or the error text) compared with
//! `NAME.expected`. Run with `TIDEPOOL_BLESS=1` to write the expected files
//! after checking the new texts by eye.

use std::path::Path;
use tidepool_proto::manifest::AuthoredManifest;

#[test]
fn manifest_error_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests");
    let bless = std::env::var_os("TIDEPOOL_BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("read fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "fixtures missing from {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let text = std::fs::read_to_string(case).expect("read case");
        let got = match AuthoredManifest::parse(&text) {
            Ok(_) => "ok\n".to_owned(),
            Err(e) => format!("{e}\n"),
        };
        let name = case.file_stem().and_then(|s| s.to_str()).expect("name");
        // Names say what to expect: ok-* parse, everything else is refused.
        assert_eq!(name.starts_with("ok-"), got == "ok\n", "{name}: {got}");
        let expected_path = case.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &got).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} missing; run with TIDEPOOL_BLESS=1",
                expected_path.display()
            )
        });
        if expected != got {
            failures.push(format!("{name}:\n--- expected\n{expected}--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
