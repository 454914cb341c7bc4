//! Introspection across the fleet: the tether server's `[introspection]`
//! endpoint answers for tokens signed on any node. One `tether server`
//! (in this process) and two agents in their own network namespaces, as
//! in `fleet_tasks.rs`: node-a serves the task's owner, node-b the MCP
//! server the task addresses and the API that server exchanges the token
//! for. The relying parties are the Python client of `introspection.rs`
//! (urllib + ssl), each with its X.509-SVID from node-b's Workload API
//! (py-spiffe).
//!
//! Needs root (network namespaces) and `TETHER_TEST_PYTHON` pointing at a
//! Python with py-spiffe installed.

use serde_json::{Value, json};
use tether::audit::{EventKind, Outcome, ReadFilter};
use tether::proto::task as task_pb;

use crate::common::fleet::{FleetAgent, FleetServer, Netns};
use crate::common::{claims_of, eventually, require_root, spec, task_client, uid};
use crate::introspection::{form, run_client};

/// The task's owner, on node-a.
const A: &str = "spiffe://fleet.test/a/agent";
/// The MCP server the task addresses, on node-b.
const B: &str = "spiffe://fleet.test/b/notes";
/// The API node-b's MCP server exchanges the token for, on node-b too.
const C: &str = "spiffe://fleet.test/b/api";

/// A server with `[introspection]` and two nodes serving this process's
/// uid: node-a as [`A`], node-b as [`B`] and [`C`].
struct Fleet {
    server: FleetServer,
    a: FleetAgent,
    b: FleetAgent,
    _netns: [Netns; 2],
}

impl Fleet {
    async fn start() -> Self {
        let netns = [Netns::new(), Netns::new()];
        let server = FleetServer::start(
            &netns[0].host_ip,
            "[introspection]\nlisten = \"127.0.0.1:0\"\nrequests_per_second = 1000\nburst = 1000\n",
        )
        .await;
        let me = format!("unix:uid:{}", uid());
        for (id, node) in [(A, "node-a"), (B, "node-b"), (C, "node-b")] {
            server.create_entry(spec(id, &[&me]), &[node]).await;
        }
        let a = FleetAgent::start(&netns[0], &server, &server.join_token("node-a").await).await;
        let b = FleetAgent::start(&netns[1], &server, &server.join_token("node-b").await).await;
        a.until_serves(&[A]).await;
        b.until_serves(&[B, C]).await;
        Self {
            server,
            a,
            b,
            _netns: netns,
        }
    }

    /// The Python relying party as `spiffe_id` (an identity node-b
    /// serves) asking the server about each of `tokens`; the answers.
    async fn introspect(&self, spiffe_id: &str, tokens: &[&str]) -> Vec<Value> {
        let addr = self
            .server
            .running()
            .introspection_addr()
            .expect("[introspection] is set on the server");
        let requests = Value::Array(tokens.iter().map(|t| form(t)).collect());
        let results = run_client(
            &format!("https://{addr}/introspect"),
            &self.b.endpoint(),
            spiffe_id,
            true,
            requests,
        )
        .await;
        results
            .into_iter()
            .map(|r| {
                assert_eq!(r["status"], 200, "{r}");
                r["json"].clone()
            })
            .collect()
    }

