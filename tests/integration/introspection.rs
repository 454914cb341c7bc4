//! Token introspection (RFC 7662) from a relying party without tether: a
//! Python client (`tests/py/introspect.py`, the standard library's urllib
//! and ssl, its X.509-SVID from py-spiffe) POSTs tokens to a standalone
//! agent's endpoint over mutual TLS.
//!
//! Needs `TETHER_TEST_PYTHON` pointing at a Python with py-spiffe
//! installed (as `py_spiffe.rs`).

use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tether::audit::{EventKind, Outcome, ReadFilter};
use tether::proto::task as pb;

use crate::common::{TestAgent, claims_of, entry_for_me, eventually};

/// The relying party: an MCP server whose SVID the Python client presents.
const JIRA: &str = "spiffe://example.org/mcp/jira";
const OWNER: &str = "spiffe://example.org/agent";
const FORM: &str = "application/x-www-form-urlencoded";

fn python() -> String {
    std::env::var("TETHER_TEST_PYTHON").expect(
        "TETHER_TEST_PYTHON must name a python with py-spiffe installed (scripts/test sets it up)",
    )
}

/// An agent serving this process as the task owner and as the MCP server,
/// with introspection at `rate`/`burst`.
async fn agent(rate: u32, burst: u32) -> TestAgent {
    let extra = format!(
        "{}{}[introspection]\nlisten = \"127.0.0.1:0\"\nrequests_per_second = {rate}\nburst = {burst}\n",
        entry_for_me("agent", "agent"),
        entry_for_me("mcp/jira", "mcp"),
    );
    TestAgent::start(&extra).await
}

/// Runs the Python client as `spiffe_id` with `requests`; its results.
async fn introspect(
    agent: &TestAgent,
    spiffe_id: &str,
    client_cert: bool,
    requests: Value,
) -> Vec<Value> {
    let addr = agent
        .running()
        .relying_party_addrs()
        .introspection
        .expect("[introspection] is set");
    let url = format!("https://{addr}/introspect");
    run_client(&url, &agent.endpoint(), spiffe_id, client_cert, requests).await
}

/// Runs the Python client (`tests/py/introspect.py`) against `url` as
/// `spiffe_id`, its SVID from the Workload API at `endpoint`, with
/// `requests`; its results, one per request.
pub async fn run_client(
    url: &str,
    endpoint: &str,
    spiffe_id: &str,
    client_cert: bool,
    requests: Value,
) -> Vec<Value> {
    let (url, endpoint, spiffe_id) = (url.to_owned(), endpoint.to_owned(), spiffe_id.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(python());
        command
            .arg(format!(
                "{}/tests/py/introspect.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args([&url, &spiffe_id])
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !client_cert {
            command.arg("--no-client-cert");
        }
        let mut child = command.spawn().expect("python runs");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(requests.to_string().as_bytes())
                .expect("requests written");
        }
        child.wait_with_output().expect("python finishes")
    })
    .await
    .expect("the client's job");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    parsed["results"].as_array().expect("results").clone()
}

/// A request introspecting `token` (a form, as RFC 7662 has it).
pub fn form(token: &str) -> Value {
    json!({ "body": format!("token={token}"), "content_type": FORM })
}

