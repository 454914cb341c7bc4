//! The node API (`tether.server.v1.Node`): what fleet agents ask of the
//! server over mutual TLS.
//!
//! Who is calling is decided here, from the connection, never from a
//! request field (`NodeApi::node_of`):
//! - the client certificate was verified by the TLS layer (`crate::mtls`)
//!   against the trust bundle;
//! - its SPIFFE ID must be a node SVID `spiffe://<td>/tether/node/<name>`;
//! - the node must be in the store and not evicted;
//! - the certificate must not predate the node's latest attestation (an
//!   SVID of an earlier admission of the same name, before an eviction,
//!   is refused).
//!
//! `AttestNode` is the one RPC served without a client certificate: it
//! consumes a join token (once), or has a projected service account token
//! reviewed by the Kubernetes API server (`k8s_psat`, whose node is the
//! pod's `spec.nodeName` as the API has it), and signs the node's SVID
//! (`attest`).
//!
//! What a node may have signed is `server::scope`'s decision
//! (`sign`); the entries and bundle it is sent are `sync`'s. Both give the
//! scope the pods the Kubernetes API places on the node (none without
//! `[kubernetes]`). Every
//! admission, renewal, signature and refusal is in the server's audit
//! trail, with the node's SPIFFE ID. Each node's calls are bounded by a
//! token bucket (`rate`), so one node cannot starve the others.

mod attest;
mod rate;

pub use rate::{BURST as DEFAULT_NODE_BURST, RATE as DEFAULT_NODE_RATE};
mod sign;
mod sync;
mod tasks;

pub use tasks::{DEFAULT_MAX_TASK_TTL, DEFAULT_MAX_TASKS_PER_NODE};
pub(crate) use tasks::{check_txn, task_message};
#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use spiffe::{SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::k8s::{ClusterPods, Kubernetes};
use super::registry::ServerRegistry;
use super::scope::NodeName;
use super::store::{NodeRow, ServerStore};
use super::tasks::TaskIndex;
use crate::audit::{AuditEvent, AuditLog, EventKind, Outcome};
use crate::authority::{Authority, SignedX509Svid, X509SvidRequest};
use crate::edge::status;
use crate::mtls;
use crate::proto::server as pb;

/// Largest CSR a node may send, in bytes.
const MAX_CSR_LEN: usize = 4096;
/// The path under the trust domain of node SVIDs.
pub const NODE_PATH_PREFIX: &str = "/tether/node/";
/// The path of the server's own SVID.
pub const SERVER_PATH: &str = "/tether/server";

/// The node API's service.
#[derive(Debug, Clone)]
pub struct NodeApi {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    trust_domain: TrustDomain,
    authority: Arc<dyn Authority>,
    store: Arc<dyn ServerStore>,
    registry: ServerRegistry,
    audit: AuditLog,
    /// Ends every sync stream when the server stops.
    stop: CancellationToken,
    /// How long a node SVID lives.
    node_svid_ttl: Duration,
    /// Each node's request budget.
    rates: Arc<rate::NodeRates>,
    /// Each node's open sync streams.
    streams: Arc<sync::OpenStreams>,
    /// `[kubernetes]`: PSAT review and the pods on each node.
    kubernetes: Option<Kubernetes>,
    /// The fleet's task index, as this replica serves it.
    tasks: TaskIndex,
    /// The farthest a task's deadline may be from its begin
    /// (`max_task_ttl`).
    max_task_ttl: Duration,
    /// The most tasks a node may have in the index (`max_tasks_per_node`).
    max_tasks_per_node: u64,
}

/// A node, as its verified client certificate and the store name it.
#[derive(Debug, Clone)]
pub(crate) struct CallingNode {
    pub(crate) name: NodeName,
    pub(crate) spiffe_id: SpiffeId,
    /// The connection's certificate: when it starts to be valid.
    not_before: SystemTime,
    /// The connection's certificate: when it expires.
    not_after: SystemTime,
}

// === impl CallingNode ===

impl CallingNode {
    /// Refuses (Unauthenticated) when, at `now`, the node's `row` no longer
    /// admits the certificate of this connection: the node was evicted,
    /// the certificate expired, or it predates the node's latest
    /// attestation. Checked on every call and again by an open sync
    /// stream, which outlives any one check.
    fn still_admitted(&self, row: &NodeRow, now: SystemTime) -> Result<(), Status> {
        let name = &self.name;
        if row.evicted {
            return Err(status::unauthenticated(format!(
                "node {name} was evicted; it must attest again"
            )));
        }
        if self.not_after <= now {
            return Err(status::unauthenticated(format!(
                "the SVID of node {name} on this connection has expired; reconnect with the renewed one"
            )));
        }
        if self.not_before < row.attested_at {
            return Err(status::unauthenticated(format!(
                "this SVID of node {name} predates its latest attestation"
            )));
        }
        Ok(())
    }
}

