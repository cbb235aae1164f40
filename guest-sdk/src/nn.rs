//! Safe wrappers over wasi-nn: load a graph by name, build tensors from
//! slices, run it, and read typed outputs.
//!
//! Graphs are only ever loaded by name: the node has verified the model file
//! behind each name against the digest in the job's manifest.

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};

pub use tensor::TensorType;

/// A wasi-nn failure, with the operation that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NnError {
    /// What the job was doing ("load-by-name minilm-l3", "compute", ...).
    pub op: String,
    /// The wasi-nn error code.
    pub code: errors::ErrorCode,
    /// The backend's explanation.
    pub message: String,
}

impl NnError {
    fn from_wasi(op: impl Into<String>, e: errors::Error) -> Self {
        Self {
            op: op.into(),
            code: e.code(),
            message: e.data(),
        }
    }
    fn local(op: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            op: op.into(),
            code: errors::ErrorCode::InvalidArgument,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for NnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wasi-nn {} failed ({:?}): {}",
            self.op, self.code, self.message
        )
    }
}
impl std::error::Error for NnError {}

pub use errors::ErrorCode as NnErrorCode;

/// A model loaded by the host, shared with other tasks on the node.
#[derive(Debug)]
pub struct Graph {
    name: String,
    inner: graph::Graph,
}

impl Graph {
    /// Load the model the manifest declares under `name`.
    pub fn load(name: &str) -> Result<Self, NnError> {
        let inner = graph::load_by_name(name)
            .map_err(|e| NnError::from_wasi(format!("load-by-name {name:?}"), e))?;
        Ok(Self {
            name: name.to_owned(),
            inner,
        })
    }

    /// The name the graph was loaded by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh execution context (one per concurrent inference).
    pub fn context(&self) -> Result<Context, NnError> {
        let inner = self.inner.init_execution_context().map_err(|e| {
            NnError::from_wasi(format!("init-execution-context for {:?}", self.name), e)
        })?;
        Ok(Context { inner })
    }
}

/// An input tensor, built from a typed slice (copied, little-endian).
#[derive(Debug)]
pub struct Input {
    name: String,
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

macro_rules! input_ctor {
    ($fn:ident, $t:ty, $tt:expr) => {
        /// A named input tensor of this element type; `data.len()` must equal the product of `dims`.
        pub fn $fn(name: &str, dims: &[u32], data: &[$t]) -> Result<Self, NnError> {
            Self::check(name, dims, data.len())?;
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok(Self {
                name: name.to_owned(),
                dims: dims.to_vec(),
                ty: $tt,
                data: bytes,
            })
        }
    };
}

impl Input {
    fn check(name: &str, dims: &[u32], len: usize) -> Result<(), NnError> {
        let want: u64 = dims.iter().map(|&d| u64::from(d)).product();
        if want != len as u64 {
            return Err(NnError::local(
                format!("build tensor {name:?}"),
                format!("dimensions {dims:?} hold {want} elements but {len} were given"),
            ));
        }
        Ok(())
    }
    input_ctor!(f32, f32, TensorType::Fp32);
    input_ctor!(f64, f64, TensorType::Fp64);
    input_ctor!(i32, i32, TensorType::I32);
    input_ctor!(i64, i64, TensorType::I64);

    /// A named `u8` tensor (also the way text travels through wasi-nn).
    pub fn u8(name: &str, dims: &[u32], data: &[u8]) -> Result<Self, NnError> {
        Self::check(name, dims, data.len())?;
        Ok(Self {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty: TensorType::U8,
            data: data.to_vec(),
        })
    }
}

/// One inference session on a graph.
#[derive(Debug)]
pub struct Context {
    inner: inference::GraphExecutionContext,
}

impl Context {
    /// Run the graph on named inputs and return its named outputs (their
    /// data is copied into the job only when read).
    pub fn compute(&mut self, inputs: Vec<Input>) -> Result<Outputs, NnError> {
        let tensors: Vec<(String, tensor::Tensor)> = inputs
            .into_iter()
            .map(|i| (i.name, tensor::Tensor::new(&i.dims, i.ty, &i.data)))
            .collect();
        let outs = self
            .inner
            .compute(tensors)
            .map_err(|e| NnError::from_wasi("compute", e))?;
        Ok(Outputs {
            tensors: outs
                .into_iter()
                .map(|(name, tensor)| Output { name, tensor })
                .collect(),
        })
    }
}

/// One output tensor, held by the host until read.
#[derive(Debug)]
pub struct Output {
    /// The graph's name for this output.
    pub name: String,
    /// The host-side tensor.
    tensor: tensor::Tensor,
}

impl Output {
    /// Its shape.
    pub fn dims(&self) -> Vec<u32> {
        self.tensor.dimensions()
    }
    /// Its element type.
    pub fn ty(&self) -> TensorType {
        self.tensor.ty()
    }
    /// Its elements as little-endian bytes (copied from the host).
    pub fn bytes(&self) -> Vec<u8> {
        self.tensor.data()
    }
    /// The elements as `f32`; an error if the tensor is of another type.
    pub fn to_f32(&self) -> Result<Vec<f32>, NnError> {
        let ty = self.ty();
        if ty != TensorType::Fp32 {
            return Err(NnError::local(
                format!("read output {:?}", self.name),
                format!("it is {ty:?}, not FP32"),
            ));
        }
        Ok(self
            .bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// All outputs of one `compute`, looked up by name or position.
#[derive(Debug)]
pub struct Outputs {
    tensors: Vec<Output>,
}

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Result<&Output, NnError> {
        self.tensors.iter().find(|t| t.name == name).ok_or_else(|| {
            let have: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
            NnError::local(
                format!("read output {name:?}"),
                format!("the graph returned only {have:?}"),
            )
        })
    }
    /// The `i`th output in the graph's order.
    pub fn at(&self, i: usize) -> Result<&Output, NnError> {
        self.tensors.get(i).ok_or_else(|| {
            NnError::local(
                format!("read output #{i}"),
                format!("the graph returned {} outputs", self.tensors.len()),
            )
        })
    }
    /// How many outputs there are.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
