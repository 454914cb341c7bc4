//! The federation settings as written (`[[federation]]`, `[bundle_endpoint]`)
//! and their validation into the values the rest of the module trusts.
//!
//! Invariants of a validated [`FederationSource`]: it has a bundle to start
//! from or an endpoint to fetch one from (`https_web`: exactly one of the
//! two; `https_spiffe`: the bootstrap file and the endpoint); an endpoint
//! URL is `https` with a host and nothing a GET would not send; an
//! `https_spiffe` endpoint's SPIFFE ID is a member of the federated trust
//! domain, so a server naming any other domain fails the handshake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spiffe::{SpiffeId, TrustDomain};

/// Longest endpoint URL accepted.
const MAX_URL_LEN: usize = 2048;
/// The bundle endpoint's `refresh_hint` when none is configured.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
/// The shortest `refresh_hint` served (peers clamp shorter ones anyway).
pub const MIN_REFRESH_HINT: Duration = Duration::from_secs(10);
/// The longest `refresh_hint` served: a peer must see a rotation in time.
pub const MAX_REFRESH_HINT: Duration = Duration::from_secs(24 * 3600);

/// A bundle endpoint profile (SPIFFE Federation, section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointProfile {
    /// Web PKI: the endpoint's certificate is a web server's, verified
    /// against ordinary CA roots and the URL's host name.
    HttpsWeb,
    /// SPIFFE authentication: the endpoint presents an X.509-SVID of the
    /// federated trust domain, verified against its last good bundle.
    HttpsSpiffe,
}

impl EndpointProfile {
    /// The profile's name as the config and the spec write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpsWeb => "https_web",
            Self::HttpsSpiffe => "https_spiffe",
        }
    }
}

/// A `[[federation]]` section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The foreign trust domain (`example-federated.org`).
    pub trust_domain: String,
    /// Its SPIFFE bundle document (JWK Set form): the only source, or the
    /// bootstrap bundle of an `https_spiffe` endpoint.
    pub bundle_path: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(default = "default_refresh_interval", with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// The foreign trust domain's bundle endpoint (`https://...`).
    pub bundle_endpoint_url: Option<String>,
    /// How the endpoint is authenticated.
    pub bundle_endpoint_profile: Option<EndpointProfile>,
    /// `https_spiffe`: the SPIFFE ID the endpoint's server presents.
    pub endpoint_spiffe_id: Option<String>,
    /// `https_web`: PEM CA certificates the endpoint's certificate must
    /// chain to (default: the system's roots).
    pub bundle_endpoint_ca_path: Option<PathBuf>,
}

/// A validated federation source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationSource {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// The bundle file: the only source, or an `https_spiffe` endpoint's
    /// bootstrap bundle.
    pub bundle_path: Option<PathBuf>,
    /// How often the file is checked (a source without an endpoint).
    pub refresh_interval: Duration,
    /// The bundle endpoint, when the bundle is fetched.
    pub endpoint: Option<EndpointSource>,
}

/// Where and how a federated bundle is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSource {
    /// The URL, as configured (`https` only).
    pub url: http::Uri,
    /// The host to connect to (brackets of an IPv6 literal removed).
    pub host: String,
    /// The port (443 unless the URL says).
    pub port: u16,
    /// How the server is authenticated.
    pub auth: EndpointAuth,
}

/// How a bundle endpoint's server is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAuth {
    /// `https_web`: Web PKI, against these roots (`None`: the system's).
    Web {
        /// `bundle_endpoint_ca_path`.
        ca_path: Option<PathBuf>,
    },
    /// `https_spiffe`: the server's SVID names `spiffe_id` and chains to the
    /// federated domain's last good bundle.
    Spiffe {
        /// `endpoint_spiffe_id`.
        spiffe_id: SpiffeId,
    },
}

/// A setting refused, with the key (relative to its section), the value as
/// written and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingProblem {
    /// The key within the section (`bundle_endpoint_url`).
    pub key: &'static str,
    /// The value as written (empty when the key is missing).
    pub value: String,
    /// What is wrong.
    pub problem: String,
}

fn problem(key: &'static str, value: impl Into<String>, text: impl Into<String>) -> SettingProblem {
    SettingProblem {
        key,
        value: value.into(),
        problem: text.into(),
    }
}

fn default_refresh_interval() -> Duration {
    Duration::from_secs(5)
}

// === impl FederationConfig ===

