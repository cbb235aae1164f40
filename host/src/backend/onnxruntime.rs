//! ONNX Runtime as a second ONNX engine (`ort` crate, `load-dynamic`): the
//! shared library comes from the `onnxruntime` PyPI wheel (catalogue entry
//! `onnxruntime-lib`, fetched and verified at set-up) and is loaded at run
//! time, so the binary links nothing and a node without it still runs tract.
//!
//! Deterministic settings: one intra-op and one inter-op thread, ONNX
//! Runtime's deterministic compute on, CPU execution provider. The same
//! build on the same machine gives the same bytes; against tract the
//! results differ in the last bits, which the `tolerance` tier accepts and
//! `exact` does not.
//!
//! On a GPU node the same engine runs on ONNX Runtime's CUDA execution
//! provider ([`OrtEngine::cuda`], cargo feature `onnxruntime-cuda`, which
//! only compiles the provider's bindings: the CUDA code is in the
//! `onnxruntime-gpu` wheel's library, loaded at run time). Its settings add
//! the heuristic (not the benchmarking) convolution search and no TF32, so a
//! GPU reproduces its own results; against other GPUs and CPUs results
//! differ in the last bits, which is why GPU-tier jobs declare `tolerance`
//! or `llm`.
//!
//! It never downloads anything and never falls back by itself: the node's
//! configuration decides (see `tidepool_host::engines`).

use super::{guarded, ModelGraph, NnEngine, TaskBudget, TaskEnv};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, NamedTensor};
use wasmtime_wasi_nn::wit::{GraphEncoding, TensorType};

/// The ONNX Runtime release this build speaks to (C API 31).
pub const VERSION: &str = "1.31.1";

/// Why ONNX Runtime cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OrtError {
    /// The library file is not there.
    #[error("ONNX Runtime library {0} does not exist (run `cargo xtask fetch-models`, or `tidepool models fetch onnxruntime-lib`)")]
    Missing(PathBuf),
    /// The file is not a loadable ONNX Runtime of a supported version.
    #[error("ONNX Runtime library {path} cannot be used (this build needs ONNX Runtime {VERSION}, C API 31): {why}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What the loader said.
        why: String,
    },
    /// The library has no CUDA execution provider (the CPU wheel's).
    #[error("ONNX Runtime library {path} has no CUDA execution provider (it offers {offers}); a GPU node needs the GPU build: `tidepool models fetch onnxruntime-gpu-lib`")]
    NoCuda {
        /// The file.
        path: PathBuf,
        /// The providers it has.
        offers: String,
    },
    /// The CUDA provider is there but cannot start (driver, CUDA or cuDNN
    /// libraries missing, no such device).
    #[error("ONNX Runtime's CUDA execution provider (from {path}) cannot start on device {device}: {why} (it needs the NVIDIA driver and the CUDA 13 runtime, cuBLAS, cuRAND, cuFFT and cuDNN 9 libraries on the loader path; see docs/gpu-nodes.md)")]
    CudaUnusable {
        /// The library.
        path: PathBuf,
        /// The CUDA device index.
        device: u32,
        /// What ONNX Runtime said.
        why: String,
    },
    /// This build has no CUDA bindings.
    #[error("this build has no CUDA support for ONNX Runtime (cargo feature `onnxruntime-cuda`)")]
    NotBuilt,
    /// Another library was loaded earlier in this process.
    #[error("ONNX Runtime is already loaded from {loaded} in this process; cannot load {wanted}")]
    OtherLoaded {
        /// What is loaded.
        loaded: PathBuf,
        /// What was asked for.
        wanted: PathBuf,
    },
}

/// The process-wide environment: the library can be loaded once.
static ENV: OnceLock<(PathBuf, Result<Arc<ort::environment::Environment>, String>)> =
    OnceLock::new();

/// Which execution provider runs an engine's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrtDevice {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// The CUDA provider on this device index.
    Cuda(u32),
}

