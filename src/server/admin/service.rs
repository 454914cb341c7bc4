//! The `ServerAdmin` RPCs: parse and bound the request, call the registry,
//! the store or the authority, record what changed, convert the answer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use crate::admin_api::convert;
use crate::audit::{AuditEvent, AuditLog, EventKind, Outcome};
use crate::authority::Authority;
use crate::edge::{gate, status};
use crate::proto::admin as admin_pb;
use crate::proto::server as pb;
use crate::proto::server::server_admin_server::ServerAdmin;
use crate::registration::EntryId;
use crate::server::join_token::{self, Admission, JoinToken};
use crate::server::node_api::{check_txn, task_message};
use crate::server::registry::ServerRegistry;
use crate::server::scope::{MAX_NODE_NAME_LEN, NodeName, ServerEntry};
use crate::server::store::{FleetTaskEndRequest, NodeRow, ServerStore};
use crate::server::tasks::TaskIndex;

/// Most nodes one entry may name.
pub const MAX_ENTRY_NODES: usize = 256;

/// The server's admin API.
#[derive(Debug, Clone)]
pub struct ServerAdminService {
    registry: ServerRegistry,
    store: Arc<dyn ServerStore>,
    authority: Arc<dyn Authority>,
    tasks: TaskIndex,
    audit: AuditLog,
}

/// Tasks listed when the request names no limit, and the most it may.
pub const DEFAULT_TASK_LIST: u32 = 1000;
pub const MAX_TASK_LIST: u32 = 10_000;

// === impl ServerAdminService ===

impl ServerAdminService {
    /// The service over the server's registry, store, authority, task
    /// index and audit trail.
    pub fn new(
        registry: ServerRegistry,
        store: Arc<dyn ServerStore>,
        authority: Arc<dyn Authority>,
        tasks: TaskIndex,
        audit: AuditLog,
    ) -> Self {
        Self {
            registry,
            store,
            authority,
            tasks,
            audit,
        }
    }

    /// Records `event`; refused (nothing done) when it cannot be.
    fn record(&self, event: AuditEvent) -> Result<(), Status> {
        self.audit.record(event).map_err(|e| status::audit(&e))
    }

    /// Ends every live task of an evicted `node` on every node: an
    /// eviction also takes back what the node delegated (its tokens could
    /// otherwise still be exchanged elsewhere until they expire).
    async fn end_tasks_of(&self, node: &NodeName) -> Result<(), Status> {
        const PAGE: u32 = 1024;
        let at = SystemTime::now();
        loop {
            let live = self
                .store
                .live_fleet_tasks_of(node.clone(), PAGE)
                .await
                .map_err(|e| status::server_store("listing the evicted node's tasks", &e))?;
            if live.is_empty() {
                return Ok(());
            }
            let ends = live
                .into_iter()
                .map(|txn| FleetTaskEndRequest {
                    txn,
                    reason: "revoked".into(),
                    at,
                })
                .collect();
            let ended = self
                .tasks
                .end(ends, Some(node.clone()))
                .await
                .map_err(|e| status::server_store("ending the evicted node's tasks", &e))?;
            for row in ended.iter().flatten() {
                self.record(AuditEvent {
                    spiffe_id: Some(row.spiffe_id.clone()),
                    task_id: Some(row.txn.clone()),
                    node: Some(self.node_id(node)),
                    reason: Some("revoked: its node was evicted".into()),
                    ..AuditEvent::new(EventKind::Revoke, Outcome::Info)
                })?;
            }
            if ended.iter().all(Option::is_none) {
                // Ended meanwhile by someone else: nothing left to do here.
                return Ok(());
            }
        }
    }

    /// The node SPIFFE ID the audit trail names a node by.
    fn node_id(&self, node: &NodeName) -> String {
        format!(
            "spiffe://{}/tether/node/{}",
            self.registry.trust_domain(),
            node.as_str()
        )
    }
}

