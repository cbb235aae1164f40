//! Running one task locally, exactly as a node would: what `tidepool run`
//! and the tests call.

use crate::models::{self, ModelError};
use crate::registry::{ModelRegistry, RegistryBuilder, RegistryError};
use std::path::{Path, PathBuf};

/// A `--model` argument: `NAME` (from the models directory),
/// `NAME=PATH` (digest from the catalogue) or `NAME=PATH@SHA256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelArg {
    /// The name the job loads it by.
    pub name: String,
    /// The file, or `None` for the catalogue file in the models directory.
    pub path: Option<PathBuf>,
    /// The expected hex sha256, if given.
    pub sha256: Option<String>,
}

/// A malformed `--model` argument.
#[derive(Debug, thiserror::Error)]
#[error("bad --model {arg:?}: {why} (use NAME, NAME=PATH or NAME=PATH@SHA256)")]
pub struct ModelArgError {
    /// The argument.
    pub arg: String,
    /// What is wrong.
    pub why: String,
}

impl std::str::FromStr for ModelArg {
    type Err = ModelArgError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ModelArgError {
            arg: s.to_owned(),
            why: why.to_owned(),
        };
        let (name, rest) = match s.split_once('=') {
            Some((n, r)) => (n, Some(r)),
            None => (s, None),
        };
        if !crate::registry::valid_name(name) {
            return Err(bad(
                "the name must be lowercase letters, digits, '.', '_' or '-'",
            ));
        }
        let (path, sha256) = match rest {
            None => (None, None),
            Some(r) => match r.rsplit_once('@') {
                Some((p, h)) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                    (Some(PathBuf::from(p)), Some(h.to_ascii_lowercase()))
                }
                Some((_, h)) if h.len() == 64 || h.starts_with("sha256") => {
                    return Err(bad("the digest after '@' must be 64 hex characters"))
                }
                _ => (Some(PathBuf::from(r)), None),
            },
        };
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(bad("empty path"));
        }
        Ok(Self {
            name: name.to_owned(),
            path,
            sha256,
        })
    }
}

/// Why the models of a local run cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LocalModelError {
    /// A model file has no known digest.
    #[error("model {name:?} at {path}: no expected digest; give it as {name}=PATH@SHA256")]
    NoDigest {
        /// The model.
        name: String,
        /// Its file.
        path: PathBuf,
    },
    /// The encoding cannot be told from the file name.
    #[error("model {name:?} at {path}: cannot tell the encoding from the file name (expected .onnx or .gguf)")]
    UnknownEncoding {
        /// The model.
        name: String,
        /// Its file.
        path: PathBuf,
    },
    /// Catalogue or file problem.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An engine could not start.
    #[error("{0}")]
    Engine(#[from] crate::EngineError),
    /// Registration failed (digest mismatch, engine error...).
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Verify and load the models named by `args` (catalogue files are looked
/// up in `models_dir`) on the default engines.
pub fn registry_from_args(
    args: &[ModelArg],
    models_dir: &Path,
) -> Result<ModelRegistry, LocalModelError> {
    registry_with(args, models_dir, crate::LlmSettings::default())
}

/// [`registry_from_args`] with these llama.cpp settings.
pub fn registry_with(
    args: &[ModelArg],
    models_dir: &Path,
    llm: crate::LlmSettings,
) -> Result<ModelRegistry, LocalModelError> {
    let (engines, _) =
        crate::engines(&crate::OnnxEngine::Tract, llm).map_err(LocalModelError::Engine)?;
    let mut b = RegistryBuilder::new(engines);
    for a in args {
        let (entry, path) = match (&a.path, models::catalog_entry(&a.name)) {
            (Some(p), e) => (e.ok(), p.clone()),
            (None, Ok(e)) => (Some(e), models::path_in(models_dir, e)),
            // A bare NAME must be a catalogue model: the error says which names exist.
            (None, Err(e)) => return Err(e.into()),
        };
        let sha = match (&a.sha256, entry) {
            (Some(h), _) => h.clone(),
            (None, Some(e)) => e.sha256.to_owned(),
            (None, None) => {
                return Err(LocalModelError::NoDigest {
                    name: a.name.clone(),
                    path,
                })
            }
        };
        let encoding = match (
            entry.and_then(|e| e.encoding),
            path.extension().and_then(|x| x.to_str()),
        ) {
            (Some(enc), _) => enc,
            (None, Some("onnx")) => "onnx",
            (None, Some("gguf")) => "ggml",
            _ => {
                return Err(LocalModelError::UnknownEncoding {
                    name: a.name.clone(),
                    path,
                })
            }
        };
        b.add(&a.name, encoding, &path, &sha)?;
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        let h = "ab".repeat(32);
        assert_eq!(
            "m".parse::<ModelArg>().expect("name"),
            ModelArg {
                name: "m".into(),
                path: None,
                sha256: None
            }
        );
        assert_eq!(
            "m=/x/y.onnx".parse::<ModelArg>().expect("path"),
            ModelArg {
                name: "m".into(),
                path: Some("/x/y.onnx".into()),
                sha256: None
            }
        );
        assert_eq!(
            format!("m=/x/y@z.onnx@{h}")
                .parse::<ModelArg>()
                .expect("digest"),
            ModelArg {
                name: "m".into(),
                path: Some("/x/y@z.onnx".into()),
                sha256: Some(h.clone())
            }
        );
        assert!("../m=/x".parse::<ModelArg>().is_err());
        assert!("m=".parse::<ModelArg>().is_err());
        assert!(
            format!("m=/x@{}", &h[..63]).parse::<ModelArg>().is_ok(),
            "a short suffix is part of the path"
        );
        assert!(format!("m=/x@{}g", &h[..63]).parse::<ModelArg>().is_err());
    }

    #[test]
    fn unknown_model_without_digest_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.onnx");
        std::fs::write(&p, b"x").expect("write");
        let err = registry_from_args(
            &[ModelArg {
                name: "mine".into(),
                path: Some(p),
                sha256: None,
            }],
            dir.path(),
        )
        .expect_err("no digest");
        assert!(err.to_string().contains("mine=PATH@SHA256"), "{err}");
    }
}
