//! Everything the CLI prints to stdout: the report types of the `api`
//! commands and their two renderings, readable (for people) and `--json`
//! (for scripts).
//!
//! The report structs are the JSON schema: their serde field names are a
//! stable interface, documented on each field. Readable output may change
//! between releases; JSON field names may only be added to. Strings that
//! came from the agent are untrusted, so readable output escapes control
//! characters (no terminal escape sequences from a hostile socket).
//!
//! Invariant: no other module writes to stdout; errors go to stderr through
//! `cli::fail`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;

use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How to print: chosen once from `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned text for people.
    Readable,
    /// One JSON document (or one per line for streams) for scripts.
    Json,
}

/// A point in time: RFC 3339 in UTC in both renderings
/// (`"2026-01-01T00:00:00Z"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub OffsetDateTime);

/// `tether api fetch x509` and each `tether api watch` update.
#[derive(Debug, Clone, Serialize)]
pub struct X509Report {
    /// `svids`: one object per X.509-SVID, in the agent's order; the first
    /// is the default identity.
    pub svids: Vec<X509SvidSummary>,
    /// `trust_domain_cas`: the number of distinct CA certificates in the
    /// SVIDs' own trust-domain bundles.
    pub trust_domain_cas: usize,
    /// `federated_bundles`: the bundles of federated trust domains, sorted
    /// by trust domain.
    pub federated_bundles: Vec<FederatedBundleSummary>,
}

/// One X.509-SVID.
#[derive(Debug, Clone, Serialize)]
pub struct X509SvidSummary {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// `hint`: the operator's hint for choosing among SVIDs (may be `""`).
    pub hint: String,
    /// `serial`: the leaf certificate's serial number, lowercase hex.
    pub serial: String,
    /// `not_before`: RFC 3339.
    pub not_before: Timestamp,
    /// `not_after`: RFC 3339.
    pub not_after: Timestamp,
    /// `dns_names`: the leaf's DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// `chain_length`: certificates in the chain, leaf included.
    pub chain_length: usize,
}

/// One federated trust domain's X.509 bundle.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedBundleSummary {
    /// `trust_domain`: the trust domain name (`"partner.example"`).
    pub trust_domain: String,
    /// `cas`: the number of CA certificates in its bundle.
    pub cas: usize,
}

/// `tether api fetch x509` (with `--write`, the files written).
#[derive(Debug, Clone, Serialize)]
pub struct FetchX509Output {
    /// `svids`, `trust_domain_cas`, `federated_bundles`: see [`X509Report`].
    #[serde(flatten)]
    pub report: X509Report,
    /// `files_written`: the paths `--write` wrote, in order (empty without
    /// `--write`).
    pub files_written: Vec<PathBuf>,
}

/// One update of `tether api watch`: one JSON object per line.
#[derive(Debug, Clone, Serialize)]
pub struct WatchUpdate {
    /// `received_at`: when this client received the update, RFC 3339.
    pub received_at: Timestamp,
    /// `update`: 1 for the first message of the stream, then counting.
    pub update: u64,
    /// `svids`, `trust_domain_cas`, `federated_bundles`: see [`X509Report`].
    #[serde(flatten)]
    pub report: X509Report,
}

/// `tether api fetch jwt`.
#[derive(Debug, Clone, Serialize)]
pub struct JwtReport {
    /// `svids`: one object per JWT-SVID; the first is the default.
    pub svids: Vec<JwtSvidSummary>,
}

/// One JWT-SVID.
#[derive(Debug, Clone, Serialize)]
pub struct JwtSvidSummary {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// `hint`: the operator's hint (may be `""`).
    pub hint: String,
    /// `expires_at`: the token's `exp`, RFC 3339; `null` if the token has
    /// no readable `exp`.
    pub expires_at: Option<Timestamp>,
    /// `token`: the JWT-SVID itself (compact JWS).
    pub token: String,
}

/// `tether api fetch bundles`.
#[derive(Debug, Clone, Serialize)]
pub struct BundlesReport {
    /// `bundles`: one object per trust domain, sorted by trust domain.
    pub bundles: Vec<BundleSummary>,
}

