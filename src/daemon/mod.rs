//! The composition root: the only module that wires the parts together,
//! spawns long-lived jobs and owns their cancellation.
//!
//! [`start`] takes the data dir's lock and binds every socket and listener
//! first, then loads and fails fast (keys, store, audit trail, policies,
//! federation files, entries, tasks), then spawns the loops, each by name;
//! a failed start leaves nothing running. The returned [`Running`] knows
//! the socket path tests and the CLI use, and stops everything within
//! [`SHUTDOWN_GRACE`]: streams end with Unavailable, the socket is
//! unlinked, the audit trail synced, the data dir unlocked.

pub mod audit_key;
pub mod own_svid;
mod reload;
pub mod relying;
pub mod shutdown;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::fcntl::{Flock, FlockArg};
use spiffe::TrustDomain;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin_api::{self, AdminApi, AdminAuthz};
use crate::attestation::Attestor;
use crate::audit::AuditLog;
use crate::authority::{Authority, LocalAuthority};
use crate::config::{Config, ConfigSource};
use crate::federation::Federation;
use crate::fleet::{self, Link, RemoteAuthority};
use crate::introspect::AgentIntrospector;
use crate::policy::Policy;
use crate::registration::Registry;
use crate::store::Store;
use crate::svid::{SvidInboxes, SvidIssuer};
use crate::task::{ForeignTasks, OwnerInbox, Tasks};
use crate::task_api::{self, TaskApi};
use crate::telemetry::{self, http::Readiness};
use crate::transport::{self, BoundSocket, Jobs, SocketIdentity, StreamSlots};
use crate::trusted_fs;
use crate::workload_api::{self, WorkloadApi, WorkloadApiLimits};
pub use relying::Addrs as RelyingPartyAddrs;
pub use shutdown::Shutdown;

/// Fleet mode: most ended tasks of other nodes an agent keeps (each a few
/// hundred bytes); past it, other nodes' tasks are refused until old ends
/// expire (fail closed).
const MAX_FOREIGN_ENDS: usize = 1_000_000;

/// How long stopping takes at most: streams and loops, then the audit
/// writer's final write and sync.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The part of [`SHUTDOWN_GRACE`] kept for the audit writer, after every
/// job that records has stopped.
pub const AUDIT_DRAIN: Duration = Duration::from_secs(2);

/// How long a socket's clients have, once the agent stops, to close their
/// connections (streams have ended by then) before they are closed.
const CONNECTION_DRAIN: Duration = Duration::from_secs(2);

/// A started agent.
#[derive(Debug)]
pub struct Running {
    http_addr: Option<std::net::SocketAddr>,
    relying_addrs: RelyingPartyAddrs,
    socket_path: PathBuf,
    admin_socket_path: PathBuf,
    trust_domain: TrustDomain,
    shutdown: Shutdown,
    open_streams: Arc<AtomicUsize>,
    readiness: Readiness,
    registry: Registry,
    audit: AuditLog,
    /// The audit writer stops last, after every job that could record.
    audit_stop: CancellationToken,
    audit_writer: tokio::task::JoinHandle<()>,
    _lock: Flock<File>,
}

