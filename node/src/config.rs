//! The node's settings: [`NodeConfig`] (what the agent runs with) and
//! [`NodeFile`] (`node.toml`, with documented defaults), and what a node
//! says about its hardware. Reading files only; no network.

use crate::NodeError;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tidepool_proto::{PublicKey, SecretKey};

/// A node's configuration (the `[node]` file of `tidepool node run`).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The pool's address.
    pub pool: SocketAddr,
    /// The pool's key (pinned).
    pub pool_key: PublicKey,
    /// This node's key.
    pub key: SecretKey,
    /// Where blobs, the compiled cache and `versions.json` live.
    pub data_dir: PathBuf,
    /// Tasks run at once.
    pub slots: u32,
    /// Leases held beyond `slots`, waiting, so slots never idle during a
    /// round trip to the pool (`None`: as many as `slots`).
    pub queue: Option<u32>,
    /// Memory per task, MiB (bundles asking for more are not sent here).
    pub memory_mib: u32,
    /// Publishers whose bundles this node runs.
    pub publishers: BTreeSet<PublicKey>,
    /// Whether to fetch models from the pool (otherwise only bundles whose
    /// models are already in the blob directory run here).
    pub fetch_models: bool,
    /// The key of whoever runs this node, told to the pool so re-executions
    /// of its results go to other operators' nodes.
    pub operator: Option<PublicKey>,
    /// Hardware class told to the pool (default: [`hardware_class`]).
    pub hardware: Option<String>,
    /// The engine for `onnx` models.
    pub onnx: tidepool_host::OnnxEngine,
    /// Threads of each llama.cpp (`ggml`) task context: fixed per node, part
    /// of its deterministic settings.
    pub llm_threads: u32,
    /// Generations of `llm`-tier tasks decoded together in one shared
    /// llama.cpp context per model (1: each has a context of its own;
    /// ADR 0020).
    pub llm_batch: u32,
    /// The GPU to serve GPU-tier jobs on (`None`: a CPU-only node).
    pub gpu: Option<tidepool_host::gpu::GpuChoice>,
    /// What one task may hold and spend in wasi-nn (`[sandbox]`).
    pub nn: tidepool_host::NnLimits,
    /// Bytes each disk cache may hold (`[caches]`).
    pub budgets: crate::caches::Budgets,
    /// The optional metrics listener (`[metrics]`).
    pub metrics: Option<MetricsConfig>,
    /// Changes outputs before they are signed. Only for adversarial tests
    /// of the pool's verification (a node that lies); the `tidepool` binary
    /// never sets it.
    pub tamper: Option<Arc<dyn Tamper>>,
}

/// The node's metrics listener (`[metrics]` in `node.toml`): `/metrics`
/// behind a token, `/healthz` and `/readyz` without.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// TCP address (loopback by default).
    pub listen: SocketAddr,
    /// The bearer token `/metrics` needs.
    pub token: String,
    /// Connections served at once.
    pub max_connections: usize,
}

/// An output filter for adversarial tests: the node signs what it returns.
pub trait Tamper: std::fmt::Debug + Send + Sync {
    /// The output to return instead of `output` for the task `lease` with
    /// `input`.
    fn tamper(
        &self,
        lease: tidepool_proto::wire::LeaseId,
        input: &[u8],
        output: Vec<u8>,
    ) -> Vec<u8>;
}

/// This machine's hardware class: architecture, CPU model and core count
/// (`x86_64 AMD EPYC 7B13 ×2`). Re-executions prefer another class.
pub fn hardware_class() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{} {model} ×{cores}", std::env::consts::ARCH)
}