// === impl NodeApi ===

impl NodeApi {
    /// The service, signing through `authority`, with the nodes and join
    /// tokens in `store` and the entries of `registry`.
    pub fn new(
        trust_domain: TrustDomain,
        authority: Arc<dyn Authority>,
        store: Arc<dyn ServerStore>,
        registry: ServerRegistry,
        tasks: TaskIndex,
        audit: AuditLog,
        stop: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                trust_domain,
                authority,
                store,
                registry,
                audit,
                stop,
                node_svid_ttl: crate::server::config::DEFAULT_NODE_SVID_TTL,
                rates: Arc::default(),
                streams: Arc::default(),
                kubernetes: None,
                tasks,
                max_task_ttl: DEFAULT_MAX_TASK_TTL,
                max_tasks_per_node: DEFAULT_MAX_TASKS_PER_NODE,
            }),
        }
    }

    /// The service with `k8s_psat` attestation and pod scope through
    /// `kubernetes`.
    #[must_use]
    pub fn with_kubernetes(self, kubernetes: Kubernetes) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.kubernetes = Some(kubernetes);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The service, signing node SVIDs for `ttl` (`node_svid_ttl`).
    #[must_use]
    pub fn with_node_svid_ttl(self, ttl: Duration) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.node_svid_ttl = ttl;
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The service, refusing tasks whose deadline is more than `ttl` away
    /// (`max_task_ttl`).
    #[must_use]
    pub fn with_max_task_ttl(self, ttl: Duration) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.max_task_ttl = ttl;
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The service, refusing a node's new task once it has `max` in the
    /// index (`max_tasks_per_node`).
    #[must_use]
    pub fn with_max_tasks_per_node(self, max: u64) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.max_tasks_per_node = max;
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The service, with each node's calls bounded to `rate` a second
    /// after a burst of `burst`.
    #[must_use]
    pub fn with_node_rate(self, rate: u32, burst: u32) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.rates = Arc::new(rate::NodeRates::new(rate, burst));
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The pods of the cluster as last listed (none without
    /// `[kubernetes]`).
    pub(crate) fn pods(&self) -> Arc<ClusterPods> {
        self.inner
            .kubernetes
            .as_ref()
            .map_or_else(|| Arc::new(ClusterPods::default()), Kubernetes::pods)
    }

    /// The node calling, from its verified client certificate and the
    /// store; refused (Unauthenticated) without a valid node SVID.
    pub(crate) async fn node_of<T>(&self, request: &Request<T>) -> Result<CallingNode, Status> {
        let peer = mtls::peer_svid(request).ok_or_else(status::no_peer)?;
        let Some(spiffe_id) = peer.spiffe_id.clone() else {
            return Err(status::unauthenticated(
                "this call needs the node's SVID as the TLS client certificate; attest the node first",
            ));
        };
        let name = node_name_of(&self.inner.trust_domain, &spiffe_id)
            .ok_or_else(|| status::unauthenticated(format!("{spiffe_id} is not a node SVID")))?;
        let row = self
            .inner
            .store
            .node(name.clone())
            .await
            .map_err(|e| status::agent_fault("reading the node registry", &e))?
            .ok_or_else(|| status::unauthenticated(format!("node {name} is not registered")))?;
        let (Some(not_before), Some(not_after)) = (peer.not_before, peer.not_after) else {
            return Err(status::unauthenticated(format!(
                "the SVID of node {name} on this connection has no validity period"
            )));
        };
        let node = CallingNode {
            name,
            spiffe_id,
            not_before,
            not_after,
        };
        node.still_admitted(&row, SystemTime::now())?;
        if !self
            .inner
            .rates
            .admit(&node.name, tokio::time::Instant::now())
        {
            let (rate, burst) = self.inner.rates.limits();
            return Err(status::exhausted_rate(&format!(
                "node {} is over its request budget ({rate} a second after a burst of {burst}: node_requests_per_second, node_request_burst); retry later",
                node.name
            )));
        }
        Ok(node)
    }

    /// Signs a node SVID for the key in `csr`.
    async fn sign_node_svid(
        &self,
        name: &NodeName,
        csr: Vec<u8>,
    ) -> Result<SignedX509Svid, Status> {
        status::bounded_bytes("csr", csr.len(), MAX_CSR_LEN)?;
        let spiffe_id = node_spiffe_id(&self.inner.trust_domain, name)
            .map_err(|e| status::internal("naming the node", &e))?;
        self.inner
            .authority
            .sign_x509_svid(X509SvidRequest {
                csr,
                spiffe_id,
                dns_names: Vec::new(),
                ttl: self.inner.node_svid_ttl,
            })
            .await
            .map_err(|e| status::authority(&e))
    }

    /// Records a node event on the server's trail; refused when it cannot
    /// be recorded (an unrecorded admission could not be traced).
    fn record(&self, event: AuditEvent) -> Result<(), Status> {
        self.inner
            .audit
            .record(event)
            .map_err(|e| status::audit(&e))
    }

    fn bundle(&self) -> Result<pb::Bundle, Status> {
        bundle_message(&self.inner.authority)
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    async fn attest_node(
        &self,
        request: Request<pb::AttestNodeRequest>,
    ) -> Result<Response<pb::AttestNodeResponse>, Status> {
        attest::attest_node(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn renew_node(
        &self,
        request: Request<pb::RenewNodeRequest>,
    ) -> Result<Response<pb::NodeSvid>, Status> {
        let node = self.node_of(&request).await?;
        let row = self
            .inner
            .store
            .node(node.name.clone())
            .await
            .map_err(|e| status::agent_fault("reading the node registry", &e))?
            .ok_or_else(|| {
                status::unauthenticated(format!("node {} is not registered", node.name))
            })?;
        let svid = self
            .sign_node_svid(&node.name, request.into_inner().csr)
            .await?;
        // Recorded only if the node is still as read: an eviction or a new
        // admission since wins, and this SVID is never handed out.
        let renewed = self
            .inner
            .store
            .renew_node(NodeRow {
                svid_serial: svid.serial_hex(),
                svid_expires_at: svid.not_after,
                ..row
            })
            .await
            .map_err(|e| status::agent_fault("recording the node", &e))?;
        if !renewed {
            return Err(status::unauthenticated(format!(
                "node {} was evicted or attested again while its SVID was renewed",
                node.name
            )));
        }
        self.record(AuditEvent {
            node: Some(node.spiffe_id.to_string()),
            token_id: Some(svid.serial_hex()),
            reason: Some("node SVID renewed".into()),
            ..AuditEvent::new(EventKind::NodeAttest, Outcome::Allow)
        })?;
        Ok(Response::new(node_svid_message(&svid)))
    }

    type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, Status>> + Send>>;

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let node = self.node_of(&request).await?;
        let after = request.get_ref().task_ends_after;
        Ok(Response::new(sync::stream(self.clone(), node, after)))
    }

    async fn sign_x509_svids(
        &self,
        request: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        let node = self.node_of(&request).await?;
        sign::x509_svids(self, &node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn sign_jwt(
        &self,
        request: Request<pb::SignJwtRequest>,
    ) -> Result<Response<pb::SignJwtResponse>, Status> {
        let node = self.node_of(&request).await?;
        sign::jwt(self, &node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn end_tasks(
        &self,
        request: Request<pb::EndTasksRequest>,
    ) -> Result<Response<pb::EndTasksResponse>, Status> {
        let node = self.node_of(&request).await?;
        tasks::end(self, &node, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// The SPIFFE ID of node `name`: `spiffe://<td>/tether/node/<name>`.
pub fn node_spiffe_id(
    trust_domain: &TrustDomain,
    name: &NodeName,
) -> Result<SpiffeId, spiffe::SpiffeIdError> {
    SpiffeId::new(format!("spiffe://{trust_domain}{NODE_PATH_PREFIX}{name}"))
}

/// The server's SPIFFE ID: `spiffe://<td>/tether/server`.
pub fn server_spiffe_id(trust_domain: &TrustDomain) -> Result<SpiffeId, spiffe::SpiffeIdError> {
    SpiffeId::new(format!("spiffe://{trust_domain}{SERVER_PATH}"))
}

/// The node `id` names, when it is a node SVID of `trust_domain`.
pub fn node_name_of(trust_domain: &TrustDomain, id: &SpiffeId) -> Option<NodeName> {
    if id.trust_domain() != trust_domain {
        return None;
    }
    let name = id.path().strip_prefix(NODE_PATH_PREFIX)?;
    NodeName::new(name).ok()
}

/// The trust bundle as the node API sends it.
pub(crate) fn bundle_message(authority: &Arc<dyn Authority>) -> Result<pb::Bundle, Status> {
    let bundle = authority.bundle();
    let spiffe_json = bundle
        .to_spiffe_json()
        .map_err(|e| status::internal("encoding the trust bundle", &e))?;
    Ok(pb::Bundle {
        spiffe_json,
        sequence: bundle.sequence(),
    })
}

fn node_svid_message(svid: &SignedX509Svid) -> pb::NodeSvid {
    pb::NodeSvid {
        cert_chain: svid.chain.clone(),
        expires_at_ms: unix_ms(svid.not_after),
    }
}

/// `t` without its fraction of a second, as X.509 times are.
fn whole_seconds(t: SystemTime) -> SystemTime {
    t.duration_since(UNIX_EPOCH).map_or(UNIX_EPOCH, |d| {
        UNIX_EPOCH + Duration::from_secs(d.as_secs())
    })
}

/// Milliseconds since the epoch (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
