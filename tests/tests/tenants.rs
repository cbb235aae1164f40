//! Tenants (issue #16): every job, result, challenge and submission key
//! belongs to the key that submitted it. Hostile clients speak the real
//! protocol to a real pool on loopback QUIC: each attack is refused and the
//! victim's work is untouched.

use anyhow::{Context, Result};
use std::time::Duration;
use tidepool_client::{ClientError, PoolClient};
use tidepool_proto::wire::{Bytes, Canary, ErrorCode, JobId, Request, Response, PROTOCOL_VERSION};
use tidepool_proto::{KeyRole, SecretKey};
use tidepool_tests::cluster::*;

/// The refusal's code, or a failure if the call went through.
fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Result<ErrorCode> {
    match r {
        Err(ClientError::Refused { code, .. }) => Ok(code),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
}

/// Two clients of one pool with an echo bundle, one node and an admin.
struct World {
    _dir: tempfile::TempDir,
    keys: Keys,
    pool: tidepool_pool::server::RunningPool,
    node: TestNode,
    victim: PoolClient,
    digest: tidepool_proto::Digest,
    rival: SecretKey,
    admin: SecretKey,
}

async fn world(seed: u8, challenges_per_hour: u32) -> Result<World> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(seed);
    let rival = SecretKey::from_seed(KeyRole::Publisher, &[seed.wrapping_add(50); 32]);
    let admin = SecretKey::from_seed(KeyRole::Client, &[seed.wrapping_add(60); 32]);
    let mut cfg = test_pool_config(&keys);
    // The rival is a publisher of this pool too: the strongest stranger a
    // pool owner lets in.
    cfg.publishers.insert(rival.public());
    cfg.admins.insert(admin.public());
    cfg.challenges_per_hour = challenges_per_hour;
    let pool = start_pool(&dir.path().join("pool"), &keys, cfg, "127.0.0.1:0".parse()?).await?;
    let bundle = echo_bundle(&dir.path().join("author"), &keys)?;
    let (victim, digest) = publish(pool.addr, &keys, &bundle).await?;
    let node = start_node(node_config(dir.path(), &keys, 0, pool.addr));
    Ok(World {
        _dir: dir,
        keys,
        pool,
        node,
        victim,
        digest,
        rival,
        admin,
    })
}

impl World {
    async fn connect(&self, key: &SecretKey) -> Result<PoolClient> {
        PoolClient::connect(self.pool.addr, key, self.keys.pool.public())
            .await
            .context("connect")
    }

    async fn finish(self) -> Result<()> {
        self.victim.close().await;
        self.node.drain().await?;
        self.pool.shutdown().await;
        Ok(())
    }
}

#[tokio::test]
async fn another_clients_jobs_and_the_hidden_jobs_are_unreadable() -> Result<()> {
    let w = world(40, 60).await?;
    let inputs: Vec<Vec<u8>> = (0..4).map(|i| format!("secret {i}").into_bytes()).collect();
    let (job, _) = w.victim.submit(w.digest, inputs, "mine".into()).await?;
    wait_job(&w.victim, job, Duration::from_secs(60)).await?;
    let rival = w.connect(&w.rival).await?;
    // Every job id the pool has handed out so far (the victim's, and the
    // hidden check jobs a new node's results create): none is the rival's.
    for id in 1..=job.0 + 5 {
        let id = JobId(id);
        assert_eq!(
            refused(rival.job_status(id).await)?,
            ErrorCode::NotFound,
            "job {id}"
        );
        assert_eq!(
            refused(rival.job_results(id).await)?,
            ErrorCode::NotFound,
            "job {id}"
        );
    }
    let status = rival.pool_status().await?;
    assert!(status.jobs.is_empty(), "{:?}", status.jobs);
    // The victim's task cannot be challenged by the rival either.
    let task = w.victim.job_results(job).await?[0].task;
    assert_eq!(refused(rival.challenge(task).await)?, ErrorCode::NotFound);
    // The victim sees its own job; the pool owner sees everything.
    assert_eq!(w.victim.job_status(job).await?.done, 4);
    let admin = w.connect(&w.admin).await?;
    assert_eq!(admin.job_status(job).await?.done, 4);
    assert!(admin.pool_status().await?.jobs.iter().any(|j| j.job == job));
    rival.close().await;
    admin.close().await;
    w.finish().await
}

