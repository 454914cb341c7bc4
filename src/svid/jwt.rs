//! JWT-SVIDs: issuance (ES256, `kid` in the header; `sub`, `aud`, `exp`,
//! `iat`, `jti` claims, and `iss` when an OIDC issuer is configured:
//! `Authority::issuer`) and validation against trust bundles (which
//! accepts any `iss`: the key that signed is what names the issuer).
//!
//! Validation is strict where the JWT-SVID spec is: compact JWS only; a
//! header of `alg`, `kid` and optionally `typ` (`JWT` or `JOSE`) and
//! nothing else; an asymmetric `alg`; a `kid` found in the bundle of the
//! trust domain named by `sub`; `exp` required and `nbf` honoured with no
//! leeway; an `iat` at most [`MAX_IAT_SKEW`] ahead; the audience present.
//! A token verified before under the same key for the same audience skips
//! the signature check (`svid::verified`), never the rest.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use spiffe::{SpiffeId, TrustDomain};

use super::{SvidError, verified};
use crate::authority::{Authority, JwtRequest};
use crate::bundle::TrustBundle;
use crate::registration::{Match, RegistrationEntry};

/// Longest token accepted for validation, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// How far in the future a token's `iat` may be (clock skew between
/// nodes). Beyond it the issuer's clock was ahead, and the token would
/// live longer than it was issued for: refused.
pub const MAX_IAT_SKEW: Duration = Duration::from_secs(30);

/// Most characters of a token's header value quoted in an error.
const MAX_ECHOED: usize = 80;

/// Algorithms the JWT-SVID spec allows. Never `none`, never HMAC.
const ALLOWED_ALGS: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// A signed JWT-SVID.
#[derive(Clone)]
pub struct JwtSvid {
    /// Its subject.
    pub spiffe_id: SpiffeId,
    /// The compact JWS.
    pub token: String,
    /// The entry's hint.
    pub hint: Option<String>,
    /// `exp`.
    pub expiry: SystemTime,
    /// `jti`, for logs.
    pub jti: String,
    /// The `kid` of the key that signed it.
    pub kid: String,
}

impl std::fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("jti", &self.jti)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A token that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// Every claim, `aud` always as an array.
    pub claims: Map<String, Value>,
}

/// Why a token was refused. Every variant is the token's fault, and its
/// message is safe to return to the caller.
#[derive(Debug, thiserror::Error)]
pub enum JwtValidationError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes; the limit is {MAX_TOKEN_LEN}")]
    TooLong(usize),
    /// Not three base64url segments with JSON header and payload.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// A header member the JWT-SVID spec does not allow.
    #[error("token header has member {0:?}; a JWT-SVID header holds only alg, kid and typ")]
    ExtraHeader(String),
    /// `typ` other than `JWT`/`JOSE`.
    #[error("token typ {0:?} is not JWT or JOSE")]
    BadType(String),
    /// `alg` not allowed.
    #[error("token alg {0:?} is not allowed for JWT-SVIDs")]
    BadAlgorithm(String),
    /// No `kid`.
    #[error("token header has no kid")]
    MissingKid,
    /// `sub` missing or not a SPIFFE ID.
    #[error("token sub is missing or not a SPIFFE ID")]
    BadSubject,
    /// No bundle for the subject's trust domain.
    #[error("no trust bundle for trust domain {0:?}")]
    UntrustedDomain(String),
    /// The bundle has no key with this `kid`.
    #[error("no key with kid {kid:?} in the bundle of {trust_domain:?}")]
    UnknownKid {
        /// The `kid`.
        kid: String,
        /// The subject's trust domain.
        trust_domain: String,
    },
    /// Signature, expiry, not-before or audience check failed.
    #[error("token is invalid: {0}")]
    Invalid(String),
}

