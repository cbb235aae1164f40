//! `tidepool replay` on results of the embed, dedupe and summarize jobs run
//! by a real node through a real pool (QUIC, SQLite), exported with
//! `tidepool job results --export`: each reproduces (bit for bit where the
//! tier is exact, by the llm replay check for summaries), and an output
//! changed after the node signed it is reported as different.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tidepool_proto::replay::ReplayFile;
use tidepool_tests::cluster::*;
use tidepool_tests::*;

fn tidepool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .output()
        .expect("run tidepool")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Replay `file` with the guest `job`'s component; the exit code and what it said.
fn replay(file: &Path, job: &str) -> (Option<i32>, String) {
    let out = tidepool(&[
        "replay",
        s(file),
        "--component",
        s(&jobs_dir().join(format!("{job}.wasm"))),
    ]);
    (out.status.code(), text(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: runs the three jobs on real models, then replays each (run by `cargo xtask test`)"]
async fn replay_reproduces_embed_dedupe_and_summarize_results_and_catches_a_changed_output(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let keys = Keys::new(71);
    let pool = start_pool(
        &d.join("pool"),
        &keys,
        test_pool_config(&keys),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let node = start_node(node_config(d, &keys, 0, pool.addr));
    let none = "[verification]\nsampling = \"none\"\n";
    let embed = minilm_bundle(&d.join("embed"), &keys, "embed", "1.0.0", 256, none)?;
    let dedupe = guest_bundle(&d.join("dedupe"), &keys, "dedupe", none)?;
    let summarize = summarize_bundle(&d.join("summarize"), &keys, none)?;
    let texts = fortunes(3)?;
    let vectors = serde_json::json!({
        "options": { "threshold": 0.9 },
        "items": [
            { "id": "a", "vector": [1.0, 0.0, 0.5] },
            { "id": "b", "vector": [0.99, 0.01, 0.5] },
            { "id": "c", "vector": [0.0, 1.0, 0.0] },
        ],
    });
    let work: Vec<(&str, _, Vec<Vec<u8>>)> = vec![
        ("embed", embed, embed_inputs(&texts)),
        ("dedupe", dedupe, vec![serde_json::to_vec(&vectors)?]),
        ("summarize", summarize, vec![llm::input(&texts[0])]),
    ];
    let key_file = d.join("publisher.key");
    write_key_file(&key_file, &keys.publisher)?;
    let addr = pool.addr.to_string();
    let pool_key = keys.pool.public().to_string();
    let mut exported: Vec<(&str, PathBuf)> = Vec::new();
    for (job_name, bundle, inputs) in work {
        let (client, digest) = publish(pool.addr, &keys, &bundle).await?;
        let (job, n) = client.submit(digest, inputs, job_name.into()).await?;
        let s_ = wait_job(&client, job, Duration::from_secs(600)).await?;
        anyhow::ensure!(s_.done == n, "{job_name}: {s_:?}");
        client.close().await;
        let out_dir = d.join(format!("export-{job_name}"));
        let out = tidepool(&[
            "job",
            "results",
            &job.0.to_string(),
            "--pool",
            &addr,
            "--pool-key",
            &pool_key,
            "--key",
            s(&key_file),
            "--export",
            s(&out_dir),
        ]);
        anyhow::ensure!(out.status.success(), "{}", text(&out));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&out_dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        files.sort();
        assert_eq!(files.len(), n as usize, "{job_name}: one file per result");
        exported.extend(files.into_iter().map(|f| (job_name, f)));
    }
    node.kill();
    pool.shutdown().await;

    // Every result reproduces, with the pool and the node gone.
    for (job, file) in &exported {
        let (code, said) = replay(file, job);
        assert_eq!(code, Some(0), "{job} {}: {said}", file.display());
        let how = if *job == "summarize" {
            "the llm replay check accepted all"
        } else {
            "bit for bit"
        };
        assert!(said.contains(how), "{job}: {said}");
        eprintln!("{said}");
    }

    // An embedding changed after the node signed it: different, and the
    // record is not what the node signed (this run's output is).
    let (_, first) = exported
        .iter()
        .find(|(j, _)| *j == "embed")
        .context("embed")?;
    let mut f: ReplayFile = serde_json::from_slice(&std::fs::read(first)?)?;
    let mut output = base64_decode(f.output.as_deref().context("output")?)?;
    let at = output.len() / 2;
    output[at] ^= 0x01;
    f.output = Some(base64_encode(&output));
    let tampered = d.join("tampered.json");
    std::fs::write(&tampered, serde_json::to_vec(&f)?)?;
    let (code, said) = replay(&tampered, "embed");
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains(&format!("differs: outputs first differ at byte {at}")),
        "{said}"
    );
    assert!(
        said.contains("not the one node") && said.contains("matches its receipt"),
        "{said}"
    );

    // The wrong component is refused before anything runs.
    let (code, said) = replay(first, "dedupe");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("the component given is"), "{said}");
    Ok(())
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    Ok(base64::engine::general_purpose::STANDARD.decode(s)?)
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