/// The node's configuration file (`tidepool node run --config node.toml`).
///
/// Every field is optional except what identifies the pool; defaults:
///
/// ```toml
/// pool = "127.0.0.1:7070"       # the pool's UDP address (required in practice)
/// pool_key = "ed25519:..."      # the pool's public key (required)
/// key = "node.key"              # this node's key (default: ~/.config/tidepool/node.key,
///                               #   i.e. $XDG_CONFIG_HOME/tidepool; tidepool keygen --role node)
/// data_dir = "node-data"        # blobs/, models/, compiled/, versions.json, status.json
///                               #   (default: ~/.local/share/tidepool/node, i.e. $XDG_DATA_HOME/tidepool/node)
/// slots = 2                     # tasks at once (default: available cores)
/// queue = 2                     # leases held waiting beyond slots (default: = slots)
/// memory_mib = 1024             # memory per task
/// publishers = []               # publishers whose bundles run here (required)
/// fetch_models = true           # fetch models from the pool
/// operator = "ed25519:..."      # who runs this node (optional): checks go to other operators
/// hardware = "..."              # hardware class (default: detected, e.g. "x86_64 <CPU> ×2")
/// onnx_engine = "tract"         # or "onnxruntime" (faster; results differ from tract in the last bits)
/// onnxruntime_lib = "..."       # default: the catalogue's onnxruntime-lib in the models directory
/// onnxruntime_fallback = false  # true: run tract if ONNX Runtime cannot be used; false: refuse to start
/// llm_threads = 1               # threads per llama.cpp context (fixed; default 1)
/// llm_batch = 1                 # generations of llm-tier tasks decoded together in one
///                               #   shared context per model (1..=64; 1 = each task alone).
///                               #   With batching, set llm_threads to the cores text
///                               #   generation may use: the shared context uses them all
///
/// [sandbox]                     # what one task may hold and spend outside its memory
/// max_tensor_mib = 256          # live wasi-nn tensors (made by the job, or returned to it)
/// max_contexts = 16             # live wasi-nn execution contexts
/// max_compute_mib = 4096        # estimated working memory of one compute (every
///                               #   intermediate tensor of the model for the given shapes)
/// max_resources = 16384         # live resources of every kind (tensors, graphs, streams)
///
/// [caches]                      # disk budgets; least recently used files go first,
///                               #   never a file of a bundle with a task in flight
/// blobs_mib = 1024              # fetched components (data_dir/blobs)
/// models_mib = 20480            # fetched models (data_dir/models)
/// compiled_mib = 2048           # compiled components (data_dir/compiled)
///
/// [metrics]                     # optional: Prometheus /metrics, /healthz, /readyz
/// listen = "127.0.0.1:9465"     # off unless set
/// token_file = "..."            # default: data_dir/metrics-token (made once, 0600)
/// max_connections = 8           # connections served at once
///
/// [gpu]                         # optional: serve GPU-tier jobs (docs/gpu-nodes.md)
/// enabled = true
/// device = 0                    # CUDA device index
/// name = "NVIDIA L4"            # default: detected (llama.cpp, else nvidia-smi)
/// memory_mib = 23034            # default: detected
/// onnxruntime_lib = "..."       # default: the catalogue's onnxruntime-gpu-lib
/// fallback = false              # true: run CPU-only if no GPU engine starts; false: refuse to start
/// ```
///
/// Relative paths are relative to the file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Pool address.
    pub pool: Option<SocketAddr>,
    /// Pool key.
    pub pool_key: Option<PublicKey>,
    /// Key file.
    #[serde(default = "node_default_key")]
    pub key: PathBuf,
    /// Data directory.
    #[serde(default = "node_default_data")]
    pub data_dir: PathBuf,
    /// Slots.
    pub slots: Option<u32>,
    /// Leases held waiting beyond the slots (default: as many as slots).
    pub queue: Option<u32>,
    /// Memory per task, MiB.
    #[serde(default = "node_default_memory")]
    pub memory_mib: u32,
    /// Trusted publishers.
    #[serde(default)]
    pub publishers: BTreeSet<PublicKey>,
    /// Fetch models from the pool.
    #[serde(default = "node_default_fetch")]
    pub fetch_models: bool,
    /// Operator key (optional).
    pub operator: Option<PublicKey>,
    /// Hardware class (default: detected).
    pub hardware: Option<String>,
    /// `tract` (default) or `onnxruntime`.
    #[serde(default = "node_default_onnx")]
    pub onnx_engine: String,
    /// The ONNX Runtime library (default: the fetched catalogue file).
    pub onnxruntime_lib: Option<PathBuf>,
    /// Run tract if ONNX Runtime cannot be used (default: refuse to start).
    #[serde(default)]
    pub onnxruntime_fallback: bool,
    /// Threads per llama.cpp task context.
    #[serde(default = "node_default_llm_threads")]
    pub llm_threads: u32,
    /// Generations decoded together per model (`llm`-tier tasks).
    #[serde(default = "node_default_llm_batch")]
    pub llm_batch: u32,
    /// Per-task budgets outside linear memory (`[sandbox]`).
    #[serde(default)]
    pub sandbox: SandboxFile,
    /// Disk budgets (`[caches]`).
    #[serde(default)]
    pub caches: CachesFile,
    /// The metrics listener (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsFile,
    /// The GPU (`[gpu]`), if any.
    #[serde(default)]
    pub gpu: GpuFile,
}

