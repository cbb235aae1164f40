//! The dependency rules of ARCHITECTURE.md, checked from `cargo metadata`:
//! which crate may link which, and no declared dependency that no source
//! file of the package uses.
//!
//! The rules are data ([`RULES`]); [`violations`] is pure so its tests feed
//! it made-up workspaces that break each rule.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A crate that must not depend on some others, and why.
#[derive(Debug)]
pub struct Rule {
    /// The package the rule is about.
    pub package: &'static str,
    /// Packages it must not depend on (normal, build or dev).
    pub forbidden: &'static [&'static str],
    /// Whether [`IO_CRATES`] are forbidden too.
    pub no_io: bool,
    /// The invariant, for the error message.
    pub why: &'static str,
}

/// Crates that do I/O (sockets, files through a database, an async runtime).
const IO_CRATES: &[&str] = &[
    "tokio",
    "quinn",
    "rustls",
    "rusqlite",
    "mio",
    "socket2",
    "tidepool-net",
];

/// The workspace's dependency rules.
pub const RULES: &[Rule] = &[
    Rule {
        package: "tidepool-proto",
        forbidden: &[
            "tidepool-host",
            "tidepool-node",
            "tidepool-pool",
            "tidepool-client",
        ],
        no_io: true,
        why: "proto has no I/O and depends on no other tidepool crate but models",
    },
    Rule {
        package: "tidepool-host",
        forbidden: &[
            "tokio",
            "quinn",
            "tidepool-net",
            "tidepool-pool",
            "tidepool-node",
            "tidepool-client",
        ],
        no_io: false,
        why: "host is the sandbox and the engines only: no network, never the pool",
    },
    Rule {
        package: "tidepool-pool",
        forbidden: &["tidepool-host", "tidepool-node", "tidepool-client"],
        no_io: false,
        why: "the pool never links the sandbox, the node agent or the client",
    },
    Rule {
        package: "tidepool-node",
        forbidden: &["tidepool-pool", "tidepool-client"],
        no_io: false,
        why: "the node never links the pool or its clients",
    },
    Rule {
        package: "tidepool-client",
        forbidden: &["tidepool-pool", "tidepool-host", "tidepool-node"],
        no_io: false,
        why: "a client knows the pool only through the wire",
    },
    Rule {
        package: "tidepool-guest",
        forbidden: &[
            "tidepool-host",
            "tidepool-node",
            "tidepool-pool",
            "tidepool-client",
            "tidepool-net",
        ],
        no_io: false,
        why: "the guest SDK is compiled into jobs: it knows only the WIT contract",
    },
    Rule {
        package: "tidepool-models",
        forbidden: &[],
        no_io: true,
        why: "models is small so xtask can use it without the network stack",
    },
];

/// Packages no library may depend on.
const BINARIES: &[&str] = &["tidepool-cli", "xtask"];

/// Kind of a declared dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[dependencies]`.
    Normal,
    /// `[dev-dependencies]`.
    Dev,
    /// `[build-dependencies]`.
    Build,
}

/// A declared dependency.
#[derive(Debug, Clone)]
pub struct Dep {
    /// Package name (`tidepool-net`).
    pub name: String,
    /// The name it is used under in code (`tidepool_net`, or its rename).
    pub ident: String,
    /// Where it is declared.
    pub kind: Kind,
}

/// A workspace package and the Rust sources that may use its dependencies.
#[derive(Debug, Clone)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Whether it has a library target (binaries may depend on anything).
    pub is_lib: bool,
    /// Declared dependencies.
    pub deps: Vec<Dep>,
    /// Every `.rs` file of the package (src, tests, benches, examples,
    /// build.rs), concatenated; searched for uses of each dependency.
    pub sources: String,
}

/// The workspace's packages from `cargo metadata --no-deps`.
pub fn workspace(metadata: &serde_json::Value) -> Result<Vec<Package>> {
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata: no packages")?;
    let mut out = Vec::new();
    for p in packages {
        let name = p["name"].as_str().context("package without a name")?;
        let manifest = PathBuf::from(
            p["manifest_path"]
                .as_str()
                .context("package without a manifest path")?,
        );
        let dir = manifest.parent().context("manifest path has no parent")?;
        let is_lib = p["targets"].as_array().is_some_and(|ts| {
            ts.iter().any(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "lib" || k == "cdylib"))
            })
        });
        let deps = p["dependencies"]
            .as_array()
            .context("package without dependencies list")?
            .iter()
            .filter_map(|d| {
                let name = d["name"].as_str()?.to_owned();
                let ident = d["rename"].as_str().unwrap_or(&name).replace('-', "_");
                let kind = match d["kind"].as_str() {
                    Some("dev") => Kind::Dev,
                    Some("build") => Kind::Build,
                    _ => Kind::Normal,
                };
                Some(Dep { name, ident, kind })
            })
            .collect();
        out.push(Package {
            name: name.to_owned(),
            is_lib,
            deps,
            sources: read_sources(dir)?,
        });
    }
    Ok(out)
}

