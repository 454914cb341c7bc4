//! Configuration: one TOML file, every option defaulted, validated once into
//! a [`Config`] that cannot be invalid.
//!
//! Each domain owns its settings type (`AuthorityConfig`, `AttestorConfig`,
//! `EntrySpec`, ...); this module composes them, applies the environment
//! overrides from an injected [`EnvSource`], and checks what only the whole
//! can check (an entry's trust domain, its federations, TTLs against key
//! lifetimes). Nothing else imports this module: `daemon` hands each domain
//! its own section.
//!
//! Without a config file the agent runs on the embedded default: trust
//! domain `tether.local`, and one entry giving the user who started the
//! agent the identity `spiffe://tether.local/uid/<uid>`.

mod diff;
pub mod env;
pub mod error;
pub mod file;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spiffe::TrustDomain;

use crate::admin_api::AdminApiConfig;
use crate::attestation::AttestorConfig;
use crate::audit::AuditConfig;
use crate::authority::AuthorityConfig;
use crate::federation::{BundleEndpoint, FederationSource};
use crate::policy::PolicyConfig;
use crate::registration::{self, EntrySpec, RegistrationEntry};
use crate::svid::SvidConfig;
use crate::task::TaskConfig;
use crate::telemetry::{LogConfig, LogFormat};
use crate::workload_api::WorkloadApiConfig;
pub use env::{EnvSource, MapEnv, ProcessEnv};
pub use error::ConfigError;
use file::RawConfig;

/// The trust domain of the embedded default configuration.
pub const DEFAULT_TRUST_DOMAIN: &str = "tether.local";
/// Longest config file read.
const MAX_CONFIG_LEN: u64 = 4 * 1024 * 1024;

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file given with `--config`.
    File(PathBuf),
    /// No file: the embedded default.
    Embedded,
}

/// A complete, valid configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from.
    pub source: ConfigSource,
    /// The agent's trust domain.
    pub trust_domain: TrustDomain,
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// Keys and state.
    pub data_dir: PathBuf,
    /// The admin socket and who may use it.
    pub admin: AdminApiConfig,
    /// SVID lifetimes.
    pub svid: SvidConfig,
    /// Signing keys.
    pub authority: AuthorityConfig,
    /// Workload attestation.
    pub attestor: AttestorConfig,
    /// Workload API behaviour and limits.
    pub workload_api: WorkloadApiConfig,
    /// Task-bound tokens.
    pub tasks: TaskConfig,
    /// Cedar policies (`policy_dir`); none: entries alone decide.
    pub policy: PolicyConfig,
    /// The audit trail; `dir` is always set (`data_dir/audit` unless
    /// configured).
    pub audit: AuditConfig,
    /// Logging.
    pub log: LogConfig,
    /// The HTTP endpoint for probes and metrics (`[http]`); off unless
    /// `listen` is set.
    pub http: crate::telemetry::http::HttpConfig,
    /// OIDC discovery (`[oidc]`); its issuer is also
    /// `authority.issuer`, the `iss` of the tokens signed here.
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// Registration entries from the file, in order.
    pub entries: Vec<RegistrationEntry>,
    /// Federated trust domains.
    pub federation: Vec<FederationSource>,
    /// `[bundle_endpoint]`: this trust domain's bundle served to federated
    /// peers (standalone agents only).
    pub bundle_endpoint: Option<BundleEndpoint>,
    /// Fleet mode (`[server]`): the keys and entries are the server's.
    pub fleet: Option<crate::fleet::FleetConfig>,
    /// `[introspection]`: the RFC 7662 endpoint (a standalone agent only;
    /// in fleet mode the tether server serves it).
    pub introspection: Option<crate::introspect::IntrospectionConfig>,
}

// === impl Config ===

