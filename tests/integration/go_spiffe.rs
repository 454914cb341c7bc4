//! A third client tether did not write: go-spiffe v2.9.0's `workloadapi`,
//! `jwtsvid` and `spiffetls` (`tests/go/cmd/workload-check`, built once per
//! test process by [`crate::common::go`]) against a real agent: X.509
//! contexts and SVIDs with hints and federated bundles, JWT-SVIDs for a
//! chosen SPIFFE ID, validation by the agent and offline, sources watching
//! short-lived SVIDs rotate, and mTLS between two workloads the agent tells
//! apart by executable path.
//!
//! Needs `go` and the Go module proxy: `#[ignore]`d for a plain `cargo
//! nextest run`; `scripts/test` (CI, root) runs them, and there a missing
//! `go` fails them with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::common::go::{self, GoServer};
use crate::common::{ForeignDomain, TestAgent, entry_for_me, unix_now};

const MAIN: &str = "spiffe://example.org/go/main";
const SECOND: &str = "spiffe://example.org/go/second";
const FEDERATED: &str = "example-federated.org";
const AUDIENCE: &str = "go-audience";

/// Two entries for this process (hints `main` and `second`), both
/// federating with [`FEDERATED`], whose bundle is `foreign`'s, in a file in
/// the returned directory (keep it as long as the agent); `ttls` goes first
/// (top-level keys).
async fn agent(foreign: &ForeignDomain, ttls: &str) -> (TestAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("federated.json");
    std::fs::write(&bundle, foreign.bundle_json("fed-key", 1)).expect("write the bundle");
    let federates = format!("federates_with = [\"{FEDERATED}\"]\n");
    let extra = format!(
        "{ttls}{}{federates}{}{federates}[[federation]]\ntrust_domain = \"{FEDERATED}\"\nbundle_path = \"{}\"\n",
        entry_for_me("go/main", "main"),
        entry_for_me("go/second", "second"),
        bundle.display()
    );
    (TestAgent::start(&extra).await, dir)
}

/// Runs `binary SUBCOMMAND -socket ENDPOINT ARGS` to its end off the
/// runtime (the command is built at once, so the future borrows nothing).
fn run_at(
    binary: PathBuf,
    agent: &TestAgent,
    subcommand: &str,
    args: &[&str],
) -> impl Future<Output = Output> + use<> {
    let mut command = Command::new(binary);
    command
        .arg(subcommand)
        .args(["-socket", &agent.endpoint()])
        .args(args)
        .stdin(Stdio::null());
    async move {
        tokio::task::spawn_blocking(move || command.output().expect("workload-check runs"))
            .await
            .expect("the run's thread")
    }
}

/// `workload-check SUBCOMMAND ...`, which must succeed: its JSON result.
async fn check(agent: &TestAgent, subcommand: &str, args: &[&str]) -> Value {
    let out = run_at(go::workload_check(), agent, subcommand, args).await;
    success(subcommand, &out)
}

/// `workload-check SUBCOMMAND ...`, which must fail: its error.
async fn refused(agent: &TestAgent, subcommand: &str, args: &[&str]) -> String {
    let out = run_at(go::workload_check(), agent, subcommand, args).await;
    failure(subcommand, &out)
}