/// Signs a JWT-SVID with subject `spiffe_id` (the entry's ID for the
/// caller) for `entry` and `audiences` at `now`, through `authority`
/// (which sets `exp`, never past its key's expiry), with `iss` =
/// `authority.issuer()` when there is one.
pub async fn issue(
    authority: &dyn Authority,
    entry: &RegistrationEntry,
    spiffe_id: &SpiffeId,
    audiences: &[String],
    default_ttl: Duration,
    now: SystemTime,
) -> Result<JwtSvid, SvidError> {
    let jti = crate::authority::random_id()?;
    let mut claims = Map::with_capacity(5);
    // The one place a JWT-SVID's `iss` is set: the configured OIDC issuer
    // (the fleet's, on a fleet agent), else none, as the JWT-SVID spec
    // leaves it.
    if let Some(issuer) = authority.issuer() {
        claims.insert("iss".into(), issuer.into());
    }
    claims.insert("sub".into(), spiffe_id.to_string().into());
    claims.insert("aud".into(), audiences.into());
    claims.insert("iat".into(), unix(now).into());
    claims.insert("jti".into(), jti.clone().into());
    let signed = authority
        .sign_jwt(JwtRequest {
            claims,
            not_after: now + entry.jwt_svid_ttl.unwrap_or(default_ttl),
            subject_token: None,
        })
        .await?;
    Ok(JwtSvid {
        spiffe_id: spiffe_id.clone(),
        token: signed.token,
        hint: entry.hint.clone(),
        expiry: signed.expires_at,
        jti,
        kid: signed.kid,
    })
}

/// Validates `token` for `audience` against the bundles `bundle_for` knows.
pub fn validate(
    token: &str,
    audience: &str,
    bundle_for: impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>>,
) -> Result<ValidatedJwt, JwtValidationError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtValidationError::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtValidationError::Malformed(
            "expected three dot-separated segments",
        ));
    };
    let header = decode_segment(header, "header is not base64url JSON")?;
    let alg = check_header(&header)?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or(JwtValidationError::MissingKid)?;

    // Only to pick the bundle: nothing from the payload is trusted until the
    // signature has been checked below.
    let unverified = decode_segment(payload, "payload is not base64url JSON")?;
    let subject = unverified
        .get("sub")
        .and_then(Value::as_str)
        .and_then(|s| SpiffeId::new(s).ok())
        .ok_or(JwtValidationError::BadSubject)?;
    let trust_domain = subject.trust_domain();
    let bundle = bundle_for(trust_domain)
        .ok_or_else(|| JwtValidationError::UntrustedDomain(trust_domain.to_string()))?;
    let key = bundle
        .jwt_authority(kid)
        .ok_or_else(|| JwtValidationError::UnknownKid {
            kid: echoed(kid),
            trust_domain: trust_domain.to_string(),
        })?;

    // A token verified before under this very key, for this audience,
    // skips the signature (`svid::verified`); time is checked again.
    let memo_key = verified::key(token, audience, key);
    let mut claims = match verified::get(&memo_key) {
        Some(claims) => {
            verified::check_times(&claims, jsonwebtoken::get_current_timestamp())
                .map_err(|problem| JwtValidationError::Invalid(problem.into()))?;
            (*claims).clone()
        }
        None => {
            let claims = decode(token, audience, alg, key.decoding_key())?;
            verified::put(memo_key, token.len(), Arc::new(claims.clone()));
            claims
        }
    };
    // As a number of any form: a fractional or huge `iat` is checked too.
    if let Some(iat) = claims.get("iat").and_then(Value::as_f64)
        && iat > unix(SystemTime::now() + MAX_IAT_SKEW) as f64
    {
        return Err(JwtValidationError::Invalid(
            "it was issued in the future (iat): the issuer's clock is ahead".into(),
        ));
    }
    if claims.get("sub").and_then(Value::as_str) != Some(subject.to_string().as_str()) {
        return Err(JwtValidationError::BadSubject);
    }
    // Report `aud` as an array whatever its form in the token, as SPIRE does.
    if let Some(aud @ Value::String(_)) = claims.get("aud").cloned() {
        claims.insert("aud".into(), Value::Array(vec![aud]));
    }
    Ok(ValidatedJwt {
        spiffe_id: subject,
        claims,
    })
}

