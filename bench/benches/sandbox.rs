//! Sandbox benchmarks (issue #2). Each figure is a ratio against a baseline
//! measured in the same process, side by side:
//!
//! 1. per-task isolation: fresh instance per task (pooling + InstancePre) vs
//!    calling one already-instantiated component, on a trivial task and as a
//!    share of an embed task;
//! 2. the embed job through guest → wasi-nn → tract vs the same tokenizer and
//!    model called natively through tract;
//! 3. cold start from the compiled-component cache vs compiling.
//!
//! Run: `cargo xtask bench` (or `cargo bench -p tidepool-bench` after
//! `cargo xtask setup`). Prints a Markdown table for BENCHMARKS.md.

use std::collections::BTreeMap;
use std::time::Duration;
use tidepool_bench::{measure, measure_pair, measure_ratio, us};
use tidepool_host::backend::tract::TractModel;
use tidepool_host::{SandboxConfig, TaskSpec};
use tidepool_tests::{fortunes, guest, model_path, native_embedding, run, sandbox, test_config};

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: then
    // run every measurement once as a smoke test, so the benchmark cannot rot.
    let full = std::env::args().any(|a| a == "--bench");
    let it = |n: usize| if full { n } else { 1 };
    let params = BTreeMap::new();
    let mut rows: Vec<(String, String, String, String)> = Vec::new();

    // 1. Instantiation per task vs a reused instance, trivial job (empty output).
    let sb = sandbox(SandboxConfig {
        timeout: Duration::from_secs(600),
        ..test_config()
    });
    let trivial = sb.load(&guest("big-output")).expect("load");
    let n = it(2000);
    let fresh = measure(it(200), n, || {
        let out = run(&sb, &trivial, "t", b"0").expect("run");
        assert!(out.result.expect("ok").is_empty());
    });
    let task = TaskSpec {
        shared_batches: false,
        replay: None,
        accept: Default::default(),
        id: "t",
        params: &params,
        input: b"0",
    };
    let reused_total = measure(1, it(5), || {
        sb.call_reused_instance(&trivial, task, n).expect("reused");
    });
    let reused_per_call = reused_total.median() / n as u32;
    let added = fresh.median().saturating_sub(reused_per_call);

    // Embed task for scale: one short text.
    let embed = sb.load(&guest("embed")).expect("load embed");
    let one = br#"{"texts":["A visit to a strange place will bring fresh work."]}"#;
    let embed_task = measure(it(5), it(200), || {
        run(&sb, &embed, "e", one).expect("run").result.expect("ok");
    });
    rows.push((
        "per-task fresh instance (trivial job)".into(),
        us(fresh.median()),
        format!("reused instance: {}", us(reused_per_call)),
        format!(
            "+{} per task = {:.2}% of a 1-text embed task ({})",
            us(added),
            100.0 * added.as_secs_f64() / embed_task.median().as_secs_f64(),
            us(embed_task.median())
        ),
    ));

    // 2. Embed through the sandbox vs native tract, same texts, same tokenizer.
    let texts = fortunes(16).expect("corpus");
    let input = serde_json::to_vec(&serde_json::json!({ "texts": texts })).expect("json");
    let vocab = std::fs::read_to_string(model_path("minilm-vocab")).expect("vocab");
    let tok = tidepool_guest::text::WordPiece::from_vocab_txt(&vocab).expect("vocab");
    let model = TractModel::load(&model_path("minilm-l3")).expect("model");
    let pooled = model
        .output_names()
        .iter()
        .position(|n| n == "461")
        .expect("pooled output 461");
    // Pass for pass, native first: the ratios are sandbox / native.
    let (native, sandboxed, ratios) = measure_ratio(
        it(3),
        it(60),
        || {
            let mut out = Vec::new();
            for t in &texts {
                out.push(native_embedding(
                    |i| model.run(i),
                    pooled,
                    &tok.encode(t, 128),
                ));
            }
            std::hint::black_box(out);
        },
        || {
            run(&sb, &embed, "b", &input)
                .expect("run")
                .result
                .expect("ok");
        },
    );
    rows.push((
        "embed 16 fortunes: sandbox → wasi-nn → tract".into(),
        format!("{:.2} ms", sandboxed.median().as_secs_f64() * 1e3),
        format!(
            "native tract: {:.2} ms",
            native.median().as_secs_f64() * 1e3
        ),
        format!(
            "{:.3}x (median of {} pass-for-pass ratios)",
            ratios[ratios.len() / 2],
            ratios.len()
        ),
    ));

    // 2b. The working-memory check every compute passes before the engine
    //     runs (issue #16), vs one text's inference natively.
    let shapes =
        tidepool_host::backend::shapes::ShapeBudget::of_onnx_file(&model_path("minilm-l3"))
            .expect("shapes");
    let ids = tok.encode(&texts[0], 128);
    let tensor = |name: &str| wasmtime_wasi_nn::backend::NamedTensor {
        name: name.into(),
        tensor: wasmtime_wasi_nn::Tensor::new(
            vec![1, ids.len() as u32],
            wasmtime_wasi_nn::wit::TensorType::I64,
            vec![0; ids.len() * 8],
        ),
    };
    let inputs = [tensor("input_ids"), tensor("attention_mask")];
    let (check, one_text) = measure_pair(
        it(100),
        it(2000),
        || {
            std::hint::black_box(shapes.check(&inputs, u64::MAX).expect("fits"));
        },
        || {
            std::hint::black_box(native_embedding(|i| model.run(i), pooled, &ids));
        },
    );
    rows.push((
        "working-memory check before each compute".into(),
        us(check.median()),
        format!("one text natively: {}", us(one_text.median())),
        format!(
            "{:.2}% of it",
            100.0 * check.median().as_secs_f64() / one_text.median().as_secs_f64()
        ),
    ));

    // 3. Cold start: compile vs load from the disk cache (fresh sandbox each time).
    let dir = std::env::temp_dir().join(format!("tidepool-bench-cache-{}", std::process::id()));
    let cfg = SandboxConfig {
        cache_dir: Some(dir.clone()),
        ..test_config()
    };
    let bytes = guest("embed");
    let compile = measure(1, it(5), || {
        sb.compile_uncached(&bytes).expect("compile");
    });
    let warm = sandbox(cfg.clone());
    warm.load(&bytes).expect("fill cache");
    // What a node does: it names the component by its manifest's digest.
    let digest = tidepool_proto::Digest::of(&bytes);
    let cached = measure(it(3), it(30), || {
        let j = warm.load_known(digest, &bytes).expect("load");
        assert!(j.from_cache());
    });
    // `tidepool run` and tools that have only the bytes hash them first.
    let hashed = measure(it(3), it(30), || {
        let j = warm.load(&bytes).expect("load");
        assert!(j.from_cache());
    });
    let _ = std::fs::remove_dir_all(&dir);
    rows.push((
        format!("cold start of embed.wasm ({} KB)", bytes.len() / 1000),
        format!(
            "from cache by digest: {:.2} ms",
            cached.median().as_secs_f64() * 1e3
        ),
        format!("compile: {:.1} ms", compile.median().as_secs_f64() * 1e3),
        format!(
            "{:.0}x faster",
            compile.median().as_secs_f64() / cached.median().as_secs_f64()
        ),
    ));
    rows.push((
        "cold start, bytes hashed first".into(),
        format!("from cache: {:.2} ms", hashed.median().as_secs_f64() * 1e3),
        format!("compile: {:.1} ms", compile.median().as_secs_f64() * 1e3),
        format!(
            "{:.0}x faster",
            compile.median().as_secs_f64() / hashed.median().as_secs_f64()
        ),
    ));

    println!("| what | measured | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    for (a, b, c, d) in rows {
        println!("| {a} | {b} | {c} | {d} |");
    }
}