fn success(what: &str, out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn failure(what: &str, out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{what} succeeded where it must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `(id, hint)` of each SVID in `doc["svids"]`, in order.
fn ids_and_hints(doc: &Value) -> Vec<(String, String)> {
    doc["svids"]
        .as_array()
        .expect("svids")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().expect("id").to_owned(),
                s["hint"].as_str().expect("hint").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs go and the Go module proxy: run scripts/test"]
async fn go_spiffe_fetches_the_x509_context_and_svids_with_federated_bundles() {
    let foreign = ForeignDomain::new();
    let (agent, _bundle_dir) = agent(&foreign, "").await;
    let served: Vec<(String, String)> = agent
        .spiffe_client()
        .await
        .fetch_all_x509_svids()
        .await
        .expect("the Rust client's X.509-SVIDs")
        .iter()
        .map(|s| (s.spiffe_id().to_string(), s.hint().unwrap_or("").to_owned()))
        .collect();
    let expected = vec![
        (MAIN.to_owned(), "main".to_owned()),
        (SECOND.to_owned(), "second".to_owned()),
    ];
    let mut sorted_served = served.clone();
    sorted_served.sort();
    assert_eq!(sorted_served, expected);

    // go-spiffe verified each SVID against the served bundles before printing.
    let context = check(&agent, "x509-context", &[]).await;
    assert_eq!(ids_and_hints(&context), served, "{context}");
    assert_eq!(
        context["trust_domains"],
        serde_json::json!([FEDERATED, "example.org"]),
        "{context}"
    );
    let svids = check(&agent, "x509-svids", &[]).await;
    assert_eq!(ids_and_hints(&svids), served, "{svids}");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs go and the Go module proxy: run scripts/test"]
async fn go_spiffe_fetches_and_validates_jwt_svids_online_and_offline() {
    let foreign = ForeignDomain::new();
    let (agent, _bundle_dir) = agent(&foreign, "").await;

    let first = check(&agent, "jwt", &["-audience", AUDIENCE]).await;
    assert_eq!(first["id"], MAIN, "the default is the first SVID: {first}");
    let chosen = check(&agent, "jwt", &["-audience", AUDIENCE, "-subject", SECOND]).await;
    assert_eq!(chosen["id"], SECOND, "{chosen}");
    assert_eq!(chosen["hint"], "second", "{chosen}");
    assert_eq!(
        chosen["audience"],
        serde_json::json!([AUDIENCE]),
        "{chosen}"
    );
    assert!(
        chosen["expiry"].as_u64().expect("expiry") > unix_now(),
        "{chosen}"
    );
    let token = chosen["token"].as_str().expect("token").to_owned();
    let stranger = "spiffe://example.org/go/nobody";
    let error = refused(
        &agent,
        "jwt",
        &["-audience", AUDIENCE, "-subject", stranger],
    )
    .await;
    assert!(!error.is_empty(), "a SPIFFE ID the caller has no entry for");

    // The agent and go-spiffe alone (against FetchJWTBundles) agree.
    for mode in ["validate", "offline"] {
        let valid = check(&agent, mode, &["-audience", AUDIENCE, "-token", &token]).await;
        assert_eq!(valid["id"], SECOND, "{mode}: {valid}");
        assert_eq!(
            valid["audience"],
            serde_json::json!([AUDIENCE]),
            "{mode}: {valid}"
        );
        refused(
            &agent,
            mode,
            &["-audience", "someone-else", "-token", &token],
        )
        .await;
        // A token of the federated domain, signed with its bundle's key.
        let peer = "spiffe://example-federated.org/peer";
        let federated = foreign.sign_jwt("fed-key", peer, AUDIENCE, unix_now() + 300);
        let valid = check(&agent, mode, &["-audience", AUDIENCE, "-token", &federated]).await;
        assert_eq!(valid["id"], peer, "{mode}: {valid}");
        // Forged: the federated domain's kid and key, claiming example.org.
        let forged = foreign.sign_jwt("fed-key", MAIN, AUDIENCE, unix_now() + 300);
        refused(&agent, mode, &["-audience", AUDIENCE, "-token", &forged]).await;
        // Forged: an unknown key under the agent's own name.
        let outsider = ForeignDomain::new().sign_jwt("fed-key", MAIN, AUDIENCE, unix_now() + 300);
        refused(&agent, mode, &["-audience", AUDIENCE, "-token", &outsider]).await;
    }
    let offline = check(
        &agent,
        "offline",
        &["-audience", AUDIENCE, "-token", &token],
    )
    .await;
    assert_eq!(
        offline["trust_domains"],
        serde_json::json!([FEDERATED, "example.org"]),
        "{offline}"
    );
    agent.stop().await;
}

/// Each `seen` entry's `key`, checking that `expiry` rises strictly.
fn rotations(doc: &Value, key: &str) -> Vec<String> {
    let seen = doc["seen"].as_array().expect("seen");
    let expiries: Vec<u64> = seen
        .iter()
        .map(|s| s["expiry"].as_u64().expect("expiry"))
        .collect();
    assert!(
        expiries.windows(2).all(|w| w[0] < w[1]),
        "each replacement expires later: {doc}"
    );
    seen.iter()
        .map(|s| s[key].as_str().expect("key").to_owned())
        .collect()
}

#[tokio::test]
#[ignore = "needs go and the Go module proxy: run scripts/test"]
async fn go_spiffe_sources_see_short_lived_svids_rotate() {
    let foreign = ForeignDomain::new();
    let (agent, _bundle_dir) =
        agent(&foreign, "x509_svid_ttl = \"2s\"\njwt_svid_ttl = \"2s\"\n").await;
    let x509 = check(&agent, "watch-x509", &["-rotations", "2"]).await;
    let serials = rotations(&x509, "serial");
    assert_eq!(serials.len(), 3, "{x509}");
    let mut distinct = serials.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "a new certificate each time: {x509}");
    assert!(
        x509["seen"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] == MAIN),
        "{x509}"
    );

    let jwt = check(
        &agent,
        "watch-jwt",
        &["-audience", AUDIENCE, "-rotations", "2"],
    )
    .await;
    let ids = rotations(&jwt, "id");
    assert_eq!(ids, vec![MAIN; 3], "{jwt}");
    agent.stop().await;
}

/// A copy of workload-check at `dir/name/workload-check`: the agent tells
/// the copies apart by executable path.
fn copy_as(dir: &Path, name: &str) -> PathBuf {
    let home = dir.join(name);
    std::fs::create_dir(&home).expect("mkdir");
    let binary = home.join("workload-check");
    std::fs::copy(go::workload_check(), &binary).expect("copy workload-check");
    binary
}

// The agent runs in this process: reading the server's output blocks, so
// it runs in `block_in_place` while another worker serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs go and the Go module proxy: run scripts/test"]
async fn go_spiffe_mtls_between_two_workloads_authorizes_by_id() {
    let bins = tempfile::tempdir().expect("tempdir");
    let server_bin = copy_as(bins.path(), "server");
    let client_bin = copy_as(bins.path(), "client");
    let server_id = "spiffe://example.org/go/server";
    let client_id = "spiffe://example.org/go/client";
    let entry = |id: &str, bin: &Path| {
        format!(
            "[[entries]]\nspiffe_id = \"{id}\"\nselectors = [\"unix:path:{}\"]\n",
            bin.display()
        )
    };
    let agent = TestAgent::start(&format!(
        "{}{}",
        entry(server_id, &server_bin),
        entry(client_id, &client_bin)
    ))
    .await;

    let serve = |authorize: &str| {
        let mut command = Command::new(&server_bin);
        command.args(["serve", "-socket", &agent.endpoint(), "-timeout", "120s"]);
        command.args(["-listen", "127.0.0.1:0", "-authorize", authorize]);
        tokio::task::block_in_place(|| GoServer::spawn(command))
    };
    let dial = |addr: String, authorize: &'static str| {
        run_at(
            client_bin.clone(),
            &agent,
            "dial",
            &["-addr", &addr, "-authorize", authorize],
        )
    };
    let mut server = serve(client_id);

    let out = dial(server.addr.clone(), server_id).await;
    let dialed = success("dial", &out);
    assert_eq!(dialed["server"], server_id, "{dialed}");
    assert_eq!(dialed["reply"], format!("hello {client_id}"), "{dialed}");
    let accepted: Value = serde_json::from_str(&tokio::task::block_in_place(|| server.next_line()))
        .expect("the server's JSON");
    assert_eq!(accepted["peer"], client_id, "{accepted}");
    assert_eq!(accepted["line"], "ping", "{accepted}");

    // The client authorizes another server ID: it refuses the handshake.
    let error = failure("dial", &dial(server.addr.clone(), SECOND).await);
    assert!(error.contains("unexpected ID"), "{error}");
    let rejected: Value = serde_json::from_str(&tokio::task::block_in_place(|| server.next_line()))
        .expect("the server's JSON");
    assert!(rejected["error"].is_string(), "{rejected}");

    // The server authorizes another client ID: the client is refused.
    let picky = serve(SECOND);
    failure("dial", &dial(picky.addr.clone(), server_id).await);
    drop((server, picky));
    agent.stop().await;
}
