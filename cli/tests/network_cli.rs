//! The network verbs as their users run them, all as real processes:
//! keygen, bundle pack/sign/verify/publish, pool serve, node run (drained
//! by SIGTERM), job submit/status/results, pool status; the results equal
//! what `tidepool run` gives for the same input.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use tidepool_tests::{fortunes, jobs_dir};

/// `tidepool` in `dir`, with the per-user directories inside it (so no
/// test reads or writes the real ones).
fn command(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidepool"));
    c.current_dir(dir)
        .env("XDG_CONFIG_HOME", dir.join("xdg-config"))
        .env("XDG_DATA_HOME", dir.join("xdg-data"));
    c
}

fn tidepool(dir: &Path, args: &[&str]) -> Output {
    let out = command(dir).args(args).output().expect("run tidepool");
    assert!(
        out.status.success(),
        "tidepool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    spawn_with_env(dir, args, &[])
}

/// [`spawn`] with extra environment variables.
fn spawn_with_env(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Child {
    command(dir)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tidepool")
}

/// `tidepool node run` against a pool, as a child process.
fn spawn_node(
    dir: &Path,
    addr: &str,
    pool_key: &str,
    publisher: &str,
    key: &str,
    data_dir: &str,
    slots: &str,
) -> Child {
    spawn(
        dir,
        &[
            "node",
            "run",
            "--pool",
            addr,
            "--pool-key",
            pool_key,
            "--key",
            key,
            "--publisher",
            publisher,
            "--data-dir",
            data_dir,
            "--slots",
            slots,
        ],
    )
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// `tidepool.toml` for the embed job with the catalogue model.
fn write_embed_manifest(dir: &Path) {
    let entry = tidepool_host::models::catalog_entry("minilm-l3").expect("catalogue");
    std::fs::write(
        dir.join("tidepool.toml"),
        format!(
            "name = \"embed\"\nversion = \"1.0.0\"\ncomponent = \"{}\"\n[models.minilm-l3]\nencoding = \"onnx\"\nsource = \"catalog:minilm-l3\"\nsha256 = \"{}\"\n",
            jobs_dir().join("embed.wasm").display(),
            entry.sha256
        ),
    )
    .expect("manifest");
}

/// `tidepool pool serve` on a free loopback port with `pool.key` in `dir`;
/// returns the process and its `listening ADDR KEY` line.
fn serve_pool(dir: &Path, publisher: &str, extra: &[&str]) -> (Child, String) {
    serve_pool_with_env(dir, publisher, extra, &[])
}

/// [`serve_pool`] with extra environment variables.
fn serve_pool_with_env(
    dir: &Path,
    publisher: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> (Child, String) {
    let mut args = vec![
        "pool",
        "serve",
        "--key",
        "pool.key",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "pool-data",
        "--publisher",
        publisher,
    ];
    args.extend_from_slice(extra);
    let mut pool = spawn_with_env(dir, &args, env);
    let mut line = String::new();
    BufReader::new(pool.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    (pool, line)
}

/// `publisher.key`, `pool.key` and `node.key` in `dir`, made with the CLI;
/// returns the publisher's and the pool's public keys.
fn keygen_all(dir: &Path) -> (String, String) {
    let publisher = stdout(&tidepool(
        dir,
        &["keygen", "--role", "publisher", "-o", "publisher.key"],
    ));
    let pool_pub = stdout(&tidepool(
        dir,
        &["keygen", "--role", "pool", "-o", "pool.key"],
    ));
    tidepool(dir, &["keygen", "--role", "node", "-o", "node.key"]);
    (publisher, pool_pub)
}

#[test]
fn publish_submit_and_read_results_with_the_cli() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (publisher, pool_pub) = keygen_all(dir);
    assert!(publisher.starts_with("ed25519:") && pool_pub.starts_with("ed25519:"));

    write_embed_manifest(dir);
    let bundle = stdout(&tidepool(
        dir,
        &["bundle", "pack", "--key", "publisher.key"],
    ));
    assert!(bundle.ends_with("embed-1.0.0.bundle"), "{bundle}");
    tidepool(dir, &["bundle", "sign", &bundle, "--key", "publisher.key"]);
    let verified = stdout(&tidepool(
        dir,
        &[
            "bundle",
            "verify",
            &bundle,
            "--publisher",
            &publisher,
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&verified).expect("json");
    assert_eq!(v["name"], "embed");

    let (mut pool, line) = serve_pool(dir, &publisher, &[]);
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("listening"), "{line}");
    let addr = words.next().expect("addr").to_owned();
    assert_eq!(words.next(), Some(pool_pub.as_str()));

    let with_pool = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--pool".into(),
            addr.clone(),
            "--pool-key".into(),
            pool_pub.clone(),
            "--key".into(),
            "publisher.key".into(),
        ]);
        v
    };
    let args = with_pool(&["bundle", "publish", &bundle]);
    let digest = stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(digest.starts_with("sha256:"), "{digest}");

    let node = spawn_node(
        dir,
        &addr,
        &pool_pub,
        &publisher,
        "node.key",
        "node-data",
        "2",
    );

    let texts = fortunes(8).expect("fortunes");
    let jsonl: String = texts
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({ "texts": [t] })))
        .collect();
    std::fs::write(dir.join("in.jsonl"), &jsonl).expect("inputs");
    let args = with_pool(&["job", "submit", &bundle, "--inputs", "in.jsonl", "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )))
    .expect("json");
    assert_eq!(
        (summary["done"].as_u64(), summary["tasks"].as_u64()),
        (Some(8), Some(8)),
        "{summary}"
    );
    let job = summary["job"].as_u64().expect("job id").to_string();

    let args = with_pool(&["job", "results", &job, "--json"]);
    let results = stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let lines: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect();
    assert_eq!(lines.len(), 8);
    for (i, l) in lines.iter().enumerate() {
        std::fs::write(dir.join("one.json"), jsonl.lines().nth(i).expect("line")).expect("write");
        let wasm = jobs_dir().join("embed.wasm");
        let local = stdout(&tidepool(
            dir,
            &[
                "run",
                wasm.to_str().expect("path"),
                "--model",
                "minilm-l3",
                "--input",
                "one.json",
            ],
        ));
        let local: serde_json::Value = serde_json::from_str(&local).expect("local json");
        assert_eq!(l["output"], local, "result {i} differs from `tidepool run`");
    }

    let args = with_pool(&["job", "results", &job]);
    let table = stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(table.starts_with("index"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(" done ")).count(),
        8,
        "{table}"
    );

    let args = with_pool(&["pool", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )))
    .expect("json");
    assert_eq!(status["done"].as_u64(), Some(8));
    assert_eq!(
        status["nodes"][0]["completed"].as_u64(),
        Some(8),
        "{status}"
    );
    // A new node's results are all sampled for re-execution, which waits
    // for another node.
    assert_eq!(status["nodes"][0]["reputation"].as_u64(), Some(10_000));
    assert_eq!(
        status["verification"]["pending"].as_u64(),
        Some(8),
        "{status}"
    );

    // A second node runs the re-executions; a challenge of a right result
    // is rejected.
    tidepool(dir, &["keygen", "--role", "node", "-o", "node2.key"]);
    let node2 = spawn_node(
        dir,
        &addr,
        &pool_pub,
        &publisher,
        "node2.key",
        "node2-data",
        "1",
    );
    let task = lines[3]["task"].as_u64().expect("task id").to_string();
    let args = with_pool(&["job", "challenge", &task, "--wait", "--json"]);
    let ch: serde_json::Value = serde_json::from_str(&stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )))
    .expect("json");
    assert_eq!(
        ch["challenge"], "rejected: an independent re-execution agreed with the result",
        "{ch}"
    );
    assert_eq!(ch["verification"], "verified", "{ch}");
    let args = with_pool(&["pool", "status"]);
    let table = stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(
        table.contains("verification:") && table.contains("rep") && table.contains("strikes"),
        "{table}"
    );
    // The pool owner turns the job's confirmed results into canaries (the
    // challenged one at least was confirmed).
    let args = with_pool(&["pool", "canary", &bundle, "--job", &job]);
    let added = stdout(&tidepool(
        dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let n: u32 = added
        .strip_prefix("added ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{added}"));
    assert!(n >= 1, "{added}");
    assert_eq!(added, format!("added {n} canaries; the bundle has {n}"));

    sigterm(&node2);
    assert!(node2
        .wait_with_output()
        .expect("node2 exit")
        .status
        .success());
    sigterm(&node);
    let out = node.wait_with_output().expect("node exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("drained: 8 completed"), "{err}");
    sigterm(&pool);
    assert!(pool.wait().expect("pool exit").success());
}

/// A node process SIGKILLed mid-batch: its leases are re-queued within the
/// lease TTL and another node process finishes the job.
#[test]
#[ignore = "slow: real node processes and a lease TTL to wait out (run by `cargo xtask test`)"]
fn a_sigkilled_node_process_loses_no_task() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let publisher = stdout(&tidepool(
        dir,
        &["keygen", "--role", "publisher", "-o", "publisher.key"],
    ));
    let pool_pub = stdout(&tidepool(
        dir,
        &["keygen", "--role", "pool", "-o", "pool.key"],
    ));
    tidepool(dir, &["keygen", "--role", "node", "-o", "a.key"]);
    tidepool(dir, &["keygen", "--role", "node", "-o", "b.key"]);
    write_embed_manifest(dir);
    let bundle = stdout(&tidepool(
        dir,
        &["bundle", "pack", "--key", "publisher.key", "--sign"],
    ));
    let (mut pool, line) = serve_pool(
        dir,
        &publisher,
        &["--lease-ttl-secs", "2", "--heartbeat-ms", "400"],
    );
    let addr = line.split_whitespace().nth(1).expect("addr").to_owned();
    let with_pool = |args: &[&str]| -> Output {
        let mut v: Vec<&str> = args.to_vec();
        v.extend([
            "--pool",
            &addr,
            "--pool-key",
            &pool_pub,
            "--key",
            "publisher.key",
        ]);
        tidepool(dir, &v)
    };
    with_pool(&["bundle", "publish", &bundle]);
    let node =
        |key: &str, data: &str| spawn_node(dir, &addr, &pool_pub, &publisher, key, data, "2");
    let mut a = node("a.key", "node-a");
    let texts = tidepool_tests::corpus(80).expect("corpus");
    let jsonl: String = texts
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({ "texts": [t] })))
        .collect();
    std::fs::write(dir.join("in.jsonl"), &jsonl).expect("inputs");
    let job = stdout(&with_pool(&[
        "job",
        "submit",
        &bundle,
        "--inputs",
        "in.jsonl",
        "--no-wait",
    ]));
    let status = |what: &[&str]| -> serde_json::Value {
        let mut v = what.to_vec();
        v.push("--json");
        serde_json::from_str(&stdout(&with_pool(&v))).expect("json")
    };
    let start = std::time::Instant::now();
    loop {
        let s = status(&["job", "status", &job]);
        if s["done"].as_u64() >= Some(4) && s["running"].as_u64() > Some(0) {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "node a never got going: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    a.kill().expect("SIGKILL node a");
    a.wait().expect("reap");
    let killed = std::time::Instant::now();
    let b = node("b.key", "node-b");
    let requeued_after = loop {
        let s = status(&["pool", "status"]);
        let expired: u64 = s["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|n| n["expired"].as_u64())
            .sum();
        if expired > 0 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(30),
            "no lease expired: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    eprintln!("node SIGKILL -> first lease re-queued after {requeued_after:?} (TTL 2 s)");
    assert!(requeued_after < std::time::Duration::from_secs(5));
    loop {
        let s = status(&["job", "status", &job]);
        if s["done"].as_u64() == Some(80) {
            assert_eq!(s["dead"].as_u64(), Some(0));
            break;
        }
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(300),
            "not finished: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let results = stdout(&with_pool(&["job", "results", &job, "--json"]));
    let retried = results
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("jsonl"))
        .filter(|l| l["attempts"].as_u64() > Some(1))
        .count();
    assert!(retried > 0, "some task ran a second attempt after the kill");
    sigterm(&b);
    assert!(b.wait_with_output().expect("node b exit").status.success());
    sigterm(&pool);
    assert!(pool.wait().expect("pool exit").success());
}

/// A pool process serving a published echo bundle from a directory, with a
/// publisher key and node keys made there: what the batch tests share.
/// Lives as long as its test; the pool process is killed on drop.
struct EchoPool {
    /// The directory every command runs in.
    dir: std::path::PathBuf,
    /// The publisher's key, `ed25519:...`.
    publisher: String,
    /// The pool's key, `ed25519:...`.
    pool_key: String,
    /// The pool's address.
    addr: String,
    /// The signed bundle's file name.
    bundle: String,
    /// The `pool serve` process.
    pool: Child,
}

impl EchoPool {
    /// Keys (publisher, pool, `<name>.key` per node), the echo bundle
    /// packed and signed, the pool serving, the bundle published.
    fn start(dir: &Path, nodes: &[&str]) -> Self {
        let publisher = stdout(&tidepool(
            dir,
            &["keygen", "--role", "publisher", "-o", "publisher.key"],
        ));
        let pool_key = stdout(&tidepool(
            dir,
            &["keygen", "--role", "pool", "-o", "pool.key"],
        ));
        for k in nodes {
            tidepool(
                dir,
                &["keygen", "--role", "node", "-o", &format!("{k}.key")],
            );
        }
        std::fs::write(
            dir.join("tidepool.toml"),
            format!(
                "name = \"echo\"\nversion = \"1.0.0\"\ncomponent = \"{}\"\n",
                jobs_dir().join("echo.wasm").display()
            ),
        )
        .expect("manifest");
        let bundle = stdout(&tidepool(
            dir,
            &["bundle", "pack", "--key", "publisher.key", "--sign"],
        ));
        let (pool, line) = serve_pool(dir, &publisher, &[]);
        let addr = line.split_whitespace().nth(1).expect("addr").to_owned();
        let me = Self {
            dir: dir.to_owned(),
            publisher,
            pool_key,
            addr,
            bundle,
            pool,
        };
        me.run(&["bundle", "publish", &me.bundle]);
        me
    }

    /// `args` with the pool's address and key and the publisher's key.
    fn args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--pool".into(),
            self.addr.clone(),
            "--pool-key".into(),
            self.pool_key.clone(),
            "--key".into(),
            "publisher.key".into(),
        ]);
        v
    }

    /// Run a pool verb to success; its standard output.
    fn run(&self, args: &[&str]) -> String {
        let args = self.args(args);
        stdout(&tidepool(
            &self.dir,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
    }

    /// Start a pool verb.
    fn spawn(&self, args: &[&str]) -> Child {
        let args = self.args(args);
        spawn(
            &self.dir,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    /// `tidepool node run` with key `<name>.key`, 2 slots.
    fn node(&self, name: &str) -> Child {
        spawn_node(
            &self.dir,
            &self.addr,
            &self.pool_key,
            &self.publisher,
            &format!("{name}.key"),
            &format!("{name}-data"),
            "2",
        )
    }
}

impl Drop for EchoPool {
    fn drop(&mut self) {
        let _ = self.pool.kill();
        let _ = self.pool.wait();
    }
}

/// A batch over the frame limit with the CLI, as a user runs it: a 20 MB
/// JSONL (4,000 lines of 5 KB) submitted with `job submit --no-wait`;
/// `job results --follow`, started before any node runs, prints every
/// result in order as they settle and exits when the job is done;
/// `job results --out FILE` writes them all, and run again on a file cut
/// in the middle of a line (an interrupted run) it writes the rest, so the
/// file ends the same; `job cancel` of a finished job cancels nothing.
#[test]
fn a_twenty_megabyte_jsonl_goes_through_the_cli_and_its_results_stream_and_resume() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ep = EchoPool::start(dir, &["node"]);
    let bundle = ep.bundle.clone();
    let run = |args: &[&str]| ep.run(args);
    let mut jsonl = String::new();
    for i in 0..4000 {
        let mut line = format!("{{\"n\":{i},\"text\":\"");
        let fill = char::from(b'a' + (i % 26) as u8);
        line.extend(std::iter::repeat_n(fill, 5000 - line.len() - 2));
        line.push_str("\"}\n");
        jsonl.push_str(&line);
    }
    assert!(jsonl.len() > 20_000_000);
    std::fs::write(dir.join("big.jsonl"), &jsonl).expect("inputs");
    let job = run(&[
        "job",
        "submit",
        &bundle,
        "--inputs",
        "big.jsonl",
        "--no-wait",
    ]);
    let follow = ep.spawn(&["job", "results", &job, "--follow"]);
    let node = ep.node("node");
    let followed = follow.wait_with_output().expect("follow");
    assert!(
        followed.status.success(),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    let want: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let check = |text: &str| {
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 4000);
        for (i, (got, want)) in lines.iter().zip(&want).enumerate() {
            assert_eq!(got["index"], i, "in order, once each");
            assert_eq!(&got["output"], want, "line {i}");
        }
    };
    check(&String::from_utf8_lossy(&followed.stdout));
    run(&["job", "results", &job, "--out", "out.jsonl"]);
    let full = std::fs::read_to_string(dir.join("out.jsonl")).expect("out");
    check(&full);
    // Interrupted in the middle of line 1,001: run again.
    let cut = full.match_indices('\n').nth(999).expect("1,000 lines").0 + 1 + 40;
    std::fs::write(dir.join("out.jsonl"), &full[..cut]).expect("cut");
    run(&["job", "results", &job, "--out", "out.jsonl"]);
    assert!(
        std::fs::read_to_string(dir.join("out.jsonl")).expect("out") == full,
        "the resumed file is the same"
    );
    // A file that is not this job's is refused, not appended to.
    std::fs::write(dir.join("other.jsonl"), "{\"index\":5}\n").expect("other");
    let args = ep.args(&["job", "results", &job, "--out", "other.jsonl"]);
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .current_dir(dir)
        .args(&args)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the result of input 0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cancelled = run(&["job", "cancel", &job]);
    assert!(
        cancelled.contains("cancelled 0 waiting and 0 running"),
        "{cancelled}"
    );
    sigterm(&node);
    let _ = node.wait_with_output();
}

/// Lines of the big batch: `TIDEPOOL_BIG_BATCH` (the benchmark run sets
/// 1,000,000), else 50,000.
fn big_batch_items() -> usize {
    std::env::var("TIDEPOOL_BIG_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

/// The pool process's peak resident memory (VmHWM), bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// Lines in a file (0 if missing).
fn lines_in(path: &Path) -> usize {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
}

/// The big batch, with the real CLI, pool and two nodes on the
/// echo job: 50,000 lines of real text (about 220 bytes each; 1,000,000 and
/// over 200 MB in the benchmark run) submitted with `job submit` in small
/// chunks, the client killed (SIGKILL) part-way and run again — the pool
/// holds one job of exactly the batch; the results read with `job results
/// --out`, killed part-way and run again — every result exactly once, in
/// order, equal to its line. The pool's peak memory stays under 400 MiB
/// (waiting tasks cost an entry per chunk, pages and grants are
/// byte-bounded; the rest is SQLite's cache and the QUIC buffers).
#[test]
#[ignore = "slow: 50,000 tasks through real processes (run by `cargo xtask test`)"]
fn a_big_batch_is_submitted_and_read_back_through_kills() {
    let n = big_batch_items();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ep = EchoPool::start(dir, &["node-a", "node-b"]);
    let bundle = ep.bundle.clone();
    let run = |args: &[&str]| ep.run(args);
    let pool_status = || -> serde_json::Value {
        serde_json::from_str(&run(&["pool", "status", "--json"])).expect("status json")
    };
    let texts = tidepool_tests::corpus(2000).expect("texts");
    let mut jsonl = String::with_capacity(n * 240);
    for i in 0..n {
        let mut text = texts[i % texts.len()].replace(['\n', '\t'], " ");
        while text.len() < 200 {
            text.push(' ');
            text.push_str(&texts[(i * 7 + text.len()) % texts.len()].replace(['\n', '\t'], " "));
        }
        jsonl.push_str(&serde_json::json!({ "n": i, "text": text }).to_string());
        jsonl.push('\n');
    }
    std::fs::write(dir.join("big.jsonl"), &jsonl).expect("inputs");
    eprintln!("{n} lines, {} bytes", jsonl.len());

    // Submit in 64 KiB chunks; kill the client once the pool holds a fifth.
    let submit = [
        "job",
        "submit",
        &bundle,
        "--inputs",
        "big.jsonl",
        "--no-wait",
        "--chunk-bytes",
        "65536",
    ];
    let mut first = ep.spawn(&submit);
    let start = std::time::Instant::now();
    loop {
        let held = pool_status()["jobs"]
            .as_array()
            .and_then(|j| j.first())
            .and_then(|j| j["tasks"].as_u64())
            .unwrap_or(0);
        if held as usize >= n / 5 {
            break;
        }
        if let Ok(Some(status)) = first.try_wait() {
            panic!("the submission ended before it was killed: {status}");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(600),
            "no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    first.kill().expect("kill the client");
    let _ = first.wait();
    let held = pool_status()["jobs"][0]["tasks"].as_u64().expect("tasks") as usize;
    assert!(held < n, "killed part-way: {held} of {n}");
    let job = run(&submit);
    let jobs = pool_status()["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs.len(), 1, "one job: {jobs:?}");
    assert_eq!(jobs[0]["tasks"].as_u64(), Some(n as u64));
    assert_eq!(jobs[0]["open"].as_bool(), Some(false));

    let nodes: Vec<Child> = ["node-a", "node-b"].iter().map(|k| ep.node(k)).collect();
    // Read the results as they come; kill the reader a third of the way.
    let out = dir.join("out.jsonl");
    let mut reader = ep.spawn(&["job", "results", &job, "--out", "out.jsonl"]);
    let start = std::time::Instant::now();
    while lines_in(&out) < n / 3 {
        assert!(
            reader.try_wait().expect("reader").is_none(),
            "the reader ended early"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1800),
            "no results"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    reader.kill().expect("kill the reader");
    let _ = reader.wait();
    assert!(lines_in(&out) < n, "killed part-way");
    run(&["job", "results", &job, "--out", "out.jsonl"]);
    let text = std::fs::read_to_string(&out).expect("out");
    let mut count = 0;
    for (i, (got, want)) in text.lines().zip(jsonl.lines()).enumerate() {
        let got: serde_json::Value = serde_json::from_str(got).expect("a JSON line");
        assert_eq!(got["index"], i, "in order, once each");
        assert_eq!(
            got["output"],
            serde_json::from_str::<serde_json::Value>(want).expect("line")
        );
        count += 1;
    }
    assert_eq!((count, text.lines().count()), (n, n));
    let peak = peak_rss(ep.pool.id());
    eprintln!("pool peak RSS: {} MiB for {n} tasks", peak >> 20);
    assert!(peak < 400 << 20, "pool peak RSS {} MiB", peak >> 20);
    for node in nodes {
        sigterm(&node);
        let _ = node.wait_with_output();
    }
}

/// Datagrams sent to `sock` within `wait`, joined.
fn received(sock: &std::os::unix::net::UnixDatagram, wait: std::time::Duration) -> String {
    sock.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 512];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

#[test]
fn pool_and_node_tell_systemd_when_they_are_ready_and_when_they_stop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (publisher, pool_pub) = keygen_all(dir);
    // What systemd listens on for a Type=notify unit.
    let sock_path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    let env = [("NOTIFY_SOCKET", sock_path.as_path())];
    let (pool, line) = serve_pool_with_env(dir, &publisher, &[], &env);
    let addr = line.split_whitespace().nth(1).expect("address").to_owned();
    let secs = std::time::Duration::from_secs(20);
    assert_eq!(received(&sock, secs), "READY=1", "pool: {line}");
    let node = spawn_with_env(
        dir,
        &[
            "node",
            "run",
            "--pool",
            &addr,
            "--pool-key",
            &pool_pub,
            "--key",
            "node.key",
            "--publisher",
            &publisher,
            "--data-dir",
            "node-data",
        ],
        &env,
    );
    assert_eq!(received(&sock, secs), "READY=1", "node");
    sigterm(&node);
    assert!(
        received(&sock, secs).starts_with("STOPPING=1"),
        "node stopping"
    );
    let out = node.wait_with_output().expect("node exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sigterm(&pool);
    assert_eq!(received(&sock, secs), "STOPPING=1", "pool stopping");
    let out = pool.wait_with_output().expect("pool exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_systemd_units_verify_with_systemd() {
    // The shipped units, pointed at this build's binary, as systemd itself
    // reads them (directives, sandboxing options, the command's path).
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in ["tidepool-pool.service", "tidepool-node.service"] {
        let text = std::fs::read_to_string(units.join(name)).expect("unit file");
        assert!(text.contains("Type=notify"), "{name}");
        let text = text.replace("/usr/local/bin/tidepool", env!("CARGO_BIN_EXE_tidepool"));
        std::fs::write(tmp.path().join(name), text).expect("write");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(tmp.path().join("tidepool-pool.service"))
        .arg(tmp.path().join("tidepool-node.service"))
        .output()
        .expect("systemd-analyze (Debian's systemd) must be installed");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("tidepool-"), "systemd complains: {said}");
}

#[test]
fn the_deploy_guides_config_files_parse() {
    // docs/deploy.md's pool.toml and node.toml, with real keys in place of
    // the placeholders, read as `pool serve` and `node run` read them.
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md"),
    )
    .expect("docs/deploy.md");
    let key = tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Publisher, &[9; 32])
        .public()
        .to_string();
    let blocks: Vec<String> = doc
        .split("<<'TOML'\n")
        .skip(1)
        .map(|rest| {
            rest.split("\nTOML")
                .next()
                .unwrap_or("")
                .replace("ed25519:...", &key)
        })
        .collect();
    assert_eq!(blocks.len(), 2, "a pool.toml and a node.toml");
    let tmp = tempfile::tempdir().expect("tempdir");
    let pool = tmp.path().join("pool.toml");
    std::fs::write(&pool, &blocks[0]).expect("write");
    let f = tidepool_pool::config::PoolFile::read(&pool).expect("the guide's pool.toml");
    assert!(f.http.is_some() && f.publishers.contains(&key.parse().expect("key")));
    let node = tmp.path().join("node.toml");
    std::fs::write(&node, &blocks[1]).expect("write");
    let f = tidepool_node::config::NodeFile::read(&node).expect("the guide's node.toml");
    assert_eq!(f.slots, Some(2));
    assert_eq!(f.caches.budgets().expect("budgets").models, 8192 << 20);
    assert!(f.metrics.listen.is_some());
}

/// A node owner's day with the defaults: keys made where `keygen` puts
/// them and data where the node keeps it (the XDG directories), `node
/// status` while the node runs and after it stopped, `node gc` refused
/// while it runs and collecting once it stopped.
#[test]
fn a_node_owner_sees_the_node_and_collects_its_caches_at_the_default_paths() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let publisher = stdout(&tidepool(
        dir,
        &["keygen", "--role", "publisher", "-o", "publisher.key"],
    ));
    // Before any node key exists: where it was looked for, and how to make one.
    let out = command(dir)
        .args([
            "node",
            "run",
            "--pool",
            "127.0.0.1:9",
            "--pool-key",
            &publisher,
        ])
        .args(["--publisher", &publisher])
        .output()
        .expect("node run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no key file at") && err.contains("xdg-config/tidepool/node.key"),
        "{err}"
    );
    let pool_pub = stdout(&tidepool(dir, &["keygen", "--role", "pool"]));
    let node_pub = stdout(&tidepool(dir, &["keygen", "--role", "node"]));
    let config = dir.join("xdg-config/tidepool");
    for k in ["pool.key", "node.key"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(config.join(k))
                .expect("key at the default path")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{k}");
    }

    write_embed_manifest(dir);
    let bundle = stdout(&tidepool(
        dir,
        &["bundle", "pack", "--key", "publisher.key", "--sign"],
    ));
    // The pool with its key and data at the defaults.
    let mut pool = spawn(
        dir,
        &[
            "pool",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--publisher",
            &publisher,
        ],
    );
    let mut line = String::new();
    BufReader::new(pool.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let addr = line.split_whitespace().nth(1).expect("address").to_owned();
    assert_eq!(
        line.split_whitespace().nth(2),
        Some(pool_pub.as_str()),
        "{line}"
    );
    assert!(dir.join("xdg-data/tidepool/pool/pool.db").is_file());
    let with_pool = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(
            [
                "--pool",
                &addr,
                "--pool-key",
                &pool_pub,
                "--key",
                "publisher.key",
            ]
            .map(String::from),
        );
        v
    };
    let run = |args: Vec<String>| {
        stdout(&tidepool(
            dir,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
    };
    run(with_pool(&["bundle", "publish", &bundle]));
    let node = spawn(
        dir,
        &[
            "node",
            "run",
            "--pool",
            &addr,
            "--pool-key",
            &pool_pub,
            "--publisher",
            &publisher,
            "--slots",
            "1",
        ],
    );
    let texts = fortunes(4).expect("fortunes");
    let jsonl: String = texts
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({ "texts": [t] })))
        .collect();
    std::fs::write(dir.join("in.jsonl"), &jsonl).expect("inputs");
    let summary: serde_json::Value = serde_json::from_str(&run(with_pool(&[
        "job", "submit", &bundle, "--inputs", "in.jsonl", "--json",
    ])))
    .expect("json");
    assert_eq!(summary["done"].as_u64(), Some(4), "{summary}");

    // While it runs. The report is written within a second of a change.
    let status = || -> serde_json::Value {
        serde_json::from_str(&stdout(&tidepool(dir, &["node", "status", "--json"]))).expect("json")
    };
    let start = std::time::Instant::now();
    let s = loop {
        let s = status();
        if s["state"]["since_start"]["accepted"].as_u64() == Some(4)
            || start.elapsed().as_secs() > 20
        {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(s["running"], true, "{s}");
    assert_eq!(s["state"]["node"], node_pub.as_str(), "{s}");
    assert_eq!(s["state"]["link"], "connected", "{s}");
    assert_eq!(
        s["state"]["since_start"]["completed"].as_u64(),
        Some(4),
        "{s}"
    );
    assert_eq!(
        s["state"]["since_start"]["accepted"].as_u64(),
        Some(4),
        "{s}"
    );
    assert_eq!(
        s["state"]["standing"]["reputation"].as_u64(),
        Some(10_000),
        "{s}"
    );
    assert_eq!(s["state"]["bundles"][0]["name"], "embed", "{s}");
    let model_bytes = std::fs::metadata(tidepool_tests::model_path("minilm-l3"))
        .expect("model")
        .len();
    assert_eq!(s["caches"][1]["cache"], "models", "{s}");
    assert_eq!(s["caches"][1]["bytes"].as_u64(), Some(model_bytes), "{s}");
    assert_eq!(s["caches"][1]["files"].as_u64(), Some(1), "{s}");
    assert!(
        s["caches"][2]["files"].as_u64() >= Some(1),
        "compiled code: {s}"
    );
    let table = stdout(&tidepool(dir, &["node", "status"]));
    for want in [
        "running (pid",
        "connected since",
        "reputation 10000",
        "4 completed",
        "embed 1.0.0",
        "models",
    ] {
        assert!(table.contains(want), "{want:?} in:\n{table}");
    }
    // gc is refused while the node runs: it keeps its caches itself.
    let out = command(dir)
        .args(["node", "gc", "--all"])
        .output()
        .expect("gc");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a node is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    sigterm(&node);
    let out = node.wait_with_output().expect("node exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status();
    assert_eq!(
        (s["running"].as_bool(), s["state"]["link"].as_str()),
        (Some(false), Some("stopped")),
        "{s}"
    );
    assert!(stdout(&tidepool(dir, &["node", "status"])).contains("not running"));

    // Stopped: a dry run removes nothing; a budget of 1 MiB for models
    // removes the model; --all empties the rest.
    let gc = |args: &[&str]| -> serde_json::Value {
        let mut v = vec!["node", "gc", "--json"];
        v.extend_from_slice(args);
        serde_json::from_str(&stdout(&tidepool(dir, &v))).expect("json")
    };
    let models = dir.join("xdg-data/tidepool/node/models");
    let r = gc(&["--models-mib", "1", "--dry-run"]);
    assert_eq!(r["removed"]["models"].as_u64(), Some(1), "{r}");
    assert_eq!(r["freed"].as_u64(), Some(model_bytes), "{r}");
    assert_eq!(
        std::fs::read_dir(&models).expect("models").count(),
        1,
        "dry run removed nothing"
    );
    let r = gc(&["--models-mib", "1"]);
    assert_eq!(r["removed"]["models"].as_u64(), Some(1), "{r}");
    assert_eq!(std::fs::read_dir(&models).expect("models").count(), 0);
    assert!(
        r["removed"].get("compiled").is_none(),
        "within its budget: {r}"
    );
    let r = gc(&["--all"]);
    assert!(r["removed"]["compiled"].as_u64() >= Some(1), "{r}");
    let s = status();
    for c in s["caches"].as_array().expect("caches") {
        assert_eq!(c["bytes"].as_u64(), Some(0), "{s}");
    }
    sigterm(&pool);
    let out = pool.wait_with_output().expect("pool exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
