//! The sandbox: a wasmtime engine configured for untrusted jobs that must be
//! re-executable, and the per-task runner.
//!
//! One [`Sandbox`] lives as long as the node (or the `tidepool run` call). It
//! owns the engine (Cranelift, NaN canonicalisation, deterministic relaxed
//! SIMD, no threads, epoch interruption, optional fuel, pooling allocator),
//! the linker (WASI p2 without files, sockets or environment; wasi-nn over the
//! host's model registry; Tidepool's `host` interface), the on-disk cache of
//! compiled components, and a thread that advances the epoch.
//!
//! [`Sandbox::load`] turns component bytes into a [`JobComponent`] (compiled
//! once, type-checked against the `tidepool:job` world, pre-instantiated);
//! [`Sandbox::run`] runs one task in a fresh store and instance and returns
//! the output with its receipt, or a [`TaskError`] that says which limit ended
//! it. A failed task never affects the next one.
//!
//! It never decides what to run or where results go: that is the node agent's
//! and the pool's business.

use crate::backend::budget::{BudgetHit, NnLimits, NnUsage};
use crate::backend::{LlmTask, RefuseGuestBytes, TaskBudget, TaskEnv};
use crate::cache::ComponentCache;
use crate::determinism::{SeededRng, VirtualMonotonicClock, VirtualWallClock};
use crate::registry::ModelRegistry;
use crate::task_threads::Lost;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidepool_proto::receipt::Metering;
use tidepool_proto::{Digest, ModelUse, Receipt};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable, ResourceType};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_nn::wit::{GraphEncoding, WasiNnCtx, WasiNnView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "tidepool:job/job-core",
    });
}

use bindings::tidepool::job::host::Level;
pub use bindings::tidepool::job::types::ErrorCode as JobErrorCode;

/// How often the epoch advances; deadlines are rounded up to this.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits and modes for every task this sandbox runs.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Largest linear memory a task may grow to, bytes.
    pub max_memory_bytes: usize,
    /// Wall-clock bound per task (epoch deadline in wasm, budget checks in
    /// backends before every inference step).
    pub timeout: Duration,
    /// Largest output a task may return, bytes.
    pub max_output_bytes: usize,
    /// Wasm stack limit, bytes.
    pub max_stack_bytes: usize,
    /// Fuel per task, if fuel metering is on (deterministic accounting; costs ~10-30% speed).
    pub fuel: Option<u64>,
    /// Virtual clocks and seeded randomness (what nodes use).
    pub deterministic: bool,
    /// How many tasks may run at once (sizes the instance pool).
    pub max_concurrent: u32,
    /// Where compiled components are cached (`None`: no disk cache).
    pub cache_dir: Option<PathBuf>,
    /// Bytes of stdout+stderr kept per task (the rest is dropped).
    pub max_stdio_bytes: usize,
    /// Log lines a task may write through `host.log`.
    pub max_log_lines: u32,
    /// What a task may hold and spend in wasi-nn (tensor bytes, contexts,
    /// working memory per compute, resources).
    pub nn: NnLimits,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            max_memory_bytes: 512 << 20,
            timeout: Duration::from_secs(60),
            max_output_bytes: 16 << 20,
            max_stack_bytes: 1 << 20,
            fuel: None,
            deterministic: true,
            max_concurrent: 4,
            cache_dir: Some(crate::models::home_dir().join("compiled")),
            max_stdio_bytes: 64 << 10,
            max_log_lines: 1000,
            nn: NnLimits::default(),
        }
    }
}

/// Why a component cannot be used as a job.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a WebAssembly component (a core module, or garbage).
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    /// A component, but not of the `tidepool:job/job` world.
    #[error("component is not a tidepool:job job: {0}")]
    WrongWorld(String),
    /// The engine or the cache failed.
    #[error("cannot prepare component: {0:#}")]
    Engine(anyhow::Error),
    /// The bytes given are not the component the caller named.
    #[error("component bytes have digest {actual}, not the {expected} they were given as")]
    DigestMismatch {
        /// The digest the caller named.
        expected: Digest,
        /// The digest of the bytes.
        actual: Digest,
    },
}

