//! What an ONNX model's inputs may be, and how much memory a `compute` on
//! given inputs will need — known before the engine is called.
//!
//! A guest chooses its input shapes. The model declares some dimensions
//! fixed (a hidden size) and some symbolic (batch, sequence); the memory a
//! run needs grows with the symbolic ones, for attention with the square of
//! the sequence. Left unchecked, a guest asking for a sequence of a million
//! tokens makes the engine allocate terabytes: the allocation fails and the
//! whole node process aborts, or the kernel kills it.
//!
//! [`ShapeBudget`] is built once per model from tract's typed graph: the
//! declared input dimensions, and one polynomial in the symbols — the sum of
//! the sizes of every intermediate tensor whose size depends on the inputs.
//! Summing them all overestimates the peak (engines free intermediates as
//! they go), so a run under the estimate is under the budget whichever
//! engine runs it. Checking a call binds the symbols from the given shapes
//! and evaluates the polynomial: microseconds, no allocation of the size
//! it predicts. It is used for ONNX models whatever engine runs them; the
//! `ggml` engine bounds its memory by its fixed context size instead.
//!
//! Never runs a model and never keeps its weights.

use tract_onnx::prelude::*;
use wasmtime_wasi_nn::backend::NamedTensor;
use wasmtime_wasi_nn::wit::TensorType;

/// Declared inputs and the working-memory polynomial of one model.
#[derive(Debug, Clone)]
pub struct ShapeBudget {
    /// Each input's name and declared dimensions, in the model's order.
    inputs: Vec<(String, Vec<TDim>)>,
    /// Bytes of every intermediate tensor whose size depends on a symbol,
    /// summed (a polynomial in the input symbols).
    working: TDim,
}

/// Why a `compute` is refused before it starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeRefusal {
    /// The inputs do not fit the model's declared dimensions.
    #[error("input {input:?}: {reason}")]
    Invalid {
        /// The input's name.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The estimated working memory is over the budget.
    #[error("these input shapes need about {estimate} bytes of working memory; the budget per compute is {limit} bytes")]
    OverBudget {
        /// Estimated bytes.
        estimate: u64,
        /// The budget.
        limit: u64,
    },
}

impl ShapeBudget {
    /// Analyse an ONNX file (typed and decluttered; the weights are dropped
    /// when this returns).
    pub fn of_onnx_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(path)?
            .into_typed()?
            .into_decluttered()?;
        Self::of_typed(&model)
    }

    /// Analyse a typed model.
    pub fn of_typed(model: &TypedModel) -> TractResult<Self> {
        let inputs = model
            .input_outlets()?
            .iter()
            .map(|o| {
                let fact = model.outlet_fact(*o)?;
                Ok((
                    model.node(o.node).name.clone(),
                    fact.shape.iter().cloned().collect(),
                ))
            })
            .collect::<TractResult<_>>()?;
        let mut working = TDim::Val(0);
        for node in model.nodes() {
            for out in &node.outputs {
                let volume = out.fact.shape.volume();
                if volume.symbols().is_empty() {
                    // Fixed by the model (weights, constants): not the guest's doing.
                    continue;
                }
                working += volume * out.fact.datum_type.size_of() as i64;
            }
        }
        Ok(Self {
            inputs,
            working: working.simplify(),
        })
    }

    /// Check `given` against the declared dimensions and estimate the
    /// working memory; refuse it over `limit` bytes. `Ok(None)`: the
    /// estimate depends on something the inputs do not fix (data-dependent
    /// shapes), so only the declared dimensions were checked.
    pub fn check(&self, given: &[NamedTensor], limit: u64) -> Result<Option<u64>, ShapeRefusal> {
        let mut values = SymbolValues::default();
        let mut bound: Vec<(Symbol, i64)> = Vec::new();
        for t in given {
            let Some((_, declared)) = self.inputs.iter().find(|(n, _)| *n == t.name) else {
                // The engine refuses unknown names with the model's list.
                continue;
            };
            let dims = &t.tensor.dimensions;
            let invalid = |reason: String| ShapeRefusal::Invalid {
                input: t.name.clone(),
                reason,
            };
            let elements = dims.iter().try_fold(element_bytes(t.tensor.ty), |n, &d| {
                n.checked_mul(u64::from(d))
            });
            if elements != Some(t.tensor.data.len() as u64) {
                return Err(invalid(format!(
                    "dimensions {dims:?} of {}-byte elements do not match the {} bytes given",
                    element_bytes(t.tensor.ty),
                    t.tensor.data.len()
                )));
            }
            if dims.len() != declared.len() {
                return Err(invalid(format!(
                    "{} dimensions given, the model declares {} ({})",
                    dims.len(),
                    declared.len(),
                    show(declared)
                )));
            }
            for (i, (d, &g)) in declared.iter().zip(dims).enumerate() {
                let g = i64::from(g);
                match d {
                    TDim::Sym(s) => match bound.iter().find(|(b, _)| b == s) {
                        Some((_, v)) if *v != g => {
                            return Err(invalid(format!(
                                "dimension {i} is {g}, but {s} is {v} in another input"
                            )))
                        }
                        Some(_) => {}
                        None => {
                            bound.push((s.clone(), g));
                            values = values.with(s, g);
                        }
                    },
                    d => {
                        if let Ok(v) = d.to_i64() {
                            if v != g {
                                return Err(invalid(format!(
                                    "dimension {i} is {g}; the model declares {v} ({})",
                                    show(declared)
                                )));
                            }
                        }
                    }
                }
            }
        }
        let Ok(estimate) = self.working.eval(&values).to_i64() else {
            return Ok(None);
        };
        // Dimensions are u32 and bounded by the data given, so the polynomial
        // stays far from i64's range; a negative value would be a bug here,
        // and is refused rather than trusted.
        let estimate = u64::try_from(estimate).unwrap_or(u64::MAX);
        if estimate > limit {
            return Err(ShapeRefusal::OverBudget { estimate, limit });
        }
        Ok(Some(estimate))
    }
}

/// Bytes per element of a wasi-nn tensor type.
fn element_bytes(ty: TensorType) -> u64 {
    match ty {
        TensorType::U8 => 1,
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
    }
}

/// Declared dimensions as the model writes them: `[batch, sequence, 384]`.
fn show(dims: &[TDim]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}
