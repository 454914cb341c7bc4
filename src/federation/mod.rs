//! Federation: the trust bundles of foreign trust domains, read from files.
//!
//! Each `[[federation]]` names a trust domain and a SPIFFE bundle document
//! on disk (as mounted from a ConfigMap, say). The files are read at start
//! (a missing or invalid file stops the start) and then polled: a changed
//! file that parses replaces the bundle and wakes every subscriber; one that
//! does not is logged and the previous bundle stays in force.
//!
//! Invariant: a federated bundle only ever comes from its configured file;
//! nothing a workload sends can add or change one.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bundle::{BundleError, MAX_BUNDLE_DOCUMENT_LEN, TrustBundle};

/// The bundles of every federated trust domain.
pub type FederatedBundles = BTreeMap<TrustDomain, Arc<TrustBundle>>;

/// A `[[federation]]` section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The foreign trust domain (`example-federated.org`).
    pub trust_domain: String,
    /// Its SPIFFE bundle document (JWK Set form).
    pub bundle_path: PathBuf,
    /// How often the file is checked for changes.
    #[serde(default = "default_refresh_interval", with = "humantime_serde")]
    pub refresh_interval: Duration,
}

/// A validated federation source.
#[derive(Debug, Clone)]
pub struct FederationSource {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Where its bundle is read from.
    pub bundle_path: PathBuf,
    /// How often the file is checked.
    pub refresh_interval: Duration,
}

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

/// Federated bundles and the sources they are read from.
#[derive(Debug, Clone)]
pub struct Federation {
    sources: Arc<watch::Sender<Arc<Vec<FederationSource>>>>,
    bundles: Arc<watch::Sender<Arc<FederatedBundles>>>,
}

struct Watched {
    source: FederationSource,
    last: Vec<u8>,
}

fn default_refresh_interval() -> Duration {
    Duration::from_secs(5)
}

/// Federation sources whose bundles have been read, not yet in force
/// ([`Federation::prepare`]).
#[derive(Debug)]
pub struct PreparedFederation {
    sources: Vec<FederationSource>,
    bundles: FederatedBundles,
}

impl PreparedFederation {
    /// The trust domains these sources federate with.
    pub fn trust_domains(&self) -> std::collections::BTreeSet<TrustDomain> {
        self.sources
            .iter()
            .map(|s| s.trust_domain.clone())
            .collect()
    }
}

// === impl Federation ===

impl Federation {
    /// Reads every source's bundle. Any unreadable or invalid file is an
    /// error: an agent that cannot trust what it was told to trust should
    /// not start.
    pub fn load(sources: Vec<FederationSource>) -> Result<Self, FederationError> {
        let bundles = load_all(&sources)?;
        Ok(Self {
            sources: Arc::new(watch::channel(Arc::new(sources)).0),
            bundles: Arc::new(watch::channel(Arc::new(bundles)).0),
        })
    }

    /// Reads every new source's bundle for a config reload without
    /// putting anything in force: every file must read and parse.
    /// [`Self::apply`] puts the result in force.
    pub fn prepare(
        &self,
        sources: Vec<FederationSource>,
    ) -> Result<PreparedFederation, FederationError> {
        let bundles = load_all(&sources)?;
        Ok(PreparedFederation { sources, bundles })
    }

    /// Puts prepared sources and their bundles in force.
    pub fn apply(&self, prepared: PreparedFederation) {
        self.bundles.send_replace(Arc::new(prepared.bundles));
        self.sources.send_replace(Arc::new(prepared.sources));
    }

    /// The trust domains configured now.
    pub fn trust_domains(&self) -> std::collections::BTreeSet<TrustDomain> {
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

    /// Polls the bundle files until `cancel`, following source changes.
    pub async fn run(self, cancel: CancellationToken) {
        let mut sources = self.sources.subscribe();
        loop {
            let current = sources.borrow_and_update().clone();
            let mut watched: Vec<Watched> = current
                .iter()
                .map(|source| Watched {
                    source: source.clone(),
                    last: read(source).unwrap_or_default(),
                })
                .collect();
            let tick = current
                .iter()
                .map(|s| s.refresh_interval)
                .min()
                .unwrap_or_else(default_refresh_interval);
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
                    _ = interval.tick() => {}
                }
                for w in &mut watched {
                    self.refresh(w).await;
                }
            }
        }
    }

    async fn refresh(&self, watched: &mut Watched) {
        let source = watched.source.clone();
        let read_result = tokio::task::spawn_blocking(move || read(&source)).await;
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
        match parse(&watched.source, &bytes) {
            Ok(bundle) => {
                tracing::info!(
                    trust_domain = %watched.source.trust_domain,
                    x509_authorities = bundle.x509_authorities().len(),
                    jwt_authorities = bundle.jwt_authorities().len(),
                    "federated bundle updated"
                );
                let td = watched.source.trust_domain.clone();
                // A reload may have dropped this domain meanwhile.
                if !self.sources.borrow().iter().any(|s| s.trust_domain == td) {
                    return;
                }
                self.bundles.send_modify(|all| {
                    let mut next = FederatedBundles::clone(all);
                    next.insert(td, Arc::new(bundle));
                    *all = Arc::new(next);
                });
            }
            Err(error) => {
                tracing::warn!(trust_domain = %watched.source.trust_domain, error = %crate::error::Chain(&error), "federated bundle invalid; keeping the previous one");
            }
        }
    }
}

fn load_all(sources: &[FederationSource]) -> Result<FederatedBundles, FederationError> {
    let mut bundles = FederatedBundles::new();
    for source in sources {
        let bytes = read(source)?;
        bundles.insert(
            source.trust_domain.clone(),
            Arc::new(parse(source, &bytes)?),
        );
    }
    Ok(bundles)
}

fn read(source: &FederationSource) -> Result<Vec<u8>, FederationError> {
    read_bounded(&source.bundle_path).map_err(|e| FederationError::Read {
        trust_domain: source.trust_domain.to_string(),
        path: source.bundle_path.clone(),
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

fn parse(source: &FederationSource, bytes: &[u8]) -> Result<TrustBundle, FederationError> {
    TrustBundle::from_spiffe_json(source.trust_domain.clone(), bytes).map_err(|e| {
        FederationError::Parse {
            trust_domain: source.trust_domain.to_string(),
            path: source.bundle_path.clone(),
            source: e,
        }
    })
}
