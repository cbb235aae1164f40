//! Hostile guests through a real node (issue #16): a pool and a node on
//! loopback run a signed bundle of the `nn-abuse` fixture. A tensor loop and
//! a huge input shape end at the node's budgets (their tasks dead-lettered
//! with the reason, the node's memory bounded), a guest's forged log line
//! reaches the node's log escaped, and the same node then serves the next
//! task of the same bundle.

use anyhow::{Context as _, Result};
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidepool_proto::wire::TaskState;
use tidepool_tests::cluster::*;
use tidepool_tests::*;

/// Everything the process logs, for reading back.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_guests_are_stopped_by_a_real_node_which_then_serves_the_next_task() -> Result<()> {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let dir = tempfile::tempdir()?;
    let keys = Keys::new(60);
    // Two tasks fail every attempt here by design; the breaker is not what
    // this test is about.
    let mut cfg = test_pool_config(&keys);
    cfg.leasing.breaker_failures = cfg.leasing.breaker_window;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;

    let bundle = minilm_bundle(
        &dir.path().join("author"),
        &keys,
        "nn-abuse",
        "1.0.0",
        128,
        "",
    )?;
    let (client, digest) = publish(pool.addr, &keys, &bundle).await?;

    let tensor_budget = 32u64 << 20;
    let mut node_cfg = node_config(dir.path(), &keys, 1, pool.addr);
    node_cfg.nn.max_tensor_bytes = tensor_budget;
    let node = start_node(node_cfg);

    let inputs = ["input_ids", "attention_mask"];
    let hostile = [
        json!({"tensor_loop": {"bytes": 1 << 20}}),
        json!({"shape": {"model": "minilm-l3", "dims": [1, 1_000_000], "inputs": inputs}}),
        json!({"log": {"lines": 3}}),
    ];
    let before = rss_bytes();
    let (job, _) = client
        .submit(
            digest,
            hostile.iter().map(|v| v.to_string().into_bytes()).collect(),
            "hostile".into(),
        )
        .await?;
    let s = wait_job(&client, job, Duration::from_secs(180)).await?;
    assert_eq!((s.done, s.dead), (1, 2), "{s:?}");
    let grown = rss_bytes().saturating_sub(before);
    let records = client.job_results(job).await?;
    for (index, budget) in [(0, "tensor bytes"), (1, "compute memory")] {
        let r = &records[index];
        assert_eq!(r.state, TaskState::Dead, "{r:?}");
        assert!(!r.reasons.is_empty(), "{r:?}");
        for reason in &r.reasons {
            assert!(
                reason.contains(&format!("wasi-nn {budget} budget")),
                "task {index}: {reason}"
            );
        }
    }
    assert_eq!(records[2].state, TaskState::Done, "{:?}", records[2]);
    // Each tensor-loop attempt held at most 32 MiB of tensors besides its
    // 128 MiB of linear memory; without the budget one attempt copies
    // gigabytes before its 20 s deadline.
    assert!(grown < 1 << 30, "the node's process grew by {grown} bytes");

    // The forged line is in the log, escaped, on the task's own line.
    let text = logs.text();
    let forged = "2026-12-01T00:00:00.000000Z  INFO tidepool::node: result accepted";
    assert!(
        text.contains(&format!(
            "line 0\\n{forged}\\r\\u{{1b}}[2J\\u{{1b}}]0;owned\\u{{7}}"
        )),
        "escaped guest line missing from:\n{text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with(forged)),
        "a guest forged a node log line:\n{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "a terminal escape reached the log"
    );

    // The same node serves the next task of the same bundle.
    let (job, _) = client
        .submit(
            digest,
            vec![
                json!({"shape": {"model": "minilm-l3", "dims": [1, 8], "inputs": inputs}})
                    .to_string()
                    .into_bytes(),
            ],
            "after".into(),
        )
        .await?;
    let s = wait_job(&client, job, Duration::from_secs(60)).await?;
    assert_eq!(s.done, 1, "{s:?}");
    let out = record_output(&client.job_results(job).await?[0]);
    let out: serde_json::Value = serde_json::from_slice(&out).context("output JSON")?;
    assert!(
        out["ok"].as_str().is_some_and(|s| s.ends_with("outputs")),
        "{out}"
    );

    node.drain().await?;
    client.close().await;
    Ok(())
}
