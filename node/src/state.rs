//! What a node remembers about itself for its owner: `status.json` in its
//! data directory (pool, connection, standing as the pool last told it,
//! tasks done and failed, bundles admitted), written by the running agent
//! and read by `tidepool node status`; and `node.lock`, the lock that lets
//! one process at a time use a data directory.
//!
//! The file is written whole to a temporary name and renamed, so a reader
//! never sees half of it; it is a report, never an input: the agent reads
//! it at start only to carry its lifetime totals on.

use crate::caches::{CacheBook, CacheUse};
use crate::NodeError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tidepool_proto::wire::NodeStanding;
use tidepool_proto::Digest;

/// The report's file name in the data directory.
pub const STATUS_FILE: &str = "status.json";
/// The lock's file name in the data directory.
pub const LOCK_FILE: &str = "node.lock";
/// Bundles the report lists (the most recently used).
pub const MAX_BUNDLES: usize = 64;
/// Failure kinds counted by name (the rest are `other`).
pub const MAX_FAILURE_KINDS: usize = 32;

/// The connection to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// Not connected; trying.
    #[default]
    Connecting,
    /// Connected and taking tasks.
    Connected,
    /// Finishing held tasks before stopping.
    Draining,
    /// The agent stopped.
    Stopped,
}

/// Tasks and results counted over some time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Tally {
    /// Tasks run to a result (an output or the job's own error).
    pub completed: u64,
    /// Tasks that failed on this node.
    pub failed: u64,
    /// Results the pool accepted.
    pub accepted: u64,
    /// Results the pool refused or found stale.
    pub rejected: u64,
    /// Microseconds engines spent in `compute` calls.
    pub engine_us: u64,
    /// Tokens text generation produced (or accepted, replaying a claim).
    pub generated_tokens: u64,
    /// Failed tasks by kind (`deadline`, `memory`, `bundle_refused`...).
    pub failures: BTreeMap<String, u64>,
}

impl Tally {
    /// Count one failure of `kind`.
    pub fn fail(&mut self, kind: &str) {
        self.failed += 1;
        let key = if self.failures.contains_key(kind) || self.failures.len() < MAX_FAILURE_KINDS {
            kind
        } else {
            "other"
        };
        *self.failures.entry(key.to_owned()).or_default() += 1;
    }
}

/// A bundle this node admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleSeen {
    /// Its digest.
    pub digest: Digest,
    /// Name and version from its manifest.
    pub name: String,
    /// Version.
    pub version: String,
    /// Who signed it.
    pub publisher: String,
    /// When it was admitted, Unix seconds.
    pub admitted_at: u64,
    /// When a task of it last ran, Unix seconds.
    pub last_used: u64,
    /// Tasks of it run since it was admitted.
    pub tasks: u64,
}

/// The report in `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NodeState {
    /// This node's key.
    pub node: String,
    /// The pool's address and key.
    pub pool: String,
    /// The pool's key.
    pub pool_key: String,
    /// The agent's process id.
    pub pid: u32,
    /// When the agent started, Unix seconds.
    pub started_at: u64,
    /// When the report was written.
    pub updated_at: u64,
    /// The connection now.
    pub link: Link,
    /// Since when, Unix seconds.
    pub link_since: u64,
    /// The last connection error, if any since the last connection.
    pub last_error: Option<String>,
    /// Connections made since start.
    pub connections: u64,
    /// Standing as the pool last told it (with its leases).
    pub standing: Option<NodeStanding>,
    /// When it was told, Unix seconds.
    pub standing_at: u64,
    /// Since the agent started.
    pub since_start: Tally,
    /// Since the data directory was made (carried across restarts).
    pub total: Tally,
    /// Bundles admitted, most recently used first (at most [`MAX_BUNDLES`]).
    pub bundles: Vec<BundleSeen>,
}

impl NodeState {
    /// A bundle was admitted (or admitted again after its files were
    /// evicted).
    pub fn admitted(
        &mut self,
        digest: Digest,
        m: &tidepool_proto::manifest::LockedManifest,
        now: u64,
    ) {
        if let Some(b) = self.bundles.iter_mut().find(|b| b.digest == digest) {
            b.admitted_at = now;
            return;
        }
        self.bundles.push(BundleSeen {
            digest,
            name: m.name.clone(),
            version: m.version.clone(),
            publisher: m.publisher.to_string(),
            admitted_at: now,
            last_used: now,
            tasks: 0,
        });
        self.trim();
    }

    /// A task of `digest` ran.
    pub fn ran(&mut self, digest: &Digest, now: u64) {
        if let Some(b) = self.bundles.iter_mut().find(|b| &b.digest == digest) {
            b.last_used = now;
            b.tasks += 1;
        }
    }

