//! [`OidcRoutes`]: the discovery document and the JWKS, answered from the
//! issuer and the bundle as they are at the request (never cached here:
//! a rotation is served at the next request).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, ETAG, IF_NONE_MATCH};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::Full;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::bundle::TrustBundle;
use crate::web::{self, Routes, WebRequest, WebResponse};

/// The discovery document's path, below the issuer.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The JWKS's path, below the issuer (`jwks_uri`).
pub const KEYS_PATH: &str = "/keys";

/// What relying parties may cache, and for how long, with the default
/// `authority.jwt_key_ttl` (24 h) or any of 30 minutes or more. A JWT key
/// is in the bundle a third of its life before it signs
/// (`authority::rotation`: from half its life, signing from five sixths;
/// 8 h ahead with the default 24 h), so a relying party that refreshes
/// every 5 minutes always holds the key of any token it is shown. Shorter
/// keys get a shorter `max-age` ([`max_age_for`]).
pub const CACHE_CONTROL_VALUE: &str = "public, max-age=300";

/// The longest `max-age` served.
const MAX_AGE: Duration = Duration::from_secs(300);

/// The algorithms the trust domain's authority signs with (ES256, P-256:
/// `authority::jwt_keys`).
const SIGNING_ALGS: &[&str] = &["ES256"];

/// The claims a JWT-SVID or a task token may carry.
const CLAIMS: &[&str] = &[
    "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "txn", "scope", "tctx", "rctx", "act", "cnf",
];

/// The OIDC discovery routes of one issuer. Answers
/// [`DISCOVERY_PATH`] and [`KEYS_PATH`] at the root and, when the issuer
/// has a path, below it too (an ingress may forward the path unchanged).
#[derive(Debug)]
pub struct OidcRoutes {
    /// The issuer's path (`/tenant` for `https://example.com/tenant`),
    /// empty at the root.
    prefix: String,
    /// The discovery document, fixed by the issuer.
    discovery: Bytes,
    discovery_etag: HeaderValue,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    /// `Cache-Control` of both documents.
    cache_control: HeaderValue,
}

/// Which document a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Document {
    Discovery,
    Keys,
}

// === impl OidcRoutes ===

impl OidcRoutes {
    /// The routes of `issuer` (validated: `oidc::normalize_issuer`),
    /// serving the JWT keys of the bundle `bundle` holds.
    pub fn new(issuer: &str, bundle: watch::Receiver<Arc<TrustBundle>>) -> Self {
        let discovery = discovery_document(issuer);
        let discovery_etag = etag_of(&discovery);
        Self {
            prefix: issuer_path(issuer).to_owned(),
            discovery: Bytes::from(discovery),
            discovery_etag,
            bundle,
            cache_control: HeaderValue::from_static(CACHE_CONTROL_VALUE),
        }
    }

    /// The same routes for keys living `jwt_key_ttl`
    /// (`authority.jwt_key_ttl`): `max-age` is [`max_age_for`] it.
    #[must_use]
    pub fn with_jwt_key_ttl(mut self, jwt_key_ttl: Duration) -> Self {
        let max_age = max_age_for(jwt_key_ttl).as_secs();
        // Digits and ASCII are valid header bytes.
        if let Ok(value) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
            self.cache_control = value;
        }
        self
    }

    fn document(&self, path: &str) -> Option<Document> {
        let below = |p: &str| {
            if p == DISCOVERY_PATH {
                Some(Document::Discovery)
            } else if p == KEYS_PATH {
                Some(Document::Keys)
            } else {
                None
            }
        };
        below(path).or_else(|| {
            path.strip_prefix(self.prefix.as_str())
                .filter(|_| !self.prefix.is_empty())
                .and_then(below)
        })
    }

    /// The answer to a request for `path` with `method` and `headers`.
    pub fn answer_to(&self, method: &Method, path: &str, headers: &HeaderMap) -> WebResponse {
        let Some(document) = self.document(path) else {
            return web::text(StatusCode::NOT_FOUND, "not found\n");
        };
        if method != Method::GET && method != Method::HEAD {
            let mut response = web::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are served here\n",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let (body, etag) = match document {
            Document::Discovery => (self.discovery.clone(), self.discovery_etag.clone()),
            Document::Keys => {
                let jwks = jwks(&self.bundle.borrow());
                let etag = etag_of(&jwks);
                (Bytes::from(jwks), etag)
            }
        };
        let mut response = if matches_etag(headers, &etag) {
            let mut response = WebResponse::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else {
            web::reply(StatusCode::OK, "application/json", body)
        };
        let headers = response.headers_mut();
        headers.insert(CACHE_CONTROL, self.cache_control.clone());
        headers.insert(ETAG, etag);
        response
    }
}

