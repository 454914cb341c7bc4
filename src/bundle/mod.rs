//! Trust bundles as values: the X.509 authorities and JWT keys of one trust
//! domain, and their encodings.
//!
//! Three encodings, each where the spec puts it:
//! - the SPIFFE bundle document (a JWK Set with `use`, `x5c`,
//!   `spiffe_sequence`, `spiffe_refresh_hint`), read from federation files
//!   and written by `bundle show`;
//! - concatenated DER certificates, the Workload API's X.509 bundle form;
//! - a plain RFC 7517 JWK Set of `jwt-svid` keys, the Workload API's JWT
//!   bundle form (no `use` member, every key with its `kid`).
//!
//! This module is pure data: no I/O, no private keys, no clocks.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, PublicKeyUse,
};
use serde::{Deserialize, Serialize};
use spiffe::TrustDomain;

/// Largest SPIFFE bundle document accepted, in bytes.
pub const MAX_BUNDLE_DOCUMENT_LEN: usize = 1024 * 1024;
/// Most keys one bundle document may carry.
pub const MAX_BUNDLE_KEYS: usize = 256;

/// `use` of an X.509 authority in a SPIFFE bundle.
const USE_X509_SVID: &str = "x509-svid";
/// `use` of a JWT authority in a SPIFFE bundle.
const USE_JWT_SVID: &str = "jwt-svid";

/// One JWT signing key's public half, as verifiers need it.
#[derive(Clone)]
pub struct JwtAuthority {
    kid: String,
    jwk: Jwk,
    decoding_key: DecodingKey,
    /// SHA-256 of the JWK as served: names this exact key (and `kid`).
    fingerprint: [u8; 32],
}

/// The trust material of one trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<Vec<u8>>,
    jwt_authorities: Vec<JwtAuthority>,
    sequence: u64,
    refresh_hint: Option<Duration>,
}

/// Why a bundle document or key was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The document is larger than [`MAX_BUNDLE_DOCUMENT_LEN`].
    #[error("bundle document is {0} bytes; the limit is {MAX_BUNDLE_DOCUMENT_LEN}")]
    TooLarge(usize),
    /// The document is not a JWK Set.
    #[error("bundle document is not a JWK Set")]
    Json(#[source] serde_json::Error),
    /// More keys than [`MAX_BUNDLE_KEYS`].
    #[error("bundle document has {0} keys; the limit is {MAX_BUNDLE_KEYS}")]
    TooManyKeys(usize),
    /// An `x509-svid` key without exactly one usable `x5c` certificate.
    #[error("key {index}: x509-svid authority needs one base64 DER certificate in x5c: {problem}")]
    BadX509Authority {
        /// Position of the key in `keys`.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// A `jwt-svid` key without a `kid`, or with key material jsonwebtoken cannot use.
    #[error("key {index}: jwt-svid authority is unusable: {problem}")]
    BadJwtAuthority {
        /// Position of the key in `keys`.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// Two `jwt-svid` keys with the same `kid`.
    #[error("two jwt-svid keys share kid {0:?}")]
    DuplicateKid(String),
    /// A public key this agent cannot express as a JWK (not P-256).
    #[error("unsupported public key for a JWK: {0}")]
    UnsupportedKey(&'static str),
}

/// The SPIFFE bundle document, as serde sees it. Keys stay raw JSON so an
/// unknown `kty` or `use` can be skipped, as the spec requires, instead of
/// failing the whole document.
#[derive(Debug, Serialize, Deserialize)]
struct BundleDocument {
    keys: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize)]
struct JwkSetRef<'a> {
    keys: Vec<&'a Jwk>,
}

// === impl JwtAuthority ===

impl JwtAuthority {
    /// A JWT authority from its public JWK. The `kid` is required.
    pub fn from_jwk(mut jwk: Jwk) -> Result<Self, String> {
        let kid = jwk
            .common
            .key_id
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or("kid is missing")?;
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            // A symmetric key in a trust bundle would let anyone holding the
            // bundle mint tokens: never a JWT-SVID authority.
            return Err("symmetric (oct) keys cannot be JWT-SVID authorities".into());
        }
        let decoding_key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        // The Workload API JWKS form carries no `use`.
        jwk.common.public_key_use = None;
        let served = serde_json::to_vec(&jwk).map_err(|e| e.to_string())?;
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &served).as_ref(),
        );
        Ok(Self {
            kid,
            jwk,
            decoding_key,
            fingerprint,
        })
    }

    /// A JWT authority for a P-256 public key given as an uncompressed point
    /// (`0x04 || X || Y`, as aws-lc-rs and x509-parser hand it out).
    pub fn from_p256_point(kid: String, point: &[u8]) -> Result<Self, BundleError> {
        let jwk = Jwk {
            common: CommonParameters {
                key_id: Some(kid),
                key_algorithm: Some(jsonwebtoken::jwk::KeyAlgorithm::ES256),
                ..CommonParameters::default()
            },
            algorithm: AlgorithmParameters::EllipticCurve(p256_params(point)?),
        };
        Self::from_jwk(jwk).map_err(|_| BundleError::UnsupportedKey("P-256 point rejected"))
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (no `use` member).
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// The key in the form jsonwebtoken verifies with.
    pub fn decoding_key(&self) -> &DecodingKey {
        &self.decoding_key
    }

    /// SHA-256 of the JWK as served: two authorities with the same
    /// fingerprint verify the same signatures.
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }
}

