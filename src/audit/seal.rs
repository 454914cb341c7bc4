//! Seals: the agent's signature on the trail's end (`HEAD`) and on each
//! `audit-recovered` record, so a cut tail with a rewritten `HEAD`, or a
//! made-up recovery record explaining a gap away, is detected by anyone
//! holding the public key (issue 15, finding 10).
//!
//! The chain alone cannot tell a cut tail from a short trail: a tail cut
//! back to record N is still a valid chain, and `HEAD` rewritten to name N
//! agrees with it. `HEAD` names the last record *and* carries an Ed25519
//! signature over it, made with a key only the agent holds
//! ([`SigningKey`], `<data_dir>/audit.key`, mode 0600); the public part
//! ([`PublicKey`], `<data_dir>/audit.pub`) is published, and
//! `tether audit verify --public-key` checks both. Because each record
//! hashes the one before, a signed `HEAD` vouches for every record up to
//! it.
//!
//! What is signed is a short text that names its purpose, so a signature
//! over one can never pass for the other:
//!
//! ```text
//! tether-audit-head/v1\n<seq>\n<hash hex>\n<time>
//! tether-audit-recovered/v1\n<seq>\n<prev hex>\n<decision>\n<reason>
//! ```
//!
//! A key is named by its id: the first 16 bytes of the SHA-256 of its
//! SubjectPublicKeyInfo (DER), in lowercase hex.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, ParsedPublicKey, UnparsedPublicKey};
use aws_lc_rs::{digest, encoding::PublicKeyX509Der};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::AuditError;
use super::files::Hash;

/// PEM label of the published public key (as `openssl pkey -pubout`).
const PUBLIC_PEM_TAG: &str = "PUBLIC KEY";
/// An Ed25519 signature's length, in bytes.
const SIGNATURE_LEN: usize = 64;
/// Longest key id or signature text accepted from a file.
const MAX_FIELD: usize = 128;

/// The agent's audit signing key (Ed25519). Never written into the trail.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

/// A published audit key: checks seals.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
    id: String,
}

/// A signature and the id of the key that made it, as stored in `HEAD`
/// and in an `audit-recovered` record (`"seal":{"key":…,"sig":…}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// The signing key's id.
    pub key: String,
    /// The Ed25519 signature, base64url without padding.
    pub sig: String,
}

/// Why a seal does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SealProblem {
    /// No key given has this id.
    UnknownKey(String),
    /// The key is known; the signature is not its signature of this text.
    BadSignature(String),
}

// === impl SigningKey ===

impl SigningKey {
    /// A new random key, and its PKCS#8 document to store (0600).
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), AuditError> {
        let pair =
            Ed25519KeyPair::generate().map_err(|_| key_error("generating an Ed25519 key"))?;
        let pkcs8 = pair
            .to_pkcs8()
            .map_err(|_| key_error("encoding the key as PKCS#8"))?;
        let der = Zeroizing::new(pkcs8.as_ref().to_vec());
        Ok((Self::from_pair(pair)?, der))
    }

    /// A key stored by [`Self::generate`]'s caller.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, AuditError> {
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .map_err(|e| key_error(&format!("not an Ed25519 PKCS#8 key: {e}")))?;
        Self::from_pair(pair)
    }

    fn from_pair(pair: Ed25519KeyPair) -> Result<Self, AuditError> {
        let spki: PublicKeyX509Der<'_> = pair
            .public_key()
            .as_der()
            .map_err(|_| key_error("encoding the public key"))?;
        let public = PublicKey::from_spki(spki.as_ref().to_vec());
        Ok(Self { pair, public })
    }

    /// The public part, to publish.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        self.public.id()
    }

    pub(super) fn seal(&self, message: &[u8]) -> Seal {
        Seal {
            key: self.public.id.clone(),
            sig: URL_SAFE_NO_PAD.encode(self.pair.sign(message).as_ref()),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.public.id)
            .finish_non_exhaustive()
    }
}

// === impl PublicKey ===

impl PublicKey {
    fn from_spki(spki: Vec<u8>) -> Self {
        let digest = digest::digest(&digest::SHA256, &spki);
        let id = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self { spki, id }
    }

    /// A key as [`Self::to_pem`] writes it (`-----BEGIN PUBLIC KEY-----`,
    /// as `openssl pkey -pubout` does). Anything else, or a key that is not
    /// Ed25519, is refused.
    pub fn from_pem(text: &[u8]) -> Result<Self, AuditError> {
        let block = pem::parse(text).map_err(|e| key_error(&format!("not a PEM file: {e}")))?;
        if block.tag() != PUBLIC_PEM_TAG {
            return Err(key_error(&format!(
                "the PEM block is {:?}, not {PUBLIC_PEM_TAG:?}",
                block.tag()
            )));
        }
        let spki = block.contents();
        // aws-lc-rs also takes a bare 32-byte key; the file holds the
        // DER structure, whose hash is the key's id.
        if spki.len() == 32 || ParsedPublicKey::new(&ED25519, spki).is_err() {
            return Err(key_error(
                "not an Ed25519 public key (SubjectPublicKeyInfo)",
            ));
        }
        let key = Self::from_spki(spki.to_vec());
        Ok(key)
    }

