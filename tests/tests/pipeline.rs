//! The aggregator pipeline (embed → dedupe → summarize and tag) end to
//! end: the pipeline file and bundles from `jobs/`, a real pool (SQLite,
//! QUIC on loopback), three nodes, real models, real near-duplicate texts
//! from Debian's `fortunes` package.

use anyhow::{Context, Result};
use std::path::Path;
use std::time::Duration;
use tidepool_client::pipeline::feed::sort_key;
use tidepool_client::pipeline::{
    publish_stages, read_feed, run_pipeline, Figures, Item, PipelineManifest, Rejected, Report, Run,
};
use tidepool_client::PoolClient;
use tidepool_tests::cluster::*;
use tidepool_tests::root;

/// Real items: the Linux fortunes in alphabetical order, where the same
/// quote from the two files (worded or attributed differently) sorts
/// together.
fn corpus(n: usize) -> Result<Vec<Item>> {
    let dir = Path::new("/usr/share/games/fortunes");
    let (mut items, _) = read_feed(&[dir.join("linux"), dir.join("linuxcookie")], 4096)
        .context("the `fortunes` package (cargo xtask install-toolchain)")?;
    items.sort_by_cached_key(|i| sort_key(&i.text));
    items.truncate(n);
    Ok(items)
}

/// Items that are the same quote by any reading: their first 40 letters
/// and digits agree.
fn same_quote(a: &str, b: &str) -> bool {
    let (a, b) = (sort_key(a), sort_key(b));
    a.len() >= 40 && b.len() >= 40 && a[..40] == b[..40]
}

