//! X.509-SVID issuance: a fresh P-256 key per SVID, signed by the active CA,
//! exactly one URI SAN (the SPIFFE ID), the entry's DNS names.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use spiffe::SpiffeId;
use zeroize::Zeroizing;

use super::SvidError;
use super::cache::SvidKey;
use crate::attestation::ProcessKey;
use crate::authority::{Authority, X509SvidRequest};
use crate::registration::{EntryId, RegistrationEntry};

/// An X.509-SVID with its private key.
pub struct X509Svid {
    /// The entry it was issued for.
    pub entry_id: EntryId,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates; DER.
    pub chain: Vec<Vec<u8>>,
    key: Zeroizing<Vec<u8>>,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// When the rotation loop replaces it (about half its life, jittered).
    pub renew_at: SystemTime,
    /// The CA that signed it (for its CRL).
    pub ca_id: String,
    /// The process it belongs to, for process-bound entries.
    pub process: Option<ProcessKey>,
    /// What the entry said when this SVID was issued; a different entry
    /// revision means the SVID must be re-issued.
    pub(crate) issued_for: Arc<RegistrationEntry>,
    /// Set when the SVID is handed to a caller. One never handed out by its
    /// renewal time, whose predecessor was not either, is dropped instead of
    /// renewed (a template entry can resolve to many IDs; only those in use
    /// are kept fresh).
    served: AtomicBool,
    /// Set on a renewal of an SVID that was handed out: its holders are
    /// still there even if none has taken the renewal yet (a stream busy
    /// sending, a loaded agent), so it is renewed once more regardless.
    predecessor_served: AtomicBool,
}

// === impl X509Svid ===

impl X509Svid {
    /// The private key, PKCS#8 DER, unencrypted (the Workload API form).
    pub fn key_pkcs8(&self) -> &[u8] {
        &self.key
    }

    /// The chain as concatenated DER (the Workload API form).
    pub fn chain_der(&self) -> Vec<u8> {
        self.chain.concat()
    }

    /// True when the entry changed in a way the certificate reflects.
    pub(crate) fn is_stale_for(&self, entry: &RegistrationEntry) -> bool {
        let was = &self.issued_for;
        was.spiffe_id != entry.spiffe_id
            || was.dns_names != entry.dns_names
            || was.x509_svid_ttl != entry.x509_svid_ttl
            || was.process_bound != entry.process_bound
    }

    /// The cache key of this SVID.
    pub fn key(&self) -> SvidKey {
        (self.entry_id.clone(), self.spiffe_id.clone(), self.process)
    }

    /// Marks the SVID as handed to a caller.
    pub fn mark_served(&self) {
        self.served.store(true, Ordering::Relaxed);
    }

    /// Records that this SVID replaces `old` (the rotation loop).
    pub(crate) fn succeed(&self, old: &Self) {
        self.predecessor_served
            .store(old.was_served(), Ordering::Relaxed);
    }

    /// True when it, or the SVID it replaced, was handed to a caller: the
    /// rotation loop renews it rather than letting it go.
    pub(crate) fn is_wanted(&self) -> bool {
        self.was_served() || self.predecessor_served.load(Ordering::Relaxed)
    }

    /// True once handed to a caller.
    pub(crate) fn was_served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish_non_exhaustive()
    }
}

/// Issues an X.509-SVID with `spiffe_id` (the entry's ID for the caller)
/// for `entry`: a fresh P-256 key and a CSR for it, made on the blocking
/// pool, signed by `authority`. The key never leaves this agent.
pub async fn issue(
    authority: &dyn Authority,
    entry: &Arc<RegistrationEntry>,
    spiffe_id: &SpiffeId,
    process: Option<ProcessKey>,
    default_ttl: Duration,
) -> Result<X509Svid, SvidError> {
    let (key, csr) = tokio::task::spawn_blocking(crate::authority::key_and_csr)
        .await
        .map_err(SvidError::SigningJob)?
        .map_err(SvidError::KeyGeneration)?;
    let signed = authority
        .sign_x509_svid(X509SvidRequest {
            csr,
            spiffe_id: spiffe_id.clone(),
            dns_names: entry.dns_names.clone(),
            ttl: entry.x509_svid_ttl.unwrap_or(default_ttl),
        })
        .await?;
    let serial = signed.serial_hex();
    let renew_at = super::renewal_time(SystemTime::now(), signed.not_after);
    Ok(X509Svid {
        entry_id: entry.id.clone(),
        spiffe_id: spiffe_id.clone(),
        chain: signed.chain,
        key,
        serial,
        not_before: signed.not_before,
        not_after: signed.not_after,
        renew_at,
        ca_id: signed.ca_id,
        process,
        issued_for: Arc::clone(entry),
        served: AtomicBool::new(false),
        predecessor_served: AtomicBool::new(false),
    })
}
