//! `k8s_psat` node attestation and pod scope (issue 17), against a
//! stand-in Kubernetes API server (`common::apiserver`: not Kubernetes,
//! but its TokenReview and Pod JSON): a `tether server` in this process
//! admits the node its API places an agent pod on, refuses every other
//! token, and serves an entry with `k8s:` selectors only to the node where
//! the API places a matching pod, following the pod when it moves. The
//! clients are real mutual-TLS node API clients, as an agent (or a rooted
//! node with its SVID) has them.

use std::sync::Arc;
use std::time::Duration;

use spiffe::{SpiffeId, TrustDomain};
use tether::audit::{EventKind, Outcome, ReadFilter};
use tether::bundle::TrustBundle;
use tether::proto::server as pb;
use tether::proto::server::attest_node_request::Credential;
use tether::proto::server::node_client::NodeClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::common::apiserver::{self, ApiServer, TokenFacts};
use crate::common::fleet::{FleetAgent, FleetServer, Netns, TRUST_DOMAIN, next_snapshot};
use crate::common::{eventually, require_root, spec, uid};

const PLANNER: &str = "spiffe://fleet.test/planner";

async fn bundle_of(server: &FleetServer) -> TrustBundle {
    TrustBundle::from_spiffe_json(
        TrustDomain::new(TRUST_DOMAIN).expect("td"),
        server.bundle_json().await.as_bytes(),
    )
    .expect("bundle")
}

async fn client(
    server: &FleetServer,
    bundle: &TrustBundle,
    identity: Option<tether::mtls::SwappableIdentity>,
) -> NodeClient<Channel> {
    let tls = tether::mtls::client_config(
        watch::channel(Arc::new(bundle.clone())).1,
        SpiffeId::new("spiffe://fleet.test/tether/server").expect("id"),
        identity,
        false,
    );
    let channel = tether::mtls::connect(&[server.address()], tls, Duration::from_secs(10))
        .await
        .expect("TLS to the server");
    NodeClient::new(channel)
}

/// Attests with `psat`: the node's name and a client with its SVID, or
/// the refusal.
async fn attest(
    server: &FleetServer,
    bundle: &TrustBundle,
    psat: &str,
) -> Result<(String, NodeClient<Channel>), tonic::Status> {
    let (key, csr) = tether::authority::key_and_csr().expect("csr");
    let response = client(server, bundle, None)
        .await
        .attest_node(pb::AttestNodeRequest {
            credential: Some(Credential::Psat(psat.into())),
            csr,
        })
        .await?
        .into_inner();
    let chain = response.svid.expect("an SVID").cert_chain;
    let identity = tether::mtls::SwappableIdentity::new(
        tether::mtls::Identity::new(chain, key).expect("node identity"),
    );
    Ok((
        response.node_name,
        client(server, bundle, Some(identity)).await,
    ))
}

async fn sign(node: &mut NodeClient<Channel>, spiffe_id: &str) -> Result<(), tonic::Status> {
    let (_, csr) = tether::authority::key_and_csr().expect("csr");
    node.sign_x509_svids(pb::SignX509SvidsRequest {
        requests: vec![pb::X509SvidRequest {
            spiffe_id: spiffe_id.into(),
            csr,
            ttl_ms: 60_000,
            dns_names: vec![],
        }],
    })
    .await
    .map(|_| ())
}

