//! Batched generation across tasks (ADR 0020) against the `llm` tier's
//! replay check: generations decoded in a node's shared context, beside
//! other tasks' and from a reused prompt prefix, may differ from a
//! generation alone in the last bits of their logits; the check must still
//! accept every honest result — replayed in another batching node's shared
//! context and by a node that runs each generation alone — and still catch
//! every lie the `llm` tests use.
//!
//! `TIDEPOOL_LLM_RUNS=N` sets the number of tasks (default 8);
//! `TIDEPOOL_LLM_LIES=0` checks honest claims only.

use anyhow::Result;
use tidepool_host::LlmSettings;
use tidepool_proto::llm::{AcceptPolicy, Generation};

use tidepool_tests::llm::{self, Job, Lie, FORCE};

/// A node that batches eight generations on two threads.
const BATCHED: LlmSettings = LlmSettings {
    threads: 2,
    batch: 8,
};

fn output(o: &tidepool_host::TaskOutput) -> Vec<u8> {
    o.result.clone().expect("the job returns an output")
}

#[test]
fn batched_generations_are_accepted_by_replay_and_lies_are_still_caught() -> Result<()> {
    let n = llm::runs(8);
    let texts = tidepool_tests::corpus(n)?;
    let policy = AcceptPolicy::GREEDY;
    let (producer, pjob) = llm::summarize_sandbox_with(None, BATCHED);
    let tasks: Vec<Job<'_>> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("task-{i}"), llm::input(t), None, policy))
        .collect();
    let made = llm::run_all(&producer, &pjob, &tasks, 8);

    // The same tasks one at a time (the first 16): batching changes some
    // generations (the test shows the check accepts them anyway, not that
    // nothing changed).
    let (alone, ajob) = llm::summarize_sandbox(None, 1);
    let solo = llm::run_all(&alone, &ajob, &tasks[..n.min(16)], 1);
    let differ = made
        .iter()
        .zip(&solo)
        .filter(|(a, b)| a.transcript != b.transcript)
        .count();

    // Honest claims, replayed by another batching node (eight at once) and
    // by a node that replays each alone.
    let (verifier, vjob) = llm::summarize_sandbox_with(None, BATCHED);
    let honest: Vec<Job<'_>> = tasks
        .iter()
        .zip(&made)
        .map(|((id, input, _, _), m)| (id.clone(), input.clone(), Some(&m.transcript[..]), policy))
        .collect();
    let mut checked_tokens = 0u64;
    let mut gap: f32 = 0.0;
    for (name, outs) in [
        ("batched", llm::run_all(&verifier, &vjob, &honest, 8)),
        ("alone", llm::run_all(&alone, &ajob, &honest, 1)),
    ] {
        for ((m, c), t) in made.iter().zip(&outs).zip(&texts) {
            assert_eq!(c.replay.len(), m.transcript.len(), "{name}: {t:?}");
            for r in &c.replay {
                assert!(
                    r.accepted(),
                    "{name} replay rejected an honest batched claim for {t:?}: {r:?}"
                );
                gap = gap.max(r.max_gap);
                checked_tokens += u64::from(r.checked);
            }
            assert_eq!(
                output(c),
                output(m),
                "{name} replay changed the output of {t:?}"
            );
            assert_eq!(c.transcript, m.transcript, "{name}: {t:?}");
        }
    }
    eprintln!(
        "{n} batched tasks ({differ} generated differently alone): 2×{n} honest replays, 0 rejected; {checked_tokens} claimed tokens checked; largest gap {gap:.4} logits"
    );
    assert!(
        n < 8 || differ < n,
        "batching must not change most generations"
    );
    if !llm::lies() {
        return Ok(());
    }

    // Lies about batched results: what a liar reports (the output its claim
    // implies), checked by the batching verifier.
    let kinds = [Lie::RandomTokens, Lie::Truncate, Lie::Edit];
    let mut claims: Vec<(usize, Lie, Vec<Generation>)> = Vec::new();
    for (i, m) in made.iter().enumerate() {
        let donor = &made[(i + n - 1) % n].transcript;
        for (k, kind) in kinds.into_iter().enumerate() {
            claims.push((
                i,
                kind,
                llm::lie(kind, &m.transcript, donor, (i * 7 + k) as u64),
            ));
        }
    }
    let forced: Vec<Job<'_>> = claims
        .iter()
        .map(|(i, _, c)| {
            (
                tasks[*i].0.clone(),
                tasks[*i].1.clone(),
                Some(&c[..]),
                FORCE,
            )
        })
        .collect();
    let reported = llm::run_all(&verifier, &vjob, &forced, 8);
    let checks: Vec<Job<'_>> = forced
        .iter()
        .map(|(id, input, c, _)| (id.clone(), input.clone(), *c, policy))
        .collect();
    let checked = llm::run_all(&verifier, &vjob, &checks, 8);
    let (mut harmful, mut caught, mut random_flagged) = (0, 0, 0);
    for (((i, kind, _), r), c) in claims.iter().zip(&reported).zip(&checked) {
        let flagged = c.replay.iter().any(|x| !x.accepted());
        if *kind == Lie::RandomTokens {
            assert!(flagged, "random tokens for task {i} not flagged");
            random_flagged += 1;
        }
        if output(r) == output(&made[*i]) {
            continue;
        }
        harmful += 1;
        assert_ne!(
            output(c),
            output(r),
            "a {kind:?} lie about batched task {i} was accepted: {:?}",
            c.replay
        );
        caught += 1;
    }
    eprintln!(
        "{} lies ({random_flagged} random, all flagged): {harmful} harmful, {caught} caught",
        claims.len()
    );
    assert!(harmful > 0);

    // A different model (one low bit in every 61st byte of the weights),
    // run alone, claimed against the batching verifier: as in the `llm`
    // tests, a claim within the policy is text the model could have
    // written; the others must be caught.
    let dir = tempfile::tempdir()?;
    let (path, sha) = llm::perturbed_model(dir.path(), 61);
    let (other, ojob) = llm::summarize_sandbox(Some((&path, &sha)), 1);
    let theirs = llm::run_all(&other, &ojob, &tasks, 1);
    let claims: Vec<Job<'_>> = tasks
        .iter()
        .zip(&theirs)
        .map(|((id, input, _, _), t)| (id.clone(), input.clone(), Some(&t.transcript[..]), policy))
        .collect();
    let checked = llm::run_all(&verifier, &vjob, &claims, 8);
    let (mut differs, mut other_caught) = (0, 0);
    for ((t, c), m) in theirs.iter().zip(&checked).zip(&made) {
        if output(t) == output(m) {
            continue;
        }
        differs += 1;
        other_caught += usize::from(output(c) != output(t));
    }
    eprintln!(
        "other model: {n} claims, {differs} with another output, {other_caught} of them caught"
    );
    assert!(
        n < 8 || differs > 0,
        "the perturbed model must write differently sometimes"
    );
    Ok(())
}