impl FederationConfig {
    /// Validates the section's source keys for the federated `trust_domain`
    /// (already parsed and checked by the caller).
    pub fn validate(&self, trust_domain: TrustDomain) -> Result<FederationSource, SettingProblem> {
        if let Some(path) = &self.bundle_path {
            absolute("bundle_path", path)?;
        }
        if self.refresh_interval.is_zero() {
            return Err(problem(
                "refresh_interval",
                "0s",
                "must be greater than zero",
            ));
        }
        let endpoint = match (&self.bundle_endpoint_url, self.bundle_endpoint_profile) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(problem(
                    "bundle_endpoint_url",
                    "",
                    "bundle_endpoint_profile is set: say where the bundle endpoint is",
                ));
            }
            (Some(url), None) => {
                return Err(problem(
                    "bundle_endpoint_profile",
                    url.as_str(),
                    "bundle_endpoint_url is set: say how it is authenticated (\"https_web\" or \"https_spiffe\")",
                ));
            }
            (Some(url), Some(profile)) => Some(self.endpoint(url, profile, &trust_domain)?),
        };
        if endpoint.is_none() {
            if self.endpoint_spiffe_id.is_some() {
                return Err(problem(
                    "endpoint_spiffe_id",
                    self.endpoint_spiffe_id.clone().unwrap_or_default(),
                    "only for a bundle endpoint with bundle_endpoint_profile = \"https_spiffe\"",
                ));
            }
            if let Some(path) = &self.bundle_endpoint_ca_path {
                return Err(problem(
                    "bundle_endpoint_ca_path",
                    path.display().to_string(),
                    "only for a bundle endpoint with bundle_endpoint_profile = \"https_web\"",
                ));
            }
            if self.bundle_path.is_none() {
                return Err(problem(
                    "bundle_path",
                    "",
                    "a [[federation]] needs bundle_path or bundle_endpoint_url",
                ));
            }
        }
        match endpoint.as_ref().map(|e| &e.auth) {
            Some(EndpointAuth::Web { .. }) if self.bundle_path.is_some() => {
                return Err(problem(
                    "bundle_path",
                    self.bundle_path
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    "an https_web federation takes its bundle from bundle_endpoint_url or bundle_path, not both",
                ));
            }
            Some(EndpointAuth::Spiffe { .. }) if self.bundle_path.is_none() => {
                return Err(problem(
                    "bundle_path",
                    "",
                    "an https_spiffe federation needs the bootstrap bundle (its first contact): the endpoint is authenticated against it",
                ));
            }
            _ => {}
        }
        Ok(FederationSource {
            trust_domain,
            bundle_path: self.bundle_path.clone(),
            refresh_interval: self.refresh_interval,
            endpoint,
        })
    }

    fn endpoint(
        &self,
        url: &str,
        profile: EndpointProfile,
        trust_domain: &TrustDomain,
    ) -> Result<EndpointSource, SettingProblem> {
        let (uri, host, port) = parse_url(url)?;
        let auth = match profile {
            EndpointProfile::HttpsWeb => {
                if let Some(id) = &self.endpoint_spiffe_id {
                    return Err(problem(
                        "endpoint_spiffe_id",
                        id.as_str(),
                        "only for bundle_endpoint_profile = \"https_spiffe\" (an https_web endpoint is known by its host name)",
                    ));
                }
                if let Some(path) = &self.bundle_endpoint_ca_path {
                    absolute("bundle_endpoint_ca_path", path)?;
                }
                EndpointAuth::Web {
                    ca_path: self.bundle_endpoint_ca_path.clone(),
                }
            }
            EndpointProfile::HttpsSpiffe => {
                if let Some(path) = &self.bundle_endpoint_ca_path {
                    return Err(problem(
                        "bundle_endpoint_ca_path",
                        path.display().to_string(),
                        "only for https_web: an https_spiffe endpoint is verified against the trust domain's bundle",
                    ));
                }
                let Some(written) = &self.endpoint_spiffe_id else {
                    return Err(problem(
                        "endpoint_spiffe_id",
                        "",
                        "an https_spiffe endpoint is authenticated by its SPIFFE ID: set endpoint_spiffe_id",
                    ));
                };
                let spiffe_id = SpiffeId::new(written)
                    .map_err(|e| problem("endpoint_spiffe_id", written.as_str(), e.to_string()))?;
                if !spiffe_id.is_member_of(trust_domain) {
                    return Err(problem(
                        "endpoint_spiffe_id",
                        written.as_str(),
                        format!("is not in the federated trust domain {trust_domain}"),
                    ));
                }
                EndpointAuth::Spiffe { spiffe_id }
            }
        };
        Ok(EndpointSource {
            url: uri,
            host,
            port,
            auth,
        })
    }
}