/// The SPIFFE IDs of the entries in the next snapshot of `stream`.
async fn next_ids(stream: &mut tonic::Streaming<pb::SyncMessage>) -> Vec<String> {
    let snapshot = tokio::time::timeout(Duration::from_secs(30), next_snapshot(stream))
        .await
        .expect("a snapshot within 30 s");
    snapshot
        .entries
        .iter()
        .filter_map(|e| e.spec.as_ref().map(|s| s.spiffe_id.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psat_admits_the_node_of_its_pod_and_pods_scope_entries() {
    let api = ApiServer::start().await;
    api.add_agent("psat-x", "node-x", "0f9e8d7c-0000-4000-8000-00000000000a");
    api.add_agent("psat-y", "node-y", "0f9e8d7c-0000-4000-8000-00000000000b");
    // A workload pod on node-x, and one more so the pod list takes pages.
    api.add_pod(apiserver::pod(
        "agents",
        "planner",
        "5e1f0000-0000-4000-8000-000000000001",
        "planner",
        "node-x",
    ));
    api.add_pod(apiserver::pod(
        "agents",
        "other",
        "5e1f0000-0000-4000-8000-000000000002",
        "other",
        "node-y",
    ));
    let server = FleetServer::start("127.0.0.1", &api.server_toml()).await;
    server
        .create_entry(spec(PLANNER, &["k8s:ns:agents", "k8s:sa:planner"]), &[])
        .await;
    let bundle = bundle_of(&server).await;

    let (x_name, mut node_x) = attest(&server, &bundle, "psat-x")
        .await
        .expect("node-x admitted");
    assert_eq!(x_name, "node-x");
    let (y_name, mut node_y) = attest(&server, &bundle, "psat-y")
        .await
        .expect("node-y admitted");
    assert_eq!(y_name, "node-y");
    // A PSAT is not single use: node-x attests again with the same token.
    let (again, _) = attest(&server, &bundle, "psat-x")
        .await
        .expect("re-attested");
    assert_eq!(again, "node-x");

    // node-x is sent the entry once the API's pods are listed; node-y,
    // then, is not.
    let mut x_sync = node_x
        .sync(pb::SyncRequest::default())
        .await
        .expect("sync")
        .into_inner();
    loop {
        if next_ids(&mut x_sync).await.contains(&PLANNER.to_owned()) {
            break;
        }
    }
    let mut y_sync = node_y
        .sync(pb::SyncRequest::default())
        .await
        .expect("sync")
        .into_inner();
    assert!(!next_ids(&mut y_sync).await.contains(&PLANNER.to_owned()));

    sign(&mut node_x, PLANNER)
        .await
        .expect("node-x may have the planner's SVID");
    let refused = sign(&mut node_y, PLANNER)
        .await
        .expect_err("node-y may not");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("node-y"),
        "{}",
        refused.message()
    );

    // The pod is rescheduled on node-y: the scope follows the API.
    api.remove_pod("agents", "planner");
    api.add_pod(apiserver::pod(
        "agents",
        "planner",
        "5e1f0000-0000-4000-8000-000000000003",
        "planner",
        "node-y",
    ));
    loop {
        if next_ids(&mut y_sync).await.contains(&PLANNER.to_owned()) {
            break;
        }
    }
    sign(&mut node_y, PLANNER).await.expect("node-y now may");
    let refused = sign(&mut node_x, PLANNER)
        .await
        .expect_err("node-x no longer may");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // The audit writer is asynchronous: the admission is in the trail
    // once it has written it.
    eventually("node-x's admission by k8s_psat in the trail", async || {
        let trail = tether::audit::read(&server.audit_dir(), &ReadFilter::default())
            .map_err(|e| e.to_string())?;
        let admitted = trail.iter().any(|r| {
            r.event.event == EventKind::NodeAttest
                && r.event.decision == Outcome::Allow
                && r.event.node.as_deref() == Some("spiffe://fleet.test/tether/node/node-x")
                && r.event
                    .reason
                    .as_deref()
                    .is_some_and(|m| m.contains("k8s_psat") && m.contains("tether-agent-node-x"))
        });
        if admitted {
            Ok(())
        } else {
            Err(format!("{} records", trail.len()))
        }
    })
    .await;
    let nodes = server
        .admin()
        .await
        .list_nodes(pb::ListNodesRequest {})
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    assert!(
        nodes.iter().all(|n| n.attestation == "k8s_psat"),
        "{nodes:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_the_api_does_not_vouch_for_admit_no_node() {
    let api = ApiServer::start().await;
    // A pod of a service account that is not the agents'.
    api.add_pod(apiserver::pod(
        "default",
        "intruder",
        "7a000000-0000-4000-8000-000000000001",
        "default",
        "node-x",
    ));
    api.add_token(
        "psat-default",
        TokenFacts::Bound {
            namespace: "default".into(),
            service_account: "default".into(),
            pod_name: "intruder".into(),
            pod_uid: "7a000000-0000-4000-8000-000000000001".into(),
            audience: "tether-server".into(),
        },
    );
    api.add_token(
        "psat-expired",
        TokenFacts::Invalid("[invalid bearer token, service account token has expired]".into()),
    );
    // An agent's token for another audience (the API server's own).
    api.add_pod(apiserver::pod(
        apiserver::AGENT_NS,
        "tether-agent-z",
        "7a000000-0000-4000-8000-000000000002",
        apiserver::AGENT_SA,
        "node-z",
    ));
    api.add_token(
        "psat-api-audience",
        TokenFacts::Bound {
            namespace: apiserver::AGENT_NS.into(),
            service_account: apiserver::AGENT_SA.into(),
            pod_name: "tether-agent-z".into(),
            pod_uid: "7a000000-0000-4000-8000-000000000002".into(),
            audience: "https://kubernetes.default.svc".into(),
        },
    );
    // A token of an agent pod since replaced by another of the same name.
    api.add_token(
        "psat-replaced",
        TokenFacts::Bound {
            namespace: apiserver::AGENT_NS.into(),
            service_account: apiserver::AGENT_SA.into(),
            pod_name: "tether-agent-z".into(),
            pod_uid: "7a000000-0000-4000-8000-0000000000ff".into(),
            audience: "tether-server".into(),
        },
    );
    let server = FleetServer::start("127.0.0.1", &api.server_toml()).await;
    let bundle = bundle_of(&server).await;

    for (token, says) in [
        ("psat-default", "default:default may not attest"),
        ("psat-expired", "has expired"),
        ("psat-api-audience", "did not authenticate"),
        ("psat-replaced", "not the token's pod"),
        ("never-issued", "did not authenticate"),
    ] {
        let refused = attest(&server, &bundle, token)
            .await
            .err()
            .unwrap_or_else(|| panic!("{token} is refused"));
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{token}: {refused:?}"
        );
        assert!(
            refused.message().contains(says),
            "{token}: {}",
            refused.message()
        );
    }
    let trail = eventually("the five refusals in the trail", async || {
        let trail = tether::audit::read(&server.audit_dir(), &ReadFilter::default())
            .map_err(|e| e.to_string())?;
        let denials = trail
            .iter()
            .filter(|r| r.event.event == EventKind::NodeAttest && r.event.decision == Outcome::Deny)
            .count();
        if denials == 5 {
            Ok(trail)
        } else {
            Err(format!("{denials} refusals"))
        }
    })
    .await;
    assert!(
        !trail
            .iter()
            .any(|r| format!("{:?}", r.event).contains("psat-")),
        "no token is recorded"
    );
    let nodes = server
        .admin()
        .await
        .list_nodes(pb::ListNodesRequest {})
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    assert!(nodes.is_empty(), "{nodes:?}");
    server.stop().await;

    // A server without [kubernetes] does not take service account tokens.
    let plain = FleetServer::start("127.0.0.1", "").await;
    let bundle = bundle_of(&plain).await;
    let refused = attest(&plain, &bundle, "psat-default")
        .await
        .expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    plain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn an_agent_in_a_pod_joins_with_its_projected_token() {
    require_root("network namespaces");
    let netns = Netns::new();
    let api = ApiServer::start().await;
    api.add_agent(
        "psat-of-the-agent",
        "node-x",
        "0f9e8d7c-0000-4000-8000-0000000000aa",
    );
    let server = FleetServer::start(&netns.host_ip, &api.server_toml()).await;
    let me = format!("unix:uid:{}", uid());
    server
        .create_entry(spec("spiffe://fleet.test/web", &[&me]), &["node-x"])
        .await;
    let agent = FleetAgent::start_with_psat(&netns, &server, "psat-of-the-agent").await;
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    let svids = eventually("the X.509-SVID of node-x's entry", async || {
        client.fetch_all_x509_svids().await
    })
    .await;
    assert_eq!(svids[0].spiffe_id().to_string(), "spiffe://fleet.test/web");
    assert!(
        agent.log().contains("node=node-x") || agent.log().contains("node-x"),
        "{}",
        agent.log()
    );
    drop(agent);
    server.stop().await;
}
