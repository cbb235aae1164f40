//! The compiled-component cache: a second sandbox starts from the cache,
//! gets the same results, and a damaged cache entry is recompiled.

use tidepool_host::SandboxConfig;
use tidepool_tests::*;

#[test]
fn second_sandbox_loads_from_cache_and_corrupt_entries_are_recompiled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_owned()),
        ..test_config()
    };
    let input = br#"{"texts":["cached components run the same"]}"#;

    let sb1 = sandbox(config.clone());
    let j1 = sb1.load(&guest("embed")).expect("compile");
    assert!(!j1.from_cache(), "first load compiles");
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(entries.len(), 1, "one cache file");
    let out1 = run(&sb1, &j1, "c", input).expect("run");

    let sb2 = sandbox(config.clone());
    let j2 = sb2.load(&guest("embed")).expect("from cache");
    assert!(j2.from_cache(), "second sandbox loads from the cache");
    let out2 = run(&sb2, &j2, "c", input).expect("run");
    assert_eq!(
        out1.result.as_ref().expect("ok"),
        out2.result.as_ref().expect("ok")
    );

    // A damaged entry is replaced the way every cache file is written
    // (whole, then renamed: nothing shrinks a file another sandbox maps).
    let tmp = dir.path().join("damaged.tmp");
    std::fs::write(&tmp, b"garbage").expect("corrupt");
    std::fs::rename(&tmp, entries[0].path()).expect("replace");
    let sb3 = sandbox(config.clone());
    let j3 = sb3.load(&guest("embed")).expect("recompiles");
    assert!(!j3.from_cache());
    let out3 = run(&sb3, &j3, "c", input).expect("run");
    assert_eq!(out1.result.as_ref().expect("ok"), &out3.result.expect("ok"));
    // The component mapped from the file that was replaced still runs.
    let again = run(&sb2, &j2, "c", input).expect("run after the file was replaced");
    assert_eq!(
        out1.result.as_ref().expect("ok"),
        &again.result.expect("ok")
    );

    // Evicted under a running sandbox (unlinked, as the node's cache
    // eviction does): the loaded component keeps running; the next load
    // compiles again.
    std::fs::remove_file(entries[0].path()).expect("evict");
    let again = run(&sb3, &j3, "c", input).expect("run after eviction");
    assert_eq!(
        out1.result.as_ref().expect("ok"),
        &again.result.expect("ok")
    );
    assert!(!sandbox(config)
        .load(&guest("embed"))
        .expect("compiles")
        .from_cache());
}

/// A node names the component by the digest its signed manifest gives: a
/// cache hit is used without hashing the bytes, and bytes that are not what
/// the digest names are refused before anything is compiled or cached.
#[test]
fn a_component_loaded_by_its_digest_comes_from_the_cache_and_wrong_bytes_are_refused() {
    use tidepool_host::LoadError;
    use tidepool_proto::Digest;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_owned()),
        ..test_config()
    };
    let echo = guest("echo");
    let spin = guest("spin");
    let sb = sandbox(config.clone());

    // Bytes of another component under echo's digest: refused, nothing cached.
    let err = sb
        .load_known(Digest::of(&echo), &spin)
        .expect_err("spin's bytes are not echo");
    assert!(
        matches!(err, LoadError::DigestMismatch { expected, actual }
            if expected == Digest::of(&echo) && actual == Digest::of(&spin)),
        "{err}"
    );
    assert!(err.to_string().contains(&Digest::of(&echo).hex()), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);

    // The right bytes: compiled once, then found by digest alone.
    let first = sb.load_known(Digest::of(&echo), &echo).expect("compile");
    assert!(!first.from_cache());
    let sb = sandbox(config);
    let hit = sb.load_known(Digest::of(&echo), &spin).expect("cached");
    assert!(hit.from_cache(), "a hit does not read the bytes");
    assert_eq!(hit.digest(), Digest::of(&echo));
    let out = run(&sb, &hit, "k", b"echoed").expect("run");
    assert_eq!(out.result.expect("ok"), b"echoed");
    assert_eq!(out.receipt.component, Digest::of(&echo));
}

/// The cache holds native code the node will run: a cache directory of
/// another user is not read, and our own with loose permissions is made
/// private (0700) before use.
#[cfg(unix)]
#[test]
fn a_cache_directory_anyone_else_could_write_is_not_trusted() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("compiled");
    let config = SandboxConfig {
        cache_dir: Some(cache.clone()),
        ..test_config()
    };
    let sb = sandbox(config.clone());
    assert!(!sb.load(&guest("echo")).expect("compile").from_cache());
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
    assert_eq!(mode(&cache), 0o700, "created private");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let sb = sandbox(config.clone());
    assert!(sb.load(&guest("echo")).expect("load").from_cache());
    assert_eq!(mode(&cache), 0o700, "made private again");
    // Another user's directory (only root can make one here; CI runs as
    // root): its entries are not loaded, the component is compiled afresh.
    if std::fs::metadata("/proc/self").expect("proc").uid() == 0 {
        std::os::unix::fs::chown(&cache, Some(4242), None).expect("chown");
        let sb = sandbox(config);
        assert!(!sb.load(&guest("echo")).expect("compiles").from_cache());
    }
}

/// Every crate under jobs/ is a guest the tests know (and so run).
#[test]
fn every_guest_is_known() {
    let mut found = Vec::new();
    for dir in [root().join("jobs"), root().join("jobs/fixtures")] {
        for e in std::fs::read_dir(&dir)
            .expect("jobs dir")
            .filter_map(|e| e.ok())
        {
            if e.path().join("Cargo.toml").exists() {
                found.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    let mut known: Vec<String> = GUESTS.iter().map(|s| s.to_string()).collect();
    known.sort();
    assert_eq!(
        found, known,
        "jobs/ and tidepool_tests::GUESTS must list the same guests"
    );
}