/// `[caches]` in `node.toml`: MiB each disk cache may hold.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachesFile {
    /// Fetched components.
    pub blobs_mib: u64,
    /// Fetched models.
    pub models_mib: u64,
    /// Compiled components.
    pub compiled_mib: u64,
}

impl Default for CachesFile {
    fn default() -> Self {
        let d = crate::caches::Budgets::default();
        Self {
            blobs_mib: d.blobs >> 20,
            models_mib: d.models >> 20,
            compiled_mib: d.compiled >> 20,
        }
    }
}

impl CachesFile {
    /// The budgets, checked (at least 1 MiB each; at most 1 PiB).
    pub fn budgets(&self) -> Result<crate::caches::Budgets, NodeError> {
        for (what, v) in [
            ("blobs_mib", self.blobs_mib),
            ("models_mib", self.models_mib),
            ("compiled_mib", self.compiled_mib),
        ] {
            if !(1..=1 << 30).contains(&v) {
                return Err(NodeError::Config(format!(
                    "[caches] {what} = {v} is outside 1..={}",
                    1u64 << 30
                )));
            }
        }
        Ok(crate::caches::Budgets {
            blobs: self.blobs_mib << 20,
            models: self.models_mib << 20,
            compiled: self.compiled_mib << 20,
        })
    }
}

/// `[metrics]` in `node.toml`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsFile {
    /// Where to listen (off unless set).
    pub listen: Option<SocketAddr>,
    /// The token's file (default: `data_dir/metrics-token`, made once).
    pub token_file: Option<PathBuf>,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for MetricsFile {
    fn default() -> Self {
        Self {
            listen: None,
            token_file: None,
            max_connections: 8,
        }
    }
}

/// `[sandbox]` in `node.toml`: what one task may hold and spend in wasi-nn.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxFile {
    /// Live tensor bytes per task, MiB.
    pub max_tensor_mib: u64,
    /// Live execution contexts per task.
    pub max_contexts: u32,
    /// Estimated working memory of one compute, MiB.
    pub max_compute_mib: u64,
    /// Live resources of every kind per task.
    pub max_resources: usize,
}

impl Default for SandboxFile {
    fn default() -> Self {
        let d = tidepool_host::NnLimits::default();
        Self {
            max_tensor_mib: d.max_tensor_bytes >> 20,
            max_contexts: d.max_contexts,
            max_compute_mib: d.max_compute_bytes >> 20,
            max_resources: d.max_resources,
        }
    }
}

