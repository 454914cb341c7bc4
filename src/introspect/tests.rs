use std::time::Duration;

use http::HeaderMap;
use http::header::CONTENT_TYPE;
use serde_json::{Map, Value, json};
use spiffe::SpiffeId;
use tokio::time::Instant;

use super::form::{self, FormError};
use super::rate::{CallerRates, retry_after_secs};
use super::*;

// === the form ===

#[test]
fn a_form_gives_its_token_decoded() {
    let asked = form::parse(b"token=a.b%2Bc.d&token_type_hint=access_token").expect("a form");
    assert_eq!(asked.token, "a.b+c.d");
    // `+` is a space in a form; parameters may come in any order, and
    // unknown ones are ignored.
    let asked = form::parse(b"resource=x&token=a+b").expect("a form");
    assert_eq!(asked.token, "a b");
}

#[test]
fn a_form_without_a_token_or_with_two_is_refused() {
    assert_eq!(form::parse(b""), Err(FormError::MissingToken));
    assert_eq!(form::parse(b"token="), Err(FormError::MissingToken));
    assert_eq!(
        form::parse(b"token_type_hint=x"),
        Err(FormError::MissingToken)
    );
    assert_eq!(
        form::parse(b"token=a&token=b"),
        Err(FormError::Repeated("token"))
    );
    assert_eq!(
        form::parse(b"token=a&token_type_hint=x&token_type_hint=y"),
        Err(FormError::Repeated("token_type_hint"))
    );
}

#[test]
fn a_form_is_bounded() {
    let long = format!("token={}", "a".repeat(crate::svid::jwt::MAX_TOKEN_LEN + 1));
    assert!(matches!(
        form::parse(long.as_bytes()),
        Err(FormError::TokenTooLong(_))
    ));
    let at_limit = format!("token={}", "a".repeat(crate::svid::jwt::MAX_TOKEN_LEN));
    assert!(form::parse(at_limit.as_bytes()).is_ok());
    let many = vec!["x=1"; 20].join("&") + "&token=a";
    assert_eq!(
        form::parse(many.as_bytes()),
        Err(FormError::TooManyParameters)
    );
}

#[test]
fn invalid_percent_encoding_and_utf8_do_not_fail_the_parser() {
    // `%zz` stays as written, invalid UTF-8 becomes U+FFFD: the token is
    // then simply not a valid JWT.
    let asked = form::parse(b"token=%zz%ff").expect("a form");
    assert_eq!(asked.token, "%zz\u{fffd}");
}

#[test]
fn only_the_form_media_type_is_read() {
    let with = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, value.parse().expect("a header value"));
        form::check_media_type(&headers)
    };
    assert_eq!(with("application/x-www-form-urlencoded"), Ok(()));
    assert_eq!(
        with("Application/X-WWW-Form-URLEncoded; charset=UTF-8"),
        Ok(())
    );
    assert_eq!(with("application/json"), Err(FormError::MediaType));
    assert_eq!(
        with("application/x-www-form-urlencodedx"),
        Err(FormError::MediaType)
    );
    assert_eq!(
        form::check_media_type(&HeaderMap::new()),
        Err(FormError::MediaType)
    );
}

// === the buckets ===

#[test]
fn a_caller_gets_its_burst_then_its_rate_and_others_are_untouched() {
    let rates = CallerRates::new(10, 20);
    let t0 = Instant::now();
    let admitted = (0..100).filter(|_| rates.admit("a", t0).is_ok()).count();
    assert_eq!(admitted, 20);
    let wait = rates.admit("a", t0).expect_err("empty");
    assert!(
        wait <= Duration::from_millis(100),
        "one request in 1/rate s"
    );
    assert!(rates.admit("b", t0).is_ok(), "another caller is served");
    let t1 = t0 + Duration::from_secs(1);
    let admitted = (0..100).filter(|_| rates.admit("a", t1).is_ok()).count();
    assert_eq!(admitted, 10);
}

#[test]
fn idle_callers_are_forgotten_when_the_map_is_full() {
    let rates = CallerRates::with_max_callers(1, 2, 2);
    let t0 = Instant::now();
    assert!(rates.admit("a", t0).is_ok());
    assert!(rates.admit("b", t0).is_ok());
    // Both are busy (their buckets not full): a third caller waits.
    assert!(rates.admit("c", t0).is_err());
    assert_eq!(rates.tracked(), 2);
    // Later both have refilled (idle): they are forgotten, "c" is served.
    let t1 = t0 + Duration::from_secs(5);
    assert!(rates.admit("c", t1).is_ok());
    assert_eq!(rates.tracked(), 1);
}

