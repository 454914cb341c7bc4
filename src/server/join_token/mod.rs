//! Join tokens: how a VM or bare-metal node proves, once, that an operator
//! admitted it (`tether server token create --node NAME [--ttl D]`).
//!
//! A token is 256 random bits, base64url, behind a `tjt1.` prefix that
//! says what it is (and lets a secret scanner find it). The server keeps
//! only its SHA-256 ([`TokenHash`]), never the token, so a copy of the
//! store admits no node; the operator sees the token once, on stdout. A
//! presented token is checked for its form and length before it is
//! hashed (it is untrusted input), then looked up by hash: the lookup
//! compares digests, not secrets, so its timing says nothing about the
//! token. A token admits its node once, before its expiry ([`Admission`]);
//! consuming it is the store's atomic update.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use super::scope::NodeName;

/// What every token starts with.
pub const PREFIX: &str = "tjt1.";
/// Random bytes in a token.
const SECRET_LEN: usize = 32;
/// The length of a token: the prefix and 32 bytes in base64url.
pub const TOKEN_LEN: usize = PREFIX.len() + 43;
/// A token's lifetime when `--ttl` is not given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10 * 60);
/// The longest lifetime a token may be given: a token is for joining a
/// node now, not a standing credential.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A new token, as the operator gets it. Printed by `Display` (once, to
/// stdout); `Debug` never shows it.
pub struct JoinToken(Zeroizing<String>);

/// The SHA-256 of a token: what the server keeps and looks up.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

/// A stored token, as the store returns it for a presented hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The node it admits.
    pub node: NodeName,
    /// Until when.
    pub expires_at: SystemTime,
    /// When it was used, if it was.
    pub used_at: Option<SystemTime>,
}

/// Why a token does not admit a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// Not the form of a join token (wrong prefix, length or alphabet).
    #[error("not a join token (expected {PREFIX}… of {TOKEN_LEN} characters)")]
    Malformed,
    /// No such token (never issued, or removed).
    #[error("unknown join token")]
    Unknown,
    /// Past its expiry.
    #[error("the join token expired")]
    Expired,
    /// Already used to admit its node.
    #[error("the join token was already used")]
    Used,
    /// The lifetime asked for at creation is zero or too long.
    #[error("a join token lives more than zero and at most {} (asked: {})", humantime::format_duration(MAX_TTL), humantime::format_duration(*.0))]
    BadTtl(Duration),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

// === impl JoinToken ===

impl JoinToken {
    /// A fresh token and its hash (what the store keeps).
    pub fn generate() -> Result<(Self, TokenHash), TokenRefusal> {
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        SystemRandom::new()
            .fill(secret.as_mut())
            .map_err(|_| TokenRefusal::Random)?;
        let token = Zeroizing::new(format!(
            "{PREFIX}{}",
            URL_SAFE_NO_PAD.encode(secret.as_ref())
        ));
        let hash = TokenHash::digest(&token);
        Ok((Self(token), hash))
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(***)")
    }
}

// === impl TokenHash ===

impl TokenHash {
    /// The hash of a presented token, after checking its form: the
    /// prefix, the exact length and the base64url alphabet.
    pub fn of_presented(token: &str) -> Result<Self, TokenRefusal> {
        let body = token
            .strip_prefix(PREFIX)
            .filter(|_| token.len() == TOKEN_LEN)
            .ok_or(TokenRefusal::Malformed)?;
        if !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TokenRefusal::Malformed);
        }
        Ok(Self::digest(token))
    }

    fn digest(token: &str) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
        Self(out)
    }

    /// The digest's bytes, as a store keeps them.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A hash read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash as stored (lowercase hex).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A token's hash is not secret, but it is not for logs either.
impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

// === impl Admission ===

impl Admission {
    /// The node this token admits at `now`, or why it does not.
    pub fn admit(&self, now: SystemTime) -> Result<&NodeName, TokenRefusal> {
        if self.used_at.is_some() {
            return Err(TokenRefusal::Used);
        }
        if now >= self.expires_at {
            return Err(TokenRefusal::Expired);
        }
        Ok(&self.node)
    }
}

/// When a token created at `now` with `ttl` (the default when `None`)
/// expires.
pub fn expiry(now: SystemTime, ttl: Option<Duration>) -> Result<SystemTime, TokenRefusal> {
    let ttl = ttl.unwrap_or(DEFAULT_TTL);
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(TokenRefusal::BadTtl(ttl));
    }
    Ok(now + ttl)
}

#[cfg(test)]
mod tests;
