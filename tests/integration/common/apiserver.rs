//! A stand-in for the Kubernetes API server, for the fleet server's
//! `k8s_psat` and pod-scope tests. It is NOT Kubernetes: it serves, over
//! HTTPS on 127.0.0.1 (a certificate for that address signed by a test
//! CA), only the three calls `tether server` makes, in the API's real JSON
//! (`k8s-openapi`'s types on the way in, the API's field names on the way
//! out):
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: tokens the test
//!   registered, authenticated for their audience and bound to their pod
//!   (the `authentication.kubernetes.io/pod-name`/`pod-uid` extras), as a
//!   real API server answers for projected service account tokens;
//! - `GET /api/v1/namespaces/NS/pods/NAME`;
//! - `GET /api/v1/pods`, in pages of at most two pods with `continue`
//!   tokens (as a real API server may return fewer than `limit`).
//!
//! Every call must carry `Bearer SERVER_TOKEN` (the server's own service
//! account token), else 401.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::TokenReview;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The server pod's own service account token.
pub const SERVER_TOKEN: &str = "sa-token-of-tether-server";
/// The agents' namespace and service account.
pub const AGENT_NS: &str = "tether-system";
pub const AGENT_SA: &str = "tether-agent";

/// What the stand-in knows of a token.
#[derive(Clone)]
pub enum TokenFacts {
    /// A projected token of `namespace:service_account`, bound to pod
    /// `pod_name` (`pod_uid`), issued for `audience`.
    Bound {
        namespace: String,
        service_account: String,
        pod_name: String,
        pod_uid: String,
        audience: String,
    },
    /// A token the API server does not authenticate, and why.
    Invalid(String),
}

#[derive(Default)]
struct Cluster {
    pods: Vec<serde_json::Value>,
    tokens: HashMap<String, TokenFacts>,
}

/// The running stand-in.
pub struct ApiServer {
    pub addr: SocketAddr,
    pub dir: TempDir,
    cluster: Arc<Mutex<Cluster>>,
}

/// A pod in the API's JSON.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    service_account: &str,
    node: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "4242",
            "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": {"app": name}
        },
        "spec": {
            "containers": [{"name": "main", "image": "ghcr.io/example/main:1"}],
            "serviceAccountName": service_account,
            "serviceAccount": service_account,
            "nodeName": node
        },
        "status": {"phase": "Running", "podIP": "10.244.1.7"}
    })
}

impl ApiServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("token"), format!("{SERVER_TOKEN}\n")).unwrap();

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
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let shared = Arc::clone(&cluster);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let cluster = Arc::clone(&shared);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request| {
                        let cluster = Arc::clone(&cluster);
                        async move {
                            let (status, body) = answer(&cluster, request).await;
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body.to_string())))
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
        Self { addr, dir, cluster }
    }

    /// `[kubernetes]` for a server using this stand-in, allowing the
    /// agents' service account.
    pub fn server_toml(&self) -> String {
        format!(
            "[kubernetes]\napi_server = \"https://127.0.0.1:{}\"\nca_path = \"{}\"\ntoken_path = \"{}\"\nallowed_service_accounts = [\"{AGENT_NS}:{AGENT_SA}\"]\n",
            self.addr.port(),
            self.dir.path().join("ca.crt").display(),
            self.dir.path().join("token").display(),
        )
    }

    pub fn add_pod(&self, pod: serde_json::Value) {
        self.cluster.lock().unwrap().pods.push(pod);
    }

    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.cluster.lock().unwrap().pods.retain(|p| {
            !(p["metadata"]["namespace"] == namespace && p["metadata"]["name"] == name)
        });
    }

    pub fn add_token(&self, token: &str, facts: TokenFacts) {
        self.cluster
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), facts);
    }

    /// An agent pod on `node` and its projected token `token` (audience
    /// `tether-server`).
    pub fn add_agent(&self, token: &str, node: &str, uid: &str) {
        let name = format!("tether-agent-{node}");
        self.add_pod(pod(AGENT_NS, &name, uid, AGENT_SA, node));
        self.add_token(
            token,
            TokenFacts::Bound {
                namespace: AGENT_NS.into(),
                service_account: AGENT_SA.into(),
                pod_name: name,
                pod_uid: uid.into(),
                audience: "tether-server".into(),
            },
        );
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, serde_json::Value) {
    (
        code,
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code
        }),
    )
}

async fn answer(
    cluster: &Mutex<Cluster>,
    request: hyper::Request<hyper::body::Incoming>,
) -> (u16, serde_json::Value) {
    let authorized = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v == format!("Bearer {SERVER_TOKEN}").as_str());
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    if method == http::Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        let Ok(body) = Limited::new(request.into_body(), 64 * 1024).collect().await else {
            return status(413, "RequestEntityTooLarge", "too large");
        };
        let Ok(review) = serde_json::from_slice::<TokenReview>(&body.to_bytes()) else {
            return status(400, "BadRequest", "not a TokenReview");
        };
        let token = review.spec.token.clone().unwrap_or_default();
        let wanted = review.spec.audiences.clone().unwrap_or_default();
        let facts = cluster.lock().unwrap().tokens.get(&token).cloned();
        let review_status = match facts {
            Some(TokenFacts::Bound {
                namespace,
                service_account,
                pod_name,
                pod_uid,
                audience,
            }) if wanted.contains(&audience) => serde_json::json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{namespace}:{service_account}"),
                    "uid": "4c1e3c35-55d4-4c58-a1f0-4d6a0c6a8d2b",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                    "extra": {
                        "authentication.kubernetes.io/credential-id": ["JTI=6d0a2f4c-0b7e-4f55-9b1c-2d3e4f5a6b7c"],
                        "authentication.kubernetes.io/pod-name": [pod_name],
                        "authentication.kubernetes.io/pod-uid": [pod_uid]
                    }
                },
                "audiences": [audience]
            }),
            Some(TokenFacts::Bound { .. }) => serde_json::json!({
                "user": {},
                "error": "[invalid bearer token, token audiences [\"other\"] is invalid for the target audiences [\"tether-server\"]]"
            }),
            Some(TokenFacts::Invalid(reason)) => serde_json::json!({"user": {}, "error": reason}),
            None => {
                serde_json::json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
            }
        };
        let mut out = serde_json::to_value(&review).unwrap();
        out["status"] = review_status;
        return (201, out);
    }
    if method != http::Method::GET {
        return status(405, "MethodNotAllowed", "method not allowed");
    }
    if path == "/api/v1/pods" {
        let pods = cluster.lock().unwrap().pods.clone();
        let param = |key: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .map(percent_decode)
        };
        let limit: usize = param("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let offset: usize = param("continue")
            .and_then(|c| c.strip_prefix("off+set=").map(str::to_owned))
            .and_then(|o| o.parse().ok())
            .unwrap_or(0);
        let end = pods.len().min(offset + limit.min(2));
        let items: Vec<_> = pods.get(offset..end).unwrap_or_default().to_vec();
        let mut metadata = serde_json::json!({"resourceVersion": "4343"});
        if end < pods.len() {
            // Characters a client must percent-encode in the query.
            metadata["continue"] = format!("off+set={end}").into();
        }
        return (
            200,
            serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}),
        );
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["api", "v1", "namespaces", namespace, "pods", name] = parts.as_slice() {
        let pod = cluster
            .lock()
            .unwrap()
            .pods
            .iter()
            .find(|p| p["metadata"]["namespace"] == *namespace && p["metadata"]["name"] == *name)
            .cloned();
        return match pod {
            Some(pod) => (200, pod),
            None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
        };
    }
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = value.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
