//! The pool's settings: [`PoolConfig`] (what the coordinator runs with,
//! with [`Admission`]) and the configuration file that fills it
//! (`tidepool pool serve --config pool.toml`).
//!
//! Every field is optional; the defaults are those listed here:
//!
//! ```toml
//! listen = "0.0.0.0:7070"          # UDP address for QUIC
//! key = "pool.key"                 # the pool's key (default: ~/.config/tidepool/pool.key,
//!                                  #   i.e. $XDG_CONFIG_HOME/tidepool; tidepool keygen --role pool)
//! data_dir = "pool-data"           # pool.db and blobs/ (default: ~/.local/share/tidepool/pool,
//!                                  #   i.e. $XDG_DATA_HOME/tidepool/pool; relative paths: to this file)
//! publishers = []                  # keys whose bundles are accepted
//! clients = []                     # keys that may submit besides publishers
//! admins = []                      # the pool owner's keys: see every job, canaries and challenges anywhere, export the ledger
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
//! trusted = []                     # pool-owned node keys: a strike needs one of them to decide
//! trusted_reputation = 0           # where trusted nodes start: 0 = 0.01% of their results
//!                                  # re-executed from the first; 10000 = checked like anyone's
//! decide_after = 100               # confirmed results (and no strike) before an untrusted node
//!                                  # may decide a disagreement; without a trusted node in the
//!                                  # agreeing pair the result is `disputed`, nobody is struck
//! canary_rate = 0.01               # share of lease grants that also carry a canary
//! decoy_rate = 0.05                # per llm-tier check granted, the chance of one more: a decoy
//!                                  # whose replayed tokens the pool corrupted; a verifier that
//!                                  # accepts the corrupted token is struck (a lazy verifier that
//!                                  # echoes claims survives n checks with chance (1 - rate)^n)
//!
//! [leasing]                        # how much work a node gets: the pool decides, not the node
//! start_leases = 8                 # leases a node may hold before it has delivered anything
//!                                  # ... plus one per result it delivered (since its last strike or cut-off)
//! max_leases = 64                  # most leases any node may hold, whatever it claims
//! grace_ms = 60000                 # a lease ends at the bundle's timeout_ms per task ahead of it
//!                                  # on the node's slots plus this, renewed or not
//! breaker_window = 20              # a node's latest finished tasks looked at by the circuit breaker
//! breaker_failures = 5             # ... at least this many failed, and more failed than not:
//! breaker_quarantine_secs = 300    # ... it gets no tasks this long (its failed tasks go elsewhere)
//! grant_bytes = 8388608            # input bytes one lease answer carries (at least one task)
//!
//! [quotas]                         # what one client (or one publisher's bundles) may make the pool hold and run
//! queued_tasks = 2000000           # tasks of its jobs waiting at once (a submission past it is refused)
//! running_tasks = 0                # tasks of its jobs running at once (0: no limit)
//! open_jobs = 16                   # jobs opened for chunked submission and not sealed
//! max_priority = 0                 # highest priority its jobs may ask for (admins: any)
//! weights = {}                     # a client key's share of the nodes, relative (others: 1)
//!                                  # e.g. { "ed25519:..." = 4 }
//! stored_bytes = 17179869184       # bytes of inputs and outputs its jobs hold (16 GiB; 0: no limit)
//! publisher_queued_tasks = 0       # tasks waiting of jobs on one publisher's bundles, all clients (0: no limit)
//! publisher_running_tasks = 0      # tasks running of jobs on one publisher's bundles (0: no limit)
//! publisher_stored_bytes = 0       # bytes the jobs on one publisher's bundles hold (0: no limit)
//!
//! [retention]                      # how long the pool keeps what it computed
//! keep_days = 30                   # a finished job's inputs and outputs are removed this long after
//!                                  # its last result (at once once its client says `job forget`);
//!                                  # receipts stay for the ledger; an unsealed job that took no
//!                                  # input this long is ended and removed; 0 = keep for ever
//! gc_every_secs = 3600             # how often the pool removes them (also `tidepool pool gc`)
//!
//! [limits]                         # what one peer may make the pool hold
//! max_lease_bytes = 65536          # largest lease request (renewals name every running lease)
//! max_results_bytes = 16842752     # largest results frame (the outputs)
//! max_submit_bytes = 16842752      # largest submission, chunk of inputs or canary list
//! max_request_bytes = 65536        # largest of any other request (status, fetch, publish, challenge)
//! connections_per_ip = 64          # open connections from one IP address
//! connections_per_key = 8          # open connections from one key
//! streams_per_connection = 32      # requests one connection may have open at once
//! in_flight_per_connection = 8     # requests of one connection waiting for the coordinator
//! buffered_bytes_per_connection = 33554432   # request bytes one connection may have in memory
//! buffered_bytes_total = 536870912 # request bytes all connections together may have in memory
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
    /// How much a node may hold, how long a lease may last, the circuit
    /// breaker.
    pub leasing: LeasePolicy,
    /// What one peer may make the pool hold (frame sizes by request,
    /// connections, streams, buffered bytes); used by the network shell.
    pub limits: NetLimits,
    /// What one client may queue, run and open, and its share of the
    /// nodes.
    pub quotas: Quotas,
    /// How long finished jobs' inputs and outputs are kept.
    pub retention: Retention,
}

