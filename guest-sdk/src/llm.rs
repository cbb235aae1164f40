//! Text generation with a GGUF model (the node's `ggml` backend, llama.cpp)
//! in one call: [`Llm::generate`].
//!
//! wasi-nn tensors carry no strings, so Tidepool's convention (see
//! `wit/README.md`) is: the prompt goes in as a `u8` tensor named `prompt`,
//! the [`Options`] as JSON in a `u8` tensor named `options`, and the text
//! comes back as the `u8` output `text` (plus `info`, JSON counts). This
//! module hides all of it.
//!
//! Generation is deterministic on a node: greedy by default, or sampled
//! from a seed you give. Under the `llm` determinism tier the pool checks a
//! result by replaying its tokens through the verifier's model; jobs need
//! not do anything for that.

use crate::nn::{Graph, Input, NnError};
use serde::{Deserialize, Serialize};

/// How to generate. Build with [`Options::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Options {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0 = greedy (the default); otherwise the sampling temperature.
    pub temperature: f32,
    /// With sampling: sample among this many best tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// With sampling: the seed.
    pub seed: u32,
    /// Stop before the first of these strings.
    pub stop: Vec<String>,
}

impl Options {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn new(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_k: None,
            seed: 0,
            stop: Vec::new(),
        }
    }
    /// Stop before `s` (may be called several times).
    pub fn with_stop(mut self, s: &str) -> Self {
        self.stop.push(s.to_owned());
        self
    }
    /// Sample at `temperature` among the `top_k` best tokens with `seed`.
    pub fn with_sampling(mut self, temperature: f32, top_k: u32, seed: u32) -> Self {
        self.temperature = temperature;
        self.top_k = Some(top_k);
        self.seed = seed;
        self
    }
}

/// Generated text and what the node reported about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The text (bytes that are not UTF-8, e.g. a character cut by
    /// `max_tokens`, are replaced by U+FFFD).
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// Why it stopped: `eog` (the model ended), `stop` (a stop string),
    /// `length` (`max_tokens`).
    pub finish: String,
}

#[derive(Deserialize)]
struct Info {
    prompt_tokens: u32,
    generated_tokens: u32,
    finish: String,
}

/// A text-generation model the manifest declares (encoding `ggml`).
#[derive(Debug)]
pub struct Llm {
    graph: Graph,
}

impl Llm {
    /// Load the model bound to `name`.
    pub fn load(name: &str) -> Result<Self, NnError> {
        Ok(Self {
            graph: Graph::load(name)?,
        })
    }

    /// Generate a continuation of `prompt` (which should already follow the
    /// model's chat format, e.g. Gemma's `<start_of_turn>user ...`).
    pub fn generate(&self, prompt: &str, options: &Options) -> Result<Generated, NnError> {
        let opts = serde_json::to_vec(options).map_err(|e| NnError {
            op: "encode options".into(),
            code: crate::nn::NnErrorCode::InvalidArgument,
            message: e.to_string(),
        })?;
        let mut ctx = self.graph.context()?;
        let out = ctx.compute(vec![
            Input::u8("prompt", &[prompt.len() as u32], prompt.as_bytes())?,
            Input::u8("options", &[opts.len() as u32], &opts)?,
        ])?;
        let text = String::from_utf8_lossy(&out.get("text")?.bytes()).into_owned();
        let info: Info =
            serde_json::from_slice(&out.get("info")?.bytes()).map_err(|e| NnError {
                op: "read output \"info\"".into(),
                code: crate::nn::NnErrorCode::RuntimeError,
                message: e.to_string(),
            })?;
        Ok(Generated {
            text,
            prompt_tokens: info.prompt_tokens,
            generated_tokens: info.generated_tokens,
            finish: info.finish,
        })
    }
}

/// A one-turn Gemma chat prompt: the user's message, then the model's turn.
pub fn gemma_prompt(user: &str) -> String {
    format!("<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_serialise_to_the_host_convention() {
        let o = Options::new(32).with_stop("\n");
        let j = serde_json::to_string(&o).expect("json");
        assert_eq!(
            j,
            r#"{"max_tokens":32,"temperature":0.0,"seed":0,"stop":["\n"]}"#
        );
        let s = Options::new(8).with_sampling(0.7, 40, 9);
        assert!(serde_json::to_string(&s)
            .expect("json")
            .contains(r#""top_k":40"#));
    }

    #[test]
    fn gemma_prompt_has_both_turns() {
        let p = gemma_prompt("hi");
        assert!(p.starts_with("<start_of_turn>user\nhi<end_of_turn>"));
        assert!(p.ends_with("<start_of_turn>model\n"));
    }
}
