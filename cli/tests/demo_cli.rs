//! `tidepool pipeline check` and `tidepool demo` as a user runs them: the
//! real binary, the pipeline from `jobs/`, an embedded pool with two nodes.

use std::process::{Command, Output};
use tidepool_tests::root;

fn tidepool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .output()
        .expect("run tidepool")
}

#[test]
fn pipeline_check_lists_stages_and_names_what_is_wrong() {
    let good = root().join("jobs/aggregator/pipeline.toml");
    let o = tidepool(&["pipeline", "check", good.to_str().expect("utf-8")]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.starts_with("pipeline aggregator: 3 stages"), "{out}");
    assert!(
        out.contains("dedupe") && out.contains("over all") && out.contains("(from embed)"),
        "{out}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"p\"\n[[stage]]\nname = \"s\"\nbundle = \"s.toml\"\nover = \"groups\"\n",
    )
    .expect("write");
    let o = tidepool(&["pipeline", "check", bad.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "bad.toml: stage \"s\": `over = \"groups\"` needs an earlier `over = \"all\"` stage"
        ),
        "{err}"
    );
}

#[test]
#[ignore = "slow: two demo runs with real summaries (run by `cargo xtask test`)"]
fn demo_runs_the_pipeline_and_a_second_run_is_all_cache_hits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let feed = dir.path().join("items.jsonl");
    std::fs::write(
        &feed,
        concat!(
            "{\"id\": \"a\", \"text\": \"Talk is cheap. Show me the code. -- Linus Torvalds\"}\n",
            "{\"id\": \"b\", \"text\": \"Talk is cheap; show me the code. (Linus Torvalds)\"}\n",
            "{\"id\": \"c\", \"text\": \"Never trust a computer you can't throw out a window.\"}\n",
            "{\"id\": \"d\"}\n",
        ),
    )
    .expect("write");
    let pipeline = root().join("jobs/aggregator/pipeline.toml");
    let work = dir.path().join("demo");
    let args = [
        "demo",
        "--json",
        "--items",
        "0",
        "--dir",
        work.to_str().expect("utf-8"),
        "--input",
        feed.to_str().expect("utf-8"),
        "--pipeline",
        pipeline.to_str().expect("utf-8"),
    ];
    let run = || -> serde_json::Value {
        let o = tidepool(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("--json prints one JSON object")
    };
    let first = run();
    assert_eq!(first["items"], 4, "{first}");
    assert_eq!(first["groups"], 2, "{first}");
    assert_eq!(first["duplicate_groups"], 1, "{first}");
    assert_eq!(first["rejected"], 1, "{first}");
    assert_eq!(
        first["figures"]["computed"], 6,
        "3 embeds, 1 dedupe, 2 summaries: {first}"
    );
    // Two nodes, each saying what it generated; the rate over the run.
    let nodes = first["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{first}");
    let tokens: u64 = nodes
        .iter()
        .map(|n| n["generated_tokens"].as_u64().expect("tokens"))
        .sum();
    assert!(tokens >= 4, "two summaries and two topics: {first}");
    assert!(
        first["items_per_second"].as_f64().expect("rate") > 0.0,
        "{first}"
    );
    let md = std::fs::read_to_string(first["markdown"].as_str().expect("path")).expect("report.md");
    assert!(
        md.contains("## Rejected items") && md.contains("`line-4`"),
        "{md}"
    );

    let second = run();
    assert_eq!(second["figures"]["computed"], 0, "{second}");
    assert_eq!(second["figures"]["cache_hits"], 6, "{second}");
    let r1 = std::fs::read_to_string(work.join("report/report.json")).expect("report");
    assert!(r1.contains("\"pipeline\": \"aggregator\""));
}
