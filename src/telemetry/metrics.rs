//! The agent's metrics: one process-wide set, recorded where things happen
//! and read by `/metrics` in the Prometheus (OpenMetrics) text format.
//!
//! Process-wide rather than passed around: a counter is a fact about the
//! process, every layer records into it, and this module (a leaf) imports
//! nothing from the crate. Label values are closed sets chosen by the code
//! (never request data), so the number of series stays bounded.

use std::sync::LazyLock;
use std::time::Duration;

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
    pub server_sync_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Fleet mode: other nodes' ended tasks this agent refuses.
    pub foreign_task_ends: Gauge,
}

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

    /// Everything, in the OpenMetrics text format (which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
