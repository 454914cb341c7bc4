//! A standalone agent's listeners for relying parties outside the socket:
//! OIDC discovery (`[oidc]`), the SPIFFE bundle endpoint
//! (`[bundle_endpoint]`) and token introspection (`[introspection]`).
//!
//! Three steps, each where the start's order wants it:
//! [`Listeners::bind`] binds every configured listener with the agent's
//! other sockets, before anything runs (a port in use fails the start,
//! naming its key); [`Listeners::prepare`] signs the agent's own X.509-SVID
//! (`spiffe://<td>/tether/agent`) when a listener presents one, still
//! before any job is spawned (a failure leaves nothing running);
//! [`Prepared::spawn`] serves them, and renews the SVID, until the agent
//! stops. A fleet agent binds none of them: its `tether server` serves them
//! for the trust domain (config validation refuses them on a fleet agent).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use spiffe::{SpiffeId, TrustDomain};
use tokio::net::TcpListener;

use super::own_svid;
use super::shutdown::Shutdown;
use crate::audit::AuditLog;
use crate::authority::Authority;
use crate::config::Config;
use crate::federation::endpoint::{self as bundle_endpoint, BundleRoutes};
use crate::federation::{BundleEndpoint, EndpointTls};
use crate::introspect::{AgentIntrospector, IntrospectionConfig, IntrospectionRoutes};
use crate::mtls::{self, SwappableIdentity};
use crate::oidc::BoundOidc;
use crate::task::Tasks;
use crate::web::{self, Limits, Tls};

/// The agent's own SVID's lifetime (renewed at half life).
const OWN_SVID_TTL: Duration = Duration::from_secs(3600);

/// The relying parties' listeners, bound and not yet served: one field per
/// listener, `None` when its section is not configured.
#[derive(Debug, Default)]
pub(super) struct Listeners {
    /// `[oidc]`: OIDC discovery.
    oidc: Option<BoundOidc>,
    /// `[introspection]`: its listener and settings.
    introspection: Option<(TcpListener, IntrospectionConfig)>,
    /// `[bundle_endpoint]`: its listener and settings.
    bundle_endpoint: Option<(TcpListener, BundleEndpoint)>,
}

/// The listeners with the agent's own SVID, when one of them presents it.
pub(super) struct Prepared {
    listeners: Listeners,
    own: Option<OwnSvid>,
    /// The bundle endpoint's TLS (its certificate files loaded, or the
    /// own SVID).
    bundle_endpoint_tls: Option<Tls>,
}

/// The agent's own X.509-SVID, signed in [`Listeners::prepare`] and renewed
/// from [`Prepared::spawn`].
struct OwnSvid {
    spiffe_id: SpiffeId,
    identity: SwappableIdentity,
    expires: SystemTime,
}

/// Where each relying party's listener is bound (port 0 in the config gets
/// a real one), for tests and the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Addrs {
    /// OIDC discovery (`[oidc] listen`).
    pub oidc: Option<SocketAddr>,
    /// Token introspection (`[introspection] listen`).
    pub introspection: Option<SocketAddr>,
    /// The SPIFFE bundle endpoint (`[bundle_endpoint] listen`).
    pub bundle_endpoint: Option<SocketAddr>,
}

/// What the listeners serve from.
pub(super) struct Context<'a> {
    /// Signs the agent's own SVID; its bundle is the trust domain's.
    pub authority: &'a Arc<dyn Authority>,
    /// The tasks introspection decides task tokens by.
    pub tasks: &'a Tasks,
    /// Where introspections are recorded.
    pub audit: &'a AuditLog,
    /// Runs the listeners and the own SVID's renewal.
    pub shutdown: &'a Shutdown,
}

// === impl Listeners ===

impl Listeners {
    /// Binds every configured listener.
    pub(super) async fn bind(config: &Config) -> anyhow::Result<Self> {
        let oidc = match &config.oidc {
            Some(oidc) => Some(BoundOidc::bind(oidc, config.authority.jwt_key_ttl).await?),
            None => None,
        };
        let introspection = match &config.introspection {
            Some(introspection) => {
                let listener =
                    TcpListener::bind(introspection.listen)
                        .await
                        .with_context(|| {
                            format!(
                                "binding the introspection endpoint {} ([introspection] listen)",
                                introspection.listen
                            )
                        })?;
                Some((listener, introspection.clone()))
            }
            None => None,
        };
        let bundle_endpoint = match &config.bundle_endpoint {
            Some(endpoint) => {
                let listener = TcpListener::bind(endpoint.listen).await.with_context(|| {
                    format!(
                        "binding the bundle endpoint {} ([bundle_endpoint] listen)",
                        endpoint.listen
                    )
                })?;
                Some((listener, endpoint.clone()))
            }
            None => None,
        };
        Ok(Self {
            oidc,
            introspection,
            bundle_endpoint,
        })
    }

