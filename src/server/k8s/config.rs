//! `[kubernetes]` in the server's config: how the server reaches the
//! Kubernetes API server, and which service accounts may attest as nodes
//! (`k8s_psat`). Absent: the server admits nodes by join token only, and no
//! entry is served by pod placement.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{self, ConfigError, EnvSource};

/// The in-cluster CA of the API server.
pub const DEFAULT_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The server pod's own service account token.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The audience agents' projected tokens are issued for.
pub const DEFAULT_AUDIENCE: &str = "tether-server";
/// Most entries in `allowed_service_accounts`.
const MAX_ALLOWED: usize = 64;
/// Longest `audience`.
const MAX_AUDIENCE_LEN: usize = 253;

/// `[kubernetes]` as serde reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetesConfig {
    api_server: Option<String>,
    ca_path: Option<PathBuf>,
    token_path: Option<PathBuf>,
    audience: Option<String>,
    #[serde(default)]
    allowed_service_accounts: Vec<String>,
}

/// A valid `[kubernetes]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The API server: `https://host[:port]`.
    pub api_server: ApiServer,
    /// The PEM file of the CA that signed the API server's certificate.
    pub ca_path: PathBuf,
    /// The server's own service account token (re-read at every call: the
    /// kubelet rotates it).
    pub token_path: PathBuf,
    /// The audience a node's token must be issued for.
    pub audience: String,
    /// The service accounts whose pods may attest as nodes (the agent's
    /// DaemonSet); every other is refused.
    pub allowed_service_accounts: BTreeSet<ServiceAccount>,
}

/// Where the API server is: an `https` URL's host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServer {
    /// A DNS name or an IP address (without brackets).
    pub host: String,
    /// The port (443 when the URL has none).
    pub port: u16,
}

/// A service account, `namespace:name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

// === impl RawKubernetesConfig ===

impl RawKubernetesConfig {
    /// Validates `[kubernetes]`; the API server defaults to
    /// `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` (in a pod).
    pub(crate) fn validate(self, env: &dyn EnvSource) -> Result<KubernetesConfig, ConfigError> {
        let api_server = match self.api_server {
            Some(url) => ApiServer::parse(&url).map_err(|problem| {
                ConfigError::invalid("kubernetes.api_server", url.clone(), problem)
            })?,
            None => ApiServer::from_env(env)?,
        };
        let ca_path = self.ca_path.unwrap_or_else(|| DEFAULT_CA_PATH.into());
        config::check_absolute("kubernetes.ca_path", &ca_path)?;
        let token_path = self.token_path.unwrap_or_else(|| DEFAULT_TOKEN_PATH.into());
        config::check_absolute("kubernetes.token_path", &token_path)?;
        let audience = self.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned());
        if audience.is_empty()
            || audience.len() > MAX_AUDIENCE_LEN
            || audience
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::invalid(
                "kubernetes.audience",
                audience,
                format!("expected a non-empty word of at most {MAX_AUDIENCE_LEN} bytes"),
            ));
        }
        if self.allowed_service_accounts.is_empty() {
            return Err(ConfigError::setting(
                "kubernetes.allowed_service_accounts",
                "name the agent's service account (\"namespace:name\", such as \
                 \"tether-system:tether-agent\"): only its pods may attest as nodes",
            ));
        }
        if self.allowed_service_accounts.len() > MAX_ALLOWED {
            return Err(ConfigError::setting(
                "kubernetes.allowed_service_accounts",
                format!("at most {MAX_ALLOWED} service accounts"),
            ));
        }
        let mut allowed = BTreeSet::new();
        for value in &self.allowed_service_accounts {
            let sa = ServiceAccount::parse(value).ok_or_else(|| {
                ConfigError::invalid(
                    "kubernetes.allowed_service_accounts",
                    value.clone(),
                    "expected namespace:name (a namespace and a service account name as \
                     Kubernetes spells them)",
                )
            })?;
            if !allowed.insert(sa) {
                return Err(ConfigError::invalid(
                    "kubernetes.allowed_service_accounts",
                    value.clone(),
                    "is listed twice",
                ));
            }
        }
        Ok(KubernetesConfig {
            api_server,
            ca_path,
            token_path,
            audience,
            allowed_service_accounts: allowed,
        })
    }
}

// === impl ApiServer ===

impl ApiServer {
    /// `https://host[:port][/]`: nothing else (no path, query, user).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or("expected an https:// URL (the API server is only spoken to over TLS)")?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err("expected https://host or https://host:port, with no path".into());
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, rest) = v6.split_once(']').ok_or("an unclosed [ in the host")?;
                (host, rest.strip_prefix(':'))
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => 443,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{port:?} is not a port"))?,
        };
        let valid_host = host.parse::<std::net::IpAddr>().is_ok()
            || (!host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
        if !valid_host {
            return Err(format!("{host:?} is not a host name or an IP address"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The in-cluster API server, from the variables Kubernetes sets in
    /// every pod.
    fn from_env(env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let host = env.var("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty());
        let Some(host) = host else {
            return Err(ConfigError::setting(
                "kubernetes.api_server",
                "not set, and KUBERNETES_SERVICE_HOST is not set (outside a pod): set the API \
                 server's https:// URL",
            ));
        };
        let port = match env.var("KUBERNETES_SERVICE_PORT") {
            None => 443,
            Some(port) => port.parse().map_err(|_| {
                ConfigError::invalid(
                    "KUBERNETES_SERVICE_PORT",
                    port.clone(),
                    "expected a port number",
                )
            })?,
        };
        let url = if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        };
        Self::parse(&url)
            .map_err(|problem| ConfigError::invalid("KUBERNETES_SERVICE_HOST", host, problem))
    }

    /// `host:port` (an IPv6 literal in brackets), for messages and `Host`.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

// === impl ServiceAccount ===

impl ServiceAccount {
    /// `namespace:name`, each as Kubernetes allows (a DNS label and a DNS
    /// subdomain).
    pub fn parse(value: &str) -> Option<Self> {
        let (namespace, name) = value.split_once(':')?;
        (is_dns_label(namespace) && is_dns_subdomain(name)).then(|| Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// From a TokenReview's username, `system:serviceaccount:NS:NAME`.
    pub fn from_username(username: &str) -> Option<Self> {
        Self::parse(username.strip_prefix("system:serviceaccount:")?)
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

/// An RFC 1123 label: what Kubernetes allows as a namespace.
pub(crate) fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(inner)
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
}

/// An RFC 1123 subdomain: what Kubernetes allows as most object names.
pub(crate) fn is_dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns_label)
}
