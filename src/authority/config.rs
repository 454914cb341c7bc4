//! `[authority]`: which authority signs and how long its keys live.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Which authority signs for this agent (`[authority]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityKind {
    /// A self-signed root created on first start and kept in the data dir.
    #[default]
    SelfSigned,
    /// The agent's own intermediate, issued by an upstream CA read from
    /// `cert_path` and `key_path`.
    Disk,
}

/// `[authority]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorityConfig {
    /// Which authority signs.
    pub kind: AuthorityKind,
    /// `kind = "disk"`: the upstream CA certificate (PEM), optionally
    /// followed by its chain up to the trust anchor.
    pub cert_path: Option<PathBuf>,
    /// `kind = "disk"`: the upstream CA's private key (PEM, PKCS#8 or SEC1,
    /// P-256), readable by its owner only.
    pub key_path: Option<PathBuf>,
    /// Lifetime of each X.509 CA (with `kind = "disk"`, of each
    /// intermediate). X.509-SVIDs never outlive their CA.
    #[serde(with = "humantime_serde")]
    pub ca_ttl: Duration,
    /// Lifetime of each JWT signing key. JWT-SVIDs never outlive their key.
    #[serde(with = "humantime_serde")]
    pub jwt_key_ttl: Duration,
    /// The issuer (`iss`) of the tokens signed here: not an
    /// `[authority]` key but `[oidc] issuer`, set when the config is
    /// composed (`Authority::issuer`).
    #[serde(skip)]
    pub issuer: Option<String>,
}

// === impl AuthorityConfig ===

impl Default for AuthorityConfig {
    fn default() -> Self {
        Self {
            kind: AuthorityKind::SelfSigned,
            cert_path: None,
            key_path: None,
            ca_ttl: Duration::from_secs(24 * 3600),
            jwt_key_ttl: Duration::from_secs(24 * 3600),
            issuer: None,
        }
    }
}

impl AuthorityConfig {
    /// Checks what needs no I/O; returns the offending key
    /// (`authority.cert_path`, ...) and the problem. The files themselves
    /// are checked when the authority loads.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.ca_ttl.is_zero() {
            return Err(("authority.ca_ttl", "must be greater than zero".into()));
        }
        if self.jwt_key_ttl.is_zero() {
            return Err(("authority.jwt_key_ttl", "must be greater than zero".into()));
        }
        let paths = [
            ("authority.cert_path", &self.cert_path),
            ("authority.key_path", &self.key_path),
        ];
        for (key, path) in paths {
            match (self.kind, path) {
                (AuthorityKind::Disk, None) => {
                    return Err((key, "is required with kind = \"disk\"".into()));
                }
                (AuthorityKind::Disk, Some(path)) if !path.is_absolute() => {
                    return Err((key, format!("{} must be an absolute path", path.display())));
                }
                (AuthorityKind::SelfSigned, Some(_)) => {
                    // A path without `kind = "disk"` is a half-done setup:
                    // signing with a self-signed root instead would be silent.
                    return Err((key, "is only used with kind = \"disk\"".into()));
                }
                _ => {}
            }
        }
        Ok(())
    }
}