#[test]
fn retry_after_is_whole_seconds_and_never_zero() {
    assert_eq!(retry_after_secs(Duration::ZERO), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(20)), 1);
    assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
    assert_eq!(retry_after_secs(Duration::from_millis(2100)), 3);
}

// === the answer ===

fn claims(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => panic!("an object"),
    }
}

#[test]
fn an_inactive_answer_says_nothing_else() {
    let outcome = Err(Inactive::because("task t1 has ended: revoked").of_task("t1"));
    assert_eq!(answer_json(&outcome), json!({ "active": false }));
}

#[test]
fn a_task_token_answer_has_its_claims_and_not_rctx() {
    let outcome = Ok(ValidClaims {
        kind: TokenKind::Task,
        subject: SpiffeId::new("spiffe://example.org/agent").expect("an id"),
        claims: claims(json!({
            "iss": "spiffe://example.org",
            "sub": "spiffe://example.org/agent",
            "aud": ["spiffe://example.org/tool"],
            "exp": 200, "iat": 100, "nbf": 100,
            "jti": "j1", "txn": "t1", "scope": "read write",
            "tctx": { "ver": 1, "intent": "triage", "tools": ["read", "write"], "deadline": 300 },
            "rctx": { "authn": "unix", "pid": 7, "pid_start": 1, "uid": 1000 },
            "act": { "sub": "spiffe://example.org/helper" },
            "cnf": { "x5t#S256": "abc" },
        })),
    });
    let answer = answer_json(&outcome);
    assert_eq!(
        answer,
        json!({
            "active": true,
            "token_type": "Bearer",
            "token_kind": "task",
            "iss": "spiffe://example.org",
            "sub": "spiffe://example.org/agent",
            "aud": ["spiffe://example.org/tool"],
            "exp": 200, "iat": 100, "nbf": 100,
            "jti": "j1", "txn": "t1", "scope": "read write",
            "tctx": { "ver": 1, "intent": "triage", "tools": ["read", "write"], "deadline": 300 },
            "act": { "sub": "spiffe://example.org/helper" },
            "cnf": { "x5t#S256": "abc" },
        })
    );
}

#[test]
fn a_jwt_svid_answer_has_the_registered_claims_only() {
    let outcome = Ok(ValidClaims {
        kind: TokenKind::JwtSvid,
        subject: SpiffeId::new("spiffe://example.org/web").expect("an id"),
        claims: claims(json!({
            "sub": "spiffe://example.org/web",
            "aud": "spiffe://example.org/db",
            "exp": 200, "iat": 100, "jti": "j2",
            "scope": "not a task token's",
        })),
    });
    assert_eq!(
        answer_json(&outcome),
        json!({
            "active": true,
            "token_type": "Bearer",
            "token_kind": "jwt-svid",
            "sub": "spiffe://example.org/web",
            "aud": ["spiffe://example.org/db"],
            "exp": 200, "iat": 100, "jti": "j2",
        })
    );
}

#[test]
fn the_kind_is_a_task_token_with_txn() {
    assert_eq!(
        TokenKind::of(&claims(json!({ "txn": "t" }))),
        TokenKind::Task
    );
    assert_eq!(
        TokenKind::of(&claims(json!({ "sub": "x" }))),
        TokenKind::JwtSvid
    );
}

// === the settings ===

#[test]
fn settings_default_and_bounds() {
    let config: IntrospectionConfig = toml::from_str("listen = \"127.0.0.1:0\"").expect("settings");
    assert_eq!(config.requests_per_second, DEFAULT_REQUESTS_PER_SECOND);
    assert_eq!(config.burst, DEFAULT_BURST);
    assert!(config.clone().validate().is_ok());
    let zero = IntrospectionConfig {
        requests_per_second: 0,
        ..config.clone()
    };
    assert_eq!(
        zero.validate().expect_err("zero").0,
        "introspection.requests_per_second"
    );
    let zero = IntrospectionConfig { burst: 0, ..config };
    assert_eq!(zero.validate().expect_err("zero").0, "introspection.burst");
    assert!(toml::from_str::<IntrospectionConfig>("listen = \"127.0.0.1:0\"\nrate = 1").is_err());
}
