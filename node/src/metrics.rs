//! The node's optional metrics listener (`[metrics]` in `node.toml`):
//! `/metrics` in the Prometheus text format behind a token, `/healthz`
//! (the agent's loop ran lately) and `/readyz` (connected to the pool)
//! without. It reads the agent's counters and never changes anything; the
//! listener's bounds (connections, head bytes and time) are
//! `tidepool_net::http`'s.

use crate::agent::Ctx;
use crate::caches::CacheKind;
use crate::config::MetricsConfig;
use hyper::StatusCode;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidepool_host::sandbox::TaskError;
use tidepool_net::http::prometheus::{escape, family, histogram, single, CONTENT_TYPE};
use tidepool_net::http::{answer, Answer, Routes};

/// Upper bounds of the task-time histogram, seconds.
const TASK_SECONDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long the loop may not have run before `/healthz` says so.
pub const LOOP_STALL: Duration = Duration::from_secs(10);

/// Figures only `/metrics` shows (the rest are the state's tallies).
/// Lives as long as the agent.
#[derive(Debug)]
pub(crate) struct Telemetry {
    /// Bundles loaded into a sandbox (again after an eviction too).
    bundle_loads: AtomicU64,
    /// Connected to the pool now.
    connected: AtomicBool,
    /// Wall time of each task run (from grant to its result), counts per
    /// bucket of [`TASK_SECONDS`] and one above, and their sum.
    task_seconds: Mutex<(Vec<u64>, f64)>,
    /// When the agent started (the loop's last turn is measured from it).
    start: Instant,
    /// Milliseconds after `start` of the last `status.json` write.
    last_write_ms: AtomicU64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            bundle_loads: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            task_seconds: Mutex::new((vec![0; TASK_SECONDS.len() + 1], 0.0)),
            start: Instant::now(),
            last_write_ms: AtomicU64::new(0),
        }
    }
}

impl Telemetry {
    /// A bundle was loaded.
    pub(crate) fn loaded(&self) {
        self.bundle_loads.fetch_add(1, Ordering::Relaxed);
    }

    /// A task ran for `took`.
    pub(crate) fn task_done(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = TASK_SECONDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(TASK_SECONDS.len());
        let mut h = self.task_seconds.lock().unwrap_or_else(|p| p.into_inner());
        h.0[i] += 1;
        h.1 += secs;
    }

    /// The connection's state.
    pub(crate) fn set_connected(&self, yes: bool) {
        self.connected.store(yes, Ordering::Relaxed);
    }

    /// Is a periodic `status.json` write due (and, if so, it is noted as
    /// done now)? The loop asks on each turn, so this is also its pulse.
    pub(crate) fn state_due(&self, every: Duration) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        let last = self.last_write_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < every.as_millis() as u64 {
            return false;
        }
        self.last_write_ms.store(now, Ordering::Relaxed);
        true
    }

    /// How long since the loop last turned.
    fn loop_age(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_write_ms.load(Ordering::Relaxed)))
    }
}

/// The kind a failed task is counted under.
pub(crate) fn failure_kind(e: &TaskError) -> &'static str {
    match e {
        TaskError::Cancelled => "cancelled",
        TaskError::Deadline { .. } => "deadline",
        TaskError::Memory { .. } => "memory",
        TaskError::Fuel { .. } => "fuel",
        TaskError::OutputTooLarge { .. } => "output_too_large",
        TaskError::Trap(_) => "trap",
        TaskError::Budget(_) => "budget",
        TaskError::Host(_) => "host",
    }
}

/// The listener's routes over the agent's state.
struct NodeRoutes {
    /// The agent.
    ctx: Arc<Ctx>,
}

/// Start the listener.
pub(crate) async fn start(
    cfg: &MetricsConfig,
    ctx: Arc<Ctx>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    tidepool_net::http::serve(
        cfg.listen,
        cfg.token.clone(),
        cfg.max_connections,
        Arc::new(NodeRoutes { ctx }),
    )
    .await
}

impl Routes for NodeRoutes {
    async fn route(&self, path: &str, authorized: bool) -> Answer {
        let t = &self.ctx.telemetry;
        match path {
            "/healthz" => {
                let age = t.loop_age();
                if age < LOOP_STALL {
                    answer(StatusCode::OK, "text/plain", "ok\n")
                } else {
                    answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("the agent's loop has not run for {} s\n", age.as_secs()),
                    )
                }
            }
            "/readyz" => {
                if t.connected.load(Ordering::Relaxed) {
                    answer(StatusCode::OK, "text/plain", "ok\n")
                } else {
                    answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not connected to the pool\n",
                    )
                }
            }
            "/metrics" if authorized => answer(StatusCode::OK, CONTENT_TYPE, render(&self.ctx)),
            "/metrics" => answer(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "this node's metrics need its token: `Authorization: Bearer TOKEN` ([metrics] token_file in node.toml)\n",
            ),
            _ => answer(StatusCode::NOT_FOUND, "text/plain", "no such page\n"),
        }
    }
}

