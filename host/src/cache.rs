//! The on-disk cache of compiled components.
//!
//! Key: the component's sha256 and a hash of everything in the engine that
//! affects compiled code (wasmtime version, target, Cranelift and tunables
//! settings), so a changed engine never loads stale code. Files are written
//! to a temporary name and renamed, so a crash never leaves a half file under
//! a real key. A file that fails to deserialise is treated as a miss and
//! replaced.
//!
//! Trust: loading a compiled artifact runs native code produced by Cranelift;
//! the cache directory must be writable only by the node's user. [`open`]
//! checks that before anything is read from it: the directory is created
//! 0700, a directory of another user (or a link) is refused, and group or
//! other permission bits on our own are removed. It is a cache of our own
//! output, never of bytes received from elsewhere.
//!
//! [`open`]: ComponentCache::open

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use tidepool_proto::Digest;
use wasmtime::component::Component;
use wasmtime::Engine;

/// A directory of `<component digest>-<engine hash>.cwasm` files.
#[derive(Debug)]
pub struct ComponentCache {
    /// Where files live (created on first write).
    dir: PathBuf,
    /// The engine that compiles and loads them.
    engine: Engine,
    /// Hex hash of the engine's compilation settings.
    engine_key: String,
}

/// Why a cache directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The directory could not be created or inspected.
    #[error("compiled-code cache {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Someone else could have written what is in it.
    #[error("compiled-code cache {} is not used: {why} (loading it would run code another user could have written)", dir.display())]
    NotPrivate {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Make `dir` (creating it 0700) a directory only this process's user may
/// write, or say why it cannot be.
fn private_dir(dir: &Path) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        dir: dir.to_owned(),
        source,
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io)?;
    let meta = std::fs::symlink_metadata(dir).map_err(io)?;
    let refuse = |why: String| {
        Err(CacheError::NotPrivate {
            dir: dir.to_owned(),
            why,
        })
    };
    if !meta.is_dir() {
        return refuse("it is a link or not a directory".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // The process's user: the owner of what it just created.
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if let Some(me) = me {
            if meta.uid() != me {
                return refuse(format!(
                    "it belongs to user {}, not to this process's user {me}",
                    meta.uid()
                ));
            }
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
    }
    Ok(())
}

impl ComponentCache {
    /// A cache in `dir` for components compiled by `engine`, after checking
    /// that only this user can write there.
    pub fn open(dir: PathBuf, engine: &Engine) -> Result<Self, CacheError> {
        private_dir(&dir)?;
        Ok(Self::new(dir, engine))
    }

    /// A cache in `dir` for components compiled by `engine` (unchecked:
    /// [`open`](Self::open) checks the directory first).
    fn new(dir: PathBuf, engine: &Engine) -> Self {
        // DefaultHasher::new() uses fixed keys: stable for a given build, which is all a cache key needs.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Self {
            dir,
            engine: engine.clone(),
            engine_key: format!("{:016x}", h.finish()),
        }
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", digest.hex(), self.engine_key))
    }

    /// The compiled component, if cached and loadable.
    ///
    /// The file is mapped, not read: its code and its memory images are used
    /// where they lie in the page cache, with no copy (ADR 0021: 0.19 ms
    /// instead of 0.93 ms for the embed job). A mapped file that shrank
    /// under the process would kill it with SIGBUS on the next touch of a
    /// lost page; nothing shrinks these files: they are written whole under
    /// a temporary name and renamed ([`put`](Self::put)), and removed only by
    /// unlinking (here and by the node's cache eviction), which leaves a
    /// mapped file's pages in place until the last mapping goes. The
    /// directory is private to the node's user ([`open`](Self::open)), so no
    /// other user can reach the files at all.
    pub fn get(&self, digest: &Digest) -> Option<Component> {
        let path = self.path(digest);
        if !path.is_file() {
            return None;
        }
        #[allow(unsafe_code)]
        // SAFETY: the file was produced by `Component::serialize` of this same
        // engine configuration (the key includes its hash), written by this
        // node's user into its private cache directory, and is never modified
        // in place (see above); wasmtime checks the header and engine
        // compatibility before use.
        let loaded = unsafe { Component::deserialize_file(&self.engine, &path) };
        match loaded {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable cache entry; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Store a compiled component.
    pub fn put(&self, digest: &Digest, component: &Component) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = component.serialize()?;
        let path = self.path(digest);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}
