//! Hostile guests, each a real component built like the jobs: every one is
//! stopped with the right reason, and the same sandbox then serves a real
//! embed task correctly.

use std::time::{Duration, Instant};
use tidepool_host::{Sandbox, SandboxConfig, TaskError, TaskSpec};
use tidepool_tests::*;

/// After whatever happened, the sandbox must still embed correctly.
fn assert_healthy(sb: &Sandbox) {
    let job = sb.load(&guest("embed")).expect("load embed");
    let out = run(sb, &job, "after", br#"{"texts":["hello world"]}"#)
        .expect("embed runs after a hostile task");
    let e: Embeddings = serde_json::from_slice(&out.result.expect("ok")).expect("json");
    assert_eq!(e.vectors.len(), 1);
    assert_eq!(e.vectors[0].len(), 384);
}

fn probe(sb: &Sandbox, input: &str) -> serde_json::Value {
    let job = sb.load(&guest("nn-probe")).expect("load probe");
    let out = run(sb, &job, "probe", input.as_bytes()).expect("probe runs");
    serde_json::from_slice(&out.result.expect("probe returns")).expect("probe JSON")
}

#[test]
fn endless_loop_is_stopped_by_the_deadline() {
    let sb = sandbox(SandboxConfig {
        timeout: Duration::from_millis(300),
        ..test_config()
    });
    let job = sb.load(&guest("spin")).expect("load");
    let t = Instant::now();
    let err = run(&sb, &job, "spin", b"").expect_err("must be stopped");
    assert!(matches!(err, TaskError::Deadline { .. }), "{err:?}");
    // Not a timing assertion on speed: only that it ended at all, well before a test timeout.
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_healthy(&sb);
}

/// A node cancels a running task (its lease was cancelled): the endless
/// loop stops with `Cancelled` long before its 60 s deadline, and the same
/// sandbox runs the next task. An unset flag changes nothing.
#[test]
fn a_running_task_stops_when_cancelled() {
    let sb = sandbox(SandboxConfig {
        timeout: Duration::from_secs(60),
        ..test_config()
    });
    let job = sb.load(&guest("spin")).expect("load");
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let setter = flag.clone();
    let t = Instant::now();
    let cancel = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        setter.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let params = std::collections::BTreeMap::new();
    let err = sb
        .run_cancellable(&job, TaskSpec::new("spin", &params, b""), Some(flag))
        .expect_err("must be stopped");
    cancel.join().expect("join");
    assert!(matches!(err, TaskError::Cancelled), "{err:?}");
    // Not a timing assertion on speed: only that it ended before its deadline.
    assert!(t.elapsed() < Duration::from_secs(30));
    let echo = sb.load(&guest("echo")).expect("load");
    let unset = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let out = sb
        .run_cancellable(
            &echo,
            TaskSpec::new("echo", &params, b"still here"),
            Some(unset),
        )
        .expect("runs");
    assert_eq!(out.result.expect("output"), b"still here");
    assert_healthy(&sb);
}

#[test]
fn memory_bomb_traps_at_the_limit_and_host_memory_stays_bounded() {
    let limit = 64 << 20;
    let sb = sandbox(SandboxConfig {
        max_memory_bytes: limit,
        ..test_config()
    });
    let job = sb.load(&guest("membomb")).expect("load");
    let rss_before = rss_bytes();
    for i in 0..8 {
        let err = run(&sb, &job, &format!("bomb-{i}"), b"").expect_err("must trap");
        assert!(
            matches!(err, TaskError::Memory { limit: l } if l == limit),
            "{err:?}"
        );
    }
    let grown = rss_bytes().saturating_sub(rss_before);
    // Eight bombs at 64 MiB each: the pool reuses slots, so the host holds at most about one task's memory.
    assert!(
        grown < 3 * limit as u64,
        "host RSS grew by {grown} bytes over 8 bombs of {limit}"
    );
    assert_healthy(&sb);
}

#[test]
fn oversized_output_is_refused() {
    let sb = sandbox(SandboxConfig {
        max_output_bytes: 1 << 20,
        ..test_config()
    });
    let job = sb.load(&guest("big-output")).expect("load");
    let ok = run(&sb, &job, "small", b"1000").expect("small output is fine");
    assert_eq!(ok.result.expect("ok").len(), 1000);
    let err = run(&sb, &job, "big", b"2000000").expect_err("too big");
    assert!(
        matches!(
            err,
            TaskError::OutputTooLarge {
                size: 2_000_000,
                limit: 1_048_576
            }
        ),
        "{err:?}"
    );
    assert_healthy(&sb);
}

#[test]
fn load_by_name_refuses_unknown_and_path_like_names() {
    let sb = sandbox(test_config());
    assert_eq!(
        probe(&sb, r#"{"load_by_name":"minilm-l3"}"#),
        serde_json::json!({"ok": true})
    );
    for name in [
        "no-such-model",
        "../../etc/passwd",
        "/root/.cache/tidepool/models/minilm-l3.onnx",
        "minilm-l3.onnx",
        "MINILM-L3",
        "",
    ] {
        let v = probe(
            &sb,
            &serde_json::json!({ "load_by_name": name }).to_string(),
        );
        assert_eq!(v["error"]["code"], "NotFound", "name {name:?}: {v}");
    }
}

#[test]
fn models_from_guest_bytes_are_refused() {
    let sb = sandbox(test_config());
    let v = probe(&sb, r#"{"load_bytes":"onnx"}"#);
    // wasmtime-wasi-nn hands guests only the top-level message of a backend
    // error; the reason ("use load-by-name") is in the node's log.
    assert_eq!(v["error"]["code"], "RuntimeError", "{v}");
}

#[test]
fn trap_in_the_middle_of_inference_leaves_the_host_healthy() {
    let sb = sandbox(test_config());
    let job = sb.load(&guest("trap-mid-inference")).expect("load");
    for i in 0..3 {
        let err = run(&sb, &job, &format!("trap-{i}"), b"").expect_err("traps");
        assert!(matches!(err, TaskError::Trap(_)), "{err:?}");
    }
    assert_healthy(&sb);
}

#[test]
fn fuel_metering_counts_deterministically_and_stops_runaways() {
    let sb = sandbox(SandboxConfig {
        fuel: Some(50_000_000_000),
        ..test_config()
    });
    let job = sb.load(&guest("embed")).expect("load");
    let a = run(&sb, &job, "f", br#"{"texts":["fuel is counted"]}"#).expect("run");
    let b = run(&sb, &job, "f", br#"{"texts":["fuel is counted"]}"#).expect("run");
    let fa = a.receipt.fuel.expect("fuel reported");
    assert!(fa > 0);
    assert_eq!(Some(fa), b.receipt.fuel, "same task, same fuel");
    let tight = sandbox(SandboxConfig {
        fuel: Some(10_000),
        ..test_config()
    });
    let spin = tight.load(&guest("spin")).expect("load");
    let err = run(&tight, &spin, "spin", b"").expect_err("out of fuel");
    assert!(matches!(err, TaskError::Fuel { limit: 10_000 }), "{err:?}");
}
