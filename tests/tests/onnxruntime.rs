//! ONNX Runtime as the node's `onnx` engine (issue #7, CPU path): the same
//! embed job on the same model through tract and through ONNX Runtime agree
//! within the tolerance tier; a pool with nodes on both engines verifies
//! them against each other under `tolerance` and flags them under `exact`.

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tidepool_host::backend::NnEngine;
use tidepool_host::{OnnxEngine, RegistryBuilder, Sandbox};
use tidepool_pool::verify::VerifyPolicy;
use tidepool_tests::cluster::*;
use tidepool_tests::*;

fn ort_library() -> std::path::PathBuf {
    model_path("onnxruntime-lib")
}

fn embed_sandbox(engines: Vec<Arc<dyn NnEngine>>) -> Sandbox {
    let entry = tidepool_host::models::catalog_entry("minilm-l3").expect("catalogue");
    let mut reg = RegistryBuilder::new(engines);
    reg.add("minilm-l3", "onnx", &model_path("minilm-l3"), entry.sha256)
        .expect("model");
    Sandbox::new(test_config(), reg.build()).expect("sandbox")
}

fn ort_engines() -> Vec<Arc<dyn NnEngine>> {
    let (engines, fell_back) = tidepool_host::engines(
        &OnnxEngine::OnnxRuntime {
            library: ort_library(),
            fallback: false,
        },
        tidepool_host::LlmSettings::alone(1),
    )
    .expect("ONNX Runtime loads");
    assert!(fell_back.is_none());
    engines
}

#[test]
fn tract_and_onnxruntime_embeddings_agree_within_tolerance() {
    let texts = corpus(40).expect("corpus");
    let input = serde_json::to_vec(&serde_json::json!({ "texts": texts })).expect("json");
    let ort = embed_sandbox(ort_engines());
    assert_eq!(ort_engines()[0].describe(), "onnxruntime 1.31.1 (cpu)");
    let tract = embed_sandbox(tidepool_host::default_engines());
    let run_on = |sb: &Sandbox| {
        let job = sb.load(&guest("embed")).expect("load");
        let out = run(sb, &job, "t", &input).expect("run");
        let engine = out.receipt.models["minilm-l3"].engine.clone();
        let e: Embeddings = serde_json::from_slice(&out.result.expect("ok")).expect("json");
        (e, engine, out.receipt.output)
    };
    let (a, engine_a, digest_a) = run_on(&tract);
    let (b, engine_b, digest_b) = run_on(&ort);
    assert_eq!(engine_a, "tract-onnx 0.23.9 (cpu)");
    assert_eq!(
        engine_b, "onnxruntime 1.31.1 (cpu)",
        "the receipt names the engine"
    );
    let worst = a
        .vectors
        .iter()
        .zip(&b.vectors)
        .map(|(x, y)| cosine(x, y))
        .fold(f32::INFINITY, f32::min);
    eprintln!(
        "tract vs ONNX Runtime over {} texts: lowest cosine {worst:.7}; outputs {}",
        texts.len(),
        if digest_a == digest_b {
            "byte-identical"
        } else {
            "differ in bytes"
        }
    );
    assert!(worst >= 0.9999, "lowest cosine {worst}");
    // ONNX Runtime with deterministic settings repeats itself exactly.
    let (_, _, again) = run_on(&ort);
    assert_eq!(again, digest_b);
}

#[test]
fn a_missing_library_is_refused_or_replaced_by_tract_as_configured() {
    let missing = OnnxEngine::OnnxRuntime {
        library: "/nonexistent/libonnxruntime.so.1.31.1".into(),
        fallback: false,
    };
    let err = tidepool_host::engines(&missing, tidepool_host::LlmSettings::alone(1))
        .expect_err("missing library")
        .to_string();
    assert!(
        err.contains("/nonexistent/libonnxruntime.so.1.31.1") && err.contains("does not exist"),
        "{err}"
    );
    let (engines, why) = tidepool_host::engines(
        &OnnxEngine::OnnxRuntime {
            library: "/nonexistent/libonnxruntime.so.1.31.1".into(),
            fallback: true,
        },
        tidepool_host::LlmSettings::alone(1),
    )
    .expect("fallback");
    assert_eq!(engines[0].describe(), "tract-onnx 0.23.9 (cpu)");
    assert!(why
        .expect("a reason")
        .contains("running onnx models on tract instead"));
}

