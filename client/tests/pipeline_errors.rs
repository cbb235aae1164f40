//! Snapshot tests of pipeline file errors: each `tests/pipelines/NAME.toml`
//! is parsed and its result (`ok` or the error text) compared with
//! `NAME.expected`. `TIDEPOOL_BLESS=1` writes the expected files (check the
//! new texts by eye first).

use std::path::Path;
use tidepool_client::pipeline::PipelineManifest;

#[test]
fn pipeline_error_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines");
    tidepool_testkit::snapshot::check_dir(&dir, "toml", 8, |name, text| {
        PipelineManifest::parse(text, Path::new(&format!("{name}.toml"))).map(|_| ())
    });
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
