//! `tidepool run` as a job author uses it: real binary, real components,
//! real models; bad input gets one clear error line and a non-zero exit.

use std::path::Path;
use std::process::{Command, Output};
use tidepool_tests::{guest, jobs_dir, model_path};

fn tidepool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .output()
        .expect("run tidepool")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 1 and exactly one line on stderr, containing every `needle`.
fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got: {err}"
    );
    assert!(err.starts_with("tidepool: error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

/// `tidepool run embed.wasm --model minilm-l3 --input INPUT EXTRA...`
fn run_embed(input: &str, extra: &[&str]) -> Output {
    let wasm = embed_wasm();
    let mut args = vec![
        "run",
        wasm.as_str(),
        "--model",
        "minilm-l3",
        "--input",
        input,
    ];
    args.extend_from_slice(extra);
    tidepool(&args)
}

fn embed_wasm() -> String {
    let _ = guest("embed");
    jobs_dir().join("embed.wasm").display().to_string()
}

fn write_input(dir: &Path, texts: &[&str]) -> String {
    let p = dir.join("input.json");
    std::fs::write(
        &p,
        serde_json::to_vec(&serde_json::json!({ "texts": texts })).expect("json"),
    )
    .expect("write");
    p.display().to_string()
}

#[test]
fn runs_the_embed_job_and_prints_a_receipt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = write_input(dir.path(), &["hello world", "the quick brown fox"]);
    let o = run_embed(&input, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let output: serde_json::Value =
        serde_json::from_str(doc["output"].as_str().expect("output")).expect("embedding json");
    assert_eq!(output["dim"], 384);
    assert_eq!(output["vectors"].as_array().expect("vectors").len(), 2);
    let r = &doc["receipt"];
    assert_eq!(r["ok"], true);
    assert!(r["output"].as_str().expect("digest").len() == 64);
    assert!(r["wall_time_us"].as_u64().expect("wall") > 0);
    assert_eq!(
        r["models"]["minilm-l3"]["engine"],
        "tract-onnx 0.23.9 (cpu)"
    );
}

#[test]
fn two_fresh_processes_give_identical_output_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let texts = tidepool_tests::fortunes(6).expect("corpus");
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let input = write_input(dir.path(), &texts);
    let a = run_embed(&input, &[]);
    let b = run_embed(&input, &[]);
    assert!(
        a.status.success() && b.status.success(),
        "{} {}",
        stderr(&a),
        stderr(&b)
    );
    assert!(a.stdout.len() > 1000);
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn missing_model_file_is_one_clear_error() {
    let o = tidepool(&[
        "run",
        &embed_wasm(),
        "--model",
        "minilm-l3=/nonexistent/minilm.onnx",
    ]);
    assert_one_line_error(&o, &["/nonexistent/minilm.onnx", "missing"]);
}

#[test]
fn wrong_model_digest_is_one_clear_error() {
    let vocab = model_path("minilm-vocab").display().to_string();
    let o = tidepool(&[
        "run",
        &embed_wasm(),
        "--model",
        &format!("minilm-l3={vocab}"),
    ]);
    assert_one_line_error(&o, &["minilm-vocab.txt", "expected b388816f"]);
    let model = model_path("minilm-l3").display().to_string();
    let o = tidepool(&[
        "run",
        &embed_wasm(),
        "--model",
        &format!("mine={model}@{}", "0".repeat(64)),
    ]);
    assert_one_line_error(
        &o,
        &["minilm-l3.onnx", &format!("expected {}", "0".repeat(64))],
    );
}

#[test]
fn garbage_and_core_modules_are_not_components() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm at all").expect("write");
    let o = tidepool(&["run", garbage.to_str().expect("utf8")]);
    assert_one_line_error(
        &o,
        &["garbage.wasm", "not a WebAssembly component", "magic"],
    );
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let o = tidepool(&["run", core.to_str().expect("utf8")]);
    assert_one_line_error(&o, &["core.wasm", "core WebAssembly module"]);
    let truncated = dir.path().join("truncated.wasm");
    let embed = guest("embed");
    std::fs::write(&truncated, &embed[..embed.len() / 2]).expect("write");
    let o = tidepool(&["run", truncated.to_str().expect("utf8")]);
    assert_one_line_error(&o, &["truncated.wasm", "not a WebAssembly component"]);
}

#[test]
fn component_of_another_world_is_refused() {
    let _ = guest("other-world");
    let p = jobs_dir().join("other-world.wasm");
    let o = tidepool(&["run", p.to_str().expect("utf8")]);
    assert_one_line_error(&o, &["other-world.wasm", "not a tidepool:job job", "run"]);
}

#[test]
fn task_failures_and_job_errors_have_their_own_exit_codes() {
    let _ = guest("spin");
    let spin = jobs_dir().join("spin.wasm");
    let o = tidepool(&["run", spin.to_str().expect("utf8"), "--timeout", "0.2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("time limit"), "{}", stderr(&o));
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, b"{").expect("write");
    let o = run_embed(bad.to_str().expect("utf8"), &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid-input"), "{}", stderr(&o));
}

#[test]
fn usage_errors_have_an_exit_code_of_their_own_and_help_lists_the_codes() {
    for args in [&["--bogus"][..], &["run"], &["pool", "frobnicate"]] {
        let o = tidepool(args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
    }
    let o = tidepool(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for line in [
        "Exit codes:",
        "  2   `run`: the task was stopped",
        "  64  usage error",
    ] {
        assert!(help.contains(line), "{line:?} missing from --help:\n{help}");
    }
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let o = tidepool(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = String::from_utf8_lossy(&o.stdout);
        // Verbs and a nested verb's flag are in every script.
        for word in ["keygen", "pipeline", "heartbeat-ms"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let o = tidepool(&["man", "--out", &dir.path().to_string_lossy()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let page = std::fs::read_to_string(dir.path().join("tidepool-pool-serve.1"))
        .expect("a page for `pool serve`");
    assert!(page.contains(".TH tidepool-pool-serve"), "{page}");
    assert!(page.contains("heartbeat\\-ms"), "{page}");
    assert!(std::fs::read_to_string(dir.path().join("tidepool.1"))
        .expect("the main page")
        .contains("Exit codes"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, b"hello").expect("write");
    let component = jobs_dir().join("echo.wasm");
    let run = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["--log-format", format, "run"])
            .arg(&component)
            .arg("--input")
            .arg(&input)
            .env("TIDEPOOL_LOG", "debug")
            .output()
            .expect("run tidepool")
    };
    let o = run("json");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!o.stdout.is_empty(), "no output");
    let err = stderr(&o);
    // Log lines are JSON; the verb's own summary line (`ok: 5 bytes, ...`)
    // is not a log line and stays text.
    let (logs, other): (Vec<&str>, Vec<&str>) = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .partition(|l| l.starts_with('{'));
    assert!(logs.len() > 3, "too few log lines to judge: {err}");
    assert!(
        other.iter().all(|l| l.starts_with("ok: ")),
        "lines that are neither JSON logs nor the summary: {other:?}"
    );
    for line in logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    // Text logs are not JSON.
    let o = run("text");
    assert!(o.status.success());
    assert!(!stderr(&o).trim_start().starts_with('{'), "{}", stderr(&o));
    let o = tidepool(&["--log-format", "bogus", "models", "list"]);
    assert_eq!(o.status.code(), Some(64));
}
