//! `tether server run --config FILE`: the server's configuration, one TOML
//! file validated once into a [`ServerConfig`] that cannot be invalid.
//!
//! The keys are the fleet's contract (issue 17): `trust_domain`,
//! `data_dir`, `listen`, `admin_socket_path`, `store`, `[authority]` as the
//! agent's, and `[[entries]]` as the agent's plus `nodes`. The checks the
//! agent applies to the same keys are the agent's own (`crate::config`'s
//! helpers, `AuthorityConfig::validate`, `RegistrationEntry::from_config`).
//! `[kubernetes]` (optional) enables `k8s_psat` node attestation and pod
//! scope (`server::k8s::config`); `[oidc]` (optional) serves OIDC
//! discovery for the fleet, as the agent's does (`crate::oidc`).
//! scope (`server::k8s::config`). `[introspection]` (optional) serves
//! RFC 7662 introspection (`crate::introspect`).
//! Environment overrides: `TETHER_TRUST_DOMAIN`, `TETHER_SERVER_DATA_DIR`,
//! `TETHER_SERVER_ADMIN_SOCKET`, `TETHER_SERVER_STORE`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use spiffe::TrustDomain;

use super::k8s::KubernetesConfig;
use super::k8s::config::RawKubernetesConfig;
use super::scope::{NodeName, ServerEntry};
use crate::authority::AuthorityConfig;
use crate::config::{self, ConfigError, EnvSource};
use crate::error::Chain;
use crate::introspect::IntrospectionConfig;
use crate::registration::{self, EntrySpec, RegistrationEntry};

/// The highest `max_tasks_per_node`: an agent keeps at most 1,000,000 of
/// other nodes' ends.
const MAX_TASKS_PER_NODE: u64 = 1_000_000;
/// A node SVID's life when `node_svid_ttl` is not set.
pub const DEFAULT_NODE_SVID_TTL: Duration = Duration::from_secs(3600);
/// The shortest `node_svid_ttl`.
pub const MIN_NODE_SVID_TTL: Duration = Duration::from_secs(10);

/// Where agents reach the server when `listen` is not set.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8081";

/// A complete, valid server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The fleet's trust domain; every agent's must equal it.
    pub trust_domain: TrustDomain,
    /// Keys, the SQLite store (when `store` is not PostgreSQL) and the
    /// server's audit trail.
    pub data_dir: PathBuf,
    /// The agents' address.
    pub listen: SocketAddr,
    /// The operators' socket.
    pub admin_socket_path: PathBuf,
    /// Where the fleet's state is kept.
    pub store: StoreLocation,
    /// How long a node SVID lives (nodes renew at half of it).
    pub node_svid_ttl: Duration,
    /// Each node's calls a second, after a burst of `node_request_burst`.
    pub node_requests_per_second: u32,
    /// Each node's burst of calls.
    pub node_request_burst: u32,
    /// The farthest a fleet task's deadline may be from its begin: a
    /// node's task token with a later `tctx.deadline` is refused, so every
    /// row of the task index is pruned within it.
    pub max_task_ttl: Duration,
    /// The most tasks one node may have in the task index (live, or ended
    /// and not yet pruned): a node's new task past it is refused, so one
    /// node cannot fill every agent's set of other nodes' ends.
    pub max_tasks_per_node: u64,
    /// The signing keys, as the agent's `[authority]`.
    pub authority: AuthorityConfig,
    /// Entries from the file, each with the nodes it names.
    pub entries: Vec<ServerEntry>,
    /// `[kubernetes]`: `k8s_psat` node attestation and pod scope; `None`:
    /// join tokens only.
    pub kubernetes: Option<KubernetesConfig>,
    /// `[oidc]`: OIDC discovery for the fleet. Its issuer is also
    /// `authority.issuer`: the `iss` of every token the fleet signs.
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// `[introspection]`: the RFC 7662 endpoint for relying parties,
    /// deciding task tokens by the fleet's task index.
    pub introspection: Option<IntrospectionConfig>,
    /// `[bundle_endpoint]`: the fleet's bundle served to federated peers
    /// (`https_spiffe` presents the server's own SVID).
    pub bundle_endpoint: Option<crate::federation::BundleEndpoint>,
}

/// `store`: where replicas keep what they share.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// No `store`: SQLite in the data dir, for one replica.
    Sqlite(PathBuf),
    /// A `postgres://` (or `postgresql://`) URL, for several replicas.
    Postgres(String),
}

/// The TOML document: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerConfig {
    trust_domain: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    admin_socket_path: Option<PathBuf>,
    store: Option<String>,
    #[serde(default, with = "humantime_serde")]
    node_svid_ttl: Option<Duration>,
    node_requests_per_second: Option<u32>,
    node_request_burst: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    max_task_ttl: Option<Duration>,
    max_tasks_per_node: Option<u64>,
    #[serde(default)]
    authority: AuthorityConfig,
    #[serde(default)]
    entries: Vec<RawServerEntry>,
    kubernetes: Option<RawKubernetesConfig>,
    oidc: Option<crate::oidc::OidcConfig>,
    introspection: Option<IntrospectionConfig>,
    bundle_endpoint: Option<crate::federation::BundleEndpointConfig>,
}

