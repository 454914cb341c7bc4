use std::sync::Arc;

use http::header::{ALLOW, CACHE_CONTROL, ETAG, IF_NONE_MATCH};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt as _;
use spiffe::TrustDomain;
use tokio::sync::watch;

use super::*;
use crate::bundle::JwtAuthority;
use crate::web::WebResponse;

fn key(kid: &str) -> JwtAuthority {
    let key = rcgen::KeyPair::generate().expect("a P-256 key");
    JwtAuthority::from_p256_point(kid.into(), key.public_key_raw()).expect("a JWT authority")
}

fn bundle(kids: &[&str], sequence: u64) -> Arc<TrustBundle> {
    Arc::new(TrustBundle::new(
        TrustDomain::new("example.org").expect("a trust domain"),
        Vec::new(),
        kids.iter().map(|k| key(k)).collect(),
        sequence,
    ))
}

async fn body(response: WebResponse) -> Vec<u8> {
    response
        .into_body()
        .collect()
        .await
        .expect("a full body")
        .to_bytes()
        .to_vec()
}

fn get(routes: &OidcRoutes, path: &str) -> WebResponse {
    routes.answer_to(&Method::GET, path, &HeaderMap::new())
}

#[test]
fn an_issuer_is_an_https_url_with_a_host_and_no_query_fragment_or_user() {
    for (value, normalized) in [
        ("https://oidc.example.com", "https://oidc.example.com"),
        ("https://oidc.example.com/", "https://oidc.example.com"),
        (
            "https://example.com:8443/tenants/a/",
            "https://example.com:8443/tenants/a",
        ),
        ("https://10.0.0.1/x", "https://10.0.0.1/x"),
    ] {
        assert_eq!(
            normalize_issuer(value).as_deref(),
            Ok(normalized),
            "{value}"
        );
    }
    for (value, problem) in [
        ("http://oidc.example.com", "https://"),
        ("oidc.example.com", "https://"),
        ("HTTPS://oidc.example.com", "https://"),
        ("https://oidc.example.com/?a=b", "query"),
        ("https://oidc.example.com/#top", "fragment"),
        ("https://user:pw@oidc.example.com", "user info"),
        ("https://user@oidc.example.com/x", "user info"),
        ("https://", "host"),
        ("https:///path", "host"),
        ("https://oidc.example.com//", "empty path segment"),
        ("https://oidc.example.com/a//b", "empty path segment"),
        ("https://oidc.example.com/a b", "spaces"),
    ] {
        let err = normalize_issuer(value).expect_err(value);
        assert!(err.contains(problem), "{value}: {err}");
    }
    let long = format!("https://example.com/{}", "a".repeat(MAX_ISSUER_LEN));
    assert!(normalize_issuer(&long).is_err_and(|e| e.contains("at most")));
}

#[test]
fn the_config_wants_both_certificate_files_or_neither() {
    let config = |cert: Option<&str>, key: Option<&str>| OidcConfig {
        listen: "127.0.0.1:0".parse().expect("an address"),
        issuer: "https://oidc.example.com/".into(),
        cert_path: cert.map(Into::into),
        key_path: key.map(Into::into),
    };
    let mut plain = config(None, None);
    plain.validate().expect("plain HTTP is fine");
    assert_eq!(plain.issuer, "https://oidc.example.com");
    assert!(!plain.is_https());
    let mut https = config(Some("/etc/c.pem"), Some("/etc/k.pem"));
    https.validate().expect("both files");
    assert!(https.is_https());
    for (cert, key, bad_key) in [
        (Some("/etc/c.pem"), None, "oidc.key_path"),
        (None, Some("/etc/k.pem"), "oidc.cert_path"),
        (Some("c.pem"), Some("/etc/k.pem"), "oidc.cert_path"),
    ] {
        let (key_name, _) = config(cert, key).validate().expect_err("refused");
        assert_eq!(key_name, bad_key);
    }
    let mut bad = config(None, None);
    bad.issuer = "http://x".into();
    assert_eq!(bad.validate().expect_err("refused").0, "oidc.issuer");
}

#[tokio::test]
async fn the_discovery_document_names_the_issuer_and_its_keys() {
    let (_tx, rx) = watch::channel(bundle(&["k1"], 1));
    let routes = OidcRoutes::new("https://oidc.example.com/td", rx);
    for path in [
        "/.well-known/openid-configuration",
        "/td/.well-known/openid-configuration",
    ] {
        let response = get(&routes, path);
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()[CACHE_CONTROL], CACHE_CONTROL_VALUE);
        let doc: serde_json::Value = serde_json::from_slice(&body(response).await).expect("JSON");
        assert_eq!(doc["issuer"], "https://oidc.example.com/td");
        assert_eq!(doc["jwks_uri"], "https://oidc.example.com/td/keys");
        assert_eq!(doc["id_token_signing_alg_values_supported"][0], "ES256");
        assert_eq!(doc["response_types_supported"][0], "id_token");
        assert_eq!(doc["subject_types_supported"][0], "public");
        assert!(
            doc["claims_supported"]
                .as_array()
                .expect("a list")
                .iter()
                .any(|c| c == "iss")
        );
    }
}

