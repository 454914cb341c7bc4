//! Node scope: which identities a node may obtain from the server.
//!
//! An entry is served to node N only when it names N (`nodes`), or when
//! its `k8s:` selectors are all met by one pod that the **server** reads
//! from the Kubernetes API as running on N. The pod's namespace, service
//! account, labels and node come from the API, never from the agent.
//! Selectors of other kinds (`unix:`) are facts about the calling process
//! that only the agent can see: the agent checks them, the server cannot
//! and does not.
//!
//! [`authorize`] answers one signing request of a node: the identity it
//! asks for must be one the entry yields on that node, within the entry's
//! lifetime.
//!
//! The fleet's own identities, the server's `spiffe://<td>/tether/server`
//! and every node's `spiffe://<td>/tether/node/<name>`, are never a
//! workload's: an entry (fixed, or a template filled from a pod's
//! namespace, service account or name) that would yield one yields nothing
//! there ([`is_fleet_identity`]), so no node can obtain the server's SVID or
//! another node's. Pure: the caller brings the node's pods as the API listed
//! them, and records a refusal with the node's identity.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use spiffe::SpiffeId;

use super::node_api::{NODE_PATH_PREFIX, SERVER_PATH};
use crate::attestation::k8s::selectors_of;
use crate::registration::{RegistrationEntry, SelectorSet, SelectorType};

/// Longest node name: a Kubernetes node name is a DNS subdomain.
pub const MAX_NODE_NAME_LEN: usize = 253;

/// A node's name: a DNS subdomain (RFC 1123: lowercase letters, digits,
/// `-` and `.`, starting and ending with a letter or digit), as Kubernetes
/// requires of node names. It becomes a path segment of the node's SPIFFE
/// ID, so nothing else is accepted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

/// A refused node name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "node name {0:?} is not a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253, starting and ending with a letter or digit)"
)]
pub struct BadNodeName(pub String);

/// An entry as the server keeps it: the registration entry and the nodes
/// it names.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    /// The entry (selectors, ID or template, lifetimes).
    pub entry: std::sync::Arc<RegistrationEntry>,
    /// Nodes the entry is served on whatever runs there.
    pub nodes: BTreeSet<NodeName>,
}

/// What a signing request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// An X.509-SVID.
    X509,
    /// A JWT-SVID or a task token.
    Jwt,
}

/// One signing request of a node, for one entry.
#[derive(Debug, Clone, Copy)]
pub struct SignRequest<'a> {
    /// The identity asked for.
    pub spiffe_id: &'a SpiffeId,
    /// What is to be signed.
    pub credential: Credential,
    /// The lifetime asked for.
    pub ttl: Duration,
    /// DNS names asked for (X.509 only): each must be one of the entry's.
    pub dns_names: &'a [String],
}

/// Why the entry is served on the node: the grant a signature rests on,
/// recorded with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The entry names the node.
    Named,
    /// A pod on the node, by UID, meets the entry's `k8s:` selectors.
    Pod(String),
}

/// Why a node may not have what it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The entry neither names the node nor has a pod on it.
    #[error(
        "entry {entry} is not served on node {node}: it does not name the node, and no pod on the node meets its k8s selectors"
    )]
    NotInScope {
        /// The entry's ID.
        entry: String,
        /// The node.
        node: String,
    },
    /// The entry is in scope, but yields another identity on this node.
    #[error("entry {entry} does not yield {requested} on node {node}")]
    OtherIdentity {
        /// The entry's ID.
        entry: String,
        /// What was asked for.
        requested: String,
        /// The node.
        node: String,
    },
    /// No entry served on the node yields the identity.
    #[error("no entry served on node {node} yields {requested}")]
    NoEntry {
        /// What was asked for.
        requested: String,
        /// The node.
        node: String,
    },
    /// A DNS name the entry does not give.
    #[error("entry {entry} does not give the DNS name {name:?}")]
    OtherName {
        /// The entry's ID.
        entry: String,
        /// The name asked for.
        name: String,
    },
    /// One of the fleet's own identities ([`is_fleet_identity`]), which no
    /// entry yields.
    #[error(
        "{requested} is the fleet's own identity (the server's or a node's), never a workload's"
    )]
    FleetIdentity {
        /// What was asked for.
        requested: String,
    },
    /// Longer than the entry allows.
    #[error("a lifetime of {requested:?} is more than entry {entry} allows ({allowed:?})")]
    TooLong {
        /// The entry's ID.
        entry: String,
        /// What was asked for.
        requested: Duration,
        /// The entry's lifetime for this credential.
        allowed: Duration,
    },
}

// === impl NodeName ===

