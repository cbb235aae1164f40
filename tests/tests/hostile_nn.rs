//! Hostile guests spending host resources through wasi-nn (issue #16): each
//! is stopped by its budget with the reason, host memory stays bounded, and
//! the same sandbox then serves a real embed task. The guest is the
//! `nn-abuse` fixture; the model is the real MiniLM on tract.

use serde_json::{json, Value};
use std::time::Duration;
use tidepool_host::backend::budget::{abandoned_computes, NnLimits};
use tidepool_host::backend::shapes::{ShapeBudget, ShapeRefusal};
use tidepool_host::task_threads::{task_threads, MAX_IDLE};
use tidepool_host::{Sandbox, SandboxConfig, TaskError};
use tidepool_tests::*;

const MODEL: &str = "minilm-l3";

/// One test at a time: one of them measures this process's memory.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn assert_healthy(sb: &Sandbox) {
    let job = sb.load(&guest("embed")).expect("load embed");
    let out = run(sb, &job, "after", br#"{"texts":["hello world"]}"#)
        .expect("embed runs after a hostile task");
    let e: Embeddings = serde_json::from_slice(&out.result.expect("ok")).expect("json");
    assert_eq!(e.vectors[0].len(), 384);
}

fn abuse(sb: &Sandbox, id: &str, input: Value) -> Result<Value, TaskError> {
    let job = sb.load(&guest("nn-abuse")).expect("load nn-abuse");
    let out = run(sb, &job, id, input.to_string().as_bytes())?;
    Ok(serde_json::from_slice(&out.result.expect("the fixture returns JSON")).expect("JSON"))
}

/// A sandbox whose tasks have `timeout_ms` and may ask for any working memory.
fn slow_sandbox(timeout_ms: u64) -> Sandbox {
    sandbox(SandboxConfig {
        timeout: Duration::from_millis(timeout_ms),
        nn: NnLimits {
            max_compute_bytes: 64 << 30,
            ..NnLimits::default()
        },
        ..test_config()
    })
}

/// A large batch within that memory: tract needs a good part of a second.
fn slow_shape() -> Value {
    json!({"shape": {"model": MODEL, "dims": [16, 512], "inputs": ["input_ids", "attention_mask"]}})
}

fn with_nn(nn: NnLimits) -> SandboxConfig {
    SandboxConfig {
        nn,
        ..test_config()
    }
}

#[test]
fn a_tensor_loop_ends_at_the_tensor_budget_and_host_memory_stays_bounded() {
    let _serial = serial();
    let budget = 32u64 << 20;
    let sb = sandbox(with_nn(NnLimits {
        max_tensor_bytes: budget,
        ..NnLimits::default()
    }));
    let before = rss_bytes();
    for i in 0..4 {
        let err = abuse(
            &sb,
            &format!("loop-{i}"),
            json!({"tensor_loop": {"bytes": 1 << 20}}),
        )
        .expect_err("the loop never returns on its own");
        let TaskError::Budget(why) = &err else {
            panic!("expected a budget error, got {err:?}")
        };
        assert!(why.contains("tensor bytes"), "{why}");
    }
    // Without the budget each task copies 1 MiB into the host per iteration
    // until its deadline (gigabytes); with it, each holds at most 32 MiB
    // (freed with its store) besides its 128 MiB of linear memory.
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 512 << 20, "host RSS grew by {grown} bytes");
    assert_healthy(&sb);
}

#[test]
fn a_huge_input_shape_is_refused_before_the_engine_runs() {
    let _serial = serial();
    let sb = sandbox(test_config());
    let inputs = ["input_ids", "attention_mask"];
    // A million tokens: attention alone would be terabytes.
    let err = abuse(
        &sb,
        "huge",
        json!({"shape": {"model": MODEL, "dims": [1, 1_000_000], "inputs": inputs}}),
    )
    .expect_err("over the compute budget");
    let TaskError::Budget(why) = &err else {
        panic!("expected a budget error, got {err:?}")
    };
    assert!(why.contains("compute memory"), "{why}");

    // Dimensions that do not match the data, or the model's rank: the guest
    // gets an error, and the task goes on.
    for (dims, lie) in [(json!([65_536, 65_536]), true), (json!([16]), false)] {
        let out = abuse(
            &sb,
            "wrong",
            json!({"shape": {"model": MODEL, "dims": dims, "inputs": inputs, "lie": lie}}),
        )
        .expect("a guest-visible error, not the end of the task");
        assert_eq!(out["error"]["call"], "compute", "{out}");
    }
    // A sensible shape runs.
    let out = abuse(
        &sb,
        "fine",
        json!({"shape": {"model": MODEL, "dims": [2, 16], "inputs": inputs}}),
    )
    .expect("runs");
    assert!(
        out["ok"].as_str().is_some_and(|s| s.ends_with("outputs")),
        "{out}"
    );
    assert_healthy(&sb);
}