impl Routes for OidcRoutes {
    async fn answer(&self, request: WebRequest) -> WebResponse {
        self.answer_to(&request.method, &request.path, &request.headers)
    }
}

/// How long a relying party may cache the documents when JWT keys live
/// `jwt_key_ttl`: half the time a new key is published before it signs (a
/// third of its life), at most five minutes. A relying party that honours
/// it holds a key before the key signs, whatever the key's lifetime.
pub fn max_age_for(jwt_key_ttl: Duration) -> Duration {
    (jwt_key_ttl / 6).min(MAX_AGE)
}

/// The issuer's path: what follows its host, empty at the root.
fn issuer_path(issuer: &str) -> &str {
    let rest = issuer.strip_prefix("https://").unwrap_or(issuer);
    rest.find('/').map_or("", |at| &rest[at..])
}

/// The discovery document (OpenID Connect Discovery 1.0, section 3): what
/// a relying party needs to validate tokens, nothing of the flows tether
/// does not run (no authorization or token endpoint).
fn discovery_document(issuer: &str) -> Vec<u8> {
    let document = json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}{KEYS_PATH}"),
        "id_token_signing_alg_values_supported": SIGNING_ALGS,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "claims_supported": CLAIMS,
    });
    // A `json!` value always serialises.
    serde_json::to_vec(&document).unwrap_or_default()
}

/// The bundle's JWT keys as an OIDC JWKS: each key with `use: "sig"` (a
/// SPIFFE bundle says `jwt-svid`, which OIDC clients do not know) and its
/// `alg`.
pub fn jwks(bundle: &TrustBundle) -> Vec<u8> {
    let keys: Vec<Value> = bundle
        .jwt_authorities()
        .iter()
        .filter_map(|authority| {
            let Ok(Value::Object(mut key)) = serde_json::to_value(authority.jwk()) else {
                return None;
            };
            key.insert("use".into(), "sig".into());
            if !key.contains_key("alg")
                && let Some(alg) = algorithm_of(&key)
            {
                key.insert("alg".into(), alg.into());
            }
            Some(Value::Object(key))
        })
        .collect();
    serde_json::to_vec(&json!({ "keys": keys })).unwrap_or_default()
}

/// The JWS algorithm a key of this type and curve signs with.
fn algorithm_of(key: &Map<String, Value>) -> Option<&'static str> {
    let kty = key.get("kty").and_then(Value::as_str)?;
    let crv = key.get("crv").and_then(Value::as_str);
    match (kty, crv) {
        ("EC", Some("P-256")) => Some("ES256"),
        ("EC", Some("P-384")) => Some("ES384"),
        ("RSA", _) => Some("RS256"),
        ("OKP", Some("Ed25519")) => Some("EdDSA"),
        _ => None,
    }
}

/// A strong entity tag: the first 16 bytes of the body's SHA-256, in hex.
/// From the content rather than the bundle's sequence: a sequence is one
/// process's count (the fleet's union starts again on each replica and at
/// each restart), so the same keys would get different tags behind one
/// ingress, and different keys could get the same one.
fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body);
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Hex digits and quotes are valid header bytes.
    HeaderValue::from_str(&format!("\"{hex}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

/// True when `If-None-Match` names `etag` (weakly, as RFC 9110 13.1.2
/// asks for GET) or is `*`.
fn matches_etag(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}
