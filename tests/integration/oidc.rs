//! OIDC discovery (`[oidc]`) against the real agent: a relying party that
//! knows only the issuer URL (PyJWT's `PyJWKClient`, fed from the
//! discovery document over HTTPS) validates a JWT-SVID and a task token,
//! follows a key rotation, and refuses a token whose key has left the
//! bundle; plain HTTP (behind an ingress): the documents, the cache
//! headers, 304, 404 and 405; `iss` in both token kinds, and tokens of an
//! earlier issuer still valid after a restart; a listener that cannot
//! bind names its key.

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Stdio;

use common::{TestAgent, claims_of, entry_for_me, eventually, task_client};
use std::io::{BufRead as _, Write as _};
use tether::proto::task as task_pb;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const JIRA: &str = "spiffe://example.org/mcp/jira";
const RELYING_PARTY: &str = "https://rp.example";

fn python() -> String {
    std::env::var("TETHER_TEST_PYTHON").expect(
        "TETHER_TEST_PYTHON must name a python with PyJWT installed (scripts/test sets it up)",
    )
}

/// This process as an agent workload and as the task's audience.
fn entries() -> String {
    format!(
        "{}{}",
        entry_for_me("agent", "agent"),
        entry_for_me("mcp/jira", "mcp")
    )
}

fn oidc_section(listen: SocketAddr, issuer: &str, tls: Option<&Path>) -> String {
    let files = tls.map_or(String::new(), |dir| {
        format!(
            "cert_path = \"{}\"\nkey_path = \"{}\"\n",
            dir.join("oidc.pem").display(),
            dir.join("oidc.key").display()
        )
    });
    format!("[oidc]\nlisten = \"{listen}\"\nissuer = \"{issuer}\"\n{files}")
}

/// A CA (`ca.pem`, for the relying party) and a certificate it signed for
/// 127.0.0.1 (`oidc.pem`, `oidc.key`, the key readable by its owner only).
fn certificate_files(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "oidc test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");
    std::fs::write(dir.join("oidc.pem"), cert.pem()).expect("oidc.pem");
    let key_path = dir.join("oidc.key");
    std::fs::write(&key_path, key.serialize_pem()).expect("oidc.key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("mode");
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT header")
        .kid
        .expect("a kid")
}

async fn jwt_svid(agent: &TestAgent, audience: &str) -> String {
    agent
        .spiffe_client()
        .await
        .fetch_jwt_svid(&[audience], None)
        .await
        .expect("a JWT-SVID")
        .token()
        .to_owned()
}

async fn task_token(agent: &TestAgent) -> (String, String) {
    let begun = task_client(&agent.socket)
        .await
        .begin_task(task_pb::BeginTaskRequest {
            audience: JIRA.into(),
            intent: "triage the tickets".into(),
            tools: vec!["jira.search".into()],
            ..Default::default()
        })
        .await
        .expect("a task")
        .into_inner();
    (begun.token.expect("a task token").token, begun.task_id)
}

