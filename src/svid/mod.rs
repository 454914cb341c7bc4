//! SVIDs: issuing X.509-SVIDs and JWT-SVIDs for registration entries, keeping
//! the current X.509-SVID of each entry, rotating it, and validating JWT-SVIDs.
//!
//! [`SvidIssuer`] is the handle the edges use. X.509-SVIDs are issued on
//! demand the first time a caller needs one (never after a polling delay)
//! and then renewed by the rotation loop at about half their life, with
//! jitter so SVIDs issued together do not all renew together. JWT-SVIDs are
//! signed per request.
//!
//! Invariant: every SVID is signed by a key that is already in the
//! published bundle, and never outlives that key (the authority caps it).

pub mod cache;
pub mod jwt;
pub mod rotation;
pub mod x509;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use crate::authority::{Authority, AuthorityError};
use crate::registration::RegistrationEntry;
pub use cache::X509SvidCache;
pub use jwt::{JwtSvid, JwtValidationError, ValidatedJwt};
pub use x509::X509Svid;

/// Default SVID lifetimes (the top-level `x509_svid_ttl` and `jwt_svid_ttl`).
#[derive(Debug, Clone, Copy)]
pub struct SvidConfig {
    /// X.509-SVID lifetime unless the entry says otherwise.
    pub x509_svid_ttl: Duration,
    /// JWT-SVID lifetime unless the entry says otherwise.
    pub jwt_svid_ttl: Duration,
}

/// Why an SVID could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// The authority could not sign.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// Generating the SVID's key pair failed.
    #[error("generating the SVID key: {0}")]
    KeyGeneration(#[source] rcgen::Error),
}

/// Issues and caches SVIDs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SvidIssuer {
    authority: Authority,
    config: SvidConfig,
    x509: Arc<X509SvidCache>,
}

// === impl SvidConfig ===

impl Default for SvidConfig {
    fn default() -> Self {
        Self {
            x509_svid_ttl: Duration::from_secs(3600),
            jwt_svid_ttl: Duration::from_secs(300),
        }
    }
}

// === impl SvidIssuer ===

impl SvidIssuer {
    /// An issuer signing through `authority`.
    pub fn new(authority: Authority, config: SvidConfig) -> Self {
        Self {
            authority,
            config,
            x509: Arc::new(X509SvidCache::default()),
        }
    }

    /// The authority behind this issuer.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The entry's current X.509-SVID, issued now if it has none or the one
    /// it has no longer matches the entry.
    pub fn x509_svid(&self, entry: &Arc<RegistrationEntry>) -> Result<Arc<X509Svid>, SvidError> {
        let fresh =
            |svid: &Arc<X509Svid>| !svid.is_stale_for(entry) && svid.not_after > SystemTime::now();
        if let Some(svid) = self.x509.get(&entry.id).filter(fresh) {
            return Ok(svid);
        }
        let _issuing = self.x509.issuing();
        // Another caller may have issued while we waited.
        if let Some(svid) = self.x509.get(&entry.id).filter(fresh) {
            return Ok(svid);
        }
        self.renew_x509(entry)
    }

    /// Issues a new X.509-SVID for `entry` and makes it current.
    fn renew_x509(&self, entry: &Arc<RegistrationEntry>) -> Result<Arc<X509Svid>, SvidError> {
        let svid = Arc::new(x509::issue(
            &self.authority,
            entry,
            self.config.x509_svid_ttl,
            SystemTime::now(),
        )?);
        tracing::info!(
            entry_id = %entry.id,
            spiffe_id = %entry.spiffe_id,
            serial = %svid.serial,
            not_after = %humantime::format_rfc3339_seconds(svid.not_after),
            "issued X.509-SVID"
        );
        self.x509.put(Arc::clone(&svid));
        Ok(svid)
    }

    /// Wakes whenever any cached X.509-SVID is replaced or dropped.
    pub fn subscribe_x509(&self) -> watch::Receiver<u64> {
        self.x509.subscribe()
    }

    /// Every live X.509-SVID this agent holds.
    pub fn x509_svids(&self) -> Vec<Arc<X509Svid>> {
        self.x509.all()
    }

    /// Signs a JWT-SVID for `entry` and `audiences`.
    pub fn jwt_svid(
        &self,
        entry: &RegistrationEntry,
        audiences: &[String],
    ) -> Result<JwtSvid, SvidError> {
        jwt::issue(
            &self.authority,
            entry,
            audiences,
            self.config.jwt_svid_ttl,
            SystemTime::now(),
        )
    }
}

/// When an SVID valid until `not_after`, issued at `now`, should be renewed:
/// half its life, plus or minus 10% of that half, at random. The jitter
/// spreads renewals of SVIDs issued in the same instant.
pub(crate) fn renewal_time(now: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(now).unwrap_or(Duration::ZERO);
    let half = life / 2;
    let mut byte = [0u8; 1];
    // A failed RNG only loses the jitter, never the renewal.
    let r = SystemRandom::new()
        .fill(&mut byte)
        .map_or(128, |()| byte[0]);
    // r in 0..=255 maps to -10%..+10% of half.
    let tenth = half / 10;
    let offset = tenth * 2 * u32::from(r) / 255;
    now + half - tenth + offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_near_half_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for _ in 0..100 {
            let at = renewal_time(now, now + Duration::from_secs(3600));
            let since = at.duration_since(now).unwrap();
            assert!(
                since >= Duration::from_secs(1620) && since <= Duration::from_secs(1980),
                "{since:?}"
            );
        }
    }
}
