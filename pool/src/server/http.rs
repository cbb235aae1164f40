//! The pool's read-only HTTP listener (issue #19): the status page,
//! `/api/status` (its JSON), `/metrics` (Prometheus), `/healthz` and
//! `/readyz`.
//!
//! Off unless `[http] listen` is set. It never changes the pool: every
//! route is a GET that reads one observation of the coordinator. What a
//! stranger who reaches the port can do is bounded here: connections at
//! once (`max_connections`), time to send the request head, bytes of it,
//! and how often the coordinator is asked (one observation serves every
//! request for [`OBSERVATION_AGE`]). Everything but the health routes
//! needs the token (`Authorization: Bearer TOKEN`, or `?token=TOKEN` for a
//! browser's first load); the health routes say only "ok" or why not.

use super::{metrics, Cmd, Shared};
use crate::coordinator::telemetry::Observed;
use hyper::StatusCode;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidepool_net::http::{answer, Answer, Routes};
use tokio::sync::oneshot;

/// How long one observation of the coordinator serves requests.
pub const OBSERVATION_AGE: Duration = Duration::from_secs(1);
/// How long the coordinator has to answer a health probe.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub use tidepool_net::http::{HEAD_TIMEOUT, MAX_HEAD_BYTES};

/// The listener's settings (`[http]` in `pool.toml`).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// TCP address (loopback by default: put a TLS proxy in front to
    /// reach it from elsewhere).
    pub listen: SocketAddr,
    /// The bearer token every route but the health ones needs.
    pub token: String,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

/// What the listener's connections share. Lives as long as the pool.
struct Http {
    /// The pool's shared state (the coordinator's queue, refusals).
    shared: Arc<Shared>,
    /// The last observation and when it was made; one request at a time
    /// refreshes it, the others wait for that one.
    last: tokio::sync::Mutex<Option<(Instant, Arc<Observed>)>>,
    /// The status page.
    page: &'static str,
}

/// Start listening; returns the bound address and the accept task.
pub(super) async fn start(
    cfg: HttpConfig,
    shared: Arc<Shared>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let http = Arc::new(Http {
        shared,
        last: tokio::sync::Mutex::new(None),
        page: include_str!("page.html"),
    });
    tidepool_net::http::serve(cfg.listen, cfg.token, cfg.max_connections, http).await
}

impl Routes for Http {
    async fn route(&self, path: &str, authorized: bool) -> Answer {
        match path {
            "/healthz" => self.health().await,
            "/readyz" => self.health().await,
            path => {
                if !authorized {
                    return answer(
                        StatusCode::UNAUTHORIZED,
                        "text/plain",
                        "this pool's status needs its token: `Authorization: Bearer TOKEN` or ?token=TOKEN ([http] token_file in pool.toml)\n",
                    );
                }
                match path {
                    "/" => answer(StatusCode::OK, "text/html; charset=utf-8", self.page),
                    "/metrics" => match self.observe().await {
                        Ok(o) => answer(StatusCode::OK, metrics::CONTENT_TYPE, metrics::render(&o)),
                        Err(why) => answer(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
                    },
                    "/api/status" => match self.observe().await {
                        Ok(o) => answer(StatusCode::OK, "application/json", status_json(&o)),
                        Err(why) => answer(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
                    },
                    _ => answer(StatusCode::NOT_FOUND, "text/plain", "no such page\n"),
                }
            }
        }
    }
}

impl Http {
    /// `ok` while the coordinator answers within [`HEALTH_TIMEOUT`].
    async fn health(&self) -> Answer {
        let (tx, rx) = oneshot::channel();
        if self.shared.tx.send(Cmd::Ping(tx)).is_err() {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "coordinator stopped\n",
            );
        }
        match tokio::time::timeout(HEALTH_TIMEOUT, rx).await {
            Ok(Ok(())) => answer(StatusCode::OK, "text/plain", "ok\n"),
            Ok(Err(_)) => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "coordinator stopped\n",
            ),
            Err(_) => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!(
                    "coordinator did not answer in {} s\n",
                    HEALTH_TIMEOUT.as_secs()
                ),
            ),
        }
    }

    /// The latest observation, at most [`OBSERVATION_AGE`] old.
    async fn observe(&self) -> Result<Arc<Observed>, String> {
        let mut last = self.last.lock().await;
        if let Some((at, o)) = &*last {
            if at.elapsed() < OBSERVATION_AGE {
                return Ok(o.clone());
            }
        }
        let (tx, rx) = oneshot::channel();
        self.shared
            .tx
            .send(Cmd::Observe(tx))
            .map_err(|_| "coordinator stopped\n".to_string())?;
        let mut o = match tokio::time::timeout(HEALTH_TIMEOUT, rx).await {
            Ok(Ok(Ok(o))) => o,
            Ok(Ok(Err(r))) => return Err(format!("{}\n", r.message)),
            Ok(Err(_)) => return Err("coordinator stopped\n".into()),
            Err(_) => return Err("coordinator busy; try again\n".into()),
        };
        o.summary.refusals = self.shared.refusals.counts();
        let o = Arc::new(o);
        *last = Some((Instant::now(), o.clone()));
        Ok(o)
    }
}

