//! The Task API RPCs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::attestation::{Attested, Attestor, Caller};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::authority::Authority;
use crate::bundle::TrustBundle;
use crate::edge::gate::{self, Subject};
use crate::edge::status;
use crate::federation::Federation;
use crate::policy::{Action, Policy, PolicyContext, PolicyRequest, Resource};
use crate::proto::task as pb;
use crate::proto::task::tasks_server::Tasks as TasksRpc;
use crate::registration::{Match, Registry};
// The one limit for every token the agent is handed.
use crate::svid::jwt::MAX_TOKEN_LEN;
use crate::task::{
    BeginRequest, IssuedToken, Owner, Task, TaskConfig, Tasks, ValidatedTaskToken, claims,
};
use crate::transport::Jobs;

/// Largest certificate accepted in a request, in bytes.
const MAX_CERT_LEN: usize = 16 * 1024;

/// What the Task API serves from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskApi {
    attestor: Attestor,
    registry: Registry,
    tasks: Tasks,
    authority: Arc<dyn Authority>,
    federation: Federation,
    policy: Policy,
    jobs: Jobs,
    /// Whether a caller with no identity may validate tokens.
    allow_unauthenticated_verifiers: bool,
}

impl TaskApi {
    /// A Task API over these parts; watch streams run on `jobs` until
    /// `cancel`.
    pub fn new(
        attestor: Attestor,
        registry: Registry,
        tasks: Tasks,
        authority: Arc<dyn Authority>,
        federation: Federation,
        policy: Policy,
        jobs: Jobs,
    ) -> Self {
        Self {
            attestor,
            registry,
            tasks,
            authority,
            federation,
            policy,
            jobs,
            allow_unauthenticated_verifiers: false,
        }
    }

    /// Lets callers that match no entry validate task tokens (the
    /// `allow_unauthenticated_verifiers` setting); off by default.
    pub fn allow_unauthenticated_verifiers(mut self, allow: bool) -> Self {
        self.allow_unauthenticated_verifiers = allow;
        self
    }

    /// The caller, from the kernel, admitted by its uid's audit budget.
    async fn identify<T>(&self, request: &Request<T>) -> Result<(Caller, Attested), Status> {
        let (caller, attested) = crate::edge::identify(&self.attestor, request).await?;
        gate::admit(self.tasks.audit(), &attested)?;
        Ok((caller, attested))
    }

    /// Policy on renewing `task`'s token for the process `attested`.
    pub(crate) fn renew_decision(
        &self,
        attested: &Attested,
        task: &Task,
    ) -> Result<Vec<String>, Status> {
        let selectors = gate::selectors(attested);
        let executable = gate::executable(attested);
        let left = task
            .deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .as_secs();
        gate::decide(
            &self.policy,
            self.tasks.audit(),
            attested,
            &PolicyRequest {
                principal: &task.spiffe_id,
                selectors: &selectors,
                action: Action::RenewTask,
                resource: Resource::Audience(&task.audience),
                context: PolicyContext {
                    intent: &task.intent,
                    tools: &task.tools,
                    ttl_seconds: gate::ttl_seconds(left),
                    actors: &[],
                    uid: attested.uid,
                    executable: &executable,
                    audience: &task.audience,
                },
            },
            Subject {
                task_id: Some(task.id.clone()),
                actors: Vec::new(),
            },
        )
    }

    /// Policy on using `tool` under the validated token. The principal is
    /// the token's subject, attested when its task began, not here: its
    /// selectors are not the caller's (the caller is the validator, an MCP
    /// server), so the principal carries none; `uid` and `executable` in
    /// the context describe the process asking.
    fn use_tool_decision(
        &self,
        attested: &Attested,
        token: &ValidatedTaskToken,
        tool: &str,
        audience: &str,
    ) -> Result<Vec<String>, Status> {
        let selectors: [String; 0] = [];
        let executable = gate::executable(attested);
        let tools: Vec<String> = token.claims.tools().map(str::to_owned).collect();
        let actors = token.claims.actors();
        let left = gate::seconds_until(token.claims.exp);
        gate::decide(
            &self.policy,
            self.tasks.audit(),
            attested,
            &PolicyRequest {
                principal: &token.spiffe_id,
                selectors: &selectors,
                action: Action::UseTool,
                resource: Resource::Tool(tool),
                context: PolicyContext {
                    intent: &token.claims.tctx.intent,
                    tools: &tools,
                    ttl_seconds: gate::ttl_seconds(left),
                    actors: &actors,
                    uid: attested.uid,
                    executable: &executable,
                    audience,
                },
            },
            Subject {
                task_id: Some(token.claims.txn.clone()),
                actors: actors.clone(),
            },
        )
    }

