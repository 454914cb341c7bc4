//! Federation: the trust bundles of foreign trust domains, read from files
//! or fetched from their SPIFFE bundle endpoints, and this trust domain's
//! own bundle served to them ([`endpoint`]).
//!
//! Each `[[federation]]` names a trust domain and where its SPIFFE bundle
//! document comes from:
//! - a file on disk (as mounted from a ConfigMap, say), read at start (a
//!   missing or invalid file stops the start) and then polled: a changed
//!   file that parses replaces the bundle and wakes every subscriber; one
//!   that does not is logged and the previous bundle stays in force;
//! - a bundle endpoint ([`fetch`]): `https_web` (no bundle until the first
//!   fetch succeeds) or `https_spiffe` (the file is the bootstrap bundle,
//!   and every fetch is authenticated against the last good bundle). A
//!   failing endpoint never stops the start or the agent: its problem is
//!   in [`Federation::problems`] (readiness) until a fetch succeeds.
//!
//! Invariant: a federated bundle only ever comes from its configured source
//! and is parsed as its configured trust domain's; nothing a workload sends
//! can add or change one.

pub mod client;
pub mod config;
pub mod endpoint;
pub mod fetch;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bundle::{BundleError, MAX_BUNDLE_DOCUMENT_LEN, TrustBundle};
pub use config::{
    BundleEndpoint, BundleEndpointConfig, EndpointAuth, EndpointProfile, EndpointSource,
    EndpointTls, FederationConfig, FederationSource, SettingProblem,
};
use fetch::{EndpointStatus, Fetcher, Statuses};

/// The bundles of every federated trust domain.
pub type FederatedBundles = BTreeMap<TrustDomain, Arc<TrustBundle>>;

/// Why a federated bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The file could not be read.
    #[error("federation {trust_domain}: reading {path}")]
    Read {
        /// The foreign trust domain.
        trust_domain: String,
        /// The bundle file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a usable SPIFFE bundle.
    #[error("federation {trust_domain}: {path}")]
    Parse {
        /// The foreign trust domain.
        trust_domain: String,
        /// The bundle file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: BundleError,
    },
}

/// Federated bundles and the sources they come from.
#[derive(Debug, Clone)]
pub struct Federation {
    sources: Arc<watch::Sender<Arc<Vec<FederationSource>>>>,
    bundles: Arc<watch::Sender<Arc<FederatedBundles>>>,
    statuses: Statuses,
}

struct Watched {
    source: FederationSource,
    path: PathBuf,
    last: Vec<u8>,
}

/// The polling tick when no file source is configured.
const IDLE_TICK: Duration = Duration::from_secs(5);
/// A bundle fetched longer ago than this is stale (a readiness problem
/// even without a failure on record).
const STALE_AFTER: Duration = Duration::from_secs(3 * 3600);

/// Federation sources whose bundles have been read, not yet in force
/// ([`Federation::prepare`]).
#[derive(Debug)]
pub struct PreparedFederation {
    sources: Vec<FederationSource>,
    bundles: FederatedBundles,
}

impl PreparedFederation {
    /// The trust domains these sources federate with.
    pub fn trust_domains(&self) -> BTreeSet<TrustDomain> {
        self.sources
            .iter()
            .map(|s| s.trust_domain.clone())
            .collect()
    }
}

// === impl Federation ===

impl Federation {
    /// Reads every source's bundle file (an endpoint's bootstrap bundle
    /// included). Any unreadable or invalid file is an error: an agent that
    /// cannot trust what it was told to trust should not start. An
    /// endpoint is not contacted here: [`Self::run`] fetches.
    pub fn load(sources: Vec<FederationSource>) -> Result<Self, FederationError> {
        let bundles = load_all(&sources, &[], &FederatedBundles::new())?;
        let statuses = Arc::new(Mutex::new(BTreeMap::new()));
        reset_statuses(&statuses, &sources);
        Ok(Self {
            sources: Arc::new(watch::channel(Arc::new(sources)).0),
            bundles: Arc::new(watch::channel(Arc::new(bundles)).0),
            statuses,
        })
    }

    /// Reads every new source's bundle file for a config reload without
    /// putting anything in force: every file must read and parse. A
    /// source whose endpoint is unchanged keeps the bundle it fetched.
    /// [`Self::apply`] puts the result in force.
    pub fn prepare(
        &self,
        sources: Vec<FederationSource>,
    ) -> Result<PreparedFederation, FederationError> {
        let previous = self.sources.borrow().clone();
        let current = self.current();
        let bundles = load_all(&sources, &previous, &current)?;
        Ok(PreparedFederation { sources, bundles })
    }