    /// Signs the agent's own SVID when a listener presents one.
    pub(super) async fn prepare(
        self,
        authority: &Arc<dyn Authority>,
        trust_domain: &TrustDomain,
    ) -> anyhow::Result<Prepared> {
        let spiffe_bundle_endpoint = self
            .bundle_endpoint
            .as_ref()
            .is_some_and(|(_, endpoint)| endpoint.tls == EndpointTls::Spiffe);
        let own = if self.introspection.is_some() || spiffe_bundle_endpoint {
            let spiffe_id = own_svid::agent_spiffe_id(trust_domain)?;
            let (identity, expires) = own_svid::own_svid(authority, &spiffe_id, OWN_SVID_TTL)
                .await
                .context("the agent's own SVID, for its HTTPS listeners")?;
            Some(OwnSvid {
                spiffe_id,
                identity,
                expires,
            })
        } else {
            None
        };
        let bundle_endpoint_tls = match &self.bundle_endpoint {
            Some((_, endpoint)) => Some(
                bundle_endpoint::tls(
                    &endpoint.tls,
                    authority.subscribe_bundle(),
                    own.as_ref().map(|own| own.identity.clone()),
                )
                .context("the bundle endpoint's TLS ([bundle_endpoint])")?,
            ),
            None => None,
        };
        Ok(Prepared {
            listeners: self,
            own,
            bundle_endpoint_tls,
        })
    }
}

// === impl Prepared ===

impl Prepared {
    /// Serves every bound listener until the agent stops.
    pub(super) fn spawn(self, context: Context<'_>) -> anyhow::Result<Addrs> {
        let Context {
            authority,
            tasks,
            audit,
            shutdown,
        } = context;
        let identity = self.own.map(|own| {
            shutdown.spawn(
                "own svid renewal",
                own_svid::renew_own_svid(
                    Arc::clone(authority),
                    own.spiffe_id,
                    OWN_SVID_TTL,
                    own.identity.clone(),
                    own.expires,
                    shutdown.token(),
                ),
            );
            own.identity
        });
        let Listeners {
            oidc,
            introspection,
            bundle_endpoint,
        } = self.listeners;

        let oidc = oidc.map(|bound| {
            let addr = bound.local_addr();
            shutdown.spawn(
                "oidc discovery",
                bound.serve(
                    authority.subscribe_bundle(),
                    shutdown.tracker(),
                    shutdown.token(),
                ),
            );
            tracing::info!(%addr, "OIDC discovery: /.well-known/openid-configuration, /keys");
            addr
        });

        let introspection = match (introspection, &identity) {
            (Some((listener, config)), Some(identity)) => {
                let addr = listener
                    .local_addr()
                    .context("the introspection endpoint's address")?;
                let tls = mtls::https_server_config(
                    authority.subscribe_bundle(),
                    identity.clone(),
                    mtls::ClientAuth::Required,
                );
                let routes = IntrospectionRoutes::new(
                    AgentIntrospector::new(Arc::clone(authority), tasks.clone()),
                    &config,
                    audit.clone(),
                );
                shutdown.spawn(
                    "introspection endpoint",
                    web::serve(
                        listener,
                        Tls::Rustls(Arc::new(tls)),
                        Arc::new(routes),
                        Limits::default(),
                        shutdown.tracker(),
                        shutdown.token(),
                    ),
                );
                tracing::info!(%addr, "introspection endpoint: POST /introspect (mutual TLS)");
                Some(addr)
            }
            _ => None,
        };

        let bundle_endpoint = match (bundle_endpoint, self.bundle_endpoint_tls) {
            (Some((listener, endpoint)), Some(tls)) => {
                let addr = listener
                    .local_addr()
                    .context("the bundle endpoint's address")?;
                let routes = BundleRoutes::new(authority.subscribe_bundle(), endpoint.refresh_hint);
                shutdown.spawn(
                    "bundle endpoint",
                    web::serve(
                        listener,
                        tls,
                        Arc::new(routes),
                        Limits::default(),
                        shutdown.tracker(),
                        shutdown.token(),
                    ),
                );
                tracing::info!(%addr, "bundle endpoint: this trust domain's SPIFFE bundle at /");
                Some(addr)
            }
            _ => None,
        };
        Ok(Addrs {
            oidc,
            introspection,
            bundle_endpoint,
        })
    }
}
