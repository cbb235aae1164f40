//! Run an accepted result again on this machine, in the sandbox a node runs
//! it in ([`bundle_sandbox`](crate::bundles::bundle_sandbox)), and say
//! whether it reproduces: bit for bit, within the bundle's tolerance, or
//! (for generated text) accepted by the teacher-forced replay of the
//! recorded tokens — and where it differs when it does not.
//!
//! The parts of the result are checked against each other first (the
//! bundle's signature, the node's receipt against bundle, input, output and
//! transcript; the component and every model file against the digests the
//! bundle names), so a replay never runs something other than what the
//! node claims it ran. Used by `tidepool replay`; never talks to a pool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use tidepool_host::{Sandbox, TaskSpec};
use tidepool_proto::compare::{agree, first_difference};
use tidepool_proto::manifest::Determinism;
use tidepool_proto::replay::Replayable;
use tidepool_proto::wire::{Bytes, Outcome};
use tidepool_proto::Receipt;

/// Where a replay finds its models and how it runs them.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// The models directory (catalogue models are found here by digest).
    pub models_dir: PathBuf,
    /// Model files given by the bundle's model name (override the catalogue).
    pub models: BTreeMap<String, PathBuf>,
    /// The engine for onnx models.
    pub onnx: tidepool_host::OnnxEngine,
    /// Threads per text generation.
    pub llm_threads: u32,
    /// Memory per task, MiB (the bundle's limit caps it).
    pub memory_mib: u32,
}

/// How the local run compares with the recorded result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reproduced {
    /// The same bytes.
    Identical,
    /// Not the same bytes, but within the bundle's `tolerance` tier.
    WithinTolerance {
        /// Where the bytes differ.
        difference: String,
    },
    /// `llm` tier: every recorded token was accepted by the teacher-forced
    /// pass and the output is the recorded one.
    AcceptedByLlmCheck {
        /// Recorded tokens checked.
        tokens: u32,
    },
    /// Does not reproduce.
    Differs {
        /// Where, and why.
        difference: String,
    },
}

impl Reproduced {
    /// Whether the result reproduced (under its tier).
    pub fn ok(&self) -> bool {
        !matches!(self, Self::Differs { .. })
    }
}

/// What a replay found.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// `name version` of the bundle.
    pub bundle: String,
    /// The bundle's determinism tier (`exact`, `tolerance`, `llm`).
    pub tier: &'static str,
    /// The verdict: this run against the recorded outcome.
    pub reproduced: Reproduced,
    /// Whether the recorded outcome is the one the node signed (if not,
    /// the record was changed after the node sent it).
    pub recorded_is_signed: bool,
    /// Whether this run's output is the one the node signed.
    pub local_is_signed: bool,
    /// The node's receipt.
    pub original: Receipt,
    /// This run's receipt.
    pub local: Receipt,
}

