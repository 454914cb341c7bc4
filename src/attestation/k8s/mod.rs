//! The Kubernetes workload attestor: from a process to its pod, through the
//! kubelet of this node.
//!
//! `cgroup` reads the pod UID and container ID from `/proc/<pid>/cgroup`
//! (kernel facts, pinned to the caller like every other /proc read);
//! `kubelet` asks this node's kubelet for its pods; this module matches the
//! two and turns the pod into `k8s:` selectors.
//!
//! Invariants:
//! - A process whose cgroups name no pod gets no `k8s:` selectors and never
//!   waits for the kubelet.
//! - Only pods the kubelet says run on this node (`spec.nodeName`) are
//!   considered; a pod list for another node matches nothing.
//! - The kubelet being down, slow, refusing the token or answering garbage
//!   fails the attestation of that pod's process with the reason, never the
//!   agent.
//! - The pod list is cached for `pod_cache_ttl`; a miss refreshes it (one
//!   refresh at a time, shared by every waiting caller), up to
//!   `max_poll_attempts` times `poll_retry_interval` apart, for a pod or
//!   container too new to be listed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::registration::selector::{Selector, SelectorSet, SelectorType};

mod cgroup;
mod kubelet;

pub use cgroup::{CgroupError, MAX_CGROUP_FILE, PodContainer, pod_container};
pub use kubelet::{Kubelet, KubeletError, parse_pods};

/// The `[attestor.k8s]` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sAttestorConfig {
    /// Attest pods (default false).
    pub enabled: bool,
    /// This node's name; the config fills it from `$NODE_NAME` when unset.
    pub node_name: Option<String>,
    /// Where the kubelet listens (default `127.0.0.1`: the agent runs with
    /// the host network).
    pub kubelet_host: String,
    /// The kubelet's HTTPS port (default 10250).
    pub kubelet_secure_port: u16,
    /// Nonzero: ask this plain-HTTP, unauthenticated port instead (default
    /// 0: never unless configured).
    pub kubelet_read_only_port: u16,
    /// The service account token presented to the kubelet.
    pub token_path: PathBuf,
    /// The CA that signs the kubelet's serving certificate.
    pub kubelet_ca_path: PathBuf,
    /// The name the kubelet's certificate must carry (default: the node
    /// name, as the kubelet's serving certificate carries it).
    pub kubelet_tls_server_name: Option<String>,
    /// Accept any kubelet certificate (self-signed serving certificates).
    pub skip_kubelet_verification: bool,
    /// Where `<pid>/cgroup` is read (default `/proc`).
    pub proc_root: PathBuf,
    /// How long a pod list is used before it is fetched again.
    #[serde(with = "humantime_serde")]
    pub pod_cache_ttl: Duration,
    /// Fetches of the pod list for a pod not (yet) in it.
    pub max_poll_attempts: u32,
    /// The wait between those fetches.
    #[serde(with = "humantime_serde")]
    pub poll_retry_interval: Duration,
    /// Bound on one request to the kubelet, connection included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest pod list accepted, in bytes.
    pub max_response_bytes: u64,
}

/// Matches callers' pods through the kubelet. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct K8sAttestor {
    kubelet: Kubelet,
    node_name: String,
    proc_root: PathBuf,
    cache_ttl: Duration,
    attempts: u32,
    retry_interval: Duration,
    cache: Mutex<Cache>,
}

/// The last pod list, and the last failure to get one.
#[derive(Debug, Default)]
struct Cache {
    pods: Option<Cached>,
    failure: Option<(Instant, Arc<KubeletError>)>,
}

#[derive(Debug)]
struct Cached {
    fetched: Instant,
    pods: Arc<Vec<Pod>>,
}

/// Why a process in a pod could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// Asking the kubelet failed (now, or just before: a failure is
    /// shared by the callers that waited for it).
    #[error(transparent)]
    Kubelet(#[from] Arc<KubeletError>),
    /// The pod is not on this node's kubelet, even after retrying.
    #[error("pod {pod_uid} is not among the pods of node {node} ({attempts} attempts)")]
    PodNotListed {
        /// The pod's UID from the caller's cgroup.
        pod_uid: String,
        /// This node.
        node: String,
        /// Fetches made.
        attempts: u32,
    },
    /// The pod is listed but the container has no status yet.
    #[error("container {container_id} is not in the status of pod {pod_uid} ({attempts} attempts)")]
    ContainerNotListed {
        /// The pod's UID.
        pod_uid: String,
        /// The container's ID from the caller's cgroup.
        container_id: String,
        /// Fetches made.
        attempts: u32,
    },
}

// === impl K8sAttestorConfig ===

impl Default for K8sAttestorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_name: None,
            kubelet_host: "127.0.0.1".into(),
            kubelet_secure_port: 10250,
            kubelet_read_only_port: 0,
            token_path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            kubelet_ca_path: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
            kubelet_tls_server_name: None,
            skip_kubelet_verification: false,
            proc_root: "/proc".into(),
            pod_cache_ttl: Duration::from_secs(2),
            max_poll_attempts: 10,
            poll_retry_interval: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
}

