//! [`RemoteAuthority`]: the `authority::Authority` seam in fleet mode.
//! Every signature is the server's, asked for over the link; the bundle is
//! the one the server syncs. No signing key is on the node.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use spiffe::TrustDomain;
use tokio::sync::watch;

use super::link::Link;
use crate::authority::{
    Authority, AuthorityError, CrlRequest, JwtRequest, SignedJwt, SignedX509Svid, X509SvidRequest,
};
use crate::bundle::TrustBundle;
use crate::proto::server as pb;

/// The server's signatures, through the link.
#[derive(Debug, Clone)]
pub struct RemoteAuthority {
    link: Link,
}

impl RemoteAuthority {
    /// Signs through `link`.
    pub fn new(link: Link) -> Self {
        Self { link }
    }

    fn client(
        &self,
    ) -> Result<pb::node_client::NodeClient<tonic::transport::Channel>, AuthorityError> {
        self.link.client().ok_or_else(|| {
            AuthorityError::Remote(Box::new(tonic::Status::unavailable(
                "not connected to the tether server",
            )))
        })
    }
}

impl Authority for RemoteAuthority {
    fn trust_domain(&self) -> &TrustDomain {
        self.link.trust_domain()
    }

    /// The server's issuer, from the sync stream: the node's tokens are
    /// the server's signatures, under its name.
    fn issuer(&self) -> Option<String> {
        self.link.issuer()
    }

    fn sign_x509_svid(
        &self,
        request: X509SvidRequest,
    ) -> BoxFuture<'_, Result<SignedX509Svid, AuthorityError>> {
        async move {
            let mut client = self.client()?;
            let ttl_ms = u64::try_from(request.ttl.as_millis()).unwrap_or(u64::MAX);
            let mut response = client
                .sign_x509_svids(pb::SignX509SvidsRequest {
                    requests: vec![pb::X509SvidRequest {
                        spiffe_id: request.spiffe_id.to_string(),
                        csr: request.csr,
                        ttl_ms,
                        dns_names: request.dns_names,
                    }],
                })
                .await
                .map_err(|status| AuthorityError::Remote(Box::new(status)))?
                .into_inner();
            let svid = response
                .svids
                .pop()
                .filter(|s| !s.cert_chain.is_empty())
                .ok_or_else(|| {
                    AuthorityError::BadRequest("the tether server sent no certificate".into())
                })?;
            Ok(SignedX509Svid {
                chain: svid.cert_chain,
                serial: svid.serial,
                not_before: time(svid.not_before_ms),
                not_after: time(svid.not_after_ms),
                ca_id: svid.ca_id,
            })
        }
        .boxed()
    }

    fn sign_jwt(&self, request: JwtRequest) -> BoxFuture<'_, Result<SignedJwt, AuthorityError>> {
        async move {
            let mut client = self.client()?;
            let claims_json = serde_json::Value::Object(request.claims).to_string();
            let not_after_ms = request
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let signed = client
                .sign_jwt(pb::SignJwtRequest {
                    claims_json,
                    not_after_ms,
                    subject_token: request.subject_token.unwrap_or_default(),
                })
                .await
                .map_err(|status| AuthorityError::Remote(Box::new(status)))?
                .into_inner();
            Ok(SignedJwt {
                token: signed.token,
                kid: signed.kid,
                expires_at: time(signed.expires_at_ms),
            })
        }
        .boxed()
    }

    /// CRLs of process-bound SVIDs are not signed in fleet mode yet: the
    /// server would have to sign for CAs by their id. `None` (no CRL) is
    /// what the issuer does for a CA that is gone.
    fn sign_crl(
        &self,
        _request: CrlRequest,
    ) -> BoxFuture<'_, Result<Option<Vec<u8>>, AuthorityError>> {
        std::future::ready(Ok(None)).boxed()
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        self.link.bundle()
    }

    fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.link.subscribe_bundle()
    }

    /// True when one of the bundle's X.509 authorities signed `cert_der`.
    fn issued_here(&self, cert_der: &[u8]) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
            return false;
        };
        self.link.bundle().x509_authorities().iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca)
                .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
        })
    }

    /// No JWT key is this node's: tokens of tasks this node does not know
    /// are judged by their signature (the fleet's task index is issue 18).
    fn is_own_jwt_key(&self, _kid: &str) -> bool {
        false
    }

    fn problems(&self) -> Vec<String> {
        self.link.problems()
    }
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
