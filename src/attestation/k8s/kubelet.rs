//! The kubelet of this node, asked for its pods: `GET /pods` on the secure
//! port (HTTPS, the agent's service account token, the cluster CA), or on
//! the read-only port (plain HTTP) when configured so explicitly.
//!
//! One connection per request (the pod list is cached by the caller, so
//! requests are rare), bounded in time and size. The answer is parsed with
//! `k8s-openapi`'s types. The token file is re-read for every request:
//! projected service account tokens are rotated by the kubelet.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore};

use super::K8sAttestorConfig;

/// Longest service account token read.
const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// A client of this node's kubelet.
#[derive(Clone)]
pub struct Kubelet {
    host: String,
    port: u16,
    /// `None`: the read-only port, plain HTTP.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    token_path: Option<PathBuf>,
    timeout: Duration,
    max_response_bytes: usize,
}

/// Asking the kubelet failed; attestation of a pod's process fails with it.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// The CA file could not be read or holds no certificate.
    #[error("kubelet CA {}: {problem}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `kubelet_tls_server_name` (or the host) is not a DNS name or IP.
    #[error("{0:?} is not a valid TLS server name for the kubelet")]
    ServerName(String),
    /// The service account token could not be read.
    #[error("reading the service account token {} failed", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No connection, TLS or HTTP exchange with the kubelet.
    #[error("kubelet {address} unreachable: {problem}")]
    Unreachable {
        /// host:port.
        address: String,
        /// What failed.
        problem: String,
    },
    /// No complete answer within the timeout.
    #[error("kubelet {address} did not answer within {timeout:?}")]
    Timeout {
        /// host:port.
        address: String,
        /// The bound.
        timeout: Duration,
    },
    /// An answer other than 200.
    #[error("kubelet {address} answered {status}{hint}")]
    Status {
        /// host:port.
        address: String,
        /// The HTTP status.
        status: http::StatusCode,
        /// What it usually means.
        hint: &'static str,
    },
    /// An answer larger than `max_response_bytes`.
    #[error("kubelet {address} sent more than {limit} bytes")]
    TooLarge {
        /// host:port.
        address: String,
        /// The bound.
        limit: usize,
    },
    /// An answer that is not a pod list.
    #[error("kubelet {address} sent something that is not a pod list: {problem}")]
    Malformed {
        /// host:port.
        address: String,
        /// The parse error.
        problem: String,
    },
}

// === impl Kubelet ===

impl Kubelet {
    /// A client as configured. Reads the CA file now: a missing or empty CA
    /// is a configuration error, not an attestation failure.
    pub fn new(config: &K8sAttestorConfig) -> Result<Self, KubeletError> {
        let timeout = config.request_timeout;
        let max_response_bytes = usize::try_from(config.max_response_bytes).unwrap_or(usize::MAX);
        if config.kubelet_read_only_port != 0 {
            return Ok(Self {
                host: config.kubelet_host.clone(),
                port: config.kubelet_read_only_port,
                tls: None,
                token_path: None,
                timeout,
                max_response_bytes,
            });
        }
        let provider = Arc::new(aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeletError::Ca {
                path: config.kubelet_ca_path.clone(),
                problem: e.to_string(),
            })?;
        let tls = if config.skip_kubelet_verification {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCertificate { provider }))
                .with_no_client_auth()
        } else {
            builder
                .with_root_certificates(read_ca(&config.kubelet_ca_path)?)
                .with_no_client_auth()
        };
        // The kubelet's serving certificate names the node, not the
        // loopback address the agent dials it on.
        let name = config
            .kubelet_tls_server_name
            .clone()
            .or_else(|| config.node_name.clone())
            .unwrap_or_else(|| config.kubelet_host.clone());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| KubeletError::ServerName(name))?;
        Ok(Self {
            host: config.kubelet_host.clone(),
            port: config.kubelet_secure_port,
            tls: Some((TlsConnector::from(Arc::new(tls)), server_name)),
            token_path: Some(config.token_path.clone()),
            timeout,
            max_response_bytes,
        })
    }

    /// `host:port` (an IPv6 literal in brackets), for messages and `Host`.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The pods the kubelet runs.
    pub async fn pods(&self) -> Result<k8s_openapi::List<Pod>, KubeletError> {
        let address = self.address();
        let body = tokio::time::timeout(self.timeout, self.get_pods())
            .await
            .map_err(|_| KubeletError::Timeout {
                address: address.clone(),
                timeout: self.timeout,
            })??;
        // Parsing megabytes is CPU work: off the async workers.
        tokio::task::spawn_blocking(move || parse_pods(&body))
            .await
            .map_err(|e| KubeletError::Malformed {
                address: address.clone(),
                problem: e.to_string(),
            })?
            .map_err(|e| KubeletError::Malformed {
                address,
                problem: e.to_string(),
            })
    }

    async fn get_pods(&self) -> Result<Bytes, KubeletError> {
        let token = match &self.token_path {
            Some(path) => Some(read_token(path).await?),
            None => None,
        };
        let unreachable = |problem: String| KubeletError::Unreachable {
            address: self.address(),
            problem,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut request = http::Request::get("/pods")
            .header(http::header::HOST, self.address())
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONNECTION, "close");
        if let Some(token) = &token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS: {e}")))?;
                self.exchange(TokioIo::new(tls), request).await
            }
            None => self.exchange(TokioIo::new(tcp), request).await,
        }
    }

    /// One HTTP/1.1 request on `io`, its body read up to the limit.
    async fn exchange<I>(
        &self,
        io: I,
        request: http::Request<Empty<Bytes>>,
    ) -> Result<Bytes, KubeletError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let address = self.address();
        let unreachable = |problem: String| KubeletError::Unreachable {
            address: address.clone(),
            problem,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let limit = self.max_response_bytes;
        let response = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = response.status();
            if status != http::StatusCode::OK {
                return Err(KubeletError::Status {
                    address: address.clone(),
                    status,
                    hint: match status {
                        http::StatusCode::UNAUTHORIZED => {
                            ": the service account token was refused (expired, or not this cluster's)"
                        }
                        http::StatusCode::FORBIDDEN => {
                            ": the service account may not get nodes/proxy (RBAC)"
                        }
                        _ => "",
                    },
                });
            }
            match Limited::new(response.into_body(), limit).collect().await {
                Ok(body) => Ok(body.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    Err(KubeletError::TooLarge {
                        address: address.clone(),
                        limit,
                    })
                }
                Err(e) => Err(unreachable(e.to_string())),
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
                Err(e) => Err(unreachable(e.to_string())),
            },
        }
    }
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet")
            .field("address", &self.address())
            .field("tls", &self.tls.is_some())
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

/// A pod list as the kubelet's `/pods` returns it (JSON), into the
/// Kubernetes types.
pub fn parse_pods(body: &[u8]) -> Result<k8s_openapi::List<Pod>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// The CA certificates in a PEM file.
fn read_ca(path: &Path) -> Result<RootCertStore, KubeletError> {
    let problem = |problem: String| KubeletError::Ca {
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

/// The service account token, trimmed.
async fn read_token(path: &Path) -> Result<String, KubeletError> {
    use tokio::io::AsyncReadExt as _;
    let error = |source| KubeletError::Token {
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

/// `skip_kubelet_verification`: any server certificate is accepted (the
/// kubelet's self-signed serving certificate, as many clusters have), but
/// the handshake signatures are still checked with the provider's
/// algorithms, so the session is with whoever holds that certificate's key.
#[derive(Debug)]
struct AnyServerCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
