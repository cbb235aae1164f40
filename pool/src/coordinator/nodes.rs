//! Nodes as this process has seen them: what each said it can run, its
//! connections and uptime, and the tasks it holds (the `Nodes` sub-state);
//! hello and goodbye.

use super::Coordinator;
use crate::store::Store;
use std::collections::{BTreeSet, HashMap};
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

    /// Connected and holding fewer leases than its capacity.
    pub(super) fn has_room(&self) -> bool {
        self.is_connected() && self.leases.len() < self.capacity()
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
        n.connections += 1;
        n.connected_since.get_or_insert(now);
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

    /// Every node seen.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&PublicKey, &Node)> {
        self.by_key.iter()
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
    /// node that reconnects in time keeps them.
    pub fn handle_node_gone(&mut self, now: Instant, key: &PublicKey) {
        self.nodes.disconnect(now, key);
    }
}
