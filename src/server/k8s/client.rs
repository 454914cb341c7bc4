//! The HTTPS client of the Kubernetes API server: one connection per
//! request (HTTP/1.1 over rustls, verified against the configured CA), the
//! server's service account token as the bearer (re-read at every request:
//! the kubelet rotates it), every call bounded in time and in the size of
//! its answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::config::{ApiServer, KubernetesConfig};

/// Longest service account token file read.
const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// A client of the API server (cheap Clone).
#[derive(Clone)]
pub(crate) struct ApiClient {
    server: ApiServer,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    token_path: PathBuf,
}

/// A call to the API server that could not be made or answered.
#[derive(Debug, thiserror::Error)]
pub enum K8sApiError {
    /// The CA file could not be read or holds no certificate.
    #[error("the Kubernetes API server's CA {}: {problem}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The API server's host is not a DNS name or an IP address.
    #[error("{0:?} is not a valid TLS server name for the Kubernetes API server")]
    ServerName(String),
    /// The server's service account token could not be read.
    #[error("reading the service account token {} failed", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No connection or TLS session with the API server.
    #[error("the Kubernetes API server {address} is unreachable")]
    Connect {
        /// host:port.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("the HTTP exchange with the Kubernetes API server {address} failed")]
    Http {
        /// host:port.
        address: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No complete answer within the bound.
    #[error("the Kubernetes API server {address} did not answer within {timeout:?}")]
    Timeout {
        /// host:port.
        address: String,
        /// The bound.
        timeout: Duration,
    },
    /// An answer other than the one expected.
    #[error("the Kubernetes API server {address} answered {status} to {what}{hint}")]
    Status {
        /// host:port.
        address: String,
        /// What was asked.
        what: &'static str,
        /// The HTTP status.
        status: http::StatusCode,
        /// What it usually means.
        hint: &'static str,
    },
    /// An answer larger than the bound.
    #[error("the Kubernetes API server {address} sent more than {limit} bytes for {what}")]
    TooLarge {
        /// host:port.
        address: String,
        /// What was asked.
        what: &'static str,
        /// The bound.
        limit: usize,
    },
    /// An answer that is not the JSON expected.
    #[error("the Kubernetes API server's answer to {what} is not what the API defines")]
    Malformed {
        /// What was asked.
        what: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A blocking job (parsing a large answer) did not complete.
    #[error("parsing the API server's answer did not complete")]
    Job(#[from] tokio::task::JoinError),
}

/// An answer: its status and body (read up to the call's bound).
pub(crate) struct Answer {
    pub(crate) status: http::StatusCode,
    pub(crate) body: Bytes,
}

// === impl ApiClient ===

impl ApiClient {
    /// A client as configured. Reads the CA file now: a missing or empty CA
    /// is a configuration error, found at start.
    pub(crate) fn new(config: &KubernetesConfig) -> Result<Self, K8sApiError> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| K8sApiError::Ca {
                path: config.ca_path.clone(),
                problem: e.to_string(),
            })?
            .with_root_certificates(read_ca(&config.ca_path)?)
            .with_no_client_auth();
        let host = config.api_server.host.clone();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| K8sApiError::ServerName(host))?;
        Ok(Self {
            server: config.api_server.clone(),
            connector: TlsConnector::from(Arc::new(tls)),
            server_name,
            token_path: config.token_path.clone(),
        })
    }

    /// `host:port` of the API server.
    pub(crate) fn address(&self) -> String {
        self.server.address()
    }

    /// One request: `method path` with `body` (JSON) if any, answered
    /// within `timeout` with at most `limit` bytes.
    pub(crate) async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        limit: usize,
        what: &'static str,
    ) -> Result<Answer, K8sApiError> {
        tokio::time::timeout(timeout, self.exchange(method, path, body, limit, what))
            .await
            .map_err(|_| K8sApiError::Timeout {
                address: self.address(),
                timeout,
            })?
    }

    async fn exchange(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: usize,
        what: &'static str,
    ) -> Result<Answer, K8sApiError> {
        let address = self.address();
        let http_error = |source: Box<dyn std::error::Error + Send + Sync>| K8sApiError::Http {
            address: address.clone(),
            source,
        };
        let token = read_token(&self.token_path).await?;
        let connect = |source| K8sApiError::Connect {
            address: address.clone(),
            source,
        };
        let tcp = TcpStream::connect((self.server.host.as_str(), self.server.port))
            .await
            .map_err(connect)?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(connect)?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &address)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONNECTION, "close");
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http_error(e.into()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_error(e.into()))?;
        let response = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| http_error(e.into()))?;
            let status = response.status();
            match Limited::new(response.into_body(), limit).collect().await {
                Ok(body) => Ok(Answer {
                    status,
                    body: body.to_bytes(),
                }),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    Err(K8sApiError::TooLarge {
                        address: address.clone(),
                        what,
                        limit,
                    })
                }
                Err(e) => Err(http_error(e)),
            }
        };
        tokio::pin!(response);
        tokio::pin!(connection);
        // The connection is driven here, not spawned: it lives exactly as
        // long as this request.
        tokio::select! {
            biased;
            result = &mut response => result,
            driven = &mut connection => match driven {
                Ok(()) => response.await,
                Err(e) => Err(http_error(e.into())),
            },
        }
    }

    /// A refusal for an unexpected `status` to `what`.
    pub(crate) fn status_error(&self, what: &'static str, status: http::StatusCode) -> K8sApiError {
        K8sApiError::Status {
            address: self.address(),
            what,
            status,
            hint: match status {
                http::StatusCode::UNAUTHORIZED => {
                    ": the server's service account token was refused (expired, or not this cluster's)"
                }
                http::StatusCode::FORBIDDEN => {
                    ": the server's service account lacks the RBAC rule (tokenreviews create, pods get/list)"
                }
                _ => "",
            },
        }
    }
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("address", &self.address())
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

/// The CA certificates in a PEM file.
fn read_ca(path: &Path) -> Result<RootCertStore, K8sApiError> {
    let problem = |problem: String| K8sApiError::Ca {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let blocks = pem::parse_many(&text).map_err(|e| problem(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
        roots
            .add(CertificateDer::from(block.contents().to_vec()))
            .map_err(|e| problem(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(problem("no CERTIFICATE block".into()));
    }
    Ok(roots)
}

/// A token file, trimmed (at most [`MAX_TOKEN_FILE`] bytes read).
pub(crate) async fn read_token(path: &Path) -> Result<String, K8sApiError> {
    use tokio::io::AsyncReadExt as _;
    let error = |source| K8sApiError::Token {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(error)?;
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE)
        .read_to_string(&mut text)
        .await
        .map_err(error)?;
    Ok(text.trim().to_owned())
}