impl Config {
    /// Loads `path` (or the embedded default when `None`), applies the
    /// environment overrides and validates everything.
    pub fn load(path: Option<&Path>, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        match path {
            Some(path) => {
                let text = read_file(path)?;
                let raw: RawConfig = toml::from_str(&text)
                    .map_err(|source| ConfigError::parse(path.to_owned(), &text, source))?;
                Self::from_raw(raw, ConfigSource::File(path.to_owned()), env)
            }
            None => {
                let uid = env.euid();
                let raw = RawConfig {
                    entries: vec![EntrySpec {
                        spiffe_id: format!("spiffe://{DEFAULT_TRUST_DOMAIN}/uid/{uid}"),
                        selectors: vec![format!("unix:uid:{uid}")],
                        hint: Some("default".into()),
                        ..EntrySpec::default()
                    }],
                    ..RawConfig::default()
                };
                Self::from_raw(raw, ConfigSource::Embedded, env)
            }
        }
    }

    /// Parses TOML text (for tests and `config check`).
    pub fn from_toml(text: &str, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|source| ConfigError::parse(PathBuf::from("<inline>"), text, source))?;
        Self::from_raw(raw, ConfigSource::File(PathBuf::from("<inline>")), env)
    }

    fn from_raw(
        mut raw: RawConfig,
        source: ConfigSource,
        env: &dyn EnvSource,
    ) -> Result<Self, ConfigError> {
        let td_value = env
            .var("TETHER_TRUST_DOMAIN")
            .or(raw.trust_domain)
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        let trust_domain = parse_trust_domain("trust_domain", &td_value)?;

        let socket_path = env
            .var("TETHER_SOCKET_PATH")
            .map(PathBuf::from)
            .or(raw.socket_path)
            .unwrap_or_else(|| default_socket_path(env));
        check_absolute("socket_path", &socket_path)?;
        let data_dir = env
            .var("TETHER_DATA_DIR")
            .map(PathBuf::from)
            .or(raw.data_dir)
            .unwrap_or_else(|| default_data_dir(env));
        check_absolute("data_dir", &data_dir)?;

        let defaults = SvidConfig::default();
        let svid = SvidConfig {
            x509_svid_ttl: raw.x509_svid_ttl.unwrap_or(defaults.x509_svid_ttl),
            jwt_svid_ttl: raw.jwt_svid_ttl.unwrap_or(defaults.jwt_svid_ttl),
        };
        if raw.server.is_some() && raw.authority.is_some() {
            return Err(ConfigError::setting(
                "authority",
                "an agent with [server] holds no signing keys: the server's [authority] signs; remove [authority]",
            ));
        }
        if raw.server.is_some() && !raw.entries.is_empty() {
            return Err(ConfigError::setting(
                "entries",
                "an agent with [server] takes its entries from the server: create them there (tether server entry create, or the server's [[entries]])",
            ));
        }
        if raw.server.is_some() && raw.oidc.is_some() {
            return Err(ConfigError::setting(
                "oidc",
                "an agent with [server] does not serve OIDC discovery: it is served by the tether server (its [oidc]), whose issuer the agent's tokens carry; remove [oidc]",
            ));
        }
        if raw.server.is_some() && raw.introspection.is_some() {
            return Err(ConfigError::setting(
                "introspection",
                "an agent with [server] does not serve introspection: the tether server serves it (its own [introspection]); remove [introspection]",
            ));
        }
        let introspection = raw
            .introspection
            .take()
            .map(crate::introspect::IntrospectionConfig::validate)
            .transpose()
            .map_err(|(key, problem)| ConfigError::setting(key, problem))?;
        if raw.server.is_some() && raw.bundle_endpoint.is_some() {
            return Err(ConfigError::setting(
                "bundle_endpoint",
                "an agent with [server] does not serve the bundle endpoint: the tether server serves it (its [bundle_endpoint]); remove it here",
            ));
        }
        let bundle_endpoint = raw
            .bundle_endpoint
            .take()
            .map(|b| {
                b.validate().map_err(|p| {
                    ConfigError::invalid(format!("bundle_endpoint.{}", p.key), p.value, p.problem)
                })
            })
            .transpose()?;
        let fleet = raw
            .server
            .take()
            .map(|server| server.validate(env.var("TETHER_JOIN_TOKEN")))
            .transpose()
            .map_err(|(key, problem)| ConfigError::setting(key, problem))?;
        let mut authority = raw.authority.take().unwrap_or_default();
        let oidc = raw.oidc.take().map(validate_oidc).transpose()?;
        authority.issuer = oidc.as_ref().map(|o| o.issuer.clone());
        check_ttl("authority.ca_ttl", authority.ca_ttl, None)?;
        check_ttl("authority.jwt_key_ttl", authority.jwt_key_ttl, None)?;
        authority
            .validate()
            .map_err(|(key, problem)| ConfigError::setting(key, problem))?;
        check_ttl(
            "x509_svid_ttl",
            svid.x509_svid_ttl,
            Some(("authority.ca_ttl", authority.ca_ttl)),
        )?;
        check_ttl(
            "jwt_svid_ttl",
            svid.jwt_svid_ttl,
            Some(("authority.jwt_key_ttl", authority.jwt_key_ttl)),
        )?;

        let mut log = raw.log;
        if let Some(level) = env.var("TETHER_LOG_LEVEL") {
            log.level = level;
        }
        if let Some(format) = env.var("TETHER_LOG_FORMAT") {
            log.format = match format.as_str() {
                "plain" => LogFormat::Plain,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::invalid(
                        "TETHER_LOG_FORMAT",
                        format,
                        "expected plain or json",
                    ));
                }
            };
        }
        log.validate()
            .map_err(|problem| ConfigError::invalid("log.level", log.level.clone(), problem))?;

        raw.limits
            .validate()
            .map_err(|(key, problem)| ConfigError::setting(format!("limits.{key}"), problem))?;
        // One audience bound for every API on the workload socket.
        raw.tasks.max_audience_len = raw.limits.max_audience_len;
        raw.tasks
            .validate()
            .map_err(|(key, problem)| ConfigError::setting(key, problem))?;
        let workload_api = WorkloadApiConfig {
            allow_unauthenticated_verifiers: raw.allow_unauthenticated_verifiers,
            limits: raw.limits,
        };

        let mut federation = Vec::with_capacity(raw.federation.len());
        for (i, f) in raw.federation.iter().enumerate() {
            let key = format!("federation[{i}]");
            let td = parse_trust_domain(&format!("{key}.trust_domain"), &f.trust_domain)?;
            if td == trust_domain {
                return Err(ConfigError::invalid(
                    format!("{key}.trust_domain"),
                    &f.trust_domain,
                    "is the agent's own trust domain",
                ));
            }
            if federation
                .iter()
                .any(|s: &FederationSource| s.trust_domain == td)
            {
                return Err(ConfigError::invalid(
                    format!("{key}.trust_domain"),
                    &f.trust_domain,
                    "appears in two [[federation]] sections",
                ));
            }
            let source = f.validate(td).map_err(|p| {
                ConfigError::invalid(format!("{key}.{}", p.key), p.value, p.problem)
            })?;
            federation.push(source);
        }
        let federated: BTreeSet<TrustDomain> =
            federation.iter().map(|f| f.trust_domain.clone()).collect();

        let mut entries = Vec::with_capacity(raw.entries.len());
        for (i, e) in raw.entries.iter().enumerate() {
            let key = format!("entries[{i}]");
            let entry =
                RegistrationEntry::from_config(e, &trust_domain, &federated).map_err(|source| {
                    ConfigError::Invalid {
                        key: key.clone(),
                        value: e.spiffe_id.clone(),
                        source: Box::new(source),
                    }
                })?;
            if let Some(ttl) = entry.x509_svid_ttl {
                check_ttl(
                    &format!("{key}.x509_svid_ttl"),
                    ttl,
                    Some(("authority.ca_ttl", authority.ca_ttl)),
                )?;
            }
            if let Some(ttl) = entry.jwt_svid_ttl {
                check_ttl(
                    &format!("{key}.jwt_svid_ttl"),
                    ttl,
                    Some(("authority.jwt_key_ttl", authority.jwt_key_ttl)),
                )?;
            }
            entries.push(entry);
        }
        // Duplicates are a property of the whole list.
        registration::check_config_duplicates(&entries)
            .map_err(|e| ConfigError::invalid("entries", "", e.to_string()))?;

        let audit = resolve_audit(raw.audit, raw.audit_dir, &data_dir)?;
        let policy = PolicyConfig {
            dir: raw.policy_dir,
            poll_interval: raw
                .policy_poll_interval
                .unwrap_or(PolicyConfig::default().poll_interval),
        };
        policy.validate().map_err(|(key, problem)| {
            let value = match key {
                "policy_dir" => policy
                    .dir
                    .as_deref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
                _ => humantime::format_duration(policy.poll_interval).to_string(),
            };
            ConfigError::invalid(key, value, problem)
        })?;

        let admin_socket_path = env
            .var("TETHER_ADMIN_SOCKET")
            .map(PathBuf::from)
            .or(raw.admin_socket_path)
            .unwrap_or_else(|| default_admin_socket_path(env));
        check_absolute("admin_socket_path", &admin_socket_path)?;
        // The workload socket's directory is shared with workloads (a
        // Kubernetes hostPath, say): the admin socket must not be in it.
        if admin_socket_path.parent() == socket_path.parent() {
            return Err(ConfigError::invalid(
                "admin_socket_path",
                admin_socket_path.display().to_string(),
                "must be in another directory than socket_path: workloads must never reach the admin socket",
            ));
        }
        let mut attestor = raw.attestor;
        if attestor.k8s.enabled && attestor.k8s.node_name.is_none() {
            attestor.k8s.node_name = env.var("NODE_NAME").filter(|n| !n.is_empty());
        }
        attestor
            .k8s
            .validate()
            .map_err(|(key, problem)| ConfigError::setting(key, problem))?;
        let admin_gid = raw.admin_group.as_deref().map(resolve_group).transpose()?;
        let admin = AdminApiConfig {
            socket_path: admin_socket_path,
            uids: raw.admin_uids,
            gid: admin_gid,
        };

        Ok(Self {
            source,
            trust_domain,
            socket_path,
            data_dir,
            admin,
            svid,
            authority,
            attestor,
            workload_api,
            tasks: raw.tasks,
            policy,
            audit,
            log,
            http: raw.http,
            oidc,
            entries,
            federation,
            bundle_endpoint,
            fleet,
            introspection,
        })
    }
}