/// Starts the agent described by `config`.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    raise_fd_limit();
    create_private_dir(&config.data_dir)?;
    let lock = lock_data_dir(&config.data_dir)?;

    // Every socket and listener is bound before anything is spawned: a
    // start that fails leaves nothing running.
    let mut socket = BoundSocket::bind(&config.socket_path, 0o755, 0o777).with_context(|| {
        format!(
            "binding the workload socket {}",
            config.socket_path.display()
        )
    })?;
    let mut admin_socket = admin_api::bind(&config.admin).with_context(|| {
        format!(
            "binding the admin socket {}",
            config.admin.socket_path.display()
        )
    })?;

    let http_listener = match config.http.listen {
        Some(listen) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the HTTP endpoint {listen} ([http] listen)"))?,
        ),
        None => None,
    };
    let relying_listeners = relying::Listeners::bind(relying::Sections {
        oidc: config.oidc.as_ref(),
        introspection: config.introspection.as_ref(),
        bundle_endpoint: config.bundle_endpoint.as_ref(),
        jwt_key_ttl: config.authority.jwt_key_ttl,
    })
    .await?;

    // The keys are held here, or (fleet mode) by the server; everything
    // past this point signs through the `Authority` seam and does not know
    // which.
    let (authority, local_authority, fleet): (Arc<dyn Authority>, _, _) = match &config.fleet {
        None => {
            let local = {
                let (td, cfg, dir) = (
                    config.trust_domain.clone(),
                    config.authority.clone(),
                    config.data_dir.clone(),
                );
                tokio::task::spawn_blocking(move || LocalAuthority::load_or_create(td, cfg, &dir))
                    .await
                    .context("loading the authority")??
            };
            (Arc::new(local.clone()), Some(local), None)
        }
        Some(fleet) => {
            let federations = config
                .federation
                .iter()
                .map(|f| f.trust_domain.clone())
                .collect();
            let (link, entries) = Link::start(
                config.trust_domain.clone(),
                fleet.clone(),
                &config.data_dir,
                federations,
                // What this agent knows of other nodes' tasks: fed by the
                // link, consulted by every task-token check.
                ForeignTasks::new(fleet.revocation_staleness, MAX_FOREIGN_ENDS),
            )
            .await
            .context("joining the fleet's tether server ([server])")?;
            tracing::info!(
                addresses = ?fleet.addresses,
                entries = entries.len(),
                "fleet mode: keys and entries are the tether server's"
            );
            (
                Arc::new(RemoteAuthority::new(link.clone())),
                None,
                Some((link, entries)),
            )
        }
    };
    let store = {
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .context("opening the store")??
    };
    let audit_dir = config
        .audit
        .dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("audit"));
    let audit_key = {
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || audit_key::load_or_create(&dir))
            .await
            .context("loading the audit key")??
    };
    let (audit, audit_writer) = AuditLog::open(&audit_dir, &config.audit, Arc::new(audit_key))
        .with_context(|| format!("opening the audit trail in {}", audit_dir.display()))?;
    let audit_stop = CancellationToken::new();
    let audit_writer = tokio::spawn(audit_writer.run(audit_stop.clone()));
    // The audit writer runs from here: a step that fails stops it before
    // the start returns (and the data dir's lock is released).
    let Parts {
        policy,
        federation,
        registry,
        svids,
        svid_inboxes,
        tasks,
        owners,
        attestor,
    } = match load_parts(
        &config,
        &authority,
        &store,
        &audit,
        fleet.as_ref().map(|(_, entries)| entries.clone()),
        fleet.as_ref().map(|(link, _)| link.foreign()),
    )
    .await
    {
        Ok(parts) => parts,
        Err(error) => {
            audit_stop.cancel();
            let _ = audit_writer.await;
            return Err(error);
        }
    };
    let relying_listeners = match relying_listeners
        .prepare(&authority, relying::Svid::Agent(&config.trust_domain))
        .await
    {
        Ok(prepared) => prepared,
        Err(error) => {
            audit_stop.cancel();
            let _ = audit_writer.await;
            return Err(error);
        }
    };

    let shutdown = Shutdown::default();
    if let Some(local_authority) = local_authority {
        shutdown.spawn("key rotation", local_authority.run(shutdown.token()));
    }
    let fleet_link = fleet.map(|(link, _)| link);
    if let Some(link) = &fleet_link {
        shutdown.spawn(
            "fleet link",
            link.clone().run(registry.clone(), shutdown.token()),
        );
        link.end_own_tasks_in(tasks.clone());
        shutdown.spawn(
            "task end reports",
            fleet::report_ends(
                link.clone(),
                tasks.report_ends(),
                tasks.ended_tasks(),
                shutdown.token(),
            ),
        );
    }
    shutdown.spawn(
        "svid rotation",
        svids
            .clone()
            .run_rotation(registry.clone(), shutdown.token()),
    );
    shutdown.spawn(
        "issuance recorder",
        svids
            .clone()
            .run_recorder(svid_inboxes.records, shutdown.token()),
    );
    shutdown.spawn(
        "svid revocations",
        svids
            .clone()
            .run_revocations(svid_inboxes.revocations, shutdown.token()),
    );
    shutdown.spawn(
        "federated bundles",
        federation.clone().run(shutdown.token()),
    );
    shutdown.spawn(
        "task lifecycle",
        tasks
            .clone()
            .run_lifecycle(registry.clone(), owners, shutdown.token()),
    );

    let jobs = Jobs {
        tracker: shutdown.tracker(),
        cancel: shutdown.token(),
        streams: StreamSlots::new(config.workload_api.limits.max_streams_per_process),
    };
    let api = WorkloadApi::new(
        attestor.clone(),
        registry.clone(),
        svids.clone(),
        federation.clone(),
        tasks.clone(),
        policy.clone(),
        config.workload_api.clone(),
        jobs.clone(),
    );
    let task_api = TaskApi::new(
        attestor,
        registry.clone(),
        tasks.clone(),
        authority.clone(),
        federation.clone(),
        policy.clone(),
        jobs,
    )
    .allow_unauthenticated_verifiers(config.workload_api.allow_unauthenticated_verifiers);
    let open_streams = api.open_streams();
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let readiness: Readiness = {
        let (authority, audit, store) = (authority.clone(), audit.clone(), store.clone());
        let sockets = [socket.identity(), admin_socket.identity()];
        let federation = federation.clone();
        Readiness::new(move || {
            let mut problems = problems(authority.as_ref(), &audit, &store, &sockets);
            problems.extend(federation.problems());
            problems
        })
    };
    let admin = AdminApi::new(
        registry.clone(),
        svids,
        authority.clone(),
        tasks.clone(),
        Arc::clone(&open_streams),
        reload_tx,
        readiness.clone(),
    );
    let admin = match fleet_link {
        Some(link) => {
            admin.with_server_status(admin_api::ServerStatus(Arc::new(move || link.status())))
        }
        None => admin,
    };
    let http_addr = match http_listener {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .context("the HTTP endpoint's address")?;
            shutdown.spawn(
                "http endpoint",
                telemetry::http::serve(
                    listener,
                    readiness.clone(),
                    shutdown.tracker(),
                    shutdown.token(),
                ),
            );
            tracing::info!(%addr, "HTTP endpoint: /healthz, /readyz, /metrics");
            Some(addr)
        }
        None => None,
    };
    let relying_addrs = relying_listeners.spawn(relying::Context {
        authority: &authority,
        introspector: AgentIntrospector::new(authority.clone(), tasks.clone()),
        audit: &audit,
        shutdown: &shutdown,
    })?;

    {
        let limits = config.workload_api.limits.clone();
        let entries = registry.clone();
        let token = shutdown.token();
        let fail = shutdown.clone();
        shutdown.spawn("workload server", async move {
            let stop = token.clone().cancelled_owned();
            let closing = CancellationToken::new();
            let served = serve_workload_socket(
                api,
                task_api,
                &mut socket,
                &limits,
                entries,
                stop,
                closing.clone(),
            );
            if let Err(error) = drained(served, &token, &closing, "workload").await {
                tracing::error!(error = %crate::error::Chain(&error), "workload API server failed; stopping the agent");
                fail.fail(format!("the workload API server failed: {}", crate::error::Chain(&error)));
            }
            // Unlinks the socket, now that nothing is served on it.
            drop(socket);
        });
    }
    {
        let authz = AdminAuthz::new(&config.admin.uids);
        let token = shutdown.token();
        let fail = shutdown.clone();
        shutdown.spawn("admin server", async move {
            let stop = token.clone().cancelled_owned();
            let closing = CancellationToken::new();
            let served = admin_api::serve(admin, authz, &mut admin_socket, stop, closing.clone());
            if let Err(error) = drained(served, &token, &closing, "admin").await {
                tracing::error!(error = %crate::error::Chain(&error), "admin API server failed; stopping the agent");
                fail.fail(format!("the admin API server failed: {}", crate::error::Chain(&error)));
            }
            drop(admin_socket);
        });
    }
    shutdown.spawn(
        "reloader",
        reload::Reloader {
            running: config.clone(),
            registry: registry.clone(),
            federation,
            policy: policy.clone(),
            audit: audit.clone(),
        }
        .run(reload_rx, shutdown.token()),
    );
    {
        let audit = audit.clone();
        shutdown.spawn(
            "policy watcher",
            policy.run_watcher(
                move |outcome| reload::record_policy_reload(&audit, outcome),
                shutdown.token(),
            ),
        );
    }

    match &config.source {
        ConfigSource::Embedded => {
            tracing::info!("no --config given: running on the embedded default configuration")
        }
        ConfigSource::File(path) => {
            tracing::info!(config = %path.display(), "configuration loaded")
        }
    }
    tracing::info!(
        trust_domain = %config.trust_domain,
        socket = %config.socket_path.display(),
        admin_socket = %config.admin.socket_path.display(),
        data_dir = %config.data_dir.display(),
        entries = registry.snapshot().len(),
        "tether agent started"
    );
    for entry in registry.snapshot().iter() {
        let selectors: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, ?selectors, "registration entry");
    }

    Ok(Running {
        http_addr,
        relying_addrs,
        socket_path: config.socket_path,
        admin_socket_path: config.admin.socket_path,
        trust_domain: config.trust_domain,
        shutdown,
        open_streams,
        readiness,
        registry,
        audit,
        audit_stop,
        audit_writer,
        _lock: lock,
    })
}

