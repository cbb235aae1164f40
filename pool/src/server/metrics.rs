//! `/metrics`: the pool's figures in the Prometheus text exposition format
//! (version 0.0.4).
//!
//! A pure function of one observation: it reads nothing else and writes
//! nothing. Every family has `# HELP` and `# TYPE`; names have the
//! `tidepool_` prefix, counters end in `_total`, units are base units
//! (seconds, bytes). Label values are escaped; node keys appear as labels
//! only in per-node families, whose size the pool's node table bounds.

use crate::coordinator::telemetry::{Histogram, Observed};
use std::fmt::Write;
use tidepool_net::http::prometheus::{escape, family};

pub use tidepool_net::http::prometheus::CONTENT_TYPE;

/// Render `o` (with the network layer's refusals merged into its summary).
pub fn render(o: &Observed) -> String {
    let mut out = String::with_capacity(8192);
    let c = &o.telemetry.counters;
    let s = &o.summary;
    let v = &s.verification;
    let counters: [(&str, &str, u64); 18] = [
        (
            "tasks_submitted_total",
            "Inputs submitted in jobs (cache hits included).",
            c.submitted,
        ),
        (
            "cache_hits_total",
            "Inputs answered from the result cache without compute.",
            c.cache_hits,
        ),
        (
            "leases_granted_total",
            "Leases granted to nodes (every attempt, re-executions included).",
            c.leases_granted,
        ),
        (
            "leases_expired_total",
            "Leases that ended without a result (not renewed, or past their deadline).",
            c.leases_expired,
        ),
        (
            "results_accepted_total",
            "Results accepted and stored.",
            c.results_accepted,
        ),
        (
            "results_failed_total",
            "Task failures reported by nodes (the task is retried).",
            c.results_failed,
        ),
        (
            "results_refused_total",
            "Results refused (receipt, identity or limits wrong).",
            c.results_refused,
        ),
        (
            "results_stale_total",
            "Results for leases the node no longer held.",
            c.results_stale,
        ),
        (
            "tasks_dead_lettered_total",
            "Tasks given up after too many attempts.",
            c.dead_lettered,
        ),
        (
            "verification_executed_total",
            "Re-executions finished (tie-breaks and challenges included).",
            v.executed,
        ),
        (
            "verification_confirmed_total",
            "Results confirmed by re-execution or canaries.",
            v.confirmed,
        ),
        (
            "verification_mismatches_total",
            "Disagreements found by re-execution.",
            v.mismatches,
        ),
        (
            "verification_replaced_total",
            "Results replaced by the agreed one.",
            v.replaced,
        ),
        (
            "verification_canaries_total",
            "Canaries answered.",
            v.canaries,
        ),
        (
            "verification_decoys_total",
            "Decoy checks answered.",
            v.decoys,
        ),
        (
            "verification_decoys_accepted_total",
            "Decoys a verifier accepted (each a strike).",
            v.decoys_accepted,
        ),
        (
            "nodes_strikes_total",
            "Strikes of every node known (caught with a wrong result).",
            s.nodes.iter().map(|n| u64::from(n.strikes)).sum(),
        ),
        (
            "nodes_expired_leases_total",
            "Leases every known node let expire (from the store).",
            s.nodes.iter().map(|n| n.expired).sum(),
        ),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, help, "counter");
        let _ = writeln!(out, "tidepool_{name} {value}");
    }
    family(
        &mut out,
        "refusals_total",
        "Requests and connections the network layer refused, by kind.",
        "counter",
    );
    for (kind, n) in &s.refusals {
        let _ = writeln!(
            out,
            "tidepool_refusals_total{{kind=\"{}\"}} {n}",
            escape(kind)
        );
    }
    let connected = s.nodes.iter().filter(|n| n.connected).count();
    let gauges: [(&str, &str, f64); 11] = [
        ("tasks_queued", "Tasks waiting for a node.", s.queued as f64),
        ("tasks_leased", "Tasks under lease.", s.leased as f64),
        (
            "tasks_done",
            "Tasks with an accepted result (stored jobs).",
            s.done as f64,
        ),
        (
            "tasks_dead",
            "Tasks dead-lettered (stored jobs).",
            s.dead as f64,
        ),
        ("jobs", "Jobs stored.", s.jobs.len() as f64),
        (
            "jobs_unfinished",
            "Jobs open or with tasks left.",
            s.jobs.iter().filter(|j| !j.finished()).count() as f64,
        ),
        ("nodes_known", "Nodes ever seen.", s.nodes.len() as f64),
        ("nodes_connected", "Nodes connected now.", connected as f64),
        (
            "nodes_banned",
            "Nodes banned for wrong results.",
            s.nodes.iter().filter(|n| n.banned).count() as f64,
        ),
        (
            "verification_pending",
            "Re-executions queued or running.",
            v.pending as f64,
        ),
        (
            "uptime_seconds",
            "Seconds since the coordinator started.",
            o.uptime.as_secs_f64(),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, help, "gauge");
        let _ = writeln!(out, "tidepool_{name} {value}");
    }
    type PerNode = fn(&tidepool_proto::wire::NodeStatus) -> u32;
    let per_node: [(&str, &str, PerNode); 2] = [
        (
            "node_running_tasks",
            "Tasks leased to each connected node.",
            |n| n.running,
        ),
        (
            "node_reputation",
            "Each connected node's reputation (0-10000, higher is checked more).",
            |n| n.reputation,
        ),
    ];
    for (name, help, value) in per_node {
        family(&mut out, name, help, "gauge");
        for n in s.nodes.iter().filter(|n| n.connected) {
            let _ = writeln!(out, "tidepool_{name}{{node=\"{}\"}} {}", n.key, value(n));
        }
    }
    let t = &o.telemetry;
    histogram(
        &mut out,
        "task_latency_seconds",
        "Seconds from a lease's grant to its result's acceptance.",
        &t.task_seconds,
    );
    histogram(
        &mut out,
        "lease_wait_seconds",
        "Seconds a task waited in its queue before it was leased.",
        &t.lease_wait_seconds,
    );
    histogram(
        &mut out,
        "result_size_bytes",
        "Bytes of each accepted output.",
        &t.result_bytes,
    );
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    tidepool_net::http::prometheus::histogram(out, name, help, h.bounds, &h.counts, h.sum);
}
