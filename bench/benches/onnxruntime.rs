//! ONNX Runtime through the sandbox (issue #7): the embed job on
//! paraphrase-MiniLM-L3-v2, 16 real texts per task, through guest → wasi-nn
//! → ONNX Runtime 1.31.1, against the `onnxruntime` Python wheel on the same
//! model and texts, round for round interleaved (each measured pass runs
//! warm, right after an unmeasured pass on the same session), with tract
//! through the sandbox beside them (interleaved with ours). One thread each.
//!
//! Two Python baselines: the embed job's work in Python (tokenize with
//! Hugging Face `tokenizers`, which must give the same ids as the guest,
//! run, normalise; no output encoding), and ONNX Runtime alone on the
//! pre-tokenized ids (its floor). Ours includes the guest's tokenizer, JSON
//! in and out and a fresh instance per task.
//!
//! Run: `cargo xtask bench` (which puts onnxruntime, numpy and tokenizers
//! into target/bench-venv and sets TIDEPOOL_BENCH_PYTHON). Without
//! `--bench` it runs a few iterations as a smoke test and skips Python.

use std::process::Command;
use std::time::Duration;
use tidepool_bench::{measure_pair, us};
use tidepool_host::{OnnxEngine, RegistryBuilder, Sandbox};
use tidepool_tests::{fortunes, guest, model_path, run, test_config};

fn sandbox(choice: &OnnxEngine) -> Sandbox {
    let (engines, _) =
        tidepool_host::engines(choice, tidepool_host::LlmSettings::alone(1)).expect("engines");
    let entry = tidepool_host::models::catalog_entry("minilm-l3").expect("catalogue");
    let mut reg = RegistryBuilder::new(engines);
    reg.add("minilm-l3", "onnx", &model_path("minilm-l3"), entry.sha256)
        .expect("model");
    Sandbox::new(test_config(), reg.build()).expect("sandbox")
}

/// Medians of the interleaved run against Python, and per-pass ratios
/// (sorted).
struct Baseline {
    /// Python doing the job's work (tokenize, run, normalise).
    python_job: Duration,
    /// Python on pre-tokenized ids.
    python: Duration,
    ours: Duration,
    engine: Duration,
    /// Ours / Python job, per pass.
    ours_job_ratios: Vec<f64>,
    /// Ours / Python pre-tokenized, per pass.
    ours_ratios: Vec<f64>,
    /// Engine alone / Python pre-tokenized, per pass.
    engine_ratios: Vec<f64>,
    /// Ours (fresh instance) / the same job in one reused instance, per pass.
    fresh_ratios: Vec<f64>,
    /// Ours right after a pass of the Python process / ours warm, per pass.
    cold_ratios: Vec<f64>,
}

