//! The config file as serde sees it: every key optional, unknown keys refused.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::attestation::AttestorConfig;
use crate::audit::AuditConfig;
use crate::authority::AuthorityConfig;
use crate::federation::{BundleEndpointConfig, FederationConfig};
use crate::fleet::RawFleetConfig;
use crate::registration::EntrySpec;
use crate::task::TaskConfig;
use crate::telemetry::LogConfig;
use crate::workload_api::WorkloadApiLimits;

/// The TOML document.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub trust_domain: Option<String>,
    pub socket_path: Option<PathBuf>,
    pub admin_socket_path: Option<PathBuf>,
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    pub admin_group: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub policy_dir: Option<PathBuf>,
    /// The audit directory (the name for `[audit] dir`; one of the
    /// two at most).
    pub audit_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub policy_poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub x509_svid_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub jwt_svid_ttl: Option<Duration>,
    #[serde(default)]
    pub allow_unauthenticated_verifiers: bool,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub http: crate::telemetry::http::HttpConfig,
    /// OIDC discovery (standalone agents only).
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// Absent in fleet mode (the server holds the keys).
    pub authority: Option<AuthorityConfig>,
    #[serde(default)]
    pub attestor: AttestorConfig,
    #[serde(default)]
    pub limits: WorkloadApiLimits,
    #[serde(default)]
    pub tasks: TaskConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub entries: Vec<EntrySpec>,
    #[serde(default)]
    pub federation: Vec<FederationConfig>,
    /// This trust domain's bundle endpoint (standalone agents).
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// Fleet mode: the `tether server` this agent belongs to.
    pub server: Option<RawFleetConfig>,
    /// Token introspection (RFC 7662); standalone agents only.
    pub introspection: Option<crate::introspect::IntrospectionConfig>,
}