/// An `https` URL with a host, no user info and no fragment.
fn parse_url(url: &str) -> Result<(http::Uri, String, u16), SettingProblem> {
    const KEY: &str = "bundle_endpoint_url";
    if url.len() > MAX_URL_LEN {
        return Err(problem(
            KEY,
            format!("{}...", url.chars().take(64).collect::<String>()),
            format!("is longer than {MAX_URL_LEN} bytes"),
        ));
    }
    if url.contains('#') {
        return Err(problem(KEY, url, "must not have a fragment"));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| problem(KEY, url, e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(problem(
            KEY,
            url,
            "must be an https URL: a bundle is trust, never fetched in the clear",
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(problem(KEY, url, "has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(problem(KEY, url, "must not carry user info"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(problem(KEY, url, "has no host"));
    }
    let port = authority.port_u16().unwrap_or(443);
    Ok((uri, host, port))
}

fn absolute(key: &'static str, path: &Path) -> Result<(), SettingProblem> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(problem(
            key,
            path.display().to_string(),
            "must be an absolute path",
        ))
    }
}

/// `[bundle_endpoint]` as written: this trust domain's bundle served to
/// federated peers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointConfig {
    /// The address to listen on (`0.0.0.0:8443`).
    pub listen: SocketAddr,
    /// How the endpoint authenticates itself.
    pub profile: EndpointProfile,
    /// `https_web`: the server certificate chain (PEM).
    pub cert_path: Option<PathBuf>,
    /// `https_web`: its private key (PEM).
    pub key_path: Option<PathBuf>,
    /// `spiffe_refresh_hint`: how often peers should fetch.
    #[serde(default, with = "humantime_serde")]
    pub refresh_hint: Option<Duration>,
}

/// A validated `[bundle_endpoint]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpoint {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// How it authenticates itself.
    pub tls: EndpointTls,
    /// The `spiffe_refresh_hint` served.
    pub refresh_hint: Duration,
}

/// The bundle endpoint's server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointTls {
    /// `https_web`: a configured certificate and key (re-read when they
    /// change).
    Web {
        /// The certificate chain (PEM).
        cert_path: PathBuf,
        /// The private key (PEM).
        key_path: PathBuf,
    },
    /// `https_spiffe`: the process's own X.509-SVID.
    Spiffe,
}

// === impl BundleEndpointConfig ===

impl BundleEndpointConfig {
    /// Checks the section: keys per profile, the hint within bounds.
    pub fn validate(&self) -> Result<BundleEndpoint, SettingProblem> {
        let refresh_hint = self.refresh_hint.unwrap_or(DEFAULT_REFRESH_HINT);
        if !(MIN_REFRESH_HINT..=MAX_REFRESH_HINT).contains(&refresh_hint) {
            return Err(problem(
                "refresh_hint",
                humantime::format_duration(refresh_hint).to_string(),
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(MIN_REFRESH_HINT),
                    humantime::format_duration(MAX_REFRESH_HINT)
                ),
            ));
        }
        let tls = match (self.profile, &self.cert_path, &self.key_path) {
            (EndpointProfile::HttpsWeb, Some(cert), Some(key)) => {
                absolute("cert_path", cert)?;
                absolute("key_path", key)?;
                EndpointTls::Web {
                    cert_path: cert.clone(),
                    key_path: key.clone(),
                }
            }
            (EndpointProfile::HttpsWeb, None, _) => {
                return Err(problem(
                    "cert_path",
                    "",
                    "profile = \"https_web\" serves a configured certificate: set cert_path and key_path",
                ));
            }
            (EndpointProfile::HttpsWeb, Some(_), None) => {
                return Err(problem(
                    "key_path",
                    "",
                    "profile = \"https_web\" needs the certificate's private key: set key_path",
                ));
            }
            (EndpointProfile::HttpsSpiffe, None, None) => EndpointTls::Spiffe,
            (EndpointProfile::HttpsSpiffe, cert, key) => {
                let (key_name, path) = match (cert, key) {
                    (Some(path), _) => ("cert_path", path),
                    (None, Some(path)) => ("key_path", path),
                    (None, None) => ("cert_path", &PathBuf::new()),
                };
                return Err(problem(
                    key_name,
                    path.display().to_string(),
                    "profile = \"https_spiffe\" presents this process's own X.509-SVID: remove cert_path and key_path",
                ));
            }
        };
        Ok(BundleEndpoint {
            listen: self.listen,
            tls,
            refresh_hint,
        })
    }
}
