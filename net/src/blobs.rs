//! A content-addressed directory of blobs (components, models).
//!
//! `<root>/<hex>` holds a complete blob whose sha256 is `<hex>`; it is only
//! ever created by renaming a verified `<root>/<hex>.part`. A partial file
//! lets a transfer resume where it stopped. Pools serve from a `BlobDir` and
//! receive uploads into it; nodes cache fetched blobs in one.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tidepool_proto::Digest;

/// Errors storing or reading blobs.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// File system error.
    #[error("blob store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A chunk does not start where the partial blob ends.
    #[error(
        "blob {digest}: chunk at offset {offset}, but {have} bytes are held (resume from there)"
    )]
    Offset {
        /// Blob.
        digest: Digest,
        /// Offset of the chunk.
        offset: u64,
        /// Bytes held.
        have: u64,
    },
    /// More bytes than the blob's size.
    #[error("blob {digest}: {got} bytes is more than its size of {size}")]
    TooLong {
        /// Blob.
        digest: Digest,
        /// Bytes after this chunk.
        got: u64,
        /// Expected size.
        size: u64,
    },
    /// The complete bytes do not hash to the name; the partial file is deleted.
    #[error("blob {expected}: the bytes received hash to {actual}; discarded")]
    Mismatch {
        /// Expected digest.
        expected: Digest,
        /// Digest of what arrived.
        actual: Digest,
    },
}

/// A blob directory. Cheap to clone; many tasks may share one.
#[derive(Debug, Clone)]
pub struct BlobDir {
    /// The directory; lives as long as the pool or node that owns it.
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

/// SHA-256 of a file, streamed (the models crate's hashing, as a [`Digest`]).
pub fn sha256_file(path: &Path) -> Result<Digest, BlobError> {
    let hex = tidepool_models::sha256_file(path).map_err(|e| BlobError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    // The models crate returns 64 lowercase hex characters.
    Ok(Digest::parse(&hex).expect("sha256 hex from tidepool_models"))
}

impl BlobDir {
    /// Open (creating) a blob directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(Self { root })
    }

    /// Path of a complete blob (it may not exist).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.root.join(d.hex())
    }

    fn part(&self, d: &Digest) -> PathBuf {
        self.root.join(format!("{}.part", d.hex()))
    }

    /// Is the blob complete here?
    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Bytes held: the size if complete, else the partial length.
    pub fn held(&self, d: &Digest) -> u64 {
        if let Ok(m) = fs::metadata(self.path(d)) {
            return m.len();
        }
        fs::metadata(self.part(d)).map(|m| m.len()).unwrap_or(0)
    }

    /// Append a chunk at `offset` of a blob of `size` bytes. Returns whether
    /// the blob is now complete (and verified).
    pub fn append(
        &self,
        d: &Digest,
        size: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<bool, BlobError> {
        if self.has(d) {
            return Ok(true);
        }
        let part = self.part(d);
        let have = self.held(d);
        if offset != have {
            return Err(BlobError::Offset {
                digest: *d,
                offset,
                have,
            });
        }
        let got = have + data.len() as u64;
        if got > size {
            return Err(BlobError::TooLong {
                digest: *d,
                got,
                size,
            });
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(io(&part))?;
        f.write_all(data).map_err(io(&part))?;
        if got < size {
            return Ok(false);
        }
        f.sync_all().map_err(io(&part))?;
        drop(f);
        let actual = sha256_file(&part)?;
        if actual != *d {
            let _ = fs::remove_file(&part);
            return Err(BlobError::Mismatch {
                expected: *d,
                actual,
            });
        }
        let dest = self.path(d);
        fs::rename(&part, &dest).map_err(io(&dest))?;
        Ok(true)
    }

    /// Copy a local file in as a blob (verifying it).
    pub fn import(&self, d: &Digest, src: &Path) -> Result<(), BlobError> {
        if self.has(d) {
            return Ok(());
        }
        let actual = sha256_file(src)?;
        if actual != *d {
            return Err(BlobError::Mismatch {
                expected: *d,
                actual,
            });
        }
        let part = self.part(d);
        fs::copy(src, &part).map_err(io(&part))?;
        let dest = self.path(d);
        fs::rename(&part, &dest).map_err(io(&dest))?;
        Ok(())
    }

    /// Read up to `max` bytes of a complete blob from `offset`.
    pub fn read(&self, d: &Digest, offset: u64, max: usize) -> Result<(Vec<u8>, u64), BlobError> {
        let path = self.path(d);
        let mut f = File::open(&path).map_err(io(&path))?;
        let total = f.metadata().map_err(io(&path))?.len();
        f.seek(SeekFrom::Start(offset.min(total)))
            .map_err(io(&path))?;
        let mut buf = Vec::with_capacity(max.min((total.saturating_sub(offset)) as usize));
        f.take(max as u64)
            .read_to_end(&mut buf)
            .map_err(io(&path))?;
        Ok((buf, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumable_verified_and_never_complete_when_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = BlobDir::open(dir.path()).expect("open");
        let data = b"hello blob world".to_vec();
        let d = Digest::of(&data);
        assert!(!blobs.append(&d, 16, 0, &data[..5]).expect("first"));
        assert!(matches!(
            blobs.append(&d, 16, 3, &data[3..]),
            Err(BlobError::Offset { have: 5, .. })
        ));
        assert_eq!(blobs.held(&d), 5);
        assert!(blobs.append(&d, 16, 5, &data[5..]).expect("rest"));
        assert!(blobs.has(&d));
        assert_eq!(blobs.read(&d, 6, 4).expect("read"), (b"blob".to_vec(), 16));

        let wrong = Digest::of(b"something else!!");
        let err = blobs.append(&wrong, 16, 0, &data).expect_err("mismatch");
        assert!(matches!(err, BlobError::Mismatch { .. }));
        assert!(!blobs.has(&wrong));
        assert_eq!(blobs.held(&wrong), 0, "partial file removed");
        assert!(matches!(
            blobs.append(&wrong, 4, 0, &data),
            Err(BlobError::TooLong { .. })
        ));
    }
}
