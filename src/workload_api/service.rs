//! The SPIFFE Workload API RPCs. Thin: identify the caller, attest, match
//! entries, issue, convert. Streams send the full state first, as soon as
//! the caller is attested, then again whenever any part of it changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::{WorkloadApiConfig, convert};
use crate::attestation::{Attested, Attestor, Caller};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::bundle::TrustBundle;
use crate::edge::gate::{self, Subject};
use crate::edge::status;
use crate::federation::{FederatedBundles, Federation};
use crate::policy::{Action, Policy, PolicyContext, PolicyRequest, Resource};
use crate::proto::workload as pb;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use crate::registration::{EntrySet, Match, Registry, SelectorSet};
use crate::svid::{self, Holder, Interest, SvidIssuer, SvidWatch};
use crate::task::Tasks;
use crate::transport::{Jobs, Slot};

/// The audit record's reason for a JWT-SVID served from the cache.
const JWT_FROM_CACHE: &str = "served from the JWT-SVID cache";

/// What the Workload API serves from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    attestor: Attestor,
    registry: Registry,
    svids: SvidIssuer,
    federation: Federation,
    tasks: Tasks,
    policy: Policy,
    config: WorkloadApiConfig,
    jobs: Jobs,
    open_streams: Arc<AtomicUsize>,
}

