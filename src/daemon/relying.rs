//! The listeners for relying parties outside the socket, on a standalone
//! agent and on the tether server alike: OIDC discovery (`[oidc]`), the
//! SPIFFE bundle endpoint (`[bundle_endpoint]`) and token introspection
//! (`[introspection]`).
//!
//! Three steps, each where a start's order wants it:
//! [`Listeners::bind`] binds every configured listener with the process's
//! other sockets, before anything runs (a port in use fails the start,
//! naming its key); [`Listeners::prepare`] settles the X.509-SVID the
//! HTTPS listeners present (the server's own, or, on a standalone agent,
//! `spiffe://<td>/tether/agent`, signed here only when a listener needs
//! it) and loads certificate files, still before any job is spawned (a
//! failure leaves nothing running); [`Prepared::spawn`] serves them, and
//! renews a signed SVID, until the process stops. A fleet agent binds none
//! of them: its `tether server` serves them for the trust domain (config
//! validation refuses them on a fleet agent).

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
use crate::federation::endpoint::{self as bundle_endpoint, BundleRoutes};
use crate::federation::{BundleEndpoint, EndpointTls};
use crate::introspect::{IntrospectionConfig, IntrospectionRoutes, Introspector};
use crate::mtls::{self, SwappableIdentity};
use crate::oidc::{BoundOidc, OidcConfig};
use crate::web::{self, Limits, Tls};

/// A standalone agent's own SVID's lifetime (renewed at half life).
const OWN_SVID_TTL: Duration = Duration::from_secs(3600);

/// The relying parties' sections of a configuration.
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    /// `[oidc]`.
    pub oidc: Option<&'a OidcConfig>,
    /// `[introspection]`.
    pub introspection: Option<&'a IntrospectionConfig>,
    /// `[bundle_endpoint]`.
    pub bundle_endpoint: Option<&'a BundleEndpoint>,
    /// The JWT keys' lifetime (`[authority] jwt_key_ttl`), which bounds
    /// how long relying parties may cache the keys.
    pub jwt_key_ttl: Duration,
}

/// The relying parties' listeners, bound and not yet served: one field per
/// listener, `None` when its section is not configured.
#[derive(Debug, Default)]
pub struct Listeners {
    /// `[oidc]`: OIDC discovery.
    oidc: Option<BoundOidc>,
    /// `[introspection]`: its listener and settings.
    introspection: Option<(TcpListener, IntrospectionConfig)>,
    /// `[bundle_endpoint]`: its listener and settings.
    bundle_endpoint: Option<(TcpListener, BundleEndpoint)>,
}

/// Where the HTTPS listeners' X.509-SVID comes from.
#[derive(Clone)]
pub enum Svid<'a> {
    /// The process's own, renewed elsewhere (the server's).
    Given(SwappableIdentity),
    /// Signed for `spiffe://<trust domain>/tether/agent` when a listener
    /// needs one, and renewed by [`Prepared::spawn`] (a standalone agent).
    Agent(&'a TrustDomain),
}

/// The listeners with what they present, ready to serve.
pub struct Prepared {
    listeners: Listeners,
    identity: Option<SwappableIdentity>,
    /// An SVID signed here, to renew.
    renew: Option<(SpiffeId, SystemTime)>,
    /// The bundle endpoint's TLS (its certificate files loaded, or the
    /// SVID).
    bundle_endpoint_tls: Option<Tls>,
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
pub struct Context<'a, I> {
    /// The trust domain's bundle (served, and what client SVIDs are
    /// verified against); signs a renewed agent SVID.
    pub authority: &'a Arc<dyn Authority>,
    /// Decides introspections (the agent's tasks, or the fleet's index).
    pub introspector: I,
    /// Where introspections are recorded.
    pub audit: &'a AuditLog,
    /// Runs the listeners and the SVID's renewal.
    pub shutdown: &'a Shutdown,
}

impl std::fmt::Debug for Svid<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Given(_) => f.write_str("Svid::Given"),
            Self::Agent(trust_domain) => write!(f, "Svid::Agent({trust_domain})"),
        }
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("listeners", &self.listeners)
            .field("renew", &self.renew)
            .finish_non_exhaustive()
    }
}

impl<I> std::fmt::Debug for Context<'_, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

// === impl Listeners ===