/// How long the pool keeps finished jobs' inputs and outputs (receipts stay
/// for the ledger). Defaults in the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// Kept this long after a job's last result (`None`: for ever); a job
    /// its client forgot goes at the next collection.
    pub keep: Option<Duration>,
    /// How often the pool collects.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep: Some(Duration::from_secs(30 * 86_400)),
            every: Duration::from_secs(3600),
        }
    }
}

/// What one client may make the pool hold and run, and its share of the
/// nodes. Defaults in the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Quotas {
    /// Tasks of one client's jobs waiting at once; a submission or chunk
    /// that would pass it is refused (`Busy`) and nothing of it is stored.
    pub queued_tasks: u64,
    /// Tasks of one client's jobs running at once (0: no limit); the rest
    /// wait while other clients' tasks are served.
    pub running_tasks: u32,
    /// Jobs one client may have open (chunked, not sealed) at once.
    pub open_jobs: u32,
    /// Highest priority a client's jobs may ask for; admins may ask any.
    pub max_priority: i8,
    /// A client's share of the nodes relative to others' (absent: 1).
    pub weights: std::collections::BTreeMap<PublicKey, u32>,
    /// Bytes of inputs and outputs one client's jobs may hold (0: no
    /// limit); a submission or chunk that would pass it is refused.
    pub stored_bytes: u64,
    /// Tasks waiting at once of jobs on one publisher's bundles, all
    /// clients together (0: no limit).
    pub publisher_queued_tasks: u64,
    /// Tasks running at once of jobs on one publisher's bundles (0: no
    /// limit); the rest wait while other publishers' tasks are served.
    pub publisher_running_tasks: u32,
    /// Bytes the jobs on one publisher's bundles may hold (0: no limit).
    pub publisher_stored_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            queued_tasks: 2_000_000,
            running_tasks: 0,
            open_jobs: 16,
            max_priority: 0,
            weights: Default::default(),
            stored_bytes: 16 << 30,
            publisher_queued_tasks: 0,
            publisher_running_tasks: 0,
            publisher_stored_bytes: 0,
        }
    }
}

impl Quotas {
    /// `client`'s weight in the fair share.
    pub fn weight(&self, client: &PublicKey) -> f64 {
        f64::from(self.weights.get(client).copied().unwrap_or(1).max(1))
    }
}

