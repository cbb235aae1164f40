//! The embed job on the real model, checked against an independent native
//! path: Hugging Face `tokenizers` + tract called directly on the same ONNX
//! file, with no Tidepool code in between.

use tidepool_tests::*;
use tract_onnx::prelude::*;

/// Native reference: tokenizers (padding off, truncation at 128) → tract → L2-normalise.
fn native_embeddings(texts: &[String]) -> Vec<Vec<f32>> {
    let mut tok =
        tokenizers::Tokenizer::from_file(model_path("minilm-tokenizer")).expect("tokenizer.json");
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: 128,
        ..Default::default()
    }))
    .expect("truncation");
    let typed = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_path(model_path("minilm-l3"))
        .expect("onnx")
        .into_optimized()
        .expect("optimise");
    // The graph's pooled sentence vector is the output named "461".
    let pooled = typed
        .output_outlets()
        .expect("outputs")
        .iter()
        .position(|o| typed.outlet_label(*o) == Some("461") || typed.node(o.node).name == "461")
        .expect("output 461");
    let model = typed.into_runnable().expect("runnable");
    texts
        .iter()
        .map(|t| {
            let enc = tok.encode(t.as_str(), true).expect("encode");
            native_embedding(|i| model.run(i), pooled, enc.get_ids())
        })
        .collect()
}

fn embed(
    sb: &tidepool_host::Sandbox,
    job: &tidepool_host::JobComponent,
    texts: &[String],
) -> Embeddings {
    let input = serde_json::to_vec(&serde_json::json!({ "texts": texts })).expect("json");
    let out = run(sb, job, "embed-test", &input).expect("task runs");
    let bytes = out.result.expect("job succeeds");
    serde_json::from_slice(&bytes).expect("embeddings JSON")
}

#[test]
fn embed_job_matches_native_tract_on_real_text() {
    let mut texts = fortunes(24).expect("corpus");
    texts.push("Ünïcödé — naïve café, 東京 and emoji 🙂 test; long-words-with-hyphens!".into());
    let sb = sandbox(test_config());
    let job = sb.load(&guest("embed")).expect("load embed");
    let got = embed(&sb, &job, &texts);
    let want = native_embeddings(&texts);
    assert_eq!(got.dim, 384);
    assert_eq!(got.vectors.len(), texts.len());
    for (i, (g, w)) in got.vectors.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), 384, "text {i}");
        let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "text {i}: norm {norm}");
        let c = cosine(g, w);
        assert!(
            c >= 0.9999,
            "text {i} {:?}: cosine with native path {c}",
            texts[i]
        );
    }
}

#[test]
fn paraphrase_is_closer_than_unrelated_text() {
    let texts: Vec<String> = [
        "A visit to a fresh place will bring strange work.",
        "Going somewhere new will bring you unusual work.",
        "Alimony and bribes will engage a large share of your wealth.",
    ]
    .map(String::from)
    .to_vec();
    let sb = sandbox(test_config());
    let job = sb.load(&guest("embed")).expect("load embed");
    let e = embed(&sb, &job, &texts);
    let para = cosine(&e.vectors[0], &e.vectors[1]);
    let other = cosine(&e.vectors[0], &e.vectors[2]);
    assert!(para > other + 0.2, "paraphrase {para} vs unrelated {other}");
}

