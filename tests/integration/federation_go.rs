//! Federation with a peer tether did not write: go-spiffe v2.9.0
//! (`tests/go`, built by [`crate::common::go`]). go-spiffe's
//! `federation.FetchBundle` fetches a tether agent's bundle endpoint over
//! both profiles, and tether fetches from go-spiffe's
//! `federation.NewHandler` over both, following a key rotation.
//!
//! Needs `go` and the Go module proxy: `#[ignore]`d for a plain `cargo
//! nextest run`; `scripts/test` (CI, root) runs them, and there a missing
//! `go` fails them with the reason.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use spiffe::TrustDomain;

use crate::common::ca::{TestCa, loopback_san, spiffe_san};
use crate::common::go::{self, GoServer};
use crate::common::{TestAgent, entry_for_me, eventually_within, free_port, unix_now};

/// A hang guard for what takes tether's shortest fetch pace (30 s) to
/// happen; never a performance assertion.
const FETCH_PATIENCE: Duration = Duration::from_secs(120);

/// The agent's own SPIFFE ID on its `https_spiffe` endpoint.
const AGENT_ID: &str = "spiffe://example.org/tether/agent";

/// A JWT signing key of the Go side's trust domain.
struct JwtKey {
    kid: String,
    key: rcgen::KeyPair,
}

impl JwtKey {
    fn new(kid: &str) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        Self {
            kid: kid.to_owned(),
            key,
        }
    }

    fn jwk(&self) -> Value {
        let point = self.key.public_key_raw();
        json!({"use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": self.kid,
               "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])})
    }

    /// A JWT-SVID for `sub`, audience `aud`, valid for five minutes.
    fn sign(&self, sub: &str, aud: &str) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims = json!({"sub": sub, "aud": [aud], "exp": unix_now() + 300});
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    }
}

