//! `[server]` in the agent's config: where the fleet's server is and how
//! this node proves who it is: a single-use join token (`join_token`, the
//! default) or the agent pod's projected service account token
//! (`k8s_psat`, read from `psat_path` at every attestation).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

/// Most server addresses.
const MAX_ADDRESSES: usize = 16;
/// How long an agent may go without hearing from the server before it
/// refuses other nodes' task tokens, when `revocation_staleness` is not
/// set; and the bounds it may be set within.
pub const DEFAULT_REVOCATION_STALENESS: Duration = Duration::from_secs(5);
const MIN_REVOCATION_STALENESS: Duration = Duration::from_secs(2);
const MAX_REVOCATION_STALENESS: Duration = Duration::from_secs(600);
/// Where the projected service account token for the server is mounted
/// (the fleet overlay's projected volume, audience `tether-server`).
pub const DEFAULT_PSAT_PATH: &str = "/var/run/secrets/tokens/tether-server";

/// `[server]` as serde reads it.
#[derive(Default, Deserialize)]
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
    /// `k8s_psat`: the projected service account token file.
    pub psat_path: Option<PathBuf>,
    /// Accept the server's certificate unverified at the first contact.
    #[serde(default)]
    pub insecure_bootstrap: bool,
    /// How long without a word from the server before other nodes' task
    /// tokens are refused (`5s`).
    #[serde(default, with = "humantime_serde")]
    pub revocation_staleness: Option<Duration>,
}

/// Never prints the join token.
impl fmt::Debug for RawFleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawFleetConfig")
            .field("address", &self.address)
            .field("addresses", &self.addresses)
            .field("bootstrap_bundle", &self.bootstrap_bundle)
            .field("join_token", &self.join_token.as_ref().map(|_| "***"))
            .field("node_attestation", &self.node_attestation)
            .field("psat_path", &self.psat_path)
            .field("insecure_bootstrap", &self.insecure_bootstrap)
            .field("revocation_staleness", &self.revocation_staleness)
            .finish()
    }
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
    /// How the node proves who it is.
    pub node_attestation: NodeAttestation,
    /// First contact without verifying the server (logged at every start).
    pub insecure_bootstrap: bool,
    /// How long without a word from the server (its sync stream's
    /// heartbeats) before this agent refuses task tokens of other nodes'
    /// tasks: an end it may have missed. Its own node's tasks are decided
    /// from local state.
    pub revocation_staleness: Duration,
}

