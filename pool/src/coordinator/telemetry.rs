//! Telemetry: what the pool did since it started, for `/metrics` and the
//! status page (issue #19).
//!
//! A sub-state of the coordinator. It counts and measures what the other
//! sub-states decided (grants, verdicts, expiries, dead letters) and keeps
//! a ring of accepted results per ten seconds over the last hour; it never
//! decides anything and never touches the store. Everything here is in
//! memory, bounded by constants, and starts again from zero with the
//! process (as Prometheus counters may: a scraper sees the reset).

use std::time::{Duration, Instant};

/// Width of one slot of the throughput ring.
pub const THROUGHPUT_SLOT: Duration = Duration::from_secs(10);
/// Slots in the ring: one hour.
pub const THROUGHPUT_SLOTS: usize = 360;

/// A histogram with fixed upper bounds (Prometheus's cumulative form is
/// made when it is written out).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds, ascending (the `+Inf` bucket is implied).
    pub bounds: &'static [f64],
    /// Observations at or below each bound and above the one before; the
    /// last entry counts those above every bound.
    pub counts: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Count one observation.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Seconds, from 1 ms to 10 minutes.
const SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];
/// Bytes, from 64 B to 16 MiB (the largest item).
const BYTES: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// Counters since the pool started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Tasks submitted (inputs of every job, cached ones included).
    pub submitted: u64,
    /// Inputs answered from the result cache.
    pub cache_hits: u64,
    /// Leases granted (a task's every attempt, re-executions included).
    pub leases_granted: u64,
    /// Leases that ended without a result (expired or at their deadline).
    pub leases_expired: u64,
    /// Results accepted and stored.
    pub results_accepted: u64,
    /// Failures nodes reported (the task is retried).
    pub results_failed: u64,
    /// Results refused (bad receipt, over a limit, ...).
    pub results_refused: u64,
    /// Results for leases no longer held (late or repeated).
    pub results_stale: u64,
    /// Tasks dead-lettered.
    pub dead_lettered: u64,
}

/// What the pool measured since it started. Lives as long as the
/// coordinator.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// When the coordinator started (the ring's slot 0 begins here).
    started: Instant,
    /// Counters.
    pub counters: Counters,
    /// Seconds from a lease's grant to its result's acceptance.
    pub task_seconds: Histogram,
    /// Seconds a task waited in its queue before it was leased.
    pub lease_wait_seconds: Histogram,
    /// Bytes of each accepted output.
    pub result_bytes: Histogram,
    /// Accepted results per slot, the newest last; `ring_end` is the slot
    /// number (since `started`) one past the newest.
    ring: std::collections::VecDeque<u64>,
    /// Slot number one past the newest in `ring`.
    ring_end: u64,
}

impl Telemetry {
    /// Empty, starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            counters: Counters::default(),
            task_seconds: Histogram::new(SECONDS),
            lease_wait_seconds: Histogram::new(SECONDS),
            result_bytes: Histogram::new(BYTES),
            ring: std::collections::VecDeque::with_capacity(THROUGHPUT_SLOTS),
            ring_end: 0,
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.started);
        since.as_secs() / THROUGHPUT_SLOT.as_secs()
    }

    /// Move the ring to `now`'s slot (zeros for the slots passed).
    fn advance(&mut self, now: Instant) {
        let slot = self.slot(now);
        if slot < self.ring_end {
            return;
        }
        let gap = (slot + 1 - self.ring_end).min(THROUGHPUT_SLOTS as u64);
        for _ in 0..gap {
            if self.ring.len() == THROUGHPUT_SLOTS {
                self.ring.pop_front();
            }
            self.ring.push_back(0);
        }
        self.ring_end = slot + 1;
    }

    /// A lease was granted for a task queued since `since`.
    pub fn granted(&mut self, now: Instant, since: Instant) {
        self.counters.leases_granted += 1;
        self.lease_wait_seconds
            .observe(now.saturating_duration_since(since).as_secs_f64());
    }

    /// A result of `bytes` output was accepted for a lease granted at
    /// `granted`.
    pub fn accepted(&mut self, now: Instant, granted: Instant, bytes: u64) {
        self.counters.results_accepted += 1;
        self.task_seconds
            .observe(now.saturating_duration_since(granted).as_secs_f64());
        self.result_bytes.observe(bytes as f64);
        self.advance(now);
        if let Some(last) = self.ring.back_mut() {
            *last += 1;
        }
    }

    /// Accepted results per second in each slot of the last hour, oldest
    /// first, ending with the slot of `now` (which is still filling).
    pub fn throughput(&mut self, now: Instant) -> Vec<f64> {
        self.advance(now);
        let per = THROUGHPUT_SLOT.as_secs_f64();
        self.ring.iter().map(|n| *n as f64 / per).collect()
    }

    /// Seconds since the coordinator started.
    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