/// A SPIFFE bundle document: `ca` as the X.509 authority, `jwt` as the JWT
/// keys, with a sequence and a one-second refresh hint.
fn bundle_doc(ca: &TestCa, jwt: &[&JwtKey], sequence: u64) -> String {
    // go-jose wants the coordinates beside `x5c`, as the spec's JWK does.
    let point = ca.public_point();
    let mut keys = vec![json!({"use": "x509-svid", "kty": "EC", "crv": "P-256",
                               "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                               "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                               "x5c": [STANDARD.encode(&ca.der)]})];
    keys.extend(jwt.iter().map(|k| k.jwk()));
    json!({"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 1}).to_string()
}

/// Replaces `path` at once (a reader sees the old file or the new one).
fn write_atomically(path: &Path, text: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).expect("write");
    std::fs::rename(&partial, path).expect("rename");
}

/// The agent's own bundle as a SPIFFE document (`tether bundle show`).
async fn bundle_document(agent: &TestAgent) -> Value {
    let socket = agent.running().admin_socket_path().display().to_string();
    let mut command = crate::common::cli::tether(&["bundle", "show"]);
    command.args(["--admin-socket", &socket]);
    let out = crate::common::cli::output(command, None).await;
    crate::common::cli::assert_exit(&out, 0);
    serde_json::from_str(&crate::common::cli::stdout(&out)).expect("a JSON bundle document")
}

/// The JWT key ids the agent's Workload API serves for `td`, sorted.
async fn jwt_kids(agent: &TestAgent, td: &str) -> Vec<String> {
    let client = agent.spiffe_client().await;
    let set = client.fetch_jwt_bundles().await.expect("jwt bundles");
    let td = TrustDomain::new(td).expect("td");
    let mut kids: Vec<String> = set
        .get(&td)
        .map(|b| b.jwt_authorities().map(|a| a.key_id().to_owned()).collect())
        .unwrap_or_default();
    kids.sort();
    kids
}

/// How many X.509 authorities the agent's Workload API serves for `td`.
async fn x509_count(agent: &TestAgent, td: &str) -> Option<usize> {
    let client = agent.spiffe_client().await;
    let set = client.fetch_x509_bundles().await.expect("x509 bundles");
    let td = TrustDomain::new(td).expect("td");
    set.get(&td).map(|b| b.authorities().len())
}

/// go-spiffe's fetch; its JSON on success, its exit and stderr otherwise.
async fn go_fetch(args: &[&str]) -> Result<Value, String> {
    let out = go::fetch(args.iter().map(|a| (*a).to_owned()).collect()).await;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(serde_json::from_slice(&out.stdout).expect("the peer prints JSON"))
}

/// What go-spiffe fetched is what the agent serves: the same JWT keys and
/// as many X.509 authorities as its Workload API, its document's sequence,
/// and the configured refresh hint.
async fn assert_same_as_agent(fetched: &Value, agent: &TestAgent) {
    assert_eq!(fetched["trust_domain"], "example.org", "{fetched}");
    let kids: Vec<String> = serde_json::from_value(fetched["jwt_key_ids"].clone()).expect("kids");
    assert!(!kids.is_empty(), "{fetched}");
    assert_eq!(kids, jwt_kids(agent, "example.org").await, "{fetched}");
    assert_eq!(
        fetched["x509_authorities"].as_u64(),
        x509_count(agent, "example.org").await.map(|n| n as u64),
        "{fetched}"
    );
    let document = bundle_document(agent).await;
    assert!(fetched["spiffe_sequence"].is_u64(), "{fetched}");
    assert_eq!(
        fetched["spiffe_sequence"], document["spiffe_sequence"],
        "{fetched} / {document}"
    );
    assert_eq!(fetched["spiffe_refresh_hint"], 10, "{fetched}");
}

#[tokio::test]
#[ignore = "needs go and the Go module proxy: scripts/test runs it"]
async fn go_spiffe_fetches_a_tether_endpoint_over_https_web() {
    go::federation_peer();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    let (cert, key) = ca.write_server_cert(loopback_san(), dir.path(), "web");
    let ca_path = ca.write_pem(dir.path(), "ca.pem");
    let port = free_port();
    let agent = TestAgent::start(&format!(
        "{}[bundle_endpoint]\nlisten = \"127.0.0.1:{port}\"\nprofile = \"https_web\"\n\
         cert_path = \"{cert}\"\nkey_path = \"{key}\"\nrefresh_hint = \"10s\"\n",
        entry_for_me("svc", "main")
    ))
    .await;
    let url = format!("https://127.0.0.1:{port}/");
    let fetched = go_fetch(&[
        "--url",
        &url,
        "--trust-domain",
        "example.org",
        "--profile",
        "https_web",
        "--ca",
        &ca_path,
    ])
    .await
    .expect("go-spiffe fetches the bundle over https_web");
    assert_same_as_agent(&fetched, &agent).await;

    // A CA the endpoint's certificate does not chain to: refused.
    let other_ca = TestCa::new().write_pem(dir.path(), "other-ca.pem");
    let refused = go_fetch(&[
        "--url",
        &url,
        "--trust-domain",
        "example.org",
        "--profile",
        "https_web",
        "--ca",
        &other_ca,
    ])
    .await
    .expect_err("an endpoint certificate of another CA is refused");
    assert!(refused.contains("certificate"), "{refused}");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs go and the Go module proxy: scripts/test runs it"]
async fn go_spiffe_fetches_a_tether_endpoint_over_https_spiffe() {
    go::federation_peer();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let agent = TestAgent::start(&format!(
        "{}[bundle_endpoint]\nlisten = \"127.0.0.1:{port}\"\nprofile = \"https_spiffe\"\nrefresh_hint = \"10s\"\n",
        entry_for_me("svc", "main")
    ))
    .await;
    // The bootstrap: the agent's bundle, out of band.
    let bootstrap = dir.path().join("bootstrap.json");
    std::fs::write(&bootstrap, bundle_document(&agent).await.to_string()).expect("write");
    let (url, bootstrap) = (
        format!("https://127.0.0.1:{port}/"),
        bootstrap.display().to_string(),
    );
    let args = |endpoint_id: &'static str| {
        [
            "--url",
            &url,
            "--trust-domain",
            "example.org",
            "--profile",
            "https_spiffe",
            "--endpoint-id",
            endpoint_id,
            "--bundle",
            &bootstrap,
        ]
        .map(str::to_owned)
    };
    let fetched = go::fetch(args(AGENT_ID).to_vec()).await;
    assert!(
        fetched.status.success(),
        "go-spiffe fetches over https_spiffe: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let fetched: Value = serde_json::from_slice(&fetched.stdout).expect("JSON");
    assert_same_as_agent(&fetched, &agent).await;

    // The agent's SVID does not name the ID go-spiffe expects: refused.
    let refused = go::fetch(args("spiffe://example.org/someone-else").to_vec()).await;
    assert!(!refused.status.success(), "a wrong endpoint ID is accepted");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("unexpected ID \"{AGENT_ID}\"")),
        "{stderr}"
    );
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs go and the Go module proxy: scripts/test runs it"]
async fn tether_fetches_from_go_spiffes_handler_and_follows_its_rotation() {
    go::federation_peer();
    let dir = tempfile::tempdir().expect("tempdir");
    let aud = "spiffe://example.org/svc";

    // web.go.example: go-spiffe's handler behind a web certificate.
    let web_ca = TestCa::new();
    let (web_cert, web_key) = web_ca.write_server_cert(loopback_san(), dir.path(), "web");
    let web_ca_path = web_ca.write_pem(dir.path(), "web-ca.pem");
    let web_domain_ca = TestCa::new();
    let first = JwtKey::new("go-first");
    let web_bundle = dir.path().join("web.go.example.json");
    write_atomically(&web_bundle, &bundle_doc(&web_domain_ca, &[&first], 1));
    let web = GoServer::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            "web.go.example",
            "--bundle",
            &web_bundle.display().to_string(),
            "--profile",
            "https_web",
            "--cert",
            &web_cert,
            "--key",
            &web_key,
        ]
        .map(str::to_owned),
    );

    // svid.go.example: go-spiffe's handler presenting an X.509-SVID of its
    // domain; the bootstrap has the CA only, the endpoint also a JWT key.
    let svid_ca = TestCa::new();
    let endpoint_id = "spiffe://svid.go.example/bundle-endpoint";
    let (svid_cert, svid_key) =
        svid_ca.write_server_cert(spiffe_san(endpoint_id), dir.path(), "svid");
    let svid_jwt = JwtKey::new("go-svid");
    let (svid_bootstrap, svid_bundle) = (
        dir.path().join("svid.go.example.bootstrap.json"),
        dir.path().join("svid.go.example.json"),
    );
    write_atomically(&svid_bootstrap, &bundle_doc(&svid_ca, &[], 1));
    write_atomically(&svid_bundle, &bundle_doc(&svid_ca, &[&svid_jwt], 2));
    let svid = GoServer::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            "svid.go.example",
            "--bundle",
            &svid_bundle.display().to_string(),
            "--profile",
            "https_spiffe",
            "--cert",
            &svid_cert,
            "--key",
            &svid_key,
        ]
        .map(str::to_owned),
    );

    let agent = TestAgent::start(&format!(
        "{}federates_with = [\"web.go.example\", \"svid.go.example\"]\n\
         [[federation]]\ntrust_domain = \"web.go.example\"\nbundle_endpoint_url = \"https://{}/\"\n\
         bundle_endpoint_profile = \"https_web\"\nbundle_endpoint_ca_path = \"{web_ca_path}\"\n\
         [[federation]]\ntrust_domain = \"svid.go.example\"\nbundle_path = \"{}\"\n\
         bundle_endpoint_url = \"https://{}/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
         endpoint_spiffe_id = \"{endpoint_id}\"\n",
        entry_for_me("svc", "main"),
        web.addr,
        svid_bootstrap.display(),
        svid.addr,
    ))
    .await;
    let client = agent.spiffe_client().await;

    // Both fetched: a JWT-SVID signed by each Go-side key validates.
    for (td, key) in [("web.go.example", &first), ("svid.go.example", &svid_jwt)] {
        eventually_within(
            FETCH_PATIENCE,
            &format!("{td}: the key from go-spiffe's handler"),
            async || (jwt_kids(&agent, td).await == [key.kid.clone()]).then_some(()),
        )
        .await;
        assert_eq!(x509_count(&agent, td).await, Some(1));
        let subject = format!("spiffe://{td}/workload");
        let validated = client
            .validate_jwt_token(aud, &key.sign(&subject, aud))
            .await
            .expect("a JWT-SVID of the Go side validates");
        assert_eq!(validated.spiffe_id().to_string(), subject);
    }
    assert!(
        agent.running().readiness_problems().is_empty(),
        "{:?}",
        agent.running().readiness_problems()
    );

    // The Go side rotates its JWT key (the file rewritten, as an operator
    // would); tether follows at its next fetch.
    let second = JwtKey::new("go-second");
    write_atomically(&web_bundle, &bundle_doc(&web_domain_ca, &[&second], 2));
    eventually_within(FETCH_PATIENCE, "tether follows the rotation", async || {
        (jwt_kids(&agent, "web.go.example").await == [second.kid.clone()]).then_some(())
    })
    .await;
    let subject = "spiffe://web.go.example/workload";
    client
        .validate_jwt_token(aud, &second.sign(subject, aud))
        .await
        .expect("a JWT-SVID signed with the rotated key validates");
    client
        .validate_jwt_token(aud, &first.sign(subject, aud))
        .await
        .expect_err("the retired key no longer validates");
    agent.stop().await;
    drop((web, svid));
}