#[tokio::test]
async fn the_keys_follow_the_bundle_with_use_sig_and_alg() {
    let (tx, rx) = watch::channel(bundle(&["k1"], 1));
    let routes = OidcRoutes::new("https://oidc.example.com", rx);
    let first = get(&routes, "/keys");
    assert_eq!(first.status(), StatusCode::OK);
    let first_tag = first.headers()[ETAG].clone();
    let jwks: serde_json::Value = serde_json::from_slice(&body(first).await).expect("JSON");
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], "k1");
    assert_eq!(keys[0]["use"], "sig");
    assert_eq!(keys[0]["alg"], "ES256");
    assert_eq!(keys[0]["kty"], "EC");

    // Unchanged: 304 for the tag, weak or in a list.
    for tag in [
        first_tag.to_str().expect("ascii").to_owned(),
        format!("W/{}", first_tag.to_str().expect("ascii")),
        format!("\"other\", {}", first_tag.to_str().expect("ascii")),
        "*".to_owned(),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(
            IF_NONE_MATCH,
            HeaderValue::from_str(&tag).expect("a header"),
        );
        let again = routes.answer_to(&Method::GET, "/keys", &headers);
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{tag}");
        assert_eq!(again.headers()[ETAG], first_tag);
        assert_eq!(again.headers()[CACHE_CONTROL], CACHE_CONTROL_VALUE);
        assert!(body(again).await.is_empty());
    }

    // A rotation: the successor is served at once, under another tag, and
    // the old tag no longer matches.
    let rotated = bundle(&["k1", "k2"], 2);
    tx.send(rotated).expect("a receiver");
    let mut headers = HeaderMap::new();
    headers.insert(IF_NONE_MATCH, first_tag.clone());
    let next = routes.answer_to(&Method::GET, "/keys", &headers);
    assert_eq!(next.status(), StatusCode::OK);
    assert_ne!(next.headers()[ETAG], first_tag);
    let jwks: serde_json::Value = serde_json::from_slice(&body(next).await).expect("JSON");
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("a kid"))
        .collect();
    assert_eq!(kids, ["k1", "k2"]);
}

#[tokio::test]
async fn the_same_keys_get_the_same_tag_whatever_the_sequence() {
    // Two replicas behind one ingress count their own sequences.
    let one = bundle(&["k1"], 1);
    let other = Arc::new(TrustBundle::clone(&one).with_sequence(9));
    let tag = |b| {
        let (_tx, rx) = watch::channel(b);
        get(&OidcRoutes::new("https://o.example", rx), "/keys").headers()[ETAG].clone()
    };
    assert_eq!(tag(one), tag(other));
}

#[test]
fn other_paths_are_404_and_other_methods_405() {
    let (_tx, rx) = watch::channel(bundle(&["k1"], 1));
    let routes = OidcRoutes::new("https://oidc.example.com/td", rx);
    for path in [
        "/",
        "/keys/",
        "/td",
        "/td/keys/x",
        "/other/keys",
        "/.well-known/openid-configuration/x",
        "/tdkeys",
    ] {
        assert_eq!(get(&routes, path).status(), StatusCode::NOT_FOUND, "{path}");
    }
    for method in [Method::POST, Method::PUT, Method::DELETE] {
        let response = routes.answer_to(&method, "/keys", &HeaderMap::new());
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD");
    }
    let head = routes.answer_to(&Method::HEAD, "/td/keys", &HeaderMap::new());
    assert_eq!(head.status(), StatusCode::OK);
}

#[test]
fn a_short_lived_key_is_never_cached_past_its_publication_lead() {
    // A key is published a third of its life before it signs: a relying
    // party that honours max-age must refresh within that lead, whatever
    // `authority.jwt_key_ttl` is.
    for (ttl, want) in [
        (Duration::from_secs(24 * 3600), 300),
        (Duration::from_secs(30 * 60), 300),
        (Duration::from_secs(10 * 60), 100),
        (Duration::from_secs(12), 2),
    ] {
        assert_eq!(max_age_for(ttl).as_secs(), want, "{ttl:?}");
        assert!(max_age_for(ttl) * 2 <= ttl / 3, "{ttl:?}");
        let (_tx, rx) = watch::channel(bundle(&["k1"], 1));
        let routes = OidcRoutes::new("https://o.example", rx).with_jwt_key_ttl(ttl);
        for path in ["/keys", "/.well-known/openid-configuration"] {
            assert_eq!(
                get(&routes, path).headers()[CACHE_CONTROL],
                format!("public, max-age={want}").as_str(),
                "{ttl:?} {path}"
            );
        }
    }
}
