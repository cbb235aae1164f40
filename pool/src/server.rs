//! The pool's network shell: a QUIC server in front of the coordinator.
//!
//! The coordinator and its SQLite store live on one dedicated thread (the
//! actor); connection tasks send it commands and await replies, so the store
//! is used from one thread and every decision is made in one order. Blob
//! bytes are read and written by the connection tasks directly in the blob
//! directory. Each request arrives on its own QUIC stream; a peer that sends
//! a malformed or oversized frame, or no hello in time, has its connection
//! closed and nothing else is affected.

use crate::coordinator::{Coordinator, PoolConfig, PoolEvent};
use crate::store::{Durability, SqliteStore, StoreError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tidepool_net::{frames::StreamError, peer_key, read_frame, write_frame, BlobDir};
use tidepool_proto::manifest::SignedManifest;
use tidepool_proto::session::{request_name, PoolConn, Refusal, Role};
use tidepool_proto::wire::{
    Bytes, Capabilities, ErrorCode, JobId, LeaseId, Request, Response, BLOB_CHUNK_BYTES,
    PROTOCOL_VERSION,
};
use tidepool_proto::{Digest, PublicKey, SecretKey};
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, info, warn};

/// How long a stream may take to deliver its request frame.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything `pool serve` needs.
#[derive(Debug)]
pub struct ServeConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The pool's key (its identity to nodes and clients).
    pub key: SecretKey,
    /// Directory for `pool.db` and `blobs/`.
    pub data_dir: PathBuf,
    /// Policy.
    pub pool: PoolConfig,
    /// Commit durability.
    pub durability: Durability,
}

