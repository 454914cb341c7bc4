//! JWT signing keys: ES256 (P-256) keys with a `kid`, signing through
//! jsonwebtoken, published as JWKs.

use std::fmt;
use std::time::SystemTime;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::Serialize;
use zeroize::Zeroizing;

use super::AuthorityError;
use super::rotation::Lifetime;
use crate::bundle::JwtAuthority;

/// One JWT signing key.
pub struct JwtKey {
    kid: String,
    lifetime: Lifetime,
    encoding_key: EncodingKey,
    public: JwtAuthority,
}

// === impl JwtKey ===

impl JwtKey {
    /// Generates a fresh P-256 key; returns it and its PKCS#8 DER for storage.
    pub fn generate(lifetime: Lifetime) -> Result<(Self, Zeroizing<Vec<u8>>), AuthorityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Rcgen)?;
        let pkcs8 = Zeroizing::new(key.serialize_der());
        let kid = super::random_id()?;
        let this = Self::from_pkcs8(kid, &pkcs8, lifetime)?;
        Ok((this, pkcs8))
    }

    /// Rebuilds a key from storage.
    pub fn from_pkcs8(
        kid: String,
        pkcs8: &[u8],
        lifetime: Lifetime,
    ) -> Result<Self, AuthorityError> {
        let key = KeyPair::try_from(pkcs8)
            .map_err(|e| AuthorityError::Corrupt(format!("JWT key {kid}: {e}")))?;
        if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
            return Err(AuthorityError::Corrupt(format!(
                "JWT key {kid}: not a P-256 key"
            )));
        }
        let public = JwtAuthority::from_p256_point(kid.clone(), key.public_key_raw())
            .map_err(|e| AuthorityError::Corrupt(format!("JWT key {kid}: {e}")))?;
        Ok(Self {
            kid,
            lifetime,
            encoding_key: EncodingKey::from_ec_der(pkcs8),
            public,
        })
    }

    /// Signs `claims` as a compact JWS with header `{alg: ES256, kid, typ: JWT}`
    /// and nothing else (the JWT-SVID spec allows no other header members).
    pub fn sign<C: Serialize>(&self, claims: &C) -> Result<String, AuthorityError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &self.encoding_key).map_err(AuthorityError::Jwt)
    }

    /// Key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Validity and activation. Tokens signed by this key expire by `not_after`.
    pub fn lifetime(&self) -> Lifetime {
        self.lifetime
    }

    /// The public half, as it goes in the bundle.
    pub fn public(&self) -> &JwtAuthority {
        &self.public
    }

    /// Latest `exp` a token signed now may carry.
    pub fn latest_expiry(&self) -> SystemTime {
        self.lifetime.not_after
    }
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}
