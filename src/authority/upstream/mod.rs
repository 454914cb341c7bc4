//! The upstream CA of `[authority] kind = "disk"`: a CA certificate (with,
//! optionally, its own chain up to a trust anchor) and its private key,
//! mounted by the operator and shared by every agent of the trust domain.
//!
//! Each agent signs through its own intermediate CA, issued by this upstream
//! CA ([`X509Authority::generate_intermediate`]); the trust bundle carries
//! the anchor (the last certificate of the file), so an SVID from any node
//! verifies against any node's bundle.
//!
//! JWT-SVIDs are not covered: every agent still signs JWTs with its own keys
//! and publishes only those, so a JWT-SVID issued on one node validates on
//! another only through federation or a shared JWT authority (not done here).
//!
//! Invariant: an [`Upstream`] exists only for files that passed every check
//! of [`Upstream::from_files`]; a file that fails them never replaces a
//! working upstream.
//!
//! [`X509Authority::generate_intermediate`]: super::X509Authority::generate_intermediate

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aws_lc_rs::digest;
use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use spiffe::{SpiffeId, TrustDomain};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

use super::key_store::{self, KeyStoreError};
use super::x509_ca::to_system_time;

/// Most certificates accepted in the certificate file.
const MAX_CHAIN_LEN: usize = 8;

/// The upstream CA, checked and ready to issue intermediates.
pub struct Upstream {
    cert_path: PathBuf,
    /// The certificate file's certificates, DER: the upstream CA first, the
    /// trust anchor last (one certificate when the CA is its own anchor).
    chain: Vec<Vec<u8>>,
    issuer: Issuer<'static, KeyPair>,
    not_before: SystemTime,
    /// The earliest `notAfter` of the chain: nothing issued through this CA
    /// can verify past it.
    not_after: SystemTime,
    subject: String,
    serial: String,
    fingerprint: Fingerprint,
}

/// The certificate and key files as read, before any check.
pub struct UpstreamFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    cert: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
}

/// A digest of both files' contents: notices a change on disk without
/// keeping the key's bytes around.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

/// Why the upstream CA files were refused.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A file could not be read.
    #[error(transparent)]
    Read(KeyStoreError),
    /// The key file can be read by others than its owner.
    #[error(
        "{path} has mode {mode:04o}: the upstream CA key must be readable by its owner only. Run `chmod 400` on it; in Kubernetes, mount the Secret with `defaultMode: 0400` (and no pod `fsGroup`, which adds group read)"
    )]
    KeyReadableByOthers {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file is not PEM.
    #[error("{path} is not PEM")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's report.
        #[source]
        source: pem::PemError,
    },
    /// A certificate is not DER X.509.
    #[error("certificate {index} in {path} is not an X.509 certificate")]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// Position in the file, from 0.
        index: usize,
        /// The parser's report.
        #[source]
        source: X509Error,
    },
    /// The key cannot be parsed.
    #[error("{path} holds no usable private key")]
    Key {
        /// The key file.
        path: PathBuf,
        /// rcgen's report.
        #[source]
        source: rcgen::Error,
    },
    /// The key is not a P-256 key.
    #[error(
        "{path} holds {found}; the upstream CA key must be an EC P-256 key (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`)"
    )]
    UnsupportedKey {
        /// The key file.
        path: PathBuf,
        /// What it holds instead.
        found: String,
    },
    /// The key file holds no private key, or more than one.
    #[error("{path} holds {count} private keys; it must hold exactly one")]
    KeyCount {
        /// The key file.
        path: PathBuf,
        /// How many it holds.
        count: usize,
    },
    /// The key does not belong to the certificate.
    #[error("{key_path} is not the private key of the first certificate in {cert_path}")]
    KeyMismatch {
        /// The key file.
        key_path: PathBuf,
        /// The certificate file.
        cert_path: PathBuf,
    },
    /// A certificate fails a check: not a CA, not valid now, another trust
    /// domain, a broken chain.
    #[error("{path}: {problem}")]
    Refused {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong, and what would be right.
        problem: String,
    },
    /// rcgen could not use the upstream CA as an issuer.
    #[error("{path}: cannot issue from this certificate")]
    Issuer {
        /// The certificate file.
        path: PathBuf,
        /// rcgen's report.
        #[source]
        source: rcgen::Error,
    },
}