impl fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl PartialEq for JwtAuthority {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.jwk == other.jwk
    }
}

fn p256_params(point: &[u8]) -> Result<EllipticCurveKeyParameters, BundleError> {
    match point {
        [0x04, xy @ ..] if xy.len() == 64 => Ok(EllipticCurveKeyParameters {
            key_type: EllipticCurveKeyType::EC,
            curve: EllipticCurve::P256,
            x: URL_SAFE_NO_PAD.encode(&xy[..32]),
            y: URL_SAFE_NO_PAD.encode(&xy[32..]),
        }),
        _ => Err(BundleError::UnsupportedKey(
            "expected an uncompressed P-256 point",
        )),
    }
}

// === impl TrustBundle ===

impl TrustBundle {
    /// A bundle from its parts. `sequence` must grow with every change.
    pub fn new(
        trust_domain: TrustDomain,
        x509_authorities: Vec<Vec<u8>>,
        jwt_authorities: Vec<JwtAuthority>,
        sequence: u64,
    ) -> Self {
        Self {
            trust_domain,
            x509_authorities,
            jwt_authorities,
            sequence,
            refresh_hint: None,
        }
    }

    /// Parses a SPIFFE bundle document for `trust_domain`.
    ///
    /// Keys whose `use` is neither `x509-svid` nor `jwt-svid` are ignored, as
    /// the spec says; malformed keys of a known use fail the document, so a
    /// half-understood bundle never replaces a good one.
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_DOCUMENT_LEN {
            return Err(BundleError::TooLarge(json.len()));
        }
        let doc: BundleDocument = serde_json::from_slice(json).map_err(BundleError::Json)?;
        if doc.keys.len() > MAX_BUNDLE_KEYS {
            return Err(BundleError::TooManyKeys(doc.keys.len()));
        }
        let mut x509_authorities = Vec::new();
        let mut jwt_authorities: Vec<JwtAuthority> = Vec::new();
        for (index, key) in doc.keys.into_iter().enumerate() {
            match key.get("use").and_then(serde_json::Value::as_str) {
                Some(USE_X509_SVID) => x509_authorities.push(parse_x5c(index, &key)?),
                Some(USE_JWT_SVID) => {
                    let jwk: Jwk =
                        serde_json::from_value(key).map_err(|e| BundleError::BadJwtAuthority {
                            index,
                            problem: e.to_string(),
                        })?;
                    let authority = JwtAuthority::from_jwk(jwk)
                        .map_err(|problem| BundleError::BadJwtAuthority { index, problem })?;
                    if jwt_authorities.iter().any(|a| a.kid == authority.kid) {
                        return Err(BundleError::DuplicateKid(authority.kid));
                    }
                    jwt_authorities.push(authority);
                }
                _ => tracing::debug!(index, "bundle key with unknown use ignored"),
            }
        }
        Ok(Self {
            trust_domain,
            x509_authorities,
            jwt_authorities,
            sequence: doc.spiffe_sequence.unwrap_or(0),
            refresh_hint: doc.spiffe_refresh_hint.map(Duration::from_secs),
        })
    }

    /// The SPIFFE bundle document for this bundle.
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for der in &self.x509_authorities {
            let mut key = x509_authority_jwk(der)?;
            key.common.public_key_use = Some(PublicKeyUse::Other(USE_X509_SVID.into()));
            key.common.x509_chain = Some(vec![STANDARD.encode(der)]);
            keys.push(serde_json::to_value(key).map_err(BundleError::Json)?);
        }
        for authority in &self.jwt_authorities {
            let mut key = authority.jwk.clone();
            key.common.public_key_use = Some(PublicKeyUse::Other(USE_JWT_SVID.into()));
            keys.push(serde_json::to_value(key).map_err(BundleError::Json)?);
        }
        let doc = BundleDocument {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
        };
        serde_json::to_string_pretty(&doc).map_err(BundleError::Json)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The X.509 authorities (CA certificates), DER.
    pub fn x509_authorities(&self) -> &[Vec<u8>] {
        &self.x509_authorities
    }

    /// The JWT authorities.
    pub fn jwt_authorities(&self) -> &[JwtAuthority] {
        &self.jwt_authorities
    }

    /// The JWT authority with this key id.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.kid == kid)
    }

    /// The same bundle at `sequence`.
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }

    /// Grows with every change of content.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The same bundle, its document carrying `spiffe_refresh_hint` =
    /// `hint` (in whole seconds), as a bundle endpoint serves it.
    pub fn with_refresh_hint(mut self, hint: Duration) -> Self {
        self.refresh_hint = Some(hint);
        self
    }

    /// The `spiffe_refresh_hint` its document carried (or will carry).
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// The X.509 bundle in Workload API form: concatenated DER certificates.
    pub fn x509_der(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT bundle in Workload API form: an RFC 7517 JWK Set of the
    /// `jwt-svid` keys, each with its `kid` and without `use`.
    pub fn jwks_json(&self) -> Vec<u8> {
        let set = JwkSetRef {
            keys: self.jwt_authorities.iter().map(|a| &a.jwk).collect(),
        };
        // Serialising owned, already-validated JWKs cannot fail; fall back to
        // an empty set rather than panic if serde ever disagrees.
        serde_json::to_vec(&set).unwrap_or_else(|_| b"{\"keys\":[]}".to_vec())
    }

    /// True when both carry the same keys (sequence numbers aside).
    pub fn same_keys(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain
            && self.x509_authorities == other.x509_authorities
            && self.jwt_authorities == other.jwt_authorities
    }
}

