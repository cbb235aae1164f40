//! Job manifests: what an author writes (`tidepool.toml`), the locked form
//! with every digest, and the signed form nodes check before running anything.
//!
//! - [`AuthoredManifest`] is parsed from TOML and validated field by field;
//!   it names files (component, models) relative to the manifest.
//! - [`LockedManifest`] replaces every file by its digest and size, adds the
//!   publisher's key and validity window, and serialises deterministically
//!   (MessagePack with named fields in declaration order; maps are sorted).
//! - [`SignedManifest`] is the locked bytes plus an Ed25519 signature over
//!   [`MANIFEST_TAG`](crate::keys::MANIFEST_TAG) and those exact bytes. Only
//!   this form is trusted; the bundle's digest is the digest of the bytes.
//!
//! Reading files and hashing them is the caller's job (see `tidepool-pool`'s
//! `bundle` module); this module does no I/O.

use crate::keys::{KeyError, PublicKey, SecretKey, Signature, MANIFEST_TAG};
use crate::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The locked manifest schema this build writes and reads.
pub const SCHEMA: u32 = 1;

/// Errors in an authored manifest. Each says which field is wrong and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not TOML, or a field has the wrong type, or an unknown field.
    #[error("{0}")]
    Toml(String),
    /// A field's value is out of its allowed range or format.
    #[error("field `{field}`: {why}")]
    Invalid {
        /// Dotted path of the field (`models.minilm.sha256`).
        field: String,
        /// What is wrong with it.
        why: String,
    },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// Resource limits a task runs under; nodes may lower them, never raise them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory per task, MiB.
    #[serde(default = "Limits::default_memory_mib")]
    pub memory_mib: u32,
    /// Wall-clock deadline per task, milliseconds.
    #[serde(default = "Limits::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest output a task may return, KiB.
    #[serde(default = "Limits::default_output_kib")]
    pub max_output_kib: u32,
    /// Fuel (instruction budget) per task; none means unmetered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
}

impl Limits {
    fn default_memory_mib() -> u32 {
        512
    }
    fn default_timeout_ms() -> u64 {
        60_000
    }
    fn default_output_kib() -> u32 {
        16 * 1024
    }
    fn validate(&self) -> Result<(), ManifestError> {
        if !(16..=16 * 1024).contains(&self.memory_mib) {
            return Err(invalid(
                "limits.memory_mib",
                format!("{} is outside 16..=16384", self.memory_mib),
            ));
        }
        if !(10..=3_600_000).contains(&self.timeout_ms) {
            return Err(invalid(
                "limits.timeout_ms",
                format!("{} is outside 10..=3600000", self.timeout_ms),
            ));
        }
        // The largest output is the largest item a frame carries alone.
        let most = (crate::wire::MAX_ITEM_BYTES / 1024) as u32;
        if !(1..=most).contains(&self.max_output_kib) {
            return Err(invalid(
                "limits.max_output_kib",
                format!("{} is outside 1..={most}", self.max_output_kib),
            ));
        }
        if self.fuel == Some(0) {
            return Err(invalid(
                "limits.fuel",
                "0 would stop every task before it starts",
            ));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: Self::default_memory_mib(),
            timeout_ms: Self::default_timeout_ms(),
            max_output_kib: Self::default_output_kib(),
            fuel: None,
        }
    }
}

/// How two executions of a task are compared when the pool verifies one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "tier", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Determinism {
    /// Bit-identical outputs (CPU backends in the deterministic sandbox).
    #[default]
    Exact,
    /// Numeric outputs within thresholds (engines or hardware that differ in
    /// floating point). Thresholds are written as decimal strings so the
    /// locked bytes do not depend on float formatting.
    Tolerance {
        /// Largest absolute difference per number (two integers must be
        /// equal). With neither `abs` nor `rel`, numbers outside vectors use
        /// `1e-6` and `1e-5` (the pool's `DEFAULT_ABS`/`DEFAULT_REL`) and
        /// vectors are judged by `cosine` alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        abs: Option<String>,
        /// Largest relative difference per number (of the larger magnitude).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rel: Option<String>,
        /// Smallest cosine similarity per vector (an array of two or more
        /// numbers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cosine: Option<String>,
    },
    /// Generated text checked by one teacher-forced pass of the producer's
    /// tokens (ADR 0008): each claimed token must be within `margin` of the
    /// verifier's `top_k`-th best.
    Llm {
        /// Rank a claimed token must reach (1 = greedy decoding; default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        top_k: Option<u32>,
        /// Slack in logits, a decimal string (default "1.0"; ADR 0020).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        margin: Option<String>,
    },
}

