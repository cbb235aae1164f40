//! The authored pipeline file, `pipeline.toml`:
//!
//! ```toml
//! name = "aggregator"
//! max_item_bytes = 4096          # longer items are rejected (default 4096)
//!
//! [[stage]]
//! name = "embed"
//! bundle = "../embed/tidepool.toml"  # the stage's job, relative to this file
//! over = "items"                     # one task per distinct item text
//!
//! [[stage]]
//! name = "dedupe"
//! bundle = "../dedupe/tidepool.toml"
//! over = "all"                       # one task over every item: returns groups
//! from = "embed"                     # items carry this stage's output
//! options = { threshold = 0.9 }      # sent to the task as "options"
//!
//! [[stage]]
//! name = "summarize"
//! bundle = "../summarize/tidepool.toml"
//! over = "groups"                    # one task per group's representative
//! ```
//!
//! What a task of each kind gets as input:
//! - `items`: `{"text": TEXT}`, or with `from = S` the item's output of the
//!   earlier `items` stage `S`, verbatim (so stages chain per item, and an
//!   item moves on as soon as its own input is ready);
//! - `all`: `{"options": OPTIONS, "items": [{"id": ID, ...fields of the
//!   item's output of S}]}`; it must answer `{"groups": [{"members":
//!   [ID, ...]}, ...]}` (at most one `all` stage);
//! - `groups`: like `items`, for the first member of each group.
//!
//! Identical inputs are one task; the pool answers inputs it has seen from
//! its result cache. This module only parses and checks; it never reads
//! the bundles it names.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default longest item, in bytes.
pub const DEFAULT_MAX_ITEM_BYTES: usize = 4096;

/// What one task of a stage covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Over {
    /// One task per distinct item input.
    Items,
    /// One task over every item (a whole-batch stage that groups them).
    All,
    /// One task per group (its first member).
    Groups,
}

/// One stage as authored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageManifest {
    /// Unique within the pipeline; names the stage's outputs in the report.
    pub name: String,
    /// The stage's `tidepool.toml`, relative to the pipeline file.
    pub bundle: PathBuf,
    /// What one task covers.
    pub over: Over,
    /// The earlier `items` stage whose output is this stage's input.
    #[serde(default)]
    pub from: Option<String>,
    /// Options for an `all` stage (sent in its input).
    #[serde(default)]
    pub options: Option<toml::Table>,
}

/// A pipeline as authored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineManifest {
    /// The pipeline's name (in submission keys and the report).
    pub name: String,
    /// Longest item accepted, in bytes.
    #[serde(default = "default_max")]
    pub max_item_bytes: usize,
    /// The stages, in order.
    #[serde(rename = "stage", default)]
    pub stages: Vec<StageManifest>,
    /// Directory the bundle paths are relative to (not in the file).
    #[serde(skip)]
    pub base: PathBuf,
}

fn default_max() -> usize {
    DEFAULT_MAX_ITEM_BYTES
}

/// Why a pipeline file is refused. Each says where.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file cannot be read.
    #[error("cannot read pipeline {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, or fields of the wrong type, unknown or missing.
    #[error("pipeline {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A stage breaks a rule.
    #[error("pipeline {path}: stage {stage:?}: {why}")]
    Stage {
        /// The file.
        path: PathBuf,
        /// The stage's name (or its position).
        stage: String,
        /// Which rule.
        why: String,
    },
    /// The pipeline as a whole breaks a rule.
    #[error("pipeline {path}: {why}")]
    Pipeline {
        /// The file.
        path: PathBuf,
        /// Which rule.
        why: String,
    },
}

impl PipelineManifest {
    /// Read and check a pipeline file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut m = Self::parse(&text, path)?;
        m.base = path.parent().unwrap_or(Path::new(".")).to_owned();
        Ok(m)
    }

    /// Parse and check pipeline text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let m: Self = toml::from_str(text).map_err(|e| ManifestError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        m.check(path)?;
        Ok(m)
    }

    /// The path of a stage's bundle manifest.
    pub fn bundle_path(&self, stage: &StageManifest) -> PathBuf {
        self.base.join(&stage.bundle)
    }

    fn check(&self, path: &Path) -> Result<(), ManifestError> {
        let whole = |why: String| ManifestError::Pipeline {
            path: path.to_owned(),
            why,
        };
        if !valid_name(&self.name) {
            return Err(whole(format!(
                "name {:?} must be 1-64 of a-z, 0-9 and '-'",
                self.name
            )));
        }
        if self.stages.is_empty() {
            return Err(whole("has no [[stage]]".into()));
        }
        if !(1..=16 * 1024 * 1024).contains(&self.max_item_bytes) {
            return Err(whole(format!(
                "max_item_bytes {} must be 1..=16777216",
                self.max_item_bytes
            )));
        }
        let mut all_at = None;
        for (i, s) in self.stages.iter().enumerate() {
            let bad = |why: String| ManifestError::Stage {
                path: path.to_owned(),
                stage: if s.name.is_empty() {
                    format!("#{}", i + 1)
                } else {
                    s.name.clone()
                },
                why,
            };
            if !valid_name(&s.name) {
                return Err(bad("name must be 1-64 of a-z, 0-9 and '-'".into()));
            }
            if self.stages[..i].iter().any(|o| o.name == s.name) {
                return Err(bad("the name is used by an earlier stage".into()));
            }
            if let Some(from) = &s.from {
                match self.stages[..i].iter().find(|o| &o.name == from) {
                    None => return Err(bad(format!("from = {from:?} names no earlier stage"))),
                    Some(o) if o.over != Over::Items => {
                        return Err(bad(format!(
                            "from = {from:?} must name an `items` stage, not an `{}` one",
                            over_name(o.over)
                        )))
                    }
                    Some(_) => {}
                }
            }
            match s.over {
                Over::All => {
                    if all_at.is_some() {
                        return Err(bad("only one stage may be `over = \"all\"`".into()));
                    }
                    if s.from.is_none() {
                        return Err(bad(
                            "an `all` stage needs `from` (the items stage whose outputs it groups)"
                                .into(),
                        ));
                    }
                    all_at = Some(i);
                }
                Over::Groups if all_at.is_none() => {
                    return Err(bad(
                        "`over = \"groups\"` needs an earlier `over = \"all\"` stage".into(),
                    ))
                }
                _ if s.options.is_some() => return Err(bad(
                    "options are for `all` stages (put a job's settings in its bundle's params)"
                        .into(),
                )),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The word for a kind of stage.
pub fn over_name(o: Over) -> &'static str {
    match o {
        Over::Items => "items",
        Over::All => "all",
        Over::Groups => "groups",
    }
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