fn parse_x5c(index: usize, key: &serde_json::Value) -> Result<Vec<u8>, BundleError> {
    let bad = |problem: &str| BundleError::BadX509Authority {
        index,
        problem: problem.into(),
    };
    let first = key
        .get("x5c")
        .and_then(serde_json::Value::as_array)
        .and_then(|chain| chain.first())
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| bad("x5c is missing or empty"))?;
    let der = STANDARD
        .decode(first)
        .map_err(|_| bad("x5c[0] is not base64"))?;
    let (rest, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| bad("x5c[0] is not a DER certificate"))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate"));
    }
    if !cert.is_ca() {
        return Err(bad("the certificate is not a CA"));
    }
    Ok(der)
}

/// The JWK of an X.509 authority's public key (EC P-256 only: the key type
/// tether issues; foreign documents are read, not re-exported).
fn x509_authority_jwk(der: &[u8]) -> Result<Jwk, BundleError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| BundleError::UnsupportedKey("not a DER certificate"))?;
    let point = cert.public_key().subject_public_key.data.as_ref();
    Ok(Jwk {
        common: CommonParameters::default(),
        algorithm: AlgorithmParameters::EllipticCurve(p256_params(point)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_der() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), key.public_key_raw().to_vec())
    }

    #[test]
    fn spiffe_document_round_trips() {
        let td = TrustDomain::new("example.org").unwrap();
        let (ca, _) = ca_der();
        let (_, point) = ca_der();
        let jwt = JwtAuthority::from_p256_point("kid-1".into(), &point).unwrap();
        let bundle = TrustBundle::new(td.clone(), vec![ca.clone()], vec![jwt], 7);
        let json = bundle.to_spiffe_json().unwrap();
        let back = TrustBundle::from_spiffe_json(td, json.as_bytes()).unwrap();
        assert!(back.same_keys(&bundle));
        assert_eq!(back.sequence(), 7);
        assert_eq!(back.x509_der(), ca);
        let jwks: serde_json::Value = serde_json::from_slice(&back.jwks_json()).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], "kid-1");
        assert!(
            jwks["keys"][0].get("use").is_none(),
            "Workload API JWKS carries no use"
        );
    }

    #[test]
    fn unknown_use_is_ignored_and_bad_keys_fail() {
        let td = TrustDomain::new("example.org").unwrap();
        let doc =
            br#"{"keys":[{"kty":"EC","use":"wit-svid","kid":"w"},{"kty":"OKP","use":"other"}]}"#;
        let b = TrustBundle::from_spiffe_json(td.clone(), doc).unwrap();
        assert!(b.x509_authorities().is_empty() && b.jwt_authorities().is_empty());

        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not a JWK Set"),
            (br#"{"keys":[{"use":"x509-svid"}]}"#, "x5c is missing"),
            (
                br#"{"keys":[{"use":"x509-svid","x5c":["!!"]}]}"#,
                "not base64",
            ),
            (
                br#"{"keys":[{"use":"x509-svid","x5c":["AAAA"]}]}"#,
                "not a DER certificate",
            ),
            (
                br#"{"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
                "kid is missing",
            ),
            (
                br#"{"keys":[{"use":"jwt-svid","kty":"oct","k":"AAAA","kid":"k"}]}"#,
                "symmetric",
            ),
        ];
        for (doc, want) in cases {
            let err = TrustBundle::from_spiffe_json(td.clone(), doc).unwrap_err();
            let err = crate::error::chain(&err);
            assert!(err.contains(want), "{err} (wanted {want})");
        }
        let big = vec![b' '; MAX_BUNDLE_DOCUMENT_LEN + 1];
        assert!(matches!(
            TrustBundle::from_spiffe_json(td, &big),
            Err(BundleError::TooLarge(_))
        ));
    }
}