/// How a node attests to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestation {
    /// A single-use join token (`join_token` or `TETHER_JOIN_TOKEN`).
    JoinToken,
    /// The agent pod's projected service account token, re-read at every
    /// attestation (the kubelet rotates it); the server reviews it with the
    /// Kubernetes API and names the node from the pod's `spec.nodeName`.
    K8sPsat {
        /// The token file.
        psat_path: PathBuf,
    },
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("addresses", &self.addresses)
            .field("bootstrap_bundle", &self.bootstrap_bundle)
            .field("join_token", &self.join_token.as_ref().map(|_| "***"))
            .field("node_attestation", &self.node_attestation)
            .field("insecure_bootstrap", &self.insecure_bootstrap)
            .field("revocation_staleness", &self.revocation_staleness)
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
        let node_attestation = match self.node_attestation.as_deref() {
            None | Some("join_token") => {
                if self.psat_path.is_some() {
                    return Err((
                        "server.psat_path",
                        "is only read with node_attestation = \"k8s_psat\"".into(),
                    ));
                }
                NodeAttestation::JoinToken
            }
            Some("k8s_psat") => {
                if join_token.is_some() {
                    return Err((
                        "server.join_token",
                        "a join token (server.join_token or TETHER_JOIN_TOKEN) is not used with \
                         node_attestation = \"k8s_psat\"; remove one"
                            .into(),
                    ));
                }
                let psat_path = self
                    .psat_path
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_PSAT_PATH));
                if !psat_path.is_absolute() {
                    return Err((
                        "server.psat_path",
                        format!("{} is not an absolute path", psat_path.display()),
                    ));
                }
                NodeAttestation::K8sPsat { psat_path }
            }
            Some(other) => {
                return Err((
                    "server.node_attestation",
                    format!("{other:?}: expected join_token or k8s_psat"),
                ));
            }
        };
        let revocation_staleness = self
            .revocation_staleness
            .unwrap_or(DEFAULT_REVOCATION_STALENESS);
        if !(MIN_REVOCATION_STALENESS..=MAX_REVOCATION_STALENESS).contains(&revocation_staleness) {
            return Err((
                "server.revocation_staleness",
                format!(
                    "{} is outside {}..={} (the server sends a heartbeat every second)",
                    humantime::format_duration(revocation_staleness),
                    humantime::format_duration(MIN_REVOCATION_STALENESS),
                    humantime::format_duration(MAX_REVOCATION_STALENESS),
                ),
            ));
        }
        Ok(FleetConfig {
            addresses,
            bootstrap_bundle: self.bootstrap_bundle,
            join_token,
            node_attestation,
            insecure_bootstrap: self.insecure_bootstrap,
            revocation_staleness,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawFleetConfig {
        toml::from_str(&format!(
            "address = \"tether-server:8081\"\nbootstrap_bundle = \"/etc/tether/bundle.json\"\n{text}"
        ))
        .expect("toml")
    }

    #[test]
    fn the_join_token_is_never_printed() {
        let secret = "tjt1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let raw = raw(&format!("join_token = \"{secret}\"\n"));
        assert!(!format!("{raw:?}").contains(secret));
        let config = raw.validate(None).expect("valid");
        assert!(!format!("{config:?}").contains(secret));
    }

    #[test]
    fn k8s_psat_reads_the_projected_token_path() {
        let config = raw("node_attestation = \"k8s_psat\"\n")
            .validate(None)
            .expect("valid");
        assert_eq!(
            config.node_attestation,
            NodeAttestation::K8sPsat {
                psat_path: DEFAULT_PSAT_PATH.into()
            }
        );
        let config = raw("node_attestation = \"k8s_psat\"\npsat_path = \"/tokens/t\"\n")
            .validate(None)
            .expect("valid");
        assert_eq!(
            config.node_attestation,
            NodeAttestation::K8sPsat {
                psat_path: "/tokens/t".into()
            }
        );
        let config = raw("").validate(None).expect("valid");
        assert_eq!(config.node_attestation, NodeAttestation::JoinToken);
    }

    #[test]
    fn revocation_staleness_has_a_default_and_bounds() {
        let config = raw("").validate(None).expect("valid");
        assert_eq!(config.revocation_staleness, DEFAULT_REVOCATION_STALENESS);
        let config = raw("revocation_staleness = \"30s\"\n")
            .validate(None)
            .expect("valid");
        assert_eq!(config.revocation_staleness, Duration::from_secs(30));
        for refused in ["500ms", "1h"] {
            let (key, problem) = raw(&format!("revocation_staleness = \"{refused}\"\n"))
                .validate(None)
                .expect_err("out of bounds");
            assert_eq!(key, "server.revocation_staleness");
            assert!(problem.contains("heartbeat"), "{problem}");
        }
    }

    #[test]
    fn k8s_psat_refuses_what_it_does_not_use() {
        let (key, _) = raw("node_attestation = \"k8s_psat\"\n")
            .validate(Some("tjt1.x".into()))
            .expect_err("a join token with k8s_psat");
        assert_eq!(key, "server.join_token");
        let (key, _) = raw("node_attestation = \"k8s_psat\"\npsat_path = \"tokens/t\"\n")
            .validate(None)
            .expect_err("a relative path");
        assert_eq!(key, "server.psat_path");
        let (key, _) = raw("psat_path = \"/tokens/t\"\n")
            .validate(None)
            .expect_err("psat_path without k8s_psat");
        assert_eq!(key, "server.psat_path");
        let (key, _) = raw("node_attestation = \"tpm\"\n")
            .validate(None)
            .expect_err("unknown");
        assert_eq!(key, "server.node_attestation");
    }
}
