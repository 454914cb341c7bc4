//! The local authority: the trust domain's keys held in this process.
//!
//! Owns the X.509 CAs and JWT signing keys of the trust domain, their files
//! in `data_dir/authority/` (`state` and `keys/`), and their rotation
//! (`rotate`). It implements [`Authority`](super::Authority) for the
//! layers above, which never see this type: only the composition root
//! (`daemon`), tests and benchmarks hold a `LocalAuthority`, and only they
//! use its signers directly.
//!
//! Two kinds of X.509 authority (`[authority] kind`):
//! - `self_signed`: each CA is a self-signed root kept in the data dir, and
//!   the bundle holds those roots;
//! - `disk`: an upstream CA mounted by the operator ([`super::upstream`])
//!   issues the agent's own intermediate CAs, and the bundle holds the
//!   upstream's trust anchor, so agents sharing one upstream trust each
//!   other's X.509-SVIDs. The intermediates rotate on the same schedule as
//!   self-signed roots without touching the bundle. The upstream files are
//!   re-read on every wake of the rotation loop (at least once a minute): a
//!   new upstream CA gets a new intermediate at once, and the old anchor
//!   stays in the bundle until the intermediates under it expire. JWT keys
//!   stay per agent: a JWT-SVID validates on another node only through
//!   federation or a shared JWT authority, which this module does not
//!   provide.
//!
//! A CA issued by another authority than the configured one (the upstream
//! changed, or `kind` did) signs no more; it stays until its `notAfter`, so
//! its anchor stays in the bundle for what it signed.
//!
//! Where the work runs: an X.509 signature (and the CSR check before it)
//! on the blocking pool; a JWT signature (one ECDSA P-256 signature over a
//! key parsed once) on the caller's task, which costs less than the hop.
//!
//! Invariants:
//! - the anchor of every CA is in the published bundle before anything is
//!   signed with it, and stays there until everything it signed has expired
//!   (signatures are capped at the CA's expiry, an intermediate's at its
//!   upstream chain's);
//! - private keys live in files of mode 0600 (the upstream's: readable by its
//!   owner only) and in memory only inside this module;
//! - a data dir written for another trust domain, a key that does not match
//!   its certificate, a key file others can read or an upstream CA that fails
//!   its checks stops the agent: it never starts empty over a damaged store.

mod rotate;
mod sign;
pub(super) mod state;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::rotation::{self, Lifetime};
use super::upstream::{Fingerprint, Upstream};
use super::{
    AuthorityConfig, AuthorityError, AuthorityKind, CrlRequest, JwtKey, X509Authority, key_store,
};
use crate::bundle::TrustBundle;
pub(super) use state::STATE_VERSION;

/// How long the rotation loop waits after a failure before trying again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// The rotation loop looks at the clock at least this often, so a wall
/// clock jump is noticed promptly.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The trust domain's keys at one instant.
#[derive(Debug)]
pub(in crate::authority) struct KeySet {
    /// CAs of the configured authority: they sign, per the schedule.
    pub(in crate::authority) x509: Vec<Arc<X509Authority>>,
    /// CAs of another authority (an older upstream, another `kind`): they
    /// sign no more and stay until their `notAfter`, with their anchors in
    /// the bundle.
    pub(in crate::authority) retiring: Vec<Arc<X509Authority>>,
    pub(in crate::authority) jwt: Vec<Arc<JwtKey>>,
    /// The bundle's sequence number: grows with every change of its content.
    pub(in crate::authority) sequence: u64,
}

/// The trust domain's keys, held in this process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalAuthority {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    trust_domain: TrustDomain,
    config: AuthorityConfig,
    dir: PathBuf,
    keys: watch::Sender<Arc<KeySet>>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// Serialises rotations (the loop and start-up) and holds what only they
    /// use; signing never takes it.
    rotating: Mutex<RotationState>,
}

/// What the rotation loop keeps between wakes.
#[derive(Debug, Default)]
struct RotationState {
    /// `kind = "disk"`: the upstream CA in use.
    upstream: Option<Upstream>,
    /// Upstream files already refused, so each bad version is reported once.
    refused: Option<Fingerprint>,
    /// The last upstream read failure reported, so repeats drop to debug.
    read_failure: Option<String>,
}

// === impl LocalAuthority ===

