//! Authority: the trust domain's signing keys, behind one seam.
//!
//! Everything above this module signs through the [`Authority`] trait:
//! sign a certificate request for an identity
//! ([`Authority::sign_x509_svid`]), sign a JWT with given claims
//! ([`Authority::sign_jwt`]), sign a CRL for one of its CAs, and publish
//! the trust bundle and its changes ([`Authority::bundle`],
//! [`Authority::subscribe_bundle`]). Callers hold an `Arc<dyn Authority>`
//! and never learn where the keys are: only the composition root
//! (`daemon`) chooses the implementation.
//!
//! Today's one implementation is [`LocalAuthority`]: the keys live in this
//! process, in `data_dir/authority/`, self-signed or under an upstream CA
//! read from disk (see [`local`]). A fleet agent's implementation, which
//! asks a `tether server` to sign, comes next; it fits the same trait
//! because every signing call is async and takes a request that carries
//! no private key: the workload's key pair is made by the caller, which
//! sends a PKCS#10 CSR (its proof of possession) and keeps the key.
//!
//! Building blocks, each usable by any implementation that holds keys:
//! X.509 CAs ([`x509_ca`]), JWT signing keys ([`jwt_keys`]), their files
//! ([`key_store`]), their rotation schedule ([`rotation`]), the upstream
//! CA from disk ([`upstream`]).
//!
//! Invariants (every implementation):
//! - nothing is signed with a key before its anchor or public key is in
//!   the published bundle, and nothing signed outlives the key that
//!   signed it (`exp` and `notAfter` are capped by the authority, not the
//!   caller);
//! - the identity in a certificate is the one in the request, never a
//!   name taken from the CSR; the CSR's signature is checked;
//! - private keys never leave the implementation and are never logged
//!   (only `kid`s, CA ids and upstream serials are).

pub mod config;
pub mod jwt_keys;
pub mod key_store;
pub mod local;
pub mod rotation;
pub mod upstream;
pub mod x509_ca;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::BoxFuture;
use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::bundle::TrustBundle;
pub use config::{AuthorityConfig, AuthorityKind};
pub use jwt_keys::JwtKey;
use key_store::KeyStoreError;
pub use local::LocalAuthority;
use upstream::UpstreamError;
pub use x509_ca::{LeafTemplate, SignedLeaf, X509Authority};

/// The seam: what the layers above need from whoever holds the trust
/// domain's keys. Object-safe; held as `Arc<dyn Authority>`.
///
/// Signing calls are async (an implementation may sign elsewhere); the
/// queries answer from state the implementation keeps current, without
/// I/O, so they are fine on any thread.
pub trait Authority: fmt::Debug + Send + Sync + 'static {
    /// The trust domain this authority signs for.
    fn trust_domain(&self) -> &TrustDomain;

    /// The `iss` its tokens carry when one is configured (`[oidc]
    /// issuer`, on a fleet agent the server's, learned on the sync
    /// stream); `None`: JWT-SVIDs carry no `iss` and task tokens
    /// `spiffe://<td>`. Set by the token kinds (`svid::jwt::issue`,
    /// `task::token`), never by the signer.
    fn issuer(&self) -> Option<String>;

    /// Signs an X.509-SVID for the key in `request.csr`, naming
    /// `request.spiffe_id` (and `request.dns_names`), valid for at most
    /// `request.ttl` and never past the signing CA's own expiry.
    fn sign_x509_svid(
        &self,
        request: X509SvidRequest,
    ) -> BoxFuture<'_, Result<SignedX509Svid, AuthorityError>>;

    /// Signs `request.claims` as an ES256 JWT with the active JWT key
    /// (header `alg`, `kid`, `typ: JWT`), setting `exp` to
    /// `request.not_after` or the key's expiry, whichever is sooner.
    fn sign_jwt(&self, request: JwtRequest) -> BoxFuture<'_, Result<SignedJwt, AuthorityError>>;

    /// Signs a CRL for the CA `ca_id` listing `revoked` (serial bytes,
    /// revocation time), numbered `crl_number`, valid until about
    /// `next_update`. `None` when that CA is gone (what it signed has
    /// expired, and needs no CRL).
    fn sign_crl(
        &self,
        request: CrlRequest,
    ) -> BoxFuture<'_, Result<Option<Vec<u8>>, AuthorityError>>;

    /// The trust domain's bundle as it is now.
    fn bundle(&self) -> Arc<TrustBundle>;

    /// Wakes whenever the bundle's content changes.
    fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>>;

    /// True when `cert_der` was signed by one of this authority's CAs
    /// (signing or retiring).
    fn issued_here(&self, cert_der: &[u8]) -> bool;

    /// True when `kid` names one of this authority's JWT keys.
    fn is_own_jwt_key(&self, kid: &str) -> bool;

    /// Why it cannot sign right now (empty: it can): for readiness.
    fn problems(&self) -> Vec<String>;
}