fn i64_tensor(name: &str, v: &[i64]) -> wasmtime_wasi_nn::backend::NamedTensor {
    wasmtime_wasi_nn::backend::NamedTensor {
        name: name.into(),
        tensor: wasmtime_wasi_nn::Tensor {
            dimensions: vec![1, v.len() as u32],
            ty: wasmtime_wasi_nn::wit::TensorType::I64,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
    }
}

/// One embed task through `sb`, timed.
fn timed_task(sb: &Sandbox, job: &tidepool_host::JobComponent, input: &[u8]) -> Duration {
    let t = std::time::Instant::now();
    run(sb, job, "b", input).expect("run").result.expect("ok");
    t.elapsed()
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (warmup, n) = if full { (5, 150) } else { (1, 3) };
    let texts = fortunes(16)?;
    let input = serde_json::to_vec(&serde_json::json!({ "texts": texts }))?;
    let ort = sandbox(&OnnxEngine::OnnxRuntime {
        library: model_path("onnxruntime-lib"),
        fallback: false,
    });
    let tract = sandbox(&OnnxEngine::Tract);
    let job_ort = ort.load(&guest("embed"))?;
    let job_tract = tract.load(&guest("embed"))?;
    let (ours, tr) = measure_pair(
        warmup,
        n,
        || {
            timed_task(&ort, &job_ort, &input);
        },
        || {
            timed_task(&tract, &job_tract, &input);
        },
    );
    // Python, interleaved with ours round for round (the same number of
    // rounds), so machine noise hits both alike.
    let python = match std::env::var_os("TIDEPOOL_BENCH_PYTHON").filter(|_| full) {
        None => {
            eprintln!("python baseline skipped (run `cargo xtask bench`)");
            None
        }
        Some(py) => {
            use std::io::{BufRead, BufReader, Write};
            let vocab = std::fs::read_to_string(model_path("minilm-vocab"))?;
            let tok = tidepool_guest::text::WordPiece::from_vocab_txt(&vocab)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, 128)).collect();
            let dir = tempfile::tempdir()?;
            let ids_file = dir.path().join("ids.json");
            std::fs::write(&ids_file, serde_json::to_vec(&ids)?)?;
            let texts_file = dir.path().join("texts.json");
            std::fs::write(&texts_file, serde_json::to_vec(&texts)?)?;
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("onnxruntime/run.py");
            let mut child = Command::new(py)
                .arg(script)
                .arg(model_path("minilm-l3"))
                .arg(&ids_file)
                .arg("0")
                .arg("0")
                .arg(model_path("minilm-tokenizer"))
                .arg(&texts_file)
                .env("OMP_NUM_THREADS", "1")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
            let mut lines = BufReader::new(
                child
                    .stdout
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("stdout"))?,
            )
            .lines();
            let mut py_pass = |kind: &str| -> anyhow::Result<Duration> {
                writeln!(stdin, "{kind}")?;
                let line = lines
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("python baseline ended"))??;
                Ok(Duration::from_secs_f64(line.trim().parse()?))
            };
            // Where a gap is: ONNX Runtime through our engine code alone
            // (no sandbox, no guest), on the same token ids as Python.
            let engine = tidepool_host::backend::onnxruntime::OrtEngine::new(&model_path(
                "onnxruntime-lib",
            ))?;
            let graph = tidepool_host::backend::NnEngine::load(&engine, &model_path("minilm-l3"))?;
            let engine_pass = || {
                let env = tidepool_host::backend::TaskEnv {
                    budget: tidepool_host::backend::TaskBudget {
                        deadline: std::time::Instant::now() + Duration::from_secs(600),
                    },
                    llm: std::sync::Arc::new(tidepool_host::backend::LlmTask::new()),
                    nn: Default::default(),
                };
                let mut ctx = graph.context(&env).expect("context");
                for t in &ids {
                    let ids: Vec<i64> = t.iter().map(|&i| i64::from(i)).collect();
                    let mask = vec![1i64; ids.len()];
                    ctx.compute(Some(vec![
                        i64_tensor("input_ids", &ids),
                        i64_tensor("attention_mask", &mask),
                    ]))
                    .expect("compute");
                }
            };
            let (mut ours_t, mut engine_t, mut py_t, mut pyjob_t) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut ours_r, mut ours_job_r, mut engine_r) = (Vec::new(), Vec::new(), Vec::new());
            // What per-task isolation costs: the same job called on one
            // instance kept across calls (never done for real tasks).
            let reused = tidepool_host::TaskSpec {
                replay: None,
                accept: Default::default(),
                shared_batches: false,
                id: "b",
                params: &Default::default(),
                input: &input,
            };
            let (mut fresh_r, mut cold_r) = (Vec::new(), Vec::new());
            // Every measured pass runs warm, right after an unmeasured pass
            // on the same ONNX Runtime session: the model's layers (~21 MB
            // of weights) fit in this machine's shared L3 cache only for
            // whichever process ran last, and a node (or a Python service)
            // running tasks back to back is warm too. A pass right after
            // the other process's pass pays for refilling the cache (ours:
            // 3-5 %, printed below); until 2026-11-29 the bench measured
            // ours cold and Python's job pass warm.
            let ours_pass = || timed_task(&ort, &job_ort, &input);
            for i in 0..warmup + n {
                // Follows the Python process's last pass: cold.
                let c = ours_pass();
                let o = ours_pass();
                // Same session as ours: warm.
                let t = std::time::Instant::now();
                ort.call_reused_instance(&job_ort, reused, 4)?;
                let r = t.elapsed() / 4;
                engine_pass();
                let t = std::time::Instant::now();
                engine_pass();
                let e = t.elapsed();
                py_pass("job")?;
                let j = py_pass("job")?;
                // Same session as the pass before: warm.
                let p = py_pass("run")?;
                if i >= warmup {
                    ours_t.push(o);
                    engine_t.push(e);
                    py_t.push(p);
                    pyjob_t.push(j);
                    ours_r.push(o.as_secs_f64() / p.as_secs_f64());
                    ours_job_r.push(o.as_secs_f64() / j.as_secs_f64());
                    engine_r.push(e.as_secs_f64() / p.as_secs_f64());
                    fresh_r.push(o.as_secs_f64() / r.as_secs_f64());
                    cold_r.push(c.as_secs_f64() / o.as_secs_f64());
                }
            }
            drop(stdin);
            let _ = child.wait();
            for v in [&mut ours_t, &mut engine_t, &mut py_t, &mut pyjob_t] {
                v.sort();
            }
            for v in [
                &mut ours_r,
                &mut ours_job_r,
                &mut engine_r,
                &mut fresh_r,
                &mut cold_r,
            ] {
                v.sort_by(f64::total_cmp);
            }
            let mid = |v: &Vec<Duration>| v[v.len() / 2];
            Some(Baseline {
                python_job: mid(&pyjob_t),
                python: mid(&py_t),
                ours: mid(&ours_t),
                engine: mid(&engine_t),
                ours_ratios: ours_r,
                ours_job_ratios: ours_job_r,
                engine_ratios: engine_r,
                fresh_ratios: fresh_r,
                cold_ratios: cold_r,
            })
        }
    };
    println!("| path (16 texts per call, median of {n}) | time | vs Python onnxruntime | goal |");
    println!("|---|---|---|---|");
    if let Some(b) = &python {
        let spread = |r: &[f64]| {
            format!(
                "{:.3}x (per-pass range {:.3}–{:.3})",
                r[r.len() / 2],
                r[0],
                r[r.len() - 1]
            )
        };
        println!(
            "| Python: tokenizers + onnxruntime 1.31.1 + normalise (the job's work) | {} | 1.000x | baseline |",
            us(b.python_job)
        );
        println!(
            "| guest → wasi-nn → ONNX Runtime, interleaved with Python | {} | {} | ≤ 1.05x |",
            us(b.ours),
            spread(&b.ours_job_ratios)
        );
        println!(
            "| Python onnxruntime 1.31.1 alone, pre-tokenized ids | {} | floor: ours is {} of it | |",
            us(b.python),
            spread(&b.ours_ratios)
        );
        println!(
            "| our ONNX Runtime engine alone (no sandbox), same ids | {} | {} of the pre-tokenized floor | (where a gap is) |",
            us(b.engine),
            spread(&b.engine_ratios)
        );
        println!(
            "| a fresh instance per task vs one instance reused for 4 calls | | fresh is {} of reused | (what isolation costs) |",
            spread(&b.fresh_ratios)
        );
        println!(
            "| ours right after a pass of the Python process (cold cache) vs warm | | cold is {} of warm | (why passes are measured warm) |",
            spread(&b.cold_ratios)
        );
    }
    // tract against ours from their own interleaved run (the Python medians
    // come from another stretch of time, so no ratio against them here).
    println!(
        "| guest → wasi-nn → ONNX Runtime, interleaved with tract | {} | | |",
        us(ours.median())
    );
    println!(
        "| guest → wasi-nn → tract (same job) | {} | {:.3}x of ours through ONNX Runtime | (beside) |",
        us(tr.median()),
        tr.median().as_secs_f64() / ours.median().as_secs_f64()
    );
    Ok(())
}