/// Write `items` as a JSONL feed and a folder of malformed items; read
/// both back the way `tidepool pipeline run --input` does.
fn feed(dir: &Path, items: &[Item]) -> Result<(Vec<Item>, Vec<Rejected>)> {
    let jsonl = dir.join("items.jsonl");
    let lines: Vec<String> = items
        .iter()
        .map(|i| serde_json::json!({ "id": i.id, "text": i.text, "source": i.source }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n")?;
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad)?;
    std::fs::write(
        bad.join("latin1.txt"),
        b"Caf\xe9 au lait, s'il vous pla\xeet.",
    )?;
    std::fs::write(bad.join("empty.txt"), "\n\n")?;
    std::fs::write(
        bad.join("enormous.txt"),
        "All work and no play. ".repeat(1000),
    )?;
    Ok(read_feed(&[jsonl, bad], 4096)?)
}

async fn run_once(
    addr: std::net::SocketAddr,
    keys: &Keys,
    dir: &Path,
    (items, rejected): (Vec<Item>, Vec<Rejected>),
    run_id: &str,
) -> Result<(Report, Figures)> {
    let manifest = PipelineManifest::load(&root().join("jobs/aggregator/pipeline.toml"))?;
    let client = PoolClient::connect(addr, &keys.publisher, keys.pool.public()).await?;
    let bundles = publish_stages(&client, &manifest, &keys.publisher, &dir.join("bundles")).await?;
    let mut run = Run::new(&manifest, &bundles, run_id, items, rejected)?;
    let figures = run_pipeline(&client, &mut run, Duration::from_millis(100), &mut |_| {}).await?;
    client.close().await;
    Ok((run.report(), figures))
}

fn summary_of(g: &tidepool_client::pipeline::report::ReportGroup) -> (&str, Vec<&str>) {
    let s = &g.outputs["summarize"];
    (
        s["summary"].as_str().unwrap_or(""),
        s["tags"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
            .unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: four pipeline runs with summaries by Gemma 3 270M (run by `cargo xtask test`)"]
async fn aggregator_groups_duplicates_caches_and_survives_a_killed_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let all = corpus(16)?;
    let (first, more) = all.split_at(12);
    let known: Vec<(usize, usize)> = (0..first.len())
        .flat_map(|i| (i + 1..first.len()).map(move |j| (i, j)))
        .filter(|&(i, j)| same_quote(&first[i].text, &first[j].text))
        .collect();
    assert!(known.len() >= 2, "the sample must hold repeats: {known:?}");

    // Pool A, three nodes; one is killed once the run is under way.
    let keys = Keys::new(61);
    let pool = start_pool(
        &dir.path().join("a"),
        &keys,
        test_pool_config(&keys),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut nodes: Vec<TestNode> = (0..3u8)
        .map(|i| start_node(node_config(&dir.path().join("a"), &keys, i, pool.addr)))
        .collect();
    let victim = nodes.remove(2);
    let watcher = PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public()).await?;
    let killer = tokio::spawn(async move {
        loop {
            let s = watcher.pool_status().await?;
            if s.done >= 8 {
                victim.kill();
                return anyhow::Ok(s.done);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let (report, figures) =
        run_once(pool.addr, &keys, dir.path(), feed(dir.path(), first)?, "1").await?;
    let killed_at = killer.await??;
    eprintln!("node killed after {killed_at} tasks; {figures:?}");
    eprintln!("{}", report.to_markdown());

    // Duplicates grouped, every group summarized and tagged.
    assert_eq!(report.items, first.len() + 3);
    let group_of = |id: &str| {
        report
            .groups
            .iter()
            .position(|g| g.members.iter().any(|m| m.id == id))
    };
    for &(i, j) in &known {
        assert_eq!(
            group_of(&first[i].id),
            group_of(&first[j].id),
            "{:?} and {:?} are one quote",
            first[i].text,
            first[j].text
        );
    }
    for g in &report.groups {
        let (summary, tags) = summary_of(g);
        assert!(
            summary.split_whitespace().count() >= 3,
            "summary of {:?}: {:?}",
            g.members[0].text,
            g.outputs
        );
        assert!(!tags.is_empty(), "tags of {:?}", g.members[0].text);
        for m in &g.members[1..] {
            assert!(
                same_quote(&g.members[0].text, &m.text),
                "{:?} grouped with {:?}",
                m.text,
                g.members[0].text
            );
        }
    }
    assert_eq!(report.groups.len(), first.len() - known.len());
    // Malformed items: rejected with a reason, the rest went on.
    let reasons: Vec<(&str, &str)> = report
        .rejected
        .iter()
        .map(|r| (r.id.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("empty.txt", "empty"),
            ("enormous.txt", "22000 bytes; items are at most 4096 bytes"),
            ("latin1.txt", "not valid UTF-8 (at byte 3)"),
        ]
    );
    assert_eq!(
        figures.stages[0].tasks,
        first.len(),
        "one embed per distinct item"
    );
    assert_eq!(
        figures.stages[2].tasks,
        report.groups.len(),
        "one summary per group"
    );
    assert!(figures.re_executions > 0, "new nodes' results are checked");

    // The same items again: nothing computed, the same report.
    let (again, fig2) =
        run_once(pool.addr, &keys, dir.path(), feed(dir.path(), first)?, "2").await?;
    assert_eq!(fig2.computed, 0, "{fig2:?}");
    assert_eq!(fig2.cache_hits, fig2.tasks);
    assert_eq!(again, report);

    // New items: only they (and the whole-batch stage) are computed.
    let (grown, fig3) =
        run_once(pool.addr, &keys, dir.path(), feed(dir.path(), &all)?, "3").await?;
    assert_eq!(
        fig3.stages[0].tasks - fig3.stages[0].cached,
        more.len(),
        "{fig3:?}"
    );
    assert_eq!(fig3.stages[1].cached, 0, "the batch stage sees new items");
    let old_groups = report.groups.len();
    assert_eq!(
        fig3.stages[2].cached, old_groups,
        "old groups' summaries come from the cache: {fig3:?}"
    );
    assert_eq!(fig3.stages[2].tasks, grown.groups.len());
    for n in nodes {
        n.drain().await?;
    }
    pool.shutdown().await;

    // Pool B, fresh, no node killed: the same report.
    let keys_b = Keys::new(71);
    let pool_b = start_pool(
        &dir.path().join("b"),
        &keys_b,
        test_pool_config(&keys_b),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let nodes_b: Vec<TestNode> = (0..2u8)
        .map(|i| start_node(node_config(&dir.path().join("b"), &keys_b, i, pool_b.addr)))
        .collect();
    let dir_b = dir.path().join("b");
    let (clean, _) = run_once(pool_b.addr, &keys_b, &dir_b, feed(dir.path(), first)?, "1").await?;
    assert_eq!(clean, report, "killing a node changed the report");
    for n in nodes_b {
        n.drain().await?;
    }
    pool_b.shutdown().await;
    Ok(())
}