/// The Workload API socket when none is configured: `/run/tether/agent.sock`
/// for root; for other users `$XDG_RUNTIME_DIR/tether/agent.sock`, or
/// `/tmp/tether-<uid>/agent.sock` without a runtime dir.
pub fn default_socket_path(env: &dyn EnvSource) -> PathBuf {
    let uid = env.euid();
    if uid == 0 {
        return PathBuf::from("/run/tether/agent.sock");
    }
    match env.var("XDG_RUNTIME_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => Path::new(&dir).join("tether/agent.sock"),
        _ => PathBuf::from(format!("/tmp/tether-{uid}/agent.sock")),
    }
}

/// The admin socket when none is configured: `/run/tether-admin/admin.sock`
/// for root; for other users `$XDG_RUNTIME_DIR/tether-admin/admin.sock`, or
/// `/tmp/tether-<uid>-admin/admin.sock`. Never in the workload socket's
/// directory, which may be shared with workloads.
pub fn default_admin_socket_path(env: &dyn EnvSource) -> PathBuf {
    let uid = env.euid();
    if uid == 0 {
        return PathBuf::from("/run/tether-admin/admin.sock");
    }
    match env.var("XDG_RUNTIME_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => {
            Path::new(&dir).join("tether-admin/admin.sock")
        }
        _ => PathBuf::from(format!("/tmp/tether-{uid}-admin/admin.sock")),
    }
}

