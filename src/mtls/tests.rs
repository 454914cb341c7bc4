//! Mutual TLS over real TCP loopback with a real tonic service (the node
//! API, answering with the caller's SPIFFE ID), certificates from rcgen.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use spiffe::{SpiffeId, TrustDomain};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::*;
use crate::proto::server::node_client::NodeClient;
use crate::proto::server::node_server::{Node, NodeServer};
use crate::proto::server::{
    AttestNodeRequest, AttestNodeResponse, EndTasksRequest, EndTasksResponse, NodeSvid,
    RenewNodeRequest, SignJwtRequest, SignJwtResponse, SignX509SvidsRequest, SignX509SvidsResponse,
    SyncMessage, SyncRequest,
};

const TD: &str = "example.org";
const SERVER_ID: &str = "spiffe://example.org/tether/server";
const NODE_ID: &str = "spiffe://example.org/tether/node/a";
const HOUR: Duration = Duration::from_secs(3600);
const TIMEOUT: Duration = Duration::from_secs(30);

/// A test CA of the trust domain (as `authority::x509_ca` makes them:
/// P-256, pathlen 0, the trust domain's ID as its URI SAN).
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
}

/// A leaf's serial counter, so each leaf's serial is known to the test.
static SERIAL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

impl Ca {
    fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::default();
        params.not_before = (SystemTime::now() - HOUR).into();
        params.not_after = (SystemTime::now() + 24 * HOUR).into();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().expect("URI"),
        )];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An X.509-SVID for `uris` (one, for a valid SVID), valid until
    /// `not_after`, and its serial as hex.
    fn leaf(
        &self,
        uris: &[&str],
        not_after: SystemTime,
    ) -> (Vec<Vec<u8>>, Zeroizing<Vec<u8>>, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
        // A high first byte: DER adds a sign byte, which the hex leaves out.
        let serial = [
            0x80 | SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            0x01,
            0x02,
        ];
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = (not_after.min(SystemTime::now()) - HOUR).into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("URI")))
            .collect();
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let hex = serial.iter().map(|b| format!("{b:02x}")).collect();
        (
            vec![cert.der().to_vec()],
            Zeroizing::new(key.serialize_der()),
            hex,
        )
    }

    fn identity(&self, id: &str) -> Identity {
        self.identity_until(id, SystemTime::now() + HOUR)
    }

    fn identity_until(&self, id: &str, not_after: SystemTime) -> Identity {
        let (chain, key, _) = self.leaf(&[id], not_after);
        Identity::new(chain, key).expect("identity")
    }
}

fn bundle(cas: &[&Ca], sequence: u64) -> Arc<TrustBundle> {
    Arc::new(TrustBundle::new(
        TrustDomain::new(TD).expect("trust domain"),
        cas.iter().map(|ca| ca.der.clone()).collect(),
        Vec::new(),
        sequence,
    ))
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).expect("SPIFFE ID")
}

/// The node API, answering AttestNode with the caller's SPIFFE ID (empty
/// without one) and keeping each caller's [`PeerSvid`].
#[derive(Default)]
struct Echo {
    seen: Arc<Mutex<Vec<PeerSvid>>>,
}

#[tonic::async_trait]
impl Node for Echo {
    async fn attest_node(
        &self,
        request: Request<AttestNodeRequest>,
    ) -> Result<Response<AttestNodeResponse>, Status> {
        let peer = peer_svid(&request)
            .ok_or_else(|| Status::internal("no peer"))?
            .clone();
        let node_name = peer
            .spiffe_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        self.seen.lock().expect("seen").push(peer);
        Ok(Response::new(AttestNodeResponse {
            node_name,
            ..Default::default()
        }))
    }

    async fn renew_node(
        &self,
        _request: Request<RenewNodeRequest>,
    ) -> Result<Response<NodeSvid>, Status> {
        Err(Status::unimplemented("test"))
    }

    type SyncStream = futures_util::stream::Empty<Result<SyncMessage, Status>>;

