//! Nodes as this process has seen them: what each said it can run, its
//! connections and uptime, and the tasks it holds (the `Nodes` sub-state);
//! hello and goodbye.

use super::{Coordinator, PoolEvent};
use crate::config::LeasePolicy;
use crate::store::Store;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
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
    /// Its uptime in hundredths as of its last hello or the last
    /// re-bucketing of `Nodes` (at most [`REBUCKET_EVERY`] old while it has
    /// room): where it counts in `Nodes::buckets`.
    bucket: u8,
}

/// How much better another node's uptime must be for it to be preferred.
pub const UPTIME_MARGIN: f64 = 0.1;

/// How old the uptime buckets of the nodes with room may grow before the
/// lease path counts them again (uptime moves by at most this over a
/// node's age between two countings).
pub const REBUCKET_EVERY: Duration = Duration::from_secs(1);

/// Uptime buckets: hundredths, 0..=100.
const BUCKETS: usize = 101;

/// The bucket of an uptime in `0.0..=1.0`.
fn bucket_of(uptime: f64) -> u8 {
    (uptime.clamp(0.0, 1.0) * 100.0).floor() as u8
}

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
            bucket: 100,
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
#[derive(Debug)]
pub(super) struct Nodes {
    /// The nodes.
    by_key: HashMap<PublicKey, Node>,
    /// Keys of the nodes that [have room](Node::has_room) under `policy`:
    /// connected and holding less than their allowance. Kept in step with
    /// every change of a node's connections, leases and record, so that
    /// the lease path compares a node with the few that have room on a
    /// busy pool rather than with every node connected (issue #18: 100,000
    /// nodes).
    room: HashSet<PublicKey>,
    /// The pool's leasing policy, fixed for the coordinator's life: what
    /// `room` is measured against.
    policy: LeasePolicy,
    /// How many nodes of `room` are in each uptime bucket (by their
    /// `Node::bucket`): "is a clearly steadier node free?" in a hundred
    /// steps, not one per node. Kept with `room`; counted again from the
    /// nodes' uptimes at most every [`REBUCKET_EVERY`].
    buckets: [u32; BUCKETS],
    /// When `buckets` were last counted from the nodes' uptimes.
    rebucketed: Option<Instant>,
}

impl Nodes {
    /// No node yet; allowances under `policy`.
    pub(super) fn new(policy: LeasePolicy) -> Self {
        Self {
            by_key: HashMap::new(),
            room: HashSet::new(),
            policy,
            buckets: [0; BUCKETS],
            rebucketed: None,
        }
    }

    /// Bring `key`'s place in `room` (and its bucket's count) up to date
    /// after a change.
    fn refresh(&mut self, key: &PublicKey) {
        let Some(n) = self.by_key.get(key) else {
            // Evicted nodes leave `room` in `evict_if_idle`, which knows
            // their bucket.
            return;
        };
        let bucket = n.bucket as usize;
        if n.has_room(&self.policy) {
            if self.room.insert(*key) {
                self.buckets[bucket] += 1;
            }
        } else if self.room.remove(key) {
            self.buckets[bucket] -= 1;
        }
    }

    /// Count the buckets again from the uptimes at `now` of the nodes with
    /// room.
    fn rebucket(&mut self, now: Instant) {
        self.buckets = [0; BUCKETS];
        for k in &self.room {
            if let Some(n) = self.by_key.get_mut(k) {
                n.bucket = bucket_of(n.uptime(now));
                self.buckets[n.bucket as usize] += 1;
            }
        }
        self.rebucketed = Some(now);
    }

