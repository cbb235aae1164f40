//! The node's disk caches and their budgets (`[caches]` in `node.toml`):
//! fetched components and other blobs (`blobs/`), fetched models
//! (`models/`) and compiled components (`compiled/`), each kept under a
//! byte budget by removing the least recently used files.
//!
//! [`CacheBook`] decides and never touches the disk: it knows every file's
//! size and last use, which bundles use which files, and how many tasks of
//! each bundle are in flight (a pinned bundle's files are never chosen).
//! The agent (and `tidepool node gc`, which runs only while the node is
//! stopped) does the removing. What a budget allows to be exceeded, and
//! only for as long as it lasts: the files of bundles that are in use at
//! once. A bundle whose own files of one kind are larger than that kind's
//! budget is refused by this node (the pool runs it elsewhere).
//!
//! Last use survives restarts as the files' modification times: a file
//! used again is touched when its time on disk is older than
//! [`TOUCH_EVERY`], so the order after a restart is right to that much.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tidepool_proto::Digest;

/// How stale a file's modification time may grow before a use touches it.
pub const TOUCH_EVERY: u64 = 600;

/// One of the node's caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    /// Fetched components (`blobs/`).
    Blobs,
    /// Fetched models (`models/`).
    Models,
    /// Compiled components (`compiled/`).
    Compiled,
}

impl CacheKind {
    /// Every cache, in the order they are shown.
    pub const ALL: [CacheKind; 3] = [CacheKind::Blobs, CacheKind::Models, CacheKind::Compiled];

    /// Its directory under the node's data directory.
    pub fn dir(self, data_dir: &Path) -> PathBuf {
        data_dir.join(self.name())
    }

    /// Its name (the directory's, and the metrics label).
    pub fn name(self) -> &'static str {
        match self {
            CacheKind::Blobs => "blobs",
            CacheKind::Models => "models",
            CacheKind::Compiled => "compiled",
        }
    }

    /// Its setting in `[caches]`.
    pub fn setting(self) -> &'static str {
        match self {
            CacheKind::Blobs => "blobs_mib",
            CacheKind::Models => "models_mib",
            CacheKind::Compiled => "compiled_mib",
        }
    }
}

impl std::fmt::Display for CacheKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes each cache may hold (`[caches]`, set in MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// `blobs/`: components (default 1 GiB).
    pub blobs: u64,
    /// `models/`: models (default 20 GiB: a few quantised LLMs).
    pub models: u64,
    /// `compiled/`: native code of components (default 2 GiB).
    pub compiled: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            blobs: 1 << 30,
            models: 20 << 30,
            compiled: 2 << 30,
        }
    }
}

impl Budgets {
    /// The budget of `kind`, bytes.
    pub fn of(&self, kind: CacheKind) -> u64 {
        match kind {
            CacheKind::Blobs => self.blobs,
            CacheKind::Models => self.models,
            CacheKind::Compiled => self.compiled,
        }
    }
}

/// A file in one of the caches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// Which cache.
    pub kind: CacheKind,
    /// Its name in the cache's directory.
    pub name: String,
}

impl FileKey {
    /// A blob of `kind` (`blobs` or `models`), named by its digest.
    pub fn blob(kind: CacheKind, d: &Digest) -> Self {
        Self {
            kind,
            name: d.hex(),
        }
    }

    /// The complete file this one is a part of (itself if not a `.part`).
    fn whole(&self) -> &str {
        self.name.strip_suffix(".part").unwrap_or(&self.name)
    }
}

/// What the book knows of one file; lives until the file is removed.
#[derive(Debug, Clone, Copy)]
struct FileEntry {
    /// Bytes.
    size: u64,
    /// Last use, Unix seconds.
    used: u64,
    /// The modification time on disk, Unix seconds (touched on use when
    /// older than [`TOUCH_EVERY`]).
    on_disk: u64,
}

/// The files one bundle runs from and the tasks of it in flight; lives
/// from the bundle's admission until its files are evicted.
#[derive(Debug, Clone, Default)]
struct BundleUse {
    /// Its files (component, models, compiled code once compiled).
    files: BTreeSet<FileKey>,
    /// Tasks of it between their grant and their end: while non-zero none
    /// of its files is removed.
    pins: u32,
}

/// Files removed by one eviction, and what it could not free.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Removed from the book, least recently used first: delete them.
    pub remove: Vec<(FileKey, u64)>,
    /// Bytes still over the budget because every other file is in use.
    pub short: u64,
}

/// The three caches' files, their last use and which bundles pin them.
/// Lives as long as the agent (or one `node gc`).
#[derive(Debug, Clone)]
pub struct CacheBook {
    /// What each cache may hold.
    budgets: Budgets,
    /// Every file known, from the scan at start and from what the agent
    /// added since.
    files: BTreeMap<FileKey, FileEntry>,
    /// Bundles admitted since start, by digest.
    bundles: HashMap<Digest, BundleUse>,
    /// Bundles some of whose files were removed: their loaded sandboxes
    /// are dropped and, on their next task, they are fetched and checked
    /// again. Emptied by [`CacheBook::take_evicted`].
    evicted: HashSet<Digest>,
    /// Files removed since start, per cache (metrics).
    evictions: BTreeMap<CacheKind, u64>,
}

