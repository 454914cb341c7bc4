//! The cluster's pods as the API server lists them, grouped by node: what
//! `server::scope` needs to serve an entry with `k8s:` selectors only on
//! the node where a matching pod runs.
//!
//! This slice lists every [`POD_REFRESH`] (pages of 500 pods, a bound
//! on every page's size and on the number of pages), not a watch: a pod
//! scheduled on a node is in scope within a few seconds, and one that ended
//! or was deleted is out within as long. A failed list keeps the last one
//! (a pod that left is then served until the API answers again: the
//! agent's own attestation of the calling process still applies).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use super::client::{ApiClient, K8sApiError};
use crate::server::scope::NodeName;

/// How often the pods are listed.
pub const POD_REFRESH: Duration = Duration::from_secs(5);
/// Pods per page.
const PAGE_SIZE: usize = 500;
/// Most pages in one list (200 000 pods).
const MAX_PAGES: usize = 400;
/// Largest page, in bytes.
const MAX_PAGE_BYTES: usize = 32 * 1024 * 1024;
/// How long one page may take.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The pods placed on nodes, by node name (ended pods left out).
#[derive(Default, Clone)]
pub struct ClusterPods {
    by_node: HashMap<String, Vec<Pod>>,
    listed: bool,
}

impl ClusterPods {
    /// Groups `pods` by `spec.nodeName`, leaving out pods on no node and
    /// pods that have ended (Succeeded, Failed).
    pub fn from_pods(pods: impl IntoIterator<Item = Pod>) -> Self {
        let mut by_node: HashMap<String, Vec<Pod>> = HashMap::new();
        for pod in pods {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            let Some(node) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            by_node.entry(node).or_default().push(pod);
        }
        Self {
            by_node,
            listed: true,
        }
    }

    /// The pods on `node`.
    pub fn on(&self, node: &NodeName) -> &[Pod] {
        self.by_node.get(node.as_str()).map_or(&[], Vec::as_slice)
    }

    /// Whether the API server has been listed at least once.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// How many pods, on all nodes.
    pub fn len(&self) -> usize {
        self.by_node.values().map(Vec::len).sum()
    }

    /// Whether no pod runs on any node.
    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty()
    }
}

impl fmt::Debug for ClusterPods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterPods")
            .field("nodes", &self.by_node.len())
            .field("pods", &self.len())
            .field("listed", &self.listed)
            .finish()
    }
}

/// Every pod of the cluster, page by page.
pub(crate) async fn list_all(client: &ApiClient) -> Result<Vec<Pod>, K8sApiError> {
    let mut pods = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut path = format!("/api/v1/pods?limit={PAGE_SIZE}");
        if let Some(token) = &next {
            path.push_str("&continue=");
            path.push_str(&percent_encode(token));
        }
        let answer = client
            .call(
                http::Method::GET,
                &path,
                None,
                PAGE_TIMEOUT,
                MAX_PAGE_BYTES,
                "the pod list",
            )
            .await?;
        if answer.status != http::StatusCode::OK {
            return Err(client.status_error("the pod list", answer.status));
        }
        // Parsing megabytes is CPU work: off the async workers.
        let page = tokio::task::spawn_blocking(move || {
            serde_json::from_slice::<k8s_openapi::List<Pod>>(&answer.body)
        })
        .await?
        .map_err(|source| K8sApiError::Malformed {
            what: "the pod list",
            source,
        })?;
        pods.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => next = Some(token),
            None => return Ok(pods),
        }
    }
    Err(K8sApiError::TooLarge {
        address: client.address(),
        what: "the pod list (pages)",
        limit: MAX_PAGES * PAGE_SIZE,
    })
}

/// `value` with every byte but RFC 3986's unreserved ones percent-encoded
/// (a continue token is opaque: base64 with `=`, `+` and `/`).
pub(super) fn percent_encode(value: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
