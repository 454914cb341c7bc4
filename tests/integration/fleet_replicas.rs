//! Two server replicas on one real PostgreSQL (issue 17, check 4): an
//! agent keeps working when the replica it talks to is killed (`kill -9`),
//! no entry is lost, each replica's keys are in the one bundle, and the
//! servers recover when the PostgreSQL connection drops and comes back.
//! And tasks (issue 18): a task ended through one replica is refused by a
//! node of the other, and a failover resurrects no ended task.

use tether::proto::admin as admin_pb;
use tether::proto::server as pb;

use crate::common::fleet::{FleetAgent, Netns, ServerProcess};
use crate::common::postgres::TestPostgres;
use crate::common::{eventually, require_root, spec, task_client, uid};
use tether::proto::task as task_pb;

async fn create_entry(server: &ServerProcess, path: &str) -> Result<String, tonic::Status> {
    create_entry_on(server, path, "node-a").await
}

async fn create_entry_on(
    server: &ServerProcess,
    path: &str,
    node: &str,
) -> Result<String, tonic::Status> {
    let me = format!("unix:uid:{}", uid());
    Ok(server
        .admin()
        .await
        .create_entry(pb::CreateServerEntryRequest {
            spec: Some(spec(&format!("spiffe://fleet.test/{path}"), &[&me])),
            nodes: vec![node.into()],
        })
        .await?
        .into_inner()
        .entry
        .map(|e| e.id)
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, network namespaces and PostgreSQL: scripts/test runs it"]
async fn an_agent_outlives_a_replica_and_the_servers_outlive_a_database_restart() {
    require_root("network namespaces and PostgreSQL");
    let postgres = TestPostgres::start();
    let netns = Netns::new();
    let mut first = ServerProcess::start(&netns.host_ip, &postgres.url()).await;
    let second = ServerProcess::start(&netns.host_ip, &postgres.url()).await;

    // Each replica signs with its own CA; the bundle either serves holds
    // both, once each has read the other's from the store.
    let bundle = eventually(
        "both replicas' CAs in the first replica's bundle",
        async || {
            let bundle = first
                .admin()
                .await
                .get_bundle(admin_pb::GetBundleRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            if bundle.x509_authorities.len() >= 2 {
                Ok(bundle.spiffe_json)
            } else {
                Err(format!("{} CAs", bundle.x509_authorities.len()))
            }
        },
    )
    .await;

    // An entry made on one replica, a token made on the other: one store.
    create_entry(&first, "web")
        .await
        .expect("entry on the first replica");
    let token = second
        .admin()
        .await
        .create_join_token(pb::CreateJoinTokenRequest {
            node_name: "node-a".into(),
            ttl_ms: 0,
        })
        .await
        .expect("token on the second replica")
        .into_inner()
        .token;
    let addresses = [first.address.clone(), second.address.clone()];
    let agent = FleetAgent::start_at(&netns, &addresses, &bundle, &token).await;
    agent.until_serves(&["spiffe://fleet.test/web"]).await;

    // The replica the agent talks to (its first address) is killed. An
    // entry made on the other reaches the node: the agent moved over.
    first.kill();
    create_entry(&second, "api")
        .await
        .expect("entry on the second replica");
    agent
        .until_serves_exactly(&["spiffe://fleet.test/api", "spiffe://fleet.test/web"])
        .await;
    let listed = second
        .admin()
        .await
        .list_entries(pb::ListServerEntriesRequest {})
        .await
        .expect("entries")
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 2, "no entry lost: {listed:?}");

    // PostgreSQL restarts (every connection dropped): the server reconnects
    // by itself; a write may be refused (Unavailable) while it does.
    postgres.restart();
    eventually(
        "an entry created after the database restart",
        async || match create_entry(&second, "after-restart").await {
            Ok(id) => Ok(id),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                Err(status.message().to_owned())
            }
            Err(status) => panic!("not an outage: {status:?}"),
        },
    )
    .await;
    agent
        .until_serves(&["spiffe://fleet.test/after-restart"])
        .await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, network namespaces and PostgreSQL: scripts/test runs it"]
async fn a_task_ended_through_one_replica_is_refused_through_the_other_and_after_a_failover() {
    require_root("network namespaces and PostgreSQL");
    let postgres = TestPostgres::start();
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let mut first = ServerProcess::start(&ns_a.host_ip, &postgres.url()).await;
    let second = ServerProcess::start(&ns_a.host_ip, &postgres.url()).await;
    let bundle = eventually("both replicas' keys in the bundle", async || {
        let bundle = second
            .admin()
            .await
            .get_bundle(admin_pb::GetBundleRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if bundle.x509_authorities.len() >= 2 {
            Ok(bundle.spiffe_json)
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
    create_entry_on(&first, "a/agent", "node-a")
        .await
        .expect("a's entry");
    create_entry_on(&first, "b/notes", "node-b")
        .await
        .expect("b's entry");
    let join = async |node: &str| {
        first
            .admin()
            .await
            .create_join_token(pb::CreateJoinTokenRequest {
                node_name: node.into(),
                ttl_ms: 0,
            })
            .await
            .expect("token")
            .into_inner()
            .token
    };
    let (token_a, token_b) = (join("node-a").await, join("node-b").await);
    // node-a talks to the first replica (and fails over to the second);
    // node-b only ever to the second.
    let addresses = [first.address.clone(), second.address.clone()];
    let a = FleetAgent::start_at(&ns_a, &addresses, &bundle, &token_a).await;
    let b = FleetAgent::start_at(
        &ns_b,
        std::slice::from_ref(&second.address),
        &bundle,
        &token_b,
    )
    .await;
    a.until_serves(&["spiffe://fleet.test/a/agent"]).await;
    b.until_serves(&["spiffe://fleet.test/b/notes"]).await;
    let (mut on_a, mut on_b) = (task_client(&a.socket).await, task_client(&b.socket).await);
    let notes = "spiffe://fleet.test/b/notes";

    // Ended on node-a through the first replica: node-b, on the second,
    // refuses it once the second has read the end from the store.
    let (ended_id, ended) = begin(&mut on_a, notes).await;
    until_valid(&mut on_b, &ended, notes, true).await;
    on_a.end_task(task_pb::EndTaskRequest { task_id: ended_id })
        .await
        .expect("end");
    until_valid(&mut on_b, &ended, notes, false).await;

    // The first replica dies; node-a moves to the second. The ended task
    // stays ended everywhere, and a task begun and ended after the
    // failover is refused on node-b too.
    first.kill();
    let (later_id, later) = eventually("a task begun after the failover", async || {
        on_a.clone()
            .begin_task(task_pb::BeginTaskRequest {
                audience: notes.into(),
                intent: "after the failover".into(),
                tools: vec!["notes.read".into()],
                ..Default::default()
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.task_id, r.token.map(|t| t.token).unwrap_or_default())
            })
            .map_err(|e| e.to_string())
    })
    .await;
    for (client, node) in [(&mut on_a, "node-a"), (&mut on_b, "node-b")] {
        let check = validate(client, &ended, notes).await;
        assert!(!check.valid, "{node} never accepts the ended task again");
    }
    until_valid(&mut on_b, &later, notes, true).await;
    on_a.end_task(task_pb::EndTaskRequest { task_id: later_id })
        .await
        .expect("end after the failover");
    until_valid(&mut on_b, &later, notes, false).await;
    drop((a, b));
}

async fn begin(client: &mut crate::common::TaskClient, audience: &str) -> (String, String) {
    let begun = client
        .begin_task(task_pb::BeginTaskRequest {
            audience: audience.into(),
            intent: "across replicas".into(),
            tools: vec!["notes.read".into()],
            ..Default::default()
        })
        .await
        .expect("a task begins")
        .into_inner();
    (begun.task_id, begun.token.expect("token").token)
}

async fn validate(
    client: &mut crate::common::TaskClient,
    token: &str,
    audience: &str,
) -> task_pb::ValidateTaskTokenResponse {
    client
        .validate_task_token(task_pb::ValidateTaskTokenRequest {
            token: token.into(),
            audience: audience.into(),
            tool: "notes.read".into(),
            presenter_certificate: Vec::new(),
        })
        .await
        .expect("ValidateTaskToken answers")
        .into_inner()
}

/// Waits until `client`'s node says `valid` of `token` (an end crossing
/// replicas and nodes: no timing is asserted).
async fn until_valid(
    client: &mut crate::common::TaskClient,
    token: &str,
    audience: &str,
    valid: bool,
) {
    eventually(
        format!("the token {}", if valid { "accepted" } else { "refused" }),
        async || {
            let check = validate(client, token, audience).await;
            if check.valid == valid {
                Ok(())
            } else {
                Err(check.reason)
            }
        },
    )
    .await;
}
