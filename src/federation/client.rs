//! A small HTTPS GET client for bundle endpoints: one HTTP/1.1 request per
//! connection over tokio-rustls, bounded in time and size.
//!
//! Invariants: the whole exchange (connect, handshake, request, body) runs
//! under one deadline; the body is read at most `max_body` bytes (one more
//! is an error, whatever `Content-Length` says); only `200 OK` is an
//! answer. The connection is driven by the request's own future, never
//! spawned, so nothing outlives the call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

/// One GET: where, with which TLS configuration and within which bounds.
#[derive(Debug, Clone)]
pub struct GetRequest<'a> {
    /// The host to connect to (a DNS name or an IP literal).
    pub host: &'a str,
    /// The TCP port.
    pub port: u16,
    /// The URL (its path and query are sent, its authority is the `Host`).
    pub url: &'a http::Uri,
    /// How the server is verified.
    pub tls: Arc<ClientConfig>,
    /// The largest body accepted, in bytes.
    pub max_body: usize,
    /// The whole exchange's deadline.
    pub timeout: Duration,
}

/// Why a GET gave no body.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The host is not a name TLS can verify.
    #[error("{host:?} is not a valid TLS server name")]
    ServerName {
        /// The host.
        host: String,
    },
    /// The TCP connection failed.
    #[error("connecting to {host}:{port}")]
    Connect {
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (an untrusted certificate, say).
    #[error("TLS handshake with {host}:{port}")]
    Handshake {
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange")]
    Http(#[source] hyper::Error),
    /// The request could not be built.
    #[error("building the request")]
    Request(#[source] http::Error),
    /// The server answered something else than 200.
    #[error("the server answered {0}")]
    Status(http::StatusCode),
    /// The body was larger than allowed.
    #[error("the answer is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body could not be read.
    #[error("reading the answer")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The exchange did not finish in time.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
}

/// GETs `request.url`, returning the body of a `200 OK`.
pub async fn get(request: GetRequest<'_>) -> Result<Bytes, GetError> {
    let timeout = request.timeout;
    tokio::time::timeout(timeout, exchange(request))
        .await
        .map_err(|_| GetError::Timeout(timeout))?
}

async fn exchange(request: GetRequest<'_>) -> Result<Bytes, GetError> {
    let server_name =
        ServerName::try_from(request.host.to_owned()).map_err(|_| GetError::ServerName {
            host: request.host.to_owned(),
        })?;
    let tcp = TcpStream::connect((request.host, request.port))
        .await
        .map_err(|source| GetError::Connect {
            host: request.host.to_owned(),
            port: request.port,
            source,
        })?;
    let tls = TlsConnector::from(request.tls)
        .connect(server_name, tcp)
        .await
        .map_err(|source| GetError::Handshake {
            host: request.host.to_owned(),
            port: request.port,
            source,
        })?;
    let path = request
        .url
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let host = request
        .url
        .authority()
        .map_or(request.host, http::uri::Authority::as_str);
    let http_request = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(GetError::Request)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(GetError::Http)?;
    let limit = request.max_body;
    let response = async {
        let response = sender
            .send_request(http_request)
            .await
            .map_err(GetError::Http)?;
        if response.status() != http::StatusCode::OK {
            return Err(GetError::Status(response.status()));
        }
        match Limited::new(response.into_body(), limit).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(GetError::TooLarge { limit })
            }
            Err(e) => Err(GetError::Body(e)),
        }
    };
    tokio::pin!(response);
    tokio::pin!(connection);
    tokio::select! {
        biased;
        result = &mut response => result,
        driven = &mut connection => match driven {
            Ok(()) => response.await,
            Err(e) => Err(GetError::Http(e)),
        },
    }
}