/// A request for an X.509-SVID.
#[derive(Debug, Clone)]
pub struct X509SvidRequest {
    /// PKCS#10, DER, signed by the workload's fresh key: the key to
    /// certify and the proof its holder has it. Names in it are ignored.
    pub csr: Vec<u8>,
    /// The identity to certify (the single URI SAN).
    pub spiffe_id: SpiffeId,
    /// DNS SANs (the first also becomes the subject CN).
    pub dns_names: Vec<String>,
    /// Requested lifetime.
    pub ttl: Duration,
}

/// A signed X.509-SVID certificate (the caller holds its key).
#[derive(Debug, Clone)]
pub struct SignedX509Svid {
    /// The leaf followed by any intermediates, DER.
    pub chain: Vec<Vec<u8>>,
    /// Serial number, big-endian bytes.
    pub serial: Vec<u8>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The CA that signed it (names it in a CRL request).
    pub ca_id: String,
}

impl SignedX509Svid {
    /// The serial number, lowercase hex.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A request to sign a JWT.
#[derive(Debug, Clone)]
pub struct JwtRequest {
    /// The claims, except `exp`, which the authority sets.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// The latest expiry the caller wants.
    pub not_after: SystemTime,
    /// For an exchanged task token: the token it was exchanged from. A
    /// remote authority shows it to the server, which checks the exchange
    /// against it; an authority holding its own keys ignores it (the
    /// caller checked the exchange).
    pub subject_token: Option<String>,
}

/// A signed JWT.
#[derive(Debug, Clone)]
pub struct SignedJwt {
    /// The compact JWS.
    pub token: String,
    /// The `kid` of the key that signed it.
    pub kid: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

/// A request to sign a CRL.
#[derive(Debug, Clone)]
pub struct CrlRequest {
    /// The CA whose certificates are revoked.
    pub ca_id: String,
    /// Serial bytes and revocation time of each revoked certificate.
    pub revoked: Vec<(Vec<u8>, SystemTime)>,
    /// The CRL number (grows with every CRL of this CA).
    pub crl_number: u64,
    /// When the next CRL is due.
    pub next_update: SystemTime,
}

/// Why the authority could not load, sign or rotate.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// Reading or writing a key or the state file failed.
    #[error(transparent)]
    Store(#[from] KeyStoreError),
    /// The stored state cannot be trusted.
    #[error(
        "authority state in the data dir is damaged: {0}; refusing to start with it (restore the data dir from a backup, or move it away to start a new trust domain)"
    )]
    Corrupt(String),
    /// The data dir holds the keys of another trust domain.
    #[error(
        "the data dir holds the keys of trust domain {stored:?}, but trust_domain is {configured:?}; use another data_dir or the matching trust_domain"
    )]
    OtherTrustDomain {
        /// From the state file.
        stored: String,
        /// From the config.
        configured: String,
    },
    /// The state file was written by a newer tether.
    #[error(
        "authority state version {0} is newer than this tether understands ({max})",
        max = local::STATE_VERSION
    )]
    NewerState(u32),
    /// No key is active (a rotation failure left none usable).
    #[error("no active {0} signing key")]
    NoActiveKey(&'static str),
    /// Certificate generation failed.
    #[error("certificate generation failed")]
    Rcgen(#[source] rcgen::Error),
    /// JWT signing failed.
    #[error("JWT signing failed")]
    Jwt(#[source] jsonwebtoken::errors::Error),
    /// The blocking signing job ended without an answer (it panicked, or
    /// the runtime is shutting down).
    #[error("the signing job ended without an answer: {0}")]
    SigningJob(String),
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// The upstream CA files were refused.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A signing request the authority refuses: a CSR that does not parse
    /// or whose signature fails, an identity outside the trust domain, JWT
    /// claims that are not an object or set what the authority sets.
    #[error("signing request refused: {0}")]
    BadRequest(String),
    /// The fleet's server refused or could not sign (fleet mode), or
    /// cannot be reached.
    #[error("the tether server did not sign")]
    Remote(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The configuration is incomplete (see [`AuthorityConfig::validate`]).
    #[error("{0}: {1}")]
    Config(&'static str, String),
}

/// A fresh P-256 key (PKCS#8 DER) and a PKCS#10 CSR signed by it (DER):
/// what a caller of [`Authority::sign_x509_svid`] makes, keeps (the key)
/// and sends (the CSR). The CSR names nothing: the authority takes the
/// identity from the request. CPU-bound: call it on the blocking pool.
pub fn key_and_csr() -> Result<(zeroize::Zeroizing<Vec<u8>>, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok((
        zeroize::Zeroizing::new(key.serialize_der()),
        csr.der().to_vec(),
    ))
}

/// 128 random bits, base64url: CA ids and `kid`s.
pub(crate) fn random_id() -> Result<String, AuthorityError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthorityError::Random)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// A positive 128-bit serial number (top bit clear, so DER needs no sign
/// byte). Random serials are unique with overwhelming probability and leak
/// nothing about issuance volume.
pub(crate) fn random_serial() -> Result<rcgen::SerialNumber, AuthorityError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthorityError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01 << 6; // never a leading zero byte: a fixed 16-byte length
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}
