//! Snapshot tests of pipeline file errors: each `tests/pipelines/NAME.toml`
//! is parsed and its result (`ok` or the error text) compared with
//! `NAME.expected`. `TIDEPOOL_BLESS=1` writes the expected files (check the
//! new texts by eye first).

use std::path::Path;
use tidepool_client::pipeline::PipelineManifest;

#[test]
fn pipeline_error_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines");
    let bless = std::env::var_os("TIDEPOOL_BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("read fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 8, "fixtures missing from {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let text = std::fs::read_to_string(case).expect("read case");
        let name = case.file_stem().and_then(|s| s.to_str()).expect("name");
        let got = match PipelineManifest::parse(&text, Path::new(&format!("{name}.toml"))) {
            Ok(_) => "ok\n".to_owned(),
            Err(e) => format!("{e}\n"),
        };
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

/// The pipeline shipped in `jobs/` is valid.
#[test]
fn the_aggregator_pipeline_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs/aggregator/pipeline.toml");
    let m = PipelineManifest::load(&path).expect("jobs/aggregator/pipeline.toml");
    assert_eq!(m.stages.len(), 3);
    for s in &m.stages {
        assert!(m.bundle_path(s).is_file(), "{}", m.bundle_path(s).display());
    }
}
