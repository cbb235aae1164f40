//! ONNX Runtime through the sandbox (issue #7): the embed job on
//! paraphrase-MiniLM-L3-v2, 16 real texts per task, through guest → wasi-nn
//! → ONNX Runtime 1.31.1, against the `onnxruntime` Python wheel on the same
//! model and token ids (its time excludes tokenization, which ours
//! includes), pass for pass interleaved, with tract through the sandbox
//! beside them (interleaved with ours). One thread each.
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
    let (engines, _) = tidepool_host::engines(choice, 1).expect("engines");
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
    // Python, interleaved with passes of ours: the same number of passes,
    // alternating, so machine noise hits both alike.
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
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("onnxruntime/run.py");
            let mut child = Command::new(py)
                .arg(script)
                .arg(model_path("minilm-l3"))
                .arg(&ids_file)
                .arg("0")
                .arg("0")
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
            let mut py_pass = || -> anyhow::Result<Duration> {
                writeln!(stdin, "run")?;
                let line = lines
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("python baseline ended"))??;
                Ok(Duration::from_secs_f64(line.trim().parse()?))
            };
            let mut ours_t = Vec::new();
            let mut py_t = Vec::new();
            for i in 0..warmup + n {
                let t = std::time::Instant::now();
                run(&ort, &job_ort, "b", &input)
                    .expect("run")
                    .result
                    .expect("ok");
                let o = t.elapsed();
                let p = py_pass()?;
                if i >= warmup {
                    ours_t.push(o);
                    py_t.push(p);
                }
            }
            drop(stdin);
            let _ = child.wait();
            ours_t.sort();
            py_t.sort();
            Some((py_t[py_t.len() / 2], ours_t[ours_t.len() / 2]))
        }
    };
    println!("| path (16 texts per call, median of {n}) | time | vs Python onnxruntime | goal |");
    println!("|---|---|---|---|");
    let ratio = |d: Duration| {
        python.map_or("(not run)".to_owned(), |(p, _)| {
            format!("{:.3}x", d.as_secs_f64() / p.as_secs_f64())
        })
    };
    if let Some((p, ours_interleaved)) = python {
        println!(
            "| Python onnxruntime 1.31.1, pre-tokenized | {} | 1.000x | baseline |",
            us(p)
        );
        println!(
            "| guest → wasi-nn → ONNX Runtime, interleaved with Python | {} | {} | ≤ 1.05x |",
            us(ours_interleaved),
            ratio(ours_interleaved)
        );
    }
    println!(
        "| guest → wasi-nn → ONNX Runtime, interleaved with tract | {} | {} | |",
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
