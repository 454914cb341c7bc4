//! SPIFFE mutual TLS between fleet agents and `tether server`, over TCP.
//!
//! Owns the TLS half of the node API: the SVID a process presents
//! ([`Identity`], swapped in place on renewal through
//! [`SwappableIdentity`]), the verifiers that decide which peers are
//! accepted, the server's accept stream ([`incoming`], yielding
//! [`TlsConn`]s that tell tonic the peer's [`PeerSvid`]) and the agent's
//! dialler ([`connect`]). gRPC runs above it unchanged (tonic without its
//! TLS features: TLS is below the connection).
//!
//! Invariants:
//! - Peers are named by SPIFFE ID, never by host name: a certificate is
//!   accepted when it chains (webpki, at handshake time) to an X.509
//!   authority of the trust domain's **current** bundle, read from the
//!   bundle watch at every handshake, and its leaf carries exactly one URI
//!   SAN, a SPIFFE ID of that trust domain. The TLS server name is ignored.
//! - Every handshake is verified in full: session resumption is off on
//!   both sides, so a rotated bundle or an evicted node is seen by the
//!   next connection. A connection keeps the certificate it was opened
//!   with; [`PeerSvid::not_after`] is there for the services to check per
//!   call.
//! - No crypto or X.509 parsing here: chains by `rustls-webpki`, handshake
//!   signatures by rustls on aws-lc-rs, names by `x509-parser`.
//! - One slow or silent client never blocks the accept loop: each
//!   handshake runs in its own job, under a timeout, and at most
//!   [`HandshakeLimits::max_in_flight`] run at once.

use std::sync::Arc;

use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig, ServerConfig};

use crate::bundle::TrustBundle;

mod connect;
mod identity;
mod listener;
mod verify;

#[cfg(test)]
mod tests;

pub use connect::connect;
pub use identity::{Identity, SwappableIdentity};
pub use listener::{HandshakeLimits, PeerSvid, TlsConn, incoming, peer_svid};