/// Errors starting the pool.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or recovered.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blob directory could not be opened.
    #[error(transparent)]
    Blobs(#[from] tidepool_net::BlobError),
    /// The endpoint could not be set up.
    #[error(transparent)]
    Net(#[from] tidepool_net::NetError),
    /// The data directory could not be created.
    #[error("cannot create pool directory {path}: {source}")]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

type Reply<T> = oneshot::Sender<Result<T, Refusal>>;

/// A command for the coordinator thread.
enum Cmd {
    NodeHello(PublicKey, Capabilities, Reply<()>),
    NodeGone(PublicKey),
    AdmitsClient(PublicKey, oneshot::Sender<bool>),
    Lease(
        PublicKey,
        u32,
        Vec<LeaseId>,
        Reply<(Vec<tidepool_proto::wire::TaskGrant>, Vec<LeaseId>)>,
    ),
    Results(
        PublicKey,
        Vec<crate::coordinator::Opened>,
        Reply<Vec<(LeaseId, tidepool_proto::wire::Verdict)>>,
    ),
    Manifest(Digest, oneshot::Sender<Option<SignedManifest>>),
    BlobSize(Digest, oneshot::Sender<Option<u64>>),
    BlobStored(Digest),
    Publish(SignedManifest, Reply<(Digest, Vec<Digest>)>),
    Submit(Digest, String, Vec<Vec<u8>>, Reply<(JobId, u32)>),
    JobStatus(JobId, Reply<tidepool_proto::wire::JobSummary>),
    JobResults(
        JobId,
        u32,
        u32,
        Reply<Vec<tidepool_proto::wire::TaskRecord>>,
    ),
    PoolStatus(Reply<tidepool_proto::wire::PoolSummary>),
    Challenge(
        tidepool_proto::wire::TaskId,
        Reply<crate::coordinator::Challenged>,
    ),
    AddCanaries(
        PublicKey,
        Digest,
        Vec<tidepool_proto::wire::Canary>,
        Reply<u32>,
    ),
    Stop,
}

/// The coordinator thread: serve commands, expire leases on time.
fn actor(
    mut c: Coordinator<SqliteStore>,
    blobs: BlobDir,
    rx: mpsc::Receiver<Cmd>,
    events: broadcast::Sender<PoolEvent>,
) {
    loop {
        let now = Instant::now();
        if let Err(e) = c.handle_timeout(now) {
            warn!("expiring leases: {e}");
        }
        while let Some(ev) = c.poll_event() {
            match &ev {
                PoolEvent::Requeued { lease, node, .. } => {
                    info!(%lease, node = %node.short(), "lease expired; task queued again")
                }
                PoolEvent::DeadLettered { task, reason } => {
                    warn!(task, reason, "task dead-lettered")
                }
                PoolEvent::JobFinished { job } => info!(job, "job finished"),
                PoolEvent::Caught {
                    node,
                    task,
                    strikes,
                    banned,
                } => warn!(
                    node = %node.short(),
                    task,
                    strikes,
                    banned,
                    "node caught with a wrong result"
                ),
                PoolEvent::Replaced { task } => info!(task, "wrong result replaced"),
            }
            let _ = events.send(ev);
        }
        let wait = c.poll_timeout().map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(now)
        });
        let cmd = match rx.recv_timeout(wait) {
            Ok(cmd) => cmd,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        // A dropped reply channel means the connection went away: nothing to do.
        match cmd {
            Cmd::NodeHello(k, caps, r) => drop(r.send(c.handle_node_hello(now, k, caps))),
            Cmd::NodeGone(k) => c.handle_node_gone(now, &k),
            Cmd::AdmitsClient(k, r) => drop(r.send(c.admits_client(&k))),
            Cmd::Lease(k, want, running, r) => {
                drop(r.send(c.handle_lease(now, &k, want, &running)))
            }
            Cmd::Results(k, results, r) => drop(r.send(c.handle_opened_results(now, &k, results))),
            Cmd::Manifest(d, r) => drop(r.send(c.manifest(&d).cloned())),
            Cmd::BlobSize(d, r) => drop(r.send(c.blob_size(&d))),
            Cmd::BlobStored(d) => c.handle_blob_stored(&d),
            Cmd::Publish(m, r) => {
                drop(r.send(c.handle_publish(crate::unix_now(), m, &|d| blobs.has(d))))
            }
            Cmd::Submit(b, key, inputs, r) => {
                drop(r.send(c.handle_submit(crate::unix_now(), &b, &key, &inputs)))
            }
            Cmd::JobStatus(j, r) => drop(r.send(c.job_status(j))),
            Cmd::JobResults(j, from, limit, r) => drop(r.send(c.job_results(j, from, limit))),
            Cmd::PoolStatus(r) => drop(r.send(c.pool_status(now))),
            Cmd::Challenge(t, r) => drop(r.send(c.handle_challenge(now, t))),
            Cmd::AddCanaries(k, b, items, r) => drop(r.send(c.handle_add_canaries(&k, &b, items))),
            Cmd::Stop => return,
        }
    }
}

/// A running pool. Dropping it does not stop it; call [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct RunningPool {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its public key.
    pub key: PublicKey,
    /// The endpoint (closed on shutdown).
    endpoint: quinn::Endpoint,
    /// Commands to the coordinator thread.
    tx: mpsc::Sender<Cmd>,
    /// The coordinator thread, joined on shutdown.
    thread: Option<std::thread::JoinHandle<()>>,
    /// Coordinator events, for status displays and tests.
    events: broadcast::Sender<PoolEvent>,
    /// The accept loop (ends when the endpoint closes).
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl RunningPool {
    /// Subscribe to coordinator events.
    pub fn events(&self) -> broadcast::Receiver<PoolEvent> {
        self.events.subscribe()
    }

    /// Stop accepting, close connections, stop the coordinator.
    pub async fn shutdown(mut self) {
        self.endpoint.close(0u32.into(), b"pool shutting down");
        let _ = self.tx.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(a) = self.accept.take() {
            let _ = a.await;
        }
        self.endpoint.wait_idle().await;
    }
}

/// Start a pool: open the store, recover, listen. Returns once listening.
pub async fn serve(cfg: ServeConfig) -> Result<RunningPool, ServeError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ServeError::Dir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let blobs = BlobDir::open(cfg.data_dir.join("blobs"))?;
    let store = SqliteStore::open(&cfg.data_dir.join("pool.db"), cfg.durability)?;
    let mut coordinator = Coordinator::new(store, cfg.pool.clone(), &|d| blobs.has(d))?;
    coordinator.set_clock(Instant::now(), crate::unix_now());
    info!(queued = coordinator.queued(), "pool state recovered");
    let (tx, rx) = mpsc::channel();
    let (events, _) = broadcast::channel(4096);
    let ev = events.clone();
    let b = blobs.clone();
    let thread = std::thread::Builder::new()
        .name("tidepool-coordinator".into())
        .spawn(move || actor(coordinator, b, rx, ev))
        .map_err(|source| ServeError::Dir {
            path: cfg.data_dir.clone(),
            source,
        })?;
    let endpoint = tidepool_net::server(cfg.listen, &cfg.key)?;
    let addr = endpoint.local_addr().map_err(|source| ServeError::Dir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let shared = Arc::new(Shared {
        tx: tx.clone(),
        blobs,
        lease_ttl: cfg.pool.lease_ttl,
        heartbeat: cfg.pool.heartbeat,
        retry: cfg.pool.retry,
        hello_timeout: cfg.pool.hello_timeout,
    });
    let ep = endpoint.clone();
    let accept = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => serve_connection(conn, shared).await,
                    Err(e) => debug!("handshake failed: {e}"),
                }
            });
        }
    });
    info!(%addr, key = %cfg.key.public(), "pool listening");
    Ok(RunningPool {
        addr,
        key: cfg.key.public(),
        endpoint,
        tx,
        thread: Some(thread),
        events,
        accept: Some(accept),
    })
}