impl SandboxFile {
    /// The limits, checked.
    fn limits(&self) -> Result<tidepool_host::NnLimits, NodeError> {
        let s = self;
        let bad = |what: &str, v: u64, lo: u64, hi: u64| {
            Err(NodeError::Config(format!(
                "[sandbox] {what} = {v} is outside {lo}..={hi}"
            )))
        };
        if !(1..=1 << 20).contains(&s.max_tensor_mib) {
            return bad("max_tensor_mib", s.max_tensor_mib, 1, 1 << 20);
        }
        if !(1..=4096).contains(&s.max_contexts) {
            return bad("max_contexts", s.max_contexts.into(), 1, 4096);
        }
        if !(1..=1 << 24).contains(&s.max_compute_mib) {
            return bad("max_compute_mib", s.max_compute_mib, 1, 1 << 24);
        }
        if !(64..=1 << 20).contains(&s.max_resources) {
            return bad("max_resources", s.max_resources as u64, 64, 1 << 20);
        }
        Ok(tidepool_host::NnLimits {
            max_tensor_bytes: s.max_tensor_mib << 20,
            max_contexts: s.max_contexts,
            max_compute_bytes: s.max_compute_mib << 20,
            max_resources: s.max_resources,
        })
    }
}

/// `[gpu]` in `node.toml`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuFile {
    /// Serve GPU-tier jobs.
    #[serde(default)]
    pub enabled: bool,
    /// CUDA device index.
    #[serde(default)]
    pub device: u32,
    /// The card's model (default: detected).
    pub name: Option<String>,
    /// Its memory, MiB (default: detected).
    pub memory_mib: Option<u32>,
    /// The GPU build of ONNX Runtime (default: the fetched catalogue file).
    pub onnxruntime_lib: Option<PathBuf>,
    /// Run CPU-only if no GPU engine starts (default: refuse to start).
    #[serde(default)]
    pub fallback: bool,
}

/// Where the catalogue file `name` lives once fetched.
fn catalogue_path(name: &str) -> Result<PathBuf, NodeError> {
    let entry =
        tidepool_host::models::catalog_entry(name).map_err(|e| NodeError::Config(e.to_string()))?;
    Ok(tidepool_host::models::path_in(
        &tidepool_host::models::models_dir(),
        entry,
    ))
}

fn node_default_llm_threads() -> u32 {
    tidepool_host::DEFAULT_LLM_THREADS
}

fn node_default_llm_batch() -> u32 {
    1
}

fn node_default_onnx() -> String {
    "tract".into()
}

fn node_default_key() -> PathBuf {
    tidepool_host::models::config_dir().join("node.key")
}
fn node_default_data() -> PathBuf {
    tidepool_host::models::data_dir().join("node")
}
fn node_default_memory() -> u32 {
    1024
}
fn node_default_fetch() -> bool {
    true
}

impl Default for NodeFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty file takes every default")
    }
}

impl NodeFile {
    /// Read a node file; relative paths become relative to its directory.
    pub fn read(path: &std::path::Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        let mut f: NodeFile = toml::from_str(&text)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        f.key = base.join(&f.key);
        f.data_dir = base.join(&f.data_dir);
        f.onnxruntime_lib = f.onnxruntime_lib.map(|p| base.join(p));
        f.gpu.onnxruntime_lib = f.gpu.onnxruntime_lib.map(|p| base.join(p));
        f.metrics.token_file = f.metrics.token_file.map(|p| base.join(p));
        Ok(f)
    }