impl LocalAuthority {
    /// Loads the keys kept in `data_dir/authority`, creating the trust
    /// domain's first keys on first start, and brings them up to date with
    /// the rotation schedule. Blocking file I/O: call before serving.
    pub fn load_or_create(
        trust_domain: TrustDomain,
        config: AuthorityConfig,
        data_dir: &Path,
    ) -> Result<Self, AuthorityError> {
        config
            .validate()
            .map_err(|(key, problem)| AuthorityError::Config(key, problem))?;
        let upstream = match (config.kind, &config.cert_path, &config.key_path) {
            (AuthorityKind::Disk, Some(cert_path), Some(key_path)) => {
                let upstream =
                    Upstream::load(cert_path, key_path, &trust_domain, SystemTime::now())?;
                tracing::info!(subject = upstream.subject(), serial = upstream.serial(), not_after = %humantime::format_rfc3339_seconds(upstream.not_after()), "loaded the upstream CA");
                Some(upstream)
            }
            _ => None,
        };
        let dir = data_dir.join("authority");
        key_store::ensure_private_dir(&dir)?;
        key_store::ensure_private_dir(&dir.join("keys"))?;
        let keys = state::load(&dir, &trust_domain)?;
        let bundle = Arc::new(rotate::bundle_of(&trust_domain, &keys));
        let authority = Self {
            inner: Arc::new(Inner {
                trust_domain,
                config,
                dir,
                keys: watch::channel(Arc::new(keys)).0,
                bundle: watch::channel(bundle).0,
                rotating: Mutex::new(RotationState {
                    upstream,
                    ..RotationState::default()
                }),
            }),
        };
        authority.rotate_at(SystemTime::now())?;
        Ok(authority)
    }

    /// The keys as they are now (tests look inside).
    #[cfg(test)]
    pub(in crate::authority) fn keys(&self) -> Arc<KeySet> {
        self.inner.keys.borrow().clone()
    }

    /// The CA that signs X.509-SVIDs now.
    pub fn x509_signer(&self) -> Result<Arc<X509Authority>, AuthorityError> {
        let keys = self.inner.keys.borrow().clone();
        let lifetimes: Vec<Lifetime> = keys.x509.iter().map(|k| k.lifetime()).collect();
        rotation::active(&lifetimes, SystemTime::now())
            .map(|i| Arc::clone(&keys.x509[i]))
            .ok_or(AuthorityError::NoActiveKey("X.509"))
    }

    /// The key that signs JWTs now.
    pub fn jwt_signer(&self) -> Result<Arc<JwtKey>, AuthorityError> {
        let keys = self.inner.keys.borrow().clone();
        let lifetimes: Vec<Lifetime> = keys.jwt.iter().map(|k| k.lifetime()).collect();
        rotation::active(&lifetimes, SystemTime::now())
            .map(|i| Arc::clone(&keys.jwt[i]))
            .ok_or(AuthorityError::NoActiveKey("JWT"))
    }

    /// True when `cert_der` is a certificate one of this agent's CAs
    /// (signing or retiring) signed: an X.509-SVID this agent issued.
    fn signed_by_own_ca(&self, cert_der: &[u8]) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
            return false;
        };
        let keys = self.inner.keys.borrow().clone();
        keys.x509.iter().chain(keys.retiring.iter()).any(|ca| {
            x509_parser::parse_x509_certificate(ca.cert_der())
                .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
        })
    }

    /// Signs a CRL for the CA `ca_id` (signing or retiring) listing
    /// `revoked` (serial bytes, revocation time). `None` when that CA is
    /// gone (its certificates have expired, and so need no CRL).
    fn crl(&self, request: &CrlRequest) -> Result<Option<Vec<u8>>, AuthorityError> {
        let CrlRequest {
            ca_id,
            revoked,
            crl_number,
            next_update,
        } = request;
        let keys = self.inner.keys.borrow().clone();
        let Some(ca) = keys
            .x509
            .iter()
            .chain(keys.retiring.iter())
            .find(|ca| ca.id() == ca_id)
        else {
            return Ok(None);
        };
        let now = SystemTime::now();
        ca.sign_crl(
            revoked,
            *crl_number,
            now,
            (*next_update)
                .min(ca.lifetime().not_after)
                .max(now + Duration::from_secs(1)),
        )
        .map(Some)
    }

    /// The rotation loop: applies the schedule whenever something is due.
    pub async fn run(self, cancel: CancellationToken) {
        let mut last_failure: Option<String> = None;
        loop {
            let now = SystemTime::now();
            let authority = self.clone();
            let wait = match tokio::task::spawn_blocking(move || authority.rotate_at(now)).await {
                Ok(Ok(next)) => {
                    last_failure = None;
                    next.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                }
                Ok(Err(error)) => {
                    let message = crate::error::chain(&error);
                    if last_failure.as_deref() == Some(message.as_str()) {
                        tracing::debug!(error = %crate::error::Chain(&error), "key rotation failed again; retrying");
                    } else {
                        tracing::error!(error = %crate::error::Chain(&error), "key rotation failed; retrying");
                    }
                    last_failure = Some(message);
                    RETRY_AFTER_FAILURE
                }
                Err(error) => {
                    tracing::error!(error = %crate::error::Chain(&error), "key rotation job failed; retrying");
                    RETRY_AFTER_FAILURE
                }
            };
            let wait = wait.clamp(Duration::from_millis(50), MAX_SLEEP);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