// === impl UpstreamFiles ===

impl UpstreamFiles {
    /// Reads both files (through symlinks, as Secret volumes need); the key
    /// file must be readable by its owner only.
    pub fn read(cert_path: &Path, key_path: &Path) -> Result<Self, UpstreamError> {
        let cert = key_store::read_mounted(cert_path).map_err(UpstreamError::Read)?;
        let key = key_store::read_mounted_secret(key_path).map_err(|e| match e {
            KeyStoreError::Permissive { path, mode } => {
                UpstreamError::KeyReadableByOthers { path, mode }
            }
            other => UpstreamError::Read(other),
        })?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            cert,
            key,
        })
    }

    /// The digest of both files' contents.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut context = digest::Context::new(&digest::SHA256);
        // The length first, so moving bytes between the files changes it.
        context.update(&(self.cert.len() as u64).to_be_bytes());
        context.update(&self.cert);
        context.update(&self.key);
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        Fingerprint(out)
    }
}

impl fmt::Debug for UpstreamFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamFiles")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

// === impl Upstream ===

impl Upstream {
    /// Reads and checks the upstream CA for `trust_domain` at `now`.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<Self, UpstreamError> {
        Self::from_files(
            &UpstreamFiles::read(cert_path, key_path)?,
            trust_domain,
            now,
        )
    }

    /// Checks the files: the key is P-256 and belongs to the first
    /// certificate; that certificate is a CA allowed to sign one more CA
    /// (`cA`, `keyCertSign`, no `pathLenConstraint` of 0), valid at `now`, of
    /// `trust_domain` (a SPIFFE URI SAN, if any, is `spiffe://<trust_domain>`);
    /// each further certificate is a CA that signed the one before it, valid
    /// at `now`; the anchor (the last one) has a P-256 key.
    pub fn from_files(
        files: &UpstreamFiles,
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<Self, UpstreamError> {
        let cert_path = &files.cert_path;
        let refused = |problem: String| UpstreamError::Refused {
            path: cert_path.clone(),
            problem,
        };
        let chain = certificates(cert_path, &files.cert)?;
        let key = private_key(&files.key_path, &files.key)?;

        let parsed = chain
            .iter()
            .enumerate()
            .map(|(index, der)| parse(cert_path, index, der))
            .collect::<Result<Vec<_>, _>>()?;
        let upstream = &parsed[0];
        if upstream.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(UpstreamError::KeyMismatch {
                key_path: files.key_path.clone(),
                cert_path: cert_path.clone(),
            });
        }

        for (index, cert) in parsed.iter().enumerate() {
            let name = describe(index, cert);
            // Certificate `index` has `index` CAs of the file below it, plus
            // the agent's own intermediate.
            check_ca(&name, cert, index as u32 + 1).map_err(refused)?;
            let not_before = to_system_time(cert.validity().not_before.timestamp());
            let not_after = to_system_time(cert.validity().not_after.timestamp());
            if now < not_before {
                return Err(refused(format!(
                    "{name} is not valid before {}",
                    humantime::format_rfc3339_seconds(not_before)
                )));
            }
            if now >= not_after {
                return Err(refused(format!(
                    "{name} expired at {}",
                    humantime::format_rfc3339_seconds(not_after)
                )));
            }
        }
        let key_usage = upstream
            .key_usage()
            .map_err(|e| refused(format!("{}: keyUsage: {e}", describe(0, upstream))))?;
        if !key_usage.is_some_and(|ku| ku.value.key_cert_sign()) {
            return Err(refused(format!(
                "{} does not assert keyUsage keyCertSign: it may not sign certificates",
                describe(0, upstream)
            )));
        }
        check_trust_domain(upstream, trust_domain).map_err(refused)?;

        for (index, pair) in parsed.windows(2).enumerate() {
            let (child, parent) = (&pair[0], &pair[1]);
            let signed = child.issuer().as_raw() == parent.subject().as_raw()
                && child.verify_signature(Some(parent.public_key())).is_ok();
            if !signed {
                return Err(refused(format!(
                    "{} is not issued by the certificate after it ({}); list the upstream CA first, then each issuer up to the root",
                    describe(index, child),
                    describe(index + 1, parent)
                )));
            }
        }
        let anchor_index = parsed.len() - 1;
        let anchor = &parsed[anchor_index];
        if !is_p256(anchor) {
            return Err(refused(format!(
                "{} is the trust anchor tether publishes; its key must be EC P-256 (the only X.509 authority key the SPIFFE bundle document encodes today)",
                describe(anchor_index, anchor)
            )));
        }

        let not_before = to_system_time(upstream.validity().not_before.timestamp());
        let not_after = parsed
            .iter()
            .map(|c| to_system_time(c.validity().not_after.timestamp()))
            .min()
            .unwrap_or(not_before);
        let subject = upstream.subject().to_string();
        let serial = upstream.raw_serial_as_string();
        drop(parsed);
        let issuer =
            Issuer::from_ca_cert_der(&chain[0].as_slice().into(), key).map_err(|source| {
                UpstreamError::Issuer {
                    path: cert_path.clone(),
                    source,
                }
            })?;
        Ok(Self {
            cert_path: cert_path.clone(),
            chain,
            issuer,
            not_before,
            not_after,
            subject,
            serial,
            fingerprint: files.fingerprint(),
        })
    }

    /// The certificate file's certificates, DER: the upstream CA first, the
    /// trust anchor last.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The upstream CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.chain[0]
    }

    /// The upstream CA as an rcgen issuer.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Start of the upstream CA's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The earliest expiry in the chain: intermediates are capped at it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The certificate file, for messages.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The upstream CA's subject, for logs.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The upstream CA's serial (hex, colon-separated), for logs.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The digest of the files it was read from.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("cert_path", &self.cert_path)
            .field("subject", &self.subject)
            .field("serial", &self.serial)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish_non_exhaustive()
    }
}

