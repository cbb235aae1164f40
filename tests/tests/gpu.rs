//! GPU nodes on a machine without a GPU, as CI's machines are: the GPU
//! build of ONNX Runtime (from the `onnxruntime-gpu` wheel) loads and has
//! its CUDA provider, and starting the provider fails with the missing CUDA
//! library named; llama.cpp (a CPU build) sees no GPU. A node asked to serve
//! a GPU refuses to start with every reason, or with `fallback` runs
//! CPU-only, advertises no GPU, and is given none of a GPU-tier job's tasks
//! while it computes a CPU job of the same pool. (Own test binary: a process
//! loads ONNX Runtime at most once.)

use anyhow::Result;
use std::path::PathBuf;
use std::time::Duration;
use tidepool_host::backend::onnxruntime::OrtEngine;
use tidepool_host::gpu::GpuChoice;
use tidepool_tests::cluster::*;
use tidepool_tests::*;

fn gpu_library() -> PathBuf {
    model_path("onnxruntime-gpu-lib")
}

fn choice(fallback: bool) -> GpuChoice {
    GpuChoice {
        device: 0,
        name: None,
        memory_mib: None,
        onnxruntime_lib: gpu_library(),
        fallback,
    }
}

#[test]
fn the_gpu_library_loads_and_names_what_cuda_lacks() {
    let err = OrtEngine::cuda(&gpu_library(), 0)
        .expect_err("no CUDA on this machine")
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("CUDA execution provider")
            && err.contains("cannot start on device 0")
            && err.contains(&gpu_library().display().to_string())
            // ONNX Runtime's own words: the provider library or a CUDA
            // library it needs could not be loaded.
            && err.contains(".so"),
        "{err}"
    );
}

/// The GPU-tier embed bundle: the embed job on MiniLM-L3 under
/// `tolerance`, as version 2.0.0 beside the CPU bundle's 1.0.0.
const GPU_TABLES: &str = "[determinism]\ntier = \"tolerance\"\ncosine = \"0.9999\"\n\n\
                          [target]\ndevice = \"gpu\"\ngpu_memory_mib = 2048\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_a_working_gpu_refuses_or_runs_cpu_only_and_gets_no_gpu_tasks() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(71);
    let pool = start_pool(
        &dir.path().join("pool"),
        &keys,
        test_pool_config(&keys),
        "127.0.0.1:0".parse()?,
    )
    .await?;

    // Without fallback: the node does not start, and says why for each
    // encoding.
    let mut cfg = node_config(dir.path(), &keys, 1, pool.addr);
    cfg.gpu = Some(choice(false));
    let err = tidepool_node::run(cfg, std::future::pending::<()>())
        .await
        .expect_err("no GPU engine can start here")
        .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("no GPU engine could start on device 0")
            && err.contains("onnx: ONNX Runtime's CUDA execution provider")
            && err.contains("ggml: this build of llama.cpp has no GPU backend"),
        "{err}"
    );

    // With fallback: a CPU-only node.
    let mut cfg = node_config(dir.path(), &keys, 2, pool.addr);
    cfg.gpu = Some(choice(true));
    let node = start_node(cfg);

    let (_, cpu_bundle) = embed_bundle(&dir.path().join("cpu"), &keys, "1.0.0")?;
    let (client, cpu_digest) = publish(pool.addr, &keys, &cpu_bundle).await?;
    let (_, gpu_bundle) = embed_bundle_with(&dir.path().join("gpu"), &keys, "2.0.0", GPU_TABLES)?;
    let gpu_digest = client.publish(&gpu_bundle, |_| {}).await?;
    let texts = corpus(3)?;
    let (gpu_job, _) = client
        .submit(gpu_digest, embed_inputs(&texts), "gpu".into())
        .await?;
    let (cpu_job, _) = client
        .submit(cpu_digest, embed_inputs(&texts), "cpu".into())
        .await?;
    let cpu = wait_job(&client, cpu_job, Duration::from_secs(120)).await?;
    assert_eq!((cpu.done, cpu.dead), (3, 0), "{cpu:?}");

    // The node has had every chance to lease the GPU job's tasks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gpu = client.job_status(gpu_job).await?;
    assert_eq!((gpu.done, gpu.running, gpu.dead), (0, 0, 0), "{gpu:?}");
    // And its author is told why.
    assert_eq!(
        gpu.waiting.as_deref(),
        Some("no connected node can run it (1 node: no GPU)"),
        "{gpu:?}"
    );
    let status = client.pool_status().await?;
    let me = status
        .nodes
        .iter()
        .find(|n| n.key == node.key)
        .expect("the node is known");
    assert!(me.connected && me.gpu.is_none(), "{me:?}");

    let report = node.drain().await?;
    assert_eq!(report.completed, 3, "{report:?}");
    client.close().await;
    pool.shutdown().await;
    Ok(())
}