/// One trust domain's bundle, both halves.
#[derive(Debug, Clone, Serialize)]
pub struct BundleSummary {
    /// `trust_domain`: the trust domain name (`"example.org"`).
    pub trust_domain: String,
    /// `x509_authorities`: its CA certificates (empty if the agent sent no
    /// X.509 bundle for it).
    pub x509_authorities: Vec<CaSummary>,
    /// `jwt_authorities`: its JWT signing keys (empty if the agent sent no
    /// JWT bundle for it).
    pub jwt_authorities: Vec<JwtKeySummary>,
}

/// One CA certificate of a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct CaSummary {
    /// `subject`: the certificate's subject (RFC 4514 form).
    pub subject: String,
    /// `serial`: lowercase hex.
    pub serial: String,
    /// `not_after`: RFC 3339.
    pub not_after: Timestamp,
}

/// One JWT signing key of a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct JwtKeySummary {
    /// `kid`: the key ID (`""` if the key has none).
    pub kid: String,
    /// `key_type`: the JWK `kty` (`"EC"`, `"RSA"`, `"OKP"`; `""` if absent).
    pub key_type: String,
}

/// `tether api validate jwt`.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    /// `spiffe_id`: the SPIFFE ID the token was issued to.
    pub spiffe_id: String,
    /// `claims`: the token's claims as the agent returned them.
    pub claims: serde_json::Value,
}

// === impl Format ===

impl Format {
    /// `--json` or not.
    pub fn from_json_flag(json: bool) -> Self {
        if json { Self::Json } else { Self::Readable }
    }

    /// Prints the result of `fetch x509`.
    pub fn fetch_x509(self, output: &FetchX509Output) -> io::Result<()> {
        self.print(output, |w, now| render_fetch_x509(w, output, now))
    }

    /// Prints one `watch` update, flushed so that a pipe sees it at once.
    pub fn watch_update(self, update: &WatchUpdate) -> io::Result<()> {
        self.print(update, |w, now| render_watch_update(w, update, now))
    }

    /// Prints the result of `fetch jwt`.
    pub fn fetch_jwt(self, report: &JwtReport) -> io::Result<()> {
        self.print(report, |w, now| render_jwt(w, report, now))
    }

    /// Prints a bare token and a newline (`fetch jwt --token-only`), for
    /// `$(...)` in shells. The format does not matter here.
    pub fn token(token: &str) -> io::Result<()> {
        let mut out = io::stdout().lock();
        writeln!(out, "{token}")?;
        out.flush()
    }

    /// Prints the result of `fetch bundles`.
    pub fn bundles(self, report: &BundlesReport) -> io::Result<()> {
        self.print(report, |w, now| render_bundles(w, report, now))
    }

    /// Prints the result of `validate jwt`.
    pub fn validation(self, report: &ValidationReport) -> io::Result<()> {
        self.print(report, |w, _| render_validation(w, report))
    }