/// What connection tasks share.
struct Shared {
    /// Commands to the coordinator thread.
    tx: mpsc::Sender<Cmd>,
    /// Blob bytes.
    blobs: BlobDir,
    /// Policy figures sent in the welcome.
    lease_ttl: Duration,
    heartbeat: Duration,
    retry: Duration,
    /// Time allowed for a hello.
    hello_timeout: Duration,
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx));
        rx.await.ok()
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn from_refusal(r: Refusal) -> Response {
    error(r.code, r.message)
}

async fn serve_connection(conn: quinn::Connection, shared: Arc<Shared>) {
    let Some(peer) = peer_key(&conn) else {
        conn.close(1u32.into(), b"no Ed25519 identity");
        return;
    };
    let remote = conn.remote_address();
    debug!(%remote, peer = %peer.short(), "connection");
    let session = Arc::new(Mutex::new(PoolConn::new(
        Instant::now(),
        shared.hello_timeout,
    )));
    // Half-open handshakes: no hello within the timeout closes the connection.
    {
        let conn = conn.clone();
        let session = session.clone();
        let timeout = shared.hello_timeout;
        tokio::spawn(async move {
            // Ends early when the connection does, so it never keeps a
            // closed endpoint (and its socket) alive.
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                _ = conn.closed() => return,
            }
            let close = session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .handle_timeout(Instant::now());
            if close {
                conn.close(2u32.into(), b"no hello in time");
            }
        });
    }
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let shared = shared.clone();
        let session = session.clone();
        let conn2 = conn.clone();
        tokio::spawn(async move {
            if let Err(why) = serve_stream(peer, send, recv, &shared, &session).await {
                warn!(%remote, peer = %peer.short(), "closing connection: {why}");
                conn2.close(3u32.into(), why.as_bytes());
            }
        });
    }
    let role = session.lock().unwrap_or_else(|p| p.into_inner()).role();
    if role == Some(Role::Node) {
        shared.send(Cmd::NodeGone(peer));
    }
    debug!(%remote, "connection closed");
}

