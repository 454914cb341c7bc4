//! The server's composition root: `tether server run`.
//!
//! [`start`] takes the data dir's lock and binds the agents' TCP listener
//! and the admin socket first, then loads (keys, store, audit trail,
//! entries), then spawns each job by name: key rotation, the server's own
//! SVID, entry refresh from the store (other replicas' writes), join-token
//! pruning, the pod list (with `[kubernetes]`), the node API over mutual TLS, the admin API,
//! and (with `[introspection]`) the introspection endpoint over mutual TLS. A failed start
//! leaves nothing running. [`RunningServer::stop`] stops them within the
//! agent's grace period, the audit writer last.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ServerConfig;
use super::admin::{self as server_admin, ServerAdminService};
use super::bundle::{self, FleetAuthority};
use super::config::StoreLocation;
use super::introspect::ServerIntrospector;
use super::k8s::Kubernetes;
use super::node_api::{self, NodeApi};
use super::registry::ServerRegistry;
use super::store::ServerStore;
use super::store::postgres::PostgresStore;
use super::store::sqlite::SqliteStore;
use super::tasks::TaskIndex;
use crate::audit::{AuditConfig, AuditLog};
use crate::authority::{Authority, LocalAuthority};
use crate::daemon::{
    self, AUDIT_DRAIN, SHUTDOWN_GRACE, Shutdown, audit_key, own_svid, relying, shutdown,
};
use crate::error::Chain;
use crate::mtls;
use crate::proto::server::node_server::NodeServer;