/// `[[entries]]`: the agent's entry keys, plus `nodes`. Read by hand, not
/// with `#[serde(flatten)]`, which would let an unknown key (a typo)
/// through: `nodes` is taken out, and the rest must be an agent entry,
/// unknown keys refused.
#[derive(Debug)]
struct RawServerEntry {
    spec: EntrySpec,
    nodes: Vec<String>,
}

impl<'de> Deserialize<'de> for RawServerEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table = toml::Table::deserialize(deserializer)?;
        let nodes = match table.remove("nodes") {
            None => Vec::new(),
            Some(value) => value
                .try_into()
                .map_err(|e| D::Error::custom(format!("nodes: {e}")))?,
        };
        let spec = toml::Value::Table(table)
            .try_into()
            .map_err(D::Error::custom)?;
        Ok(Self { spec, nodes })
    }
}

// === impl ServerConfig ===

impl ServerConfig {
    /// Loads and validates `path`, with the environment overrides.
    pub fn load(path: &Path, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let text = config::read_file(path)?;
        Self::parse(path, &text, env)
    }

    /// Parses and validates TOML `text` read from `path`.
    pub fn parse(path: &Path, text: &str, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let raw: RawServerConfig = toml::from_str(text)
            .map_err(|source| ConfigError::parse(path.to_owned(), text, source))?;
        Self::from_raw(raw, env)
    }

    fn from_raw(raw: RawServerConfig, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let td_value = env
            .var("TETHER_TRUST_DOMAIN")
            .or(raw.trust_domain)
            .unwrap_or_else(|| config::DEFAULT_TRUST_DOMAIN.to_owned());
        let trust_domain = config::parse_trust_domain("trust_domain", &td_value)?;

        let data_dir = env
            .var("TETHER_SERVER_DATA_DIR")
            .map(PathBuf::from)
            .or(raw.data_dir)
            .unwrap_or_else(|| default_data_dir(env));
        config::check_absolute("data_dir", &data_dir)?;
        let admin_socket_path = env
            .var("TETHER_SERVER_ADMIN_SOCKET")
            .map(PathBuf::from)
            .or(raw.admin_socket_path)
            .unwrap_or_else(|| default_admin_socket_path(env));
        config::check_absolute("admin_socket_path", &admin_socket_path)?;

        let listen_value = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_value.parse().map_err(|_| {
            ConfigError::invalid(
                "listen",
                listen_value.clone(),
                "expected an IP address and a port, such as 0.0.0.0:8081 or [::]:8081",
            )
        })?;

        let store = match env.var("TETHER_SERVER_STORE").or(raw.store) {
            None => StoreLocation::Sqlite(data_dir.join("server.db")),
            Some(url) => StoreLocation::postgres(&url)?,
        };

        let mut authority = raw.authority;
        let oidc = raw.oidc.map(config::validate_oidc).transpose()?;
        authority.issuer = oidc.as_ref().map(|o| o.issuer.clone());
        config::check_ttl("authority.ca_ttl", authority.ca_ttl, None)?;
        config::check_ttl("authority.jwt_key_ttl", authority.jwt_key_ttl, None)?;
        authority
            .validate()
            .map_err(|(key, problem)| ConfigError::setting(key, problem))?;

        let node_svid_ttl = raw.node_svid_ttl.unwrap_or(DEFAULT_NODE_SVID_TTL);
        if node_svid_ttl < MIN_NODE_SVID_TTL {
            return Err(ConfigError::invalid(
                "node_svid_ttl",
                humantime::format_duration(node_svid_ttl).to_string(),
                format!(
                    "must be at least {} (nodes renew at half of it)",
                    humantime::format_duration(MIN_NODE_SVID_TTL)
                ),
            ));
        }
        config::check_ttl(
            "node_svid_ttl",
            node_svid_ttl,
            Some(("authority.ca_ttl", authority.ca_ttl)),
        )?;

        let node_requests_per_second = raw
            .node_requests_per_second
            .unwrap_or(crate::server::node_api::DEFAULT_NODE_RATE);
        let node_request_burst = raw
            .node_request_burst
            .unwrap_or(crate::server::node_api::DEFAULT_NODE_BURST);
        if node_requests_per_second == 0 || node_request_burst == 0 {
            return Err(ConfigError::setting(
                "node_requests_per_second",
                "node_requests_per_second and node_request_burst must be more than zero",
            ));
        }

        let max_task_ttl = raw
            .max_task_ttl
            .unwrap_or(crate::server::node_api::DEFAULT_MAX_TASK_TTL);
        config::check_ttl("max_task_ttl", max_task_ttl, None)?;
        let max_tasks_per_node = raw
            .max_tasks_per_node
            .unwrap_or(crate::server::node_api::DEFAULT_MAX_TASKS_PER_NODE);
        if max_tasks_per_node == 0 || max_tasks_per_node > MAX_TASKS_PER_NODE {
            return Err(ConfigError::setting(
                "max_tasks_per_node",
                format!("must be 1 to {MAX_TASKS_PER_NODE}"),
            ));
        }

        let entries = entries(&raw.entries, &trust_domain)?;
        let kubernetes = raw.kubernetes.map(|k| k.validate(env)).transpose()?;
        let introspection = raw
            .introspection
            .map(IntrospectionConfig::validate)
            .transpose()
            .map_err(|(key, problem)| ConfigError::setting(key, problem))?;
        let bundle_endpoint = raw
            .bundle_endpoint
            .map(|b| {
                b.validate().map_err(|p| {
                    ConfigError::invalid(format!("bundle_endpoint.{}", p.key), p.value, p.problem)
                })
            })
            .transpose()?;
        Ok(Self {
            trust_domain,
            data_dir,
            listen,
            admin_socket_path,
            store,
            node_svid_ttl,
            node_requests_per_second,
            node_request_burst,
            max_task_ttl,
            max_tasks_per_node,
            authority,
            entries,
            kubernetes,
            oidc,
            introspection,
            bundle_endpoint,
        })
    }
}

