//! The pool's network shell: a QUIC server in front of the coordinator.
//!
//! The coordinator and its SQLite store live on one dedicated thread (the
//! actor); connection tasks send it commands and await replies, so the store
//! is used from one thread and every decision is made in one order. Blob
//! bytes are read and written by the connection tasks directly in the blob
//! directory. Each request arrives on its own QUIC stream; a peer that sends
//! a malformed or oversized frame, or no hello in time, has its connection
//! closed and nothing else is affected.
//!
//! What one peer may make the pool hold is bounded here (`budgets`): frame
//! sizes by request kind, connections per IP and per key, streams and
//! buffered bytes per connection and in total, requests waiting for the
//! coordinator; results for leases a node does not hold are answered
//! without the coordinator (`held`). Every refusal is counted by kind for
//! `pool status` and logged, rate-limited.

mod budgets;
mod held;
pub mod http;
mod metrics;

use crate::coordinator::{Answer, Coordinator, Incoming, PoolConfig, PoolEvent};
use crate::store::{Durability, SqliteStore, StoreError};
use budgets::{Budgets, Refusals};
use held::HeldLeases;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tidepool_net::{frames::StreamError, peer_key, read_frame_head, write_frame, BlobDir};
use tidepool_proto::session::{PoolConn, Refusal, Role};
use tidepool_proto::wire::{message_name, Bytes, ErrorCode, Request, Response, BLOB_CHUNK_BYTES};
use tidepool_proto::{Digest, PublicKey, SecretKey};
use tokio::sync::Semaphore;
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, error, info, warn};

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
    /// The read-only HTTP listener (status page, `/metrics`, health), if
    /// any.
    pub http: Option<http::HttpConfig>,
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
    /// The HTTP listener could not bind.
    #[error("cannot listen for HTTP on {listen} ([http] listen): {source}")]
    Http {
        /// The address.
        listen: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create pool directory {path}: {source}")]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A command for the coordinator thread.
enum Cmd {
    /// A request from an admitted connection (or its hello), with when it
    /// arrived (renewals are judged by that, not by when the coordinator
    /// gets to them).
    Request(PublicKey, Incoming, Instant, oneshot::Sender<Answer>),
    /// A node's connection closed.
    NodeGone(PublicKey),
    /// The size of a blob this peer may upload, if a bundle it published
    /// names it.
    UploadSize(PublicKey, Digest, oneshot::Sender<Option<u64>>),
    /// A blob is complete and verified on disk.
    BlobStored(Digest),
    /// Answer at once (health probes: the coordinator is alive).
    Ping(oneshot::Sender<()>),
    /// One observation for the HTTP listener.
    Observe(
        oneshot::Sender<
            Result<crate::coordinator::telemetry::Observed, tidepool_proto::session::Refusal>,
        >,
    ),
    Stop,
}

/// Most commands served before lease expiries are looked at again (and
/// committed in one transaction).
const DRAIN_AT_MOST: usize = 1024;

/// An answer held until the batch it belongs to is committed.
type Held = Box<dyn FnOnce() + Send>;

/// The coordinator thread: serve commands, expire leases on time. Commands
/// that already arrived are served before expiries are judged, each with
/// its arrival time, so a renewal waiting behind other work still counts
/// from when it came. The commands served in one turn are one store
/// transaction (group commit): their answers are sent after it commits,
/// and if it cannot commit the coordinator stops without sending them (its
/// memory is ahead of the store; a restart recovers from the store, and
/// peers send again what was not answered).
fn actor(
    mut c: Coordinator<SqliteStore>,
    blobs: BlobDir,
    rx: mpsc::Receiver<Cmd>,
    events: broadcast::Sender<PoolEvent>,
) {
    let mut next: Option<Cmd> = None;
    let mut held: Vec<Held> = Vec::new();
    loop {
        if let Err(e) = c.begin_batch() {
            error!("the store cannot begin a transaction: {e}; the coordinator stops");
            return;
        }
        let mut stop = false;
        for _ in 0..DRAIN_AT_MOST {
            let cmd = match next.take() {
                Some(cmd) => cmd,
                None => match rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        stop = true;
                        break;
                    }
                },
            };
            if !serve_cmd(&mut c, &blobs, cmd, &mut held) {
                stop = true;
                break;
            }
        }
        if let Err(e) = c.commit_batch() {
            error!(
                answers = held.len(),
                "the store cannot commit: {e}; the coordinator stops without answering"
            );
            return;
        }
        for answer in held.drain(..) {
            answer();
        }
        if stop {
            return;
        }
        let now = Instant::now();
        if let Err(e) = c.handle_timeout(now) {
            warn!("expiring leases: {e}");
        }
        while let Some(ev) = c.poll_event() {
            log_event(&ev, now);
            let _ = events.send(ev);
        }
        let wait = c.poll_timeout().map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(now)
        });
        match rx.recv_timeout(wait) {
            Ok(cmd) => next = Some(cmd),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Serve one command, its answer held in `held` until the batch commits;
/// `false` to stop.
fn serve_cmd(
    c: &mut Coordinator<SqliteStore>,
    blobs: &BlobDir,
    cmd: Cmd,
    held: &mut Vec<Held>,
) -> bool {
    let now = Instant::now();
    // A dropped reply channel means the connection went away: nothing to do.
    fn hold<T: Send + 'static>(held: &mut Vec<Held>, r: oneshot::Sender<T>, v: T) {
        held.push(Box::new(move || drop(r.send(v))));
    }
    match cmd {
        Cmd::Request(k, incoming, arrived, r) => {
            let answer =
                c.handle_request(arrived, crate::unix_now(), &k, incoming, &|d| blobs.has(d));
            hold(held, r, answer);
        }
        Cmd::NodeGone(k) => c.handle_node_gone(now, &k),
        Cmd::UploadSize(k, d, r) => {
            let size = c.upload_size(&k, &d);
            hold(held, r, size);
        }
        Cmd::BlobStored(d) => c.handle_blob_stored(&d),
        // Health says the coordinator turns: no need to wait for a commit.
        Cmd::Ping(r) => drop(r.send(())),
        Cmd::Observe(r) => drop(r.send(c.observe(now))),
        Cmd::Stop => return false,
    }
    true
}

