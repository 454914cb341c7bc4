//! OIDC discovery (`[oidc]`): what lets a relying party that knows only
//! an issuer URL validate this trust domain's JWT-SVIDs and task tokens
//! (cloud workload identity federation, Vault's JWT auth, an MCP
//! authorization server taking a JWT-SVID as an RFC 7523 assertion).
//!
//! Served by a standalone agent or the tether server (never a fleet
//! agent: one trust domain has one issuer, the server's), over HTTPS with
//! `cert_path`/`key_path` or plain HTTP behind an ingress:
//! - `GET <issuer path>/.well-known/openid-configuration`: the discovery
//!   document (`issuer`, `jwks_uri` = `<issuer>/keys`, ES256, `id_token`,
//!   `public`, the claims);
//! - `GET <issuer path>/keys`: the trust domain's JWT keys from the bundle
//!   watch, each with `use: "sig"` and its `alg`.
//!
//! Both are answered at the root too, `Cache-Control: public,
//! max-age=300` (less with JWT keys under 30 minutes: [`max_age_for`])
//! with a content `ETag` (`If-None-Match` gives 304); any other path is
//! 404, any other method 405.
//!
//! Invariant: a relying party that honours the cache header holds every
//! key that signs. A JWT key is published at half its life and signs from
//! five sixths of it (`authority::rotation`: eight hours ahead with the
//! default 24 h, four seconds with a 12 s test key), at least twice the
//! `max-age` served ([`max_age_for`]: a sixth of the key's life, at most
//! five minutes). The issuer itself is set at config load and is the
//! `iss` of every token the authority signs
//! (`authority::Authority::issuer`); nothing here signs or reads a key.

mod config;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bundle::TrustBundle;
use crate::web::{self, CertificateFiles, Limits, Tls, WebError};
pub use config::{MAX_ISSUER_LEN, OidcConfig, normalize_issuer};
pub use routes::{CACHE_CONTROL_VALUE, DISCOVERY_PATH, KEYS_PATH, OidcRoutes, jwks, max_age_for};

/// Why the discovery endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// `listen` could not be bound.
    #[error("binding the OIDC discovery endpoint {listen} ([oidc] listen)")]
    Bind {
        /// The configured address.
        listen: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bound listener has no address (the socket failed).
    #[error("the OIDC discovery endpoint's address")]
    Address(#[source] std::io::Error),
    /// `cert_path`/`key_path` could not be loaded.
    #[error("loading the OIDC discovery endpoint's certificate ([oidc] cert_path, key_path)")]
    Certificate(#[source] WebError),
}

/// The discovery endpoint, bound (and its certificate loaded) but not yet
/// serving: the composition root binds every listener before it spawns.
#[derive(Debug)]
pub struct BoundOidc {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Tls,
    issuer: String,
    jwt_key_ttl: Duration,
}

// === impl BoundOidc ===

impl BoundOidc {
    /// Binds `config.listen` and loads its certificate, if any. The JWT
    /// keys served live `jwt_key_ttl` (`authority.jwt_key_ttl`), which
    /// bounds how long relying parties may cache them
    /// ([`max_age_for`]).
    pub async fn bind(config: &OidcConfig, jwt_key_ttl: Duration) -> Result<Self, OidcError> {
        let tls = match (&config.cert_path, &config.key_path) {
            (Some(cert), Some(key)) => Tls::Rustls(Arc::new(
                CertificateFiles::load(cert, key).map_err(OidcError::Certificate)?,
            )),
            _ => Tls::Plain,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| OidcError::Bind {
                    listen: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(OidcError::Address)?;
        Ok(Self {
            listener,
            addr,
            tls,
            issuer: config.issuer.clone(),
            jwt_key_ttl,
        })
    }

    /// The bound address (a `listen` port of 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the discovery document and `bundle`'s JWT keys until
    /// `cancel`, each connection on `tracker`.
    pub async fn serve(
        self,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) {
        let routes =
            Arc::new(OidcRoutes::new(&self.issuer, bundle).with_jwt_key_ttl(self.jwt_key_ttl));
        web::serve(
            self.listener,
            self.tls,
            routes,
            Limits::default(),
            tracker,
            cancel,
        )
        .await;
    }
}

#[cfg(test)]
mod tests;