/// Serve one stream. An `Err` closes the whole connection.
async fn serve_stream(
    peer: PublicKey,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
    session: &Mutex<PoolConn>,
) -> Result<(), String> {
    let req: Request = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut recv)).await {
        Err(_) => return Err("no request on a stream in time".into()),
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(StreamError::Frame(e))) => {
            answer_then_close(&mut send, &error(ErrorCode::Protocol, e.to_string())).await;
            return Err(e.to_string());
        }
        Ok(Err(e)) => return Err(e.to_string()),
    };
    let checked = session
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .handle_request(Instant::now(), &req);
    if let Err(r) = checked {
        return refuse(&mut send, r).await;
    }
    let name = request_name(&req);
    let resp = match req {
        Request::NodeHello { caps, .. } => {
            match shared.ask(|r| Cmd::NodeHello(peer, caps, r)).await {
                Some(Ok(())) => welcome(shared),
                Some(Err(r)) => return refuse(&mut send, r).await,
                None => error(ErrorCode::Internal, "pool is stopping"),
            }
        }
        Request::ClientHello { .. } => {
            if shared.ask(|r| Cmd::AdmitsClient(peer, r)).await == Some(true) {
                welcome(shared)
            } else {
                let message =
                    format!("client {peer} may not use this pool (not a publisher or client key)");
                return refuse(
                    &mut send,
                    Refusal {
                        code: ErrorCode::Forbidden,
                        message,
                        close: true,
                    },
                )
                .await;
            }
        }
        Request::Lease { want, running } => {
            match shared.ask(|r| Cmd::Lease(peer, want, running, r)).await {
                Some(Ok((grants, lost))) => {
                    let retry_ms = if grants.is_empty() {
                        shared.retry.as_millis() as u64
                    } else {
                        0
                    };
                    Response::Leases {
                        grants,
                        lost,
                        retry_ms,
                    }
                }
                Some(Err(r)) => from_refusal(r),
                None => error(ErrorCode::Internal, "pool is stopping"),
            }
        }
        Request::Results { results } => {
            // Hashing and signature checks here, in parallel, not on the coordinator thread.
            let opened = crate::coordinator::open_results(&peer, results);
            match shared.ask(|r| Cmd::Results(peer, opened, r)).await {
                Some(Ok(v)) => Response::Verdicts(v),
                Some(Err(r)) => from_refusal(r),
                None => error(ErrorCode::Internal, "pool is stopping"),
            }
        }
        Request::Draining => Response::Ok,
        Request::FetchManifest { bundle } => {
            match shared.ask(|r| Cmd::Manifest(bundle, r)).await.flatten() {
                Some(m) => Response::Manifest(m),
                None => error(ErrorCode::NotFound, format!("no bundle {bundle}")),
            }
        }
        Request::FetchBlob { digest, offset } => {
            if !shared.blobs.has(&digest) {
                error(
                    ErrorCode::NotFound,
                    format!("no blob {digest} on this pool"),
                )
            } else {
                let mut offset = offset;
                loop {
                    let (data, total) = match shared.blobs.read(&digest, offset, BLOB_CHUNK_BYTES) {
                        Ok(x) => x,
                        Err(e) => {
                            let _ =
                                write_frame(&mut send, &error(ErrorCode::Internal, e.to_string()))
                                    .await;
                            break;
                        }
                    };
                    let n = data.len() as u64;
                    let chunk = Response::BlobChunk {
                        digest,
                        offset,
                        total,
                        data: Bytes(data),
                    };
                    if write_frame(&mut send, &chunk).await.is_err() {
                        return Ok(()); // the fetcher went away; it can resume
                    }
                    offset += n;
                    if offset >= total || n == 0 {
                        break;
                    }
                }
                let _ = send.finish();
                return Ok(());
            }
        }
        Request::Publish { manifest } => match shared.ask(|r| Cmd::Publish(manifest, r)).await {
            Some(Ok((bundle, missing))) => Response::Published { bundle, missing },
            Some(Err(r)) => from_refusal(r),
            None => error(ErrorCode::Internal, "pool is stopping"),
        },
        Request::PutBlob {
            digest,
            offset,
            data,
        } => match shared.ask(|r| Cmd::BlobSize(digest, r)).await.flatten() {
            None => error(
                ErrorCode::NotFound,
                format!("blob {digest} is not named by any published bundle"),
            ),
            Some(size) => match shared.blobs.append(&digest, size, offset, &data.0) {
                Ok(done) => {
                    if done {
                        shared.send(Cmd::BlobStored(digest));
                    }
                    Response::BlobStored {
                        digest,
                        have: shared.blobs.held(&digest),
                    }
                }
                Err(e) => error(ErrorCode::Invalid, e.to_string()),
            },
        },
        Request::Submit {
            bundle,
            inputs,
            key,
        } => {
            let inputs = inputs.into_iter().map(|b| b.0).collect();
            match shared.ask(|r| Cmd::Submit(bundle, key, inputs, r)).await {
                Some(Ok((job, tasks))) => Response::Submitted { job, tasks },
                Some(Err(r)) => from_refusal(r),
                None => error(ErrorCode::Internal, "pool is stopping"),
            }
        }
        Request::JobStatus { job } => match shared.ask(|r| Cmd::JobStatus(job, r)).await {
            Some(Ok(s)) => Response::Job(s),
            Some(Err(r)) => from_refusal(r),
            None => error(ErrorCode::Internal, "pool is stopping"),
        },
        Request::JobResults { job, from, limit } => {
            match shared.ask(|r| Cmd::JobResults(job, from, limit, r)).await {
                Some(Ok(v)) => Response::Records(v),
                Some(Err(r)) => from_refusal(r),
                None => error(ErrorCode::Internal, "pool is stopping"),
            }
        }
        Request::PoolStatus => match shared.ask(Cmd::PoolStatus).await {
            Some(Ok(s)) => Response::Pool(s),
            Some(Err(r)) => from_refusal(r),
            None => error(ErrorCode::Internal, "pool is stopping"),
        },
        Request::Challenge { task } => match shared.ask(|r| Cmd::Challenge(task, r)).await {
            Some(Ok(c)) => Response::Challenged {
                task: c.target,
                job: c.job,
                index: c.index,
                state: c.state,
            },
            Some(Err(r)) => from_refusal(r),
            None => error(ErrorCode::Internal, "pool is stopping"),
        },
        Request::AddCanaries { bundle, items } => {
            match shared
                .ask(|r| Cmd::AddCanaries(peer, bundle, items, r))
                .await
            {
                Some(Ok(count)) => Response::Canaries { count },
                Some(Err(r)) => from_refusal(r),
                None => error(ErrorCode::Internal, "pool is stopping"),
            }
        }
    };
    if let Response::Error { message, .. } = &resp {
        debug!(peer = %peer.short(), request = name, "refused: {message}");
    }
    // If writing fails the peer is gone; it will retry its request.
    let _ = write_frame(&mut send, &resp).await;
    let _ = send.finish();
    Ok(())
}

/// Send the answer and give the peer a moment to read it before the
/// connection is closed (closing at once would discard it in flight).
async fn answer_then_close(send: &mut quinn::SendStream, resp: &Response) {
    let _ = write_frame(send, resp).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
}

/// Answer with a refusal; `Err` (close the connection) if it says so.
async fn refuse(send: &mut quinn::SendStream, r: Refusal) -> Result<(), String> {
    if r.close {
        answer_then_close(send, &from_refusal(r.clone())).await;
        Err(r.message)
    } else {
        let _ = write_frame(send, &from_refusal(r)).await;
        let _ = send.finish();
        Ok(())
    }
}

fn welcome(shared: &Shared) -> Response {
    Response::Welcome {
        protocol: PROTOCOL_VERSION,
        agent: concat!("tidepool-pool ", env!("CARGO_PKG_VERSION")).to_owned(),
        lease_ttl_ms: shared.lease_ttl.as_millis() as u64,
        heartbeat_ms: shared.heartbeat.as_millis() as u64,
    }
}
