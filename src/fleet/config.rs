//! `[server]` in the agent's config: where the fleet's server is and how
//! this node proves who it is.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use zeroize::Zeroizing;

/// Most server addresses.
const MAX_ADDRESSES: usize = 16;

/// `[server]` as serde reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleetConfig {
    /// `host:port` of the server.
    pub address: Option<String>,
    /// Several, tried in turn.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The trust domain's SPIFFE bundle document, for the first contact.
    pub bootstrap_bundle: Option<PathBuf>,
    /// A single-use join token (or `TETHER_JOIN_TOKEN`).
    pub join_token: Option<String>,
    /// `join_token` (the default) or `k8s_psat`.
    pub node_attestation: Option<String>,
    /// Accept the server's certificate unverified at the first contact.
    #[serde(default)]
    pub insecure_bootstrap: bool,
}

/// A valid `[server]`.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `host:port` each, tried in turn.
    pub addresses: Vec<String>,
    /// The bootstrap bundle file.
    pub bootstrap_bundle: Option<PathBuf>,
    /// The join token, when the node has not attested yet.
    pub join_token: Option<Zeroizing<String>>,
    /// First contact without verifying the server (logged at every start).
    pub insecure_bootstrap: bool,
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("addresses", &self.addresses)
            .field("bootstrap_bundle", &self.bootstrap_bundle)
            .field("join_token", &self.join_token.as_ref().map(|_| "***"))
            .field("insecure_bootstrap", &self.insecure_bootstrap)
            .finish()
    }
}

// === impl RawFleetConfig ===

impl RawFleetConfig {
    /// Validates `[server]`; `join_token_env` is `TETHER_JOIN_TOKEN`.
    /// `Err((key, problem))`.
    pub fn validate(
        self,
        join_token_env: Option<String>,
    ) -> Result<FleetConfig, (&'static str, String)> {
        let mut addresses = self.addresses;
        if let Some(address) = self.address {
            if !addresses.is_empty() {
                return Err((
                    "server.address",
                    "set address or addresses, not both".into(),
                ));
            }
            addresses.push(address);
        }
        if addresses.is_empty() {
            return Err((
                "server.address",
                "the server's host:port is required in [server]".into(),
            ));
        }
        if addresses.len() > MAX_ADDRESSES {
            return Err((
                "server.addresses",
                format!("at most {MAX_ADDRESSES} addresses"),
            ));
        }
        for address in &addresses {
            let port = address.rsplit_once(':').map(|(_, port)| port);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) || address.len() > 260 {
                return Err(("server.addresses", format!("{address:?} is not host:port")));
            }
        }
        match self.node_attestation.as_deref() {
            None | Some("join_token") => {}
            Some("k8s_psat") => {
                return Err((
                    "server.node_attestation",
                    "k8s_psat is not built yet in this version; use join_token".into(),
                ));
            }
            Some(other) => {
                return Err((
                    "server.node_attestation",
                    format!("{other:?}: expected join_token or k8s_psat"),
                ));
            }
        }
        if let Some(path) = &self.bootstrap_bundle
            && !path.is_absolute()
        {
            return Err((
                "server.bootstrap_bundle",
                format!("{} is not an absolute path", path.display()),
            ));
        }
        if self.bootstrap_bundle.is_none() && !self.insecure_bootstrap {
            return Err((
                "server.bootstrap_bundle",
                "the trust domain's bundle is required to verify the server at the first contact \
                 (or set insecure_bootstrap = true, which trusts whoever answers)"
                    .into(),
            ));
        }
        let join_token = join_token_env
            .filter(|t| !t.is_empty())
            .or(self.join_token)
            .map(Zeroizing::new);
        Ok(FleetConfig {
            addresses,
            bootstrap_bundle: self.bootstrap_bundle,
            join_token,
            insecure_bootstrap: self.insecure_bootstrap,
        })
    }
}