/// `[audit]`, validated, with `dir` defaulted to `data_dir/audit`.
fn resolve_audit(
    mut audit: AuditConfig,
    audit_dir: Option<PathBuf>,
    data_dir: &Path,
) -> Result<AuditConfig, ConfigError> {
    if let Some(dir) = audit_dir {
        if audit.dir.is_some() {
            return Err(ConfigError::invalid(
                "audit_dir",
                dir.display().to_string(),
                "set either audit_dir or [audit] dir, not both",
            ));
        }
        check_absolute("audit_dir", &dir)?;
        audit.dir = Some(dir);
    }
    audit
        .validate()
        .map_err(|(key, problem)| match (key, &audit.dir) {
            ("audit.dir", Some(dir)) => {
                ConfigError::invalid(key, dir.display().to_string(), problem)
            }
            _ => ConfigError::setting(key, problem),
        })?;
    audit.dir.get_or_insert_with(|| data_dir.join("audit"));
    Ok(audit)
}

/// `[oidc]`, validated (the issuer in its one form).
pub(crate) fn validate_oidc(
    mut oidc: crate::oidc::OidcConfig,
) -> Result<crate::oidc::OidcConfig, ConfigError> {
    let issuer = oidc.issuer.clone();
    oidc.validate().map_err(|(key, problem)| match key {
        "oidc.issuer" => ConfigError::invalid(key, issuer, problem),
        _ => ConfigError::setting(key, problem),
    })?;
    Ok(oidc)
}