/// Every `.rs` file under `dir` (not `target/`), concatenated.
fn read_sources(dir: &Path) -> Result<String> {
    let mut text = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                text.push_str(&std::fs::read_to_string(&path)?);
                text.push('\n');
            }
        }
    }
    Ok(text)
}

/// Does `sources` use the crate `ident` (as a path, `use`, or `extern crate`)?
fn uses(sources: &str, ident: &str) -> bool {
    let bytes = sources.as_bytes();
    sources.match_indices(ident).any(|(i, _)| {
        let before_ok = i == 0 || {
            let c = bytes[i - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let rest = &sources[i + ident.len()..];
        let after_ok = rest.starts_with("::")
            || rest.starts_with(';')
            || rest.starts_with(" as ")
            || sources[..i].ends_with("extern crate ");
        before_ok && after_ok
    })
}

/// Every broken rule, as a sentence naming the package, the dependency and
/// the invariant.
pub fn violations(packages: &[Package]) -> Vec<String> {
    let mut out = Vec::new();
    for p in packages {
        for d in &p.deps {
            if let Some(rule) = RULES.iter().find(|r| {
                r.package == p.name
                    && (r.forbidden.contains(&d.name.as_str())
                        || (r.no_io && IO_CRATES.contains(&d.name.as_str())))
            }) {
                out.push(format!(
                    "{} depends on {} ({:?}): {}",
                    p.name, d.name, d.kind, rule.why
                ));
            }
            if p.is_lib && BINARIES.contains(&d.name.as_str()) {
                out.push(format!(
                    "{} (a library) depends on the binary package {}",
                    p.name, d.name
                ));
            }
            if !uses(&p.sources, &d.ident) {
                out.push(format!(
                    "{} declares {} ({:?}) but no source file uses `{}`",
                    p.name, d.name, d.kind, d.ident
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(name: &str) -> Dep {
        Dep {
            name: name.into(),
            ident: name.replace('-', "_"),
            kind: Kind::Normal,
        }
    }

    fn package(name: &str, deps: &[&str], sources: &str) -> Package {
        Package {
            name: name.into(),
            is_lib: true,
            deps: deps.iter().map(|d| dep(d)).collect(),
            sources: sources.into(),
        }
    }

    #[test]
    fn a_forbidden_edge_is_reported_with_its_reason() {
        let bad = [
            package("tidepool-proto", &["tokio"], "use tokio::sync;"),
            package("tidepool-host", &["tidepool-pool"], "tidepool_pool::x();"),
            package(
                "tidepool-pool",
                &["tidepool-host"],
                "use tidepool_host::Sandbox;",
            ),
            package("tidepool-node", &["tidepool-pool"], "tidepool_pool::x();"),
            package("tidepool-guest", &["tidepool-host"], "tidepool_host::x();"),
            package("tidepool-net", &["tidepool-cli"], "tidepool_cli::x();"),
        ];
        let v = violations(&bad);
        assert_eq!(v.len(), bad.len(), "{v:#?}");
        assert!(v[0].contains("proto has no I/O"), "{}", v[0]);
        assert!(v[5].contains("binary package tidepool-cli"), "{}", v[5]);
    }

    #[test]
    fn an_unused_dependency_is_reported() {
        let p = package(
            "tidepool-pool",
            &["serde_json", "hex"],
            "let v = serde_json::json!({});\nlet hexagon = 1;",
        );
        let v = violations(&[p]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(v[0].contains("declares hex"), "{}", v[0]);
    }

    #[test]
    fn uses_matches_paths_and_imports_not_substrings() {
        assert!(uses("use ring::rand;", "ring"));
        assert!(uses("extern crate ring;", "ring"));
        assert!(uses("#[derive(serde::Deserialize)]", "serde"));
        assert!(!uses("let string = 1; spring::x();", "ring"));
        assert!(!uses("serde_json::to_vec(&x)", "serde"));
    }

    #[test]
    fn this_workspace_keeps_every_rule() {
        let out = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .current_dir(crate::root())
            .output()
            .expect("cargo metadata");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let v = violations(&workspace(&meta).expect("workspace"));
        assert!(v.is_empty(), "{v:#?}");
    }
}
