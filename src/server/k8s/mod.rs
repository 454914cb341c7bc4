//! The server's client of the Kubernetes API server: node attestation by
//! projected service account token (`k8s_psat`) and the pods that put
//! entries with `k8s:` selectors in a node's scope.
//!
//! - [`Kubernetes::review`]: a node's token goes to the API server's
//!   TokenReview (for the configured audience); the pod it is bound to is
//!   read from the API, and its `spec.nodeName` names the node. The agent's
//!   word is never taken for the node, the pod or its service account.
//! - [`Kubernetes::run`] lists the cluster's pods every
//!   [`pods::POD_REFRESH`] into [`Kubernetes::pods`] (and
//!   [`Kubernetes::subscribe`]), which the node API gives `server::scope`
//!   for signing and sync.
//!
//! Invariants: every call has a timeout and a bound on its answer's size;
//! the API server is only spoken to over TLS verified with the configured
//! CA; a token is sent to the API server only, never logged or recorded.

pub mod client;
pub mod config;
pub mod pods;
pub mod review;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use client::K8sApiError;
pub use config::{KubernetesConfig, ServiceAccount};
pub use pods::ClusterPods;
pub use review::{AttestedPod, PodClaim, PsatError};

use crate::error::Chain;
use client::ApiClient;

/// Longest token a node may present, in bytes (a projected token is a
/// JWT of about 1 KiB).
pub const MAX_PSAT_LEN: usize = 16 * 1024;
/// How long one TokenReview or pod read may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest TokenReview answer.
const MAX_REVIEW_BYTES: usize = 64 * 1024;
/// Largest single pod.
const MAX_POD_BYTES: usize = 1024 * 1024;

/// The server's view of the cluster (cheap Clone).
#[derive(Debug, Clone)]
pub struct Kubernetes {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: ApiClient,
    config: KubernetesConfig,
    pods: watch::Sender<Arc<ClusterPods>>,
}

// === impl Kubernetes ===

impl Kubernetes {
    /// A client as configured (reads the CA file now). No pod is known
    /// until [`Kubernetes::run`] lists them.
    pub fn new(config: KubernetesConfig) -> Result<Self, K8sApiError> {
        let client = ApiClient::new(&config)?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                config,
                pods: watch::Sender::new(Arc::new(ClusterPods::default())),
            }),
        })
    }

    /// The configured audience of node tokens.
    pub fn audience(&self) -> &str {
        &self.inner.config.audience
    }

    /// Checks a node's projected service account token: the API server's
    /// TokenReview, then the pod it is bound to. The node is the pod's
    /// `spec.nodeName`.
    pub async fn review(&self, token: &str) -> Result<AttestedPod, PsatError> {
        let config = &self.inner.config;
        let client = &self.inner.client;
        let request = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![config.audience.clone()]),
                token: Some(token.to_owned()),
            },
            ..TokenReview::default()
        };
        let body = serde_json::to_vec(&request).map_err(|source| K8sApiError::Malformed {
            what: "the TokenReview request",
            source,
        })?;
        let answer = client
            .call(
                http::Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(body),
                CALL_TIMEOUT,
                MAX_REVIEW_BYTES,
                "the TokenReview",
            )
            .await?;
        if answer.status != http::StatusCode::CREATED && answer.status != http::StatusCode::OK {
            return Err(client.status_error("the TokenReview", answer.status).into());
        }
        let review: TokenReview =
            serde_json::from_slice(&answer.body).map_err(|source| K8sApiError::Malformed {
                what: "the TokenReview",
                source,
            })?;
        let claim = review::claim_of(&review, &config.audience, &config.allowed_service_accounts)?;
        let namespace = claim.service_account.namespace.clone();
        let name = claim.pod_name.clone();
        let path = review::pod_path(&namespace, &name).ok_or_else(|| PsatError::PodGone {
            namespace: namespace.clone(),
            name: name.clone(),
        })?;
        let answer = client
            .call(
                http::Method::GET,
                &path,
                None,
                CALL_TIMEOUT,
                MAX_POD_BYTES,
                "the pod read",
            )
            .await?;
        if answer.status == http::StatusCode::NOT_FOUND {
            return Err(PsatError::PodGone { namespace, name });
        }
        if answer.status != http::StatusCode::OK {
            return Err(client.status_error("the pod read", answer.status).into());
        }
        let pod: Pod =
            serde_json::from_slice(&answer.body).map_err(|source| K8sApiError::Malformed {
                what: "the pod read",
                source,
            })?;
        let node = review::node_of(&pod, &claim)?;
        Ok(AttestedPod { claim, node })
    }

    /// The pods as last listed.
    pub fn pods(&self) -> Arc<ClusterPods> {
        self.inner.pods.borrow().clone()
    }

    /// The pods, and every new list of them.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterPods>> {
        self.inner.pods.subscribe()
    }

    /// Lists the cluster's pods now; they replace the last list.
    pub async fn refresh(&self) -> Result<(), K8sApiError> {
        let listed = pods::list_all(&self.inner.client).await?;
        let pods = Arc::new(ClusterPods::from_pods(listed));
        tracing::debug!(pods = pods.len(), "pods listed from the Kubernetes API");
        self.inner.pods.send_replace(pods);
        Ok(())
    }

    /// Lists the pods every [`pods::POD_REFRESH`] until `cancel`; a failed
    /// list is logged and the last one kept.
    pub async fn run(self, cancel: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                listed = self.refresh() => match listed {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("pods listed from the Kubernetes API again");
                    }
                    Ok(()) => {}
                    Err(error) => {
                        if !failing {
                            tracing::warn!(error = %Chain(&error), "could not list the pods; keeping the last list");
                        }
                        failing = true;
                    }
                },
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(pods::POD_REFRESH) => {}
            }
        }
    }
}