/// The ONNX Runtime engine.
#[derive(Clone)]
pub struct OrtEngine {
    /// The loaded environment (lives for the process).
    env: Arc<ort::environment::Environment>,
    /// Where its sessions run (fixed at start).
    device: OrtDevice,
}

impl std::fmt::Debug for OrtEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OrtEngine")
    }
}

impl OrtEngine {
    /// Load the library at `lib` (once per process).
    pub fn new(lib: &Path) -> Result<Self, OrtError> {
        if !lib.is_file() {
            return Err(OrtError::Missing(lib.to_owned()));
        }
        let (loaded, env) = ENV.get_or_init(|| {
            let env = guarded_load(lib);
            (lib.to_owned(), env)
        });
        if loaded != lib {
            return Err(OrtError::OtherLoaded {
                loaded: loaded.clone(),
                wanted: lib.to_owned(),
            });
        }
        match env {
            Ok(env) => Ok(Self {
                env: env.clone(),
                device: OrtDevice::Cpu,
            }),
            Err(why) => Err(OrtError::Unusable {
                path: lib.to_owned(),
                why: why.clone(),
            }),
        }
    }

    /// The engine on CUDA device `device`, from the GPU build's library at
    /// `lib`. The provider is started once here, so a missing driver or CUDA
    /// library is an error at the node's start, not at its first task.
    pub fn cuda(lib: &Path, device: u32) -> Result<Self, OrtError> {
        let cpu = Self::new(lib)?;
        cuda_check(&cpu.env, lib, device)?;
        Ok(Self {
            device: OrtDevice::Cuda(device),
            ..cpu
        })
    }

    /// Where the engine's sessions run.
    pub fn device(&self) -> OrtDevice {
        self.device
    }
}

/// The CUDA provider with the deterministic settings.
#[cfg(feature = "onnxruntime-cuda")]
fn cuda_provider(device: u32) -> ort::ep::ExecutionProviderDispatch {
    use ort::ep::cuda::ConvAlgorithmSearch;
    ort::ep::CUDA::default()
        .with_device_id(device as i32)
        // Exhaustive search benchmarks kernels at load time and may pick a
        // different one each time; the heuristic picks the same one.
        .with_conv_algorithm_search(ConvAlgorithmSearch::Heuristic)
        .with_tf32(false)
        .build()
        .error_on_failure()
}

#[cfg(feature = "onnxruntime-cuda")]
fn cuda_check(
    env: &Arc<ort::environment::Environment>,
    lib: &Path,
    device: u32,
) -> Result<(), OrtError> {
    use ort::ep::ExecutionProvider;
    let unusable = |why: String| OrtError::Unusable {
        path: lib.to_owned(),
        why,
    };
    if !ort::ep::CUDA::is_available().map_err(|e| unusable(e.to_string()))? {
        return Err(OrtError::NoCuda {
            path: lib.to_owned(),
            offers: "CPUExecutionProvider".into(),
        });
    }
    let builder = ort::session::Session::builder(env).map_err(|e| unusable(e.to_string()))?;
    // Registration loads the provider library and, through it, CUDA.
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        builder
            .with_execution_providers([cuda_provider(device)])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }))
    .unwrap_or_else(|_| Err("the provider panicked while starting".into()));
    started.map_err(|why| OrtError::CudaUnusable {
        path: lib.to_owned(),
        device,
        why: why.trim().to_owned(),
    })
}

#[cfg(not(feature = "onnxruntime-cuda"))]
fn cuda_check(
    _env: &Arc<ort::environment::Environment>,
    _lib: &Path,
    _device: u32,
) -> Result<(), OrtError> {
    Err(OrtError::NotBuilt)
}