    async fn stop(self) {
        drop((self.a, self.b));
        self.server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces) and a venv with py-spiffe: scripts/test runs it"]
async fn the_server_introspects_every_nodes_tokens_until_their_task_ends() {
    require_root("network namespaces");
    let fleet = Fleet::start().await;
    let (mut on_a, mut on_b) = (
        task_client(&fleet.a.socket).await,
        task_client(&fleet.b.socket).await,
    );

    // node-a's workload begins a task for node-b's MCP server; the MCP
    // server exchanges its token on node-b for the API, narrowing it.
    let begun = on_a
        .begin_task(task_pb::BeginTaskRequest {
            audience: B.into(),
            intent: "publish the notes".into(),
            tools: vec!["notes.read".into(), "notes.publish".into()],
            ..Default::default()
        })
        .await
        .expect("a task begins on node-a")
        .into_inner();
    let task_id = begun.task_id.clone();
    let token = begun.token.expect("a token").token;
    let exchanged = on_b
        .exchange_token(task_pb::ExchangeTokenRequest {
            subject_token: token.clone(),
            audience: C.into(),
            tools: vec!["notes.publish".into()],
            ..Default::default()
        })
        .await
        .expect("node-b exchanges node-a's task token")
        .into_inner()
        .token
        .expect("a token")
        .token;
    // A JWT-SVID of node-a's workload for the MCP server.
    let jwt_svid = spiffe::WorkloadApiClient::connect_to(fleet.a.endpoint())
        .await
        .expect("node-a's Workload API")
        .fetch_jwt_svid(&[B], None)
        .await
        .expect("a JWT-SVID from node-a")
        .token()
        .to_owned();

    // The MCP server asks the server: node-a's task token and JWT-SVID
    // are active for it, with their claims.
    let answers = fleet.introspect(B, &[&token, &jwt_svid]).await;
    let (task, jwt) = (&answers[0], &answers[1]);
    let claims = claims_of(&token);
    assert_eq!(task["active"], true, "{task}");
    assert_eq!(task["token_kind"], "task");
    assert_eq!(task["sub"], A);
    assert_eq!(task["aud"], json!([B]));
    assert_eq!(task["txn"], task_id.as_str());
    assert_eq!(task["scope"], "notes.read notes.publish");
    for claim in ["iss", "jti", "exp", "iat", "nbf", "tctx"] {
        assert_eq!(task[claim], claims[claim], "{claim}");
    }
    assert!(task.get("act").is_none(), "nobody acted yet: {task}");
    assert_eq!(jwt["active"], true, "{jwt}");
    assert_eq!(jwt["token_kind"], "jwt-svid");
    assert_eq!(jwt["sub"], A);
    assert_eq!(jwt["aud"], json!([B]));

    // The API asks about the exchanged token: active, node-b's workload
    // acted, narrowed to one tool. The task token, addressed to the MCP
    // server, is nothing to the API.
    let answers = fleet.introspect(C, &[&exchanged, &token, &jwt_svid]).await;
    let next = &answers[0];
    assert_eq!(next["active"], true, "{next}");
    assert_eq!(next["token_kind"], "task");
    assert_eq!(next["sub"], A, "the subject stays node-a's workload");
    assert_eq!(next["aud"], json!([C]));
    assert_eq!(next["txn"], task_id.as_str());
    assert_eq!(next["scope"], "notes.publish");
    assert_eq!(next["act"]["sub"], B, "{next}");
    assert_eq!(answers[1], json!({ "active": false }));
    assert_eq!(answers[2], json!({ "active": false }));

    // The owner ends the task on node-a: the server answers inactive for
    // both of its tokens (the end reaching the index is waited for, not
    // timed). The JWT-SVID is no task's and stays active.
    on_a.end_task(task_pb::EndTaskRequest {
        task_id: task_id.clone(),
    })
    .await
    .expect("the owner ends its task on node-a");
    eventually(
        "the server answers inactive for the ended task",
        async || fleet.introspect(B, &[&token]).await[0] == json!({ "active": false }),
    )
    .await;
    assert_eq!(
        fleet.introspect(C, &[&exchanged]).await[0],
        json!({ "active": false })
    );
    assert_eq!(fleet.introspect(B, &[&jwt_svid]).await[0]["active"], true);

    // The server's trail has the introspections: who asked, about which
    // task and token, and why the ended ones were inactive.
    let trail = tether::audit::read(&fleet.server.audit_dir(), &ReadFilter::default())
        .expect("the server's trail");
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
    let allowed = |audience: &str, token: &str| {
        let jti = claims_of(token)["jti"].as_str().map(str::to_owned);
        introspections.iter().any(|e| {
            e.decision == Outcome::Allow
                && e.audience.as_deref() == Some(audience)
                && e.spiffe_id.as_deref() == Some(A)
                && e.token_id == jti
        })
    };
    assert!(allowed(B, &token), "{introspections:?}");
    assert!(allowed(C, &exchanged), "{introspections:?}");
    assert!(allowed(B, &jwt_svid), "{introspections:?}");
    let ended = |audience: &str| {
        introspections.iter().any(|e| {
            e.decision == Outcome::Deny
                && e.audience.as_deref() == Some(audience)
                && e.task_id.as_deref() == Some(task_id.as_str())
                && e.reason.as_deref().is_some_and(|r| r.contains("ended"))
        })
    };
    assert!(ended(B), "{introspections:?}");
    assert!(ended(C), "{introspections:?}");
    assert!(
        introspections.iter().any(|e| e.decision == Outcome::Deny
            && e.audience.as_deref() == Some(C)
            && e.task_id.is_none()),
        "the API's question about a token not for it: {introspections:?}"
    );
    fleet.stop().await;
}
