//! JWT signing keys: ES256 (P-256) keys with a `kid`, signing through
//! jsonwebtoken, published as JWKs.
//!
//! jsonwebtoken asks its crypto provider for a signer on every `encode`,
//! and its aws-lc provider parses and checks the PKCS#8 key each time,
//! which costs more than the signature. So the process installs
//! `PROVIDER`: jsonwebtoken's own aws-lc provider, except that ES256
//! signers come from keys parsed once and kept (by the SHA-256 of their
//! DER, a few at most). The signing itself is aws-lc's.

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::SystemTime;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner};
use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header};
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
        // Before the first signature; a provider already in place (one
        // chosen by the embedding program) is left alone and still correct.
        if CryptoProvider::install_default(&PROVIDER).is_err() {
            tracing::debug!("a jsonwebtoken crypto provider was already installed");
        }
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

/// Parsed ES256 keys kept: the current key, the next and the previous
/// fit with room to spare.
const KEPT_SIGNERS: usize = 8;

/// jsonwebtoken's aws-lc provider with ES256 signers from [`SIGNERS`].
static PROVIDER: LazyLock<CryptoProvider> = LazyLock::new(|| {
    let aws_lc = &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER;
    CryptoProvider {
        signer_factory: signer,
        verifier_factory: aws_lc.verifier_factory,
        key_utils: aws_lc.key_utils.clone(),
    }
});

/// Parsed signing keys by the SHA-256 of their PKCS#8 DER, oldest first.
static SIGNERS: Mutex<Vec<([u8; 32], Arc<EcdsaKeyPair>)>> = Mutex::new(Vec::new());

/// An ES256 signer over a key parsed once.
struct KeptEs256(Arc<EcdsaKeyPair>);

impl jsonwebtoken::signature::Signer<Vec<u8>> for KeptEs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, jsonwebtoken::signature::Error> {
        let signature = self
            .0
            .sign(&SystemRandom::new(), msg)
            .map_err(jsonwebtoken::signature::Error::from_source)?;
        Ok(signature.as_ref().to_vec())
    }
}

impl JwtSigner for KeptEs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

/// [`PROVIDER`]'s signer factory: ES256 from [`SIGNERS`] (parsing a key
/// the first time it is seen), anything else from jsonwebtoken's provider.
fn signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if *algorithm != Algorithm::ES256 || key.family() != AlgorithmFamily::Ec {
        let aws_lc = &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER;
        return (aws_lc.signer_factory)(algorithm, key);
    }
    let mut id = [0_u8; 32];
    id.copy_from_slice(digest::digest(&digest::SHA256, key.as_bytes()).as_ref());
    let kept = |signers: &Vec<([u8; 32], Arc<EcdsaKeyPair>)>| {
        signers
            .iter()
            .find(|(kept, _)| *kept == id)
            .map(|(_, pair)| Arc::clone(pair))
    };
    if let Some(pair) = kept(&SIGNERS.lock().unwrap_or_else(PoisonError::into_inner)) {
        return Ok(Box::new(KeptEs256(pair)));
    }
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.as_bytes())
        .map(Arc::new)
        .map_err(|_| jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey)?;
    let mut signers = SIGNERS.lock().unwrap_or_else(PoisonError::into_inner);
    if kept(&signers).is_none() {
        if signers.len() >= KEPT_SIGNERS {
            signers.remove(0);
        }
        signers.push((id, Arc::clone(&pair)));
    }
    Ok(Box::new(KeptEs256(pair)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn signers_holding(key: &JwtKey) -> usize {
        let mut id = [0_u8; 32];
        id.copy_from_slice(digest::digest(&digest::SHA256, key.encoding_key.as_bytes()).as_ref());
        SIGNERS
            .lock()
            .unwrap()
            .iter()
            .filter(|(kept, _)| *kept == id)
            .count()
    }

    #[test]
    fn kept_signers_make_tokens_the_public_key_verifies() {
        let now = SystemTime::now();
        let lifetime = Lifetime {
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            activates_at: now,
        };
        let (key, _) = JwtKey::generate(lifetime).unwrap();
        let (other, _) = JwtKey::generate(lifetime).unwrap();
        let claims = serde_json::json!({"sub": "spiffe://example.org/w", "aud": "a", "exp": 4_102_444_800_u64});
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["a"]);
        for _ in 0..3 {
            let token = key.sign(&claims).unwrap();
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some(key.kid()));
            jsonwebtoken::decode::<serde_json::Value>(
                &token,
                key.public().decoding_key(),
                &validation,
            )
            .unwrap();
            // Another key's public half refuses it.
            assert!(
                jsonwebtoken::decode::<serde_json::Value>(
                    &token,
                    other.public().decoding_key(),
                    &validation,
                )
                .is_err()
            );
        }
        // Parsed once and kept, however many tokens were signed.
        assert_eq!(signers_holding(&key), 1);
    }
}