/// One generation through the engine directly (no sandbox): the text, or
/// the engine's error.
fn generate(
    graph: &dyn tidepool_host::backend::ModelGraph,
    shared: bool,
    deadline: std::time::Instant,
    prompt: &str,
    options: &str,
) -> std::result::Result<Vec<u8>, String> {
    let llm = tidepool_host::backend::LlmTask::new().sharing_batches(shared);
    generate_as(graph, std::sync::Arc::new(llm), deadline, prompt, options)
}

/// [`generate`] for a task with this generation record (and claim).
fn generate_as(
    graph: &dyn tidepool_host::backend::ModelGraph,
    llm: std::sync::Arc<tidepool_host::backend::LlmTask>,
    deadline: std::time::Instant,
    prompt: &str,
    options: &str,
) -> std::result::Result<Vec<u8>, String> {
    use tidepool_host::backend::{TaskBudget, TaskEnv};
    let tensor = |name: &str, data: &[u8]| wasmtime_wasi_nn::backend::NamedTensor {
        name: name.into(),
        tensor: wasmtime_wasi_nn::Tensor {
            dimensions: vec![data.len() as u32],
            ty: wasmtime_wasi_nn::wit::TensorType::U8,
            data: data.to_vec(),
        },
    };
    let env = TaskEnv {
        budget: TaskBudget { deadline },
        llm,
        nn: Default::default(),
    };
    // The whole chain: wasi-nn's own text says only "accessing backend".
    let chain = |e: wasmtime_wasi_nn::backend::BackendError| {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        msg
    };
    let mut ctx = graph.context(&env).map_err(chain)?;
    let out = ctx
        .compute(Some(vec![
            tensor("prompt", prompt.as_bytes()),
            tensor("options", options.as_bytes()),
        ]))
        .map_err(chain)?
        .expect("outputs");
    Ok(out[0].tensor.data.clone())
}

