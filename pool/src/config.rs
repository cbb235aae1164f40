//! The pool's settings: [`PoolConfig`] (what the coordinator runs with,
//! with [`Admission`]) and the configuration file that fills it
//! (`tidepool pool serve --config pool.toml`).
//!
//! Every field is optional; the defaults are those listed here:
//!
//! ```toml
//! listen = "0.0.0.0:7070"          # UDP address for QUIC
//! key = "pool.key"                 # the pool's key (tidepool keygen --role pool)
//! data_dir = "pool-data"           # pool.db and blobs/ (relative to this file)
//! publishers = []                  # keys whose bundles are accepted
//! clients = []                     # keys that may submit besides publishers
//! admins = []                      # the pool owner's keys: see every job, canaries and challenges anywhere
//! challenges_per_hour = 60         # challenges one client may make per hour
//! max_hello_bytes = 65536          # largest frame a connection may send before its hello is accepted
//! write_timeout_ms = 10000         # a peer that does not read an answer this long loses its connection
//! node_max_slots = 256             # a node claiming more slots is refused at hello
//! node_max_queue = 256             # ... or more leases held waiting beyond them
//! nodes = []                       # node allowlist; empty = any node (open)
//! lease_ttl_secs = 15              # a lease ends unless renewed within this
//! heartbeat_ms = 3000              # nodes renew this often
//! max_attempts = 3                 # attempts before a task is dead-lettered
//! durability = "process"           # or "power-loss" (fsync every commit)
//!
//! [verification]                   # who gets checked, how often, and what happens to liars
//! initial_reputation = 10000       # a new node's reputation: 10000 = every result re-executed
//! step = 50                        # each confirmed result lowers it by this (~200 to reach 0)
//!                                  # share re-executed: max(1, reputation) / 10000 (0.01% at 0)
//! quarantine_secs = 600            # a node caught with a wrong result gets no tasks this long
//! ban_after_strikes = 3            # ... and is refused for good at this many strikes
//! lookback = 256                   # a caught node's latest unverified results re-checked
//! trusted = []                     # pool-owned node keys, preferred to decide disagreements
//! canary_rate = 0.01               # share of lease grants that also carry a canary
//! ```

use crate::store::Durability;
use crate::verify::VerifyPolicy;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidepool_proto::wire::CapabilityLimits;
use tidepool_proto::PublicKey;

/// Who may connect as a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Any node key.
    Open,
    /// Only these node keys.
    Allowlist(BTreeSet<PublicKey>),
}

/// The pool owner's policy. Documented defaults in [`PoolConfig::default`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How often nodes renew (must be well under `lease_ttl`).
    pub heartbeat: Duration,
    /// Attempts before a task is dead-lettered.
    pub max_attempts: u32,
    /// How long a node waits before asking again when there is no work.
    pub retry: Duration,
    /// Most tasks granted in one lease request.
    pub max_grant: u32,
    /// Which nodes may connect.
    pub admission: Admission,
    /// Keys whose signed bundles the pool accepts.
    pub publishers: BTreeSet<PublicKey>,
    /// Keys that may submit jobs and read results, besides the publishers.
    pub clients: BTreeSet<PublicKey>,
    /// The pool owner's keys: they see every job (hidden ones included), may
    /// add canaries to any bundle and challenge any result. Also clients.
    pub admins: BTreeSet<PublicKey>,
    /// Challenges one client may make per hour (each costs the pool one or
    /// more re-executions).
    pub challenges_per_hour: u32,
    /// How long a new connection may take to say hello before it is closed.
    pub hello_timeout: Duration,
    /// Largest frame a connection may send before its hello is accepted.
    pub max_hello_bytes: usize,
    /// How long a peer has to read an answer (or a blob chunk) before its
    /// connection is closed.
    pub write_timeout: Duration,
    /// Bounds on what a node's hello may claim (slots, queue, list and
    /// string sizes); a hello past them is refused.
    pub capabilities: CapabilityLimits,
    /// Reputation, re-execution, quarantine, canaries.
    pub verify: VerifyPolicy,
}