/// A family with one sample per cache: name, help, type, the value.
type PerCache<'a> = (
    &'static str,
    &'static str,
    &'static str,
    &'a dyn Fn(CacheKind) -> u64,
);

/// `/metrics`: the agent's figures since it started.
fn render(ctx: &Ctx) -> String {
    let state = ctx.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let book = ctx.caches.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let t = &ctx.telemetry;
    let s = &state.since_start;
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "node_tasks_total",
        "Tasks this node ran, by outcome (completed: an output or the job's own error).",
        "counter",
    );
    let _ = writeln!(
        out,
        "tidepool_node_tasks_total{{outcome=\"completed\"}} {}",
        s.completed
    );
    let _ = writeln!(
        out,
        "tidepool_node_tasks_total{{outcome=\"failed\"}} {}",
        s.failed
    );
    family(
        &mut out,
        "node_task_failures_total",
        "Tasks that failed on this node, by kind.",
        "counter",
    );
    for (kind, n) in &s.failures {
        let _ = writeln!(
            out,
            "tidepool_node_task_failures_total{{kind=\"{}\"}} {n}",
            escape(kind)
        );
    }
    family(
        &mut out,
        "node_results_total",
        "Results the pool answered for, by verdict.",
        "counter",
    );
    let _ = writeln!(
        out,
        "tidepool_node_results_total{{verdict=\"accepted\"}} {}",
        s.accepted
    );
    let _ = writeln!(
        out,
        "tidepool_node_results_total{{verdict=\"rejected\"}} {}",
        s.rejected
    );
    single(
        &mut out,
        "node_engine_seconds_total",
        "Seconds inference engines spent in compute calls.",
        "counter",
        s.engine_us as f64 / 1e6,
    );
    single(
        &mut out,
        "node_generated_tokens_total",
        "Tokens text generation produced (or accepted, replaying a claim).",
        "counter",
        s.generated_tokens as f64,
    );
    {
        let h = t.task_seconds.lock().unwrap_or_else(|p| p.into_inner());
        histogram(
            &mut out,
            "node_task_seconds",
            "Seconds from a task's grant to its result on this node.",
            &TASK_SECONDS,
            &h.0,
            h.1,
        );
    }
    single(
        &mut out,
        "node_bundle_loads_total",
        "Bundles checked and loaded into a sandbox (again after their files were evicted too).",
        "counter",
        t.bundle_loads.load(Ordering::Relaxed),
    );
    single(
        &mut out,
        "node_model_loads_total",
        "Models loaded from their files (a model another bundle holds already is not loaded again).",
        "counter",
        ctx.shared_models.loads(),
    );
    single(
        &mut out,
        "node_models_held",
        "Models in memory now, one copy each whatever the number of bundles that name them.",
        "gauge",
        ctx.shared_models.held(),
    );
    let caches: [PerCache<'_>; 4] = [
        (
            "node_cache_bytes",
            "Bytes in each disk cache.",
            "gauge",
            &|k| book.used(k),
        ),
        (
            "node_cache_budget_bytes",
            "Each disk cache's budget ([caches]).",
            "gauge",
            &|k| book.budgets().of(k),
        ),
        (
            "node_cache_files",
            "Files in each disk cache.",
            "gauge",
            &|k| book.count(k) as u64,
        ),
        (
            "node_cache_evictions_total",
            "Files removed from each cache to keep it within its budget.",
            "counter",
            &|k| book.evictions(k),
        ),
    ];
    for (name, help, kind, value) in caches {
        family(&mut out, name, help, kind);
        for k in CacheKind::ALL {
            let _ = writeln!(out, "tidepool_{name}{{cache=\"{k}\"}} {}", value(k));
        }
    }
    single(
        &mut out,
        "node_connected",
        "1 while connected to the pool.",
        "gauge",
        u8::from(t.connected.load(Ordering::Relaxed)),
    );
    single(
        &mut out,
        "node_connections_total",
        "Connections made to the pool.",
        "counter",
        state.connections,
    );
    if let Some(st) = state.standing {
        single(
            &mut out,
            "node_reputation",
            "Reputation as the pool last told it (0..10000; higher is checked more).",
            "gauge",
            st.reputation,
        );
        single(
            &mut out,
            "node_strikes",
            "Times the pool caught this node with a wrong result, as it last told it.",
            "gauge",
            st.strikes,
        );
    }
    out
}