    /// One `validate` record per ValidateTaskToken: who asked about which
    /// token (its `jti`, never the token) and what was answered.
    fn audit_validation(
        &self,
        attested: &Attested,
        audience: &str,
        tool: Option<&str>,
        outcome: &Result<ValidatedTaskToken, String>,
    ) -> Result<(), Status> {
        crate::telemetry::metrics().validated("task_token", outcome.is_ok());
        let mut event = AuditEvent {
            audience: Some(audience.to_owned()),
            tools: tool.map(|t| vec![t.to_owned()]).unwrap_or_default(),
            ..gate::caller_event(attested, EventKind::Validate, Outcome::Allow)
        };
        match outcome {
            Ok(valid) => {
                event.spiffe_id = Some(valid.spiffe_id.to_string());
                event.task_id = Some(valid.claims.txn.clone());
                event.token_id = Some(valid.claims.jti.clone());
                event.actors = valid.claims.actors();
            }
            Err(reason) => {
                event.decision = Outcome::Deny;
                event.reason = Some(reason.clone());
            }
        }
        gate::record_validation(self.tasks.audit(), event)
    }

    /// The own bundle, and the federated bundles the caller's entries name.
    fn bundles_for(
        &self,
        matches: &[Match],
    ) -> impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>> + use<> {
        let own = self.authority.bundle();
        let wanted: BTreeSet<TrustDomain> = crate::svid::jwt::federated_domains(matches);
        let federated = self.federation.current();
        move |td: &TrustDomain| {
            if td == own.trust_domain() {
                Some(Arc::clone(&own))
            } else if wanted.contains(td) {
                federated.get(td).cloned()
            } else {
                None
            }
        }
    }

    /// The thumbprint of a certificate the caller binds its tokens to: an
    /// X.509-SVID this agent issued for `spiffe_id`.
    fn binding(&self, cert: &[u8], spiffe_id: &SpiffeId) -> Result<Option<String>, Status> {
        if cert.is_empty() {
            return Ok(None);
        }
        if cert.len() > MAX_CERT_LEN {
            return Err(status::invalid_argument("bind_certificate is too large"));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|_| status::invalid_argument("bind_certificate is not a DER certificate"))?;
        let uri = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
            });
        if uri.as_deref() != Some(spiffe_id.to_string().as_str()) {
            return Err(status::invalid_argument(format!(
                "bind_certificate is not an X.509-SVID for {spiffe_id}"
            )));
        }
        if !parsed.validity().is_valid() || !self.authority.issued_here(cert) {
            return Err(status::invalid_argument(
                "bind_certificate is not a current X.509-SVID issued by this agent",
            ));
        }
        Ok(Some(claims::thumbprint(cert)))
    }
}