    /// JSON is written compact on one line, so streams are JSON lines.
    fn print<T: Serialize>(
        self,
        value: &T,
        readable: impl FnOnce(&mut String, OffsetDateTime) -> std::fmt::Result,
    ) -> io::Result<()> {
        let text = match self {
            Self::Json => {
                let mut line = serde_json::to_string(value).map_err(io::Error::other)?;
                line.push('\n');
                line
            }
            Self::Readable => {
                let mut text = String::new();
                readable(&mut text, OffsetDateTime::now_utc()).map_err(io::Error::other)?;
                text
            }
        };
        // One write per document: a reader never sees half an update.
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}

// === impl Timestamp ===

impl Timestamp {
    /// The Unix time `seconds`, if representable.
    pub fn from_unix(seconds: i64) -> Option<Self> {
        OffsetDateTime::from_unix_timestamp(seconds).ok().map(Self)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.format(&Rfc3339) {
            Ok(text) => f.write_str(&text),
            // RFC 3339 has only four-digit years; anything else (a hostile
            // certificate's year 10000, say) is shown in `time`'s own form.
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn render_fetch_x509(
    w: &mut String,
    output: &FetchX509Output,
    now: OffsetDateTime,
) -> std::fmt::Result {
    render_x509(w, &output.report, now)?;
    if !output.files_written.is_empty() {
        writeln!(w)?;
        for path in &output.files_written {
            writeln!(w, "Wrote {}", printable(&path.display().to_string()))?;
        }
    }
    Ok(())
}

fn render_x509(w: &mut String, report: &X509Report, now: OffsetDateTime) -> std::fmt::Result {
    let n = report.svids.len();
    writeln!(w, "Received {n} X.509-SVID{}", plural(n))?;
    for svid in &report.svids {
        writeln!(w)?;
        writeln!(w, "SPIFFE ID:         {}", printable(&svid.spiffe_id))?;
        if !svid.hint.is_empty() {
            writeln!(w, "Hint:              {}", printable(&svid.hint))?;
        }
        writeln!(w, "Serial:            {}", svid.serial)?;
        writeln!(
            w,
            "Valid from:        {} ({})",
            svid.not_before,
            relative(svid.not_before.0, now)
        )?;
        writeln!(
            w,
            "Valid until:       {} ({})",
            svid.not_after,
            relative(svid.not_after.0, now)
        )?;
        writeln!(w, "DNS names:         {}", list(&svid.dns_names))?;
        writeln!(w, "Chain length:      {}", svid.chain_length)?;
    }
    writeln!(w)?;
    writeln!(w, "Trust domain CAs:  {}", report.trust_domain_cas)?;
    let federated: Vec<String> = report
        .federated_bundles
        .iter()
        .map(|b| {
            format!(
                "{} ({} CA{})",
                printable(&b.trust_domain),
                b.cas,
                plural(b.cas)
            )
        })
        .collect();
    if federated.is_empty() {
        writeln!(w, "Federated bundles: 0")
    } else {
        writeln!(
            w,
            "Federated bundles: {}: {}",
            federated.len(),
            federated.join(", ")
        )
    }
}

fn render_watch_update(
    w: &mut String,
    update: &WatchUpdate,
    now: OffsetDateTime,
) -> std::fmt::Result {
    let n = update.report.svids.len();
    writeln!(
        w,
        "{}  update {}: {n} X.509-SVID{}",
        update.received_at,
        update.update,
        plural(n)
    )?;
    for svid in &update.report.svids {
        writeln!(
            w,
            "  {}  serial {}  expires {} ({})",
            printable(&svid.spiffe_id),
            svid.serial,
            svid.not_after,
            relative(svid.not_after.0, now)
        )?;
    }
    writeln!(
        w,
        "  trust domain CAs: {}, federated bundles: {}",
        update.report.trust_domain_cas,
        update.report.federated_bundles.len()
    )?;
    writeln!(w)
}

fn render_jwt(w: &mut String, report: &JwtReport, now: OffsetDateTime) -> std::fmt::Result {
    let n = report.svids.len();
    writeln!(w, "Received {n} JWT-SVID{}", plural(n))?;
    for svid in &report.svids {
        writeln!(w)?;
        writeln!(w, "SPIFFE ID:  {}", printable(&svid.spiffe_id))?;
        if !svid.hint.is_empty() {
            writeln!(w, "Hint:       {}", printable(&svid.hint))?;
        }
        match svid.expires_at {
            Some(at) => writeln!(w, "Expires:    {at} ({})", relative(at.0, now))?,
            None => writeln!(w, "Expires:    (unknown)")?,
        }
        writeln!(w, "Token:      {}", printable(&svid.token))?;
    }
    Ok(())
}

fn render_bundles(w: &mut String, report: &BundlesReport, now: OffsetDateTime) -> std::fmt::Result {
    if report.bundles.is_empty() {
        return writeln!(w, "No bundles received");
    }
    for (i, bundle) in report.bundles.iter().enumerate() {
        if i > 0 {
            writeln!(w)?;
        }
        writeln!(w, "Trust domain: {}", printable(&bundle.trust_domain))?;
        let n = bundle.x509_authorities.len();
        writeln!(w, "  X.509 authorities: {n}")?;
        for ca in &bundle.x509_authorities {
            writeln!(w, "    {}", printable(&ca.subject))?;
            writeln!(
                w,
                "      serial {}, expires {} ({})",
                ca.serial,
                ca.not_after,
                relative(ca.not_after.0, now)
            )?;
        }
        let n = bundle.jwt_authorities.len();
        writeln!(w, "  JWT authorities: {n}")?;
        for key in &bundle.jwt_authorities {
            let kid = if key.kid.is_empty() {
                "(no kid)"
            } else {
                &key.kid
            };
            let key_type = if key.key_type.is_empty() {
                "?"
            } else {
                &key.key_type
            };
            writeln!(w, "    kid {} ({})", printable(kid), printable(key_type))?;
        }
    }
    Ok(())
}

fn render_validation(w: &mut String, report: &ValidationReport) -> std::fmt::Result {
    writeln!(w, "valid")?;
    writeln!(w, "SPIFFE ID: {}", printable(&report.spiffe_id))?;
    writeln!(w, "Claims:")?;
    // Pretty JSON escapes control characters itself.
    let claims = serde_json::to_string_pretty(&report.claims).map_err(|_| std::fmt::Error)?;
    writeln!(w, "{claims}")
}

/// "in 59m", "3h 5m ago": coarse, because the exact instant is printed
/// beside it.
pub fn relative(then: OffsetDateTime, now: OffsetDateTime) -> String {
    let seconds = (then - now).whole_seconds();
    let span = coarse(seconds.unsigned_abs());
    if seconds >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

fn coarse(seconds: u64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let pair = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit} {small}{small_unit}")
        }
    };
    match seconds {
        s if s < MINUTE => format!("{s}s"),
        s if s < HOUR => format!("{}m", s / MINUTE),
        s if s < DAY => pair(s / HOUR, "h", s % HOUR / MINUTE, "m"),
        s => pair(s / DAY, "d", s % DAY / HOUR, "h"),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        return "(none)".to_owned();
    }
    items
        .iter()
        .map(|s| printable(s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `s` with control characters escaped, so a hostile agent cannot drive
/// the terminal.
fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_unix(seconds).unwrap()
    }

    #[test]
    fn relative_times_are_coarse() {
        let now = at(1_000_000).0;
        let cases = [
            (0, "in 0s"),
            (42, "in 42s"),
            (59 * 60 + 59, "in 59m"),
            (3600, "in 1h"),
            (3600 + 5 * 60, "in 1h 5m"),
            (86_400 * 2 + 3600 * 3, "in 2d 3h"),
            (-90, "1m ago"),
        ];
        for (delta, want) in cases {
            assert_eq!(relative(at(1_000_000 + delta).0, now), want, "{delta}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_in_json() {
        let ts = at(1_700_000_000);
        assert_eq!(ts.to_string(), "2023-11-14T22:13:20Z");
        assert_eq!(
            serde_json::to_value(ts).unwrap(),
            serde_json::json!("2023-11-14T22:13:20Z")
        );
        // Outside RFC 3339's years: shown, not a panic.
        let far = Timestamp(OffsetDateTime::from_unix_timestamp(-100_000_000_000).unwrap());
        assert!(!far.to_string().is_empty());
    }

    #[test]
    fn agent_strings_cannot_drive_the_terminal() {
        assert_eq!(printable("spiffe://a/b"), "spiffe://a/b");
        assert_eq!(printable("x\u{1b}[2Jy\n"), "x\\u{1b}[2Jy\\n");
    }

    #[test]
    fn fetch_x509_json_field_names_are_stable() {
        let output = FetchX509Output {
            report: X509Report {
                svids: vec![X509SvidSummary {
                    spiffe_id: "spiffe://example.org/a".into(),
                    hint: "a".into(),
                    serial: "1f".into(),
                    not_before: at(0),
                    not_after: at(3600),
                    dns_names: vec!["a.example.org".into()],
                    chain_length: 1,
                }],
                trust_domain_cas: 1,
                federated_bundles: vec![FederatedBundleSummary {
                    trust_domain: "partner.example".into(),
                    cas: 2,
                }],
            },
            files_written: vec!["/tmp/svid.0.pem".into()],
        };
        let json = serde_json::to_value(&output).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "svids": [{
                    "spiffe_id": "spiffe://example.org/a",
                    "hint": "a",
                    "serial": "1f",
                    "not_before": "1970-01-01T00:00:00Z",
                    "not_after": "1970-01-01T01:00:00Z",
                    "dns_names": ["a.example.org"],
                    "chain_length": 1,
                }],
                "trust_domain_cas": 1,
                "federated_bundles": [{"trust_domain": "partner.example", "cas": 2}],
                "files_written": ["/tmp/svid.0.pem"],
            })
        );
        let mut text = String::new();
        render_fetch_x509(&mut text, &output, at(60).0).unwrap();
        assert!(
            text.contains("SPIFFE ID:         spiffe://example.org/a"),
            "{text}"
        );
        assert!(text.contains("1970-01-01T01:00:00Z (in 59m)"), "{text}");
        assert!(text.contains("partner.example (2 CAs)"), "{text}");
        assert!(text.contains("Wrote /tmp/svid.0.pem"), "{text}");
    }
}