/// How much work a node gets and for how long: the pool's decision, not the
/// node's claim. Defaults in the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasePolicy {
    /// Leases a node may hold before it has delivered a result.
    pub start_leases: u32,
    /// Most leases any node may hold.
    pub max_leases: u32,
    /// Added to the bundle's timeout(s) to make a lease's deadline.
    pub grace: Duration,
    /// Finished tasks per node the circuit breaker looks at.
    pub breaker_window: u32,
    /// Failures in that window (and more failures than successes) that cut
    /// a node off.
    pub breaker_failures: u32,
    /// How long a cut-off node gets no tasks.
    pub breaker_quarantine: Duration,
    /// Most input bytes one lease answer carries (at least one task,
    /// whatever its size), so a batch of large inputs is spread over
    /// answers that fit a frame.
    pub grant_bytes: u64,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self {
            start_leases: 8,
            max_leases: 64,
            grace: Duration::from_secs(60),
            breaker_window: 20,
            breaker_failures: 5,
            breaker_quarantine: Duration::from_secs(300),
            grant_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Budgets of the network shell: what one peer may make the pool read and
/// hold. Defaults in the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLimits {
    /// Largest `Lease` frame.
    pub max_lease_bytes: usize,
    /// Largest `Results` frame.
    pub max_results_bytes: usize,
    /// Largest `Submit` or `AddCanaries` frame.
    pub max_submit_bytes: usize,
    /// Largest frame of any other request after the hello (`PutBlob` is
    /// always allowed one chunk).
    pub max_request_bytes: usize,
    /// Open connections from one IP address.
    pub connections_per_ip: u32,
    /// Open connections from one key.
    pub connections_per_key: u32,
    /// Streams (requests) one connection may have open at once.
    pub streams_per_connection: u32,
    /// Requests of one connection queued for the coordinator thread at once.
    pub in_flight_per_connection: u32,
    /// Request bytes one connection may have in memory at once.
    pub buffered_bytes_per_connection: usize,
    /// Request bytes all connections together may have in memory at once.
    pub buffered_bytes_total: usize,
}

impl NetLimits {
    /// The largest frame accepted after the hello for a request named
    /// `name` (see [`tidepool_proto::wire::message_name`]); an unnamed or
    /// unknown frame gets the small limit (it will be refused as malformed).
    pub fn frame_limit(&self, name: Option<&str>) -> usize {
        match name {
            Some("Lease") => self.max_lease_bytes,
            Some("Results") => self.max_results_bytes,
            Some("Submit" | "AppendInputs" | "AddCanaries") => self.max_submit_bytes,
            // One chunk of a blob, whatever the small limit.
            Some("PutBlob") => self
                .max_request_bytes
                .max(tidepool_proto::wire::BLOB_CHUNK_BYTES + 4096),
            _ => self.max_request_bytes,
        }
    }
}

impl Default for NetLimits {
    fn default() -> Self {
        Self {
            max_lease_bytes: 64 * 1024,
            max_results_bytes: tidepool_proto::wire::MAX_FRAME_BYTES,
            max_submit_bytes: tidepool_proto::wire::MAX_FRAME_BYTES,
            max_request_bytes: 64 * 1024,
            connections_per_ip: 64,
            connections_per_key: 8,
            streams_per_connection: 32,
            in_flight_per_connection: 8,
            buffered_bytes_per_connection: 32 * 1024 * 1024,
            buffered_bytes_total: 512 * 1024 * 1024,
        }
    }
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
            leasing: LeasePolicy::default(),
            limits: NetLimits::default(),
            quotas: Quotas::default(),
            retention: Retention::default(),
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
    /// Leasing policy.
    #[serde(default)]
    pub leasing: LeasingFile,
    /// Network budgets.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Per-client quotas and shares.
    #[serde(default)]
    pub quotas: QuotasFile,
    /// Retention.
    #[serde(default)]
    pub retention: RetentionFile,
    /// The read-only HTTP listener (status page, `/metrics`, health); off
    /// when absent.
    #[serde(default)]
    pub http: Option<HttpFile>,
}

/// The `[http]` table: where the status page, `/metrics`, `/healthz` and
/// `/readyz` are served. Off unless the table is present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// TCP address; loopback unless you mean it (the page and `/metrics`
    /// need the token, but the listener speaks plain HTTP).
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// File holding the bearer token (one line). Absent: a random token is
    /// made on first start in `<data_dir>/http-token` (mode 0600) and kept.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Connections served at once (default 32; more wait unaccepted).
    #[serde(default = "default_http_connections")]
    pub max_connections: usize,
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

fn default_http_connections() -> usize {
    32
}

impl HttpFile {
    /// The token: read from `token_file`, or made once in `data_dir`.
    pub fn token(&self, data_dir: &Path) -> Result<String, ConfigError> {
        let made = data_dir.join("http-token");
        tidepool_net::http::token(self.token_file.as_deref(), &made).map_err(|e| {
            ConfigError::Invalid {
                path: self.token_file.clone().unwrap_or(made),
                why: format!("[http] token_file: {e}"),
            }
        })
    }
}

