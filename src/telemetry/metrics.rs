//! The agent's metrics: one process-wide set, recorded where things happen
//! and read by `/metrics` in the Prometheus (OpenMetrics) text format.
//!
//! Process-wide rather than passed around: a counter is a fact about the
//! process, every layer records into it, and this module (a leaf) imports
//! nothing from the crate. Label values are closed sets chosen by the code
//! (never request data), so the number of series stays bounded; the one
//! open label, `trust_domain`, takes only the trust domains the operator
//! configured as federation sources.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

/// A label with one value from a closed set.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The kind.
    pub kind: &'static str,
}

/// Why a task ended (`completed`, `owner exited`, `expired`, ...).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason, as the task records it.
    pub reason: &'static str,
}

/// Which validation, and its outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Validation {
    /// `jwt_svid` (ValidateJWTSVID) or `task_token` (ValidateTaskToken).
    pub api: &'static str,
    /// `valid` or `invalid`.
    pub result: &'static str,
}

/// A federated trust domain (one configured as a federation source).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FederatedDomain {
    /// The trust domain's name.
    pub trust_domain: String,
}

/// One fetch of a federated trust domain's bundle endpoint, and how it
/// came out.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleFetch {
    /// The trust domain's name.
    pub trust_domain: String,
    /// `ok`, or which kind of failure (a closed set chosen by the
    /// fetcher).
    pub outcome: &'static str,
}

/// Every metric the agent exposes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// X.509-SVIDs signed.
    pub x509_svids_issued: Counter,
    /// JWT-SVIDs signed (task tokens not included).
    pub jwt_svids_issued: Counter,
    /// Task tokens signed, by `kind`: `begin`, `renew`, `exchange`.
    pub task_tokens_issued: Family<Kind, Counter>,
    /// Tasks running now.
    pub tasks_active: Gauge,
    /// Tasks ended, by reason.
    pub tasks_ended: Family<Reason, Counter>,
    /// Token validations, by API and outcome.
    pub validations: Family<Validation, Counter>,
    /// Requests a policy denied, by action.
    pub policy_denials: Family<Kind, Counter>,
    /// Revocations, by `kind`: `task` (an operator's), `x509` (a
    /// process-bound SVID whose process exited).
    pub revocations: Family<Kind, Counter>,
    /// Time to attest a caller (unix and, for a pod, the kubelet lookup).
    pub attestation_seconds: Histogram,
    /// Failed requests to the kubelet.
    pub kubelet_errors: Counter,
    /// Fleet mode: seconds since the server's last heartbeat on the sync stream
    /// (updated every second; -1 before it ever was). Past
    /// `server.revocation_staleness`, other nodes' task tokens are refused.
    pub server_sync_age_seconds: Gauge<f64, AtomicU64>,
    /// Fleet mode: other nodes' ended tasks this agent refuses.
    pub foreign_task_ends: Gauge,
    /// Seconds since each endpoint-fetched federated bundle in force was
    /// fetched (or loaded, for a bootstrap bundle not yet replaced): set
    /// from [`Self::federated_bundle_age`]'s guards whenever the metrics
    /// are encoded, so it is exact at every scrape.
    federated_bundle_age_seconds: Family<FederatedDomain, Gauge<f64, AtomicU64>>,
    /// When each federated bundle in force was fetched or loaded, with
    /// the generation of the guard that set it.
    federated_bundle_since: Mutex<BTreeMap<String, (u64, Option<Instant>)>>,
    /// Fetches of federated bundle endpoints, by trust domain and outcome.
    pub federated_bundle_fetches: Family<BundleFetch, Counter>,
}

/// The series of one federated trust domain's bundle age while its fetcher
/// runs: dropping it (the fetcher stopped, its source removed or changed)
/// removes the series, unless a newer fetcher of the domain took it over.
#[derive(Debug)]
#[must_use = "the age series lives as long as the guard"]
pub struct FederatedBundleAge {
    trust_domain: String,
    generation: u64,
}