fn guarded_load(lib: &Path) -> Result<Arc<ort::environment::Environment>, String> {
    // A wrong file can make the loader panic inside `ort`; keep it an error.
    std::panic::catch_unwind(|| {
        ort::init_from(lib)
            .map_err(|e| e.to_string())?
            .with_name("tidepool")
            .build()
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
    .unwrap_or_else(|_| Err("the loader panicked".into()))
}

impl NnEngine for OrtEngine {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }
    fn describe(&self) -> String {
        match self.device {
            OrtDevice::Cpu => format!("onnxruntime {VERSION} (cpu)"),
            OrtDevice::Cuda(d) => format!("onnxruntime {VERSION} (cuda:{d})"),
        }
    }
    fn load(&self, path: &Path) -> anyhow::Result<Arc<dyn ModelGraph>> {
        let e = |e: ort::Error<ort::session::builder::SessionBuilder>| anyhow::anyhow!("{e}");
        let builder =
            ort::session::Session::builder(&self.env).map_err(|e| anyhow::anyhow!("{e}"))?;
        let builder = match self.device {
            OrtDevice::Cpu => builder,
            #[cfg(feature = "onnxruntime-cuda")]
            OrtDevice::Cuda(d) => builder
                .with_execution_providers([cuda_provider(d)])
                .map_err(e)?,
            #[cfg(not(feature = "onnxruntime-cuda"))]
            OrtDevice::Cuda(_) => anyhow::bail!("{}", OrtError::NotBuilt),
        };
        let session = builder
            .with_intra_threads(1)
            .map_err(e)?
            .with_inter_threads(1)
            .map_err(e)?
            .with_deterministic_compute(true)
            .map_err(e)?
            .commit_from_file(path)
            .map_err(|e| anyhow::anyhow!("ONNX Runtime cannot load {}: {e}", path.display()))?;
        let inputs = session
            .inputs()
            .iter()
            .map(|i| i.name().to_owned())
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| o.name().to_owned())
            .collect();
        // The shapes a guest may ask for, from tract's analysis of the same
        // file (its weights are dropped once the estimate is built).
        let shapes = super::shapes::ShapeBudget::of_onnx_file(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot analyse the input shapes of {} (needed to bound a compute's memory): {e:#}",
                path.display()
            )
        })?;
        Ok(Arc::new(OrtModel {
            session: Arc::new(Mutex::new(session)),
            inputs,
            outputs,
            shapes,
        }))
    }
}

/// A loaded model. ONNX Runtime sessions run one call at a time here
/// (`run` takes `&mut`); tasks on the same model queue on the lock.
struct OrtModel {
    /// The session (lives as long as the host's registry).
    session: Arc<Mutex<ort::session::Session>>,
    /// Input names in the model's order.
    inputs: Vec<String>,
    /// Output names in the model's order.
    outputs: Vec<String>,
    /// Declared input dimensions and the working-memory estimate.
    shapes: super::shapes::ShapeBudget,
}

impl ModelGraph for OrtModel {
    fn context(&self, env: &TaskEnv) -> Result<Box<dyn BackendExecutionContext>, BackendError> {
        Ok(Box::new(OrtContext {
            session: self.session.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            budget: env.budget,
        }))
    }
    fn shapes(&self) -> Option<&super::shapes::ShapeBudget> {
        Some(&self.shapes)
    }
}

/// One task's execution context.
struct OrtContext {
    session: Arc<Mutex<ort::session::Session>>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    budget: TaskBudget,
}

fn err(msg: String) -> BackendError {
    BackendError::BackendAccess(wasmtime::Error::msg(msg))
}