/// One log line per coordinator event.
fn log_event(ev: &PoolEvent, now: Instant) {
    match ev {
        PoolEvent::Requeued { lease, node, .. } => {
            info!(%lease, node = %node.short(), "lease expired; task queued again")
        }
        PoolEvent::DeadLettered { task, reason } => {
            warn!(%task, reason, "task dead-lettered")
        }
        PoolEvent::JobFinished { job } => info!(%job, "job finished"),
        PoolEvent::Collected { jobs, bytes } => {
            info!(
                jobs,
                bytes, "retention removed finished jobs' inputs and outputs"
            )
        }
        PoolEvent::Caught {
            node,
            task,
            strikes,
            banned,
        } => warn!(
            node = %node.short(),
            %task,
            strikes,
            banned,
            "node caught with a wrong result"
        ),
        PoolEvent::Replaced { task } => info!(%task, "wrong result replaced"),
        PoolEvent::Disputed { task } => warn!(
            %task,
            "two untrusted executions disagree with the result: disputed until a trusted node decides"
        ),
        PoolEvent::CutOff {
            node,
            failures,
            until,
        } => warn!(
            node = %node.short(),
            failures,
            for_secs = until.saturating_duration_since(now).as_secs(),
            "node cut off: too many of its latest tasks failed"
        ),
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
    /// The HTTP listener's address, if it listens.
    pub http_addr: Option<SocketAddr>,
    /// The HTTP listener's accept loop (aborted on shutdown).
    http: Option<tokio::task::JoinHandle<()>>,
}

impl RunningPool {
    /// Subscribe to coordinator events.
    pub fn events(&self) -> broadcast::Receiver<PoolEvent> {
        self.events.subscribe()
    }

    /// Stop the coordinator thread only, leaving the listeners up: what a
    /// pool whose coordinator died looks like from outside (tests of the
    /// health routes).
    #[doc(hidden)]
    pub fn stop_coordinator(&self) {
        let _ = self.tx.send(Cmd::Stop);
    }

    /// Stop accepting, close connections, stop the coordinator.
    pub async fn shutdown(mut self) {
        if let Some(h) = self.http.take() {
            h.abort();
        }
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
    coordinator.set_signer(cfg.key.clone());
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
    let limits = cfg.pool.limits.clone();
    let endpoint = tidepool_net::server_with(
        cfg.listen,
        &cfg.key,
        tidepool_net::ServerLimits {
            streams: limits.streams_per_connection,
            // Unread bytes QUIC holds for one connection: no more than the
            // connection may have in requests.
            receive_window: limits.buffered_bytes_per_connection as u64,
        },
    )?;
    let addr = endpoint.local_addr().map_err(|source| ServeError::Dir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let shared = Arc::new(Shared {
        tx: tx.clone(),
        blobs,
        hello_timeout: cfg.pool.hello_timeout,
        max_hello_bytes: cfg.pool.max_hello_bytes,
        write_timeout: cfg.pool.write_timeout,
        // Well above what the coordinator lets a node hold.
        held: HeldLeases::new(4 * cfg.pool.leasing.max_leases.max(1) as usize),
        budgets: Budgets::new(limits),
        refusals: Refusals::default(),
    });
    let (http_addr, http) = match cfg.http {
        Some(h) => {
            let listen = h.listen;
            let (addr, task) = http::start(h, shared.clone())
                .await
                .map_err(|source| ServeError::Http { listen, source })?;
            info!(%addr, "status page and /metrics listening");
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let ep = endpoint.clone();
    let accept = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            // Counted before the handshake costs anything.
            let ip = incoming.remote_address().ip();
            let Some(counted) = shared.budgets.per_ip.admit(ip) else {
                shared.refusals.note(
                    "connections per IP",
                    &format!(
                        "{ip} already has {} connections (limits.connections_per_ip)",
                        shared.budgets.limits.connections_per_ip
                    ),
                );
                incoming.refuse();
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _counted = counted;
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
        http_addr,
        http,
    })
}

/// What connection tasks share.
struct Shared {
    /// Commands to the coordinator thread.
    tx: mpsc::Sender<Cmd>,
    /// Blob bytes.
    blobs: BlobDir,
    /// Time allowed for a hello.
    hello_timeout: Duration,
    /// Largest frame before the hello is accepted.
    max_hello_bytes: usize,
    /// How long a peer has to take an answer before its connection is
    /// closed.
    write_timeout: Duration,
    /// Leases each node key holds, to answer results for others here.
    held: HeldLeases,
    /// Connections per IP and key, buffered bytes, requests in flight.
    budgets: Budgets,
    /// What was refused, by kind.
    refusals: Refusals,
}

/// What a connection's streams share. Lives as long as the connection.
struct ConnState {
    /// The peer's key.
    peer: PublicKey,
    /// The peer's address, for log lines.
    remote: SocketAddr,
    /// Admission and role (the sans-IO connection state machine).
    session: Mutex<PoolConn>,
    /// Request bytes this connection may have in memory (KiB permits).
    bytes: Arc<Semaphore>,
    /// Requests of this connection that may wait for the coordinator at
    /// once: one connection cannot fill the coordinator's queue.
    in_flight: Arc<Semaphore>,
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
    }

    /// Ask the coordinator on behalf of `conn`, within its in-flight budget.
    async fn ask_for<T>(
        &self,
        conn: &ConnState,
        make: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Option<T> {
        let _slot = conn.in_flight.clone().acquire_owned().await.ok()?;
        self.ask(make).await
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
    let Some(_counted) = shared.budgets.per_key.admit(peer) else {
        shared.refusals.note(
            "connections per key",
            &format!(
                "{} ({remote}) already has {} connections (limits.connections_per_key)",
                peer.short(),
                shared.budgets.limits.connections_per_key
            ),
        );
        conn.close(4u32.into(), b"too many connections from this key");
        return;
    };
    debug!(%remote, peer = %peer.short(), "connection");
    let state = Arc::new(ConnState {
        peer,
        remote,
        session: Mutex::new(PoolConn::new(Instant::now(), shared.hello_timeout)),
        bytes: shared.budgets.connection(),
        in_flight: shared.budgets.in_flight(),
    });
    // Half-open handshakes: no hello within the timeout closes the connection.
    {
        let conn = conn.clone();
        let state = state.clone();
        let shared = shared.clone();
        let timeout = shared.hello_timeout;
        tokio::spawn(async move {
            // Ends early when the connection does, so it never keeps a
            // closed endpoint (and its socket) alive.
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                _ = conn.closed() => return,
            }
            let close = state
                .session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .handle_timeout(Instant::now());
            if close {
                shared
                    .refusals
                    .note("no hello in time", &format!("{} ({remote})", peer.short()));
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
        let state = state.clone();
        let conn2 = conn.clone();
        tokio::spawn(async move {
            if let Err(why) = serve_stream(send, recv, &shared, &state).await {
                debug!(%remote, peer = %peer.short(), "closing connection: {why}");
                conn2.close(3u32.into(), why.as_bytes());
            }
        });
    }
    let role = state
        .session
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .role();
    if role == Some(Role::Node) {
        shared.send(Cmd::NodeGone(peer));
    }
    debug!(%remote, "connection closed");
}

/// Serve one stream. An `Err` closes the whole connection.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
    conn: &ConnState,
) -> Result<(), String> {
    let peer = conn.peer;
    let session = &conn.session;
    let who = || format!("{} ({})", peer.short(), conn.remote);
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let late = |shared: &Shared| {
        shared.refusals.note("request not sent in time", &who());
        Err::<(), String>("no request on a stream in time".into())
    };
    let head = match tokio::time::timeout_at(deadline, read_frame_head(&mut recv)).await {
        Err(_) => return late(shared),
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(StreamError::Frame(e))) => {
            return refuse_frame(&mut send, shared, "bad frame", &who(), e).await
        }
        Ok(Err(e)) => return Err(e.to_string()),
    };
    // Before the hello is accepted a peer is a stranger: its frames are
    // bounded far below what results need. After it, by request kind.
    let name = message_name(&head.head);
    let limit = match session.lock().unwrap_or_else(|p| p.into_inner()).role() {
        None => shared.max_hello_bytes,
        Some(_) => shared.budgets.limits.frame_limit(name),
    };
    if let Err(e) = head.check(limit) {
        let what = format!("{} {}", who(), name.unwrap_or("unnamed frame"));
        return refuse_frame(&mut send, shared, "oversized frame", &what, e).await;
    }
    // Memory for the frame is reserved before it is read; a peer that
    // cannot get it in time (its own budget or everyone's spent) waits
    // for nothing more.
    let Ok(Some(_reserved)) =
        tokio::time::timeout_at(deadline, shared.budgets.reserve(&conn.bytes, head.len)).await
    else {
        shared.refusals.note(
            "buffer budget",
            &format!("{}: no room for a {} byte frame in time", who(), head.len),
        );
        return Err("no room for the request in time".into());
    };
    let req: Request = match tokio::time::timeout_at(deadline, head.read_rest(&mut recv)).await {
        Err(_) => return late(shared),
        Ok(Ok(r)) => r,
        Ok(Err(StreamError::Frame(e))) => {
            return refuse_frame(&mut send, shared, "bad frame", &who(), e).await
        }
        Ok(Err(e)) => return Err(e.to_string()),
    };
    let arrived = Instant::now();
    let checked = session
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .handle_request(arrived, &req);
    let name = req.name();
    if let Err(r) = checked {
        return refuse(&mut send, shared, conn, name, r).await;
    }
    let is_hello = matches!(
        req,
        Request::NodeHello { .. } | Request::ClientHello { .. } | Request::AccountHello { .. }
    );
    let resp = match req {
        Request::FetchBlob { digest, offset } => {
            return serve_blob(
                &mut send,
                &shared.blobs,
                digest,
                offset,
                shared.write_timeout,
            )
            .await;
        }
        Request::PutBlob {
            digest,
            offset,
            data,
        } => put_blob(shared, conn, digest, offset, &data.0).await,
        Request::Results { results } => {
            // Results for leases this key does not hold are answered here:
            // they never cost the coordinator thread anything.
            let (pass, mut here) = shared.held.sort(&peer, results);
            if !here.is_empty() {
                shared.refusals.note(
                    "results for leases not held",
                    &format!("{}: {} result(s)", who(), here.len()),
                );
            }
            if !pass.is_empty() {
                // Hashing and signature checks here, in parallel, not on
                // the coordinator thread.
                let opened = crate::coordinator::open_results(&peer, pass);
                match shared
                    .ask_for(conn, |r| {
                        Cmd::Request(peer, Incoming::Results(opened), arrived, r)
                    })
                    .await
                {
                    Some(Ok(Response::Verdicts(v))) => {
                        shared.held.judged(&peer, &v);
                        here.extend(v);
                    }
                    Some(Ok(other)) => return Err(format!("unexpected answer {other:?}")),
                    Some(Err(r)) => return refuse(&mut send, shared, conn, name, r).await,
                    None => return stopping(&mut send).await,
                }
            }
            Response::Verdicts(here)
        }
        other => {
            let incoming = Incoming::Request(Box::new(other));
            match shared
                .ask_for(conn, |r| Cmd::Request(peer, incoming, arrived, r))
                .await
            {
                Some(Ok(resp)) => {
                    if is_hello {
                        // The role starts only now that the coordinator
                        // admitted the key.
                        session
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .handle_admitted();
                    }
                    match resp {
                        Response::Leases {
                            grants,
                            lost,
                            retry_ms,
                            standing,
                        } => {
                            shared.held.granted(&peer, &grants, &lost);
                            Response::Leases {
                                grants,
                                lost,
                                retry_ms,
                                standing,
                            }
                        }
                        Response::Pool(mut s) => {
                            s.refusals = shared.refusals.counts();
                            Response::Pool(s)
                        }
                        other => other,
                    }
                }
                Some(Err(r)) => return refuse(&mut send, shared, conn, name, r).await,
                None => return stopping(&mut send).await,
            }
        }
    };
    if let Response::Error { code, message } = &resp {
        shared.refusals.note(
            &format!("{name}: {code:?}"),
            &format!("{}: {message}", who()),
        );
    }
    // If writing fails the peer is gone; it will retry its request. A peer
    // that does not read within the write timeout loses its connection.
    match tokio::time::timeout(shared.write_timeout, write_frame(&mut send, &resp)).await {
        Err(_) => {
            shared.refusals.note("answer not read in time", &who());
            return Err("the peer did not read its answer in time".into());
        }
        Ok(_) => {
            let _ = send.finish();
        }
    }
    Ok(())
}

/// Refuse a frame (`kind` for the refusal log, `who` names the peer): say
/// why, then close the connection.
async fn refuse_frame(
    send: &mut quinn::SendStream,
    shared: &Shared,
    kind: &str,
    who: &str,
    e: tidepool_proto::wire::FrameError,
) -> Result<(), String> {
    shared.refusals.note(kind, &format!("{who}: {e}"));
    answer_then_close(send, &error(ErrorCode::Protocol, e.to_string())).await;
    Err(e.to_string())
}

/// Answer that the pool is stopping.
async fn stopping(send: &mut quinn::SendStream) -> Result<(), String> {
    let _ = write_frame(send, &error(ErrorCode::Internal, "pool is stopping")).await;
    let _ = send.finish();
    Ok(())
}

/// Append a chunk of an upload. Only a publisher of a bundle that names the
/// blob may upload it (a stranger's chunk would corrupt someone else's
/// upload); an empty chunk asks how much the pool holds, so an interrupted
/// upload resumes there.
async fn put_blob(
    shared: &Shared,
    conn: &ConnState,
    digest: Digest,
    offset: u64,
    data: &[u8],
) -> Response {
    let peer = conn.peer;
    let Some(size) = shared
        .ask_for(conn, |r| Cmd::UploadSize(peer, digest, r))
        .await
        .flatten()
    else {
        return error(
            ErrorCode::NotFound,
            format!("blob {digest} is not named by any bundle this key published"),
        );
    };
    if data.is_empty() {
        return Response::BlobStored {
            digest,
            have: shared.blobs.held(&digest),
        };
    }
    match shared.blobs.append(&digest, size, offset, data) {
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
    }
}

/// Stream a blob from `offset` in chunks; the fetcher resumes from what it
/// holds if the stream breaks.
async fn serve_blob(
    send: &mut quinn::SendStream,
    blobs: &BlobDir,
    digest: Digest,
    mut offset: u64,
    write_timeout: Duration,
) -> Result<(), String> {
    if !blobs.has(&digest) {
        let _ = write_frame(
            send,
            &error(
                ErrorCode::NotFound,
                format!("no blob {digest} on this pool"),
            ),
        )
        .await;
        let _ = send.finish();
        return Ok(());
    }
    loop {
        let (data, total) = match blobs.read(&digest, offset, BLOB_CHUNK_BYTES) {
            Ok(x) => x,
            Err(e) => {
                let _ = write_frame(send, &error(ErrorCode::Internal, e.to_string())).await;
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
        match tokio::time::timeout(write_timeout, write_frame(send, &chunk)).await {
            Ok(Ok(())) => {}
            // The fetcher went away or stopped reading; it can resume.
            _ => return Ok(()),
        }
        offset += n;
        if offset >= total || n == 0 {
            break;
        }
    }
    let _ = send.finish();
    Ok(())
}

/// How long a closing answer may take to be written and read before the
/// connection is closed anyway.
const CLOSING_ANSWER: Duration = Duration::from_secs(1);

/// Send the answer and give the peer a moment to read it before the
/// connection is closed (closing at once would discard it in flight); a
/// peer that does not read gets no longer than [`CLOSING_ANSWER`].
async fn answer_then_close(send: &mut quinn::SendStream, resp: &Response) {
    let _ = tokio::time::timeout(CLOSING_ANSWER, async {
        let _ = write_frame(send, resp).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    })
    .await;
}

/// Answer with a refusal; `Err` (close the connection) if it says so. A
/// closing refusal marks the connection refused first, so nothing more is
/// served on it even while the answer waits for a peer that never reads.
async fn refuse(
    send: &mut quinn::SendStream,
    shared: &Shared,
    conn: &ConnState,
    request: &str,
    r: Refusal,
) -> Result<(), String> {
    let who = format!("{} ({})", conn.peer.short(), conn.remote);
    shared.refusals.note(
        &format!("{request}: {:?}", r.code),
        &format!("{who}: {}", r.message),
    );
    if r.close {
        conn.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle_refused();
        answer_then_close(send, &from_refusal(r.clone())).await;
        Err(r.message)
    } else {
        match tokio::time::timeout(shared.write_timeout, write_frame(send, &from_refusal(r))).await
        {
            Err(_) => {
                shared.refusals.note("answer not read in time", &who);
                Err("the peer did not read its answer in time".into())
            }
            Ok(_) => {
                let _ = send.finish();
                Ok(())
            }
        }
    }
}
