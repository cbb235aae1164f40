//! Nodes as this process has seen them: what each said it can run, its
//! connections and uptime, and the tasks it holds (the `Nodes` sub-state);
//! hello and goodbye.

use super::{Coordinator, PoolEvent};
use crate::config::LeasePolicy;
use crate::store::Store;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{Capabilities, ErrorCode, TaskId};
use tidepool_proto::PublicKey;

/// A node as seen since this process started.
#[derive(Debug)]
pub(super) struct Node {
    /// What it said it can run (latest hello).
    pub(super) caps: Capabilities,
    /// Live connections from this key (a node may reconnect before the old
    /// connection is noticed dead).
    pub(super) connections: u32,
    /// When it was first seen by this process.
    pub(super) first_seen: Instant,
    /// Time connected before the current connection.
    pub(super) connected_total: Duration,
    /// Start of the current connection.
    pub(super) connected_since: Option<Instant>,
    /// Tasks it holds.
    pub(super) leases: BTreeSet<TaskId>,
    /// Results accepted from it since it was first seen by this process or
    /// last caught or cut off: each one lets it hold one more lease (up to
    /// the policy's maximum).
    pub(super) delivered: u64,
    /// Its latest finished tasks, newest last (`true`: failed or refused),
    /// at most the breaker's window; cleared when the breaker trips.
    pub(super) recent: VecDeque<bool>,
    /// It said it is draining (takes no new work) since its last hello:
    /// the pool chooses no check for it.
    pub(super) draining: bool,
}

/// How much better another node's uptime must be for it to be preferred.
pub const UPTIME_MARGIN: f64 = 0.1;

impl Node {
    /// A node first seen at `now`, not yet connected.
    fn new(now: Instant) -> Self {
        Self {
            caps: Capabilities::default(),
            connections: 0,
            first_seen: now,
            connected_total: Duration::ZERO,
            connected_since: None,
            leases: BTreeSet::new(),
            delivered: 0,
            recent: VecDeque::new(),
            draining: false,
        }
    }

    /// Whether some connection from this key is open.
    pub(super) fn is_connected(&self) -> bool {
        self.connections > 0
    }

    /// Leases it may hold at once: its slots (at least one) and its queue
    /// (saturating: the numbers are the node's own claim).
    pub(super) fn capacity(&self) -> usize {
        (self.caps.slots.max(1) as usize).saturating_add(self.caps.queue as usize)
    }

    /// Leases the pool lets it hold: its own claim, but no more than the
    /// policy's start plus one per delivered result, and never more than
    /// the policy's maximum (a claim of 256 slots from a fresh key gets
    /// `start_leases`).
    pub(super) fn allowance(&self, p: &LeasePolicy) -> usize {
        let earned = (p.start_leases as u64).saturating_add(self.delivered);
        let cap = earned.min(p.max_leases as u64) as usize;
        self.capacity().min(cap)
    }

    /// Connected and holding fewer leases than its allowance.
    pub(super) fn has_room(&self, p: &LeasePolicy) -> bool {
        self.is_connected() && self.leases.len() < self.allowance(p)
    }

    /// Record a finished task (`failed`: failed or refused) in the
    /// breaker's window; `true` when the breaker trips: at least
    /// `breaker_failures` failures in the window and more failures than
    /// successes. A trip clears the window and what it had earned.
    pub(super) fn finished(&mut self, failed: bool, p: &LeasePolicy) -> bool {
        if !failed {
            self.delivered += 1;
        }
        self.recent.push_back(failed);
        while self.recent.len() > p.breaker_window.max(1) as usize {
            self.recent.pop_front();
        }
        let failures = self.recent.iter().filter(|f| **f).count();
        let tripped =
            failures >= p.breaker_failures.max(1) as usize && failures * 2 > self.recent.len();
        if tripped {
            self.recent.clear();
            self.delivered = 0;
        }
        tripped
    }

    /// Share of the time since first seen that the node was connected.
    pub(super) fn uptime(&self, now: Instant) -> f64 {
        let up = self.connected_total
            + self
                .connected_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let seen = now.saturating_duration_since(self.first_seen);
        if seen.is_zero() {
            return 1.0;
        }
        (up.as_secs_f64() / seen.as_secs_f64()).min(1.0)
    }
}

/// Every node seen since this process started, by key. Lives as long as the
/// coordinator (a node that disconnects keeps its entry, so its uptime
/// record and held leases survive a reconnect).
#[derive(Debug, Default)]
pub(super) struct Nodes {
    /// The nodes.
    by_key: HashMap<PublicKey, Node>,
}

impl Nodes {
    /// A connection from `key` said hello with `caps` at `now`.
    pub(super) fn connect(&mut self, now: Instant, key: PublicKey, caps: Capabilities) {
        let n = self.by_key.entry(key).or_insert_with(|| Node::new(now));
        n.caps = caps;
        n.draining = false;
        n.connections += 1;
        n.connected_since.get_or_insert(now);
    }

    /// `key` said it is draining.
    pub(super) fn drain(&mut self, key: &PublicKey) {
        if let Some(n) = self.by_key.get_mut(key) {
            n.draining = true;
        }
    }