/// The caller's executable as the policy and the audit trail see it.
fn token_message(token: IssuedToken) -> pb::TaskToken {
    pb::TaskToken {
        token: token.token,
        expires_at_ms: unix_ms(token.expires_at),
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Refuses more than `tasks.max_tools` tools before any work is done.
fn few_enough(tools: &[String], limits: &TaskConfig) -> Result<(), Status> {
    if tools.len() > limits.max_tools {
        return Err(status::invalid_argument(format!(
            "tools: {} tools; the limit is {} (tasks.max_tools)",
            tools.len(),
            limits.max_tools
        )));
    }
    Ok(())
}

/// The one bound on every token the agent is handed.
const TOKEN_LIMIT: &str = "the JWT-SVID size limit";

fn task_id(value: &str) -> Result<&str, Status> {
    if value.is_empty() {
        return Err(status::invalid_argument("task_id is required"));
    }
    status::bounded("task_id", value, 64, "a task id's length")?;
    Ok(value)
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl TasksRpc for TaskApi {
    type WatchTaskStream = Stream<pb::TaskToken>;

    async fn begin_task(
        &self,
        request: Request<pb::BeginTaskRequest>,
    ) -> Result<Response<pb::BeginTaskResponse>, Status> {
        {
            // The configured limits, checked before the caller is attested.
            let req = request.get_ref();
            let limits = self.tasks.config();
            status::bounded(
                "audience",
                &req.audience,
                limits.max_audience_len,
                "limits.max_audience_len",
            )?;
            status::bounded(
                "intent",
                &req.intent,
                limits.max_intent_len,
                "tasks.max_intent_len",
            )?;
            status::bounded("spiffe_id", &req.spiffe_id, 2048, "a SPIFFE ID's length")?;
            if !req.spiffe_id.is_empty() {
                // A malformed ID is a bad request, not a denial.
                SpiffeId::new(&req.spiffe_id).map_err(|e| status::invalid("spiffe_id", e))?;
            }
            few_enough(&req.tools, limits)?;
        }
        let (caller, attested) = self.identify(&request).await?;
        let req = request.into_inner();
        let matches = self.registry.snapshot().matching(&attested.selectors);
        let matched = if req.spiffe_id.is_empty() {
            matches.first()
        } else {
            matches
                .iter()
                .find(|m| m.spiffe_id.to_string() == req.spiffe_id)
        }
        .ok_or_else(|| {
            status::denied(
                "no identity issued: no registration entry grants this process that identity",
            )
        })?;
        let bind_x5t = self.binding(&req.bind_certificate, &matched.spiffe_id)?;
        let owner = Owner {
            process: caller.key(),
            uid: attested.uid,
            executable: attested.executable.clone(),
            exe_sha256: attested
                .selectors
                .iter()
                .find(|s| s.key() == "sha256")
                .and_then(|s| s.value().split_once(':').map(|(_, v)| v.to_owned())),
        };
        let ttl = (req.ttl_ms != 0).then(|| Duration::from_millis(req.ttl_ms));
        // The request is checked before policy sees it: a malformed one is
        // InvalidArgument, never a policy denial and its record.
        let ttl_seconds = self
            .tasks
            .check_begin(&req.audience, &req.intent, &req.tools, ttl)
            .map_err(|e| status::task(&e))?
            .as_secs();
        let selectors = gate::selectors(&attested);
        let executable = gate::executable(&attested);
        let decided_by = gate::decide(
            &self.policy,
            self.tasks.audit(),
            &attested,
            &PolicyRequest {
                principal: &matched.spiffe_id,
                selectors: &selectors,
                action: Action::BeginTask,
                resource: Resource::Audience(&req.audience),
                context: PolicyContext {
                    intent: &req.intent,
                    tools: &req.tools,
                    ttl_seconds: gate::ttl_seconds(ttl_seconds),
                    actors: &[],
                    uid: attested.uid,
                    executable: &executable,
                    audience: &req.audience,
                },
            },
            Subject::default(),
        )?;
        let begin = BeginRequest {
            audience: req.audience,
            intent: req.intent,
            tools: req.tools,
            ttl,
            bind_x5t,
            scope_descendants: req.scope_descendants,
            decided_by,
        };
        let (task, token) = self
            .tasks
            .begin(&caller, owner, matched, begin)
            .await
            .map_err(|e| status::task(&e))?;
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(pb::BeginTaskResponse {
            task_id: task.id.clone(),
            token: Some(token_message(token)),
            deadline_ms: unix_ms(task.deadline),
        }))
    }

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let (caller, attested) = self.identify(&request).await?;
        let id = task_id(&request.get_ref().task_id)?.to_owned();
        let task = self
            .tasks
            .owned(&caller, &id)
            .map_err(|e| status::task(&e))?;
        let slot = self
            .jobs
            .streams
            .take(&caller)
            .map_err(|e| status::exhausted("too many open streams", &e))?;
        let decided_by = self.renew_decision(&attested, &task)?;
        let first = self
            .tasks
            .token_for(&task, decided_by)
            .await
            .map_err(|e| status::task(&e))?;
        let (tx, rx) = mpsc::channel(1);
        let tasks = self.tasks.clone();
        let api = self.clone();
        let registry = self.registry.clone();
        let cancel = self.jobs.cancel.clone();
        let mut ends = tasks.subscribe();
        self.jobs.tracker.spawn(async move {
            let _slot = slot;
            let mut token = first;
            loop {
                let expires_at = token.expires_at;
                if let Err(status) = gate::recorded(tasks.audit()).await {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                if tx.send(Ok(token_message(token))).await.is_err() {
                    return;
                }
                // Renew at two thirds of the token's life: a client always
                // holds a token with a third of its life left.
                let now = SystemTime::now();
                let left = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
                let renew_in = left.saturating_sub(left / 3).max(Duration::from_millis(200));
                let sleep = tokio::time::sleep(renew_in);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            let _ = tx.send(Err(status::unavailable("tether is shutting down"))).await;
                            return;
                        }
                        () = tx.closed() => return,
                        () = &mut sleep => break,
                        changed = ends.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            if let Some((reason, _)) = task.ended() {
                                let _ = tx.send(Err(status::task_ended(&task.id, reason))).await;
                                return;
                            }
                        }
                    }
                }
                // Re-check before every renewal: the task lives, its owner
                // too (the lifecycle loop ends it otherwise), its entry is there.
                if let Some((reason, _)) = task.ended() {
                    let _ = tx.send(Err(status::task_ended(&task.id, reason))).await;
                    return;
                }
                if registry.snapshot().get(&task.entry_id).is_none() {
                    let _ = tx
                        .send(Err(status::task_ended(&task.id, crate::task::EndReason::EntryRemoved)))
                        .await;
                    return;
                }
                // Policy decides every refresh, not once per stream.
                let decided_by = match api.renew_decision(&attested, &task) {
                    Ok(ids) => ids,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                token = match tasks.token_for(&task, decided_by).await {
                    Ok(token) => token,
                    Err(error) => {
                        let _ = tx.send(Err(status::task(&error))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_task(
        &self,
        request: Request<pb::RenewTaskRequest>,
    ) -> Result<Response<pb::TaskToken>, Status> {
        let (caller, attested) = self.identify(&request).await?;
        let id = task_id(&request.get_ref().task_id)?;
        let task = self
            .tasks
            .owned(&caller, id)
            .map_err(|e| status::task(&e))?;
        let decided_by = self.renew_decision(&attested, &task)?;
        let token = self
            .tasks
            .token_for(&task, decided_by)
            .await
            .map_err(|e| status::task(&e))?;
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(token_message(token)))
    }

    async fn end_task(
        &self,
        request: Request<pb::EndTaskRequest>,
    ) -> Result<Response<pb::EndTaskResponse>, Status> {
        let (caller, _) = self.identify(&request).await?;
        let id = task_id(&request.get_ref().task_id)?;
        self.tasks
            .end(&caller, id)
            .await
            .map_err(|e| status::task(&e))?;
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(pb::EndTaskResponse {}))
    }

    async fn exchange_token(
        &self,
        request: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::ExchangeTokenResponse>, Status> {
        {
            let req = request.get_ref();
            if req.subject_token.is_empty() {
                return Err(status::invalid_argument("subject_token is required"));
            }
            let limits = self.tasks.config();
            status::bounded(
                "subject_token",
                &req.subject_token,
                MAX_TOKEN_LEN,
                TOKEN_LIMIT,
            )?;
            status::bounded(
                "audience",
                &req.audience,
                limits.max_audience_len,
                "limits.max_audience_len",
            )?;
            few_enough(&req.tools, limits)?;
            if req.subject_presenter_certificate.len() > MAX_CERT_LEN {
                return Err(status::invalid_argument(
                    "subject_presenter_certificate is too large",
                ));
            }
        }
        let (_caller, attested) = self.identify(&request).await?;
        let req = request.into_inner();
        let matches = self.registry.snapshot().matching(&attested.selectors);
        if matches.is_empty() {
            return Err(status::denied(
                "no identity issued: only a registered workload may exchange tokens",
            ));
        }
        // Bound to the certificate of the identity that exchanges.
        let bind_x5t = match matches.first() {
            Some(first) if !req.bind_certificate.is_empty() => {
                let bound = matches.iter().find_map(|m| {
                    self.binding(&req.bind_certificate, &m.spiffe_id)
                        .ok()
                        .flatten()
                });
                Some(bound.ok_or_else(|| {
                    status::invalid_argument(format!(
                        "bind_certificate is not a current X.509-SVID of the caller (for example {})",
                        first.spiffe_id
                    ))
                })?)
            }
            _ => None,
        };
        let exchange = self
            .tasks
            .prepare_exchange(
                &req.subject_token,
                (!req.subject_presenter_certificate.is_empty())
                    .then_some(req.subject_presenter_certificate.as_slice()),
                &matches,
                &req.audience,
                &req.tools,
                self.bundles_for(&matches),
            )
            .map_err(|e| status::task(&e))?;
        let selectors = gate::selectors(&attested);
        let executable = gate::executable(&attested);
        let left = gate::seconds_until(exchange.subject.exp);
        let decided_by = gate::decide(
            &self.policy,
            self.tasks.audit(),
            &attested,
            &PolicyRequest {
                principal: &exchange.actor,
                selectors: &selectors,
                action: Action::ExchangeToken,
                resource: Resource::Audience(&exchange.audience),
                context: PolicyContext {
                    intent: &exchange.subject.tctx.intent,
                    tools: &exchange.tools,
                    ttl_seconds: gate::ttl_seconds(left),
                    actors: &exchange.actors,
                    uid: attested.uid,
                    executable: &executable,
                    audience: &exchange.audience,
                },
            },
            Subject {
                task_id: Some(exchange.subject.txn.clone()),
                actors: exchange.actors.clone(),
            },
        )?;
        let token = self
            .tasks
            .complete_exchange(exchange, bind_x5t, decided_by)
            .await
            .map_err(|e| status::task(&e))?;
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(pb::ExchangeTokenResponse {
            token: Some(token_message(token)),
        }))
    }

    async fn validate_task_token(
        &self,
        request: Request<pb::ValidateTaskTokenRequest>,
    ) -> Result<Response<pb::ValidateTaskTokenResponse>, Status> {
        {
            let req = request.get_ref();
            if req.token.is_empty() {
                return Err(status::invalid_argument("token is required"));
            }
            if req.audience.is_empty() {
                return Err(status::invalid_argument("audience is required"));
            }
            let limits = self.tasks.config();
            status::bounded("token", &req.token, MAX_TOKEN_LEN, TOKEN_LIMIT)?;
            status::bounded(
                "audience",
                &req.audience,
                limits.max_audience_len,
                "limits.max_audience_len",
            )?;
            status::bounded("tool", &req.tool, limits.max_tool_len, "tasks.max_tool_len")?;
            if req.presenter_certificate.len() > MAX_CERT_LEN {
                return Err(status::invalid_argument(
                    "presenter_certificate is too large",
                ));
            }
        }
        let (_caller, attested) = self.identify(&request).await?;
        let req = request.into_inner();
        let matches = self.registry.snapshot().matching(&attested.selectors);
        gate::verifier(!matches.is_empty(), self.allow_unauthenticated_verifiers)?;
        let tool = (!req.tool.is_empty()).then_some(req.tool.as_str());
        let presenter =
            (!req.presenter_certificate.is_empty()).then_some(req.presenter_certificate.as_slice());
        let validated = self
            .tasks
            .validate(
                &req.token,
                &req.audience,
                tool,
                presenter,
                self.bundles_for(&matches),
            )
            .map_err(|rejection| crate::error::chain(&rejection))
            .and_then(|valid| match tool {
                // Using a tool is a decision of its own, made now.
                Some(tool) => self
                    .use_tool_decision(&attested, &valid, tool, &req.audience)
                    .map(|_| valid)
                    .map_err(|status| status.message().to_owned()),
                None => Ok(valid),
            });
        self.audit_validation(&attested, &req.audience, tool, &validated)?;
        let response = match validated {
            Ok(valid) => pb::ValidateTaskTokenResponse {
                valid: true,
                reason: String::new(),
                spiffe_id: valid.spiffe_id.to_string(),
                task_id: valid.claims.txn.clone(),
                actors: valid.claims.actors(),
                claims: Some(crate::edge::json::to_struct(valid.raw_claims)),
            },
            Err(reason) => pb::ValidateTaskTokenResponse {
                valid: false,
                reason,
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }
}