impl CacheBook {
    /// An empty book with these budgets.
    pub fn new(budgets: Budgets) -> Self {
        Self {
            budgets,
            files: BTreeMap::new(),
            bundles: HashMap::new(),
            evicted: HashSet::new(),
            evictions: BTreeMap::new(),
        }
    }

    /// The budgets.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// A file exists with `size` bytes, last used (or modified) at `used`.
    pub fn insert(&mut self, key: FileKey, size: u64, used: u64) {
        self.files.insert(
            key,
            FileEntry {
                size,
                used,
                on_disk: used,
            },
        );
    }

    /// A file is gone (renamed, or found missing).
    pub fn forget(&mut self, key: &FileKey) {
        self.files.remove(key);
    }

    /// Bytes held in `kind`.
    pub fn used(&self, kind: CacheKind) -> u64 {
        self.files
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .map(|(_, e)| e.size)
            .sum()
    }

    /// Files held in `kind`.
    pub fn count(&self, kind: CacheKind) -> usize {
        self.files.keys().filter(|k| k.kind == kind).count()
    }

    /// Files removed from `kind` since the book was made.
    pub fn evictions(&self, kind: CacheKind) -> u64 {
        self.evictions.get(&kind).copied().unwrap_or(0)
    }

    /// `bundle` runs from `files` (added to what it had).
    pub fn uses(&mut self, bundle: Digest, files: impl IntoIterator<Item = FileKey>) {
        self.evicted.remove(&bundle);
        self.bundles.entry(bundle).or_default().files.extend(files);
    }

    /// A task of `bundle` is in flight: its files stay.
    pub fn pin(&mut self, bundle: Digest) {
        self.bundles.entry(bundle).or_default().pins += 1;
    }

    /// A task of `bundle` ended.
    pub fn unpin(&mut self, bundle: &Digest) {
        if let Some(b) = self.bundles.get_mut(bundle) {
            b.pins = b.pins.saturating_sub(1);
        }
    }

    /// Is `bundle` in flight?
    pub fn pinned_bundle(&self, bundle: &Digest) -> bool {
        self.bundles.get(bundle).is_some_and(|b| b.pins > 0)
    }

    /// Was some file of `bundle` removed since it was loaded?
    pub fn is_evicted(&self, bundle: &Digest) -> bool {
        self.evicted.contains(bundle)
    }

    /// The bundles whose loaded sandboxes must be dropped.
    pub fn take_evicted(&mut self) -> Vec<Digest> {
        self.evicted.drain().collect()
    }

    /// Files whose on-disk time should be set to `now`: those of `bundle`
    /// whose time there is older than [`TOUCH_EVERY`]. Every file of
    /// `bundle` is marked used at `now`.
    pub fn touch(&mut self, bundle: &Digest, now: u64) -> Vec<FileKey> {
        let Some(b) = self.bundles.get(bundle) else {
            return Vec::new();
        };
        let mut stale = Vec::new();
        for k in &b.files {
            if let Some(e) = self.files.get_mut(k) {
                e.used = e.used.max(now);
                if now.saturating_sub(e.on_disk) >= TOUCH_EVERY {
                    e.on_disk = now;
                    stale.push(k.clone());
                }
            }
        }
        stale
    }

    /// Is `key` (or the file it is a part of) used by a bundle in flight?
    fn pinned(&self, key: &FileKey) -> bool {
        self.bundles.values().any(|b| {
            b.pins > 0
                && b.files
                    .iter()
                    .any(|f| f.kind == key.kind && f.name == key.whole())
        })
    }

    /// Make `kind` hold at most its budget less `incoming` bytes: remove
    /// the least recently used files that no bundle in flight uses. What
    /// cannot be freed is `short`.
    pub fn evict(&mut self, kind: CacheKind, incoming: u64) -> Eviction {
        let budget = self.budgets.of(kind);
        let mut used = self.used(kind);
        let mut out = Eviction::default();
        if used + incoming <= budget {
            return out;
        }
        let mut candidates: Vec<(u64, FileKey, u64)> = self
            .files
            .iter()
            .filter(|(k, _)| k.kind == kind && !self.pinned(k))
            .map(|(k, e)| (e.used, k.clone(), e.size))
            .collect();
        // Oldest first; among equals, by name (a stable order).
        candidates.sort();
        for (_, key, size) in candidates {
            if used + incoming <= budget {
                break;
            }
            self.files.remove(&key);
            used -= size;
            *self.evictions.entry(kind).or_default() += 1;
            for (d, b) in &self.bundles {
                if b.files
                    .iter()
                    .any(|f| f.kind == kind && f.name == key.whole())
                {
                    self.evicted.insert(*d);
                }
            }
            out.remove.push((key, size));
        }
        out.short = (used + incoming).saturating_sub(budget);
        out
    }

    /// Evict in every cache that is over its budget.
    pub fn evict_all(&mut self) -> Vec<Eviction> {
        CacheKind::ALL.iter().map(|&k| self.evict(k, 0)).collect()
    }
}