impl NodeName {
    /// Checks `name` (see [`NodeName`]).
    pub fn new(name: &str) -> Result<Self, BadNodeName> {
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let ok = !name.is_empty()
            && name.len() <= MAX_NODE_NAME_LEN
            && name.bytes().all(|b| alnum(b) || b == b'-' || b == b'.')
            && name.split('.').all(|label| {
                let bytes = label.as_bytes();
                matches!((bytes.first(), bytes.last()), (Some(&a), Some(&z)) if alnum(a) && alnum(z))
            });
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(BadNodeName(name.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl ServerEntry ===

impl ServerEntry {
    /// The entry's `k8s:` selectors: what a pod on the node must meet.
    fn pod_selectors(&self) -> SelectorSet {
        self.entry
            .selectors
            .iter()
            .filter(|s| s.kind() == SelectorType::K8s)
            .cloned()
            .collect()
    }

    /// The identities this entry yields on `node`, whose pods (as the API
    /// lists them) are `pods`, each with its grant. A named node gets the
    /// entry's fixed ID; a pod gets the ID the entry's template resolves
    /// to from the pod's selectors. Empty: not served there.
    pub fn identities(&self, node: &NodeName, pods: &[Pod]) -> Vec<(SpiffeId, Grant)> {
        let mut out = Vec::new();
        if self.nodes.contains(node)
            && let Some(id) = self.entry.spiffe_id.as_fixed()
            && !is_fleet_identity(id)
        {
            out.push((id.clone(), Grant::Named));
        }
        let wanted = self.pod_selectors();
        if wanted.is_empty() {
            return out;
        }
        for pod in pods.iter().filter(|pod| runs_on(pod, node)) {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            for selectors in pod_selector_sets(pod) {
                if wanted.is_subset(&selectors)
                    && let Some(id) = self.entry.spiffe_id.resolve(&selectors)
                    && !is_fleet_identity(&id)
                    && !out.iter().any(|(known, _)| known == &id)
                {
                    out.push((id, Grant::Pod(uid.to_owned())));
                }
            }
        }
        out
    }

    /// The longest lifetime the entry allows for `credential`, when it
    /// sets one (otherwise the server's default applies, capped by the
    /// authority).
    fn ttl_for(&self, credential: Credential) -> Option<Duration> {
        match credential {
            Credential::X509 => self.entry.x509_svid_ttl,
            Credential::Jwt => self.entry.jwt_svid_ttl,
        }
    }
}

/// Decides one signing request of `node` for `entry`: the grant it rests
/// on, or why it is refused.
pub fn authorize(
    entry: &ServerEntry,
    node: &NodeName,
    pods: &[Pod],
    request: &SignRequest<'_>,
) -> Result<Grant, Refusal> {
    let identities = entry.identities(node, pods);
    if identities.is_empty() {
        return Err(Refusal::NotInScope {
            entry: entry.entry.id.to_string(),
            node: node.to_string(),
        });
    }
    let Some((_, grant)) = identities
        .into_iter()
        .find(|(id, _)| id == request.spiffe_id)
    else {
        return Err(Refusal::OtherIdentity {
            entry: entry.entry.id.to_string(),
            requested: request.spiffe_id.to_string(),
            node: node.to_string(),
        });
    };
    if let Some(allowed) = entry.ttl_for(request.credential)
        && request.ttl > allowed
    {
        return Err(Refusal::TooLong {
            entry: entry.entry.id.to_string(),
            requested: request.ttl,
            allowed,
        });
    }
    if let Some(name) = request
        .dns_names
        .iter()
        .find(|name| !entry.entry.dns_names.contains(name))
    {
        return Err(Refusal::OtherName {
            entry: entry.entry.id.to_string(),
            name: name.clone(),
        });
    }
    Ok(grant)
}

/// Decides one signing request of `node` against every entry: the first
/// entry that allows it, with its grant. When none does, the refusal of
/// an entry that yields the identity on the node (its lifetime or names
/// were refused), or [`Refusal::NoEntry`] when no entry yields it there.
pub fn authorize_any<'e>(
    entries: &'e [ServerEntry],
    node: &NodeName,
    pods: &[Pod],
    request: &SignRequest<'_>,
) -> Result<(&'e ServerEntry, Grant), Refusal> {
    if is_fleet_identity(request.spiffe_id) {
        return Err(Refusal::FleetIdentity {
            requested: request.spiffe_id.to_string(),
        });
    }
    let mut closest = None;
    for entry in entries {
        match authorize(entry, node, pods, request) {
            Ok(grant) => return Ok((entry, grant)),
            Err(refusal @ (Refusal::TooLong { .. } | Refusal::OtherName { .. })) => {
                closest.get_or_insert(refusal);
            }
            Err(_) => {}
        }
    }
    Err(closest.unwrap_or_else(|| Refusal::NoEntry {
        requested: request.spiffe_id.to_string(),
        node: node.to_string(),
    }))
}

/// True when `id` is one of the fleet's own identities: the server's
/// (`/tether/server`) or a node's (under `/tether/node/`). The node API
/// names its callers by these, so no workload entry may yield one.
pub fn is_fleet_identity(id: &SpiffeId) -> bool {
    let path = id.path();
    path == SERVER_PATH || path.starts_with(NODE_PATH_PREFIX)
}

/// True when the API says `pod` is bound to `node`.
fn runs_on(pod: &Pod, node: &NodeName) -> bool {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
}

/// The selector sets a pod yields: the pod's own, and each container's
/// (regular, init and ephemeral: the pod's selectors plus the
/// container's), exactly the sets the agent's k8s attestor can give a
/// process in that pod, so the server serves what the agent may match.
fn pod_selector_sets(pod: &Pod) -> Vec<SelectorSet> {
    let mut sets: Vec<SelectorSet> = selectors_of(pod, None).into_iter().collect();
    let statuses = pod.status.as_ref();
    let containers = statuses
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            statuses
                .and_then(|s| s.init_container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
        .chain(
            statuses
                .and_then(|s| s.ephemeral_container_statuses.as_ref())
                .into_iter()
                .flatten(),
        );
    for status in containers {
        // `containerd://<id>`: the attestor matches the runtime's own id.
        let id = status
            .container_id
            .as_deref()
            .map(|id| id.split_once("://").map_or(id, |(_, id)| id));
        if let Some(id) = id
            && let Some(set) = selectors_of(pod, Some(id))
        {
            sets.push(set);
        }
    }
    sets
}

#[cfg(test)]
mod tests;