    fn trim(&mut self) {
        self.bundles.sort_by_key(|b| std::cmp::Reverse(b.last_used));
        self.bundles.truncate(MAX_BUNDLES);
    }

    /// Count with `f` in both tallies.
    pub fn count(&mut self, f: impl Fn(&mut Tally)) {
        f(&mut self.since_start);
        f(&mut self.total);
    }

    /// Set the connection state.
    pub fn link(&mut self, link: Link, now: u64) {
        if self.link != link {
            self.link = link;
            self.link_since = now;
        }
    }
}

/// Write `state` to `<data_dir>/status.json` (whole, then renamed).
pub fn write(data_dir: &Path, state: &NodeState) -> std::io::Result<()> {
    let mut state = state.clone();
    state.trim();
    let path = data_dir.join(STATUS_FILE);
    let tmp = data_dir.join(format!("{STATUS_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &path)
}

/// Read `<data_dir>/status.json` (`None` if no node ever ran there).
pub fn read(data_dir: &Path) -> Result<Option<NodeState>, NodeError> {
    let path = data_dir.join(STATUS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::Config(format!("{}: {e}", path.display()))),
    }
}

/// The exclusive lock on a data directory, held while a node runs from it
/// (and while `node gc` works in it); released when dropped.
#[derive(Debug)]
pub struct DataLock {
    /// The open lock file: the lock lives as long as it.
    _file: std::fs::File,
}

/// Why a data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another tidepool node process uses {0}")]
    Busy(PathBuf),
    /// The lock file could not be opened.
    #[error("{}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Take the lock on `data_dir` (creating it), or say who holds it.
pub fn lock(data_dir: &Path) -> Result<DataLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(DataLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Busy(data_dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Is a node running from `data_dir` now (its lock is held)?
pub fn running(data_dir: &Path) -> bool {
    if !data_dir.join(LOCK_FILE).exists() {
        return false;
    }
    matches!(lock(data_dir), Err(LockError::Busy(_)))
}

/// What `tidepool node status` shows: the report, whether the agent runs,
/// and the caches as they are on disk now.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// The data directory.
    pub data_dir: PathBuf,
    /// A node process holds the directory's lock.
    pub running: bool,
    /// The agent's last report (`None`: no node ever ran here).
    pub state: Option<NodeState>,
    /// Each cache's files, bytes and budget.
    pub caches: Vec<CacheUse>,
}

/// Gather the status of the node whose data directory is `data_dir`, with
/// the cache budgets of its configuration.
pub fn status(data_dir: &Path, budgets: crate::caches::Budgets) -> Result<StatusView, NodeError> {
    let mut book = CacheBook::new(budgets);
    crate::caches::scan(&mut book, data_dir)
        .map_err(|e| NodeError::Config(format!("{}: {e}", data_dir.display())))?;
    Ok(StatusView {
        data_dir: data_dir.to_owned(),
        running: running(data_dir),
        state: read(data_dir)?,
        caches: crate::caches::usage(&book),
    })
}

/// What `tidepool node gc` did.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// Files removed, per cache.
    pub removed: BTreeMap<String, u64>,
    /// Bytes freed.
    pub freed: u64,
    /// The caches afterwards.
    pub caches: Vec<CacheUse>,
}

/// Bring the caches under `data_dir` within `budgets` now, least recently
/// used first (`dry_run`: say what would go, remove nothing). Refused
/// while a node runs from the directory: the running node keeps its own
/// caches within their budgets and knows which files are in use.
pub fn gc(
    data_dir: &Path,
    budgets: crate::caches::Budgets,
    dry_run: bool,
) -> Result<GcReport, NodeError> {
    let _lock = lock(data_dir).map_err(|e| match e {
        LockError::Busy(dir) => NodeError::Config(format!(
            "a node is running from {}: it keeps its caches within their budgets itself; stop it to collect by hand",
            dir.display()
        )),
        other => NodeError::Config(other.to_string()),
    })?;
    let mut book = CacheBook::new(budgets);
    crate::caches::scan(&mut book, data_dir)
        .map_err(|e| NodeError::Config(format!("{}: {e}", data_dir.display())))?;
    let mut removed = BTreeMap::new();
    let mut freed = 0;
    for ev in book.evict_all() {
        for (k, size) in &ev.remove {
            *removed.entry(k.kind.name().to_owned()).or_default() += 1;
            if dry_run {
                freed += size;
            }
        }
        if !dry_run {
            freed += crate::caches::delete(data_dir, &ev);
        }
    }
    Ok(GcReport {
        removed,
        freed,
        caches: crate::caches::usage(&book),
    })
}
