//! Bundles on disk: packing an authored `tidepool.toml` into a locked
//! manifest with the digests of its files, signing it, and checking it.
//!
//! A bundle file (`NAME-VERSION.bundle`) is MessagePack of [`BundleFile`]:
//! the locked manifest bytes, the signature once signed, and where the blobs
//! are on the publisher's disk (not signed: only used to upload them).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tidepool_net::blobs::sha256_file;
use tidepool_proto::manifest::{
    AuthoredManifest, BlobRef, BundleError, LockedManifest, SignedManifest,
};
use tidepool_proto::{Digest, PublicKey, SecretKey, Signature};

/// Errors packing, signing or checking a bundle. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum BundleFileError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The manifest is wrong.
    #[error("{path}: {source}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        source: tidepool_proto::manifest::ManifestError,
    },
    /// A model source names an unknown catalogue entry.
    #[error("{path}: model {model}: {why}")]
    Source {
        /// The manifest file.
        path: PathBuf,
        /// Model name.
        model: String,
        /// Why the source cannot be used.
        why: String,
    },
    /// The bundle file is not one.
    #[error("{path}: not a tidepool bundle file: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Signature or content check failed.
    #[error("{path}: {source}")]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// What failed.
        source: BundleError,
    },
    /// The bundle is not signed yet.
    #[error("{0}: bundle is not signed (run `tidepool bundle sign`)")]
    Unsigned(PathBuf),
}

/// A bundle file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// The locked manifest's bytes (what is signed).
    #[serde(with = "tidepool_proto::manifest::bytes_field")]
    pub locked: Vec<u8>,
    /// The signature, once signed.
    pub signature: Option<(PublicKey, Signature)>,
    /// Where each blob is on the publisher's disk.
    pub files: BTreeMap<Digest, PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleFileError + '_ {
    move |source| BundleFileError::Io {
        path: path.to_owned(),
        source,
    }
}

fn blob_of(path: &Path) -> Result<BlobRef, BundleFileError> {
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    let sha256 = sha256_file(path).map_err(|e| BundleFileError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(BlobRef { sha256, size })
}

/// Lock a `tidepool.toml` for `publisher`: hash the component and every
/// model file. Model sources are paths relative to the manifest, or
/// `catalog:NAME` for a model of the built-in catalogue (fetched already).
pub fn pack(manifest_path: &Path, publisher: PublicKey) -> Result<BundleFile, BundleFileError> {
    let text = std::fs::read_to_string(manifest_path).map_err(io(manifest_path))?;
    let authored = AuthoredManifest::parse(&text).map_err(|source| BundleFileError::Manifest {
        path: manifest_path.to_owned(),
        source,
    })?;
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &str| -> PathBuf {
        let p = base.join(p);
        std::fs::canonicalize(&p).unwrap_or(p)
    };
    let component_path = resolve(&authored.component);
    let component = blob_of(&component_path)?;
    let mut files = BTreeMap::from([(component.sha256, component_path)]);
    let mut models = BTreeMap::new();
    for (name, m) in &authored.models {
        let path = match m.source.strip_prefix("catalog:") {
            Some(entry) => {
                let e =
                    tidepool_models::catalog_entry(entry).map_err(|e| BundleFileError::Source {
                        path: manifest_path.to_owned(),
                        model: name.clone(),
                        why: e.to_string(),
                    })?;
                tidepool_models::path_in(&tidepool_models::models_dir(), e)
            }
            None => resolve(&m.source),
        };
        if !path.is_file() {
            return Err(BundleFileError::Source {
                path: manifest_path.to_owned(),
                model: name.clone(),
                why: format!(
                    "{} does not exist (for catalogue models run `tidepool models fetch`)",
                    path.display()
                ),
            });
        }
        let blob = blob_of(&path)?;
        files.insert(blob.sha256, path);
        models.insert(name.clone(), blob);
    }
    let locked = LockedManifest::lock(&authored, component, &models, publisher, crate::unix_now())
        .map_err(|source| BundleFileError::Manifest {
            path: manifest_path.to_owned(),
            source,
        })?;
    Ok(BundleFile {
        locked: locked.to_bytes(),
        signature: None,
        files,
    })
}

impl BundleFile {
    /// Read a bundle file.
    pub fn read(path: &Path) -> Result<Self, BundleFileError> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        rmp_serde::from_slice(&bytes).map_err(|e| BundleFileError::Format {
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    /// Write it (atomically).
    pub fn write(&self, path: &Path) -> Result<(), BundleFileError> {
        let bytes = rmp_serde::to_vec_named(self).expect("bundle file serialises");
        let tmp = path.with_extension("bundle.tmp");
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// The locked manifest (unverified).
    pub fn manifest(&self) -> Result<LockedManifest, BundleError> {
        rmp_serde::from_slice(&self.locked).map_err(|e| BundleError::Malformed(e.to_string()))
    }

    /// Sign with the publisher's key.
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), BundleError> {
        let m = self.manifest()?;
        // Re-serialising would be equal; signing the stored bytes is what counts.
        if m.publisher != key.public() {
            return Err(BundleError::PublisherMismatch {
                signer: key.public(),
                publisher: m.publisher,
            });
        }
        let signature = key.sign(tidepool_proto::keys::MANIFEST_TAG, &self.locked);
        self.signature = Some((key.public(), signature));
        Ok(())
    }

    /// The signed form, if signed.
    pub fn signed(&self) -> Option<SignedManifest> {
        self.signature.map(|(signer, signature)| SignedManifest {
            manifest: self.locked.clone(),
            signer,
            signature,
        })
    }

    /// Check signature, validity, and that every blob file still matches.
    pub fn verify(
        &self,
        path: &Path,
        trusted: &BTreeSet<PublicKey>,
    ) -> Result<LockedManifest, BundleFileError> {
        let signed = self
            .signed()
            .ok_or_else(|| BundleFileError::Unsigned(path.to_owned()))?;
        let m = signed
            .verify(trusted, crate::unix_now())
            .map_err(|source| BundleFileError::Bundle {
                path: path.to_owned(),
                source,
            })?;
        let mut named: Vec<(String, BlobRef)> = vec![("component".into(), m.component)];
        named.extend(m.models.iter().map(|(n, l)| (format!("model {n}"), l.blob)));
        for (what, blob) in named {
            let file = self
                .files
                .get(&blob.sha256)
                .ok_or_else(|| BundleFileError::Format {
                    path: path.to_owned(),
                    why: format!("no file recorded for {what}"),
                })?;
            let actual = blob_of(file)?;
            if actual.sha256 != blob.sha256 {
                return Err(BundleFileError::Bundle {
                    path: path.to_owned(),
                    source: BundleError::BlobMismatch {
                        what: format!("{what} ({})", file.display()),
                        expected: blob.sha256,
                        actual: actual.sha256,
                    },
                });
            }
        }
        Ok(m)
    }
}