#[test]
fn the_working_memory_estimate_follows_the_shapes() {
    let _serial = serial();
    let shapes = ShapeBudget::of_onnx_file(&model_path(MODEL)).expect("analyse MiniLM");
    let est = |b: u32, s: u32| {
        let t = |name: &str| wasmtime_wasi_nn::backend::NamedTensor {
            name: name.into(),
            tensor: wasmtime_wasi_nn::Tensor::new(
                vec![b, s],
                wasmtime_wasi_nn::wit::TensorType::I64,
                vec![0; b as usize * s as usize * 8],
            ),
        };
        shapes
            .check(&[t("input_ids"), t("attention_mask")], u64::MAX)
            .expect("valid shapes")
            .expect("the estimate depends only on the inputs")
    };
    let (small, long, wide) = (est(1, 128), est(1, 512), est(16, 128));
    eprintln!("estimates: [1,128] {small}, [1,512] {long}, [16,128] {wide}");
    // Attention grows with the square of the sequence (linear growth would
    // make it exactly 4×), everything with the batch.
    assert!(long > 5 * small, "{long} vs {small}");
    assert!(wide > 15 * small && wide <= 16 * small, "{wide} vs {small}");
    // What real jobs send fits the default budget many times over.
    assert!(est(16, 256) < NnLimits::default().max_compute_bytes / 2);
    assert!(est(16, 512) < NnLimits::default().max_compute_bytes);
    // The declared rank and the data length are checked too.
    let bad = wasmtime_wasi_nn::backend::NamedTensor {
        name: "input_ids".into(),
        tensor: wasmtime_wasi_nn::Tensor::new(
            vec![1, 4],
            wasmtime_wasi_nn::wit::TensorType::I64,
            vec![0; 8],
        ),
    };
    assert!(matches!(
        shapes.check(&[bad], u64::MAX),
        Err(ShapeRefusal::Invalid { .. })
    ));
}

#[test]
fn execution_contexts_are_bounded_per_task() {
    let _serial = serial();
    let sb = sandbox(with_nn(NnLimits {
        max_contexts: 4,
        ..NnLimits::default()
    }));
    let err = abuse(
        &sb,
        "contexts",
        json!({"contexts": {"model": MODEL, "count": 1000}}),
    )
    .expect_err("over the context budget");
    let TaskError::Budget(why) = &err else {
        panic!("expected a budget error, got {err:?}")
    };
    assert!(why.contains("execution contexts"), "{why}");
    // Four are allowed.
    let out = abuse(
        &sb,
        "four",
        json!({"contexts": {"model": MODEL, "count": 4}}),
    )
    .expect("runs");
    assert_eq!(out["ok"], "4 contexts open", "{out}");
    assert_healthy(&sb);
}

#[test]
fn a_compute_past_the_deadline_is_let_go() {
    let _serial = serial();
    // A large batch within the memory budget: tract needs a good part of a second
    // for it, the task has 100 ms.
    let sb = slow_sandbox(100);
    let err = abuse(&sb, "slow", slow_shape()).expect_err("over time");
    assert!(matches!(err, TaskError::Deadline { .. }), "{err:?}");
    // The task ended while the engine was still computing: its thread was let go.
    assert!(
        abandoned_computes() >= 1,
        "the task waited for the compute to finish"
    );
    // It finishes on its own and is not counted any more.
    let waited = std::time::Instant::now();
    while abandoned_computes() > 0 && waited.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(abandoned_computes(), 0);
    let sb = sandbox(test_config());
    assert_healthy(&sb);
}

/// Tasks run on kept threads (one hand-over per task, warm caches): a
/// hundred tasks one after another, the let-go kind included, do not start
/// a hundred threads, and the threads kept idle stay within their cap.
#[test]
fn tasks_run_on_kept_threads_and_let_go_ones_come_back() {
    let _serial = serial();
    let sb = sandbox(test_config());
    let echo = sb.load(&guest("echo")).expect("load echo");
    run(&sb, &echo, "first", b"x").expect("run");
    let before = task_threads();
    for i in 0..100 {
        let out = run(&sb, &echo, &format!("t{i}"), b"x").expect("run");
        assert_eq!(out.result.expect("ok"), b"x");
    }
    assert!(
        task_threads() <= before + 1,
        "{} threads after 100 tasks, {before} before",
        task_threads()
    );

    // Three tasks let go inside a long compute: each holds its thread
    // until the compute ends, then the thread is idle again (or ends past
    // the idle cap).
    let slow = slow_sandbox(50);
    for i in 0..3 {
        let err = abuse(&slow, &format!("slow{i}"), slow_shape()).expect_err("over time");
        assert!(matches!(err, TaskError::Deadline { .. }), "{err:?}");
    }
    // What a node holds for the task (its slot) stays held until the
    // engine call of a let-go task returns, not only until the answer.
    let slot = std::sync::Arc::new(());
    let abuse_job = slow.load(&guest("nn-abuse")).expect("load nn-abuse");
    let params = Default::default();
    let input = slow_shape().to_string();
    let err = slow
        .run_holding(
            &abuse_job,
            tidepool_host::TaskSpec::new("held", &params, input.as_bytes()),
            None,
            slot.clone(),
        )
        .expect_err("over time");
    assert!(matches!(err, TaskError::Deadline { .. }), "{err:?}");
    assert_eq!(
        std::sync::Arc::strong_count(&slot),
        2,
        "the slot is still held while the engine computes"
    );
    let waited = std::time::Instant::now();
    while abandoned_computes() > 0 && waited.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(abandoned_computes(), 0);
    assert_eq!(
        std::sync::Arc::strong_count(&slot),
        1,
        "released at the end"
    );
    assert!(
        task_threads() <= MAX_IDLE.max(before + 4),
        "{}",
        task_threads()
    );
    let after = task_threads();
    for i in 0..20 {
        run(&sb, &echo, &format!("u{i}"), b"x").expect("run");
    }
    assert_eq!(task_threads(), after, "the kept threads serve later tasks");

    // A sandbox's epoch thread ticks while its engine lives (a let-go task
    // may still need its wasm to trap), and ends with it.
    drop((sb, echo, slow, abuse_job));
    let epoch_threads = || {
        std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "tidepool-epoch")
            .count()
    };
    let waited = std::time::Instant::now();
    while epoch_threads() > 0 && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(epoch_threads(), 0, "every sandbox's epoch thread ended");
}
