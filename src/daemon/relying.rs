//! A standalone agent's listeners for relying parties outside the socket:
//! OIDC discovery (`[oidc]`), the SPIFFE bundle endpoint
//! (`[bundle_endpoint]`) and token introspection (`[introspection]`).
//!
//! Each listener is bound in [`Listeners::bind`], with the agent's other
//! sockets and before anything runs (a port in use fails the start, naming
//! its key), and served from [`Listeners::spawn`] once the agent's parts
//! are loaded. A fleet agent binds none of them: its `tether server`
//! serves them for the trust domain (config validation refuses them on a
//! fleet agent). The listeners that present an X.509-SVID share the
//! agent's own ([`OwnSvid`], `spiffe://<td>/tether/agent`), made only when
//! one of them is configured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spiffe::TrustDomain;

use super::own_svid;
use super::shutdown::Shutdown;
use crate::authority::Authority;
use crate::mtls::SwappableIdentity;

/// The agent's own SVID's lifetime (renewed at half life).
const OWN_SVID_TTL: Duration = Duration::from_secs(3600);

/// The relying parties' listeners, bound and not yet served: one field per
/// listener, `None` when its section is not configured.
#[derive(Debug, Default)]
pub(super) struct Listeners {
    /// `[oidc]`: OIDC discovery.
    oidc: Option<crate::oidc::BoundOidc>,
}

/// Where each relying party's listener is bound (port 0 in the config gets
/// a real one), for tests and the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Addrs {
    /// OIDC discovery (`[oidc] listen`).
    pub oidc: Option<SocketAddr>,
}

/// What the listeners serve from.
pub(super) struct Context<'a> {
    /// Signs the agent's own SVID; its bundle is the trust domain's.
    pub authority: &'a Arc<dyn Authority>,
    /// The agent's trust domain.
    pub trust_domain: &'a TrustDomain,
    /// Runs the listeners and the own SVID's renewal.
    pub shutdown: &'a Shutdown,
}

/// The agent's own X.509-SVID, signed the first time a listener asks for
/// it ([`OwnSvid::get`]) and then renewed until the agent stops.
pub(super) struct OwnSvid<'a> {
    context: &'a Context<'a>,
    current: Option<SwappableIdentity>,
}

// === impl Listeners ===

impl Listeners {
    /// Binds every configured listener.
    pub(super) async fn bind(config: &crate::config::Config) -> anyhow::Result<Self> {
        let oidc = match &config.oidc {
            Some(oidc) => {
                Some(crate::oidc::BoundOidc::bind(oidc, config.authority.jwt_key_ttl).await?)
            }
            None => None,
        };
        Ok(Self { oidc })
    }

    /// Serves every bound listener until the agent stops.
    pub(super) async fn spawn(self, context: Context<'_>) -> anyhow::Result<Addrs> {
        let _own = OwnSvid::new(&context);
        let shutdown = context.shutdown;
        let oidc = self.oidc.map(|bound| {
            let addr = bound.local_addr();
            shutdown.spawn(
                "oidc discovery",
                bound.serve(
                    context.authority.subscribe_bundle(),
                    shutdown.tracker(),
                    shutdown.token(),
                ),
            );
            tracing::info!(%addr, "OIDC discovery: /.well-known/openid-configuration, /keys");
            addr
        });
        Ok(Addrs { oidc })
    }
}

/// The address `listener` is bound to, naming `what` when it cannot say.
#[expect(dead_code, reason = "the first listener lands in this issue")]
fn bound(listener: &tokio::net::TcpListener, what: &str) -> anyhow::Result<SocketAddr> {
    use anyhow::Context as _;
    listener
        .local_addr()
        .with_context(|| format!("the address of {what}"))
}

// === impl OwnSvid ===

impl<'a> OwnSvid<'a> {
    fn new(context: &'a Context<'a>) -> Self {
        Self {
            context,
            current: None,
        }
    }

    /// The agent's own SVID, signed now if no listener asked before (and
    /// its renewal started).
    #[expect(dead_code, reason = "the first listener lands in this issue")]
    pub(super) async fn get(&mut self) -> anyhow::Result<SwappableIdentity> {
        if let Some(identity) = &self.current {
            return Ok(identity.clone());
        }
        let spiffe_id = own_svid::agent_spiffe_id(self.context.trust_domain)?;
        let (identity, expires) =
            own_svid::own_svid(self.context.authority, &spiffe_id, OWN_SVID_TTL).await?;
        self.context.shutdown.spawn(
            "own svid renewal",
            own_svid::renew_own_svid(
                Arc::clone(self.context.authority),
                spiffe_id,
                OWN_SVID_TTL,
                identity.clone(),
                expires,
                self.context.shutdown.token(),
            ),
        );
        self.current = Some(identity.clone());
        Ok(identity)
    }
}