    async fn sync(
        &self,
        _request: Request<SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn sign_x509_svids(
        &self,
        _request: Request<SignX509SvidsRequest>,
    ) -> Result<Response<SignX509SvidsResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn sign_jwt(
        &self,
        _request: Request<SignJwtRequest>,
    ) -> Result<Response<SignJwtResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn end_tasks(
        &self,
        _request: Request<EndTasksRequest>,
    ) -> Result<Response<EndTasksResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
}

/// A server on loopback: its bundle watch, its identity slot and what its
/// service saw. Stopped when dropped.
struct TestServer {
    addr: SocketAddr,
    bundle: watch::Sender<Arc<TrustBundle>>,
    identity: SwappableIdentity,
    seen: Arc<Mutex<Vec<PeerSvid>>>,
    stop: CancellationToken,
}

impl TestServer {
    async fn start(bundle: Arc<TrustBundle>, identity: Identity) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (bundle, bundle_rx) = watch::channel(bundle);
        let identity = SwappableIdentity::new(identity);
        let config = server_config(bundle_rx, identity.clone());
        let limits = HandshakeLimits {
            timeout: Duration::from_secs(60),
            max_in_flight: 8,
        };
        let echo = Echo::default();
        let seen = Arc::clone(&echo.seen);
        let stop = CancellationToken::new();
        let serving = tonic::transport::Server::builder()
            .add_service(NodeServer::new(echo))
            .serve_with_incoming_shutdown(
                incoming(listener, config, limits),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(serving);
        Self {
            addr,
            bundle,
            identity,
            seen,
            stop,
        }
    }

    fn seen(&self) -> Vec<PeerSvid> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A client's view: its bundle and the identity it presents.
struct TestClient {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    identity: Option<SwappableIdentity>,
    insecure: bool,
}

impl TestClient {
    fn new(bundle: Arc<TrustBundle>, identity: Option<Identity>) -> Self {
        Self {
            bundle: watch::channel(bundle).1,
            identity: identity.map(SwappableIdentity::new),
            insecure: false,
        }
    }

    /// AttestNode against `server`: the SPIFFE ID the server saw, or why
    /// the connection or the call failed.
    async fn call(&self, server: &TestServer) -> Result<String, String> {
        let config = client_config(
            self.bundle.clone(),
            id(SERVER_ID),
            self.identity.clone(),
            self.insecure,
        );
        let channel = connect(&[server.addr.to_string()], config, TIMEOUT)
            .await
            .map_err(|e| crate::error::chain(&e))?;
        let answer = NodeClient::new(channel)
            .attest_node(AttestNodeRequest::default())
            .await
            .map_err(|status| format!("{status:?}"))?;
        Ok(answer.into_inner().node_name)
    }
}

#[tokio::test]
async fn a_node_svid_reaches_the_server_which_sees_its_id_and_serial() {
    let ca = Ca::new(TD);
    let server = TestServer::start(bundle(&[&ca], 1), ca.identity(SERVER_ID)).await;
    let (chain, key, serial) = ca.leaf(&[NODE_ID], SystemTime::now() + HOUR);
    let node = Identity::new(chain, key).expect("node identity");
    assert_eq!(node.spiffe_id(), &id(NODE_ID));
    let client = TestClient::new(bundle(&[&ca], 1), Some(node.clone()));

    assert_eq!(client.call(&server).await, Ok(NODE_ID.to_owned()));

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].spiffe_id, Some(id(NODE_ID)));
    assert_eq!(seen[0].serial_hex.as_deref(), Some(serial.as_str()));
    assert_eq!(seen[0].not_after, Some(node.not_after()));
    assert!(seen[0].remote_addr.ip().is_loopback());
}

#[tokio::test]
async fn a_client_without_a_certificate_connects_and_is_seen_as_none() {
    let ca = Ca::new(TD);
    let server = TestServer::start(bundle(&[&ca], 1), ca.identity(SERVER_ID)).await;
    let client = TestClient::new(bundle(&[&ca], 1), None);

    assert_eq!(client.call(&server).await, Ok(String::new()));

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].spiffe_id, None);
    assert_eq!(seen[0].serial_hex, None);
    assert_eq!(seen[0].not_after, None);
}

#[tokio::test]
async fn the_server_refuses_client_certificates_it_cannot_trust() {
    let ca = Ca::new(TD);
    let other_ca = Ca::new(TD);
    let foreign_ca = Ca::new("other.org");
    let server = TestServer::start(bundle(&[&ca, &foreign_ca], 1), ca.identity(SERVER_ID)).await;
    let refused = [
        ("another CA", other_ca.identity(NODE_ID)),
        // Chains to an authority of the bundle, but names another trust
        // domain.
        (
            "a foreign trust domain",
            foreign_ca.identity("spiffe://other.org/tether/node/a"),
        ),
        (
            "expired",
            ca.identity_until(NODE_ID, SystemTime::now() - HOUR),
        ),
    ];
    for (case, identity) in refused {
        let client = TestClient::new(bundle(&[&ca], 1), Some(identity));
        assert!(client.call(&server).await.is_err(), "{case}: accepted");
    }
    assert!(
        server.seen().is_empty(),
        "a refused client reached the service"
    );
}

