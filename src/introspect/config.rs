//! `[introspection]`: where the RFC 7662 endpoint listens and how often
//! each client may ask.

use std::net::SocketAddr;

use serde::Deserialize;

/// Requests a second each client's bucket refills, by default.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 50;
/// Requests each client's bucket holds at most, by default.
pub const DEFAULT_BURST: u32 = 100;
/// The highest `requests_per_second` and `burst` accepted.
const MAX_RATE: u32 = 1_000_000;

/// `[introspection]`, as written and (after [`IntrospectionConfig::validate`])
/// as served.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// Where the HTTPS listener binds (`0.0.0.0:8443`; port 0 picks one).
    pub listen: SocketAddr,
    /// Each client's requests a second, after its burst.
    #[serde(default = "default_rate")]
    pub requests_per_second: u32,
    /// Each client's burst of requests.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_rate() -> u32 {
    DEFAULT_REQUESTS_PER_SECOND
}

fn default_burst() -> u32 {
    DEFAULT_BURST
}

// === impl IntrospectionConfig ===

impl IntrospectionConfig {
    /// The settings on `listen` with the default rate and burst.
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            burst: DEFAULT_BURST,
        }
    }

    /// Checks the bounds; `Err` names the key (under `introspection.`)
    /// and what is wrong.
    pub fn validate(self) -> Result<Self, (&'static str, String)> {
        if !(1..=MAX_RATE).contains(&self.requests_per_second) {
            return Err((
                "introspection.requests_per_second",
                format!(
                    "{} is out of range: between 1 and {MAX_RATE}",
                    self.requests_per_second
                ),
            ));
        }
        if !(1..=MAX_RATE).contains(&self.burst) {
            return Err((
                "introspection.burst",
                format!("{} is out of range: between 1 and {MAX_RATE}", self.burst),
            ));
        }
        Ok(self)
    }
}
