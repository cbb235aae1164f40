//! ONNX Runtime through the sandbox (issue #7): the embed job on
//! paraphrase-MiniLM-L3-v2, 16 real texts per task, through guest → wasi-nn
//! → ONNX Runtime 1.31.1, against the `onnxruntime` Python wheel on the same
//! model and token ids (its time excludes tokenization, which ours
//! includes), with tract through the sandbox beside them. One thread each.
//!
//! Run: `cargo xtask bench` (which puts onnxruntime and numpy into
//! target/bench-venv and sets TIDEPOOL_BENCH_PYTHON). Without `--bench` it
//! runs a few iterations as a smoke test and skips Python.

use std::process::Command;
use std::time::Duration;
use tidepool_bench::{measure_pair, us};
use tidepool_host::{OnnxEngine, RegistryBuilder, Sandbox};
use tidepool_tests::{fortunes, guest, model_path, run, test_config};

fn sandbox(choice: &OnnxEngine) -> Sandbox {
    let (engines, _) = tidepool_host::engines(choice).expect("engines");
    let entry = tidepool_host::models::catalog_entry("minilm-l3").expect("catalogue");
    let mut reg = RegistryBuilder::new(engines);
    reg.add("minilm-l3", "onnx", &model_path("minilm-l3"), entry.sha256)
        .expect("model");
    Sandbox::new(test_config(), reg.build()).expect("sandbox")
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (warmup, n) = if full { (5, 60) } else { (1, 3) };
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
            run(&ort, &job_ort, "b", &input)
                .expect("run")
                .result
                .expect("ok");
        },
        || {
            run(&tract, &job_tract, "b", &input)
                .expect("run")
                .result
                .expect("ok");
        },
    );
    let python = match std::env::var_os("TIDEPOOL_BENCH_PYTHON").filter(|_| full) {
        None => {
            eprintln!("python baseline skipped (run `cargo xtask bench`)");
            None
        }
        Some(py) => {
            let vocab = std::fs::read_to_string(model_path("minilm-vocab"))?;
            let tok = tidepool_guest::text::WordPiece::from_vocab_txt(&vocab)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, 128)).collect();
            let dir = tempfile::tempdir()?;
            let ids_file = dir.path().join("ids.json");
            std::fs::write(&ids_file, serde_json::to_vec(&ids)?)?;
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("onnxruntime/run.py");
            let out = Command::new(py)
                .arg(script)
                .arg(model_path("minilm-l3"))
                .arg(&ids_file)
                .arg(warmup.to_string())
                .arg(n.to_string())
                .env("OMP_NUM_THREADS", "1")
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "python baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let secs: f64 = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("python printed {text:?}"))?;
            Some(Duration::from_secs_f64(secs))
        }
    };
    println!("| path (16 texts per call, median of {n}) | time | vs Python onnxruntime | goal |");
    println!("|---|---|---|---|");
    let ratio = |d: Duration| {
        python.map_or("(not run)".to_owned(), |p| {
            format!("{:.3}x", d.as_secs_f64() / p.as_secs_f64())
        })
    };
    if let Some(p) = python {
        println!(
            "| Python onnxruntime 1.31.1, pre-tokenized | {} | 1.000x | baseline |",
            us(p)
        );
    }
    println!(
        "| guest → wasi-nn → ONNX Runtime (incl. tokenizing, JSON) | {} | {} | ≤ 1.05x |",
        us(ours.median()),
        ratio(ours.median())
    );
    println!(
        "| guest → wasi-nn → tract (same job) | {} | {} | |",
        us(tr.median()),
        ratio(tr.median())
    );
    Ok(())
}
