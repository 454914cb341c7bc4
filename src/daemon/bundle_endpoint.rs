//! A standalone agent's `[bundle_endpoint]`: what it needs is loaded before
//! anything runs (the `https_web` certificate, or the agent's own SVID,
//! `spiffe://<td>/tether/agent`, for `https_spiffe`), then it is served on
//! the web kit and the SVID renewed at half life, both until shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::{Shutdown, own_svid};
use crate::authority::Authority;
use crate::config::Config;

/// `[bundle_endpoint]`, ready to serve: its listener, TLS and routes, and
/// (`https_spiffe`) the agent's own SVID to renew.
pub(super) struct PreparedBundleEndpoint {
    pub(super) listener: tokio::net::TcpListener,
    tls: crate::web::Tls,
    routes: Arc<crate::federation::endpoint::BundleRoutes>,
    own_svid: Option<(
        spiffe::SpiffeId,
        Duration,
        crate::mtls::SwappableIdentity,
        std::time::SystemTime,
    )>,
}

/// Loads what `[bundle_endpoint]` needs before anything runs: the
/// `https_web` certificate, or the agent's own SVID
/// (`spiffe://<td>/tether/agent`) for `https_spiffe`.
pub(super) async fn prepare(
    endpoint: &crate::federation::BundleEndpoint,
    listener: tokio::net::TcpListener,
    authority: &Arc<dyn Authority>,
    config: &Config,
) -> anyhow::Result<PreparedBundleEndpoint> {
    use crate::federation::{EndpointTls, endpoint as bundle_endpoint};
    let own = match endpoint.tls {
        EndpointTls::Spiffe => {
            let id = own_svid::agent_spiffe_id(&config.trust_domain)?;
            let ttl = config.svid.x509_svid_ttl;
            let (identity, expires) = own_svid::own_svid(authority, &id, ttl)
                .await
                .context("the agent's own SVID for the https_spiffe bundle endpoint")?;
            Some((id, ttl, identity, expires))
        }
        EndpointTls::Web { .. } => None,
    };
    let tls = bundle_endpoint::tls(
        &endpoint.tls,
        authority.subscribe_bundle(),
        own.as_ref().map(|(_, _, identity, _)| identity.clone()),
    )
    .context("the bundle endpoint's TLS ([bundle_endpoint])")?;
    let routes = Arc::new(bundle_endpoint::BundleRoutes::new(
        authority.subscribe_bundle(),
        endpoint.refresh_hint,
    ));
    Ok(PreparedBundleEndpoint {
        listener,
        tls,
        routes,
        own_svid: own,
    })
}

impl PreparedBundleEndpoint {
    /// Serves the endpoint (and renews the agent's SVID) until `shutdown`.
    pub(super) fn spawn(self, authority: &Arc<dyn Authority>, shutdown: &Shutdown) {
        if let Some((id, ttl, identity, expires)) = self.own_svid {
            shutdown.spawn(
                "agent svid renewal",
                own_svid::renew_own_svid(
                    authority.clone(),
                    id,
                    ttl,
                    identity,
                    expires,
                    shutdown.token(),
                ),
            );
        }
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, "bundle endpoint: this trust domain's SPIFFE bundle at /");
        }
        shutdown.spawn(
            "bundle endpoint",
            crate::web::serve(
                self.listener,
                self.tls,
                self.routes,
                crate::web::Limits::default(),
                shutdown.tracker(),
                shutdown.token(),
            ),
        );
    }
}
