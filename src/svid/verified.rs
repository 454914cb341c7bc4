//! Tokens already verified: a bounded memo that spares a repeat
//! validation the signature check.
//!
//! A resource server validates the same token on every call it receives
//! with it, and an ES256 verification (about 75 µs of a core) is most of
//! what a validation costs. Whether a signature verifies depends only on
//! the token's bytes and the key, so once `jsonwebtoken::decode` has
//! accepted a token for an audience under a key, the memo keeps its claims
//! under SHA-256 of (token, audience, the key's fingerprint). A later
//! validation of the same bytes for the same audience under the same key
//! (same `kid` and key material, found in the bundle in force *now*)
//! skips the signature and re-checks what depends on time, exactly as
//! `jsonwebtoken` does with no leeway: `exp` not passed, `nbf` reached.
//! Everything else `svid::jwt::validate` checks after the decode (`iat`,
//! `sub`, and the task rules above it) runs on every call either way.
//!
//! What a memo hit cannot do: accept a token whose key left the bundle (the
//! key is looked up before the memo), a token under a changed key (another
//! fingerprint), another audience, or one changed by a single byte. Only
//! tokens that verified enter it, so a caller cannot fill it with garbage;
//! it holds at most [`CAPACITY`] tokens and [`CAPACITY_BYTES`] of them
//! (longer tokens are not kept), oldest out first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use aws_lc_rs::digest;
use serde_json::{Map, Value};

use crate::bundle::JwtAuthority;

/// Most tokens kept.
pub const CAPACITY: usize = 4096;
/// Most bytes of tokens kept, summed.
pub const CAPACITY_BYTES: usize = 4 * 1024 * 1024;
/// Longest token kept: longer ones are verified every time.
const MAX_KEPT_LEN: usize = 4096;

/// What identifies one verification: SHA-256 of token, audience and key.
pub type MemoKey = [u8; 32];

static MEMO: LazyLock<Mutex<Memo>> = LazyLock::new(|| Mutex::new(Memo::default()));

/// The tokens kept, oldest first in `order`.
#[derive(Default)]
struct Memo {
    claims: HashMap<MemoKey, Arc<Map<String, Value>>>,
    order: VecDeque<(MemoKey, usize)>,
    bytes: usize,
}

/// The memo key of `token` validated for `audience` under `authority`.
pub fn key(token: &str, audience: &str, authority: &JwtAuthority) -> MemoKey {
    let mut context = digest::Context::new(&digest::SHA256);
    // Lengths first: no two (token, audience) pairs hash the same input.
    context.update(&(token.len() as u64).to_be_bytes());
    context.update(token.as_bytes());
    context.update(&(audience.len() as u64).to_be_bytes());
    context.update(audience.as_bytes());
    context.update(authority.fingerprint());
    let mut key = [0; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

/// The claims of a token verified under `key` before, if kept.
pub fn get(key: &MemoKey) -> Option<Arc<Map<String, Value>>> {
    lock().claims.get(key).cloned()
}

/// Keeps the claims of a token that verified (`len`: its length).
pub fn put(key: MemoKey, len: usize, claims: Arc<Map<String, Value>>) {
    if len > MAX_KEPT_LEN {
        return;
    }
    let mut memo = lock();
    if memo.claims.insert(key, claims).is_some() {
        return;
    }
    memo.order.push_back((key, len));
    memo.bytes += len;
    while memo.order.len() > CAPACITY || memo.bytes > CAPACITY_BYTES {
        let Some((oldest, len)) = memo.order.pop_front() else {
            break;
        };
        memo.claims.remove(&oldest);
        memo.bytes -= len;
    }
}

/// What `jsonwebtoken` checks of time with no leeway, at `now` (Unix
/// seconds): `Err` names the claim that no longer holds.
pub fn check_times(claims: &Map<String, Value>, now: u64) -> Result<(), &'static str> {
    match claims.get("exp").and_then(numeric_date) {
        Some(exp) if exp >= now => {}
        // It verified with an `exp` it required: a missing one here is not
        // this memo's token.
        _ => return Err("it has expired"),
    }
    if let Some(nbf) = claims.get("nbf")
        && numeric_date(nbf).is_none_or(|nbf| nbf > now)
    {
        return Err("it is not valid yet (nbf)");
    }
    Ok(())
}

/// A NumericDate as `jsonwebtoken` 11 reads one: an unsigned integer, or
/// a finite non-negative number below `u64::MAX`, rounded (RFC 7519 allows
/// fractional seconds; a token with them verified, so it is served too).
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    })
}

fn lock() -> std::sync::MutexGuard<'static, Memo> {
    MEMO.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64, nbf: Option<u64>) -> Map<String, Value> {
        let mut claims = Map::new();
        claims.insert("exp".into(), exp.into());
        if let Some(nbf) = nbf {
            claims.insert("nbf".into(), nbf.into());
        }
        claims
    }

    #[test]
    fn times_are_checked_as_jsonwebtoken_does_with_no_leeway() {
        assert_eq!(check_times(&claims(100, None), 100), Ok(()));
        assert_eq!(check_times(&claims(100, None), 101), Err("it has expired"));
        assert_eq!(check_times(&claims(100, Some(50)), 50), Ok(()));
        assert_eq!(
            check_times(&claims(100, Some(51)), 50),
            Err("it is not valid yet (nbf)")
        );
        assert_eq!(check_times(&Map::new(), 0), Err("it has expired"));
        // Fractional seconds, rounded as jsonwebtoken rounds them.
        let mut fractional = Map::new();
        fractional.insert("exp".into(), 100.4.into());
        fractional.insert("nbf".into(), 50.5.into());
        assert_eq!(check_times(&fractional, 100), Ok(()));
        assert_eq!(check_times(&fractional, 101), Err("it has expired"));
        assert_eq!(
            check_times(&fractional, 50),
            Err("it is not valid yet (nbf)")
        );
        assert_eq!(check_times(&fractional, 51), Ok(()));
    }

    #[test]
    fn the_memo_keeps_its_bounds_oldest_out_first() {
        let keys: Vec<MemoKey> = (0..CAPACITY + 10)
            .map(|i| {
                let mut key = [0xA5; 32];
                key[..8].copy_from_slice(&(i as u64).to_be_bytes());
                key
            })
            .collect();
        let value = Arc::new(claims(1, None));
        for key in &keys {
            put(*key, 100, Arc::clone(&value));
        }
        // Other tests may use the memo at once: only this test's keys are
        // looked at.
        assert!(get(&keys[0]).is_none(), "the oldest left");
        assert!(get(&keys[CAPACITY + 9]).is_some(), "the newest stays");
        put([0x5A; 32], MAX_KEPT_LEN + 1, value);
        assert!(get(&[0x5A; 32]).is_none(), "long tokens are not kept");
        let memo = lock();
        assert!(memo.order.len() <= CAPACITY && memo.bytes <= CAPACITY_BYTES);
    }
}