/// Unix seconds of a file's modification time (0 if unknown).
fn mtime(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Add every file in the caches under `data_dir` to `book` (sizes and
/// modification times). A missing directory is an empty cache.
pub fn scan(book: &mut CacheBook, data_dir: &Path) -> std::io::Result<()> {
    for kind in CacheKind::ALL {
        let dir = kind.dir(data_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            book.insert(FileKey { kind, name }, meta.len(), mtime(&meta));
        }
    }
    Ok(())
}

/// Delete what `eviction` removed from the book; returns bytes freed.
/// A file already gone counts as freed; another failure is logged (the
/// book has forgotten the file either way, and the next scan finds it).
pub fn delete(data_dir: &Path, eviction: &Eviction) -> u64 {
    let mut freed = 0;
    for (key, size) in &eviction.remove {
        let path = key.kind.dir(data_dir).join(&key.name);
        match std::fs::remove_file(&path) {
            Ok(()) => freed += size,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => freed += size,
            Err(e) => tracing::warn!(path = %path.display(), "cannot evict: {e}"),
        }
    }
    freed
}

/// Set the modification time of `keys` to `now` (how last use survives a
/// restart); failures are ignored (the order is then only older).
pub fn touch_files(data_dir: &Path, keys: &[FileKey], now: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now);
    for k in keys {
        let path = k.kind.dir(data_dir).join(&k.name);
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(t);
        }
    }
}

/// One cache as `node status` and `node gc` report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheUse {
    /// Which.
    pub cache: CacheKind,
    /// Files in it.
    pub files: usize,
    /// Bytes in it.
    pub bytes: u64,
    /// Its budget, bytes.
    pub budget: u64,
}

/// Every cache's use, from `book`.
pub fn usage(book: &CacheBook) -> Vec<CacheUse> {
    CacheKind::ALL
        .iter()
        .map(|&k| CacheUse {
            cache: k,
            files: book.count(k),
            bytes: book.used(k),
            budget: book.budgets().of(k),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn model(n: u8) -> FileKey {
        FileKey::blob(CacheKind::Models, &d(n))
    }

    fn book(models: u64) -> CacheBook {
        CacheBook::new(Budgets {
            blobs: 1000,
            models,
            compiled: 1000,
        })
    }

    #[test]
    fn least_recently_used_goes_first_and_a_pinned_file_never() {
        let mut b = book(300);
        for n in 1..=3 {
            b.insert(model(n), 100, u64::from(n) * 10);
            b.uses(d(n), [model(n)]);
        }
        // Model 1 is the oldest but its bundle has a task in flight.
        b.pin(d(1));
        let e = b.evict(CacheKind::Models, 150);
        assert_eq!(
            e.remove.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            vec![model(2), model(3)],
            "oldest unpinned first"
        );
        assert_eq!(e.short, 0);
        assert_eq!(b.used(CacheKind::Models), 100);
        let mut gone = b.take_evicted();
        gone.sort();
        let mut want = vec![d(2), d(3)];
        want.sort();
        assert_eq!(gone, want);
        assert!(!b.is_evicted(&d(1)));

        // With everything pinned, nothing goes and the shortfall is said.
        let e = b.evict(CacheKind::Models, 250);
        assert!(e.remove.is_empty());
        assert_eq!(e.short, 50);
        // Unpinned, it goes.
        b.unpin(&d(1));
        let e = b.evict(CacheKind::Models, 250);
        assert_eq!(e.remove, vec![(model(1), 100)]);
        assert_eq!(b.evictions(CacheKind::Models), 3);
    }

    #[test]
    fn a_use_makes_a_file_young_and_touches_disk_only_when_stale() {
        let mut b = book(200);
        b.insert(model(1), 100, 0);
        b.insert(model(2), 100, 5);
        b.uses(d(1), [model(1)]);
        assert_eq!(b.touch(&d(1), 10), Vec::<FileKey>::new(), "fresh on disk");
        assert_eq!(b.touch(&d(1), TOUCH_EVERY + 1), vec![model(1)]);
        assert_eq!(b.touch(&d(1), TOUCH_EVERY + 2), Vec::<FileKey>::new());
        // Model 2 is now the least recently used.
        let e = b.evict(CacheKind::Models, 100);
        assert_eq!(e.remove, vec![(model(2), 100)]);
    }

    #[test]
    fn a_partial_download_of_a_pinned_blob_stays_and_caches_are_apart() {
        let mut b = book(100);
        let part = FileKey {
            kind: CacheKind::Models,
            name: format!("{}.part", d(1).hex()),
        };
        b.insert(part.clone(), 90, 0);
        b.insert(FileKey::blob(CacheKind::Blobs, &d(9)), 900, 0);
        b.uses(d(1), [model(1)]);
        b.pin(d(1));
        assert_eq!(b.evict(CacheKind::Models, 50).remove, vec![]);
        b.unpin(&d(1));
        assert_eq!(b.evict(CacheKind::Models, 50).remove, vec![(part, 90)]);
        assert_eq!(b.used(CacheKind::Blobs), 900, "another cache untouched");
    }
}
