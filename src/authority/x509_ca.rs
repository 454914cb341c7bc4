//! X.509 signing authorities: a CA certificate and its key, and leaf signing.
//!
//! A CA is either a self-signed root (`kind = "self_signed"`) or the agent's
//! own intermediate under an upstream CA (`kind = "disk"`). Either way the
//! CA knows the certificates above it up to the trust anchor, so it can hand
//! out whole chains and say which anchor the bundle must hold for it.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use spiffe::TrustDomain;
use x509_parser::prelude::FromDer;

use super::AuthorityError;
use super::rotation::Lifetime;
use super::upstream::{Upstream, UpstreamError};

/// Certificates are backdated by this much, so a verifier whose clock is a
/// little behind ours does not see them as not yet valid.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// A CA that signs X.509-SVIDs.
pub struct X509Authority {
    id: String,
    cert_der: Vec<u8>,
    /// The certificates above this CA, DER, from its issuer up to the trust
    /// anchor; empty for a self-signed root.
    upstream_chain: Vec<Vec<u8>>,
    lifetime: Lifetime,
    issuer: Issuer<'static, KeyPair>,
}

/// What a leaf certificate should say; the authority adds validity and
/// issuer fields.
#[derive(Debug, Clone)]
pub struct LeafTemplate {
    /// The single URI SAN.
    pub uri: String,
    /// DNS SANs (the first also becomes the subject CN).
    pub dns_names: Vec<String>,
    /// Requested lifetime, capped at the CA's own expiry.
    pub ttl: Duration,
}

/// A signed leaf certificate.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// The leaf followed by any intermediates, DER.
    pub chain: Vec<Vec<u8>>,
    /// Serial number, big-endian bytes.
    pub serial: Vec<u8>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

// === impl X509Authority ===