#[tokio::test]
async fn a_squatted_submission_key_does_not_capture_the_victims_submission() -> Result<()> {
    let w = world(42, 60).await?;
    let rival = w.connect(&w.rival).await?;
    // The rival claims the key the victim's CLI would use, first.
    let (squat, _) = rival
        .submit(w.digest, vec![b"attacker".to_vec()], "job-1".into())
        .await?;
    let inputs = vec![b"victim a".to_vec(), b"victim b".to_vec()];
    let (job, n) = w.victim.submit(w.digest, inputs, "job-1".into()).await?;
    assert_ne!(job, squat, "the victim got its own job");
    assert_eq!(n, 2);
    let s = wait_job(&w.victim, job, Duration::from_secs(60)).await?;
    assert_eq!(s.done, 2);
    let outs = record_outputs(&w.victim.job_results(job).await?);
    assert_eq!(outs, vec![b"victim a".to_vec(), b"victim b".to_vec()]);
    // The same key from the same client is still idempotent.
    let (again, _) = w
        .victim
        .submit(w.digest, vec![b"other".to_vec()], "job-1".into())
        .await?;
    assert_eq!(again, job);
    rival.close().await;
    w.finish().await
}

#[tokio::test]
async fn a_rivals_canaries_and_unlimited_challenges_are_refused() -> Result<()> {
    let w = world(44, 3).await?;
    let rival = w.connect(&w.rival).await?;
    let inputs: Vec<Vec<u8>> = (0..5).map(|i| format!("c {i}").into_bytes()).collect();
    let (job, _) = w.victim.submit(w.digest, inputs, "ch".into()).await?;
    wait_job(&w.victim, job, Duration::from_secs(60)).await?;
    // Known answers planted on the victim's bundle convict whoever
    // disagrees: a rival may not add them.
    let canary = Canary { job, index: 0 };
    assert_eq!(
        refused(rival.add_canaries(w.digest, vec![canary]).await)?,
        ErrorCode::Forbidden
    );
    // The bundle's own publisher may, from results an independent
    // execution confirmed only (one node here: none is).
    let e = w
        .victim
        .add_canaries(w.digest, vec![canary])
        .await
        .expect_err("unconfirmed");
    assert!(
        e.to_string()
            .contains("not confirmed by an independent execution"),
        "{e}"
    );
    // Challenges: three an hour here, then refused as busy.
    let tasks: Vec<_> = w
        .victim
        .job_results(job)
        .await?
        .iter()
        .map(|r| r.task)
        .collect();
    for t in &tasks[..3] {
        w.victim.challenge(*t).await?;
    }
    assert_eq!(
        refused(w.victim.challenge(tasks[3]).await)?,
        ErrorCode::Busy
    );
    rival.close().await;
    w.finish().await
}

/// A raw connection as `key`, hello sent: for requests the client library
/// would not send.
async fn raw(w: &World, key: &SecretKey) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let ep = tidepool_net::client(key, w.keys.pool.public())?;
    let conn = tidepool_net::connect(&ep, w.pool.addr).await?;
    let hello: Response = tidepool_net::call(
        &conn,
        &Request::ClientHello {
            protocol: PROTOCOL_VERSION,
            agent: "test".into(),
        },
    )
    .await?;
    anyhow::ensure!(matches!(hello, Response::Welcome { .. }), "{hello:?}");
    Ok((ep, conn))
}

