//! The fetcher of one federated trust domain's bundle endpoint.
//!
//! It GETs the endpoint, parses the document for the configured trust
//! domain only, and publishes it when it is acceptable; then it waits for
//! the served `spiffe_refresh_hint` (clamped to [`MIN_REFRESH`]–
//! [`MAX_REFRESH`], jittered down by up to a tenth), or after a failure
//! for a backoff from [`MIN_RETRY`] doubling up to the refresh pace.
//!
//! Invariants:
//! - The last good bundle stays in force whatever the endpoint does: a
//!   refused connection, a stall (the whole fetch is under [`FETCH_TIMEOUT`]),
//!   a body over [`MAX_BUNDLE_DOCUMENT_LEN`] (counted while reading), a
//!   document that does not parse, that has no keys, or whose
//!   `spiffe_sequence` is lower than the last good one's. Each failure is
//!   logged and kept in the domain's [`EndpointStatus`] (readiness) until
//!   a fetch succeeds; none stops the agent.
//! - Another trust domain's bundle cannot come in: the document is parsed
//!   as the configured domain's, and an `https_spiffe` endpoint must
//!   present an X.509-SVID naming the configured `endpoint_spiffe_id` (a
//!   member of that domain, checked at config) that chains to that
//!   domain's last good bundle, so a server of another domain fails the
//!   handshake before anything is read.
//!
//! Each fetch is counted (`tether_federated_bundle_fetches_total`, by
//! trust domain and [`FetchError::outcome`]), and the age of the bundle in
//! force is kept for `tether_federated_bundle_age_seconds` while the
//! fetcher runs.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

use super::client::{self, GetError, GetRequest};
use super::config::{EndpointAuth, EndpointSource};
use super::{FederatedBundles, FederationSource};
use crate::bundle::{BundleError, MAX_BUNDLE_DOCUMENT_LEN, TrustBundle};
use crate::error::Chain;
use crate::telemetry::metrics::metrics;

/// The shortest wait between two fetches after a success, whatever the hint.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// The longest wait between two fetches after a success, whatever the hint.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// The wait when the endpoint sent no `spiffe_refresh_hint`.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// The first retry's wait after a failure (then doubled each time).
pub const MIN_RETRY: Duration = Duration::from_secs(2);
/// The whole fetch's deadline: connect, handshake, request and body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the system's CA roots are read from for `https_web` without
/// `bundle_endpoint_ca_path`.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Largest CA file read.
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;
/// The ALPN protocol offered: the bundle endpoint is HTTP/1.1.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a fetch brought no acceptable bundle.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The CA roots for an `https_web` endpoint could not be read.
    #[error("reading the CA roots {path}: {problem}")]
    Roots {
        /// The PEM file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No bundle yet to authenticate an `https_spiffe` endpoint against.
    #[error("no bundle of the trust domain to authenticate the https_spiffe endpoint with")]
    NoBundle,
    /// The GET failed.
    #[error("fetching the bundle")]
    Get(#[source] GetError),
    /// The document is not a usable SPIFFE bundle.
    #[error("the bundle document is refused")]
    Document(#[source] BundleError),
    /// The parsing job was stopped (the agent is stopping).
    #[error("parsing was interrupted")]
    Interrupted,
    /// The document has no X.509 or JWT authority.
    #[error("the bundle document has no keys")]
    NoKeys,
    /// The document's sequence is lower than the last good one's.
    #[error("the bundle's spiffe_sequence {got} is lower than the last accepted {last}")]
    SequenceWentBack {
        /// The document's sequence.
        got: u64,
        /// The last good bundle's.
        last: u64,
    },
}

// === impl FetchError ===

impl FetchError {
    /// The failure's kind, for `tether_federated_bundle_fetches_total`'s
    /// `outcome` label: `ca_roots`, `no_bundle`, `connect`, `tls`, `http`,
    /// `timeout`, `too_large`, `invalid_document`, `sequence_went_back` or
    /// `interrupted`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Roots { .. } => "ca_roots",
            Self::NoBundle => "no_bundle",
            Self::Get(GetError::ServerName { .. } | GetError::Connect { .. }) => "connect",
            Self::Get(GetError::Handshake { .. }) => "tls",
            Self::Get(
                GetError::Http(_) | GetError::Request(_) | GetError::Status(_) | GetError::Body(_),
            ) => "http",
            Self::Get(GetError::Timeout(_)) => "timeout",
            Self::Get(GetError::TooLarge { .. }) => "too_large",
            Self::Document(_) | Self::NoKeys => "invalid_document",
            Self::SequenceWentBack { .. } => "sequence_went_back",
            Self::Interrupted => "interrupted",
        }
    }
}

/// What readiness and the log know of one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointStatus {
    /// The endpoint's URL.
    pub url: String,
    /// When a fetch last succeeded.
    pub last_success: Option<Instant>,
    /// When this endpoint was configured (the bootstrap bundle, if any,
    /// loaded): a bundle never refreshed since is as old as that.
    pub configured: Instant,
    /// Why the last fetch failed (`None`: it succeeded, or none ran yet).
    pub last_error: Option<String>,
}