    /// A connection from `key` closed at `now`.
    pub(super) fn disconnect(&mut self, now: Instant, key: &PublicKey) {
        if let Some(n) = self.by_key.get_mut(key) {
            n.connections = n.connections.saturating_sub(1);
            if n.connections == 0 {
                if let Some(since) = n.connected_since.take() {
                    n.connected_total += now.saturating_duration_since(since);
                }
            }
        }
    }

    /// The node `key`, if seen.
    pub(super) fn get(&self, key: &PublicKey) -> Option<&Node> {
        self.by_key.get(key)
    }

    /// `key` now holds `task`.
    pub(super) fn hold(&mut self, key: &PublicKey, task: TaskId) {
        if let Some(n) = self.by_key.get_mut(key) {
            n.leases.insert(task);
        }
    }

    /// `key` no longer holds `task`.
    pub(super) fn drop_lease(&mut self, key: &PublicKey, task: TaskId) {
        if let Some(n) = self.by_key.get_mut(key) {
            n.leases.remove(&task);
        }
    }

    /// The node `key`, to record what it did.
    pub(super) fn get_mut(&mut self, key: &PublicKey) -> Option<&mut Node> {
        self.by_key.get_mut(key)
    }

    /// Every node seen.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&PublicKey, &Node)> {
        self.by_key.iter()
    }

    /// Forget `key` if nothing ties the pool to it: no open connection, no
    /// lease, no result delivered (nodes that did work keep their uptime
    /// record across reconnects). Returns whether it was forgotten.
    pub(super) fn evict_if_idle(&mut self, key: &PublicKey) -> bool {
        let idle = self
            .by_key
            .get(key)
            .is_some_and(|n| !n.is_connected() && n.leases.is_empty() && n.delivered == 0);
        if idle {
            self.by_key.remove(key);
        }
        idle
    }

    /// Nodes held in memory.
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }
}

impl<S: Store> Coordinator<S> {
    /// A node said hello.
    pub fn handle_node_hello(
        &mut self,
        now: Instant,
        key: PublicKey,
        caps: Capabilities,
    ) -> Result<(), Refusal> {
        if let Err(e) = caps.check(&self.cfg.capabilities) {
            return Err(Refusal {
                code: ErrorCode::Invalid,
                message: e.to_string(),
                close: true,
            });
        }
        if !self.admits_node(&key) {
            return Err(Refusal {
                code: ErrorCode::Forbidden,
                message: format!("node {key} is not on this pool's allowlist"),
                close: true,
            });
        }
        if let Some(st) = self.standing.get(&key) {
            if st.banned {
                return Err(Refusal {
                    code: ErrorCode::Forbidden,
                    message: format!(
                        "node {key} is banned from this pool after {} wrong results",
                        st.strikes
                    ),
                    close: true,
                });
            }
            // Quarantine carried over a restart of the pool.
            let now_unix = self.unix(now);
            if now_unix > 0
                && st.quarantined_until > now_unix
                && !self.quarantine.contains_key(&key)
            {
                self.quarantine.insert(
                    key,
                    now + Duration::from_secs(st.quarantined_until - now_unix),
                );
            }
        }
        self.nodes.connect(now, key, caps);
        self.store.node_seen(&key, 0, 0, self.unix(now))?;
        Ok(())
    }

    /// A node's connection closed. Its leases stay until they expire: a
    /// node that reconnects in time keeps them. A node that holds nothing,
    /// delivered nothing and was never judged is forgotten at once (a
    /// stranger making fresh keys leaves nothing behind in memory).
    pub fn handle_node_gone(&mut self, now: Instant, key: &PublicKey) {
        self.nodes.disconnect(now, key);
        self.forget_if_idle(key);
    }

    /// Forget `key`'s in-memory node state if it is disconnected, holds no
    /// lease, delivered nothing and was never judged (called on disconnect
    /// and when a lease of a disconnected node ends).
    pub(super) fn forget_if_idle(&mut self, key: &PublicKey) {
        if !self.standing.contains_key(key) {
            self.nodes.evict_if_idle(key);
        }
    }

    /// Nodes held in memory (connected, or disconnected with leases).
    pub fn nodes_in_memory(&self) -> usize {
        self.nodes.len()
    }

    /// A task ended on `key`: successfully or not. Failures send the task
    /// elsewhere (the caller re-queues it with `failed_on`); enough of them
    /// trip the node's circuit breaker, which quarantines it.
    pub(super) fn node_finished(&mut self, now: Instant, key: &PublicKey, failed: bool) {
        let p = self.cfg.leasing.clone();
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        let failures = node.recent.iter().filter(|f| **f).count() as u32 + u32::from(failed);
        if !node.finished(failed, &p) {
            return;
        }
        let until = now + p.breaker_quarantine;
        self.quarantine.insert(*key, until);
        let now_unix = self.unix(now);
        let st = self
            .standing
            .entry(*key)
            .or_insert_with(|| crate::verify::Standing::new(&self.cfg.verify));
        st.quarantined_until = st
            .quarantined_until
            .max(now_unix + p.breaker_quarantine.as_secs());
        let st = *st;
        if let Err(e) = self.store.put_standing(key, &st) {
            tracing::warn!(node = %key.short(), "saving a cut-off: {e}");
        }
        self.events.push_back(PoolEvent::CutOff {
            node: *key,
            failures,
            until,
        });
    }
}