impl Eq for Determinism {}

impl Determinism {
    /// The acceptance policy of the `llm` tier (defaults for other tiers).
    pub fn accept_policy(&self) -> crate::llm::AcceptPolicy {
        let mut p = crate::llm::AcceptPolicy::GREEDY;
        if let Determinism::Llm { top_k, margin } = self {
            if let Some(k) = top_k {
                p.top_k = *k;
            }
            if let Some(m) = margin.as_deref().and_then(|m| m.parse().ok()) {
                p.margin = m;
            }
        }
        p
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if let Determinism::Llm { top_k, margin } = self {
            if let Some(k) = top_k {
                if !(1..=1000).contains(k) {
                    return Err(invalid(
                        "determinism.top_k",
                        format!("{k} is outside 1..=1000"),
                    ));
                }
            }
            if let Some(m) = margin {
                match m.parse::<f32>() {
                    Ok(x) if (0.0..=100.0).contains(&x) => {}
                    Ok(x) => {
                        return Err(invalid(
                            "determinism.margin",
                            format!("{x} is outside 0..=100"),
                        ))
                    }
                    Err(_) => {
                        return Err(invalid(
                            "determinism.margin",
                            format!("{m:?} is not a number"),
                        ))
                    }
                }
            }
        }
        if let Determinism::Tolerance { abs, rel, cosine } = self {
            if abs.is_none() && rel.is_none() && cosine.is_none() {
                return Err(invalid(
                    "determinism",
                    "tier \"tolerance\" needs at least one of abs, rel, cosine",
                ));
            }
            for (name, v, lo, hi) in [
                ("abs", abs, 0.0, f64::MAX),
                ("rel", rel, 0.0, 1.0),
                ("cosine", cosine, -1.0, 1.0),
            ] {
                if let Some(v) = v {
                    let x: f64 = v.parse().map_err(|_| {
                        invalid(
                            format!("determinism.{name}"),
                            format!("{v:?} is not a number"),
                        )
                    })?;
                    if !(lo..=hi).contains(&x) {
                        return Err(invalid(
                            format!("determinism.{name}"),
                            format!("{v} is outside {lo}..={hi}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where a job's models run: the execution target every `load-by-name` of
/// the job gets (wasi-nn's `load-by-name` carries none, so the bundle
/// declares it once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The node's CPU engines; any node can run the job (the default).
    #[default]
    Cpu,
    /// A GPU engine: the pool sends the job's tasks, and re-executions of
    /// them, only to nodes that advertise a GPU with an engine for every
    /// encoding the job loads.
    Gpu,
}

impl Device {
    /// `cpu` or `gpu`.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        }
    }
}

/// What hardware a job needs (`[target]` in `tidepool.toml`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// CPU (default) or GPU.
    #[serde(default)]
    pub device: Device,
    /// Least GPU memory a node must have, MiB (GPU jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mib: Option<u32>,
}

impl Target {
    /// The default (CPU): left out of locked manifests, so bundles signed
    /// before targets existed keep their bytes and signatures.
    pub fn is_default(&self) -> bool {
        *self == Target::default()
    }

    fn validate(&self, determinism: &Determinism, models: usize) -> Result<(), ManifestError> {
        match self.device {
            Device::Cpu => {
                if self.gpu_memory_mib.is_some() {
                    return Err(invalid(
                        "target.gpu_memory_mib",
                        "is only for device = \"gpu\"",
                    ));
                }
            }
            Device::Gpu => {
                if models == 0 {
                    return Err(invalid(
                        "target.device",
                        "\"gpu\" runs the job's models on a GPU, but the job loads no models",
                    ));
                }
                if *determinism == Determinism::Exact {
                    return Err(invalid(
                        "target.device",
                        "GPU results differ between GPU models in the last bits, so \"gpu\" needs tier \"tolerance\" or \"llm\", not \"exact\"",
                    ));
                }
                if let Some(m) = self.gpu_memory_mib {
                    if !(256..=1024 * 1024).contains(&m) {
                        return Err(invalid(
                            "target.gpu_memory_mib",
                            format!("{m} is outside 256..=1048576"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The publisher's wishes for verification; the pool owner's policy decides
/// the sampling itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationPolicy {
    /// Reputation-based sampling (`reputation`), re-execute every result
    /// (`always`: 2x redundancy), or take results on trust (`none`:
    /// only challenges and canaries check them).
    #[serde(default)]
    pub sampling: Sampling,
    /// How long after a result the submitter may challenge it, seconds.
    #[serde(default = "VerificationPolicy::default_challenge_secs")]
    pub challenge_window_secs: u64,
}

impl VerificationPolicy {
    fn default_challenge_secs() -> u64 {
        7 * 24 * 3600
    }
}

/// How often a bundle's results are re-executed (serialised as the names
/// below, so signed manifests keep their bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// At the producer's reputation-based rate (the default).
    #[default]
    Reputation,
    /// Every result (2x redundancy).
    Always,
    /// Never by sampling: only challenges and canaries check results.
    None,
}

impl Default for VerificationPolicy {
    fn default() -> Self {
        Self {
            sampling: Sampling::Reputation,
            challenge_window_secs: Self::default_challenge_secs(),
        }
    }
}

/// Longest engine pin a model may have, bytes.
pub const MAX_ENGINE_PIN_BYTES: usize = 128;

/// Whether an engine identity (`tract-onnx 0.23.9 (cpu)`) satisfies a
/// model's pin (none: any engine).
pub fn engine_fits(pin: Option<&str>, engine: &str) -> bool {
    pin.is_none_or(|p| engine.starts_with(p))
}

/// A model as the author names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoredModel {
    /// wasi-nn graph encoding (`onnx`, `ggml`).
    pub encoding: String,
    /// Where the file comes from: a path relative to the manifest, or
    /// `catalog:<name>` for a model of the built-in catalogue.
    pub source: String,
    /// Expected sha256 of the file (hex, optionally `sha256:`-prefixed).
    pub sha256: String,
    /// Pin the engine: only nodes whose engine for this model's encoding
    /// names itself with this prefix (`tract-onnx`, `tract-onnx 0.23.9`,
    /// `onnxruntime`) run the job, and receipts must say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

/// `tidepool.toml` as written by a job author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoredManifest {
    /// Bundle name: lowercase letters, digits and `-`, 1–64 characters.
    pub name: String,
    /// Semantic version; nodes refuse a version lower than one they have seen.
    pub version: String,
    /// Path of the component, relative to the manifest.
    pub component: String,
    /// How many days a signed bundle stays valid (default 365).
    #[serde(default = "AuthoredManifest::default_valid_days")]
    pub valid_days: u32,
    /// Models the job loads by name.
    #[serde(default)]
    pub models: BTreeMap<String, AuthoredModel>,
    /// Per-task limits.
    #[serde(default)]
    pub limits: Limits,
    /// Determinism tier.
    #[serde(default)]
    pub determinism: Determinism,
    /// Verification wishes.
    #[serde(default)]
    pub verification: VerificationPolicy,
    /// Hardware the job needs (CPU unless it says).
    #[serde(default)]
    pub target: Target,
    /// Parameters given to every task (`tidepool:job/host.params`).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// Is `name` a valid bundle or model name?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

const ENCODINGS: &[&str] = &[
    "onnx",
    "ggml",
    "openvino",
    "pytorch",
    "tensorflow",
    "tensorflowlite",
    "autodetect",
];

impl AuthoredManifest {
    fn default_valid_days() -> u32 {
        365
    }

    /// Parse and validate the text of a `tidepool.toml`.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let m: AuthoredManifest = toml::from_str(text)
            .map_err(|e| ManifestError::Toml(e.to_string().trim_end().to_owned()))?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if !valid_name(&self.name) {
            return Err(invalid(
                "name",
                format!(
                    "{:?} must be 1-64 lowercase letters, digits or '-'",
                    self.name
                ),
            ));
        }
        semver::Version::parse(&self.version).map_err(|e| {
            invalid(
                "version",
                format!("{:?} is not a semantic version: {e}", self.version),
            )
        })?;
        if self.component.trim().is_empty() {
            return Err(invalid("component", "is empty"));
        }
        if !(1..=3650).contains(&self.valid_days) {
            return Err(invalid(
                "valid_days",
                format!("{} is outside 1..=3650", self.valid_days),
            ));
        }
        for (name, m) in &self.models {
            if !valid_name(name) {
                return Err(invalid(
                    format!("models.{name}"),
                    "model names must be 1-64 lowercase letters, digits or '-'",
                ));
            }
            if !ENCODINGS.contains(&m.encoding.as_str()) {
                return Err(invalid(
                    format!("models.{name}.encoding"),
                    format!(
                        "{:?} is not a wasi-nn encoding ({})",
                        m.encoding,
                        ENCODINGS.join(", ")
                    ),
                ));
            }
            Digest::parse(&m.sha256)
                .map_err(|e| invalid(format!("models.{name}.sha256"), e.to_string()))?;
            if m.source.trim().is_empty() {
                return Err(invalid(format!("models.{name}.source"), "is empty"));
            }
            if let Some(e) = &m.engine {
                if e.is_empty()
                    || e.len() > MAX_ENGINE_PIN_BYTES
                    || !e.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                {
                    return Err(invalid(
                        format!("models.{name}.engine"),
                        format!(
                            "{e:?} must be 1-{MAX_ENGINE_PIN_BYTES} printable ASCII characters (an engine name, e.g. \"tract-onnx\" or \"onnxruntime\")"
                        ),
                    ));
                }
            }
        }
        for k in self.params.keys() {
            if k.is_empty() || k.len() > 64 {
                return Err(invalid(
                    format!("params.{k}"),
                    "parameter names must be 1-64 characters",
                ));
            }
        }
        self.limits.validate()?;
        self.determinism.validate()?;
        self.target.validate(&self.determinism, self.models.len())?;
        Ok(())
    }
}

/// A blob named by digest, with its size (so a fetch knows when it is done
/// and a pool can refuse an oversized upload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Digest of the blob's bytes.
    pub sha256: Digest,
    /// Size in bytes.
    pub size: u64,
}

/// A model in the locked manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockedModel {
    /// wasi-nn graph encoding.
    pub encoding: String,
    /// The file.
    pub blob: BlobRef,
    /// Where the author took it from (informational).
    pub source: String,
    /// The engine it is pinned to (a prefix of the engine's identity);
    /// left out when none, so older signed manifests keep their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

/// The manifest with every digest; the only form that is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockedManifest {
    /// Schema version ([`SCHEMA`]).
    pub schema: u32,
    /// Bundle name.
    pub name: String,
    /// Semantic version (validated).
    pub version: String,
    /// The key that signs this manifest.
    pub publisher: PublicKey,
    /// When it was signed, seconds since the Unix epoch.
    pub issued_at: u64,
    /// When it stops being valid, seconds since the Unix epoch.
    pub expires_at: u64,
    /// The component.
    pub component: BlobRef,
    /// Models by name.
    pub models: BTreeMap<String, LockedModel>,
    /// Per-task limits.
    pub limits: Limits,
    /// Determinism tier.
    pub determinism: Determinism,
    /// Verification wishes.
    pub verification: VerificationPolicy,
    /// Hardware the job needs (absent from the bytes when CPU).
    #[serde(default, skip_serializing_if = "Target::is_default")]
    pub target: Target,
    /// Parameters given to every task.
    pub params: BTreeMap<String, String>,
}

impl LockedManifest {
    /// Lock an authored manifest with the digests and sizes of its files.
    /// `models` must hold exactly the authored models, by name.
    pub fn lock(
        authored: &AuthoredManifest,
        component: BlobRef,
        models: &BTreeMap<String, BlobRef>,
        publisher: PublicKey,
        now: u64,
    ) -> Result<Self, ManifestError> {
        authored.validate()?;
        let mut locked = BTreeMap::new();
        for (name, m) in &authored.models {
            let blob = models.get(name).ok_or_else(|| {
                invalid(format!("models.{name}"), "no file was given for this model")
            })?;
            let want = Digest::parse(&m.sha256)
                .map_err(|e| invalid(format!("models.{name}.sha256"), e.to_string()))?;
            if want != blob.sha256 {
                return Err(invalid(
                    format!("models.{name}.sha256"),
                    format!(
                        "the manifest says {want} but the file {} is {}",
                        m.source, blob.sha256
                    ),
                ));
            }
            locked.insert(
                name.clone(),
                LockedModel {
                    encoding: m.encoding.clone(),
                    blob: *blob,
                    source: m.source.clone(),
                    engine: m.engine.clone(),
                },
            );
        }
        if let Some(extra) = models.keys().find(|k| !authored.models.contains_key(*k)) {
            return Err(invalid(
                format!("models.{extra}"),
                "a file was given for a model the manifest does not name",
            ));
        }
        Ok(Self {
            schema: SCHEMA,
            name: authored.name.clone(),
            version: authored.version.clone(),
            publisher,
            issued_at: now,
            expires_at: now + u64::from(authored.valid_days) * 86_400,
            component,
            models: locked,
            limits: authored.limits.clone(),
            determinism: authored.determinism.clone(),
            verification: authored.verification.clone(),
            target: authored.target,
            params: authored.params.clone(),
        })
    }

    /// The deterministic bytes that are signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain structs, strings, integers and BTreeMaps to a Vec cannot fail.
        rmp_serde::to_vec_named(self).expect("manifest serialises")
    }

    /// Sign with the publisher's key. The key must be the manifest's publisher.
    pub fn sign(&self, key: &SecretKey) -> Result<SignedManifest, BundleError> {
        if key.public() != self.publisher {
            return Err(BundleError::PublisherMismatch {
                signer: key.public(),
                publisher: self.publisher,
            });
        }
        let bytes = self.to_bytes();
        let signature = key.sign(MANIFEST_TAG, &bytes);
        Ok(SignedManifest {
            manifest: bytes,
            signer: key.public(),
            signature,
        })
    }

    /// Every blob the bundle needs (component first, then models by name).
    pub fn blobs(&self) -> Vec<BlobRef> {
        let mut v = vec![self.component];
        v.extend(self.models.values().map(|m| m.blob));
        v
    }
}

/// Locked manifest bytes and the publisher's signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The exact bytes of the locked manifest.
    #[serde(with = "bytes_field")]
    pub manifest: Vec<u8>,
    /// Who signed.
    pub signer: PublicKey,
    /// Signature over [`MANIFEST_TAG`] and `manifest`.
    pub signature: Signature,
}

/// Serde helpers that write `Vec<u8>` as MessagePack `bin`.
pub mod bytes_field {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Why a node (or a pool) refuses a signed bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The signer is not among the publishers this party trusts.
    #[error("bundle signed by {0}, which is not a trusted publisher")]
    UnknownSigner(PublicKey),
    /// The signature does not verify: the manifest was altered or the
    /// signature forged.
    #[error("bundle signature by {0} does not verify: the manifest was altered after signing, or the signature is forged")]
    BadSignature(PublicKey),
    /// The signed bytes are not a locked manifest this build reads.
    #[error("bundle manifest is malformed: {0}")]
    Malformed(String),
    /// The manifest names a different publisher than the key that signed it.
    #[error("manifest names publisher {publisher} but was signed by {signer}")]
    PublisherMismatch {
        /// Who signed.
        signer: PublicKey,
        /// Who the manifest says published it.
        publisher: PublicKey,
    },
    /// The manifest's validity window is over.
    #[error(
        "bundle {name} {version} expired at {expires_at} (now {now}, seconds since the Unix epoch)"
    )]
    Expired {
        /// Bundle name.
        name: String,
        /// Bundle version.
        version: String,
        /// End of validity.
        expires_at: u64,
        /// The checker's clock.
        now: u64,
    },
    /// Issued in the future by more than the allowed clock skew.
    #[error("bundle {name} {version} is issued in the future ({issued_at}, now {now})")]
    NotYetValid {
        /// Bundle name.
        name: String,
        /// Bundle version.
        version: String,
        /// Claimed issue time.
        issued_at: u64,
        /// The checker's clock.
        now: u64,
    },
    /// A version lower than one already seen for this name and publisher.
    #[error("bundle {name} {version} is older than version {highest} already seen from this publisher (rollback refused)")]
    Rollback {
        /// Bundle name.
        name: String,
        /// Offered version.
        version: String,
        /// Highest version seen.
        highest: String,
    },
    /// The manifest received is not the bundle that was asked for.
    #[error("asked for bundle {asked} but received manifest {got}")]
    WrongBundle {
        /// Digest asked for.
        asked: Digest,
        /// Digest of what arrived.
        got: Digest,
    },
    /// A blob's bytes do not match the manifest.
    #[error("{what} does not match the signed manifest: expected {expected}, got {actual}")]
    BlobMismatch {
        /// Which blob (`component`, `model minilm-l3`).
        what: String,
        /// Digest in the manifest.
        expected: Digest,
        /// Digest of the bytes received.
        actual: Digest,
    },
}

/// Clock skew tolerated on `issued_at`, seconds.
pub const MAX_CLOCK_SKEW_SECS: u64 = 600;

impl SignedManifest {
    /// The bundle's identity: the digest of the signed manifest bytes.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }

    /// Check signer, signature, well-formedness, publisher and validity window.
    /// Version rollback is checked separately ([`VersionBook`]), since it needs
    /// the checker's memory.
    pub fn verify(
        &self,
        trusted: &BTreeSet<PublicKey>,
        now: u64,
    ) -> Result<LockedManifest, BundleError> {
        if !trusted.contains(&self.signer) {
            return Err(BundleError::UnknownSigner(self.signer));
        }
        self.signer
            .verify(MANIFEST_TAG, &self.manifest, &self.signature)
            .map_err(|_: KeyError| BundleError::BadSignature(self.signer))?;
        let m: LockedManifest = rmp_serde::from_slice(&self.manifest)
            .map_err(|e| BundleError::Malformed(e.to_string()))?;
        if m.schema != SCHEMA {
            return Err(BundleError::Malformed(format!(
                "schema {} (this build reads {SCHEMA})",
                m.schema
            )));
        }
        if m.publisher != self.signer {
            return Err(BundleError::PublisherMismatch {
                signer: self.signer,
                publisher: m.publisher,
            });
        }
        if !valid_name(&m.name) || semver::Version::parse(&m.version).is_err() {
            return Err(BundleError::Malformed(format!(
                "bad name or version: {:?} {:?}",
                m.name, m.version
            )));
        }
        if now >= m.expires_at {
            return Err(BundleError::Expired {
                name: m.name,
                version: m.version,
                expires_at: m.expires_at,
                now,
            });
        }
        if m.issued_at > now + MAX_CLOCK_SKEW_SECS {
            return Err(BundleError::NotYetValid {
                name: m.name,
                version: m.version,
                issued_at: m.issued_at,
                now,
            });
        }
        Ok(m)
    }
}

/// Everything a node checks on a manifest before fetching anything it names:
/// that it is the bundle asked for, signed by a trusted publisher over these
/// exact bytes, within its validity window, and not a rollback. On success
/// the version book has recorded the version; the `bool` says whether it
/// changed (and must be saved).
pub fn admit(
    asked: &Digest,
    signed: &SignedManifest,
    trusted: &BTreeSet<PublicKey>,
    book: &mut VersionBook,
    now: u64,
) -> Result<(LockedManifest, bool), BundleError> {
    let got = signed.digest();
    if got != *asked {
        return Err(BundleError::WrongBundle { asked: *asked, got });
    }
    let m = signed.verify(trusted, now)?;
    let changed = book.admit(&m)?;
    Ok((m, changed))
}

/// Check a blob's bytes against the digest the manifest gives for it.
pub fn check_blob(what: &str, expected: &BlobRef, bytes: &[u8]) -> Result<(), BundleError> {
    let actual = Digest::of(bytes);
    if actual != expected.sha256 {
        return Err(BundleError::BlobMismatch {
            what: what.to_owned(),
            expected: expected.sha256,
            actual,
        });
    }
    Ok(())
}

/// The highest version seen per (publisher, bundle name): the memory that
/// refuses rollbacks. The node persists it between restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionBook {
    /// `"<publisher> <name>"` → highest version seen.
    pub highest: BTreeMap<String, String>,
}

impl VersionBook {
    /// Refuse a version lower than the highest seen; otherwise remember it.
    /// Returns whether the book changed (so the caller knows to save it).
    pub fn admit(&mut self, m: &LockedManifest) -> Result<bool, BundleError> {
        let key = format!("{} {}", m.publisher, m.name);
        let v = semver::Version::parse(&m.version)
            .map_err(|e| BundleError::Malformed(e.to_string()))?;
        if let Some(h) = self.highest.get(&key) {
            // A stored version that no longer parses is treated as absent.
            if let Ok(hv) = semver::Version::parse(h) {
                if v < hv {
                    return Err(BundleError::Rollback {
                        name: m.name.clone(),
                        version: m.version.clone(),
                        highest: h.clone(),
                    });
                }
                if v == hv {
                    return Ok(false);
                }
            }
        }
        self.highest.insert(key, m.version.clone());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
name = "embed"
version = "1.2.0"
component = "embed.wasm"

[models.minilm-l3]
encoding = "onnx"
source = "catalog:minilm-l3"
sha256 = "b388816f00000000000000000000000000000000000000000000000000000000"
"#;

    fn locked(key: &SecretKey, version: &str, now: u64) -> LockedManifest {
        let mut a = AuthoredManifest::parse(TOML).expect("parse");
        a.version = version.into();
        let model = BlobRef {
            sha256: Digest::parse(&a.models["minilm-l3"].sha256).expect("digest"),
            size: 10,
        };
        let models = BTreeMap::from([("minilm-l3".to_owned(), model)]);
        LockedManifest::lock(
            &a,
            BlobRef {
                sha256: Digest::of(b"wasm"),
                size: 4,
            },
            &models,
            key.public(),
            now,
        )
        .expect("lock")
    }

    #[test]
    fn lock_sign_verify_round_trip_and_bytes_are_deterministic() {
        let key = SecretKey::from_seed(crate::keys::KeyRole::Publisher, &[3; 32]);
        let m = locked(&key, "1.2.0", 1_000);
        assert_eq!(m.to_bytes(), locked(&key, "1.2.0", 1_000).to_bytes());
        let signed = m.sign(&key).expect("sign");
        let trusted = BTreeSet::from([key.public()]);
        assert_eq!(signed.verify(&trusted, 2_000).expect("verify"), m);
        assert!(matches!(
            signed.verify(&BTreeSet::new(), 2_000),
            Err(BundleError::UnknownSigner(_))
        ));
        assert!(matches!(
            signed.verify(&trusted, m.expires_at),
            Err(BundleError::Expired { .. })
        ));
        let mut tampered = signed.clone();
        let last = tampered.manifest.len() - 1;
        tampered.manifest[last] ^= 1;
        assert!(matches!(
            tampered.verify(&trusted, 2_000),
            Err(BundleError::BadSignature(_))
        ));
    }

    #[test]
    fn a_gpu_target_is_signed_and_a_cpu_one_leaves_the_bytes_as_they_were() {
        let key = SecretKey::from_seed(crate::keys::KeyRole::Publisher, &[3; 32]);
        let cpu = locked(&key, "1.2.0", 1_000);
        assert_eq!(cpu.target, Target::default());
        // Bundles signed before `target` existed verify unchanged: the
        // default is not in the bytes at all.
        let bytes = cpu.to_bytes();
        assert!(!bytes.windows(6).any(|w| w == b"target"));

        let text = format!(
            "{TOML}\n[determinism]\ntier = \"tolerance\"\ncosine = \"0.999\"\n\n[target]\ndevice = \"gpu\"\ngpu_memory_mib = 4096\n"
        );
        let a = AuthoredManifest::parse(&text).expect("gpu manifest");
        let mut gpu = cpu.clone();
        gpu.target = a.target;
        gpu.determinism = a.determinism.clone();
        assert_eq!(gpu.target.device, Device::Gpu);
        let signed = gpu.sign(&key).expect("sign");
        let trusted = BTreeSet::from([key.public()]);
        let back = signed.verify(&trusted, 2_000).expect("verify");
        assert_eq!(
            back.target,
            Target {
                device: Device::Gpu,
                gpu_memory_mib: Some(4096)
            }
        );
        assert_ne!(signed.manifest, cpu.sign(&key).expect("sign").manifest);
    }

    #[test]
    fn version_book_refuses_rollback() {
        let key = SecretKey::from_seed(crate::keys::KeyRole::Publisher, &[3; 32]);
        let mut book = VersionBook::default();
        assert!(book.admit(&locked(&key, "1.2.0", 0)).expect("first"));
        assert!(!book.admit(&locked(&key, "1.2.0", 0)).expect("same"));
        assert!(matches!(
            book.admit(&locked(&key, "1.1.9", 0)),
            Err(BundleError::Rollback { .. })
        ));
        assert!(book.admit(&locked(&key, "1.10.0", 0)).expect("newer"));
    }
}
