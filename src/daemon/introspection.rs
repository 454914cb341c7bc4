//! `[introspection]` on a standalone agent: the listener is bound with the
//! other sockets, the agent's own SVID (`spiffe://<td>/tether/agent`,
//! [`super::own_svid`]) signed before anything is spawned, then the
//! endpoint ([`crate::introspect`]) served over mutual TLS
//! ([`mtls::ClientAuth::Required`]) with the SVID renewed in place.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use spiffe::{SpiffeId, TrustDomain};
use tokio::net::TcpListener;

use super::Shutdown;
use super::own_svid;
use crate::audit::AuditLog;
use crate::authority::Authority;
use crate::introspect::{AgentIntrospector, IntrospectionConfig, IntrospectionRoutes};
use crate::mtls::{self, SwappableIdentity};
use crate::task::Tasks;
use crate::web::{self, Limits, Tls};

/// The agent's own SVID's lifetime (renewed at half life).
const AGENT_SVID_TTL: Duration = Duration::from_secs(3600);

/// The endpoint, bound and with its SVID, not yet serving.
pub(super) struct Prepared {
    listener: TcpListener,
    addr: SocketAddr,
    config: IntrospectionConfig,
    spiffe_id: SpiffeId,
    identity: SwappableIdentity,
    expires: SystemTime,
}

/// Binds `[introspection] listen`, when set.
pub(super) async fn bind(
    config: Option<&IntrospectionConfig>,
) -> anyhow::Result<Option<TcpListener>> {
    let Some(config) = config else {
        return Ok(None);
    };
    TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "binding the introspection endpoint {} ([introspection] listen)",
                config.listen
            )
        })
        .map(Some)
}

/// Signs the agent's own SVID for the bound endpoint.
pub(super) async fn prepare(
    listener: Option<TcpListener>,
    config: Option<&IntrospectionConfig>,
    trust_domain: &TrustDomain,
    authority: &Arc<dyn Authority>,
) -> anyhow::Result<Option<Prepared>> {
    let (Some(listener), Some(config)) = (listener, config) else {
        return Ok(None);
    };
    let addr = listener
        .local_addr()
        .context("the introspection endpoint's address")?;
    let spiffe_id = own_svid::agent_spiffe_id(trust_domain)?;
    let (identity, expires) = own_svid::own_svid(authority, &spiffe_id, AGENT_SVID_TTL)
        .await
        .context("the introspection endpoint's SVID")?;
    Ok(Some(Prepared {
        listener,
        addr,
        config: config.clone(),
        spiffe_id,
        identity,
        expires,
    }))
}

// === impl Prepared ===

impl Prepared {
    /// Serves the endpoint and renews its SVID until `shutdown`; returns
    /// the bound address.
    pub(super) fn spawn(
        self,
        shutdown: &Shutdown,
        authority: Arc<dyn Authority>,
        tasks: Tasks,
        audit: AuditLog,
    ) -> SocketAddr {
        let addr = self.addr;
        shutdown.spawn(
            "agent svid renewal",
            own_svid::renew_own_svid(
                authority.clone(),
                self.spiffe_id,
                AGENT_SVID_TTL,
                self.identity.clone(),
                self.expires,
                shutdown.token(),
            ),
        );
        let tls = mtls::https_server_config(
            authority.subscribe_bundle(),
            self.identity,
            mtls::ClientAuth::Required,
        );
        let routes = IntrospectionRoutes::new(
            AgentIntrospector::new(authority, tasks),
            &self.config,
            audit,
        );
        shutdown.spawn(
            "introspection endpoint",
            web::serve(
                self.listener,
                Tls::Rustls(Arc::new(tls)),
                Arc::new(routes),
                Limits::default(),
                shutdown.tracker(),
                shutdown.token(),
            ),
        );
        tracing::info!(%addr, "introspection endpoint: POST /introspect (mutual TLS)");
        addr
    }
}