/// Why a task ended without a result from the job.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The node stopped it (its lease was cancelled or lost).
    #[error("task cancelled")]
    Cancelled,
    /// The wall-clock bound passed.
    #[error("task exceeded its time limit of {limit:?}")]
    Deadline {
        /// The limit.
        limit: Duration,
    },
    /// Linear memory would have grown past the limit.
    #[error("task exceeded its memory limit of {limit} bytes")]
    Memory {
        /// The limit.
        limit: usize,
    },
    /// Fuel ran out.
    #[error("task ran out of fuel ({limit} units)")]
    Fuel {
        /// The fuel it had.
        limit: u64,
    },
    /// The output is larger than allowed.
    #[error("task output of {size} bytes exceeds the limit of {limit} bytes")]
    OutputTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The guest trapped (a panic, `unreachable`, out-of-bounds access...).
    #[error("task trapped: {0}")]
    Trap(String),
    /// A wasi-nn budget (tensor bytes, execution contexts, working memory
    /// of a compute) or the task's resource table was exhausted.
    #[error("task exceeded its budget: {0}")]
    Budget(String),
    /// The sandbox itself failed (instantiation, resources).
    #[error("sandbox error: {0:#}")]
    Host(anyhow::Error),
}

/// A job error, as the guest returned it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobFailure {
    /// `invalid-input`, `model` or `internal`.
    pub code: String,
    /// The job's message.
    pub message: String,
}

/// What one task produced.
#[derive(Debug, Clone)]
pub struct TaskOutput {
    /// The output bytes, or the job's own error.
    pub result: Result<Vec<u8>, JobFailure>,
    /// The receipt (digests, metering, models).
    pub receipt: Receipt,
    /// What the task wrote to stdout/stderr (bounded; for diagnosis only).
    pub stdio: Vec<u8>,
    /// The task's text generations (the receipt commits to their digest).
    pub transcript: tidepool_proto::llm::Transcript,
    /// For a replaying task: what each replayed generation found.
    pub replay: Vec<crate::backend::ReplayReport>,
}

/// A task to run.
#[derive(Debug, Clone, Copy)]
pub struct TaskSpec<'a> {
    /// Its id (seeds randomness in deterministic mode).
    pub id: &'a str,
    /// The job's parameters (sorted by key when handed to the guest).
    pub params: &'a BTreeMap<String, String>,
    /// The input bytes.
    pub input: &'a [u8],
    /// For a check of an `llm`-tier result: the producer's generations, to
    /// be replayed by a teacher-forced pass instead of generated (ADR 0008).
    pub replay: Option<&'a [tidepool_proto::llm::Generation]>,
    /// How close a replayed token must be (the manifest's `llm` policy).
    pub accept: tidepool_proto::llm::AcceptPolicy,
    /// Whether its text generations may share a batch with other tasks'
    /// (`llm`-tier jobs only: their check tolerates the last-bit differences
    /// batching causes; ADR 0020).
    pub shared_batches: bool,
}

impl<'a> TaskSpec<'a> {
    /// A task that generates on its own (no replay, default policy).
    pub fn new(id: &'a str, params: &'a BTreeMap<String, String>, input: &'a [u8]) -> Self {
        Self {
            id,
            params,
            input,
            replay: None,
            accept: tidepool_proto::llm::AcceptPolicy::default(),
            shared_batches: false,
        }
    }
}

/// A component ready to run tasks: compiled, checked and pre-instantiated.
#[derive(Clone)]
pub struct JobComponent {
    /// Digest of the component's bytes (in every receipt).
    digest: Digest,
    /// Imports resolved and exports type-checked once, reused by every task.
    pre: bindings::JobCorePre<TaskState>,
    /// Whether the compiled code came from the disk cache.
    from_cache: bool,
}

impl std::fmt::Debug for JobComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobComponent")
            .field("digest", &self.digest)
            .finish()
    }
}

impl JobComponent {
    /// Digest of the component's bytes.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Whether the compiled code came from the disk cache (no compilation).
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
}