/// Counts a stream as open for as long as its job runs.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counter))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything a stream's state depends on; any change wakes the stream.
/// Of the SVID cache, only the SVIDs the stream holds (its [`Interest`]).
struct Watches {
    entries: watch::Receiver<Arc<EntrySet>>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    federated: watch::Receiver<Arc<FederatedBundles>>,
    svids: SvidWatch,
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

// === impl WorkloadApi ===

impl WorkloadApi {
    /// A Workload API serving from these parts. Stream jobs are spawned on
    /// `jobs` and end when it is cancelled.
    #[expect(
        clippy::too_many_arguments,
        reason = "the composition root hands the edge each part it serves from; a struct would only rename them"
    )]
    pub fn new(
        attestor: Attestor,
        registry: Registry,
        svids: SvidIssuer,
        federation: Federation,
        tasks: Tasks,
        policy: Policy,
        config: WorkloadApiConfig,
        jobs: Jobs,
    ) -> Self {
        Self {
            attestor,
            registry,
            svids,
            federation,
            tasks,
            policy,
            config,
            jobs,
            open_streams: Arc::default(),
        }
    }

    /// The number of streams being served right now (shared counter).
    pub fn open_streams(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.open_streams)
    }

    /// Who is calling: the connection's peer, attested now.
    /// The caller, from the kernel, admitted by its uid's audit budget.
    async fn identify<T>(&self, request: &Request<T>) -> Result<(Caller, Attested), Status> {
        let (caller, attested) = crate::edge::identify(&self.attestor, request).await?;
        gate::admit(self.tasks.audit(), &attested)?;
        Ok((caller, attested))
    }

    /// A process running under a task that scopes its owner's descendants
    /// (`tether task run`) gets that task's token from the standard
    /// FetchJWTSVID, for the task's audience only. `None` when the caller
    /// is not in such a task.
    async fn task_scoped_jwt(
        &self,
        caller: &Caller,
        attested: &Attested,
        request: &pb::JwtsvidRequest,
    ) -> Result<Option<pb::JwtsvidResponse>, Status> {
        if !self.tasks.has_scopes() {
            return Ok(None);
        }
        let mut chain = vec![caller.key()];
        chain.extend(self.attestor.lineage(caller).await);
        let Some(task) = self.tasks.scope_of(&chain) else {
            return Ok(None);
        };
        if request.audience.len() != 1 || request.audience[0] != task.audience {
            return Err(status::denied(format!(
                "this process runs under task {}: it may only get tokens for the task's audience {:?}",
                task.id, task.audience
            )));
        }
        if !request.spiffe_id.is_empty() && request.spiffe_id != task.spiffe_id.to_string() {
            return Err(status::denied(format!(
                "this process runs under task {} as {}",
                task.id, task.spiffe_id
            )));
        }
        let selectors = gate::selectors(attested);
        let executable = gate::executable(attested);
        let decided_by = gate::decide(
            &self.policy,
            self.tasks.audit(),
            attested,
            &PolicyRequest {
                principal: &task.spiffe_id,
                selectors: &selectors,
                action: Action::FetchJwtSvid,
                resource: Resource::Audience(&task.audience),
                context: PolicyContext {
                    intent: &task.intent,
                    tools: &task.tools,
                    uid: attested.uid,
                    executable: &executable,
                    audience: &task.audience,
                    ..PolicyContext::default()
                },
            },
            Subject {
                task_id: Some(task.id.clone()),
                actors: Vec::new(),
            },
        )?;
        let token = self
            .tasks
            .token_for(&task, decided_by)
            .await
            .map_err(|e| status::task(&e))?;
        tracing::debug!(pid = caller.pid(), task_id = %task.id, "issued a task-scoped JWT-SVID");
        Ok(Some(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: task.spiffe_id.to_string(),
                svid: token.token,
                hint: String::new(),
            }],
        }))
    }

    fn watches(&self, interest: Interest) -> Watches {
        Watches {
            entries: self.registry.subscribe(),
            bundle: self.svids.authority().subscribe_bundle(),
            federated: self.federation.subscribe(),
            svids: self.svids.subscribe_x509(interest),
        }
    }

    /// The caller's X.509 state: one SVID per matching entry (the first is
    /// the default) and the bundles of the domains those entries federate
    /// with; and the SVIDs and CRLs it depends on.
    async fn x509_state(
        &self,
        caller: &Caller,
        selectors: &SelectorSet,
    ) -> Result<(pb::X509svidResponse, Interest), Status> {
        let matches = self.registry.snapshot().matching(selectors);
        if matches.is_empty() {
            return Err(status::no_identity());
        }
        let own = self.svids.authority().bundle().x509_der();
        let mut interest = Interest::NONE.crls();
        let mut svids = Vec::with_capacity(matches.len());
        for m in &matches {
            let svid = self
                .svids
                .x509_svid(m, caller)
                .await
                .map_err(|e| status::svid(&e))?;
            interest = interest.key(&svid.key());
            svids.push(convert::x509_svid(&svid, m.entry.hint.as_deref(), &own));
        }
        let federated = self.federated_bundles(&matches);
        let response = pb::X509svidResponse {
            svids,
            crl: self.svids.crls().to_vec(),
            federated_bundles: convert::x509_bundles(federated.iter().map(|b| &**b)),
        };
        Ok((response, interest))
    }

    /// Own bundle plus the federated bundles the caller's entries name.
    /// Without any identity only verifiers allowed by configuration get
    /// the own bundle.
    fn bundle_state(&self, selectors: &SelectorSet) -> Result<Vec<Arc<TrustBundle>>, Status> {
        let matches = self.registry.snapshot().matching(selectors);
        if matches.is_empty() && !self.config.allow_unauthenticated_verifiers {
            return Err(status::no_identity());
        }
        let mut bundles = vec![self.svids.authority().bundle()];
        bundles.extend(self.federated_bundles(&matches));
        Ok(bundles)
    }

    fn federated_bundles(&self, matches: &[Match]) -> Vec<Arc<TrustBundle>> {
        let wanted = svid::jwt::federated_domains(matches);
        let all = self.federation.current();
        wanted
            .iter()
            .filter_map(|td| all.get(td).cloned())
            .collect()
    }

    /// A bundle stream (X.509 or JWT form, as `encode` makes it).
    async fn bundle_stream<R, T>(
        &self,
        request: &Request<R>,
        method: &'static str,
        encode: fn(&Self, &[Arc<TrustBundle>]) -> T,
    ) -> Result<Response<Stream<T>>, Status>
    where
        T: PartialEq + Clone + Send + 'static,
    {
        let (caller, attested) = self.identify(request).await?;
        let slot = self
            .jobs
            .streams
            .take(&caller)
            .map_err(|e| status::exhausted("too many open streams", &e))?;
        let selectors = attested.selectors;
        let state = move |api: &Self| {
            api.bundle_state(&selectors)
                .map(|b| (encode(api, &b), Interest::NONE))
        };
        let first = state(self)?;
        Ok(Response::new(self.stream(
            method,
            (caller, slot),
            first,
            move |api: &Self| Box::pin(std::future::ready(state(api))),
            |_| {},
        )))
    }

    /// Sends `first`, then the recomputed state after every change that
    /// alters it, until the client leaves, the caller exits, the state
    /// becomes an error (sent, then the stream ends) or the agent stops.
    /// `sent` sees every message that went out. Each state comes with the
    /// cache [`Interest`] it depends on, which the stream then follows.
    /// `compute` may wait (an X.509-SVID being issued) without holding a
    /// worker.
    /// The caller's stream `slot` is held until the stream ends.
    fn stream<T, F, S>(
        &self,
        method: &'static str,
        (caller, slot): (Caller, Slot),
        first: (T, Interest),
        compute: F,
        sent: S,
    ) -> Stream<T>
    where
        T: PartialEq + Clone + Send + 'static,
        F: for<'a> Fn(&'a Self) -> BoxFuture<'a, Result<(T, Interest), Status>> + Send + 'static,
        S: Fn(&T) + Send + 'static,
    {
        // Subscribed after `first` was computed, so the loop recomputes once
        // before its first wait: a change in between is never lost.
        let (first, interest) = first;
        let mut watches = self.watches(interest);
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let span = tracing::debug_span!("stream", method, pid = caller.pid());
        let open = OpenStream::new(&self.open_streams);
        self.jobs.tracker.spawn(
            async move {
                let _held = (open, slot);
                let cancel = this.jobs.cancel.clone();
                let mut last = first.clone();
                if !this.recorded(interest, &tx, &cancel).await {
                    return;
                }
                sent(&first);
                if !send(&tx, Ok(first), &cancel).await {
                    return;
                }
                let mut recheck = true;
                loop {
                    if !recheck {
                        tokio::select! {
                            () = cancel.cancelled() => {
                                let _ = tx.try_send(Err(status::shutting_down()));
                                return;
                            }
                            () = tx.closed() => return,
                            () = caller.exited() => return,
                            alive = watches.changed() => if !alive { return },
                        }
                    }
                    recheck = false;
                    match compute(&this).await {
                        Ok((state, interest)) => {
                            if interest != watches.svids.interest() {
                                // Holds other SVIDs now: follow those, and
                                // look once more for a change in between.
                                watches.svids = this.svids.subscribe_x509(interest);
                                recheck = true;
                            }
                            if state == last {
                                continue;
                            }
                            last = state.clone();
                            tracing::debug!("pushing an update");
                            if !this.recorded(interest, &tx, &cancel).await {
                                return;
                            }
                            sent(&state);
                            if !send(&tx, Ok(state), &cancel).await {
                                return;
                            }
                        }
                        Err(status) => {
                            tracing::info!(code = ?status.code(), message = status.message(), "ending stream");
                            let _ = send(&tx, Err(status), &cancel).await;
                            return;
                        }
                    }
                }
            }
            .instrument(span),
        );
        ReceiverStream::new(rx)
    }

    /// Whether what the state about to be sent recorded is in the audit
    /// trail; if it cannot be, the stream gets Unavailable instead, and
    /// ends. A state that holds no SVIDs (`interest` is none: bundles)
    /// issued nothing, and waits for nothing.
    async fn recorded<T>(
        &self,
        interest: Interest,
        tx: &mpsc::Sender<Result<T, Status>>,
        cancel: &CancellationToken,
    ) -> bool {
        if interest == Interest::NONE {
            return true;
        }
        match gate::recorded(self.tasks.audit()).await {
            Ok(()) => true,
            Err(status) => {
                let _ = send(tx, Err(status), cancel).await;
                false
            }
        }
    }
}

