//! Federation with the reference implementation: a tether trust domain
//! (`tether.test`, an agent in this process) and a SPIRE v1.13.3 trust
//! domain (`spire.test`, a real `spire-server` and `spire-agent` from
//! [`crate::common::spire`]) fetch each other's bundles from each other's
//! bundle endpoints, over `https_spiffe` and over `https_web`, and then
//! trust each other's SVIDs: JWT-SVIDs validate across (tether's
//! ValidateJWTSVID, go-spiffe offline against SPIRE's JWT bundles, SPIRE's
//! ValidateJWTSVID) and a tether workload and a SPIRE workload complete
//! mTLS with go-spiffe's `spiffetls` (`tests/go/cmd/workload-check`).
//!
//! Each side's bootstrap holds the other's X.509 authorities only: the JWT
//! keys a side ends up with can only have come from the other's endpoint.
//!
//! What SPIRE does that shapes these tests (v1.13.3 source):
//! - Creating a federation relationship triggers the server's first fetch
//!   at once (`pkg/server/api/trustdomain/v1/service.go`,
//!   `TriggerConfigReload`); later fetches come every quarter of the served
//!   refresh hint, which it rounds up to one minute
//!   (`pkg/server/bundle/client/manager.go`, `attemptsPerRefreshHint`;
//!   `pkg/common/bundleutil/refreshhint.go`, `MinimumRefreshHint`), so
//!   nothing here waits for a second fetch.
//! - Its `https_spiffe` client needs the peer's bundle already in the
//!   datastore (`pkg/server/bundle/client/updater.go`, `newClient`): it is
//!   set with `spire-server bundle set`. An entry that federates with a
//!   domain is refused until the server holds that domain's bundle.
//! - Its `https_web` client is Go's default HTTP transport
//!   (`pkg/server/bundle/client/client.go`, `NewClient`), so it verifies
//!   against the process's system roots: the test gives the server process
//!   alone `SSL_CERT_FILE` (which Go's `crypto/x509` honours on Linux) with
//!   the test CA of tether's endpoint certificate.
//! - Its `https_web` bundle endpoint serves a certificate from files
//!   (`serving_cert_file`, besides ACME).
//!
//! Needs SPIRE's binaries (`scripts/spire build`, `TETHER_SPIRE_BIN`), `go`
//! and the Go module proxy: `#[ignore]`d for a plain `cargo nextest run`;
//! `scripts/test` runs this module when the binaries are there and says
//! that it skips it otherwise.

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use spiffe::TrustDomain;
use tempfile::TempDir;
use tether::config::{Config, MapEnv};

use crate::common::ca::{TestCa, loopback_san};
use crate::common::go::{self, GoServer};
use crate::common::spire::{
    PeerProfile, ServedProfile, ServerOptions, SpireAgent, SpireServer, not_yet,
};
use crate::common::{TestAgent, eventually_within, free_port, uid};

const TETHER_TD: &str = "tether.test";
const SPIRE_TD: &str = "spire.test";
/// The ID tether's agent presents on its `https_spiffe` bundle endpoint.
const TETHER_AGENT_ID: &str = "spiffe://tether.test/tether/agent";
/// This test process, as tether's workload.
const TETHER_WORKLOAD: &str = "spiffe://tether.test/workload";
/// This test process's children, as SPIRE's workload.
const SPIRE_WORKLOAD: &str = "spiffe://spire.test/workload";
const AUDIENCE: &str = "spire-federation";

/// A hang guard for the fetches and syncs each side makes at its own pace
/// (SPIRE's agent syncs with its server every few seconds); never a
/// performance assertion.
const PATIENCE: Duration = Duration::from_secs(120);

/// Starts a tether agent of [`TETHER_TD`] with `extra` appended to its
/// config.
async fn start_tether(extra: &str) -> TestAgent {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "trust_domain = \"{TETHER_TD}\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\n\
         data_dir = \"{}\"\nlog.level = \"warn\"\n{extra}",
        dir.path().join("agent.sock").display(),
        dir.path().join("admin/admin.sock").display(),
        dir.path().join("data").display(),
    );
    let config = Config::from_toml(&text, &MapEnv::default()).expect("a valid config");
    tether::telemetry::init(&config.log);
    let running = tether::daemon::start(config).await.expect("tether starts");
    TestAgent {
        socket: running.socket_path().to_owned(),
        running: Some(running),
        dir,
    }
}