/// The relying party: `tests/py/oidc_check.py`, one command a line. Its
/// calls block (the test's own thread; the agent runs on the runtime's
/// workers).
struct RelyingParty {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl RelyingParty {
    fn start(issuer: &str, ca: &Path, lifespan_secs: f64) -> Self {
        let mut child = std::process::Command::new(python())
            .arg(format!(
                "{}/tests/py/oidc_check.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .arg(issuer)
            .arg(ca)
            .arg(lifespan_secs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python runs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut rp = Self {
            child,
            stdin,
            stdout,
        };
        let ready = rp.line();
        assert_eq!(ready["ready"], true, "{ready}");
        assert_eq!(ready["jwks_uri"], format!("{issuer}/keys"));
        rp
    }

    fn line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("a line");
        assert!(
            !line.is_empty(),
            "the relying party exited: {:?}",
            self.child.try_wait()
        );
        serde_json::from_str(&line).expect("JSON")
    }

    fn check(&mut self, token: &str, audience: &str) -> serde_json::Value {
        let command = serde_json::json!({ "token": token, "aud": audience });
        writeln!(self.stdin, "{command}").expect("a command");
        self.line()
    }
}

impl Drop for RelyingParty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a venv with PyJWT: run scripts/test"]
async fn a_relying_party_with_only_the_issuer_url_validates_and_follows_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    certificate_files(dir.path());
    let port = common::free_port();
    let issuer = format!("https://127.0.0.1:{port}/tether");
    // JWT keys of 12 s: the successor is published at 6 s, signs from
    // 10 s, and the first key leaves the bundle at 12 s.
    let extra = format!(
        "jwt_svid_ttl = \"2s\"\n{}[authority]\njwt_key_ttl = \"12s\"\n{}",
        entries(),
        oidc_section(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &issuer,
            Some(dir.path())
        ),
    );
    let agent = TestAgent::start(&extra).await;
    // A relying party's cache, scaled down with the keys' lifetime (300 s
    // against hours of lead in production; 1 s against 4 s here).
    let mut rp = RelyingParty::start(&issuer, &dir.path().join("ca.pem"), 1.0);

    // The first key signs both token kinds; iss is the issuer in each.
    let svid = jwt_svid(&agent, RELYING_PARTY).await;
    let first_kid = kid_of(&svid);
    let checked = rp.check(&svid, RELYING_PARTY);
    assert_eq!(checked["ok"], true, "{checked}");
    assert_eq!(checked["kid"], first_kid.as_str());
    assert_eq!(checked["claims"]["iss"], issuer.as_str());
    assert_eq!(checked["claims"]["sub"], "spiffe://example.org/agent");
    let (task, task_id) = task_token(&agent).await;
    assert_eq!(kid_of(&task), first_kid);
    let checked = rp.check(&task, JIRA);
    assert_eq!(checked["ok"], true, "{checked}");
    assert_eq!(checked["claims"]["iss"], issuer.as_str());
    assert_eq!(checked["claims"]["txn"], task_id.as_str());
    // The audience is checked.
    let checked = rp.check(&svid, "https://someone-else.example");
    assert_eq!(checked["ok"], false, "{checked}");
    assert_eq!(checked["kind"], "invalid", "{checked}");

    // The successor signs: the same relying party follows it through the
    // discovery document's jwks_uri.
    let rotated = eventually("a JWT-SVID signed by the successor key", async || {
        let svid = jwt_svid(&agent, RELYING_PARTY).await;
        (kid_of(&svid) != first_kid).then_some(svid)
    })
    .await;
    let checked = rp.check(&rotated, RELYING_PARTY);
    assert_eq!(checked["ok"], true, "{checked}");
    assert_eq!(checked["kid"], kid_of(&rotated).as_str());
    let (task, _) = task_token(&agent).await;
    let checked = rp.check(&task, JIRA);
    assert_eq!(checked["ok"], true, "{checked}");

    // The first key leaves the bundle: its tokens are refused for want of
    // a key (whatever their exp says).
    eventually("the first key leaves the bundle", async || {
        let bundles = agent
            .spiffe_client()
            .await
            .fetch_jwt_bundles()
            .await
            .expect("JWT bundles");
        let td = spiffe::TrustDomain::new("example.org").expect("td");
        bundles
            .get(&td)
            .is_some_and(|b| b.find_jwt_authority(&first_kid).is_none())
    })
    .await;
    let refused = rp.check(&svid, RELYING_PARTY);
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["kind"], "unknown_key", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("Unable to find a signing key")),
        "{refused}"
    );

    drop(rp);
    agent.stop().await;
}

