//! The summarize job on Gemma 3 270M (llama.cpp through wasi-nn) and the
//! `llm` tier's replay check: honest transcripts are accepted by another
//! sandbox (another thread count), lies are not.

use anyhow::Result;
use tidepool_host::backend::ReplayReport;
use tidepool_proto::llm::{transcript_digest, AcceptPolicy, Generation};
use tidepool_tests::llm::{self, Lie, FORCE};

const TOPICS: &[&str] = &[
    "humor",
    "love",
    "life",
    "work",
    "money",
    "politics",
    "science",
    "technology",
    "religion",
    "philosophy",
    "art",
    "literature",
    "health",
    "food",
    "nature",
    "animals",
    "history",
    "law",
    "education",
    "sports",
    "other",
];

fn parse(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).expect("summarize returns JSON")
}

/// Plain English as far as a test can tell: mostly letters and spaces, a
/// few words, not an echo of the prompt's scaffolding.
fn looks_like_english(s: &str) -> bool {
    let words: Vec<&str> = s.split_whitespace().collect();
    let letters = s
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    words.len() >= 3
        && letters * 10 >= s.chars().count() * 8
        && !s.contains("Text:")
        && !s.contains("Summary:")
}

fn output(o: &tidepool_host::TaskOutput) -> Vec<u8> {
    o.result.clone().expect("the job returns an output")
}

#[test]
fn summaries_are_english_tags_listed_and_runs_identical() -> Result<()> {
    let texts = tidepool_tests::fortunes(8)?;
    let (a, job_a) = llm::summarize_sandbox(None, 1);
    let (b, job_b) = llm::summarize_sandbox(None, 1);
    let mut english = 0;
    for (i, t) in texts.iter().enumerate() {
        let input = llm::input(t);
        let first = llm::run(
            &a,
            &job_a,
            &format!("t{i}"),
            &input,
            None,
            AcceptPolicy::GREEDY,
        );
        let again = llm::run(
            &b,
            &job_b,
            &format!("t{i}"),
            &input,
            None,
            AcceptPolicy::GREEDY,
        );
        assert_eq!(
            output(&first),
            output(&again),
            "same build, same text: {t:?}"
        );
        assert_eq!(first.transcript, again.transcript);
        assert_eq!(first.transcript.len(), 2, "a summary and a topic");
        assert_eq!(
            first.receipt.transcript,
            Some(transcript_digest(&first.transcript)),
            "the receipt commits to the transcript"
        );
        // The host meters what the task used: the same counts on both runs
        // (they are deterministic), tokens out are the transcript's.
        let (m, n) = (&first.receipt.metering, &again.receipt.metering);
        let generated: usize = first.transcript.iter().map(|g| g.tokens.len()).sum();
        assert_eq!(m.tokens_out, generated as u64);
        assert!(
            m.tokens_in > 0 && m.computes as usize >= first.transcript.len() && m.compute_us > 0,
            "{m:?}"
        );
        assert!(m.compute_us <= first.receipt.wall_time_us, "{m:?}");
        assert_eq!(m.bytes_in, input.len() as u64);
        assert_eq!(
            (m.tokens_in, m.tokens_out, m.computes, m.bytes_out),
            (n.tokens_in, n.tokens_out, n.computes, n.bytes_out)
        );
        let v = parse(&output(&first));
        let summary = v["summary"].as_str().expect("summary");
        if looks_like_english(summary) {
            english += 1;
        }
        let tags = v["tags"].as_array().expect("tags");
        assert!(!tags.is_empty() && tags.len() <= 3, "{v}");
        for tag in tags {
            assert!(TOPICS.contains(&tag.as_str().expect("tag")), "{v}");
        }
        eprintln!("{t:?}\n  -> {v}");
    }
    // A 270M model is not always articulate; most summaries must be prose.
    assert!(
        english * 4 >= texts.len() * 3,
        "{english} of {} summaries look like English",
        texts.len()
    );
    Ok(())
}

