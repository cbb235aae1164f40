//! The `onnx` engine on tract (pure Rust, CPU). Single-threaded and
//! bit-identical run to run, which makes it the reference engine for the
//! `exact` determinism tier.

use super::{guarded, ModelGraph, NnEngine, TaskBudget, TaskEnv};
use anyhow::Context as _;
use std::sync::Arc;
use tract_onnx::prelude::*;
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, NamedTensor};
use wasmtime_wasi_nn::wit::{GraphEncoding, TensorType};

/// The tract engine.
#[derive(Debug, Default)]
pub struct TractEngine;

impl NnEngine for TractEngine {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }
    fn describe(&self) -> String {
        "tract-onnx 0.23.9 (cpu)".into()
    }
    fn load(&self, path: &std::path::Path) -> anyhow::Result<Arc<dyn ModelGraph>> {
        Ok(Arc::new(TractModel::load(path)?))
    }
}

/// A loaded, optimised ONNX model (shared by all tasks; immutable).
pub struct TractModel {
    /// The runnable plan; `spawn` gives each inference its own state.
    plan: Arc<TypedRunnableModel>,
    /// Input names in the model's order (what guests name their tensors).
    inputs: Vec<String>,
    /// Output names in the model's order.
    outputs: Vec<String>,
    /// Declared input dimensions and the working-memory estimate.
    shapes: super::shapes::ShapeBudget,
}

impl std::fmt::Debug for TractModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl TractModel {
    /// Load and optimise an ONNX file. Input and output shapes stay symbolic
    /// where the model declares them so (batch, sequence).
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(path)
            .with_context(|| format!("tract cannot parse ONNX model {}", path.display()))?;
        let typed = model
            .into_optimized()
            .with_context(|| format!("tract cannot optimise {}", path.display()))?;
        let inputs = typed
            .input_outlets()?
            .iter()
            .map(|o| typed.node(o.node).name.clone())
            .collect();
        let outputs = typed
            .output_outlets()?
            .iter()
            .map(|o| {
                typed
                    .outlet_label(*o)
                    .map(str::to_owned)
                    .unwrap_or_else(|| typed.node(o.node).name.clone())
            })
            .collect();
        let shapes = super::shapes::ShapeBudget::of_typed(&typed)
            .with_context(|| format!("tract cannot analyse the shapes of {}", path.display()))?;
        let plan = typed.into_runnable()?;
        Ok(Self {
            plan,
            inputs,
            outputs,
            shapes,
        })
    }

    /// The model's input names.
    pub fn input_names(&self) -> &[String] {
        &self.inputs
    }

    /// The model's output names.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Run the model on tensors given in the model's input order.
    pub fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.plan.run(inputs)
    }
}

impl ModelGraph for TractModel {
    fn context(&self, env: &TaskEnv) -> Result<Box<dyn BackendExecutionContext>, BackendError> {
        Ok(Box::new(TractContext {
            model: self.plan.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            budget: env.budget,
        }))
    }
    fn shapes(&self) -> Option<&super::shapes::ShapeBudget> {
        Some(&self.shapes)
    }
}

/// One task's execution context on a shared model.
struct TractContext {
    /// The shared plan (an `Arc` clone; the model outlives the task).
    model: Arc<TypedRunnableModel>,
    /// Input names in order.
    inputs: Vec<String>,
    /// Output names in order.
    outputs: Vec<String>,
    /// The task's deadline.
    budget: TaskBudget,
}

fn err(msg: String) -> BackendError {
    BackendError::BackendAccess(wasmtime::Error::msg(msg))
}

/// Guest tensor → tract tensor (little-endian bytes, checked length).
pub fn to_tract(name: &str, t: &wasmtime_wasi_nn::Tensor) -> Result<Tensor, BackendError> {
    let shape: Vec<usize> = t.dimensions.iter().map(|&d| d as usize).collect();
    fn typed<T: Datum + Copy, const N: usize>(
        name: &str,
        shape: &[usize],
        data: &[u8],
        conv: fn([u8; N]) -> T,
    ) -> Result<Tensor, BackendError> {
        let n = shape.iter().try_fold(N, |acc, &d| acc.checked_mul(d));
        if n != Some(data.len()) {
            return Err(err(format!("input {name:?}: dimensions {shape:?} of {N}-byte elements do not match the {} bytes given", data.len())));
        }
        let values: Vec<T> = data
            .chunks_exact(N)
            .map(|c| conv(c.try_into().unwrap_or([0; N])))
            .collect();
        Tensor::from_shape(shape, &values).map_err(|e| err(format!("input {name:?}: {e}")))
    }
    match t.ty {
        TensorType::Fp32 => typed(name, &shape, &t.data, f32::from_le_bytes),
        TensorType::Fp64 => typed(name, &shape, &t.data, f64::from_le_bytes),
        TensorType::I32 => typed(name, &shape, &t.data, i32::from_le_bytes),
        TensorType::I64 => typed(name, &shape, &t.data, i64::from_le_bytes),
        TensorType::U8 => typed(name, &shape, &t.data, u8::from_le_bytes),
        TensorType::Fp16 => typed(name, &shape, &t.data, |b: [u8; 2]| {
            f16::from_bits(u16::from_le_bytes(b))
        }),
        TensorType::Bf16 => Err(BackendError::UnsupportedTensorType(format!("{name}: BF16"))),
    }
}

/// tract tensor → guest tensor.
pub fn from_tract(name: &str, t: &Tensor) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
    let ty = match t.datum_type() {
        DatumType::F32 => TensorType::Fp32,
        DatumType::F64 => TensorType::Fp64,
        DatumType::I32 => TensorType::I32,
        DatumType::I64 => TensorType::I64,
        DatumType::U8 => TensorType::U8,
        DatumType::F16 => TensorType::Fp16,
        other => {
            return Err(BackendError::UnsupportedTensorType(format!(
                "output {name}: {other:?}"
            )))
        }
    };
    let dimensions = t
        .shape()
        .iter()
        .map(|&d| {
            u32::try_from(d).map_err(|_| err(format!("output {name}: dimension {d} too large")))
        })
        .collect::<Result<_, _>>()?;
    // Plain datum types only (checked above): their storage is their little-endian bytes on this host.
    let data = t.as_bytes().to_vec();
    Ok(wasmtime_wasi_nn::Tensor {
        dimensions,
        ty,
        data,
    })
}

impl BackendExecutionContext for TractContext {
    refuse_witx!();
    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        self.budget.check("compute")?;
        let mut values = TVec::new();
        for nt in super::order_inputs(&self.inputs, inputs.as_deref())? {
            values.push(to_tract(&nt.name, &nt.tensor)?.into_tvalue());
        }
        let model = self.model.clone();
        let outs = guarded("compute", || {
            model
                .run(values)
                .map_err(|e| err(format!("inference failed: {e:#}")))
        })?;
        let mut named = Vec::with_capacity(outs.len());
        for (name, t) in self.outputs.iter().zip(outs.iter()) {
            named.push(NamedTensor {
                name: name.clone(),
                tensor: from_tract(name, t)?,
            });
        }
        Ok(Some(named))
    }
}
