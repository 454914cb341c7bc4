//! This trust domain's bundle endpoint (SPIFFE Federation, section 4): the
//! bundle, as a SPIFFE bundle document with `spiffe_sequence` and
//! `spiffe_refresh_hint`, at `/`, over the web kit ([`crate::web`]).
//!
//! Invariants: only `GET` (and `HEAD`) of `/` answer the document (other
//! paths 404, other methods 405); the document is the bundle in force at
//! the request (read from the bundle watch, so a rotation is served at
//! once); the endpoint publishes only public keys and needs no client
//! authentication. `https_web` presents the configured certificate
//! (re-read when its files change); `https_spiffe` presents this
//! process's own X.509-SVID, renewed in place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::sync::watch;

use super::config::EndpointTls;
use crate::bundle::TrustBundle;
use crate::mtls::{self, ClientAuth, SwappableIdentity};
use crate::web::{self, Routes, WebRequest, WebResponse};

/// Why the bundle endpoint cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The `https_web` certificate or key could not be loaded.
    #[error("loading the bundle endpoint's certificate {cert_path} and key {key_path}")]
    Certificate {
        /// `cert_path`.
        cert_path: PathBuf,
        /// `key_path`.
        key_path: PathBuf,
        /// The cause.
        #[source]
        source: Box<web::WebError>,
    },
    /// `https_spiffe` without this process's SVID (a wiring error).
    #[error("the https_spiffe bundle endpoint needs this process's X.509-SVID")]
    NoIdentity,
}

/// The bundle endpoint's routes.
#[derive(Debug, Clone)]
pub struct BundleRoutes {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    refresh_hint: Duration,
}

impl BundleRoutes {
    /// Serves `bundle` (as it is at each request) with `refresh_hint`.
    pub fn new(bundle: watch::Receiver<Arc<TrustBundle>>, refresh_hint: Duration) -> Self {
        Self {
            bundle,
            refresh_hint,
        }
    }

    /// The document served now.
    pub fn document(&self) -> Result<String, crate::bundle::BundleError> {
        let bundle = TrustBundle::clone(&self.bundle.borrow());
        bundle.with_refresh_hint(self.refresh_hint).to_spiffe_json()
    }
}

impl Routes for BundleRoutes {
    async fn answer(&self, request: WebRequest) -> WebResponse {
        if request.path != "/" {
            return web::text(StatusCode::NOT_FOUND, "not found: the bundle is at /\n");
        }
        if request.method != Method::GET && request.method != Method::HEAD {
            let mut response = web::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
            response.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return response;
        }
        match self.document() {
            Ok(document) => web::reply(StatusCode::OK, "application/json", document),
            Err(error) => {
                tracing::error!(error = %crate::error::Chain(&error), "the bundle document could not be written");
                web::text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
            }
        }
    }
}

/// The endpoint's TLS: the configured certificate (`https_web`) or
/// `identity`, this process's SVID (`https_spiffe`; `bundle` is the trust
/// domain's, for the config's verifier, no client certificate asked).
pub fn tls(
    endpoint: &EndpointTls,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    identity: Option<SwappableIdentity>,
) -> Result<web::Tls, EndpointError> {
    match endpoint {
        EndpointTls::Web {
            cert_path,
            key_path,
        } => {
            let files = web::CertificateFiles::load(cert_path, key_path).map_err(|source| {
                EndpointError::Certificate {
                    cert_path: cert_path.clone(),
                    key_path: key_path.clone(),
                    source: Box::new(source),
                }
            })?;
            Ok(web::Tls::Rustls(Arc::new(files)))
        }
        EndpointTls::Spiffe => {
            let identity = identity.ok_or(EndpointError::NoIdentity)?;
            let config = mtls::https_server_config(bundle, identity, ClientAuth::None);
            Ok(web::Tls::Rustls(Arc::new(config)))
        }
    }
}