impl Listeners {
    /// Binds every configured listener.
    pub async fn bind(sections: Sections<'_>) -> anyhow::Result<Self> {
        let oidc = match sections.oidc {
            Some(oidc) => Some(BoundOidc::bind(oidc, sections.jwt_key_ttl).await?),
            None => None,
        };
        let introspection = match sections.introspection {
            Some(introspection) => {
                let listener = bind(
                    introspection.listen,
                    "the introspection endpoint",
                    "[introspection] listen",
                )
                .await?;
                Some((listener, introspection.clone()))
            }
            None => None,
        };
        let bundle_endpoint = match sections.bundle_endpoint {
            Some(endpoint) => {
                let listener = bind(
                    endpoint.listen,
                    "the bundle endpoint",
                    "[bundle_endpoint] listen",
                )
                .await?;
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

    /// Whether a listener presents an X.509-SVID.
    fn needs_svid(&self) -> bool {
        self.introspection.is_some()
            || self
                .bundle_endpoint
                .as_ref()
                .is_some_and(|(_, endpoint)| endpoint.tls == EndpointTls::Spiffe)
    }

    /// Settles the SVID the HTTPS listeners present (signing an agent's
    /// with `authority`, only when one needs it) and loads the bundle
    /// endpoint's TLS.
    pub async fn prepare(
        self,
        authority: &Arc<dyn Authority>,
        svid: Svid<'_>,
    ) -> anyhow::Result<Prepared> {
        let (identity, renew) = match svid {
            Svid::Given(identity) => (Some(identity), None),
            Svid::Agent(trust_domain) if self.needs_svid() => {
                let spiffe_id = own_svid::agent_spiffe_id(trust_domain)?;
                let (identity, expires) = own_svid::own_svid(authority, &spiffe_id, OWN_SVID_TTL)
                    .await
                    .context("the agent's own SVID, for its HTTPS listeners")?;
                (Some(identity), Some((spiffe_id, expires)))
            }
            Svid::Agent(_) => (None, None),
        };
        let bundle_endpoint_tls = match &self.bundle_endpoint {
            Some((_, endpoint)) => Some(
                bundle_endpoint::tls(
                    &endpoint.tls,
                    authority.subscribe_bundle(),
                    identity.clone(),
                )
                .context("the bundle endpoint's TLS ([bundle_endpoint])")?,
            ),
            None => None,
        };
        Ok(Prepared {
            listeners: self,
            identity,
            renew,
            bundle_endpoint_tls,
        })
    }
}

/// Binds `listen` for `what`, naming `key` when it fails.
async fn bind(listen: SocketAddr, what: &str, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {what} {listen} ({key})"))
}

// === impl Prepared ===

impl Prepared {
    /// Serves every bound listener until the process stops, and renews an
    /// SVID signed in [`Listeners::prepare`].
    pub fn spawn<I: Introspector>(self, context: Context<'_, I>) -> anyhow::Result<Addrs> {
        let Context {
            authority,
            introspector,
            audit,
            shutdown,
        } = context;
        if let (Some((spiffe_id, expires)), Some(identity)) = (self.renew, &self.identity) {
            shutdown.spawn(
                "own svid renewal",
                own_svid::renew_own_svid(
                    Arc::clone(authority),
                    spiffe_id,
                    OWN_SVID_TTL,
                    identity.clone(),
                    expires,
                    shutdown.token(),
                ),
            );
        }
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

        let introspection = match (introspection, &self.identity) {
            (Some((listener, config)), Some(identity)) => {
                let addr = listener
                    .local_addr()
                    .context("the introspection endpoint's address")?;
                let tls = mtls::https_server_config(
                    authority.subscribe_bundle(),
                    identity.clone(),
                    mtls::ClientAuth::Required,
                );
                let routes = IntrospectionRoutes::new(introspector, &config, audit.clone());
                serve(
                    shutdown,
                    "introspection endpoint",
                    listener,
                    Tls::Rustls(Arc::new(tls)),
                    routes,
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
                serve(shutdown, "bundle endpoint", listener, tls, routes);
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

/// Serves `routes` on `listener` as the job `name`, with the kit's
/// default bounds.
fn serve<R: web::Routes>(
    shutdown: &Shutdown,
    name: &'static str,
    listener: TcpListener,
    tls: Tls,
    routes: R,
) {
    shutdown.spawn(
        name,
        web::serve(
            listener,
            tls,
            Arc::new(routes),
            Limits::default(),
            shutdown.tracker(),
            shutdown.token(),
        ),
    );
}