/// Jobs `/api/status` lists: unfinished ones first, then the newest
/// finished ones, at most this many in all (the rest are counted).
pub const STATUS_JOBS: usize = 200;

/// `/api/status`: the summary (its job list bounded), the counters and the
/// throughput ring.
fn status_json(o: &Observed) -> String {
    let c = &o.telemetry.counters;
    let mut summary = o.summary.clone();
    let jobs_total = summary.jobs.len();
    // Unfinished first, newest first within each.
    summary
        .jobs
        .sort_by_key(|j| (j.finished(), std::cmp::Reverse(j.job)));
    summary.jobs.truncate(STATUS_JOBS);
    serde_json::json!({
        "summary": summary,
        "jobs_total": jobs_total,
        "uptime_secs": o.uptime.as_secs(),
        "counters": {
            "submitted": c.submitted,
            "cache_hits": c.cache_hits,
            "leases_granted": c.leases_granted,
            "leases_expired": c.leases_expired,
            "results_accepted": c.results_accepted,
            "results_failed": c.results_failed,
            "results_refused": c.results_refused,
            "results_stale": c.results_stale,
            "dead_lettered": c.dead_lettered,
        },
        "throughput": {
            "slot_secs": crate::coordinator::telemetry::THROUGHPUT_SLOT.as_secs(),
            "per_sec": o.throughput,
        },
        "task_latency": {
            "count": o.telemetry.task_seconds.count(),
            "sum_secs": o.telemetry.task_seconds.sum,
        },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::wire::{JobId, JobSummary, PoolSummary};

    fn job(id: u64, finished: bool) -> JobSummary {
        JobSummary {
            job: JobId(id),
            bundle: tidepool_proto::Digest([0; 32]),
            bundle_name: "echo 1.0.0".into(),
            tasks: 10,
            done: if finished { 10 } else { 3 },
            dead: 0,
            running: 0,
            cached: 0,
            waiting: None,
            open: false,
            purged: false,
        }
    }

    #[test]
    fn the_status_json_lists_unfinished_jobs_first_and_at_most_its_bound() {
        let now = Instant::now();
        let jobs: Vec<JobSummary> = (0..(STATUS_JOBS as u64 + 50))
            .map(|i| job(i, i % 2 == 0))
            .collect();
        let o = Observed {
            summary: PoolSummary {
                nodes: Vec::new(),
                queued: 0,
                leased: 0,
                done: 0,
                dead: 0,
                jobs,
                verification: Default::default(),
                checks_waiting: Vec::new(),
                refusals: Default::default(),
            },
            telemetry: crate::coordinator::telemetry::Telemetry::new(now),
            throughput: vec![1.0],
            uptime: Duration::from_secs(5),
        };
        let v: serde_json::Value = serde_json::from_str(&status_json(&o)).expect("json");
        let listed = v["summary"]["jobs"].as_array().expect("jobs");
        assert_eq!(listed.len(), STATUS_JOBS);
        assert_eq!(v["jobs_total"], STATUS_JOBS as u64 + 50);
        // All 125 unfinished (odd ids) come first, the newest first.
        assert_eq!(listed[0]["job"], STATUS_JOBS as u64 + 49);
        assert!(listed[..125]
            .iter()
            .all(|j| j["job"].as_u64().unwrap_or(0) % 2 == 1));
        assert!(listed[125..]
            .iter()
            .all(|j| j["job"].as_u64().unwrap_or(1) % 2 == 0));
    }
}
