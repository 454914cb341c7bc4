//! Which peer certificates are accepted: chained to the current bundle by
//! webpki, named by exactly one SPIFFE ID of the trust domain, and (for the
//! server, as the agent sees it) the expected ID. Handshake signatures are
//! rustls' own checks with the aws-lc-rs provider's algorithms.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffe::SpiffeId;
use tokio::sync::watch;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    self, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

use super::MtlsError;
use crate::bundle::TrustBundle;

/// Most intermediates a peer may send: tether's chains have at most the
/// agent's own intermediate and an upstream's few.
pub(super) const MAX_INTERMEDIATES: usize = 8;

/// What the services need to know of a verified leaf.
#[derive(Debug, Clone)]
pub(super) struct LeafFacts {
    /// The one URI SAN, a SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The serial, lowercase hex of its big-endian bytes.
    pub serial_hex: String,
    /// When it starts to be valid.
    pub not_before: SystemTime,
    /// When it expires.
    pub not_after: SystemTime,
}

/// Client certificates, as the server checks them: optional; when sent,
/// chained to the current bundle for client auth and naming a SPIFFE ID of
/// its trust domain.
#[derive(Debug)]
pub(super) struct ClientSvidVerifier {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    provider: Arc<CryptoProvider>,
    /// Whether a client without a certificate is refused at the handshake.
    mandatory: bool,
}

/// The server's certificate, as the agent checks it: chained to the
/// current bundle for server auth and naming `expected`. The TLS server
/// name is not looked at.
#[derive(Debug)]
pub(super) struct ServerSvidVerifier {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

/// `server.insecure_bootstrap`: any server certificate is accepted, whoever
/// signed it and whatever it names. The handshake signature is still
/// checked, so the session is with whoever holds that certificate's key;
/// nothing says who that is.
#[derive(Debug)]
pub(super) struct InsecureAnyServer {
    provider: Arc<CryptoProvider>,
}

/// The facts of a leaf certificate: its one SPIFFE ID, serial and expiry.
pub(super) fn leaf_facts(der: &[u8]) -> Result<LeafFacts, MtlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(MtlsError::MalformedCertificate)?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(MtlsError::MalformedSan)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(MtlsError::UriSanCount(uris.len()));
    };
    let spiffe_id = SpiffeId::new(uri).map_err(MtlsError::NotSpiffeId)?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    let not_before = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_before.timestamp()).unwrap_or(0));
    Ok(LeafFacts {
        spiffe_id,
        serial_hex: serial_hex(cert.raw_serial()),
        not_before,
        not_after,
    })
}

/// A DER INTEGER's content bytes as lowercase hex, without the sign byte
/// DER adds before a high bit (so the bytes the issuer chose, as
/// `authority::SignedX509Svid::serial_hex` prints them).
pub(super) fn serial_hex(raw: &[u8]) -> String {
    let bytes = match raw {
        [0, next, ..] if *next >= 0x80 => &raw[1..],
        _ => raw,
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Chains `end_entity` to the current bundle for `usage`, and returns its
/// SPIFFE ID when that is in the bundle's trust domain.
fn verify_svid(
    bundle: &watch::Receiver<Arc<TrustBundle>>,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(refused(MtlsError::TooManyIntermediates(
            intermediates.len(),
        )));
    }
    // The bundle of this handshake: a rotation after this line is seen by
    // the next one.
    let bundle = Arc::clone(&bundle.borrow());
    let authorities: Vec<CertificateDer<'_>> = bundle
        .x509_authorities()
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let anchors: Vec<_> = authorities
        .iter()
        .filter_map(|der| match webpki::anchor_from_trusted_cert(der) {
            Ok(anchor) => Some(anchor),
            Err(error) => {
                tracing::debug!(%error, "an X.509 authority of the bundle is unusable as a trust anchor");
                None
            }
        })
        .collect();
    if anchors.is_empty() {
        return Err(refused(MtlsError::NoTrustAnchors(
            bundle.trust_domain().clone(),
        )));
    }
    let leaf = EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    let facts = leaf_facts(end_entity).map_err(refused)?;
    if !facts.spiffe_id.is_member_of(bundle.trust_domain()) {
        return Err(refused(MtlsError::ForeignTrustDomain {
            id: facts.spiffe_id,
            trust_domain: bundle.trust_domain().clone(),
        }));
    }
    Ok(facts.spiffe_id)
}

/// A refusal of ours, as rustls carries it (the cause kept for the logs).
fn refused(error: MtlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// webpki's verdict as rustls' certificate error (so the TLS alert says
/// what kind of failure it was).
fn webpki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let kind = match error {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(kind)
}

// === impl ClientSvidVerifier ===

impl ClientSvidVerifier {
    /// Verifies client certificates against `bundle`; `mandatory`: a
    /// client without one fails the handshake.
    pub(super) fn new(
        bundle: watch::Receiver<Arc<TrustBundle>>,
        provider: Arc<CryptoProvider>,
        mandatory: bool,
    ) -> Self {
        Self {
            bundle,
            provider,
            mandatory,
        }
    }
}

impl ClientCertVerifier for ClientSvidVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // The node API: AttestNode comes without a certificate, and the
        // services refuse every other call without one.
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_svid(
            &self.bundle,
            &self.provider,
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

// === impl ServerSvidVerifier ===

impl ServerSvidVerifier {
    pub(super) fn new(
        bundle: watch::Receiver<Arc<TrustBundle>>,
        expected: SpiffeId,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            bundle,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for ServerSvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = verify_svid(
            &self.bundle,
            &self.provider,
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
        )?;
        if id != self.expected {
            return Err(refused(MtlsError::UnexpectedServer {
                id,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

// === impl InsecureAnyServer ===

impl InsecureAnyServer {
    pub(super) fn new(provider: Arc<CryptoProvider>) -> Self {
        Self { provider }
    }
}

impl ServerCertVerifier for InsecureAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

fn tls12_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn schemes(provider: &CryptoProvider) -> Vec<SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}
