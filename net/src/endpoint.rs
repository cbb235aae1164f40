//! QUIC endpoints for pools (server) and nodes or clients (client).

use crate::tls::{certificate, AnyEd25519Client, PinnedServer, ALPN};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tidepool_proto::{PublicKey, SecretKey};

/// Errors setting up an endpoint or connecting.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// TLS configuration failed.
    #[error("TLS set-up: {0}")]
    Tls(String),
    /// The socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to pool at {addr}: {why}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        why: String,
    },
}

/// What a pool lets one connection make it buffer in QUIC itself.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Bidirectional streams (requests) a peer may have open at once.
    pub streams: u32,
    /// Bytes a peer may have sent that the pool has not read yet, over all
    /// its streams (QUIC flow control holds the rest back at the peer).
    pub receive_window: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            streams: 256,
            receive_window: 16 * 1024 * 1024,
        }
    }
}

/// Transport settings shared by both sides.
fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport())
}

fn base_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A peer that vanishes (killed, asleep) is noticed within the idle
    // timeout; keep-alives hold a healthy but quiet connection open.
    t.max_idle_timeout(Some(
        Duration::from_secs(20)
            .try_into()
            .expect("20 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(4)));
    t.max_concurrent_bidi_streams(256u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A pool's endpoint, listening on `addr`, with the default limits.
pub fn server(addr: SocketAddr, key: &SecretKey) -> Result<quinn::Endpoint, NetError> {
    server_with(addr, key, ServerLimits::default())
}

/// A pool's endpoint, listening on `addr`, holding each connection to
/// `limits`.
pub fn server_with(
    addr: SocketAddr,
    key: &SecretKey,
    limits: ServerLimits,
) -> Result<quinn::Endpoint, NetError> {
    let (cert, secret) = certificate(key).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyEd25519Client))
        .with_single_cert(vec![cert], secret)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = base_transport();
    t.max_concurrent_bidi_streams(limits.streams.into());
    t.receive_window(quinn::VarInt::from_u64(limits.receive_window).unwrap_or(quinn::VarInt::MAX));
    cfg.transport_config(Arc::new(t));
    quinn::Endpoint::server(cfg, addr).map_err(|source| NetError::Bind { addr, source })
}

/// A client endpoint (node or client) with `key` as its identity, trusting
/// only a pool whose key is `pool`, on any local address.
pub fn client(key: &SecretKey, pool: PublicKey) -> Result<quinn::Endpoint, NetError> {
    client_bound(key, pool, ([0, 0, 0, 0], 0).into())
}

/// [`client`] on the local address `bind` (a machine with several
/// addresses; tests that must look like several hosts on loopback).
pub fn client_bound(
    key: &SecretKey,
    pool: PublicKey,
    bind: SocketAddr,
) -> Result<quinn::Endpoint, NetError> {
    let (cert, secret) = certificate(key).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { expected: pool }))
        .with_client_auth_cert(vec![cert], secret)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport());
    let mut ep =
        quinn::Endpoint::client(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connect to a pool.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<quinn::Connection, NetError> {
    let connecting = ep
        .connect(addr, "tidepool")
        .map_err(|e| NetError::Connect {
            addr,
            why: e.to_string(),
        })?;
    connecting.await.map_err(|e| NetError::Connect {
        addr,
        why: e.to_string(),
    })
}

/// The key a connected peer proved it holds.
pub fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::tls::ed25519_key_of(certs.first()?)
}