/// Sends unless the agent is stopping or the client is gone.
async fn send<T>(tx: &mpsc::Sender<T>, item: T, cancel: &CancellationToken) -> bool {
    tokio::select! {
        sent = tx.send(item) => sent.is_ok(),
        () = cancel.cancelled() => false,
    }
}

// === impl Watches ===

impl Watches {
    /// Resolves when anything changes; false when a source is gone (the
    /// agent is stopping).
    async fn changed(&mut self) -> bool {
        tokio::select! {
            r = self.entries.changed() => r.is_ok(),
            r = self.bundle.changed() => r.is_ok(),
            r = self.federated.changed() => r.is_ok(),
            () = self.svids.changed() => true,
        }
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<pb::X509svidResponse>;
    type FetchX509BundlesStream = Stream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = Stream<pb::WitsvidResponse>;
    type FetchWITBundlesStream = Stream<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (caller, attested) = self.identify(&request).await?;
        let slot = self
            .jobs
            .streams
            .take(&caller)
            .map_err(|e| status::exhausted("too many open streams", &e))?;
        let first = self.x509_state(&caller, &attested.selectors).await?;
        tracing::debug!(
            pid = caller.pid(),
            svids = first.0.svids.len(),
            "FetchX509SVID"
        );
        // The stream's caller holds what it is sent, for `svid list`.
        let holder = self.svids.hold(Holder {
            pid: attested.pid,
            uid: attested.uid,
            executable: attested.executable.clone(),
            selectors: attested.selectors.iter().map(ToString::to_string).collect(),
            since: SystemTime::now(),
            serials: Vec::new(),
        });
        let selectors = Arc::new(attested.selectors);
        let stream_caller = caller.clone();
        let sent =
            move |response: &pb::X509svidResponse| holder.set_serials(convert::serials(response));
        Ok(Response::new(self.stream(
            "FetchX509SVID",
            (caller, slot),
            first,
            move |api: &Self| {
                let caller = stream_caller.clone();
                let selectors = Arc::clone(&selectors);
                Box::pin(async move {
                    api.x509_state(&caller, &selectors).await.map_err(|s| {
                        if s.code() == tonic::Code::PermissionDenied {
                            status::identity_lost()
                        } else {
                            s
                        }
                    })
                })
            },
            sent,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.bundle_stream(&request, "FetchX509Bundles", |api, bundles| {
            pb::X509BundlesResponse {
                crl: api.svids.crls().to_vec(),
                bundles: convert::x509_bundles(bundles.iter().map(|b| &**b)),
            }
        })
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let limits = &self.config.limits;
        let wanted_id = {
            let req = request.get_ref();
            limits.check_audiences(&req.audience)?;
            if req.spiffe_id.is_empty() {
                None
            } else {
                status::bounded(
                    "spiffe_id",
                    &req.spiffe_id,
                    crate::registration::entry::MAX_SPIFFE_ID_LEN,
                    "a SPIFFE ID's length",
                )?;
                Some(SpiffeId::new(&req.spiffe_id).map_err(|e| {
                    status::invalid_argument(format!(
                        "spiffe_id {:?} is not a SPIFFE ID: {e}",
                        req.spiffe_id
                    ))
                })?)
            }
        };
        let (caller, attested) = self.identify(&request).await?;
        if let Some(scoped) = self
            .task_scoped_jwt(&caller, &attested, request.get_ref())
            .await?
        {
            gate::recorded(self.tasks.audit()).await?;
            return Ok(Response::new(scoped));
        }
        let matches: Vec<_> = self
            .registry
            .snapshot()
            .matching(&attested.selectors)
            .into_iter()
            .filter(|m| wanted_id.as_ref().is_none_or(|id| &m.spiffe_id == id))
            .collect();
        if matches.is_empty() {
            return Err(status::no_identity());
        }
        let audiences = &request.get_ref().audience;
        let selectors = gate::selectors(&attested);
        let executable = gate::executable(&attested);
        let mut svids = Vec::with_capacity(matches.len());
        let mut denied = None;
        for m in &matches {
            // Policy decides each identity for each audience; an identity
            // denied for any of them gets no token.
            let mut decided_by = Vec::new();
            let allowed = audiences.iter().try_for_each(|audience| {
                let ttl = m
                    .entry
                    .jwt_svid_ttl
                    .unwrap_or(self.svids.jwt_svid_ttl())
                    .as_secs();
                let ids = gate::decide(
                    &self.policy,
                    self.tasks.audit(),
                    &attested,
                    &PolicyRequest {
                        principal: &m.spiffe_id,
                        selectors: &selectors,
                        action: Action::FetchJwtSvid,
                        resource: Resource::Audience(audience),
                        context: PolicyContext {
                            ttl_seconds: gate::ttl_seconds(ttl),
                            uid: attested.uid,
                            executable: &executable,
                            audience,
                            ..PolicyContext::default()
                        },
                    },
                    Subject::default(),
                )?;
                decided_by.extend(ids);
                Ok::<(), Status>(())
            });
            if let Err(status) = allowed {
                denied.get_or_insert(status);
                continue;
            }
            let served = self
                .svids
                .jwt_svid(m, audiences)
                .await
                .map_err(|e| status::svid(&e))?;
            let svid = &served.svid;
            // Every serve is recorded, a cached token's too (same `jti`,
            // and a reason saying so).
            self.tasks
                .audit()
                .record(AuditEvent {
                    spiffe_id: Some(m.spiffe_id.to_string()),
                    audience: Some(audiences.join(" ")),
                    entry_id: Some(m.entry.id.to_string()),
                    token_id: Some(svid.jti.clone()),
                    policy_ids: decided_by,
                    reason: served.from_cache.then(|| JWT_FROM_CACHE.to_owned()),
                    ..gate::caller_event(&attested, EventKind::IssueJwt, Outcome::Allow)
                })
                .map_err(|e| status::audit(&e))?;
            if !served.from_cache {
                crate::telemetry::metrics().jwt_svids_issued.inc();
            }
            tracing::debug!(pid = caller.pid(), spiffe_id = %m.spiffe_id, jti = %svid.jti, ?audiences, from_cache = served.from_cache, "served JWT-SVID");
            svids.push(convert::jwt_svid(svid));
        }
        if svids.is_empty() {
            return Err(denied.unwrap_or_else(status::no_identity));
        }
        gate::recorded(self.tasks.audit()).await?;
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.bundle_stream(&request, "FetchJWTBundles", |_, bundles| {
            pb::JwtBundlesResponse {
                bundles: convert::jwt_bundles(bundles.iter().map(|b| &**b)),
            }
        })
        .await
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        {
            let req = request.get_ref();
            if req.audience.is_empty() {
                return Err(status::invalid_argument("audience must be specified"));
            }
            if req.svid.is_empty() {
                return Err(status::invalid_argument("svid must be specified"));
            }
            status::bounded(
                "audience",
                &req.audience,
                self.config.limits.max_audience_len,
                "limits.max_audience_len",
            )?;
            status::bounded(
                "svid",
                &req.svid,
                svid::jwt::MAX_TOKEN_LEN,
                "the JWT-SVID size limit",
            )?;
        }
        let (_caller, attested) = self.identify(&request).await?;
        let matches = self.registry.snapshot().matching(&attested.selectors);
        gate::verifier(
            !matches.is_empty(),
            self.config.allow_unauthenticated_verifiers,
        )?;
        let audience = request.get_ref().audience.clone();
        let outcome = self.validate_jwt(&matches, request.into_inner());
        crate::telemetry::metrics().validated("jwt_svid", outcome.is_ok());
        let mut event = AuditEvent {
            audience: Some(audience),
            ..gate::caller_event(&attested, EventKind::Validate, Outcome::Allow)
        };
        match &outcome {
            Ok(validated) => {
                let claim = |name: &str| {
                    validated
                        .claims
                        .get(name)
                        .and_then(serde_json::Value::as_str)
                        .map(ToOwned::to_owned)
                };
                event.spiffe_id = Some(validated.spiffe_id.to_string());
                event.token_id = claim("jti");
                event.task_id = claim("txn");
            }
            Err(status) => {
                event.decision = Outcome::Deny;
                event.reason = Some(status.message().to_owned());
            }
        }
        gate::record_validation(self.tasks.audit(), event)?;
        let validated = outcome?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(crate::edge::json::to_struct(validated.claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(status::unimplemented(
            "tether does not serve the WIT-SVID profile",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(status::unimplemented(
            "tether does not serve the WIT-SVID profile",
        ))
    }
}

impl WorkloadApi {
    /// Validates a JWT-SVID for `attested`: against the own bundle and the
    /// bundles its entries federate with; a task token also against its
    /// task, which must still be live.
    fn validate_jwt(
        &self,
        matches: &[Match],
        req: pb::ValidateJwtsvidRequest,
    ) -> Result<svid::jwt::ValidatedJwt, Status> {
        // Own domain, plus the domains the caller's entries federate with.
        let federated: BTreeSet<TrustDomain> = svid::jwt::federated_domains(matches);
        let own = self.svids.authority().bundle();
        let all_federated = self.federation.current();
        let validated = svid::jwt::validate(&req.svid, &req.audience, |td| {
            if td == own.trust_domain() {
                Some(Arc::clone(&own))
            } else if federated.contains(td) {
                all_federated.get(td).cloned()
            } else {
                None
            }
        })
        .map_err(|e| status::jwt_validation(&e))?;
        // A token bound to a certificate (`cnf`) is worth nothing without
        // it, and this RPC has no way to be shown one: a stolen bound token
        // must not pass here (issue 15, finding 8).
        if validated.claims.get("cnf").is_some() {
            return Err(status::bound_token());
        }
        // A task token dies with its task, for every validator.
        if let Some(txn) = validated
            .claims
            .get("txn")
            .and_then(serde_json::Value::as_str)
        {
            self.tasks
                .check_task(txn, &req.svid)
                .map_err(|e| status::token(&e))?;
        }
        Ok(validated)
    }
}