impl Default for PoolConfig {
    /// Lease 15 s renewed every 3 s, 3 attempts, retry 250 ms, 64 tasks per
    /// grant, open admission, no publishers or admins, 60 challenges per
    /// client per hour, 10 s and 64 KiB to say hello, 10 s to read an
    /// answer, nodes of at most 256 slots and 256 queued leases.
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15),
            heartbeat: Duration::from_secs(3),
            max_attempts: 3,
            retry: Duration::from_millis(250),
            max_grant: 64,
            admission: Admission::Open,
            publishers: BTreeSet::new(),
            clients: BTreeSet::new(),
            admins: BTreeSet::new(),
            challenges_per_hour: 60,
            hello_timeout: Duration::from_secs(10),
            max_hello_bytes: 64 * 1024,
            write_timeout: Duration::from_secs(10),
            capabilities: CapabilityLimits::default(),
            verify: VerifyPolicy::default(),
        }
    }
}

/// The file's contents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// UDP address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Key file.
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// Data directory.
    #[serde(default = "default_data")]
    pub data_dir: PathBuf,
    /// Trusted publishers.
    #[serde(default)]
    pub publishers: BTreeSet<PublicKey>,
    /// Extra clients.
    #[serde(default)]
    pub clients: BTreeSet<PublicKey>,
    /// The pool owner's keys (see every job; canaries and challenges anywhere).
    #[serde(default)]
    pub admins: BTreeSet<PublicKey>,
    /// Challenges per client per hour.
    #[serde(default = "default_challenges")]
    pub challenges_per_hour: u32,
    /// Largest frame before a hello is accepted, bytes.
    #[serde(default = "default_hello_bytes")]
    pub max_hello_bytes: usize,
    /// How long a peer has to read an answer, ms.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// Most slots a node may claim.
    #[serde(default = "default_node_slots")]
    pub node_max_slots: u32,
    /// Most leases a node may hold waiting beyond its slots.
    #[serde(default = "default_node_slots")]
    pub node_max_queue: u32,
    /// Node allowlist (empty: open).
    #[serde(default)]
    pub nodes: BTreeSet<PublicKey>,
    /// Lease length, seconds.
    #[serde(default = "default_ttl")]
    pub lease_ttl_secs: u64,
    /// Heartbeat, ms.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Attempts before dead-lettering.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// `process` or `power-loss`.
    #[serde(default = "default_durability")]
    pub durability: String,
    /// Verification policy.
    #[serde(default)]
    pub verification: VerificationFile,
}

/// The `[verification]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationFile {
    /// A new node's reputation, 0..=10000.
    #[serde(default = "default_reputation")]
    pub initial_reputation: u32,
    /// Reputation lost per confirmed result.
    #[serde(default = "default_step")]
    pub step: u32,
    /// Quarantine after a strike, seconds.
    #[serde(default = "default_quarantine")]
    pub quarantine_secs: u64,
    /// Strikes before a ban.
    #[serde(default = "default_ban")]
    pub ban_after_strikes: u32,
    /// Results of a caught node re-checked.
    #[serde(default = "default_lookback")]
    pub lookback: u32,
    /// Pool-owned nodes.
    #[serde(default)]
    pub trusted: BTreeSet<PublicKey>,
    /// Share of grants carrying a canary.
    #[serde(default = "default_canary_rate")]
    pub canary_rate: f64,
}

impl Default for VerificationFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty table takes every default")
    }
}

fn default_reputation() -> u32 {
    crate::verify::FULL
}
fn default_step() -> u32 {
    50
}
fn default_quarantine() -> u64 {
    600
}
fn default_ban() -> u32 {
    3
}
fn default_lookback() -> u32 {
    256
}
fn default_canary_rate() -> f64 {
    0.01
}

fn default_listen() -> SocketAddr {
    ([0, 0, 0, 0], 7070).into()
}
fn default_key() -> PathBuf {
    "pool.key".into()
}
fn default_data() -> PathBuf {
    "pool-data".into()
}
fn default_ttl() -> u64 {
    15
}
fn default_heartbeat() -> u64 {
    3000
}
fn default_attempts() -> u32 {
    3
}
fn default_challenges() -> u32 {
    60
}
fn default_write_timeout() -> u64 {
    10_000
}
fn default_hello_bytes() -> usize {
    64 * 1024
}
fn default_node_slots() -> u32 {
    256
}
fn default_durability() -> String {
    "process".into()
}

impl Default for PoolFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty file takes every default")
    }
}