/// The `CERTIFICATE` blocks of the certificate file, in order.
fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, UpstreamError> {
    let blocks = pem::parse_many(bytes).map_err(|source| UpstreamError::Pem {
        path: path.to_owned(),
        source,
    })?;
    let refused = |problem: String| UpstreamError::Refused {
        path: path.to_owned(),
        problem,
    };
    let mut chain = Vec::with_capacity(blocks.len());
    for block in blocks {
        match block.tag() {
            "CERTIFICATE" => chain.push(block.into_contents()),
            tag if tag.contains("PRIVATE KEY") => {
                // The certificate file is read as public: a key in it is
                // exposed, and its mode is never checked.
                return Err(refused(
                    "holds a private key; keep the key in key_path only (mode 0400)".into(),
                ));
            }
            tag => {
                return Err(refused(format!(
                    "holds a {tag} block; it must hold CERTIFICATE blocks only"
                )));
            }
        }
    }
    if chain.is_empty() {
        return Err(refused("holds no CERTIFICATE block".into()));
    }
    if chain.len() > MAX_CHAIN_LEN {
        return Err(refused(format!(
            "holds {} certificates; at most {MAX_CHAIN_LEN} are accepted",
            chain.len()
        )));
    }
    Ok(chain)
}

/// The one private key of the key file: PKCS#8 or SEC1, P-256.
fn private_key(path: &Path, bytes: &[u8]) -> Result<KeyPair, UpstreamError> {
    let unsupported = |found: &str| UpstreamError::UnsupportedKey {
        path: path.to_owned(),
        found: found.to_owned(),
    };
    let blocks = pem::parse_many(bytes).map_err(|source| UpstreamError::Pem {
        path: path.to_owned(),
        source,
    })?;
    let mut keys = Vec::with_capacity(1);
    for block in blocks {
        match block.tag() {
            // `openssl ecparam -genkey` writes the curve before the key.
            "EC PARAMETERS" => {}
            "PRIVATE KEY" | "EC PRIVATE KEY" => keys.push(Zeroizing::new(block.into_contents())),
            "ENCRYPTED PRIVATE KEY" => {
                return Err(unsupported(
                    "an encrypted key (decrypt it with `openssl pkey -in <file> -out <file>`)",
                ));
            }
            "RSA PRIVATE KEY" => return Err(unsupported("an RSA key")),
            tag => return Err(unsupported(&format!("a {tag} block"))),
        }
    }
    let [der] = keys.as_slice() else {
        return Err(UpstreamError::KeyCount {
            path: path.to_owned(),
            count: keys.len(),
        });
    };
    let key = KeyPair::try_from(der.as_slice()).map_err(|source| UpstreamError::Key {
        path: path.to_owned(),
        source,
    })?;
    if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
        let found = if key.is_compatible(&rcgen::PKCS_ECDSA_P384_SHA384) {
            "an EC P-384 key"
        } else if key.is_compatible(&rcgen::PKCS_ED25519) {
            "an Ed25519 key"
        } else if key.is_compatible(&rcgen::PKCS_RSA_SHA256) {
            "an RSA key"
        } else {
            "a key of another type (P-521?)"
        };
        return Err(unsupported(found));
    }
    Ok(key)
}

