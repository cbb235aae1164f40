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
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
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

/// The models loaded on a host, shared by every registry built with it: a
/// model file (by digest) loaded by one engine (by its description) is
/// held once, however many bundles name it, for as long as one of their
/// registries lives. A node keeps one for its lifetime.
#[derive(Default)]
pub struct SharedModels {
    /// (file digest, engine) → the loaded model while some registry holds
    /// it; a dead entry is replaced at the next load of that file.
    loaded: Mutex<HashMap<(tidepool_proto::Digest, String), Weak<dyn ModelGraph>>>,
    /// Models loaded from files (not found here) since the host started.
    loads: AtomicU64,
}

impl std::fmt::Debug for SharedModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedModels")
            .field("held", &self.held())
            .field("loads", &self.loads())
            .finish()
    }
}

impl SharedModels {
    /// Models held now (some registry uses them).
    pub fn held(&self) -> usize {
        let map = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Models loaded from their files since the host started.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    fn get(&self, key: &(tidepool_proto::Digest, String)) -> Option<Arc<dyn ModelGraph>> {
        let map = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).and_then(Weak::upgrade)
    }

    fn put(&self, key: (tidepool_proto::Digest, String), graph: &Arc<dyn ModelGraph>) {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let mut map = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(key, Arc::downgrade(graph));
    }
}

/// Collects models for a [`ModelRegistry`].
#[derive(Debug)]
pub struct RegistryBuilder {
    /// Engines by encoding.
    engines: Vec<Arc<dyn NnEngine>>,
    /// Models registered so far.
    models: BTreeMap<String, RegisteredModel>,
    /// The host's loaded models, if it shares them between registries.
    shared: Option<Arc<SharedModels>>,
}

impl RegistryBuilder {
    /// Start with these engines (one per encoding).
    pub fn new(engines: Vec<Arc<dyn NnEngine>>) -> Self {
        Self {
            engines,
            models: BTreeMap::new(),
            shared: None,
        }
    }

    /// Take models already loaded in `shared` from there (one copy per
    /// host), and leave the ones this loads there for the next registry.
    pub fn shared(mut self, shared: Arc<SharedModels>) -> Self {
        self.shared = Some(shared);
        self
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
        let digest = tidepool_proto::Digest::parse(sha256)
            .map_err(|e| RegistryError::BadDigest(e.to_string()))?;
        let key = (digest, engine.describe());
        // A model held already was verified and loaded from a file with
        // this digest: its bytes are in memory, whatever the file is now.
        let graph = match self.shared.as_ref().and_then(|s| s.get(&key)) {
            Some(g) => g,
            None => {
                models::verify_file(path, sha256)?;
                let graph = engine.load(path).map_err(|source| RegistryError::Load {
                    name: name.to_owned(),
                    path: path.to_owned(),
                    engine: engine.describe(),
                    source,
                })?;
                if let Some(s) = &self.shared {
                    s.put(key, &graph);
                }
                graph
            }
        };
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
    fn a_model_named_by_several_registries_is_loaded_once_while_one_holds_it() {
        let path = crate::models::models_dir().join("minilm-l3.onnx");
        let Ok(entry) = crate::models::catalog_entry("minilm-l3") else {
            panic!("catalogue has minilm-l3");
        };
        assert!(
            path.is_file(),
            "run `cargo xtask test` (it fetches the models) first: {path:?}"
        );
        let engines: Vec<Arc<dyn NnEngine>> = vec![Arc::new(crate::TractEngine)];
        let shared = Arc::new(SharedModels::default());
        let build = |name: &str| {
            let mut b = RegistryBuilder::new(engines.clone()).shared(shared.clone());
            b.add(name, "onnx", &path, entry.sha256).expect("add");
            b.build()
        };
        let one = build("a");
        let two = build("b");
        let (ga, gb) = (
            &one.get("a").expect("a").graph,
            &two.get("b").expect("b").graph,
        );
        assert!(Arc::ptr_eq(ga, gb), "one copy for both");
        assert_eq!((shared.loads(), shared.held()), (1, 1));
        drop((one, two));
        assert_eq!(shared.held(), 0, "let go with the last registry");
        let _three = build("c");
        assert_eq!((shared.loads(), shared.held()), (2, 1), "loaded again");
        // Without sharing, each registry has its own.
        let mut b = RegistryBuilder::new(engines.clone());
        b.add("d", "onnx", &path, entry.sha256).expect("add");
        assert_eq!(shared.loads(), 2);
    }

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