/// The server's own SVID's lifetime (renewed at half life).
const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);
/// How often expired join tokens are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Largest node API request.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest node API reply: a sync snapshot (a node's entries and every
/// replica's bundle) up to what an agent's client decodes (tonic's
/// default, 4 MiB). A larger one fails and is logged; splitting
/// snapshots is still to come.
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;
/// A node's TLS handshake: at most 10 s, 64 at once.
const HANDSHAKES: mtls::HandshakeLimits = mtls::HandshakeLimits {
    timeout: Duration::from_secs(10),
    max_in_flight: 64,
};
/// Most concurrent streams per node connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    listen_addr: SocketAddr,
    relying_addrs: relying::Addrs,
    admin_socket_path: PathBuf,
    shutdown: Shutdown,
    audit: AuditLog,
    audit_stop: CancellationToken,
    audit_writer: tokio::task::JoinHandle<()>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Starts the server described by `config`.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    daemon::create_private_dir(&config.data_dir)?;
    let lock = daemon::lock_data_dir(&config.data_dir)?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the node API on {} (listen)", config.listen))?;
    let listen_addr = listener.local_addr().context("the node API's address")?;
    let mut admin_socket = server_admin::bind(&config.admin_socket_path).with_context(|| {
        format!(
            "binding the admin socket {}",
            config.admin_socket_path.display()
        )
    })?;
    let relying_listeners = relying::Listeners::bind(relying::Sections {
        oidc: config.oidc.as_ref(),
        introspection: config.introspection.as_ref(),
        bundle_endpoint: config.bundle_endpoint.as_ref(),
        jwt_key_ttl: config.authority.jwt_key_ttl,
    })
    .await?;

    let local_authority = {
        let (td, cfg, dir) = (
            config.trust_domain.clone(),
            config.authority.clone(),
            config.data_dir.clone(),
        );
        tokio::task::spawn_blocking(move || LocalAuthority::load_or_create(td, cfg, &dir))
            .await
            .context("loading the authority")??
    };
    let store: Arc<dyn ServerStore> = match &config.store {
        StoreLocation::Sqlite(path) => {
            let path = path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .context("opening the server store")??,
            )
        }
        StoreLocation::Postgres(url) => Arc::new(
            PostgresStore::connect(url)
                .await
                // The location's Display hides the password.
                .with_context(|| format!("opening the server store at {}", config.store))?,
        ),
    };
    // This replica signs with its own keys; what it serves and verifies
    // with is every replica's bundle (`server::bundle`).
    let replica = {
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || bundle::replica_id(&dir))
            .await
            .context("reading the replica id")?
            .context("the replica id in the data dir")?
    };
    let fleet_authority =
        FleetAuthority::new(Arc::new(local_authority.clone()), replica, store.clone());
    fleet_authority
        .refresh()
        .await
        .context("sharing this replica's bundle through the store")?;
    let authority: Arc<dyn Authority> = Arc::new(fleet_authority.clone());
    let kubernetes = config
        .kubernetes
        .clone()
        .map(Kubernetes::new)
        .transpose()
        .context("the Kubernetes API client ([kubernetes])")?;
    let audit_dir = config.data_dir.join("audit");
    let audit_key = {
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || audit_key::load_or_create(&dir))
            .await
            .context("loading the audit key")??
    };
    let (audit, audit_writer) =
        AuditLog::open(&audit_dir, &AuditConfig::default(), Arc::new(audit_key))
            .with_context(|| format!("opening the audit trail in {}", audit_dir.display()))?;
    let audit_stop = CancellationToken::new();
    let audit_writer = tokio::spawn(audit_writer.run(audit_stop.clone()));
    let loaded = async {
        let registry = ServerRegistry::open(
            store.clone(),
            config.trust_domain.clone(),
            config.entries.clone(),
            audit.clone(),
        )
        .await
        .context("loading registration entries")?;
        let server_id =
            node_api::server_spiffe_id(&config.trust_domain).context("naming the server's SVID")?;
        let identity = own_svid::own_svid(&authority, &server_id, SERVER_SVID_TTL).await?;
        anyhow::Ok((registry, (server_id, identity)))
    };
    let loaded = async {
        let parts = loaded.await?;
        let tasks = TaskIndex::open(store.clone(), config.trust_domain.clone(), audit.clone())
            .await
            .context("opening the fleet's task index")?;
        anyhow::Ok((parts, tasks))
    };
    let ((registry, (server_id, (identity, identity_expires))), tasks) = match loaded.await {
        Ok(parts) => parts,
        Err(error) => {
            audit_stop.cancel();
            let _ = audit_writer.await;
            return Err(error);
        }
    };

    // The relying parties' HTTPS listeners present the server's own SVID.
    let relying_listeners = match relying_listeners
        .prepare(&authority, relying::Svid::Given(identity.clone()))
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
    shutdown.spawn("key rotation", local_authority.run(shutdown.token()));
    shutdown.spawn("bundle sharing", fleet_authority.run(shutdown.token()));
    shutdown.spawn("entry refresh", registry.clone().run(shutdown.token()));
    shutdown.spawn(
        "server svid renewal",
        own_svid::renew_own_svid(
            authority.clone(),
            server_id,
            SERVER_SVID_TTL,
            identity.clone(),
            identity_expires,
            shutdown.token(),
        ),
    );
    shutdown.spawn("task index", tasks.clone().run(shutdown.token()));
    shutdown.spawn(
        "join token pruning",
        prune_join_tokens(store.clone(), shutdown.token()),
    );
    // OIDC serves the fleet's keys (every replica's, as agents verify
    // with them); introspection decides task tokens by the fleet's index.
    let relying_addrs = relying_listeners.spawn(relying::Context {
        authority: &authority,
        introspector: ServerIntrospector::new(authority.clone(), tasks.clone()),
        audit: &audit,
        shutdown: &shutdown,
    })?;

    let mut node_api = NodeApi::new(
        config.trust_domain.clone(),
        authority.clone(),
        store.clone(),
        registry.clone(),
        tasks.clone(),
        audit.clone(),
        shutdown.token(),
    )
    .with_node_svid_ttl(config.node_svid_ttl)
    .with_node_rate(config.node_requests_per_second, config.node_request_burst)
    .with_max_task_ttl(config.max_task_ttl)
    .with_max_tasks_per_node(config.max_tasks_per_node);
    if let Some(kubernetes) = kubernetes {
        shutdown.spawn("pod list", kubernetes.clone().run(shutdown.token()));
        node_api = node_api.with_kubernetes(kubernetes);
    }
    {
        let tls = mtls::server_config(authority.subscribe_bundle(), identity.clone());
        let token = shutdown.token();
        let fail = shutdown.clone();
        shutdown.spawn("node api", async move {
            let closing = CancellationToken::new();
            let served = tonic::transport::Server::builder()
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .add_service(
                    NodeServer::new(node_api)
                        .max_decoding_message_size(MAX_REQUEST_BYTES)
                        .max_encoding_message_size(MAX_REPLY_BYTES),
                )
                .serve_with_incoming_shutdown(
                    mtls::incoming(listener, tls, HANDSHAKES),
                    token.clone().cancelled_owned(),
                );
            if let Err(error) = daemon::drained(served, &token, &closing, "node api").await {
                tracing::error!(error = %Chain(&error), "node API server failed; stopping the server");
                fail.fail(format!("the node API server failed: {}", Chain(&error)));
            }
        });
    }
    {
        let admin = ServerAdminService::new(
            registry.clone(),
            store.clone(),
            authority.clone(),
            tasks,
            audit.clone(),
        );
        let token = shutdown.token();
        let fail = shutdown.clone();
        shutdown.spawn("admin server", async move {
            let closing = CancellationToken::new();
            let served = server_admin::serve(
                admin,
                server_admin::authz(),
                &mut admin_socket,
                token.clone().cancelled_owned(),
                closing.clone(),
            );
            if let Err(error) = daemon::drained(served, &token, &closing, "admin").await {
                tracing::error!(error = %Chain(&error), "admin API server failed; stopping the server");
                fail.fail(format!("the admin API server failed: {}", Chain(&error)));
            }
            drop(admin_socket);
        });
    }

    tracing::info!(
        trust_domain = %config.trust_domain,
        listen = %listen_addr,
        admin_socket = %config.admin_socket_path.display(),
        data_dir = %config.data_dir.display(),
        entries = registry.snapshot().entries.len(),
        "tether server started"
    );
    Ok(RunningServer {
        listen_addr,
        relying_addrs,
        admin_socket_path: config.admin_socket_path,
        shutdown,
        audit,
        audit_stop,
        audit_writer,
        _lock: lock,
    })
}

