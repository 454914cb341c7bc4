//! `tether api ...`: the built binary against a real agent started in
//! this process, on a temporary socket. Exit codes and output are the
//! contract checked here; timeouts are failure guards only.

use crate::common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use common::PATIENCE;
use common::cli::{assert_exit, json, output, run, stderr, stdout, tether};
use tempfile::TempDir;
use tether::config::{Config, MapEnv};
use tether::daemon::{self, Running};
use x509_parser::prelude::*;

struct Agent {
    running: Running,
    dir: TempDir,
    socket: PathBuf,
}

impl Agent {
    /// An agent for example.org whose entries are `entries` (TOML).
    async fn start(entries: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Other uids (the `nobody` test) must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\ndata_dir = \"{}\"\n{entries}",
            dir.path().join("agent.sock").display(),
            dir.path().join("admin/admin.sock").display(),
            dir.path().join("data").display(),
        );
        let config = Config::from_toml(&text, &MapEnv::default()).unwrap();
        let running = daemon::start(config).await.unwrap();
        let socket = running.socket_path().to_owned();
        Self {
            running,
            dir,
            socket,
        }
    }

    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

fn entry(path: &str, uid: u32, extra: &str) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/{path}\"\nselectors = [\"unix:uid:{uid}\"]\nhint = \"{path}\"\n{extra}"
    )
}

fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_x509_names_the_identity_readable_and_json() {
    let agent = Agent::start(&format!(
        "{}{}",
        entry("svc", my_uid(), "dns_names = [\"svc.example.org\"]\n"),
        entry("other", my_uid(), ""),
    ))
    .await;

    let out = run(&["api", "fetch", "x509", "--socket", agent.socket()]).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("spiffe://example.org/svc"), "{text}");
    assert!(text.contains("svc.example.org"), "{text}");
    assert!(text.contains("Received 2 X.509-SVIDs"), "{text}");

    // Flags may come before the subcommand too; the socket as a URI.
    let uri = format!("unix://{}", agent.socket());
    let out = run(&["api", "--json", "fetch", "x509", "--socket", &uri]).await;
    assert_exit(&out, 0);
    let doc = json(&out);
    let ids: Vec<&str> = doc["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"spiffe://example.org/svc"), "{doc}");
    assert_eq!(doc["trust_domain_cas"], 1, "{doc}");
    assert_eq!(doc["files_written"], serde_json::json!([]), "{doc}");
    let svc = doc["svids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spiffe_id"] == "spiffe://example.org/svc")
        .unwrap();
    assert_eq!(svc["dns_names"], serde_json::json!(["svc.example.org"]));
    assert_eq!(svc["chain_length"], 1);
    assert!(svc["not_after"].as_str().unwrap().ends_with('Z'), "{svc}");

    // SPIFFE_ENDPOINT_SOCKET is read when --socket is absent.
    let mut command = tether(&["api", "fetch", "x509", "--json"]);
    command.env("SPIFFE_ENDPOINT_SOCKET", &uri);
    let out = output(command, None).await;
    assert_exit(&out, 0);
    json(&out);
    let mut command = tether(&["api", "fetch", "x509"]);
    command.env("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:8081");
    let out = output(command, None).await;
    assert_exit(&out, 64);
    assert!(
        stderr(&out).contains("only unix sockets are supported"),
        "{}",
        stderr(&out)
    );

    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_puts_chain_key_and_bundles_in_files() {
    // A federated trust domain, so that federated_bundle.<td>.pem appears.
    let dir = tempfile::tempdir().unwrap();
    let partner_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let partner_ca = params.self_signed(&partner_key).unwrap();
    let bundle_path = dir.path().join("partner.json");
    let bundle_json = serde_json::json!({
        "keys": [{
            "use": "x509-svid", "kty": "EC", "crv": "P-256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(partner_ca.der())],
        }],
        "spiffe_sequence": 1,
    });
    std::fs::write(&bundle_path, bundle_json.to_string()).unwrap();
    let agent = Agent::start(&format!(
        "{}[[federation]]\ntrust_domain = \"partner.example\"\nbundle_path = \"{}\"\n",
        entry("svc", my_uid(), "federates_with = [\"partner.example\"]\n"),
        bundle_path.display()
    ))
    .await;

    let out_dir = dir.path().join("creds");
    let out = run(&[
        "api",
        "fetch",
        "x509",
        "--socket",
        agent.socket(),
        "--write",
        out_dir.to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_exit(&out, 0);
    let doc = json(&out);
    let written: Vec<PathBuf> = doc["files_written"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    let want = [
        "svid.0.pem",
        "svid.0.key",
        "bundle.0.pem",
        "federated_bundle.partner.example.pem",
    ];
    assert_eq!(
        written,
        want.iter().map(|n| out_dir.join(n)).collect::<Vec<_>>()
    );
    assert_eq!(
        doc["federated_bundles"],
        serde_json::json!([{"trust_domain": "partner.example", "cas": 1}])
    );

    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out_dir.join("svid.0.key")), 0o600);
    let key = ::pem::parse(std::fs::read(out_dir.join("svid.0.key")).unwrap()).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    rcgen::KeyPair::try_from(key.contents()).expect("a usable PKCS#8 key");

    let pems = |name: &str| ::pem::parse_many(std::fs::read(out_dir.join(name)).unwrap()).unwrap();
    let chain = pems("svid.0.pem");
    let bundle = pems("bundle.0.pem");
    assert!(!chain.is_empty() && !bundle.is_empty());
    assert!(
        chain
            .iter()
            .chain(&bundle)
            .all(|p| p.tag() == "CERTIFICATE")
    );
    let (_, leaf) = X509Certificate::from_der(chain[0].contents()).unwrap();
    let issuer = bundle
        .iter()
        .map(|p| X509Certificate::from_der(p.contents()).unwrap().1)
        .find(|ca| ca.subject() == leaf.issuer())
        .expect("the leaf's issuer is in the bundle");
    leaf.verify_signature(Some(issuer.public_key()))
        .expect("the leaf is signed by the bundle's CA");
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://example.org/svc"]);
    let federated = pems("federated_bundle.partner.example.pem");
    assert_eq!(federated.len(), 1);
    assert_eq!(federated[0].contents(), partner_ca.der().as_ref());

    // Readable output lists the files too.
    let out = run(&[
        "api",
        "fetch",
        "x509",
        "--socket",
        agent.socket(),
        "--write",
        out_dir.to_str().unwrap(),
    ])
    .await;
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("svid.0.key"), "{}", stdout(&out));
    assert_eq!(mode(&out_dir.join("svid.0.key")), 0o600);

    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_token_only_feeds_validate() {
    let agent = Agent::start(&entry("svc", my_uid(), "")).await;
    let socket = agent.socket();

    let out = run(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "mcp",
        "--token-only",
        "--socket",
        socket,
    ])
    .await;
    assert_exit(&out, 0);
    let token = stdout(&out);
    assert!(token.ends_with('\n') && token.trim().split('.').count() == 3);
    let token = token.trim().to_owned();

    let out = run(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "mcp",
        "--token",
        &token,
        "--socket",
        socket,
    ])
    .await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.starts_with("valid\n"), "{text}");
    assert!(text.contains("spiffe://example.org/svc"), "{text}");
    assert!(text.contains("\"aud\""), "{text}");

    // From stdin, with the newline a shell pipe leaves.
    let out = output(
        tether(&[
            "api",
            "validate",
            "jwt",
            "--audience",
            "mcp",
            "--token",
            "-",
            "--socket",
            socket,
            "--json",
        ]),
        Some(format!("{token}\n")),
    )
    .await;
    assert_exit(&out, 0);
    let doc = json(&out);
    assert_eq!(doc["spiffe_id"], "spiffe://example.org/svc");
    assert_eq!(doc["claims"]["sub"], "spiffe://example.org/svc");
    assert_eq!(doc["claims"]["aud"], serde_json::json!(["mcp"]));
    assert!(doc["claims"]["exp"].is_i64(), "{doc}");

    let out = run(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "other",
        "--token",
        &token,
        "--socket",
        socket,
    ])
    .await;
    assert_exit(&out, 1);
    assert!(stdout(&out).is_empty());
    let reason = stderr(&out);
    assert!(reason.starts_with("tether: error: "), "{reason}");
    assert!(reason.to_lowercase().contains("audience"), "{reason}");

    let out = run(&[
        "api", "fetch", "jwt", "-a", "mcp", "-a", "api", "--socket", socket, "--json",
    ])
    .await;
    assert_exit(&out, 0);
    let doc = json(&out);
    assert_eq!(doc["svids"][0]["spiffe_id"], "spiffe://example.org/svc");
    assert_eq!(doc["svids"][0]["hint"], "svc");
    assert!(doc["svids"][0]["expires_at"].is_string(), "{doc}");
    assert!(doc["svids"][0]["token"].is_string(), "{doc}");

    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_show_cas_and_jwt_keys() {
    let agent = Agent::start(&entry("svc", my_uid(), "")).await;
    let out = run(&["api", "fetch", "bundles", "--socket", agent.socket()]).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("Trust domain: example.org"),
        "{}",
        stdout(&out)
    );

    let out = run(&[
        "api",
        "fetch",
        "bundles",
        "--socket",
        agent.socket(),
        "--json",
    ])
    .await;
    assert_exit(&out, 0);
    let doc = json(&out);
    let bundle = &doc["bundles"][0];
    assert_eq!(bundle["trust_domain"], "example.org");
    assert!(!bundle["x509_authorities"].as_array().unwrap().is_empty());
    assert!(bundle["x509_authorities"][0]["subject"].is_string());
    assert!(!bundle["jwt_authorities"].as_array().unwrap().is_empty());
    assert!(
        !bundle["jwt_authorities"][0]["kid"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_exits_69_with_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-home.sock");
    let socket = socket.to_str().unwrap();
    for args in [
        &["api", "fetch", "x509", "--socket", socket][..],
        &["api", "fetch", "jwt", "-a", "x", "--socket", socket],
        &["api", "watch", "--socket", socket],
    ] {
        let out = run(args).await;
        assert_exit(&out, 69);
        let message = stderr(&out);
        assert!(message.contains(socket), "{message}");
        assert!(message.contains("tether run"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }

    // Something listens but never speaks: the timeout turns a hang into 69.
    let silent = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let silent = silent.to_str().unwrap();
    let out = run(&[
        "api",
        "fetch",
        "x509",
        "--socket",
        silent,
        "--timeout",
        "200ms",
    ])
    .await;
    assert_exit(&out, 69);
    let message = stderr(&out);
    assert!(message.contains("did not answer within 200ms"), "{message}");
    assert!(message.contains(silent), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_caller_exits_77() {
    // The agent knows only root. As root, the CLI runs as nobody; as
    // anyone else, it is unregistered already.
    let agent = Agent::start(&entry("root-only", 0, "")).await;
    for args in [
        &["api", "fetch", "x509", "--socket", agent.socket()][..],
        &["api", "fetch", "jwt", "-a", "x", "--socket", agent.socket()],
    ] {
        let mut command = tether(args);
        if my_uid() == 0 {
            command.uid(65534).gid(65534);
        }
        let out = output(command, None).await;
        assert_exit(&out, 77);
        assert!(
            stderr(&out).contains("no identity issued"),
            "{}",
            stderr(&out)
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_json_lines_until_interrupted_or_the_agent_stops() {
    let agent = Agent::start(&entry("svc", my_uid(), "")).await;

    let spawn_watch = |socket: String| {
        tokio::task::spawn_blocking(move || {
            let mut child = tether(&["api", "watch", "--json", "--socket", &socket])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap());
            let mut first = String::new();
            lines.read_line(&mut first).unwrap();
            (child, lines, first)
        })
    };
    let first_line = |first: &str| {
        let doc: serde_json::Value = serde_json::from_str(first).unwrap();
        assert_eq!(doc["update"], 1, "{doc}");
        assert_eq!(doc["svids"][0]["spiffe_id"], "spiffe://example.org/svc");
        assert!(doc["received_at"].is_string());
    };

    // Ctrl-C ends it cleanly.
    let (mut child, _lines, first) =
        tokio::time::timeout(PATIENCE, spawn_watch(agent.socket().into()))
            .await
            .unwrap()
            .unwrap();
    first_line(&first);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().try_into().unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // The agent stopping ends the stream: unavailable, 69.
    let (child, _lines, first) = tokio::time::timeout(PATIENCE, spawn_watch(agent.socket().into()))
        .await
        .unwrap()
        .unwrap();
    first_line(&first);
    let Agent { running, dir, .. } = agent;
    running.stop().await.unwrap();
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert_exit(&out, 69);
    drop(dir);
}
