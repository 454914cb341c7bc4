//! What `tether api` prints: the Workload API's X.509-SVIDs (fetched or
//! watched), JWT-SVIDs, bundles and JWT validations.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use serde::Serialize;
use time::OffsetDateTime;

use super::text::{list, plural, printable, relative};
use super::{Render, Timestamp};

/// `tether api fetch x509` and each `tether api watch` update.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct X509Report {
    /// `svids`: one object per X.509-SVID, in the agent's order; the first
    /// is the default identity.
    pub(crate) svids: Vec<X509SvidSummary>,
    /// `trust_domain_cas`: the number of distinct CA certificates in the
    /// SVIDs' own trust-domain bundles.
    pub(crate) trust_domain_cas: usize,
    /// `federated_bundles`: the bundles of federated trust domains, sorted
    /// by trust domain.
    pub(crate) federated_bundles: Vec<FederatedBundleSummary>,
}

/// One X.509-SVID.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct X509SvidSummary {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub(crate) spiffe_id: String,
    /// `hint`: the operator's hint for choosing among SVIDs (may be `""`).
    pub(crate) hint: String,
    /// `serial`: the leaf certificate's serial number, lowercase hex.
    pub(crate) serial: String,
    /// `not_before`: RFC 3339.
    pub(crate) not_before: Timestamp,
    /// `not_after`: RFC 3339.
    pub(crate) not_after: Timestamp,
    /// `dns_names`: the leaf's DNS subject alternative names.
    pub(crate) dns_names: Vec<String>,
    /// `chain_length`: certificates in the chain, leaf included.
    pub(crate) chain_length: usize,
}

/// One federated trust domain's X.509 bundle.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FederatedBundleSummary {
    /// `trust_domain`: the trust domain name (`"partner.example"`).
    pub(crate) trust_domain: String,
    /// `cas`: the number of CA certificates in its bundle.
    pub(crate) cas: usize,
}

/// `tether api fetch x509` (with `--write`, the files written).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FetchX509Output {
    /// `svids`, `trust_domain_cas`, `federated_bundles`: see [`X509Report`].
    #[serde(flatten)]
    pub(crate) report: X509Report,
    /// `files_written`: the paths `--write` wrote, in order (empty without
    /// `--write`).
    pub(crate) files_written: Vec<PathBuf>,
}

/// One update of `tether api watch`: one JSON object per line.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WatchUpdate {
    /// `received_at`: when this client received the update, RFC 3339.
    pub(crate) received_at: Timestamp,
    /// `update`: 1 for the first message of the stream, then counting.
    pub(crate) update: u64,
    /// `svids`, `trust_domain_cas`, `federated_bundles`: see [`X509Report`].
    #[serde(flatten)]
    pub(crate) report: X509Report,
}

/// `tether api fetch jwt`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JwtReport {
    /// `svids`: one object per JWT-SVID; the first is the default.
    pub(crate) svids: Vec<JwtSvidSummary>,
}

/// One JWT-SVID.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JwtSvidSummary {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub(crate) spiffe_id: String,
    /// `hint`: the operator's hint (may be `""`).
    pub(crate) hint: String,
    /// `expires_at`: the token's `exp`, RFC 3339; `null` if the token has
    /// no readable `exp`.
    pub(crate) expires_at: Option<Timestamp>,
    /// `token`: the JWT-SVID itself (compact JWS).
    pub(crate) token: String,
}

/// `tether api fetch bundles`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BundlesReport {
    /// `bundles`: one object per trust domain, sorted by trust domain.
    pub(crate) bundles: Vec<BundleSummary>,
}

/// One trust domain's bundle, both halves.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BundleSummary {
    /// `trust_domain`: the trust domain name (`"example.org"`).
    pub(crate) trust_domain: String,
    /// `x509_authorities`: its CA certificates (empty if the agent sent no
    /// X.509 bundle for it).
    pub(crate) x509_authorities: Vec<CaSummary>,
    /// `jwt_authorities`: its JWT signing keys (empty if the agent sent no
    /// JWT bundle for it).
    pub(crate) jwt_authorities: Vec<JwtKeySummary>,
}

/// One CA certificate of a bundle.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CaSummary {
    /// `subject`: the certificate's subject (RFC 4514 form).
    pub(crate) subject: String,
    /// `serial`: lowercase hex.
    pub(crate) serial: String,
    /// `not_after`: RFC 3339.
    pub(crate) not_after: Timestamp,
}

/// One JWT signing key of a bundle.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JwtKeySummary {
    /// `kid`: the key ID (`""` if the key has none).
    pub(crate) kid: String,
    /// `key_type`: the JWK `kty` (`"EC"`, `"RSA"`, `"OKP"`; `""` if absent).
    pub(crate) key_type: String,
}

/// `tether api validate jwt`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ValidationReport {
    /// `spiffe_id`: the SPIFFE ID the token was issued to.
    pub(crate) spiffe_id: String,
    /// `claims`: the token's claims as the agent returned them.
    pub(crate) claims: serde_json::Value,
}

// === impl FetchX509Output ===

impl Render for FetchX509Output {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        self.report.write_summary(w, now)?;
        if !self.files_written.is_empty() {
            writeln!(w)?;
            for path in &self.files_written {
                writeln!(w, "Wrote {}", printable(&path.display().to_string()))?;
            }
        }
        Ok(())
    }
}

// === impl X509Report ===

impl X509Report {
    /// The readable form, shared by `fetch x509` and its `--write` variant.
    fn write_summary(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        let n = self.svids.len();
        writeln!(w, "Received {n} X.509-SVID{}", plural(n))?;
        for svid in &self.svids {
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
        writeln!(w, "Trust domain CAs:  {}", self.trust_domain_cas)?;
        let federated: Vec<String> = self
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
}

// === impl WatchUpdate ===

impl Render for WatchUpdate {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        let n = self.report.svids.len();
        writeln!(
            w,
            "{}  self {}: {n} X.509-SVID{}",
            self.received_at,
            self.update,
            plural(n)
        )?;
        for svid in &self.report.svids {
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
            self.report.trust_domain_cas,
            self.report.federated_bundles.len()
        )?;
        writeln!(w)
    }
}

// === impl JwtReport ===

impl Render for JwtReport {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        let n = self.svids.len();
        writeln!(w, "Received {n} JWT-SVID{}", plural(n))?;
        for svid in &self.svids {
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
}

// === impl BundlesReport ===

impl Render for BundlesReport {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        if self.bundles.is_empty() {
            return writeln!(w, "No bundles received");
        }
        for (i, bundle) in self.bundles.iter().enumerate() {
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
}

// === impl ValidationReport ===

impl Render for ValidationReport {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        writeln!(w, "valid")?;
        writeln!(w, "SPIFFE ID: {}", printable(&self.spiffe_id))?;
        writeln!(w, "Claims:")?;
        // Pretty JSON escapes control characters itself.
        let claims = serde_json::to_string_pretty(&self.claims).map_err(|_| fmt::Error)?;
        writeln!(w, "{claims}")
    }
}