    /// Does some node other than `key` have room with an uptime clearly
    /// above `uptime` (by more than `margin`)? Uptimes of the others are
    /// as of the last counting (at most [`REBUCKET_EVERY`] before `now`)
    /// and in hundredths: a node within a hundredth of the line does not
    /// count. Cost: a hundred additions, and every `REBUCKET_EVERY` one
    /// step per node with room.
    pub(super) fn steadier_has_room(
        &mut self,
        now: Instant,
        key: &PublicKey,
        uptime: f64,
        margin: f64,
    ) -> bool {
        if self
            .rebucketed
            .is_none_or(|t| now.saturating_duration_since(t) >= REBUCKET_EVERY)
        {
            self.rebucket(now);
        }
        let line = uptime + margin;
        if line >= 1.0 {
            return false;
        }
        let from = bucket_of(line) as usize + 1;
        let mut above: u32 = self.buckets[from.min(BUCKETS)..].iter().sum();
        if let Some(me) = self.by_key.get(key) {
            if self.room.contains(key) && me.bucket as usize >= from {
                above -= 1;
            }
        }
        above > 0
    }

    /// A connection from `key` said hello with `caps` at `now`.
    pub(super) fn connect(&mut self, now: Instant, key: PublicKey, caps: Capabilities) {
        let n = self.by_key.entry(key).or_insert_with(|| Node::new(now));
        n.caps = caps;
        n.draining = false;
        n.connections += 1;
        n.connected_since.get_or_insert(now);
        // Its uptime now, in its bucket now (out of `room` while it moves).
        if self.room.remove(&key) {
            self.buckets[n.bucket as usize] -= 1;
        }
        n.bucket = bucket_of(n.uptime(now));
        self.refresh(&key);
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
        self.refresh(key);
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
        self.refresh(key);
    }

    /// `key` no longer holds `task`.
    pub(super) fn drop_lease(&mut self, key: &PublicKey, task: TaskId) {
        if let Some(n) = self.by_key.get_mut(key) {
            n.leases.remove(&task);
        }
        self.refresh(key);
    }

    /// Record a finished task on `key` (see [`Node::finished`]): `None`
    /// for a node not seen, else whether its breaker tripped, with the
    /// failures in its window that tripped it.
    pub(super) fn finished(&mut self, key: &PublicKey, failed: bool) -> Option<(bool, u32)> {
        let n = self.by_key.get_mut(key)?;
        let failures = n.recent.iter().filter(|f| **f).count() as u32 + u32::from(failed);
        let tripped = n.finished(failed, &self.policy);
        self.refresh(key);
        Some((tripped, failures))
    }

