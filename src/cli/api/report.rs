//! From the agent's answers to the reports `tether api` prints: the
//! certificates of an X.509-SVID response and of bundles (parsed with
//! `x509-parser`, never trusted), trust domain names (checked with
//! `spiffe`), a JWT's expiry for display, and protobuf claims as JSON.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use spiffe::TrustDomain;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::ApiError;
use crate::cli::output::{
    BundleSummary, BundlesReport, CaSummary, FederatedBundleSummary, JwtKeySummary, Timestamp,
    X509Report, X509SvidSummary,
};
use crate::proto::workload as pb;

/// A certificate and the DER it was parsed from.
pub(super) struct Parsed<'a> {
    pub(super) der: &'a [u8],
    cert: X509Certificate<'a>,
}

/// The parts of a JWK set this CLI shows; everything else is ignored.
#[derive(Debug, Deserialize)]
struct JwkSet {
    #[serde(default)]
    keys: Vec<JwkInfo>,
}

#[derive(Debug, Deserialize)]
struct JwkInfo {
    #[serde(default)]
    kid: String,
    #[serde(default)]
    kty: String,
}

/// The one claim `fetch jwt` reads from a token, for display.
#[derive(Debug, Deserialize)]
struct Expiry {
    exp: Option<serde_json::Number>,
}

pub(super) fn x509_report(response: &pb::X509svidResponse) -> Result<X509Report, ApiError> {
    let mut svids = Vec::with_capacity(response.svids.len());
    let mut cas = BTreeSet::new();
    for (i, svid) in response.svids.iter().enumerate() {
        let chain = parse_certificates(&svid.x509_svid, || {
            format!("X.509-SVID {i} ({})", svid.spiffe_id)
        })?;
        let leaf = &chain
            .first()
            .ok_or_else(|| ApiError::IncompleteSvid {
                spiffe_id: svid.spiffe_id.clone(),
                missing: "certificates",
            })?
            .cert;
        let bundle = parse_certificates(&svid.bundle, || {
            format!("bundle of X.509-SVID {i} ({})", svid.spiffe_id)
        })?;
        cas.extend(bundle.iter().map(|p| p.der));
        svids.push(X509SvidSummary {
            spiffe_id: svid.spiffe_id.clone(),
            hint: svid.hint.clone(),
            serial: leaf.serial.to_str_radix(16),
            not_before: Timestamp(leaf.validity().not_before.to_datetime()),
            not_after: Timestamp(leaf.validity().not_after.to_datetime()),
            dns_names: dns_names(leaf),
            chain_length: chain.len(),
        });
    }
    let mut federated_bundles = Vec::with_capacity(response.federated_bundles.len());
    for (key, der) in &response.federated_bundles {
        let trust_domain = trust_domain(key)?;
        let certs = parse_certificates(der, || format!("federated bundle of {trust_domain}"))?;
        federated_bundles.push(FederatedBundleSummary {
            trust_domain: trust_domain.to_string(),
            cas: certs.len(),
        });
    }
    federated_bundles.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
    Ok(X509Report {
        svids,
        trust_domain_cas: cas.len(),
        federated_bundles,
    })
}

pub(super) fn bundles_report(
    x509: &pb::X509BundlesResponse,
    jwt: &pb::JwtBundlesResponse,
) -> Result<BundlesReport, ApiError> {
    let mut bundles: BTreeMap<String, BundleSummary> = BTreeMap::new();
    for (key, der) in &x509.bundles {
        let certs = parse_certificates(der, || format!("X.509 bundle of {key}"))?;
        bundle_entry(&mut bundles, key)?
            .x509_authorities
            .extend(certs.iter().map(|p| CaSummary {
                subject: p.cert.subject().to_string(),
                serial: p.cert.serial.to_str_radix(16),
                not_after: Timestamp(p.cert.validity().not_after.to_datetime()),
            }));
    }
    for (key, json) in &jwt.bundles {
        let summary = bundle_entry(&mut bundles, key)?;
        // An empty document is an empty bundle, not an error.
        if json.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let set: JwkSet = serde_json::from_slice(json).map_err(|source| ApiError::JwtBundle {
            trust_domain: summary.trust_domain.clone(),
            source,
        })?;
        summary
            .jwt_authorities
            .extend(set.keys.into_iter().map(|k| JwtKeySummary {
                kid: k.kid,
                key_type: k.kty,
            }));
    }
    Ok(BundlesReport {
        bundles: bundles.into_values().collect(),
    })
}

fn bundle_entry<'m>(
    bundles: &'m mut BTreeMap<String, BundleSummary>,
    key: &str,
) -> Result<&'m mut BundleSummary, ApiError> {
    let name = trust_domain(key)?.to_string();
    Ok(bundles
        .entry(name.clone())
        .or_insert_with(|| BundleSummary {
            trust_domain: name,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
        }))
}

/// Parses concatenated DER certificates (the Workload API's encoding of
/// chains and bundles).
pub(super) fn parse_certificates(
    mut der: &[u8],
    what: impl Fn() -> String,
) -> Result<Vec<Parsed<'_>>, ApiError> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|source| ApiError::Certificate {
                what: what(),
                source,
            })?;
        let used = der.len() - rest.len();
        let (this, _) = der.split_at(used);
        certs.push(Parsed { der: this, cert });
        der = rest;
    }
    Ok(certs)
}

fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    // A SAN extension that does not parse shows as no names: this is a
    // summary, and the leaf itself parsed.
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

/// The agent keys bundles by trust domain SPIFFE ID (`spiffe://td`);
/// checked before it names a file.
pub(super) fn trust_domain(key: &str) -> Result<TrustDomain, ApiError> {
    TrustDomain::new(key).map_err(|source| ApiError::TrustDomain {
        value: key.to_owned(),
        source,
    })
}

/// The token's `exp`, for display only. Reading it unverified is fine: the
/// token came from the agent over its socket, and nothing here trusts it;
/// `tether api validate jwt` is how a token is checked.
pub(super) fn token_expiry(token: &str) -> Option<Timestamp> {
    let claims: Expiry = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    let exp = claims.exp?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a fractional exp is shown to the second; out-of-range values saturate and then fail from_unix"
    )]
    let seconds = exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64))?;
    Timestamp::from_unix(seconds)
}

/// A protobuf `Struct` (the claims of ValidateJWTSVID) as JSON.
pub(crate) fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

/// Recursion is bounded: prost refuses messages nested deeper than 100.
fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// Protobuf numbers are doubles; integral ones (`exp`, `iat`) are shown as
/// integers, as they were in the token. NaN and infinities have no JSON
/// form and become null.
fn number_to_json(n: f64) -> serde_json::Value {
    // Beyond 2^53 a double no longer holds every integer: keep it a float.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "n is integral and within ±2^53, so the cast is exact"
    )]
    if n.fract() == 0.0 && n.abs() <= EXACT {
        return serde_json::Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
}
