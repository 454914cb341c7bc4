//! The HTTP/1.1 kit every HTTP listener of tether is built on: the probes
//! and metrics endpoint (`[http]`), OIDC discovery, the SPIFFE bundle
//! endpoint and token introspection.
//!
//! It owns the accept loop and its bounds, TLS below HTTP, and reading a
//! request in full before a handler sees it; the listeners own their
//! routes ([`Routes`]). A handler gets a [`WebRequest`]: the method, path,
//! headers, the whole body (bounded) and the TLS client's certificate
//! chain (verified by the TLS configuration, when it asks for one).
//!
//! Invariants:
//! - One slow or hostile client holds at most one of
//!   [`Limits::max_connections`] slots, and only for a bounded time: the
//!   TLS handshake, the headers and the whole connection each have a
//!   timeout, a connection serves one request (no keep-alive), and a body
//!   over [`Limits::max_body`] is refused with 413 before any handler runs.
//! - Methods other than GET, HEAD and POST are refused with 405 here.
//! - TLS configurations come from a [`TlsConfigSource`] per connection, so
//!   a rotated certificate is presented from the next handshake on. No
//!   crypto here: rustls on aws-lc-rs does the handshakes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Chain;

pub mod tls;

#[cfg(test)]
mod tests;

pub use tls::{CertificateFiles, Tls, TlsConfigSource, WebError};

/// The wait after a failed accept (out of file descriptors, say), instead
/// of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One request, read in full.
#[derive(Debug, Clone)]
pub struct WebRequest {
    /// Its method: GET, HEAD or POST (others never reach a handler).
    pub method: Method,
    /// The URI's path as sent (not percent-decoded).
    pub path: String,
    /// The URI's query, when there is one.
    pub query: Option<String>,
    /// Its headers (hyper bounds their number and size).
    pub headers: HeaderMap,
    /// The whole body, at most [`Limits::max_body`] bytes.
    pub body: Bytes,
    /// The client's TCP address.
    pub remote_addr: SocketAddr,
    /// The TLS client's certificate chain, leaf first, as the TLS
    /// configuration verified it; empty over plain HTTP or when the client
    /// sent none.
    pub peer_certificates: Vec<CertificateDer<'static>>,
}

/// An answer.
pub type WebResponse = http::Response<Full<Bytes>>;

/// A listener's routes: the answer to each request.
pub trait Routes: Send + Sync + 'static {
    /// The answer to `request`.
    fn answer(&self, request: WebRequest) -> impl Future<Output = WebResponse> + Send;
}

/// Bounds on what one listener spends on its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Reading a request's headers.
    pub header_timeout: Duration,
    /// A whole connection, from accept to the last byte of the answer.
    pub connection_timeout: Duration,
    /// The TLS handshake.
    pub handshake_timeout: Duration,
    /// A request's body; a larger one is answered 413.
    pub max_body: usize,
}

impl Default for Limits {
    /// 64 connections, 5 s for the handshake and for the headers, 10 s for
    /// a connection, 64 KiB of body.
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            max_body: 64 * 1024,
        }
    }
}

/// Serves `routes` on `listener` until `cancel`, each connection on
/// `tracker`: HTTP/1.1, one request per connection, over TLS when `tls`
/// says so, bounded by `limits`.
pub async fn serve<R: Routes>(
    listener: TcpListener,
    tls: Tls,
    routes: Arc<R>,
    limits: Limits,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (tcp, remote_addr) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %Chain(&error), "accepting an HTTP connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let routes = Arc::clone(&routes);
        let cancel = cancel.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let connection = async {
                match tls {
                    Tls::Plain => {
                        let peer = Peer {
                            remote_addr,
                            certificates: Vec::new(),
                        };
                        serve_connection(tcp, peer, routes, &limits, &cancel).await;
                    }
                    Tls::Rustls(source) => {
                        let config = match source.server_config() {
                            Ok(config) => config,
                            Err(error) => {
                                tracing::warn!(%remote_addr, error = %Chain(&error), "no TLS configuration for an HTTPS connection; closing it");
                                return;
                            }
                        };
                        let handshake = TlsAcceptor::from(config).accept(tcp);
                        let stream =
                            match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    tracing::debug!(%remote_addr, error = %Chain(&error), "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%remote_addr, "TLS handshake timed out");
                                    return;
                                }
                            };
                        let certificates = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                            .unwrap_or_default();
                        let peer = Peer {
                            remote_addr,
                            certificates,
                        };
                        serve_connection(stream, peer, routes, &limits, &cancel).await;
                    }
                }
            };
            // The handshake and the request together stay within the
            // connection's bound.
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
        });
    }
}

/// Who is at the other end of a connection.
#[derive(Clone)]
struct Peer {
    remote_addr: SocketAddr,
    certificates: Vec<CertificateDer<'static>>,
}

/// Serves the one request of a connection.
async fn serve_connection<R: Routes, S>(
    stream: S,
    peer: Peer,
    routes: Arc<R>,
    limits: &Limits,
    cancel: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_body = limits.max_body;
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let routes = Arc::clone(&routes);
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(handle(request, peer, routes.as_ref(), max_body).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = &mut connection => {}
        () = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_timeout, connection).await;
        }
    }
}

/// Reads `request` in full (its body bounded by `max_body`) and asks
/// `routes` for the answer; refuses what no route may see.
async fn handle<R: Routes>(
    request: hyper::Request<hyper::body::Incoming>,
    peer: Peer,
    routes: &R,
    max_body: usize,
) -> WebResponse {
    let (parts, body) = request.into_parts();
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::POST) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD or POST only\n");
    }
    // A declared length over the bound is refused before reading a byte.
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body as u64) {
        return too_large(max_body);
    }
    let body = match Limited::new(body, max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            if error.is::<http_body_util::LengthLimitError>() {
                return too_large(max_body);
            }
            return text(
                StatusCode::BAD_REQUEST,
                "the request body could not be read\n",
            );
        }
    };
    let request = WebRequest {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        method: parts.method,
        headers: parts.headers,
        body,
        remote_addr: peer.remote_addr,
        peer_certificates: peer.certificates,
    };
    routes.answer(request).await
}

fn too_large(max_body: usize) -> WebResponse {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is over {max_body} bytes\n"),
    )
}

/// An answer with `body` as `content_type`.
pub fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> WebResponse {
    let mut response = http::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    response
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> WebResponse {
    reply(status, "text/plain; charset=utf-8", body.into())
}

/// A JSON answer (`application/json`). A value that does not serialise (a
/// bug) is answered 500 and logged.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> WebResponse {
    match serde_json::to_vec(value) {
        Ok(body) => reply(status, "application/json", body),
        Err(error) => {
            tracing::error!(error = %Chain(&error), "an HTTP answer did not serialise");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}
