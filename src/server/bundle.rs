//! The fleet's bundle: every replica's CAs and JWT keys in one.
//!
//! Each replica signs with its own keys (its `LocalAuthority`), so an SVID
//! or a token from replica 1 must validate wherever replica 2's bundle is
//! served. [`FleetAuthority`] is the server's `Authority`: it signs with
//! the replica's own authority and publishes the union of the bundles
//! every replica keeps in the store (`ServerStore::publish_bundle`).
//! [`FleetAuthority::run`] publishes this replica's bundle whenever it
//! changes and reads the others' every [`POLL`].
//!
//! A replica's keys stay in the union after it stops: what it signed
//! stays valid until it expires, and a replica that comes back under the
//! same id replaces its row. A replica's own keys are in the union as soon
//! as its authority publishes them (before they sign, as
//! `LocalAuthority` guarantees), and in the other replicas' within a poll.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::store::ServerStore;
use crate::authority::key_store::{self, KeyStoreError};
use crate::authority::{
    Authority, AuthorityError, CrlRequest, JwtRequest, SignedJwt, SignedX509Svid, X509SvidRequest,
};
use crate::bundle::TrustBundle;
use crate::error::Chain;

/// How often the other replicas' bundles are read.
pub const POLL: Duration = Duration::from_secs(1);
/// How often an unchanged bundle is written again.
const REPUBLISH: Duration = Duration::from_secs(60);

/// The server's authority: this replica's signatures, the fleet's bundle.
#[derive(Debug, Clone)]
pub struct FleetAuthority {
    own: Arc<dyn Authority>,
    replica: String,
    store: Arc<dyn ServerStore>,
    union: Arc<watch::Sender<Arc<TrustBundle>>>,
    /// What this replica last wrote to the store, and when: a write only
    /// when its bundle changed, or every [`REPUBLISH`] (the row back if
    /// someone removed it), not at every poll.
    published: Arc<std::sync::Mutex<Option<(String, tokio::time::Instant)>>>,
}

impl FleetAuthority {
    /// Signs with `own`, as replica `replica`, sharing bundles through
    /// `store`. The union starts as `own`'s bundle.
    pub fn new(own: Arc<dyn Authority>, replica: String, store: Arc<dyn ServerStore>) -> Self {
        let union = Arc::new(watch::channel(own.bundle()).0);
        Self {
            own,
            replica,
            store,
            union,
            published: Arc::default(),
        }
    }

    /// Publishes this replica's bundle and takes in the others', once.
    pub async fn refresh(&self) -> Result<(), super::store::ServerStoreError> {
        let own = self.own.bundle();
        if let Ok(json) = own.to_spiffe_json() {
            let now = tokio::time::Instant::now();
            let due = match &*self.published_lock() {
                Some((last, at)) => *last != json || now.duration_since(*at) >= REPUBLISH,
                None => true,
            };
            if due {
                self.store
                    .publish_bundle(self.replica.clone(), json.clone(), SystemTime::now())
                    .await?;
                *self.published_lock() = Some((json, now));
            }
        }
        let others = self.store.bundles().await?;
        let mut parts = vec![own];
        for (replica, json) in others {
            if replica == self.replica {
                continue;
            }
            match TrustBundle::from_spiffe_json(self.own.trust_domain().clone(), json.as_bytes()) {
                Ok(bundle) => parts.push(Arc::new(bundle)),
                Err(error) => {
                    tracing::warn!(replica, error = %Chain(&error), "a replica's bundle in the store does not parse; left out");
                }
            }
        }
        let next = union_of(self.own.trust_domain(), &parts);
        self.union.send_if_modified(|current| {
            if current.same_keys(&next) {
                return false;
            }
            let sequence = current.sequence() + 1;
            *current = Arc::new(next.with_sequence(sequence));
            true
        });
        Ok(())
    }

    fn published_lock(&self) -> std::sync::MutexGuard<'_, Option<(String, tokio::time::Instant)>> {
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the union current until `cancel`: at every change of this
    /// replica's keys, and every [`POLL`].
    pub async fn run(self, cancel: CancellationToken) {
        let mut own = self.own.subscribe_bundle();
        loop {
            if let Err(error) = self.refresh().await {
                tracing::warn!(error = %Chain(&error), "could not share the bundle through the store; serving the last union");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = own.changed() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// One bundle of every part's authorities, each once.
fn union_of(trust_domain: &TrustDomain, parts: &[Arc<TrustBundle>]) -> TrustBundle {
    let mut seen_x509 = BTreeSet::new();
    let mut seen_kids = BTreeSet::new();
    let mut x509 = Vec::new();
    let mut jwt = Vec::new();
    for part in parts {
        for der in part.x509_authorities() {
            if seen_x509.insert(der.clone()) {
                x509.push(der.clone());
            }
        }
        for key in part.jwt_authorities() {
            if seen_kids.insert(key.kid().to_owned()) {
                jwt.push(key.clone());
            }
        }
    }
    TrustBundle::new(trust_domain.clone(), x509, jwt, 0)
}

impl Authority for FleetAuthority {
    fn trust_domain(&self) -> &TrustDomain {
        self.own.trust_domain()
    }

    /// The server's `[oidc] issuer`: every replica is configured with the
    /// same one (the fleet has one issuer).
    fn issuer(&self) -> Option<String> {
        self.own.issuer()
    }

    fn sign_x509_svid(
        &self,
        request: X509SvidRequest,
    ) -> BoxFuture<'_, Result<SignedX509Svid, AuthorityError>> {
        self.own.sign_x509_svid(request)
    }

    fn sign_jwt(&self, request: JwtRequest) -> BoxFuture<'_, Result<SignedJwt, AuthorityError>> {
        self.own.sign_jwt(request)
    }

    fn sign_crl(
        &self,
        request: CrlRequest,
    ) -> BoxFuture<'_, Result<Option<Vec<u8>>, AuthorityError>> {
        self.own.sign_crl(request)
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        self.union.borrow().clone()
    }

    fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.union.subscribe()
    }

    fn issued_here(&self, cert_der: &[u8]) -> bool {
        self.own.issued_here(cert_der)
    }

    fn is_own_jwt_key(&self, kid: &str) -> bool {
        self.own.is_own_jwt_key(kid)
    }

    fn problems(&self) -> Vec<String> {
        self.own.problems()
    }
}

/// This replica's id: `data_dir/replica-id`, made once (128 random bits),
/// so a restarted replica replaces its own bundle row.
pub fn replica_id(data_dir: &Path) -> Result<String, KeyStoreError> {
    let path = data_dir.join("replica-id");
    if let Some(bytes) = key_store::read_public(&path)?
        && let Ok(id) = String::from_utf8(bytes)
        && !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Ok(id);
    }
    let id = crate::authority::random_id().map_err(|_| KeyStoreError::Io {
        path: path.clone(),
        source: std::io::Error::other("the system random number generator failed"),
    })?;
    key_store::write_public(&path, id.as_bytes())?;
    Ok(id)
}