/// Why a replay could not run. Each says which part and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The result's parts do not fit each other.
    #[error(transparent)]
    Parts(#[from] tidepool_proto::replay::ReplayError),
    /// The component given is not the bundle's.
    #[error("the component given is {got}, the bundle's is {expected}")]
    Component {
        /// The bundle's.
        expected: tidepool_proto::Digest,
        /// The file's.
        got: tidepool_proto::Digest,
    },
    /// A model file is missing or is not the bundle's.
    #[error("model {name}: {why}")]
    Model {
        /// The bundle's name for it.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The engines or the sandbox could not start, or the task did not end.
    #[error("{0}")]
    Run(String),
}

/// Replay `r` with `component` (the bundle's component bytes).
pub fn replay(
    r: &Replayable,
    component: &[u8],
    cfg: &ReplayConfig,
) -> Result<ReplayReport, ReplayError> {
    let (manifest, lr) = r.check()?;
    let got = tidepool_proto::Digest::of(component);
    if got != manifest.component.sha256 {
        return Err(ReplayError::Component {
            expected: manifest.component.sha256,
            got,
        });
    }
    let mut files = BTreeMap::new();
    for (name, m) in &manifest.models {
        let hex = m.blob.sha256.hex();
        let path = match cfg.models.get(name) {
            Some(p) => p.clone(),
            None => {
                let entry = tidepool_host::models::CATALOG
                    .iter()
                    .find(|e| e.sha256 == hex)
                    .ok_or_else(|| ReplayError::Model {
                        name: name.clone(),
                        why: format!(
                            "sha256 {hex} is not a catalogue model; give its file with --model {name}=PATH"
                        ),
                    })?;
                tidepool_host::models::path_in(&cfg.models_dir, entry)
            }
        };
        tidepool_host::models::verify_file(&path, &hex).map_err(|e| ReplayError::Model {
            name: name.clone(),
            why: e.to_string(),
        })?;
        files.insert(m.blob.sha256, path);
    }
    let (engines, _) = tidepool_host::engines(
        &cfg.onnx,
        tidepool_host::LlmSettings::alone(cfg.llm_threads),
    )
    .map_err(|e| ReplayError::Run(e.to_string()))?;
    let sandbox: Sandbox = crate::bundles::bundle_sandbox(
        &manifest,
        engines,
        &|b| files.get(&b.sha256).cloned().unwrap_or_default(),
        &crate::bundles::NodeSandboxes {
            memory_mib: cfg.memory_mib,
            slots: 1,
            ..Default::default()
        },
    )
    .map_err(ReplayError::Run)?;
    let job = sandbox
        .load(component)
        .map_err(|e| ReplayError::Run(format!("component: {e}")))?;
    let llm = matches!(manifest.determinism, Determinism::Llm { .. });
    let out = sandbox
        .run(
            &job,
            TaskSpec {
                id: &lr.receipt.task_id,
                params: &manifest.params,
                input: &r.input.0,
                replay: llm.then_some(r.transcript.as_slice()),
                accept: manifest.determinism.accept_policy(),
                // A replay on the owner's machine runs alone.
                shared_batches: false,
            },
        )
        .map_err(|e| ReplayError::Run(format!("the task did not end with a result: {e}")))?;
    let local = match &out.result {
        Ok(b) => Outcome::Output(Bytes(b.clone())),
        Err(f) => Outcome::JobError {
            code: f.code.clone(),
            message: f.message.clone(),
        },
    };
    let same = local == r.outcome;
    let (tier, reproduced) = match &manifest.determinism {
        Determinism::Exact => (
            "exact",
            if same {
                Reproduced::Identical
            } else {
                Reproduced::Differs {
                    difference: first_difference(&r.outcome, &local),
                }
            },
        ),
        t @ Determinism::Tolerance { .. } => (
            "tolerance",
            if same {
                Reproduced::Identical
            } else if agree(t, &r.outcome, &local) {
                Reproduced::WithinTolerance {
                    difference: first_difference(&r.outcome, &local),
                }
            } else {
                Reproduced::Differs {
                    difference: format!(
                        "beyond the bundle's tolerance; {}",
                        first_difference(&r.outcome, &local)
                    ),
                }
            },
        ),
        Determinism::Llm { .. } => {
            let rejected = out
                .replay
                .iter()
                .enumerate()
                .find(|(_, rep)| !rep.accepted());
            let tokens = out.replay.iter().map(|rep| rep.checked).sum();
            (
                "llm",
                match rejected {
                    None if same => Reproduced::AcceptedByLlmCheck { tokens },
                    Some((g, rep)) => Reproduced::Differs {
                        difference: format!(
                            "generation {g}: {}",
                            match rep.rejected_at {
                                Some(t) => format!(
                                    "recorded token {t} is not one this model would choose"
                                ),
                                None if rep.missing => "no recorded generation for this prompt".into(),
                                None if rep.truncated => "the recorded text stops early".into(),
                                None => format!("{} recorded tokens past the end", rep.extra_tokens),
                            }
                        ),
                    },
                    None => Reproduced::Differs {
                        difference: format!(
                            "every recorded token was accepted, but the output is not the recorded one; {}",
                            first_difference(&r.outcome, &local)
                        ),
                    },
                },
            )
        }
    };
    Ok(ReplayReport {
        bundle: format!("{} {}", manifest.name, manifest.version),
        tier,
        reproduced,
        recorded_is_signed: r.signed_output(&lr),
        local_is_signed: out.receipt.output == lr.receipt.output,
        original: lr.receipt,
        local: out.receipt,
    })
}