    /// The agent configuration, with the key already read.
    pub fn into_config(self, key: SecretKey) -> Result<NodeConfig, NodeError> {
        let pool = self
            .pool
            .ok_or_else(|| NodeError::Config("no pool address (`pool` / --pool)".into()))?;
        let pool_key = self
            .pool_key
            .ok_or_else(|| NodeError::Config("no pool key (`pool_key` / --pool-key)".into()))?;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let slots = self.slots.unwrap_or(cores);
        if slots == 0 || slots > 1024 {
            return Err(NodeError::Config(format!(
                "slots = {slots} is outside 1..=1024"
            )));
        }
        if self.llm_threads == 0 || self.llm_threads > 256 {
            return Err(NodeError::Config(format!(
                "llm_threads = {} is outside 1..=256",
                self.llm_threads
            )));
        }
        if self.llm_batch == 0 || self.llm_batch > tidepool_host::MAX_LLM_BATCH {
            return Err(NodeError::Config(format!(
                "llm_batch = {} is outside 1..={}",
                self.llm_batch,
                tidepool_host::MAX_LLM_BATCH
            )));
        }
        if self.memory_mib < 16 {
            return Err(NodeError::Config(format!(
                "memory_mib = {} is below 16",
                self.memory_mib
            )));
        }
        let gpu = if self.gpu.enabled {
            if self.gpu.memory_mib == Some(0) {
                return Err(NodeError::Config("[gpu] memory_mib = 0".into()));
            }
            Some(tidepool_host::gpu::GpuChoice {
                device: self.gpu.device,
                name: self.gpu.name.clone(),
                memory_mib: self.gpu.memory_mib,
                onnxruntime_lib: match &self.gpu.onnxruntime_lib {
                    Some(p) => p.clone(),
                    None => catalogue_path("onnxruntime-gpu-lib")?,
                },
                fallback: self.gpu.fallback,
            })
        } else {
            None
        };
        // One ONNX Runtime per process: on a GPU node the GPU build serves
        // CPU-tier onnx tasks too.
        let cpu_ort_lib = match (&gpu, self.onnxruntime_lib) {
            (Some(g), None) => Some(g.onnxruntime_lib.clone()),
            (Some(g), Some(p)) if p != g.onnxruntime_lib => {
                return Err(NodeError::Config(format!(
                    "onnxruntime_lib = {} but [gpu] onnxruntime_lib = {}: a process loads one ONNX Runtime, and the GPU build runs CPU tasks too (leave onnxruntime_lib out)",
                    p.display(),
                    g.onnxruntime_lib.display()
                )));
            }
            (_, p) => p,
        };
        let metrics = match self.metrics.listen {
            None => None,
            Some(listen) => {
                if !(1..=1024).contains(&self.metrics.max_connections) {
                    return Err(NodeError::Config(format!(
                        "[metrics] max_connections = {} is outside 1..=1024",
                        self.metrics.max_connections
                    )));
                }
                let token = tidepool_net::http::token(
                    self.metrics.token_file.as_deref(),
                    &self.data_dir.join("metrics-token"),
                )
                .map_err(|e| NodeError::Config(format!("[metrics] token_file: {e}")))?;
                Some(MetricsConfig {
                    listen,
                    token,
                    max_connections: self.metrics.max_connections,
                })
            }
        };
        Ok(NodeConfig {
            pool,
            pool_key,
            key,
            data_dir: self.data_dir,
            slots,
            queue: self.queue,
            memory_mib: self.memory_mib,
            publishers: self.publishers,
            fetch_models: self.fetch_models,
            operator: self.operator,
            hardware: self.hardware,
            onnx: match self.onnx_engine.as_str() {
                "tract" => tidepool_host::OnnxEngine::Tract,
                "onnxruntime" => tidepool_host::OnnxEngine::OnnxRuntime {
                    library: match cpu_ort_lib {
                        Some(p) => p,
                        None => catalogue_path("onnxruntime-lib")?,
                    },
                    fallback: self.onnxruntime_fallback,
                },
                other => {
                    return Err(NodeError::Config(format!(
                        "onnx_engine = {other:?} is not \"tract\" or \"onnxruntime\""
                    )))
                }
            },
            llm_threads: self.llm_threads,
            llm_batch: self.llm_batch,
            gpu,
            nn: self.sandbox.limits()?,
            budgets: self.caches.budgets()?,
            metrics,
            tamper: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_defaults_and_required_fields() {
        let d = NodeFile::default();
        assert_eq!(
            (d.memory_mib, d.fetch_models, d.slots, d.queue),
            (1024, true, None, None)
        );
        let key = SecretKey::from_seed(tidepool_proto::KeyRole::Node, &[2; 32]);
        let err = d.clone().into_config(key.clone()).expect_err("no pool");
        assert!(err.to_string().contains("no pool address"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "pool = \"127.0.0.1:7070\"\npool_key = \"{}\"\nslots = 3\nqueue = 0\n",
                key.public()
            ),
        )
        .expect("write");
        let f = NodeFile::read(&path).expect("read");
        assert_eq!(
            (f.key.clone(), f.data_dir.clone()),
            (
                tidepool_host::models::config_dir().join("node.key"),
                tidepool_host::models::data_dir().join("node")
            ),
            "per-user defaults"
        );
        std::fs::write(
            &path,
            format!(
                "pool = \"127.0.0.1:7070\"\npool_key = \"{}\"\nslots = 3\nqueue = 0\ndata_dir = \"here\"\n",
                key.public()
            ),
        )
        .expect("write");
        let f = NodeFile::read(&path).expect("read");
        assert_eq!(f.data_dir, dir.path().join("here"), "relative to the file");
        let cfg = f.into_config(key.clone()).expect("config");
        assert_eq!((cfg.slots, cfg.queue), (3, Some(0)));

        std::fs::write(&path, "slots = \"many\"\n").expect("write");
        let err = NodeFile::read(&path).expect_err("bad type").to_string();
        assert!(err.contains("node.toml") && err.contains("slots"), "{err}");

        // The onnx engine: tract by default, ONNX Runtime with the
        // catalogue's library unless told otherwise, anything else refused.
        let pool = "pool = \"127.0.0.1:7070\"\npool_key = \"ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n";
        let with = |extra: &str| {
            std::fs::write(&path, format!("{pool}{extra}")).expect("write");
            NodeFile::read(&path)
                .expect("read")
                .into_config(key.clone())
        };
        assert_eq!(
            with("").expect("config").onnx,
            tidepool_host::OnnxEngine::Tract
        );
        match with("onnx_engine = \"onnxruntime\"\n")
            .expect("config")
            .onnx
        {
            tidepool_host::OnnxEngine::OnnxRuntime { library, fallback } => {
                assert!(library.ends_with("libonnxruntime.so.1.31.1"), "{library:?}");
                assert!(!fallback);
            }
            other => panic!("{other:?}"),
        }
        let err = with("onnx_engine = \"tensorrt\"\n").expect_err("unknown engine");
        assert!(err.to_string().contains("\"tensorrt\" is not"), "{err}");

        // Text generation: alone by default; a batch of 1..=64.
        let c = with("").expect("config");
        assert_eq!((c.llm_threads, c.llm_batch), (1, 1));
        let c = with("llm_threads = 2\nllm_batch = 8\n").expect("config");
        assert_eq!((c.llm_threads, c.llm_batch), (2, 8));
        for bad in ["llm_batch = 0\n", "llm_batch = 65\n"] {
            let err = with(bad).expect_err("batch out of range").to_string();
            assert!(err.contains("llm_batch") && err.contains("1..=64"), "{err}");
        }

        // [sandbox]: documented defaults, settings in MiB, nonsense refused.
        assert_eq!(
            with("").expect("config").nn,
            tidepool_host::NnLimits::default()
        );
        let nn = with("[sandbox]\nmax_tensor_mib = 64\nmax_contexts = 2\n")
            .expect("config")
            .nn;
        assert_eq!((nn.max_tensor_bytes, nn.max_contexts), (64 << 20, 2));
        let err = with("[sandbox]\nmax_contexts = 0\n").expect_err("zero contexts");
        assert!(
            err.to_string().contains("[sandbox] max_contexts = 0"),
            "{err}"
        );
        let err = NodeFile::read(&{
            std::fs::write(&path, format!("{pool}[sandbox]\nmax_tensors = 1\n")).expect("write");
            path.clone()
        })
        .expect_err("unknown setting");
        assert!(err.to_string().contains("max_tensors"), "{err}");
    }
}
