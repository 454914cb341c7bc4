//! The fleet, one node at a time (issue 17): an agent in its own network
//! namespace joins a `tether server` with a join token, holds no signing
//! key, serves X.509-SVIDs the server signed for entries scoped to its
//! node, picks up a new entry without a restart, and cannot get the
//! server to sign an identity scoped to another node.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spiffe::SpiffeId;
use tether::audit::{EventKind, Outcome, ReadFilter};
use tether::bundle::TrustBundle;
use tether::proto::server as pb;
use tokio::sync::watch;

use crate::common::fleet::{
    FleetAgent, FleetServer, Netns, next_snapshot, node_client, server_bundle,
};
use crate::common::{admin_client, eventually, require_root, spec, uid};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn a_node_joins_with_a_token_and_serves_what_the_server_signs() {
    require_root("network namespaces");
    let netns = Netns::new();
    let server = FleetServer::start(&netns.host_ip, "").await;
    let me = format!("unix:uid:{}", uid());
    server
        .create_entry(spec("spiffe://fleet.test/web", &[&me]), &["node-a"])
        .await;
    server
        .create_entry(spec("spiffe://fleet.test/billing", &[&me]), &["node-b"])
        .await;
    let token = server.join_token("node-a").await;
    let mut agent = FleetAgent::start(&netns, &server, &token).await;

    // The node's workload gets the identity scoped to node-a, signed by
    // the server's CA, and not node-b's.
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    let svids = eventually("the X.509-SVID of node-a's entry", async || {
        client.fetch_all_x509_svids().await
    })
    .await;
    let ids: BTreeSet<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(ids, BTreeSet::from(["spiffe://fleet.test/web".to_owned()]));
    let bundle = server_bundle(&server).await;
    let leaf = svids[0].leaf().as_ref().to_vec();
    assert!(
        signed_by_bundle(&leaf, &bundle),
        "the SVID is signed by one of the server's CAs"
    );

    // Check 5: an entry created on the server reaches the node's workload
    // without a restart.
    server
        .create_entry(spec("spiffe://fleet.test/api", &[&me]), &["node-a"])
        .await;
    agent.until_serves(&["spiffe://fleet.test/api"]).await;

    // The agent's operator sees the link, and cannot add entries there:
    // the fleet's entries are the server's.
    let mut admin = admin_client(&agent.dir.path().join("admin/admin.sock")).await;
    let health = admin
        .health(tether::proto::admin::HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert!(health.serving, "{:?}", health.problems);
    assert!(
        health
            .server
            .starts_with("spiffe://fleet.test/tether/node/node-a, connected to "),
        "{}",
        health.server
    );
    let refused = admin
        .create_entry(tether::proto::admin::CreateEntryRequest {
            spec: Some(spec("spiffe://fleet.test/local", &[&me])),
        })
        .await
        .expect_err("a fleet agent creates no entry");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("tether server entry create"),
        "{}",
        refused.message()
    );
    let listed = admin
        .list_entries(tether::proto::admin::ListEntriesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .entries;
    assert!(!listed.is_empty());
    assert!(
        listed
            .iter()
            .all(|e| e.source == tether::proto::admin::EntrySource::Server as i32),
        "every entry is the server's"
    );

    // Check 3: no file of the agent holds a key the bundle trusts.
    assert_no_trusted_key_in(&agent.data_dir(), &bundle);
    assert!(
        !agent.data_dir().join("authority").exists(),
        "a fleet agent has no authority directory"
    );

    // Check 2: node-a, with its own node SVID (as a rooted node has it),
    // asks the server directly for node-b's identity: refused, and the
    // refusal is in the server's trail with node-a's SPIFFE ID.
    let mut node = node_client(&agent, &server, &bundle).await;
    let (_, csr) = tether::authority::key_and_csr().expect("csr");
    let refused = node
        .sign_x509_svids(x509_request(
            "spiffe://fleet.test/billing",
            csr.clone(),
            &[],
        ))
        .await
        .expect_err("another node's identity is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("node-a"),
        "{}",
        refused.message()
    );
    // Its own identity with a DNS name the entry does not give: refused.
    let extra = node
        .sign_x509_svids(x509_request(
            "spiffe://fleet.test/web",
            csr,
            &["bank.example"],
        ))
        .await
        .expect_err("extra SANs are refused");
    assert_eq!(extra.code(), tonic::Code::PermissionDenied, "{extra:?}");

    eventually(
        "the refusal and the admission in the server's trail",
        async || {
            let trail = tether::audit::read(&server.audit_dir(), &ReadFilter::default())
                .map_err(|e| e.to_string())?;
            let refused = trail.iter().any(|r| {
                r.event.decision == Outcome::Deny
                    && r.event.node.as_deref() == Some("spiffe://fleet.test/tether/node/node-a")
                    && r.event.spiffe_id.as_deref() == Some("spiffe://fleet.test/billing")
            });
            let admitted = trail.iter().any(|r| {
                r.event.event == EventKind::NodeAttest && r.event.decision == Outcome::Allow
            });
            if refused && admitted {
                Ok(())
            } else {
                Err(format!("refusal {refused}, admission {admitted}"))
            }
        },
    )
    .await;

    // The token was single use: presenting it again is refused.
    let mut anonymous = anonymous_client(&server, &bundle).await;
    let reuse = anonymous
        .attest_node(pb::AttestNodeRequest {
            credential: Some(pb::attest_node_request::Credential::JoinToken(token)),
            csr: tether::authority::key_and_csr().expect("csr").1,
        })
        .await
        .expect_err("a used token is refused");
    assert_eq!(reuse.code(), tonic::Code::Unauthenticated, "{reuse:?}");
    assert!(
        reuse.message().contains("already used"),
        "{}",
        reuse.message()
    );

    // A restart needs no new token: the node comes back with its stored
    // node SVID and the bundle the server last sent.
    agent.restart().await;
    agent
        .until_serves_exactly(&["spiffe://fleet.test/api", "spiffe://fleet.test/web"])
        .await;
    assert!(
        agent.log().contains("node SVID loaded from the data dir"),
        "{}",
        agent.log()
    );

    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn an_evicted_node_is_refused_until_it_attests_again() {
    require_root("network namespaces");
    let netns = Netns::new();
    let server = FleetServer::start(&netns.host_ip, "").await;
    let me = format!("unix:uid:{}", uid());
    server
        .create_entry(spec("spiffe://fleet.test/web", &[&me]), &["node-a"])
        .await;
    let token = server.join_token("node-a").await;
    let mut agent = FleetAgent::start(&netns, &server, &token).await;
    let bundle = server_bundle(&server).await;
    let mut node = node_client(&agent, &server, &bundle).await;

    let evicted = server
        .admin()
        .await
        .evict_node(pb::EvictNodeRequest {
            name: "node-a".into(),
        })
        .await
        .expect("evict")
        .into_inner();
    assert!(evicted.evicted);
    // Its SVID is refused at once, on a connection made before.
    let (_, csr) = tether::authority::key_and_csr().expect("csr");
    let refused = node
        .sign_x509_svids(x509_request("spiffe://fleet.test/web", csr, &[]))
        .await
        .expect_err("an evicted node signs nothing");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("evicted"),
        "{}",
        refused.message()
    );

    // With a new token the operator gives it, the node attests again.
    let again = server.join_token("node-a").await;
    agent.restart_with(Some(&again)).await;
    assert!(
        agent.log().contains("attesting again with the join token"),
        "{}",
        agent.log()
    );
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    eventually("node-a's SVID after it attested again", async || {
        client.fetch_x509_svid().await
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
    assert_eq!(nodes.len(), 1);
    assert!(!nodes[0].evicted, "{nodes:?}");
    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn a_node_renews_its_svid_before_it_expires_and_keeps_serving() {
    require_root("network namespaces");
    let netns = Netns::new();
    let server = FleetServer::start(&netns.host_ip, "node_svid_ttl = \"10s\"\n").await;
    let me = format!("unix:uid:{}", uid());
    server
        .create_entry(spec("spiffe://fleet.test/web", &[&me]), &["node-a"])
        .await;
    let token = server.join_token("node-a").await;
    let agent = FleetAgent::start(&netns, &server, &token).await;
    // Two renewals: the second is made over a connection that presented
    // the first renewed SVID, past the first SVID's expiry.
    eventually(
        "two renewals of node-a's SVID on the server's trail",
        async || {
            let trail = tether::audit::read(&server.audit_dir(), &ReadFilter::default())
                .map_err(|e| e.to_string())?;
            let renewals = trail
                .iter()
                .filter(|r| {
                    r.event.event == EventKind::NodeAttest
                        && r.event.reason.as_deref() == Some("node SVID renewed")
                })
                .count();
            if renewals >= 2 {
                Ok(())
            } else {
                Err(format!("{renewals} renewals"))
            }
        },
    )
    .await;
    // A new identity still comes through the server.
    server
        .create_entry(spec("spiffe://fleet.test/late", &[&me]), &["node-a"])
        .await;
    agent.until_serves(&["spiffe://fleet.test/late"]).await;
    assert!(!agent.log().contains("renewal failed"), "{}", agent.log());
    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn a_rooted_node_gets_no_fleet_identity_names_no_foreign_actor_and_holds_few_streams() {
    // Review findings, through the real node API with node-a's own SVID.
    require_root("network namespaces");
    let netns = Netns::new();
    let server = FleetServer::start(&netns.host_ip, "").await;
    let me = format!("unix:uid:{}", uid());
    server
        .create_entry(spec("spiffe://fleet.test/web", &[&me]), &["node-a"])
        .await;
    server
        .create_entry(spec("spiffe://fleet.test/billing", &[&me]), &["node-b"])
        .await;
    // An operator's slip: the server's own identity as an entry on node-a.
    server
        .create_entry(
            spec("spiffe://fleet.test/tether/server", &[&me]),
            &["node-a"],
        )
        .await;
    let token = server.join_token("node-a").await;
    let agent = FleetAgent::start(&netns, &server, &token).await;
    let bundle = server_bundle(&server).await;
    let mut node = node_client(&agent, &server, &bundle).await;

    // 1. The server's SVID (with which a node could serve agents as the
    //    server) is signed for no node, whatever entry names it.
    let (_, csr) = tether::authority::key_and_csr().expect("csr");
    let refused = node
        .sign_x509_svids(x509_request("spiffe://fleet.test/tether/server", csr, &[]))
        .await
        .expect_err("the server's identity is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("fleet's own identity"),
        "{}",
        refused.message()
    );

    // 2. A JWT for its own identity naming another node's workload as the
    //    actor, or another issuer: refused. Its own actor: signed. (A task
    //    token's actors follow the exchange rule: `fleet_tasks.rs`.)
    let not_after_ms = i64::try_from(
        (std::time::SystemTime::now() + Duration::from_secs(60))
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_millis(),
    )
    .expect("fits");
    let jwt = |claims: serde_json::Value| pb::SignJwtRequest {
        subject_token: String::new(),
        claims_json: claims.to_string(),
        not_after_ms,
    };
    let foreign_actor = node
        .sign_jwt(jwt(serde_json::json!({
            "sub": "spiffe://fleet.test/web", "aud": "mcp",
            "act": {"sub": "spiffe://fleet.test/web",
                    "act": {"sub": "spiffe://fleet.test/billing"}},
        })))
        .await
        .expect_err("an actor of node-b is refused");
    assert_eq!(
        foreign_actor.code(),
        tonic::Code::PermissionDenied,
        "{foreign_actor:?}"
    );
    assert!(
        foreign_actor.message().contains("billing"),
        "{}",
        foreign_actor.message()
    );
    let issuer = node
        .sign_jwt(jwt(serde_json::json!({
            "sub": "spiffe://fleet.test/web", "aud": "mcp",
            "iss": "spiffe://other.test",
        })))
        .await
        .expect_err("another issuer is refused");
    assert_eq!(issuer.code(), tonic::Code::InvalidArgument, "{issuer:?}");
    node.sign_jwt(jwt(serde_json::json!({
        "sub": "spiffe://fleet.test/web", "aud": "mcp",
        "iss": "spiffe://fleet.test",
        "act": {"sub": "spiffe://fleet.test/web"},
    })))
    .await
    .expect("its own identity as the actor is signed");

    // 3. Sync streams: the node's oldest is ended by newer ones (the
    //    agent's own stream counts too), so a node holds only a few.
    let mut first = node
        .sync(pb::SyncRequest::default())
        .await
        .expect("sync")
        .into_inner();
    let snapshot = next_snapshot(&mut first).await;
    let ids: BTreeSet<String> = snapshot
        .entries
        .iter()
        .filter_map(|e| e.spec.as_ref().map(|s| s.spiffe_id.clone()))
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from(["spiffe://fleet.test/web".to_owned()]),
        "the entry naming the server's identity is not synced"
    );
    let mut newer = Vec::new();
    for _ in 0..2 {
        newer.push(
            node.sync(pb::SyncRequest::default())
                .await
                .expect("sync")
                .into_inner(),
        );
    }
    let ended = loop {
        match first.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the replaced stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("replaced"), "{}", ended.message());

    drop(newer);
    drop(agent);
    server.stop().await;
}

/// One X.509-SVID for `spiffe_id`, a minute long, with `dns_names`.
fn x509_request(spiffe_id: &str, csr: Vec<u8>, dns_names: &[&str]) -> pb::SignX509SvidsRequest {
    pb::SignX509SvidsRequest {
        requests: vec![pb::X509SvidRequest {
            spiffe_id: spiffe_id.into(),
            csr,
            ttl_ms: 60_000,
            dns_names: dns_names.iter().map(|n| (*n).to_owned()).collect(),
        }],
    }
}

fn signed_by_bundle(cert: &[u8], bundle: &TrustBundle) -> bool {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).expect("certificate");
    bundle.x509_authorities().iter().any(|ca| {
        let (_, ca) = x509_parser::parse_x509_certificate(ca).expect("CA");
        cert.verify_signature(Some(ca.public_key())).is_ok()
    })
}

/// Every file under `dir` that parses as a private key (PKCS#8 DER or
/// PEM) has a public key that is not a CA's of the bundle.
fn assert_no_trusted_key_in(dir: &Path, bundle: &TrustBundle) {
    let trusted: Vec<Vec<u8>> = bundle
        .x509_authorities()
        .iter()
        .map(|ca| {
            let (_, ca) = x509_parser::parse_x509_certificate(ca).expect("CA");
            ca.public_key().subject_public_key.data.to_vec()
        })
        .collect();
    let mut keys = 0;
    for file in walk(dir) {
        let bytes = std::fs::read(&file).expect("read");
        let key = rcgen::KeyPair::try_from(bytes.as_slice()).ok().or_else(|| {
            std::str::from_utf8(&bytes)
                .ok()
                .and_then(|pem| rcgen::KeyPair::from_pem(pem).ok())
        });
        if let Some(key) = key {
            keys += 1;
            assert!(
                !trusted.contains(&key.public_key_raw().to_vec()),
                "{} holds the private key of a CA in the bundle",
                file.display()
            );
        }
    }
    assert!(
        keys >= 1,
        "the node key is found (the walk reads the data dir)"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

async fn anonymous_client(
    server: &FleetServer,
    bundle: &TrustBundle,
) -> pb::node_client::NodeClient<tonic::transport::Channel> {
    let tls = tether::mtls::client_config(
        watch::channel(Arc::new(bundle.clone())).1,
        SpiffeId::new("spiffe://fleet.test/tether/server").expect("id"),
        None,
        false,
    );
    let channel = tether::mtls::connect(&[server.address()], tls, Duration::from_secs(10))
        .await
        .expect("TLS to the server");
    pb::node_client::NodeClient::new(channel)
}