/// tether's `[[entries]]` for this process ([`TETHER_WORKLOAD`]), federating
/// with SPIRE's domain, and its `[[federation]]` for that domain: fetched
/// from `url` over `profile` (`https_spiffe` or `https_web`) with `extra`
/// keys of that profile.
fn tether_federation(url: &str, profile: &str, extra: &str) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"{TETHER_WORKLOAD}\"\nselectors = [\"unix:uid:{}\"]\n\
         federates_with = [\"{SPIRE_TD}\"]\n\
         [[federation]]\ntrust_domain = \"{SPIRE_TD}\"\nbundle_endpoint_url = \"{url}\"\n\
         bundle_endpoint_profile = \"{profile}\"\n{extra}",
        uid()
    )
}

/// tether's own bundle document, from its admin API.
async fn tether_bundle(agent: &TestAgent) -> Value {
    let bundle = agent
        .admin()
        .await
        .get_bundle(tether::proto::admin::GetBundleRequest {})
        .await
        .expect("GetBundle")
        .into_inner();
    serde_json::from_str(&bundle.spiffe_json).expect("a SPIFFE bundle document")
}

/// `document` with its X.509 authorities only: a bootstrap bundle, so that
/// the JWT keys a side holds later can only have come from the endpoint.
fn x509_only(document: &Value) -> Value {
    let mut document = document.clone();
    document["keys"]
        .as_array_mut()
        .expect("keys")
        .retain(|key| key["use"] == "x509-svid");
    document
}

/// The keys of a bundle document: its X.509 authorities (base64 DER) and
/// its JWT key ids, each sorted.
#[derive(Debug, PartialEq, Eq)]
struct Keys {
    x509: Vec<String>,
    jwt: Vec<String>,
}

impl Keys {
    /// The keys of a side's own bundle: it has both kinds.
    fn complete(document: &Value) -> Self {
        let keys = Self::of(document);
        assert!(
            !keys.x509.is_empty() && !keys.jwt.is_empty(),
            "a bundle with both kinds of keys: {document}"
        );
        keys
    }

    fn of(document: &Value) -> Self {
        let keys = document["keys"].as_array().expect("keys");
        let of_use = |wanted: &str, field: &dyn Fn(&Value) -> String| {
            let mut found: Vec<String> = keys
                .iter()
                .filter(|key| key["use"] == wanted)
                .map(field)
                .collect();
            found.sort();
            found
        };
        Self {
            x509: of_use("x509-svid", &|key| {
                key["x5c"][0].as_str().expect("x5c").to_owned()
            }),
            jwt: of_use("jwt-svid", &|key| {
                key["kid"].as_str().expect("kid").to_owned()
            }),
        }
    }

    /// The keys of `td` tether's Workload API serves this process
    /// (FetchX509Bundles and FetchJWTBundles).
    async fn served_by(agent: &TestAgent, td: &str) -> Self {
        let client = agent.spiffe_client().await;
        let td = TrustDomain::new(td).expect("a trust domain");
        let x509 = client.fetch_x509_bundles().await.expect("FetchX509Bundles");
        let mut x509: Vec<String> = x509
            .get(&td)
            .map(|b| {
                b.authorities()
                    .iter()
                    .map(|a| STANDARD.encode(a.as_bytes()))
                    .collect()
            })
            .unwrap_or_default();
        x509.sort();
        let jwt = client.fetch_jwt_bundles().await.expect("FetchJWTBundles");
        let mut jwt: Vec<String> = jwt
            .get(&td)
            .map(|b| b.jwt_authorities().map(|a| a.key_id().to_owned()).collect())
            .unwrap_or_default();
        jwt.sort();
        Self { x509, jwt }
    }
}

