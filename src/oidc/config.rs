//! `[oidc]`: where the discovery endpoint listens, the issuer it names,
//! and its certificate (none: plain HTTP, for use behind an ingress that
//! terminates TLS). [`OidcConfig::validate`] runs once, at config load.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Longest issuer URL accepted, in bytes (it is in every token).
pub const MAX_ISSUER_LEN: usize = 1024;

/// `[oidc]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Where the discovery endpoint listens.
    pub listen: SocketAddr,
    /// The issuer: an `https://` URL with no query, fragment or user
    /// info, and (once validated) no trailing slash. Relying parties fetch
    /// `<issuer>/.well-known/openid-configuration`, and tokens carry it as
    /// `iss`.
    pub issuer: String,
    /// The listener's certificate chain (PEM); with `key_path`, HTTPS.
    pub cert_path: Option<PathBuf>,
    /// The listener's private key (PEM); with `cert_path`, HTTPS.
    pub key_path: Option<PathBuf>,
}

// === impl OidcConfig ===

impl OidcConfig {
    /// Checks the settings and writes the issuer in its one form (no
    /// trailing slash); on failure names the key and the problem.
    pub fn validate(&mut self) -> Result<(), (&'static str, String)> {
        self.issuer = normalize_issuer(&self.issuer).map_err(|p| ("oidc.issuer", p))?;
        match (&self.cert_path, &self.key_path) {
            (Some(_), None) => {
                return Err((
                    "oidc.key_path",
                    "is required with oidc.cert_path (both or neither: without them the endpoint is plain HTTP)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "oidc.cert_path",
                    "is required with oidc.key_path (both or neither: without them the endpoint is plain HTTP)".into(),
                ));
            }
            _ => {}
        }
        for (key, path) in [
            ("oidc.cert_path", &self.cert_path),
            ("oidc.key_path", &self.key_path),
        ] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err((key, format!("{} must be an absolute path", path.display())));
            }
        }
        Ok(())
    }

    /// True when the endpoint serves HTTPS itself.
    pub fn is_https(&self) -> bool {
        self.cert_path.is_some()
    }
}

/// `value` as an issuer: an `https://` URL with a host, no user info, no
/// query, no fragment, at most [`MAX_ISSUER_LEN`] bytes, written without
/// its trailing slash (OIDC compares issuers as strings, so there is one
/// form). The problem otherwise.
pub fn normalize_issuer(value: &str) -> Result<String, String> {
    if value.len() > MAX_ISSUER_LEN {
        return Err(format!(
            "is {} bytes; at most {MAX_ISSUER_LEN}",
            value.len()
        ));
    }
    let Some(rest) = value.strip_prefix("https://") else {
        return Err("must be an https:// URL (relying parties fetch keys from it)".into());
    };
    if value.contains('?') {
        return Err("must have no query (?...): OIDC issuers have none".into());
    }
    if value.contains('#') {
        return Err("must have no fragment (#...): OIDC issuers have none".into());
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must have no spaces or control characters".into());
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must have no user info (user@host)".into());
    }
    if authority.is_empty() {
        return Err("must name a host".into());
    }
    let uri: http::Uri = value
        .parse()
        .map_err(|e: http::uri::InvalidUri| format!("is not a URL: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if rest.contains("//") {
        return Err("must have no empty path segment (//)".into());
    }
    Ok(value.strip_suffix('/').unwrap_or(value).to_owned())
}
