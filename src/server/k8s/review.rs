//! A node's projected service account token (PSAT), checked: what the API
//! server's TokenReview says of it, and the pod it is bound to, whose
//! `spec.nodeName` names the node. Nothing here comes from the agent but
//! the token itself.
//!
//! Pure parts ([`claim_of`], [`node_of`]) decide; `Kubernetes::review`
//! (in `mod.rs`) does the two calls between them.

use std::fmt;

use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::Pod;

use super::client::K8sApiError;
use super::config::{ServiceAccount, is_dns_label, is_dns_subdomain};
use crate::server::scope::{BadNodeName, NodeName};

/// The extra of a bound token naming its pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The extra of a bound token carrying its pod's UID.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// What the TokenReview says the token is: a service account's, bound to
/// a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaim {
    /// The token's service account (allowed to attest).
    pub service_account: ServiceAccount,
    /// The pod's name (in the service account's namespace).
    pub pod_name: String,
    /// The pod's UID.
    pub pod_uid: String,
}

/// A pod admitted as its node's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedPod {
    /// The token's claims.
    pub claim: PodClaim,
    /// The node the API server placed the pod on.
    pub node: NodeName,
}

/// Why a PSAT does not admit a node.
#[derive(Debug, thiserror::Error)]
pub enum PsatError {
    /// The API server did not authenticate the token.
    #[error("the Kubernetes API server did not authenticate the token{}", reason_suffix(.reason))]
    NotAuthenticated {
        /// The API server's reason, when it gave one.
        reason: Option<String>,
    },
    /// The token is not for this server's audience.
    #[error("the token is not issued for the audience {audience:?}")]
    WrongAudience {
        /// The audience required.
        audience: String,
    },
    /// The token is not a service account's.
    #[error("the token is not a service account's (user {username:?})")]
    NotServiceAccount {
        /// What the review says it is.
        username: String,
    },
    /// The service account is not in `allowed_service_accounts`.
    #[error(
        "service account {service_account} may not attest as a node (kubernetes.allowed_service_accounts)"
    )]
    NotAllowed {
        /// The token's service account.
        service_account: ServiceAccount,
    },
    /// The token is not bound to a pod (a legacy or a TokenRequest token
    /// without a pod).
    #[error(
        "the token of {service_account} is not bound to a pod (use a projected service account token)"
    )]
    NotBound {
        /// The token's service account.
        service_account: ServiceAccount,
    },
    /// The pod the token is bound to does not exist (any more).
    #[error("pod {namespace}/{name} does not exist")]
    PodGone {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The pod of that name is another one (its UID differs): the token's
    /// pod was replaced.
    #[error("pod {namespace}/{name} is not the token's pod (its UID differs)")]
    PodReplaced {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The pod runs as another service account than the token's.
    #[error("pod {namespace}/{name} does not run as the token's service account")]
    OtherServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The pod has ended (Succeeded or Failed).
    #[error("pod {namespace}/{name} has ended")]
    PodEnded {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The pod is on no node yet.
    #[error("pod {namespace}/{name} is not scheduled on a node")]
    NotScheduled {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The pod's node name cannot name a node SVID.
    #[error("pod {namespace}/{name} is on a node whose name tether cannot use")]
    NodeName {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: BadNodeName,
    },
    /// The API server could not be asked (not a refusal of the token).
    #[error("asking the Kubernetes API server")]
    Api(#[from] K8sApiError),
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

impl PsatError {
    /// Whether the token was refused (as opposed to the API server being
    /// unreachable or failing).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::Api(_))
    }
}

/// Longest reason quoted from the API server.
const MAX_REASON_LEN: usize = 256;

/// What an answered TokenReview says of the token, when it is a token of
/// an allowed service account bound to a pod, issued for `audience`.
pub fn claim_of(
    review: &TokenReview,
    audience: &str,
    allowed: &std::collections::BTreeSet<ServiceAccount>,
) -> Result<PodClaim, PsatError> {
    let status = review.status.as_ref();
    if status.and_then(|s| s.authenticated) != Some(true) {
        let reason = status
            .and_then(|s| s.error.as_deref())
            .filter(|e| !e.is_empty())
            .map(|e| e.chars().take(MAX_REASON_LEN).collect());
        return Err(PsatError::NotAuthenticated { reason });
    }
    // The review was asked for `audience` only; an answer that names
    // audiences must include it (one that names none authenticated it for
    // the audiences asked, as older API servers answer).
    if let Some(audiences) = status.and_then(|s| s.audiences.as_ref())
        && !audiences.iter().any(|a| a == audience)
    {
        return Err(PsatError::WrongAudience {
            audience: audience.to_owned(),
        });
    }
    let user = status.and_then(|s| s.user.as_ref());
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    let service_account =
        ServiceAccount::from_username(username).ok_or_else(|| PsatError::NotServiceAccount {
            username: username.chars().take(MAX_REASON_LEN).collect(),
        })?;
    if !allowed.contains(&service_account) {
        return Err(PsatError::NotAllowed { service_account });
    }
    let extra = |key: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|extra| extra.get(key))
            .and_then(|values| match values.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            })
    };
    match (extra(POD_NAME_EXTRA), extra(POD_UID_EXTRA)) {
        (Some(pod_name), Some(pod_uid)) if is_dns_subdomain(&pod_name) && is_uid(&pod_uid) => {
            Ok(PodClaim {
                service_account,
                pod_name,
                pod_uid,
            })
        }
        _ => Err(PsatError::NotBound { service_account }),
    }
}

/// The node of `pod` (as the API server returned it for `claim`), when it
/// is the token's pod, runs as the token's service account, has not ended
/// and is scheduled.
pub fn node_of(pod: &Pod, claim: &PodClaim) -> Result<NodeName, PsatError> {
    let namespace = claim.service_account.namespace.clone();
    let name = claim.pod_name.clone();
    let meta = &pod.metadata;
    if meta.uid.as_deref() != Some(claim.pod_uid.as_str())
        || meta.name.as_deref() != Some(name.as_str())
        || meta.namespace.as_deref() != Some(namespace.as_str())
    {
        return Err(PsatError::PodReplaced { namespace, name });
    }
    let spec = pod.spec.as_ref();
    let runs_as = spec.and_then(|s| s.service_account_name.as_deref());
    if runs_as != Some(claim.service_account.name.as_str()) {
        return Err(PsatError::OtherServiceAccount { namespace, name });
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Err(PsatError::PodEnded { namespace, name });
    }
    let Some(node) = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
    else {
        return Err(PsatError::NotScheduled { namespace, name });
    };
    NodeName::new(node).map_err(|source| PsatError::NodeName {
        namespace,
        name,
        source,
    })
}

/// A Kubernetes UID: a UUID's characters, bounded.
fn is_uid(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The API path of pod `name` in `namespace` (both already checked as
/// Kubernetes names, so nothing in them is a path separator).
pub(crate) fn pod_path(namespace: &str, name: &str) -> Option<String> {
    (is_dns_label(namespace) && is_dns_subdomain(name))
        .then(|| format!("/api/v1/namespaces/{namespace}/pods/{name}"))
}

impl fmt::Display for AttestedPod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod {}/{} ({}) of {} on node {}",
            self.claim.service_account.namespace,
            self.claim.pod_name,
            self.claim.pod_uid,
            self.claim.service_account,
            self.node
        )
    }
}