/// The `[retention]` table (see [`Retention`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    /// Days a finished job's payloads are kept (0: for ever).
    #[serde(default = "default_keep_days")]
    pub keep_days: u64,
    /// Seconds between collections.
    #[serde(default = "default_gc_every")]
    pub gc_every_secs: u64,
}

impl Default for RetentionFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty table takes every default")
    }
}

fn default_keep_days() -> u64 {
    30
}

fn default_gc_every() -> u64 {
    3600
}

/// The `[quotas]` table (see [`Quotas`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasFile {
    /// Tasks waiting per client.
    #[serde(default = "default_queued_tasks")]
    pub queued_tasks: u64,
    /// Tasks running per client (0: no limit).
    #[serde(default)]
    pub running_tasks: u32,
    /// Open jobs per client.
    #[serde(default = "default_open_jobs")]
    pub open_jobs: u32,
    /// Highest priority a client may ask for.
    #[serde(default)]
    pub max_priority: i8,
    /// Shares by client key.
    #[serde(default)]
    pub weights: std::collections::BTreeMap<PublicKey, u32>,
    /// Bytes held per client (0: no limit).
    #[serde(default = "default_stored_bytes")]
    pub stored_bytes: u64,
    /// Tasks waiting per publisher (0: no limit).
    #[serde(default)]
    pub publisher_queued_tasks: u64,
    /// Tasks running per publisher (0: no limit).
    #[serde(default)]
    pub publisher_running_tasks: u32,
    /// Bytes held per publisher (0: no limit).
    #[serde(default)]
    pub publisher_stored_bytes: u64,
}

impl Default for QuotasFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty table takes every default")
    }
}

fn default_queued_tasks() -> u64 {
    Quotas::default().queued_tasks
}

fn default_open_jobs() -> u32 {
    Quotas::default().open_jobs
}

fn default_stored_bytes() -> u64 {
    Quotas::default().stored_bytes
}

/// The `[leasing]` table (see [`LeasePolicy`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeasingFile {
    /// Leases before any delivered result.
    #[serde(default = "default_start_leases")]
    pub start_leases: u32,
    /// Most leases per node.
    #[serde(default = "default_max_leases")]
    pub max_leases: u32,
    /// Grace past the bundle's timeout, ms.
    #[serde(default = "default_grace")]
    pub grace_ms: u64,
    /// Finished tasks the breaker looks at.
    #[serde(default = "default_breaker_window")]
    pub breaker_window: u32,
    /// Failures that trip it.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long a tripped node waits, seconds.
    #[serde(default = "default_breaker_quarantine")]
    pub breaker_quarantine_secs: u64,
    /// Input bytes per lease answer.
    #[serde(default = "default_grant_bytes")]
    pub grant_bytes: u64,
}

impl Default for LeasingFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty table takes every default")
    }
}

/// The `[limits]` table (see [`NetLimits`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest lease request, bytes.
    #[serde(default = "default_small_frame")]
    pub max_lease_bytes: usize,
    /// Largest results frame, bytes.
    #[serde(default = "default_big_frame")]
    pub max_results_bytes: usize,
    /// Largest submission, bytes.
    #[serde(default = "default_big_frame")]
    pub max_submit_bytes: usize,
    /// Largest other request, bytes.
    #[serde(default = "default_small_frame")]
    pub max_request_bytes: usize,
    /// Connections per IP address.
    #[serde(default = "default_per_ip")]
    pub connections_per_ip: u32,
    /// Connections per key.
    #[serde(default = "default_per_key")]
    pub connections_per_key: u32,
    /// Open streams per connection.
    #[serde(default = "default_streams")]
    pub streams_per_connection: u32,
    /// Requests per connection waiting for the coordinator.
    #[serde(default = "default_in_flight")]
    pub in_flight_per_connection: u32,
    /// Buffered request bytes per connection.
    #[serde(default = "default_conn_bytes")]
    pub buffered_bytes_per_connection: usize,
    /// Buffered request bytes in total.
    #[serde(default = "default_total_bytes")]
    pub buffered_bytes_total: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        toml::from_str("").expect("an empty table takes every default")
    }
}