/// A task's store with what is read back after the call: its stdio, the
/// model names it loaded, its generation record.
type NewStore = (
    Store<TaskState>,
    MemoryOutputPipe,
    Arc<Mutex<Vec<String>>>,
    Arc<LlmTask>,
);

/// Per-task host state (lives exactly as long as the task's store).
struct TaskState {
    /// WASI p2 context: no dirs, no env, no sockets; virtual time and seeded
    /// random in deterministic mode.
    wasi: WasiCtx,
    /// Resources handed to the guest (streams, tensors, graphs).
    table: ResourceTable,
    /// wasi-nn: the task's view of the host's models.
    nn: WasiNnCtx,
    /// Memory limit and whether the guest hit it.
    limiter: TaskLimiter,
    /// The task's id, for `host.task-id` and log attribution.
    task_id: String,
    /// The task's parameters, sorted.
    params: Vec<(String, String)>,
    /// Log lines left before further lines are dropped.
    log_budget: u32,
    /// What the task holds in wasi-nn (shared with its execution contexts).
    nn_usage: Arc<NnUsage>,
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::tidepool::job::types::Host for TaskState {}

impl bindings::tidepool::job::host::Host for TaskState {
    fn log(&mut self, level: Level, message: String) {
        if self.log_budget == 0 {
            return;
        }
        self.log_budget -= 1;
        // A guest's line may not forge a node log line or drive a terminal.
        let message = crate::guest_text::escape(&message, 4096);
        let task = self.task_id.as_str();
        match level {
            Level::Trace => tracing::trace!(target: "tidepool::job", task, "{message}"),
            Level::Debug => tracing::debug!(target: "tidepool::job", task, "{message}"),
            Level::Info => tracing::info!(target: "tidepool::job", task, "{message}"),
            Level::Warn => tracing::warn!(target: "tidepool::job", task, "{message}"),
            Level::Error => tracing::error!(target: "tidepool::job", task, "{message}"),
        }
        if self.log_budget == 0 {
            tracing::warn!(target: "tidepool::job", task, "log limit reached; further lines from this task are dropped");
        }
    }
    fn task_id(&mut self) -> String {
        self.task_id.clone()
    }
    fn params(&mut self) -> Vec<(String, String)> {
        self.params.clone()
    }
}

/// Memory limit that remembers whether it refused a growth.
struct TaskLimiter {
    /// Bytes a memory may grow to.
    max_memory: usize,
    /// Set when a growth past the limit was refused.
    hit: bool,
}

impl wasmtime::ResourceLimiter for TaskLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.hit = true;
            // Trap at once rather than let the guest's allocator limp on.
            wasmtime::bail!(
                "memory limit of {} bytes reached (wanted {desired})",
                self.max_memory
            );
        }
        Ok(true)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The sandbox (see the module docs).
pub struct Sandbox {
    /// Host functions, shared by all components.
    linker: Linker<TaskState>,
    /// What running a task needs; shared with the thread each task runs on
    /// (a task let go at its deadline holds it until it ends).
    tasks: Arc<Tasks>,
    /// Compiled components on disk.
    cache: Option<ComponentCache>,
}

/// What running a task needs, apart from its component (lives as long as
/// the sandbox, or as the last task let go at its deadline).
struct Tasks {
    /// The engine every component is compiled for and tasks' stores
    /// belong to.
    engine: Engine,
    /// The host's verified, loaded models.
    models: ModelRegistry,
    /// Limits and modes.
    config: SandboxConfig,
    /// Runtime identification for receipts.
    runtime: String,
}

/// A task's spec, owned, to travel to the thread it runs on.
struct OwnedTask {
    id: String,
    params: BTreeMap<String, String>,
    input: Vec<u8>,
    replay: Option<Vec<tidepool_proto::llm::Generation>>,
    accept: tidepool_proto::llm::AcceptPolicy,
    shared_batches: bool,
}