#[tonic::async_trait]
impl ServerAdmin for ServerAdminService {
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let request = request.into_inner();
        let node = node_name("node_name", &request.node_name)?;
        let ttl = (request.ttl_ms != 0).then(|| Duration::from_millis(request.ttl_ms));
        let expires_at =
            join_token::expiry(SystemTime::now(), ttl).map_err(|e| status::join_token(&e))?;
        let (token, hash) = JoinToken::generate().map_err(|e| status::join_token(&e))?;
        self.record(AuditEvent {
            spiffe_id: Some(self.node_id(&node)),
            reason: Some(format!(
                "join token created for node {}, expires {}",
                node.as_str(),
                humantime::format_rfc3339_seconds(expires_at)
            )),
            ..AuditEvent::new(EventKind::JoinToken, Outcome::Info)
        })?;
        self.store
            .add_join_token(
                hash,
                Admission {
                    node: node.clone(),
                    expires_at,
                    used_at: None,
                },
            )
            .await
            .map_err(|e| status::server_store("storing the join token", &e))?;
        gate::recorded(&self.audit).await?;
        tracing::info!(node = node.as_str(), "join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: token.to_string(),
            expires_at_ms: convert::unix_ms(expires_at),
        }))
    }

    async fn create_entry(
        &self,
        request: Request<pb::CreateServerEntryRequest>,
    ) -> Result<Response<pb::ServerEntry>, Status> {
        let request = request.into_inner();
        let spec = convert::spec(request.spec)?;
        if request.nodes.len() > MAX_ENTRY_NODES {
            return Err(status::invalid(
                "nodes",
                format!(
                    "{} items; the limit is {MAX_ENTRY_NODES}",
                    request.nodes.len()
                ),
            ));
        }
        let nodes = request
            .nodes
            .iter()
            .map(|name| node_name("nodes", name))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let entry = self
            .registry
            .create(&spec, nodes)
            .await
            .map_err(|e| status::server_registry(&e))?;
        gate::recorded(&self.audit).await?;
        Ok(Response::new(server_entry(&entry)))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetServerEntryRequest>,
    ) -> Result<Response<pb::ServerEntry>, Status> {
        let id = entry_id(&request.into_inner().id)?;
        let snapshot = self.registry.snapshot();
        let entry = snapshot
            .get(id.as_str())
            .ok_or_else(|| status::not_found(format!("no entry with id {id}")))?;
        Ok(Response::new(server_entry(entry)))
    }

    async fn list_entries(
        &self,
        _request: Request<pb::ListServerEntriesRequest>,
    ) -> Result<Response<pb::ListServerEntriesResponse>, Status> {
        let snapshot = self.registry.snapshot();
        Ok(Response::new(pb::ListServerEntriesResponse {
            entries: snapshot.entries.iter().map(server_entry).collect(),
        }))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteServerEntryRequest>,
    ) -> Result<Response<pb::DeleteServerEntryResponse>, Status> {
        let id = entry_id(&request.into_inner().id)?;
        self.registry
            .delete(id.as_str())
            .await
            .map_err(|e| status::server_registry(&e))?;
        gate::recorded(&self.audit).await?;
        Ok(Response::new(pb::DeleteServerEntryResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .store
            .nodes()
            .await
            .map_err(|e| status::server_store("listing the nodes", &e))?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(node_info).collect(),
        }))
    }

    async fn evict_node(
        &self,
        request: Request<pb::EvictNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let node = node_name("name", &request.into_inner().name)?;
        let not_found = || status::not_found(format!("no node named {}", node.as_str()));
        self.store
            .node(node.clone())
            .await
            .map_err(|e| status::server_store("reading the node", &e))?
            .ok_or_else(not_found)?;
        self.record(AuditEvent {
            spiffe_id: Some(self.node_id(&node)),
            reason: Some(format!(
                "node {} evicted by an operator: its SVID is no longer accepted",
                node.as_str()
            )),
            ..AuditEvent::new(EventKind::Revoke, Outcome::Info)
        })?;
        let evicted = self
            .store
            .evict_node(node.clone())
            .await
            .map_err(|e| status::server_store("evicting the node", &e))?
            .ok_or_else(not_found)?;
        gate::recorded(&self.audit).await?;
        tracing::info!(node = node.as_str(), "node evicted");
        self.end_tasks_of(&node).await?;
        Ok(Response::new(node_info(&NodeRow {
            evicted: true,
            ..evicted
        })))
    }

    async fn get_bundle(
        &self,
        _request: Request<admin_pb::GetBundleRequest>,
    ) -> Result<Response<admin_pb::Bundle>, Status> {
        convert::bundle(&self.authority.bundle())
            .map(Response::new)
            .map_err(|e| status::internal("encoding the bundle", &e))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListFleetTasksRequest>,
    ) -> Result<Response<pb::ListFleetTasksResponse>, Status> {
        let request = request.into_inner();
        let limit = match request.limit {
            0 => DEFAULT_TASK_LIST,
            n if n > MAX_TASK_LIST => {
                return Err(status::invalid("limit", format!("at most {MAX_TASK_LIST}")));
            }
            n => n,
        };
        let tasks = self
            .tasks
            .list(request.include_ended, limit)
            .await
            .map_err(|e| status::server_store("listing the fleet's tasks", &e))?;
        Ok(Response::new(pb::ListFleetTasksResponse {
            tasks: tasks.iter().map(task_message).collect(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetFleetTaskRequest>,
    ) -> Result<Response<pb::FleetTask>, Status> {
        let id = request.into_inner().id;
        check_txn("id", &id)?;
        let task = self
            .tasks
            .get(&id)
            .await
            .map_err(|e| status::server_store("reading the fleet's task", &e))?
            .ok_or_else(|| status::not_found(format!("no task {id} in the fleet's task index")))?;
        Ok(Response::new(task_message(&task)))
    }

    async fn revoke_task(
        &self,
        request: Request<pb::RevokeFleetTaskRequest>,
    ) -> Result<Response<pb::FleetTask>, Status> {
        let id = request.into_inner().id;
        check_txn("id", &id)?;
        let ended = self
            .tasks
            .end(
                vec![FleetTaskEndRequest {
                    txn: id.clone(),
                    reason: "revoked".into(),
                    at: SystemTime::now(),
                }],
                None,
            )
            .await
            .map_err(|e| status::server_store("revoking the task", &e))?;
        if let Some(row) = ended.into_iter().flatten().next() {
            self.record(AuditEvent {
                spiffe_id: Some(row.spiffe_id.clone()),
                task_id: Some(row.txn.clone()),
                node: Some(self.node_id(&row.owner_node)),
                reason: Some("revoked by an operator for the whole fleet".into()),
                ..AuditEvent::new(EventKind::Revoke, Outcome::Info)
            })?;
            tracing::info!(task_id = %row.txn, owner_node = %row.owner_node, "task revoked for the fleet");
            return Ok(Response::new(task_message(&row)));
        }
        // Not ended by this call: it had ended already (the first end
        // stands, and is what is shown), or it is unknown.
        let task = self
            .tasks
            .get(&id)
            .await
            .map_err(|e| status::server_store("reading the fleet's task", &e))?
            .ok_or_else(|| status::not_found(format!("no task {id} in the fleet's task index")))?;
        Ok(Response::new(task_message(&task)))
    }
}

/// A node name from the request, bounded before it is checked (the
/// refusal quotes it).
fn node_name(field: &str, value: &str) -> Result<NodeName, Status> {
    if value.is_empty() {
        return Err(status::invalid(field, "is required"));
    }
    status::bounded(field, value, MAX_NODE_NAME_LEN, "a DNS subdomain")?;
    NodeName::new(value).map_err(|e| status::node_name(field, &e))
}

/// An entry id from the request.
fn entry_id(value: &str) -> Result<EntryId, Status> {
    if value.is_empty() {
        return Err(status::invalid("id", "is required"));
    }
    EntryId::parse(value).map_err(|e| status::invalid("id", e))
}

/// An entry for the wire.
fn server_entry(entry: &ServerEntry) -> pb::ServerEntry {
    pb::ServerEntry {
        entry: Some(convert::entry(&entry.entry)),
        nodes: entry.nodes.iter().map(|n| n.as_str().to_owned()).collect(),
    }
}

/// A node for the wire.
fn node_info(node: &NodeRow) -> pb::NodeInfo {
    pb::NodeInfo {
        name: node.name.as_str().to_owned(),
        attestation: node.attestation.clone(),
        attested_at_ms: convert::unix_ms(node.attested_at),
        svid_serial: node.svid_serial.clone(),
        svid_expires_at_ms: convert::unix_ms(node.svid_expires_at),
        evicted: node.evicted,
    }
}