/// `[[entries]]`, validated as the agent validates its own, each node name
/// checked, no entry twice. The server federates with no one yet, so
/// `federates_with` must be empty.
fn entries(raw: &[RawServerEntry], td: &TrustDomain) -> Result<Vec<ServerEntry>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, e) in raw.iter().enumerate() {
        let key = format!("entries[{i}]");
        let entry =
            RegistrationEntry::from_config(&e.spec, td, &BTreeSet::new()).map_err(|source| {
                ConfigError::Invalid {
                    key: key.clone(),
                    value: e.spec.spiffe_id.clone(),
                    source: Box::new(source),
                }
            })?;
        let mut nodes = BTreeSet::new();
        for name in &e.nodes {
            let node = NodeName::new(name).map_err(|source| ConfigError::Invalid {
                key: format!("{key}.nodes"),
                value: name.clone(),
                source: Box::new(source),
            })?;
            if !nodes.insert(node) {
                return Err(ConfigError::invalid(
                    format!("{key}.nodes"),
                    name.clone(),
                    "is listed twice",
                ));
            }
        }
        out.push(ServerEntry {
            entry: Arc::new(entry),
            nodes,
        });
    }
    let plain: Vec<RegistrationEntry> = out.iter().map(|e| (*e.entry).clone()).collect();
    registration::check_config_duplicates(&plain).map_err(|source| ConfigError::Invalid {
        key: "entries".into(),
        value: String::new(),
        source: Box::new(source),
    })?;
    Ok(out)
}

/// The server's data dir when none is configured: beside the agent's
/// default (`/var/lib/tether-server` for root).
pub fn default_data_dir(env: &dyn EnvSource) -> PathBuf {
    config::default_data_dir(env).with_file_name("tether-server")
}

/// The server's admin socket when none is configured: `server.sock` in
/// the agent's admin socket directory (`/run/tether-admin/server.sock`
/// for root).
pub fn default_admin_socket_path(env: &dyn EnvSource) -> PathBuf {
    config::default_admin_socket_path(env).with_file_name("server.sock")
}

// === impl StoreLocation ===

impl StoreLocation {
    /// Checks a PostgreSQL URL's form (the server connects at start).
    fn postgres(url: &str) -> Result<Self, ConfigError> {
        let shown = Self::Postgres(url.to_owned()).to_string();
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"));
        match rest {
            Some(rest) if !rest.is_empty() && !url.chars().any(char::is_whitespace) => {
                // What the store would refuse at start (TLS asked for, an
                // option tokio-postgres does not know) is refused here.
                super::store::postgres::check_url(url)
                    .map_err(|e| ConfigError::invalid("store", shown, Chain(&e).to_string()))?;
                Ok(Self::Postgres(url.to_owned()))
            }
            _ => Err(ConfigError::invalid(
                "store",
                shown,
                "expected a postgres:// URL (or no store, for SQLite in the data dir)",
            )),
        }
    }
}

/// Never prints a password: `postgres://user:***@host/db`.
impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite {}", path.display()),
            Self::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `scheme://user:password@rest` with the password replaced by `***`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => match rest.split_once('?') {
            // A password may also ride in the query (`?password=`).
            Some((base, _)) => format!("{scheme}://{base}?***"),
            None => url.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests;