/// Everything an observer (the status page, `/metrics`) is shown at one
/// moment: the pool's summary as `pool status` gives it to the pool owner,
/// and what was measured. A copy: it holds nothing of the coordinator.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Nodes, jobs, verification and refusals (the pool owner's view).
    pub summary: tidepool_proto::wire::PoolSummary,
    /// Counters and histograms.
    pub telemetry: Telemetry,
    /// Accepted results per second per slot over the last hour, oldest
    /// first (see [`THROUGHPUT_SLOT`]).
    pub throughput: Vec<f64>,
    /// Time since the coordinator started.
    pub uptime: Duration,
}

impl<S: crate::store::Store> super::Coordinator<S> {
    /// What an observer is shown now (the pool owner's view: every job).
    pub fn observe(&mut self, now: Instant) -> Result<Observed, tidepool_proto::session::Refusal> {
        let summary = self.pool_status(now)?;
        let throughput = self.telemetry.throughput(now);
        Ok(Observed {
            summary,
            telemetry: self.telemetry.clone(),
            throughput,
            uptime: self.telemetry.uptime(now),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_puts_each_value_in_the_first_bucket_that_holds_it() {
        let mut h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 1.5, 10.0, 11.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 2, 1]);
        assert_eq!(h.count(), 5);
        assert!((h.sum - 24.0).abs() < 1e-9);
    }

    #[test]
    fn the_throughput_ring_keeps_one_hour_and_zeros_idle_slots() {
        let t0 = Instant::now();
        let mut t = Telemetry::new(t0);
        for _ in 0..30 {
            t.accepted(t0 + Duration::from_secs(5), t0, 10);
        }
        // 30 results in the first ten seconds, then 20 s of nothing.
        let ring = t.throughput(t0 + Duration::from_secs(25));
        assert_eq!(ring, vec![3.0, 0.0, 0.0]);
        // Two hours later only one hour of slots is left, all idle but
        // the current one.
        t.accepted(t0 + Duration::from_secs(7200), t0, 10);
        let ring = t.throughput(t0 + Duration::from_secs(7200));
        assert_eq!(ring.len(), THROUGHPUT_SLOTS);
        assert_eq!(ring.iter().filter(|r| **r > 0.0).count(), 1);
        assert_eq!(t.counters.results_accepted, 31);
        assert_eq!(t.task_seconds.count(), 31);
    }

    #[test]
    fn lease_waits_are_measured_from_when_the_task_was_queued() {
        let t0 = Instant::now();
        let mut t = Telemetry::new(t0);
        t.granted(t0 + Duration::from_millis(300), t0);
        // 0.3 s is in the bucket up to 0.5 s (the 8th bound).
        let i = SECONDS.iter().position(|b| *b == 0.5).unwrap_or(0);
        assert_eq!(t.lease_wait_seconds.counts[i], 1);
        assert_eq!(t.counters.leases_granted, 1);
    }
}