/// `jsonwebtoken`'s check of the signature under `key`, the audience, and
/// `exp` (required) and `nbf` with no leeway: the claims.
fn decode(
    token: &str,
    audience: &str,
    alg: Algorithm,
    key: &jsonwebtoken::DecodingKey,
) -> Result<Map<String, Value>, JwtValidationError> {
    let mut validation = Validation::new(alg);
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "sub", "aud"]);
    jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            JwtValidationError::Invalid(match e.kind() {
                ErrorKind::InvalidAudience => {
                    format!("it is not addressed to audience {audience:?}")
                }
                ErrorKind::ExpiredSignature => "it has expired".into(),
                ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".into(),
                ErrorKind::InvalidSignature => "its signature does not verify".into(),
                _ => e.to_string(),
            })
        })
        .map(|data| data.claims)
}

fn decode_segment(
    segment: &str,
    problem: &'static str,
) -> Result<Map<String, Value>, JwtValidationError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtValidationError::Malformed(problem))?;
    serde_json::from_slice(&bytes).map_err(|_| JwtValidationError::Malformed(problem))
}

fn check_header(header: &Map<String, Value>) -> Result<Algorithm, JwtValidationError> {
    const ALLOWED_MEMBERS: [&str; 3] = ["alg", "kid", "typ"];
    if let Some(extra) = header
        .keys()
        .find(|k| !ALLOWED_MEMBERS.contains(&k.as_str()))
    {
        return Err(JwtValidationError::ExtraHeader(echoed(extra)));
    }
    if let Some(typ) = header.get("typ") {
        match typ.as_str() {
            Some("JWT" | "JOSE") => {}
            _ => return Err(JwtValidationError::BadType(echoed(&typ.to_string()))),
        }
    }
    let alg_value = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    alg_value
        .parse::<Algorithm>()
        .ok()
        .filter(|alg| ALLOWED_ALGS.contains(alg))
        .ok_or_else(|| JwtValidationError::BadAlgorithm(echoed(alg_value)))
}

