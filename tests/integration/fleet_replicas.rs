//! Two server replicas on one real PostgreSQL (issue 17, check 4): an
//! agent keeps working when the replica it talks to is killed (`kill -9`),
//! no entry is lost, each replica's keys are in the one bundle, and the
//! servers recover when the PostgreSQL connection drops and comes back.

use tether::proto::admin as admin_pb;
use tether::proto::server as pb;

use crate::common::fleet::{FleetAgent, Netns, ServerProcess};
use crate::common::postgres::TestPostgres;
use crate::common::{eventually, require_root, spec, uid};

async fn create_entry(server: &ServerProcess, path: &str) -> Result<String, tonic::Status> {
    let me = format!("unix:uid:{}", uid());
    Ok(server
        .admin()
        .await
        .create_entry(pb::CreateServerEntryRequest {
            spec: Some(spec(&format!("spiffe://fleet.test/{path}"), &[&me])),
            nodes: vec!["node-a".into()],
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
