//! `pool.toml` and `node.toml`: documented defaults, overrides, clear errors.

use std::time::Duration;
use tidepool_pool::config::PoolFile;
use tidepool_pool::{Admission, Durability};

#[test]
fn pool_file_defaults_overrides_and_errors() {
    let d = PoolFile::default();
    assert_eq!(d.listen.port(), 7070);
    let p = d.policy();
    assert_eq!(
        (p.lease_ttl, p.heartbeat, p.max_attempts),
        (Duration::from_secs(15), Duration::from_millis(3000), 3)
    );
    assert_eq!(p.admission, Admission::Open);
    assert_eq!((p.admins.len(), p.challenges_per_hour), (0, 60));
    assert_eq!(
        (
            p.max_hello_bytes,
            p.capabilities.max_slots,
            p.capabilities.max_queue
        ),
        (64 * 1024, 256, 256)
    );
    assert_eq!(d.durability(), Ok(Durability::Process));

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pool.toml");
    let node =
        tidepool_proto::SecretKey::from_seed(tidepool_proto::KeyRole::Node, &[1; 32]).public();
    std::fs::write(
        &path,
        format!("key = \"k/pool.key\"\nlease_ttl_secs = 4\nheartbeat_ms = 500\nnodes = [\"{node}\"]\nadmins = [\"{node}\"]\nchallenges_per_hour = 5\ndurability = \"power-loss\"\n"),
    )
    .expect("write");
    let f = PoolFile::read(&path).expect("read");
    assert_eq!(f.key, dir.path().join("k/pool.key"), "relative to the file");
    assert_eq!(f.durability(), Ok(Durability::PowerLoss));
    assert_eq!(f.policy().admission, Admission::Allowlist([node].into()));
    assert_eq!(
        (f.policy().admins, f.policy().challenges_per_hour),
        ([node].into(), 5)
    );

    // Verification policy: documented defaults, then overrides.
    let v = d.policy().verify;
    assert_eq!(
        (
            v.initial_reputation,
            v.step,
            v.quarantine,
            v.ban_after,
            v.lookback
        ),
        (10_000, 50, Duration::from_secs(600), 3, 256)
    );
    std::fs::write(
        &path,
        format!("[verification]\ninitial_reputation = 0\nstep = 10\nquarantine_secs = 5\nban_after_strikes = 2\ntrusted = [\"{node}\"]\ncanary_rate = 0.5\n"),
    )
    .expect("write");
    let v = PoolFile::read(&path).expect("read").policy().verify;
    assert_eq!(
        (
            v.initial_reputation,
            v.step,
            v.quarantine,
            v.ban_after,
            v.canary_rate
        ),
        (0, 10, Duration::from_secs(5), 2, 0.5)
    );
    assert!(v.trusted.contains(&node));

    for (text, needle) in [
        ("heartbeat_ms = 20000\n", "shorter than lease_ttl_secs"),
        ("durability = \"maybe\"\n", "\"maybe\" is not"),
        ("lease_tll_secs = 3\n", "unknown field `lease_tll_secs`"),
        ("nodes = [\"ed25519:nope\"]\n", "not a tidepool public key"),
        (
            "[verification]\ninitial_reputation = 20000\n",
            "initial_reputation (20000) must be at most 10000",
        ),
        (
            "[verification]\ncanary_rate = 2.0\n",
            "canary_rate (2) must be between 0 and 1",
        ),
        ("[verification]\nsteps = 5\n", "unknown field `steps`"),
    ] {
        std::fs::write(&path, text).expect("write");
        let err = PoolFile::read(&path).expect_err(text).to_string();
        assert!(
            err.contains(needle) && err.contains("pool.toml"),
            "{text}: {err}"
        );
    }
}