    /// PEM text, one block, with a trailing newline.
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new(PUBLIC_PEM_TAG, self.spki.clone()))
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn verifies(&self, message: &[u8], sig: &str) -> bool {
        if sig.len() > MAX_FIELD {
            return false;
        }
        let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        sig.len() == SIGNATURE_LEN
            && UnparsedPublicKey::new(&ED25519, &self.spki)
                .verify(message, &sig)
                .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

// === impl Seal ===

impl Seal {
    /// Checks the seal of `message` against the key of its id among `keys`.
    pub(super) fn check(&self, keys: &[PublicKey], message: &[u8]) -> Result<(), SealProblem> {
        let Some(key) = keys.iter().find(|key| key.id == self.key) else {
            return Err(SealProblem::UnknownKey(shorten(&self.key)));
        };
        if key.verifies(message, &self.sig) {
            Ok(())
        } else {
            Err(SealProblem::BadSignature(key.id.clone()))
        }
    }

    /// A stored seal with fields of sane length and form.
    pub(super) fn is_well_formed(&self) -> bool {
        self.key.len() <= MAX_FIELD
            && self.sig.len() <= MAX_FIELD
            && self.key.bytes().all(|b| b.is_ascii_hexdigit())
            && URL_SAFE_NO_PAD
                .decode(&self.sig)
                .is_ok_and(|sig| sig.len() == SIGNATURE_LEN)
    }
}

// === impl SealProblem ===

impl fmt::Display for SealProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey(id) => write!(
                f,
                "it is signed by key {id}, which is not among the public keys given"
            ),
            Self::BadSignature(id) => write!(
                f,
                "its signature does not verify with key {id}: it was rewritten"
            ),
        }
    }
}

/// What `HEAD`'s seal signs.
pub(super) fn head_message(seq: u64, hash: &Hash, time: &str) -> Vec<u8> {
    format!("tether-audit-head/v1\n{seq}\n{hash}\n{time}").into_bytes()
}

/// What an `audit-recovered` record's seal signs: its place, whether it
/// reports damage (`deny`) or only a crash's leftovers (`info`), and what.
pub(super) fn recovery_message(seq: u64, prev: &Hash, decision: &str, reason: &str) -> Vec<u8> {
    format!("tether-audit-recovered/v1\n{seq}\n{prev}\n{decision}\n{reason}").into_bytes()
}

fn key_error(problem: &str) -> AuditError {
    AuditError::Key(problem.to_owned())
}

/// A key id from a file, safe to print.
fn shorten(id: &str) -> String {
    id.chars()
        .take(MAX_FIELD)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_verifies_with_its_key_only_and_only_for_its_text() {
        let (key, pkcs8) = SigningKey::generate().unwrap();
        let stored = SigningKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(stored.id(), key.id());
        let published = PublicKey::from_pem(key.public_key().to_pem().as_bytes()).unwrap();
        assert_eq!(&published, key.public_key());
        assert_eq!(published.id().len(), 32);

        let text = head_message(7, &Hash::of(b"x"), "2026-12-07T00:00:00.000000Z");
        let seal = key.seal(&text);
        assert!(seal.is_well_formed());
        assert_eq!(seal.check(std::slice::from_ref(&published), &text), Ok(()));

        let other = head_message(8, &Hash::of(b"x"), "2026-12-07T00:00:00.000000Z");
        assert_eq!(
            seal.check(std::slice::from_ref(&published), &other),
            Err(SealProblem::BadSignature(published.id().to_owned()))
        );
        // The same fields under the other purpose are another text.
        let recovery = recovery_message(7, &Hash::of(b"x"), "info", "2026-12-07T00:00:00.000000Z");
        assert!(
            seal.check(std::slice::from_ref(&published), &recovery)
                .is_err()
        );

        let (stranger, _) = SigningKey::generate().unwrap();
        assert!(matches!(
            seal.check(std::slice::from_ref(stranger.public_key()), &text),
            Err(SealProblem::UnknownKey(_))
        ));
        // A stranger's signature under our key's id.
        let forged = Seal {
            key: key.id().to_owned(),
            sig: stranger.seal(&text).sig,
        };
        assert!(matches!(
            forged.check(std::slice::from_ref(&published), &text),
            Err(SealProblem::BadSignature(_))
        ));
    }

    #[test]
    fn only_an_ed25519_public_key_in_pem_is_accepted() {
        for (text, want) in [
            ("not pem", "not a PEM file"),
            (
                "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n",
                "not \"PUBLIC KEY\"",
            ),
            // A P-256 public key.
            (
                "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9\nq9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n-----END PUBLIC KEY-----\n",
                "not an Ed25519 public key",
            ),
        ] {
            let error = PublicKey::from_pem(text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(error.contains(want), "{error}");
        }
    }

    #[test]
    fn malformed_seals_are_not_well_formed() {
        for (key, sig) in [
            ("zz", "AAAA"),
            ("ab", "AAAA"),
            ("ab", &"A".repeat(200)),
            (&"a".repeat(200), "AAAA"),
        ] {
            let seal = Seal {
                key: key.to_owned(),
                sig: sig.to_owned(),
            };
            assert!(!seal.is_well_formed(), "{key} {sig}");
        }
    }
}