#[test]
fn bad_inputs_and_options_get_clear_errors() -> Result<()> {
    let (sb, job) = llm::summarize_sandbox(None, 1);
    let fail = |input: &[u8]| -> String {
        let out = llm::run(&sb, &job, "bad", input, None, AcceptPolicy::GREEDY);
        let e = out.result.expect_err("refused");
        format!("{}: {}", e.code, e.message)
    };
    assert!(fail(br#"{"text": "   "}"#).contains("empty"));
    let huge = llm::input(&"word ".repeat(2000));
    assert!(fail(&huge).contains("at most 4096"), "{}", fail(&huge));
    let bad_utf8 = b"{\"text\": \"caf\xe9\"}";
    assert!(
        fail(bad_utf8).starts_with("invalid-input"),
        "{}",
        fail(bad_utf8)
    );

    // The backend's own checks, through the nn-probe-free path: a prompt
    // longer than the context and absurd options, straight to the engine.
    use std::sync::Arc;
    use tidepool_host::backend::{LlmTask, NnEngine, TaskBudget, TaskEnv};
    use wasmtime_wasi_nn::backend::NamedTensor;
    let engine = tidepool_host::backend::llama::LlamaEngine::new(1).map_err(anyhow::Error::msg)?;
    let graph = engine.load(&tidepool_tests::model_path(llm::MODEL))?;
    let env = TaskEnv {
        budget: TaskBudget {
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(120),
        },
        llm: Arc::new(LlmTask::new()),
        nn: Default::default(),
    };
    let t = |name: &str, data: &[u8]| NamedTensor {
        name: name.into(),
        tensor: wasmtime_wasi_nn::Tensor {
            dimensions: vec![data.len() as u32],
            ty: wasmtime_wasi_nn::wit::TensorType::U8,
            data: data.to_vec(),
        },
    };
    let mut ctx = graph.context(&env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut err = |prompt: &[u8], options: &[u8]| -> String {
        ctx.compute(Some(vec![t("prompt", prompt), t("options", options)]))
            .map(|_| "accepted".to_owned())
            .unwrap_or_else(|e| format!("{e:?}"))
    };
    let long = "lorem ipsum ".repeat(3000);
    let e = err(long.as_bytes(), br#"{"max_tokens": 16}"#);
    assert!(e.contains("exceeds the context of 2048 tokens"), "{e}");
    let e = err(b"caf\xe9", br#"{"max_tokens": 16}"#);
    assert!(e.contains("not valid UTF-8 (at byte 3)"), "{e}");
    for (opts, what) in [
        (&br#"{"max_tokens": 0}"#[..], "max_tokens 0"),
        (br#"{"max_tokens": 99999}"#, "max_tokens 99999"),
        (br#"{"max_tokens": 8, "temperature": -1}"#, "temperature -1"),
        (
            br#"{"max_tokens": 8, "top_k": 0, "temperature": 1}"#,
            "top_k 0",
        ),
        (br#"{"max_tokens": 8, "stop": [""]}"#, "options.stop entry"),
        (br#"{"max_tokens": 8, "beam": 4}"#, "unknown field `beam`"),
        (b"not json", "not valid generation options JSON"),
    ] {
        let e = err(b"Hello", opts);
        assert!(e.contains(what), "{what}: {e}");
    }
    // The context is still usable after every refusal.
    assert_eq!(err(b"Hello", br#"{"max_tokens": 2}"#), "accepted");
    Ok(())
}

fn tally_kind(claim: &[Generation], honest: &[Generation]) -> String {
    format!(
        "{} of {} generations differ",
        claim.iter().zip(honest).filter(|(a, b)| a != b).count(),
        honest.len()
    )
}

/// Tallies for one kind of claim.
#[derive(Debug, Default)]
struct Tally {
    /// Claims checked.
    n: usize,
    /// Claims whose implied output equals the honest one (harmless).
    same_output: usize,
    /// Claims the replay did not accept as they stand.
    flagged: usize,
    /// Harmful claims whose check output differs from the claimed output.
    caught: usize,
    /// Caught claims whose check output is the honest output.
    recovered: usize,
}

/// Honest transcripts replayed on another sandbox (2 threads instead of
/// 1: a different split of the work) are accepted with the same output;
/// random, truncated and edited transcripts and a different model's are
/// flagged, and the check's output exposes every harmful one.
#[test]
fn replay_accepts_honest_results_and_catches_lies() -> Result<()> {
    check_replays(llm::runs(3))
}

#[test]
#[ignore = "slow: 8 summaries, each replayed honestly and as 4 lies (run by `cargo xtask test`; TIDEPOOL_LLM_RUNS=300 for larger samples)"]
fn replay_rates_over_many_texts() -> Result<()> {
    check_replays(llm::runs(3).max(8))
}

/// `TIDEPOOL_LLM_SKIP=N` starts after the first N texts of the corpus, so
/// a second rate run covers new texts.
fn skip() -> usize {
    std::env::var("TIDEPOOL_LLM_SKIP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn check_replays(n: usize) -> Result<()> {
    let skip = skip();
    let all = tidepool_tests::corpus(skip + n + 1)?;
    let texts = &all[skip..];
    let dir = tempfile::tempdir()?;
    let (producer, pjob) = llm::summarize_sandbox(None, 1);
    let (verifier, vjob) = llm::summarize_sandbox(None, 2);
    let (path, sha) = llm::perturbed_model(dir.path(), 61);
    let (other, ojob) = llm::summarize_sandbox(Some((&path, &sha)), 1);
    let policy = AcceptPolicy::GREEDY;
    let mut honest_gap: f32 = 0.0;
    let mut prefill_tokens = 0u64;
    let mut tallies: Vec<(&str, Tally)> = ["random tokens", "truncated", "edited", "other model"]
        .into_iter()
        .map(|k| (k, Tally::default()))
        .collect();
    let mut transcripts: Vec<Vec<Generation>> = Vec::new();
    for (i, t) in texts.iter().take(n).enumerate() {
        let id = format!("task-{i}");
        let input = llm::input(t);
        let made = llm::run(&producer, &pjob, &id, &input, None, policy);
        let honest = output(&made);
        // The honest claim: accepted by one batched pass, same output.
        let check = llm::run(
            &verifier,
            &vjob,
            &id,
            &input,
            Some(&made.transcript),
            policy,
        );
        assert_eq!(check.replay.len(), made.transcript.len());
        for r in &check.replay {
            assert!(r.accepted(), "honest claim not accepted for {t:?}: {r:?}");
            honest_gap = honest_gap.max(r.max_gap);
            prefill_tokens += u64::from(r.checked);
        }
        assert_eq!(
            output(&check),
            honest,
            "honest replay changed the output of {t:?}"
        );
        assert_eq!(check.transcript, made.transcript);

        if !llm::lies() {
            transcripts.push(made.transcript);
            continue;
        }
        let donor = transcripts
            .last()
            .cloned()
            .unwrap_or_else(|| made.transcript.clone());
        let mut claims: Vec<(Vec<Generation>, Vec<u8>)> = Vec::new();
        for (k, kind) in [Lie::RandomTokens, Lie::Truncate, Lie::Edit]
            .into_iter()
            .enumerate()
        {
            let claim = llm::lie(kind, &made.transcript, &donor, (i * 7 + k) as u64);
            let reported = output(&llm::run(
                &verifier,
                &vjob,
                &id,
                &input,
                Some(&claim),
                FORCE,
            ));
            claims.push((claim, reported));
        }
        let theirs = llm::run(&other, &ojob, &id, &input, None, policy);
        claims.push((theirs.transcript.clone(), output(&theirs)));

        for ((_, tally), (claim, reported)) in tallies.iter_mut().zip(claims) {
            tally.n += 1;
            let checked = llm::run(&verifier, &vjob, &id, &input, Some(&claim), policy);
            let flagged = checked.replay.iter().any(|r: &ReplayReport| !r.accepted());
            tally.flagged += usize::from(flagged);
            if reported == honest {
                tally.same_output += 1;
                continue;
            }
            // What the pool compares: the check's output with the claimed
            // one. A caught lie's check output is the honest output.
            if output(&checked) != reported {
                tally.caught += 1;
                // Usually the honest output; a near-tie after the rejected
                // token can send the checker's own generation elsewhere.
                tally.recovered += usize::from(output(&checked) == honest);
            } else {
                eprintln!(
                    "{kind} claim accepted for {t:?}: {:?}",
                    checked.replay,
                    kind = tally_kind(&claim, &made.transcript)
                );
            }
        }
        transcripts.push(made.transcript);
    }
    eprintln!("{n} tasks: honest claims 0 rejected; largest honest gap {honest_gap:.4} logits; {prefill_tokens} claimed tokens checked");
    for (kind, t) in &tallies {
        eprintln!(
            "{kind:>13}: {} claims, {} flagged by replay, {} with the honest output, {} of {} harmful caught ({} of them re-derived the honest output)",
            t.n,
            t.flagged,
            t.same_output,
            t.caught,
            t.n - t.same_output,
            t.recovered
        );
        if *kind != "other model" {
            assert_eq!(
                t.caught,
                t.n - t.same_output,
                "{kind}: every harmful lie is caught"
            );
        }
    }
    if !llm::lies() {
        return Ok(());
    }
    let random = &tallies[0].1;
    assert_eq!(random.flagged, random.n, "random tokens are always flagged");
    let other = &tallies[3].1;
    assert!(
        other.n > other.same_output,
        "the perturbed model must write differently sometimes"
    );
    Ok(())
}