/// Waits until tether serves SPIRE's bundle as SPIRE's server has it.
async fn until_tether_has_spires_bundle(tether: &TestAgent, spire: &mut SpireServer) {
    let expected = Keys::complete(&spire.bundle().await);
    eventually_within(
        PATIENCE,
        format!("tether to serve {SPIRE_TD}'s keys {expected:?}, from SPIRE's endpoint"),
        async || {
            let served = Keys::served_by(tether, SPIRE_TD).await;
            if served == expected {
                Ok(())
            } else {
                not_yet(format!("{served:?}")).await
            }
        },
    )
    .await;
}

/// Waits until SPIRE's server holds tether's bundle as tether serves it.
async fn until_spire_has_tethers_bundle(spire: &mut SpireServer, tether: &TestAgent) {
    let expected = Keys::complete(&tether_bundle(tether).await);
    eventually_within(
        PATIENCE,
        format!("SPIRE's server to hold {TETHER_TD}'s keys {expected:?}, from tether's endpoint"),
        async || match spire
            .federated_bundle(TETHER_TD)
            .await
            .map(|b| Keys::of(&b))
        {
            Ok(held) if held == expected => Ok(()),
            Ok(held) => not_yet(format!("{held:?}")).await,
            Err(why) => not_yet(why).await,
        },
    )
    .await;
}

/// Both domains federated over `https_spiffe`, and SPIRE's agent, with an
/// entry for this process's children federating with tether's domain.
struct Federated {
    // SPIRE's agent goes before its server.
    spire_agent: SpireAgent,
    spire: SpireServer,
    tether: TestAgent,
    _dir: TempDir,
}

impl Federated {
    /// Stops SPIRE (its agent first), then tether.
    async fn stop(self) {
        let Self {
            spire_agent,
            spire,
            tether,
            _dir,
        } = self;
        drop((spire_agent, spire));
        tether.stop().await;
    }
}

/// tether and SPIRE each serve a bundle endpoint over `https_spiffe`,
/// bootstrapped with the other's X.509 authorities, and fetch the other's
/// until each holds all of the other's keys.
async fn federated_over_https_spiffe() -> Federated {
    go::workload_check();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spire = SpireServer::start(ServerOptions {
        trust_domain: SPIRE_TD,
        bundle_endpoint: Some(ServedProfile::HttpsSpiffe),
        ssl_cert_file: None,
    })
    .await;

    // tether: SPIRE's X.509 authorities as the bootstrap, the rest fetched.
    let bootstrap = dir.path().join("spire.test.json");
    std::fs::write(&bootstrap, x509_only(&spire.bundle().await).to_string()).expect("write");
    let port = free_port();
    let tether = start_tether(&format!(
        "[bundle_endpoint]\nlisten = \"127.0.0.1:{port}\"\nprofile = \"https_spiffe\"\n\
         refresh_hint = \"10s\"\n{}",
        tether_federation(
            &spire.bundle_endpoint_url().expect("SPIRE's endpoint"),
            "https_spiffe",
            &format!(
                "endpoint_spiffe_id = \"{}\"\nbundle_path = \"{}\"\n",
                spire.id(),
                bootstrap.display()
            ),
        )
    ))
    .await;

    // SPIRE: tether's X.509 authorities as the bootstrap, the rest fetched.
    spire
        .set_federated_bundle(TETHER_TD, &x509_only(&tether_bundle(&tether).await))
        .await;
    spire
        .federate_with(
            TETHER_TD,
            &format!("https://127.0.0.1:{port}/"),
            PeerProfile::HttpsSpiffe {
                endpoint_id: TETHER_AGENT_ID,
            },
        )
        .await;

    until_tether_has_spires_bundle(&tether, &mut spire).await;
    until_spire_has_tethers_bundle(&mut spire, &tether).await;

    let spire_agent = spire.start_agent().await;
    spire
        .create_entry(
            SPIRE_WORKLOAD,
            &[&format!("unix:uid:{}", uid())],
            &[TETHER_TD],
        )
        .await;
    Federated {
        spire_agent,
        spire,
        tether,
        _dir: dir,
    }
}