#[tokio::test]
async fn the_client_refuses_a_server_with_another_id_another_ca_or_an_expired_svid() {
    let ca = Ca::new(TD);
    let other_ca = Ca::new(TD);
    let cases = [
        (
            "another ID",
            ca.identity("spiffe://example.org/tether/not-server"),
        ),
        ("another CA", other_ca.identity(SERVER_ID)),
        (
            "expired",
            ca.identity_until(SERVER_ID, SystemTime::now() - HOUR),
        ),
    ];
    for (case, server_identity) in cases {
        let server = TestServer::start(bundle(&[&ca, &other_ca], 1), server_identity).await;
        let client = TestClient::new(bundle(&[&ca], 1), Some(ca.identity(NODE_ID)));
        let error = client.call(&server).await.expect_err(case);
        assert!(error.starts_with("TLS handshake with"), "{case}: {error}");
        assert!(server.seen().is_empty(), "{case}");
    }
}

#[tokio::test]
async fn insecure_bootstrap_accepts_any_server_certificate() {
    let ca = Ca::new(TD);
    let unknown_ca = Ca::new(TD);
    let server = TestServer::start(
        bundle(&[&ca], 1),
        unknown_ca.identity("spiffe://example.org/whoever"),
    )
    .await;
    let mut client = TestClient::new(bundle(&[&ca], 1), None);
    assert!(client.call(&server).await.is_err(), "verified: refused");
    client.insecure = true;
    assert_eq!(client.call(&server).await, Ok(String::new()));
}

#[tokio::test]
async fn after_a_rotation_new_connections_use_and_accept_the_new_material() {
    let old_ca = Ca::new(TD);
    let new_ca = Ca::new(TD);
    let server = TestServer::start(bundle(&[&old_ca], 1), old_ca.identity(SERVER_ID)).await;
    let (client_bundle, client_bundle_rx) = watch::channel(bundle(&[&old_ca], 1));
    let node = SwappableIdentity::new(old_ca.identity(NODE_ID));
    let client = TestClient {
        bundle: client_bundle_rx,
        identity: Some(node.clone()),
        insecure: false,
    };
    assert_eq!(client.call(&server).await, Ok(NODE_ID.to_owned()));

    // Both sides move to the new CA: bundles first, then the SVIDs.
    server.bundle.send_replace(bundle(&[&new_ca], 2));
    client_bundle.send_replace(bundle(&[&new_ca], 2));
    server.identity.set(new_ca.identity(SERVER_ID));
    let (chain, key, new_serial) = new_ca.leaf(&[NODE_ID], SystemTime::now() + HOUR);
    node.set(Identity::new(chain, key).expect("new node identity"));

    assert_eq!(client.call(&server).await, Ok(NODE_ID.to_owned()));
    assert_eq!(
        server.seen().last().and_then(|p| p.serial_hex.clone()),
        Some(new_serial)
    );

    // The old material is trusted no more, by either side.
    let stale_node = TestClient::new(bundle(&[&new_ca], 2), Some(old_ca.identity(NODE_ID)));
    assert!(
        stale_node.call(&server).await.is_err(),
        "old node SVID accepted"
    );
    let stale_bundle = TestClient::new(bundle(&[&old_ca], 1), Some(new_ca.identity(NODE_ID)));
    assert!(
        stale_bundle.call(&server).await.is_err(),
        "new server SVID trusted under the old bundle"
    );
}

#[tokio::test]
async fn a_client_that_never_handshakes_does_not_block_another() {
    let ca = Ca::new(TD);
    let server = TestServer::start(bundle(&[&ca], 1), ca.identity(SERVER_ID)).await;
    // Connected, silent, and kept open for the whole test (the handshake
    // timeout is a minute).
    let silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("silent connect");
    let client = TestClient::new(bundle(&[&ca], 1), Some(ca.identity(NODE_ID)));
    assert_eq!(client.call(&server).await, Ok(NODE_ID.to_owned()));
    drop(silent);
}

#[tokio::test]
async fn connect_tries_each_address_in_turn() {
    let ca = Ca::new(TD);
    let server = TestServer::start(bundle(&[&ca], 1), ca.identity(SERVER_ID)).await;
    // A port nothing listens on: bound, then released.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("address");
    let config = client_config(
        watch::channel(bundle(&[&ca], 1)).1,
        id(SERVER_ID),
        None,
        false,
    );
    let addresses = [
        "no-such-host.invalid:443".to_owned(),
        closed.to_string(),
        format!("localhost:{}", server.addr.port()),
    ];
    let channel = connect(&addresses, Arc::clone(&config), TIMEOUT)
        .await
        .expect("the third address answers");
    let answer = NodeClient::new(channel)
        .attest_node(AttestNodeRequest::default())
        .await
        .expect("call");
    assert_eq!(answer.into_inner().node_name, "");

    assert!(matches!(
        connect(&[], Arc::clone(&config), TIMEOUT).await,
        Err(MtlsError::NoAddresses)
    ));
    let Err(MtlsError::Dial { address, .. }) =
        connect(&[closed.to_string()], config, TIMEOUT).await
    else {
        panic!("a closed port must fail to connect");
    };
    assert_eq!(address, closed);
}

