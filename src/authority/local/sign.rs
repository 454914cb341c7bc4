//! [`Authority`] for [`LocalAuthority`]: signing with the keys held here.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use rcgen::CertificateSigningRequestParams;
use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio_rustls::rustls::pki_types::CertificateSigningRequestDer;

use super::LocalAuthority;
use crate::authority::{
    Authority, AuthorityError, CrlRequest, JwtRequest, LeafTemplate, SignedJwt, SignedX509Svid,
    X509SvidRequest,
};
use crate::bundle::TrustBundle;

// === impl LocalAuthority ===

impl Authority for LocalAuthority {
    fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    fn issuer(&self) -> Option<String> {
        self.inner.config.issuer.clone()
    }

    fn sign_x509_svid(
        &self,
        request: X509SvidRequest,
    ) -> BoxFuture<'_, Result<SignedX509Svid, AuthorityError>> {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || this.sign_x509_now(&request, SystemTime::now()))
                .await
                .map_err(|error| AuthorityError::SigningJob(error.to_string()))?
        }
        .boxed()
    }

    fn sign_jwt(&self, request: JwtRequest) -> BoxFuture<'_, Result<SignedJwt, AuthorityError>> {
        std::future::ready(self.sign_jwt_now(request)).boxed()
    }

    fn sign_crl(
        &self,
        request: CrlRequest,
    ) -> BoxFuture<'_, Result<Option<Vec<u8>>, AuthorityError>> {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || this.crl(&request))
                .await
                .map_err(|error| AuthorityError::SigningJob(error.to_string()))?
        }
        .boxed()
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        self.inner.bundle.borrow().clone()
    }

    fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.inner.bundle.subscribe()
    }

    fn issued_here(&self, cert_der: &[u8]) -> bool {
        self.signed_by_own_ca(cert_der)
    }

    fn is_own_jwt_key(&self, kid: &str) -> bool {
        self.inner.keys.borrow().jwt.iter().any(|k| k.kid() == kid)
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(error) = self.x509_signer() {
            problems.push(format!(
                "no usable X.509 signing key: {}",
                crate::error::Chain(&error)
            ));
        }
        if let Err(error) = self.jwt_signer() {
            problems.push(format!(
                "no usable JWT signing key: {}",
                crate::error::Chain(&error)
            ));
        }
        problems
    }
}

impl LocalAuthority {
    /// Checks the CSR (it parses, its signature verifies, its key is
    /// P-256) and signs a leaf for its key with the request's names, by the
    /// CA active at `now`. Blocking: a signature and a verification.
    pub(super) fn sign_x509_now(
        &self,
        request: &X509SvidRequest,
        now: SystemTime,
    ) -> Result<SignedX509Svid, AuthorityError> {
        if request.spiffe_id.trust_domain() != &self.inner.trust_domain {
            return Err(AuthorityError::BadRequest(format!(
                "{} is not in trust domain {}",
                request.spiffe_id, self.inner.trust_domain
            )));
        }
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            request.csr.as_slice(),
        ))
        .map_err(|error| {
            AuthorityError::BadRequest(format!(
                "the CSR does not parse or its signature does not verify: {error}"
            ))
        })?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(AuthorityError::BadRequest(
                "the CSR's key is not an ECDSA P-256 key".into(),
            ));
        }
        let ca = self.x509_signer()?;
        let template = LeafTemplate {
            uri: request.spiffe_id.to_string(),
            dns_names: request.dns_names.clone(),
            ttl: request.ttl,
        };
        let signed = ca.sign_leaf(&template, &csr.public_key, now)?;
        Ok(SignedX509Svid {
            chain: signed.chain,
            serial: signed.serial,
            not_before: signed.not_before,
            not_after: signed.not_after,
            ca_id: ca.id().to_owned(),
        })
    }

    /// Signs `request` with the JWT key active now, `exp` capped at its
    /// expiry.
    fn sign_jwt_now(&self, request: JwtRequest) -> Result<SignedJwt, AuthorityError> {
        let JwtRequest {
            mut claims,
            not_after,
            // The caller checked the exchange; only a remote signer shows it.
            subject_token: _,
        } = request;
        if claims.contains_key("exp") {
            return Err(AuthorityError::BadRequest(
                "the claims set exp, which the authority sets".into(),
            ));
        }
        let key = self.jwt_signer()?;
        let expires_at = not_after.min(key.latest_expiry());
        let exp = expires_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        claims.insert("exp".into(), exp.into());
        let token = key.sign(&claims)?;
        Ok(SignedJwt {
            token,
            kid: key.kid().to_owned(),
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        })
    }
}