/// `workload-check SUBCOMMAND -socket ENDPOINT ARGS`, run to its end off
/// the runtime: its JSON on success, else its exit and stderr.
async fn workload_check(endpoint: &str, subcommand: &str, args: &[&str]) -> Result<Value, String> {
    let mut command = Command::new(go::workload_check());
    command
        .arg(subcommand)
        .args(["-socket", endpoint])
        .args(args)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || command.output().expect("workload-check runs"))
        .await
        .expect("the run's thread");
    if !out.status.success() {
        return Err(format!(
            "workload-check {subcommand}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "workload-check {subcommand} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Waits until SPIRE's agent serves this process's children
/// [`SPIRE_WORKLOAD`] with both domains' bundles in its X.509 context.
async fn until_spire_serves_the_workload(federated: &mut Federated) {
    let endpoint = federated.spire_agent.endpoint();
    let agent = &mut federated.spire_agent;
    let context = eventually_within(
        PATIENCE,
        format!("SPIRE's agent to serve {SPIRE_WORKLOAD} with {TETHER_TD}'s bundle"),
        async || {
            agent.assert_running();
            match workload_check(&endpoint, "x509-context", &[]).await {
                Ok(context)
                    if context["trust_domains"] == serde_json::json!([SPIRE_TD, TETHER_TD]) =>
                {
                    Ok(context)
                }
                Ok(context) => not_yet(context.to_string()).await,
                Err(why) => not_yet(why).await,
            }
        },
    )
    .await;
    assert_eq!(context["svids"][0]["id"], SPIRE_WORKLOAD, "{context}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SPIRE v1.13.3 binaries (scripts/spire build; TETHER_SPIRE_BIN)"]
async fn tether_and_spire_federate_over_https_spiffe_and_validate_each_others_jwt_svids() {
    let mut federated = federated_over_https_spiffe().await;
    until_spire_serves_the_workload(&mut federated).await;
    let Federated {
        spire_agent,
        tether,
        ..
    } = &federated;
    let spire_socket = spire_agent.endpoint();
    let client = tether.spiffe_client().await;

    // A SPIRE JWT-SVID, validated by tether's ValidateJWTSVID.
    let spire_jwt = workload_check(&spire_socket, "jwt", &["-audience", AUDIENCE])
        .await
        .expect("a JWT-SVID from SPIRE's agent");
    assert_eq!(spire_jwt["id"], SPIRE_WORKLOAD, "{spire_jwt}");
    let token = spire_jwt["token"].as_str().expect("token");
    let validated = client
        .validate_jwt_token(AUDIENCE, token)
        .await
        .expect("tether validates SPIRE's JWT-SVID");
    assert_eq!(validated.spiffe_id().to_string(), SPIRE_WORKLOAD);
    client
        .validate_jwt_token("someone-else", token)
        .await
        .expect_err("tether refuses it for another audience");

    // A tether JWT-SVID, validated by go-spiffe offline against the JWT
    // bundles SPIRE's agent serves, and by SPIRE's ValidateJWTSVID.
    let token = client
        .fetch_jwt_token([AUDIENCE], None)
        .await
        .expect("a JWT-SVID from tether");
    let args = ["-audience", AUDIENCE, "-token", &token];
    let offline = workload_check(&spire_socket, "offline", &args)
        .await
        .expect("go-spiffe validates tether's JWT-SVID against SPIRE's JWT bundles");
    assert_eq!(offline["id"], TETHER_WORKLOAD, "{offline}");
    assert_eq!(
        offline["trust_domains"],
        serde_json::json!([SPIRE_TD, TETHER_TD]),
        "{offline}"
    );
    let validated = workload_check(&spire_socket, "validate", &args)
        .await
        .expect("SPIRE's agent validates tether's JWT-SVID");
    assert_eq!(validated["id"], TETHER_WORKLOAD, "{validated}");
    let refused = ["-audience", "someone-else", "-token", &token];
    workload_check(&spire_socket, "offline", &refused)
        .await
        .expect_err("go-spiffe refuses it for another audience");

    assert!(
        tether.running().readiness_problems().is_empty(),
        "{:?}",
        tether.running().readiness_problems()
    );
    federated.stop().await;
}

// tether runs in this process: reading the Go server's output blocks, so it
// runs in `block_in_place` while another worker serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SPIRE v1.13.3 binaries (scripts/spire build; TETHER_SPIRE_BIN)"]
async fn a_tether_workload_and_a_spire_workload_complete_mtls() {
    let mut federated = federated_over_https_spiffe().await;
    until_spire_serves_the_workload(&mut federated).await;
    let (spire_socket, tether_socket) = (
        federated.spire_agent.endpoint(),
        federated.tether.endpoint(),
    );

    // The SPIRE workload serves, accepting the tether workload only.
    let mut server = {
        let mut command = Command::new(go::workload_check());
        command.args(["serve", "-socket", &spire_socket, "-timeout", "120s"]);
        command.args(["-listen", "127.0.0.1:0", "-authorize", TETHER_WORKLOAD]);
        tokio::task::block_in_place(|| GoServer::spawn(command))
    };
    // The tether workload dials, accepting the SPIRE workload only.
    let dialed = workload_check(
        &tether_socket,
        "dial",
        &["-addr", &server.addr, "-authorize", SPIRE_WORKLOAD],
    )
    .await
    .expect("the tether workload completes mTLS with the SPIRE workload");
    assert_eq!(dialed["server"], SPIRE_WORKLOAD, "{dialed}");
    assert_eq!(
        dialed["reply"],
        format!("hello {TETHER_WORKLOAD}"),
        "{dialed}"
    );
    let accepted: Value = serde_json::from_str(&tokio::task::block_in_place(|| server.next_line()))
        .expect("the server's JSON");
    assert_eq!(accepted["peer"], TETHER_WORKLOAD, "{accepted}");
    assert_eq!(accepted["line"], "ping", "{accepted}");

    // The tether workload expects another server ID: it refuses SPIRE's.
    let error = workload_check(
        &tether_socket,
        "dial",
        &[
            "-addr",
            &server.addr,
            "-authorize",
            "spiffe://spire.test/someone-else",
        ],
    )
    .await
    .expect_err("a server of another ID is refused");
    assert!(error.contains("unexpected ID"), "{error}");

    drop(server);
    federated.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SPIRE v1.13.3 binaries (scripts/spire build; TETHER_SPIRE_BIN)"]
async fn tether_and_spire_federate_over_https_web() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each side's endpoint has a web certificate of its own CA; each side
    // is given the other's CA only.
    let (spire_web_ca, tether_web_ca) = (TestCa::new(), TestCa::new());
    let (spire_cert, spire_key) =
        spire_web_ca.write_server_cert(loopback_san(), dir.path(), "spire-web");
    let (tether_cert, tether_key) =
        tether_web_ca.write_server_cert(loopback_san(), dir.path(), "tether-web");
    let spire_web_ca_path = spire_web_ca.write_pem(dir.path(), "spire-web-ca.pem");
    let tether_web_ca_path = tether_web_ca.write_pem(dir.path(), "tether-web-ca.pem");

    let mut spire = SpireServer::start(ServerOptions {
        trust_domain: SPIRE_TD,
        bundle_endpoint: Some(ServedProfile::HttpsWeb {
            cert_path: spire_cert,
            key_path: spire_key,
        }),
        ssl_cert_file: Some(tether_web_ca_path.into()),
    })
    .await;
    let port = free_port();
    let tether = start_tether(&format!(
        "[bundle_endpoint]\nlisten = \"127.0.0.1:{port}\"\nprofile = \"https_web\"\n\
         cert_path = \"{tether_cert}\"\nkey_path = \"{tether_key}\"\nrefresh_hint = \"10s\"\n{}",
        tether_federation(
            &spire.bundle_endpoint_url().expect("SPIRE's endpoint"),
            "https_web",
            &format!("bundle_endpoint_ca_path = \"{spire_web_ca_path}\"\n"),
        )
    ))
    .await;
    // No bootstrap on either side: Web PKI authenticates the endpoints.
    spire
        .federate_with(
            TETHER_TD,
            &format!("https://127.0.0.1:{port}/"),
            PeerProfile::HttpsWeb,
        )
        .await;

    until_tether_has_spires_bundle(&tether, &mut spire).await;
    until_spire_has_tethers_bundle(&mut spire, &tether).await;
    assert!(
        tether.running().readiness_problems().is_empty(),
        "{:?}",
        tether.running().readiness_problems()
    );
    drop(spire);
    tether.stop().await;
}
