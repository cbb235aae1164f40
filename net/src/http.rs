//! The small read-only HTTP/1.1 listener pools and nodes open for their
//! operators (status pages, `/metrics`, health probes), and the token that
//! guards it. What a route answers is the caller's ([`Routes`]); what a
//! stranger who reaches the port can do is bounded here: connections at
//! once (the others wait unaccepted in the kernel's backlog), one request
//! per connection, [`HEAD_TIMEOUT`] to send the request head and
//! [`MAX_HEAD_BYTES`] of it, GET only, and nothing the answer says may be
//! cached, framed or sent on as a referrer. It never reads a request body.

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// How long a client has to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head buffered.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Shortest token accepted from a file.
pub const MIN_TOKEN_CHARS: usize = 16;

/// An answer.
pub type Answer = Response<Full<Bytes>>;

/// What a listener serves: one answer per GET path. `authorized` says
/// whether the request carried the token; the routes decide which paths
/// need it (health probes do not).
pub trait Routes: Send + Sync + 'static {
    /// The answer to a GET of `path`.
    fn route(&self, path: &str, authorized: bool) -> impl Future<Output = Answer> + Send;
}

/// An answer with the headers every answer here has.
pub fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = content_type.parse() {
        h.insert(hyper::header::CONTENT_TYPE, v);
    }
    // Nothing here may be cached or framed by another site.
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        hyper::header::X_FRAME_OPTIONS,
        hyper::header::HeaderValue::from_static("DENY"),
    );
    // A page's address may carry the token: never send it elsewhere.
    h.insert(
        hyper::header::REFERRER_POLICY,
        hyper::header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        hyper::header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
        ),
    );
    r
}

/// Start listening on `listen` with `routes`, `max_connections` served at
/// once; returns the bound address and the accept task (abort it to stop).
pub async fn serve<R: Routes>(
    listen: SocketAddr,
    token: String,
    max_connections: usize,
    routes: Arc<R>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let token = Arc::new(token);
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let task = tokio::spawn(async move {
        loop {
            // A permit first: past the limit, connections wait unaccepted.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("http accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (routes, token) = (routes.clone(), token.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (routes, token) = (routes.clone(), token.clone());
                    async move {
                        if req.method() != Method::GET {
                            return Ok::<_, std::convert::Infallible>(answer(
                                StatusCode::METHOD_NOT_ALLOWED,
                                "text/plain",
                                "GET only\n",
                            ));
                        }
                        let authorized = authorized(&token, &req);
                        Ok(routes.route(req.uri().path(), authorized).await)
                    }
                });
                // One request per connection: an idle keep-alive
                // connection would hold a permit for as long as its
                // client liked.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive(false)
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .serve_connection(io, service);
                if let Err(e) = conn.await {
                    debug!(%peer, "http connection: {e}");
                }
            });
        }
    });
    Ok((addr, task))
}

/// Does `req` carry `token` (`Authorization: Bearer TOKEN`, or
/// `?token=TOKEN` for a browser's first load)? Compared by digest, with no
/// early exit: the time taken says nothing of how much of it was right.
fn authorized(token: &str, req: &Request<Incoming>) -> bool {
    let from_header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let from_query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    use sha2::Digest as _;
    let want = sha2::Sha256::digest(token.as_bytes());
    from_header.into_iter().chain(from_query).any(|t| {
        let got = sha2::Sha256::digest(t.as_bytes());
        got.iter()
            .zip(want.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    })
}

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read or made.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// What the file holds is too short to guard anything.
    #[error("{}: the token must be at least {MIN_TOKEN_CHARS} characters", path.display())]
    Short {
        /// The file.
        path: PathBuf,
    },
    /// No random bytes.
    #[error("the system random source failed")]
    Random,
}

/// The token in `given` (a file the operator wrote), or else the one in
/// `made` — created there once, 24 random bytes in hex, readable by its
/// owner only.
pub fn token(given: Option<&Path>, made: &Path) -> Result<String, TokenError> {
    let path = given.unwrap_or(made);
    match std::fs::read_to_string(path) {
        Ok(t) => {
            let t = t.trim().to_owned();
            if t.len() < MIN_TOKEN_CHARS {
                return Err(TokenError::Short {
                    path: path.to_owned(),
                });
            }
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && given.is_none() => {
            use ring::rand::SecureRandom;
            let mut raw = [0u8; 24];
            ring::rand::SystemRandom::new()
                .fill(&mut raw)
                .map_err(|_| TokenError::Random)?;
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let io = |source| TokenError::Io {
                path: path.to_owned(),
                source,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            write_private(path, token.as_bytes()).map_err(io)?;
            Ok(token)
        }
        Err(source) => Err(TokenError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Write a new file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)?.write_all(bytes)
}

/// Writing the Prometheus text exposition format (version 0.0.4): every
/// family with `# HELP` and `# TYPE`, names with the `tidepool_` prefix.
pub mod prometheus {
    use std::fmt::Write;

    /// The content type Prometheus expects for this format.
    pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

    /// A family's `# HELP` and `# TYPE` lines.
    pub fn family(out: &mut String, name: &str, help: &str, kind: &str) {
        let _ = writeln!(out, "# HELP tidepool_{name} {help}");
        let _ = writeln!(out, "# TYPE tidepool_{name} {kind}");
    }

    /// A family of one sample.
    pub fn single(
        out: &mut String,
        name: &str,
        help: &str,
        kind: &str,
        value: impl std::fmt::Display,
    ) {
        family(out, name, help, kind);
        let _ = writeln!(out, "tidepool_{name} {value}");
    }

    /// A histogram from per-bucket counts (`counts[i]` fell at or below
    /// `bounds[i]` and above the bound before; the last count, if there is
    /// one more than bounds, is above every bound).
    pub fn histogram(
        out: &mut String,
        name: &str,
        help: &str,
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
    ) {
        family(out, name, help, "histogram");
        let mut cumulative = 0u64;
        for (bound, n) in bounds.iter().zip(counts) {
            cumulative += n;
            let _ = writeln!(out, "tidepool_{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count: u64 = counts.iter().sum();
        let _ = writeln!(out, "tidepool_{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "tidepool_{name}_sum {sum}");
        let _ = writeln!(out, "tidepool_{name}_count {count}");
    }

    /// A label value as the format wants it: backslash, quote and newline
    /// escaped.
    pub fn escape(v: &str) -> String {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn label_values_are_escaped_and_buckets_cumulate() {
            assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
            let mut out = String::new();
            histogram(&mut out, "x", "X.", &[1.0, 2.0], &[3, 4, 5], 9.5);
            assert!(out.contains("tidepool_x_bucket{le=\"2\"} 7\n"), "{out}");
            assert!(out.contains("tidepool_x_bucket{le=\"+Inf\"} 12\n"), "{out}");
            assert!(out.contains("tidepool_x_count 12\n"), "{out}");
        }
    }
}
