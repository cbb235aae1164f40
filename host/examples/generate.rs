//! Generate text with a GGUF model on the node's `ggml` engine, without a
//! guest: `cargo run -p tidepool-host --example generate -- MODEL.gguf
//! [THREADS] < prompt.txt`. For trying prompts while writing a job.

use std::io::Read;
use std::sync::Arc;
use tidepool_host::backend::{LlmTask, NnEngine, TaskBudget, TaskEnv};
use wasmtime_wasi_nn::backend::NamedTensor;
use wasmtime_wasi_nn::wit::TensorType;

fn bytes(name: &str, data: &[u8]) -> NamedTensor {
    NamedTensor {
        name: name.into(),
        tensor: wasmtime_wasi_nn::Tensor {
            dimensions: vec![data.len() as u32],
            ty: TensorType::U8,
            data: data.to_vec(),
        },
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: generate MODEL.gguf [THREADS] < prompt"))?;
    let threads = args.get(1).map(|t| t.parse()).transpose()?.unwrap_or(1);
    let mut prompt = String::new();
    std::io::stdin().read_to_string(&mut prompt)?;
    let engine =
        tidepool_host::backend::llama::LlamaEngine::new(threads).map_err(anyhow::Error::msg)?;
    let graph = engine.load(std::path::Path::new(model))?;
    let env = TaskEnv {
        budget: TaskBudget {
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(600),
        },
        llm: Arc::new(LlmTask::new()),
        nn: Default::default(),
    };
    let mut ctx = graph.context(&env).map_err(|e| anyhow::anyhow!("{e}"))?;
    for p in prompt.split("\n=====\n") {
        let p = p.trim();
        let out = ctx
            .compute(Some(vec![
                bytes("prompt", p.as_bytes()),
                bytes("options", br#"{"max_tokens": 60, "stop": ["\n"]}"#),
            ]))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .unwrap_or_default();
        println!("{}", String::from_utf8_lossy(&out[0].tensor.data));
    }
    Ok(())
}