/// Guest tensor → ONNX Runtime value (little-endian bytes, checked length).
fn to_ort(t: &NamedTensor) -> Result<ort::value::DynValue, BackendError> {
    let name = &t.name;
    let shape: Vec<usize> = t.tensor.dimensions.iter().map(|&d| d as usize).collect();
    fn typed<
        T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
        const N: usize,
    >(
        name: &str,
        shape: Vec<usize>,
        data: &[u8],
        conv: fn([u8; N]) -> T,
    ) -> Result<ort::value::DynValue, BackendError> {
        let n = shape.iter().try_fold(N, |acc, &d| acc.checked_mul(d));
        if n != Some(data.len()) {
            return Err(err(format!(
                "input {name:?}: dimensions {shape:?} of {N}-byte elements do not match the {} bytes given",
                data.len()
            )));
        }
        let values: Vec<T> = data
            .chunks_exact(N)
            .map(|c| conv(c.try_into().unwrap_or([0; N])))
            .collect();
        ort::value::Tensor::from_array((shape, values))
            .map(|t| t.into_dyn())
            .map_err(|e| err(format!("input {name:?}: {e}")))
    }
    let data = &t.tensor.data;
    match t.tensor.ty {
        TensorType::Fp32 => typed(name, shape, data, f32::from_le_bytes),
        TensorType::Fp64 => typed(name, shape, data, f64::from_le_bytes),
        TensorType::I32 => typed(name, shape, data, i32::from_le_bytes),
        TensorType::I64 => typed(name, shape, data, i64::from_le_bytes),
        TensorType::U8 => typed(name, shape, data, u8::from_le_bytes),
        other => Err(BackendError::UnsupportedTensorType(format!(
            "{name}: {other:?} (ONNX Runtime engine)"
        ))),
    }
}

/// ONNX Runtime value → guest tensor.
fn from_ort(
    name: &str,
    v: &ort::value::DynValue,
) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
    fn pack<T: Copy, const N: usize>(
        shape: &ort::value::Shape,
        data: &[T],
        ty: TensorType,
        bytes: fn(T) -> [u8; N],
    ) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
        let dimensions = shape
            .iter()
            .map(|&d| u32::try_from(d).map_err(|_| err(format!("dimension {d} out of range"))))
            .collect::<Result<_, _>>()?;
        // One allocation for the whole tensor (not one per element: a
        // token-level output of MiniLM is ~10^4 elements per call).
        let mut out = Vec::with_capacity(data.len() * N);
        for x in data {
            out.extend_from_slice(&bytes(*x));
        }
        Ok(wasmtime_wasi_nn::Tensor {
            dimensions,
            ty,
            data: out,
        })
    }
    if let Ok((s, d)) = v.try_extract_tensor::<f32>() {
        return pack(s, d, TensorType::Fp32, f32::to_le_bytes);
    }
    if let Ok((s, d)) = v.try_extract_tensor::<i64>() {
        return pack(s, d, TensorType::I64, i64::to_le_bytes);
    }
    if let Ok((s, d)) = v.try_extract_tensor::<i32>() {
        return pack(s, d, TensorType::I32, i32::to_le_bytes);
    }
    if let Ok((s, d)) = v.try_extract_tensor::<f64>() {
        return pack(s, d, TensorType::Fp64, f64::to_le_bytes);
    }
    if let Ok((s, d)) = v.try_extract_tensor::<u8>() {
        return pack(s, d, TensorType::U8, |x| [x]);
    }
    Err(BackendError::UnsupportedTensorType(format!(
        "output {name}: {:?}",
        v.dtype()
    )))
}

impl BackendExecutionContext for OrtContext {
    refuse_witx!();
    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        self.budget.check("compute")?;
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::new();
        for nt in super::order_inputs(&self.inputs, inputs.as_deref())? {
            values.push((nt.name.clone(), to_ort(nt)?));
        }
        let session = self.session.clone();
        let outputs = self.outputs.clone();
        guarded("compute", move || {
            let mut s = session
                .lock()
                .map_err(|_| err("an earlier inference on this model panicked".into()))?;
            let out = s
                .run(values)
                .map_err(|e| err(format!("inference failed: {e}")))?;
            let mut named = Vec::with_capacity(outputs.len());
            for name in &outputs {
                let v = &out[name.as_str()];
                named.push(NamedTensor {
                    name: name.clone(),
                    tensor: from_ort(name, v)?,
                });
            }
            Ok(Some(named))
        })
    }
}
