//! `embed`: sentence embeddings for a batch of texts.
//!
//! Input JSON `{"texts": ["...", ...]}`; output JSON
//! `{"model": "minilm-l3", "dim": 384, "vectors": [[...], ...]}`, one
//! L2-normalised vector per text, in order. A pipeline's per-item stage
//! sends one item, `{"text": "..."}`, and gets `{"model", "dim", "vector"}`. Each text is encoded on its own
//! (batch size 1), so a text's vector does not depend on the other texts in
//! the task: results can be cached and re-checked per text.
//!
//! The model is paraphrase-MiniLM-L3-v2, whose ONNX graph ends in the
//! mean-pooled sentence vector (output `461`); the job normalises it.

use serde::{Deserialize, Serialize};
use tidepool_guest::nn::{Graph, Input};
use tidepool_guest::text::WordPiece;
use tidepool_guest::{export_job, io, Job, JobError};

mod vocab {
    include!(concat!(env!("OUT_DIR"), "/vocab.rs"));
}

/// The model name the manifest binds to the verified ONNX file.
const MODEL: &str = "minilm-l3";
/// The graph's pooled-output tensor.
const POOLED: &str = "461";
/// Sentence-transformers truncates this model's inputs at 128 tokens.
const MAX_TOKENS: usize = 128;
/// Refuse absurd tasks early (the node also bounds memory and time).
const MAX_TEXTS: usize = 4096;

/// A batch (`texts`) or one pipeline item (`text`); exactly one of them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    texts: Option<Vec<String>>,
    text: Option<String>,
}

#[derive(Serialize)]
struct Response {
    model: &'static str,
    dim: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    vectors: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vector: Option<Vec<f32>>,
}

struct Embed;

impl Job for Embed {
    fn run(input: Vec<u8>) -> Result<Vec<u8>, JobError> {
        let req: Request = io::from_json(&input)?;
        let (texts, single) = match (req.texts, req.text) {
            (Some(t), None) => (t, false),
            (None, Some(t)) => (vec![t], true),
            _ => {
                return Err(JobError::invalid_input(
                    "give either \"texts\" (a list) or \"text\" (one item)",
                ))
            }
        };
        if texts.len() > MAX_TEXTS {
            return Err(JobError::invalid_input(format!(
                "{} texts in one task; at most {MAX_TEXTS}",
                texts.len()
            )));
        }
        let tokenizer =
            // build.rs sorted the table and asserted it.
            WordPiece::from_presorted(vocab::VOCAB)
                .map_err(|e| JobError::internal(e.to_string()))?;
        let graph = Graph::load(MODEL)?;
        let mut ctx = graph.context()?;
        let mut vectors = Vec::with_capacity(texts.len());
        let mut dim = 0;
        for text in &texts {
            let ids: Vec<i64> = tokenizer
                .encode(text, MAX_TOKENS)
                .into_iter()
                .map(i64::from)
                .collect();
            let dims = [1, ids.len() as u32];
            let mask = vec![1i64; ids.len()];
            let out = ctx.compute(vec![
                Input::i64("input_ids", &dims, &ids)?,
                Input::i64("attention_mask", &dims, &mask)?,
            ])?;
            let mut v = out.get(POOLED)?.to_f32()?;
            normalize(&mut v);
            dim = v.len();
            vectors.push(v);
        }
        let dim = if vectors.is_empty() { 384 } else { dim };
        let (vectors, vector) = if single {
            (None, vectors.pop())
        } else {
            (Some(vectors), None)
        };
        io::to_json(&Response {
            model: MODEL,
            dim,
            vectors,
            vector,
        })
    }
}

/// Scale to unit length (a zero vector stays zero).
fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

export_job!(Embed);