/// At most [`MAX_ECHOED`] characters of a header value the token chose,
/// for an error message: those messages reach logs, the audit trail (an
/// introspection's reason) and callers, and a 16 KiB `kid` must not ride
/// along whole.
fn echoed(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHOED) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The trust domains a caller's entries federate with.
pub fn federated_domains<'a>(
    matches: impl IntoIterator<Item = &'a Match>,
) -> BTreeSet<TrustDomain> {
    matches
        .into_iter()
        .flat_map(|m| m.entry.federates_with.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{AuthorityConfig, LocalAuthority};
    use crate::registration::EntrySpec;

    fn setup() -> (tempfile::TempDir, LocalAuthority, RegistrationEntry) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            LocalAuthority::load_or_create(td.clone(), AuthorityConfig::default(), dir.path())
                .unwrap();
        let entry = RegistrationEntry::from_config(
            &EntrySpec {
                spiffe_id: "spiffe://example.org/svc".into(),
                selectors: vec!["unix:uid:1".into()],
                ..EntrySpec::default()
            },
            &td,
            &BTreeSet::new(),
        )
        .unwrap();
        (dir, authority, entry)
    }

    fn svc() -> SpiffeId {
        SpiffeId::new("spiffe://example.org/svc").unwrap()
    }

    fn sign_raw(header: &str, payload: &Value) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            URL_SAFE_NO_PAD.encode(b"sig")
        )
    }

    /// A JWT-SVID for `audience`, issued now for five minutes.
    async fn fresh(
        authority: &LocalAuthority,
        entry: &RegistrationEntry,
        audience: &str,
    ) -> JwtSvid {
        issue(
            authority,
            entry,
            &svc(),
            &[audience.to_owned()],
            Duration::from_secs(300),
            SystemTime::now(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn issue_then_validate() {
        let (_dir, authority, entry) = setup();
        let svid = fresh(&authority, &entry, "api").await;
        let bundle = authority.bundle();
        let ok = validate(&svid.token, "api", |_| Some(bundle.clone())).unwrap();
        assert_eq!(ok.spiffe_id.to_string(), "spiffe://example.org/svc");
        assert_eq!(ok.claims["aud"], serde_json::json!(["api"]));
        assert!(ok.claims.contains_key("exp") && ok.claims.contains_key("iat"));

        let wrong_aud = validate(&svid.token, "other", |_| Some(bundle.clone())).unwrap_err();
        assert!(
            matches!(wrong_aud, JwtValidationError::Invalid(_)),
            "{wrong_aud}"
        );
        assert_eq!(
            wrong_aud.to_string(),
            "token is invalid: it is not addressed to audience \"other\""
        );
        let untrusted = validate(&svid.token, "api", |_| None).unwrap_err();
        assert!(matches!(untrusted, JwtValidationError::UntrustedDomain(_)));
    }

    #[tokio::test]
    async fn expired_token_is_refused_without_leeway() {
        let (_dir, authority, entry) = setup();
        let past = SystemTime::now() - Duration::from_secs(301);
        let svid = issue(
            &authority,
            &entry,
            &svc(),
            &["a".into()],
            Duration::from_secs(300),
            past,
        )
        .await
        .unwrap();
        let bundle = authority.bundle();
        let err = validate(&svid.token, "a", |_| Some(bundle.clone())).unwrap_err();
        assert!(err.to_string().contains("xpired"), "{err}");
    }

    /// A token verified once is served from `svid::verified` only for the
    /// same key and audience: under another key with its `kid`, or for
    /// another audience, it is checked in full again.
    #[tokio::test]
    async fn a_verified_token_is_checked_again_under_another_key_with_its_kid() {
        let (_dir, authority, entry) = setup();
        let svid = fresh(&authority, &entry, "api").await;
        let bundle = authority.bundle();
        for _ in 0..2 {
            let ok = validate(&svid.token, "api", |_| Some(bundle.clone())).unwrap();
            assert_eq!(ok.claims["aud"], serde_json::json!(["api"]));
        }
        let kid = jsonwebtoken::decode_header(&svid.token)
            .unwrap()
            .kid
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let impostor =
            crate::bundle::JwtAuthority::from_p256_point(kid, other.public_key_raw()).unwrap();
        let forged = Arc::new(TrustBundle::new(
            bundle.trust_domain().clone(),
            Vec::new(),
            vec![impostor],
            bundle.sequence() + 1,
        ));
        let err = validate(&svid.token, "api", |_| Some(forged.clone())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token is invalid: its signature does not verify"
        );
        let err = validate(&svid.token, "other", |_| Some(bundle.clone())).unwrap_err();
        assert!(err.to_string().contains("audience"), "{err}");
    }

    /// Regression: a token whose `exp` and `nbf` have fractional seconds
    /// (RFC 7519's NumericDate allows them; jsonwebtoken rounds them)
    /// validated once, and then, served from `svid::verified`, was refused
    /// as expired on every later call.
    #[test]
    fn a_token_with_fractional_times_validates_again() {
        let td = TrustDomain::new("peer.example").expect("trust domain");
        let key = rcgen::KeyPair::generate().expect("key");
        let authority =
            crate::bundle::JwtAuthority::from_p256_point("peer".into(), key.public_key_raw())
                .expect("authority");
        let bundle = Arc::new(TrustBundle::new(td, Vec::new(), vec![authority], 1));
        let now = jsonwebtoken::get_current_timestamp() as f64;
        let claims = serde_json::json!({
            "sub": "spiffe://peer.example/svc",
            "aud": "api",
            "exp": now + 300.25,
            "nbf": now - 10.5,
            "iat": now - 10.5,
        });
        let header = jsonwebtoken::Header {
            kid: Some("peer".into()),
            ..jsonwebtoken::Header::new(Algorithm::ES256)
        };
        let signing = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
        let token = jsonwebtoken::encode(&header, &claims, &signing).expect("sign");
        for call in 0..3 {
            let ok = validate(&token, "api", |_| Some(bundle.clone()))
                .unwrap_or_else(|e| panic!("call {call}: {e}"));
            assert_eq!(ok.spiffe_id.to_string(), "spiffe://peer.example/svc");
        }
    }

    /// Regression: a token issued while the issuer's clock was hours ahead
    /// validated once the clock stepped back, living hours past its TTL.
    #[tokio::test]
    async fn a_token_issued_in_the_future_is_refused() {
        let (_dir, authority, entry) = setup();
        let bundle = authority.bundle();
        let issue_at = async |at| {
            issue(
                &authority,
                &entry,
                &svc(),
                &["a".into()],
                Duration::from_secs(300),
                at,
            )
            .await
            .unwrap()
        };
        let ahead = issue_at(SystemTime::now() + Duration::from_secs(3600)).await;
        let err = validate(&ahead.token, "a", |_| Some(bundle.clone())).unwrap_err();
        assert!(err.to_string().contains("issued in the future"), "{err}");
        // Within the skew allowed between nodes, it is not.
        let skewed = issue_at(SystemTime::now() + MAX_IAT_SKEW / 2).await;
        validate(&skewed.token, "a", |_| Some(bundle.clone())).unwrap();
    }

    #[test]
    fn refuses_hostile_headers() {
        let (_dir, authority, _) = setup();
        let bundle = authority.bundle();
        let kid = bundle.jwt_authorities()[0].kid().to_owned();
        let payload = serde_json::json!({"sub": "spiffe://example.org/x", "aud": "a", "exp": 4_000_000_000u64});
        let cases = [
            (r#"{"alg":"none","kid":"k"}"#.to_owned(), "alg"),
            (format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#), "alg"),
            (r#"{"alg":"ES256"}"#.to_owned(), "no kid"),
            (
                format!(r#"{{"alg":"ES256","kid":"{kid}","jku":"http://x"}}"#),
                "only alg, kid and typ",
            ),
            (
                format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"at+jwt"}}"#),
                "typ",
            ),
            (
                r#"{"alg":"ES256","kid":"foreign"}"#.to_owned(),
                "no key with kid",
            ),
            (format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#), "invalid"),
        ];
        for (header, want) in cases {
            let token = sign_raw(&header, &payload);
            let err = validate(&token, "a", |_| Some(bundle.clone())).unwrap_err();
            assert!(err.to_string().contains(want), "{header}: {err}");
        }
        for garbage in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.???.***",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(validate(garbage, "a", |_| Some(bundle.clone())).is_err());
        }
    }

    /// Regression (issue 19 review): a header value the token chose was
    /// quoted whole in the error, which an introspection records as its
    /// reason: 12 KiB of `kid` per request into the audit trail.
    #[test]
    fn errors_quote_a_bounded_part_of_the_header() {
        let (_dir, authority, _) = setup();
        let bundle = authority.bundle();
        let payload = serde_json::json!({"sub": "spiffe://example.org/x", "aud": "a", "exp": 4_000_000_000u64});
        let long = "é".repeat(6000);
        for header in [
            format!(r#"{{"alg":"ES256","kid":"{long}"}}"#),
            format!(r#"{{"alg":"{long}","kid":"k"}}"#),
            format!(r#"{{"alg":"ES256","kid":"k","typ":"{long}"}}"#),
            format!(r#"{{"alg":"ES256","kid":"k","{long}":1}}"#),
        ] {
            let token = sign_raw(&header, &payload);
            let err = validate(&token, "a", |_| Some(bundle.clone())).unwrap_err();
            let text = err.to_string();
            assert!(text.len() < 400, "{} bytes: {}", text.len(), &text[..200]);
            assert!(text.contains("éé…"), "{text}");
        }
    }
}