// === impl RunningServer ===

impl RunningServer {
    /// Where `[bundle_endpoint]` listens, when it is set (the bound
    /// address).
    pub fn bundle_endpoint_addr(&self) -> Option<SocketAddr> {
        self.relying_addrs.bundle_endpoint
    }

    /// Where agents reach the node API (the bound address: a `listen`
    /// port of 0 is resolved).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Where OIDC discovery listens, when `[oidc]` is set (the bound
    /// address: a port of 0 is resolved).
    pub fn oidc_addr(&self) -> Option<SocketAddr> {
        self.relying_addrs.oidc
    }

    /// Where the introspection endpoint listens, when `[introspection]` is
    /// set (the bound address: a port of 0 is resolved).
    pub fn introspection_addr(&self) -> Option<SocketAddr> {
        self.relying_addrs.introspection
    }

    /// The admin socket.
    pub fn admin_socket_path(&self) -> &std::path::Path {
        &self.admin_socket_path
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

    /// Stops every job, then the audit writer, within the agent's grace
    /// period.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Err(left) = self.shutdown.stop(SHUTDOWN_GRACE - AUDIT_DRAIN).await {
            tracing::warn!(jobs = ?left.jobs, "some jobs did not stop within the grace period");
        }
        self.audit.record_counts();
        self.audit_stop.cancel();
        if tokio::time::timeout(AUDIT_DRAIN, self.audit_writer)
            .await
            .is_err()
        {
            tracing::warn!("the audit writer did not finish within its part of the grace period");
        }
        if let Some(failure) = self.shutdown.failure() {
            anyhow::bail!("{failure}");
        }
        tracing::info!("tether server stopped");
        Ok(())
    }
}

/// Signs the server's own SVID (`spiffe://<td>/tether/server`) for a fresh
/// key, held in memory only.
/// Forgets expired join tokens every [`PRUNE_EVERY`].
async fn prune_join_tokens(store: Arc<dyn ServerStore>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
        match store.prune_join_tokens(SystemTime::now()).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "expired join tokens forgotten"),
            Err(error) => tracing::warn!(error = %Chain(&error), "could not prune join tokens"),
        }
    }
}