/// The ALPN protocol both sides offer: gRPC is HTTP/2.
const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol of the HTTPS listeners ([`https_server_config`]).
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What failed in the fleet's mutual TLS.
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    /// An SVID was handed over without a certificate.
    #[error("the SVID has no certificate")]
    EmptyChain,
    /// The SVID's private key is not a PKCS#8 key the provider can use.
    #[error("the SVID's private key is unusable")]
    Key(#[source] rustls::Error),
    /// The SVID's private key is not the one its leaf certifies.
    #[error("the SVID's private key does not match its certificate")]
    KeyMismatch(#[source] rustls::Error),
    /// A certificate is not X.509 DER.
    #[error("the certificate is not valid X.509")]
    MalformedCertificate(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// A certificate's subjectAltName extension cannot be read.
    #[error("the certificate's subjectAltName cannot be read")]
    MalformedSan(#[source] x509_parser::error::X509Error),
    /// A leaf without exactly one URI SAN.
    #[error("the certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    /// A leaf whose URI SAN is not a SPIFFE ID.
    #[error("the certificate's URI SAN is not a SPIFFE ID")]
    NotSpiffeId(#[source] SpiffeIdError),
    /// A leaf whose SPIFFE ID is in another trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The certificate's ID.
        id: SpiffeId,
        /// The bundle's trust domain.
        trust_domain: TrustDomain,
    },
    /// The server presented an SVID for another identity.
    #[error("the server presented {id}, not {expected}")]
    UnexpectedServer {
        /// The ID in the server's certificate.
        id: SpiffeId,
        /// The ID the agent expects of its server.
        expected: SpiffeId,
    },
    /// The current bundle has no X.509 authority webpki can use.
    #[error("the bundle of {0} has no usable X.509 authority")]
    NoTrustAnchors(TrustDomain),
    /// A peer sent more intermediates than any tether chain has.
    #[error("the peer sent {0} intermediate certificates; at most {max} are accepted", max = verify::MAX_INTERMEDIATES)]
    TooManyIntermediates(usize),
    /// [`connect`] was given no address.
    #[error("no server address to dial")]
    NoAddresses,
    /// A server address could not be resolved.
    #[error("could not resolve server address {address}")]
    Resolve {
        /// The address as configured (`host:port`).
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A server address resolved to no socket address.
    #[error("server address {0} resolves to nothing")]
    NoRecords(String),
    /// The TCP connection to a server address failed.
    #[error("could not connect to {address}")]
    Dial {
        /// The socket address dialled.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake with a server failed (its certificate refused,
    /// ours refused, or the connection lost).
    #[error("TLS handshake with {address} failed")]
    Handshake {
        /// The socket address dialled.
        address: std::net::SocketAddr,
        /// Why (rustls' error, wrapped by tokio-rustls).
        #[source]
        source: std::io::Error,
    },
    /// Connecting and the handshake took longer than the connect timeout.
    #[error("no TLS connection to {address} within {timeout:?}")]
    Timeout {
        /// The socket address dialled.
        address: std::net::SocketAddr,
        /// The connect timeout.
        timeout: std::time::Duration,
    },
    /// tonic could not open its channel over the connection.
    #[error("could not open a gRPC channel to the server")]
    Channel(#[source] tonic::transport::Error),
}

/// The server's TLS configuration: TLS 1.3, ALPN `h2`, this process's SVID
/// from `identity` (read at each handshake), and client certificates
/// optional but verified when presented ([`PeerSvid::spiffe_id`] is `None`
/// without one: a node's first call, AttestNode, has none; the services
/// refuse every other call without one).
pub fn server_config(
    bundle: watch::Receiver<Arc<TrustBundle>>,
    identity: SwappableIdentity,
) -> Arc<ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(verify::ClientSvidVerifier::new(
        bundle,
        Arc::clone(&provider),
        false,
    ));
    #[expect(
        clippy::expect_used,
        reason = "an invariant of the code: aws-lc-rs's default provider supports TLS 1.3 (a unit test builds this)"
    )]
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs's default provider supports TLS 1.3");
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(identity));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection is verified against the bundle of
    // its time, and a resumed session would skip that.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The agent's TLS configuration: TLS 1.3, ALPN `h2`, the server accepted
/// when its SVID chains to the current bundle and names `server_id`, and
/// `identity` presented as the client certificate (none before the node is
/// attested).
///
/// **`insecure`** (`server.insecure_bootstrap = true`, the operator's
/// explicit choice) accepts *any* server certificate, whoever signed it and
/// whatever it names: only the handshake signature is checked, so the
/// session is with whoever holds that certificate's key, which may be an
/// attacker on the path. It exists only for a node's very first contact
/// when the operator has no bundle to hand it; never use it once the node
/// has a bundle.
pub fn client_config(
    bundle: watch::Receiver<Arc<TrustBundle>>,
    server_id: SpiffeId,
    identity: Option<SwappableIdentity>,
    insecure: bool,
) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = if insecure {
        Arc::new(verify::InsecureAnyServer::new(Arc::clone(&provider)))
    } else {
        Arc::new(verify::ServerSvidVerifier::new(
            bundle,
            server_id,
            Arc::clone(&provider),
        ))
    };
    #[expect(
        clippy::expect_used,
        reason = "an invariant of the code: aws-lc-rs's default provider supports TLS 1.3 (a unit test builds this)"
    )]
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs's default provider supports TLS 1.3");
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(Arc::new(identity)),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    // The name sent would be a placeholder: the server is known by its
    // SPIFFE ID, not by a host name.
    config.enable_sni = false;
    Arc::new(config)
}

/// Whether an HTTPS listener ([`https_server_config`]) asks its clients
/// for an X.509-SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate is asked for (the `https_spiffe` bundle
    /// endpoint: anyone may fetch the bundle).
    None,
    /// Every client must present an X.509-SVID chaining to the trust
    /// domain's current bundle, with one SPIFFE ID of that trust domain;
    /// one without fails the handshake (introspection).
    Required,
}

/// An HTTPS listener's TLS configuration with this process's SVID
/// (`identity`, read at each handshake): TLS 1.3, ALPN `http/1.1`, no
/// session resumption, and client certificates as `client_auth` says,
/// verified against `bundle` as it is at each handshake. The peer chain
/// then reaches the routes (`web::WebRequest::peer_certificates`), named by
/// [`leaf_spiffe_id`].
pub fn https_server_config(
    bundle: watch::Receiver<Arc<TrustBundle>>,
    identity: SwappableIdentity,
    client_auth: ClientAuth,
) -> Arc<ServerConfig> {
    let provider = provider();
    #[expect(
        clippy::expect_used,
        reason = "an invariant of the code: aws-lc-rs's default provider supports TLS 1.3 (a unit test builds this)"
    )]
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs's default provider supports TLS 1.3");
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required => builder.with_client_cert_verifier(Arc::new(
            verify::ClientSvidVerifier::new(bundle, provider, true),
        )),
    };
    let mut config = builder.with_cert_resolver(Arc::new(identity));
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The SPIFFE ID of a peer chain's leaf (the first certificate), as a
/// verifier here accepted it.
pub fn leaf_spiffe_id(chain: &[CertificateDer<'_>]) -> Result<SpiffeId, MtlsError> {
    let leaf = chain.first().ok_or(MtlsError::EmptyChain)?;
    Ok(verify::leaf_facts(leaf)?.spiffe_id)
}

/// The one crypto provider (aws-lc-rs), as every config here uses it.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}
