//! The admin RPCs. Thin: validate the request, call the domain, convert.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::convert;
use crate::authority::Authority;
use crate::edge::{gate, status};
use crate::proto::admin as pb;
use crate::proto::admin::admin_server::Admin;
use crate::registration::{EntryId, Registry, Selector, SelectorSet};
use crate::svid::SvidIssuer;
use crate::task::{Task, Tasks};
use crate::telemetry::http::Readiness;

/// What a reload changed.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// Entries now from the config file.
    pub config_entries: usize,
    /// Federated trust domains now configured.
    pub federations: usize,
    /// Keys changed in the file that only a restart applies (not applied).
    pub needs_restart: Vec<String>,
}

/// A request to re-read the config file; the answer is the outcome or the
/// reason it was refused (the running config stays then).
pub type ReloadRequest = oneshot::Sender<Result<ReloadOutcome, String>>;

/// What the admin API serves from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminApi {
    registry: Registry,
    svids: SvidIssuer,
    authority: Arc<dyn Authority>,
    tasks: Tasks,
    open_streams: Arc<AtomicUsize>,
    reload: mpsc::Sender<ReloadRequest>,
    readiness: Readiness,
    /// Fleet mode: the link to the server, in one line (Health's `server`).
    server_status: Option<ServerStatus>,
}

/// Says how the agent's link to the fleet's server is, in one line.
#[derive(Clone)]
pub struct ServerStatus(pub Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for ServerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerStatus(..)")
    }
}

impl AdminApi {
    /// An admin API over these parts; reloads are sent on `reload`.
    pub fn new(
        registry: Registry,
        svids: SvidIssuer,
        authority: Arc<dyn Authority>,
        tasks: Tasks,
        open_streams: Arc<AtomicUsize>,
        reload: mpsc::Sender<ReloadRequest>,
        readiness: Readiness,
    ) -> Self {
        Self {
            registry,
            svids,
            authority,
            tasks,
            open_streams,
            reload,
            readiness,
            server_status: None,
        }
    }

    /// Health reports the link to the fleet's server with `status`.
    pub fn with_server_status(mut self, status: ServerStatus) -> Self {
        self.server_status = Some(status);
        self
    }
}

fn entry_id(value: &str) -> Result<EntryId, Status> {
    if value.is_empty() {
        return Err(status::invalid("id", "is required"));
    }
    EntryId::parse(value).map_err(|e| status::invalid("id", e))
}

/// Tasks in one ListTasks answer when the request does not say.
const DEFAULT_TASK_PAGE: usize = 50;
/// Most tasks in one ListTasks answer.
const MAX_TASK_PAGE: usize = 500;
/// Most bytes of tasks in one ListTasks answer, half a client's 4 MiB
/// limit, whatever the tasks hold (intents, tools, audiences, paths).
const MAX_TASK_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Where a page of tasks ends: the last task's creation time (ns since the
/// epoch) and id, the order ListTasks lists in. Opaque to clients.
#[derive(Debug)]
struct TaskCursor {
    created_ns: u128,
    id: String,
}

// === impl TaskCursor ===

impl TaskCursor {
    fn of(task: &Task) -> Self {
        Self {
            created_ns: task
                .created_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            id: task.id.clone(),
        }
    }

    /// `None` for the first page; a token this agent did not make is
    /// refused.
    fn parse(token: &str) -> Result<Option<Self>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || status::invalid("page_token", "is not a next_page_token of ListTasks");
        if token.len() > 256 {
            return Err(bad());
        }
        let (created, id) = token.split_once('.').ok_or_else(bad)?;
        Ok(Some(Self {
            created_ns: created.parse().map_err(|_| bad())?,
            id: id.to_owned(),
        }))
    }

    /// Whether `task` comes after this cursor in listing order.
    fn precedes(&self, task: &Task) -> bool {
        let other = Self::of(task);
        (self.created_ns, self.id.as_str()) < (other.created_ns, other.id.as_str())
    }
}

impl std::fmt::Display for TaskCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_ns, self.id)
    }
}