impl OwnedTask {
    fn of(task: &TaskSpec<'_>) -> Self {
        Self {
            id: task.id.to_owned(),
            params: task.params.clone(),
            input: task.input.to_vec(),
            replay: task.replay.map(<[_]>::to_vec),
            accept: task.accept,
            shared_batches: task.shared_batches,
        }
    }
    fn spec(&self) -> TaskSpec<'_> {
        TaskSpec {
            id: &self.id,
            params: &self.params,
            input: &self.input,
            replay: self.replay.as_deref(),
            accept: self.accept,
            shared_batches: self.shared_batches,
        }
    }
}

/// How long past a task's deadline its caller waits for the task to answer
/// itself (guest code traps within an epoch tick of the deadline) before
/// letting it go.
const ANSWER_GRACE: Duration = Duration::from_millis(25);

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("config", &self.tasks.config)
            .finish()
    }
}

/// The engine configuration every node uses for jobs. Exposed so that
/// benchmarks and tests measure exactly what nodes run.
pub fn engine_config(config: &SandboxConfig) -> Config {
    let mut c = Config::new();
    c.strategy(wasmtime::Strategy::Cranelift);
    c.cranelift_opt_level(wasmtime::OptLevel::Speed);
    c.cranelift_nan_canonicalization(true);
    c.relaxed_simd_deterministic(true);
    // No wasm threads: the `threads` cargo feature of wasmtime is not built,
    // so shared memories and atomics-based waiting fail validation.
    c.wasm_component_model(true);
    c.epoch_interruption(true);
    c.consume_fuel(config.fuel.is_some());
    c.max_wasm_stack(config.max_stack_bytes);
    c.memory_init_cow(true);
    let slots = config.max_concurrent.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        .total_core_instances(slots * 16)
        .max_core_instances_per_component(16)
        .total_memories(slots * 2)
        .max_memories_per_component(2)
        .max_memories_per_module(1)
        .total_tables(slots * 8)
        .max_tables_per_component(8)
        .total_stacks(slots)
        .max_memory_size(config.max_memory_bytes)
        .max_unused_warm_slots(slots);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c
}