impl X509Authority {
    /// Generates a self-signed P-256 root for `trust_domain`.
    pub fn generate_self_signed(
        trust_domain: &TrustDomain,
        now: SystemTime,
        ttl: Duration,
        activates_at: SystemTime,
    ) -> Result<(Self, KeyPairDer), AuthorityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Rcgen)?;
        let id = super::random_id()?;
        let params = ca_params(
            trust_domain,
            format!("tether CA {id}"),
            now - BACKDATE,
            now + ttl,
        )?;
        let cert = params.self_signed(&key).map_err(AuthorityError::Rcgen)?;
        let der = KeyPairDer(zeroize::Zeroizing::new(key.serialize_der()));
        let authority =
            Self::from_parts(id, cert.der().to_vec(), Vec::new(), key, now, activates_at)?;
        Ok((authority, der))
    }

    /// Generates this agent's own P-256 intermediate under `upstream`. Its
    /// life is `ttl`, cut short at the upstream chain's earliest expiry.
    pub fn generate_intermediate(
        trust_domain: &TrustDomain,
        upstream: &Upstream,
        now: SystemTime,
        ttl: Duration,
        activates_at: SystemTime,
    ) -> Result<(Self, KeyPairDer), AuthorityError> {
        let refused = |problem: String| {
            AuthorityError::Upstream(UpstreamError::Refused {
                path: upstream.cert_path().to_owned(),
                problem,
            })
        };
        let not_after = (now + ttl).min(upstream.not_after());
        if not_after <= now {
            return Err(refused(format!(
                "the upstream chain expired at {}; mount a renewed upstream CA",
                humantime::format_rfc3339_seconds(upstream.not_after())
            )));
        }
        if not_after < now + ttl {
            tracing::warn!(
                upstream_not_after = %humantime::format_rfc3339_seconds(upstream.not_after()),
                "the upstream CA expires before authority.ca_ttl is over: the new intermediate is cut short there; renew the upstream CA"
            );
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Rcgen)?;
        let id = super::random_id()?;
        // Not before the upstream CA itself: a validator may insist on nesting.
        let not_before = (now - BACKDATE).max(upstream.not_before());
        let mut params = ca_params(
            trust_domain,
            format!("tether intermediate CA {id}"),
            not_before,
            not_after,
        )?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, upstream.issuer())
            .map_err(AuthorityError::Rcgen)?;
        // rcgen rebuilds the issuer name from the upstream's subject; a name
        // it cannot reproduce byte for byte would make a chain no validator
        // follows. Refuse rather than hand such chains out.
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.der())
            .map_err(|e| refused(format!("the intermediate just issued does not parse: {e}")))?;
        let (_, up) = x509_parser::certificate::X509Certificate::from_der(upstream.cert_der())
            .map_err(|e| refused(format!("certificate 0: {e}")))?;
        if parsed.issuer().as_raw() != up.subject().as_raw() {
            return Err(refused(format!(
                "the upstream CA's subject ({}) cannot be copied exactly into the intermediate's issuer name (multi-valued or repeated attributes?); use an upstream CA with a simple subject",
                up.subject()
            )));
        }
        let der = KeyPairDer(zeroize::Zeroizing::new(key.serialize_der()));
        let authority = Self::from_parts(
            id,
            cert.der().to_vec(),
            upstream.chain().to_vec(),
            key,
            now,
            activates_at,
        )?;
        Ok((authority, der))
    }

    /// Rebuilds an authority from its stored certificate, the chain above
    /// it and its key, checking that the key belongs to the certificate and
    /// that the chain's first certificate signed it. `issued_at` starts the
    /// rotation schedule (the certificate's own `notBefore` is backdated by
    /// [`BACKDATE`]).
    pub fn from_parts(
        id: String,
        cert_der: Vec<u8>,
        upstream_chain: Vec<Vec<u8>>,
        key: KeyPair,
        issued_at: SystemTime,
        activates_at: SystemTime,
    ) -> Result<Self, AuthorityError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
            .map_err(|e| AuthorityError::Corrupt(format!("CA {id}: certificate: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(AuthorityError::Corrupt(format!(
                "CA {id}: the key file does not belong to the certificate"
            )));
        }
        if let Some(issuer_der) = upstream_chain.first() {
            let (_, issuer) = x509_parser::certificate::X509Certificate::from_der(issuer_der)
                .map_err(|e| {
                    AuthorityError::Corrupt(format!("CA {id}: upstream certificate: {e}"))
                })?;
            if cert.verify_signature(Some(issuer.public_key())).is_err() {
                return Err(AuthorityError::Corrupt(format!(
                    "CA {id}: not signed by the upstream CA recorded with it"
                )));
            }
        }
        let not_after = to_system_time(cert.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(AuthorityError::Rcgen)?;
        Ok(Self {
            id,
            cert_der,
            upstream_chain,
            lifetime: Lifetime {
                not_before: issued_at,
                not_after,
                activates_at,
            },
            issuer,
        })
    }

    /// Signs a leaf for `public_key` (the workload's fresh key).
    pub fn sign_leaf(
        &self,
        template: &LeafTemplate,
        public_key: &impl PublicKeyData,
        now: SystemTime,
    ) -> Result<SignedLeaf, AuthorityError> {
        let not_before = now - BACKDATE;
        let not_after = (now + template.ttl).min(self.lifetime.not_after);
        let serial = super::random_serial()?;
        let mut params = CertificateParams::default();
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial.clone());
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "tether");
        if let Some(first) = template.dns_names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut sans = Vec::with_capacity(1 + template.dns_names.len());
        sans.push(SanType::URI(
            template
                .uri
                .clone()
                .try_into()
                .map_err(AuthorityError::Rcgen)?,
        ));
        for name in &template.dns_names {
            sans.push(SanType::DnsName(
                name.clone().try_into().map_err(AuthorityError::Rcgen)?,
            ));
        }
        params.subject_alt_names = sans;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(AuthorityError::Rcgen)?;
        // Leaf, then every certificate a verifier needs between it and the
        // anchor in its bundle: none under a self-signed root; this
        // intermediate and the upstream's own intermediates otherwise.
        let mut chain = Vec::with_capacity(1 + self.upstream_chain.len());
        chain.push(cert.der().to_vec());
        if let Some((_anchor, between)) = self.upstream_chain.split_last() {
            chain.push(self.cert_der.clone());
            chain.extend(between.iter().cloned());
        }
        Ok(SignedLeaf {
            chain,
            serial: serial.to_bytes(),
            not_before,
            not_after,
        })
    }

    /// Signs a CRL listing `revoked` (serial bytes, revocation time) issued
    /// by this CA, valid from `now` until `next_update`.
    pub fn sign_crl(
        &self,
        revoked: &[(Vec<u8>, SystemTime)],
        crl_number: u64,
        now: SystemTime,
        next_update: SystemTime,
    ) -> Result<Vec<u8>, AuthorityError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: (now - BACKDATE).into(),
            next_update: next_update.into(),
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, at)| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: (*at).into(),
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(AuthorityError::Rcgen)?;
        Ok(crl.der().to_vec())
    }

    /// Identifier (also the key file name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The certificates above this CA up to the trust anchor (empty for a
    /// self-signed root), DER.
    pub fn upstream_chain(&self) -> &[Vec<u8>] {
        &self.upstream_chain
    }

    /// The trust anchor this CA chains to: what the bundle must hold for
    /// everything it signs.
    pub fn anchor_der(&self) -> &[u8] {
        self.upstream_chain.last().unwrap_or(&self.cert_der)
    }

    /// Validity and activation.
    pub fn lifetime(&self) -> Lifetime {
        self.lifetime
    }
}

/// The parameters every tether CA shares: P-256, `cA` with pathLen 0 (it
/// signs leaves only), keyCertSign and cRLSign, the trust domain's SPIFFE ID
/// (no path) as its one URI SAN.
fn ca_params(
    trust_domain: &TrustDomain,
    common_name: String,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, AuthorityError> {
    let mut params = CertificateParams::default();
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(super::random_serial()?);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tether");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let uri = trust_domain.id_string();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(AuthorityError::Rcgen)?)];
    Ok(params)
}

impl fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Authority")
            .field("id", &self.id)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// A PKCS#8 private key on its way to disk; zeroed when dropped.
pub struct KeyPairDer(pub zeroize::Zeroizing<Vec<u8>>);

impl fmt::Debug for KeyPairDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPairDer(<redacted>)")
    }
}

/// Seconds since the epoch to `SystemTime` (clamped at the epoch).
pub fn to_system_time(unix_seconds: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_seconds).unwrap_or(0))
}

impl SignedLeaf {
    /// The serial as lowercase hex, as logs and `svid list` show it.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}