async fn begin_task(agent: &TestAgent) -> pb::BeginTaskResponse {
    agent
        .tasks()
        .await
        .begin_task(pb::BeginTaskRequest {
            audience: JIRA.into(),
            intent: "triage the open tickets".into(),
            tools: vec!["jira.search".into(), "jira.read".into()],
            ..Default::default()
        })
        .await
        .expect("a task begins")
        .into_inner()
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

#[tokio::test]
#[ignore = "needs a venv with py-spiffe: run scripts/test"]
async fn a_relying_party_introspects_over_mutual_tls() {
    let agent = agent(1000, 1000).await;
    let begun = begin_task(&agent).await;
    let task_token = begun.token.expect("a token").token;
    let for_jira = jwt_svid(&agent, JIRA).await;
    let for_other = jwt_svid(&agent, "spiffe://example.org/other").await;

    let results = introspect(
        &agent,
        JIRA,
        true,
        json!([
            form(&task_token),
            form(&for_jira),
            form(&for_other),
            form("not.a.token"),
            { "body": format!("token={}", "a".repeat(20 * 1024)), "content_type": FORM },
            { "body": format!("token={task_token}"), "content_type": "application/json" },
            { "body": "token_type_hint=access_token", "content_type": FORM },
            { "body": "", "content_type": null, "method": "GET" },
        ]),
    )
    .await;

    // The task token, for its audience: active, with its claims.
    let task = &results[0];
    assert_eq!(task["status"], 200, "{task}");
    assert_eq!(task["headers"]["cache-control"], "no-store", "{task}");
    assert!(
        task["headers"]["content-type"]
            .as_str()
            .is_some_and(|t| t.starts_with("application/json")),
        "{task}"
    );
    let answer = &task["json"];
    let claims = claims_of(&task_token);
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["token_kind"], "task");
    assert_eq!(answer["sub"], OWNER);
    assert_eq!(answer["aud"], json!([JIRA]));
    assert_eq!(answer["txn"], begun.task_id.as_str());
    assert_eq!(answer["scope"], "jira.search jira.read");
    for claim in ["iss", "jti", "exp", "iat", "nbf", "tctx"] {
        assert_eq!(answer[claim], claims[claim], "{claim}");
    }
    assert!(answer.get("rctx").is_none(), "{answer}");

    // A JWT-SVID for the caller: active; for someone else: inactive, and
    // nothing else said. Garbage: inactive.
    let jwt = &results[1]["json"];
    assert_eq!(jwt["active"], true, "{jwt}");
    assert_eq!(jwt["token_kind"], "jwt-svid");
    assert_eq!(jwt["aud"], json!([JIRA]));
    assert_eq!(results[2]["json"], json!({ "active": false }));
    assert_eq!(results[3]["json"], json!({ "active": false }));
    // A token over 16 KiB, another media type, no token, another method.
    assert_eq!(results[4]["status"], 400, "{}", results[4]);
    assert_eq!(results[5]["status"], 415, "{}", results[5]);
    assert_eq!(results[6]["status"], 400, "{}", results[6]);
    assert_eq!(results[6]["json"]["error"], "invalid_request");
    assert_eq!(results[7]["status"], 405, "{}", results[7]);

    // A body over the kit's 64 KiB: 413. The kit answers before reading
    // the rest and closes, so a client that writes its whole body first
    // (urllib) may see the connection reset instead of the answer: asked
    // until the answer is read.
    eventually("an oversized body is answered 413", async || {
        let big =
            json!([{ "body": format!("token={}", "a".repeat(70 * 1024)), "content_type": FORM }]);
        let results = introspect(&agent, JIRA, true, big).await;
        results[0]["status"] == 413
    })
    .await;

    // The task ends: its token goes inactive.
    agent
        .tasks()
        .await
        .end_task(pb::EndTaskRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .expect("the owner ends its task");
    eventually("the ended task's token is inactive", async || {
        let results = introspect(&agent, JIRA, true, json!([form(&task_token)])).await;
        results[0]["json"] == json!({ "active": false })
    })
    .await;

    // Without a client certificate the handshake fails: no HTTP answer.
    let results = introspect(&agent, JIRA, false, json!([form(&for_jira)])).await;
    assert!(results[0].get("error").is_some(), "{}", results[0]);

    // Every introspection is in the trail: who asked, about what, and how
    // it came out.
    let trail = tether::audit::read(&agent.dir.path().join("data/audit"), &ReadFilter::default())
        .expect("the trail reads");
    let introspections: Vec<_> = trail
        .iter()
        .map(|r| &r.event)
        .filter(|e| {
            e.event == EventKind::Validate
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("introspection"))
        })
        .collect();
    assert!(
        introspections.iter().any(|e| e.decision == Outcome::Allow
            && e.audience.as_deref() == Some(JIRA)
            && e.task_id.as_deref() == Some(begun.task_id.as_str())
            && e.token_id.as_deref() == claims["jti"].as_str()
            && e.spiffe_id.as_deref() == Some(OWNER)),
        "{introspections:?}"
    );
    assert!(
        introspections.iter().any(|e| e.decision == Outcome::Deny
            && e.task_id.as_deref() == Some(begun.task_id.as_str())
            && e.reason.as_deref().is_some_and(|r| r.contains("ended"))),
        "{introspections:?}"
    );
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs a venv with py-spiffe: run scripts/test"]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let agent = agent(1, 3).await;
    let token = jwt_svid(&agent, JIRA).await;
    let requests: Vec<Value> = (0..6).map(|_| form(&token)).collect();
    let results = introspect(&agent, JIRA, true, Value::Array(requests)).await;
    let statuses: Vec<_> = results.iter().map(|r| r["status"].clone()).collect();
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 3,
        "{statuses:?}"
    );
    let limited = results
        .iter()
        .find(|r| r["status"] == 429)
        .unwrap_or_else(|| panic!("no 429 in {statuses:?}"));
    assert!(
        limited["headers"]["retry-after"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "{limited}"
    );
    // Another client is not limited by the first one's rate.
    let results = introspect(&agent, OWNER, true, json!([form(&token)])).await;
    assert_eq!(results[0]["status"], 200, "{}", results[0]);
    // (For the owner, a token addressed to the MCP server is inactive.)
    assert_eq!(results[0]["json"], json!({ "active": false }));
    agent.stop().await;
}
