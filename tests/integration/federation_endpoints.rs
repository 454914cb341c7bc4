//! Federation over SPIFFE bundle endpoints: tether fetching from endpoints
//! it did not write (a hostile one here, in plain tokio + rustls), and two
//! tether trust domains federating through their endpoints alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use spiffe::TrustDomain;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::common::ca::{TestCa, loopback_san, spiffe_san};
use crate::common::{TestAgent, entry_for_me, eventually_within, free_port};

/// A hang guard for what takes a fetch pace (30 s at least) to happen.
const FETCH_PATIENCE: Duration = Duration::from_secs(120);

/// A SPIFFE bundle document with `cas` as X.509 authorities.
fn bundle_doc(cas: &[&[u8]], sequence: u64) -> String {
    let keys: Vec<_> = cas
        .iter()
        .map(|der| {
            serde_json::json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [STANDARD.encode(der)]})
        })
        .collect();
    serde_json::json!({"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 1})
        .to_string()
}

/// What a hostile endpoint answers.
#[derive(Clone)]
enum Answer {
    Document(String),
    Oversized,
    Stall,
}

/// An HTTPS endpoint answering its `n`th request with `answer(n)`.
async fn hostile_endpoint(
    cert: (Vec<u8>, Vec<u8>),
    answer: impl Fn(usize) -> Answer + Send + Sync + 'static,
) -> u16 {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.0)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.1)),
        )
        .expect("a server certificate");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let answer = Arc::new(answer);
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, answer, count) = (acceptor.clone(), answer.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let n = count.fetch_add(1, Ordering::SeqCst);
                let body = match answer(n) {
                    Answer::Document(doc) => doc.into_bytes(),
                    Answer::Oversized => {
                        let mut big = b"{\"keys\": [".to_vec();
                        big.resize(2 * 1024 * 1024, b' ');
                        big
                    }
                    Answer::Stall => {
                        tokio::time::sleep(Duration::from_secs(600)).await;
                        return;
                    }
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&body).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

/// The agent's readiness problems about `td`.
fn problems_of(agent: &TestAgent, td: &str) -> Vec<String> {
    agent
        .running()
        .readiness_problems()
        .into_iter()
        .filter(|p| p.starts_with(&format!("federation {td}:")))
        .collect()
}

/// The X.509 authorities the agent's Workload API serves for each domain.
async fn x509_bundles(agent: &TestAgent) -> BTreeMap<String, Vec<Vec<u8>>> {
    let client = agent.spiffe_client().await;
    let set = client.fetch_x509_bundles().await.expect("x509 bundles");
    let mut out = BTreeMap::new();
    for (td, bundle) in set.iter() {
        out.insert(
            td.to_string(),
            bundle
                .authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect(),
        );
    }
    out
}

#[tokio::test]
async fn a_hostile_endpoint_leaves_the_last_good_bundle_and_counts_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut federations = String::new();
    let mut expected = BTreeMap::new();
    // https_spiffe: the bootstrap bundle (sequence 5) is the last good one,
    // and the endpoint misbehaves from its first answer.
    let cases: [(&str, Answer, &str); 6] = [
        ("oversized.example", Answer::Oversized, "too_large"),
        (
            "garbage.example",
            Answer::Document("<html>not json</html>".into()),
            "invalid_document",
        ),
        (
            "nokeys.example",
            Answer::Document("{\"keys\": [], \"spiffe_sequence\": 9}".into()),
            "invalid_document",
        ),
        (
            "older.example",
            Answer::Document(String::new()),
            "sequence_went_back",
        ),
        ("stall.example", Answer::Stall, "timeout"),
        ("wrongtd.example", Answer::Document(String::new()), "tls"),
    ];
    for (td, answer, outcome) in cases {
        let ca = TestCa::new();
        let bootstrap = dir.path().join(format!("{td}.json"));
        std::fs::write(&bootstrap, bundle_doc(&[&ca.der], 5)).expect("write");
        let endpoint_id = format!("spiffe://{td}/endpoint");
        let presented = if td == "wrongtd.example" {
            // Signed by the domain's own CA, but naming another domain.
            "spiffe://evil.example/endpoint".to_owned()
        } else {
            endpoint_id.clone()
        };
        let answer = match (td, answer) {
            ("older.example", _) => {
                let other = TestCa::new();
                Answer::Document(bundle_doc(&[&other.der], 3))
            }
            ("wrongtd.example", _) => {
                let other = TestCa::new();
                Answer::Document(bundle_doc(&[&other.der], 50))
            }
            (_, answer) => answer,
        };
        let port = hostile_endpoint(ca.server_cert(spiffe_san(&presented)), move |_| {
            answer.clone()
        })
        .await;
        federations.push_str(&format!(
            "[[federation]]\ntrust_domain = \"{td}\"\nbundle_path = \"{}\"\n\
             bundle_endpoint_url = \"https://127.0.0.1:{port}/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"{endpoint_id}\"\n",
            bootstrap.display()
        ));
        expected.insert(td.to_owned(), (vec![ca.der.clone()], Some(outcome)));
    }
    // https_spiffe that behaves: a new CA (authenticated with the bootstrap).
    {
        let td = "fresh.example";
        let ca = TestCa::new();
        let next = TestCa::new();
        let bootstrap = dir.path().join(format!("{td}.json"));
        std::fs::write(&bootstrap, bundle_doc(&[&ca.der], 5)).expect("write");
        let doc = bundle_doc(&[&ca.der, &next.der], 6);
        let port = hostile_endpoint(
            ca.server_cert(spiffe_san(&format!("spiffe://{td}/endpoint"))),
            move |_| Answer::Document(doc.clone()),
        )
        .await;
        federations.push_str(&format!(
            "[[federation]]\ntrust_domain = \"{td}\"\nbundle_path = \"{}\"\n\
             bundle_endpoint_url = \"https://127.0.0.1:{port}/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://{td}/endpoint\"\n",
            bootstrap.display()
        ));
        expected.insert(
            td.to_owned(),
            (vec![ca.der.clone(), next.der.clone()], None),
        );
    }
    // https_web: no bundle until the first fetch; a good bundle first, then
    // an oversized answer.
    {
        let td = "web.example";
        let web_ca = TestCa::new();
        let ca_path = dir.path().join("web-ca.pem");
        std::fs::write(&ca_path, web_ca.pem()).expect("write");
        let domain_ca = TestCa::new();
        let good = bundle_doc(&[&domain_ca.der], 1);
        let port = hostile_endpoint(web_ca.server_cert(loopback_san()), move |n| {
            if n == 0 {
                Answer::Document(good.clone())
            } else {
                Answer::Oversized
            }
        })
        .await;
        federations.push_str(&format!(
            "[[federation]]\ntrust_domain = \"{td}\"\n\
             bundle_endpoint_url = \"https://127.0.0.1:{port}/bundle\"\nbundle_endpoint_profile = \"https_web\"\n\
             bundle_endpoint_ca_path = \"{}\"\n",
            ca_path.display()
        ));
        expected.insert(
            td.to_owned(),
            (vec![domain_ca.der.clone()], Some("too_large")),
        );
    }
    let federates_with: Vec<String> = expected.keys().map(|td| format!("\"{td}\"")).collect();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n{}federates_with = [{}]\n{federations}",
        entry_for_me("svc", "main"),
        federates_with.join(", ")
    );
    let agent = TestAgent::start(&extra).await;

    // Each failure is counted (by its kind) while the last good bundle
    // stays in force and the agent stays ready: a peer's failing endpoint
    // is no reason to take this agent out of service (a bundle only
    // becomes a readiness problem once it is missing or stale).
    for (td, (cas, outcome)) in &expected {
        let (td, cas, outcome) = (td.clone(), cas.clone(), *outcome);
        eventually_within(FETCH_PATIENCE, &format!("{td}: the bundle kept and the failure counted"),
            async || {
                let counted = match outcome {
                    Some(outcome) => {
                        let metrics = scrape_metrics(&agent).await;
                        sample(
                            &metrics,
                            &format!(
                                "tether_federated_bundle_fetches_total{{trust_domain=\"{td}\",outcome=\"{outcome}\"}}"
                            ),
                        )
                        .is_some_and(|n| n >= 1.0)
                    }
                    None => true,
                };
                let bundles = x509_bundles(&agent).await;
                (counted && bundles.get(&td) == Some(&cas)).then_some(())
            },
        )
        .await;
        let problems = problems_of(&agent, &td);
        assert!(problems.is_empty(), "{td}: {problems:?}");
    }
    // Another domain's name never appears: only configured domains are served.
    let bundles = x509_bundles(&agent).await;
    assert!(!bundles.contains_key("evil.example"));

    // /metrics: each fetch counted by how it came out (each failure
    // above is counted before it is said), and the age of every bundle in
    // force, the bootstrap ones included; no series for another domain.
    let metrics = scrape_metrics(&agent).await;
    let fetches = |td: &str, outcome: &str| {
        sample(
            &metrics,
            &format!(
                "tether_federated_bundle_fetches_total{{trust_domain=\"{td}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    for (td, outcome) in [
        ("oversized.example", "too_large"),
        ("garbage.example", "invalid_document"),
        ("nokeys.example", "invalid_document"),
        ("older.example", "sequence_went_back"),
        ("stall.example", "timeout"),
        ("wrongtd.example", "tls"),
        ("fresh.example", "ok"),
        ("web.example", "ok"),
        ("web.example", "too_large"),
    ] {
        assert!(
            fetches(td, outcome).is_some_and(|n| n >= 1.0),
            "{td} {outcome}:\n{metrics}"
        );
    }
    assert_eq!(fetches("oversized.example", "ok"), None, "{metrics}");
    for td in expected.keys() {
        let age = sample(
            &metrics,
            &format!("tether_federated_bundle_age_seconds{{trust_domain=\"{td}\"}}"),
        );
        assert!(age.is_some_and(|a| a >= 0.0), "{td}:\n{metrics}");
    }
    assert!(!metrics.contains("evil.example"), "{metrics}");
    let own = TrustDomain::new("example.org").expect("td");
    assert!(bundles.contains_key(own.as_str()));
    agent.stop().await;
}

/// The agent's `/metrics` (its `[http]` endpoint), as text.
async fn scrape_metrics(agent: &TestAgent) -> String {
    let addr = agent.running().http_addr().expect("[http] is on");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the HTTP endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .expect("the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("the answer");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample `series` (name and labels) in `metrics`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// An agent of trust domain `td` with `extra` in its config.
async fn agent_of(td: &str, extra: &str) -> TestAgent {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = crate::common::config_text(dir.path(), extra)
        .replace(
            "trust_domain = \"example.org\"",
            &format!("trust_domain = \"{td}\""),
        )
        .replace("spiffe://example.org/", &format!("spiffe://{td}/"));
    let config = tether::config::Config::from_toml(&text, &tether::config::MapEnv::default())
        .expect("a valid config");
    let running = tether::daemon::start(config).await.expect("agent starts");
    let socket = running.socket_path().to_owned();
    TestAgent {
        running: Some(running),
        dir,
        socket,
    }
}

/// The agent's own bundle as a SPIFFE document (`tether bundle show`): the
/// out-of-band bootstrap a peer starts from.
async fn bundle_document(agent: &TestAgent) -> String {
    let socket = agent.running().admin_socket_path().display().to_string();
    let mut command = crate::common::cli::tether(&["bundle", "show"]);
    command.args(["--admin-socket", &socket]);
    let out = crate::common::cli::output(command, None).await;
    crate::common::cli::assert_exit(&out, 0);
    crate::common::cli::stdout(&out)
}

/// The JWT key ids the agent's Workload API serves for `td`.
async fn jwt_kids(agent: &TestAgent, td: &str) -> Vec<String> {
    let client = agent.spiffe_client().await;
    let set = client.fetch_jwt_bundles().await.expect("jwt bundles");
    let td = TrustDomain::new(td).expect("td");
    set.get(&td)
        .map(|b| {
            let mut kids: Vec<String> =
                b.jwt_authorities().map(|a| a.key_id().to_owned()).collect();
            kids.sort();
            kids
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn two_trust_domains_federate_through_their_endpoints_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port_a, port_b) = (free_port(), free_port());
    // B's https_web certificate, from a CA A is told to trust.
    let web_ca = TestCa::new();
    let (cert, key) = web_ca.server_cert(loopback_san());
    let (cert_path, key_path, ca_path) = (
        dir.path().join("b-cert.pem"),
        dir.path().join("b-key.pem"),
        dir.path().join("b-ca.pem"),
    );
    std::fs::write(&cert_path, pem::encode(&pem::Pem::new("CERTIFICATE", cert))).expect("write");
    std::fs::write(&key_path, pem::encode(&pem::Pem::new("PRIVATE KEY", key))).expect("write");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::write(&ca_path, web_ca.pem()).expect("write");

    // A: https_spiffe, JWT keys rotating every 90 s; it fetches B's bundle
    // (https_web), which is not up yet: A starts anyway and retries.
    let a = agent_of(
        "a.example",
        &format!(
            "jwt_svid_ttl = \"30s\"\n[authority]\njwt_key_ttl = \"90s\"\n\
             [bundle_endpoint]\nlisten = \"127.0.0.1:{port_a}\"\nprofile = \"https_spiffe\"\nrefresh_hint = \"10s\"\n\
             {}federates_with = [\"b.example\"]\n\
             [[federation]]\ntrust_domain = \"b.example\"\nbundle_endpoint_url = \"https://127.0.0.1:{port_b}/\"\n\
             bundle_endpoint_profile = \"https_web\"\nbundle_endpoint_ca_path = \"{}\"\n",
            entry_for_me("svc-a", "a"),
            ca_path.display()
        ),
    )
    .await;
    assert!(
        a.running()
            .readiness_problems()
            .iter()
            .any(|p| p.starts_with("federation b.example: no bundle yet")),
        "{:?}",
        a.running().readiness_problems()
    );
    // B: https_web; it fetches A's bundle over https_spiffe, from A's
    // bundle as the bootstrap.
    let bootstrap = dir.path().join("a-bootstrap.json");
    std::fs::write(&bootstrap, bundle_document(&a).await).expect("write");
    let b = agent_of(
        "b.example",
        &format!(
            "[bundle_endpoint]\nlisten = \"127.0.0.1:{port_b}\"\nprofile = \"https_web\"\n\
             cert_path = \"{}\"\nkey_path = \"{}\"\nrefresh_hint = \"10s\"\n\
             {}federates_with = [\"a.example\"]\n\
             [[federation]]\ntrust_domain = \"a.example\"\nbundle_path = \"{}\"\n\
             bundle_endpoint_url = \"https://127.0.0.1:{port_a}/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://a.example/tether/agent\"\n",
            cert_path.display(),
            key_path.display(),
            entry_for_me("svc-b", "b"),
            bootstrap.display()
        ),
    )
    .await;

    // Both fetched: each serves the other's bundle, and nothing is wrong.
    let a_x509 = x509_bundles(&a).await["a.example"].clone();
    eventually_within(
        FETCH_PATIENCE,
        "B serves A's X.509 bundle and is ready",
        async || {
            (x509_bundles(&b).await.get("a.example") == Some(&a_x509)
                && b.running().readiness_problems().is_empty())
            .then_some(())
        },
    )
    .await;
    let b_x509 = x509_bundles(&b).await["b.example"].clone();
    eventually_within(
        FETCH_PATIENCE,
        "A serves B's X.509 bundle and is ready",
        async || {
            (x509_bundles(&a).await.get("b.example") == Some(&b_x509)
                && a.running().readiness_problems().is_empty())
            .then_some(())
        },
    )
    .await;
    // A JWT-SVID of A validates on B's Workload API.
    let a_client = a.spiffe_client().await;
    let b_client = b.spiffe_client().await;
    let svid = a_client
        .fetch_jwt_svid(&["spiffe://b.example/svc-b"], None)
        .await
        .expect("A's JWT-SVID");
    let validated = b_client
        .validate_jwt_token("spiffe://b.example/svc-b", svid.token())
        .await
        .expect("B validates A's JWT-SVID with the fetched bundle");
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://a.example/svc-a"
    );

    // A rotates its JWT key; B follows through the endpoint alone.
    let before = jwt_kids(&a, "a.example").await;
    let successor = eventually_within(FETCH_PATIENCE, "A prepares a new JWT key", async || {
        jwt_kids(&a, "a.example")
            .await
            .into_iter()
            .find(|kid| !before.contains(kid))
    })
    .await;
    eventually_within(FETCH_PATIENCE, "B has A's new JWT key", async || {
        jwt_kids(&b, "a.example")
            .await
            .contains(&successor)
            .then_some(())
    })
    .await;
    let token = eventually_within(FETCH_PATIENCE, "A signs with its new key", async || {
        let svid = a_client
            .fetch_jwt_svid(&["spiffe://b.example/svc-b"], None)
            .await
            .ok()?;
        let header = jsonwebtoken::decode_header(svid.token()).ok()?;
        (header.kid.as_deref() == Some(successor.as_str())).then(|| svid.token().to_owned())
    })
    .await;
    b_client
        .validate_jwt_token("spiffe://b.example/svc-b", &token)
        .await
        .expect("B validates a JWT-SVID signed with A's rotated key");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_server_serves_the_fleets_bundle_to_a_federated_agent() {
    use crate::common::fleet::{FleetServer, TRUST_DOMAIN};
    let server = FleetServer::start(
        "127.0.0.1",
        "[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nprofile = \"https_spiffe\"\n",
    )
    .await;
    let addr = server
        .running()
        .bundle_endpoint_addr()
        .expect("the bundle endpoint's address");
    let dir = tempfile::tempdir().expect("tempdir");
    let bootstrap = dir.path().join("fleet.json");
    let document = server.bundle_json().await;
    // The bootstrap carries one more CA than the fleet's, at sequence 0: a
    // bundle without it can only have come from the endpoint.
    let extra_ca = TestCa::new();
    let mut bootstrap_doc: serde_json::Value = serde_json::from_str(&document).expect("json");
    bootstrap_doc["keys"]
        .as_array_mut()
        .expect("keys")
        .push(serde_json::json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [STANDARD.encode(&extra_ca.der)]}));
    bootstrap_doc["spiffe_sequence"] = serde_json::json!(0);
    std::fs::write(&bootstrap, bootstrap_doc.to_string()).expect("write");
    let agent = agent_of(
        "peer.example",
        &format!(
            "{}federates_with = [\"{TRUST_DOMAIN}\"]\n\
             [[federation]]\ntrust_domain = \"{TRUST_DOMAIN}\"\nbundle_path = \"{}\"\n\
             bundle_endpoint_url = \"https://{addr}/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://{TRUST_DOMAIN}/tether/server\"\n",
            entry_for_me("svc", "main"),
            bootstrap.display()
        ),
    )
    .await;
    // The endpoint answered (authenticated with the server's SVID) and
    // the agent serves the fleet's bundle from it.
    eventually_within(
        FETCH_PATIENCE,
        "the agent fetched the fleet's bundle",
        async || {
            let problems = problems_of(&agent, TRUST_DOMAIN);
            let bundles = x509_bundles(&agent).await;
            let fetched = bundles
                .get(TRUST_DOMAIN)
                .is_some_and(|cas| !cas.contains(&extra_ca.der));
            (problems.is_empty() && fetched).then_some(())
        },
    )
    .await;
    let served: serde_json::Value = {
        let bundles = x509_bundles(&agent).await;
        serde_json::json!(bundles[TRUST_DOMAIN].len())
    };
    let doc: serde_json::Value = serde_json::from_str(&document).expect("json");
    let x509_keys = doc["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .count();
    assert_eq!(served, serde_json::json!(x509_keys));
    agent.stop().await;
    server.stop().await;
}