#[tokio::test]
async fn a_rivals_blob_chunk_is_refused_and_an_interrupted_upload_resumes() -> Result<()> {
    let w = world(46, 60).await?;
    // A bundle whose component is over one upload chunk (1 MiB): the echo
    // component with a custom section of padding.
    let dir = w._dir.path().join("big");
    std::fs::create_dir_all(&dir)?;
    let mut wasm = std::fs::read(tidepool_tests::jobs_dir().join("echo.wasm"))?;
    let pad = vec![0u8; 1_500_000];
    let mut section = Vec::new();
    let name = b"padding";
    let body_len = 1 + name.len() + pad.len();
    section.push(0u8);
    let mut n = body_len;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            section.push(byte);
            break;
        }
        section.push(byte | 0x80);
    }
    section.push(name.len() as u8);
    section.extend_from_slice(name);
    section.extend_from_slice(&pad);
    wasm.extend_from_slice(&section);
    let component = dir.join("big.wasm");
    std::fs::write(&component, &wasm)?;
    std::fs::write(
        dir.join("tidepool.toml"),
        format!(
            "name = \"big\"\nversion = \"1.0.0\"\ncomponent = \"{}\"\n",
            component.display()
        ),
    )?;
    let mut bundle =
        tidepool_client::bundle::pack(&dir.join("tidepool.toml"), w.keys.publisher.public())?;
    bundle.sign(&w.keys.publisher)?;
    let signed = bundle.signed().context("signed")?;
    let blob = tidepool_proto::Digest::of(&wasm);

    // The victim publishes and sends the first chunk only (interrupted).
    let (_ep, conn) = raw(&w, &w.keys.publisher).await?;
    let r: Response = tidepool_net::call(&conn, &Request::Publish { manifest: signed }).await?;
    anyhow::ensure!(matches!(r, Response::Published { .. }), "{r:?}");
    let first = wasm[..1 << 20].to_vec();
    let r: Response = tidepool_net::call(
        &conn,
        &Request::PutBlob {
            digest: blob,
            offset: 0,
            data: Bytes(first),
        },
    )
    .await?;
    assert!(
        matches!(r, Response::BlobStored { have, .. } if have == 1 << 20),
        "{r:?}"
    );
    conn.close(0u32.into(), b"interrupted");

    // The rival appends garbage where the victim would go on: refused.
    let (_ep2, rival) = raw(&w, &w.rival).await?;
    let r: Response = tidepool_net::call(
        &rival,
        &Request::PutBlob {
            digest: blob,
            offset: 1 << 20,
            data: Bytes(vec![0xff; 1000]),
        },
    )
    .await?;
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{r:?}"
    );

    // The victim's client resumes where the pool stopped and finishes.
    let digest = w.victim.publish(&bundle, |_| {}).await?;
    let (job, _) = w
        .victim
        .submit(digest, vec![b"big".to_vec()], "big".into())
        .await?;
    let s = wait_job(&w.victim, job, Duration::from_secs(60)).await?;
    assert_eq!((s.done, s.dead), (1, 0), "{s:?}");
    w.finish().await
}

/// The chunked-submission, cancel, forget and collect messages name jobs
/// by id: a rival (a publisher of the same pool) that names the victim's
/// open job gets `NotFound` for every one, may not ask the pool to
/// collect, and the victim's job goes on untouched to finish with exactly
/// its own inputs.
#[tokio::test]
async fn a_rival_cannot_append_to_seal_cancel_or_forget_the_victims_job() -> Result<()> {
    let w = world(44, 60).await?;
    let (job, have, _) = w.victim.open_job(w.digest, "chunks".into(), 0).await?;
    assert_eq!(have, 0);
    let mine: Vec<Vec<u8>> = (0..3).map(|i| format!("victim {i}").into_bytes()).collect();
    w.victim
        .append_inputs(job, 0, mine.iter().cloned().map(Bytes).collect())
        .await?;
    let rival = w.connect(&w.rival).await?;
    let planted = vec![Bytes(b"planted".to_vec())];
    assert_eq!(
        refused(rival.append_inputs(job, 3, planted).await)?,
        ErrorCode::NotFound
    );
    assert_eq!(refused(rival.seal_job(job, 3).await)?, ErrorCode::NotFound);
    assert_eq!(refused(rival.cancel_job(job).await)?, ErrorCode::NotFound);
    assert_eq!(refused(rival.forget_job(job).await)?, ErrorCode::NotFound);
    assert_eq!(refused(rival.collect().await)?, ErrorCode::Forbidden);
    // Opening the victim's key under its own name gives the rival its own job.
    let (own, _, _) = rival.open_job(w.digest, "chunks".into(), 0).await?;
    assert_ne!(own, job);
    assert_eq!(w.victim.seal_job(job, 3).await?, 3);
    let s = wait_job(&w.victim, job, Duration::from_secs(60)).await?;
    assert_eq!((s.done, s.dead, s.open), (3, 0, false), "{s:?}");
    assert_eq!(record_outputs(&w.victim.job_results(job).await?), mine);
    rival.close().await;
    w.finish().await
}