impl Sandbox {
    /// Build a sandbox over these models.
    pub fn new(config: SandboxConfig, models: ModelRegistry) -> anyhow::Result<Self> {
        let engine = Engine::new(&engine_config(&config))?;
        let mut linker: Linker<TaskState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut TaskState| {
            WasiNnView::new(&mut s.table, &mut s.nn)
        })?;
        add_tensor_budget(&mut linker)?;
        bindings::JobCore::add_to_linker::<_, HasSelf<TaskState>>(&mut linker, |s| s)?;
        let cache = config.cache_dir.as_ref().and_then(|d| {
            ComponentCache::open(d.clone(), &engine)
                .map_err(|e| tracing::warn!("{e}; compiling without a cache"))
                .ok()
        });
        {
            // Ticks as long as the engine lives: past the sandbox, while a
            // task let go at its deadline still runs (its wasm must trap).
            let engine = engine.weak();
            std::thread::Builder::new()
                .name("tidepool-epoch".into())
                .spawn(move || loop {
                    std::thread::sleep(EPOCH_TICK);
                    match engine.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                })?;
        }
        let runtime = format!("tidepool {}, wasmtime 48.0.8", env!("CARGO_PKG_VERSION"));
        Ok(Self {
            tasks: Arc::new(Tasks {
                engine,
                models,
                config,
                runtime,
            }),
            linker,
            cache,
        })
    }

    /// The engine (for benchmarks and tools that need to compile the same way).
    pub fn engine(&self) -> &Engine {
        &self.tasks.engine
    }

    /// The sandbox's limits.
    pub fn config(&self) -> &SandboxConfig {
        &self.tasks.config
    }

    /// The host's models.
    pub fn models(&self) -> &ModelRegistry {
        &self.tasks.models
    }

    /// Compile (or fetch from the cache), type-check and pre-instantiate.
    pub fn load(&self, bytes: &[u8]) -> Result<JobComponent, LoadError> {
        let digest = Digest::of(bytes);
        match self.cached(digest)? {
            Some(job) => Ok(job),
            None => self.compile_and_cache(digest, bytes),
        }
    }

    /// [`load`](Self::load) for a component whose digest the caller already
    /// knows (a node: from the signed manifest, with the file checked
    /// against it). A cache hit needs neither the bytes nor their hash (for
    /// the embed job, the hash alone is more than half of a cold start from
    /// the cache); on a miss, `bytes` are hashed first and refused with
    /// [`LoadError::DigestMismatch`] unless they are what `digest` names, so
    /// the cache never holds code under another component's digest.
    pub fn load_known(&self, digest: Digest, bytes: &[u8]) -> Result<JobComponent, LoadError> {
        if let Some(job) = self.cached(digest)? {
            return Ok(job);
        }
        let actual = Digest::of(bytes);
        if actual != digest {
            return Err(LoadError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        self.compile_and_cache(digest, bytes)
    }

    /// The cached compiled code of `digest`, prepared; `None` on a miss.
    fn cached(&self, digest: Digest) -> Result<Option<JobComponent>, LoadError> {
        let Some(c) = self.cache.as_ref().and_then(|c| c.get(&digest)) else {
            return Ok(None);
        };
        Ok(Some(JobComponent {
            digest,
            pre: self.prepare(&c)?,
            from_cache: true,
        }))
    }

    /// Compile `bytes` (whose digest is `digest`) and store the result.
    fn compile_and_cache(&self, digest: Digest, bytes: &[u8]) -> Result<JobComponent, LoadError> {
        let (job, component) = self.compile(bytes, digest)?;
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.put(&digest, &component) {
                tracing::warn!(error = %e, "cannot write compiled component to the cache");
            }
        }
        Ok(job)
    }

    /// Compile without the cache (for the cold-start benchmark).
    pub fn compile_uncached(&self, bytes: &[u8]) -> Result<JobComponent, LoadError> {
        self.compile(bytes, Digest::of(bytes)).map(|(job, _)| job)
    }

    /// Check, compile with Cranelift and type-check against the job world.
    fn compile(
        &self,
        bytes: &[u8],
        digest: Digest,
    ) -> Result<(JobComponent, Component), LoadError> {
        check_is_component(bytes)?;
        let c = Component::new(&self.tasks.engine, bytes)
            .map_err(|e| LoadError::NotAComponent(format!("{e:#}")))?;
        let pre = self.prepare(&c)?;
        Ok((
            JobComponent {
                digest,
                pre,
                from_cache: false,
            },
            c,
        ))
    }

    fn prepare(&self, c: &Component) -> Result<bindings::JobCorePre<TaskState>, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(c)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        bindings::JobCorePre::new(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))
    }

    /// Run one task in a fresh instance.
    pub fn run(&self, job: &JobComponent, task: TaskSpec<'_>) -> Result<TaskOutput, TaskError> {
        self.run_cancellable(job, task, None)
    }

    /// [`run`](Self::run), stopped with [`TaskError::Cancelled`] within an
    /// epoch tick ([`EPOCH_TICK`]) of `cancel` being set while guest code
    /// runs (a wasi-nn compute in progress finishes first, as at the
    /// deadline).
    ///
    /// The task runs on a task thread ([`crate::task_threads`]); this call
    /// returns by the deadline (and [`ANSWER_GRACE`]) even when the task is
    /// inside an engine call then, which finishes on its own.
    pub fn run_cancellable(
        &self,
        job: &JobComponent,
        task: TaskSpec<'_>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<TaskOutput, TaskError> {
        self.run_holding(job, task, cancel, ())
    }

    /// [`run_cancellable`](Self::run_cancellable), holding `hold` until the
    /// task's thread is done with the task: at once for a task that
    /// answers, later for one let go inside an engine call at its deadline.
    /// A node holds its slot's permit so: a guest whose engine call runs on
    /// past the deadline keeps its slot busy until the call returns, and the
    /// node never has more tasks computing than it has slots.
    pub fn run_holding(
        &self,
        job: &JobComponent,
        task: TaskSpec<'_>,
        cancel: Option<Arc<AtomicBool>>,
        hold: impl Send + 'static,
    ) -> Result<TaskOutput, TaskError> {
        let start = Instant::now();
        let owned = OwnedTask::of(&task);
        let tasks = self.tasks.clone();
        let job = job.clone();
        let flag = cancel.clone();
        let limit = self.tasks.config.timeout;
        // The task's log lines belong to its caller's span, as if run here.
        let span = tracing::Span::current();
        let answered = crate::task_threads::run_until(start + limit + ANSWER_GRACE, move || {
            let _in_span = span.enter();
            let out = tasks.run_here(&job, owned.spec(), flag, start);
            drop(hold);
            out
        });
        match answered {
            Ok(out) => out,
            Err(Lost::LetGo) if cancel.is_some_and(|f| f.load(Ordering::Relaxed)) => {
                Err(TaskError::Cancelled)
            }
            Err(Lost::LetGo) => Err(TaskError::Deadline { limit }),
            Err(Lost::Failed(why)) => Err(TaskError::Host(anyhow::anyhow!(why))),
        }
    }

    /// Benchmark baseline: instantiate once, then call `run` `calls` times on
    /// that same instance (what a runtime without per-task isolation does).
    /// Returns the outputs; never used for real tasks.
    #[doc(hidden)]
    pub fn call_reused_instance(
        &self,
        job: &JobComponent,
        task: TaskSpec<'_>,
        calls: usize,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        self.tasks.call_reused_instance(job, task, calls)
    }
}