fn parse<'a>(
    path: &Path,
    index: usize,
    der: &'a [u8],
) -> Result<X509Certificate<'a>, UpstreamError> {
    let error = |source| UpstreamError::Certificate {
        path: path.to_owned(),
        index,
        source,
    };
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(error(X509Error::InvalidCertificate)),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => Err(error(e)),
        Err(x509_parser::nom::Err::Incomplete(_)) => Err(error(X509Error::InvalidCertificate)),
    }
}

/// "the upstream CA (CN=...)" or "certificate 2 (CN=...)", for messages.
fn describe(index: usize, cert: &X509Certificate<'_>) -> String {
    if index == 0 {
        format!("the upstream CA ({})", cert.subject())
    } else {
        format!("certificate {index} ({})", cert.subject())
    }
}

/// `cert` is a CA that may have `cas_below` CA certificates below it.
fn check_ca(name: &str, cert: &X509Certificate<'_>, cas_below: u32) -> Result<(), String> {
    let constraints = cert
        .basic_constraints()
        .map_err(|e| format!("{name}: basicConstraints: {e}"))?;
    let Some(constraints) = constraints.filter(|bc| bc.value.ca) else {
        return Err(format!(
            "{name} is not a CA certificate (basicConstraints cA is not set)"
        ));
    };
    match constraints.value.path_len_constraint {
        Some(len) if len < cas_below => Err(format!(
            "{name} has pathLenConstraint {len}, but {cas_below} CA certificate(s) must chain below it (each agent signs through its own intermediate CA); issue it with a larger pathlen or none"
        )),
        _ => Ok(()),
    }
}

/// A SPIFFE URI SAN on the upstream CA, if any, names this trust domain
/// and nothing more.
fn check_trust_domain(
    cert: &X509Certificate<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?;
    let Some(san) = san else {
        return Ok(());
    };
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        if !uri
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:"))
        {
            continue;
        }
        let ok = SpiffeId::new(uri)
            .is_ok_and(|id| id.is_member_of(trust_domain) && id.path().is_empty());
        if !ok {
            return Err(format!(
                "the upstream CA carries the URI SAN {uri:?}; for trust domain {trust_domain} it must be {:?} (no path) or no SPIFFE URI at all",
                trust_domain.id_string()
            ));
        }
    }
    Ok(())
}

fn is_p256(cert: &X509Certificate<'_>) -> bool {
    let algorithm = &cert.public_key().algorithm;
    algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == x509_parser::oid_registry::OID_EC_P256)
}

#[cfg(test)]
mod tests;
