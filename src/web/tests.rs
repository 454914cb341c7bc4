//! The kit served on loopback and driven by raw HTTP/1.1 requests, over
//! plain TCP and over TLS with a certificate read from files.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::*;

/// Echoes what the handler saw.
struct Echo;

impl Routes for Echo {
    async fn answer(&self, request: WebRequest) -> WebResponse {
        json(
            StatusCode::OK,
            &serde_json::json!({
                "method": request.method.as_str(),
                "path": request.path,
                "query": request.query,
                "body": String::from_utf8_lossy(&request.body),
                "peer_certificates": request.peer_certificates.len(),
            }),
        )
    }
}

struct Served {
    addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tracker.close();
    }
}

async fn serve_echo(tls: Tls, limits: Limits) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::spawn(serve(
        listener,
        tls,
        Arc::new(Echo),
        limits,
        tracker.clone(),
        cancel.clone(),
    ));
    Served {
        addr,
        cancel,
        tracker,
    }
}

/// Sends `request` as written and reads the whole answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &[u8]) -> String {
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn plain(addr: SocketAddr, request: &[u8]) -> String {
    exchange(TcpStream::connect(addr).await.expect("connect"), request).await
}

#[tokio::test]
async fn a_request_reaches_its_routes_read_in_full() {
    let served = serve_echo(Tls::Plain, Limits::default()).await;
    let answer = plain(
        served.addr,
        b"POST /introspect?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\ntoken=abc",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    assert!(answer.contains(r#""path":"/introspect""#), "{answer}");
    assert!(answer.contains(r#""query":"x=1""#), "{answer}");
    assert!(answer.contains(r#""body":"token=abc""#), "{answer}");
    assert!(answer.contains(r#""peer_certificates":0"#), "{answer}");
}

#[tokio::test]
async fn methods_other_than_get_head_and_post_are_refused() {
    let served = serve_echo(Tls::Plain, Limits::default()).await;
    let answer = plain(served.addr, b"DELETE / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

#[tokio::test]
async fn a_body_over_the_bound_is_refused_declared_or_streamed() {
    let limits = Limits {
        max_body: 16,
        ..Limits::default()
    };
    let served = serve_echo(Tls::Plain, limits).await;
    let declared = plain(
        served.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n",
    )
    .await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    let chunked = plain(
        served.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n0123456789abcdef0123456789abcdef\r\n0\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
}

#[tokio::test]
async fn a_client_that_sends_nothing_loses_its_slot() {
    let limits = Limits {
        max_connections: 1,
        header_timeout: Duration::from_millis(200),
        connection_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let served = serve_echo(Tls::Plain, limits).await;
    // Holds the only slot, silent.
    let silent = TcpStream::connect(served.addr).await.expect("connect");
    // Answered once the silent one has timed out.
    let answer = plain(served.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(silent);
}

/// A self-signed certificate for `localhost` written as files, the key
/// with `key_mode`.
fn certificate_files(dir: &Path, key_mode: u32) -> (PathBuf, PathBuf, Vec<u8>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(key_mode))
        .expect("key mode");
    (cert_path, key_path, cert.der().to_vec())
}

#[tokio::test]
async fn https_from_certificate_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path, der) = certificate_files(dir.path(), 0o600);
    let files = CertificateFiles::load(&cert_path, &key_path).expect("load");
    let served = serve_echo(Tls::Rustls(Arc::new(files)), Limits::default()).await;

    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(der)).expect("root");
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(served.addr).await.expect("connect");
    let stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let answer = exchange(stream, b"GET /keys HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""path":"/keys""#), "{answer}");
}

#[test]
fn certificate_files_keep_no_session_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path, _) = certificate_files(dir.path(), 0o600);
    let files = CertificateFiles::load(&cert_path, &key_path).expect("load");
    let config = files.server_config().expect("config");
    assert_eq!(config.send_tls13_tickets, 0, "no TLS 1.3 tickets");
    assert!(!config.session_storage.can_cache(), "no session cache");
    assert!(!config.ticketer.enabled(), "no TLS 1.2 tickets");
}

#[test]
fn a_key_file_others_may_read_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path, _) = certificate_files(dir.path(), 0o644);
    let error =
        CertificateFiles::load(&cert_path, &key_path).expect_err("a readable key is refused");
    let text = Chain(&error).to_string();
    assert!(text.contains("readable by its owner only"), "{text}");
}

#[test]
fn a_certificate_file_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path, _) = certificate_files(dir.path(), 0o600);
    std::fs::write(&cert_path, "not pem").expect("write");
    let error = CertificateFiles::load(&cert_path, &key_path).expect_err("no certificate");
    assert!(
        error.to_string().contains("no usable PEM certificate"),
        "{error}"
    );
}