/// What the agent is made of besides its keys, store and audit trail.
struct Parts {
    policy: Policy,
    federation: Federation,
    registry: Registry,
    svids: SvidIssuer,
    svid_inboxes: SvidInboxes,
    tasks: Tasks,
    owners: OwnerInbox,
    attestor: Attestor,
}

/// Loads policies, federated bundles and entries, and restores the tasks
/// of the last run: every step of the start that can fail once the audit
/// writer runs.
async fn load_parts(
    config: &Config,
    authority: &Arc<dyn Authority>,
    store: &Store,
    audit: &AuditLog,
    synced: Option<Vec<crate::registration::RegistrationEntry>>,
    foreign: Option<ForeignTasks>,
) -> anyhow::Result<Parts> {
    let policy = Policy::load(&config.policy).context("loading policies")?;
    if policy.is_enforcing() {
        let summary = policy.summary();
        tracing::info!(
            dir = %config.policy.dir.as_deref().unwrap_or(Path::new("")).display(),
            policies = summary.policies,
            "policies loaded"
        );
    } else {
        tracing::warn!(
            "no policy_dir: registration entries alone decide what each workload may do"
        );
    }
    let federation =
        Federation::load(config.federation.clone()).context("loading federated bundles")?;
    let registry = Registry::open(
        config.entries.clone(),
        store.clone(),
        audit.clone(),
        config.trust_domain.clone(),
        federation.trust_domains(),
    )
    .context("loading registration entries")?;
    if let Some(synced) = synced {
        registry.take_entries_from_server();
        registry
            .replace_synced(synced)
            .await
            .context("taking the tether server's entries")?;
    }
    let (svids, svid_inboxes) =
        SvidIssuer::new(authority.clone(), config.svid, store.clone(), audit.clone());
    let (tasks, owners) = Tasks::new(
        config.tasks.clone(),
        authority.clone(),
        store.clone(),
        audit.clone(),
    );
    let tasks = match foreign {
        Some(foreign) => tasks.with_foreign(foreign),
        None => tasks,
    };
    {
        let tasks = tasks.clone();
        let watched = tokio::task::spawn_blocking(move || tasks.restore())
            .await
            .context("restoring tasks")??;
        if watched > 0 {
            tracing::info!(
                tasks = watched,
                "tasks from before the restart are live again"
            );
        }
    }
    let attestor = Attestor::new(&config.attestor).context("setting up the Kubernetes attestor")?;

    Ok(Parts {
        policy,
        federation,
        registry,
        svids,
        svid_inboxes,
        tasks,
        owners,
        attestor,
    })
}