impl Tasks {
    fn new_store(&self, task: &TaskSpec<'_>, budget: TaskBudget) -> NewStore {
        let stdio = MemoryOutputPipe::new(self.config.max_stdio_bytes);
        let mut b = WasiCtxBuilder::new();
        b.stdout(stdio.clone())
            .stderr(stdio.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if self.config.deterministic {
            let mut seed = SeededRng::new(task.id, "wasi:random/insecure-seed");
            b.secure_random(SeededRng::new(task.id, "wasi:random/random"))
                .insecure_random(SeededRng::new(task.id, "wasi:random/insecure"))
                .insecure_random_seed(seed.next_u128())
                .wall_clock(VirtualWallClock::default())
                .monotonic_clock(VirtualMonotonicClock::default());
        }
        let llm = Arc::new(
            LlmTask::replaying(task.replay.map(<[_]>::to_vec), task.accept)
                .sharing_batches(task.shared_batches),
        );
        let nn_usage = Arc::new(NnUsage::new(self.config.nn));
        let env = TaskEnv {
            budget,
            llm: llm.clone(),
            nn: nn_usage.clone(),
        };
        let (registry, used) = self.models.for_task(&env);
        let refusals = [
            GraphEncoding::Onnx,
            GraphEncoding::Ggml,
            GraphEncoding::Openvino,
            GraphEncoding::Pytorch,
            GraphEncoding::Tensorflow,
            GraphEncoding::Tensorflowlite,
            GraphEncoding::Autodetect,
        ]
        .into_iter()
        .map(|e| wasmtime_wasi_nn::Backend::from(RefuseGuestBytes(e)));
        let mut table = ResourceTable::new();
        table.set_max_capacity(self.config.nn.max_resources);
        let state = TaskState {
            wasi: b.build(),
            table,
            nn: WasiNnCtx::new(refusals, registry.into()),
            limiter: TaskLimiter {
                max_memory: self.config.max_memory_bytes,
                hit: false,
            },
            task_id: task.id.to_owned(),
            params: task
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            log_budget: self.config.max_log_lines,
            nn_usage,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        (store, stdio, used, llm)
    }

    /// Run one task here, on this thread, from `start`.
    fn run_here(
        &self,
        job: &JobComponent,
        task: TaskSpec<'_>,
        cancel: Option<Arc<AtomicBool>>,
        start: Instant,
    ) -> Result<TaskOutput, TaskError> {
        let budget = TaskBudget {
            deadline: start + self.config.timeout,
        };
        let (mut store, stdio, used, llm) = self.new_store(&task, budget);
        let ticks = self
            .config
            .timeout
            .as_nanos()
            .div_ceil(EPOCH_TICK.as_nanos()) as u64
            + 1;
        match cancel.clone() {
            None => {
                store.set_epoch_deadline(ticks);
                store.epoch_deadline_trap();
            }
            Some(flag) => {
                // Look at the flag every tick; trap at the deadline as above.
                let mut left = ticks;
                store.set_epoch_deadline(1);
                store.epoch_deadline_callback(move |_| {
                    left = left.saturating_sub(1);
                    if flag.load(Ordering::Relaxed) || left == 0 {
                        return Err(Trap::Interrupt.into());
                    }
                    Ok(wasmtime::UpdateDeadline::Continue(1))
                });
            }
        }
        if let Some(fuel) = self.config.fuel {
            store
                .set_fuel(fuel)
                .map_err(|e| TaskError::Host(e.into()))?;
        }
        let outcome = job
            .pre
            .instantiate(&mut store)
            .and_then(|inst| inst.call_run(&mut store, task.input));
        let wall = start.elapsed();
        let fuel_used = self.config.fuel.map(|f| f - store.get_fuel().unwrap_or(0));
        if cancel.is_some_and(|f| f.load(Ordering::Relaxed)) {
            // Stopped on purpose: whatever it returned is not a result.
            return Err(TaskError::Cancelled);
        }
        if let Some(hit) = store.data().nn_usage.budget_hit() {
            // Over budget, whatever the guest made of the error it was given.
            return Err(TaskError::Budget(hit.to_string()));
        }
        if wall >= self.config.timeout {
            // Over time, whatever the guest returned (a backend refuses work
            // past the deadline, and the guest may have reported that as an error).
            return Err(TaskError::Deadline {
                limit: self.config.timeout,
            });
        }
        let result = match outcome {
            Ok(Ok(out)) => {
                if out.len() > self.config.max_output_bytes {
                    return Err(TaskError::OutputTooLarge {
                        size: out.len(),
                        limit: self.config.max_output_bytes,
                    });
                }
                Ok(out)
            }
            Ok(Err(e)) => Err(JobFailure {
                code: e.code.name().to_owned(),
                message: e.message,
            }),
            Err(e) => return Err(self.classify(e, &store, wall)),
        };
        // The receipt commits to the output, or to the job's error as JSON.
        let error_json;
        let (bytes_for_digest, ok): (&[u8], bool) = match &result {
            Ok(out) => (out, true),
            Err(f) => {
                error_json = tidepool_proto::receipt::job_error_json(&f.code, &f.message);
                (&error_json, false)
            }
        };
        let models = used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|n| self.models.get(n))
            .map(|m| {
                (
                    m.name.clone(),
                    ModelUse {
                        sha256: m.sha256,
                        engine: m.engine.clone(),
                    },
                )
            })
            .collect();
        let transcript = llm.transcript();
        let metering = Metering {
            bytes_in: task.input.len() as u64,
            bytes_out: bytes_for_digest.len() as u64,
            ..store.data().nn_usage.metered()
        };
        let receipt = Receipt {
            task_id: task.id.to_owned(),
            component: job.digest,
            input: Digest::of(task.input),
            output: Digest::of(bytes_for_digest),
            ok,
            output_len: bytes_for_digest.len() as u64,
            wall_time_us: wall.as_micros() as u64,
            fuel: fuel_used,
            deterministic: self.config.deterministic,
            models,
            runtime: self.runtime.clone(),
            transcript: (!transcript.is_empty())
                .then(|| tidepool_proto::llm::transcript_digest(&transcript)),
            metering,
        };
        Ok(TaskOutput {
            result,
            receipt,
            stdio: stdio.contents().to_vec(),
            transcript,
            replay: llm.reports(),
        })
    }

    /// See [`Sandbox::call_reused_instance`].
    fn call_reused_instance(
        &self,
        job: &JobComponent,
        task: TaskSpec<'_>,
        calls: usize,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        let budget = TaskBudget {
            deadline: Instant::now() + self.config.timeout,
        };
        let (mut store, _stdio, _used, _llm) = self.new_store(&task, budget);
        store.set_epoch_deadline(u64::MAX / 2);
        let inst = job.pre.instantiate(&mut store)?;
        (0..calls)
            .map(|_| {
                inst.call_run(&mut store, task.input)?
                    .map_err(|e| anyhow::anyhow!("job error: {}", e.message))
            })
            .collect()
    }

    fn classify(&self, e: wasmtime::Error, store: &Store<TaskState>, wall: Duration) -> TaskError {
        if store.data().limiter.hit {
            return TaskError::Memory {
                limit: self.config.max_memory_bytes,
            };
        }
        if let Some(hit) = store.data().nn_usage.budget_hit() {
            return TaskError::Budget(hit.to_string());
        }
        if let Some(wasmtime::component::ResourceTableError::Full) =
            e.downcast_ref::<wasmtime::component::ResourceTableError>()
        {
            return TaskError::Budget(format!(
                "more than {} live resources (tensors, graphs, contexts, streams)",
                self.config.nn.max_resources
            ));
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => TaskError::Deadline {
                limit: self.config.timeout,
            },
            Some(Trap::OutOfFuel) => TaskError::Fuel {
                limit: self.config.fuel.unwrap_or(0),
            },
            _ if wall >= self.config.timeout => TaskError::Deadline {
                limit: self.config.timeout,
            },
            _ => TaskError::Trap(format!("{e:?}")),
        }
    }
}

/// The wasi-nn interface that holds tensors (the vendored WIT's version).
const WASI_NN_TENSOR: &str = "wasi:nn/tensor@0.2.0-rc-2024-10-28";

/// Replace wasmtime-wasi-nn's tensor constructor and destructor with ones
/// that count the task's tensor bytes: a guest creating tensors in a loop
/// copies its memory into the host's each time, and nothing else bounds that.
/// The constructor has no error to return, so a tensor over the budget traps
/// (and the task ends with [`TaskError::Budget`]).
fn add_tensor_budget(linker: &mut Linker<TaskState>) -> anyhow::Result<()> {
    use wasmtime_wasi_nn::wit::TensorType;
    use wasmtime_wasi_nn::Tensor;
    linker.allow_shadowing(true);
    let mut inst = linker.instance(WASI_NN_TENSOR)?;
    inst.resource("tensor", ResourceType::host::<Tensor>(), |mut cx, rep| {
        let state = cx.data_mut();
        let t = state.table.delete(Resource::<Tensor>::new_own(rep))?;
        state.nn_usage.tensor_dropped(t.data.len() as u64);
        Ok(())
    })?;
    inst.func_wrap(
        "[constructor]tensor",
        |mut cx, (dimensions, ty, data): (Vec<u32>, TensorType, Vec<u8>)| {
            let state = cx.data_mut();
            if let Err(hit) = state.nn_usage.tensor_created(data.len() as u64) {
                return Err(budget_trap(hit));
            }
            let bytes = data.len() as u64;
            match state.table.push(Tensor {
                dimensions,
                ty,
                data,
            }) {
                Ok(r) => Ok((r,)),
                Err(e) => {
                    state.nn_usage.tensor_dropped(bytes);
                    Err(e.into())
                }
            }
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn budget_trap(hit: BudgetHit) -> wasmtime::Error {
    wasmtime::Error::msg(hit.to_string())
}

/// Refuse core modules and garbage with a message that says which.
fn check_is_component(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        return Err(LoadError::NotAComponent(
            "the file does not start with the WebAssembly magic bytes".into(),
        ));
    }
    // Bytes 4..8: version + layer. Core modules are layer 0; components are layer 1.
    if bytes[6] == 0 && bytes[7] == 0 {
        return Err(LoadError::NotAComponent(
            "this is a core WebAssembly module; build the job as a component (`cargo xtask build-jobs` does)".into(),
        ));
    }
    Ok(())
}

impl JobErrorCode {
    /// The WIT name of the code.
    pub fn name(&self) -> &'static str {
        match self {
            JobErrorCode::InvalidInput => "invalid-input",
            JobErrorCode::Model => "model",
            JobErrorCode::Internal => "internal",
        }
    }
}