/// `admin_group`: a group name, or a numeric gid.
fn resolve_group(value: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = value.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(value) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(ConfigError::invalid("admin_group", value, "no such group")),
        Err(errno) => Err(ConfigError::invalid(
            "admin_group",
            value,
            format!("group lookup failed: {errno}"),
        )),
    }
}

/// The data dir when none is configured: `/var/lib/tether` for root;
/// `$XDG_DATA_HOME/tether` or `~/.local/share/tether` for other users.
pub fn default_data_dir(env: &dyn EnvSource) -> PathBuf {
    let uid = env.euid();
    if uid == 0 {
        return PathBuf::from("/var/lib/tether");
    }
    if let Some(dir) = env
        .var("XDG_DATA_HOME")
        .filter(|d| Path::new(d).is_absolute())
    {
        return Path::new(&dir).join("tether");
    }
    if let Some(home) = env.var("HOME").filter(|d| Path::new(d).is_absolute()) {
        return Path::new(&home).join(".local/share/tether");
    }
    PathBuf::from(format!("/tmp/tether-{uid}/data"))
}

pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let read = || -> std::io::Result<String> {
        let file = std::fs::File::open(path)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_LEN).read_to_string(&mut text)?;
        Ok(text)
    };
    read().map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn parse_trust_domain(key: &str, value: &str) -> Result<TrustDomain, ConfigError> {
    let td = TrustDomain::new(value).map_err(|e| ConfigError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        source: Box::new(e),
    })?;
    if td.as_str() != value {
        return Err(ConfigError::invalid(
            key,
            value,
            format!("write the trust domain name alone, in lowercase: {td}"),
        ));
    }
    Ok(td)
}

pub(crate) fn check_absolute(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            path.display().to_string(),
            "must be an absolute path",
        ))
    }
}

pub(crate) fn check_ttl(
    key: &str,
    ttl: Duration,
    limit: Option<(&str, Duration)>,
) -> Result<(), ConfigError> {
    let shown = humantime::format_duration(ttl).to_string();
    if ttl.is_zero() {
        return Err(ConfigError::invalid(
            key,
            shown,
            "must be greater than zero",
        ));
    }
    if let Some((limit_key, limit)) = limit
        && ttl > limit
    {
        return Err(ConfigError::invalid(
            key,
            shown,
            format!(
                "is longer than {limit_key} ({}): nothing can outlive the key that signs it",
                humantime::format_duration(limit)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