/// Why the agent is not serving right now (empty: it is): the one answer
/// behind the admin API's Health and the HTTP endpoint's `/readyz`.
fn problems(
    authority: &dyn Authority,
    audit: &AuditLog,
    store: &Store,
    sockets: &[SocketIdentity],
) -> Vec<String> {
    let mut problems: Vec<String> = sockets.iter().filter_map(SocketIdentity::problem).collect();
    problems.extend(authority.problems());
    if let Some(problem) = audit.problem() {
        problems.push(format!(
            "the audit trail is failing, issuance is refused: {problem}"
        ));
    }
    if let Err(error) = store.check_writable() {
        problems.push(format!(
            "the store cannot be written: {}",
            crate::error::Chain(&error)
        ));
    }
    problems
}

// === impl Running ===

impl Running {
    /// Where the HTTP endpoint listens, when `[http] listen` is set (the
    /// bound address: port 0 in the config gets a real one here).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    /// Where the relying parties' listeners (`[oidc]`,
    /// `[bundle_endpoint]`, `[introspection]`) are bound.
    pub fn relying_party_addrs(&self) -> RelyingPartyAddrs {
        self.relying_addrs
    }

    /// Why the agent is not ready (empty: it is), as `/readyz` and the
    /// admin API's Health report it.
    pub fn readiness_problems(&self) -> Vec<String> {
        self.readiness.problems()
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The admin API socket.
    pub fn admin_socket_path(&self) -> &Path {
        &self.admin_socket_path
    }

    /// The agent's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The registration entries being served (for embedding and tests;
    /// operators change entries through the config file).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The audit trail's handle (tests flush it).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Workload API streams being served right now.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// Runs until SIGINT/SIGTERM or a fatal failure, then stops.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let failed = self.shutdown.token();
        tokio::select! {
            signal = shutdown::os_signal() => {
                let signal = signal.context("installing signal handlers")?;
                tracing::info!(signal, "stopping");
            }
            () = failed.cancelled() => {}
        }
        self.stop().await
    }