#[test]
fn same_input_gives_identical_bytes_and_receipts_agree() {
    let texts = fortunes(8).expect("corpus");
    let input = serde_json::to_vec(&serde_json::json!({ "texts": texts })).expect("json");
    let sb = sandbox(test_config());
    let job = sb.load(&guest("embed")).expect("load");
    let a = run(&sb, &job, "t", &input).expect("run a");
    let b = run(&sb, &job, "t", &input).expect("run b");
    // A second sandbox (fresh engine, fresh registry) must agree too.
    let sb2 = sandbox(test_config());
    let job2 = sb2.load(&guest("embed")).expect("load 2");
    let c = run(&sb2, &job2, "t", &input).expect("run c");
    let (a, b, c) = (a, b, c);
    assert_eq!(
        a.result.as_ref().expect("ok"),
        b.result.as_ref().expect("ok")
    );
    assert_eq!(
        a.result.as_ref().expect("ok"),
        c.result.as_ref().expect("ok")
    );
    assert_eq!(a.receipt.output, c.receipt.output);
    assert_eq!(a.receipt.input, tidepool_proto::Digest::of(&input));
    // Metering: the host counted the engine's work, the same on every
    // host but for the time it took; 8 texts of 384 floats came back at least.
    let (m, n) = (&a.receipt.metering, &c.receipt.metering);
    assert!(m.computes >= 1 && m.compute_us > 0, "{m:?}");
    assert!(m.compute_us <= a.receipt.wall_time_us, "{m:?}");
    assert!(m.tensor_bytes_out >= 8 * 384 * 4, "{m:?}");
    assert!(m.tensor_bytes_in > 0 && m.tokens_in == 0 && m.tokens_out == 0);
    assert_eq!(m.bytes_in, input.len() as u64);
    assert_eq!(m.bytes_out, a.receipt.output_len);
    assert_eq!(
        (m.computes, m.tensor_bytes_in, m.tensor_bytes_out),
        (n.computes, n.tensor_bytes_in, n.tensor_bytes_out)
    );
    assert!(
        a.receipt.models.contains_key("minilm-l3"),
        "receipt names the model: {:?}",
        a.receipt.models
    );
    assert_eq!(
        a.receipt.models["minilm-l3"].sha256.hex(),
        tidepool_host::models::catalog_entry("minilm-l3")
            .expect("entry")
            .sha256
    );
}

#[test]
fn bad_input_is_a_job_error_not_a_trap() {
    let sb = sandbox(test_config());
    let job = sb.load(&guest("embed")).expect("load");
    for bad in [
        &b"not json"[..],
        br#"{"texts": "not a list"}"#,
        br#"{"txts": []}"#,
    ] {
        let out = run(&sb, &job, "bad", bad).expect("task completes");
        let err = out.result.expect_err("job refuses");
        assert_eq!(err.code, "invalid-input", "{err:?}");
        assert!(!out.receipt.ok);
    }
}

/// The SDK's WordPiece tokenizer (what runs inside the guest) must give the
/// same ids as Hugging Face `tokenizers` on real text.
#[test]
fn guest_tokenizer_matches_hugging_face_on_the_corpus() {
    let vocab = std::fs::read_to_string(model_path("minilm-vocab")).expect("vocab");
    let ours = tidepool_guest::text::WordPiece::from_vocab_txt(&vocab).expect("wordpiece");
    let mut theirs =
        tokenizers::Tokenizer::from_file(model_path("minilm-tokenizer")).expect("tokenizer.json");
    theirs.with_padding(None);
    theirs
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 128,
            ..Default::default()
        }))
        .expect("truncation");
    let mut texts = fortunes(10_000).expect("corpus");
    for extra in [
        "/usr/share/games/fortunes/literature",
        "/usr/share/games/fortunes/riddles",
    ] {
        let t = std::fs::read_to_string(extra).expect("corpus file");
        texts.extend(t.split("\n%\n").map(|s| s.trim().to_owned()));
    }
    texts.extend(
        [
            "Crème brûlée, Übermensch, ½ off!",
            "日本語のテキスト and 中文",
            "tab\tand\u{200b}zero-width",
            "a".repeat(150).as_str(),
            "don't stop-believing...",
            "",
        ]
        .map(String::from),
    );
    assert!(
        texts.len() > 700,
        "need a real corpus, have {}",
        texts.len()
    );
    for t in &texts {
        let want: Vec<u32> = theirs
            .encode(t.as_str(), true)
            .expect("encode")
            .get_ids()
            .to_vec();
        let got = ours.encode(t, 128);
        assert_eq!(got, want, "text {t:?}");
    }
}