/// A setting outside its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct SettingError {
    /// The setting (`heartbeat_ms`, `verification.canary_rate`, ...).
    pub setting: &'static str,
    /// What is wrong with it, naming the setting.
    pub why: String,
}

/// A [`SettingError`] for `setting`.
fn bad(setting: &'static str, why: impl Into<String>) -> SettingError {
    SettingError {
        setting,
        why: why.into(),
    }
}

/// Errors in a pool configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad TOML or a bad field.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl PoolFile {
    /// Read a file; relative paths in it are made relative to its directory.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut f: PoolFile = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        f.key = base.join(&f.key);
        f.data_dir = base.join(&f.data_dir);
        f.validate().map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            why: e.why,
        })?;
        Ok(f)
    }

    /// Check ranges.
    pub fn validate(&self) -> Result<(), SettingError> {
        if self.lease_ttl_secs == 0
            || self.heartbeat_ms == 0
            || self.heartbeat_ms >= self.lease_ttl_secs * 1000
        {
            return Err(bad(
                "heartbeat_ms",
                format!(
                    "heartbeat_ms ({}) must be positive and shorter than lease_ttl_secs ({} s)",
                    self.heartbeat_ms, self.lease_ttl_secs
                ),
            ));
        }
        if self.write_timeout_ms == 0 {
            return Err(bad("write_timeout_ms", "write_timeout_ms must be positive"));
        }
        if self.node_max_slots == 0 {
            return Err(bad("node_max_slots", "node_max_slots must be at least 1"));
        }
        if !(1024..=tidepool_proto::wire::MAX_FRAME_BYTES).contains(&self.max_hello_bytes) {
            return Err(bad(
                "max_hello_bytes",
                format!(
                    "max_hello_bytes ({}) must be between 1024 and {}",
                    self.max_hello_bytes,
                    tidepool_proto::wire::MAX_FRAME_BYTES
                ),
            ));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "max_attempts must be at least 1"));
        }
        self.durability()?;
        let v = &self.verification;
        if v.initial_reputation > crate::verify::FULL {
            return Err(bad(
                "verification.initial_reputation",
                format!(
                    "verification.initial_reputation ({}) must be at most 10000",
                    v.initial_reputation
                ),
            ));
        }
        if !(0.0..=1.0).contains(&v.canary_rate) {
            return Err(bad(
                "verification.canary_rate",
                format!(
                    "verification.canary_rate ({}) must be between 0 and 1",
                    v.canary_rate
                ),
            ));
        }
        if v.ban_after_strikes == 0 {
            return Err(bad(
                "verification.ban_after_strikes",
                "verification.ban_after_strikes must be at least 1",
            ));
        }
        Ok(())
    }

    /// The durability setting.
    pub fn durability(&self) -> Result<Durability, SettingError> {
        match self.durability.as_str() {
            "process" => Ok(Durability::Process),
            "power-loss" => Ok(Durability::PowerLoss),
            other => Err(bad(
                "durability",
                format!("durability {other:?} is not \"process\" or \"power-loss\""),
            )),
        }
    }

    /// The coordinator policy.
    pub fn policy(&self) -> PoolConfig {
        PoolConfig {
            lease_ttl: Duration::from_secs(self.lease_ttl_secs),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            max_attempts: self.max_attempts,
            admission: if self.nodes.is_empty() {
                Admission::Open
            } else {
                Admission::Allowlist(self.nodes.clone())
            },
            publishers: self.publishers.clone(),
            clients: self.clients.clone(),
            admins: self.admins.clone(),
            challenges_per_hour: self.challenges_per_hour,
            max_hello_bytes: self.max_hello_bytes,
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            capabilities: CapabilityLimits {
                max_slots: self.node_max_slots,
                max_queue: self.node_max_queue,
                ..CapabilityLimits::default()
            },
            verify: crate::verify::VerifyPolicy {
                initial_reputation: self.verification.initial_reputation,
                step: self.verification.step,
                quarantine: Duration::from_secs(self.verification.quarantine_secs),
                ban_after: self.verification.ban_after_strikes,
                lookback: self.verification.lookback,
                trusted: self.verification.trusted.clone(),
                canary_rate: self.verification.canary_rate,
                secret: None,
            },
            ..PoolConfig::default()
        }
    }
}
