//! Lying nodes for tests of the pool's verification: output filters the
//! node agent applies before signing (`NodeConfig::tamper`). The release
//! binary has no way to set one. [`Adversary`] lies in simple ways;
//! [`OtherModel`] runs a different model than the bundle names.

use std::sync::Mutex;
use tidepool_node::Tamper;
use tidepool_proto::wire::LeaseId;

/// How a node lies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lie {
    /// Every output changed (one digit of a number: still valid JSON).
    AlwaysWrong,
    /// Each output changed with this probability.
    WrongWithP(f64),
    /// Returns the output of the task it ran before (another input).
    Replay,
    /// Returns the first half of the output.
    Truncate,
}

/// A [`Tamper`] that lies as told.
#[derive(Debug)]
pub struct Adversary {
    /// How.
    lie: Lie,
    /// How much a wrong digit is off (from the seed), so that two liars
    /// do not tell the same lie (that would be collusion, another test).
    delta: u8,
    /// Coin state and the previous output; lives as long as the node.
    state: Mutex<(u64, Option<Vec<u8>>)>,
}

impl Adversary {
    /// A liar seeded with `seed`.
    pub fn new(lie: Lie, seed: u64) -> Self {
        Self {
            lie,
            delta: 1 + (seed % 8) as u8,
            state: Mutex::new((seed | 1, None)),
        }
    }
}

/// Add `delta` (1..=9) to the last decimal digit of `out`, modulo 10 (a
/// different number, same shape).
pub fn wrong(mut out: Vec<u8>, delta: u8) -> Vec<u8> {
    match out.iter().rposition(u8::is_ascii_digit) {
        Some(i) => out[i] = b'0' + (out[i] - b'0' + delta) % 10,
        None => out.push(b' '),
    }
    out
}

impl Tamper for Adversary {
    fn tamper(&self, _lease: LeaseId, _input: &[u8], output: Vec<u8>) -> Vec<u8> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let previous = st.1.replace(output.clone());
        match self.lie {
            Lie::AlwaysWrong => wrong(output, self.delta),
            Lie::WrongWithP(p) => {
                // xorshift64*
                let x = &mut st.0;
                *x ^= *x >> 12;
                *x ^= *x << 25;
                *x ^= *x >> 27;
                let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
                if u < p {
                    wrong(output, self.delta)
                } else {
                    output
                }
            }
            Lie::Replay => previous.unwrap_or_else(|| wrong(output, self.delta)),
            Lie::Truncate => output[..output.len() / 2].to_vec(),
        }
    }
}

/// A node that runs a cheaper or different model than the bundle names:
/// all-MiniLM-L6-v2 (int8-stored) on tract, mean-pooled and normalised,
/// written exactly as the embed job writes its output.
pub struct OtherModel {
    /// The model planned for one sequence of [`OtherModel::SEQ`] tokens
    /// (tract cannot run it with symbolic shapes); loaded once per node.
    plan: std::sync::Arc<TypedRunnableModel>,
    /// The vocabulary text the tokenizer borrows (leaked: test code, one per node).
    vocab: &'static str,
}

use tract_onnx::prelude::*;

impl std::fmt::Debug for OtherModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtherModel(all-MiniLM-L6-v2)")
    }
}

/// The embed job's output layout (field order matters for the bytes).
#[derive(serde::Serialize)]
struct EmbedOutput {
    model: &'static str,
    dim: usize,
    vectors: Vec<Vec<f32>>,
}

impl OtherModel {
    /// Tokens per sequence (padded; padding is masked out of the mean).
    pub const SEQ: usize = 128;

    /// Load the L6 model and the vocabulary from the models directory.
    pub fn load() -> anyhow::Result<Self> {
        let mut m = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(crate::model_path("minilm-l6-int8"))?;
        for i in 0..m.input_outlets()?.len() {
            m.set_input_fact(i, i64::fact([1, Self::SEQ]).into())?;
        }
        let plan = m.into_optimized()?.into_runnable()?;
        let vocab = std::fs::read_to_string(crate::model_path("minilm-vocab"))?;
        Ok(Self {
            plan,
            vocab: Box::leak(vocab.into_boxed_str()),
        })
    }

    /// The L6 sentence vector of `text`.
    pub fn embed(&self, text: &str) -> anyhow::Result<Vec<f32>> {
        let tok = tidepool_guest::text::WordPiece::from_vocab_txt(self.vocab)
            .map_err(|e| anyhow::anyhow!("vocabulary: {e:?}"))?;
        let ids = tok.encode(text, Self::SEQ);
        let n = ids.len();
        let mut padded = vec![0i64; Self::SEQ];
        for (p, i) in padded.iter_mut().zip(&ids) {
            *p = i64::from(*i);
        }
        let mut mask = vec![0i64; Self::SEQ];
        mask[..n].fill(1);
        let out = self.plan.run(tvec!(
            Tensor::from_shape(&[1, Self::SEQ], &padded)?.into_tvalue(),
            Tensor::from_shape(&[1, Self::SEQ], &mask)?.into_tvalue(),
            Tensor::from_shape(&[1, Self::SEQ], &vec![0i64; Self::SEQ])?.into_tvalue(),
        ))?;
        let h = out[0].to_plain_array_view::<f32>()?;
        let dim = *h.shape().last().unwrap_or(&0);
        let flat: Vec<f32> = h.iter().copied().collect();
        let mut v = vec![0f32; dim];
        for row in flat.chunks(dim).take(n) {
            for (a, x) in v.iter_mut().zip(row) {
                *a += x / n as f32;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        Ok(v.iter().map(|x| x / norm).collect())
    }
}

impl Tamper for OtherModel {
    fn tamper(&self, _lease: LeaseId, input: &[u8], output: Vec<u8>) -> Vec<u8> {
        #[derive(serde::Deserialize)]
        struct Req {
            texts: Vec<String>,
        }
        // A test adversary that cannot lie must not pass for honest.
        let req: Req = serde_json::from_slice(input).expect("embed input");
        let vectors: Vec<Vec<f32>> = req
            .texts
            .iter()
            .map(|t| self.embed(t).expect("L6 embedding"))
            .collect();
        drop(output);
        serde_json::to_vec(&EmbedOutput {
            model: "minilm-l3",
            dim: vectors.first().map_or(384, Vec::len),
            vectors,
        })
        .expect("json")
    }
}
