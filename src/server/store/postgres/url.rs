//! The `store = "postgres://…"` URL: parsed by `tokio-postgres`, with the
//! options this slice refuses refused up front and the server's own
//! defaults (connect timeout, keepalives, application name) added where the
//! URL sets none.
//!
//! TLS to PostgreSQL is not supported yet: a URL asking for it
//! (`sslmode=require`, `verify-ca`, `verify-full`) is refused with
//! [`PostgresError::TlsUnsupported`] rather than silently connecting in
//! clear. `sslmode=prefer` (the default) and `disable` connect without TLS.

use std::str::FromStr as _;
use std::time::Duration;

use tokio_postgres::config::SslMode;

use super::PostgresError;

/// How long opening a connection may take (TCP, startup, authentication)
/// when the URL does not say.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive idle time: a peer gone without a word is noticed.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// Longest URL accepted, in bytes.
const MAX_URL_LEN: usize = 4096;

/// Checks `url` as the server would use it: a `postgres://` (or
/// `postgresql://`) URL `tokio-postgres` parses, not asking for TLS.
/// The configuration loader calls this so a refused URL is a
/// configuration error, before anything starts.
pub fn check_url(url: &str) -> Result<(), PostgresError> {
    parse(url).map(drop)
}

/// The connection settings for `url`, with the server's defaults.
pub(super) fn parse(url: &str) -> Result<tokio_postgres::Config, PostgresError> {
    if url.len() > MAX_URL_LEN {
        return Err(PostgresError::UrlTooLong { max: MAX_URL_LEN });
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(PostgresError::NotAUrl);
    }
    // Checked before parsing: tokio-postgres refuses `verify-*` as an
    // unknown value, which would not say why.
    if let Some(mode) = asked_tls_mode(url) {
        return Err(PostgresError::TlsUnsupported { sslmode: mode });
    }
    let mut config = tokio_postgres::Config::from_str(url).map_err(PostgresError::Url)?;
    // A spelling the scan above did not see (percent-encoded) but the
    // parser decoded.
    if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
        return Err(PostgresError::TlsUnsupported {
            sslmode: "require".into(),
        });
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("tether-server");
    }
    config.keepalives(true).keepalives_idle(KEEPALIVES_IDLE);
    Ok(config)
}

/// The `sslmode` of the URL's query when it asks for TLS.
fn asked_tls_mode(url: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        let value = value.to_ascii_lowercase();
        (key == "sslmode" && matches!(value.as_str(), "require" | "verify-ca" | "verify-full"))
            .then_some(value)
    })
}
