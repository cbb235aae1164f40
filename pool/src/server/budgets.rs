//! What one peer may make the pool hold, counted in the network shell:
//! open connections per IP address and per key, request bytes in memory
//! per connection and in total, requests per connection waiting for the
//! coordinator; and the refusal log, which says what was refused and why
//! (counted per kind for `pool status`, logged at most once per kind every
//! [`LOG_EVERY`]).
//!
//! Everything here is a counter or a semaphore; nothing decides policy
//! beyond the numbers in [`NetLimits`].

use crate::config::NetLimits;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidepool_proto::PublicKey;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// Shortest time between two log lines of one refusal kind.
pub(super) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Bytes per semaphore permit (budgets are counted in KiB).
const UNIT: usize = 1024;

/// Open connections per some key (IP address or peer key).
#[derive(Debug)]
pub(super) struct Counter<K: Hash + Eq + Copy> {
    /// Open connections per key; a key's entry goes at zero.
    open: Arc<Mutex<HashMap<K, u32>>>,
    /// Most per key.
    max: u32,
}

/// One counted connection; uncounted when dropped (the connection's task
/// holds it for as long as the connection lives).
#[derive(Debug)]
pub(super) struct Counted<K: Hash + Eq + Copy> {
    /// The counter's table.
    open: Arc<Mutex<HashMap<K, u32>>>,
    /// The key counted.
    key: K,
}

impl<K: Hash + Eq + Copy> Counter<K> {
    /// At most `max` per key.
    pub(super) fn new(max: u32) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// Count one more connection for `key`, or `None` if it has `max`.
    pub(super) fn admit(&self, key: K) -> Option<Counted<K>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Counted {
            open: self.open.clone(),
            key,
        })
    }
}

impl<K: Hash + Eq + Copy> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The server's budgets. Lives as long as the server.
#[derive(Debug)]
pub(super) struct Budgets {
    /// The numbers.
    pub(super) limits: NetLimits,
    /// Connections per IP address.
    pub(super) per_ip: Counter<IpAddr>,
    /// Connections per peer key.
    pub(super) per_key: Counter<PublicKey>,
    /// Request bytes in memory over all connections, in KiB permits.
    total: Arc<Semaphore>,
}

/// Memory reserved for one request frame: released when dropped (after
/// the request was answered).
#[derive(Debug)]
pub(super) struct Reserved {
    /// Of the connection's budget.
    _conn: OwnedSemaphorePermit,
    /// Of the total.
    _total: OwnedSemaphorePermit,
}

impl Budgets {
    /// Budgets of `limits`.
    pub(super) fn new(limits: NetLimits) -> Self {
        Self {
            per_ip: Counter::new(limits.connections_per_ip),
            per_key: Counter::new(limits.connections_per_key),
            total: Arc::new(Semaphore::new(limits.buffered_bytes_total.div_ceil(UNIT))),
            limits,
        }
    }

    /// A new connection's own byte budget.
    pub(super) fn connection(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(
            self.limits.buffered_bytes_per_connection.div_ceil(UNIT),
        ))
    }

    /// A new connection's budget of requests waiting for the coordinator.
    pub(super) fn in_flight(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(
            self.limits.in_flight_per_connection as usize,
        ))
    }

    /// Reserve `bytes` of the connection's budget and of the total, waiting
    /// until both have room. A frame larger than the connection's whole
    /// budget is refused by the frame limits before this is asked.
    pub(super) async fn reserve(&self, conn: &Arc<Semaphore>, bytes: usize) -> Option<Reserved> {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).ok()?;
        let c = conn.clone().acquire_many_owned(units).await.ok()?;
        let t = self.total.clone().acquire_many_owned(units).await.ok()?;
        Some(Reserved {
            _conn: c,
            _total: t,
        })
    }
}

/// Refusals by kind: counted, and logged at most once per kind every
/// [`LOG_EVERY`] with how many were not logged. Lives as long as the server.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    /// Per kind.
    kinds: Mutex<BTreeMap<String, KindCount>>,
}

/// One refusal kind's counts.
#[derive(Debug, Default)]
struct KindCount {
    /// Since start.
    total: u64,
    /// When last logged.
    logged: Option<Instant>,
    /// Since that line.
    unlogged: u64,
}

impl Refusals {
    /// Something of `kind` was refused (`detail` says what and who).
    pub(super) fn note(&self, kind: &str, detail: &str) {
        let now = Instant::now();
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let e = kinds.entry(kind.to_owned()).or_default();
        e.total += 1;
        e.unlogged += 1;
        if e.logged
            .is_none_or(|last| now.duration_since(last) >= LOG_EVERY)
        {
            let unlogged = e.unlogged - 1;
            e.logged = Some(now);
            e.unlogged = 0;
            drop(kinds);
            warn!(kind, unlogged, "refused: {detail}");
        }
    }

    /// The counts since start, by kind.
    pub(super) fn counts(&self) -> BTreeMap<String, u64> {
        self.kinds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, c)| (k.clone(), c.total))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_connections_are_bounded_and_released_on_drop() {
        let c: Counter<u8> = Counter::new(2);
        let a = c.admit(1).expect("first");
        let _b = c.admit(1).expect("second");
        assert!(c.admit(1).is_none(), "a third from the same key");
        assert!(c.admit(2).is_some(), "another key is counted apart");
        drop(a);
        assert!(c.admit(1).is_some(), "room again once one closed");
    }

    #[tokio::test]
    async fn reservations_wait_for_room_in_the_connection_and_the_total() {
        let b = Budgets::new(NetLimits {
            buffered_bytes_per_connection: 4 * UNIT,
            buffered_bytes_total: 6 * UNIT,
            ..NetLimits::default()
        });
        let (c1, c2) = (b.connection(), b.connection());
        let r1 = b.reserve(&c1, 4 * UNIT).await.expect("fits");
        // c1 is full; c2 has room of its own but the total has only 2 KiB.
        let wait = tokio::time::timeout(Duration::from_millis(50), b.reserve(&c1, 1)).await;
        assert!(wait.is_err(), "the connection's budget is spent");
        let r2 = b.reserve(&c2, 2 * UNIT).await.expect("fits the total");
        let wait = tokio::time::timeout(Duration::from_millis(50), b.reserve(&c2, 1)).await;
        assert!(wait.is_err(), "the total is spent");
        drop(r1);
        assert!(b.reserve(&c2, UNIT).await.is_some());
        drop(r2);
    }

    #[test]
    fn refusals_are_counted_per_kind() {
        let r = Refusals::default();
        for _ in 0..3 {
            r.note("oversized frame", "a 16 MiB lease");
        }
        r.note("connections per key", "k");
        let c = r.counts();
        assert_eq!(c.get("oversized frame"), Some(&3));
        assert_eq!(c.get("connections per key"), Some(&1));
    }
}