    /// Puts prepared sources and their bundles in force.
    pub fn apply(&self, prepared: PreparedFederation) {
        reset_statuses(&self.statuses, &prepared.sources);
        // The sources first: a fetch or a file read that ends from here on
        // sees them and publishes nothing for a source they dropped or
        // changed (it checks under the bundles' lock), and one that ended
        // before is overwritten by the bundles below.
        self.sources.send_replace(Arc::new(prepared.sources));
        self.bundles.send_replace(Arc::new(prepared.bundles));
    }

    /// The trust domains configured now.
    pub fn trust_domains(&self) -> BTreeSet<TrustDomain> {
        self.sources
            .borrow()
            .iter()
            .map(|s| s.trust_domain.clone())
            .collect()
    }

    /// The federated bundles as they are now.
    pub fn current(&self) -> Arc<FederatedBundles> {
        self.bundles.borrow().clone()
    }

    /// Wakes whenever a federated bundle changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<FederatedBundles>> {
        self.bundles.subscribe()
    }

    /// What is wrong with the bundle endpoints now (empty: nothing), for
    /// readiness: a domain with no bundle yet, the last fetch's failure
    /// (the last good bundle is kept meanwhile), a bundle gone stale.
    pub fn problems(&self) -> Vec<String> {
        let bundles = self.current();
        let statuses = self
            .statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut problems = Vec::new();
        for (td, status) in statuses {
            let has_bundle = bundles.contains_key(&td);
            match (&status.last_error, has_bundle) {
                (Some(error), false) => problems.push(format!(
                    "federation {td}: no bundle yet; the bundle endpoint {} failed: {error}",
                    status.url
                )),
                (None, false) => problems.push(format!(
                    "federation {td}: no bundle yet from the bundle endpoint {}",
                    status.url
                )),
                // The last good bundle is in force: a failing endpoint is
                // logged and counted, and becomes a readiness problem only
                // once that bundle is stale (a peer's outage must not take
                // every agent that federates with it out of service).
                (last_error, true) => {
                    let at = status.last_success.unwrap_or(status.configured);
                    if at.elapsed() > STALE_AFTER {
                        let since =
                            humantime::format_duration(Duration::from_secs(at.elapsed().as_secs()));
                        problems.push(match last_error {
                            Some(error) => format!(
                                "federation {td}: the bundle from {} is stale (fetched {since} ago); the last fetch failed: {error}",
                                status.url
                            ),
                            None => format!(
                                "federation {td}: the bundle from {} is stale (fetched {since} ago)",
                                status.url
                            ),
                        });
                    }
                }
            }
        }
        problems
    }

    /// Polls the bundle files and runs one fetcher per bundle endpoint
    /// until `cancel`, following source changes.
    pub async fn run(self, cancel: CancellationToken) {
        let mut sources = self.sources.subscribe();
        loop {
            let current = sources.borrow_and_update().clone();
            // Dropped (every fetcher aborted) when the sources change.
            let mut fetchers = JoinSet::new();
            let fetchers_stop = cancel.child_token();
            let _stop_fetchers = fetchers_stop.clone().drop_guard();
            let mut watched = Vec::new();
            for source in current.iter() {
                match (&source.endpoint, &source.bundle_path) {
                    (Some(endpoint), _) => {
                        let fetcher = Fetcher {
                            source: source.clone(),
                            endpoint: endpoint.clone(),
                            sources: self.sources.subscribe(),
                            bundles: Arc::clone(&self.bundles),
                            statuses: Arc::clone(&self.statuses),
                        };
                        fetchers.spawn(fetcher.run(fetchers_stop.clone()));
                    }
                    (None, Some(path)) => watched.push(Watched {
                        source: source.clone(),
                        path: path.clone(),
                        last: read(&source.trust_domain, path).unwrap_or_default(),
                    }),
                    (None, None) => {}
                }
            }
            let tick = watched
                .iter()
                .map(|w| w.source.refresh_interval)
                .min()
                .unwrap_or(IDLE_TICK);
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    changed = sources.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    Some(_) = fetchers.join_next() => {}
                    _ = interval.tick() => {}
                }
                for w in &mut watched {
                    self.refresh(w).await;
                }
            }
        }
    }

    async fn refresh(&self, watched: &mut Watched) {
        let (td, path) = (watched.source.trust_domain.clone(), watched.path.clone());
        let read_result = tokio::task::spawn_blocking(move || read(&td, &path)).await;
        let bytes = match read_result {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(error)) => {
                tracing::warn!(trust_domain = %watched.source.trust_domain, error = %crate::error::Chain(&error), "federated bundle unreadable; keeping the previous one");
                return;
            }
            Err(_) => return,
        };
        if bytes == watched.last {
            return;
        }
        watched.last.clone_from(&bytes);
        match parse(&watched.source.trust_domain, &watched.path, &bytes) {
            Ok(bundle) => {
                tracing::info!(
                    trust_domain = %watched.source.trust_domain,
                    x509_authorities = bundle.x509_authorities().len(),
                    jwt_authorities = bundle.jwt_authorities().len(),
                    "federated bundle updated"
                );
                let td = watched.source.trust_domain.clone();
                // A reload may have dropped or changed this source
                // meanwhile: checked under the bundles' lock ([`Self::apply`]).
                self.bundles.send_if_modified(|all| {
                    if !self.sources.borrow().contains(&watched.source) {
                        return false;
                    }
                    let mut next = FederatedBundles::clone(all);
                    next.insert(td, Arc::new(bundle));
                    *all = Arc::new(next);
                    true
                });
            }
            Err(error) => {
                tracing::warn!(trust_domain = %watched.source.trust_domain, error = %crate::error::Chain(&error), "federated bundle invalid; keeping the previous one");
            }
        }
    }
}