fn default_start_leases() -> u32 {
    LeasePolicy::default().start_leases
}
fn default_max_leases() -> u32 {
    LeasePolicy::default().max_leases
}
fn default_grace() -> u64 {
    LeasePolicy::default().grace.as_millis() as u64
}
fn default_breaker_window() -> u32 {
    LeasePolicy::default().breaker_window
}
fn default_breaker_failures() -> u32 {
    LeasePolicy::default().breaker_failures
}
fn default_breaker_quarantine() -> u64 {
    LeasePolicy::default().breaker_quarantine.as_secs()
}
fn default_grant_bytes() -> u64 {
    LeasePolicy::default().grant_bytes
}
fn default_small_frame() -> usize {
    NetLimits::default().max_request_bytes
}
fn default_big_frame() -> usize {
    NetLimits::default().max_results_bytes
}
fn default_per_ip() -> u32 {
    NetLimits::default().connections_per_ip
}
fn default_per_key() -> u32 {
    NetLimits::default().connections_per_key
}
fn default_streams() -> u32 {
    NetLimits::default().streams_per_connection
}
fn default_in_flight() -> u32 {
    NetLimits::default().in_flight_per_connection
}
fn default_conn_bytes() -> usize {
    NetLimits::default().buffered_bytes_per_connection
}
fn default_total_bytes() -> usize {
    NetLimits::default().buffered_bytes_total
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
    /// Where trusted nodes start (0: at the floor).
    #[serde(default)]
    pub trusted_reputation: u32,
    /// Confirmed results before an untrusted node may decide.
    #[serde(default = "default_decide_after")]
    pub decide_after: u64,
    /// Share of grants carrying a canary.
    #[serde(default = "default_canary_rate")]
    pub canary_rate: f64,
    /// Chance of a decoy per llm-tier check granted.
    #[serde(default = "default_decoy_rate")]
    pub decoy_rate: f64,
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
fn default_decide_after() -> u64 {
    100
}
fn default_canary_rate() -> f64 {
    0.01
}
fn default_decoy_rate() -> f64 {
    0.05
}

fn default_listen() -> SocketAddr {
    ([0, 0, 0, 0], 7070).into()
}
fn default_key() -> PathBuf {
    tidepool_models::config_dir().join("pool.key")
}
fn default_data() -> PathBuf {
    tidepool_models::data_dir().join("pool")
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
        if let Some(t) = f.http.as_mut().and_then(|h| h.token_file.as_mut()) {
            *t = base.join(&*t);
        }
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
        let l = &self.leasing;
        if l.start_leases == 0 || l.max_leases < l.start_leases {
            return Err(bad(
                "leasing.max_leases",
                format!(
                    "leasing.start_leases ({}) must be at least 1 and at most leasing.max_leases ({})",
                    l.start_leases, l.max_leases
                ),
            ));
        }
        if self.retention.gc_every_secs == 0 {
            return Err(bad(
                "retention.gc_every_secs",
                "retention.gc_every_secs must be at least 1",
            ));
        }
        let q = &self.quotas;
        if q.queued_tasks == 0 || q.open_jobs == 0 {
            return Err(bad(
                "quotas.queued_tasks",
                "quotas.queued_tasks and quotas.open_jobs must be at least 1",
            ));
        }
        if let Some((k, _)) = q.weights.iter().find(|(_, w)| **w == 0) {
            return Err(bad(
                "quotas.weights",
                format!("quotas.weights: the weight of {k} must be at least 1"),
            ));
        }
        let frame = tidepool_proto::wire::MAX_FRAME_BYTES as u64;
        if !(1024..=frame / 2).contains(&l.grant_bytes) {
            return Err(bad(
                "leasing.grant_bytes",
                format!(
                    "leasing.grant_bytes ({}) must be between 1024 and {}",
                    l.grant_bytes,
                    frame / 2
                ),
            ));
        }
        if l.breaker_failures == 0 || l.breaker_failures > l.breaker_window {
            return Err(bad(
                "leasing.breaker_failures",
                format!(
                    "leasing.breaker_failures ({}) must be between 1 and leasing.breaker_window ({})",
                    l.breaker_failures, l.breaker_window
                ),
            ));
        }
        let n = &self.limits;
        let max = tidepool_proto::wire::MAX_FRAME_BYTES;
        for (setting, v) in [
            ("limits.max_lease_bytes", n.max_lease_bytes),
            ("limits.max_results_bytes", n.max_results_bytes),
            ("limits.max_submit_bytes", n.max_submit_bytes),
            ("limits.max_request_bytes", n.max_request_bytes),
        ] {
            if !(1024..=max).contains(&v) {
                return Err(bad(
                    setting,
                    format!("{setting} ({v}) must be between 1024 and {max}"),
                ));
            }
        }
        for (setting, v) in [
            ("limits.connections_per_ip", n.connections_per_ip),
            ("limits.connections_per_key", n.connections_per_key),
            ("limits.streams_per_connection", n.streams_per_connection),
            (
                "limits.in_flight_per_connection",
                n.in_flight_per_connection,
            ),
        ] {
            if v == 0 {
                return Err(bad(setting, format!("{setting} must be at least 1")));
            }
        }
        let biggest = n.max_results_bytes.max(n.max_submit_bytes);
        if n.buffered_bytes_per_connection < biggest
            || n.buffered_bytes_total < n.buffered_bytes_per_connection
        {
            return Err(bad(
                "limits.buffered_bytes_per_connection",
                format!(
                    "limits.buffered_bytes_per_connection ({}) must hold the largest frame ({biggest}) \
                     and be at most limits.buffered_bytes_total ({})",
                    n.buffered_bytes_per_connection, n.buffered_bytes_total
                ),
            ));
        }
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
        if v.trusted_reputation > crate::verify::FULL {
            return Err(bad(
                "verification.trusted_reputation",
                format!(
                    "verification.trusted_reputation ({}) must be at most 10000",
                    v.trusted_reputation
                ),
            ));
        }
        if !(0.0..=1.0).contains(&v.decoy_rate) {
            return Err(bad(
                "verification.decoy_rate",
                format!(
                    "verification.decoy_rate ({}) must be between 0 and 1",
                    v.decoy_rate
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
                trusted_reputation: self.verification.trusted_reputation,
                decide_after: self.verification.decide_after,
                canary_rate: self.verification.canary_rate,
                decoy_rate: self.verification.decoy_rate,
                secret: None,
            },
            leasing: LeasePolicy {
                start_leases: self.leasing.start_leases,
                max_leases: self.leasing.max_leases,
                grace: Duration::from_millis(self.leasing.grace_ms),
                breaker_window: self.leasing.breaker_window,
                breaker_failures: self.leasing.breaker_failures,
                breaker_quarantine: Duration::from_secs(self.leasing.breaker_quarantine_secs),
                grant_bytes: self.leasing.grant_bytes,
            },
            limits: NetLimits {
                max_lease_bytes: self.limits.max_lease_bytes,
                max_results_bytes: self.limits.max_results_bytes,
                max_submit_bytes: self.limits.max_submit_bytes,
                max_request_bytes: self.limits.max_request_bytes,
                connections_per_ip: self.limits.connections_per_ip,
                connections_per_key: self.limits.connections_per_key,
                streams_per_connection: self.limits.streams_per_connection,
                in_flight_per_connection: self.limits.in_flight_per_connection,
                buffered_bytes_per_connection: self.limits.buffered_bytes_per_connection,
                buffered_bytes_total: self.limits.buffered_bytes_total,
            },
            retention: Retention {
                keep: (self.retention.keep_days > 0)
                    .then(|| Duration::from_secs(self.retention.keep_days * 86_400)),
                every: Duration::from_secs(self.retention.gc_every_secs),
            },
            quotas: Quotas {
                queued_tasks: self.quotas.queued_tasks,
                running_tasks: self.quotas.running_tasks,
                open_jobs: self.quotas.open_jobs,
                max_priority: self.quotas.max_priority,
                weights: self.quotas.weights.clone(),
                stored_bytes: self.quotas.stored_bytes,
                publisher_queued_tasks: self.quotas.publisher_queued_tasks,
                publisher_running_tasks: self.quotas.publisher_running_tasks,
                publisher_stored_bytes: self.quotas.publisher_stored_bytes,
            },
            ..PoolConfig::default()
        }
    }
}
