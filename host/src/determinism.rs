//! Virtual clocks and seeded randomness for deterministic tasks.
//!
//! A task in deterministic mode must produce the same bytes wherever and
//! whenever it is re-executed, so nothing it can observe may depend on the
//! machine: clocks start at zero and advance by a fixed step per read, and
//! every random byte comes from SHA-256 in counter mode keyed by the task id
//! and a domain label (stable across Rust and crate versions, unlike
//! library RNGs whose streams may change).

use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::time::Duration;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// Each read of a virtual clock advances it by this much.
pub const CLOCK_STEP_NS: u64 = 1_000;

/// A wall clock that starts at the Unix epoch and ticks per read.
#[derive(Debug, Default)]
pub struct VirtualWallClock {
    /// Reads so far (the clock's whole state; lives as long as the task).
    reads: std::sync::atomic::AtomicU64,
}

impl HostWallClock for VirtualWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(CLOCK_STEP_NS)
    }
    fn now(&self) -> Duration {
        let n = self
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Duration::from_nanos(n.saturating_mul(CLOCK_STEP_NS))
    }
}

/// A monotonic clock that starts at zero and ticks per read.
#[derive(Debug, Default)]
pub struct VirtualMonotonicClock {
    /// Reads so far.
    reads: std::sync::atomic::AtomicU64,
}

impl HostMonotonicClock for VirtualMonotonicClock {
    fn resolution(&self) -> u64 {
        CLOCK_STEP_NS
    }
    fn now(&self) -> u64 {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_mul(CLOCK_STEP_NS)
    }
}

/// SHA-256 counter-mode generator: block i = SHA-256(key ‖ i).
#[derive(Debug, Clone)]
pub struct SeededRng {
    /// SHA-256(label ‖ 0 ‖ task id): fixed for the task's life.
    key: [u8; 32],
    /// Next block number.
    counter: u64,
    /// Unused bytes of the current block.
    buf: [u8; 32],
    /// How many bytes of `buf` are already used.
    used: usize,
}

impl SeededRng {
    /// A generator for `task_id` in the domain `label` (e.g. "wasi:random/random").
    pub fn new(task_id: &str, label: &str) -> Self {
        let mut h = Sha256::new();
        h.update(label.as_bytes());
        h.update([0u8]);
        h.update(task_id.as_bytes());
        Self {
            key: h.finalize().into(),
            counter: 0,
            buf: [0; 32],
            used: 32,
        }
    }

    fn refill(&mut self) {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(self.counter.to_le_bytes());
        self.buf = h.finalize().into();
        self.counter += 1;
        self.used = 0;
    }

    /// Fill `dst` with the next bytes of the stream.
    pub fn fill(&mut self, dst: &mut [u8]) {
        let mut off = 0;
        while off < dst.len() {
            if self.used == self.buf.len() {
                self.refill();
            }
            let n = (self.buf.len() - self.used).min(dst.len() - off);
            dst[off..off + n].copy_from_slice(&self.buf[self.used..self.used + n]);
            self.used += n;
            off += n;
        }
    }

    /// A u128 derived from the stream (for `insecure-seed`).
    pub fn next_u128(&mut self) -> u128 {
        let mut b = [0u8; 16];
        self.fill(&mut b);
        u128::from_le_bytes(b)
    }
}

impl rand_core::TryRng for SeededRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_task_same_stream_other_task_other_stream() {
        let (mut a, mut b, mut c) = (
            SeededRng::new("t1", "x"),
            SeededRng::new("t1", "x"),
            SeededRng::new("t2", "x"),
        );
        let (mut x, mut y, mut z) = ([0u8; 100], [0u8; 100], [0u8; 100]);
        a.fill(&mut x[..7]);
        a.fill(&mut x[7..]);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_eq!(x, y, "split reads must give the same stream");
        assert_ne!(x, z);
    }

    #[test]
    fn clocks_advance_by_fixed_steps() {
        let c = VirtualMonotonicClock::default();
        assert_eq!((c.now(), c.now()), (0, CLOCK_STEP_NS));
    }
}
