//! A stand-in kubelet for the Kubernetes attestor's tests: HTTPS on
//! 127.0.0.1 with a certificate for `kubelet.test` signed by a test CA, a
//! bearer token check, and pod lists in the kubelet's JSON shape.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tether::attestation::k8s::K8sAttestorConfig;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub const NODE: &str = "node-a";
pub const POD_UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
pub const CONTAINER: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
pub const TOKEN: &str = "sa-token-of-the-agent";

/// One pod as the kubelet's `/pods` lists it (trimmed to what matters, in
/// the real field names and shapes).
pub fn pod(uid: &str, node: &str, container_id: Option<&str>) -> serde_json::Value {
    let mut statuses = Vec::new();
    if let Some(id) = container_id {
        statuses.push(serde_json::json!({
            "name": "planner",
            "state": {"running": {"startedAt": "2026-11-23T10:00:00Z"}},
            "ready": true,
            "restartCount": 0,
            "image": "ghcr.io/example/planner:1.4",
            "imageID": "ghcr.io/example/planner@sha256:5f0e6b1f7c3c2d4e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f",
            "containerID": format!("containerd://{id}"),
            "started": true
        }));
    }
    serde_json::json!({
        "metadata": {
            "name": "planner-7d9f8b6c5-x2x9q",
            "generateName": "planner-7d9f8b6c5-",
            "namespace": "agents",
            "uid": uid,
            "resourceVersion": "4242",
            "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": {"app": "planner", "pod-template-hash": "7d9f8b6c5"},
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "planner-7d9f8b6c5",
                "uid": "0d1c2b3a-4f5e-6d7c-8b9a-0f1e2d3c4b5a",
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "containers": [{"name": "planner", "image": "ghcr.io/example/planner:1.4"}],
            "initContainers": [{"name": "setup", "image": "busybox:1.36"}],
            "serviceAccountName": "planner",
            "serviceAccount": "planner",
            "nodeName": node
        },
        "status": {
            "phase": "Running",
            "podIP": "10.244.1.7",
            "containerStatuses": statuses
        }
    })
}

pub fn pod_list(items: Vec<serde_json::Value>) -> String {
    serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        .to_string()
}

/// What the stand-in answers to `GET /pods`, per request number (from 1).
pub type Answer = Box<dyn Fn(usize) -> (u16, String) + Send + Sync>;

/// A kubelet on 127.0.0.1 serving HTTPS with a certificate for
/// `kubelet.test` signed by a test CA, requiring `Bearer TOKEN`.
pub struct StandIn {
    pub addr: SocketAddr,
    pub dir: TempDir,
    requests: Arc<AtomicUsize>,
}

pub async fn stand_in(answer: Answer) -> StandIn {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["kubelet.test".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();

    let tls = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let answer: Arc<Answer> = Arc::new(answer);
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let answer = Arc::clone(&answer);
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let answer = Arc::clone(&answer);
                    let counter = Arc::clone(&counter);
                    async move {
                        let authorized = request
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .is_some_and(|v| v == format!("Bearer {TOKEN}").as_str());
                        let (status, body) = if !authorized {
                            (401, "Unauthorized".to_owned())
                        } else if request.uri().path() != "/pods" {
                            (404, "not found".to_owned())
                        } else {
                            answer(counter.fetch_add(1, Ordering::SeqCst) + 1)
                        };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    StandIn {
        addr,
        dir,
        requests,
    }
}

/// A port on 127.0.0.1 that refuses connections for as long as this is
/// kept: a socket bound there that never listens. A port merely freed
/// (bound, then closed) could be taken meanwhile by a test running in
/// parallel; this one cannot.
pub struct RefusedPort {
    pub port: u16,
    _socket: TcpSocket,
}

pub fn refused_port() -> RefusedPort {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    RefusedPort {
        port,
        _socket: socket,
    }
}

impl StandIn {
    pub fn config(&self) -> K8sAttestorConfig {
        K8sAttestorConfig {
            enabled: true,
            node_name: Some(NODE.into()),
            kubelet_host: "127.0.0.1".into(),
            kubelet_secure_port: self.addr.port(),
            token_path: self.dir.path().join("token"),
            kubelet_ca_path: self.dir.path().join("ca.crt"),
            kubelet_tls_server_name: Some("kubelet.test".into()),
            poll_retry_interval: Duration::from_millis(10),
            max_poll_attempts: 5,
            ..K8sAttestorConfig::default()
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
