//! SVIDs: issuing X.509-SVIDs and JWT-SVIDs for registration entries, keeping
//! the current X.509-SVID of each entry, rotating it, and validating JWT-SVIDs.
//!
//! [`SvidIssuer`] is the handle the edges use. X.509-SVIDs are issued on
//! demand the first time a caller needs one (never after a polling delay)
//! and then renewed by the rotation loop at about half their life, with
//! jitter so SVIDs issued together do not all renew together. JWT-SVIDs are
//! signed on request and served again from [`jwt_cache`] while more than
//! half their life remains.
//!
//! Issuance never blocks the async workers and never waits behind another
//! key: key generation and signing run on the blocking pool, and requests
//! for the same SVID share one issuance ([`flights`]) while other SVIDs
//! are issued alongside.
//!
//! Invariant: every SVID is signed by a key that is already in the
//! published bundle, and never outlives that key (the authority caps it).

pub mod cache;
pub mod flights;
pub mod holders;
pub mod jwt;
pub mod jwt_cache;
pub mod revocation;
pub mod rotation;
pub mod verified;
pub mod x509;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::attestation::{Caller, ProcessKey};
use crate::audit::{AuditEvent, AuditLog, AuditUnavailable, EventKind, Outcome};
use crate::authority::{Authority, AuthorityError};
use crate::registration::Match;
use crate::store::{IssuedX509, Store, StoreError};
pub use cache::{Interest, SvidKey, SvidWatch, X509SvidCache};
use flights::{Flights, Issued};
pub use holders::{Holder, HolderHandle, Holders};
pub use jwt::{JwtSvid, JwtValidationError, ValidatedJwt};
pub use jwt_cache::JwtSvidCache;
pub use revocation::RevocationInbox;
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
    #[error("generating the SVID key failed")]
    KeyGeneration(#[source] rcgen::Error),
    /// The blocking job generating the key and signing ended without an
    /// answer (it panicked, or the runtime is shutting down).
    #[error("the signing job ended without an answer")]
    SigningJob(#[source] tokio::task::JoinError),
    /// The issuance could not be recorded: nothing is issued unaudited.
    #[error("not issuing: the issuance could not be audited")]
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
    authority: Arc<dyn Authority>,
    config: SvidConfig,
    x509: Arc<X509SvidCache>,
    jwt: Arc<JwtSvidCache>,
    flights: Arc<Flights>,
    holders: Arc<Holders>,
    store: Store,
    records: mpsc::Sender<IssuedX509>,
    revocations: Arc<Revocations>,
    audit: AuditLog,
}

/// What [`SvidIssuer::new`] hands the composition root for the issuer's
/// loops: each inbox is moved into its loop.
#[derive(Debug)]
pub struct SvidInboxes {
    /// For [`SvidIssuer::run_recorder`].
    pub records: RecordInbox,
    /// For [`SvidIssuer::run_revocations`].
    pub revocations: RevocationInbox,
}

/// A JWT-SVID for a caller, and whether it was signed for this request
/// or served from the cache (the edge's audit record says which).
#[derive(Debug, Clone)]
pub struct ServedJwt {
    /// The token.
    pub svid: JwtSvid,
    /// True when it was signed for an earlier request and served again.
    pub from_cache: bool,
}

/// Issuance records waiting for the recorder.
#[derive(Debug)]
pub struct RecordInbox(mpsc::Receiver<IssuedX509>);

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
    /// `store`, and the inboxes of the two loops it needs
    /// ([`Self::run_recorder`], [`Self::run_revocations`]): each loop takes
    /// its inbox, so it can only run once.
    pub fn new(
        authority: Arc<dyn Authority>,
        config: SvidConfig,
        store: Store,
        audit: AuditLog,
    ) -> (Self, SvidInboxes) {
        let (records, recorder) = mpsc::channel(RECORD_QUEUE);
        let (revocations, watches) = Revocations::new();
        let issuer = Self {
            authority,
            config,
            x509: Arc::new(X509SvidCache::default()),
            jwt: Arc::default(),
            flights: Arc::default(),
            holders: Arc::default(),
            store,
            records,
            revocations: Arc::new(revocations),
            audit,
        };
        let inboxes = SvidInboxes {
            records: RecordInbox(recorder),
            revocations: watches,
        };
        (issuer, inboxes)
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
    pub async fn run_recorder(self, inbox: RecordInbox, cancel: CancellationToken) {
        let RecordInbox(mut records) = inbox;
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = prune.tick() => {
                    let store = self.store.clone();
                    let before = SystemTime::now() - RECORD_RETENTION;
                    match tokio::task::spawn_blocking(move || store.prune_x509(before)).await {
                        Ok(Ok(pruned)) if pruned > 0 => tracing::debug!(pruned, "pruned expired issuance records"),
                        Ok(Err(error)) => tracing::warn!(error = %crate::error::Chain(&error), "could not prune issuance records"),
                        _ => {}
                    }
                }
                Some(record) = records.recv() => {
                    let store = self.store.clone();
                    let serial = record.serial.clone();
                    match tokio::task::spawn_blocking(move || store.record_x509_issued(&record)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::warn!(%serial, error = %crate::error::Chain(&error), "could not record an issued X.509-SVID"),
                        Err(error) => tracing::warn!(%serial, error = %crate::error::Chain(&error), "issuance recorder job failed"),
                    }
                }
            }
        }
    }

    /// The authority behind this issuer.
    pub fn authority(&self) -> &Arc<dyn Authority> {
        &self.authority
    }

    /// The current X.509-SVID for a matched identity, issued now if there
    /// is none or the one there no longer matches the entry. The caller is
    /// about to hand it out, so it counts as in use. For a process-bound
    /// entry the SVID is `caller`'s own, revoked when it exits.
    ///
    /// Requests for the same SVID while it is being issued share that
    /// issuance, and its error if it fails (nothing failed is cached: the
    /// next request tries again).
    pub async fn x509_svid(&self, matched: &Match, caller: &Caller) -> Issued {
        let process = matched.entry.process_bound.then(|| caller.key());
        let svid = self.current_or_issue(matched, process, caller).await?;
        if let Some(process) = process {
            self.revocations.watch(process, caller);
        }
        svid.mark_served();
        Ok(svid)
    }

    async fn current_or_issue(
        &self,
        matched: &Match,
        process: Option<ProcessKey>,
        caller: &Caller,
    ) -> Issued {
        let entry = &matched.entry;
        let key = (entry.id.clone(), matched.spiffe_id.clone(), process);
        let fresh =
            |svid: &Arc<X509Svid>| !svid.is_stale_for(entry) && svid.not_after > SystemTime::now();
        if let Some(svid) = self.x509.get(&key).filter(fresh) {
            return Ok(svid);
        }
        // A flight joined was started for the entry as its first caller
        // saw it; if the entry changed since, one more flight issues for
        // this caller's view. Two at most: entries change rarely, and the
        // stream re-issues on the entry change anyway.
        let mut svid = self.issue_once(matched, &key, Some(caller), fresh).await?;
        if !fresh(&svid) {
            svid = self.issue_once(matched, &key, Some(caller), fresh).await?;
        }
        Ok(svid)
    }

    /// The flight for `key`: joined if one is in the air, else the cached
    /// SVID if `usable`, else a new issuance for `matched`, `by` the caller
    /// (`None`: the rotation loop).
    async fn issue_once(
        &self,
        matched: &Match,
        key: &SvidKey,
        by: Option<&Caller>,
        usable: impl Fn(&Arc<X509Svid>) -> bool,
    ) -> Issued {
        let current = || self.x509.get(key).filter(|svid| usable(svid));
        let issue = || self.clone().issue_x509(matched.clone(), key.2, by.cloned());
        self.flights.issue_once(key, current, issue).await
    }

    /// Renews `due` (the rotation loop): a new X.509-SVID for `matched`
    /// made current, unless another request replaced `due` already (that
    /// replacement is the renewal) or is replacing it (its flight is
    /// joined).
    pub(crate) async fn renew_x509(&self, matched: &Match, due: &Arc<X509Svid>) -> Issued {
        let replaced = |current: &Arc<X509Svid>| !Arc::ptr_eq(current, due);
        self.issue_once(matched, &due.key(), None, replaced).await
    }

    /// Issues a new X.509-SVID for a matched identity (and process) and
    /// makes it current. The key pair and the signature are made on the
    /// blocking pool; the audit record is made before the SVID is cached,
    /// so nothing leaves unaudited.
    async fn issue_x509(
        self,
        matched: Match,
        process: Option<ProcessKey>,
        by: Option<Caller>,
    ) -> Result<Arc<X509Svid>, SvidError> {
        let entry = &matched.entry;
        let svid = Arc::new(
            x509::issue(
                self.authority.as_ref(),
                entry,
                &matched.spiffe_id,
                process,
                self.config.x509_svid_ttl,
            )
            .await?,
        );
        tracing::info!(
            entry_id = %entry.id,
            spiffe_id = %svid.spiffe_id,
            serial = %svid.serial,
            pid = process.map(ProcessKey::pid),
            not_after = %humantime::format_rfc3339_seconds(svid.not_after),
            "issued X.509-SVID"
        );
        // Recorded before it is handed out: nothing leaves unaudited.
        self.audit.record(AuditEvent {
            spiffe_id: Some(svid.spiffe_id.to_string()),
            pid: by.as_ref().map(Caller::pid),
            uid: by.as_ref().map(Caller::uid),
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
            ..AuditEvent::new(EventKind::IssueX509, Outcome::Allow)
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

    /// A JWT-SVID for a matched identity and `audiences`: the cached one
    /// while more than half its life remains, else one signed now (and
    /// cached). The caller has already been matched to `matched` and
    /// allowed by policy; the cache never decides who gets a token.
    pub async fn jwt_svid(
        &self,
        matched: &Match,
        audiences: &[String],
    ) -> Result<ServedJwt, SvidError> {
        self.jwt_svid_at(matched, audiences, SystemTime::now())
            .await
    }

    /// [`Self::jwt_svid`] at `now` (the unit tests' clock).
    async fn jwt_svid_at(
        &self,
        matched: &Match,
        audiences: &[String],
        now: SystemTime,
    ) -> Result<ServedJwt, SvidError> {
        let bundle = self.authority.bundle();
        let cached = self
            .jwt
            .get(&matched.entry, &matched.spiffe_id, audiences, now, |kid| {
                bundle.jwt_authority(kid).is_some()
            });
        if let Some(svid) = cached {
            return Ok(ServedJwt {
                svid,
                from_cache: true,
            });
        }
        let svid = jwt::issue(
            self.authority.as_ref(),
            &matched.entry,
            &matched.spiffe_id,
            audiences,
            self.config.jwt_svid_ttl,
            now,
        )
        .await?;
        self.jwt.put(&matched.entry, audiences, svid.clone(), now);
        Ok(ServedJwt {
            svid,
            from_cache: false,
        })
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
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use futures_util::FutureExt as _;
    use futures_util::future::BoxFuture;
    use spiffe::{SpiffeId, TrustDomain};

    use super::*;
    use crate::audit::{AuditConfig, AuditWriter, SigningKey};
    use crate::authority::{AuthorityConfig, LocalAuthority};
    use crate::registration::{EntrySpec, RegistrationEntry};

    /// An issuer over a fresh authority, store and audit trail, and this
    /// test process as the caller.
    struct Fixture {
        _dir: tempfile::TempDir,
        audit_dir: PathBuf,
        issuer: SvidIssuer,
        audit: AuditLog,
        writer: Option<AuditWriter>,
        cancel: CancellationToken,
        caller: Caller,
        _peer: tokio::net::UnixStream,
    }

    impl Fixture {
        /// The audit writer runs unless `queue` is given: then records are
        /// written but not synced, `queue` at most, until [`Self::start_writer`].
        fn new(queue: Option<usize>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let td = TrustDomain::new("example.org").unwrap();
            let authority = LocalAuthority::load_or_create(
                td,
                AuthorityConfig::default(),
                &dir.path().join("keys"),
            )
            .unwrap();
            let data = dir.path().join("data");
            std::fs::create_dir(&data).unwrap();
            let store = Store::open(&data).unwrap();
            let audit_dir = dir.path().join("audit");
            let config = AuditConfig {
                flush_interval: Duration::from_millis(5),
                queue: queue.unwrap_or(AuditConfig::default().queue),
                ..AuditConfig::default()
            };
            let key = Arc::new(SigningKey::generate().unwrap().0);
            let (audit, writer) = AuditLog::open(&audit_dir, &config, key).unwrap();
            let (issuer, _inboxes) = SvidIssuer::new(
                Arc::new(authority),
                SvidConfig::default(),
                store,
                audit.clone(),
            );
            let (ours, peer) = tokio::net::UnixStream::pair().unwrap();
            let mut fixture = Self {
                _dir: dir,
                audit_dir,
                issuer,
                audit,
                writer: Some(writer),
                cancel: CancellationToken::new(),
                caller: Caller::from_stream(&ours).unwrap(),
                _peer: peer,
            };
            if queue.is_none() {
                fixture.start_writer();
            }
            fixture
        }

        fn start_writer(&mut self) {
            if let Some(writer) = self.writer.take() {
                tokio::spawn(writer.run(self.cancel.clone()));
            }
        }

        /// The serials of the X.509 issuance records written so far.
        async fn issued(&self) -> Vec<String> {
            self.audit.written().await.unwrap();
            let mut lines = Vec::new();
            for file in std::fs::read_dir(&self.audit_dir).unwrap() {
                let path = file.unwrap().path();
                if path.extension().is_some_and(|e| e == "jsonl") {
                    let text = std::fs::read_to_string(path).unwrap();
                    lines.extend(text.lines().map(str::to_owned));
                }
            }
            lines
                .iter()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|record| record.to_string().contains("issue-x509"))
                .filter_map(|record| find_str(&record, "token_id"))
                .collect()
        }

        /// An X.509-SVID request for `m` by this process, polled once: it
        /// has joined or started its flight, which stays in the air until
        /// a waiter polls it again. Landed only if the signing job ended
        /// before that one poll looked (this thread preempted meanwhile).
        fn start<'a>(&'a self, m: &'a Match) -> Started<'a> {
            let mut request = self.issuer.x509_svid(m, &self.caller).boxed();
            match (&mut request).now_or_never() {
                None => Started::InFlight(request),
                Some(issued) => Started::Landed(issued),
            }
        }
    }

    enum Started<'a> {
        InFlight(BoxFuture<'a, Issued>),
        Landed(Issued),
    }

    impl Started<'_> {
        fn is_in_flight(&self) -> bool {
            matches!(self, Started::InFlight(_))
        }

        async fn outcome(self) -> Issued {
            match self {
                Started::InFlight(request) => request.await,
                Started::Landed(issued) => issued,
            }
        }
    }

    /// Every request's outcome.
    async fn outcomes(requests: Vec<Started<'_>>) -> Vec<Issued> {
        futures_util::future::join_all(requests.into_iter().map(Started::outcome)).await
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    /// The string `field` anywhere in `value`.
    fn find_str(value: &serde_json::Value, field: &str) -> Option<String> {
        match value {
            serde_json::Value::Object(map) => map
                .get(field)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .or_else(|| map.values().find_map(|v| find_str(v, field))),
            _ => None,
        }
    }

    /// A match for the entry `spiffe://example.org/<name>`.
    fn matched(name: &str, process_bound: bool) -> Match {
        let td = TrustDomain::new("example.org").unwrap();
        let spiffe_id = format!("spiffe://example.org/{name}");
        let entry = RegistrationEntry::from_config(
            &EntrySpec {
                spiffe_id: spiffe_id.clone(),
                selectors: vec!["unix:uid:1".into()],
                process_bound,
                ..EntrySpec::default()
            },
            &td,
            &BTreeSet::new(),
        )
        .unwrap();
        Match {
            entry: Arc::new(entry),
            spiffe_id: SpiffeId::new(&spiffe_id).unwrap(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storm_for_one_svid_issues_it_once_and_everyone_gets_it() {
        let f = Fixture::new(None);
        let m = matched("bound", true);
        // Each request is in before the first issuance could end (unless
        // the signing outruns them): they find the one flight.
        let storm: Vec<_> = (0..32).map(|_| f.start(&m)).collect();
        assert!(f.issuer.flights.len() <= 1);
        let svids: Vec<_> = outcomes(storm)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        for svid in &svids {
            assert!(
                Arc::ptr_eq(svid, &svids[0]),
                "every request got the one SVID"
            );
        }
        assert_eq!(f.issued().await, [svids[0].serial.clone()]);
        assert!(f.issuer.flights.is_empty(), "the flight landed");
        // Cached now: a later request issues nothing.
        let again = f.issuer.x509_svid(&m, &f.caller).await.unwrap();
        assert!(Arc::ptr_eq(&again, &svids[0]));
        assert_eq!(f.issued().await.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn different_svids_are_issued_side_by_side() {
        let f = Fixture::new(None);
        let ms: Vec<_> = (0..8).map(|i| matched(&format!("svc-{i}"), true)).collect();
        // All eight in flight at once: none waits for another to start.
        let started: Vec<_> = ms.iter().map(|m| f.start(m)).collect();
        let in_flight = started.iter().filter(|s| s.is_in_flight()).count();
        assert!(in_flight > 0, "every signing outran its own first poll");
        assert_eq!(f.issuer.flights.len(), in_flight);
        // One more, issued start to end while those are in the air (their
        // waiters are not polled, so none of them can land).
        let other = matched("other", false);
        let alone = f.issuer.x509_svid(&other, &f.caller).await.unwrap();
        assert_eq!(f.issuer.flights.len(), in_flight, "still in flight");

        let svids: Vec<_> = outcomes(started)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut serials: BTreeSet<String> = svids.iter().map(|s| s.serial.clone()).collect();
        serials.insert(alone.serial.clone());
        assert_eq!(serials.len(), ms.len() + 1, "each got its own SVID");
        for (svid, m) in svids.iter().zip(&ms) {
            assert_eq!(svid.spiffe_id, m.spiffe_id);
        }
        let recorded: BTreeSet<String> = f.issued().await.into_iter().collect();
        assert_eq!(recorded, serials, "one record each");
        assert!(f.issuer.flights.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_issuance_fails_every_waiter_and_the_next_request_retries() {
        // The audit queue holds one unsynced record and nobody syncs it
        // yet: once full, issuance fails closed.
        let mut f = Fixture::new(Some(1));
        f.audit
            .record(AuditEvent::new(EventKind::IssueJwt, Outcome::Allow))
            .unwrap();
        let m = matched("bound", true);
        let storm: Vec<_> = (0..8).map(|_| f.start(&m)).collect();
        let together = storm.iter().all(Started::is_in_flight);
        let errors: Vec<_> = outcomes(storm)
            .await
            .into_iter()
            .map(Result::unwrap_err)
            .collect();
        for error in &errors {
            assert!(matches!(**error, SvidError::Audit(_)), "{error}");
            if together {
                assert!(Arc::ptr_eq(error, &errors[0]), "one issuance, one error");
            }
        }
        assert!(f.issuer.flights.is_empty(), "a failed flight lands too");
        assert!(f.issuer.x509_svids().is_empty(), "nothing failed is cached");

        // The trail drains (the writer syncs what waits): the next request
        // issues.
        f.start_writer();
        f.audit.flush().await;
        assert!(f.issued().await.is_empty());
        let svid = f.issuer.x509_svid(&m, &f.caller).await.unwrap();
        assert_eq!(f.issued().await, std::slice::from_ref(&svid.serial));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_left_unfinished_by_all_its_waiters_leaves_no_flight() {
        let f = Fixture::new(None);
        let m = matched("bound", true);
        drop(f.start(&m));
        assert!(f.issuer.flights.is_empty(), "abandoned flights are removed");
        let svid = f.issuer.x509_svid(&m, &f.caller).await.unwrap();
        assert_eq!(f.issued().await, std::slice::from_ref(&svid.serial));
    }

    #[tokio::test]
    async fn a_jwt_svid_is_served_from_the_cache_until_half_its_life() {
        let f = Fixture::new(None);
        let m = matched("web", false);
        let aud = vec!["api".to_owned()];
        let first = f.issuer.jwt_svid(&m, &aud).await.unwrap();
        assert!(!first.from_cache);
        let again = f.issuer.jwt_svid(&m, &aud).await.unwrap();
        assert!(again.from_cache);
        assert_eq!(again.svid.token, first.svid.token, "no second signature");
        assert_eq!(again.svid.jti, first.svid.jti);
        // Another audience is another token.
        let other = f.issuer.jwt_svid(&m, &["db".to_owned()]).await.unwrap();
        assert!(!other.from_cache);
        assert_ne!(other.svid.jti, first.svid.jti);

        // Past half its life (of the default 5 minutes), it is signed anew.
        let half = SystemTime::now() + f.issuer.jwt_svid_ttl() / 2 + Duration::from_secs(1);
        let later = f.issuer.jwt_svid_at(&m, &aud, half).await.unwrap();
        assert!(!later.from_cache);
        assert_ne!(later.svid.jti, first.svid.jti);
    }

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