fn task_info(task: &Task) -> pb::TaskInfo {
    let ended = task.ended();
    pb::TaskInfo {
        id: task.id.clone(),
        spiffe_id: task.spiffe_id.to_string(),
        entry_id: task.entry_id.to_string(),
        owner_pid: task.owner.process.pid(),
        owner_uid: task.owner.uid,
        owner_executable: task
            .owner
            .executable
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        audience: task.audience.clone(),
        intent: task.intent.clone(),
        tools: task.tools.clone(),
        created_at_ms: convert::unix_ms(task.created_at),
        deadline_ms: convert::unix_ms(task.deadline),
        state: if ended.is_some() { "ended" } else { "active" }.into(),
        end_reason: ended.map(|(r, _)| r.to_string()).unwrap_or_default(),
        ended_at_ms: ended.map_or(0, |(_, at)| convert::unix_ms(at)),
        tokens_issued: task.tokens_issued(),
        bound: task.bind_x5t.is_some(),
    }
}

fn task_id(value: &str) -> Result<&str, Status> {
    if value.is_empty() || value.len() > 64 {
        return Err(status::invalid("id", "is required (a task id)"));
    }
    Ok(value)
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let request = request.into_inner();
        let after = TaskCursor::parse(&request.page_token)?;
        let size = match request.page_size {
            0 => DEFAULT_TASK_PAGE,
            n => (n as usize).min(MAX_TASK_PAGE),
        };
        let listed = self
            .tasks
            .list(request.include_ended)
            .into_iter()
            .filter(|t| after.as_ref().is_none_or(|after| after.precedes(t)));
        // At most `size` tasks and MAX_TASK_PAGE_BYTES of them (at least
        // one): whatever the tasks hold, an answer fits a client's limit.
        let (mut tasks, mut bytes) = (Vec::new(), 0);
        let mut last: Option<Arc<Task>> = None;
        let mut next_page_token = String::new();
        for task in listed {
            let info = task_info(&task);
            let len = info.encoded_len();
            if let Some(last) = &last
                && (tasks.len() == size || bytes + len > MAX_TASK_PAGE_BYTES)
            {
                next_page_token = TaskCursor::of(last).to_string();
                break;
            }
            bytes += len;
            tasks.push(info);
            last = Some(task);
        }
        Ok(Response::new(pb::ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskInfo>, Status> {
        let request = request.into_inner();
        let id = task_id(&request.id)?;
        let task = self
            .tasks
            .get(id)
            .ok_or_else(|| status::not_found(format!("no task {id}")))?;
        Ok(Response::new(task_info(&task)))
    }

    async fn revoke_task(
        &self,
        request: Request<pb::RevokeTaskRequest>,
    ) -> Result<Response<pb::TaskInfo>, Status> {
        let request = request.into_inner();
        let id = task_id(&request.id)?;
        let task = self.tasks.revoke(id).await.map_err(|e| status::task(&e))?;
        tracing::info!(task_id = %task.id, "task revoked by an operator");
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(task_info(&task)))
    }

    async fn create_entry(
        &self,
        request: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let spec = convert::spec(request.into_inner().spec)?;
        let entry = self
            .registry
            .create(&spec)
            .await
            .map_err(|e| status::registration(&e))?;
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(convert::entry(&entry)))
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let request = request.into_inner();
        let id = entry_id(&request.id)?;
        let spec = convert::spec(request.spec)?;
        let expected = (request.revision != 0).then_some(request.revision);
        let entry = self
            .registry
            .update(&id, &spec, expected)
            .await
            .map_err(|e| status::registration(&e))?;
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(convert::entry(&entry)))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let id = entry_id(&request.into_inner().id)?;
        self.registry
            .delete(&id)
            .await
            .map_err(|e| status::registration(&e))?;
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let id = entry_id(&request.into_inner().id)?;
        let snapshot = self.registry.snapshot();
        let entry = snapshot
            .get(&id)
            .ok_or_else(|| status::not_found(format!("no entry with id {id}")))?;
        Ok(Response::new(convert::entry(entry)))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let request = request.into_inner();
        if request.selectors.len() > 64 {
            return Err(status::invalid("selectors", "at most 64 filters"));
        }
        let selectors = request
            .selectors
            .iter()
            .map(|s| {
                s.parse::<Selector>()
                    .map_err(|e| status::invalid("selectors", e))
            })
            .collect::<Result<SelectorSet, Status>>()?;
        let spiffe_id = (!request.spiffe_id.is_empty()).then_some(request.spiffe_id.as_str());
        let entries = self
            .registry
            .snapshot()
            .filtered(spiffe_id, &selectors)
            .iter()
            .map(|e| convert::entry(e))
            .collect();
        Ok(Response::new(pb::ListEntriesResponse { entries }))
    }

    async fn list_svids(
        &self,
        _request: Request<pb::ListSvidsRequest>,
    ) -> Result<Response<pb::ListSvidsResponse>, Status> {
        let issuer = self.svids.clone();
        let recorded = tokio::task::spawn_blocking(move || issuer.issued_live())
            .await
            .map_err(|e| status::agent_fault("listing SVIDs", &e))?
            .map_err(|e| status::agent_fault("listing SVIDs", &e))?;
        // Recorded issuance (including before a restart), completed by the
        // cache (records are written off the request path).
        let mut svids: BTreeMap<String, pb::IssuedSvid> = recorded
            .into_iter()
            .map(|r| {
                (
                    r.serial.clone(),
                    pb::IssuedSvid {
                        spiffe_id: r.spiffe_id,
                        entry_id: r.entry_id,
                        serial: r.serial,
                        not_before_ms: convert::unix_ms(r.not_before),
                        not_after_ms: convert::unix_ms(r.not_after),
                        holders: Vec::new(),
                    },
                )
            })
            .collect();
        let now = std::time::SystemTime::now();
        for svid in self
            .svids
            .x509_svids()
            .into_iter()
            .filter(|s| s.not_after > now)
        {
            svids
                .entry(svid.serial.clone())
                .or_insert_with(|| pb::IssuedSvid {
                    spiffe_id: svid.spiffe_id.to_string(),
                    entry_id: svid.entry_id.to_string(),
                    serial: svid.serial.clone(),
                    not_before_ms: convert::unix_ms(svid.not_before),
                    not_after_ms: convert::unix_ms(svid.not_after),
                    holders: Vec::new(),
                });
        }
        for holder in self.svids.holders() {
            for serial in &holder.serials {
                if let Some(svid) = svids.get_mut(serial) {
                    svid.holders.push(pb::SvidHolder {
                        pid: holder.pid,
                        uid: holder.uid,
                        executable: holder
                            .executable
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        selectors: holder.selectors.clone(),
                        since_ms: convert::unix_ms(holder.since),
                    });
                }
            }
        }
        let mut svids: Vec<_> = svids.into_values().collect();
        svids.sort_by(|a, b| {
            a.spiffe_id
                .cmp(&b.spiffe_id)
                .then(b.not_after_ms.cmp(&a.not_after_ms))
        });
        Ok(Response::new(pb::ListSvidsResponse { svids }))
    }

    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        convert::bundle(&self.authority.bundle())
            .map(Response::new)
            .map_err(|e| status::internal("encoding the bundle", &e))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        // The same answer as the HTTP endpoint's /readyz.
        let readiness = self.readiness.clone();
        let problems = tokio::task::spawn_blocking(move || readiness.problems())
            .await
            .map_err(|e| status::agent_fault("the readiness check", &e))?;
        Ok(Response::new(pb::HealthResponse {
            serving: problems.is_empty(),
            problems,
            trust_domain: self.registry.trust_domain().to_string(),
            entries: u32::try_from(self.registry.snapshot().len()).unwrap_or(u32::MAX),
            open_streams: u32::try_from(self.open_streams.load(Ordering::Relaxed))
                .unwrap_or(u32::MAX),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            server: self
                .server_status
                .as_ref()
                .map(|status| (status.0)())
                .unwrap_or_default(),
        }))
    }

    async fn reload(
        &self,
        _request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let (tx, rx) = oneshot::channel();
        self.reload
            .send(tx)
            .await
            .map_err(|_| status::unavailable("the agent is stopping"))?;
        let outcome = rx
            .await
            .map_err(|_| status::unavailable("the agent is stopping"))?
            .map_err(|reason| {
                status::failed_precondition(format!(
                    "reload refused, the running config stays: {reason}"
                ))
            })?;
        // The reload's entry changes and policy record are in the trail.
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(pb::ReloadResponse {
            config_entries: u32::try_from(outcome.config_entries).unwrap_or(u32::MAX),
            federations: u32::try_from(outcome.federations).unwrap_or(u32::MAX),
            needs_restart: outcome.needs_restart,
        }))
    }
}
