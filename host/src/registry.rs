//! The named-model registry: which names a job may `load-by-name`, and the
//! verified, loaded model behind each.
//!
//! Built once per host from (name, file, expected sha256) triples: each file
//! is hashed and must match before its engine loads it. A name is a plain
//! identifier (`[a-z0-9][a-z0-9._-]*`, no `/`, no `..`), so a guest can never
//! turn a name into a path. Lookups of unknown names fail; nothing here
//! touches the filesystem after construction.

use crate::backend::{ModelGraph, NnEngine, TaskEnv, TaskGraph};
use crate::models::{self, ModelError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wasmtime_wasi_nn::{Graph, GraphRegistry};

/// Why a model could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The name is not a plain identifier.
    #[error("invalid model name {0:?}: use lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")]
    BadName(String),
    /// The same name was given twice.
    #[error("model name {0:?} given twice")]
    Duplicate(String),
    /// No engine serves the model's encoding on this host.
    #[error("no engine for encoding {encoding:?} (model {name:?}); this host has: {available}")]
    NoEngine {
        /// The model.
        name: String,
        /// Its encoding.
        encoding: String,
        /// What the host has.
        available: String,
    },
    /// The expected digest is not a sha256.
    #[error("{0}")]
    BadDigest(String),
    /// The file is missing or does not match its digest.
    #[error(transparent)]
    File(#[from] ModelError),
    /// The engine could not load the file.
    #[error("engine {engine} cannot load model {name:?} from {path}: {source:#}")]
    Load {
        /// The model.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The engine.
        engine: String,
        /// What the engine said.
        source: anyhow::Error,
    },
}

/// A model as registered: what receipts report, and the loaded graph.
#[derive(Clone)]
pub struct RegisteredModel {
    /// The name jobs load it by.
    pub name: String,
    /// Digest of the file (verified at registration).
    pub sha256: tidepool_proto::Digest,
    /// The wasi-nn encoding.
    pub encoding: String,
    /// The engine that runs it, with version.
    pub engine: String,
    /// The loaded model, shared by every task.
    graph: Arc<dyn ModelGraph>,
}

impl std::fmt::Debug for RegisteredModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredModel")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("engine", &self.engine)
            .finish()
    }
}

/// The host's models, by name. Cheap to share (`Arc` inside).
#[derive(Debug, Clone, Default)]
pub struct ModelRegistry {
    /// name → model; immutable after construction.
    models: Arc<BTreeMap<String, RegisteredModel>>,
}

/// Is `name` a plain model identifier?
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        && !name.contains("..")
}

/// Collects models for a [`ModelRegistry`].
#[derive(Debug)]
pub struct RegistryBuilder {
    /// Engines by encoding.
    engines: Vec<Arc<dyn NnEngine>>,
    /// Models registered so far.
    models: BTreeMap<String, RegisteredModel>,
}

impl RegistryBuilder {
    /// Start with these engines (one per encoding).
    pub fn new(engines: Vec<Arc<dyn NnEngine>>) -> Self {
        Self {
            engines,
            models: BTreeMap::new(),
        }
    }

    /// Verify `path` against `sha256`, load it with the engine for `encoding`
    /// and register it under `name`.
    pub fn add(
        &mut self,
        name: &str,
        encoding: &str,
        path: &Path,
        sha256: &str,
    ) -> Result<&mut Self, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        if self.models.contains_key(name) {
            return Err(RegistryError::Duplicate(name.to_owned()));
        }
        let engine = self
            .engines
            .iter()
            .find(|e| e.encoding().to_string() == encoding)
            .ok_or_else(|| RegistryError::NoEngine {
                name: name.to_owned(),
                encoding: encoding.to_owned(),
                available: self
                    .engines
                    .iter()
                    .map(|e| e.encoding().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        models::verify_file(path, sha256)?;
        // verify_file accepted it, so it is 64 hex characters.
        let digest = tidepool_proto::Digest::parse(sha256)
            .map_err(|e| RegistryError::BadDigest(e.to_string()))?;
        let graph = engine.load(path).map_err(|source| RegistryError::Load {
            name: name.to_owned(),
            path: path.to_owned(),
            engine: engine.describe(),
            source,
        })?;
        self.models.insert(
            name.to_owned(),
            RegisteredModel {
                name: name.to_owned(),
                sha256: digest,
                encoding: encoding.to_owned(),
                engine: engine.describe(),
                graph,
            },
        );
        Ok(self)
    }

    /// Finish.
    pub fn build(self) -> ModelRegistry {
        ModelRegistry {
            models: Arc::new(self.models),
        }
    }
}

impl ModelRegistry {
    /// The registered models, by name.
    pub fn models(&self) -> impl Iterator<Item = &RegisteredModel> {
        self.models.values()
    }

    /// One model.
    pub fn get(&self, name: &str) -> Option<&RegisteredModel> {
        self.models.get(name)
    }

    /// The view one task gets: the same models, bound to the task's budget,
    /// recording which names the task loaded (for its receipt).
    pub fn for_task(&self, env: &TaskEnv) -> (TaskRegistry, Arc<Mutex<Vec<String>>>) {
        let used = Arc::new(Mutex::new(Vec::new()));
        let graphs = self
            .models
            .iter()
            .map(|(n, m)| {
                (
                    n.clone(),
                    Graph::from(TaskGraph {
                        model: m.graph.clone(),
                        env: env.clone(),
                    }),
                )
            })
            .collect();
        (
            TaskRegistry {
                graphs,
                nn: env.nn.clone(),
                used: used.clone(),
            },
            used,
        )
    }
}

/// One task's registry (given to wasi-nn; dropped with the task's store).
pub struct TaskRegistry {
    /// name → the task's handle on the shared model.
    graphs: BTreeMap<String, Graph>,
    /// Names the task loaded, in order, deduplicated.
    used: Arc<Mutex<Vec<String>>>,
    /// The task's wasi-nn accounting (bounds what its failures log).
    nn: Arc<crate::backend::budget::NnUsage>,
}

impl std::fmt::Debug for TaskRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRegistry")
            .field("names", &self.graphs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TaskRegistry {
    fn note(&self, name: &str) {
        // A poisoned lock only means another thread panicked mid-push; the list is still usable.
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if !used.iter().any(|u| u == name) {
            used.push(name.to_owned());
        }
    }
}

impl GraphRegistry for TaskRegistry {
    fn get(&self, name: &str) -> Option<&Graph> {
        if !valid_name(name) {
            if let Some(more) = self.nn.may_log() {
                let name = crate::guest_text::escape(name, 64);
                tracing::warn!(name, "guest asked for an invalid model name{more}");
            }
            return None;
        }
        let g = self.graphs.get(name);
        if g.is_some() {
            self.note(name);
        }
        g
    }
    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        if !valid_name(name) {
            return None;
        }
        if self.graphs.contains_key(name) {
            self.note(name);
        }
        self.graphs.get_mut(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_identifiers() {
        for ok in ["minilm-l3", "gemma3.270m", "a", "x_1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../etc/passwd",
            "/abs",
            "a/b",
            "Upper",
            "..",
            "a..b",
            "-x",
            "a b",
            "a\0",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
