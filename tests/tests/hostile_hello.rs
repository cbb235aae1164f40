//! Hostile hellos (issue #16) against a real pool on loopback QUIC: a hello
//! bomb (a large frame before the hello is accepted) and a node claiming
//! every slot there is are refused and closed; the pool keeps serving.

use anyhow::Result;
use std::time::Duration;
use tidepool_proto::wire::{Capabilities, ErrorCode, Request, Response, PROTOCOL_VERSION};
use tidepool_proto::{KeyRole, SecretKey};
use tidepool_tests::cluster::*;

fn hello(caps: Capabilities) -> Request {
    Request::NodeHello {
        protocol: PROTOCOL_VERSION,
        agent: "hostile".into(),
        caps,
    }
}

fn caps() -> Capabilities {
    Capabilities {
        encodings: vec!["onnx".into()],
        slots: 2,
        fetch_models: true,
        ..Capabilities::default()
    }
}

/// A pool on loopback and an endpoint for a stranger with a fresh key of
/// `role` (the temporary directory lives as long as the pool).
async fn pool_and_stranger(
    seed: u8,
    role: KeyRole,
) -> Result<(
    tempfile::TempDir,
    Keys,
    tidepool_pool::server::RunningPool,
    quinn::Endpoint,
)> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::new(seed);
    let pool = start_pool(
        dir.path(),
        &keys,
        test_pool_config(&keys),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let stranger = SecretKey::from_seed(role, &[seed.wrapping_add(1); 32]);
    let ep = tidepool_net::client(&stranger, keys.pool.public())?;
    Ok((dir, keys, pool, ep))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_bombs_and_impossible_claims_are_refused_and_closed() -> Result<()> {
    let (_dir, keys, pool, ep) = pool_and_stranger(48, KeyRole::Node).await?;

    // A 1 MiB hello of empty strings (it used to be decoded and its
    // capabilities kept for good): refused from its length prefix.
    let bomb = hello(Capabilities {
        encodings: vec![String::new(); 1 << 20],
        ..caps()
    });
    let conn = tidepool_net::connect(&ep, pool.addr).await?;
    let r = tidepool_net::call::<_, Response>(&conn, &bomb).await;
    assert!(
        !matches!(r, Ok(Response::Welcome { .. })),
        "a hello bomb was welcomed: {r:?}"
    );
    let reason = closed_reason(&conn).await;
    assert!(reason.contains("over the limit"), "{reason}");

    // A node that claims u32::MAX slots (this overflowed the coordinator
    // thread): refused, the field named, the connection closed.
    let conn = tidepool_net::connect(&ep, pool.addr).await?;
    let r: Response = tidepool_net::call(
        &conn,
        &hello(Capabilities {
            slots: u32::MAX,
            queue: u32::MAX,
            ..caps()
        }),
    )
    .await?;
    match &r {
        Response::Error { code, message } => {
            assert_eq!(*code, ErrorCode::Invalid);
            assert!(message.contains("`slots`"), "{message}");
        }
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
    let reason = closed_reason(&conn).await;
    assert!(reason.contains("slots"), "{reason}");

    // The pool is still there for an honest node and a client.
    let conn = tidepool_net::connect(&ep, pool.addr).await?;
    let r: Response = tidepool_net::call(&conn, &hello(caps())).await?;
    assert!(matches!(r, Response::Welcome { .. }), "{r:?}");
    let client =
        tidepool_client::PoolClient::connect(pool.addr, &keys.publisher, keys.pool.public())
            .await?;
    let s = client.pool_status().await?;
    assert_eq!(s.nodes.len(), 1, "only the honest node was admitted: {s:?}");
    client.close().await;
    pool.shutdown().await;
    Ok(())
}

/// A key the pool does not admit says hello as a client and never reads the
/// refusal; its next requests on the same connection (made while the
/// refusal waits to be read) are not served, and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_that_never_reads_gets_nothing() -> Result<()> {
    let (_dir, _keys, pool, ep) = pool_and_stranger(52, KeyRole::Client).await?;
    let conn = tidepool_net::connect(&ep, pool.addr).await?;
    // The hello, on a stream whose answer is never read.
    let (mut send, _never_read) = conn.open_bi().await?;
    tidepool_net::write_frame(
        &mut send,
        &Request::ClientHello {
            protocol: PROTOCOL_VERSION,
            agent: "stranger".into(),
        },
    )
    .await?;
    let _ = send.finish();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // While the refusal waits, ask for the pool's status and a job.
    for req in [
        Request::PoolStatus,
        Request::JobStatus {
            job: tidepool_proto::wire::JobId(1),
        },
    ] {
        match tidepool_net::call::<_, Response>(&conn, &req).await {
            Ok(Response::Error { .. }) | Err(_) => {}
            Ok(other) => anyhow::bail!("a refused client was served: {other:?}"),
        }
    }
    let reason = closed_reason(&conn).await;
    assert!(reason.contains("may not use this pool"), "{reason}");
    pool.shutdown().await;
    Ok(())
}
