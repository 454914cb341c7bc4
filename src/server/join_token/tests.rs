//! Join tokens: their form, what is kept of them, and when they admit.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::*;

#[test]
fn a_token_has_its_documented_form_and_is_kept_only_as_its_hash() {
    let (token, hash) = JoinToken::generate().unwrap();
    let shown = token.to_string();
    assert!(shown.starts_with(PREFIX), "{shown}");
    assert_eq!(shown.len(), TOKEN_LEN);
    assert_eq!(TokenHash::of_presented(&shown), Ok(hash));
    assert_eq!(hash.to_hex().len(), 64);
    assert!(!hash.to_hex().contains(&shown[PREFIX.len()..]));
    assert_eq!(format!("{token:?}"), "JoinToken(***)");
    assert_eq!(format!("{hash:?}"), "TokenHash(..)");
}

#[test]
fn tokens_do_not_repeat() {
    let hashes: HashSet<TokenHash> = (0..1000)
        .map(|_| JoinToken::generate().unwrap().1)
        .collect();
    assert_eq!(hashes.len(), 1000);
}

#[test]
fn a_presented_token_of_another_form_is_refused_before_it_is_hashed() {
    let (token, _) = JoinToken::generate().unwrap();
    let good = token.to_string();
    let body = &good[PREFIX.len()..];
    let cases = [
        String::new(),
        body.to_owned(),
        format!("tjt2.{body}"),
        format!("{good}A"),
        good[..good.len() - 1].to_owned(),
        format!("{PREFIX}{}", "=".repeat(43)),
        format!("{PREFIX}{}", "é".repeat(21)),
        "x".repeat(1 << 20),
    ];
    for presented in cases {
        assert_eq!(
            TokenHash::of_presented(&presented),
            Err(TokenRefusal::Malformed),
            "{}",
            presented.chars().take(60).collect::<String>()
        );
    }
}

#[test]
fn a_token_admits_its_node_once_before_it_expires() {
    let now = SystemTime::now();
    let node = NodeName::new("node-a").unwrap();
    let fresh = Admission {
        node: node.clone(),
        expires_at: expiry(now, None).unwrap(),
        used_at: None,
    };
    assert_eq!(fresh.admit(now), Ok(&node));
    assert_eq!(fresh.admit(now + DEFAULT_TTL), Err(TokenRefusal::Expired));
    let used = Admission {
        used_at: Some(now),
        ..fresh
    };
    assert_eq!(used.admit(now), Err(TokenRefusal::Used));
}

#[test]
fn a_lifetime_must_be_more_than_zero_and_at_most_a_week() {
    let now = SystemTime::now();
    assert_eq!(expiry(now, None), Ok(now + Duration::from_secs(600)));
    assert_eq!(expiry(now, Some(MAX_TTL)), Ok(now + MAX_TTL));
    for bad in [Duration::ZERO, MAX_TTL + Duration::from_secs(1)] {
        let refused = expiry(now, Some(bad));
        assert_eq!(refused, Err(TokenRefusal::BadTtl(bad)));
    }
    let shown = TokenRefusal::BadTtl(Duration::ZERO).to_string();
    assert!(shown.contains("7days"), "{shown}");
}