    /// Every node seen.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&PublicKey, &Node)> {
        self.by_key.iter()
    }

    /// The nodes that have room (connected, holding less than their
    /// allowance): on a busy pool a few of the connected ones.
    pub(super) fn with_room(&self) -> impl Iterator<Item = (&PublicKey, &Node)> {
        self.room
            .iter()
            .filter_map(|k| self.by_key.get(k).map(|n| (k, n)))
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
            if let Some(n) = self.by_key.remove(key) {
                if self.room.remove(key) {
                    self.buckets[n.bucket as usize] -= 1;
                }
            }
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
        let p = &self.cfg.leasing;
        let Some((true, failures)) = self.nodes.finished(key, failed) else {
            return;
        };
        let until = now + p.breaker_quarantine;
        self.quarantine.insert(*key, until);
        let now_unix = self.unix(now);
        let st = self
            .standing
            .entry(*key)
            .or_insert_with(|| crate::verify::Standing::new(&self.cfg.verify, key));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::{KeyRole, SecretKey};

    /// `room` is exactly the nodes that have room, after every kind of
    /// change: connect, hold, drop, a breaker trip, disconnect, eviction.
    #[test]
    fn the_room_index_follows_every_change() {
        let policy = LeasePolicy {
            start_leases: 2,
            max_leases: 4,
            breaker_window: 4,
            breaker_failures: 2,
            ..LeasePolicy::default()
        };
        let mut nodes = Nodes::new(policy.clone());
        let keys: Vec<PublicKey> = (1..=3u8)
            .map(|i| SecretKey::from_seed(KeyRole::Node, &[i; 32]).public())
            .collect();
        let t0 = Instant::now();
        let caps = Capabilities {
            slots: 2,
            queue: 2,
            ..Capabilities::default()
        };
        let check = |nodes: &Nodes, step: &str| {
            let mut indexed: Vec<PublicKey> = nodes.with_room().map(|(k, _)| *k).collect();
            let mut want: Vec<PublicKey> = nodes
                .iter()
                .filter(|(_, n)| n.has_room(&policy))
                .map(|(k, _)| *k)
                .collect();
            indexed.sort_by_key(|k| k.to_string());
            want.sort_by_key(|k| k.to_string());
            assert_eq!(indexed, want, "after {step}");
            let counted: u32 = nodes.buckets.iter().sum();
            assert_eq!(counted as usize, indexed.len(), "buckets after {step}");
            indexed.len()
        };
        for k in &keys {
            nodes.connect(t0, *k, caps.clone());
        }
        assert_eq!(check(&nodes, "connect"), 3);
        // Two leases fill a fresh node's allowance (start_leases = 2).
        nodes.hold(&keys[0], TaskId(1));
        nodes.hold(&keys[0], TaskId(2));
        assert_eq!(check(&nodes, "hold"), 2);
        // A delivered result earns one more lease: room again.
        assert_eq!(nodes.finished(&keys[0], false), Some((false, 0)));
        assert_eq!(check(&nodes, "a delivered result"), 3);
        nodes.hold(&keys[0], TaskId(3));
        assert_eq!(check(&nodes, "hold"), 2);
        nodes.drop_lease(&keys[0], TaskId(3));
        assert_eq!(check(&nodes, "drop"), 3);
        nodes.hold(&keys[0], TaskId(3));
        // Two failures trip the breaker and take back what was earned.
        nodes.drop_lease(&keys[0], TaskId(3));
        assert_eq!(nodes.finished(&keys[0], true), Some((false, 1)));
        assert_eq!(nodes.finished(&keys[0], true), Some((true, 2)));
        assert_eq!(check(&nodes, "a breaker trip"), 2);
        nodes.disconnect(t0, &keys[1]);
        assert_eq!(check(&nodes, "disconnect"), 1);
        assert!(nodes.evict_if_idle(&keys[1]));
        assert_eq!(check(&nodes, "eviction"), 1);
        nodes.connect(t0, keys[1], caps);
        assert_eq!(check(&nodes, "reconnect"), 2);
    }

    /// A node away half the time sees the steady one while it has room,
    /// and not once it is full; the steady one never sees a steadier one.
    #[test]
    fn a_steadier_node_with_room_is_seen_until_it_is_full() {
        let policy = LeasePolicy {
            start_leases: 1,
            ..LeasePolicy::default()
        };
        let mut nodes = Nodes::new(policy);
        let steady = SecretKey::from_seed(KeyRole::Node, &[1; 32]).public();
        let flaky = SecretKey::from_seed(KeyRole::Node, &[2; 32]).public();
        let t0 = Instant::now();
        let caps = Capabilities {
            slots: 1,
            ..Capabilities::default()
        };
        nodes.connect(t0, steady, caps.clone());
        nodes.connect(t0, flaky, caps.clone());
        nodes.disconnect(t0 + Duration::from_secs(10), &flaky);
        let t20 = t0 + Duration::from_secs(20);
        nodes.connect(t20, flaky, caps);
        let u = |k: &PublicKey| nodes.get(k).map(|n| n.uptime(t20)).unwrap_or_default();
        let (us, uf) = (u(&steady), u(&flaky));
        assert!((uf - 0.5).abs() < 0.01, "{uf}");
        assert!(nodes.steadier_has_room(t20, &flaky, uf, UPTIME_MARGIN));
        assert!(!nodes.steadier_has_room(t20, &steady, us, UPTIME_MARGIN));
        // A margin the steady node does not clear.
        assert!(!nodes.steadier_has_room(t20, &flaky, uf, 0.6));
        nodes.hold(&steady, TaskId(1));
        assert!(!nodes.steadier_has_room(t20, &flaky, uf, UPTIME_MARGIN));
        nodes.drop_lease(&steady, TaskId(1));
        assert!(nodes.steadier_has_room(t20, &flaky, uf, UPTIME_MARGIN));
    }
}
