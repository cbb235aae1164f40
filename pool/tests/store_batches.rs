//! Group commit in the SQLite store: the calls of one batch are committed
//! together, a failing call is rolled back alone, and a batch never
//! committed (the process died) leaves nothing behind.

use tidepool_pool::store::{SqliteStore, Store, StoredBundle};
use tidepool_pool::Durability;
use tidepool_proto::{Digest, KeyRole, SecretKey};

fn pending(path: &std::path::Path) -> usize {
    let mut s = SqliteStore::open(path, Durability::Process).expect("reopen");
    s.recover().expect("recover").pending.len()
}

#[test]
fn a_batch_commits_together_a_failed_call_alone_rolls_back_and_an_uncommitted_one_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pool.db");
    let owner = SecretKey::from_seed(KeyRole::Client, &[7; 32]).public();
    let bundle = StoredBundle {
        digest: Digest::of(b"bundle"),
        signed: b"signed manifest".to_vec(),
    };
    let inputs = |n: u8| (0..n).map(|i| vec![i]).collect::<Vec<_>>();

    let mut s = SqliteStore::open(&path, Durability::Process).expect("open");
    s.begin_batch().expect("begin");
    s.put_bundle(&bundle, "b", "1.0.0").expect("bundle");
    s.insert_job(&bundle.digest, &owner, "k1", &inputs(2), 1)
        .expect("job 1");
    // A job of a bundle never published breaks a foreign key: that call is
    // refused and undone; the batch goes on.
    let unknown = Digest::of(b"no such bundle");
    assert!(s
        .insert_job(&unknown, &owner, "bad", &inputs(3), 1)
        .is_err());
    s.insert_job(&bundle.digest, &owner, "k2", &inputs(1), 1)
        .expect("job 2");
    s.commit_batch().expect("commit");
    drop(s);
    assert_eq!(
        pending(&path),
        3,
        "jobs 1 and 2, nothing of the failed call"
    );

    // A batch the process never committed: gone after a restart.
    let mut s = SqliteStore::open(&path, Durability::Process).expect("open");
    s.begin_batch().expect("begin");
    s.insert_job(&bundle.digest, &owner, "k3", &inputs(4), 1)
        .expect("job 3");
    drop(s);
    assert_eq!(pending(&path), 3, "the uncommitted batch left nothing");

    // Outside a batch every call commits by itself.
    let mut s = SqliteStore::open(&path, Durability::Process).expect("open");
    s.insert_job(&bundle.digest, &owner, "k4", &inputs(5), 1)
        .expect("job 4");
    drop(s);
    assert_eq!(pending(&path), 8);
}
