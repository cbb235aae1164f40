//! Node fit: whether a node's declared capabilities can run a bundle
//! ([`can_run`]), and if not the first reason why ([`cannot_run`],
//! [`Unfit`]). The one place that decides; pure functions of the
//! capabilities and the locked manifest.

use tidepool_proto::manifest::{Device, LockedManifest};
use tidepool_proto::wire::Capabilities;

/// Can a node with `caps` run this bundle? GPU-tier bundles need the
/// node's GPU to have the memory they ask for and a GPU engine for every
/// encoding they load (their re-executions go through here too, so they
/// are checked on GPUs as well).
pub fn can_run(caps: &Capabilities, m: &LockedManifest) -> bool {
    cannot_run(caps, m).is_none()
}

/// Why a node cannot run a bundle: the first unmet need [`cannot_run`]
/// finds. Borrowed from the manifest, so matching allocates nothing; its
/// `Display` is what job authors read in `JobSummary::waiting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit<'m> {
    /// A GPU-tier bundle and a node without a GPU.
    NoGpu,
    /// The node's GPU has less memory than the bundle asks for.
    GpuMemory {
        /// MiB the node's GPU has.
        has: u32,
        /// MiB the bundle needs.
        needs: u32,
    },
    /// The node's GPU has no engine for this encoding.
    NoGpuEngine(&'m str),
    /// The node runs only other publishers' bundles.
    Publisher,
    /// The node offers less guest memory than the bundle's limit.
    Memory {
        /// MiB the node offers.
        offers: u32,
        /// MiB the bundle's limit asks for.
        needs: u32,
    },
    /// No engine for a model's encoding.
    NoEngine {
        /// The encoding.
        encoding: &'m str,
        /// The model that needs it.
        model: &'m str,
    },
    /// The node neither has the model nor fetches models.
    NoModel(&'m str),
    /// The bundle pins a model to an engine the node does not run.
    PinnedEngine {
        /// The model.
        model: &'m str,
        /// The engine it is pinned to.
        engine: &'m str,
    },
}

impl std::fmt::Display for Unfit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::NoGpu => write!(f, "no GPU"),
            Unfit::GpuMemory { has, needs } => {
                write!(f, "its GPU has {has} MiB, the job needs {needs} MiB")
            }
            Unfit::NoGpuEngine(e) => write!(f, "no GPU engine for {e}"),
            Unfit::Publisher => write!(f, "does not run this publisher's bundles"),
            Unfit::Memory { offers, needs } => {
                write!(
                    f,
                    "offers {offers} MiB of guest memory, the job needs {needs}"
                )
            }
            Unfit::NoEngine { encoding, model } => {
                write!(f, "no engine for {encoding} (model {model})")
            }
            Unfit::NoModel(m) => write!(f, "does not have model {m} and does not fetch models"),
            Unfit::PinnedEngine { model, engine } => {
                write!(f, "does not run {engine}, which model {model} is pinned to")
            }
        }
    }
}

/// Why a node with `caps` cannot run this bundle (the first reason found),
/// or `None` when it can.
pub fn cannot_run<'m>(caps: &Capabilities, m: &'m LockedManifest) -> Option<Unfit<'m>> {
    if m.target.device == Device::Gpu {
        let Some(g) = caps.gpu.as_ref() else {
            return Some(Unfit::NoGpu);
        };
        if let Some(needs) = m.target.gpu_memory_mib.filter(|&n| g.memory_mib < n) {
            return Some(Unfit::GpuMemory {
                has: g.memory_mib,
                needs,
            });
        }
        if let Some(model) = m
            .models
            .values()
            .find(|x| !g.encodings.contains(&x.encoding))
        {
            return Some(Unfit::NoGpuEngine(&model.encoding));
        }
    }
    if !caps.publishers.is_empty() && !caps.publishers.contains(&m.publisher) {
        return Some(Unfit::Publisher);
    }
    if caps.memory_mib != 0 && caps.memory_mib < m.limits.memory_mib {
        return Some(Unfit::Memory {
            offers: caps.memory_mib,
            needs: m.limits.memory_mib,
        });
    }
    for (name, model) in &m.models {
        if !caps.encodings.contains(&model.encoding) {
            return Some(Unfit::NoEngine {
                encoding: &model.encoding,
                model: name,
            });
        }
        if !caps.fetch_models && !caps.models.contains(&model.blob.sha256) {
            return Some(Unfit::NoModel(name));
        }
        if let Some(pin) = &model.engine {
            if !caps
                .engines
                .iter()
                .any(|e| tidepool_proto::manifest::engine_fits(Some(pin), e))
            {
                return Some(Unfit::PinnedEngine {
                    model: name,
                    engine: pin,
                });
            }
        }
    }
    None
}