/// Each endpoint source's status, by trust domain.
pub type Statuses = Arc<Mutex<std::collections::BTreeMap<TrustDomain, EndpointStatus>>>;

/// One trust domain's fetcher.
pub(super) struct Fetcher {
    pub(super) source: FederationSource,
    pub(super) endpoint: EndpointSource,
    /// The sources in force: a fetch that ends after a reload replaced or
    /// dropped this source publishes nothing.
    pub(super) sources: watch::Receiver<Arc<Vec<FederationSource>>>,
    pub(super) bundles: Arc<watch::Sender<Arc<FederatedBundles>>>,
    pub(super) statuses: Statuses,
}

impl Fetcher {
    /// Fetches until `cancel`: at once, then at the served pace.
    pub(super) async fn run(self, cancel: CancellationToken) {
        let td = self.source.trust_domain.to_string();
        let age = metrics().federated_bundle_age(&td);
        // The bundle in force before the first fetch: the one fetched
        // before a reload kept it, or the bootstrap file's, loaded now.
        if self
            .bundles
            .borrow()
            .contains_key(&self.source.trust_domain)
        {
            age.since(
                self.status()
                    .and_then(|s| s.last_success)
                    .unwrap_or_else(Instant::now),
            );
        }
        let mut failures: u32 = 0;
        let mut pace = DEFAULT_REFRESH;
        loop {
            let fetched = self.fetch_once().await;
            metrics().federated_bundle_fetched(
                &td,
                fetched.as_ref().map_or_else(FetchError::outcome, |_| "ok"),
            );
            let wait = match fetched {
                Ok(hint) => {
                    age.since(Instant::now());
                    failures = 0;
                    pace = hint
                        .unwrap_or(DEFAULT_REFRESH)
                        .clamp(MIN_REFRESH, MAX_REFRESH);
                    jittered(pace)
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let text = error_text(&error);
                    let has_bundle = self
                        .bundles
                        .borrow()
                        .contains_key(&self.source.trust_domain);
                    tracing::warn!(
                        trust_domain = %self.source.trust_domain,
                        url = %self.endpoint.url,
                        failures,
                        error = %text,
                        "{}",
                        if has_bundle {
                            "federated bundle endpoint failed; keeping the last good bundle"
                        } else {
                            "federated bundle endpoint failed; no bundle of this trust domain yet"
                        }
                    );
                    self.set_status(|s| s.last_error = Some(text));
                    retry_after(failures, pace)
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One fetch; `Ok` carries the served refresh hint.
    async fn fetch_once(&self) -> Result<Option<Duration>, FetchError> {
        let td = &self.source.trust_domain;
        let last = self.bundles.borrow().get(td).cloned();
        let tls = match &self.endpoint.auth {
            EndpointAuth::Web { ca_path } => {
                let path = ca_path
                    .clone()
                    .unwrap_or_else(|| Path::new(SYSTEM_ROOTS).to_owned());
                let roots = tokio::task::spawn_blocking(move || read_roots(&path))
                    .await
                    .map_err(|e| FetchError::Roots {
                        path: SYSTEM_ROOTS.into(),
                        problem: e.to_string(),
                    })??;
                web_client_config(roots)
            }
            EndpointAuth::Spiffe { spiffe_id } => {
                let bundle = last.clone().ok_or(FetchError::NoBundle)?;
                spiffe_client_config(watch::channel(bundle).1, spiffe_id.clone())
            }
        };
        let body = client::get(GetRequest {
            host: &self.endpoint.host,
            port: self.endpoint.port,
            url: &self.endpoint.url,
            tls,
            max_body: MAX_BUNDLE_DOCUMENT_LEN,
            timeout: FETCH_TIMEOUT,
        })
        .await
        .map_err(FetchError::Get)?;
        let td_for_parse = td.clone();
        let parsed =
            tokio::task::spawn_blocking(move || TrustBundle::from_spiffe_json(td_for_parse, &body))
                .await
                .map_err(|_| FetchError::Interrupted)?;
        let bundle = accept(parsed.map_err(FetchError::Document)?, last.as_deref())?;
        let hint = bundle.refresh_hint();
        self.publish(bundle, last.as_deref());
        self.set_status(|s| {
            s.last_error = None;
            s.last_success = Some(Instant::now());
        });
        Ok(hint)
    }

    pub(super) fn publish(&self, bundle: TrustBundle, last: Option<&TrustBundle>) {
        let td = self.source.trust_domain.clone();
        if let Some(last) = last
            && last.same_keys(&bundle)
            && last.sequence() == bundle.sequence()
        {
            return;
        }
        let (sequence, x509, jwt) = (
            bundle.sequence(),
            bundle.x509_authorities().len(),
            bundle.jwt_authorities().len(),
        );
        let bundle = Arc::new(bundle);
        // Checked under the bundles' lock: a reload puts its sources in
        // force before its bundles, so a fetch that ends after it cannot
        // bring back a domain it dropped or an endpoint it replaced.
        let published = self.bundles.send_if_modified(|all| {
            if !self.in_force() {
                return false;
            }
            let mut next = FederatedBundles::clone(all);
            next.insert(td.clone(), bundle);
            *all = Arc::new(next);
            true
        });
        if published {
            tracing::info!(
                trust_domain = %td,
                url = %self.endpoint.url,
                sequence,
                x509_authorities = x509,
                jwt_authorities = jwt,
                "federated bundle updated from its endpoint"
            );
        } else {
            tracing::debug!(trust_domain = %td, url = %self.endpoint.url, "a fetch ended after a reload replaced its source; its bundle is dropped");
        }
    }

    /// Whether this fetcher's source is still configured as it was.
    fn in_force(&self) -> bool {
        self.sources.borrow().contains(&self.source)
    }

    fn status(&self) -> Option<EndpointStatus> {
        let statuses = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        statuses.get(&self.source.trust_domain).cloned()
    }

    fn set_status(&self, change: impl FnOnce(&mut EndpointStatus)) {
        if !self.in_force() {
            return;
        }
        let mut statuses = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(status) = statuses.get_mut(&self.source.trust_domain) {
            change(status);
        }
    }
}

/// The checks past parsing: keys present, the sequence not going back.
pub(super) fn accept(
    bundle: TrustBundle,
    last: Option<&TrustBundle>,
) -> Result<TrustBundle, FetchError> {
    if bundle.x509_authorities().is_empty() && bundle.jwt_authorities().is_empty() {
        return Err(FetchError::NoKeys);
    }
    if let Some(last) = last
        && bundle.sequence() < last.sequence()
    {
        return Err(FetchError::SequenceWentBack {
            got: bundle.sequence(),
            last: last.sequence(),
        });
    }
    Ok(bundle)
}

/// Most characters of a failure kept for the log and readiness.
const MAX_ERROR_TEXT: usize = 512;

/// A failure as the log and readiness say it, at most [`MAX_ERROR_TEXT`]
/// characters: parse errors quote what the endpoint sent (a `kid`, a
/// string where a list belongs), and a hostile endpoint must not put a
/// megabyte in every warning and every `/readyz` answer.
pub(super) fn error_text(error: &FetchError) -> String {
    let text = Chain(error).to_string();
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((end, _)) => format!("{}… ({} bytes in all)", &text[..end], text.len()),
        None => text,
    }
}

/// The wait before the retry after `failures` failures in a row: from
/// [`MIN_RETRY`], doubling, never beyond the success pace.
pub(super) fn retry_after(failures: u32, pace: Duration) -> Duration {
    let doubled = MIN_RETRY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(pace).max(MIN_RETRY)
}

/// `pace` less up to a tenth, at random, so peers do not fetch in step.
fn jittered(pace: Duration) -> Duration {
    use ::aws_lc_rs::rand::SecureRandom as _;
    let mut byte = [0u8; 1];
    let fraction = match ::aws_lc_rs::rand::SystemRandom::new().fill(&mut byte) {
        Ok(()) => f64::from(byte[0]) / 255.0,
        Err(_) => 0.5,
    };
    pace.mul_f64(1.0 - fraction / 10.0)
}

/// The PEM `CERTIFICATE` blocks of `path`, as TLS roots.
fn read_roots(path: &Path) -> Result<RootCertStore, FetchError> {
    use std::io::Read as _;
    let problem = |problem: String| FetchError::Roots {
        path: path.display().to_string(),
        problem,
    };
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CA_FILE).read_to_end(&mut text))
        .map_err(|e| problem(e.to_string()))?;
    let blocks = pem::parse_many(&text).map_err(|e| problem(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
        // A system bundle may hold a certificate webpki cannot use: skip it
        // rather than lose every other root.
        if let Err(error) = roots.add(CertificateDer::from(block.contents().to_vec())) {
            tracing::debug!(path = %path.display(), %error, "CA certificate skipped");
        }
    }
    if roots.is_empty() {
        return Err(problem("no usable CERTIFICATE block".into()));
    }
    Ok(roots)
}

/// Web PKI: the server's certificate chains to `roots` and names the host.
fn web_client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    // Every version the provider and rustls' build offer (TLS 1.3 here).
    let builder =
        match ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
            Ok(builder) => builder,
            Err(_) => ClientConfig::builder(),
        };
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Arc::new(config)
}

/// SPIFFE authentication: the server's SVID chains to `bundle` and names
/// `spiffe_id` (the fleet's verifier, speaking HTTP/1.1 instead of h2).
fn spiffe_client_config(
    bundle: watch::Receiver<Arc<TrustBundle>>,
    spiffe_id: spiffe::SpiffeId,
) -> Arc<ClientConfig> {
    let mut config =
        ClientConfig::clone(&crate::mtls::client_config(bundle, spiffe_id, None, false));
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Arc::new(config)
}