/// The CPU wheel's library has no CUDA provider: a GPU engine from it is
/// refused with what it offers and what to fetch instead.
#[test]
fn the_cpu_library_cannot_serve_a_gpu() {
    let err = tidepool_host::backend::onnxruntime::OrtEngine::cuda(&ort_library(), 0)
        .expect_err("the CPU build has no CUDA provider")
        .to_string();
    assert!(
        err.contains("has no CUDA execution provider")
            && err.contains("CPUExecutionProvider")
            && err.contains("onnxruntime-gpu-lib")
            && err.contains(&ort_library().display().to_string()),
        "{err}"
    );
    // The CPU engine from the same library still works.
    assert_eq!(ort_engines()[0].describe(), "onnxruntime 1.31.1 (cpu)");
}

/// Two nodes on tract (trusted) and ONNX Runtime nodes, every result
/// re-executed. Under `tolerance` (one ONNX Runtime node, so every check of
/// its results runs on tract) the engines confirm each other. Under `exact`
/// (two ONNX Runtime nodes) a check runs only on a node with the engines
/// the result's receipt names: tract results on tract, ONNX Runtime results
/// on the other ONNX Runtime node — every check confirms and nobody is
/// struck, though the two engines' bytes differ (see above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_engines_confirm_under_tolerance_and_check_within_an_engine_under_exact() -> Result<()>
{
    for (tier, ort_nodes) in [
        (
            "[determinism]\ntier = \"tolerance\"\ncosine = \"0.9999\"\nabs = \"1e-4\"\n",
            1u8,
        ),
        ("", 2),
    ] {
        let exact = tier.is_empty();
        let dir = tempfile::tempdir()?;
        let keys = Keys::new(if exact { 31 } else { 32 });
        let mut cfg = test_pool_config(&keys);
        cfg.verify = VerifyPolicy {
            secret: Some([3; 32]),
            step: 0,
            canary_rate: 0.0,
            trusted: [keys.node(0).public(), keys.node(1).public()].into(),
            // Their results checked too: every result is verified.
            trusted_reputation: tidepool_pool::verify::FULL,
            ..VerifyPolicy::default()
        };
        let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
        let (_, bundle) = embed_bundle_with(&dir.path().join("author"), &keys, "1.0.0", tier)?;
        let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
        let inputs = embed_inputs(&corpus(30)?);
        let (job, _) = client.submit(digest, inputs, "mixed".into()).await?;
        let mut nodes = Vec::new();
        let mut ort_keys = Vec::new();
        for i in 0..ort_nodes {
            let mut ort_cfg = node_config(dir.path(), &keys, 2 + i, pool.addr);
            ort_cfg.onnx = OnnxEngine::OnnxRuntime {
                library: ort_library(),
                fallback: false,
            };
            ort_keys.push(ort_cfg.key.public());
            nodes.push(start_node(ort_cfg));
        }
        for i in 0..2 {
            nodes.push(start_node(node_config(dir.path(), &keys, i, pool.addr)));
        }
        wait_job(&client, job, Duration::from_secs(180)).await?;
        let start = std::time::Instant::now();
        let status = loop {
            let s = client.pool_status().await?;
            if s.verification.pending == 0 && s.queued == 0 && s.leased == 0 {
                break s;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(180),
                "checks pending: {:?}",
                s.verification
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let v = &status.verification;
        for key in &ort_keys {
            let n = status
                .nodes
                .iter()
                .find(|n| n.key == *key)
                .expect("ONNX Runtime node");
            eprintln!(
                "tier {}: ONNX Runtime node {} results, {} confirmed, {} strikes; {v:?}",
                if exact { "exact" } else { "tolerance" },
                n.completed,
                n.confirmed,
                n.strikes,
            );
            assert!(n.completed > 0, "the ONNX Runtime node took part: {n:?}");
            assert!(n.confirmed > 0, "its results were confirmed: {n:?}");
        }
        assert!(
            status.nodes.iter().all(|n| n.strikes == 0),
            "{:?}",
            status.nodes
        );
        assert_eq!((v.mismatches, v.replaced), (0, 0), "{v:?}");
        assert_eq!(v.executed, v.confirmed, "{v:?}");
        for r in client.job_results(job).await? {
            assert_eq!(r.verification, "verified", "{r:?}");
        }
        for n in nodes {
            n.kill();
        }
        client.close().await;
        pool.shutdown().await;
    }
    Ok(())
}