impl K8sAttestorConfig {
    /// Checks each setting; on failure names the key (under
    /// `attestor.k8s.`) and the problem.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled {
            return Ok(());
        }
        match &self.node_name {
            Some(name) if !name.is_empty() && name.len() <= 253 => {}
            _ => {
                return Err((
                    "attestor.k8s.node_name",
                    "is required (set it, or $NODE_NAME from the downward API spec.nodeName)"
                        .into(),
                ));
            }
        }
        if self.kubelet_host.is_empty() {
            return Err(("attestor.k8s.kubelet_host", "is empty".into()));
        }
        // Unverified, the token (which may get nodes/proxy of every node)
        // goes to whoever answers: only ever to this node's own loopback.
        let loopback = self.kubelet_host == "localhost"
            || self
                .kubelet_host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if self.skip_kubelet_verification && !loopback {
            return Err((
                "attestor.k8s.skip_kubelet_verification",
                "is allowed only with a loopback kubelet_host (the token would go to any server)"
                    .into(),
            ));
        }
        if self.kubelet_secure_port == 0 && self.kubelet_read_only_port == 0 {
            return Err(("attestor.k8s.kubelet_secure_port", "is 0".into()));
        }
        for (key, path) in [
            ("attestor.k8s.token_path", &self.token_path),
            ("attestor.k8s.kubelet_ca_path", &self.kubelet_ca_path),
            ("attestor.k8s.proc_root", &self.proc_root),
        ] {
            if !path.is_absolute() {
                return Err((key, "must be an absolute path".into()));
            }
        }
        if !(1..=100).contains(&self.max_poll_attempts) {
            return Err(("attestor.k8s.max_poll_attempts", "must be 1 to 100".into()));
        }
        for (key, value, max) in [
            (
                "attestor.k8s.poll_retry_interval",
                self.poll_retry_interval,
                Duration::from_secs(10),
            ),
            (
                "attestor.k8s.request_timeout",
                self.request_timeout,
                Duration::from_secs(60),
            ),
            (
                "attestor.k8s.pod_cache_ttl",
                self.pod_cache_ttl,
                Duration::from_secs(300),
            ),
        ] {
            if value.is_zero() || value > max {
                return Err((
                    key,
                    format!(
                        "must be above 0 and at most {}",
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        if self.max_response_bytes < 1024 {
            return Err((
                "attestor.k8s.max_response_bytes",
                "must be at least 1024".into(),
            ));
        }
        Ok(())
    }
}

// === impl K8sAttestor ===

impl K8sAttestor {
    /// The attestor for a validated, enabled configuration.
    pub fn new(config: &K8sAttestorConfig) -> Result<Self, KubeletError> {
        Ok(Self {
            kubelet: Kubelet::new(config)?,
            node_name: config.node_name.clone().unwrap_or_default(),
            proc_root: config.proc_root.clone(),
            cache_ttl: config.pod_cache_ttl,
            attempts: config.max_poll_attempts,
            retry_interval: config.poll_retry_interval,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// Where `<pid>/cgroup` is read.
    pub fn proc_root(&self) -> &std::path::Path {
        &self.proc_root
    }

    /// The `k8s:` selectors of the process in `found`.
    pub async fn selectors(&self, found: &PodContainer) -> Result<SelectorSet, K8sError> {
        let mut oldest_acceptable = None;
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                tokio::time::sleep(self.retry_interval).await;
            }
            let pods = self.pods(oldest_acceptable).await?;
            oldest_acceptable = Some(Instant::now());
            let Some(pod) = pods.iter().find(|pod| is_the_pod(pod, &found.pod_uid)) else {
                continue;
            };
            if let Some(selectors) = selectors_of(pod, found.container_id.as_deref()) {
                return Ok(selectors);
            }
            if attempt == self.attempts {
                return Err(K8sError::ContainerNotListed {
                    pod_uid: found.pod_uid.clone(),
                    container_id: found.container_id.clone().unwrap_or_default(),
                    attempts: attempt,
                });
            }
        }
        Err(K8sError::PodNotListed {
            pod_uid: found.pod_uid.clone(),
            node: self.node_name.clone(),
            attempts: self.attempts,
        })
    }

    /// This node's pods: the cached list if it is younger than the TTL and
    /// than `fetched_after`, else a fresh one. One fetch at a time: callers
    /// that wait for it share its result.
    async fn pods(
        &self,
        fetched_after: Option<Instant>,
    ) -> Result<Arc<Vec<Pod>>, Arc<KubeletError>> {
        let mut cache = self.cache.lock().await;
        // A fetch that just failed is the answer for everyone who waited
        // for it: a kubelet that is down costs each caller one timeout at
        // most, not one per caller queued before it.
        if let Some((at, error)) = &cache.failure
            && at.elapsed() < self.retry_interval
        {
            return Err(Arc::clone(error));
        }
        if let Some(cached) = &cache.pods {
            let fresh = cached.fetched.elapsed() < self.cache_ttl;
            let recent = fetched_after.is_none_or(|after| cached.fetched >= after);
            if fresh && recent {
                return Ok(Arc::clone(&cached.pods));
            }
        }
        let fetched = Instant::now();
        let list = match self.kubelet.pods().await {
            Ok(list) => list,
            Err(error) => {
                crate::telemetry::metrics().kubelet_errors.inc();
                // The caller's attestation failure is logged where it is
                // answered; this is the detail.
                tracing::debug!(error = %crate::error::Chain(&error), "asking the kubelet for its pods failed");
                let error = Arc::new(error);
                cache.failure = Some((Instant::now(), Arc::clone(&error)));
                return Err(error);
            }
        };
        cache.failure = None;
        let total = list.items.len();
        let pods: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|pod| {
                pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref())
                    == Some(self.node_name.as_str())
            })
            .collect();
        if pods.len() < total {
            tracing::warn!(
                kubelet = %self.kubelet.address(),
                node = %self.node_name,
                ignored = total - pods.len(),
                "the kubelet listed pods of another node; ignored"
            );
        }
        let pods = Arc::new(pods);
        cache.pods = Some(Cached {
            fetched,
            pods: Arc::clone(&pods),
        });
        Ok(pods)
    }
}

fn is_the_pod(pod: &Pod, uid: &str) -> bool {
    pod.metadata.uid.as_deref() == Some(uid)
}

/// The pod's selectors, and the container's when `container_id` is set;
/// `None` when that container has no status in the pod (yet). Pure: what
/// the attestor makes of one pod the kubelet listed.
pub fn selectors_of(pod: &Pod, container_id: Option<&str>) -> Option<SelectorSet> {
    let k8s = |key: &str, value: &str| Selector::new(SelectorType::K8s, key, value);
    let mut out = SelectorSet::new();
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if let Some(ns) = &meta.namespace {
        out.insert(k8s("ns", ns));
    }
    if let Some(sa) = spec.and_then(|s| s.service_account_name.as_deref()) {
        out.insert(k8s("sa", sa));
    }
    if let Some(name) = &meta.name {
        out.insert(k8s("pod-name", name));
    }
    if let Some(uid) = &meta.uid {
        out.insert(k8s("pod-uid", uid));
    }
    if let Some(node) = spec.and_then(|s| s.node_name.as_deref()) {
        out.insert(k8s("node-name", node));
    }
    for (key, value) in meta.labels.iter().flatten() {
        out.insert(k8s("pod-label", &format!("{key}:{value}")));
    }
    for owner in meta.owner_references.iter().flatten() {
        out.insert(k8s("pod-owner", &format!("{}:{}", owner.kind, owner.name)));
        out.insert(k8s("pod-owner-uid", &owner.uid));
    }

    let statuses =
        |f: fn(&k8s_openapi::api::core::v1::PodStatus) -> Option<&Vec<ContainerStatus>>| {
            status.and_then(f).map(Vec::as_slice).unwrap_or_default()
        };
    let containers = statuses(|s| s.container_statuses.as_ref());
    let init = statuses(|s| s.init_container_statuses.as_ref());
    let ephemeral = statuses(|s| s.ephemeral_container_statuses.as_ref());

    let images = |specs: Option<Vec<&str>>, statuses: &[ContainerStatus]| {
        let mut images: Vec<String> = specs
            .unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect();
        for s in statuses {
            images.push(s.image.clone());
            images.push(s.image_id.clone());
        }
        images.retain(|i| !i.is_empty());
        images.sort();
        images.dedup();
        images
    };
    let pod_images = images(
        spec.map(|s| {
            s.containers
                .iter()
                .filter_map(|c| c.image.as_deref())
                .collect()
        }),
        containers,
    );
    out.insert(k8s(
        "pod-image-count",
        &spec.map_or(0, |s| s.containers.len()).to_string(),
    ));
    for image in &pod_images {
        out.insert(k8s("pod-image", image));
    }
    let init_images = images(
        spec.and_then(|s| s.init_containers.as_ref())
            .map(|c| c.iter().filter_map(|c| c.image.as_deref()).collect()),
        init,
    );
    out.insert(k8s(
        "pod-init-image-count",
        &spec
            .and_then(|s| s.init_containers.as_ref())
            .map_or(0, Vec::len)
            .to_string(),
    ));
    for image in &init_images {
        out.insert(k8s("pod-init-image", image));
    }

    if let Some(id) = container_id {
        let container = containers.iter().chain(init).chain(ephemeral).find(|c| {
            c.container_id
                .as_deref()
                .is_some_and(|cid| runtime_id(cid) == id)
        })?;
        out.insert(k8s("container-name", &container.name));
        for image in [&container.image, &container.image_id] {
            if !image.is_empty() {
                out.insert(k8s("container-image", image));
            }
        }
    }
    Some(out)
}

/// `containerd://<id>` (or `cri-o://`, `docker://`) to `<id>`.
fn runtime_id(container_id: &str) -> &str {
    container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id)
}
