//! The dedupe job (the aggregator's whole-batch stage) in the sandbox, on
//! real embeddings from the embed job: paraphrases of one quote group
//! together, other quotes stay apart, and bad batches are job errors.

use anyhow::Result;
use tidepool_tests::{guest, run, sandbox, test_config};

fn embed(texts: &[&str]) -> Result<Vec<serde_json::Value>> {
    let sb = sandbox(test_config());
    let job = sb.load(&guest("embed"))?;
    texts
        .iter()
        .map(|t| {
            let input = serde_json::to_vec(&serde_json::json!({ "text": t }))?;
            let out = run(&sb, &job, "e", &input)?
                .result
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok(serde_json::from_slice(&out)?)
        })
        .collect()
}

fn dedupe(input: &serde_json::Value) -> Result<Result<serde_json::Value, String>> {
    let sb = sandbox(test_config());
    let job = sb.load(&guest("dedupe"))?;
    let out = run(&sb, &job, "d", &serde_json::to_vec(input)?)?;
    Ok(match out.result {
        Ok(b) => Ok(serde_json::from_slice(&b)?),
        Err(e) => Err(format!("{}: {}", e.code, e.message)),
    })
}

#[test]
fn paraphrases_group_and_other_quotes_stay_apart() -> Result<()> {
    let texts = [
        "A Linux machine! Because a 486 is a terrible thing to waste! -- Joe Sloan",
        "Talk is cheap. Show me the code. -- Linus Torvalds",
        "A Linux machine! because a 486 is a terrible thing to waste! (By Joe Sloan)",
        "The best way to predict the future is to invent it.",
    ];
    let vectors = embed(&texts)?;
    assert_eq!(vectors[0]["dim"], 384);
    let items: Vec<serde_json::Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| serde_json::json!({ "id": format!("t{i}"), "vector": v["vector"], "model": v["model"] }))
        .collect();
    let out = dedupe(&serde_json::json!({ "options": { "threshold": 0.9 }, "items": items }))?
        .map_err(anyhow::Error::msg)?;
    let groups: Vec<Vec<&str>> = out["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            g["members"]
                .as_array()
                .expect("members")
                .iter()
                .filter_map(|m| m.as_str())
                .collect()
        })
        .collect();
    assert_eq!(groups, vec![vec!["t0", "t2"], vec!["t1"], vec!["t3"]]);
    let s = out["groups"][0]["similarity"].as_f64().expect("similarity");
    assert!((0.9..=1.0).contains(&s), "{s}");
    assert!(out["groups"][1].get("similarity").is_none());

    // A looser threshold links everything; the earliest item leads.
    let all = dedupe(&serde_json::json!({ "options": { "threshold": 0.01 }, "items": items }))?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(all["groups"].as_array().map(Vec::len), Some(1));
    assert_eq!(all["groups"][0]["members"][0], "t0");
    Ok(())
}

#[test]
fn bad_batches_are_job_errors() -> Result<()> {
    for (input, what) in [
        (
            serde_json::json!({ "options": { "threshold": 0 }, "items": [] }),
            "threshold is 0",
        ),
        (
            serde_json::json!({ "options": { "threshold": 1.5 }, "items": [] }),
            "threshold is 1.5",
        ),
        (
            serde_json::json!({ "options": { "threshold": 0.9 }, "items": [{ "id": "a", "vector": [1, 0] }, { "id": "b", "vector": [1] }] }),
            "item 1 (\"b\") has a vector of 1 numbers; the first has 2",
        ),
        (
            serde_json::json!({ "options": {}, "items": [] }),
            "missing field `threshold`",
        ),
        (
            serde_json::json!({ "items": [] }),
            "missing field `options`",
        ),
    ] {
        let e = dedupe(&input)?.expect_err("refused");
        assert!(e.starts_with("invalid-input: "), "{e}");
        assert!(e.contains(what), "{what}: {e}");
    }
    Ok(())
}
