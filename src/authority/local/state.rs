//! The authority's files: `state.json` (which keys exist, their lifetimes
//! and certificates, the bundle's sequence number) and one PEM file per
//! private key under `keys/`, all through [`key_store`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use spiffe::TrustDomain;

use super::KeySet;
use crate::authority::rotation::Lifetime;
use crate::authority::{AuthorityError, JwtKey, X509Authority, key_store};

/// Newest version of `authority/state.json` this build reads and writes.
/// Version 2 records upstream chains; it is written only when a CA has one,
/// so a tether that predates them refuses the file instead of taking
/// intermediates for roots.
pub(crate) const STATE_VERSION: u32 = 2;
/// The version written when every CA is a self-signed root.
const STATE_VERSION_ROOTS_ONLY: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StoredState {
    version: u32,
    trust_domain: String,
    sequence: u64,
    x509: Vec<StoredX509>,
    jwt: Vec<StoredJwt>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredX509 {
    id: String,
    certificate: String,
    /// The certificates above it up to the anchor (PEM), for an intermediate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_chain: Vec<String>,
    issued_at: u64,
    activates_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredJwt {
    kid: String,
    not_before: u64,
    not_after: u64,
    activates_at: u64,
}

pub(super) fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

pub(in crate::authority) fn x509_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("keys").join(format!("x509-{id}.pem"))
}

pub(super) fn jwt_key_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join("keys").join(format!("jwt-{kid}.pem"))
}

pub(in crate::authority) fn to_pem(der: &[u8]) -> Vec<u8> {
    pem::encode(&pem::Pem::new("PRIVATE KEY", der)).into_bytes()
}

fn from_pem(path: &Path, bytes: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, AuthorityError> {
    let parsed = pem::parse(bytes)
        .map_err(|e| AuthorityError::Corrupt(format!("{}: {e}", path.display())))?;
    if parsed.tag() != "PRIVATE KEY" {
        return Err(AuthorityError::Corrupt(format!(
            "{}: expected a PKCS#8 PRIVATE KEY, found {}",
            path.display(),
            parsed.tag()
        )));
    }
    Ok(zeroize::Zeroizing::new(parsed.into_contents()))
}

pub(super) fn load(dir: &Path, trust_domain: &TrustDomain) -> Result<KeySet, AuthorityError> {
    let path = state_path(dir);
    let Some(bytes) = key_store::read_public(&path)? else {
        return Ok(KeySet {
            x509: Vec::new(),
            retiring: Vec::new(),
            jwt: Vec::new(),
            sequence: 0,
        });
    };
    let state: StoredState = serde_json::from_slice(&bytes)
        .map_err(|e| AuthorityError::Corrupt(format!("{}: {e}", path.display())))?;
    if state.version > STATE_VERSION {
        return Err(AuthorityError::NewerState(state.version));
    }
    if state.trust_domain != trust_domain.as_str() {
        return Err(AuthorityError::OtherTrustDomain {
            stored: state.trust_domain,
            configured: trust_domain.to_string(),
        });
    }
    let mut x509 = Vec::with_capacity(state.x509.len());
    for stored in state.x509 {
        check_file_id(&stored.id)?;
        let key_path = x509_key_path(dir, &stored.id);
        let der = from_pem(&key_path, &key_store::read_secret(&key_path)?)?;
        let key = KeyPair::try_from(der.as_slice())
            .map_err(|e| AuthorityError::Corrupt(format!("{}: {e}", key_path.display())))?;
        let cert = pem::parse(&stored.certificate)
            .map_err(|e| AuthorityError::Corrupt(format!("CA {}: certificate: {e}", stored.id)))?;
        let upstream_chain = stored
            .upstream_chain
            .iter()
            .map(|c| pem::parse(c).map(pem::Pem::into_contents))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                AuthorityError::Corrupt(format!("CA {}: upstream chain: {e}", stored.id))
            })?;
        // Every CA loads as a signer; the first rotation sets aside those of
        // another authority than the configured one.
        x509.push(Arc::new(X509Authority::from_parts(
            stored.id,
            cert.into_contents(),
            upstream_chain,
            key,
            from_unix(stored.issued_at),
            from_unix(stored.activates_at),
        )?));
    }
    let mut jwt = Vec::with_capacity(state.jwt.len());
    for stored in state.jwt {
        check_file_id(&stored.kid)?;
        let key_path = jwt_key_path(dir, &stored.kid);
        let der = from_pem(&key_path, &key_store::read_secret(&key_path)?)?;
        let lifetime = Lifetime {
            not_before: from_unix(stored.not_before),
            not_after: from_unix(stored.not_after),
            activates_at: from_unix(stored.activates_at),
        };
        jwt.push(Arc::new(JwtKey::from_pkcs8(stored.kid, &der, lifetime)?));
    }
    Ok(KeySet {
        x509,
        retiring: Vec::new(),
        jwt,
        sequence: state.sequence,
    })
}

pub(super) fn store(
    dir: &Path,
    trust_domain: &TrustDomain,
    keys: &KeySet,
) -> Result<(), AuthorityError> {
    let certificate = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der));
    let cas = || keys.x509.iter().chain(&keys.retiring);
    let chained = cas().any(|k| !k.upstream_chain().is_empty());
    let state = StoredState {
        version: if chained {
            STATE_VERSION
        } else {
            STATE_VERSION_ROOTS_ONLY
        },
        trust_domain: trust_domain.to_string(),
        sequence: keys.sequence,
        x509: cas()
            .map(|k| StoredX509 {
                id: k.id().to_owned(),
                certificate: certificate(k.cert_der()),
                upstream_chain: k.upstream_chain().iter().map(|c| certificate(c)).collect(),
                issued_at: to_unix(k.lifetime().not_before),
                activates_at: to_unix(k.lifetime().activates_at),
            })
            .collect(),
        jwt: keys
            .jwt
            .iter()
            .map(|k| StoredJwt {
                kid: k.kid().to_owned(),
                not_before: to_unix(k.lifetime().not_before),
                not_after: to_unix(k.lifetime().not_after),
                activates_at: to_unix(k.lifetime().activates_at),
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&state)
        .map_err(|e| AuthorityError::Corrupt(format!("serialising state: {e}")))?;
    key_store::write_public(&state_path(dir), &json)?;
    Ok(())
}

/// Ids become file names: only what [`random_id`] produces is accepted.
fn check_file_id(id: &str) -> Result<(), AuthorityError> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(AuthorityError::Corrupt(format!(
            "key id {id:?} is not one tether wrote"
        )))
    }
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}