#[test]
fn an_identity_needs_one_spiffe_id_a_chain_and_its_own_key() {
    let ca = Ca::new(TD);
    let (chain, key, _) = ca.leaf(&[NODE_ID], SystemTime::now() + HOUR);
    let (other_chain, _, _) = ca.leaf(&[NODE_ID], SystemTime::now() + HOUR);
    assert!(matches!(
        Identity::new(Vec::new(), key.clone()),
        Err(MtlsError::EmptyChain)
    ));
    assert!(matches!(
        Identity::new(other_chain, key.clone()),
        Err(MtlsError::KeyMismatch(_))
    ));
    assert!(matches!(
        Identity::new(chain.clone(), Zeroizing::new(b"not a key".to_vec())),
        Err(MtlsError::Key(_))
    ));
    let (no_san, key2, _) = ca.leaf(&[], SystemTime::now() + HOUR);
    assert!(matches!(
        Identity::new(no_san, key2),
        Err(MtlsError::UriSanCount(0))
    ));
    let (not_spiffe, key3, _) = ca.leaf(&["https://example.org/a"], SystemTime::now() + HOUR);
    assert!(matches!(
        Identity::new(not_spiffe, key3),
        Err(MtlsError::NotSpiffeId(_))
    ));
    let (two_ids, key4, _) = ca.leaf(
        &[NODE_ID, "spiffe://example.org/tether/node/b"],
        SystemTime::now() + HOUR,
    );
    assert!(matches!(
        Identity::new(two_ids, key4),
        Err(MtlsError::UriSanCount(2))
    ));
    let identity = Identity::new(chain, key).expect("identity");
    assert!(!format!("{identity:?}").contains("key"), "{identity:?}");
}

#[test]
fn serials_print_as_the_issuer_chose_them() {
    let cases: [(&[u8], &str); 4] = [
        (&[0x40, 0x01], "4001"),
        (&[0x00, 0x80, 0x01], "8001"),
        (&[0x00], "00"),
        (&[0x00, 0x7f], "007f"),
    ];
    for (raw, want) in cases {
        assert_eq!(verify::serial_hex(raw), want, "{raw:?}");
    }
}

/// One handshake with an HTTPS listener's configuration: the client's
/// SPIFFE ID as the server names it, or why the handshake failed.
async fn https_handshake(
    server: Arc<ServerConfig>,
    bundle: Arc<TrustBundle>,
    client: Option<Identity>,
) -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| crate::error::chain(&e))?;
        let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        leaf_spiffe_id(chain)
            .map(|id| id.to_string())
            .map_err(|e| crate::error::chain(&e))
    });
    let mut config = ClientConfig::clone(&client_config(
        watch::channel(bundle).1,
        id(SERVER_ID),
        client.map(SwappableIdentity::new),
        false,
    ));
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("tether").expect("name");
    let client = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    // TLS 1.3: the server's verdict on the client certificate arrives
    // after the client's handshake; the server's side is the answer.
    drop(client);
    accepted.await.expect("server side")
}

#[tokio::test]
async fn an_https_listener_that_requires_an_svid_names_its_client_and_refuses_one_without() {
    let ca = Ca::new(TD);
    let other = Ca::new(TD);
    let server = || {
        https_server_config(
            watch::channel(bundle(&[&ca], 1)).1,
            SwappableIdentity::new(ca.identity(SERVER_ID)),
            ClientAuth::Required,
        )
    };
    assert_eq!(
        https_handshake(server(), bundle(&[&ca], 1), Some(ca.identity(NODE_ID))).await,
        Ok(NODE_ID.to_owned())
    );
    let without = https_handshake(server(), bundle(&[&ca], 1), None).await;
    assert!(without.is_err(), "{without:?}");
    let untrusted =
        https_handshake(server(), bundle(&[&ca], 1), Some(other.identity(NODE_ID))).await;
    assert!(untrusted.is_err(), "{untrusted:?}");

    // Without client auth, anyone completes the handshake, unnamed.
    let open = https_server_config(
        watch::channel(bundle(&[&ca], 1)).1,
        SwappableIdentity::new(ca.identity(SERVER_ID)),
        ClientAuth::None,
    );
    let anonymous = https_handshake(open, bundle(&[&ca], 1), None).await;
    assert!(
        anonymous
            .as_ref()
            .is_err_and(|e| e.contains("no certificate")),
        "{anonymous:?}"
    );
}