    /// Stops every job and then the audit writer, all within
    /// [`SHUTDOWN_GRACE`]: the jobs get all of it but [`AUDIT_DRAIN`],
    /// which the audit writer keeps to write and sync what they recorded.
    /// `Err` when a server failed (it says which) and stopped the agent.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Err(left) = self.shutdown.stop(SHUTDOWN_GRACE - AUDIT_DRAIN).await {
            tracing::warn!(
                grace = ?(SHUTDOWN_GRACE - AUDIT_DRAIN),
                jobs = ?left.jobs,
                streams = left.streams,
                "some jobs did not stop within the grace period"
            );
        }
        // Everything that records has stopped: the counts of repeated
        // denials are recorded, then the trail drained and synced.
        self.audit.record_counts();
        self.audit_stop.cancel();
        if tokio::time::timeout(AUDIT_DRAIN, self.audit_writer)
            .await
            .is_err()
        {
            tracing::warn!(
                drain = ?AUDIT_DRAIN,
                "the audit writer did not finish within its part of the grace period"
            );
        }
        if let Some(failure) = self.shutdown.failure() {
            bail!("{failure}");
        }
        tracing::info!("tether agent stopped");
        Ok(())
    }
}

/// The data dir: created 0700, or an existing one that is trusted (see
/// [`trusted_fs`]) narrowed to 0700. Nothing in it is read before this.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    trusted_fs::dir(dir, 0o700)
        .and_then(|()| trusted_fs::set_mode(dir, 0o700))
        .with_context(|| format!("data_dir {}", dir.display()))
}

/// One agent (or server) per data dir: a second one would rotate the same
/// keys.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = dir.join("tether.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // Someone else's lock file would let them hold the lock: the agent
    // could not start.
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    trusted_fs::check_file(&path, &meta, false)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "data_dir {} is in use by another tether process ({errno}); stop it or choose another data_dir",
            dir.display()
        )
    })
}

/// Runs a socket's server; once the agent stops, gives its connections
/// `CONNECTION_DRAIN` (2 s) to close, then fires `closing`, which fails every
/// read and write of the ones still open: a client that never closes its
/// connection cannot hold the agent's shutdown.
pub async fn drained(
    served: impl Future<Output = Result<(), tonic::transport::Error>>,
    stop: &CancellationToken,
    closing: &CancellationToken,
    socket: &'static str,
) -> Result<(), tonic::transport::Error> {
    tokio::pin!(served);
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(CONNECTION_DRAIN).await;
    };
    tokio::select! {
        result = &mut served => return result,
        () = deadline => {}
    }
    tracing::warn!(socket, drain = ?CONNECTION_DRAIN, "connections still open after the drain; closing them");
    closing.cancel();
    tokio::time::timeout(CONNECTION_DRAIN, served)
        .await
        .unwrap_or(Ok(()))
}

/// Serves the Workload API and the Task API on the workload socket until
/// `shutdown` resolves, within `limits` (the per-uid budget judged against
/// the registration `entries` as they are at each accept).
async fn serve_workload_socket(
    api: WorkloadApi,
    task_api: TaskApi,
    socket: &mut BoundSocket,
    limits: &WorkloadApiLimits,
    entries: Registry,
    shutdown: impl Future<Output = ()>,
    closing: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let Some(listener) = socket.take_listener() else {
        return Ok(());
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .timeout(limits.request_timeout)
        .layer(transport::InFlightLayer)
        .add_service(workload_api::service(api, limits))
        .add_service(task_api::service(task_api, limits.max_request_bytes))
        .serve_with_incoming_shutdown(
            transport::incoming(listener, limits.connections(), Some(entries), closing),
            shutdown,
        )
        .await
}

/// Raises the soft open-file limit to the hard one: every workload
/// connection is a descriptor, and the default soft limit (often 1024) is
/// far below what a node's workloads can open.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::debug!(error = %crate::error::Chain(&error), "could not raise the open file limit");
    }
}