/// Generations of [`FederatedBundleAge`] guards.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(0);

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// A new metric of its default kind, registered under `name`.
fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("tether");
        Self {
            x509_svids_issued: registered(&mut registry, "x509_svids_issued", "X.509-SVIDs signed"),
            jwt_svids_issued: registered(
                &mut registry,
                "jwt_svids_issued",
                "JWT-SVIDs signed (task tokens not included)",
            ),
            task_tokens_issued: registered(
                &mut registry,
                "task_tokens_issued",
                "Task tokens signed, by kind (begin, renew, exchange)",
            ),
            tasks_active: registered(&mut registry, "tasks_active", "Tasks running now"),
            tasks_ended: registered(&mut registry, "tasks_ended", "Tasks ended, by reason"),
            validations: registered(
                &mut registry,
                "validations",
                "Token validations, by API and result",
            ),
            policy_denials: registered(
                &mut registry,
                "policy_denials",
                "Requests denied by policy, by action",
            ),
            revocations: registered(
                &mut registry,
                "revocations",
                "Revocations, by kind (task, x509)",
            ),
            attestation_seconds: {
                // 100 µs to ~26 s: /proc reads are sub-millisecond, a cold
                // executable hash or a kubelet lookup with retries is not.
                let histogram = Histogram::new((0..19).map(|i| 0.0001 * 2f64.powi(i)));
                registry.register(
                    "attestation_seconds",
                    "Time to attest a caller",
                    histogram.clone(),
                );
                histogram
            },
            kubelet_errors: registered(
                &mut registry,
                "kubelet_errors",
                "Failed requests to the kubelet",
            ),
            server_sync_age_seconds: registered(
                &mut registry,
                "server_sync_age_seconds",
                "Fleet mode: seconds since the tether server's last heartbeat on the sync stream (-1: never)",
            ),
            foreign_task_ends: registered(
                &mut registry,
                "foreign_task_ends",
                "Fleet mode: other nodes' ended tasks this agent refuses",
            ),
            federated_bundle_age_seconds: registered(
                &mut registry,
                "federated_bundle_age_seconds",
                "Seconds since the federated bundle in force was fetched from its endpoint (or loaded, before a first fetch)",
            ),
            federated_bundle_since: Mutex::new(BTreeMap::new()),
            federated_bundle_fetches: registered(
                &mut registry,
                "federated_bundle_fetches",
                "Fetches of federated bundle endpoints, by trust domain and outcome",
            ),
            registry,
        }
    }

    /// Records one attestation's duration.
    pub fn observe_attestation(&self, took: Duration) {
        self.attestation_seconds.observe(took.as_secs_f64());
    }

    /// Counts one validation.
    pub fn validated(&self, api: &'static str, valid: bool) {
        self.validations
            .get_or_create(&Validation {
                api,
                result: if valid { "valid" } else { "invalid" },
            })
            .inc();
    }

    /// Counts one fetch of `trust_domain`'s bundle endpoint with
    /// `outcome` (`ok` or a failure kind from a closed set).
    pub fn federated_bundle_fetched(&self, trust_domain: &str, outcome: &'static str) {
        self.federated_bundle_fetches
            .get_or_create(&BundleFetch {
                trust_domain: trust_domain.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Takes over `trust_domain`'s bundle age series for a fetcher
    /// starting now; the series shows once [`FederatedBundleAge::since`]
    /// says when its bundle in force came.
    pub fn federated_bundle_age(&self, trust_domain: &str) -> FederatedBundleAge {
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        lock(&self.federated_bundle_since).insert(trust_domain.to_owned(), (generation, None));
        FederatedBundleAge {
            trust_domain: trust_domain.to_owned(),
            generation,
        }
    }

    /// Everything, in the OpenMetrics text format (which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        {
            // Held through the encoding: two scrapes at once do not see
            // each other's half-set ages.
            let since = lock(&self.federated_bundle_since);
            self.federated_bundle_age_seconds.clear();
            for (trust_domain, (_, at)) in since.iter() {
                if let Some(at) = at {
                    self.federated_bundle_age_seconds
                        .get_or_create(&FederatedDomain {
                            trust_domain: trust_domain.clone(),
                        })
                        .set(at.elapsed().as_secs_f64());
                }
            }
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        }
        out
    }
}

// === impl FederatedBundleAge ===

impl FederatedBundleAge {
    /// The bundle in force came at `at` (fetched, or loaded from its
    /// bootstrap file).
    pub fn since(&self, at: Instant) {
        if let Some(entry) = lock(&metrics().federated_bundle_since).get_mut(&self.trust_domain)
            && entry.0 == self.generation
        {
            entry.1 = Some(at);
        }
    }
}

impl Drop for FederatedBundleAge {
    fn drop(&mut self) {
        let mut since = lock(&metrics().federated_bundle_since);
        if since
            .get(&self.trust_domain)
            .is_some_and(|(generation, _)| *generation == self.generation)
        {
            since.remove(&self.trust_domain);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::metrics;

    /// The value of the series starting with `prefix` in the encoded text.
    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn federated_bundle_ages_follow_their_fetchers() {
        let age = r#"tether_federated_bundle_age_seconds{trust_domain="age.test"}"#;
        let first = metrics().federated_bundle_age("age.test");
        // No bundle in force yet: no series.
        assert_eq!(value(&metrics().encode(), age), None);
        first.since(Instant::now() - Duration::from_secs(100));
        let seen = value(&metrics().encode(), age).expect("the age series");
        assert!(seen >= 100.0, "{seen}");

        // A newer fetcher of the domain takes the series over: the older
        // one neither sets it nor, dropped, removes it.
        let second = metrics().federated_bundle_age("age.test");
        second.since(Instant::now() - Duration::from_secs(10));
        first.since(Instant::now() - Duration::from_secs(1000));
        drop(first);
        let seen = value(&metrics().encode(), age).expect("the age series");
        assert!((10.0..1000.0).contains(&seen), "{seen}");
        // The last fetcher gone (the domain unconfigured): no series.
        drop(second);
        assert_eq!(value(&metrics().encode(), age), None);

        metrics().federated_bundle_fetched("age.test", "ok");
        metrics().federated_bundle_fetched("age.test", "ok");
        metrics().federated_bundle_fetched("age.test", "connect");
        let text = metrics().encode();
        assert_eq!(
            value(
                &text,
                r#"tether_federated_bundle_fetches_total{trust_domain="age.test",outcome="ok"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                r#"tether_federated_bundle_fetches_total{trust_domain="age.test",outcome="connect"}"#
            ),
            Some(1.0)
        );
    }
}