/// One status per endpoint source, kept across a reload when its source
/// did not change, fresh otherwise.
fn reset_statuses(statuses: &Statuses, sources: &[FederationSource]) {
    let mut statuses = statuses.lock().unwrap_or_else(PoisonError::into_inner);
    let mut next = BTreeMap::new();
    for source in sources {
        if let Some(endpoint) = &source.endpoint {
            let url = endpoint.url.to_string();
            let status = match statuses.remove(&source.trust_domain) {
                Some(old) if old.url == url => old,
                _ => EndpointStatus {
                    url,
                    last_success: None,
                    last_error: None,
                    configured: std::time::Instant::now(),
                },
            };
            next.insert(source.trust_domain.clone(), status);
        }
    }
    *statuses = next;
}

/// Every source's bundle: a file source's file, an endpoint source's
/// current bundle when its endpoint did not change (else its bootstrap
/// file, or none for `https_web` until the first fetch).
fn load_all(
    sources: &[FederationSource],
    previous: &[FederationSource],
    current: &FederatedBundles,
) -> Result<FederatedBundles, FederationError> {
    let mut bundles = FederatedBundles::new();
    for source in sources {
        let td = &source.trust_domain;
        let file = match &source.bundle_path {
            Some(path) => {
                let bytes = read(td, path)?;
                Some(parse(td, path, &bytes)?)
            }
            None => None,
        };
        let unchanged_endpoint = source.endpoint.is_some()
            && previous
                .iter()
                .any(|p| p.trust_domain == *td && p.endpoint == source.endpoint);
        let kept = unchanged_endpoint
            .then(|| current.get(td).cloned())
            .flatten();
        match (kept, file) {
            (Some(kept), _) => {
                bundles.insert(td.clone(), kept);
            }
            (None, Some(file)) => {
                bundles.insert(td.clone(), Arc::new(file));
            }
            (None, None) => {}
        }
    }
    Ok(bundles)
}

fn read(trust_domain: &TrustDomain, path: &Path) -> Result<Vec<u8>, FederationError> {
    read_bounded(path).map_err(|e| FederationError::Read {
        trust_domain: trust_domain.to_string(),
        path: path.to_owned(),
        source: e,
    })
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    // One byte over the limit is enough for the parser to say "too large".
    file.take(MAX_BUNDLE_DOCUMENT_LEN as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn parse(
    trust_domain: &TrustDomain,
    path: &Path,
    bytes: &[u8],
) -> Result<TrustBundle, FederationError> {
    TrustBundle::from_spiffe_json(trust_domain.clone(), bytes).map_err(|e| FederationError::Parse {
        trust_domain: trust_domain.to_string(),
        path: path.to_owned(),
        source: e,
    })
}

#[cfg(test)]
mod tests;