/// One HTTP/1.1 exchange: the status, the head and the body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("an answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn get(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: oidc.example.test\r\nConnection: close\r\n{extra_headers}\r\n"
    )
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_behind_an_ingress_serves_the_documents_and_iss_survives_a_restart() {
    let issuer = "https://oidc.example.test/td";
    let extra = format!(
        "{}{}",
        entries(),
        oidc_section("127.0.0.1:0".parse().expect("addr"), issuer, None)
    );
    let mut agent = TestAgent::start(&extra).await;
    let addr = agent
        .running()
        .relying_party_addrs()
        .oidc
        .expect("the OIDC listener");

    // The discovery document, at the root and under the issuer's path.
    for path in [
        "/.well-known/openid-configuration",
        "/td/.well-known/openid-configuration",
    ] {
        let (status, head, body) = http(addr, &get(path, "")).await;
        assert_eq!(status, 200, "{path}: {head}");
        assert_eq!(header(&head, "cache-control"), Some("public, max-age=300"));
        let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(doc["issuer"], issuer);
        assert_eq!(doc["jwks_uri"], format!("{issuer}/keys"));
    }

    // The keys: the bundle's, with use and alg; 304 for the same tag.
    let svid = jwt_svid(&agent, RELYING_PARTY).await;
    let (status, head, body) = http(addr, &get("/td/keys", "")).await;
    assert_eq!(status, 200, "{head}");
    let jwks: serde_json::Value = serde_json::from_str(&body).expect("JWKS");
    let key = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid_of(&svid).as_str())
        .expect("the signing key is served")
        .clone();
    assert_eq!(key["use"], "sig");
    assert_eq!(key["alg"], "ES256");
    let etag = header(&head, "etag").expect("an etag").to_owned();
    let (status, head, body) =
        http(addr, &get("/keys", &format!("If-None-Match: {etag}\r\n"))).await;
    assert_eq!(status, 304, "{head}");
    assert!(body.is_empty());
    let (status, _, _) = http(addr, &get("/keys", "If-None-Match: \"stale\"\r\n")).await;
    assert_eq!(status, 200);

    // Nothing else is served.
    for path in ["/", "/td", "/keys/x", "/other/keys", "/td/userinfo"] {
        assert_eq!(http(addr, &get(path, "")).await.0, 404, "{path}");
    }
    let post = "POST /keys HTTP/1.1\r\nHost: o\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let (status, head, _) = http(addr, post).await;
    assert_eq!(status, 405, "{head}");
    assert_eq!(header(&head, "allow"), Some("get, head"));

    // Both token kinds carry the issuer.
    assert_eq!(claims_of(&svid)["iss"], issuer);
    let (task, task_id) = task_token(&agent).await;
    assert_eq!(claims_of(&task)["iss"], issuer);

    // A restart without [oidc]: JWT-SVIDs carry no iss again, task tokens
    // spiffe://<td>, and the token signed under the issuer still validates.
    agent.restart(&entries()).await;
    assert!(agent.running().relying_party_addrs().oidc.is_none());
    let svid = jwt_svid(&agent, "https://another.example").await;
    assert!(
        claims_of(&svid).get("iss").is_none(),
        "{}",
        claims_of(&svid)
    );
    let (fresh, _) = task_token(&agent).await;
    assert_eq!(claims_of(&fresh)["iss"], "spiffe://example.org");
    let validated = task_client(&agent.socket)
        .await
        .validate_task_token(task_pb::ValidateTaskTokenRequest {
            token: task,
            audience: JIRA.into(),
            tool: "jira.search".into(),
            presenter_certificate: Vec::new(),
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(validated.valid, "{}", validated.reason);
    assert_eq!(validated.task_id, task_id);
    agent.stop().await;
}

#[tokio::test]
async fn an_oidc_listener_that_cannot_bind_names_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let error = common::start_in(
        dir.path(),
        &oidc_section(addr, "https://oidc.example.test", None),
    )
    .await
    .expect_err("the port is taken");
    let text = format!("{error:#}");
    assert!(
        text.contains("[oidc] listen") && text.contains(&addr.to_string()),
        "{text}"
    );
}