/// Tasks that may not share a batch (every tier but `llm`) run alone on a
/// batching engine, bit for bit what an engine that never batches gives;
/// a generation whose task's deadline passes leaves the shared batch at the
/// next step with a deadline error, and the others in the batch finish.
#[test]
fn only_llm_tier_tasks_share_a_batch_and_a_late_one_leaves_it() -> Result<()> {
    use std::time::{Duration, Instant};
    use tidepool_host::backend::llama::LlamaEngine;
    use tidepool_host::backend::NnEngine;
    let path = tidepool_tests::model_path(llm::MODEL);
    let batching = LlamaEngine::new(2)
        .map_err(anyhow::Error::msg)?
        .with_batch(4)
        .load(&path)?;
    let alone = LlamaEngine::new(2)
        .map_err(anyhow::Error::msg)?
        .load(&path)?;
    let texts = tidepool_tests::corpus(4)?;
    let prompts: Vec<String> = texts
        .iter()
        .map(|t| format!("Write a one-sentence summary.\nText: {t}\nSummary:"))
        .collect();
    let options = r#"{"max_tokens": 24, "stop": ["\n"]}"#;
    let far = Instant::now() + Duration::from_secs(600);
    let expected: Vec<Vec<u8>> = prompts
        .iter()
        .map(|p| generate(&*alone, false, far, p, options))
        .collect::<std::result::Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let unshared: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| generate(&*batching, false, far, p, options)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect::<std::result::Result<_, _>>()
    })
    .map_err(anyhow::Error::msg)?;
    assert_eq!(
        unshared, expected,
        "tasks that may not share a batch run alone"
    );

    // A long generation with a short deadline beside a short one, both in
    // the shared context.
    let (late, short) = std::thread::scope(|s| {
        let late = s.spawn(|| {
            generate(
                &*batching,
                true,
                Instant::now() + Duration::from_millis(500),
                "Count from one to a thousand: 1, 2, 3, 4, 5,",
                r#"{"max_tokens": 1500}"#,
            )
        });
        let short = s.spawn(|| generate(&*batching, true, far, &prompts[0], options));
        (late.join().expect("thread"), short.join().expect("thread"))
    });
    let late = late.expect_err("the deadline passes long before 1500 tokens");
    assert!(late.contains("deadline"), "{late}");
    let short = short.map_err(anyhow::Error::msg)?;
    assert!(!short.is_empty(), "the other generation finishes");

    // A hostile producer's claim with a token outside the vocabulary,
    // replayed in the shared batch beside an honest generation: the bad
    // token is refused where it stands (never evaluated, which would fail
    // the whole batch), and the other generation is untouched.
    let honest = std::sync::Arc::new(tidepool_host::backend::LlmTask::new());
    generate_as(&*alone, honest.clone(), far, &prompts[1], options).map_err(anyhow::Error::msg)?;
    let mut claim = honest.transcript();
    assert!(claim[0].tokens.len() > 3, "{claim:?}");
    claim[0].tokens[3] = u32::MAX - 7;
    let checker = std::sync::Arc::new(
        tidepool_host::backend::LlmTask::replaying(Some(claim), AcceptPolicy::GREEDY)
            .sharing_batches(true),
    );
    let (replayed, beside) = std::thread::scope(|s| {
        let r = s.spawn(|| generate_as(&*batching, checker.clone(), far, &prompts[1], options));
        let b = s.spawn(|| generate(&*batching, true, far, &prompts[2], options));
        (r.join().expect("thread"), b.join().expect("thread"))
    });
    replayed.map_err(anyhow::Error::msg)?;
    let reports = checker.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].rejected_at, Some(3), "{reports:?}");
    // It ends with its text, not with the batch's failure (its text may
    // differ from `expected[2]` in a near tie: it was batched).
    beside.map_err(|e| anyhow::anyhow!("the generation beside the bad claim failed: {e}"))?;
    Ok(())
}
