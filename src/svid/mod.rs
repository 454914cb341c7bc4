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
pub mod holders;
pub mod jwt;
pub mod revocation;
pub mod rotation;
pub mod x509;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::attestation::Caller;
use crate::audit::{AuditEvent, AuditLog, AuditUnavailable, Decision as AuditDecision, EventKind};
use crate::authority::{Authority, AuthorityError};
use crate::registration::Match;
use crate::store::{IssuedX509, Store, StoreError};
pub use cache::{Interest, ProcessKey, SvidWatch, X509SvidCache};
pub use holders::{Holder, HolderHandle, Holders};
pub use jwt::{JwtSvid, JwtValidationError, ValidatedJwt};
use revocation::Revocations;
pub use x509::X509Svid;

/// Default SVID lifetimes (the top-level `x509_svid_ttl` and `jwt_svid_ttl`).
#[derive(Debug, Clone, PartialEq, Eq, Copy)]
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
    /// The issuance could not be recorded: nothing is issued unaudited.
    #[error("not issuing: {0}")]
    Audit(#[from] AuditUnavailable),
}

/// How many issuance records may wait for the recorder before new ones are
/// dropped (records are for operators; issuance never waits on them).
const RECORD_QUEUE: usize = 1024;
/// How long issuance records are kept after the SVID expired.
const RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often expired records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Issues and caches SVIDs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SvidIssuer {
    authority: Authority,
    config: SvidConfig,
    x509: Arc<X509SvidCache>,
    holders: Arc<Holders>,
    store: Store,
    records: mpsc::Sender<IssuedX509>,
    recorder: Arc<Mutex<Option<mpsc::Receiver<IssuedX509>>>>,
    revocations: Arc<Revocations>,
    audit: AuditLog,
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
    /// An issuer signing through `authority`, recording X.509 issuance in
    /// `store`.
    pub fn new(authority: Authority, config: SvidConfig, store: Store, audit: AuditLog) -> Self {
        let (records, recorder) = mpsc::channel(RECORD_QUEUE);
        Self {
            authority,
            config,
            x509: Arc::new(X509SvidCache::default()),
            holders: Arc::default(),
            store,
            records,
            recorder: Arc::new(Mutex::new(Some(recorder))),
            revocations: Arc::default(),
            audit,
        }
    }

    /// Registers a process holding X.509-SVIDs through a stream.
    pub fn hold(&self, holder: Holder) -> HolderHandle {
        self.holders.register(holder)
    }

    /// Every process holding X.509-SVIDs through an open stream.
    pub fn holders(&self) -> Vec<Holder> {
        self.holders.all()
    }

    /// X.509-SVIDs issued and not yet expired, from the store (so including
    /// those issued before a restart). Blocking.
    pub fn issued_live(&self) -> Result<Vec<IssuedX509>, StoreError> {
        self.store.live_x509(SystemTime::now())
    }

    fn record(&self, svid: &X509Svid) {
        let record = IssuedX509 {
            serial: svid.serial.clone(),
            entry_id: svid.entry_id.as_str().to_owned(),
            spiffe_id: svid.spiffe_id.to_string(),
            not_before: svid.not_before,
            not_after: svid.not_after,
            issued_at: SystemTime::now(),
        };
        if self.records.try_send(record).is_err() {
            tracing::debug!(serial = %svid.serial, "issuance record dropped: the recorder is behind");
        }
    }

    /// The recorder loop: writes issuance records to the store, off the
    /// request path, and prunes old ones.
    pub async fn run_recorder(self, cancel: CancellationToken) {
        let taken = self
            .recorder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut records) = taken else {
            return;
        };
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = prune.tick() => {
                    let store = self.store.clone();
                    let before = SystemTime::now() - RECORD_RETENTION;
                    match tokio::task::spawn_blocking(move || store.prune_x509(before)).await {
                        Ok(Ok(pruned)) if pruned > 0 => tracing::debug!(pruned, "pruned expired issuance records"),
                        Ok(Err(error)) => tracing::warn!(%error, "could not prune issuance records"),
                        _ => {}
                    }
                }
                Some(record) = records.recv() => {
                    let store = self.store.clone();
                    let serial = record.serial.clone();
                    match tokio::task::spawn_blocking(move || store.record_x509_issued(&record)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::warn!(%serial, %error, "could not record an issued X.509-SVID"),
                        Err(error) => tracing::warn!(%serial, %error, "issuance recorder job failed"),
                    }
                }
            }
        }
    }

    /// The authority behind this issuer.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The current X.509-SVID for a matched identity, issued now if there
    /// is none or the one there no longer matches the entry. The caller is
    /// about to hand it out, so it counts as in use. For a process-bound
    /// entry the SVID is `caller`'s own, revoked when it exits.
    pub fn x509_svid(&self, matched: &Match, caller: &Caller) -> Result<Arc<X509Svid>, SvidError> {
        let process = matched.entry.process_bound.then(|| caller.key());
        let svid = self.current_or_issue(matched, process, caller)?;
        if let Some(process) = process {
            self.revocations.watch(process, caller);
        }
        svid.mark_served();
        Ok(svid)
    }

    fn current_or_issue(
        &self,
        matched: &Match,
        process: Option<ProcessKey>,
        caller: &Caller,
    ) -> Result<Arc<X509Svid>, SvidError> {
        let entry = &matched.entry;
        let key = (entry.id.clone(), matched.spiffe_id.clone(), process);
        let fresh =
            |svid: &Arc<X509Svid>| !svid.is_stale_for(entry) && svid.not_after > SystemTime::now();
        if let Some(svid) = self.x509.get(&key).filter(fresh) {
            return Ok(svid);
        }
        let _issuing = self.x509.issuing();
        // Another caller may have issued while we waited.
        if let Some(svid) = self.x509.get(&key).filter(fresh) {
            return Ok(svid);
        }
        self.renew_x509(matched, process, Some(caller))
    }

    /// Issues a new X.509-SVID for a matched identity (and process) and
    /// makes it current.
    pub(crate) fn renew_x509(
        &self,
        matched: &Match,
        process: Option<ProcessKey>,
        by: Option<&Caller>,
    ) -> Result<Arc<X509Svid>, SvidError> {
        let entry = &matched.entry;
        let svid = Arc::new(x509::issue(
            &self.authority,
            entry,
            &matched.spiffe_id,
            process,
            self.config.x509_svid_ttl,
            SystemTime::now(),
        )?);
        tracing::info!(
            entry_id = %entry.id,
            spiffe_id = %svid.spiffe_id,
            serial = %svid.serial,
            pid = process.map(|(pid, _)| pid),
            not_after = %humantime::format_rfc3339_seconds(svid.not_after),
            "issued X.509-SVID"
        );
        // Recorded before it is handed out: nothing leaves unaudited.
        self.audit.record(AuditEvent {
            spiffe_id: Some(svid.spiffe_id.to_string()),
            pid: by.map(Caller::pid),
            uid: by.map(Caller::uid),
            entry_id: Some(entry.id.to_string()),
            token_id: Some(svid.serial.clone()),
            reason: Some(
                if by.is_some() {
                    "issued on demand"
                } else {
                    "renewed"
                }
                .into(),
            ),
            ..AuditEvent::new(EventKind::IssueX509, AuditDecision::Allow)
        })?;
        crate::telemetry::metrics().x509_svids_issued.inc();
        self.record(&svid);
        self.x509.put(Arc::clone(&svid));
        Ok(svid)
    }

    /// The CRLs in force (DER), one per CA with revoked, unexpired SVIDs.
    pub fn crls(&self) -> Arc<Vec<Vec<u8>>> {
        self.revocations.crls()
    }

    /// Wakes when a cached X.509-SVID `interest` names is replaced or
    /// dropped (or, when it names them, the CRLs change).
    pub fn subscribe_x509(&self, interest: Interest) -> SvidWatch {
        self.x509.subscribe(interest)
    }

    /// Every live X.509-SVID this agent holds.
    pub fn x509_svids(&self) -> Vec<Arc<X509Svid>> {
        self.x509.all()
    }

    /// The default JWT-SVID lifetime.
    pub fn jwt_svid_ttl(&self) -> Duration {
        self.config.jwt_svid_ttl
    }

    /// Signs a JWT-SVID for a matched identity and `audiences`.
    pub fn jwt_svid(&self, matched: &Match, audiences: &[String]) -> Result<JwtSvid, SvidError> {
        jwt::issue(
            &self.authority,
            &matched.entry,
            &matched.spiffe_id,
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
