//! A file that is not a usable ONNX Runtime library gets a clear error at
//! start-up (own test binary: a process loads ONNX Runtime at most once).

use tidepool_host::OnnxEngine;

#[test]
fn a_file_that_is_not_onnxruntime_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"not a shared library").expect("write");
    let err = tidepool_host::engines(
        &OnnxEngine::OnnxRuntime {
            library: fake.clone(),
            fallback: false,
        },
        tidepool_host::LlmSettings::alone(1),
    )
    .expect_err("not a library")
    .to_string();
    assert!(
        err.contains(&fake.display().to_string())
            && err.contains("cannot be used")
            && err.contains("1.31.1"),
        "{err}"
    );
}
